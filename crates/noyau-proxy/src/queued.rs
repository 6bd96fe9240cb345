//! A kernel whose batch job waits in the queue, and the job's walltime
//! notices: the proxy's [`Queued`] component.
//!
//! Until the agent dials in, the proxy stands in for the kernel, which
//! every frontend must see as up and busy with the queued cells: it answers
//! `kernel_info_request` (from the inner kernelspec) and `history_request`
//! (empty) at once, then publishes the kernel's state with an empty parent
//! (JupyterLab and jupyter_server ignore the status of a kernel_info
//! request), idle, or busy while a cell waits; each `execute_request` is
//! met with `busy` at once, with that request as parent. Every other
//! request is queued. The first `kernel_info` answered after a frontend
//! subscribes to IOPub gets the queue note as a stdout stream (the
//! kernel's first output says at once that a job is pending), and
//! the first waiting cell shows it as a `display_data` with a `display_id`,
//! updated (`update_display_data`) as the reason, the estimated start and
//! the time waited change. When the job starts, the note is cleared
//! (`clear_output`) before the cell runs, so the saved notebook holds what
//! the kernel printed and nothing else. An interrupt while queued cancels
//! the job and ends the kernel; a shutdown (which jupyter_client precedes
//! with an interrupt) cancels it quietly.
//!
//! Walltime notices from the agent go, as stderr, into the running cell,
//! else into the next one.

use std::time::{Duration, Instant};

use bytes::Bytes;
use noyau_link::Lane;
use noyau_magic::note::{describe, Note};
use noyau_sched::JobState;
use noyau_wire::RawMessage;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::answer::Answers;

/// `language_info` for a kernelspec's language, as its kernel would give it
/// in broad strokes (the real kernel's reply replaces it once it runs).
pub fn language_info(language: &str) -> Value {
    let (mime, ext) = match language.to_ascii_lowercase().as_str() {
        "python" => ("text/x-python", ".py"),
        "r" => ("text/x-r-source", ".r"),
        "julia" => ("application/julia", ".jl"),
        "c++" | "cpp" => ("text/x-c++src", ".cpp"),
        "javascript" => ("application/javascript", ".js"),
        _ => ("text/plain", ".txt"),
    };
    json!({
        "name": language.to_ascii_lowercase(),
        "version": "",
        "mimetype": mime,
        "file_extension": ext,
    })
}

pub fn kernel_info_content(language: &str, job: &str) -> Value {
    json!({
        "status": "ok",
        "protocol_version": noyau_wire::build::PROTOCOL_VERSION,
        "implementation": "noyau",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": language_info(language),
        "banner": format!("noyau: this kernel waits for its batch job {job}; requests are queued until it starts"),
        "help_links": [],
        "debugger": false,
    })
}

/// `9 min 58 s`.
pub fn human(secs: u64) -> String {
    match (secs / 60, secs % 60) {
        (0, s) => format!("{s} s"),
        (m, 0) => format!("{m} min"),
        (m, s) => format!("{m} min {s} s"),
    }
}

/// What a request sent while the job is queued comes to.
pub(crate) enum WhileQueued {
    /// Not for the proxy: it waits with the others.
    Pass,
    /// Answered by the proxy.
    Answered,
    /// An interrupt or a shutdown: the job must be cancelled.
    Cancel { shutdown: bool },
}

/// A reply the queued kernel sends itself, and the stdout that goes with it.
struct Reply {
    kind: &'static str,
    content: Value,
    note: Option<String>,
}

/// The queued kernel and the walltime notices.
pub(crate) struct Queued {
    /// The batch job's state while we wait for its agent (None: local, or taken over).
    job_state: Option<watch::Receiver<JobState>>,
    /// The queue note shown in the first waiting cell.
    note: Option<(Bytes, Note)>,
    submitted: Instant,
    /// A walltime notice that came while no cell ran: shown in the next one.
    held_notice: Option<String>,
    /// The queue note went out, as the kernel's first output, since the
    /// last frontend subscribed to IOPub.
    announced: bool,
    backend: String,
    inner: String,
}

impl Queued {
    pub fn new(job_state: Option<watch::Receiver<JobState>>, backend: &str, inner: &str) -> Self {
        Queued {
            job_state,
            note: None,
            submitted: Instant::now(),
            held_notice: None,
            announced: false,
            backend: backend.into(),
            inner: inner.into(),
        }
    }

    /// A frontend subscribed to IOPub: it gets the queue note with the
    /// next kernel_info (one published before it subscribed is lost).
    pub fn subscribed(&mut self) {
        self.announced = false;
    }

    /// True while a batch job is followed (the proxy stands in for the kernel).
    pub fn follows(&self) -> bool {
        self.job_state.is_some()
    }

    /// True while the job has not started.
    pub fn queued(&self) -> bool {
        self.job_state.as_ref().is_some_and(|rx| {
            matches!(
                *rx.borrow(),
                JobState::Pending { .. } | JobState::Unknown { .. }
            )
        })
    }

    /// Resolves when the job's state changes; forgets a closed channel.
    pub async fn changed(&mut self) {
        match self.job_state.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    self.job_state = None;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// How the scheduler ended the job, once its watcher sees the end (the
    /// agent's SIGTERM comes first; Slurm keeps an ended job's state in
    /// its listing for a while: NODE_FAIL, PREEMPTED, CANCELLED, TIMEOUT).
    pub async fn job_end(&mut self) -> Option<String> {
        let rx = self.job_state.as_mut()?;
        let ended = |s: &JobState| matches!(s, JobState::Ended(_));
        // Bounded: a few watcher polls; the sender's end is as good an answer.
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(ended)).await;
        match &*rx.borrow() {
            JobState::Ended(end) => Some(end.description.clone()),
            _ => None,
        }
    }

    /// The job's state changed (or 10 s passed): the note follows.
    pub async fn on_job_state(&mut self, out: &mut Answers, job: &str) {
        let Some(rx) = &self.job_state else { return };
        let st = rx.borrow().clone();
        match self.describe(job) {
            None => {
                if let JobState::Running { node, .. } = &st {
                    tracing::info!(%job, %node, waited = ?self.submitted.elapsed(), "job started");
                }
                self.clear_note(out).await;
            }
            Some(text) => {
                let Some((parent, note)) = self.note.as_mut() else {
                    return;
                };
                if let Some(o) = note.update(&text) {
                    out.iopub(o.msg_type, parent, o.content).await;
                }
            }
        }
    }

    /// Removes the queue note from its cell, before the kernel writes there.
    pub async fn clear_note(&mut self, out: &mut Answers) {
        if let Some((parent, note)) = self.note.take() {
            if note.shown {
                out.iopub("clear_output", &parent, json!({"wait": false}))
                    .await;
            }
        }
    }

    /// A request sent while the job is queued: answered here when the
    /// proxy can (kernel_info), noted (the first cell gets the queue note).
    pub async fn on_request(
        &mut self,
        lane: Lane,
        msg: &RawMessage,
        out: &mut Answers,
        job: &str,
        fresh: bool,
    ) -> WhileQueued {
        let Ok(h) = msg.peek_header() else {
            return WhileQueued::Pass;
        };
        match (lane, h.msg_type.as_str()) {
            (Lane::Shell | Lane::Control, "kernel_info_request") => {
                self.kernel_info(lane, msg, out, job).await;
                WhileQueued::Answered
            }
            (Lane::Shell, "history_request") => {
                // No history before the kernel runs; JupyterLab asks at start.
                let reply = Reply {
                    kind: "history_reply",
                    content: json!({"status": "ok", "history": []}),
                    note: None,
                };
                self.answer(lane, msg, reply, out).await;
                WhileQueued::Answered
            }
            (Lane::Control, "shutdown_request" | "interrupt_request") if fresh => {
                tracing::info!(%job, "{} while queued: cancelling the job", h.msg_type);
                let shutdown = h.msg_type == "shutdown_request";
                let (kind, content) = if shutdown {
                    let restart = msg.restart_requested();
                    (
                        "shutdown_reply",
                        json!({"status": "ok", "restart": restart}),
                    )
                } else {
                    ("interrupt_reply", json!({"status": "ok"}))
                };
                let r = out.message(msg.identities.clone(), kind, &msg.header, content);
                out.send(Lane::Control, r).await;
                self.clear_note(out).await;
                WhileQueued::Cancel { shutdown }
            }
            (Lane::Shell, "execute_request") => {
                // Busy at once: the cell waits for the job as for a kernel.
                out.status(&msg.header, "busy").await;
                if self.note.is_none() {
                    self.note = Some((msg.header.clone(), Note::new()));
                    self.on_job_state(out, job).await;
                }
                WhileQueued::Pass
            }
            _ => WhileQueued::Pass,
        }
    }

    async fn kernel_info(&mut self, lane: Lane, msg: &RawMessage, out: &mut Answers, job: &str) {
        let language = noyau_wire::kernelspec::find(&self.inner)
            .map(|f| f.spec.language)
            .unwrap_or_else(|_| "python".into());
        let content = kernel_info_content(&language, job);
        let note = if self.announced {
            None
        } else {
            self.announced = true;
            self.describe(job)
        };
        let reply = Reply {
            kind: "kernel_info_reply",
            content,
            note,
        };
        self.answer(lane, msg, reply, out).await;
    }

    /// Answers a request as a kernel would (busy, the reply, its output,
    /// idle), then publishes the kernel's own state again: a frontend that
    /// ignores the status of such requests (JupyterLab: kernel_info) must
    /// still read idle, or busy while a cell waits.
    async fn answer(&self, lane: Lane, msg: &RawMessage, reply: Reply, out: &mut Answers) {
        out.status(&msg.header, "busy").await;
        let r = out.message(
            msg.identities.clone(),
            reply.kind,
            &msg.header,
            reply.content,
        );
        out.send(lane, r).await;
        if let Some(text) = reply.note {
            out.stream(&msg.header, "stdout", &format!("{text}\n"))
                .await;
        }
        out.status(&msg.header, "idle").await;
        self.own_status(out).await;
    }

    /// The queued kernel's own state: busy while a cell waits, else idle.
    pub async fn own_status(&self, out: &mut Answers) {
        match &self.note {
            Some((cell, _)) => out.status(cell, "busy").await,
            None => out.status(&Bytes::new(), "idle").await,
        }
    }

    /// The queue note's text now; None once the job runs.
    fn describe(&self, job: &str) -> Option<String> {
        let st = self.job_state.as_ref()?.borrow().clone();
        describe(&self.backend, job, &st, self.submitted.elapsed().as_secs())
    }

    /// A walltime notice, as stderr of the running cell, else of the next
    /// cell the frontend sends.
    pub async fn walltime_notice(
        &mut self,
        text: String,
        running: Option<Bytes>,
        out: &mut Answers,
    ) {
        tracing::warn!("{}", text.trim_end());
        match running {
            Some(parent) => out.stream(&parent, "stderr", &text).await,
            None => self.held_notice = Some(text),
        }
    }

    /// A new cell: the notice held for it, if any.
    pub async fn show_held(&mut self, parent: &Bytes, out: &mut Answers) {
        if let Some(text) = self.held_notice.take() {
            out.stream(parent, "stderr", &text).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_infos() {
        assert_eq!(language_info("python")["file_extension"], ".py");
        assert_eq!(language_info("R")["name"], "r");
        assert_eq!(human(598), "9 min 58 s");
    }
}
