//! The OAR backend (OAR 2.5): the agent runs as a batch job.
//!
//! * **Submission.** OAR does not pass the submitter's environment to the
//!   job, and `oarstat` shows every job's command line to every user. So
//!   the job's environment (the link's address, pin and token among it,
//!   and the submitter's `NOYAU_*` settings, which Slurm's default export
//!   would carry) is written to a 0600 file in a 0700 directory under noyau's state
//!   directory, which the job script sources and deletes before `exec noyau
//!   agent`; the script (0700, no secret) is what `oarsub` runs. Resources
//!   are `-l nodes=N/core=C,walltime=H:MM:SS` from `nodes`, `ntasks` ×
//!   `cpus_per_task` and `time`; `queue`/`partition` give `-q`,
//!   `project`/`account` `--project`, `properties` `-p`, and `oarsub` any
//!   other argument.
//! * **One watcher.** Every job a process tracks is followed by one
//!   [`Watcher`]: one `oarstat -J -f -j A -j B …` call per interval (2 s by
//!   default, ±20 % jitter, `NOYAU_OAR_POLL`) for all of them. OAR keeps
//!   finished jobs with their exit code, so an end is always described. A
//!   failing or timed-out `oarstat` makes every job [`JobState::Unknown`].
//! * **Cancel** is `oardel`: OAR sends SIGTERM to the job, the agent stops
//!   its kernel.
//! * **Arrays** (sweeps): [`OarBackend::submit_array`] submits the tasks
//!   with `--array-param-file`, one line per task id, which the script
//!   exports as `NOYAU_ARRAY_TASK_ID`. OAR 2.5 cannot limit how many tasks of
//!   an array run at once (Slurm's `%K`), so when K is below the task count
//!   the tasks are submitted `--hold` and [`OarBackend::poll_array`] resumes
//!   them (`oarresume`) K at a time while the submitter polls.
//! * **Walltime.** `--checkpoint N --signal 10` makes OAR send SIGUSR1 N
//!   seconds before the walltime (the profile's `walltime_signal`, else a
//!   tenth of `time`, 30 s to 10 min), which the agent turns into a walltime
//!   event; [`OarBackend::extend`] asks `oarwalltime` for more time where the
//!   site enables walltime changes.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use noyau_config::Profile;
use rand::Rng;
use serde::Deserialize;

use crate::slurm::{log_dir, run, sh_quote, state_dir, warning_secs};
use crate::{Job, JobEnd, JobHandle, JobSpec, JobState, SchedError};

/// The OAR client commands, by path or name (looked up on PATH).
#[derive(Debug, Clone)]
pub struct Commands {
    pub oarsub: PathBuf,
    pub oarstat: PathBuf,
    pub oardel: PathBuf,
    pub oarwalltime: PathBuf,
    pub oarresume: PathBuf,
    /// How long one command may take before it counts as failed.
    pub timeout: Duration,
}

impl Default for Commands {
    fn default() -> Self {
        Commands {
            oarsub: "oarsub".into(),
            oarstat: "oarstat".into(),
            oardel: "oardel".into(),
            oarwalltime: "oarwalltime".into(),
            oarresume: "oarresume".into(),
            timeout: Duration::from_secs(30),
        }
    }
}

fn no_env() -> &'static BTreeMap<String, String> {
    static E: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    E.get_or_init(Default::default)
}

/// OAR's walltime, `H:MM:SS`, from seconds.
pub fn walltime(secs: u64) -> String {
    format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The `-l` resource request of a profile: `nodes=N/core=C,walltime=…`
/// (None when the profile asks for nothing, leaving OAR's default).
pub fn resources(p: &Profile) -> Option<String> {
    let cores = match (p.ntasks, p.cpus_per_task) {
        (None, None) => None,
        (t, c) => Some(t.unwrap_or(1) * c.unwrap_or(1)),
    };
    let mut l = match (p.nodes, cores) {
        (None, None) => String::new(),
        (Some(n), None) => format!("nodes={n}"),
        (n, Some(c)) => format!("nodes={}/core={c}", n.unwrap_or(1)),
    };
    if let Some(t) = p.time_secs().filter(|t| *t > 0) {
        if !l.is_empty() {
            l.push(',');
        }
        l.push_str(&format!("walltime={}", walltime(t)));
    }
    (!l.is_empty()).then_some(l)
}

/// A job array's task ids and how many may run at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayTasks {
    pub ids: Vec<usize>,
    pub max_parallel: usize,
}

impl ArrayTasks {
    /// From Slurm's `--array` syntax, which `JobSpec::array` uses for every
    /// backend: `0-5%2`, `1,4%3`, `7` (no `%K`: all at once).
    pub fn parse(spec: &str) -> Result<ArrayTasks, String> {
        let bad = || format!("job array {spec:?}: expected task ids like 0-5%2 or 1,4,7");
        let (list, k) = match spec.split_once('%') {
            Some((l, k)) => (l, Some(k.parse::<usize>().map_err(|_| bad())?)),
            None => (spec, None),
        };
        let mut ids = Vec::new();
        for part in list.split(',') {
            let num = |v: &str| v.trim().parse::<usize>().map_err(|_| bad());
            match part.split_once('-') {
                Some((a, b)) if num(a)? <= num(b)? => ids.extend(num(a)?..=num(b)?),
                Some(_) => return Err(bad()),
                None => ids.push(num(part)?),
            }
        }
        let max_parallel = k.unwrap_or(ids.len()).max(1);
        Ok(ArrayTasks { ids, max_parallel })
    }

    /// Fewer may run at once than there are tasks: submitted held,
    /// released by [`OarBackend::poll_array`].
    pub fn held(&self) -> bool {
        self.max_parallel < self.ids.len()
    }
}

/// The `--array-param-file` beside a job script: one task id per line.
fn tasks_file(script: &Path) -> PathBuf {
    script.with_extension("tasks")
}

/// The oarsub arguments for `spec`, `exec SCRIPT` last. They hold no
/// secret (every user sees them in `oarstat`).
pub fn oarsub_args(
    spec: &JobSpec,
    log_dir: &Path,
    script: &Path,
    array: Option<&ArrayTasks>,
) -> Vec<String> {
    let p = &spec.profile;
    let mut a: Vec<String> = vec!["-n".into(), spec.name.clone()];
    let log = log_dir.join(format!("{}-%jobid%.log", spec.name));
    for f in ["-O", "-E"] {
        a.push(f.into());
        a.push(log.display().to_string());
    }
    if let Some(l) = resources(p) {
        a.push("-l".into());
        a.push(l);
    }
    if let Some(q) = p.queue.as_ref().or(p.partition.as_ref()) {
        a.push("-q".into());
        a.push(q.clone());
    }
    if let Some(pr) = p.project.as_ref().or(p.account.as_ref()) {
        a.push("--project".into());
        a.push(pr.clone());
    }
    if let Some(props) = &p.properties {
        a.push("-p".into());
        a.push(props.clone());
    }
    if let Some(cwd) = &spec.cwd {
        a.push("-d".into());
        a.push(cwd.display().to_string());
    }
    // SIGUSR1 (10 on Linux) N seconds before the walltime
    a.extend([
        "--checkpoint".into(),
        warning_secs(p).to_string(),
        "--signal".into(),
        "10".into(),
    ]);
    if let Some(t) = array {
        a.push("--array-param-file".into());
        a.push(tasks_file(script).display().to_string());
        if t.held() {
            a.push("--hold".into());
        }
    }
    a.extend(p.oarsub.iter().cloned());
    // OAR runs the command with the user's login shell (`$SHELL -c CMD`) and
    // sends the checkpoint signal to that shell's pid. dash does not exec a
    // lone command: it would be dash that gets SIGUSR1, and dies of it,
    // ending the job early. With `exec` the script (then the agent) is that pid.
    a.push(format!("exec {}", sh_quote(&script.display().to_string())));
    a
}

/// The job script for `spec`: sources and deletes the 0600 environment file
/// (which holds the secrets), then the profile's environment and prologue,
/// then `exec noyau agent`; it deletes both files and itself. Holds no
/// secret. A job array's tasks all read the file, so there the submitter
/// deletes it once the array is over ([`OarArray::remove_files`]), and each
/// task's id (its line of the tasks file, the script's argument) is
/// exported as `NOYAU_ARRAY_TASK_ID`.
pub fn job_script(spec: &JobSpec, env_file: &Path) -> String {
    let p = &spec.profile;
    let f = sh_quote(&env_file.display().to_string());
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(
        "# the job's environment (secrets included) is in a 0600 file: OAR does not pass it\n",
    );
    if spec.array.is_some() {
        s.push_str(&format!(". {f}\nexport NOYAU_ARRAY_TASK_ID=\"$1\"\n"));
    } else {
        s.push_str(&format!(". {f} && rm -f {f} \"$0\"\n"));
    }
    if !p.env.is_empty() {
        s.push_str("\n# environment of the profile\n");
        for (k, v) in &p.env {
            s.push_str(&format!("export {k}={}\n", sh_quote(v)));
        }
    }
    if let Some(pro) = &p.prologue {
        s.push_str("\n# prologue of the profile\n");
        s.push_str(pro.trim_end());
        s.push('\n');
    }
    s.push_str("\nexec ");
    s.push_str(&sh_quote(&spec.program.display().to_string()));
    for a in &spec.args {
        s.push(' ');
        s.push_str(&sh_quote(a));
    }
    s.push('\n');
    s
}

/// The environment file's text: one `export K='V'` per variable.
fn env_text(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(k, v)| format!("export {k}={}\n", sh_quote(v)))
        .collect()
}

/// The job ids `oarsub` printed (`OAR_JOB_ID=N`, one per array task).
pub fn parse_oarsub(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("OAR_JOB_ID="))
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

/// One job as `oarstat -J -f` describes it (the fields noyau reads).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct OarJob {
    #[serde(rename = "Job_Id")]
    pub id: u64,
    #[serde(default)]
    pub name: Option<String>,
    pub state: String,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub queue: Option<String>,
    /// The wait status of the job's command (`exit_code` = status << 8).
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default, rename = "scheduledStart")]
    pub scheduled_start: Option<i64>,
    #[serde(default, rename = "startTime")]
    pub start_time: Option<i64>,
    /// Seconds.
    #[serde(default)]
    pub walltime: Option<i64>,
    #[serde(default)]
    pub assigned_network_address: Vec<String>,
    #[serde(default)]
    pub array_id: Option<u64>,
    /// The task's line in the array's tasks file, from 1.
    #[serde(default)]
    pub array_index: Option<u64>,
    #[serde(default)]
    pub events: Vec<OarEvent>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct OarEvent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub description: String,
}

/// `oarstat -J` output: an object keyed by job id (an empty answer, which
/// oarstat gives when it lists no job, is no job).
pub fn parse_oarstat(out: &str) -> Result<Vec<OarJob>, String> {
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let map: HashMap<String, OarJob> =
        serde_json::from_str(out).map_err(|e| format!("oarstat's JSON is not understood: {e}"))?;
    let mut jobs: Vec<OarJob> = map.into_values().collect();
    jobs.sort_by_key(|j| j.id);
    Ok(jobs)
}

fn local_time(epoch: i64) -> Option<String> {
    let t = libc::time_t::try_from(epoch).ok()?;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r only writes the tm we own.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return None;
    }
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    ))
}

/// What an OAR job state means for us.
pub fn state_of(j: &OarJob) -> JobState {
    match j.state.as_str() {
        "Waiting" | "Hold" | "toLaunch" | "toAckReservation" | "Launching" => JobState::Pending {
            reason: match j.message.as_deref().map(str::trim) {
                Some(m) if !m.is_empty() => format!("{} ({m})", j.state),
                _ => j.state.clone(),
            },
            start: j.scheduled_start.filter(|s| *s > 0).and_then(local_time),
            partition: j.queue.clone(),
        },
        "Running" | "Finishing" | "Suspended" | "Resuming" | "toError" => JobState::Running {
            node: j
                .assigned_network_address
                .first()
                .cloned()
                .unwrap_or_default(),
        },
        _ => JobState::Ended(end_of(j)),
    }
}

/// How a Terminated or Error job ended, from its exit code and events.
pub fn end_of(j: &OarJob) -> JobEnd {
    let event = |k: &str| j.events.iter().any(|e| e.kind == k);
    if event("FRAG_JOB_REQUEST") || event("USER_DELETION") {
        return JobEnd {
            description: "was cancelled (oardel)".into(),
            success: false,
        };
    }
    if event("WALLTIME") {
        return JobEnd {
            description: "reached its walltime (OAR event WALLTIME)".into(),
            success: false,
        };
    }
    match (j.state.as_str(), j.exit_code) {
        (_, Some(status)) if status & 0x7f != 0 => {
            let sig = (status & 0x7f) as i32;
            JobEnd {
                description: format!("was killed by signal {sig}"),
                success: false,
            }
        }
        (_, Some(status)) => {
            let code = status >> 8;
            JobEnd {
                description: if code == 0 {
                    "completed".into()
                } else {
                    format!("failed (exit code {code})")
                },
                success: code == 0,
            }
        }
        ("Terminated", None) => JobEnd {
            description: "completed".into(),
            success: true,
        },
        (state, None) => JobEnd {
            description: match j.events.last() {
                Some(e) => format!("ended in OAR state {state} ({}: {})", e.kind, e.description),
                None => format!("ended in OAR state {state}"),
            },
            success: false,
        },
    }
}

/// The watcher's poll interval: `NOYAU_OAR_POLL` seconds, default 2.
pub fn default_interval() -> Duration {
    crate::watcher::interval_from_env("NOYAU_OAR_POLL")
}

/// Follows every tracked OAR job with one `oarstat` call per interval.
pub type Watcher = crate::watcher::Watcher<Commands>;

impl Watcher {
    /// The process's watcher.
    pub fn global() -> Self {
        static W: OnceLock<Watcher> = OnceLock::new();
        W.get_or_init(|| Watcher::new(Commands::default(), default_interval()))
            .clone()
    }
}

impl crate::watcher::Listing for Commands {
    /// `oarstat -J -f -j ID…` for the tracked jobs.
    async fn list(&self, ids: &[String]) -> Result<HashMap<String, JobState>, String> {
        let mut args: Vec<&str> = vec!["-J", "-f"];
        for id in ids {
            args.extend(["-j", id.as_str()]);
        }
        let out = run(&self.oarstat, &args, self.timeout, None, no_env()).await?;
        Ok(parse_oarstat(&out)?
            .iter()
            .map(|j| (j.id.to_string(), state_of(j)))
            .collect())
    }

    /// Asked for but not listed: OAR's database no longer has them.
    async fn gone(&self, ids: &[String]) -> HashMap<String, JobEnd> {
        ids.iter()
            .map(|id| {
                let end = JobEnd {
                    description: "is no longer known to OAR".into(),
                    success: false,
                };
                (id.clone(), end)
            })
            .collect()
    }
}

/// Submits agents as OAR batch jobs.
#[derive(Debug, Clone)]
pub struct OarBackend {
    pub watcher: Watcher,
}

/// A job array [`OarBackend::submit_array`] submitted.
#[derive(Debug)]
pub struct OarArray {
    /// OAR's array id (`oarstat --array`, `oardel --array`).
    pub id: String,
    pub tasks: ArrayTasks,
    /// Held tasks `oarresume` was asked to release.
    released: std::collections::HashSet<u64>,
    /// The environment file, script and tasks file the tasks read.
    files: Vec<PathBuf>,
}

impl OarArray {
    /// Once no task will start any more.
    pub fn remove_files(&self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[derive(Debug)]
pub(crate) struct OarHandle {
    id: String,
    /// The job's environment file and script: the job deletes them when it
    /// starts; a job cancelled before it does leaves them to its canceller.
    files: Vec<PathBuf>,
}

/// Where job scripts and environment files go: `STATE/oar`, 0700.
fn job_dir() -> PathBuf {
    state_dir().join("oar")
}

fn private_dir(dir: &Path) -> Result<(), SchedError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| SchedError::Submit(format!("cannot make {}: {e}", dir.display())))
}

fn write_private(path: &Path, text: &str, mode: u32) -> Result<(), SchedError> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| SchedError::Submit(format!("cannot write {}: {e}", path.display())))
}

impl OarBackend {
    pub fn global() -> Self {
        OarBackend {
            watcher: Watcher::global(),
        }
    }

    pub fn with_watcher(watcher: Watcher) -> Self {
        OarBackend { watcher }
    }

    fn cmds(&self) -> &Commands {
        self.watcher.commands()
    }

    /// Checks the profile for OAR: no Slurm-only key, one-line values.
    pub fn validate(&self, profile: &Profile) -> Result<(), SchedError> {
        profile.check_for("oar").map_err(SchedError::Invalid)?;
        if let Some(p) = &profile.properties {
            if p.trim().is_empty() || p.contains('\n') {
                return Err(SchedError::Invalid(format!(
                    "properties: {p:?} must be one SQL expression on one line (e.g. \"cluster='dahu'\")"
                )));
            }
        }
        if profile.oarsub.iter().any(|a| a.contains('\n')) {
            return Err(SchedError::Invalid(
                "oarsub: one argument per item, without newlines".into(),
            ));
        }
        Ok(())
    }

    /// What `submit` would run, for `--dry-run`.
    pub fn dry_run(&self, spec: &JobSpec) -> Result<String, SchedError> {
        self.validate(&spec.profile)?;
        let dir = job_dir();
        let script = dir.join(format!("{}.sh", spec.name));
        let array = self.array_tasks(spec)?;
        let args: Vec<String> = oarsub_args(spec, &log_dir(), &script, array.as_ref())
            .iter()
            .map(|a| sh_quote(a))
            .collect();
        Ok(format!(
            "# oarsub {}\n{}",
            args.join(" "),
            job_script(spec, &dir.join(format!("{}.env", spec.name)))
        ))
    }

    pub(crate) async fn submit(&self, spec: JobSpec) -> Result<Job, SchedError> {
        let (mut ids, files) = self.oarsub(&spec, None).await?;
        let id = ids.remove(0);
        let queue = spec
            .profile
            .queue
            .clone()
            .or_else(|| spec.profile.partition.clone());
        let state = self.watcher.track(&id, queue);
        Ok(Job {
            id: id.clone(),
            backend: "oar",
            state,
            handle: JobHandle::Oar(OarHandle { id, files }),
        })
    }

    /// Follows a job submitted by another process.
    pub(crate) fn adopt(&self, id: &str) -> Job {
        let state = self.watcher.track(id, None);
        Job {
            id: id.to_string(),
            backend: "oar",
            state,
            handle: JobHandle::Oar(OarHandle {
                id: id.to_string(),
                files: Vec::new(),
            }),
        }
    }

    /// Submits a job nobody in this process follows; returns its id.
    pub async fn submit_detached(&self, spec: &JobSpec) -> Result<String, SchedError> {
        // (the script deletes its files itself)
        Ok(self.oarsub(spec, None).await?.0.remove(0))
    }

    fn array_tasks(&self, spec: &JobSpec) -> Result<Option<ArrayTasks>, SchedError> {
        spec.array
            .as_deref()
            .map(ArrayTasks::parse)
            .transpose()
            .map_err(SchedError::Invalid)
    }

    /// Submits `spec.array`'s tasks as one OAR job array (one sub-job per
    /// task, each with `NOYAU_ARRAY_TASK_ID` set); held when fewer than all
    /// may run at once, see [`OarBackend::poll_array`].
    pub async fn submit_array(&self, spec: &JobSpec) -> Result<OarArray, SchedError> {
        let Some(tasks) = self.array_tasks(spec)? else {
            return Err(SchedError::Invalid("no job array given".into()));
        };
        let (ids, files) = self.oarsub(spec, Some(&tasks)).await?;
        Ok(OarArray {
            // OAR's array id is its first sub-job's id
            id: ids[0].clone(),
            tasks,
            released: Default::default(),
            files,
        })
    }

    /// Writes the 0600 environment file and the script, runs oarsub; the
    /// ids OAR gave (one per array task) and the files written.
    async fn oarsub(
        &self,
        spec: &JobSpec,
        array: Option<&ArrayTasks>,
    ) -> Result<(Vec<String>, Vec<PathBuf>), SchedError> {
        self.validate(&spec.profile)?;
        let logs = log_dir();
        let dir = job_dir();
        private_dir(&logs)?;
        private_dir(&dir)?;
        // a unique stem per submission: two proxies may submit the same name
        let stem = format!(
            "{}-{}-{:08x}",
            spec.name,
            std::process::id(),
            rand::rng().random::<u32>()
        );
        let env_file = dir.join(format!("{stem}.env"));
        let script = dir.join(format!("{stem}.sh"));
        let mut files = vec![env_file.clone(), script.clone()];
        let remove = |files: &[PathBuf]| {
            for f in files {
                let _ = std::fs::remove_file(f);
            }
        };
        // OAR passes no environment: noyau's own settings (NOYAU_*) follow
        // the job as Slurm's default export carries them; the spec's win.
        let mut env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("NOYAU_"))
            .collect();
        env.extend(spec.env.clone());
        write_private(&env_file, &env_text(&env), 0o600)?;
        write_private(&script, &job_script(spec, &env_file), 0o700)?;
        if let Some(t) = array {
            let lines: String = t.ids.iter().map(|i| format!("{i}\n")).collect();
            files.push(tasks_file(&script));
            write_private(&tasks_file(&script), &lines, 0o600)?;
        }
        let args = oarsub_args(spec, &logs, &script, array);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // oarsub takes its default directory from $PWD, not from getcwd:
        // give it the real one (a parent may have changed directory since).
        let cwd: BTreeMap<String, String> = std::env::current_dir()
            .map(|d| [("PWD".to_string(), d.display().to_string())].into())
            .unwrap_or_default();
        let out = run(&self.cmds().oarsub, &args, self.cmds().timeout, None, &cwd).await;
        let ids = match out {
            Ok(o) => parse_oarsub(&o),
            Err(e) => {
                remove(&files);
                return Err(SchedError::Submit(e));
            }
        };
        if ids.is_empty() {
            remove(&files);
            return Err(SchedError::Submit(
                "oarsub printed no OAR_JOB_ID line".into(),
            ));
        }
        tracing::info!(job = %ids[0], log = %logs.join(format!("{}-{}.log", spec.name, ids[0])).display(), "submitted to OAR");
        Ok((ids, files))
    }

    /// The jobs of an array, as oarstat lists them (one call).
    pub async fn array_jobs(&self, array_id: &str) -> Result<Vec<OarJob>, String> {
        let out = run(
            &self.cmds().oarstat,
            &["-J", "-f", "--array", array_id],
            self.cmds().timeout,
            None,
            no_env(),
        )
        .await?;
        parse_oarstat(&out)
    }

    /// One `oarstat` call for the array's tasks; while fewer than K of them
    /// are queued or running, resumes held ones (`oarresume`, in task
    /// order). The tasks as oarstat lists them.
    pub async fn poll_array(&self, a: &mut OarArray) -> Result<Vec<OarJob>, String> {
        let jobs = self.array_jobs(&a.id).await?;
        let held = |j: &OarJob| j.state == "Hold" && !a.released.contains(&j.id);
        let active = jobs
            .iter()
            .filter(|j| !held(j) && !matches!(state_of(j), JobState::Ended(_)))
            .count();
        let mut waiting: Vec<&OarJob> = jobs.iter().filter(|j| held(j)).collect();
        waiting.sort_by_key(|j| (j.array_index, j.id));
        let release: Vec<String> = waiting
            .iter()
            .take(a.tasks.max_parallel.saturating_sub(active))
            .map(|j| j.id.to_string())
            .collect();
        if !release.is_empty() {
            let args: Vec<&str> = release.iter().map(String::as_str).collect();
            run(
                &self.cmds().oarresume,
                &args,
                self.cmds().timeout,
                None,
                no_env(),
            )
            .await?;
            // oarresume only asks: the next oarstat may still say Hold
            a.released
                .extend(release.iter().filter_map(|id| id.parse::<u64>().ok()));
        }
        Ok(jobs)
    }

    /// Deletes every task of an array, held ones included.
    pub async fn oardel_array(&self, array_id: &str) -> Result<(), String> {
        run(
            &self.cmds().oardel,
            &["--array", array_id],
            self.cmds().timeout,
            None,
            no_env(),
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn cancel(&self, h: &OarHandle) {
        if let Err(e) = self.oardel(&h.id).await {
            tracing::warn!("{e}");
        }
        for f in &h.files {
            let _ = std::fs::remove_file(f);
        }
    }

    pub async fn oardel(&self, id: &str) -> Result<(), String> {
        run(
            &self.cmds().oardel,
            &[id],
            self.cmds().timeout,
            None,
            no_env(),
        )
        .await?;
        Ok(())
    }

    /// Asks OAR for `secs` more seconds of walltime for job `id`
    /// (`oarwalltime ID +H:MM:SS`); OAR's answer, or why it refused.
    pub async fn extend(&self, id: &str, secs: u64) -> Result<String, String> {
        let more = format!("+{}", walltime(secs));
        let out = run(
            &self.cmds().oarwalltime,
            &[id, &more],
            self.cmds().timeout,
            None,
            no_env(),
        )
        .await;
        match out {
            Ok(o) if o.contains("Accepted") || o.contains("accepted") => Ok(o.trim().to_string()),
            Ok(o) | Err(o) if o.contains("not enabled") || o.contains("disabled") => Err(format!(
                "this OAR site does not allow walltime changes (WALLTIME_CHANGE_ENABLED): {}",
                o.trim()
            )),
            Ok(o) | Err(o) => Err(format!("oarwalltime refused: {}", o.trim())),
        }
    }

    /// This user's noyau jobs still queued or running (names `noyau-…`).
    pub async fn list_mine(&self) -> Result<Vec<OarJob>, String> {
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| {
                // SAFETY: getpwuid returns a pointer into static storage or null.
                let pw = unsafe { libc::getpwuid(libc::getuid()) };
                (!pw.is_null()).then(|| {
                    unsafe { std::ffi::CStr::from_ptr((*pw).pw_name) }
                        .to_string_lossy()
                        .into_owned()
                })
            })
            .ok_or("cannot tell this user's name")?;
        let out = run(
            &self.cmds().oarstat,
            &["-J", "-f", "-u", &user],
            self.cmds().timeout,
            None,
            no_env(),
        )
        .await?;
        Ok(parse_oarstat(&out)?
            .into_iter()
            .filter(|j| j.name.as_deref().is_some_and(|n| n.starts_with("noyau-")))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        let mut env = BTreeMap::new();
        env.insert("NOYAU_LINK_TOKEN".into(), "s3cret-token".into());
        let mut profile = Profile {
            queue: Some("default".into()),
            project: Some("proj".into()),
            properties: Some("host='node1'".into()),
            time: Some("1:30:00".into()),
            cpus_per_task: Some(4),
            oarsub: vec!["-t".into(), "besteffort".into()],
            prologue: Some("module load python".into()),
            ..Default::default()
        };
        profile.env.insert("OMP_NUM_THREADS".into(), "4".into());
        JobSpec {
            name: "noyau-kernel-python3".into(),
            program: "/opt/noyau bin/noyau".into(),
            args: vec!["agent".into()],
            env,
            cwd: Some("/home/u/nb".into()),
            profile,
            array: None,
        }
    }

    #[test]
    fn arguments_and_script_hold_the_profile_and_no_secret() {
        let s = spec();
        let a = oarsub_args(&s, Path::new("/l"), Path::new("/j/x.sh"), None);
        let joined = a.join(" ");
        for want in [
            "-n noyau-kernel-python3",
            "-O /l/noyau-kernel-python3-%jobid%.log",
            "-l nodes=1/core=4,walltime=1:30:00",
            "-q default",
            "--project proj",
            "-p host='node1'",
            "-d /home/u/nb",
            "--checkpoint 540 --signal 10",
            "-t besteffort exec /j/x.sh",
        ] {
            assert!(joined.contains(want), "missing {want:?} in {joined}");
        }
        let script = job_script(&s, Path::new("/j/x.env"));
        assert!(
            script.contains(". /j/x.env && rm -f /j/x.env \"$0\"\n"),
            "{script}"
        );
        assert!(script.contains("export OMP_NUM_THREADS=4\n"), "{script}");
        assert!(
            script.ends_with("exec '/opt/noyau bin/noyau' agent\n"),
            "{script}"
        );
        assert!(!script.contains("s3cret") && !joined.contains("s3cret"));
        assert!(env_text(&s.env).contains("export NOYAU_LINK_TOKEN=s3cret-token\n"));
    }

    #[test]
    fn slurm_names_translate() {
        let p = Profile {
            partition: Some("batch".into()),
            account: Some("acc".into()),
            nodes: Some(2),
            ntasks: Some(3),
            cpus_per_task: Some(2),
            time: Some("2-00:00:00".into()),
            ..Default::default()
        };
        assert_eq!(
            resources(&p).as_deref(),
            Some("nodes=2/core=6,walltime=48:00:00")
        );
        let s = JobSpec {
            profile: p,
            ..spec()
        };
        let a = oarsub_args(&s, Path::new("/l"), Path::new("/j/x.sh"), None).join(" ");
        assert!(a.contains("-q batch") && a.contains("--project acc"), "{a}");
        assert_eq!(resources(&Profile::default()), None);
    }

    #[test]
    fn oarsub_output() {
        let out =
            "[ADMISSION RULE] Modify resource description with type constraints\nOAR_JOB_ID=42\n";
        assert_eq!(parse_oarsub(out), vec!["42"]);
        let arr = "OAR_JOB_ID=7\nOAR_JOB_ID=8\nOAR_ARRAY_ID=7\n";
        assert_eq!(parse_oarsub(arr), vec!["7", "8"]);
        assert!(parse_oarsub("[ERROR] bad resources\n").is_empty());
    }

    #[test]
    fn oarstat_json_and_states() {
        // shapes as OAR 2.5.9's `oarstat -J -f` prints them
        let out = r#"{
           "5" : {"Job_Id": 5, "state": "Waiting", "message": "R=1,W=0:5:0,J=B",
                  "queue": "batch", "scheduledStart": null, "name": "noyau-kernel-x",
                  "assigned_network_address": [], "events": [], "exit_code": null},
           "6" : {"Job_Id": 6, "state": "Running", "queue": "default",
                  "assigned_network_address": ["node3"], "events": []},
           "7" : {"Job_Id": 7, "state": "Terminated", "exit_code": 768, "events": [
                  {"type": "SWITCH_INTO_TERMINATE_STATE", "description": "[bipbip 7] Ask to change the job state"}]},
           "8" : {"Job_Id": 8, "state": "Error", "exit_code": null, "events": [
                  {"type": "FRAG_JOB_REQUEST", "description": "User root requested to frag the job 8"}]},
           "9" : {"Job_Id": 9, "state": "Terminated", "exit_code": 0, "unknown_key": 1},
           "10": {"Job_Id": 10, "state": "Error", "exit_code": 9, "events": []},
           "11": {"Job_Id": 11, "state": "Error", "events": [
                  {"type": "WALLTIME", "description": "[sarko] Job [11] from 1 with 0:1:0"}]}
        }"#;
        let j = parse_oarstat(out).unwrap();
        assert_eq!(
            j.iter().map(|j| j.id).collect::<Vec<_>>(),
            [5, 6, 7, 8, 9, 10, 11]
        );
        assert_eq!(
            state_of(&j[0]),
            JobState::Pending {
                reason: "Waiting (R=1,W=0:5:0,J=B)".into(),
                start: None,
                partition: Some("batch".into())
            }
        );
        assert_eq!(
            state_of(&j[1]),
            JobState::Running {
                node: "node3".into()
            }
        );
        let end = |i: usize| match state_of(&j[i]) {
            JobState::Ended(e) => (e.description, e.success),
            other => panic!("{other:?}"),
        };
        assert_eq!(end(2), ("failed (exit code 3)".into(), false));
        assert_eq!(end(3), ("was cancelled (oardel)".into(), false));
        assert_eq!(end(4), ("completed".into(), true));
        assert_eq!(end(5), ("was killed by signal 9".into(), false));
        assert!(end(6).0.contains("walltime"));
        assert_eq!(parse_oarstat("").unwrap(), vec![]);
        assert!(parse_oarstat("<html>").unwrap_err().contains("JSON"));
    }

    #[test]
    fn arrays_as_a_tasks_file_held_when_throttled() {
        let t = ArrayTasks::parse("0-3,7%2").unwrap();
        assert_eq!(t.ids, [0, 1, 2, 3, 7]);
        assert_eq!(t.max_parallel, 2);
        assert!(t.held());
        let all = ArrayTasks::parse("2,5").unwrap();
        assert_eq!((all.max_parallel, all.held()), (2, false));
        for bad in ["", "a-3", "3-1", "1,%2", "1%x"] {
            assert!(ArrayTasks::parse(bad).is_err(), "{bad:?}");
        }
        let s = JobSpec {
            array: Some("0-3,7%2".into()),
            ..spec()
        };
        let a = oarsub_args(&s, Path::new("/l"), Path::new("/j/x.sh"), Some(&t)).join(" ");
        assert!(a.contains("--array-param-file /j/x.tasks --hold"), "{a}");
        let script = job_script(&s, Path::new("/j/x.env"));
        assert!(
            script.contains(". /j/x.env\nexport NOYAU_ARRAY_TASK_ID=\"$1\"\n"),
            "{script}"
        );
        let a = oarsub_args(&s, Path::new("/l"), Path::new("/j/x.sh"), Some(&all)).join(" ");
        assert!(a.contains("--array-param-file /j/x.tasks") && !a.contains("--hold"));
    }

    #[test]
    fn walltimes() {
        assert_eq!(walltime(59), "0:00:59");
        assert_eq!(walltime(3600 * 50 + 61), "50:01:01");
    }
}
