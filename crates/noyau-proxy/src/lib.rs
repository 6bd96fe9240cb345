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

pub mod frontend;
pub mod handover;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use noyau_client::agent::{start_agent, AgentLaunch, AgentWatch};
use noyau_link::envelope::{self, Event, Payload};
use noyau_link::{
    Incoming, Lane, Link, LinkConfig, LinkEvent, LinkListener, LinkSender, ServerIdentity,
};
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

/// Runs the proxy until its kernel is gone; returns the exit code.
pub async fn run(cfg: ProxyConfig) -> anyhow::Result<i32> {
    let started = chrono::Utc::now();
    let info = ConnectionInfo::read(&cfg.connection_file)?;
    let signer = Signer::new(info.key.as_bytes());
    let fe = Frontend::bind(&info, signer.clone()).await?;
    let link_cfg = LinkConfig::default();
    let handover_path = handover::path_for(&cfg.connection_file)?;

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
                    _ => AgentWatch::Remote,
                };
                (listener, h.identity, h.advertise, watch)
            }
            None => {
                let a = start_agent(
                    AgentLaunch {
                        backend: cfg.backend.clone(),
                        inner: cfg.inner.clone(),
                        link_bind: cfg.link_bind,
                        link_advertise: cfg.link_advertise.clone(),
                        noyau_exe: cfg.noyau_exe.clone(),
                        job_name: format!("noyau-kernel-{}", cfg.inner),
                        cwd: None,
                        env: Default::default(),
                    },
                    link_cfg,
                )
                .await?;
                (a.listener, a.identity, a.advertise, a.watch)
            }
        };

    let mut proxy = Proxy {
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
    };
    let code = proxy.relay().await;
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
        loop {
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
                    self.on_frontend_message(lane, msg);
                }
                sub = self.fe.iopub.recv() => {
                    if let Ok(sub) = sub {
                        self.welcome(sub).await;
                    }
                }
                accepted = self.listener.accept(), if self.link.is_none() => match accepted {
                    Ok(link) => self.attach(link),
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

    fn attach(&mut self, link: Link) {
        tracing::info!("agent connected");
        let sender = link.sender();
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

    fn on_frontend_message(&mut self, lane: Lane, msg: RawMessage) {
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
                    let restart = serde_json::from_slice::<serde_json::Value>(&msg.content)
                        .ok()
                        .and_then(|c| c.get("restart").and_then(|r| r.as_bool()))
                        .unwrap_or(false);
                    self.shutdown = Some(restart);
                }
                if lane == Lane::Shell {
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
        if lane == Lane::Iopub {
            publish(&mut self.fe, msg).await;
            return None;
        }
        let mut shutdown_reply = false;
        if lane == Lane::Shell || lane == Lane::Control {
            if let Some(parent) = msg.parent_msg_id() {
                self.pending.remove(&parent);
            }
            shutdown_reply = self.shutdown.is_some()
                && msg
                    .peek_header()
                    .is_ok_and(|h| h.msg_type == "shutdown_reply");
        }
        send_router(&mut self.fe, lane, msg).await;
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
            Event::KernelReady { pid, .. } => {
                tracing::info!(pid, "kernel ready");
                self.fe.set_alive(true);
                None
            }
            Event::KernelDied {
                description,
                expected: true,
            } => {
                tracing::info!("kernel {description} after its shutdown request");
                None
            }
            Event::KernelDied {
                description,
                expected: false,
            } => {
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
            other => {
                tracing::debug!("event {other:?}");
                None
            }
        }
    }

    /// Tells every waiting request, and IOPub, that the kernel is gone.
    async fn report_death(&mut self, text: &str) {
        tracing::error!("{text}");
        self.fe.set_alive(false);
        let (ename, evalue) = ("KernelDied", text.to_string());
        let mut any_execute = false;
        let order: Vec<String> = self.order.drain(..).collect();
        for id in order {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            if p.msg_type == "execute_request" {
                any_execute = true;
                let err = build::iopub(
                    &self.signer,
                    "error",
                    &self.session,
                    &p.header,
                    json!({
                        "ename": ename, "evalue": evalue, "traceback": [text],
                    }),
                );
                publish(&mut self.fe, err).await;
            }
            let reply_type = p
                .msg_type
                .strip_suffix("_request")
                .map(|t| format!("{t}_reply"))
                .unwrap_or_else(|| "error".into());
            let reply = build::message(
                &self.signer,
                p.identities,
                &reply_type,
                &self.session,
                &p.header,
                json!({
                    "status": "error", "ename": ename, "evalue": evalue, "traceback": [text], "execution_count": null,
                }),
            );
            send_router(&mut self.fe, Lane::Shell, reply).await;
            let idle = build::iopub(
                &self.signer,
                "status",
                &self.session,
                &p.header,
                json!({"execution_state": "idle"}),
            );
            publish(&mut self.fe, idle).await;
        }
        if !any_execute {
            let note = build::iopub(
                &self.signer,
                "stream",
                &self.session,
                &Bytes::new(),
                json!({
                    "name": "stderr", "text": format!("{text}\n"),
                }),
            );
            publish(&mut self.fe, note).await;
        }
    }

    /// Leaves the agent (and its allocation) to the next proxy for this
    /// connection file.
    async fn hand_over(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let token = noyau_wire::connection::random_key();
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
