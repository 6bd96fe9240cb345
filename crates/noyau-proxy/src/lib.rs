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
//! How the pieces fit: a small relay core (`relay`: the loop; `answer`:
//! what the proxy itself sends the frontend; `agent`: the notebook
//! kernel's agent and its link; `requests`: what the kernel has not
//! answered; `events`: the agent's events), and components that own
//! their state behind small interfaces:
//!
//! * `queued`: a kernel whose job waits (its queue note, `kernel_info`
//!   answered meanwhile), and walltime notices;
//! * `env`: the environment record, `%noyau env SPEC` switches and
//!   `%noyau data` files, both prepared on this host;
//! * `targets` + `delegate`: `%%noyau on` targets and their messages;
//! * `idle`: the idle clock of the kernel's job and of each target's, and
//!   a kernel whose idle job was given back (answered meanwhile, a new job
//!   for its next cell);
//! * `comm`: the `noyau` comm (docs/comm.md): the job, its resources and
//!   their use, targets and Dask jobs shown in the frontend, and its requests;
//! * `magic`: the proxy as noyau-magic's `Host`, which runs the magics
//!   both hosts share (push/pull, Dask, `targets`, `env show|lock`).
//!
//! The proxy answers by itself only when the kernel cannot: when the kernel
//! or the agent dies, every request still waiting gets an error reply that
//! says what happened, and the IOPub stream says it too. When the frontend
//! restarts the kernel, the proxy hands the agent over to the next proxy
//! process ([`handover`]), and its listening socket through a keeper
//! process ([`keeper`]), so the allocation is kept.

mod agent;
mod answer;
mod comm;
mod delegate;
mod env;
mod error;
mod events;
pub mod frontend;
pub mod handover;
mod idle;
pub mod keeper;
mod magic;
mod queued;
mod relay;
mod requests;
mod targets;
mod unprepared;

use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::signal::unix::{signal, SignalKind};

use noyau_wire::{ConnectionInfo, Signer};

pub use error::ProxyError;
pub use queued::{kernel_info_content, language_info};

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

/// An empty key means unsigned messages: whoever reaches the frontend's
/// ports could run code as the user, and noyau could not tell forged
/// messages from real ones. Jupyter allows it; noyau only when asked.
fn check_key(info: &ConnectionInfo, cfg: &ProxyConfig) -> Result<(), ProxyError> {
    if !info.key.is_empty() {
        return Ok(());
    }
    if !cfg.allow_unsigned {
        return Err(ProxyError::Unsigned(cfg.connection_file.clone()));
    }
    tracing::warn!(
        "connection file {} has an empty key and --allow-unsigned was given: frontend messages are not signed, and a forged message cannot be told from a real one",
        cfg.connection_file.display()
    );
    Ok(())
}

/// The frontend's sockets, bound as the connection file says.
async fn answers(cfg: &ProxyConfig) -> Result<answer::Answers, ProxyError> {
    let info = ConnectionInfo::read(&cfg.connection_file)?;
    check_key(&info, cfg)?;
    let signer = Signer::new(info.key.as_bytes());
    let fe = frontend::Frontend::bind(&info, signer.clone()).await?;
    Ok(answer::Answers {
        fe,
        signer,
        session: uuid::Uuid::new_v4().to_string(),
        exec_count: 0,
        delegated: 0,
    })
}

/// Runs the proxy until its kernel is gone; returns the exit code.
pub async fn run(cfg: ProxyConfig) -> Result<i32, ProxyError> {
    let started = chrono::Utc::now();
    // Handled from the start: Jupyter's SIGTERM, or a terminal's SIGINT to
    // our process group, while the job is being submitted must not end
    // the process before the scheduler answers (see `relay` for later).
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    let (mut sigterm, mut sigint) = match signals {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => return Err(ProxyError::Signals(e)),
    };
    let out = answers(&cfg).await?;
    let starting = {
        let start = agent::AgentSide::start(&cfg);
        tokio::pin!(start);
        loop {
            tokio::select! {
                // A signal that came while the submission ran wins over its end.
                biased;
                _ = sigterm.recv() => break None,
                _ = sigint.recv() => tracing::info!("SIGINT ignored; interrupts go to the kernel by message"),
                a = &mut start => break Some(a),
            }
        }
        // The start, given up, is dropped here: a submission under way
        // learns that no one waits for its job.
    };
    let agent = match starting {
        None => return Ok(terminated_while_starting(&cfg).await),
        Some(Ok(a)) => a,
        // Said to the frontend, not only to a log it may not show.
        Some(Err(e @ ProxyError::Env(_))) => {
            let why = format!("its environment could not be prepared: {e}");
            // SIGTERM is ours now: it still ends the process, at once.
            return Ok(tokio::select! {
                code = unprepared::serve(out, &cfg, &why) => code,
                _ = sigterm.recv() => 143,
            });
        }
        Some(Err(e)) => return Err(e),
    };
    let mut proxy = relay::Proxy::new(cfg, out, agent, started);
    let code = proxy.relay(sigterm, sigint).await;
    proxy.targets.release_all();
    proxy.release_dask("the kernel ended").await;
    // The last replies and errors are still queued for the frontend.
    proxy.out.fe.close().await;
    // The targets' cancels ran meanwhile: each in its task, which the
    // runtime's end would drop.
    proxy.targets.end_all(noyau_sched::CANCEL_PATIENCE).await;
    Ok(code)
}

/// SIGTERM came while the kernel's job was prepared or submitted: the
/// start is given up and the process waits for a submission under way,
/// whose job noyau-sched cancels as soon as the scheduler gives its id
/// (no one would follow it). The exit code.
async fn terminated_while_starting(cfg: &ProxyConfig) -> i32 {
    tracing::info!(
        "terminated while the kernel's {} job was being submitted; a job the scheduler still gives is cancelled",
        cfg.backend
    );
    noyau_sched::submissions_settled().await;
    143
}

/// A kernel whose profile cannot be used (`why`: an untrusted project's
/// file set code in it): it stays, answers the frontend with the reason
/// (as one whose environment could not be prepared) and starts nothing.
/// `cfg.resources` is not used.
pub async fn refuse(cfg: ProxyConfig, why: &noyau_config::ConfigError) -> Result<i32, ProxyError> {
    let out = answers(&cfg).await?;
    let why = format!("its profile cannot be used: {why}");
    Ok(unprepared::serve(out, &cfg, &why).await)
}
