//! OAR for the hub (`scheduler = "oar"`), through noyau-sched's OAR backend.
//!
//! * **Submission.** OAR passes no environment to a job, so the agent's
//!   secrets go in a 0600 file that the job script sources (noyau-sched's
//!   `OarBackend`); that file and the script must be the user's, in the
//!   user's home (OAR deletes a user's /tmp files when their last job ends).
//!   So the hub runs `noyau hub-submit` as the user through `submit_as`: it
//!   reads the job, secrets included, on its stdin (never a command line),
//!   and submits it with `OarBackend` from the user's home, since oarsub
//!   takes the job's directory from `$PWD`.
//! * **One `oarstat -J -f -j A -j B …`** per interval for every session
//!   (OAR keeps ended jobs, with their events: cancelled, walltime).
//! * **Cancel** is `oardel ID`, as the hub (root or OAR's admin).
//! * **Free cores**: one `oarnodes -J`; OAR's queues share the resources.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::Context;
use noyau_sched::oar::{parse_oarstat, state_of, OarBackend};
use noyau_sched::{JobSpec, JobState};
use serde::{Deserialize, Serialize};

use crate::config::HubProfile;
use crate::db::{now, Session};
use crate::jobs::{as_user, passed_env, run, PartitionLoad, Seen, JOB_NAME};
use crate::Hub;

/// The job `noyau hub-submit` reads on its stdin.
#[derive(Debug, Serialize, Deserialize)]
pub struct SubmitRequest {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The agent's environment (link address, pin, token, session).
    pub env: BTreeMap<String, String>,
    pub queue: String,
    pub cores: u32,
    pub minutes: u32,
    pub project: Option<String>,
    /// The profile's environment and prologue, written into the job script.
    pub profile_env: BTreeMap<String, String>,
    pub prologue: Option<String>,
}

/// Submits the session's job as its user; returns the job id and log path.
pub(crate) async fn submit(
    hub: &Hub,
    s: &Session,
    user: &nix::unistd::User,
    prof: &HubProfile,
    secrets: Vec<(String, String)>,
) -> Result<(String, String), String> {
    let c = &s.choice;
    let req = SubmitRequest {
        program: hub.agent_exe.clone(),
        args: vec!["agent".into(), "--serve".into(), prof.server.clone()],
        env: secrets.into_iter().collect(),
        queue: c.partition.clone(),
        cores: c.cores,
        minutes: c.minutes,
        project: prof.account.clone(),
        profile_env: prof.env.clone(),
        prologue: prof.prologue.clone(),
    };
    let json = serde_json::to_string(&req).map_err(|e| e.to_string())?;
    let mut env = passed_env(&["PATH", "LANG"]);
    env.push(("HOME".into(), user.dir.display().to_string()));
    let exe = hub.agent_exe.display().to_string();
    let argv = as_user(hub, &s.user, &[&exe, "hub-submit"]);
    let out = run(&argv, Some(&json), &env).await?;
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .map(str::to_string)
    };
    let id = field("OAR_JOB_ID=")
        .filter(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("noyau hub-submit answered {:?}, not a job id", out.trim()))?;
    let log = field("log=").unwrap_or_default();
    tracing::info!(user = s.user, job = id, log, "submitted to OAR");
    Ok((id, log))
}

/// `noyau hub-submit`, run as the user by the hub: the job on stdin, its
/// id and log on stdout.
pub async fn submit_from_stdin() -> anyhow::Result<()> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .context("reading the job on stdin")?;
    let req: SubmitRequest = serde_json::from_str(&text)
        .context("`noyau hub-submit` is run by `noyau hub`, with the job as JSON on its stdin")?;
    let me = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .context("cannot find this user's account")?;
    // The job's directory, and oarsub's (from $PWD, which OarBackend sets).
    std::env::set_current_dir(&me.dir)
        .with_context(|| format!("cannot enter {}", me.dir.display()))?;
    let spec = JobSpec {
        name: JOB_NAME.into(),
        program: req.program,
        args: req.args,
        env: req.env,
        cwd: Some(me.dir.clone()),
        profile: noyau_config::Profile {
            queue: Some(req.queue),
            cpus_per_task: Some(req.cores),
            time: Some(req.minutes.to_string()),
            project: req.project,
            env: req.profile_env,
            prologue: req.prologue,
            ..Default::default()
        },
        array: None,
    };
    let id = OarBackend::global().submit_detached(&spec).await?;
    println!("OAR_JOB_ID={id}");
    println!(
        "log={}",
        noyau_sched::slurm::log_dir()
            .join(format!("{JOB_NAME}-{id}.log"))
            .display()
    );
    Ok(())
}

/// One `oarstat` for the jobs `ids`.
pub(crate) async fn states(hub: &Hub, ids: &[&str]) -> Result<HashMap<String, Seen>, String> {
    let mut argv = vec![hub.cfg.oar.oarstat.clone(), "-J".into(), "-f".into()];
    for id in ids {
        argv.push("-j".into());
        argv.push(id.to_string());
    }
    let jobs = parse_oarstat(&run(&argv, None, &[]).await?)?;
    let t = now();
    Ok(jobs
        .into_iter()
        .map(|j| {
            let state = state_of(&j);
            let time_left = match (&state, j.start_time, j.walltime) {
                (JobState::Running { .. }, Some(start), Some(wall)) if start > 0 => {
                    Some(duration((start + wall - t).max(0) as u64))
                }
                _ => None,
            };
            (j.id.to_string(), Seen { state, time_left })
        })
        .collect())
}

/// Seconds as Slurm shows a time left (`HH:MM:SS`, `D-HH:MM:SS`), which
/// the cards read.
fn duration(secs: u64) -> String {
    let hms = format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    );
    match secs / 86400 {
        0 => hms,
        d => format!("{d}-{hms}"),
    }
}

/// Free and total cores from one `oarnodes -J`: a resource is free when it
/// is Alive, not drained and runs no job. OAR's queues share the resources,
/// so there is one line for all of them.
pub(crate) async fn load(hub: &Hub) -> Result<Vec<PartitionLoad>, String> {
    let out = run(&[hub.cfg.oar.oarnodes.clone(), "-J".into()], None, &[]).await?;
    parse_oarnodes(&out)
}

fn parse_oarnodes(out: &str) -> Result<Vec<PartitionLoad>, String> {
    let resources: HashMap<String, serde_json::Value> =
        serde_json::from_str(out).map_err(|e| format!("oarnodes' JSON is not understood: {e}"))?;
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
        partition: "all queues".into(),
        idle_cores: free as u64,
        total_cores: resources.len() as u64,
        ..Default::default()
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_as_slurm_shows_it() {
        assert_eq!(duration(59), "00:00:59");
        assert_eq!(duration(3600 + 61), "01:01:01");
        assert_eq!(duration(86400 + 7200), "1-02:00:00");
        assert_eq!(crate::jobs::secs_of(&duration(5000)), Some(5000));
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
