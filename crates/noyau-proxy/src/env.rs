//! The kernel's environment from the notebook's side: the proxy's [`Env`]
//! component. It keeps the record the agent sent (`EnvReady`), which
//! `%noyau env show` and `%noyau env lock` answer from, the build lines
//! that came while no cell waited, and a `%noyau env SPEC` switch.
//!
//! Choosing an environment is a restart in slow motion. The spec is read
//! here, in the notebook's directory (noyau-env's `sources::for_cell`),
//! and goes to the agent as `SwitchEnv` once the cells sent before it have
//! finished. The agent builds it where the kernel runs, its progress lines
//! shown in the cell, while the old kernel stays; cells sent after the
//! magic are held here, so none of them runs in the old kernel by mistake.
//! On `EnvReady` and the next `KernelReady` (the agent replaced the kernel)
//! the cell ends and the held cells go to the new kernel; on `EnvFailed`
//! the cell shows the tool's message and the held cells go to the old
//! kernel, untouched.

use std::collections::VecDeque;

use bytes::Bytes;
use noyau_link::envelope::{self, Event};
use noyau_link::{Lane, LinkSender};
use noyau_magic::MagicError;
use noyau_wire::RawMessage;

use crate::answer::{Answers, Cell};
use crate::requests::Requests;

/// At most this many bytes of environment build lines are held for the
/// next cell; later ones go to the log only.
const HELD_MAX: usize = 64 * 1024;

/// A `%noyau env SPEC` cell in progress.
struct Switch {
    cell: Cell,
    spec: serde_json::Value,
    /// `SwitchEnv` went to the agent (it waits for earlier cells to end).
    sent: bool,
    /// `EnvReady` came: the next `KernelReady` is the new kernel's.
    built: bool,
    /// Execute requests sent after the magic, for the kernel that wins.
    held: VecDeque<RawMessage>,
}

/// The kernel's environment.
#[derive(Default)]
pub(crate) struct Env {
    /// What the agent built the kernel's environment from, and its lock.
    pub record: Option<serde_json::Value>,
    switch: Option<Switch>,
    /// Build lines that came while no cell waited (a kernel building its
    /// environment at start): shown in the next cell.
    held_progress: String,
}

impl Env {
    /// An environment whose build lines so far (the kernel's own, prepared
    /// before its agent was submitted) go to the first cell.
    pub fn with_held(held: String) -> Env {
        Env {
            held_progress: held,
            ..Default::default()
        }
    }

    /// `%noyau env SPEC`: starts choosing the kernel's environment (the
    /// cell's `busy` went out).
    pub fn switch(&mut self, args: &str, cell: &Cell, attached: bool) -> Result<(), MagicError> {
        // (A second `%noyau env` cell is held until this one ends.)
        if !attached {
            return Err(MagicError::Env(
                "the kernel has not started yet (its job is queued or its first environment \
                       is being built); run this cell again when it has"
                    .into(),
            ));
        }
        let cwd = std::env::current_dir()
            .map_err(|e| MagicError::Env(format!("the kernel's working directory: {e}")))?;
        let spec =
            noyau_env::sources::for_cell(&cwd, crate::agent::kernel_env_var().as_deref(), args)
                .map_err(|e| MagicError::Env(e.to_string()))?;
        tracing::info!(spec = %spec.to_value(), "a cell chose the kernel's environment");
        self.switch = Some(Switch {
            cell: cell.clone(),
            spec: spec.to_value(),
            sent: false,
            built: false,
            held: VecDeque::new(),
        });
        Ok(())
    }

    /// Sends the pending `SwitchEnv` once no earlier request waits for the
    /// kernel: the new kernel replaces the old one only between cells.
    /// What came of it: Some(held cells to replay) when it failed at once.
    pub async fn send_when_idle(
        &mut self,
        requests: &Requests,
        agent: Option<LinkSender>,
        out: &mut Answers,
    ) -> Option<VecDeque<RawMessage>> {
        if !requests.is_empty() {
            return None;
        }
        let sw = self.switch.as_mut().filter(|s| !s.sent)?;
        sw.sent = true;
        let ev = Event::SwitchEnv {
            spec: sw.spec.clone(),
            prepared: None,
        };
        let sent = match agent {
            Some(s) => s
                .send(Lane::Shell, envelope::event(&ev))
                .map_err(|e| e.to_string()),
            None => Err("the link to the agent is down".into()),
        };
        match sent {
            Ok(()) => {
                let text = "noyau: environment: preparing it where the kernel runs; the kernel restarts in it when it is ready\n";
                out.stream(&sw.cell.header, "stderr", text).await;
                None
            }
            Err(e) => Some(
                self.end(
                    Err(MagicError::Env(format!("cannot reach the agent: {e}"))),
                    out,
                )
                .await,
            ),
        }
    }

    /// True while a switch is in progress.
    pub fn switching(&self) -> bool {
        self.switch.is_some()
    }

    /// Holds an execute request while a switch is in progress; gives back
    /// the others.
    pub fn hold(&mut self, lane: Lane, msg: RawMessage) -> Option<RawMessage> {
        let Some(sw) = self.switch.as_mut() else {
            return Some(msg);
        };
        if lane == Lane::Shell
            && msg
                .peek_header()
                .is_ok_and(|h| h.msg_type == "execute_request")
        {
            sw.held.push_back(msg);
            return None;
        }
        Some(msg)
    }

    /// `EnvReady`: the record; true when a switch's build is done (the old
    /// kernel is about to go, and what lived in it with it).
    pub fn ready(&mut self, record: serde_json::Value) -> bool {
        tracing::info!(lock_sha256 = %record["lock_sha256"], "kernel environment ready");
        self.record = Some(record);
        match self.switch.as_mut().filter(|s| s.sent) {
            Some(sw) => {
                sw.built = true;
                true
            }
            None => false,
        }
    }

    /// `KernelReady`: ends a switch whose kernel this is; the held cells.
    pub async fn kernel_ready(&mut self, out: &mut Answers) -> Option<VecDeque<RawMessage>> {
        if !self.switch.as_ref().is_some_and(|s| s.built) {
            return None;
        }
        let rec = self.record.clone().unwrap_or_default();
        let mut what = vec![rec["kind"].as_str().unwrap_or("?").to_string()];
        if let Some(v) = rec["python"].as_str().filter(|v| !v.is_empty()) {
            what.push(format!("Python {v}"));
        }
        if let Some(h) = rec["lock_sha256"].as_str() {
            what.push(format!("lock sha256 {}…", &h[..h.len().min(12)]));
        }
        let text = format!(
            "[noyau] the kernel restarted in its new environment ({}); variables from before are gone. \
             `%noyau env show` tells what it is, `%noyau env lock` writes noyau.lock.\n",
            what.join(", ")
        );
        Some(self.end(Ok(text), out).await)
    }

    /// `EnvFailed`: the build failed; the old kernel runs on. The held cells.
    pub async fn failed(
        &mut self,
        message: String,
        out: &mut Answers,
    ) -> Option<VecDeque<RawMessage>> {
        if self.switch.is_none() {
            tracing::warn!("environment build failed: {message}");
            return None;
        }
        let text = format!(
            "{message}\nThe kernel was not restarted: it runs on in its previous environment."
        );
        Some(self.end(Err(MagicError::Env(text)), out).await)
    }

    /// Answers the switch's cell; the held cells, for the relay to send on.
    async fn end(
        &mut self,
        result: Result<String, MagicError>,
        out: &mut Answers,
    ) -> VecDeque<RawMessage> {
        let Some(sw) = self.switch.take() else {
            return VecDeque::new();
        };
        out.finish(&sw.cell, result).await;
        sw.held
    }

    /// The kernel is gone during a switch: its cell and the held ones are
    /// among the requests that fail.
    pub fn fail_with(&mut self, requests: &mut Requests) {
        let Some(sw) = self.switch.take() else { return };
        requests.push_held(sw.cell);
        for m in sw.held {
            requests.push_held(Cell::of(&m));
        }
    }

    /// An `EnvProgress` line: shown in the waiting cell (the switch's, else
    /// the running one); with no cell waiting (the build runs at kernel
    /// start), held for the next cell, so that cell tells why it waits.
    pub async fn progress(&mut self, line: &str, running: Option<Bytes>, out: &mut Answers) {
        let text = format!("noyau: environment: {line}\n");
        let waiting = self
            .switch
            .as_ref()
            .map(|s| s.cell.header.clone())
            .or(running);
        match waiting {
            Some(parent) => out.stream(&parent, "stderr", &text).await,
            None if self.held_progress.len() < HELD_MAX => self.held_progress.push_str(&text),
            None => tracing::info!("{}", text.trim_end()),
        }
    }

    /// A new cell: the build lines held for it.
    pub async fn show_held(&mut self, parent: &Bytes, out: &mut Answers) {
        let held = std::mem::take(&mut self.held_progress);
        if !held.is_empty() {
            out.stream(parent, "stderr", &held).await;
        }
    }
}
