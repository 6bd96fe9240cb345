//! `noyau kernel`: the proxy kernel a frontend starts from a noyau kernelspec.
//!
//! To the frontend it is a kernel: it binds the sockets of the connection
//! file ([`frontend`]), answers heartbeats while the real kernel lives, and
//! ends when that kernel ends, so every frontend's notion of "the kernel
//! process died" keeps working. Behind it, a backend starts `noyau agent`
//! (here or in a batch job), which dials back over the link; the proxy
//! checks each frontend message with the frontend's key and sends it on,
//! and re-signs with that key each message the agent brings back. Messages
//! are never re-serialised.
//!
//! The proxy answers by itself only when the kernel cannot: when the kernel
//! or the agent dies, every request still waiting gets an error reply that
//! says what happened, and the IOPub stream says it too. When the frontend
//! restarts the kernel, the proxy hands the agent over to the next proxy
//! process ([`handover`]) so the allocation is kept.

mod dask;
mod delegate;
mod env;
pub mod frontend;
pub mod handover;
pub mod queued;
pub mod targets;
pub mod transfer;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use noyau_client::agent::{start_agent, AgentLaunch, AgentWatch};
use noyau_link::envelope::{self, Event, Payload};
use noyau_link::{
    Incoming, Lane, Link, LinkConfig, LinkEvent, LinkListener, LinkSender, ServerIdentity,
};
use noyau_sched::JobState;
use noyau_wire::{build, ConnectionInfo, RawMessage, Signer};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use zeromq::SocketRecv;

use frontend::{publish, send_router, Frontend};

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub connection_file: PathBuf,
    pub inner: String,
    pub backend: String,
    pub profile: Option<String>,
    /// Where the link listens; default 127.0.0.1 with a free port.
    pub link_bind: Option<SocketAddr>,
    /// The address the agent is told to dial, when it differs from the bound one.
    pub link_advertise: Option<String>,
    pub noyau_exe: PathBuf,
    /// The resolved profile: what to ask the scheduler for.
    pub resources: noyau_config::Profile,
    /// Accept a connection file with an empty HMAC key (`--allow-unsigned`).
    pub allow_unsigned: bool,
}

/// How long a detached agent waits for the next proxy; the proxy trusts a
/// handover record for as long.
fn reattach_grace() -> Duration {
    std::env::var("NOYAU_REATTACH_GRACE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(120))
}

/// The kernel's environment, prepared here before the agent's job is
/// submitted: `[environment]` (and `[data]`) in `./noyau.toml` (Jupyter
/// starts a kernel in its notebook's directory), overridden key by key by
/// `NOYAU_ENV` (an inline TOML/JSON table or a file, as `noyau run --env`
/// takes; a kernelspec can set it). Returns the job's environment and the
/// build's lines, which the first cell shows (as the agent's `EnvProgress`).
async fn prepare_for_agent() -> anyhow::Result<(std::collections::BTreeMap<String, String>, String)>
{
    let cwd = std::env::current_dir().context("the kernel's working directory")?;
    let declared = noyau_env::sources::Declared {
        spec: noyau_env::sources::for_notebook(&cwd, None, kernel_env_var().as_deref(), &cwd)?,
        data: noyau_env::data::declared(&cwd, None, &[])?,
    };
    let mut held = String::new();
    let prepared = noyau_client::prepare::prepare(&declared, |line| {
        tracing::info!("environment: {line}");
        if held.len() < ENV_HELD_MAX {
            held.push_str(&format!("noyau: environment: {line}\n"));
        }
    })
    .await
    .context("the kernel's environment")?;
    let env = noyau_client::prepare::job_env(declared.spec.as_ref(), &prepared);
    Ok((env, held))
}

/// `NOYAU_ENV`, when set.
fn kernel_env_var() -> Option<String> {
    std::env::var("NOYAU_ENV").ok().filter(|v| !v.is_empty())
}

/// A shell request the kernel has not answered yet.
struct Pending {
    identities: Vec<Bytes>,
    header: Bytes,
    msg_type: String,
}

struct Proxy {
    cfg: ProxyConfig,
    fe: Frontend,
    signer: Signer,
    session: String,
    link: Option<Link>,
    queued: VecDeque<(Lane, Vec<Bytes>)>,
    pending: HashMap<String, Pending>,
    order: VecDeque<String>,
    /// A shutdown_request is on its way: Some(restart).
    shutdown: Option<bool>,
    listener: LinkListener,
    identity: ServerIdentity,
    advertise: String,
    agent: AgentWatch,
    started: chrono::DateTime<chrono::Utc>,
    /// `%%noyau on` targets by name, and where their tasks report.
    targets: std::collections::BTreeMap<String, targets::Target>,
    target_tx: tokio::sync::mpsc::Sender<targets::TargetEvent>,
    target_rx: tokio::sync::mpsc::Receiver<targets::TargetEvent>,
    /// The notebook kernel's last execution count, for cells noyau answers.
    exec_count: i64,
    /// `%noyau push/pull` in flight, by the msg_id of their current request.
    transfers: HashMap<String, transfer::Transfer>,
    /// msg_ids of the proxy's own requests: their replies stop here.
    internal: transfer::Internal,
    /// What the agent built the kernel's environment from, and its lock.
    env_record: Option<serde_json::Value>,
    /// A `%noyau env SPEC` cell in progress.
    switch: Option<env::EnvSwitch>,
    /// The kernel's Dask cluster (`%noyau dask up`).
    dask: Option<dask::Cluster>,
    /// The batch job's state while we wait for its agent (None: local, or taken over).
    job_state: Option<tokio::sync::watch::Receiver<JobState>>,
    /// The queue note shown in the first waiting cell.
    note: Option<queued::Note>,
    submitted: Instant,
    /// A walltime notice that came while no cell ran: shown in the next one.
    walltime_notice: Option<String>,
    /// Environment build lines that came while no cell waited (a kernel
    /// building its environment at start): shown in the next cell.
    env_held: String,
    /// The token the next proxy takes from the handover record, given to the
    /// agent ahead (`NextToken`).
    next_token: String,
}

/// At most this many bytes of environment build lines are held for the
/// next cell; later ones go to the log only.
const ENV_HELD_MAX: usize = 64 * 1024;

/// `9 min 58 s`.
fn human(secs: u64) -> String {
    match (secs / 60, secs % 60) {
        (0, s) => format!("{s} s"),
        (m, 0) => format!("{m} min"),
        (m, s) => format!("{m} min {s} s"),
    }
}

/// True when the message's header date is before `t`.
fn sent_before(msg: &RawMessage, t: chrono::DateTime<chrono::Utc>) -> bool {
    #[derive(serde::Deserialize)]
    struct H {
        date: Option<String>,
    }
    serde_json::from_slice::<H>(&msg.header)
        .ok()
        .and_then(|h| h.date)
        .and_then(|d| chrono::DateTime::parse_from_rfc3339(&d).ok())
        .is_some_and(|d| d < t)
}

/// An empty key means unsigned messages: whoever reaches the frontend's
/// ports could run code as the user, and noyau could not tell forged
/// messages from real ones. Jupyter allows it; noyau only when asked.
fn check_key(info: &ConnectionInfo, cfg: &ProxyConfig) -> anyhow::Result<()> {
    if !info.key.is_empty() {
        return Ok(());
    }
    if !cfg.allow_unsigned {
        anyhow::bail!(
            "connection file {} has an empty \"key\": messages would be unsigned, so anyone who can reach the kernel's ports could run code as you and noyau could not tell; let the frontend write a key (jupyter_client does by default), or pass --allow-unsigned to accept it anyway",
            cfg.connection_file.display()
        );
    }
    tracing::warn!(
        "connection file {} has an empty key and --allow-unsigned was given: frontend messages are not signed, and a forged message cannot be told from a real one",
        cfg.connection_file.display()
    );
    Ok(())
}

/// Runs the proxy until its kernel is gone; returns the exit code.
pub async fn run(cfg: ProxyConfig) -> anyhow::Result<i32> {
    let started = chrono::Utc::now();
    let info = ConnectionInfo::read(&cfg.connection_file)?;
    check_key(&info, &cfg)?;
    let signer = Signer::new(info.key.as_bytes());
    let fe = Frontend::bind(&info, signer.clone()).await?;
    let link_cfg = LinkConfig::default();
    let handover_path = handover::path_for(&cfg.connection_file)?;

    let mut env_held = String::new();
    let (listener, identity, advertise, agent) =
        match handover::take(&handover_path, reattach_grace()).filter(|h| {
            // A local agent that already gave up cannot be taken over.
            h.backend != "local" || h.agent_pid.is_some_and(noyau_client::agent::pid_alive)
        }) {
            Some(h) => {
                tracing::info!(agent = ?h.agent_pid, "taking over the agent of the previous proxy");
                let listener = LinkListener::bind(h.link_addr, h.identity.clone(), link_cfg)
                    .await
                    .with_context(|| format!("cannot listen for the agent on {}", h.link_addr))?;
                listener.add_token(&h.token);
                let watch = match (h.backend.as_str(), h.agent_pid) {
                    ("local", Some(pid)) => AgentWatch::Pid(pid),
                    (backend, _) => match noyau_sched::Backend::from_name(backend)
                        .ok()
                        .and_then(|b| b.adopt(&h.job_id).map(|j| (b, j)))
                    {
                        // The job the previous proxy submitted: watched as ours.
                        Some((b, job)) => AgentWatch::Job(b, job),
                        None => AgentWatch::Remote,
                    },
                };
                (listener, h.identity, h.advertise, watch)
            }
            None => {
                let (env, held) = prepare_for_agent().await?;
                env_held = held;
                let a = start_agent(
                    AgentLaunch {
                        backend: cfg.backend.clone(),
                        inner: cfg.inner.clone(),
                        link_bind: cfg.link_bind,
                        link_advertise: cfg.link_advertise.clone(),
                        noyau_exe: cfg.noyau_exe.clone(),
                        job_name: format!("noyau-kernel-{}", cfg.inner),
                        cwd: None,
                        env,
                        profile: cfg.resources.clone(),
                    },
                    link_cfg,
                )
                .await?;
                (a.listener, a.identity, a.advertise, a.watch)
            }
        };

    let job_state = if cfg.backend == "local" {
        None
    } else {
        agent.state()
    };
    if job_state.is_some() {
        // The kernel is "alive" while its job waits: frontends must not
        // take a queued kernel for a dead one.
        fe.set_alive(true);
    }
    let (target_tx, target_rx) = tokio::sync::mpsc::channel(1024);
    let mut proxy = Proxy {
        job_state,
        note: None,
        submitted: Instant::now(),
        walltime_notice: None,
        env_held,
        next_token: noyau_wire::connection::random_key(),
        cfg,
        fe,
        signer,
        session: uuid::Uuid::new_v4().to_string(),
        link: None,
        queued: VecDeque::new(),
        pending: HashMap::new(),
        order: VecDeque::new(),
        shutdown: None,
        listener,
        identity,
        advertise,
        agent,
        started,
        targets: Default::default(),
        target_tx,
        target_rx,
        exec_count: 0,
        transfers: HashMap::new(),
        internal: Default::default(),
        env_record: None,
        switch: None,
        dask: None,
    };
    let code = proxy.relay().await;
    proxy.release_targets();
    proxy.dask_release().await;
    // Socket writers drain their queues in background tasks; give them the
    // moment ZMQ_LINGER would, so last replies and errors reach the frontend.
    tokio::time::sleep(Duration::from_millis(150)).await;
    Ok(code)
}

impl Proxy {
    async fn relay(&mut self) -> i32 {
        let mut sigterm = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot handle SIGTERM: {e}");
                return 1;
            }
        };
        // Interrupts reach the kernel as interrupt_request messages; a SIGINT
        // sent to our process group (a terminal's Ctrl-C) must not end us.
        let mut sigint = match signal(SignalKind::interrupt()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot handle SIGINT: {e}");
                return 1;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        let mut idle_tick = tokio::time::interval(Duration::from_secs(10));
        // Not polled while there are no targets: no burst of missed ticks after.
        idle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dask_tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let waiting = self.link.is_none() && self.job_state.is_some();
            tokio::select! {
                biased;
                _ = sigint.recv() => tracing::info!("SIGINT ignored; interrupts go to the kernel by message"),
                _ = sigterm.recv() => {
                    tracing::info!("terminated; stopping the agent");
                    self.stop_agent().await;
                    return 143;
                }
                m = self.fe.incoming.recv() => {
                    let Some((lane, msg)) = m else { return 1 };
                    if let Some(code) = self.on_frontend_message(lane, msg).await {
                        return code;
                    }
                }
                changed = async { match self.job_state.as_mut() { Some(rx) => rx.changed().await.is_ok(), None => std::future::pending().await } }, if waiting => {
                    if changed {
                        self.on_job_state().await;
                    } else {
                        self.job_state = None;
                    }
                }
                _ = tick.tick(), if waiting => self.on_job_state().await,
                ev = self.target_rx.recv() => {
                    if let Some(ev) = ev {
                        self.on_target_event(ev).await;
                    }
                }
                // Only with targets: an idle proxy's only timer otherwise.
                _ = idle_tick.tick(), if !self.targets.is_empty() => self.release_idle_targets(),
                _ = dask_tick.tick(), if self.dask.is_some() => self.dask_tick().await,
                sub = self.fe.iopub.recv() => {
                    if let Ok(sub) = sub {
                        self.welcome(sub).await;
                    }
                }
                accepted = self.listener.accept(), if self.link.is_none() => match accepted {
                    Ok(link) => self.attach(link).await,
                    Err(e) => tracing::warn!("link: {e}"),
                },
                incoming = async { match self.link.as_mut() { Some(l) => l.recv().await, None => std::future::pending().await } } => {
                    if let Some(code) = self.on_agent_message(incoming).await {
                        return code;
                    }
                }
                desc = self.agent.ended() => {
                    self.report_death(&format!(
                        "The noyau agent running the kernel died: it {desc}; the kernel is gone. Restart the kernel to start a new one."
                    )).await;
                    return 1;
                }
            }
        }
    }

    async fn attach(&mut self, link: Link) {
        tracing::info!("agent connected");
        self.clear_note().await;
        let sender = link.sender();
        let ahead = Event::NextToken {
            token: self.next_token.clone(),
        };
        if let Err(e) = sender.send(Lane::Control, envelope::event(&ahead)) {
            tracing::warn!("link: {e}");
        }
        for (lane, frames) in self.queued.drain(..) {
            if let Err(e) = sender.send(lane, frames) {
                tracing::warn!("link: {e}");
            }
        }
        self.link = Some(link);
    }

    fn sender(&self) -> Option<LinkSender> {
        self.link.as_ref().map(|l| l.sender())
    }

    /// True while the batch job has not started (the proxy stands in for the kernel).
    fn queued(&self) -> bool {
        self.link.is_none()
            && self.job_state.as_ref().is_some_and(|rx| {
                matches!(
                    *rx.borrow(),
                    JobState::Pending { .. } | JobState::Unknown { .. }
                )
            })
    }

    fn job_label(&self) -> String {
        self.agent.job_id().unwrap_or("?").to_string()
    }

    /// How the scheduler ended the job, once its watcher sees the end (the
    /// agent's SIGTERM comes first; Slurm keeps an ended job's state in
    /// its listing for a while: NODE_FAIL, PREEMPTED, CANCELLED, TIMEOUT).
    async fn job_end(&mut self) -> Option<String> {
        let rx = self.job_state.as_mut()?;
        let ended = |s: &JobState| matches!(s, JobState::Ended(_));
        // Bounded: a few watcher polls; the sender's end is as good an answer.
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(ended)).await;
        match &*rx.borrow() {
            JobState::Ended(end) => Some(end.description.clone()),
            _ => None,
        }
    }

    async fn on_job_state(&mut self) {
        let Some(rx) = &self.job_state else { return };
        let st = rx.borrow().clone();
        let text = queued::describe(
            &self.cfg.backend,
            &self.job_label(),
            &st,
            self.submitted.elapsed().as_secs(),
        );
        match text {
            None => {
                if let JobState::Running { node, .. } = &st {
                    tracing::info!(job = %self.job_label(), %node, waited = ?self.submitted.elapsed(), "job started");
                }
                self.clear_note().await;
            }
            Some(text) => {
                let Some(note) = self.note.as_mut() else {
                    return;
                };
                if let Some((kind, content)) = note.update(&text) {
                    let msg =
                        build::iopub(&self.signer, kind, &self.session, &note.parent, content);
                    publish(&mut self.fe, msg).await;
                }
            }
        }
    }

    /// Removes the queue note from its cell, before the kernel writes there.
    async fn clear_note(&mut self) {
        if let Some(note) = self.note.take() {
            if note.shown {
                let msg = build::iopub(
                    &self.signer,
                    "clear_output",
                    &self.session,
                    &note.parent,
                    json!({"wait": false}),
                );
                publish(&mut self.fe, msg).await;
            }
        }
    }

    /// A request the proxy handles itself while the job is queued; Some(code) to end.
    async fn while_queued(&mut self, lane: Lane, msg: &RawMessage) -> Option<Option<i32>> {
        let h = msg.peek_header().ok()?;
        let reply = |me: &Self, kind: &str, content: serde_json::Value| {
            build::message(
                &me.signer,
                msg.identities.clone(),
                kind,
                &me.session,
                &msg.header,
                content,
            )
        };
        match (lane, h.msg_type.as_str()) {
            (Lane::Shell | Lane::Control, "kernel_info_request") => {
                let language = noyau_wire::kernelspec::find(&self.cfg.inner)
                    .map(|f| f.spec.language)
                    .unwrap_or_else(|_| "python".into());
                self.publish_status(&msg.header, "busy").await;
                let r = reply(
                    self,
                    "kernel_info_reply",
                    queued::kernel_info_content(&language, &self.job_label()),
                );
                send_router(&mut self.fe, lane, r).await;
                self.publish_status(&msg.header, "idle").await;
                Some(None)
            }
            (Lane::Control, "shutdown_request" | "interrupt_request")
                if !sent_before(msg, self.started) =>
            {
                let shutdown = h.msg_type == "shutdown_request";
                tracing::info!(job = %self.job_label(), "{} while queued: cancelling the job", h.msg_type);
                let content = if shutdown {
                    let restart = msg.restart_requested();
                    json!({"status": "ok", "restart": restart})
                } else {
                    json!({"status": "ok"})
                };
                let kind = if shutdown {
                    "shutdown_reply"
                } else {
                    "interrupt_reply"
                };
                let r = reply(self, kind, content);
                send_router(&mut self.fe, Lane::Control, r).await;
                self.clear_note().await;
                self.agent.cancel().await;
                if shutdown {
                    return Some(Some(0));
                }
                let text = format!(
                    "The kernel's {} job {} was cancelled while queued (interrupt). Restart the kernel to submit a new one.",
                    self.cfg.backend,
                    self.job_label()
                );
                self.report_death(&text).await;
                Some(Some(1))
            }
            _ => None,
        }
    }

    async fn on_frontend_message(&mut self, lane: Lane, msg: RawMessage) -> Option<i32> {
        let msg = self.hold_during_switch(lane, msg)?;
        let msg = match self.intercept(lane, msg).await {
            Some(m) => m,
            None => return None,
        };
        if self.queued() {
            if let Some(done) = self.while_queued(lane, &msg).await {
                return done;
            }
            if lane == Lane::Shell
                && self.note.is_none()
                && msg
                    .peek_header()
                    .is_ok_and(|h| h.msg_type == "execute_request")
            {
                self.note = Some(queued::Note::new(msg.header.clone()));
                self.on_job_state().await;
            }
        }
        if lane == Lane::Shell
            && (self.walltime_notice.is_some() || !self.env_held.is_empty())
            && msg
                .peek_header()
                .is_ok_and(|h| h.msg_type == "execute_request")
        {
            let parent = msg.header.clone();
            let held = std::mem::take(&mut self.env_held);
            if !held.is_empty() {
                self.publish_stream(&parent, "stderr", &held).await;
            }
            if let Some(text) = self.walltime_notice.take() {
                self.publish_stream(&parent, "stderr", &text).await;
            }
        }
        self.forward_frontend_message(lane, msg);
        None
    }

    fn forward_frontend_message(&mut self, lane: Lane, msg: RawMessage) {
        if lane == Lane::Shell || lane == Lane::Control {
            if let Ok(h) = msg.peek_header() {
                tracing::debug!(?lane, msg_type = %h.msg_type, "from the frontend");
                if lane == Lane::Control
                    && (h.msg_type == "shutdown_request" || h.msg_type == "interrupt_request")
                    && sent_before(&msg, self.started)
                {
                    // A frontend restarting a dead kernel queues these for the dead
                    // process; its socket delivers them to us, the new one.
                    tracing::info!(msg_type = %h.msg_type, "ignored a request sent before this kernel started (meant for the previous kernel process)");
                    return;
                }
                if h.msg_type == "shutdown_request" {
                    let restart = msg.restart_requested();
                    self.shutdown = Some(restart);
                }
                // Only requests get a reply that ends them; comm messages
                // (widgets send many) would stay in the table for ever.
                if lane == Lane::Shell && h.msg_type.ends_with("_request") {
                    self.order.push_back(h.msg_id.clone());
                    self.pending.insert(
                        h.msg_id,
                        Pending {
                            identities: msg.identities.clone(),
                            header: msg.header.clone(),
                            msg_type: h.msg_type,
                        },
                    );
                }
            }
        }
        let frames = envelope::jupyter(msg.into_frames());
        match self.sender() {
            Some(s) => {
                if let Err(e) = s.send(lane, frames) {
                    tracing::warn!(?lane, "cannot pass a message to the agent: {e}");
                }
            }
            None => self.queued.push_back((lane, frames)),
        }
    }

    async fn welcome(&mut self, sub: zeromq::ZmqMessage) {
        let Some(frame) = sub.get(0) else { return };
        if frame.first() != Some(&1) {
            return;
        }
        let topic = frame.slice(1..);
        let ids = if topic.is_empty() {
            vec![]
        } else {
            vec![topic.clone()]
        };
        let msg = build::message(
            &self.signer,
            ids,
            "iopub_welcome",
            &self.session,
            &Bytes::new(),
            json!({"subscription": String::from_utf8_lossy(&topic)}),
        );
        publish(&mut self.fe, msg).await;
    }

    /// One link message or event; Some(exit code) when the proxy must end.
    async fn on_agent_message(&mut self, incoming: Option<Incoming>) -> Option<i32> {
        match incoming {
            None => {
                self.report_death("The link to the noyau agent closed; the kernel is gone.")
                    .await;
                Some(1)
            }
            Some(Incoming::Event(LinkEvent::Closed(reason))) => {
                self.report_death(&format!(
                    "The link to the noyau agent was lost for good ({reason}); the kernel is gone."
                ))
                .await;
                Some(1)
            }
            Some(Incoming::Event(ev)) => {
                tracing::warn!("link: {ev:?}");
                None
            }
            Some(Incoming::Message(lane, frames)) => match envelope::open(frames) {
                Ok(Payload::Jupyter(frames)) => self.relay_to_frontend(lane, frames).await,
                Ok(Payload::Event(ev)) => self.on_event(ev).await,
                Err(e) => {
                    tracing::warn!("dropped a malformed link message: {e}");
                    None
                }
            },
        }
    }

    async fn relay_to_frontend(&mut self, lane: Lane, frames: Vec<Bytes>) -> Option<i32> {
        let mut msg = match RawMessage::from_frames(frames) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(?lane, "dropped a malformed message from the agent: {e}");
                return None;
            }
        };
        self.signer.resign(&mut msg);
        if !self.internal.is_empty() {
            if let Some(parent) = msg.parent_msg_id().filter(|p| self.internal.contains(p)) {
                if lane == Lane::Shell && self.dask.as_ref().is_some_and(|c| c.is_setup(&parent)) {
                    self.internal.seen(&parent, true);
                    self.dask_setup_reply(&msg.content).await;
                } else if lane == Lane::Shell {
                    self.internal.seen(&parent, true);
                    self.advance_transfer(&parent, &msg.content).await;
                } else if transfer::is_idle(&msg) {
                    self.internal.seen(&parent, false);
                }
                return None;
            }
        }
        if lane == Lane::Iopub {
            publish(&mut self.fe, msg).await;
            return None;
        }
        let mut shutdown_reply = false;
        if lane == Lane::Shell || lane == Lane::Control {
            if let Some(parent) = msg.parent_msg_id() {
                self.pending.remove(&parent);
                // Answered requests leave the order too (replies come in order).
                while self
                    .order
                    .front()
                    .is_some_and(|id| !self.pending.contains_key(id))
                {
                    self.order.pop_front();
                }
            }
            if let Some(n) = serde_json::from_slice::<serde_json::Value>(&msg.content)
                .ok()
                .and_then(|c| c.get("execution_count").and_then(|n| n.as_i64()))
            {
                self.exec_count = n;
            }
            shutdown_reply = self.shutdown.is_some()
                && msg
                    .peek_header()
                    .is_ok_and(|h| h.msg_type == "shutdown_reply");
        }
        send_router(&mut self.fe, lane, msg).await;
        if self.switch.is_some() {
            self.send_switch_when_idle().await;
        }
        if shutdown_reply {
            let restart = self.shutdown == Some(true);
            if restart {
                self.hand_over().await;
            } else {
                self.wait_agent_end().await;
            }
            return Some(0);
        }
        None
    }

    async fn on_event(&mut self, ev: Event) -> Option<i32> {
        match ev {
            Event::AgentHello { pid, host, version } => {
                tracing::info!(pid, %host, %version, "agent attached");
                None
            }
            Event::EnvProgress { line } => {
                // Shown in the first waiting cell (its stderr); with no cell
                // waiting (the build runs at kernel start), held for the
                // next cell, so the cell that waits on the build tells why.
                let text = format!("noyau: environment: {line}\n");
                let waiting = match &self.switch {
                    Some(sw) => Some(sw.header().clone()),
                    None => self
                        .order
                        .iter()
                        .filter_map(|id| self.pending.get(id))
                        .find(|p| p.msg_type == "execute_request")
                        .map(|p| p.header.clone()),
                };
                match waiting {
                    Some(parent) => self.publish_stream(&parent, "stderr", &text).await,
                    None if self.env_held.len() < ENV_HELD_MAX => self.env_held.push_str(&text),
                    None => tracing::info!("{}", text.trim_end()),
                }
                None
            }
            Event::EnvReady { record } => {
                tracing::info!(lock_sha256 = %record["lock_sha256"], "kernel environment ready");
                self.env_record = Some(record);
                self.switch_built().await;
                None
            }
            Event::EnvFailed { message } => {
                self.switch_failed(message).await;
                None
            }
            Event::KernelReady { pid, .. } => {
                tracing::info!(pid, "kernel ready");
                self.fe.set_alive(true);
                self.switch_kernel_ready().await;
                None
            }
            Event::KernelDied { description, .. } if self.shutdown.is_some() => {
                tracing::info!("kernel {description} after its shutdown request");
                None
            }
            Event::KernelDied {
                description,
                expected: false,
                job_ending,
            } => {
                let description = match job_ending {
                    true => self
                        .job_end()
                        .await
                        .map(|end| format!("was stopped: its job {end}"))
                        .unwrap_or(description),
                    false => description,
                };
                self.report_death(&format!(
                    "The kernel died: it {description}. Restart the kernel to continue (the allocation is kept)."
                ))
                .await;
                self.hand_over().await;
                Some(1)
            }
            Event::AgentError { message } => {
                self.report_death(&format!("noyau could not start the kernel: {message}"))
                    .await;
                self.stop_agent().await;
                Some(1)
            }
            Event::WalltimeWarning { job, seconds_left } => {
                self.walltime_notice(format!(
                    "noyau: the batch job {job} reaches its walltime in {}; the kernel ends then: save your work.\n",
                    human(seconds_left)
                ))
                .await;
                None
            }
            Event::WalltimeNear { job, seconds_left } => {
                let when =
                    seconds_left.map_or("soon".to_string(), |s| format!("in about {}", human(s)));
                self.walltime_notice(format!(
                    "noyau: walltime reached soon: the batch job {job} ends {when}; save your work now.\n"
                ))
                .await;
                None
            }
            other => {
                tracing::debug!("event {other:?}");
                None
            }
        }
    }

    /// A walltime notice, as stderr of the running cell (the oldest waiting
    /// execution), else of the next cell the frontend sends.
    async fn walltime_notice(&mut self, text: String) {
        tracing::warn!("{}", text.trim_end());
        let running = self
            .order
            .iter()
            .filter_map(|id| self.pending.get(id))
            .find(|p| p.msg_type == "execute_request")
            .map(|p| p.header.clone());
        match running {
            Some(parent) => self.publish_stream(&parent, "stderr", &text).await,
            None => self.walltime_notice = Some(text),
        }
    }

    pub(crate) async fn publish_stream(&mut self, parent: &Bytes, name: &str, text: &str) {
        let msg = build::stream(&self.signer, &self.session, parent, name, text);
        publish(&mut self.fe, msg).await;
    }

    pub(crate) async fn publish_status(&mut self, parent: &Bytes, state: &str) {
        let msg = build::status(&self.signer, &self.session, parent, state);
        publish(&mut self.fe, msg).await;
    }

    /// Answers a request the kernel never will: for an execution an IOPub
    /// `error`, then the error reply, then `idle`, as a kernel would.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn fail_request(
        &mut self,
        identities: Vec<Bytes>,
        header: &Bytes,
        reply_type: &str,
        ename: &str,
        evalue: &str,
        traceback: serde_json::Value,
        execution_count: serde_json::Value,
    ) {
        if reply_type == "execute_reply" {
            let err = build::iopub(
                &self.signer,
                "error",
                &self.session,
                header,
                json!({
                    "ename": ename, "evalue": evalue, "traceback": traceback,
                }),
            );
            publish(&mut self.fe, err).await;
        }
        let reply = build::message(
            &self.signer,
            identities,
            reply_type,
            &self.session,
            header,
            json!({
                "status": "error", "ename": ename, "evalue": evalue, "traceback": traceback,
                "execution_count": execution_count,
            }),
        );
        send_router(&mut self.fe, Lane::Shell, reply).await;
        self.publish_status(header, "idle").await;
    }

    /// Tells every waiting request, and IOPub, that the kernel is gone.
    async fn report_death(&mut self, text: &str) {
        tracing::error!("{text}");
        self.fe.set_alive(false);
        self.switch_into_pending();
        let mut any_execute = false;
        let order: Vec<String> = self.order.drain(..).collect();
        for id in order {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            any_execute |= p.msg_type == "execute_request";
            let reply_type = p
                .msg_type
                .strip_suffix("_request")
                .map(|t| format!("{t}_reply"))
                .unwrap_or_else(|| "error".into());
            self.fail_request(
                p.identities,
                &p.header,
                &reply_type,
                "KernelDied",
                text,
                json!([text]),
                json!(null),
            )
            .await;
        }
        if !any_execute {
            self.publish_stream(&Bytes::new(), "stderr", &format!("{text}\n"))
                .await;
        }
    }

    /// Leaves the agent (and its allocation) to the next proxy for this
    /// connection file.
    async fn hand_over(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let token = self.next_token.clone();
        let record = handover::Handover {
            link_addr: self.listener.local_addr(),
            advertise: self.advertise.clone(),
            identity: self.identity.clone(),
            token: token.clone(),
            agent_pid: self.agent.pid(),
            backend: self.cfg.backend.clone(),
            job_id: self.agent.job_id().unwrap_or_default().to_string(),
            written_at: handover::stamp(),
        };
        let path = match handover::path_for(&self.cfg.connection_file) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot hand the agent over: {e:#}");
                return;
            }
        };
        if let Err(e) = handover::write(&path, &record) {
            tracing::warn!("cannot hand the agent over: {e:#}");
            return;
        }
        let _ = link
            .sender()
            .send(Lane::Control, envelope::event(&Event::Detach { token }));
        let acked = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match link.recv().await {
                    Some(Incoming::Message(_, frames)) => {
                        if let Ok(Payload::Event(Event::DetachAck)) = envelope::open(frames) {
                            return;
                        }
                    }
                    Some(Incoming::Event(LinkEvent::Closed(_))) | None => return,
                    Some(Incoming::Event(_)) => {}
                }
            }
        })
        .await;
        if acked.is_err() {
            tracing::warn!("the agent did not acknowledge the handover");
        }
        if let Some(link) = self.link.take() {
            link.close().await;
        }
    }

    /// After a final shutdown, gives the agent a moment to end by itself.
    async fn wait_agent_end(&mut self) {
        let ended = tokio::time::timeout(Duration::from_secs(5), self.agent.ended()).await;
        if ended.is_err() {
            self.stop_agent().await;
        }
        if let Some(link) = self.link.take() {
            link.close().await;
        }
    }

    async fn stop_agent(&mut self) {
        if let Some(s) = self.sender() {
            let _ = s.send(Lane::Control, envelope::event(&Event::Shutdown));
        }
        self.agent.cancel().await;
    }
}
