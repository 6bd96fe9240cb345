//! Where an agent runs, and every batch scheduler noyau speaks to.
//!
//! A [`Backend`] takes a [`JobSpec`] (the `noyau agent` command, its
//! environment, a name that says what runs and carries no secret) and starts
//! it somewhere: `local` as a child process of the caller, the embedded
//! default, or a batch [`Scheduler`]. Whatever the backend, the caller
//! follows the job through a [`JobState`] watch channel, and an error
//! talking to a scheduler is [`JobState::Unknown`], never "the job is gone".
//!
//! How the pieces fit:
//!
//! * `batch`: the seam, the `Batch` trait a scheduler implements in one
//!   file (`slurm`, `oar`, `sge`), registered by one line in [`SCHEDULERS`];
//!   `jobfiles`: the 0600 environment file of the schedulers that cannot
//!   carry a job's secrets in its environment (OAR, Grid Engine).
//! * [`Scheduler`] (`scheduler`): the handle callers hold; `watcher`: one
//!   listing call per interval for every job a process follows; `job`: the
//!   [`Job`]s and [`ArrayJob`]s it returns.
//! * `script`: the job script every scheduler shares; `run`: the process
//!   runner (and [`AsUser`], commands run as another user); `quote`,
//!   `paths`, `state`: shell quoting, noyau's directories, job states and
//!   their times; `throttle`: at most N submitting or cancelling commands
//!   of a user at once on a host, across processes.

mod backend;
mod batch;
mod error;
mod estimate;
mod job;
mod jobfiles;
mod local;
mod oar;
mod paths;
mod profile;
mod quote;
mod run;
mod scheduler;
mod script;
mod sge;
mod shared;
mod slurm;
mod state;
mod tasks;
mod throttle;
mod watcher;

use noyau_vars::EnvVars;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use backend::Backend;
pub use batch::{JobInfo, PartitionLoad, Scope};
pub use error::SchedError;
pub use estimate::start_estimate;
pub use job::{ArrayJob, ArrayTasks, Job};
pub use local::LocalBackend;
pub use paths::{log_dir, private_dir, runtime_dir_from, state_dir, tail_log};
pub use profile::{
    canonical_key, find_key, key_names, parse_size, parse_time, suggest, Given, Key, Kind, Profile,
    ProfileError, Value,
};
pub use quote::sh_quote;
pub use run::{AsUser, CommandError};
pub use scheduler::{
    serve_submit_request, settled, settled_or, submissions_settled, Builder, Scheduler,
    CANCEL_PATIENCE,
};
pub use state::{
    duration_text, local_time, parse_duration, parse_local_time, seconds_until, walltime_warnings,
    JobEnd, JobState,
};
pub use tasks::fan_out;
pub use throttle::{check_slots, set_concurrent_submissions, DEFAULT_SLOTS, MAX_SLOTS};

use batch::{Batch, Commands};

/// The most walltime noyau asks for at once (`noyau extend`, the comm's
/// `extend`): a year.
pub(crate) const MAX_EXTEND_SECS: u64 = 365 * 86400;

/// Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): the parsers
/// of what the schedulers' commands print.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    /// squeue listings (and the job states they map to), sacct lines,
    /// `sbatch --parsable`, sinfo lines, times left.
    pub fn slurm_output(text: &str) {
        crate::slurm::fuzz(text)
    }
}

/// The batch schedulers noyau knows: each one's name, the command whose presence
/// on PATH says it is installed, and how to make it. Adding a scheduler is
/// its file and one line here.
const SCHEDULERS: &[(&str, &str, Make)] = &[
    ("slurm", "squeue", slurm::make),
    ("oar", "oarstat", oar::make),
    ("sge", "qconf", sge::make),
];

/// How a scheduler's implementation is made, from its commands.
type Make = fn(Commands) -> Arc<dyn Batch>;

fn registered(name: &str) -> Option<Make> {
    SCHEDULERS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, make)| *make)
}

/// The profile keys only scheduler `name` knows.
fn scheduler_keys(name: &str) -> &'static [Key] {
    registered(name).map_or(&[], |make| make(Commands::default()).keys())
}

/// The batch schedulers' names.
pub fn schedulers() -> Vec<&'static str> {
    SCHEDULERS.iter().map(|(n, _, _)| *n).collect()
}

/// Every backend's name: `local`, then the batch schedulers.
pub fn backends() -> Vec<&'static str> {
    std::iter::once("local").chain(schedulers()).collect()
}

/// The batch schedulers whose client commands are on PATH.
pub fn installed() -> Vec<&'static str> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os(EnvVars::PATH).unwrap_or_default();
    let on_path = |cmd: &str| {
        std::env::split_paths(&path).any(|d| {
            std::fs::metadata(d.join(cmd))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    };
    SCHEDULERS
        .iter()
        .filter(|(_, probe, _)| on_path(probe))
        .map(|(name, _, _)| *name)
        .collect()
}

/// The site's batch scheduler for the commands about jobs (`noyau ps`,
/// `cancel`, `extend`): `name` if given, else the one whose commands are
/// installed (an error when that is not exactly one).
pub fn site_scheduler(name: Option<&str>) -> Result<Scheduler, SchedError> {
    let name = match name {
        Some("local") => return Err(SchedError::NotBatch),
        Some(n) => n.to_string(),
        None => match installed().as_slice() {
            [one] => one.to_string(),
            [] => {
                let each: Vec<String> = SCHEDULERS
                    .iter()
                    .map(|(_, probe, make)| {
                        format!("{probe} ({})", make(Commands::default()).display())
                    })
                    .collect();
                return Err(SchedError::NoneInstalled(each));
            }
            several => return Err(SchedError::SeveralInstalled(several.to_vec())),
        },
    };
    Scheduler::named(&name)
}

/// The batch job this process runs in, if any: its scheduler and id (an
/// array task's as the scheduler lists it, `12_3` on Slurm).
pub fn this_job() -> Option<(Scheduler, String)> {
    SCHEDULERS.iter().find_map(|(name, _, make)| {
        let id = make(Commands::default()).job_in_env()?;
        Some((Scheduler::named(name).ok()?, id))
    })
}

/// The GPUs of the batch job this process runs in, where its scheduler
/// says which ([`Batch::gpus_in_env`]).
pub fn this_job_gpus() -> Option<Vec<String>> {
    SCHEDULERS
        .iter()
        .find_map(|(_, _, make)| make(Commands::default()).gpus_in_env())
}

/// The signal that says "the walltime is near" in the batch job this
/// process runs in (see [`Scheduler::walltime_signal`]); SIGUSR1 outside
/// a batch job.
pub fn walltime_signal() -> i32 {
    this_job().map_or(libc::SIGUSR1, |(s, _)| s.walltime_signal())
}

/// This process's task id in a job array (a sweep's point).
pub fn array_task() -> Option<usize> {
    std::env::var(EnvVars::NOYAU_ARRAY_TASK_ID)
        .ok()?
        .parse()
        .ok()
}

/// What to run in the job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobSpec {
    /// Shown by the scheduler to every user: never put a secret in it.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Secrets travel here (the job's environment), never in `args`.
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    /// What to ask the scheduler for (ignored by `local`).
    pub profile: Profile,
    /// A job array's tasks: one job, many tasks, K at a time.
    pub array: Option<ArrayTasks>,
    /// Where the job's log goes (default [`log_dir`]).
    pub log_dir: Option<PathBuf>,
}

impl JobSpec {
    /// The log directory of the job.
    pub fn logs(&self) -> PathBuf {
        self.log_dir.clone().unwrap_or_else(log_dir)
    }

    /// The log of job `id`: `LOGS/NAME-ID.log`, whatever the scheduler.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.logs().join(format!("{}-{id}.log", self.name))
    }

    /// Refuses a name or directory with a control character: a job
    /// script's directives are lines (`#SBATCH --chdir=DIR`), and a line
    /// break in a directory's name (a cloned repository can hold one)
    /// would end the directive and run the rest as a command of the job.
    pub(crate) fn check_lines(&self) -> Result<(), SchedError> {
        let dirs = [
            ("working directory", &self.cwd),
            ("log directory", &self.log_dir),
        ];
        let paths = dirs
            .iter()
            .filter_map(|(what, p)| Some((*what, p.as_ref()?)));
        for (what, p) in paths {
            if p.as_os_str()
                .as_encoded_bytes()
                .iter()
                .any(u8::is_ascii_control)
            {
                return Err(SchedError::Invalid(format!(
                    "the job's {what} {p:?} has a line break or another control character in its \
                     name, which a job script cannot carry: rename it, or run from another directory"
                )));
            }
        }
        // Also a bidi, zero-width or other format character: the name is
        // shown by `noyau ps` and the scheduler's own listings.
        match self.name.chars().any(noyau_text::is_unsafe) {
            true => Err(SchedError::Invalid(format!(
                "the job name {:?} has a control character (or a bidi or other invisible one): name it without one",
                self.name
            ))),
            false => Ok(()),
        }
    }
}
