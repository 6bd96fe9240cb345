//! The Slurm backend: the agent runs as a batch job.
//!
//! * **Submission.** [`job_script`] writes the script (`#SBATCH` lines from
//!   the profile, a job name that says what runs, the profile's environment
//!   and prologue, then `exec noyau agent`); `sbatch --parsable` reads it on
//!   stdin. The link's address, pin and token are set only in the
//!   environment of the `sbatch` child, which Slurm exports to the job by
//!   default: never in argv, in the script or in the job name, which other
//!   users can read.
//! * **One watcher.** Every job a process tracks is followed by one
//!   [`Watcher`]: one `squeue --me --states=all` call per interval (2 s by
//!   default, ±20 % jitter, `NOYAU_SLURM_POLL`) whatever the number of jobs.
//!   A job that has left the listing is looked up with `sacct`; on a
//!   cluster without accounting its end is reported as such, and the caller
//!   learns how it ended from the agent's last word on the link. A failing
//!   or timed-out `squeue` makes every job [`JobState::Unknown`], never
//!   ended: a controller restart must not kill a kernel.
//! * **Cancel** is `scancel`: Slurm sends SIGTERM to the agent, which stops
//!   its kernel.
//!
//! * **Walltime.** The script asks for `--signal=B:USR1@N` (the profile's
//!   `walltime_signal`, else a tenth of `time`, 30 s to 10 min); the agent,
//!   which `exec` makes the batch shell, turns it into a walltime event.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use noyau_config::Profile;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::{Job, JobEnd, JobHandle, JobSpec, JobState, SchedError};

/// The Slurm client commands, by path or name (looked up on PATH).
#[derive(Debug, Clone)]
pub struct Commands {
    pub sbatch: PathBuf,
    pub squeue: PathBuf,
    pub scancel: PathBuf,
    pub sacct: PathBuf,
    pub sinfo: PathBuf,
    /// How long one command may take before it counts as failed.
    pub timeout: Duration,
}

impl Default for Commands {
    fn default() -> Self {
        Commands {
            sbatch: "sbatch".into(),
            squeue: "squeue".into(),
            scancel: "scancel".into(),
            sacct: "sacct".into(),
            sinfo: "sinfo".into(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Runs a scheduler command; its stdout, or an error naming the command.
pub(crate) async fn run(
    program: &Path,
    args: &[&str],
    timeout: Duration,
    stdin: Option<&str>,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<String, String> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    output_of(cmd, &shown, timeout, stdin).await
}

/// Runs a prepared command (stdio piped, killed on drop), feeding it `stdin`:
/// its stdout, or an error naming it as `shown`. Shared by the schedulers
/// and the hub.
pub async fn output_of(
    mut cmd: Command,
    shown: &str,
    timeout: Duration,
    stdin: Option<&str>,
) -> Result<String, String> {
    let fut = async {
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
        if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
            w.write_all(text.as_bytes())
                .await
                .map_err(|e| format!("`{shown}`: writing its input: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| format!("`{shown}`: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`{shown}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("`{shown}` did not answer within {timeout:?}")),
    }
}

fn no_env() -> &'static std::collections::BTreeMap<String, String> {
    static E: OnceLock<std::collections::BTreeMap<String, String>> = OnceLock::new();
    E.get_or_init(Default::default)
}

/// Quotes a word for sh.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Where job logs go: `$XDG_STATE_HOME/noyau/jobs` (default
/// `~/.local/state/noyau/jobs`), which a cluster's compute nodes see when
/// home directories are shared.
pub fn log_dir() -> PathBuf {
    state_dir().join("jobs")
}

/// noyau's state directory: `$XDG_STATE_HOME/noyau` (default
/// `~/.local/state/noyau`): job logs, detached runs' progress, Dask clusters.
pub fn state_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("noyau")
}

/// Seconds before the walltime at which the job gets SIGUSR1.
pub(crate) fn warning_secs(profile: &Profile) -> u64 {
    if let Some(s) = profile.walltime_signal {
        return s.into();
    }
    match profile.time_secs() {
        Some(t) if t > 0 => (t / 10).clamp(30, 600),
        _ => 600,
    }
}

/// The batch script for `spec` (holds no secret: secrets are in `spec.env`,
/// which goes to sbatch's environment, not here).
pub fn job_script(spec: &JobSpec, log_dir: &Path) -> String {
    let p = &spec.profile;
    // A kernel's state lives in memory and its link token works once: a job
    // requeued after a node failure or a preemption could not resume, only
    // hold an allocation. It ends instead, and the user is told why.
    let mut s = String::from("#!/bin/sh\n#SBATCH --no-requeue\n");
    let mut opt = |k: &str, v: &str| s.push_str(&format!("#SBATCH --{k}={v}\n"));
    opt("job-name", &spec.name);
    let log = if spec.array.is_some() {
        "%x-%A_%a.log"
    } else {
        "%x-%j.log"
    };
    opt("output", &log_dir.join(log).display().to_string());
    if let Some(a) = &spec.array {
        opt("array", a);
    }
    opt("signal", &format!("B:USR1@{}", warning_secs(p)));
    if let Some(cwd) = &spec.cwd {
        opt("chdir", &cwd.display().to_string());
    }
    // OAR's names, where the Slurm ones are unset: one profile for both
    let strs = [
        ("partition", p.partition.as_ref().or(p.queue.as_ref())),
        ("time", p.time.as_ref()),
        ("mem", p.mem.as_ref()),
        ("gpus", p.gpus.as_ref()),
        ("gres", p.gres.as_ref()),
        ("account", p.account.as_ref().or(p.project.as_ref())),
        ("qos", p.qos.as_ref()),
        ("reservation", p.reservation.as_ref()),
        ("constraint", p.constraint.as_ref()),
    ];
    for (k, v) in strs {
        if let Some(v) = v {
            opt(k, v);
        }
    }
    for (k, v) in [
        ("nodes", p.nodes),
        ("ntasks", p.ntasks),
        ("cpus-per-task", p.cpus_per_task),
    ] {
        if let Some(v) = v {
            opt(k, &v.to_string());
        }
    }
    for line in &p.sbatch {
        s.push_str(&format!("#SBATCH {}\n", line.trim()));
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
    s.push_str("\n# the link's address, pin and token are in the job's environment\nexec ");
    s.push_str(&sh_quote(&spec.program.display().to_string()));
    for a in &spec.args {
        s.push(' ');
        s.push_str(&sh_quote(a));
    }
    s.push('\n');
    s
}

/// One line of the watcher's squeue listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLine {
    pub id: String,
    pub state: String,
    pub reason: String,
    pub node: String,
    pub start: String,
    pub partition: String,
    pub time_left: String,
    pub name: String,
}

/// The squeue format the watcher and `noyau ps` read (name last: it may hold `|`).
pub const SQUEUE_FORMAT: &str = "%i|%T|%r|%N|%S|%P|%L|%j";

pub fn parse_squeue(out: &str) -> Vec<QueueLine> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().splitn(8, '|').collect();
            if f.len() < 8 || f[0].is_empty() {
                return None;
            }
            Some(QueueLine {
                id: f[0].into(),
                state: f[1].into(),
                reason: f[2].into(),
                node: f[3].into(),
                start: f[4].into(),
                partition: f[5].into(),
                time_left: f[6].into(),
                name: f[7].into(),
            })
        })
        .collect()
}

/// Parses Slurm's time left (`%L`): `SS`, `MM:SS`, `H:MM:SS`, `D-HH:MM:SS`,
/// `D-HH`, `D-HH:MM`. None for `UNLIMITED`, `NOT_SET`, `INVALID` and garbage
/// (numbers too big for seconds included).
pub fn parse_time_left(s: &str) -> Option<u64> {
    let s = s.trim();
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    let hms = |h: u64, m: u64, ss: u64| {
        h.checked_mul(3600)?
            .checked_add(m.checked_mul(60)?)?
            .checked_add(ss)
    };
    let secs = match (s.contains('-'), parts.as_slice()) {
        (false, [ss]) => *ss,
        (false, [m, ss]) => hms(0, *m, *ss)?,
        (_, [h, m, ss]) => hms(*h, *m, *ss)?,
        (true, [h]) => hms(*h, 0, 0)?,
        (true, [h, m]) => hms(*h, *m, 0)?,
        _ => return None,
    };
    days.checked_mul(86400)?.checked_add(secs)
}

fn known(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty() && !matches!(v, "N/A" | "(null)" | "None" | "Unknown")).then(|| v.to_string())
}

/// What a Slurm job state means for us.
pub fn state_of(l: &QueueLine) -> JobState {
    match l.state.as_str() {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD"
        | "CONFIGURING" => JobState::Pending {
            reason: known(&l.reason).unwrap_or_else(|| l.state.to_lowercase()),
            start: known(&l.start),
            partition: known(&l.partition),
        },
        "RUNNING" | "COMPLETING" | "SUSPENDED" | "SIGNALING" | "STAGE_OUT" | "RESIZING"
        | "STOPPED" => JobState::Running {
            node: known(&l.node).unwrap_or_default(),
        },
        other => JobState::Ended(end_of(other, None)),
    }
}

fn end_of(state: &str, exit: Option<&str>) -> JobEnd {
    let what = match state {
        "COMPLETED" => "completed".to_string(),
        "CANCELLED" => "was cancelled".into(),
        "TIMEOUT" => "reached its walltime (Slurm state TIMEOUT)".into(),
        "OUT_OF_MEMORY" => "ran out of memory (Slurm state OUT_OF_MEMORY)".into(),
        "NODE_FAIL" => "lost its node (Slurm state NODE_FAIL)".into(),
        "PREEMPTED" => "was preempted".into(),
        "FAILED" => "failed".into(),
        other => format!("ended in Slurm state {other}"),
    };
    let exit = exit
        .filter(|e| !e.is_empty() && *e != "0:0")
        .map(|e| format!(" (exit code {e})"))
        .unwrap_or_default();
    JobEnd {
        description: format!("{what}{exit}"),
        success: state == "COMPLETED",
    }
}

/// Follows every Slurm job of this process with one squeue call per interval.
pub type Watcher = crate::watcher::Watcher<Commands>;

/// The watcher's poll interval: `NOYAU_SLURM_POLL` seconds, default 2.
pub fn default_interval() -> Duration {
    crate::watcher::interval_from_env("NOYAU_SLURM_POLL")
}

impl Watcher {
    /// The process's watcher.
    pub fn global() -> Self {
        static W: OnceLock<Watcher> = OnceLock::new();
        W.get_or_init(|| Watcher::new(Commands::default(), default_interval()))
            .clone()
    }
}

impl crate::watcher::Listing for Commands {
    /// All of this user's jobs (`squeue --me --states=all`): one call
    /// whatever the number of jobs.
    async fn list(&self, _ids: &[String]) -> Result<HashMap<String, JobState>, String> {
        let out = run(
            &self.squeue,
            &["--me", "--states=all", "-h", "-o", SQUEUE_FORMAT],
            self.timeout,
            None,
            no_env(),
        )
        .await?;
        Ok(parse_squeue(&out)
            .iter()
            .map(|l| (l.id.clone(), state_of(l)))
            .collect())
    }

    /// Asks sacct how jobs that left the queue ended.
    async fn gone(&self, ids: &[String]) -> HashMap<String, JobEnd> {
        let list = ids.join(",");
        let out = run(
            &self.sacct,
            &["-n", "-P", "-X", "-j", &list, "-o", "JobID,State,ExitCode"],
            self.timeout,
            None,
            no_env(),
        )
        .await;
        let mut ends = out.map(|o| parse_sacct(&o)).unwrap_or_else(|why| {
            tracing::debug!("sacct cannot say how jobs ended: {why}");
            HashMap::new()
        });
        for id in ids {
            ends.entry(id.clone()).or_insert_with(|| JobEnd {
                description:
                    "left the Slurm queue (this cluster keeps no accounting to say how it ended)"
                        .into(),
                success: false,
            });
        }
        ends
    }
}

/// How jobs ended, from `sacct -n -P -X -o JobID,State,ExitCode` (lines it
/// cannot read are skipped: they tell nothing about a job).
pub fn parse_sacct(out: &str) -> HashMap<String, JobEnd> {
    let mut ends = HashMap::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split('|').collect();
        if f.len() >= 3 {
            // "CANCELLED by 0" → CANCELLED
            let state = f[1].split_whitespace().next().unwrap_or("");
            ends.insert(f[0].to_string(), end_of(state, Some(f[2])));
        }
    }
    ends
}

/// The job id in `sbatch --parsable`'s output (`ID` or `ID;CLUSTER`).
pub fn parse_sbatch(out: &str) -> Result<String, SchedError> {
    out.trim()
        .split(';')
        .next()
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_'))
        .map(str::to_string)
        .ok_or_else(|| SchedError::Submit(format!("sbatch printed no job id: {out:?}")))
}

/// Submits agents as Slurm batch jobs.
#[derive(Debug, Clone)]
pub struct SlurmBackend {
    pub watcher: Watcher,
}

#[derive(Debug)]
pub(crate) struct SlurmHandle {
    id: String,
}

impl SlurmBackend {
    pub fn global() -> Self {
        SlurmBackend {
            watcher: Watcher::global(),
        }
    }

    pub fn with_watcher(watcher: Watcher) -> Self {
        SlurmBackend { watcher }
    }

    fn cmds(&self) -> &Commands {
        self.watcher.commands()
    }

    /// The partitions Slurm knows (`sinfo`).
    pub async fn partitions(&self) -> Result<Vec<String>, String> {
        let out = run(
            &self.cmds().sinfo,
            &["-h", "-o", "%R"],
            self.cmds().timeout,
            None,
            no_env(),
        )
        .await?;
        Ok(out
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Checks what only Slurm knows: that the profile's partition exists.
    pub async fn validate(&self, profile: &Profile) -> Result<(), SchedError> {
        profile.check_for("slurm").map_err(SchedError::Invalid)?;
        let Some(part) = profile.partition.as_ref().or(profile.queue.as_ref()) else {
            return Ok(());
        };
        match self.partitions().await {
            Ok(known) if !known.contains(part) => Err(SchedError::Invalid(format!(
                "Slurm has no partition {part:?}{}; partitions: {}",
                noyau_config::suggest(part, known.iter().map(String::as_str)),
                known.join(", ")
            ))),
            Ok(_) => Ok(()),
            Err(why) => {
                tracing::warn!("cannot check the partition: {why}");
                Ok(())
            }
        }
    }

    pub(crate) async fn submit(&self, spec: JobSpec) -> Result<Job, SchedError> {
        let id = self.sbatch(&spec).await?;
        let state = self.watcher.track(&id, spec.profile.partition.clone());
        Ok(Job {
            id: id.clone(),
            backend: "slurm",
            state,
            handle: JobHandle::Slurm(SlurmHandle { id }),
        })
    }

    /// Follows a job submitted by another process (a proxy taking over
    /// from the one that submitted it).
    pub(crate) fn adopt(&self, id: &str) -> Job {
        let state = self.watcher.track(id, None);
        Job {
            id: id.to_string(),
            backend: "slurm",
            state,
            handle: JobHandle::Slurm(SlurmHandle { id: id.to_string() }),
        }
    }

    /// Submits a job array (`spec.array` set) and returns its job id. The
    /// watcher does not follow it: its tasks are asked with [`Self::array_tasks`].
    pub async fn submit_array(&self, spec: &JobSpec) -> Result<String, SchedError> {
        if spec.array.is_none() {
            return Err(SchedError::Invalid("a job array needs its task ids".into()));
        }
        self.sbatch(spec).await
    }

    /// The tasks of a job array still known to Slurm (one squeue call, one
    /// line per task); None once Slurm no longer knows the job.
    pub async fn array_tasks(&self, id: &str) -> Result<Option<Vec<QueueLine>>, String> {
        let out = run(
            &self.cmds().squeue,
            &["-h", "-r", "--states=all", "-j", id, "-o", SQUEUE_FORMAT],
            self.cmds().timeout,
            None,
            no_env(),
        )
        .await;
        match out {
            Ok(o) => {
                let lines = parse_squeue(&o);
                Ok((!lines.is_empty()).then_some(lines))
            }
            Err(e) if e.contains("Invalid job id") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Submits a job nobody in this process follows (a detached run);
    /// returns its id.
    pub async fn submit_detached(&self, spec: &JobSpec) -> Result<String, SchedError> {
        self.sbatch(spec).await
    }

    async fn sbatch(&self, spec: &JobSpec) -> Result<String, SchedError> {
        spec.profile
            .check_for("slurm")
            .map_err(SchedError::Invalid)?;
        let dir = log_dir();
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| {
                SchedError::Submit(format!(
                    "cannot make the log directory {}: {e}",
                    dir.display()
                ))
            })?;
        let script = job_script(spec, &dir);
        // The secrets go in sbatch's own environment, which Slurm exports to the job.
        let out = match run(
            &self.cmds().sbatch,
            &["--parsable"],
            self.cmds().timeout,
            Some(&script),
            &spec.env,
        )
        .await
        {
            Ok(out) => out,
            // Only now ask sinfo (a submission pays no extra call): sbatch's
            // words for a wrong partition name none of the right ones.
            Err(why) => {
                self.validate(&spec.profile).await?;
                return Err(SchedError::Submit(why));
            }
        };
        let id = parse_sbatch(&out)?;
        tracing::info!(job = %id, log = %dir.join(format!("{}-{id}.log", spec.name)).display(), "submitted to Slurm");
        Ok(id)
    }

    pub(crate) async fn cancel(&self, h: &SlurmHandle) {
        if let Err(e) = self.scancel(&h.id).await {
            tracing::warn!("{e}");
        }
    }

    pub async fn scancel(&self, id: &str) -> Result<(), String> {
        run(
            &self.cmds().scancel,
            &[id],
            self.cmds().timeout,
            None,
            no_env(),
        )
        .await?;
        Ok(())
    }

    /// This user's noyau jobs (names starting `noyau-`), as squeue lists them.
    pub async fn list_mine(&self) -> Result<Vec<QueueLine>, String> {
        let out = run(
            &self.cmds().squeue,
            &["--me", "-h", "-o", SQUEUE_FORMAT],
            self.cmds().timeout,
            None,
            no_env(),
        )
        .await?;
        Ok(parse_squeue(&out)
            .into_iter()
            .filter(|l| l.name.starts_with("noyau-"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec() -> JobSpec {
        let mut env = BTreeMap::new();
        env.insert("NOYAU_LINK_TOKEN".into(), "s3cret-token".into());
        let mut profile = Profile {
            partition: Some("debug".into()),
            time: Some("1:00:00".into()),
            cpus_per_task: Some(2),
            mem: Some("4G".into()),
            sbatch: vec!["--exclusive".into()],
            prologue: Some("module load python".into()),
            ..Default::default()
        };
        profile.env.insert("OMP_NUM_THREADS".into(), "2 x".into());
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
    fn script_has_the_profile_and_no_secret() {
        let s = job_script(&spec(), Path::new("/home/u/.local/state/noyau/jobs"));
        for want in [
            "#!/bin/sh\n",
            "#SBATCH --job-name=noyau-kernel-python3\n",
            "#SBATCH --output=/home/u/.local/state/noyau/jobs/%x-%j.log\n",
            "#SBATCH --signal=B:USR1@360\n",
            "#SBATCH --no-requeue\n",
            "#SBATCH --chdir=/home/u/nb\n",
            "#SBATCH --partition=debug\n",
            "#SBATCH --time=1:00:00\n",
            "#SBATCH --mem=4G\n",
            "#SBATCH --cpus-per-task=2\n",
            "#SBATCH --exclusive\n",
            "export OMP_NUM_THREADS='2 x'\n",
            "module load python\n",
            "exec '/opt/noyau bin/noyau' agent\n",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        assert!(!s.contains("s3cret"), "{s}");
        // every #SBATCH line comes before the first command
        let first_cmd = s.find("\nexport").unwrap();
        assert!(s.rfind("#SBATCH").unwrap() < first_cmd);
    }

    #[test]
    fn squeue_lines_and_states() {
        let out = "12|PENDING|Priority|||debug|1:00:00|noyau-kernel-python3\n\
                   13|PENDING|Resources||2026-01-01T10:00:00|batch|1:00:00|noyau-kernel-x|y\n\
                   14|RUNNING|None|node7|2026-01-01T09:00:00|debug|59:00|noyau-run-a\n\
                   15|CANCELLED|None|node7|N/A|debug|0:00|noyau-run-b\n\
                   garbage\n";
        let l = parse_squeue(out);
        assert_eq!(l.len(), 4);
        assert_eq!(l[1].name, "noyau-kernel-x|y");
        assert_eq!(
            state_of(&l[0]),
            JobState::Pending {
                reason: "Priority".into(),
                start: None,
                partition: Some("debug".into())
            }
        );
        assert!(
            matches!(state_of(&l[1]), JobState::Pending { start: Some(s), .. } if s.starts_with("2026"))
        );
        assert_eq!(
            state_of(&l[2]),
            JobState::Running {
                node: "node7".into()
            }
        );
        assert!(
            matches!(state_of(&l[3]), JobState::Ended(JobEnd { success: false, ref description }) if description == "was cancelled")
        );
        assert_eq!(
            end_of("FAILED", Some("1:0")).description,
            "failed (exit code 1:0)"
        );
    }

    #[test]
    fn time_left() {
        let p = parse_time_left;
        assert_eq!(p("45"), Some(45));
        assert_eq!(p("1:05"), Some(65));
        assert_eq!(p("2:00:01"), Some(7201));
        assert_eq!(p("1-02:03:04"), Some(93784));
        assert_eq!(p("1-02"), Some(93600));
        assert_eq!(p("1-02:03"), Some(93780));
        assert_eq!(p("UNLIMITED"), None);
        assert_eq!(p("NOT_SET"), None);
        assert_eq!(p(""), None);
        // Numbers too big for seconds: garbage, not an overflow panic.
        assert_eq!(p("213503982334602-00"), None);
        assert_eq!(p("999999999999999999:00"), None);
        assert_eq!(p("1-5124095576030432:00:00"), None);
    }

    #[test]
    fn sbatch_and_sacct_output() {
        assert_eq!(parse_sbatch("123\n").unwrap(), "123");
        assert_eq!(parse_sbatch("77_3;cluster\n").unwrap(), "77_3");
        for bad in [
            "",
            ";",
            "sbatch: error: Batch job submission failed",
            "12 34",
        ] {
            let e = parse_sbatch(bad).unwrap_err().to_string();
            assert!(e.contains("no job id"), "{bad:?}: {e}");
        }
        let ends =
            parse_sacct("12|CANCELLED by 0|0:15\n13|NODE_FAIL|1:0\nbroken\n14|COMPLETED|0:0\n");
        assert_eq!(ends.len(), 3);
        assert!(ends["12"].description.contains("cancelled") && !ends["12"].success);
        assert!(ends["13"].description.contains("NODE_FAIL"));
        assert!(ends["14"].success);
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("abc/d-1"), "abc/d-1");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$HOME"), "'$HOME'");
    }
}
