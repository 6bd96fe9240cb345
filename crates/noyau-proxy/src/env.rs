//! The kernel's environment from the notebook's side: the proxy's [`Env`]
//! component. It keeps the record the agent sent (`EnvReady`), which
//! `%noyau env show` and `%noyau env lock` answer from, the build lines
//! that came while no cell waited, and the cells that change what the
//! kernel runs with: `%noyau env SPEC` and `%noyau data URL --sha256 HEX`.
//!
//! Both are prepared here, on the submitting host, where the network is
//! (noyau-env's `prepare`, as `noyau run` does before it submits): the
//! environment is built into the shared cache, the data file fetched and
//! verified into its store, each line shown in the cell as it comes. The
//! agent is then told to use what was prepared, offline. While such a
//! cell is in progress the cells sent after it are held here, so that
//! none runs before what it may need (or in the old kernel by mistake).
//!
//! Choosing an environment is a restart in slow motion. The spec is read
//! here, in the notebook's directory (noyau-env's `sources::for_cell`),
//! and prepared; it goes to the agent as `SwitchEnv` with what was
//! prepared once the cells sent before it have finished, and the agent
//! checks it while the old kernel stays. On `EnvReady` and the next
//! `KernelReady` (the agent replaced the kernel) the cell ends and the
//! held cells go to the new kernel; when the preparation or the agent
//! (`EnvFailed`) fails, the cell shows the tool's message and the held
//! cells go to the old kernel, untouched. A data file goes to the agent
//! as `AddData`; its `DataAdded` ends the cell.

use std::collections::VecDeque;

use bytes::Bytes;
use noyau_client::prepare::{Step, WithLines};
use noyau_env::sources::Declared;
use noyau_env::{EnvError, Prepared};
use noyau_link::envelope::{self, Event};
use noyau_link::{Lane, LinkSender};
use noyau_magic::MagicError;
use noyau_wire::RawMessage;

use crate::answer::{Answers, Cell};
use crate::requests::Requests;

/// The preparation of a change, on this host.
type Work = WithLines<Result<Prepared, EnvError>>;

/// What a change cell asks for.
enum What {
    /// `%noyau env SPEC`: the spec, in normal form.
    Switch(serde_json::Value),
    /// `%noyau data …`.
    Data,
}

/// A `%noyau env SPEC` or `%noyau data` cell in progress.
struct Change {
    cell: Cell,
    what: What,
    /// The preparation here, while it runs.
    work: Option<Work>,
    /// What it prepared, once done.
    prepared: Option<Prepared>,
    /// The agent was told (`SwitchEnv`, `AddData`).
    sent: bool,
    /// `EnvReady` came: the next `KernelReady` is the new kernel's.
    built: bool,
    /// Execute requests sent after the magic, for the kernel that follows.
    held: VecDeque<RawMessage>,
}

impl Change {
    fn is_switch(&self) -> bool {
        matches!(self.what, What::Switch(_))
    }
}

/// The kernel's environment.
#[derive(Default)]
pub(crate) struct Env {
    /// What the agent built the kernel's environment from, and its lock.
    pub record: Option<serde_json::Value>,
    change: Option<Change>,
    /// Build lines that came while no cell waited (a kernel building its
    /// environment at start): shown in the next cell.
    held_progress: String,
    /// The magics whose changes this kernel's job took (`%noyau env`,
    /// `%noyau data`): a new job after an idle release has none of them.
    pub done: std::collections::BTreeSet<&'static str>,
}

/// A change needs the kernel's agent: it is what gets told.
fn need_attached(attached: bool) -> Result<(), MagicError> {
    if attached {
        return Ok(());
    }
    Err(MagicError::Env(
        "the kernel has not started yet (its job is queued or its first environment \
         is being built); run this cell again when it has"
            .into(),
    ))
}

/// Tells the agent `ev`.
fn send(agent: Option<LinkSender>, ev: &Event) -> Result<(), String> {
    match agent {
        Some(s) => s
            .send(Lane::Shell, envelope::event(ev))
            .map_err(|e| e.to_string()),
        None => Err("the link to the agent is down".into()),
    }
}

/// The kernel's working directory, anchored to its inode (noyau-trust's
/// anchor): `getcwd`'s string may resolve elsewhere when it is used.
fn cwd() -> Result<noyau_trust::anchor::ProjectDir, MagicError> {
    noyau_trust::anchor::ProjectDir::cwd()
        .map_err(|e| MagicError::Env(format!("the kernel's working directory: {e}")))
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

    /// `%noyau env SPEC`: starts preparing the kernel's new environment
    /// here (the cell's `busy` went out).
    pub fn switch(&mut self, args: &str, cell: &Cell, attached: bool) -> Result<(), MagicError> {
        // (A second `%noyau env` cell is held until this one ends.)
        need_attached(attached)?;
        let spec =
            noyau_env::sources::for_cell(&cwd()?, crate::agent::kernel_env_var().as_deref(), args)
                .map_err(|e| MagicError::Env(e.to_string()))?;
        // Its key, not the spec: a lock it holds may be a file the notebook
        // named, whose text is never shown (noyau-env's `named`).
        tracing::info!(key = %spec.cache_key(), "a cell chose the kernel's environment");
        let what = What::Switch(spec.to_value());
        self.start(
            cell,
            what,
            Declared {
                spec: Some(spec),
                data: Vec::new(),
            },
        );
        Ok(())
    }

    /// `%noyau data URL --sha256 HEX [--name N]`: starts fetching the file
    /// here, for the running kernel (the cell's `busy` went out).
    pub fn add_data(
        &mut self,
        words: &[String],
        cell: &Cell,
        attached: bool,
    ) -> Result<(), MagicError> {
        need_attached(attached)?;
        let r = noyau_env::data::parse_magic(&words.join(" "), &cwd()?)
            .map_err(|e| MagicError::Data(e.to_string()))?;
        // The URL as written may carry credentials.
        let url = noyau_env::index::redact(&r.url);
        tracing::info!(url = %url, name = %r.name, "a cell pinned a data file");
        self.start(
            cell,
            What::Data,
            Declared {
                spec: None,
                data: vec![r],
            },
        );
        Ok(())
    }

    fn start(&mut self, cell: &Cell, what: What, declared: Declared) {
        self.change = Some(Change {
            cell: cell.clone(),
            what,
            work: Some(noyau_client::prepare::start(&declared)),
            prepared: None,
            sent: false,
            built: false,
            held: VecDeque::new(),
        });
    }

    /// True while a change is being prepared here.
    pub fn preparing(&self) -> bool {
        self.change.as_ref().is_some_and(|c| c.work.is_some())
    }

    /// The preparation's next line or its result (cancel-safe); never
    /// ready while nothing is prepared.
    pub async fn next_prepared(&mut self) -> Step<Result<Prepared, EnvError>> {
        match self.change.as_mut().and_then(|c| c.work.as_mut()) {
            Some(w) => w.next().await,
            None => std::future::pending().await,
        }
    }

    /// A line of the preparation: in its cell.
    pub async fn prepare_line(&mut self, line: &str, out: &mut Answers) {
        tracing::info!("preparing: {line}");
        let Some(c) = self.change.as_ref() else {
            return;
        };
        let what = if c.is_switch() { "environment" } else { "data" };
        let text = format!("noyau: {what}: {line}\n");
        out.stream(&c.cell.header, "stderr", &text).await;
    }

    /// The preparation ended: a data file goes to the agent at once, an
    /// environment when the kernel is idle. Some(held cells to replay)
    /// when the change ended here.
    pub async fn prepared(
        &mut self,
        result: Result<Prepared, EnvError>,
        requests: &Requests,
        agent: Option<LinkSender>,
        out: &mut Answers,
    ) -> Option<VecDeque<RawMessage>> {
        let c = self.change.as_mut()?;
        c.work = None;
        let prepared = match result {
            Ok(p) => p,
            Err(e) => {
                let err = match c.what {
                    What::Switch(_) => MagicError::Env(format!(
                        "{e}\nThe kernel was not restarted: it runs on in its previous environment."
                    )),
                    What::Data => MagicError::Data(e.to_string()),
                };
                return Some(self.end(Err(err), out).await);
            }
        };
        let file = prepared.data.first().map(serde_json::to_value);
        c.prepared = Some(prepared);
        match (&c.what, file) {
            (What::Data, Some(Ok(file))) => {
                c.sent = true;
                let sent = send(agent, &Event::AddData { file });
                self.ended_if_failed(sent, out).await
            }
            (What::Data, _) => {
                let err = MagicError::Data("the data file was not prepared".into());
                Some(self.end(Err(err), out).await)
            }
            (What::Switch(_), _) => self.send_when_idle(requests, agent, out).await,
        }
    }

    /// `DataAdded`: the agent shows the file to the kernel (or says why
    /// not); ends the data cell. The held cells.
    pub async fn data_added(
        &mut self,
        error: Option<String>,
        out: &mut Answers,
    ) -> Option<VecDeque<RawMessage>> {
        let c = self.change.as_ref().filter(|c| c.sent && !c.is_switch())?;
        let file = c.prepared.as_ref().and_then(|p| p.data.first());
        let result = match (error, file) {
            (None, Some(f)) => Ok(f.shown()),
            (Some(e), _) => Err(MagicError::Data(format!("the kernel's agent: {e}"))),
            (None, None) => Err(MagicError::Data("the data file was not prepared".into())),
        };
        Some(self.end(result, out).await)
    }

    /// Sends the pending `SwitchEnv` once it is prepared and no earlier
    /// request waits for the kernel: the new kernel replaces the old one
    /// only between cells. Some(held cells to replay) when it failed at once.
    pub async fn send_when_idle(
        &mut self,
        requests: &Requests,
        agent: Option<LinkSender>,
        out: &mut Answers,
    ) -> Option<VecDeque<RawMessage>> {
        if !requests.is_empty() {
            return None;
        }
        let c = self.change.as_mut().filter(|c| !c.sent)?;
        let (What::Switch(spec), Some(prepared)) = (&c.what, &c.prepared) else {
            return None;
        };
        c.sent = true;
        let ev = Event::SwitchEnv {
            spec: spec.clone(),
            prepared: serde_json::to_value(prepared).ok(),
        };
        let text = match &prepared.entry {
            Some(_) => format!(
                "noyau: environment: built on {}; the kernel restarts in it\n",
                prepared.host
            ),
            None => "noyau: environment: preparing it where the kernel runs; the kernel restarts in it when it is ready\n".into(),
        };
        let header = c.cell.header.clone();
        let sent = send(agent, &ev);
        if sent.is_ok() {
            out.stream(&header, "stderr", &text).await;
        }
        self.ended_if_failed(sent, out).await
    }

    /// Ends the change when the agent could not be told.
    async fn ended_if_failed(
        &mut self,
        sent: Result<(), String>,
        out: &mut Answers,
    ) -> Option<VecDeque<RawMessage>> {
        let e = sent.err()?;
        let err = MagicError::Env(format!("cannot reach the agent: {e}"));
        Some(self.end(Err(err), out).await)
    }

    /// True while a change is in progress: prepared here, or sent to the
    /// agent and not answered yet.
    pub fn changing(&self) -> bool {
        self.change.is_some()
    }

    /// True while a switch waits to go to the agent.
    pub fn switching(&self) -> bool {
        self.change
            .as_ref()
            .is_some_and(|c| c.is_switch() && !c.sent)
    }

    /// Holds an execute request while a change is in progress; gives back
    /// the others.
    pub fn hold(&mut self, lane: Lane, msg: RawMessage) -> Option<RawMessage> {
        let Some(sw) = self.change.as_mut() else {
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
        match self.change.as_mut().filter(|c| c.sent && c.is_switch()) {
            Some(sw) => {
                sw.built = true;
                true
            }
            None => false,
        }
    }

    /// `KernelReady`: ends a switch whose kernel this is; the held cells.
    pub async fn kernel_ready(&mut self, out: &mut Answers) -> Option<VecDeque<RawMessage>> {
        if !self.change.as_ref().is_some_and(|c| c.built) {
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
        if !self.change.as_ref().is_some_and(Change::is_switch) {
            tracing::warn!("environment build failed: {message}");
            return None;
        }
        let text = format!(
            "{message}\nThe kernel was not restarted: it runs on in its previous environment."
        );
        Some(self.end(Err(MagicError::Env(text)), out).await)
    }

    /// Answers the change's cell; the held cells, for the relay to send on.
    async fn end(
        &mut self,
        result: Result<String, MagicError>,
        out: &mut Answers,
    ) -> VecDeque<RawMessage> {
        let Some(sw) = self.change.take() else {
            return VecDeque::new();
        };
        if result.is_ok() {
            self.done.insert(match sw.what {
                What::Switch(_) => "`%noyau env`",
                What::Data => "`%noyau data`",
            });
        }
        out.finish(&sw.cell, result).await;
        sw.held
    }

    /// The kernel is gone during a change: its cell and the held ones are
    /// among the requests that fail.
    pub fn fail_with(&mut self, requests: &mut Requests) {
        let Some(sw) = self.change.take() else { return };
        requests.push_held(sw.cell);
        for m in sw.held {
            requests.push_held(Cell::of(&m));
        }
    }

    /// An `EnvProgress` line: shown in the waiting cell (the change's, else
    /// the running one); with no cell waiting (the build runs at kernel
    /// start), held for the next cell, so that cell tells why it waits.
    pub async fn progress(&mut self, line: &str, running: Option<Bytes>, out: &mut Answers) {
        let text = format!("noyau: environment: {line}\n");
        let waiting = self
            .change
            .as_ref()
            .map(|s| s.cell.header.clone())
            .or(running);
        match waiting {
            Some(parent) => out.stream(&parent, "stderr", &text).await,
            None if self.held_progress.len() < crate::agent::HELD_MAX => {
                self.held_progress.push_str(&text)
            }
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
