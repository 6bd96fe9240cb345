//! OAR (2.5): the agent runs as a batch job.
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
//!   other argument. As another user (the hub), the files must be that
//!   user's: `noyau hub-submit` does the whole submission as the user.
//! * **Listing.** `oarstat -J -f -j A -j B …` for the jobs a watcher
//!   follows (`-u USER` for `noyau ps`). OAR keeps finished jobs with their
//!   exit code and events, so an end is always described. A running job
//!   ends at its `startTime + walltime`.
//! * **Cancel** is `oardel`: OAR sends SIGTERM to the job, the agent stops
//!   its kernel.
//! * **Arrays** (sweeps): `--array-param-file`, one line per task id, which
//!   the script exports as `NOYAU_ARRAY_TASK_ID`. OAR 2.5 cannot limit how
//!   many tasks of an array run at once (Slurm's `%K`), so when K is below
//!   the task count the tasks are submitted `--hold` and released
//!   (`oarresume`) K at a time ([`crate::ArrayJob::pace`]).
//! * **Walltime.** `--checkpoint N --signal 10` makes OAR send SIGUSR1 N
//!   seconds before the walltime (the profile's `walltime_signal`, else a
//!   tenth of `time`, 30 s to 10 min), which the agent turns into a walltime
//!   event; `oarwalltime` gives more time where the site enables walltime
//!   changes.

use noyau_vars::EnvVars;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::batch::{is_job_number, Batch, Commands, JobInfo, PartitionLoad, Scope, Submission};
use crate::jobfiles::{job_dir, sourcing, submit_as, JobFiles};
use crate::profile::{Key, Kind, Profile};
use crate::quote::sh_quote;
use crate::run::{user_name, AsUser};
use crate::script::job_script;
use crate::state::from_epoch;
use crate::{JobEnd, JobSpec, JobState, SchedError};

/// The profile keys only OAR knows: `properties`, an SQL expression
/// selecting resources (`-p`), and more `oarsub` arguments.
const KEYS: &[Key] = &[
    Key::new("properties", Kind::Line),
    Key::new("oarsub", Kind::Args),
];

pub(crate) struct Oar {
    cmds: Commands,
}

pub(crate) fn make(cmds: Commands) -> Arc<dyn Batch> {
    Arc::new(Oar { cmds })
}

/// An OAR job id (digits), before it goes on oarwalltime's command line.
fn check_id(id: &str) -> Result<(), SchedError> {
    match is_job_number(id) {
        true => Ok(()),
        false => Err(SchedError::BadJobId {
            id: id.into(),
            scheduler: "OAR",
            form: "its number (e.g. 4242)",
        }),
    }
}

/// OAR's walltime, `H:MM:SS`, from seconds.
fn walltime(secs: u64) -> String {
    format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The `-l` resource request of a profile: `nodes=N/core=C,walltime=…`
/// (None when the profile asks for nothing, leaving OAR's default).
fn resources(p: &Profile) -> Option<String> {
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

/// The `--array-param-file` beside a job script: one task id per line.
fn tasks_file(script: &Path) -> PathBuf {
    script.with_extension("tasks")
}

/// The oarsub arguments for `spec`, `exec SCRIPT` last. They hold no
/// secret (every user sees them in `oarstat`).
fn oarsub_args(spec: &JobSpec, script: &Path) -> Vec<String> {
    let p = &spec.profile;
    let mut a: Vec<String> = vec!["-n".into(), spec.name.clone()];
    let log = spec.logs().join(format!("{}-%jobid%.log", spec.name));
    for f in ["-O", "-E"] {
        a.push(f.into());
        a.push(log.display().to_string());
    }
    let mut opt = |k: &str, v: Option<&String>| {
        if let Some(v) = v {
            a.extend([k.to_string(), v.clone()]);
        }
    };
    opt("-l", resources(p).as_ref());
    opt("-q", p.partition.as_ref());
    opt("--project", p.account.as_ref());
    opt("-p", p.get("properties").map(str::to_string).as_ref());
    opt(
        "-d",
        spec.cwd.as_ref().map(|d| d.display().to_string()).as_ref(),
    );
    // SIGUSR1 (10 on Linux) N seconds before the walltime
    a.extend([
        "--checkpoint".into(),
        p.warning_secs().to_string(),
        "--signal".into(),
        "10".into(),
    ]);
    if let Some(t) = &spec.array {
        a.push("--array-param-file".into());
        a.push(tasks_file(script).display().to_string());
        if t.limited() {
            a.push("--hold".into());
        }
    }
    a.extend(p.items("oarsub").iter().cloned());
    // OAR runs the command with the user's login shell (`$SHELL -c CMD`) and
    // sends the checkpoint signal to that shell's pid. dash does not exec a
    // lone command: it would be dash that gets SIGUSR1, and dies of it,
    // ending the job early. With `exec` the script (then the agent) is that pid.
    a.push(format!("exec {}", sh_quote(&script.display().to_string())));
    a
}

/// The script's head: sources the 0600 environment file (which holds the
/// secrets) and deletes it and the script; an array's tasks export their
/// id (their line of the tasks file, the script's argument) as
/// `NOYAU_ARRAY_TASK_ID`.
fn head(spec: &JobSpec, env_file: &Path) -> String {
    let mut s = sourcing(
        env_file,
        "OAR does not pass it",
        spec.array.is_some(),
        " \"$0\"",
    );
    if spec.array.is_some() {
        s.push_str(&format!("export {}=\"$1\"\n", EnvVars::NOYAU_ARRAY_TASK_ID));
    }
    s
}

/// The job ids `oarsub` printed (`OAR_JOB_ID=N`, one per array task).
fn parse_oarsub(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("OAR_JOB_ID="))
        .filter(|id| is_job_number(id))
        .map(str::to_string)
        .collect()
}

/// One job as `oarstat -J -f` describes it (the fields noyau reads).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
struct OarJob {
    #[serde(rename = "Job_Id")]
    id: u64,
    #[serde(default)]
    name: Option<String>,
    state: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    queue: Option<String>,
    /// The wait status of the job's command (`exit_code` = status << 8).
    #[serde(default)]
    exit_code: Option<i64>,
    #[serde(default, rename = "scheduledStart")]
    scheduled_start: Option<i64>,
    #[serde(default, rename = "startTime")]
    start_time: Option<i64>,
    /// Seconds.
    #[serde(default)]
    walltime: Option<i64>,
    #[serde(default)]
    assigned_network_address: Vec<String>,
    #[serde(default)]
    events: Vec<OarEvent>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
struct OarEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    description: String,
}

/// `oarstat -J` output: an object keyed by job id (an empty answer, which
/// oarstat gives when it lists no job, is no job).
fn parse_oarstat(out: &str) -> Result<Vec<OarJob>, SchedError> {
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let map: HashMap<String, OarJob> =
        serde_json::from_str(out).map_err(|e| SchedError::Answer {
            what: "oarstat",
            why: format!("its JSON is not understood: {e}"),
        })?;
    let mut jobs: Vec<OarJob> = map.into_values().collect();
    jobs.sort_by_key(|j| j.id);
    Ok(jobs)
}

/// When a running job ends: its start plus its walltime (an epoch against
/// this host's clock, the one place a clock counts).
fn ends_at(j: &OarJob) -> Option<std::time::SystemTime> {
    let start = j.start_time.filter(|s| *s > 0)?;
    let walltime = j.walltime.filter(|w| *w > 0)?;
    from_epoch(start + walltime)
}

/// What an OAR job state means for us.
fn state_of(j: &OarJob) -> JobState {
    match j.state.as_str() {
        "Waiting" | "Hold" | "toLaunch" | "toAckReservation" | "Launching" => JobState::Pending {
            reason: match j.message.as_deref().map(str::trim) {
                Some(m) if !m.is_empty() => format!("{} ({m})", j.state),
                _ => j.state.clone(),
            },
            start: j.scheduled_start.filter(|s| *s > 0).and_then(from_epoch),
            partition: j.queue.clone(),
        },
        "Running" | "Finishing" | "Suspended" | "Resuming" | "toError" => JobState::Running {
            node: j
                .assigned_network_address
                .first()
                .cloned()
                .unwrap_or_default(),
            ends_at: ends_at(j),
        },
        _ => JobState::Ended(end_of(j)),
    }
}

/// How a Terminated or Error job ended, from its exit code and events.
fn end_of(j: &OarJob) -> JobEnd {
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

/// Free and total cores from `oarnodes -J`: a resource is free when it is
/// Alive, not drained and runs no job. OAR's queues share the resources,
/// so there is one line for all of them.
fn parse_oarnodes(out: &str) -> Result<Vec<PartitionLoad>, SchedError> {
    let resources: HashMap<String, serde_json::Value> =
        serde_json::from_str(out).map_err(|e| SchedError::Answer {
            what: "oarnodes",
            why: format!("its JSON is not understood: {e}"),
        })?;
    let free = resources
        .values()
        .filter(|r| {
            let busy = match &r["jobs"] {
                serde_json::Value::Null => false,
                serde_json::Value::String(s) => !s.trim().is_empty(),
                serde_json::Value::Array(a) => !a.is_empty(),
                _ => true,
            };
            r["state"] == "Alive" && r["drain"] != "YES" && !busy
        })
        .count();
    Ok(vec![PartitionLoad {
        partition: PartitionLoad::ALL.into(),
        idle_cores: free as u64,
        total_cores: resources.len() as u64,
        ..Default::default()
    }])
}

/// `--tasks` inside an OAR job: task i on the core of line i of
/// `$OAR_NODEFILE` (tasks fill a node before the next), through `oarsh`,
/// which puts it in the job's cpuset on that node. oarsh is ssh: it carries
/// neither the environment nor the working directory, so a small launcher
/// reads them (and the command) as one line of JSON on its stdin, keeping
/// the environment's secrets off every command line, and execs the task,
/// whose runner reads the body that follows that line (the launcher reads
/// it byte by byte so as to leave the body unread).
const TASKS_PYTHON: &str = r#"
if os.environ.get("OAR_NODEFILE") and shutil.which("oarsh"):
    with open(os.environ["OAR_NODEFILE"]) as f:
        slots = [l.strip() for l in f if l.strip()]
    if slots:
        def spawn(i, task_env):
            host = slots[i % len(slots)]
            launcher = "import json, os; d = json.loads(b''.join(iter(lambda: os.read(0, 1) or b'\\n', b'\\n'))); os.chdir(d['cwd']); os.execve(d['argv'][0], d['argv'], d['env'])"
            head = json.dumps({"cwd": os.getcwd(), "argv": argv, "env": task_env})
            return start(["oarsh", host, shlex.join([sys.executable, "-c", launcher])], head + "\n" + body), f" on {host}"
"#;

impl Oar {
    /// Writes the 0600 environment file, the script (and the tasks file of
    /// an array), runs oarsub; the ids OAR gave (one per array task) and
    /// the files written.
    async fn oarsub(&self, spec: &JobSpec) -> Result<(Vec<String>, Vec<PathBuf>), SchedError> {
        let mut files = JobFiles::new(self.name(), spec)?;
        let script = files.path("sh");
        let written = (|| {
            let env_file = files.write_env(spec)?;
            files.write("sh", &job_script(&head(spec, &env_file), spec), 0o700)?;
            if let Some(t) = &spec.array {
                let lines: String = t.ids.iter().map(|i| format!("{i}\n")).collect();
                files.write("tasks", &lines, 0o600)?;
            }
            Ok::<_, SchedError>(())
        })();
        if let Err(e) = written {
            files.remove();
            return Err(e);
        }
        // oarsub takes its default directory from $PWD, not from getcwd:
        // give it the real one (a parent may have changed directory since).
        let mut cmd = self.cmds.cmd("oarsub").args(oarsub_args(spec, &script));
        if let Ok(d) = std::env::current_dir() {
            cmd = cmd.env("PWD", d.display().to_string());
        }
        let ids = match cmd.output().await {
            Ok(o) => parse_oarsub(&o),
            Err(e) => {
                files.remove();
                return Err(SchedError::Submit(e));
            }
        };
        if ids.is_empty() {
            files.remove();
            return Err(SchedError::NoJobId {
                command: "oarsub",
                output: "no OAR_JOB_ID line".into(),
            });
        }
        Ok((ids, files.written))
    }
}

#[async_trait]
impl Batch for Oar {
    fn name(&self) -> &'static str {
        "oar"
    }

    fn display(&self) -> &'static str {
        "OAR"
    }

    fn queue_word(&self) -> &'static str {
        "Queue"
    }

    fn commands(&self) -> &'static [&'static str] {
        &[
            "oarsub",
            "oarstat",
            "oardel",
            "oarwalltime",
            "oarresume",
            "oarnodes",
        ]
    }

    fn job_in_env(&self) -> Option<String> {
        std::env::var("OAR_JOB_ID").ok().filter(|v| !v.is_empty())
    }

    fn tasks_python(&self) -> &'static str {
        TASKS_PYTHON
    }

    fn keys(&self) -> &'static [Key] {
        KEYS
    }

    fn foreign_hint(&self) -> &'static str {
        "OAR allocates whole resources (memory comes with the cores): select \
         nodes with `properties` (e.g. properties = \"gpu_count > 0\") and pass other \
         oarsub options in `oarsub`"
    }

    async fn dry_run(&self, spec: &JobSpec) -> Result<String, SchedError> {
        let dir = job_dir(self.name());
        let script = dir.join(format!("{}.sh", spec.name));
        let args: Vec<String> = oarsub_args(spec, &script)
            .iter()
            .map(|a| sh_quote(a))
            .collect();
        let env_file = dir.join(format!("{}.env", spec.name));
        Ok(format!(
            "# oarsub {}\n{}",
            args.join(" "),
            job_script(&head(spec, &env_file), spec)
        ))
    }

    async fn submit(&self, spec: &JobSpec, u: Option<&AsUser>) -> Result<Submission, SchedError> {
        if let Some(u) = u {
            return submit_as(u, self, &self.cmds, spec).await;
        }
        let (ids, files) = self.oarsub(spec).await?;
        Ok(match &spec.array {
            // (the script deletes its files itself)
            None => Submission {
                id: ids[0].clone(),
                files,
                ..Default::default()
            },
            // OAR's array id is its first sub-job's id
            Some(t) => Submission {
                id: ids[0].clone(),
                held: t.limited(),
                note: if t.limited() {
                    format!(
                        "--array-param-file, held and released {} at a time",
                        t.max_parallel
                    )
                } else {
                    "--array-param-file".into()
                },
                tasks: ids,
                files,
            },
        })
    }

    async fn cancel(&self, ids: &[String], u: Option<&AsUser>) -> Result<(), SchedError> {
        self.cmds
            .cmd("oardel")
            .args(ids.iter().cloned())
            .run_as(u, self.config_vars())
            .output()
            .await?;
        Ok(())
    }

    /// `oarresume` only asks: the next oarstat may still say Hold.
    async fn release(&self, ids: &[String]) -> Result<(), SchedError> {
        self.cmds
            .cmd("oarresume")
            .args(ids.iter().cloned())
            .output()
            .await?;
        Ok(())
    }

    /// `oarstat -J -f -j ID…` for the tracked jobs; without ids, this
    /// user's jobs (`-u`), or every current job.
    async fn list(&self, scope: Scope, ids: Option<&[String]>) -> Result<Vec<JobInfo>, SchedError> {
        let mut args: Vec<String> = vec!["-J".into(), "-f".into()];
        match (ids, scope) {
            (Some(ids), _) => {
                for id in ids {
                    args.extend(["-j".into(), id.clone()]);
                }
            }
            (None, Scope::Mine) => args.extend(["-u".into(), user_name()?]),
            (None, Scope::All) => {}
        }
        let out = self.cmds.cmd("oarstat").args(args).output().await?;
        Ok(parse_oarstat(&out)?
            .into_iter()
            .map(|j| JobInfo {
                id: j.id.to_string(),
                state: state_of(&j),
                name: j.name.unwrap_or_default(),
                word: j.state,
            })
            .collect())
    }

    /// `oarstat -u` lists only the jobs that have not ended (and jobs
    /// asked for by id, ended or not).
    fn shares_listing(&self) -> bool {
        true
    }

    /// Asks for them by id: how the ended ones ended; those OAR's database
    /// no longer has, or that it cannot be asked about, are said so.
    async fn gone(&self, ids: &[String]) -> HashMap<String, JobEnd> {
        let listed = self.list(Scope::Mine, Some(ids)).await.unwrap_or_default();
        let mut ends: HashMap<String, JobEnd> = listed
            .into_iter()
            .filter_map(|j| match j.state {
                JobState::Ended(end) => Some((j.id, end)),
                _ => None,
            })
            .collect();
        for id in ids {
            ends.entry(id.clone()).or_insert_with(|| JobEnd {
                description: "is no longer known to OAR".into(),
                success: false,
            });
        }
        ends
    }

    /// `oarwalltime ID +H:MM:SS`: OAR's answer, or why it refused.
    async fn users_extend(&self) -> Result<bool, SchedError> {
        Ok(true)
    }

    async fn extend(&self, id: &str, secs: u64, u: Option<&AsUser>) -> Result<String, SchedError> {
        check_id(id)?;
        let out = self
            .cmds
            .cmd("oarwalltime")
            .args([id.to_string(), format!("+{}", walltime(secs))])
            .run_as(u, self.config_vars())
            .output()
            .await;
        let said = match &out {
            Ok(o) => o.clone(),
            Err(e) => e.said().unwrap_or_else(|| e.to_string()),
        };
        if out.is_ok() && said.to_ascii_lowercase().contains("accepted") {
            return Ok(said.trim().to_string());
        }
        Err(SchedError::Unsupported(
            if said.contains("not enabled") || said.contains("disabled") {
                format!(
                    "this OAR site does not allow walltime changes (WALLTIME_CHANGE_ENABLED): {}",
                    said.trim()
                )
            } else {
                format!("oarwalltime refused: {}", said.trim())
            },
        ))
    }

    async fn partitions(&self) -> Result<Vec<PartitionLoad>, SchedError> {
        let out = self.cmds.cmd("oarnodes").arg("-J").output().await?;
        parse_oarnodes(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ArrayTasks;
    use std::collections::BTreeMap;

    fn spec() -> JobSpec {
        let mut env = BTreeMap::new();
        env.insert("NOYAU_LINK_TOKEN".into(), "s3cret-token".into());
        let mut profile = Profile {
            time: Some("1:30:00".into()),
            cpus_per_task: Some(4),
            prologue: Some("module load python".into()),
            ..Default::default()
        };
        for o in [
            "queue=default",
            "project=proj",
            "properties=host='node1'",
            "oarsub=-t",
            "oarsub=besteffort",
        ] {
            profile.apply_override(o).unwrap();
        }
        profile.env.insert("OMP_NUM_THREADS".into(), "4".into());
        JobSpec {
            name: "noyau-kernel-python3".into(),
            program: "/opt/noyau bin/noyau".into(),
            args: vec!["agent".into()],
            env,
            cwd: Some("/home/u/nb".into()),
            profile,
            log_dir: Some("/l".into()),
            ..Default::default()
        }
    }

    #[test]
    fn arguments_and_script_hold_the_profile_and_no_secret() {
        let s = spec();
        let a = oarsub_args(&s, Path::new("/j/x.sh"));
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
        let script = job_script(&head(&s, Path::new("/j/x.env")), &s);
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
        let a = oarsub_args(&s, Path::new("/j/x.sh")).join(" ");
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
                node: "node3".into(),
                ends_at: None,
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
        assert!(parse_oarstat("<html>")
            .unwrap_err()
            .to_string()
            .contains("JSON"));
    }

    #[test]
    fn a_running_job_ends_at_its_start_plus_its_walltime() {
        let j = |start, walltime| OarJob {
            state: "Running".into(),
            start_time: start,
            walltime,
            ..Default::default()
        };
        let at = |s: i64| from_epoch(s);
        assert_eq!(ends_at(&j(Some(1000), Some(60))), at(1060));
        assert_eq!(ends_at(&j(Some(0), Some(60))), None);
        assert_eq!(ends_at(&j(Some(1000), None)), None);
        assert!(
            matches!(state_of(&j(Some(1000), Some(60))), JobState::Running { ends_at: e, .. } if e == at(1060))
        );
    }

    #[test]
    fn arrays_as_a_tasks_file_held_when_throttled() {
        let t = ArrayTasks {
            ids: vec![0, 1, 2, 3, 7],
            max_parallel: 2,
        };
        assert!(t.limited());
        let all = ArrayTasks {
            ids: vec![2, 5],
            max_parallel: 2,
        };
        assert!(!all.limited());
        let s = JobSpec {
            array: Some(t),
            ..spec()
        };
        let a = oarsub_args(&s, Path::new("/j/x.sh")).join(" ");
        assert!(a.contains("--array-param-file /j/x.tasks --hold"), "{a}");
        let script = job_script(&head(&s, Path::new("/j/x.env")), &s);
        assert!(
            script.contains(". /j/x.env\nexport NOYAU_ARRAY_TASK_ID=\"$1\"\n"),
            "{script}"
        );
        let s = JobSpec {
            array: Some(all),
            ..spec()
        };
        let a = oarsub_args(&s, Path::new("/j/x.sh")).join(" ");
        assert!(a.contains("--array-param-file /j/x.tasks") && !a.contains("--hold"));
    }

    #[test]
    fn only_oar_job_ids_reach_oarwalltime() {
        assert!(check_id("4242").is_ok());
        for bad in ["", "1,2", "42_3", "-1", "4242 +1:00:00", "abc"] {
            let e = check_id(bad).unwrap_err().to_string();
            assert!(e.contains("is not a job id of OAR"), "{bad}: {e}");
        }
    }

    #[test]
    fn walltimes() {
        assert_eq!(walltime(59), "0:00:59");
        assert_eq!(walltime(3600 * 50 + 61), "50:01:01");
    }

    #[test]
    fn free_cores_from_oarnodes() {
        let out = r#"{
            "1": {"state": "Alive", "drain": "NO", "jobs": "91"},
            "2": {"state": "Alive", "drain": "NO"},
            "3": {"state": "Alive", "drain": "YES"},
            "4": {"state": "Absent", "drain": "NO"},
            "5": {"state": "Alive", "drain": "NO", "jobs": null}
        }"#;
        let v = parse_oarnodes(out).unwrap();
        assert_eq!((v[0].idle_cores, v[0].total_cores), (2, 5));
        assert!(parse_oarnodes("DB connection error").is_err());
    }
}
