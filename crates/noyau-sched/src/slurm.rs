//! Slurm: the agent runs as a batch job.
//!
//! * **Submission.** The job script (`script.rs`) gets `#SBATCH` lines from
//!   the profile (a job name that says what runs, the log, the walltime
//!   signal); `sbatch --parsable` reads it on stdin. The link's address, pin
//!   and token are set only in the environment of the `sbatch` child, which
//!   Slurm exports to the job by default: never in argv, in the script or in
//!   the job name, which other users can read. Where the site's
//!   `SBATCH_EXPORT` or the profile's `sbatch` options say `--export=NONE`
//!   (or a list without ALL), they go in a 0600 file the script sources,
//!   as on OAR (`jobfiles.rs`). Jobs are `--no-requeue`. As another user
//!   (the hub), the whole submission runs as the user (`noyau hub-submit`):
//!   their log directory is made 0700 and checked as theirs.
//! * **Listing.** One `squeue [--me] --states=all -r` call lists every job
//!   (array tasks one per line, `ID_TASK`); ended jobs stay listed a while
//!   with their state (CANCELLED, TIMEOUT, NODE_FAIL…). A job that left it is
//!   looked up with `sacct`; on a cluster without accounting its end is
//!   reported as such, and the caller learns how it ended from the agent's
//!   last word on the link. The time left (`%L`) becomes the job's end time.
//!   squeue prints a job's name raw, line breaks included: every user's
//!   listing (the hub's) leaves the names out, and a line not in the
//!   format is skipped (the watcher distrusts a job listed twice).
//! * **Cancel** is `scancel`: Slurm sends SIGTERM to the agent, which stops
//!   its kernel. **Arrays** are `--array=IDS%K`: Slurm limits them itself.
//! * **Walltime.** The script asks for `--signal=B:USR1@N` (the profile's
//!   `walltime_signal`, else a tenth of `time`, 30 s to 10 min); the agent,
//!   which `exec` makes the batch shell, turns it into a walltime event.
//!   Only Slurm's operators may raise a job's time limit (`extend.rs`):
//!   noyau offers it to those the controller says are.

use noyau_vars::EnvVars;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::batch::{Batch, Commands, JobInfo, PartitionLoad, Scope, Submission};
use crate::jobfiles::{job_dir, sourcing, submit_as, JobFiles};
use crate::paths::private_dir;
use crate::profile::{Key, Kind, Profile};
use crate::run::AsUser;
use crate::script::job_script;
use crate::state::{parse_duration, parse_local_time};
use crate::{ArrayTasks, JobEnd, JobSpec, JobState, SchedError};

mod extend;

/// sbatch's variable for `--export`: a site may set it to NONE.
const SBATCH_EXPORT: &str = "SBATCH_EXPORT";

/// The squeue format of a listing of the user's own jobs (name last: it
/// may hold `|`).
const SQUEUE_FORMAT: &str = "%i|%T|%r|%N|%S|%P|%L|%j";

/// Every user's listing (the hub's): no job name. Any user names their
/// jobs, squeue prints a name raw, and slurmctld checks only its length: a
/// name with a line break would add a line of its writer's choosing, for
/// another user's job (`x\n12|CANCELLED|…` would end session 12). What
/// is left is the controller's (id, state, reason, times) or the admin's
/// (nodes, partitions).
const SQUEUE_FORMAT_ALL: &str = "%i|%T|%r|%N|%S|%P|%L";

/// One line per node and partition: `sinfo -N` (a partition's nodes are
/// summed here; without `-N`, sinfo merges nodes and their gres).
const SINFO_FORMAT: &str = "Partition:|,CPUsState:|,Gres:|,GresUsed:|,StateCompact:|";

/// The profile keys only Slurm knows (`#SBATCH --KEY=VALUE`; `sbatch`:
/// more `#SBATCH` lines).
const KEYS: &[Key] = &[
    Key::new("mem", Kind::Size),
    Key::new("gpus", Kind::Word),
    Key::new("gres", Kind::Word),
    Key::new("qos", Kind::Word),
    Key::new("reservation", Kind::Word),
    Key::new("constraint", Kind::Word),
    Key::new("sbatch", Kind::Options),
];

pub(crate) struct Slurm {
    cmds: Commands,
    /// Whether this process's user may raise a job's time limit, once the
    /// controller answered: a user's rights do not change within a
    /// kernel's life in practice (a site's sacctmgr change is seen by the
    /// next process); a failed probe is not kept, and asked again.
    raises: tokio::sync::OnceCell<bool>,
}

pub(crate) fn make(cmds: Commands) -> Arc<dyn Batch> {
    Arc::new(Slurm {
        cmds,
        raises: tokio::sync::OnceCell::new(),
    })
}

/// `--array`'s value: `0-5%2`, `1,4%3`.
fn array_arg(t: &ArrayTasks) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < t.ids.len() {
        let start = t.ids[i];
        while i + 1 < t.ids.len() && t.ids[i + 1] == t.ids[i] + 1 {
            i += 1;
        }
        parts.push(if t.ids[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", t.ids[i])
        });
        i += 1;
    }
    format!("{}%{}", parts.join(","), t.max_parallel)
}

/// The `#SBATCH` lines for `spec` (the exported array task id after them).
fn directives(spec: &JobSpec, log_dir: &Path) -> String {
    let p = &spec.profile;
    // A kernel's state lives in memory and its link token works once: a job
    // requeued after a node failure or a preemption could not resume, only
    // hold an allocation. It ends instead, and the user is told why.
    let mut s = String::from("#SBATCH --no-requeue\n");
    let mut opt = |k: &str, v: &str| s.push_str(&format!("#SBATCH --{k}={v}\n"));
    opt("job-name", &spec.name);
    let log = if spec.array.is_some() {
        "%x-%A_%a.log"
    } else {
        "%x-%j.log"
    };
    opt("output", &log_dir.join(log).display().to_string());
    if let Some(a) = &spec.array {
        opt("array", &array_arg(a));
    }
    opt("signal", &format!("B:USR1@{}", p.warning_secs()));
    if let Some(cwd) = &spec.cwd {
        opt("chdir", &cwd.display().to_string());
    }
    for (k, v) in [
        ("partition", p.partition.as_deref()),
        ("time", p.time.as_deref()),
        ("account", p.account.as_deref()),
    ] {
        if let Some(v) = v {
            opt(k, v);
        }
    }
    for k in KEYS.iter().filter(|k| k.kind != Kind::Options) {
        if let Some(v) = p.get(k.name) {
            opt(k.name, v);
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
    for line in p.items("sbatch") {
        s.push_str(&format!("#SBATCH {}\n", line.trim()));
    }
    if spec.array.is_some() {
        s.push_str(&format!(
            "export {}=\"$SLURM_ARRAY_TASK_ID\"\n",
            EnvVars::NOYAU_ARRAY_TASK_ID
        ));
    }
    s
}

/// One line of a squeue listing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QueueLine {
    id: String,
    state: String,
    reason: String,
    node: String,
    start: String,
    partition: String,
    time_left: String,
    name: String,
}

/// The lines of a squeue listing; with `named`, in [`SQUEUE_FORMAT`]
/// (else [`SQUEUE_FORMAT_ALL`]). A line not in the format is skipped: a
/// job name with a line break of the user's own makes one.
fn parse_squeue(out: &str, named: bool) -> Vec<QueueLine> {
    let fields = if named { 8 } else { 7 };
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().splitn(fields, '|').collect();
            let ok = f.len() == fields
                && job_id_shaped(f[0])
                && state_shaped(f[1])
                && (named || !f[6].contains('|'));
            if !ok {
                tracing::debug!("squeue line skipped, not in its format: {l:?}");
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
                name: f.get(7).map_or_else(String::new, |n| n.to_string()),
            })
        })
        .collect()
}

/// A job id as squeue's `%i` prints it: `12`, `12_3` (an array task),
/// `12_[4-9%2]` (its pending tasks), `12+0` (a heterogeneous job's part).
fn job_id_shaped(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_digit())
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b"_[]-,%+".contains(&b))
}

/// A job state as squeue's `%T` prints it: `RUNNING`, `OUT_OF_MEMORY`.
fn state_shaped(state: &str) -> bool {
    !state.is_empty() && state.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
}

fn known(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty() && !matches!(v, "N/A" | "(null)" | "None" | "Unknown")).then(|| v.to_string())
}

/// What a Slurm job state means for us (`now`: when squeue answered, for
/// the end time of a running job from its time left).
fn state_of(l: &QueueLine, now: SystemTime) -> JobState {
    match l.state.as_str() {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD"
        | "CONFIGURING" => JobState::Pending {
            reason: known(&l.reason).unwrap_or_else(|| l.state.to_lowercase()),
            start: parse_local_time(&l.start),
            partition: known(&l.partition),
        },
        "RUNNING" | "COMPLETING" | "SUSPENDED" | "SIGNALING" | "STAGE_OUT" | "RESIZING"
        | "STOPPED" => JobState::Running {
            node: known(&l.node).unwrap_or_default(),
            ends_at: parse_duration(&l.time_left).map(|s| now + std::time::Duration::from_secs(s)),
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

/// How jobs ended, from `sacct -n -P -X -o JobID,State,ExitCode` (lines it
/// cannot read are skipped: they tell nothing about a job).
fn parse_sacct(out: &str) -> HashMap<String, JobEnd> {
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
fn parse_sbatch(out: &str) -> Result<String, SchedError> {
    out.trim()
        .split(';')
        .next()
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_'))
        .map(str::to_string)
        .ok_or_else(|| SchedError::NoJobId {
            command: "sbatch",
            output: out.into(),
        })
}

/// Sums `sinfo -N -O SINFO_FORMAT` lines by partition.
fn parse_sinfo(out: &str) -> Vec<PartitionLoad> {
    let mut v: Vec<PartitionLoad> = Vec::new();
    for l in out.lines() {
        let f: Vec<&str> = l.trim().split('|').map(str::trim).collect();
        let [p, cpus, gres, used, state, ..] = f[..] else {
            continue;
        };
        // The default partition is marked `debug*`.
        let p = p.trim_end_matches('*');
        // CPUsState: allocated/idle/other/total
        let c: Vec<u64> = cpus.split('/').filter_map(|x| x.parse().ok()).collect();
        let [_, idle, _, total] = c[..] else { continue };
        let gpus = gpu_count(gres);
        // A node down, drained or failing takes no job: its GPUs are not free.
        let usable = ["idle", "mix", "alloc", "comp"]
            .iter()
            .any(|s| state.starts_with(s));
        let free = if usable {
            gpus.saturating_sub(gpu_count(used))
        } else {
            0
        };
        let x = match v.iter_mut().position(|x| x.partition == p) {
            Some(i) => &mut v[i],
            None => {
                v.push(PartitionLoad {
                    partition: p.into(),
                    ..Default::default()
                });
                v.last_mut().expect("just pushed")
            }
        };
        x.idle_cores += idle;
        x.total_cores += total;
        x.total_gpus += gpus;
        x.free_gpus += free;
    }
    v
}

/// GPUs in a gres list: `gpu:2`, `gpu:a100:4(S:0-1)`, `gpu:1(IDX:0,2),mps:100`.
/// slurmstepd's notice in a job's log when it ends the job: `slurmstepd:
/// error: *** JOB 12 ON n1 CANCELLED AT 2026-12-06T03:00:00 ***` (also
/// `… DUE TO TIME LIMIT ***`, a `STEP 12.0`, `slurmstepd-n1:` where one
/// host runs several slurmd, and `… STEPD TERMINATED ON …`).
fn end_notice(line: &str) -> bool {
    let Some((who, rest)) = line.trim().split_once(": error: ") else {
        return false;
    };
    (who == "slurmstepd" || who.starts_with("slurmstepd-"))
        && (rest.starts_with("*** JOB ") || rest.starts_with("*** STEP "))
        && rest.ends_with(" ***")
        && (rest.contains(" CANCELLED AT ") || rest.contains(" TERMINATED ON "))
}

fn gpu_count(gres: &str) -> u64 {
    // Drop the parenthesised details first: they may hold commas.
    let mut plain = String::with_capacity(gres.len());
    let mut depth = 0u32;
    for ch in gres.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => plain.push(ch),
            _ => {}
        }
    }
    plain
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            let (name, _) = item.split_once(':')?;
            (name == "gpu").then(|| item.rsplit(':').next()?.parse::<u64>().ok())?
        })
        .sum()
}

/// Every parser of this file on `text` (see `crate::fuzzing`).
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz(text: &str) {
    extend::fuzz(text);
    for named in [true, false] {
        for line in parse_squeue(text, named) {
            let _ = state_of(&line, SystemTime::now());
        }
    }
    let _ = parse_sacct(text);
    let _ = parse_sbatch(text);
    let _ = parse_sinfo(text);
    for l in text.lines() {
        let _ = parse_duration(l);
    }
}

/// `--tasks` inside a Slurm allocation: one `srun`, its lines labelled by
/// task (see `tasks.rs` for the names this runs among). srun broadcasts
/// the body, on its stdin, to every task (`--input=all`, its default, said
/// so that no `SLURM_STDINMODE` changes it): srun's own arguments are the
/// step's `SubmitLine` in Slurm's accounting, for every user to read.
const TASKS_PYTHON: &str = r#"
if os.environ.get("SLURM_JOB_ID") and shutil.which("srun"):
    def read_all(p):
        # The interrupt's SIGINT may be taken by another thread of the
        # kernel, which leaves this one blocked in its read: the signal's
        # wakeup fd (written by whichever thread takes it) ends the wait,
        # and the handler then raises KeyboardInterrupt here.
        import selectors, signal, socket
        r, w = socket.socketpair()
        try:
            w.setblocking(False)
            try:
                old = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
            except ValueError:  # not the main thread: no handler runs here anyway
                return p.stdout.read()
            try:
                chunks = []
                with selectors.DefaultSelector() as sel:
                    sel.register(p.stdout, selectors.EVENT_READ)
                    sel.register(r, selectors.EVENT_READ)
                    while True:
                        for key, _ in sel.select():
                            if key.fileobj is r:
                                r.recv(64)
                            elif chunk := os.read(p.stdout.fileno(), 65536):
                                chunks.append(chunk)
                            else:
                                return b"".join(chunks).decode(p.stdout.encoding, p.stdout.errors)
            finally:
                signal.set_wakeup_fd(old)
        finally:
            r.close()
            w.close()
    def run_all():
        task_id = "import os as _o; _o.environ['NOYAU_TASK_ID'] = _o.environ.get('SLURM_PROCID', '0'); del _o\n"
        p = start(["srun", f"--ntasks={n}", "--label", "--input=all", sys.executable, "-c", task_id + runner], body, env=env)
        try:
            text = read_all(p)
        except BaseException:
            # An interrupted cell ends its step (srun takes one SIGINT as a
            # request for its tasks' status), as subprocess.run would.
            p.kill()
            p.wait()
            raise
        for line in text.splitlines():
            tid, sep, text = line.partition(": ")
            if sep and tid.strip().isdigit() and int(tid) in out:
                out[int(tid)].append(text)
            else:
                out.setdefault("srun", []).append(line)
        if p.wait():
            failed.append(f"srun exited {p.returncode}")
"#;

impl Slurm {
    /// The partitions Slurm knows (`sinfo`).
    async fn partition_names(&self) -> Result<Vec<String>, SchedError> {
        let out = self
            .cmds
            .cmd("sinfo")
            .args(["-h", "-o", "%R"])
            .output()
            .await?;
        Ok(out
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Checks what only Slurm knows: that the profile's partition exists.
    async fn check_partition(&self, profile: &Profile) -> Result<(), SchedError> {
        let Some(part) = profile.partition.as_ref() else {
            return Ok(());
        };
        match self.partition_names().await {
            Ok(known) if !known.contains(part) => Err(SchedError::Invalid(format!(
                "Slurm has no partition {part:?}{}; partitions: {}",
                crate::profile::suggest(part, known.iter().map(String::as_str)),
                known.join(", ")
            ))),
            Ok(_) => Ok(()),
            Err(why) => {
                tracing::warn!("cannot check the partition: {why}");
                Ok(())
            }
        }
    }
}

/// The script's head: the `#SBATCH` lines, then, where sbatch exports
/// nothing, the sourcing of the job's environment file.
fn head(spec: &JobSpec, env_file: Option<&Path>) -> String {
    let mut head = directives(spec, &spec.logs());
    if let Some(f) = env_file {
        let why = "this site's sbatch does not export the environment (--export)";
        head.push_str(&sourcing(f, why, spec.array.is_some(), ""));
    }
    head
}

/// The site's or the user's `SBATCH_EXPORT`, when set.
fn sbatch_export() -> Option<String> {
    std::env::var(SBATCH_EXPORT)
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// Whether sbatch exports the submitter's environment to the job, as it
/// does by default. Not when `SBATCH_EXPORT` (`site`) or the profile's
/// `sbatch` options say `--export=NONE`, `NIL` or a list without `ALL`:
/// the link's secrets would then never reach the job. `SBATCH_EXPORT`
/// wins over the script's `#SBATCH` lines, as in sbatch.
fn exports_environment(p: &Profile, site: Option<&str>) -> bool {
    let from_profile = p.items("sbatch").iter().rev().find_map(|l| export_value(l));
    match site.or(from_profile) {
        None => true,
        Some(v) => v
            .split(',')
            .next()
            .is_some_and(|first| first.trim().eq_ignore_ascii_case("ALL")),
    }
}

/// `X` in the last `--export=X` (or `--export X`) of one `sbatch` item,
/// which may hold several options; not `--export-file`.
fn export_value(item: &str) -> Option<&str> {
    let words: Vec<&str> = item.split_whitespace().collect();
    words.iter().enumerate().rev().find_map(|(i, w)| match *w {
        "--export" => words.get(i + 1).copied(),
        w => w.strip_prefix("--export="),
    })
}

impl Slurm {
    /// A submission whose job does not get sbatch's environment: the job's
    /// variables go in a 0600 file the script sources (`jobfiles.rs`, as
    /// on OAR), and sbatch's own environment carries none of them.
    async fn submit_with_env_file(&self, spec: &JobSpec) -> Result<Submission, SchedError> {
        let mut files = JobFiles::new(self.name(), spec)?;
        let script = match files.write_env(spec) {
            Ok(env_file) => job_script(&head(spec, Some(&env_file)), spec),
            Err(e) => {
                files.remove();
                return Err(e);
            }
        };
        let out = match self
            .cmds
            .cmd("sbatch")
            .arg("--parsable")
            .stdin(script)
            .output()
            .await
        {
            Ok(out) => parse_sbatch(&out),
            // As on the other path: sinfo names the right partitions.
            Err(why) => Err(match self.check_partition(&spec.profile).await {
                Err(e) => e,
                Ok(()) => SchedError::Submit(why),
            }),
        };
        match out {
            Ok(id) => Ok(self.submission(id, spec, files.written)),
            Err(e) => {
                files.remove();
                Err(e)
            }
        }
    }

    /// What a submission of `spec` that Slurm numbered `id` gives back.
    fn submission(&self, id: String, spec: &JobSpec, files: Vec<PathBuf>) -> Submission {
        match &spec.array {
            None => Submission {
                id,
                files,
                ..Default::default()
            },
            Some(t) => Submission {
                tasks: t.ids.iter().map(|i| format!("{id}_{i}")).collect(),
                note: format!("--array={}", array_arg(t)),
                id,
                files,
                ..Default::default()
            },
        }
    }
}

#[async_trait]
impl Batch for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn display(&self) -> &'static str {
        "Slurm"
    }

    fn queue_word(&self) -> &'static str {
        "Partition"
    }

    fn commands(&self) -> &'static [&'static str] {
        &["sbatch", "squeue", "scancel", "sacct", "sinfo", "scontrol"]
    }

    fn config_vars(&self) -> &'static [&'static str] {
        &["SLURM_CONF"]
    }

    /// `squeue --me` lists every job of the user (ids or not); `sacct`
    /// says how the others ended.
    fn shares_listing(&self) -> bool {
        true
    }

    fn job_in_env(&self) -> Option<String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        match (var("SLURM_ARRAY_JOB_ID"), var("SLURM_ARRAY_TASK_ID")) {
            (Some(j), Some(t)) => Some(format!("{j}_{t}")),
            _ => var("SLURM_JOB_ID"),
        }
    }

    /// A step's GPUs, else the job's (`SLURM_STEP_GPUS`, `SLURM_JOB_GPUS`:
    /// the node's GPU indices); a job without either has none.
    fn gpus_in_env(&self) -> Option<Vec<String>> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        var("SLURM_JOB_ID")?;
        let list = var("SLURM_STEP_GPUS").or_else(|| var("SLURM_JOB_GPUS"));
        Some(list.map_or_else(Vec::new, |l| {
            l.split(',').map(|g| g.trim().to_string()).collect()
        }))
    }

    fn tasks_python(&self) -> &'static str {
        TASKS_PYTHON
    }

    fn keys(&self) -> &'static [Key] {
        KEYS
    }

    fn foreign_hint(&self) -> &'static str {
        "on Slurm, select nodes with `constraint` and pass other sbatch options in `sbatch`"
    }

    fn end_notice(&self, line: &str) -> bool {
        end_notice(line)
    }

    async fn dry_run(&self, spec: &JobSpec) -> Result<String, SchedError> {
        self.check_partition(&spec.profile).await?;
        let env_file = (!exports_environment(&spec.profile, sbatch_export().as_deref()))
            .then(|| job_dir(self.name()).join(format!("{}.env", spec.name)));
        Ok(job_script(&head(spec, env_file.as_deref()), spec))
    }

    async fn submit(&self, spec: &JobSpec, u: Option<&AsUser>) -> Result<Submission, SchedError> {
        // As another user (the hub), the whole submission runs as the user
        // (`noyau hub-submit`, in a clean environment): the log directory
        // is made and checked as theirs (0700; a link there is followed,
        // to a directory that must be theirs), which a `mkdir -p` as the
        // user under the hub's umask left open to every user.
        if let Some(u) = u {
            return submit_as(u, self, &self.cmds, spec).await;
        }
        if !exports_environment(&spec.profile, sbatch_export().as_deref()) {
            return self.submit_with_env_file(spec).await;
        }
        // Slurm opens the log before the script runs.
        private_dir(&spec.logs())?;
        let script = job_script(&directives(spec, &spec.logs()), spec);
        // The secrets go in sbatch's own environment, which Slurm exports to the job.
        let out = self
            .cmds
            .cmd("sbatch")
            .arg("--parsable")
            .envs(&spec.env)
            .stdin(script)
            .output()
            .await;
        let out = match out {
            Ok(out) => out,
            // Only now ask sinfo (a submission pays no extra call): sbatch's
            // words for a wrong partition name none of the right ones.
            Err(why) => {
                self.check_partition(&spec.profile).await?;
                return Err(SchedError::Submit(why));
            }
        };
        let id = parse_sbatch(&out)?;
        Ok(self.submission(id, spec, Vec::new()))
    }

    async fn cancel(&self, ids: &[String], u: Option<&AsUser>) -> Result<(), SchedError> {
        self.cmds
            .cmd("scancel")
            .args(ids.iter().cloned())
            .run_as(u, self.config_vars())
            .output()
            .await?;
        Ok(())
    }

    /// Every job of the scope: one call whatever the number of jobs. Every
    /// user's jobs come without their names ([`SQUEUE_FORMAT_ALL`]).
    async fn list(
        &self,
        scope: Scope,
        _ids: Option<&[String]>,
    ) -> Result<Vec<JobInfo>, SchedError> {
        let mine = scope == Scope::Mine;
        let format = if mine {
            SQUEUE_FORMAT
        } else {
            SQUEUE_FORMAT_ALL
        };
        let out = self
            .cmds
            .cmd("squeue")
            .args(mine.then_some("--me"))
            .args(["--states=all", "-r", "-h", "-o", format])
            .output()
            .await?;
        let now = SystemTime::now();
        Ok(parse_squeue(&out, mine)
            .into_iter()
            .map(|l| JobInfo {
                state: state_of(&l, now),
                id: l.id,
                name: l.name,
                word: l.state,
            })
            .collect())
    }

    /// Asks sacct how jobs that left the queue ended.
    async fn gone(&self, ids: &[String]) -> HashMap<String, JobEnd> {
        let out = self
            .cmds
            .cmd("sacct")
            .args([
                "-n",
                "-P",
                "-X",
                "-j",
                &ids.join(","),
                "-o",
                "JobID,State,ExitCode",
            ])
            .output()
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

    /// Slurm's operators only (`extend.rs`); an error when the
    /// controller could not be asked (asked again next time).
    async fn users_extend(&self) -> Result<bool, SchedError> {
        self.raises
            .get_or_try_init(|| extend::may_raise(&self.cmds))
            .await
            .copied()
    }

    async fn extend(&self, id: &str, secs: u64, u: Option<&AsUser>) -> Result<String, SchedError> {
        extend::raise(&self.cmds, id, secs, u, self.config_vars()).await
    }

    async fn partitions(&self) -> Result<Vec<PartitionLoad>, SchedError> {
        let out = self
            .cmds
            .cmd("sinfo")
            .args(["-h", "-N", "-O", SINFO_FORMAT])
            .output()
            .await?;
        Ok(parse_sinfo(&out))
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
            prologue: Some("module load python".into()),
            ..Default::default()
        };
        for o in ["mem=4G", "sbatch=--exclusive"] {
            profile.apply_override(o).unwrap();
        }
        profile.env.insert("OMP_NUM_THREADS".into(), "2 x".into());
        JobSpec {
            name: "noyau-kernel-python3".into(),
            program: "/opt/noyau bin/noyau".into(),
            args: vec!["agent".into()],
            env,
            cwd: Some("/home/u/nb".into()),
            profile,
            ..Default::default()
        }
    }

    #[test]
    fn an_export_of_none_or_of_a_list_keeps_the_secrets_out_of_sbatchs_environment() {
        let mut p = spec().profile;
        assert!(exports_environment(&p, None));
        for all in ["ALL", "all,FOO=1"] {
            assert!(exports_environment(&p, Some(all)), "{all}");
        }
        for not in ["NONE", "NIL", "FOO,BAR"] {
            assert!(!exports_environment(&p, Some(not)), "{not}");
        }
        p.apply_override("sbatch=--export=NONE").unwrap();
        assert!(!exports_environment(&p, None));
        // SBATCH_EXPORT wins over the script's #SBATCH lines, as in sbatch.
        assert!(exports_environment(&p, Some("ALL")));
        assert_eq!(export_value("--export-file=/x"), None);
        assert_eq!(export_value(" --export NONE"), Some("NONE"));
        assert_eq!(export_value("--exclusive --export=NONE"), Some("NONE"));
    }

    #[test]
    fn slurmstepds_end_notices_are_its_own() {
        for own in [
            "slurmstepd: error: *** JOB 12 ON n1 CANCELLED AT 2026-12-06T03:00:00 ***",
            "slurmstepd-n1: error: *** JOB 12 ON n1 CANCELLED AT 2026-12-06T03:00:00 DUE TO TIME LIMIT ***",
            "slurmstepd: error: *** STEP 12.0 ON n1 CANCELLED AT 2026-12-06T03:00:00 ***",
            "slurmstepd: error: *** JOB 12 STEPD TERMINATED ON n1 AT 2026-12-06T03:00:00 DUE TO JOB NOT ENDING WITH SIGNALS ***",
        ] {
            assert!(end_notice(own), "{own}");
        }
        for theirs in [
            "slurmstepd: error: Detected 1 oom_kill event in StepId=12.batch",
            "print('*** JOB 12 ON n1 CANCELLED AT now ***')",
            "user: error: *** JOB 12 ON n1 CANCELLED AT x ***",
            "CANCELLED",
        ] {
            assert!(!end_notice(theirs), "{theirs}");
        }
    }

    #[test]
    fn script_has_the_profile_and_no_secret() {
        let spec = spec();
        let s = job_script(
            &directives(&spec, Path::new("/home/u/.local/state/noyau/jobs")),
            &spec,
        );
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
        let l = parse_squeue(out, true);
        let now = SystemTime::now();
        assert_eq!(l.len(), 4);
        assert_eq!(l[1].name, "noyau-kernel-x|y");
        assert_eq!(
            state_of(&l[0], now),
            JobState::Pending {
                reason: "Priority".into(),
                start: None,
                partition: Some("debug".into())
            }
        );
        assert!(
            matches!(state_of(&l[1], now), JobState::Pending { start: Some(s), .. } if crate::local_time(s).starts_with("2026"))
        );
        assert_eq!(
            state_of(&l[2], now),
            JobState::Running {
                node: "node7".into(),
                ends_at: Some(now + std::time::Duration::from_secs(59 * 60)),
            }
        );
        assert!(
            matches!(state_of(&l[3], now), JobState::Ended(JobEnd { success: false, ref description }) if description == "was cancelled")
        );
        assert_eq!(
            end_of("FAILED", Some("1:0")).description,
            "failed (exit code 1:0)"
        );
    }

    /// `sbatch -J $'x\n12|CANCELLED|None||N/A|debug|0:00|noyau-hub'`: any
    /// user's job name, printed raw by squeue.
    const FORGED_NAME: &str = "x\n12|CANCELLED|None||N/A|debug|0:00|noyau-hub";

    #[test]
    fn a_job_name_cannot_forge_a_line_of_every_users_listing() {
        // What squeue prints for the two formats, with the forged name.
        let named = format!(
            "12|RUNNING|None|node7|2026-01-01T09:00:00|debug|59:00|noyau-hub\n\
             13|PENDING|Priority||N/A|debug|1:00:00|{FORGED_NAME}\n"
        );
        let ids = |l: Vec<QueueLine>| -> Vec<(String, String)> {
            l.into_iter().map(|l| (l.id, l.state)).collect()
        };
        // Every user's listing asks for no name: squeue prints none to forge with.
        assert!(!SQUEUE_FORMAT_ALL.contains("%j"), "{SQUEUE_FORMAT_ALL}");
        let all = "12|RUNNING|None|node7|2026-01-01T09:00:00|debug|59:00\n\
                   13|PENDING|Priority||N/A|debug|1:00:00\n";
        assert_eq!(
            ids(parse_squeue(all, false)),
            [
                ("12".into(), "RUNNING".into()),
                ("13".into(), "PENDING".into())
            ]
        );
        // A named line is not one of the nameless format (a field too many).
        assert_eq!(parse_squeue(&named, false).len(), 0);
        // A user's own listing: the name's first line stays its name, and
        // its second is a line of the format, which the watcher sees as a
        // second line for job 12 (see watcher.rs).
        let mine = parse_squeue(&named, true);
        assert_eq!(mine[1].name, "x");
        assert_eq!(ids(mine).len(), 3);
        // Lines not in the format are skipped.
        for bad in [
            "x|RUNNING|None|n|N/A|debug|1:00",
            "12 |RUNNING|None|n|N/A|debug|1:00",
            "|RUNNING|None|n|N/A|debug|1:00",
            "12|running|None|n|N/A|debug|1:00",
            "12|RUNNING|None|n|N/A|debug",
            "12|RUNNING|None|n|N/A|debug|1:00|name",
        ] {
            assert_eq!(parse_squeue(bad, false), [], "{bad}");
        }
        for good in ["12_3", "12_[4-9%2]", "12+0", "12_[1,3]"] {
            assert!(job_id_shaped(good), "{good}");
        }
    }

    /// As another user (the hub), the whole submission runs as the user
    /// through `noyau hub-submit` (which makes the log directory 0700 as
    /// theirs): no `mkdir` or `sbatch` of the hub's own, and the request
    /// carries the hub's command paths; `SLURM_CONF` is kept.
    #[tokio::test]
    async fn as_another_user_the_whole_submission_is_the_users_hub_submit() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().display();
        let u = fake_hub_submit(
            t.path(),
            &format!("echo \"$*\" > {d}/args\ncat > {d}/request\nenv > {d}/env\necho id=42"),
        );
        std::env::set_var("SLURM_CONF", "/etc/slurm-test/slurm.conf");
        let mut cmds = Commands::default();
        cmds.set("sbatch", "/opt/slurm/bin/sbatch".into());
        let slurm = Slurm {
            cmds,
            raises: tokio::sync::OnceCell::new(),
        };
        let sub = slurm.submit(&spec(), Some(&u)).await.unwrap();
        assert_eq!(sub.id, "42");
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap();
        assert_eq!(read("args").trim(), "hub-submit");
        let req: serde_json::Value = serde_json::from_str(&read("request")).unwrap();
        assert_eq!(req["scheduler"], "slurm");
        assert_eq!(req["commands"]["sbatch"], "/opt/slurm/bin/sbatch");
        assert_eq!(req["spec"]["env"]["NOYAU_LINK_TOKEN"], "s3cret-token");
        assert!(read("env").contains("SLURM_CONF=/etc/slurm-test/slurm.conf"));
        assert!(!read("env").contains("s3cret"), "the secrets come on stdin");
    }

    /// A user to submit as, whose `noyau hub-submit` runs `script` (sh).
    fn fake_hub_submit(dir: &Path, script: &str) -> AsUser {
        use std::os::unix::fs::PermissionsExt;
        let noyau = dir.join("noyau");
        std::fs::write(&noyau, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&noyau, std::fs::Permissions::from_mode(0o755)).unwrap();
        AsUser {
            user: "u".into(),
            prefix: Vec::new(),
            home: dir.into(),
            noyau,
        }
    }

    /// `noyau hub-submit` runs as the user, who may have replaced it: an id
    /// that is not one Slurm job's (two jobs for `scancel`, an option, a
    /// task of another's array) is not taken.
    #[tokio::test]
    async fn only_a_job_id_from_hub_submit_is_taken() {
        for bad in ["42,43", "--me", "42_1", "42 43", "", "x42"] {
            let t = tempfile::tempdir().unwrap();
            let u = fake_hub_submit(t.path(), &format!("cat >/dev/null\necho 'id={bad}'"));
            let slurm = Slurm {
                cmds: Commands::default(),
                raises: tokio::sync::OnceCell::new(),
            };
            let e = slurm.submit(&spec(), Some(&u)).await.unwrap_err();
            assert!(
                matches!(
                    e,
                    SchedError::NoJobId {
                        command: "noyau hub-submit",
                        ..
                    }
                ),
                "{bad:?}: {e}"
            );
        }
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
    fn arrays() {
        let t = |ids: &[usize], k| ArrayTasks {
            ids: ids.to_vec(),
            max_parallel: k,
        };
        assert_eq!(array_arg(&t(&[0, 1, 2, 3, 4, 5], 2)), "0-5%2");
        assert_eq!(array_arg(&t(&[1, 4], 3)), "1,4%3");
        assert_eq!(array_arg(&t(&[3], 1)), "3%1");
    }

    #[test]
    fn gpus_in_gres() {
        assert_eq!(gpu_count("gpu:2"), 2);
        assert_eq!(gpu_count("gpu:a100:4(S:0-1)"), 4);
        assert_eq!(gpu_count("gpu:1(IDX:0,2),mps:100"), 1);
        assert_eq!(gpu_count("gpu:a100:1(IDX:0),gpu:v100:2(IDX:0-1)"), 3);
        assert_eq!(gpu_count("(null)"), 0);
        assert_eq!(gpu_count("gpu"), 0);
    }

    #[test]
    fn free_gpus_per_partition() {
        let out = "debug*|1/3/0/4|gpu:2|gpu:1(IDX:0)|mix|\n\
                   debug*|0/8/0/8|gpu:4|gpu:0|idle|\n\
                   debug*|0/0/8/8|gpu:4|gpu:0|drain|\n\
                   batch|1/3/0/4|(null)|gpu:0|mix|\n";
        let v = parse_sinfo(out);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].partition, "debug");
        assert_eq!((v[0].idle_cores, v[0].total_cores), (11, 20));
        assert_eq!((v[0].free_gpus, v[0].total_gpus), (5, 10));
        assert_eq!((v[1].free_gpus, v[1].total_gpus), (0, 0));
    }
}
