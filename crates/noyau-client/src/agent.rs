//! Starting an agent through a backend and following it.
//!
//! Both the proxy kernel and `noyau run` need a kernel somewhere: they open
//! a link listener, give the backend a job that runs `noyau agent` with the
//! listener's address, pin and a one-time token in its environment (never
//! its argv), and then watch the job so that an agent that dies without a
//! word is still noticed.

use noyau_vars::EnvVars;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use noyau_link::{LinkConfig, LinkError, LinkListener, ServerIdentity};
use noyau_sched::{Backend, Job, JobSpec, JobState, SchedError};

/// Why an agent could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("link_bind {0:?} is not an ADDR:PORT")]
    LinkBind(String),
    #[error("making the link's certificate: {0}")]
    Certificate(LinkError),
    #[error("cannot listen for the agent on {addr}: {source}")]
    Listen { addr: SocketAddr, source: LinkError },
    #[error(transparent)]
    Sched(#[from] SchedError),
}

/// What to start.
#[derive(Debug, Clone)]
pub struct AgentLaunch {
    pub backend: String,
    /// The kernelspec the agent runs.
    pub inner: String,
    /// Where the link listens; default 127.0.0.1 with a free port.
    pub link_bind: Option<SocketAddr>,
    /// The address the agent is told to dial, when it differs from the bound one.
    pub link_advertise: Option<String>,
    pub noyau_exe: PathBuf,
    /// Shown by schedulers: says what runs, holds no secret.
    pub job_name: String,
    pub cwd: Option<PathBuf>,
    /// More environment for the agent (not secrets of ours).
    pub env: BTreeMap<String, String>,
    /// What to ask the scheduler for.
    pub profile: noyau_config::Profile,
}

/// A submitted agent and the listener it will dial.
pub struct StartedAgent {
    pub listener: LinkListener,
    pub identity: ServerIdentity,
    pub advertise: String,
    pub watch: AgentWatch,
}

pub async fn start_agent(l: AgentLaunch, link_cfg: LinkConfig) -> Result<StartedAgent, StartError> {
    // A batch job dials from a compute node: listen on every address and
    // advertise this host's name, unless told otherwise.
    let batch = l.backend != "local";
    let bind = match (l.link_bind, &l.profile.link_bind) {
        (Some(b), _) => b,
        (None, Some(b)) => b.parse().map_err(|_| StartError::LinkBind(b.clone()))?,
        (None, None) if batch => SocketAddr::from(([0, 0, 0, 0], 0)),
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let identity =
        ServerIdentity::generate(&["localhost".to_string()]).map_err(StartError::Certificate)?;
    let listener = LinkListener::bind(bind, identity.clone(), link_cfg)
        .await
        .map_err(|source| StartError::Listen { addr: bind, source })?;
    let port = listener.local_addr().port();
    let advertise = match (l.link_advertise.clone(), l.profile.link_advertise.clone()) {
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) if bind.ip().is_unspecified() => format!("{}:{port}", hostname()),
        (None, None) => listener.local_addr().to_string(),
    };
    let backend = Backend::from_name(&l.backend)?;
    let mut env = l.env.clone();
    if l.backend == "local" {
        // A local agent whose proxy vanished (a frontend's SIGKILL to the
        // proxy's process group) has no allocation worth keeping: end soon.
        for (k, v) in [
            (EnvVars::NOYAU_LINK_GIVE_UP, "10"),
            (EnvVars::NOYAU_REATTACH_GRACE, "10"),
        ] {
            if std::env::var_os(k).is_none() {
                env.entry(k.into()).or_insert_with(|| v.into());
            }
        }
    }
    env.insert(EnvVars::NOYAU_LINK_ADDR.into(), advertise.clone());
    env.insert(EnvVars::NOYAU_LINK_PIN.into(), listener.pin());
    env.insert(EnvVars::NOYAU_LINK_TOKEN.into(), listener.issue_token());
    env.insert(EnvVars::NOYAU_INNER.into(), l.inner.clone());
    let job = backend
        .submit(JobSpec {
            name: l.job_name.clone(),
            program: l.noyau_exe.clone(),
            args: vec!["agent".into()],
            env,
            cwd: l.cwd.clone(),
            profile: l.profile.clone(),
            ..Default::default()
        })
        .await?;
    tracing::info!(job = %job.id, backend = %backend.name(), "agent submitted");
    Ok(StartedAgent {
        listener,
        identity,
        advertise,
        watch: AgentWatch::Job(backend, job),
    })
}

/// How an agent is followed.
pub enum AgentWatch {
    /// Submitted by us through a backend.
    Job(Backend, Job),
    /// A local agent handed over by an earlier proxy: not our child, so
    /// watched by pid.
    Pid(u32),
    /// Known only through its link.
    Remote,
}

impl AgentWatch {
    /// Resolves with a description ("was killed by signal 9 (SIGKILL)") once
    /// the agent is known to be gone; never resolves otherwise.
    pub async fn ended(&mut self) -> String {
        match self {
            AgentWatch::Job(_, job) => {
                let mut st = job.state.clone();
                let ended = match st.wait_for(|s| matches!(s, JobState::Ended(_))).await {
                    Ok(s) => match &*s {
                        JobState::Ended(end) => Some(end.description.clone()),
                        _ => None,
                    },
                    Err(_) => None,
                };
                match ended {
                    Some(d) => d,
                    None => std::future::pending().await,
                }
            }
            AgentWatch::Pid(pid) => loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if !pid_alive(*pid) {
                    return "ended".into();
                }
            },
            AgentWatch::Remote => std::future::pending().await,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            AgentWatch::Job(_, job) => job.id.strip_prefix("local:").and_then(|p| p.parse().ok()),
            AgentWatch::Pid(p) => Some(*p),
            AgentWatch::Remote => None,
        }
    }

    /// The scheduler's view of the job, when we submitted it.
    pub fn state(&self) -> Option<tokio::sync::watch::Receiver<JobState>> {
        match self {
            AgentWatch::Job(_, j) => Some(j.state.clone()),
            _ => None,
        }
    }

    pub fn job_id(&self) -> Option<&str> {
        match self {
            AgentWatch::Job(_, j) => Some(&j.id),
            _ => None,
        }
    }

    /// Ends the agent's job, if it is ours to end.
    pub async fn cancel(&self) {
        if let AgentWatch::Job(b, job) = self {
            b.cancel(job).await;
        }
    }
}

/// This host's name, as compute nodes resolve it.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into())
}

pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie is dead, just not yet reaped.
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
