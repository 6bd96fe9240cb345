//! Son of Grid Engine: what noyau must know of its commands, apart from the
//! job lifecycle (which the scheduler seam owns): the `qsub` arguments of a
//! profile, and the readers of `qsub -terse`, `qstat -r -xml`,
//! `qstat -j -xml`, `qacct -j` and `qstat -f -F -xml`. Pure functions: the
//! caller runs the commands ([`qstat_args`] and the like say how).
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
//!   `mem_free`: the resource is the site's ([`Site::mem_resource`]).
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

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::profile::Profile;

/// What Grid Engine's answers or a request to it could not be made of.
#[derive(Debug, thiserror::Error)]
pub enum SgeError {
    #[error("`qsub` printed no job id: {0:?}")]
    NoJobId(String),
    #[error("`{command}` printed XML that cannot be read: {source}")]
    Xml {
        command: &'static str,
        source: roxmltree::Error,
    },
    #[error("`{command}` printed {what} that is not understood: {value:?}")]
    Field {
        command: &'static str,
        what: &'static str,
        value: String,
    },
    #[error(
        "nodes = {0}: Grid Engine jobs of noyau run on one host (cores with `-pe`); \
         ask for cores with cpus_per_task instead"
    )]
    MultiNode(u32),
    #[error("invalid resource request: {0}")]
    Profile(String),
}

/// What differs between Grid Engine sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// The parallel environment that gives cores on one host (`-pe PE N`).
    pub pe: String,
    /// The per-slot memory resource (`-l RESOURCE=…`): `h_vmem`, UGE's
    /// `m_mem_free`, `mem_free`…
    pub mem_resource: String,
}

impl Default for Site {
    fn default() -> Self {
        Site {
            pe: "smp".into(),
            mem_resource: "h_vmem".into(),
        }
    }
}

/// A job array: how many tasks, how many at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Array {
    pub tasks: usize,
    pub max_parallel: usize,
}

/// One submission's request.
#[derive(Debug, Clone)]
pub struct Submission<'a> {
    /// Shown to every user: no secret (made valid by [`job_name`]).
    pub name: &'a str,
    pub profile: &'a Profile,
    /// Where the job's log goes (`NAME-$JOB_ID.log`).
    pub log_dir: &'a Path,
    /// The job's directory; None: qsub's own (`-cwd`).
    pub cwd: Option<&'a Path>,
    pub array: Option<Array>,
}

/// A job name Grid Engine accepts: ASCII letters, digits, `-_.`, every
/// other character an `_`, never a digit first.
pub fn job_name(name: &str) -> String {
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

/// The log path of `-o`: Grid Engine fills in `$JOB_ID` (and `$TASK_ID`).
fn log_path(sub: &Submission) -> String {
    let file = if sub.array.is_some() {
        format!("{}-$JOB_ID.$TASK_ID.log", job_name(sub.name))
    } else {
        format!("{}-$JOB_ID.log", job_name(sub.name))
    };
    let path = sub.log_dir.join(file).display().to_string();
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

/// The `-l` list: `h_rt` in seconds, memory per slot in megabytes.
fn resources(p: &Profile, site: &Site) -> Result<Vec<String>, SgeError> {
    let mut l = Vec::new();
    if let Some(t) = &p.time {
        let secs = crate::profile::parse_time(t).map_err(|e| SgeError::Profile(e.message))?;
        // 0 is "UNLIMITED": no h_rt
        if secs > 0 {
            l.push(format!("h_rt={secs}"));
        }
    }
    if let Some(m) = p.get("mem") {
        let mb = crate::profile::parse_size(m).map_err(|e| SgeError::Profile(e.message))?;
        let per_slot = mb.div_ceil(u64::from(slots(p)));
        l.push(format!("{}={per_slot}M", site.mem_resource));
    }
    Ok(l)
}

/// The arguments of `qsub` (which reads the script on stdin) for `sub`.
/// They hold no secret: every user sees them in `qstat -j`. Profile keys
/// used: time, ntasks, cpus_per_task, nodes (1 only), mem,
/// queue/partition, project/account.
pub fn qsub_args(sub: &Submission, site: &Site) -> Result<Vec<String>, SgeError> {
    let p = sub.profile;
    if let Some(n) = p.nodes.filter(|n| *n > 1) {
        return Err(SgeError::MultiNode(n));
    }
    let mut a: Vec<String> = ["-terse", "-N", &job_name(sub.name), "-S", "/bin/sh"]
        .map(String::from)
        .into();
    // not rerun after a host failure (a kernel cannot resume); SIGUSR2
    // `notify` seconds before the SIGKILL of h_rt or qdel
    a.extend(["-r", "n", "-notify", "-j", "y", "-o"].map(String::from));
    a.push(log_path(sub));
    match sub.cwd {
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
        a.extend(["-pe".into(), site.pe.clone(), slots(p).to_string()]);
    }
    let l = resources(p, site)?;
    if !l.is_empty() {
        a.extend(["-l".into(), l.join(",")]);
    }
    if let Some(arr) = sub.array {
        a.extend(["-t".into(), format!("1-{}", arr.tasks.max(1))]);
        if arr.max_parallel < arr.tasks {
            a.extend(["-tc".into(), arr.max_parallel.max(1).to_string()]);
        }
    }
    Ok(a)
}

/// Shell lines for an array task's script: `NOYAU_ARRAY_TASK_ID` is the
/// `SGE_TASK_ID`-th of `ids` (Grid Engine numbers tasks from 1, in one
/// range; noyau's ids may start at 0 or have gaps).
pub fn array_task_id(ids: &[usize]) -> String {
    let list: Vec<String> = ids.iter().map(usize::to_string).collect();
    format!(
        "set -- {}\nshift $((SGE_TASK_ID - 1))\nexport NOYAU_ARRAY_TASK_ID=\"$1\"\nset --\n",
        list.join(" ")
    )
}

/// The environment to run `qsub` with (after clearing it): Grid Engine's
/// own settings and a few plain ones, so that a `-V` a site or user
/// `sge_request` adds shows no secret of the caller's.
pub fn qsub_env(vars: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    const PLAIN: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "SHELL"];
    vars.into_iter()
        .filter(|(k, _)| {
            k.starts_with("SGE_") || k.starts_with("LC_") || PLAIN.contains(&k.as_str())
        })
        .collect()
}

/// The job id in `qsub -terse`'s output: `26`, or `32.1-6:1` for an array.
pub fn parse_qsub(out: &str) -> Result<String, SgeError> {
    out.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .and_then(|l| l.split('.').next())
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_string)
        .ok_or_else(|| SgeError::NoJobId(out.to_string()))
}

// ---- the commands ------------------------------------------------------------

/// `qstat` arguments listing `user`'s jobs with their requests.
pub fn qstat_args(user: &str) -> Vec<String> {
    ["-r", "-xml", "-u", user].map(String::from).into()
}

/// `qstat` arguments giving why `ids` wait (one call for all).
pub fn qstat_j_args(ids: &[String]) -> Vec<String> {
    vec!["-j".into(), ids.join(","), "-xml".into()]
}

/// `qacct` arguments for one job (every task of an array).
pub fn qacct_args(id: &str) -> Vec<String> {
    vec!["-j".into(), id.into()]
}

/// `qstat` arguments listing the queue instances with their free slots
/// and memory (`user`: whose jobs it also lists; give the caller's own).
pub fn queues_args(user: &str, site: &Site) -> Vec<String> {
    let f = format!("slots,{}", site.mem_resource);
    ["-f", "-F", &f, "-xml", "-u", user]
        .map(String::from)
        .into()
}

/// What qacct says when it has no record of a job (yet: see the notes).
pub fn qacct_not_found(stderr: &str) -> bool {
    stderr.contains("not found")
}

/// What qdel says of a job Grid Engine no longer knows.
pub fn qdel_gone(output: &str) -> bool {
    output.contains("does not exist")
}

// ---- qstat -r -xml -------------------------------------------------------------

/// A job's state, from qstat's letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SgeState {
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
    /// `z`: finished (only with `qstat -s z`).
    Finished,
}

impl SgeState {
    pub fn parse(letters: &str) -> Option<SgeState> {
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
        } else if has("z") {
            SgeState::Finished
        } else {
            return None;
        })
    }
}

/// One line of `qstat -r -xml`: a job, or some tasks of an array.
#[derive(Debug, Clone, PartialEq)]
pub struct QstatJob {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub state: SgeState,
    /// The letters, e.g. `hqw`.
    pub letters: String,
    /// The array tasks this line is about (empty: not an array).
    pub tasks: Vec<u32>,
    /// Where it runs, else the queue it asked for.
    pub queue: Option<String>,
    pub host: Option<String>,
    pub started: Option<SystemTime>,
    pub submitted: Option<SystemTime>,
    pub slots: u32,
    pub h_rt: Option<Duration>,
}

impl QstatJob {
    /// When `h_rt` runs out (with `-notify`, SIGUSR2 then, SIGKILL the
    /// queue's `notify` later).
    pub fn ends_at(&self) -> Option<SystemTime> {
        Some(self.started? + self.h_rt?)
    }
}

fn text<'a>(node: roxmltree::Node<'a, '_>, tag: &str) -> Option<&'a str> {
    node.children()
        .find(|c| c.has_tag_name(tag))
        .and_then(|c| c.text())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn xml<'a>(command: &'static str, doc: &'a str) -> Result<roxmltree::Document<'a>, SgeError> {
    roxmltree::Document::parse(doc).map_err(|source| SgeError::Xml { command, source })
}

/// Grid Engine's time stamps (`2026-12-06T01:36:20`, UGE `…:20.123`): the
/// local time of the host that printed them.
pub fn parse_local_time(s: &str) -> Option<SystemTime> {
    use chrono::TimeZone;
    let t = chrono::NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%dT%H:%M:%S%.f").ok()?;
    chrono::Local
        .from_local_datetime(&t)
        .earliest()
        .map(SystemTime::from)
}

/// Seconds or `H:M:S` (Grid Engine's time values).
pub fn parse_seconds(s: &str) -> Option<Duration> {
    let mut secs: u64 = 0;
    for part in s.trim().split(':') {
        secs = secs.checked_mul(60)?.checked_add(part.parse().ok()?)?;
    }
    Some(Duration::from_secs(secs))
}

/// Array task ids as qstat and qacct write them: `4`, `3-6:1`, `3,5`,
/// `1-9:2,12`.
pub fn parse_tasks(s: &str) -> Option<Vec<u32>> {
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

fn job_line(j: roxmltree::Node) -> Result<QstatJob, SgeError> {
    let bad = |what, value: &str| SgeError::Field {
        command: "qstat -xml",
        what,
        value: value.into(),
    };
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
        owner: text(j, "JB_owner").unwrap_or_default().into(),
        state,
        letters: letters.into(),
        tasks,
        queue: at
            .map(|(q, _)| q)
            .or(text(j, "hard_req_queue"))
            .map(String::from),
        host: at.map(|(_, h)| h.to_string()),
        started: text(j, "JAT_start_time").and_then(parse_local_time),
        submitted: text(j, "JB_submission_time").and_then(parse_local_time),
        slots: text(j, "slots").and_then(|s| s.parse().ok()).unwrap_or(1),
        h_rt,
    })
}

/// Every job line of `qstat [-r] -xml` (running ones first, as listed).
pub fn parse_qstat(doc: &str) -> Result<Vec<QstatJob>, SgeError> {
    let doc = xml("qstat -xml", doc)?;
    doc.descendants()
        .filter(|n| n.has_tag_name("job_list"))
        .map(job_line)
        .collect()
}

// ---- qstat -j -xml -------------------------------------------------------------

/// Why jobs wait, from `qstat -j A,B -xml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reasons {
    /// The scheduler's messages about each job, by job id.
    pub by_job: HashMap<String, Vec<String>>,
    /// Its messages about the whole cluster.
    pub global: Vec<String>,
    /// Why Grid Engine could not start a job (state `E`), by job id.
    pub errors: HashMap<String, Vec<String>>,
    /// The jobs qstat described: an id asked for and missing here has
    /// ended, or never was (qstat names those only when it knows none).
    pub jobs: Vec<String>,
}

impl Reasons {
    /// What to tell the user about job `id`: its error, else its own
    /// messages, else the cluster's; None when qstat says nothing.
    pub fn reason(&self, id: &str) -> Option<String> {
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
pub fn parse_qstat_j(doc: &str) -> Result<Reasons, SgeError> {
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
pub struct AcctRecord {
    pub job: String,
    pub task: Option<u32>,
    pub name: String,
    pub queue: String,
    pub host: String,
    /// Grid Engine's failure code (0: it ran the job to its end) and its words.
    pub failed: u32,
    pub failed_reason: String,
    pub exit_status: i32,
    pub wallclock: Option<Duration>,
    /// The request, e.g. `-q batch -l h_rt=600,h_vmem=1G`.
    pub category: String,
}

/// Reads `qacct -j`'s records (fields it does not use are skipped). Each
/// record starts with a line of `=`.
pub fn parse_qacct(out: &str) -> Result<Vec<AcctRecord>, SgeError> {
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
        Some(_) => Err(SgeError::Field {
            command: "qacct -j",
            what: "a record",
            value: "(no jobnumber)".into(),
        }),
        None => Ok(records),
    }
}

fn acct_field(r: &mut AcctRecord, key: &str, value: &str) -> Result<(), SgeError> {
    let bad = |what| SgeError::Field {
        command: "qacct -j",
        what,
        value: value.into(),
    };
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
pub enum Ending {
    /// The script ended with this status.
    Exited(i32),
    /// Killed by this signal: by `qdel` (SIGKILL) or anyone else.
    Signalled(i32),
    /// Killed at its `h_rt`.
    Walltime,
    /// Killed at a limit Grid Engine enforces (h_rt, h_cpu or h_vmem).
    Limit(String),
    /// Grid Engine could not run it, or not to its end.
    Failed { code: u32, reason: String },
}

impl Ending {
    pub fn success(&self) -> bool {
        *self == Ending::Exited(0)
    }
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Exited(0) => write!(f, "completed"),
            Ending::Exited(c) => write!(f, "failed (exit code {c})"),
            Ending::Signalled(s) => write!(f, "was killed by signal {s} (qdel, or a kill)"),
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

impl AcctRecord {
    pub fn ending(&self) -> Ending {
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

// ---- qstat -f -F -xml ------------------------------------------------------------

/// A queue on one host, from `qstat -f -F … -xml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueInstance {
    pub queue: String,
    pub host: String,
    /// Its state letters (`d` disabled, `u` unknown, `a` alarm, `s`
    /// suspended, `E` error, `C` calendar…): empty when it takes jobs.
    pub state: String,
    pub slots_total: u32,
    pub slots_used: u32,
    pub slots_resv: u32,
    /// `-F` values by resource name: (`hc` host consumable, `qc` queue
    /// consumable, `hl` host load…, value as printed, e.g. `14.186G`).
    pub resources: BTreeMap<String, (String, String)>,
}

impl QueueInstance {
    /// Slots a new job could have here now: none in any state but the
    /// plain one, else the least of the queue's and the host's.
    pub fn free_slots(&self) -> u32 {
        if !self.state.is_empty() {
            return 0;
        }
        let queue = self
            .slots_total
            .saturating_sub(self.slots_used + self.slots_resv);
        let host = self
            .resources
            .get("slots")
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .map_or(u32::MAX, |v| v.max(0.0) as u32);
        queue.min(host)
    }

    /// The free memory of `resource` here, in megabytes.
    pub fn free_mem_mb(&self, resource: &str) -> Option<u64> {
        self.resources
            .get(resource)
            .and_then(|(_, v)| parse_mem_mb(v))
    }
}

/// Grid Engine's memory values in megabytes: `14.186G`, `512.000M`, `1024K`,
/// bytes without a unit; upper-case units are powers of 1024, lower-case
/// of 1000.
pub fn parse_mem_mb(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let factor = match unit {
        "" => 1.0,
        "K" => 1024.0,
        "k" => 1e3,
        "M" => 1024.0 * 1024.0,
        "m" => 1e6,
        "G" => 1024.0 * 1024.0 * 1024.0,
        "g" => 1e9,
        "T" => 1024.0f64.powi(4),
        "t" => 1e12,
        _ => return None,
    };
    Some((n * factor / (1024.0 * 1024.0)) as u64)
}

/// Reads `qstat -f -F … -xml`'s queue instances (their job lists skipped).
pub fn parse_queues(doc: &str) -> Result<Vec<QueueInstance>, SgeError> {
    let doc = xml("qstat -f -xml", doc)?;
    let num = |n, tag| text(n, tag).and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut out = Vec::new();
    for q in doc.descendants().filter(|n| n.has_tag_name("Queue-List")) {
        let name = text(q, "name").unwrap_or_default();
        let (queue, host) = name.split_once('@').unwrap_or((name, ""));
        let resources = q
            .children()
            .filter(|c| c.has_tag_name("resource"))
            .filter_map(|r| {
                let value = r.text().unwrap_or_default().trim().to_string();
                let kind = r.attribute("type").unwrap_or_default().to_string();
                Some((r.attribute("name")?.to_string(), (kind, value)))
            })
            .collect();
        out.push(QueueInstance {
            queue: queue.into(),
            host: host.into(),
            state: text(q, "state").unwrap_or_default().into(),
            slots_total: num(q, "slots_total"),
            slots_used: num(q, "slots_used"),
            slots_resv: num(q, "slots_resv"),
            resources,
        });
    }
    Ok(out)
}

/// Free slots and memory of one cluster queue, over its hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFree {
    pub queue: String,
    pub free_slots: u32,
    pub total_slots: u32,
    /// Free memory of the site's memory resource, where hosts report it.
    pub free_mem_mb: Option<u64>,
}

/// Sums the instances of each queue (in the order qstat lists them). Two
/// queues on one host each count its free slots: they share them.
pub fn free_by_queue(instances: &[QueueInstance], site: &Site) -> Vec<QueueFree> {
    let mut out: Vec<QueueFree> = Vec::new();
    for i in instances {
        let pos = match out.iter().position(|q| q.queue == i.queue) {
            Some(p) => p,
            None => {
                out.push(QueueFree {
                    queue: i.queue.clone(),
                    free_slots: 0,
                    total_slots: 0,
                    free_mem_mb: None,
                });
                out.len() - 1
            }
        };
        let q = &mut out[pos];
        q.free_slots += i.free_slots();
        q.total_slots += i.slots_total;
        if let Some(mb) = i
            .free_mem_mb(&site.mem_resource)
            .filter(|_| i.free_slots() > 0)
        {
            q.free_mem_mb = Some(q.free_mem_mb.unwrap_or(0) + mb);
        }
    }
    out
}

/// The queue's `notify` delay, from `qconf -sq QUEUE`: how long a
/// `-notify` job has between SIGUSR2 and SIGKILL.
pub fn parse_notify(qconf_sq: &str) -> Option<Duration> {
    qconf_sq.lines().find_map(|l| {
        let (k, v) = l.split_once(char::is_whitespace)?;
        (k == "notify").then(|| parse_seconds(v)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sge")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn profile() -> Profile {
        Profile {
            partition: Some("batch".into()),
            account: Some("proj1".into()),
            time: Some("1:30:00".into()),
            ntasks: Some(2),
            cpus_per_task: Some(2),
            scheduler_keys: [("mem".to_string(), crate::profile::Value::One("4G".into()))].into(),
            ..Default::default()
        }
    }

    fn sub<'a>(p: &'a Profile, array: Option<Array>) -> Submission<'a> {
        Submission {
            name: "noyau-kernel-python3",
            profile: p,
            log_dir: Path::new("/home/u/.local/state/noyau/jobs"),
            cwd: Some(Path::new("/home/u/my nb")),
            array,
        }
    }

    #[test]
    fn qsub_arguments_from_a_profile() {
        let p = profile();
        let a = qsub_args(&sub(&p, None), &Site::default()).unwrap();
        let joined = a.join(" ");
        for want in [
            "-terse -N noyau-kernel-python3 -S /bin/sh -r n -notify -j y",
            "-o /home/u/.local/state/noyau/jobs/noyau-kernel-python3-$JOB_ID.log",
            "-q batch",
            "-P proj1",
            "-pe smp 4",
            "-l h_rt=5400,h_vmem=1024M",
        ] {
            assert!(joined.contains(want), "missing {want:?} in {joined}");
        }
        // a directory with a space stays one argument
        assert!(a.windows(2).any(|w| w == ["-wd", "/home/u/my nb"]), "{a:?}");
        assert!(!joined.contains("-t "), "{joined}");

        // OAR's names, one core, no limits, qsub's own directory
        let p = Profile {
            partition: Some("all.q".into()),
            account: Some("p2".into()),
            time: Some("UNLIMITED".into()),
            ..Default::default()
        };
        let s = Submission {
            cwd: None,
            ..sub(&p, None)
        };
        let a = qsub_args(&s, &Site::default()).unwrap().join(" ");
        assert!(a.contains("-cwd -q all.q -P p2"), "{a}");
        assert!(!a.contains("-pe") && !a.contains("-l "), "{a}");
    }

    #[test]
    fn qsub_arrays_sites_and_refusals() {
        let p = Profile::default();
        let arr = Array {
            tasks: 6,
            max_parallel: 2,
        };
        let a = qsub_args(&sub(&p, Some(arr)), &Site::default())
            .unwrap()
            .join(" ");
        assert!(a.contains("-t 1-6 -tc 2"), "{a}");
        assert!(
            a.contains("noyau-kernel-python3-$JOB_ID.$TASK_ID.log"),
            "{a}"
        );
        let all = Array {
            tasks: 3,
            max_parallel: 3,
        };
        let a = qsub_args(&sub(&p, Some(all)), &Site::default())
            .unwrap()
            .join(" ");
        assert!(a.ends_with("-t 1-3"), "{a}");

        let site = Site {
            pe: "threads".into(),
            mem_resource: "m_mem_free".into(),
        };
        let a = qsub_args(&sub(&profile(), None), &site).unwrap().join(" ");
        assert!(
            a.contains("-pe threads 4") && a.contains("m_mem_free=1024M"),
            "{a}"
        );

        let huge = Profile {
            ntasks: Some(u32::MAX),
            cpus_per_task: Some(2),
            ..Default::default()
        };
        let a = qsub_args(&sub(&huge, None), &Site::default())
            .unwrap()
            .join(" ");
        assert!(a.contains(&format!("-pe smp {}", u32::MAX)), "{a}");

        let two = Profile {
            nodes: Some(2),
            ..Default::default()
        };
        let e = qsub_args(&sub(&two, None), &Site::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nodes = 2") && e.contains("cpus_per_task"),
            "{e}"
        );
        let bad = Profile {
            time: Some("1h".into()),
            ..Default::default()
        };
        let e = qsub_args(&sub(&bad, None), &Site::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a Slurm time"), "{e}");

        // a log directory with a colon: `-o` would read HOST:PATH
        let s = Submission {
            log_dir: Path::new("/scratch/a:b"),
            ..sub(&p, None)
        };
        let a = qsub_args(&s, &Site::default()).unwrap();
        assert!(
            a.contains(&":/scratch/a:b/noyau-kernel-python3-$JOB_ID.log".to_string()),
            "{a:?}"
        );
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
    fn qsub_output() {
        assert_eq!(parse_qsub("26\n").unwrap(), "26");
        assert_eq!(parse_qsub("32.1-6:1\n").unwrap(), "32");
        for bad in ["", "\n", "Unable to run job: denied\nExiting.\n", "12 34"] {
            assert!(
                matches!(parse_qsub(bad), Err(SgeError::NoJobId(_))),
                "{bad:?}"
            );
        }
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
        assert_eq!(
            (k.name.as_str(), k.owner.as_str(), k.slots),
            ("noyau-kernel-py", "root", 2)
        );
        assert_eq!(
            (k.queue.as_deref(), k.host.as_deref()),
            (Some("all.q"), Some("vm"))
        );
        let start = k.started.unwrap();
        assert_eq!(k.h_rt, Some(Duration::from_secs(300)));
        assert_eq!(
            k.ends_at()
                .unwrap()
                .duration_since(start)
                .unwrap()
                .as_secs(),
            300
        );
        let waiting = &jobs[3];
        assert_eq!(
            (waiting.queue.as_deref(), waiting.host.as_deref()),
            (Some("batch"), None)
        );
        assert_eq!(waiting.h_rt, Some(Duration::from_secs(3600)));
        assert!(waiting.started.is_none() && waiting.submitted.is_some());

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
            ("z", Finished),
        ] {
            assert_eq!(SgeState::parse(letters), Some(want), "{letters}");
        }
        assert_eq!(SgeState::parse(""), None);
        let t = parse_local_time("2026-12-06T01:36:20").unwrap();
        let uge = parse_local_time("2026-12-06T01:36:20.250").unwrap();
        assert_eq!(uge.duration_since(t).unwrap(), Duration::from_millis(250));
        assert!(parse_local_time("12/06/2026 01:36:20").is_none());
        assert_eq!(parse_seconds("1:00:00"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_seconds("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_seconds("00:00:10"), Some(Duration::from_secs(10)));
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

    fn ending(file: &str) -> Vec<(Option<u32>, Ending)> {
        parse_qacct(&fixture(file))
            .unwrap()
            .iter()
            .map(|r| (r.task, r.ending()))
            .collect()
    }

    #[test]
    fn endings_from_qacct() {
        assert_eq!(ending("qacct-exit0.txt"), [(None, Ending::Exited(0))]);
        assert!(Ending::Exited(0).success() && !Ending::Exited(3).success());
        assert_eq!(ending("qacct-exit3.txt"), [(None, Ending::Exited(3))]);
        assert_eq!(ending("qacct-signal.txt"), [(None, Ending::Signalled(9))]);
        assert_eq!(ending("qacct-qdel.txt"), [(None, Ending::Signalled(9))]);
        assert_eq!(ending("qacct-h_rt.txt"), [(None, Ending::Walltime)]);
        let never = ending("qacct-never-started.txt");
        assert!(
            matches!(&never[0].1, Ending::Failed { code: 28, reason } if reason == "changing into working directory"),
            "{never:?}"
        );
        let tasks = ending("qacct-array.txt");
        assert_eq!(
            tasks,
            [
                (Some(1), Ending::Signalled(9)),
                (Some(2), Ending::Signalled(9))
            ]
        );

        let r = &parse_qacct(&fixture("qacct-h_rt.txt")).unwrap()[0];
        assert_eq!((r.job.as_str(), r.name.as_str()), ("3", "noyau-test-hrt"));
        assert_eq!((r.queue.as_str(), r.host.as_str()), ("all.q", "vm"));
        assert_eq!(r.wallclock, Some(Duration::from_secs(31)));
        assert_eq!(r.category, "-l h_rt=20");
        assert!(Ending::Walltime.to_string().contains("walltime"));
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
        assert!(parse_qacct(&bad)
            .unwrap_err()
            .to_string()
            .contains("an exit status"));
        assert!(parse_qacct("==========\nqname all.q\n").is_err());
        assert!(qacct_not_found("error: job id 29 not found\n"));
        assert!(qdel_gone("denied: job \"99999\" does not exist\n"));
    }

    #[test]
    fn free_slots_and_memory_per_queue() {
        let site = Site::default();
        // all.q holds the host's 4 slots: batch has 4 of its own, none usable
        let full = parse_queues(&fixture("qstat-f-full.xml")).unwrap();
        assert_eq!(full.len(), 2);
        assert_eq!(
            (full[0].queue.as_str(), full[0].host.as_str()),
            ("all.q", "vm")
        );
        let free = free_by_queue(&full, &site);
        let got: Vec<(&str, u32, u32, Option<u64>)> = free
            .iter()
            .map(|q| (q.queue.as_str(), q.free_slots, q.total_slots, q.free_mem_mb))
            .collect();
        assert_eq!(got, [("all.q", 0, 4, None), ("batch", 0, 4, None)]);

        // 2 slots used: all.q has the host's 2 others; batch is disabled
        let some = parse_queues(&fixture("qstat-f-disabled.xml")).unwrap();
        assert_eq!(some[1].state, "d");
        let free = free_by_queue(&some, &site);
        assert_eq!((free[0].free_slots, free[0].free_mem_mb), (2, Some(17598)));
        assert_eq!((free[1].free_slots, free[1].free_mem_mb), (0, None));
        assert_eq!(some[0].free_mem_mb("mem_free"), Some(22297));
        assert!(parse_queues("<job_info><queue_info>").is_err());
    }

    #[test]
    fn memory_values_and_notify() {
        assert_eq!(parse_mem_mb("14.186G"), Some(14526));
        assert_eq!(parse_mem_mb("512.000M"), Some(512));
        assert_eq!(parse_mem_mb("2048K"), Some(2));
        assert_eq!(parse_mem_mb("1T"), Some(1024 * 1024));
        assert_eq!(parse_mem_mb("1g"), Some(953));
        assert_eq!(parse_mem_mb("1048576"), Some(1));
        for bad in ["", "-", "NONE", "1X", "-1G", "inf", "NaN"] {
            assert_eq!(parse_mem_mb(bad), None, "{bad:?}");
        }
        let sq = "qname                 all.q\nnotify                00:00:10\nowner_list            NONE\n";
        assert_eq!(parse_notify(sq), Some(Duration::from_secs(10)));
        assert_eq!(parse_notify("qname all.q\n"), None);
    }

    #[test]
    fn command_arguments() {
        assert_eq!(qstat_args("alice"), ["-r", "-xml", "-u", "alice"]);
        assert_eq!(
            qstat_j_args(&["3".into(), "5".into()]),
            ["-j", "3,5", "-xml"]
        );
        assert_eq!(qacct_args("7"), ["-j", "7"]);
        assert_eq!(
            queues_args("alice", &Site::default()),
            ["-f", "-F", "slots,h_vmem", "-xml", "-u", "alice"]
        );
    }
}
