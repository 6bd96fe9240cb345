//! The proxy's side of cell-level delegation ([`crate::targets`]): a
//! `%%noyau on` cell goes to its target, and what a target's agent sends
//! comes back to the frontend (its cells' messages, re-signed) or to the
//! magic that asked (a push or pull of noyau's own).

use bytes::Bytes;
use noyau_link::envelope::{Event, Payload};
use noyau_link::Lane;
use noyau_magic::note::describe;
use noyau_magic::{MagicError, OnMagic};
use noyau_wire::RawMessage;
use serde_json::json;

use crate::answer::{Cell, Failure};
use crate::magic::host;
use crate::relay::Proxy;
use crate::targets::{with_code, RunningCell, State, Target, TargetEvent, What};

impl Proxy {
    /// Starts target `name` unless it runs, its environment prepared here
    /// first (`cell_env`, else its profile's, else the kernel's), the build
    /// lines shown in `cell` as they come.
    pub async fn start_target(
        &mut self,
        name: &str,
        overrides: &[String],
        cell_env: Option<&str>,
        cell: Option<&Cell>,
    ) -> Result<(), MagicError> {
        if self.targets.map.contains_key(name) {
            return Ok(());
        }
        let err = |e: &dyn std::fmt::Display| {
            MagicError::Target(format!("cannot start target {name:?}: {e}"))
        };
        // The overrides are a cell's `key=value` words: the notebook's.
        let cwd = noyau_trust::anchor::ProjectDir::cwd().map_err(|e| err(&e))?;
        let origin = noyau_config::OverridesFrom::Cell(&cwd);
        let (backend, profile) =
            noyau_config::resolve_from(None, Some(name), overrides, origin).map_err(|e| err(&e))?;
        let spec = cell_env
            .map(noyau_env::sources::TargetSpec::Cell)
            .or_else(|| noyau_env::sources::TargetSpec::profile(&profile));
        let lines = match cell {
            Some(c) => crate::agent::Lines::Cell(&mut self.out, &c.header),
            None => crate::agent::Lines::Log,
        };
        let env = crate::agent::job_env(spec, lines)
            .await
            .map_err(|e| err(&e))?;
        self.targets
            .start(
                name,
                (backend, profile),
                &self.cfg.inner,
                &self.cfg.noyau_exe,
                env,
            )
            .await?;
        if let Some(at) = self.targets.idle_released.remove(name) {
            let text = format!(
                "noyau: target {name} was released at {} while idle: its variables were lost. This cell runs in a new job for it.\n",
                crate::idle::clock_time(at)
            );
            if let Some(c) = cell {
                self.out.stream(&c.header, "stderr", &text).await;
            }
        }
        Ok(())
    }

    pub async fn run_on_target(&mut self, mut m: OnMagic, body: String, mut msg: RawMessage) {
        let cell = Cell::of(&msg);
        let body = m.code_for(body);
        self.forget_releasing(&m.target).await;
        if let Err(e) = self
            .start_target(&m.target, &m.overrides, m.env.as_deref(), Some(&cell))
            .await
        {
            return self.out.answer(&cell, Err(e)).await;
        }
        let Some(content) = with_code(&msg.content, &body) else {
            let e = MagicError::Target("malformed execute_request".into());
            return self.out.answer(&cell, Err(e)).await;
        };
        msg.content = content;
        let Some(id) = msg.peek_header().ok().map(|h| h.msg_id) else {
            return;
        };
        let t = self.targets.map.get_mut(&m.target).expect("just started");
        let silent = is_silent(&msg.content);
        t.running
            .insert(id, RunningCell::new(cell, m.quiet, silent));
        t.idle.touch();
        if t.state == State::Queued && t.note.is_none() {
            t.note = Some((msg.header.clone(), noyau_magic::note::Note::new()));
        }
        t.send(Lane::Shell, msg.into_frames());
    }

    /// A target whose job is ending leaves the table, so that its next use
    /// starts a new one.
    pub async fn forget_releasing(&mut self, name: &str) {
        if self.targets.releasing(name) {
            if let Some(old) = self.targets.map.remove(name) {
                self.fail_target(old, "released").await;
            }
        }
    }

    /// A target is gone: its running cells fail with the reason.
    async fn end_target(&mut self, name: &str, why: &str) {
        if let Some(t) = self.targets.map.remove(name) {
            self.fail_target(t, why).await;
        }
    }

    /// Ends a target taken out of the table: its running cells and
    /// transfers fail with the reason.
    async fn fail_target(&mut self, mut t: Target, why: &str) {
        t.release();
        let name = t.name.clone();
        tracing::info!(target = %name, "target ended: {why}");
        let mut host = host!(self);
        self.magics.transfers.target_ended(&mut host, &name, why);
        let outbox = host.done();
        self.flush(outbox).await;
        let text = format!("target {name} ended: {why}");
        let unanswered = std::mem::take(&mut t.running).into_values();
        for running in unanswered.filter(|c| !c.replied) {
            let failure = Failure {
                reply_type: "execute_reply",
                ename: "NoyauTargetError",
                evalue: &text,
                traceback: json!([text]),
                execution_count: json!(self.out.exec_count),
            };
            self.out.fail(&running.cell, failure).await;
        }
    }

    pub async fn on_target_event(&mut self, ev: TargetEvent) {
        let TargetEvent { name, id, what } = ev;
        if self.targets.map.get(&name).is_none_or(|t| t.id != id) {
            // From a released target that a new one of that name replaced.
            return;
        }
        match what {
            What::Attached(sender) => {
                let Some(t) = self.targets.map.get_mut(&name) else {
                    return;
                };
                t.attach(sender);
                // The cell's output is the target's from now on.
                if let Some((parent, _)) = t.note.take().filter(|(_, n)| n.shown) {
                    let content = json!({"wait": false});
                    self.out.iopub("clear_output", &parent, content).await;
                }
            }
            What::Queue(state) => self.target_queued(&name, &state).await,
            What::Message(lane, Payload::Jupyter(frames)) => {
                self.relay_from_target(&name, lane, frames).await;
            }
            What::Message(_, Payload::Event(ev)) => self.on_target_agent_event(&name, ev).await,
            What::Ended(why) => self.end_target(&name, &why).await,
        }
    }

    /// The queue note of the first cell waiting for target `name`.
    async fn target_queued(&mut self, name: &str, state: &noyau_sched::JobState) {
        let Some(t) = self.targets.map.get_mut(name) else {
            return;
        };
        let label = format!("{} (target {name})", t.job);
        let waited = t.submitted.elapsed().as_secs();
        let Some(text) = describe(&t.backend, &label, state, waited) else {
            return;
        };
        let Some((parent, note)) = t.note.as_mut() else {
            return;
        };
        if let Some(o) = note.update(&text) {
            let parent = parent.clone();
            self.out.iopub(o.msg_type, &parent, o.content).await;
        }
    }

    async fn on_target_agent_event(&mut self, name: &str, ev: Event) {
        match ev {
            Event::AgentHello { host, .. } => {
                if let Some(t) = self.targets.map.get_mut(name) {
                    t.node = Some(host);
                }
            }
            Event::KernelReady { .. } => {
                if let Some(t) = self.targets.map.get_mut(name) {
                    if t.state != State::Releasing {
                        t.state = State::Ready;
                    }
                }
            }
            Event::KernelDied { description, .. } => {
                self.end_target(name, &format!("its kernel died: it {description}"))
                    .await;
            }
            Event::AgentError { message } => {
                self.end_target(name, &format!("it could not start: {message}"))
                    .await;
            }
            other => tracing::debug!(target = %name, "event {other:?}"),
        }
    }

    async fn relay_from_target(&mut self, name: &str, lane: Lane, frames: Vec<Bytes>) {
        let mut msg = match RawMessage::from_frames(frames) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(target = %name, "dropped a malformed message: {e}");
                return;
            }
        };
        let parent = msg.parent_msg_id().unwrap_or_default();
        let msg_type = msg.peek_header().map(|h| h.msg_type).unwrap_or_default();
        if let Some(t) = self.targets.map.get_mut(name) {
            if let Some(c) = t.running.get_mut(&parent) {
                renumber_cell(&mut msg, &msg_type, c, &mut self.out);
            }
        }
        self.out.signer.resign(&mut msg);
        if self.own_message(lane, &msg).await {
            return;
        }
        let Some(t) = self.targets.map.get_mut(name) else {
            return;
        };
        if lane == Lane::Iopub {
            // The where-line goes right after the cell's execute_input, as
            // a neutral display (stderr reads as an error in Lab).
            let announce = msg_type == "execute_input"
                && t.running.get_mut(&parent).is_some_and(|c| {
                    let first = !c.announced;
                    c.announced = true;
                    first
                });
            if is_idle(&msg_type, &msg) {
                t.cell_ended(&parent, false);
            } else if msg_type == "execute_input" {
                t.cell_started(&parent);
            }
            let where_line = t.where_line();
            let parent_header = msg.parent_header.clone();
            self.out.publish(msg).await;
            if announce {
                let text = where_line.trim_end();
                let content =
                    json!({"data": {"text/plain": text}, "metadata": {}, "transient": {}});
                self.out
                    .iopub("display_data", &parent_header, content)
                    .await;
            }
            return;
        }
        if msg_type == "execute_reply" {
            t.cell_ended(&parent, true);
            t.idle.touch();
        }
        self.out.send(lane, msg).await;
    }
}

/// A target cell shows the notebook's execution count, not its target's:
/// it takes the notebook's next count with its first execute_input or
/// execute_reply, and the notebook kernel's later counts shift by one.
fn renumber_cell(
    msg: &mut RawMessage,
    msg_type: &str,
    c: &mut RunningCell,
    out: &mut crate::answer::Answers,
) {
    let next = || {
        out.exec_count += 1;
        out.delegated += 1;
        out.exec_count
    };
    let counts = match msg_type {
        "execute_input" => true,
        "execute_reply" => reply_of_a_run(msg),
        _ => false,
    };
    if let Some(count) = c.count(counts, next) {
        crate::answer::renumber(msg, |_| count);
    }
}

/// An execute_reply of a cell that ran: not `aborted` (a cell queued
/// behind an error never ran, and takes no count, as in its kernel) and
/// with a count.
fn reply_of_a_run(msg: &RawMessage) -> bool {
    #[derive(serde::Deserialize)]
    struct Reply<'a> {
        #[serde(borrow)]
        status: &'a str,
        execution_count: Option<i64>,
    }
    serde_json::from_slice::<Reply>(&msg.content)
        .is_ok_and(|r| r.status != "aborted" && r.execution_count.is_some())
}

/// An execute_request asking to run silently (no count taken, as in the
/// kernel).
fn is_silent(content: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Request {
        #[serde(default)]
        silent: bool,
    }
    serde_json::from_slice::<Request>(content).is_ok_and(|r| r.silent)
}

/// An IOPub `status` message saying `idle`.
fn is_idle(msg_type: &str, msg: &RawMessage) -> bool {
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        execution_state: &'a str,
    }
    msg_type == "status"
        && serde_json::from_slice::<Status>(&msg.content).is_ok_and(|s| s.execution_state == "idle")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_content(content: &'static [u8]) -> RawMessage {
        RawMessage::from_frames(vec![
            Bytes::from_static(b"<IDS|MSG>"),
            Bytes::new(),
            Bytes::from_static(br#"{"msg_id":"r","msg_type":"execute_reply"}"#),
            Bytes::from_static(b"{}"),
            Bytes::from_static(b"{}"),
            Bytes::from_static(content),
        ])
        .unwrap()
    }

    #[test]
    fn only_a_reply_of_a_cell_that_ran_takes_a_count() {
        let ran = [
            &br#"{"status":"ok","execution_count":3}"#[..],
            br#"{"status":"error","execution_count":3,"ename":"E"}"#,
        ];
        for content in ran {
            assert!(reply_of_a_run(&with_content(content)));
        }
        // Queued behind an error: aborted, no count (ipykernel).
        assert!(!reply_of_a_run(&with_content(br#"{"status":"aborted"}"#)));
        assert!(!reply_of_a_run(&with_content(br#"{"status":"ok"}"#)));
        assert!(is_silent(br#"{"code":"1","silent":true}"#));
        assert!(!is_silent(br#"{"code":"1"}"#));
    }
}
