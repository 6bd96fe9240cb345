//! A typed client of one kernel reached through a `noyau agent`.
//!
//! The proxy kernel relays a frontend's messages without reading them;
//! `noyau run` is the frontend itself, so it needs the other half: build
//! requests, match replies and IOPub messages to them, and turn the agent's
//! events into errors that say what happened. [`RemoteKernel::start`]
//! submits the agent through a backend and waits for `KernelReady`;
//! [`RemoteKernel::execute_request`] sends code and [`RemoteKernel::next`]
//! yields every message that comes back, in order (the link keeps IOPub
//! order and delivers a `KernelDied` only after the outputs before it), so a
//! caller that keeps calling `next` never loses output and can save
//! partial results, watch timers and signals between messages.
//!
//! Messages sent over the link need no valid signature: the agent re-signs
//! them with the kernel's key. Execute requests carry `allow_stdin: false`,
//! like nbclient's, so `input()` fails at once with an error instead of
//! waiting for an answer nobody will type.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use noyau_link::envelope::{self, Event, Payload};
pub use noyau_link::Lane;
use noyau_link::{Incoming, Link, LinkConfig, LinkEvent, LinkSender};
use noyau_wire::{build, RawMessage, Signer};
use serde_json::{json, Value};

use noyau_sched::JobState;
use tokio::time::Instant;

use crate::agent::{start_agent, AgentLaunch, AgentWatch, StartError};

/// Resolves when the job's state changes; never without a job or once the
/// channel is closed.
async fn state_changed(rx: &mut Option<tokio::sync::watch::Receiver<JobState>>) {
    match rx {
        Some(r) => {
            if r.changed().await.is_err() {
                *rx = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Why the kernel cannot be used (any more).
#[derive(Debug, Clone, thiserror::Error)]
pub enum KernelError {
    /// The kernel (or its agent) is gone: the text says how
    /// ("exited with status 1", "was killed by signal 9 (SIGKILL)").
    #[error("the kernel died: it {0}")]
    Died(String),
    /// The agent could not start the kernel (missing kernelspec, …).
    #[error("noyau could not start the kernel: {0}")]
    AgentError(String),
    /// The kernel did not become ready in time.
    #[error("the kernel did not start within {0} s (use --start-timeout to wait longer)")]
    StartTimeout(u64),
    /// The caller gave up waiting for the kernel to start.
    #[error("the kernel start was cancelled")]
    Cancelled,
    /// The link to the agent failed.
    #[error("the link to the agent: {0}")]
    Link(String),
    /// The agent could not be submitted.
    #[error(transparent)]
    Start(std::sync::Arc<StartError>),
}

impl From<StartError> for KernelError {
    fn from(e: StartError) -> Self {
        KernelError::Start(std::sync::Arc::new(e))
    }
}

/// One message from the kernel, its JSON parts parsed.
#[derive(Debug, Clone)]
pub struct KernelMessage {
    pub lane: Lane,
    pub msg_type: String,
    pub msg_id: String,
    /// `parent_header.msg_id`, if any.
    pub parent_id: Option<String>,
    /// `header.date` as the kernel wrote it.
    pub date: Option<String>,
    pub content: Value,
}

impl KernelMessage {
    fn parse(lane: Lane, raw: &RawMessage) -> Option<KernelMessage> {
        #[derive(serde::Deserialize)]
        struct Header {
            msg_type: String,
            #[serde(default)]
            msg_id: String,
            date: Option<String>,
        }
        let header: Header = serde_json::from_slice(&raw.header).ok()?;
        Some(KernelMessage {
            lane,
            msg_type: header.msg_type,
            msg_id: header.msg_id,
            parent_id: raw.parent_msg_id(),
            date: header.date,
            content: serde_json::from_slice(&raw.content).unwrap_or(Value::Null),
        })
    }
}

/// What the agent says about its job's walltime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walltime {
    /// A warning threshold: the job ends in about `seconds_left`.
    Warning { job: String, seconds_left: u64 },
    /// The scheduler's early signal: the job ends soon; save and stop.
    Near {
        job: String,
        seconds_left: Option<u64>,
    },
}

/// One thing from the agent: a kernel message or a walltime notice.
/// (Messages are nearly everything that comes: not boxed.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum KernelEvent {
    Message(KernelMessage),
    Walltime(Walltime),
}

/// Options of one execute request.
#[derive(Debug, Clone)]
pub struct ExecuteOptions {
    pub silent: bool,
    pub store_history: bool,
    /// Abort the queued requests after an error (nbclient: not when the cell
    /// may raise).
    pub stop_on_error: bool,
}

impl Default for ExecuteOptions {
    fn default() -> Self {
        ExecuteOptions {
            silent: false,
            store_history: true,
            stop_on_error: true,
        }
    }
}

/// A kernel started through an agent.
pub struct RemoteKernel {
    link: Link,
    sender: LinkSender,
    watch: AgentWatch,
    signer: Signer,
    session: String,
    /// The kernel's `kernel_info_reply` content.
    pub kernel_info: Value,
    /// Where the agent runs (from its hello).
    pub host: Option<String>,
    pub backend: String,
    /// The environment the agent made for the kernel (noyau-env's record).
    pub environment: Option<Value>,
    dead: Option<KernelError>,
    /// The agent's job ended (how), and until when its last words may come.
    agent_gone: Option<(String, tokio::time::Instant)>,
    /// Walltime notices that came while the kernel started.
    early: VecDeque<Walltime>,
}

/// How long the last messages of an agent that ended are waited for when
/// it said no goodbye (it was killed): its link broke, nothing more comes.
const LAST_WORDS: Duration = Duration::from_secs(2);

impl RemoteKernel {
    /// Submits the agent, accepts its link and waits until the kernel
    /// answered `kernel_info` with IOPub subscribed; given up (and the agent job cancelled) when
    /// `cancel` resolves first, while the job is submitted too (noyau-sched
    /// then cancels the job the scheduler still gives): fails with
    /// [`KernelError::Cancelled`].
    pub async fn start_until(
        launch: AgentLaunch,
        timeout: Duration,
        cancel: impl std::future::Future<Output = ()>,
    ) -> Result<RemoteKernel, KernelError> {
        Self::start_watching(launch, timeout, cancel, |_| {}).await
    }

    /// [`RemoteKernel::start_until`], calling `on_state` with each state of
    /// the agent's job while it waits (queued: Slurm's reason and estimated
    /// start; running: the node). For a batch backend `timeout` counts from
    /// the job's start, not its submission: the queue may hold it for hours.
    pub async fn start_watching(
        launch: AgentLaunch,
        timeout: Duration,
        cancel: impl std::future::Future<Output = ()>,
        mut on_state: impl FnMut(&JobState),
    ) -> Result<RemoteKernel, KernelError> {
        let backend = launch.backend.clone();
        tokio::pin!(cancel);
        let started = tokio::select! {
            s = start_agent(launch, LinkConfig::default()) => s?,
            // Given up while the job is submitted: the submission goes on
            // in noyau-sched, which cancels the job it gives.
            () = &mut cancel => return Err(KernelError::Cancelled),
        };
        let mut listener = started.listener;
        let mut watch = started.watch;
        let mut states = watch.state();
        let batch = backend != "local";
        let waiting = async {
            let mut deadline = (!batch).then(|| Instant::now() + timeout);
            let mut link = loop {
                tokio::select! {
                    l = listener.accept() => break l.map_err(|e| KernelError::Link(e.to_string()))?,
                    desc = watch.ended() => return Err(KernelError::Died(format!("(its agent) {desc} before connecting"))),
                    () = state_changed(&mut states) => {
                        if let Some(rx) = states.as_mut() {
                            let st = rx.borrow_and_update().clone();
                            if matches!(st, JobState::Running { .. }) && deadline.is_none() {
                                deadline = Some(Instant::now() + timeout);
                            }
                            on_state(&st);
                        }
                    }
                    () = sleep_until(deadline) => return Err(KernelError::StartTimeout(timeout.as_secs())),
                }
            };
            // The agent dialled: its job runs, whatever the scheduler said last.
            let deadline = deadline.unwrap_or_else(|| Instant::now() + timeout);
            let mut host = None;
            let mut environment = None;
            // A walltime notice may come before the kernel is ready (a slow
            // start late in a short job): kept for the first `next_event`.
            let mut early = VecDeque::new();
            loop {
                let incoming = tokio::select! {
                    m = link.recv() => m,
                    desc = watch.ended() => return Err(KernelError::Died(format!("(its agent) {desc} while starting"))),
                    () = sleep_until(Some(deadline)) => return Err(KernelError::StartTimeout(timeout.as_secs())),
                };
                match incoming {
                    None | Some(Incoming::Event(LinkEvent::Closed(_))) => {
                        let desc = watch.ended().await;
                        return Err(KernelError::Died(format!(
                            "(its agent) {desc} while starting"
                        )));
                    }
                    Some(Incoming::Event(_)) => {}
                    Some(Incoming::Message(_, frames)) => match envelope::open(frames) {
                        Ok(Payload::Event(Event::AgentHello { host: h, .. })) => host = Some(h),
                        Ok(Payload::Event(Event::KernelReady { kernel_info, .. })) => {
                            return Ok((link, host, kernel_info, environment, early))
                        }
                        Ok(Payload::Event(Event::WalltimeWarning { job, seconds_left })) => {
                            early.push_back(Walltime::Warning { job, seconds_left })
                        }
                        Ok(Payload::Event(Event::WalltimeNear { job, seconds_left })) => {
                            early.push_back(Walltime::Near { job, seconds_left })
                        }
                        Ok(Payload::Event(Event::EnvProgress { line })) => {
                            // A notebook's own words (its modules, its image)
                            // come back in these lines: no escape reaches the
                            // terminal.
                            let line = noyau_text::for_terminal(&line, noyau_text::Keep::Nothing);
                            tracing::info!("environment: {line}");
                            eprintln!("noyau: environment: {line}");
                        }
                        Ok(Payload::Event(Event::EnvReady { record })) => {
                            environment = Some(record)
                        }
                        Ok(Payload::Event(Event::AgentError { message })) => {
                            return Err(KernelError::AgentError(message))
                        }
                        Ok(Payload::Event(Event::KernelDied { description, .. })) => {
                            return Err(KernelError::Died(description))
                        }
                        _ => {}
                    },
                }
            }
        };
        let result = tokio::select! {
            r = waiting => r,
            () = &mut cancel => Err(KernelError::Cancelled),
        };
        let (link, host, kernel_info, environment, early) = match result {
            Ok(v) => v,
            Err(e) => {
                watch.cancel().await;
                return Err(e);
            }
        };
        Ok(RemoteKernel {
            sender: link.sender(),
            link,
            watch,
            signer: Signer::new(b""),
            session: noyau_wire::connection::random_key(),
            kernel_info,
            host,
            backend,
            environment,
            dead: None,
            agent_gone: None,
            early,
        })
    }

    /// The backend's job id (`local:1234`), if there is one.
    pub fn job_id(&self) -> Option<&str> {
        self.watch.job_id()
    }

    /// The language name from `kernel_info` (`language_info.name`).
    pub fn language_info(&self) -> Option<&Value> {
        self.kernel_info.get("language_info")
    }

    /// Sends a request of any type with `content`; returns its msg_id.
    pub fn request(
        &self,
        lane: Lane,
        msg_type: &str,
        content: Value,
    ) -> Result<String, KernelError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        let msg = build::message(
            &self.signer,
            vec![],
            msg_type,
            &self.session,
            &Bytes::new(),
            content,
        );
        let id = msg.peek_header().map(|h| h.msg_id).unwrap_or_default();
        self.sender
            .send(lane, envelope::jupyter(msg.into_frames()))
            .map_err(|e| KernelError::Link(e.to_string()))?;
        Ok(id)
    }

    /// Sends an `execute_request`; returns its msg_id. Follow it with
    /// [`RemoteKernel::next`] until the reply and IOPub `idle` have come.
    pub fn execute_request(&self, code: &str, o: &ExecuteOptions) -> Result<String, KernelError> {
        self.request(
            Lane::Shell,
            "execute_request",
            json!({
                "code": code,
                "silent": o.silent,
                "store_history": o.store_history,
                "user_expressions": {},
                "allow_stdin": false,
                "stop_on_error": o.stop_on_error,
            }),
        )
    }

    /// Asks for an interrupt (the agent signals the kernel or forwards the
    /// request, as its kernelspec says).
    pub fn interrupt(&self) -> Result<String, KernelError> {
        self.request(Lane::Control, "interrupt_request", json!({}))
    }

    /// The next message from the kernel, in arrival order (walltime notices
    /// are logged and skipped; see [`RemoteKernel::next_event`]). Fails once
    /// the kernel or its agent is gone (after every message that came
    /// before). Cancel-safe: it can be used in `select!`.
    pub async fn next(&mut self) -> Result<KernelMessage, KernelError> {
        loop {
            match self.next_event().await? {
                KernelEvent::Message(m) => return Ok(m),
                KernelEvent::Walltime(w) => tracing::warn!("{w:?}"),
            }
        }
    }

    /// The next message or walltime notice from the agent, in arrival order.
    /// Cancel-safe.
    pub async fn next_event(&mut self) -> Result<KernelEvent, KernelError> {
        if let Some(w) = self.early.pop_front() {
            return Ok(KernelEvent::Walltime(w));
        }
        loop {
            if let Some(e) = &self.dead {
                return Err(e.clone());
            }
            let incoming = if let Some((desc, deadline)) = self.agent_gone.clone() {
                // The agent is gone: what it sent comes first, then its
                // goodbye (the link's `Closed`), after which nothing can
                // come. An agent killed said none: its link only broke,
                // and waits for a redial that will not come, hence the
                // bound (from the end seen, not from each call).
                match tokio::time::timeout_at(deadline, self.link.recv()).await {
                    Ok(Some(m @ Incoming::Message(..))) => Some(m),
                    Ok(Some(Incoming::Event(LinkEvent::Disconnected | LinkEvent::Reconnected))) => {
                        continue
                    }
                    _ => {
                        self.dead = Some(KernelError::Died(format!("(its noyau agent) {desc}")));
                        continue;
                    }
                }
            } else {
                tokio::select! {
                    biased;
                    m = self.link.recv() => m,
                    desc = self.watch.ended() => {
                        self.agent_gone = Some((desc, tokio::time::Instant::now() + LAST_WORDS));
                        continue;
                    }
                }
            };
            match incoming {
                None | Some(Incoming::Event(LinkEvent::Closed(_))) => {
                    let desc = tokio::time::timeout(Duration::from_secs(5), self.watch.ended())
                        .await
                        .unwrap_or_else(|_| "closed its link".into());
                    self.dead = Some(KernelError::Died(format!("(its noyau agent) {desc}")));
                }
                Some(Incoming::Event(ev)) => tracing::info!("link: {ev:?}"),
                Some(Incoming::Message(lane, frames)) => match envelope::open(frames) {
                    Ok(Payload::Jupyter(frames)) => {
                        let Ok(raw) = RawMessage::from_frames(frames) else {
                            tracing::warn!("dropped a malformed message from the agent");
                            continue;
                        };
                        if let Some(m) = KernelMessage::parse(lane, &raw) {
                            return Ok(KernelEvent::Message(m));
                        }
                    }
                    Ok(Payload::Event(Event::KernelDied { description, .. })) => {
                        self.dead = Some(KernelError::Died(description));
                    }
                    Ok(Payload::Event(Event::AgentError { message })) => {
                        self.dead = Some(KernelError::AgentError(message));
                    }
                    Ok(Payload::Event(Event::WalltimeWarning { job, seconds_left })) => {
                        return Ok(KernelEvent::Walltime(Walltime::Warning {
                            job,
                            seconds_left,
                        }));
                    }
                    Ok(Payload::Event(Event::WalltimeNear { job, seconds_left })) => {
                        return Ok(KernelEvent::Walltime(Walltime::Near { job, seconds_left }));
                    }
                    Ok(Payload::Event(ev)) => tracing::debug!("event {ev:?}"),
                    Err(e) => tracing::warn!("dropped a malformed link message: {e}"),
                },
            }
        }
    }

    /// Whether the kernel is known to be gone.
    pub fn is_dead(&self) -> bool {
        self.dead.is_some()
    }

    /// Asks the kernel to shut down and waits (up to `grace`) for the agent
    /// job to end; cancels the job otherwise.
    pub async fn shutdown(mut self, grace: Duration) {
        if self.dead.is_none() {
            let _ = self.request(Lane::Control, "shutdown_request", json!({"restart": false}));
            let link = &mut self.link;
            let watch = &mut self.watch;
            let ended = tokio::time::timeout(grace, async {
                loop {
                    tokio::select! {
                        _ = watch.ended() => return,
                        m = link.recv() => if m.is_none() { watch.ended().await; return },
                    }
                }
            })
            .await;
            if ended.is_ok() {
                self.link.close().await;
                return;
            }
            let _ = self
                .sender
                .send(Lane::Control, envelope::event(&Event::Shutdown));
        }
        self.watch.cancel().await;
    }

    /// Ends the agent at once (Shutdown event, then the backend's cancel).
    pub async fn kill(self) {
        let _ = self
            .sender
            .send(Lane::Control, envelope::event(&Event::Shutdown));
        self.watch.cancel().await;
    }
}

/// Builds the [`AgentLaunch`] for a local kernel of `kernelspec`.
pub fn local_launch(kernelspec: &str, cwd: Option<std::path::PathBuf>) -> AgentLaunch {
    AgentLaunch {
        backend: "local".into(),
        inner: kernelspec.into(),
        link_bind: None,
        link_advertise: None,
        noyau_exe: std::env::current_exe().unwrap_or_else(|_| "noyau".into()),
        job_name: format!("noyau-run-{kernelspec}"),
        cwd,
        env: Default::default(),
        profile: Default::default(),
    }
}
