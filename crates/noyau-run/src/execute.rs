//! One cell in a kernel, as nbclient runs it: the `execute_request` (the
//! next cell sent ahead when nothing can go wrong with that), then every
//! message until the `execute_reply` and IOPub `idle` have both come,
//! outputs recorded as they come; the cell's timeout, signals, walltime
//! notices, the save timer and the Dask cluster's notes meanwhile.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use noyau_client::remote::{
    ExecuteOptions, KernelError, KernelEvent, KernelMessage, Lane, Walltime,
};
use serde_json::{json, Value};

use crate::cells::{human, runnable, sleep_until, CellEnd, On, Runner, Signals};
use crate::detach::allocation;
use crate::exit;
use crate::outputs::{execution, timestamp};

/// What a cell has had so far.
struct Wait {
    reply: Option<Value>,
    idle: bool,
    /// Messages that came for it before its turn (it was sent ahead).
    backlog: VecDeque<KernelMessage>,
}

/// What the next thing a cell waits for is.
enum Next {
    Message(Result<KernelMessage, KernelError>),
    /// The cell ends (a signal, its timeout, the walltime).
    End(CellEnd),
    /// Something else was done (a save, a note); wait on.
    Again,
}

impl Runner<'_> {
    /// Runs cell `i` (its own source, or `code`) in kernel `on`.
    pub async fn run_cell(
        &mut self,
        on: On,
        signals: &mut Signals,
        i: usize,
        may_raise: bool,
        code: Option<String>,
    ) -> CellEnd {
        let code = code.unwrap_or_else(|| self.doc.nb.cells[i].source.clone());
        self.doc.nb.cells[i]
            .metadata
            .insert("execution".into(), json!({}));
        let _ = self.doc.builder.start_cell(&mut self.doc.nb, i);
        self.counts.start(&on);
        // What came early was for this cell (the one sent ahead); what comes
        // early from now on is for the next.
        let backlog = std::mem::take(&mut self.early);
        let id = match self.send_cell(&on, i, &code, may_raise) {
            Ok(id) => id,
            Err(e) => return self.died(e),
        };
        let deadline = self
            .opts
            .timeout
            .map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let mut w = Wait {
            reply: None,
            idle: false,
            backlog,
        };
        while !(w.reply.is_some() && w.idle) {
            let m = match w.backlog.pop_front() {
                Some(m) => Ok(m),
                None => match self.next(&on, signals, deadline, i, &id).await {
                    Next::Message(m) => m,
                    Next::End(end) => return end,
                    Next::Again => continue,
                },
            };
            match m {
                Ok(m) => self.take_message(i, &id, m, &mut w),
                Err(e) => return self.lost(e, i, &w),
            }
        }
        let _ = self.doc.builder.finish_cell(&mut self.doc.nb, i);
        end_of(w.reply.as_ref()).unwrap_or(CellEnd::Ok)
    }

    /// Sends the cell (unless it went ahead) and, when nothing can go
    /// wrong with that, the next one: the kernel runs it as soon as this
    /// one ends, and if this one fails, stop_on_error makes the kernel
    /// abort it. Not with a timeout (an interrupt could hit the next cell),
    /// nor when this cell may raise (the next must not run if this one
    /// calls sys.exit), nor with magics.
    fn send_cell(
        &mut self,
        on: &On,
        i: usize,
        code: &str,
        may_raise: bool,
    ) -> Result<String, KernelError> {
        let opts = ExecuteOptions {
            stop_on_error: !may_raise,
            ..Default::default()
        };
        let ahead = self.ahead.take();
        let kernel = self
            .kernels
            .get(on)
            .ok_or_else(|| KernelError::Died("its target is gone".into()))?;
        let id = match ahead {
            Some((j, id)) if j == i => id,
            _ => kernel.execute_request(code, &opts)?,
        };
        if self.opts.timeout.is_some() || may_raise || self.delegating {
            return Ok(id);
        }
        let cells = &self.doc.nb.cells;
        if let Some(j) = (i + 1..cells.len()).find(|&j| runnable(&cells[j])) {
            let next_may_raise = self.opts.allow_errors || cells[j].has_tag("raises-exception");
            let opts = ExecuteOptions {
                stop_on_error: !next_may_raise,
                ..Default::default()
            };
            if let Ok(next) = kernel.execute_request(&cells[j].source, &opts) {
                self.ahead = Some((j, next));
            }
        }
        Ok(id)
    }

    /// Waits for the next message of kernel `on`, doing meanwhile what
    /// comes first (a signal, the timeout, a save, a walltime notice, a
    /// note of the Dask cluster).
    async fn next(
        &mut self,
        on: &On,
        signals: &mut Signals,
        deadline: Option<Instant>,
        i: usize,
        id: &str,
    ) -> Next {
        let save_at = self.doc.saver.due();
        let main = *on == On::Main;
        let Some(kernel) = self.kernels.get(on) else {
            return Next::Message(Err(KernelError::Died("its target is gone".into())));
        };
        tokio::select! {
            biased;
            (name, code) = signals.recv() => {
                if code == exit::WALLTIME {
                    let job = allocation().unwrap_or_else(|| "?".into());
                    return Next::End(CellEnd::Walltime { job, seconds_left: None });
                }
                Next::End(CellEnd::Signal(name, code))
            }
            _ = sleep_until(deadline) => {
                let _ = kernel.interrupt();
                // Give the interrupted cell a moment to report.
                Next::End(self.drain_after_timeout(on, i, id).await)
            }
            _ = sleep_until(save_at) => {
                self.doc.saver.on_due(&self.doc.nb);
                Next::Again
            }
            e = kernel.next_event() => match e {
                Ok(KernelEvent::Message(m)) => Next::Message(Ok(m)),
                Ok(KernelEvent::Walltime(w)) => self.on_walltime(w).map_or(Next::Again, Next::End),
                Err(e) => Next::Message(Err(e)),
            },
            ev = self.magics.dask.event(), if main => {
                self.on_dask_event(ev, Some(i));
                Next::Again
            }
        }
    }

    /// One message while cell `i` (request `id`) runs.
    fn take_message(&mut self, i: usize, id: &str, m: KernelMessage, w: &mut Wait) {
        if m.parent_id.as_deref() != Some(id) {
            // A reply to a magic's own request (a Dask cluster's setup
            // that came late): no magic cell waits for it any more.
            if !self.own_reply(&m, Some(i)).is_empty() {
                return;
            }
            if self
                .ahead
                .as_ref()
                .is_some_and(|(_, a)| m.parent_id.as_deref() == Some(a.as_str()))
            {
                self.early.push_back(m);
            }
            return;
        }
        match m.lane {
            Lane::Iopub => w.idle |= self.on_iopub(i, &m),
            Lane::Shell if m.msg_type == "execute_reply" => {
                if let Some(e) = execution(&mut self.doc.nb, i) {
                    e.insert("shell.execute_reply".into(), timestamp(&m).into());
                }
                w.reply = Some(m.content);
            }
            _ => {}
        }
    }

    /// The kernel is gone while cell `i` ran.
    fn lost(&mut self, e: KernelError, i: usize, w: &Wait) -> CellEnd {
        if w.idle || w.reply.is_some() {
            // The kernel died after this cell ended (its reply, or IOPub
            // idle, came; with the next cell sent ahead, a kernel killed by
            // that cell can lose this one's last IOPub messages): the cell
            // itself is done, the death belongs to the next one.
            let _ = self.doc.builder.finish_cell(&mut self.doc.nb, i);
            return end_of(w.reply.as_ref()).unwrap_or_else(|| self.end_from_outputs(i));
        }
        if self.ahead.is_some() {
            // Neither this cell's reply nor its idle came, and the next
            // cell was already sent: a kernel killed as the next cell
            // began can lose this one's last messages too, so which of
            // the two killed it cannot be told; say so.
            return match self.died(e) {
                CellEnd::Died(desc) => CellEnd::Died(format!(
                    "{desc} (while running this cell or the next one, which was \
                     already sent to it: its last messages were lost)"
                )),
                other => other,
            };
        }
        self.died(e)
    }

    /// A finished cell's end, read from its outputs (an `error` output
    /// means it failed), for when its reply never came.
    fn end_from_outputs(&self, i: usize) -> CellEnd {
        let error = self.doc.nb.cells[i]
            .outputs
            .iter()
            .flatten()
            .find(|o| o.get("output_type").and_then(Value::as_str) == Some("error"));
        match error {
            Some(o) => {
                let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                CellEnd::Error {
                    ename: s("ename"),
                    evalue: s("evalue"),
                }
            }
            None => CellEnd::Ok,
        }
    }
}

/// The end an `execute_reply` says (None without a status).
fn end_of(reply: Option<&Value>) -> Option<CellEnd> {
    let reply = reply?;
    let s = |k: &str| {
        reply
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    match reply.get("status").and_then(Value::as_str)? {
        "error" => Some(CellEnd::Error {
            ename: s("ename"),
            evalue: s("evalue"),
        }),
        _ => Some(CellEnd::Ok),
    }
}

impl Runner<'_> {
    /// After a timeout's interrupt: the cell's last messages, for a moment.
    async fn drain_after_timeout(&mut self, on: &On, i: usize, id: &str) -> CellEnd {
        let secs = self.opts.timeout.unwrap_or(0.0);
        let until = Instant::now() + Duration::from_secs(5);
        let (mut reply, mut idle) = (false, false);
        while !(reply && idle) {
            let Some(kernel) = self.kernels.get(on) else {
                break;
            };
            let m = tokio::select! {
                m = kernel.next() => m,
                _ = tokio::time::sleep_until(until.into()) => break,
            };
            let Ok(m) = m else { break };
            if m.parent_id.as_deref() != Some(id) {
                continue;
            }
            match m.lane {
                Lane::Iopub => idle |= self.on_iopub(i, &m),
                _ => reply |= m.msg_type == "execute_reply",
            }
        }
        CellEnd::Timeout(secs)
    }

    /// A kernel that is gone: at (or past) the walltime a warning announced,
    /// or by the scheduler's TIMEOUT, that is the walltime, not a crash.
    pub fn died(&self, e: KernelError) -> CellEnd {
        let desc = match e {
            KernelError::Died(d) => d,
            other => other.to_string(),
        };
        let past_end = self
            .walltime
            .as_ref()
            .is_some_and(|(_, end)| Instant::now() + Duration::from_secs(5) >= *end);
        if past_end || desc.contains("walltime") {
            let job = self
                .walltime
                .as_ref()
                .map(|(j, _)| j.clone())
                .unwrap_or_else(|| "?".into());
            return CellEnd::Walltime {
                job,
                seconds_left: Some(0),
            };
        }
        CellEnd::Died(desc)
    }

    /// A walltime notice from the agent: a warning is logged; the early
    /// signal ends the cell (Some).
    pub fn on_walltime(&mut self, w: Walltime) -> Option<CellEnd> {
        match w {
            Walltime::Warning { job, seconds_left } => {
                self.walltime = Some((
                    job.clone(),
                    Instant::now() + Duration::from_secs(seconds_left),
                ));
                self.doc.progress.log(&format!(
                    "noyau: walltime: batch job {job} ends in {} (at its time limit); \
                     the run will be saved and stopped then\n",
                    human(seconds_left)
                ));
                None
            }
            Walltime::Near { job, seconds_left } => Some(CellEnd::Walltime { job, seconds_left }),
        }
    }
}
