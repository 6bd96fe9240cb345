//! `noyau ps`, `noyau cancel` and `noyau kernel --dry-run`: thin wrappers
//! over the scheduler backends.

use std::path::PathBuf;

use anyhow::{bail, Context};
use noyau_sched::oar::{self, OarBackend};
use noyau_sched::slurm::SlurmBackend;
use noyau_sched::{Backend, JobSpec, JobState};

/// A batch scheduler (the local backend keeps no job list).
enum Batch {
    Slurm(SlurmBackend),
    Oar(OarBackend),
}

/// The scheduler the job commands ask: `--backend`, else the config files'
/// `scheduler`, else the one whose commands are installed.
fn batch(flag: Option<&str>) -> anyhow::Result<Batch> {
    let name = match flag {
        Some(b) => b.to_string(),
        None => {
            let cwd = std::env::current_dir().context("the working directory")?;
            match noyau_config::Config::load(&cwd)?.scheduler {
                Some(s) => s,
                None => match noyau_sched::installed().as_slice() {
                    [one] => one.to_string(),
                    [] => bail!(
                        "no batch scheduler here: neither squeue (Slurm) nor oarstat (OAR) is on PATH"
                    ),
                    several => bail!(
                        "the commands of {} are all on PATH: say --backend {}, or name the site's \
                         scheduler once with `scheduler = \"…\"` in ~/.config/noyau/config.toml",
                        several.join(" and "),
                        several.join("|")
                    ),
                },
            }
        }
    };
    Ok(match Backend::from_name(&name)? {
        Backend::Slurm(b) => Batch::Slurm(b),
        Backend::Oar(b) => Batch::Oar(b),
        Backend::Local(_) => bail!(
            "the local backend keeps no job list: its agents are child processes of their proxies"
        ),
    })
}

/// The kind of job a noyau job name says: `noyau-kernel-…` → kernel.
fn kind(name: &str) -> &str {
    name.strip_prefix("noyau-")
        .and_then(|r| r.split('-').next())
        .unwrap_or("?")
}

/// One line of `noyau ps`, whatever the scheduler.
struct Row {
    id: String,
    name: String,
    state: String,
    reason: String,
    node: String,
    time_left: String,
}

async fn rows(b: &Batch) -> anyhow::Result<Vec<Row>> {
    Ok(match b {
        Batch::Slurm(b) => b
            .list_mine()
            .await
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .map(|j| Row {
                reason: if j.state == "PENDING" {
                    j.reason
                } else {
                    String::new()
                },
                id: j.id,
                name: j.name,
                state: j.state,
                node: j.node,
                time_left: j.time_left,
            })
            .collect(),
        Batch::Oar(b) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            b.list_mine()
                .await
                .map_err(anyhow::Error::msg)?
                .into_iter()
                .map(|j| {
                    let (reason, node) = match oar::state_of(&j) {
                        JobState::Pending { reason, .. } => (reason, String::new()),
                        JobState::Running { node } => (String::new(), node),
                        _ => Default::default(),
                    };
                    let time_left = match (j.state.as_str(), j.start_time, j.walltime) {
                        ("Running", Some(s), Some(w)) if s > 0 => {
                            oar::walltime((s + w - now).max(0) as u64)
                        }
                        _ => String::new(),
                    };
                    Row {
                        id: j.id.to_string(),
                        name: j.name.unwrap_or_default(),
                        state: j.state,
                        reason,
                        node,
                        time_left,
                    }
                })
                .collect()
        }
    })
}

pub async fn ps(backend: Option<&str>) -> anyhow::Result<i32> {
    let b = batch(backend)?;
    println!(
        "{:<10} {:<7} {:<28} {:<10} {:<16} {:<12} {:<10} CELLS",
        "JOBID", "KIND", "NAME", "STATE", "REASON", "NODE", "TIME_LEFT"
    );
    for j in rows(&b).await? {
        // A detached run reports its cells in a status file.
        let cells = std::fs::read_to_string(noyau_run::runner::status_path(&j.id))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| format!("{}/{}", v["done"], v["total"]))
            .unwrap_or_default();
        println!(
            "{:<10} {:<7} {:<28} {:<10} {:<16} {:<12} {:<10} {}",
            j.id,
            kind(&j.name),
            j.name,
            j.state,
            j.reason,
            j.node,
            j.time_left,
            cells
        );
    }
    Ok(0)
}

async fn check_mine(b: &Batch, id: &str) -> anyhow::Result<()> {
    if !rows(b).await?.iter().any(|j| j.id == id) {
        bail!("{id} is not one of your noyau jobs in the queue (see `noyau ps`)");
    }
    Ok(())
}

pub async fn cancel(backend: Option<&str>, id: &str) -> anyhow::Result<i32> {
    let b = batch(backend)?;
    check_mine(&b, id).await?;
    match &b {
        Batch::Slurm(s) => s.scancel(id).await,
        Batch::Oar(o) => o.oardel(id).await,
    }
    .map_err(anyhow::Error::msg)?;
    println!("cancelled {id}");
    Ok(0)
}

/// `noyau extend ID DURATION`: more walltime for a running or queued job,
/// where the scheduler lets users ask for it.
pub async fn extend(backend: Option<&str>, id: &str, duration: &str) -> anyhow::Result<i32> {
    let secs = noyau_config::parse_time(duration)
        .ok()
        .filter(|s| *s > 0)
        .with_context(|| {
            format!("{duration:?} is not a duration; write MM, HH:MM:SS or D-HH:MM:SS (e.g. 30, 1:00:00)")
        })?;
    let b = batch(backend)?;
    check_mine(&b, id).await?;
    match &b {
        Batch::Oar(o) => {
            let answer = o.extend(id, secs).await.map_err(anyhow::Error::msg)?;
            println!("{answer}");
            Ok(0)
        }
        Batch::Slurm(_) => bail!(
            "Slurm lets only its administrators extend a job's time limit \
             (scontrol update JobId={id} TimeLimit=…): ask yours, or resubmit with a longer `time`"
        ),
    }
}

pub async fn dry_run(
    backend: &str,
    inner: &str,
    noyau_exe: PathBuf,
    resources: noyau_config::Profile,
) -> anyhow::Result<i32> {
    let b = Backend::from_name(backend)?;
    let spec = JobSpec {
        name: format!("noyau-kernel-{inner}"),
        program: noyau_exe,
        args: vec!["agent".into()],
        cwd: Some(std::env::current_dir()?),
        profile: resources,
        ..Default::default()
    };
    let text = b.dry_run(&spec).await.context("checking the job")?;
    print!("{text}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn kinds() {
        assert_eq!(super::kind("noyau-kernel-python3"), "kernel");
        assert_eq!(super::kind("noyau-run-analysis"), "run");
    }
}
