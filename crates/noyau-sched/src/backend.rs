//! [`Backend`]: where an agent runs: `local`, a child process, or a batch
//! [`Scheduler`].

use crate::local::LocalBackend;
use crate::script::command_line;
use crate::{Job, JobSpec, SchedError, Scheduler};

#[derive(Debug, Clone)]
pub enum Backend {
    Local(LocalBackend),
    Batch(Scheduler),
}

impl Backend {
    pub fn from_name(name: &str) -> Result<Self, SchedError> {
        match name {
            "local" => Ok(Backend::Local(LocalBackend)),
            other => Scheduler::named(other).map(Backend::Batch),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Local(_) => "local",
            Backend::Batch(s) => s.name(),
        }
    }

    pub async fn submit(&self, spec: JobSpec) -> Result<Job, SchedError> {
        match self {
            Backend::Local(b) => b.submit(spec).await,
            Backend::Batch(s) => s.submit(&spec).await,
        }
    }

    /// Follows a batch job another process submitted (None for the local
    /// backend, whose jobs are child processes of their submitter).
    pub fn adopt(&self, id: &str) -> Option<Job> {
        match self {
            Backend::Local(_) => None,
            Backend::Batch(s) => Some(s.adopt(id)),
        }
    }

    /// What `submit` would run, for `--dry-run`: the job script, or the
    /// local command line. Checks the profile with the scheduler as
    /// `submit` would.
    pub async fn dry_run(&self, spec: &JobSpec) -> Result<String, SchedError> {
        match self {
            Backend::Local(_) => Ok(format!("{}\n", command_line(spec))),
            Backend::Batch(s) => s.dry_run(spec).await,
        }
    }

    /// Asks the job to end (the agent then stops its kernel), and makes sure it does.
    pub async fn cancel(&self, job: &Job) {
        job.cancel().await
    }
}
