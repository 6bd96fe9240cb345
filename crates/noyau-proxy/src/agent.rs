//! The notebook kernel's agent, from the proxy's side: started through
//! the backend (or taken over from the previous proxy of this connection
//! file, [`crate::handover`]), its link once it dials in, what waits for
//! that link, and how the agent is left to the next proxy or ended.

use noyau_vars::EnvVars;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use noyau_client::agent::{start_agent, AgentLaunch, AgentWatch};
use noyau_link::envelope::{self, Event, Payload};
use noyau_link::{
    Incoming, Lane, Link, LinkConfig, LinkEvent, LinkListener, LinkSender, ServerIdentity,
};
use noyau_sched::JobState;

use crate::answer::Answers;
use crate::{handover, keeper, ProxyConfig, ProxyError};

/// How long a detached agent waits for the next proxy (the agent's
/// default, 30 s, unless set); the proxy trusts a handover record for as
/// long: an older one names an agent that has given up.
fn reattach_grace() -> Duration {
    match noyau_vars::seconds(EnvVars::NOYAU_REATTACH_GRACE) {
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            tracing::warn!("{e}; trusting handover records for 30 s");
            Duration::from_secs(30)
        }
        None => Duration::from_secs(30),
    }
}

/// `NOYAU_ENV`, when set.
pub(crate) fn kernel_env_var() -> Option<String> {
    std::env::var(EnvVars::NOYAU_ENV)
        .ok()
        .filter(|v| !v.is_empty())
}

/// At most this many bytes of environment build lines are held for the
/// cell that will show them (the kernel's first, or the next after a
/// `%noyau env`); later ones go to the log only.
pub(crate) const HELD_MAX: usize = 64 * 1024;

/// Where the build lines of a job's environment go.
pub(crate) enum Lines<'a> {
    /// Held for the kernel's first cell (its own agent's environment).
    Hold(&'a mut String),
    /// As they come, to a cell (a target's, whose job waits for it).
    Cell(&'a mut Answers, &'a Bytes),
    /// The log only.
    Log,
}

/// The environment of a job of this kernel's (its own agent, a target, a
/// Dask cluster), prepared here before the job is submitted: `spec` (an
/// inline table or a file: `%%noyau on T --env`, a profile's
/// `environment`), else the kernel's own (`[environment]` in ./noyau.toml,
/// where Jupyter starts a kernel, overridden by `NOYAU_ENV`); the kernel's
/// data files in every case. Who gave `spec` decides what it may name
/// (noyau-env's `trust`).
pub(crate) async fn job_env(
    spec: Option<noyau_env::sources::TargetSpec<'_>>,
    mut lines: Lines<'_>,
) -> Result<BTreeMap<String, String>, ProxyError> {
    // Anchored to the working directory's inode, not `getcwd`'s string.
    let cwd = noyau_trust::anchor::ProjectDir::cwd().map_err(ProxyError::Cwd)?;
    let spec = match spec {
        Some(s) => noyau_env::sources::merge(&[s.source(&cwd)?], &cwd)?,
        None => noyau_env::sources::for_notebook(&cwd, None, kernel_env_var().as_deref(), &cwd)?,
    };
    let declared = noyau_env::sources::Declared {
        spec,
        data: noyau_env::data::declared(&cwd, None, &[])?,
    };
    let mut w = noyau_client::prepare::start(&declared);
    while let Some(line) = w.lines.recv().await {
        tracing::info!("environment: {line}");
        let text = format!("noyau: environment: {line}\n");
        match &mut lines {
            Lines::Hold(held) if held.len() < HELD_MAX => held.push_str(&text),
            Lines::Cell(out, parent) => out.stream(parent, "stderr", &text).await,
            _ => {}
        }
    }
    let prepared = w.result().await?;
    Ok(noyau_client::prepare::job_env(
        declared.spec.as_ref(),
        &prepared,
    ))
}

/// What comes from the agent.
pub(crate) enum FromAgent {
    /// A connection to the listener (the agent dialling in).
    Dialled(Result<Link, noyau_link::LinkError>),
    /// A message or event on the link; None once it closed.
    Incoming(Option<Incoming>),
    /// The agent is gone: how it ended.
    Ended(String),
}

/// The agent and its link.
pub(crate) struct AgentSide {
    link: Option<Link>,
    /// Messages for the agent until it dials in.
    queued: VecDeque<(Lane, Vec<Bytes>)>,
    listener: LinkListener,
    identity: ServerIdentity,
    advertise: String,
    pub watch: AgentWatch,
    /// The token the next proxy takes from the handover record, given to
    /// the agent ahead (`NextToken`).
    next_token: String,
    /// The build lines of the kernel's environment, for its first cell.
    pub env_held: String,
    backend: String,
    connection_file: PathBuf,
    /// For the keeper of the link's port at a handover ([`keeper`]).
    noyau_exe: PathBuf,
}

impl AgentSide {
    /// Takes over the previous proxy's agent, or starts one.
    pub async fn start(cfg: &ProxyConfig) -> Result<AgentSide, ProxyError> {
        let link_cfg = LinkConfig::default();
        let path = handover::path_for(&cfg.connection_file)?;
        let previous = handover::take(&path, reattach_grace()).filter(|h| {
            // A local agent that already gave up cannot be taken over.
            h.backend != "local" || h.agent_pid.is_some_and(noyau_client::agent::pid_alive)
        });
        // The kernel's own build lines, shown in its first cell.
        let mut env_held = String::new();
        let (listener, identity, advertise, watch) = match previous {
            Some(h) => {
                tracing::info!(agent = ?h.agent_pid, "taking over the agent of the previous proxy");
                let listener = relisten(&path, &h, link_cfg).await?;
                listener.add_token(&h.token);
                let watch = adopt(&h);
                (listener, h.identity, h.advertise, watch)
            }
            None => {
                // A port kept for a record not used (stale, refused, its
                // agent gone) is let go now, not at the end of its keeper's
                // grace: a fixed `--link-bind` port is wanted again.
                drop(fetch_kept(&path).await);
                let env = job_env(None, Lines::Hold(&mut env_held)).await?;
                let a = start_agent(launch(cfg, env), link_cfg).await?;
                (a.listener, a.identity, a.advertise, a.watch)
            }
        };
        Ok(AgentSide {
            link: None,
            queued: VecDeque::new(),
            listener,
            identity,
            advertise,
            watch,
            next_token: noyau_wire::connection::random_key(),
            env_held,
            backend: cfg.backend.clone(),
            connection_file: cfg.connection_file.clone(),
            noyau_exe: cfg.noyau_exe.clone(),
        })
    }

    pub fn attached(&self) -> bool {
        self.link.is_some()
    }

    /// The agent dialled in: it gets the next proxy's token, then what waited.
    pub fn attach(&mut self, link: Link) {
        tracing::info!("agent connected");
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

    pub fn sender(&self) -> Option<LinkSender> {
        self.link.as_ref().map(|l| l.sender())
    }

    /// Sends Jupyter frames to the kernel, or keeps them until the agent dials in.
    pub fn send(&mut self, lane: Lane, frames: Vec<Bytes>) {
        let frames = envelope::jupyter(frames);
        match self.sender() {
            Some(s) => {
                if let Err(e) = s.send(lane, frames) {
                    tracing::warn!(?lane, "cannot pass a message to the agent: {e}");
                }
            }
            None => self.queued.push_back((lane, frames)),
        }
    }

    /// What comes next from the agent: its link (while none is attached),
    /// a message or event on it, or its end.
    pub async fn next(&mut self) -> FromAgent {
        let attached = self.link.is_some();
        tokio::select! {
            biased;
            accepted = self.listener.accept(), if !attached => FromAgent::Dialled(accepted),
            incoming = async { match self.link.as_mut() { Some(l) => l.recv().await, None => std::future::pending().await } } => FromAgent::Incoming(incoming),
            desc = self.watch.ended() => FromAgent::Ended(desc),
        }
    }

    /// The scheduler's view of the job, when we submitted it.
    pub fn job_state(&self) -> Option<tokio::sync::watch::Receiver<JobState>> {
        self.watch.state()
    }

    pub fn job_label(&self) -> String {
        self.watch.job_id().unwrap_or("?").to_string()
    }
}

/// The listening socket the previous proxy's keeper holds for the
/// record at `record`, if one does.
async fn fetch_kept(record: &Path) -> Result<std::net::TcpListener, keeper::KeeperError> {
    let socket = keeper::socket_path(record);
    tokio::task::spawn_blocking(move || keeper::fetch(&socket))
        .await
        .unwrap_or_else(|e| {
            Err(keeper::KeeperError::Io {
                what: "fetching the kept socket".into(),
                source: std::io::Error::other(e),
            })
        })
}

/// The link's listener again, on the previous proxy's address: its
/// listening socket, from its keeper; else, when there is none (it was
/// killed, or could not start), the address bound anew, which another
/// process may have taken while no one held it.
async fn relisten(
    record: &Path,
    h: &handover::Handover,
    cfg: LinkConfig,
) -> Result<LinkListener, ProxyError> {
    let addr = h.link_addr;
    let kept = fetch_kept(record)
        .await
        .and_then(|tcp| match tcp.local_addr() {
            Ok(a) if a == addr => Ok(tcp),
            Ok(a) => Err(keeper::KeeperError::NotListening(format!(
                "bound to {a}, not {addr}"
            ))),
            Err(e) => Err(keeper::KeeperError::NotListening(e.to_string())),
        });
    let why = match kept {
        Ok(tcp) => {
            return LinkListener::from_std(tcp, h.identity.clone(), cfg)
                .map_err(|source| ProxyError::Listen { addr, source })
        }
        Err(why) => Box::new(why),
    };
    tracing::warn!(
        "the previous proxy's link socket was not kept for this one ({why}); binding {addr} again"
    );
    LinkListener::bind(addr, h.identity.clone(), cfg)
        .await
        .map_err(|source| match &source {
            noyau_link::LinkError::Io { source: e, .. }
                if e.kind() == std::io::ErrorKind::AddrInUse =>
            {
                ProxyError::PortTaken { addr, why }
            }
            _ => ProxyError::Relisten { addr, why, source },
        })
}

/// The agent a handover record names, followed as well as it can be.
fn adopt(h: &handover::Handover) -> AgentWatch {
    match (h.backend.as_str(), h.agent_pid) {
        ("local", Some(pid)) => AgentWatch::Pid(pid),
        (backend, _) => match noyau_sched::Backend::from_name(backend)
            .ok()
            .and_then(|b| b.adopt(&h.job_id).map(|j| (b, j)))
        {
            // The job the previous proxy submitted: watched as ours.
            Some((b, job)) => AgentWatch::Job(b, job),
            None => AgentWatch::Remote,
        },
    }
}

fn launch(cfg: &ProxyConfig, env: BTreeMap<String, String>) -> AgentLaunch {
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
    }
}

impl AgentSide {
    /// Leaves the agent (and its allocation) to the next proxy for this
    /// connection file.
    pub async fn hand_over(&mut self) {
        if self.link.is_none() {
            return;
        }
        let token = self.next_token.clone();
        let record = handover::Handover {
            link_addr: self.listener.local_addr(),
            advertise: self.advertise.clone(),
            identity: self.identity.clone(),
            token: token.clone(),
            agent_pid: self.watch.pid(),
            backend: self.backend.clone(),
            job_id: self.watch.job_id().unwrap_or_default().to_string(),
            written_at: handover::stamp(),
        };
        let written = handover::path_for(&self.connection_file).and_then(|path| {
            self.keep_port(&path);
            handover::write(&path, &record)
        });
        if let Err(e) = written {
            tracing::warn!("cannot hand the agent over: {e}");
            return;
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let _ = link
            .sender()
            .send(Lane::Control, envelope::event(&Event::Detach { token }));
        let acked = tokio::time::timeout(Duration::from_secs(5), detach_ack(link)).await;
        if acked.is_err() {
            tracing::warn!("the agent did not acknowledge the handover");
        }
        if let Some(link) = self.link.take() {
            link.close().await;
        }
    }

    /// Has a keeper hold the link's port for the next proxy ([`keeper`]).
    fn keep_port(&self, record: &Path) {
        let kept = self
            .listener
            .dup_socket()
            .map_err(|source| keeper::KeeperError::Io {
                what: "duplicating the link's socket".into(),
                source,
            })
            .and_then(|fd| {
                let socket = keeper::socket_path(record);
                let hold = keeper::Hold {
                    grace: reattach_grace(),
                    agent: self.watch.pid(),
                };
                keeper::spawn(&self.noyau_exe, fd, &socket, hold)
            });
        if let Err(e) = kept {
            tracing::warn!("the link's port is not kept for the next proxy: {e}; it is free until that proxy listens again, and another process could take it");
        }
    }

    /// After a final shutdown, gives the agent a moment to end by itself.
    pub async fn wait_end(&mut self) {
        let ended = tokio::time::timeout(Duration::from_secs(5), self.watch.ended()).await;
        if ended.is_err() {
            self.stop().await;
        }
        if let Some(link) = self.link.take() {
            link.close().await;
        }
    }

    /// Ends the agent and its job for the proxy, which stays: its link is
    /// closed, so nothing more of it reaches the notebook.
    pub async fn release(&mut self) {
        self.stop().await;
        if let Some(link) = self.link.take() {
            link.close().await;
        }
    }

    /// Ends the agent: its kernel stops, its job ends.
    pub async fn stop(&mut self) {
        if let Some(s) = self.sender() {
            let _ = s.send(Lane::Control, envelope::event(&Event::Shutdown));
        }
        self.watch.cancel().await;
    }
}

/// Waits for the agent's `DetachAck` (or the link's end).
async fn detach_ack(link: &mut Link) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    use handover::tests::sample as record;

    /// A keeper (in this process) handing `tcp` over at `record`'s socket.
    fn keeper_at(record: &Path, tcp: std::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let socket = keeper::socket_path(record);
        let _ = std::fs::remove_file(&socket);
        let unix = tokio::net::UnixListener::bind(socket).unwrap();
        tokio::spawn(async move { keeper::hand(&unix, &OwnedFd::from(tcp)).await })
    }

    #[tokio::test]
    async fn the_kept_socket_is_served_and_a_port_taken_without_it_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover-x.json");
        let kept = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let h = record(kept.local_addr().unwrap());
        let keeper = keeper_at(&path, kept);
        let listener = relisten(&path, &h, LinkConfig::default()).await.unwrap();
        assert_eq!(listener.local_addr(), h.link_addr);
        keeper.await.unwrap();

        // No keeper, and the port taken meanwhile by another process.
        let e = relisten(&path, &h, LinkConfig::default())
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ProxyError::PortTaken { .. }), "{text}");
        assert!(
            text.starts_with("the link's port")
                && text.contains("is held by another process")
                && text.contains("no link keeper answers at"),
            "{text}"
        );

        // A keeper handing over a socket on another address: not used
        // (and the port is still taken).
        let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let keeper = keeper_at(&path, elsewhere);
        let e = relisten(&path, &h, LinkConfig::default())
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains(&format!(", not {}", h.link_addr)),
            "{e}"
        );
        keeper.await.unwrap();
        drop(listener);
    }
}
