//! Son of Grid Engine (8.1.9; UGE and OGE sites speak the same commands):
//! the agent runs as a batch job.
//!
//! * **Submission.** `qsub -terse` reads the job script on stdin (never
//!   `-b y`), with a valid `-N`, `-S /bin/sh`, `-r n`, `-notify`, the log
//!   (`-o`, `-j y`) and `-wd`; from the profile `-q` (`partition`, `queue`),
//!   `-P` (`account`, `project`), `-pe PE N` for ntasks × cpus_per_task
//!   cores on one host (`pe`, default `smp`), `-l h_rt=` (`time`) and the
//!   site's memory resource per slot (`mem`; `mem_resource`, default
//!   `h_vmem`), and `qsub` for any other argument. `qstat -j` shows a job's
//!   environment to every user, so the job's environment goes in a 0600
//!   file the script sources and deletes (`jobfiles.rs`, as for OAR), and
//!   qsub runs with a clean environment. As another user (the hub), the
//!   whole submission runs as the user.
//! * **Listing.** `qstat -r -xml -u USER` (`-u *` for every user's): one
//!   line per job or array task (`ID.TASK`); a running job ends at its
//!   start + `h_rt`; why jobs wait comes from `qstat -j IDS -xml`, asked in
//!   the same listing when one waits. A job that left it is looked up with
//!   `qacct -j`, whose records come late (`records_lag`).
//! * **Cancel** is `qdel` (`ID` or `ID.TASK`): SIGUSR2 (`-notify`), then
//!   SIGKILL the queue's `notify` delay later.
//! * **Walltime.** SIGUSR2 comes at `h_rt` (and at a `qdel`): it is the
//!   walltime signal, with the queue's `notify` delay to save (the profile's
//!   `walltime_signal` cannot move it). The script exports when `h_rt`
//!   comes (`NOYAU_SGE_END`), so that a process getting SIGUSR2 well before
//!   knows it is a cancel. A running job's walltime cannot be extended.
//! * **Arrays** are `-t 1-N -tc K`: Grid Engine limits them itself; task k
//!   runs the k-th of noyau's task ids.
//! * **`--tasks N`** runs N local processes in the job: it holds N slots
//!   on one host (`$pe_slots`), so no `qrsh -inherit` is needed, and the
//!   tasks are the job's own processes (accounted and killed with it).
//!
//! # How Grid Engine behaves (SGE 8.1.9 from Debian 12, `scripts/sge-up`)
//!
//! Submission
//! * `qsub -terse` reads the script on stdin and prints the job id (`26`),
//!   `32.1-6:1` for an array. Never `-b y`: it runs its arguments through a
//!   shell again. Always `-N`: a name may not hold `/ : @ * ?` nor start
//!   with a digit, and a space or a non-ASCII letter fails with "Error
//!   reading answer list from qmaster" ([`job_name`] makes a valid one).
//! * The queue's `shell` runs the script whatever its `#!` (sites set
//!   `/bin/csh`): `-S /bin/sh`. Without `-wd` the job starts in `$HOME`,
//!   not in the submitter's directory. `-o` expands `$JOB_ID` and
//!   `$TASK_ID`; a `:` in its path is read as `HOST:PATH` (a leading `:`
//!   escapes it).
//! * **Secrets.** `qstat -j ID` shows every job's environment (`env_list`:
//!   the variables of `-v VAR` and `-V`) to every user (tested as `nobody`),
//!   and the execution host keeps it in `active_jobs/ID.1/environment`
//!   (0644) next to the script (`job_scripts/ID`, 0755). Secrets therefore
//!   go in a 0600 file the script sources and deletes, as for OAR; never
//!   `-v` or `-V`. A site's `sge_request` or the user's `~/.sge_request`
//!   may add `-V` (tested: the whole environment of qsub shows): qsub runs
//!   with [`qsub_env`] only.
//! * Without `-V` a job's environment is the execution daemon's plus Grid
//!   Engine's (`JOB_ID`, `SGE_TASK_ID`, `NSLOTS`, `TMPDIR`, `SGE_O_*`).
//! * Cores: `-l slots=N` is refused ("use parallel environments instead of
//!   requesting slots explicitly"); `-pe PE N` with a parallel environment
//!   of `allocation_rule $pe_slots`, whose name is the site's (often
//!   `smp`). Several hosts need another kind of PE: not offered.
//! * Memory: `-l h_vmem=X` is per slot and limits virtual memory
//!   (RLIMIT_AS: a Python asking for 600 MB under 200M got MemoryError,
//!   exit 1; ipykernel alone maps ~800 MB). Sites often make it consumable
//!   with a default per slot; UGE sites use `m_mem_free`, others
//!   `mem_free`: the resource is the site's (the profile key `mem_resource`).
//! * `-q QUEUE`; `-P PROJECT` must exist ("job rejected: the requested
//!   project "x" does not exist"); `-A` is only a free accounting string.
//!   `-l h_rt=` takes seconds or `H:M:S`, no days.
//! * `-w e` would refuse a request that can never run ("error: no suitable
//!   queues", no detail); without it such a job waits with its reason
//!   ("cannot run in PE "smp" because it only offers 0 slots").
//! * Arrays: `-t 1-N -tc K` ran 6 tasks never more than 2 at once. Task
//!   ids start at 1 ("0 is an invalid task id") and are one range: task k
//!   runs the k-th id of noyau's list ([`array_task_id`]).
//!
//! Walltime, signals, cancel
//! * At `h_rt` the job gets SIGKILL. With `-notify` it gets SIGUSR2 at
//!   `h_rt` and SIGKILL the queue's `notify` delay later (10 s on the test
//!   queues, 60 s in Grid Engine's queue template): the walltime warning
//!   comes at `h_rt`, its lead time is the site's, and the end is
//!   `h_rt + notify`. `qdel` of a `-notify` job: SIGUSR2 at once, SIGKILL
//!   `notify` later, no SIGTERM; without `-notify`, an immediate SIGKILL.
//! * SIGUSR2 goes to the job's process group: a child that does not handle
//!   it dies at once (its default action); a child in a process group of its
//!   own does not get it; a child in a session of its own outlived even the
//!   final SIGKILL (`execd_params ENABLE_ADDGRP_KILL` unset, the default).
//! * `s_rt` (SIGUSR1 at a soft limit) left `h_rt` unenforced: a job with
//!   `h_rt=30,s_rt=20` was still running 59 s past its `h_rt`, when it was
//!   deleted. Not used.
//! * `qalter -l h_rt=…` of a running job is accepted ("modified hard
//!   resource list", exit 0, for its owner as for a manager) but the
//!   execution daemon keeps the limit it started with: the job is killed at
//!   the old `h_rt` (and `qacct`'s category shows the new one). Grid Engine
//!   cannot extend a walltime. (`qalter -l` also replaces the whole list.)
//! * `qdel ID`: "has registered the job N for deletion" (running) or "has
//!   deleted job N" (pending), exit 0; `denied: job "N" does not exist`,
//!   exit 1; another user's job: "you do not have the necessary
//!   privileges", exit 1.
//!
//! States and reasons
//! * `qstat -r -xml -u USER` lists the user's jobs in one call (without
//!   `-u` it lists everyone's): `state` letters (`r`, `t` starting, `s`
//!   suspended, `dr` being deleted, `qw`, `hqw` held by `-h` or
//!   `-hold_jid`, `Eqw` in error), `JAT_start_time` in local time without
//!   a zone (UGE adds milliseconds), `queue_name` `QUEUE@HOST`, `slots`,
//!   `tasks` (one running task, or the waiting ones: `3-6:1`, `3,5`) and
//!   `hard_request name="h_rt"` in seconds. A job that ends leaves it at
//!   once.
//! * `qstat -j A,B -xml` gives why jobs wait, in one call: messages by job
//!   number ("(-l h_rt=600) cannot run at host "vm" because it offers only
//!   hc:slots=0.000000", "Job is in hold state", "job dropped because of job
//!   dependencies"; an array held back by `-tc` says "...due to
//!   'max_aj_instances'"), global ones ("queue instance "all.q@vm" dropped
//!   because it is full"), and a job in error its error ("can't open output
//!   file ..."). Only while the scheduler's `schedd_job_info` is true: sites
//!   turn it off for speed (UGE by default), leaving the state alone. Ids it
//!   does not know are left out (all unknown: `<unknown_jobs>`, exit 0; exit
//!   1 without `-xml`).
//! * `qstat -g c` ignores host-level consumables (AVAIL 4 on a queue whose
//!   host had no slot left): free slots come from `qstat -f -F … -xml`.
//!
//! Endings (`qacct -j ID`)
//! * A record appears once accounting is flushed (`reporting_params`
//!   `accounting_flush_time`, else `flush_time`, 15 s by default: 13 s
//!   after the job left qstat; within 1 s on the test cluster, which sets
//!   1 s). Until then "error: job id N not found" (exit 1), which is also
//!   the lasting answer for a job deleted while it waited.
//! * `failed 0`: `exit_status` is the script's. `failed 100 : assumedly
//!   after job` with `exit_status` 128+N: killed by signal N; a `qdel`
//!   (137) cannot be told from another SIGKILL (SoGE keeps no deleter;
//!   UGE's qacct has `deleted_by`). `failed 37 : qmaster enforced h_rt,
//!   h_cpu, or h_vmem limit`: the walltime when `ru_wallclock` reached the
//!   category's `h_rt`. Other codes: Grid Engine could not run the job (26
//!   opening the output file, 28 changing into the working directory;
//!   `start_time -/-`). An array has one record per task (`taskid`).

use noyau_vars::EnvVars;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::batch::{is_job_number, Batch, Commands, JobInfo, PartitionLoad, Scope, Submission};
use crate::jobfiles::{sourcing, submit_as, JobFiles};
use crate::profile::{parse_size, parse_time, Key, Kind, Profile};
use crate::quote::sh_quote;
use crate::run::{user_name, AsUser};
use crate::script::job_script;
use crate::{JobEnd, JobSpec, JobState, SchedError};

/// The profile keys only Grid Engine knows: the parallel environment that
/// gives cores on one host, the memory (per job, asked per slot) and the
/// site's memory resource, more `qsub` arguments.
const KEYS: &[Key] = &[
    Key::new("pe", Kind::Word),
    Key::new("mem", Kind::Size),
    Key::new("mem_resource", Kind::Word),
    Key::new("qsub", Kind::Args),
];

/// SIGUSR2 this long before [`EnvVars::NOYAU_SGE_END`] or later is the
/// walltime: the job started a little before its script ran.
const END_SLACK: Duration = Duration::from_secs(60);

pub(crate) struct Sge {
    cmds: Commands,
}

pub(crate) fn make(cmds: Commands) -> Arc<dyn Batch> {
    Arc::new(Sge { cmds })
}

/// A job name Grid Engine accepts: ASCII letters, digits, `-_.`, every
/// other character an `_`, never a digit first.
fn job_name(name: &str) -> String {
    let mut n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if n.is_empty() || n.starts_with(|c: char| c.is_ascii_digit()) {
        n.insert(0, 'j');
    }
    n
}

/// The log path of `-o` (Grid Engine fills in `$JOB_ID` and `$TASK_ID`):
/// what `JobSpec::log_path` names for the job or task id `list` shows.
fn log_path(spec: &JobSpec) -> String {
    let file = if spec.array.is_some() {
        format!("{}-$JOB_ID.$TASK_ID.log", spec.name)
    } else {
        format!("{}-$JOB_ID.log", spec.name)
    };
    let path = spec.logs().join(file).display().to_string();
    // `-o` reads HOST:PATH; a leading `:` says "no host"
    if path.contains(':') {
        format!(":{path}")
    } else {
        path
    }
}

/// Slots (cores) a profile asks for: ntasks × cpus_per_task (a product
/// too big for any host saturates: qsub's answer is then the error).
fn slots(p: &Profile) -> u32 {
    let n = |v: Option<u32>| v.unwrap_or(1).max(1);
    n(p.ntasks).saturating_mul(n(p.cpus_per_task))
}

/// The `-l` list: `h_rt` in seconds, memory per slot in megabytes of the
/// site's resource.
fn resources(p: &Profile) -> Result<Vec<String>, SchedError> {
    let mut l = Vec::new();
    if let Some(t) = &p.time {
        // 0 is "UNLIMITED": no h_rt
        let secs = parse_time(t)?;
        if secs > 0 {
            l.push(format!("h_rt={secs}"));
        }
    }
    if let Some(m) = p.get("mem") {
        let per_slot = parse_size(m)?.div_ceil(u64::from(slots(p)));
        let resource = p.get("mem_resource").unwrap_or("h_vmem");
        l.push(format!("{resource}={per_slot}M"));
    }
    Ok(l)
}

/// The arguments of `qsub` (which reads the script on stdin) for `spec`.
/// They hold no secret: every user sees them in `qstat -j`.
fn qsub_args(spec: &JobSpec) -> Result<Vec<String>, SchedError> {
    let p = &spec.profile;
    if let Some(n) = p.nodes.filter(|n| *n > 1) {
        return Err(SchedError::Invalid(format!(
            "nodes = {n}: Grid Engine jobs of noyau run on one host (cores with `-pe`); \
             ask for cores with cpus_per_task instead"
        )));
    }
    let mut a: Vec<String> = ["-terse", "-N", &job_name(&spec.name), "-S", "/bin/sh"]
        .map(String::from)
        .into();
    // not rerun after a host failure (a kernel cannot resume); SIGUSR2
    // `notify` seconds before the SIGKILL of h_rt or qdel
    a.extend(["-r", "n", "-notify", "-j", "y", "-o"].map(String::from));
    a.push(log_path(spec));
    match &spec.cwd {
        Some(d) => a.extend(["-wd".into(), d.display().to_string()]),
        None => a.push("-cwd".into()),
    }
    if let Some(q) = &p.partition {
        a.extend(["-q".into(), q.clone()]);
    }
    if let Some(pr) = &p.account {
        a.extend(["-P".into(), pr.clone()]);
    }
    if slots(p) > 1 {
        let pe = p.get("pe").unwrap_or("smp");
        a.extend(["-pe".into(), pe.into(), slots(p).to_string()]);
    }
    let l = resources(p)?;
    if !l.is_empty() {
        a.extend(["-l".into(), l.join(",")]);
    }
    if let Some(t) = &spec.array {
        a.extend(["-t".into(), format!("1-{}", t.ids.len().max(1))]);
        if t.limited() {
            a.extend(["-tc".into(), t.max_parallel.max(1).to_string()]);
        }
    }
    a.extend(p.items("qsub").iter().cloned());
    Ok(a)
}

/// The script's head: when `h_rt` comes (for a process to tell the
/// walltime's SIGUSR2 from a qdel's), the sourcing of the environment file,
/// and an array task's id.
fn head(spec: &JobSpec, env_file: &Path) -> String {
    let mut s = String::new();
    if let Some(t) = spec.profile.time_secs().filter(|t| *t > 0) {
        s.push_str(&format!(
            "# SIGUSR2 comes at h_rt and at a qdel: when h_rt comes, to tell them apart\n\
             {end}=$(( $(date +%s) + {t} )); export {end}\n",
            end = EnvVars::NOYAU_SGE_END
        ));
    }
    s.push_str(&sourcing(
        env_file,
        "`qstat -j` shows a job's environment to every user",
        spec.array.is_some(),
        "",
    ));
    if let Some(t) = &spec.array {
        s.push_str(&array_task_id(&t.ids));
    }
    s
}

/// Shell lines for an array task's script: `NOYAU_ARRAY_TASK_ID` is the
/// `SGE_TASK_ID`-th of `ids` (Grid Engine numbers tasks from 1, in one
/// range; noyau's ids may start at 0 or have gaps).
fn array_task_id(ids: &[usize]) -> String {
    let list: Vec<String> = ids.iter().map(usize::to_string).collect();
    format!(
        "set -- {}\nshift $((SGE_TASK_ID - 1))\nexport {}=\"$1\"\nset --\n",
        list.join(" "),
        EnvVars::NOYAU_ARRAY_TASK_ID
    )
}

/// The environment to run `qsub` with (after clearing it): Grid Engine's
/// own settings and a few plain ones, so that a `-V` a site or user
/// `sge_request` adds shows no secret of the caller's.
fn qsub_env(vars: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    const PLAIN: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "SHELL"];
    vars.into_iter()
        .filter(|(k, _)| {
            k.starts_with("SGE_") || k.starts_with("LC_") || PLAIN.contains(&k.as_str())
        })
        .collect()
}

/// The job id in `qsub -terse`'s output: `26`, or `32.1-6:1` for an array.
fn parse_qsub(out: &str) -> Result<String, SchedError> {
    out.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .and_then(|l| l.split('.').next())
        .filter(|id| is_job_number(id))
        .map(str::to_string)
        .ok_or_else(|| SchedError::NoJobId {
            command: "qsub",
            output: out.into(),
        })
}

/// What qacct says when it has no record of a job (yet: see the notes).
fn qacct_not_found(stderr: &str) -> bool {
    stderr.contains("not found")
}

/// Whether each line of qdel's answer says the job is being deleted or is
/// already gone: a cancel that succeeded.
fn qdel_done(output: &str) -> bool {
    output.lines().filter(|l| !l.trim().is_empty()).all(|l| {
        l.contains("does not exist") || l.contains("for deletion") || l.contains("has deleted")
    })
}

/// Whether SIGUSR2, received now in a job whose script exported
/// [`EnvVars::NOYAU_SGE_END`] as `end`, comes before the walltime: a qdel.
fn before_the_end(end: Option<&str>, now: SystemTime) -> bool {
    let Some(end) = end.and_then(|e| e.trim().parse::<u64>().ok()) else {
        // no h_rt: the signal can only be a qdel
        return true;
    };
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    now + END_SLACK < Duration::from_secs(end)
}

// ---- qstat -r -xml -------------------------------------------------------------

/// A job's state, from qstat's letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SgeState {
    /// `qw`: waiting for resources.
    Pending,
    /// `hqw`: held (`-h`, `-hold_jid`, an operator).
    Held,
    /// `r`, `t` (being started), `Rr` (restarted).
    Running,
    /// `s`, `S`, `T`: suspended by a user, the queue or a threshold.
    Suspended,
    /// `d`: being deleted.
    Deleting,
    /// `E`: Grid Engine could not start it; it waits for `qmod -cj`.
    Error,
}

impl SgeState {
    fn parse(letters: &str) -> Option<SgeState> {
        let has = |set: &str| letters.chars().any(|c| set.contains(c));
        Some(if has("E") {
            SgeState::Error
        } else if has("d") {
            SgeState::Deleting
        } else if has("sST") {
            SgeState::Suspended
        } else if has("rt") {
            SgeState::Running
        } else if has("h") {
            SgeState::Held
        } else if has("qw") {
            SgeState::Pending
        } else {
            return None;
        })
    }
}

/// One line of `qstat -r -xml`: a job, or some tasks of an array.
#[derive(Debug, Clone, PartialEq)]
struct QstatJob {
    id: String,
    name: String,
    state: SgeState,
    /// The letters, e.g. `hqw`.
    letters: String,
    /// The array tasks this line is about (empty: not an array).
    tasks: Vec<u32>,
    /// Where it runs, else the queue it asked for.
    queue: Option<String>,
    host: Option<String>,
    started: Option<SystemTime>,
    h_rt: Option<Duration>,
}

impl QstatJob {
    /// When `h_rt` runs out (with `-notify`, SIGUSR2 then, SIGKILL the
    /// queue's `notify` later).
    fn ends_at(&self) -> Option<SystemTime> {
        Some(self.started? + self.h_rt?)
    }

    /// Its ids as noyau names them: the job's, or each task's (`ID.TASK`).
    fn ids(&self) -> Vec<String> {
        if self.tasks.is_empty() {
            return vec![self.id.clone()];
        }
        self.tasks
            .iter()
            .map(|t| format!("{}.{t}", self.id))
            .collect()
    }

    /// Its state, with why it waits (from `qstat -j`).
    fn job_state(&self, why: &Reasons) -> JobState {
        let reason = why.reason(&self.id);
        let reason = match self.state {
            SgeState::Running | SgeState::Suspended | SgeState::Deleting => {
                return JobState::Running {
                    node: self.host.clone().unwrap_or_default(),
                    ends_at: self.ends_at(),
                }
            }
            SgeState::Error => format!(
                "in error: {}; Grid Engine keeps it until it is cancelled",
                reason
                    .as_deref()
                    .unwrap_or("Grid Engine could not start it")
            ),
            SgeState::Held => reason.unwrap_or_else(|| "held".into()),
            SgeState::Pending => reason.unwrap_or_else(|| "waiting".into()),
        };
        JobState::Pending {
            reason,
            start: None,
            partition: self.queue.clone(),
        }
    }
}

fn text<'a>(node: roxmltree::Node<'a, '_>, tag: &str) -> Option<&'a str> {
    node.children()
        .find(|c| c.has_tag_name(tag))
        .and_then(|c| c.text())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn xml<'a>(command: &'static str, doc: &'a str) -> Result<roxmltree::Document<'a>, SchedError> {
    roxmltree::Document::parse(doc).map_err(|e| SchedError::Answer {
        what: command,
        why: format!("its XML cannot be read: {e}"),
    })
}

/// A field of `command`'s answer that is not understood.
fn odd(command: &'static str, what: &str, value: &str) -> SchedError {
    SchedError::Answer {
        what: command,
        why: format!("{what} {value:?}"),
    }
}

/// Grid Engine's time stamps (`2026-12-06T01:36:20`, UGE `…:20.123`): the
/// local time of the host that printed them.
fn parse_local_time(s: &str) -> Option<SystemTime> {
    use chrono::TimeZone;
    let t = chrono::NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%dT%H:%M:%S%.f").ok()?;
    chrono::Local
        .from_local_datetime(&t)
        .earliest()
        .map(SystemTime::from)
}

/// Seconds or `H:M:S` (Grid Engine's time values).
fn parse_seconds(s: &str) -> Option<Duration> {
    let mut secs: u64 = 0;
    for part in s.trim().split(':') {
        secs = secs.checked_mul(60)?.checked_add(part.parse().ok()?)?;
    }
    Some(Duration::from_secs(secs))
}

/// Array task ids as qstat and qacct write them: `4`, `3-6:1`, `3,5`,
/// `1-9:2,12`.
fn parse_tasks(s: &str) -> Option<Vec<u32>> {
    let mut ids = Vec::new();
    for part in s.trim().split(',') {
        let (range, step) = part.split_once(':').unwrap_or((part, "1"));
        let step: usize = step.parse().ok().filter(|s| *s > 0)?;
        match range.split_once('-') {
            Some((a, b)) => ids.extend((a.parse::<u32>().ok()?..=b.parse().ok()?).step_by(step)),
            None => ids.push(range.parse().ok()?),
        }
    }
    Some(ids)
}

fn job_line(j: roxmltree::Node) -> Result<QstatJob, SchedError> {
    let bad = |what, value: &str| odd("qstat -xml", what, value);
    let id = text(j, "JB_job_number").ok_or_else(|| bad("a job without number", ""))?;
    let letters = text(j, "state").unwrap_or_default();
    let state = SgeState::parse(letters).ok_or_else(|| bad("a job state", letters))?;
    let tasks = match text(j, "tasks") {
        Some(t) => parse_tasks(t).ok_or_else(|| bad("array tasks", t))?,
        None => Vec::new(),
    };
    let at = text(j, "queue_name").and_then(|q| q.split_once('@'));
    let h_rt = j
        .children()
        .find(|c| c.has_tag_name("hard_request") && c.attribute("name") == Some("h_rt"))
        .and_then(|c| c.text())
        .and_then(parse_seconds);
    Ok(QstatJob {
        id: id.into(),
        name: text(j, "full_job_name")
            .or(text(j, "JB_name"))
            .unwrap_or_default()
            .into(),
        state,
        letters: letters.into(),
        tasks,
        queue: at
            .map(|(q, _)| q)
            .or(text(j, "hard_req_queue"))
            .map(String::from),
        host: at.map(|(_, h)| h.to_string()),
        started: text(j, "JAT_start_time").and_then(parse_local_time),
        h_rt,
    })
}

/// Every job line of `qstat [-r] -xml` (running ones first, as listed).
fn parse_qstat(doc: &str) -> Result<Vec<QstatJob>, SchedError> {
    let doc = xml("qstat -xml", doc)?;
    doc.descendants()
        .filter(|n| n.has_tag_name("job_list"))
        .map(job_line)
        .collect()
}

// ---- qstat -j -xml -------------------------------------------------------------

/// Why jobs wait, from `qstat -j A,B -xml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Reasons {
    /// The scheduler's messages about each job, by job id.
    by_job: HashMap<String, Vec<String>>,
    /// Its messages about the whole cluster.
    global: Vec<String>,
    /// Why Grid Engine could not start a job (state `E`), by job id.
    errors: HashMap<String, Vec<String>>,
    /// The jobs qstat described.
    jobs: Vec<String>,
}

impl Reasons {
    /// What to tell the user about job `id`: its error, else its own
    /// messages, else the cluster's; None when qstat says nothing.
    fn reason(&self, id: &str) -> Option<String> {
        [self.errors.get(id), self.by_job.get(id), Some(&self.global)]
            .into_iter()
            .flatten()
            .find(|m| !m.is_empty())
            .map(|m| m.join("; "))
    }
}

fn texts<'a>(node: roxmltree::Node<'a, '_>, tag: &'a str) -> impl Iterator<Item = String> + 'a {
    node.descendants()
        .filter(move |n| n.has_tag_name(tag))
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_string())
}

fn push_unique(list: &mut Vec<String>, m: String) {
    if !m.is_empty() && !list.contains(&m) {
        list.push(m);
    }
}

/// Reads `qstat -j IDS -xml`.
fn parse_qstat_j(doc: &str) -> Result<Reasons, SchedError> {
    let doc = xml("qstat -j -xml", doc)?;
    let mut r = Reasons::default();
    for n in doc.descendants() {
        match n.tag_name().name() {
            "djob_info" => {
                for job in n.children().filter(|c| c.has_tag_name("element")) {
                    let Some(id) = text(job, "JB_job_number") else {
                        continue;
                    };
                    r.jobs.push(id.into());
                    let errors = r.errors.entry(id.into()).or_default();
                    texts(job, "QIM_message").for_each(|m| push_unique(errors, m));
                }
            }
            "SME_message_list" => {
                for m in n.children().filter(|c| c.has_tag_name("element")) {
                    let Some(msg) = text(m, "MES_message") else {
                        continue;
                    };
                    for id in texts(m, "ULNG_value") {
                        push_unique(r.by_job.entry(id).or_default(), msg.into());
                    }
                }
            }
            "SME_global_message_list" => {
                for m in texts(n, "MES_message").collect::<Vec<_>>() {
                    push_unique(&mut r.global, m);
                }
            }
            _ => {}
        }
    }
    r.errors.retain(|_, v| !v.is_empty());
    Ok(r)
}

// ---- qacct -j --------------------------------------------------------------------

/// One record of `qacct -j` (one per array task).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct AcctRecord {
    job: String,
    task: Option<u32>,
    name: String,
    queue: String,
    host: String,
    /// Grid Engine's failure code (0: it ran the job to its end) and its words.
    failed: u32,
    failed_reason: String,
    exit_status: i32,
    wallclock: Option<Duration>,
    /// The request, e.g. `-q batch -l h_rt=600,h_vmem=1G`.
    category: String,
}

impl AcctRecord {
    /// Its id as noyau names it: the job's, or its task's (`ID.TASK`).
    fn id(&self) -> String {
        match self.task {
            Some(t) => format!("{}.{t}", self.job),
            None => self.job.clone(),
        }
    }

    fn ending(&self) -> Ending {
        match self.failed {
            0 => Ending::Exited(self.exit_status),
            37 => match (self.wallclock, category_h_rt(&self.category)) {
                (Some(ran), Some(h_rt)) if ran >= h_rt => Ending::Walltime,
                _ => Ending::Limit(self.failed_reason.clone()),
            },
            100 if self.exit_status > 128 => Ending::Signalled(self.exit_status - 128),
            code => Ending::Failed {
                code,
                reason: self.failed_reason.clone(),
            },
        }
    }
}

/// Reads `qacct -j`'s records (fields it does not use are skipped). Each
/// record starts with a line of `=`.
fn parse_qacct(out: &str) -> Result<Vec<AcctRecord>, SchedError> {
    let mut records: Vec<AcctRecord> = Vec::new();
    for line in out.lines() {
        if line.starts_with("====") {
            records.push(AcctRecord::default());
        } else if let Some(r) = records.last_mut() {
            let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            acct_field(r, key, value.trim())?;
        }
    }
    match records.iter().find(|r| r.job.is_empty()) {
        Some(_) => Err(odd("qacct -j", "a record without", "jobnumber")),
        None => Ok(records),
    }
}

fn acct_field(r: &mut AcctRecord, key: &str, value: &str) -> Result<(), SchedError> {
    let bad = |what| odd("qacct -j", what, value);
    let first = value.split_whitespace().next().unwrap_or("");
    match key {
        "jobnumber" => r.job = value.into(),
        "taskid" => r.task = value.parse().ok(),
        "jobname" => r.name = value.into(),
        "qname" => r.queue = value.into(),
        "hostname" => r.host = value.into(),
        "failed" => {
            r.failed = first.parse().map_err(|_| bad("a failure code"))?;
            r.failed_reason = value.split_once(':').map_or("", |(_, w)| w.trim()).into();
        }
        "exit_status" => r.exit_status = first.parse().map_err(|_| bad("an exit status"))?,
        // `31s` (8.1.9), `31` (6.2), `31.250` (UGE)
        "ru_wallclock" => {
            let secs = first.trim_end_matches('s').parse::<f64>().ok();
            r.wallclock = secs
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64);
        }
        "category" => r.category = value.into(),
        _ => {}
    }
    Ok(())
}

/// How a job ended, from its accounting record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// The script ended with this status.
    Exited(i32),
    /// Killed by this signal: by `qdel` (SIGKILL, or SIGUSR2 for a job
    /// that does not handle it) or anyone else.
    Signalled(i32),
    /// Killed at its `h_rt`.
    Walltime,
    /// Killed at a limit Grid Engine enforces (h_rt, h_cpu or h_vmem).
    Limit(String),
    /// Grid Engine could not run it, or not to its end.
    Failed { code: u32, reason: String },
}

impl Ending {
    fn end(&self) -> JobEnd {
        JobEnd {
            description: self.to_string(),
            success: *self == Ending::Exited(0),
        }
    }
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Exited(0) => write!(f, "completed"),
            Ending::Exited(c) => write!(f, "failed (exit code {c})"),
            Ending::Signalled(s) => write!(f, "was killed by signal {s} (cancelled, or a kill)"),
            Ending::Walltime => write!(f, "reached its walltime (Grid Engine h_rt)"),
            Ending::Limit(r) => write!(f, "was killed at a Grid Engine limit ({r})"),
            Ending::Failed { code, reason } => {
                write!(f, "was not run by Grid Engine (failed {code}: {reason})")
            }
        }
    }
}

/// The `h_rt` of a qacct category (`-q batch -l h_rt=600,h_vmem=1G`).
fn category_h_rt(category: &str) -> Option<Duration> {
    category
        .split_whitespace()
        .flat_map(|w| w.split(','))
        .find_map(|r| r.strip_prefix("h_rt="))
        .and_then(parse_seconds)
}

// ---- qstat -f -F slots -xml ------------------------------------------------------

/// A queue on one host, from `qstat -f -F slots -xml`.
#[derive(Debug, Clone, Default, PartialEq)]
struct QueueInstance {
    queue: String,
    /// Its state letters (`d` disabled, `u` unknown, `a` alarm, `s`
    /// suspended, `E` error, `C` calendar…): empty when it takes jobs.
    state: String,
    slots_total: u32,
    slots_used: u32,
    slots_resv: u32,
    /// The host's free slots (`-F slots`: a host consumable), when it
    /// limits them.
    host_slots: Option<f64>,
}

impl QueueInstance {
    /// Slots a new job could have here now: none in any state but the
    /// plain one, else the least of the queue's and the host's.
    fn free_slots(&self) -> u32 {
        if !self.state.is_empty() {
            return 0;
        }
        let queue = self
            .slots_total
            .saturating_sub(self.slots_used + self.slots_resv);
        let host = self.host_slots.map_or(u32::MAX, |v| v.max(0.0) as u32);
        queue.min(host)
    }
}

/// Reads `qstat -f -F slots -xml`'s queue instances (their job lists skipped).
fn parse_queues(doc: &str) -> Result<Vec<QueueInstance>, SchedError> {
    let doc = xml("qstat -f -xml", doc)?;
    let num = |n, tag| text(n, tag).and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut out = Vec::new();
    for q in doc.descendants().filter(|n| n.has_tag_name("Queue-List")) {
        let name = text(q, "name").unwrap_or_default();
        let queue = name.split_once('@').map_or(name, |(q, _)| q);
        let host_slots = q
            .children()
            .find(|r| r.has_tag_name("resource") && r.attribute("name") == Some("slots"))
            .and_then(|r| r.text())
            .and_then(|v| v.trim().parse().ok());
        out.push(QueueInstance {
            queue: queue.into(),
            state: text(q, "state").unwrap_or_default().into(),
            slots_total: num(q, "slots_total"),
            slots_used: num(q, "slots_used"),
            slots_resv: num(q, "slots_resv"),
            host_slots,
        });
    }
    Ok(out)
}

/// Free and total slots of each cluster queue, over its hosts (in the
/// order qstat lists them). Two queues on one host each count its free
/// slots: they share them.
fn free_by_queue(instances: &[QueueInstance]) -> Vec<PartitionLoad> {
    let mut out: Vec<PartitionLoad> = Vec::new();
    for i in instances {
        let pos = match out.iter().position(|q| q.partition == i.queue) {
            Some(p) => p,
            None => {
                out.push(PartitionLoad {
                    partition: i.queue.clone(),
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        out[pos].idle_cores += u64::from(i.free_slots());
        out[pos].total_cores += u64::from(i.slots_total);
    }
    out
}

// ---- the scheduler ---------------------------------------------------------------

impl Sge {
    /// Writes the 0600 environment file and pipes the script to qsub,
    /// which runs with [`qsub_env`] only; the job's id and the files.
    async fn qsub(&self, spec: &JobSpec) -> Result<(String, Vec<std::path::PathBuf>), SchedError> {
        let args = qsub_args(spec)?;
        let mut files = JobFiles::new(self.name(), spec)?;
        let script = match files.write_env(spec) {
            Ok(env_file) => job_script(&head(spec, &env_file), spec),
            Err(e) => {
                files.remove();
                return Err(e);
            }
        };
        let out = self
            .cmds
            .cmd("qsub")
            .args(args)
            .env_clear()
            .envs(&qsub_env(std::env::vars()))
            .stdin(script)
            .output()
            .await
            .map_err(SchedError::Submit)
            .and_then(|o| parse_qsub(&o));
        match out {
            Ok(id) => Ok((id, files.written)),
            Err(e) => {
                files.remove();
                Err(e)
            }
        }
    }

    /// Why the jobs `ids` wait: one `qstat -j`; nothing when it fails
    /// (the jobs then wait without a reason, their state is still known).
    async fn reasons(&self, ids: &[String]) -> Reasons {
        let out = self
            .cmds
            .cmd("qstat")
            .args(["-j".to_string(), ids.join(","), "-xml".into()])
            .output()
            .await;
        match out
            .map_err(SchedError::from)
            .and_then(|o| parse_qstat_j(&o))
        {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!("no reasons for waiting jobs: {why}");
                Reasons::default()
            }
        }
    }

    /// The accounting records of job `job` (every task of an array); none
    /// while qacct has no record of it yet.
    async fn records(&self, job: &str) -> Vec<AcctRecord> {
        let out = self.cmds.cmd("qacct").args(["-j", job]).output().await;
        let parsed = match out {
            Ok(o) => parse_qacct(&o),
            Err(e) if e.said().is_some_and(|s| qacct_not_found(&s)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        };
        parsed.unwrap_or_else(|why| {
            tracing::debug!("qacct cannot say how job {job} ended: {why}");
            Vec::new()
        })
    }
}

#[async_trait]
impl Batch for Sge {
    fn name(&self) -> &'static str {
        "sge"
    }

    fn display(&self) -> &'static str {
        "Grid Engine"
    }

    fn queue_word(&self) -> &'static str {
        "Queue"
    }

    fn commands(&self) -> &'static [&'static str] {
        &["qsub", "qstat", "qdel", "qacct"]
    }

    fn config_vars(&self) -> &'static [&'static str] {
        &[
            "SGE_ROOT",
            "SGE_CELL",
            "SGE_QMASTER_PORT",
            "SGE_EXECD_PORT",
            "SGE_CLUSTER_NAME",
        ]
    }

    /// `JOB_ID` (and `SGE_TASK_ID`, `undefined` outside an array), which
    /// Grid Engine sets in every job.
    fn job_in_env(&self) -> Option<String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let job = var("JOB_ID")?;
        match var("SGE_TASK_ID")?.as_str() {
            "undefined" => Some(job),
            task => Some(format!("{job}.{task}")),
        }
    }

    fn walltime_signal(&self) -> i32 {
        libc::SIGUSR2
    }

    fn signal_means_cancel(&self) -> bool {
        before_the_end(
            std::env::var(EnvVars::NOYAU_SGE_END).ok().as_deref(),
            SystemTime::now(),
        )
    }

    /// Local processes: the job's slots are on one host.
    fn tasks_python(&self) -> &'static str {
        ""
    }

    fn keys(&self) -> &'static [Key] {
        KEYS
    }

    fn foreign_hint(&self) -> &'static str {
        "on Grid Engine, name the parallel environment with `pe` and the site's memory \
         resource with `mem_resource`, and pass other qsub arguments in `qsub` \
         (e.g. qsub = [\"-l\", \"gpu=1\"])"
    }

    async fn dry_run(&self, spec: &JobSpec) -> Result<String, SchedError> {
        let args: Vec<String> = qsub_args(spec)?.iter().map(|a| sh_quote(a)).collect();
        let env_file = crate::jobfiles::job_dir(self.name()).join(format!("{}.env", spec.name));
        Ok(format!(
            "# qsub {} < (this script)\n{}",
            args.join(" "),
            job_script(&head(spec, &env_file), spec)
        ))
    }

    async fn submit(&self, spec: &JobSpec, u: Option<&AsUser>) -> Result<Submission, SchedError> {
        if let Some(u) = u {
            return submit_as(u, self, &self.cmds, spec).await;
        }
        if spec.profile.walltime_signal.is_some() {
            tracing::warn!(
                "walltime_signal is not used on Grid Engine: its jobs get SIGUSR2 at h_rt, \
                 with the queue's notify delay to save"
            );
        }
        let (id, files) = self.qsub(spec).await?;
        Ok(match &spec.array {
            // (the script deletes its file itself)
            None => Submission {
                id,
                files,
                ..Default::default()
            },
            Some(t) => Submission {
                tasks: (1..=t.ids.len()).map(|k| format!("{id}.{k}")).collect(),
                note: if t.limited() {
                    format!("-t 1-{} -tc {}", t.ids.len(), t.max_parallel)
                } else {
                    format!("-t 1-{}", t.ids.len())
                },
                id,
                files,
                held: false,
            },
        })
    }

    /// `qdel ID…` (`ID.TASK` for a task); a job already gone is no error.
    async fn cancel(&self, ids: &[String], u: Option<&AsUser>) -> Result<(), SchedError> {
        let out = self
            .cmds
            .cmd("qdel")
            .args(ids.iter().cloned())
            .run_as(u, self.config_vars())
            .output()
            .await;
        match out {
            Err(e) if !e.said().is_some_and(|s| qdel_done(&s)) => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// `qstat -r -xml -u USER` (`-u *`: everyone's), and `qstat -j` for
    /// why the jobs that wait do.
    async fn list(
        &self,
        scope: Scope,
        _ids: Option<&[String]>,
    ) -> Result<Vec<JobInfo>, SchedError> {
        let user = match scope {
            Scope::Mine => user_name()?,
            Scope::All => "*".into(),
        };
        let out = self
            .cmds
            .cmd("qstat")
            .args(["-r", "-xml", "-u", &user])
            .output()
            .await?;
        let jobs = parse_qstat(&out)?;
        let mut waiting: Vec<String> = jobs
            .iter()
            .filter(|j| {
                matches!(
                    j.state,
                    SgeState::Pending | SgeState::Held | SgeState::Error
                )
            })
            .map(|j| j.id.clone())
            .collect();
        waiting.dedup();
        let why = match waiting.is_empty() {
            true => Reasons::default(),
            false => self.reasons(&waiting).await,
        };
        Ok(jobs
            .iter()
            .flat_map(|j| {
                let state = j.job_state(&why);
                j.ids().into_iter().map(move |id| JobInfo {
                    id,
                    name: j.name.clone(),
                    state: state.clone(),
                    word: j.letters.clone(),
                })
            })
            .collect())
    }

    /// `qstat -u USER` shows every job of the user's that has not ended.
    fn shares_listing(&self) -> bool {
        true
    }

    /// `qacct -j` of each job: the ends it records (those it has no
    /// record of yet are asked again, see `records_lag`).
    async fn gone(&self, ids: &[String]) -> HashMap<String, JobEnd> {
        let mut jobs: Vec<&str> = ids
            .iter()
            .map(|id| id.split_once('.').map_or(id.as_str(), |(j, _)| j))
            .collect();
        jobs.sort_unstable();
        jobs.dedup();
        let mut ends = HashMap::new();
        for job in jobs {
            for r in self.records(job).await {
                let id = r.id();
                if ids.contains(&id) {
                    ends.insert(id, r.ending().end());
                }
            }
        }
        ends
    }

    /// Accounting is flushed every `accounting_flush_time` (15 s by
    /// default); a job deleted while it waited never has a record.
    fn records_lag(&self) -> Duration {
        Duration::from_secs(30)
    }

    async fn extend(
        &self,
        id: &str,
        _secs: u64,
        _u: Option<&AsUser>,
    ) -> Result<String, SchedError> {
        Err(SchedError::Unsupported(format!(
            "Grid Engine cannot extend the walltime of a running job (the execution host \
             keeps the h_rt job {id} started with, whatever qalter says): resubmit with a \
             longer `time`"
        )))
    }

    /// `qstat -f -F slots -xml`: free and total slots per queue.
    async fn partitions(&self) -> Result<Vec<PartitionLoad>, SchedError> {
        let out = self
            .cmds
            .cmd("qstat")
            .args(["-f", "-F", "slots", "-xml", "-u", &user_name()?])
            .output()
            .await?;
        Ok(free_by_queue(&parse_queues(&out)?))
    }
}

/// Every parser of this file on `text` (see `crate::fuzzing`).
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz(text: &str) {
    if let Ok(jobs) = parse_qstat(text) {
        let why = parse_qstat_j(text).unwrap_or_default();
        for j in jobs {
            let _ = (j.ids(), j.job_state(&why));
        }
    }
    if let Ok(records) = parse_qacct(text) {
        for r in records {
            let _ = (r.id(), r.ending().end());
        }
    }
    if let Ok(q) = parse_queues(text) {
        let _ = free_by_queue(&q);
    }
    let _ = parse_qsub(text);
    let _ = parse_tasks(text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ArrayTasks;

    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sge")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn profile(overrides: &[&str]) -> Profile {
        let mut p = Profile::default();
        for o in overrides {
            p.apply_override(o).unwrap();
        }
        p
    }

    fn spec(p: Profile, array: Option<ArrayTasks>) -> JobSpec {
        JobSpec {
            name: "noyau-kernel-python3".into(),
            program: "/opt/noyau bin/noyau".into(),
            args: vec!["agent".into()],
            env: [("NOYAU_LINK_TOKEN".to_string(), "s3cret-token".to_string())].into(),
            cwd: Some("/home/u/my nb".into()),
            profile: p,
            array,
            log_dir: Some("/home/u/.local/state/noyau/jobs".into()),
        }
    }

    fn args(p: Profile, array: Option<ArrayTasks>) -> String {
        qsub_args(&spec(p, array)).unwrap().join(" ")
    }

    fn tasks(n: usize, k: usize) -> Option<ArrayTasks> {
        Some(ArrayTasks {
            ids: (0..n).collect(),
            max_parallel: k,
        })
    }

    #[test]
    fn qsub_arguments_from_a_profile() {
        let full = ["queue=batch", "project=proj1", "time=1:30:00", "ntasks=2"];
        let p = profile(
            &[
                &full[..],
                &["cpus_per_task=2", "mem=4G", "qsub=-l", "qsub=gpu=1"],
            ]
            .concat(),
        );
        let a = qsub_args(&spec(p.clone(), None)).unwrap();
        let joined = a.join(" ");
        for want in [
            "-terse -N noyau-kernel-python3 -S /bin/sh -r n -notify -j y",
            "-o /home/u/.local/state/noyau/jobs/noyau-kernel-python3-$JOB_ID.log",
            "-q batch",
            "-P proj1",
            "-pe smp 4",
            "-l h_rt=5400,h_vmem=1024M -l gpu=1",
        ] {
            assert!(joined.contains(want), "missing {want:?} in {joined}");
        }
        // a directory with a space stays one argument
        assert!(a.windows(2).any(|w| w == ["-wd", "/home/u/my nb"]), "{a:?}");
        assert!(
            !joined.contains("-t ") && !joined.contains("s3cret"),
            "{joined}"
        );

        // the site's parallel environment and memory resource
        let site = profile(&[
            "pe=threads",
            "mem_resource=m_mem_free",
            "mem=4G",
            "cpus_per_task=4",
        ]);
        let a = args(site, None);
        assert!(
            a.contains("-pe threads 4") && a.contains("-l m_mem_free=1024M"),
            "{a}"
        );

        // one core, no limit, qsub's own directory
        let mut s = spec(profile(&["queue=all.q", "time=UNLIMITED"]), None);
        s.cwd = None;
        let a = qsub_args(&s).unwrap().join(" ");
        assert!(a.contains("-cwd -q all.q"), "{a}");
        assert!(!a.contains("-pe") && !a.contains("-l "), "{a}");
    }

    #[test]
    fn qsub_arrays_and_refusals() {
        let a = args(Profile::default(), tasks(6, 2));
        assert!(a.contains("-t 1-6 -tc 2"), "{a}");
        assert!(
            a.contains("noyau-kernel-python3-$JOB_ID.$TASK_ID.log"),
            "{a}"
        );
        assert!(args(Profile::default(), tasks(3, 3)).ends_with("-t 1-3"));

        let huge = Profile {
            ntasks: Some(u32::MAX),
            cpus_per_task: Some(2),
            ..Default::default()
        };
        assert!(args(huge, None).contains(&format!("-pe smp {}", u32::MAX)));
        let two = Profile {
            nodes: Some(2),
            ..Default::default()
        };
        let e = qsub_args(&spec(two, None)).unwrap_err().to_string();
        assert!(
            e.contains("nodes = 2") && e.contains("cpus_per_task"),
            "{e}"
        );
        let bad = Profile {
            time: Some("1h".into()),
            ..Default::default()
        };
        let e = qsub_args(&spec(bad, None)).unwrap_err().to_string();
        assert!(e.contains("not a Slurm time"), "{e}");

        // a log directory with a colon: `-o` would read HOST:PATH
        let mut s = spec(Profile::default(), None);
        s.log_dir = Some("/scratch/a:b".into());
        let a = qsub_args(&s).unwrap();
        assert!(
            a.contains(&":/scratch/a:b/noyau-kernel-python3-$JOB_ID.log".to_string()),
            "{a:?}"
        );
        // the log is where JobSpec::log_path says, for a job and for a task
        let s = spec(Profile::default(), None);
        assert_eq!(
            log_path(&s).replace("$JOB_ID", "7"),
            s.log_path("7").display().to_string()
        );
        let s = spec(Profile::default(), tasks(2, 2));
        assert_eq!(
            log_path(&s)
                .replace("$JOB_ID", "7")
                .replace("$TASK_ID", "2"),
            s.log_path("7.2").display().to_string()
        );
    }

    #[test]
    fn the_script_sources_the_secrets_and_says_when_h_rt_comes() {
        let s = spec(profile(&["time=10:00"]), None);
        let script = job_script(&head(&s, Path::new("/s/x.env")), &s);
        assert!(
            script.contains("NOYAU_SGE_END=$(( $(date +%s) + 600 )); export NOYAU_SGE_END\n"),
            "{script}"
        );
        assert!(
            script.contains(". /s/x.env && rm -f /s/x.env\n"),
            "{script}"
        );
        assert!(
            script.ends_with("exec '/opt/noyau bin/noyau' agent\n"),
            "{script}"
        );
        assert!(!script.contains("s3cret"));
        let s = spec(Profile::default(), tasks(3, 1));
        let script = job_script(&head(&s, Path::new("/s/x.env")), &s);
        assert!(
            !script.contains("NOYAU_SGE_END") && !script.contains("rm -f"),
            "{script}"
        );
        assert!(script.contains(". /s/x.env\nset -- 0 1 2\n"), "{script}");
    }

    #[test]
    fn sigusr2_before_h_rt_is_a_cancel() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert!(before_the_end(Some("1000"), at(900)));
        assert!(!before_the_end(Some("1000"), at(950)));
        assert!(!before_the_end(Some("1000"), at(1010)));
        assert!(before_the_end(None, at(1)));
        assert!(before_the_end(Some("garbage"), at(1)));
    }

    #[test]
    fn job_names_grid_engine_takes() {
        assert_eq!(job_name("noyau-kernel-python3"), "noyau-kernel-python3");
        assert_eq!(
            job_name("noyau-run-a b;c/d:e@f*g?h"),
            "noyau-run-a_b_c_d_e_f_g_h"
        );
        assert_eq!(job_name("1abc"), "j1abc");
        assert_eq!(job_name("é"), "_");
        assert_eq!(job_name(""), "j");
    }

    #[test]
    fn array_task_ids_map_from_one() {
        let lines = array_task_id(&[0, 1, 4, 7]);
        for (task, want) in [(1, "0"), (3, "4"), (4, "7")] {
            let out = std::process::Command::new("sh")
                .args(["-c", &format!("{lines}echo \"$NOYAU_ARRAY_TASK_ID $#\"")])
                .env("SGE_TASK_ID", task.to_string())
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{want} 0\n"));
        }
    }

    #[test]
    fn qsub_environment_holds_no_secret() {
        let env = qsub_env(
            [
                ("PATH", "/usr/bin"),
                ("SGE_ROOT", "/var/lib/gridengine"),
                ("SGE_CELL", "default"),
                ("LC_ALL", "C"),
                ("NOYAU_LINK_TOKEN", "s3cret"),
                ("JUPYTERHUB_API_TOKEN", "s3cret"),
                ("AWS_SECRET_ACCESS_KEY", "s3cret"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let keys: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(keys, ["LC_ALL", "PATH", "SGE_CELL", "SGE_ROOT"]);
    }

    #[test]
    fn qsub_and_qdel_output() {
        assert_eq!(parse_qsub("26\n").unwrap(), "26");
        assert_eq!(parse_qsub("32.1-6:1\n").unwrap(), "32");
        for bad in ["", "\n", "Unable to run job: denied\nExiting.\n", "12 34"] {
            let e = parse_qsub(bad).unwrap_err().to_string();
            assert!(e.contains("qsub printed no job id"), "{bad:?}: {e}");
        }
        assert!(qdel_done("root has registered the job 5 for deletion\n"));
        assert!(qdel_done(
            "root has deleted job-array task 22.3\ndenied: job \"9\" does not exist\n"
        ));
        assert!(!qdel_done(
            "root - you do not have the necessary privileges to delete job \"3\"\n"
        ));
        assert!(qacct_not_found("error: job id 29 not found\n"));
    }

    #[test]
    fn qstat_lists_running_waiting_held_and_failed_jobs() {
        let jobs = parse_qstat(&fixture("qstat-r-u.xml")).unwrap();
        let ids: Vec<(&str, SgeState, &[u32])> = jobs
            .iter()
            .map(|j| (j.id.as_str(), j.state, j.tasks.as_slice()))
            .collect();
        use SgeState::*;
        assert_eq!(
            ids,
            [
                ("73", Running, &[][..]),
                ("76", Running, &[1][..]),
                ("80", Suspended, &[][..]),
                ("75", Pending, &[][..]),
                ("79", Error, &[][..]),
                ("76", Pending, &[2, 3, 4][..]),
                ("77", Held, &[][..]),
                ("78", Held, &[][..]),
            ]
        );
        let k = &jobs[0];
        assert_eq!(k.name, "noyau-kernel-py");
        assert_eq!(
            (k.queue.as_deref(), k.host.as_deref()),
            (Some("all.q"), Some("vm"))
        );
        let start = k.started.unwrap();
        assert_eq!(k.h_rt, Some(Duration::from_secs(300)));
        assert_eq!(
            k.job_state(&Reasons::default()),
            JobState::Running {
                node: "vm".into(),
                ends_at: Some(start + Duration::from_secs(300))
            }
        );
        let waiting = &jobs[3];
        assert_eq!(
            (waiting.queue.as_deref(), waiting.host.as_deref()),
            (Some("batch"), None)
        );
        assert!(waiting.started.is_none());
        // an array's waiting tasks: one id each
        assert_eq!(jobs[5].ids(), ["76.2", "76.3", "76.4"]);
        assert_eq!(jobs[1].ids(), ["76.1"]);
        assert_eq!(jobs[0].ids(), ["73"]);

        // without -r: no request, the queue only where it runs
        let plain = parse_qstat(&fixture("qstat-u-running.xml")).unwrap();
        assert!(plain.iter().all(|j| j.h_rt.is_none()));
        assert!(plain
            .iter()
            .any(|j| j.state == Error && j.name == "noyau-test-eqw"));
        let pending = parse_qstat(&fixture("qstat-u-pending.xml")).unwrap();
        let array = pending.iter().find(|j| j.id == "32").unwrap();
        assert_eq!((array.state, array.tasks.len()), (Pending, 6));
        assert_eq!(
            parse_qstat("<job_info><queue_info/><job_info/></job_info>").unwrap(),
            []
        );
    }

    #[test]
    fn waiting_jobs_say_why() {
        let jobs = parse_qstat(&fixture("qstat-r-u.xml")).unwrap();
        let why = parse_qstat_j(&fixture("qstat-j-mixed.xml")).unwrap();
        let state = |id: &str| {
            let j = jobs.iter().find(|j| j.id == id).unwrap();
            j.job_state(&why)
        };
        assert!(
            matches!(state("75"), JobState::Pending { ref reason, partition: Some(ref p), start: None }
                if reason.contains("offers only hc:slots=0") && p == "batch"),
            "{:?}",
            state("75")
        );
        assert!(
            matches!(state("77"), JobState::Pending { ref reason, .. } if reason == "Job is in hold state")
        );
        assert!(
            matches!(state("79"), JobState::Pending { ref reason, .. }
                if reason.starts_with("in error: ") && reason.contains("can't open output file")),
            "{:?}",
            state("79")
        );
        // nothing from qstat -j: the state's own word
        let none = Reasons::default();
        let j = jobs.iter().find(|j| j.id == "75").unwrap();
        assert!(
            matches!(j.job_state(&none), JobState::Pending { ref reason, .. } if reason == "waiting")
        );
        assert!(matches!(jobs[1].job_state(&none), JobState::Running { .. }));
        assert!(matches!(jobs[2].job_state(&none), JobState::Running { .. }));
    }

    #[test]
    fn qstat_refuses_what_it_cannot_read() {
        let e = parse_qstat("<job_info><job_list").unwrap_err();
        assert!(e.to_string().contains("qstat -xml"), "{e}");
        let odd = "<job_info><job_list><JB_job_number>1</JB_job_number><state>X</state></job_list></job_info>";
        let e = parse_qstat(odd).unwrap_err().to_string();
        assert!(e.contains("a job state") && e.contains("\"X\""), "{e}");
        let odd = "<job_info><job_list><JB_job_number>1</JB_job_number><state>qw</state><tasks>a-b</tasks></job_list></job_info>";
        assert!(parse_qstat(odd).is_err());
    }

    #[test]
    fn states_times_and_tasks() {
        use SgeState::*;
        for (letters, want) in [
            ("r", Running),
            ("t", Running),
            ("Rr", Running),
            ("hr", Running),
            ("qw", Pending),
            ("Rq", Pending),
            ("hqw", Held),
            ("Eqw", Error),
            ("dr", Deleting),
            ("dt", Deleting),
            ("s", Suspended),
            ("S", Suspended),
            ("T", Suspended),
        ] {
            assert_eq!(SgeState::parse(letters), Some(want), "{letters}");
        }
        assert_eq!(SgeState::parse(""), None);
        assert_eq!(SgeState::parse("z"), None);
        let t = parse_local_time("2026-12-06T01:36:20").unwrap();
        let uge = parse_local_time("2026-12-06T01:36:20.250").unwrap();
        assert_eq!(uge.duration_since(t).unwrap(), Duration::from_millis(250));
        assert!(parse_local_time("12/06/2026 01:36:20").is_none());
        assert_eq!(parse_seconds("1:00:00"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_seconds("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_seconds("INFINITY"), None);
        assert_eq!(parse_seconds("99999999999999999999"), None);
        assert_eq!(parse_tasks("3-6:1"), Some(vec![3, 4, 5, 6]));
        assert_eq!(parse_tasks("1-9:4,12"), Some(vec![1, 5, 9, 12]));
        assert_eq!(parse_tasks("3,5"), Some(vec![3, 5]));
        assert_eq!(parse_tasks("1-3:0"), None);
        assert_eq!(parse_tasks(""), None);
    }

    #[test]
    fn reasons_of_waiting_jobs() {
        let r = parse_qstat_j(&fixture("qstat-j-mixed.xml")).unwrap();
        assert_eq!(r.jobs, ["75", "76", "77", "78", "79"]);
        assert_eq!(
            r.reason("75").unwrap(),
            "(-l slots=1) cannot run in queue \"vm\" because it offers only hc:slots=0.000000; \
             cannot run in PE \"smp\" because it only offers 0 slots"
        );
        assert_eq!(r.reason("77").unwrap(), "Job is in hold state");
        assert_eq!(
            r.reason("78").unwrap(),
            "job dropped because of job dependencies"
        );
        // a job in error: its error, not "Job is in error state"
        let e = r.reason("79").unwrap();
        assert!(
            e.contains("can't open output file \"/nonexistent/x.log\""),
            "{e}"
        );
        assert_eq!(
            r.global,
            ["queue instance \"all.q@vm\" dropped because it is full"]
        );
        // a job qstat says nothing of: the cluster's words
        assert_eq!(r.reason("1").unwrap(), r.global[0]);

        let full = parse_qstat_j(&fixture("qstat-j-pending.xml")).unwrap();
        let why = full.reason("28").unwrap();
        assert!(why.contains("offers only hc:slots=0"), "{why}");
        let eqw = parse_qstat_j(&fixture("qstat-j-eqw.xml")).unwrap();
        assert!(eqw.reason("31").unwrap().contains("can't open output file"));
        assert_eq!(eqw.reason("29").unwrap(), "Job is in hold state");

        let gone = parse_qstat_j(&fixture("qstat-j-unknown.xml")).unwrap();
        assert!(gone.jobs.is_empty() && gone.reason("99999").is_none());
        assert!(parse_qstat_j("not xml").is_err());
    }

    fn ending(file: &str) -> Vec<(String, Ending)> {
        parse_qacct(&fixture(file))
            .unwrap()
            .iter()
            .map(|r| (r.id(), r.ending()))
            .collect()
    }

    #[test]
    fn endings_from_qacct() {
        let ids = |v: Vec<(String, Ending)>| v.into_iter().map(|(_, e)| e).collect::<Vec<_>>();
        assert_eq!(ids(ending("qacct-exit0.txt")), [Ending::Exited(0)]);
        assert!(Ending::Exited(0).end().success && !Ending::Exited(3).end().success);
        assert_eq!(ids(ending("qacct-exit3.txt")), [Ending::Exited(3)]);
        assert_eq!(ids(ending("qacct-signal.txt")), [Ending::Signalled(9)]);
        assert_eq!(ids(ending("qacct-qdel.txt")), [Ending::Signalled(9)]);
        assert_eq!(ids(ending("qacct-h_rt.txt")), [Ending::Walltime]);
        let never = ids(ending("qacct-never-started.txt"));
        assert!(
            matches!(&never[0], Ending::Failed { code: 28, reason } if reason == "changing into working directory"),
            "{never:?}"
        );
        assert_eq!(
            ending("qacct-array.txt"),
            [
                ("32.1".to_string(), Ending::Signalled(9)),
                ("32.2".to_string(), Ending::Signalled(9))
            ]
        );
        let r = &parse_qacct(&fixture("qacct-h_rt.txt")).unwrap()[0];
        assert_eq!(r.id(), "3");
        assert_eq!(r.wallclock, Some(Duration::from_secs(31)));
        assert_eq!(r.category, "-l h_rt=20");
        assert!(Ending::Walltime.end().description.contains("walltime"));
    }

    #[test]
    fn qacct_limits_and_garbage() {
        // failed 37 before h_rt (a walltime extended by qalter, or memory)
        let text = fixture("qacct-h_rt.txt").replace("-l h_rt=20", "-l h_rt=60,h_vmem=1G");
        let e = parse_qacct(&text).unwrap()[0].ending();
        assert_eq!(
            e,
            Ending::Limit("qmaster enforced h_rt, h_cpu, or h_vmem limit".into())
        );
        assert_eq!(
            category_h_rt("-q batch -l h_rt=1:00:00,h_vmem=1G"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse_qacct("").unwrap(), []);
        let bad = fixture("qacct-exit3.txt").replace("exit_status  3", "exit_status  x");
        let e = parse_qacct(&bad).unwrap_err().to_string();
        assert!(
            e.contains("qacct -j") && e.contains("an exit status \"x"),
            "{e}"
        );
        assert!(parse_qacct("==========\nqname all.q\n").is_err());
    }

    #[test]
    fn free_slots_per_queue() {
        // all.q holds the host's 4 slots: batch has 4 of its own, none usable
        let full = parse_queues(&fixture("qstat-f-full.xml")).unwrap();
        assert_eq!(full.len(), 2);
        assert_eq!(full[0].queue, "all.q");
        let got: Vec<(String, u64, u64)> = free_by_queue(&full)
            .into_iter()
            .map(|q| (q.partition, q.idle_cores, q.total_cores))
            .collect();
        assert_eq!(got, [("all.q".into(), 0, 4), ("batch".into(), 0, 4)]);

        // 2 slots used: all.q has the host's 2 others; batch is disabled
        let some = parse_queues(&fixture("qstat-f-disabled.xml")).unwrap();
        assert_eq!(some[1].state, "d");
        let free = free_by_queue(&some);
        assert_eq!((free[0].idle_cores, free[1].idle_cores), (2, 0));
        assert!(parse_queues("<job_info><queue_info>").is_err());
    }
}
