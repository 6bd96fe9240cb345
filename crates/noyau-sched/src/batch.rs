//! The seam between noyau and a batch scheduler: the [`Batch`] trait, which
//! each scheduler's file implements (`slurm.rs`, `oar.rs`, `sge.rs`), and the few
//! types it speaks in. Everything else (the watcher, arrays paced K at a
//! time, the handle callers hold, submission as another user) is written
//! once, over this trait.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::profile::Key;
use crate::run::{AsUser, Cmd};
use crate::{JobEnd, JobSpec, JobState, SchedError};

/// A job number as the schedulers print and take it: non-empty, all
/// ASCII digits (checked before an id goes on a command line).
pub(crate) fn is_job_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Which jobs a listing covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// This user's jobs.
    Mine,
    /// Every user's (the hub, as root or a scheduler operator).
    All,
}

/// One job as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobInfo {
    /// As the scheduler names it; an array task's id names its task (Slurm: `12_3`).
    pub id: String,
    /// As its owner named it; empty in Slurm's listing of every user's jobs
    /// ([`Scope::All`]), which asks for no names (see `slurm.rs`).
    pub name: String,
    pub state: JobState,
    /// The scheduler's own word for the state (`RUNNING`, `Waiting`…), for people.
    pub word: String,
}

/// Free and total cores and GPUs of a partition (or queue).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLoad {
    /// The partition's name, or [`PartitionLoad::ALL`] for a scheduler
    /// whose free resources are shared by every queue.
    pub partition: String,
    pub idle_cores: u64,
    pub total_cores: u64,
    /// GPUs not held by a job, on nodes that can take jobs.
    pub free_gpus: u64,
    pub total_gpus: u64,
}

impl PartitionLoad {
    /// The name of the one line of a scheduler whose queues share their
    /// resources (OAR).
    pub const ALL: &'static str = "all queues";

    /// Whether this line says something about `partition`'s resources.
    pub fn serves(&self, partition: &str) -> bool {
        self.partition == partition || self.partition == Self::ALL
    }
}

/// What a submission gave.
#[derive(Debug, Default)]
pub(crate) struct Submission {
    pub id: String,
    /// An array's tasks: each one's id as [`Batch::list`] shows it, in
    /// task order (empty for a single job).
    pub tasks: Vec<String>,
    /// The array's tasks were submitted held, for the submitter to
    /// release K at a time ([`Batch::release`]): the scheduler has no limit
    /// of its own on how many run at once.
    pub held: bool,
    /// Files the submission wrote that the submitter removes once no task
    /// will start any more (a job deletes its own when it starts).
    pub files: Vec<PathBuf>,
    /// How the array was asked for, for people (`--array=0-5%2`).
    pub note: String,
}

/// How long one scheduler command may take, by default, before it is
/// killed and counts as failed.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A scheduler's client commands: each by its name, looked up on PATH,
/// unless a path is given for it.
#[derive(Debug, Clone)]
pub struct Commands {
    paths: BTreeMap<String, PathBuf>,
    /// How long one command may take before it counts as failed.
    pub timeout: Duration,
}

impl Default for Commands {
    fn default() -> Self {
        Commands {
            paths: BTreeMap::new(),
            timeout: COMMAND_TIMEOUT,
        }
    }
}

impl Commands {
    pub(crate) fn set(&mut self, name: &str, path: PathBuf) {
        self.paths.insert(name.into(), path);
    }

    /// The commands given a path, by name.
    pub(crate) fn paths(&self) -> &BTreeMap<String, PathBuf> {
        &self.paths
    }

    /// The command `name`, ready for its arguments.
    pub(crate) fn cmd(&self, name: &str) -> Cmd {
        let path = self
            .paths
            .get(name)
            .map_or_else(|| Path::new(name), PathBuf::as_path);
        Cmd::new(path, self.timeout)
    }
}

/// A batch scheduler. One file implements it for one scheduler, and one
/// line in `lib.rs` registers it; `docs/architecture.md` ("Adding a
/// scheduler") says what each method must do.
#[async_trait]
pub(crate) trait Batch: Send + Sync + 'static {
    /// Its name in configurations: `slurm`.
    fn name(&self) -> &'static str;
    /// Its name for people: `Slurm`.
    fn display(&self) -> &'static str;
    /// What it calls the queue a job goes to: `Partition`, `Queue`.
    fn queue_word(&self) -> &'static str;
    /// The commands it runs, by name (paths may be given for them).
    fn commands(&self) -> &'static [&'static str];
    /// Variables its commands need, kept when they run as another user
    /// with a clean environment (Slurm: `SLURM_CONF`).
    fn config_vars(&self) -> &'static [&'static str] {
        &[]
    }
    /// The job this process runs in, from the environment the scheduler
    /// gives its jobs (an array task's id as [`Batch::list`] shows it).
    fn job_in_env(&self) -> Option<String>;
    /// The GPUs the scheduler bound to the job this process runs in, as
    /// `nvidia-smi` indexes them (empty: none); None where it does not
    /// say (not in one of its jobs, or it binds no GPUs).
    fn gpus_in_env(&self) -> Option<Vec<String>> {
        None
    }
    /// The signal its jobs get shortly before their walltime (the save
    /// signal), which their processes must handle: its default action
    /// ends a process.
    fn walltime_signal(&self) -> i32 {
        libc::SIGUSR1
    }
    /// Whether the walltime signal, just received in one of its jobs, is
    /// in fact a cancel (a scheduler that sends the same signal on both).
    fn signal_means_cancel(&self) -> bool {
        false
    }
    /// Python lines that start `n` tasks in this scheduler's allocation
    /// (see `tasks.rs`), or nothing to leave it to local processes.
    fn tasks_python(&self) -> &'static str;
    /// The profile keys only this scheduler knows (besides
    /// [`crate::profile::GENERIC`]), which it translates with the others.
    fn keys(&self) -> &'static [Key];
    /// What to write instead of a key it does not know.
    fn foreign_hint(&self) -> &'static str;
    /// Whether `line` of a job's log is the scheduler's own notice that it
    /// ended the job (cancelled it, or at its time limit), which the
    /// scheduler's end state already says.
    fn end_notice(&self, _line: &str) -> bool {
        false
    }

    /// Whether `id` has the form of one job's id (not an array's or a
    /// task's) as its submission prints it: what `noyau hub-submit`, which
    /// runs as the user, may answer before the hub follows and cancels it.
    /// Slurm, OAR and Grid Engine number their jobs.
    fn is_single_job_id(&self, id: &str) -> bool {
        is_job_number(id)
    }

    /// What `submit` would run (script and arguments), for `--dry-run`;
    /// checks what only the scheduler knows (a partition's name).
    async fn dry_run(&self, spec: &JobSpec) -> Result<String, SchedError>;
    /// Submits one job, or an array (`spec.array`), with the secrets of
    /// `spec.env` kept off every command line; through `as_user`'s prefix
    /// when given.
    async fn submit(
        &self,
        spec: &JobSpec,
        as_user: Option<&AsUser>,
    ) -> Result<Submission, SchedError>;
    /// Cancels jobs (or array tasks) by id.
    async fn cancel(&self, ids: &[String], as_user: Option<&AsUser>) -> Result<(), SchedError>;
    /// Releases held array tasks (see [`Submission::held`]).
    async fn release(&self, _ids: &[String]) -> Result<(), SchedError> {
        Err(SchedError::Unsupported(format!(
            "{} holds no array task for noyau to release",
            self.display()
        )))
    }
    /// One call: the jobs of `scope`, or only `ids` where the scheduler
    /// asks by id (the watcher's tracked jobs). Ended jobs the scheduler
    /// still knows are listed as ended.
    async fn list(&self, scope: Scope, ids: Option<&[String]>) -> Result<Vec<JobInfo>, SchedError>;
    /// Whether one listing of this user's jobs ([`Scope::Mine`], no ids)
    /// serves every process of the user (`shared.rs`): it then shows
    /// every job of theirs that has not ended, and [`Batch::gone`] finds
    /// how the others ended.
    fn shares_listing(&self) -> bool {
        false
    }
    /// How jobs that left the listing ended, for those it can say. A job
    /// it cannot tell yet is asked again at the next interval, until
    /// [`Batch::records_lag`] has passed since it left the listing.
    async fn gone(&self, ids: &[String]) -> HashMap<String, JobEnd>;
    /// How long after a job left the listing its end may still be missing
    /// from the records [`Batch::gone`] reads (accounting written late).
    fn records_lag(&self) -> Duration {
        Duration::ZERO
    }
    /// Whether [`Batch::extend`] may succeed for this process's user's
    /// jobs (what a frontend offers as a button); an error when the
    /// scheduler could not be asked. Asked of the scheduler where it
    /// depends on the user (Slurm), then kept for the process.
    async fn users_extend(&self) -> Result<bool, SchedError> {
        Ok(false)
    }
    /// Asks for `secs` more seconds of walltime: the scheduler's answer, or
    /// [`SchedError::Unsupported`] where users may not.
    async fn extend(
        &self,
        id: &str,
        secs: u64,
        as_user: Option<&AsUser>,
    ) -> Result<String, SchedError>;
    /// Free and total resources per partition (or one line for all queues).
    async fn partitions(&self) -> Result<Vec<PartitionLoad>, SchedError>;
}

impl std::fmt::Debug for dyn Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
