//! Where an agent runs.
//!
//! A [`Backend`] takes a [`JobSpec`] (the `noyau agent` command, its
//! environment, a name that says what runs and carries no secret) and starts
//! it somewhere: [`local`] as a child process of the caller, the embedded
//! default; [`slurm`] and [`oar`] as batch jobs. Whatever the backend, the caller follows
//! the job through a [`JobState`] watch channel, and an error talking to a
//! scheduler is [`JobState::Unknown`], never "the job is gone".
//!
//! Backends are an enum rather than a trait object: there are few of them,
//! each is known at compile time, and the enum keeps `async fn` simple.

pub mod local;
pub mod oar;
pub mod sge;
pub mod slurm;
pub mod watcher;

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio::sync::watch;

/// What to run in the job.
#[derive(Debug, Clone, Default)]
pub struct JobSpec {
    /// Shown by the scheduler to every user: never put a secret in it.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Secrets travel here (the job's environment), never in `args`.
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    /// What to ask the scheduler for (ignored by `local`).
    pub profile: noyau_config::Profile,
    /// A job array's task ids (`0-5%2`, `1,4%2`): one job, many tasks
    /// (Slurm: `--array`, see `SlurmBackend::submit_array`; OAR: a count,
    /// `--array N`, see `OarBackend::oarsub`).
    pub array: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Pending {
        /// The scheduler's reason (Slurm: Priority, Resources, …).
        reason: String,
        /// The scheduler's estimated start time, when it has one.
        start: Option<String>,
        partition: Option<String>,
    },
    Running {
        node: String,
    },
    Ended(JobEnd),
    /// The scheduler could not be asked; the job may well be alive.
    Unknown {
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnd {
    /// E.g. "exited with status 0", "was killed by signal 9 (SIGKILL)".
    pub description: String,
    pub success: bool,
}

/// A submitted job.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub backend: &'static str,
    pub state: watch::Receiver<JobState>,
    handle: JobHandle,
}

#[derive(Debug)]
enum JobHandle {
    Local(local::LocalHandle),
    Slurm(slurm::SlurmHandle),
    Oar(oar::OarHandle),
}

#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("unknown backend {0:?}; available backends: local, slurm, oar")]
    UnknownBackend(String),
    #[error("invalid resource request: {0}")]
    Invalid(String),
    #[error("cannot submit the job: {0}")]
    Submit(String),
    #[error("cannot start the agent `{program}` locally: {source}")]
    LocalSpawn {
        program: String,
        source: std::io::Error,
    },
}

/// The batch schedulers whose client commands (`squeue`, `oarstat`) are
/// on PATH.
pub fn installed() -> Vec<&'static str> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = |cmd: &str| {
        std::env::split_paths(&path).any(|d| {
            std::fs::metadata(d.join(cmd))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    };
    [("slurm", "squeue"), ("oar", "oarstat")]
        .into_iter()
        .filter(|(_, cmd)| on_path(cmd))
        .map(|(name, _)| name)
        .collect()
}

/// A scheduler backend.
#[derive(Debug, Clone)]
pub enum Backend {
    Local(local::LocalBackend),
    Slurm(slurm::SlurmBackend),
    Oar(oar::OarBackend),
}

impl Backend {
    pub fn from_name(name: &str) -> Result<Self, SchedError> {
        match name {
            "local" => Ok(Backend::Local(local::LocalBackend)),
            "slurm" => Ok(Backend::Slurm(slurm::SlurmBackend::global())),
            "oar" => Ok(Backend::Oar(oar::OarBackend::global())),
            other => Err(SchedError::UnknownBackend(other.into())),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Local(_) => "local",
            Backend::Slurm(_) => "slurm",
            Backend::Oar(_) => "oar",
        }
    }

    pub async fn submit(&self, spec: JobSpec) -> Result<Job, SchedError> {
        match self {
            Backend::Local(b) => b.submit(spec).await,
            Backend::Slurm(b) => b.submit(spec).await,
            Backend::Oar(b) => b.submit(spec).await,
        }
    }

    /// Follows a batch job another process submitted (None for the local
    /// backend, whose jobs are child processes of their submitter).
    pub fn adopt(&self, id: &str) -> Option<Job> {
        match self {
            Backend::Local(_) => None,
            Backend::Slurm(b) => Some(b.adopt(id)),
            Backend::Oar(b) => Some(b.adopt(id)),
        }
    }

    /// What `submit` would run, for `--dry-run`: the job script, or the
    /// local command line. Checks the profile with the scheduler as
    /// `submit` would.
    pub async fn dry_run(&self, spec: &JobSpec) -> Result<String, SchedError> {
        match self {
            Backend::Local(_) => Ok(format!(
                "{} {}\n",
                slurm::sh_quote(&spec.program.display().to_string()),
                spec.args
                    .iter()
                    .map(|a| slurm::sh_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            Backend::Slurm(b) => {
                b.validate(&spec.profile).await?;
                Ok(slurm::job_script(spec, &slurm::log_dir()))
            }
            Backend::Oar(b) => b.dry_run(spec),
        }
    }

    /// Asks the job to end (the agent then stops its kernel), and makes sure it does.
    pub async fn cancel(&self, job: &Job) {
        match &job.handle {
            JobHandle::Local(h) => h.cancel().await,
            JobHandle::Slurm(h) => match self {
                Backend::Slurm(b) => b.cancel(h).await,
                _ => slurm::SlurmBackend::global().cancel(h).await,
            },
            JobHandle::Oar(h) => match self {
                Backend::Oar(b) => b.cancel(h).await,
                _ => oar::OarBackend::global().cancel(h).await,
            },
        }
    }
}
