//! `noyau ps`, `noyau cancel`, `noyau extend` and `noyau kernel --dry-run`:
//! thin wrappers over noyau-sched's scheduler handle.

use std::path::PathBuf;

use anyhow::{bail, Context};
use noyau_sched::{Backend, JobInfo, JobSpec, JobState, Scheduler};
use noyau_text::{for_terminal, Keep};

/// The scheduler the job commands ask: `--backend`, else the config files'
/// `scheduler`, else the one whose commands are installed.
fn batch(flag: Option<&str>) -> anyhow::Result<Scheduler> {
    let configured = match flag {
        Some(b) => Some(b.to_string()),
        None => {
            let cwd = noyau_trust::anchor::ProjectDir::cwd().context("the working directory")?;
            noyau_config::Config::load(&cwd)?.scheduler
        }
    };
    Ok(noyau_sched::site_scheduler(configured.as_deref())?)
}

/// The kind of job a noyau job name says: `noyau-kernel-…` → kernel.
fn kind(name: &str) -> &str {
    name.strip_prefix("noyau-")
        .and_then(|r| r.split('-').next())
        .unwrap_or("?")
}

/// The reason, node and time left columns of a job.
fn columns(j: &JobInfo) -> (String, String, String) {
    match &j.state {
        JobState::Pending { reason, .. } => (reason.clone(), String::new(), String::new()),
        JobState::Running { node, .. } => (
            String::new(),
            node.clone(),
            j.state
                .seconds_left()
                .map(noyau_sched::duration_text)
                .unwrap_or_default(),
        ),
        _ => Default::default(),
    }
}

async fn rows(b: &Scheduler) -> anyhow::Result<Vec<JobInfo>> {
    b.list()
        .await
        .with_context(|| format!("listing your {} jobs", b.display()))
}

pub async fn ps(backend: Option<&str>) -> anyhow::Result<i32> {
    let b = batch(backend)?;
    println!(
        "{:<10} {:<7} {:<28} {:<10} {:<16} {:<12} {:<10} CELLS",
        "JOBID", "KIND", "NAME", "STATE", "REASON", "NODE", "TIME_LEFT"
    );
    for j in rows(&b).await? {
        // A detached run reports its cells in a status file.
        let cells = noyau_run::detach::cells(&j.id).unwrap_or_default();
        let (reason, node, time_left) = columns(&j);
        // What the scheduler reports, names included: one line each.
        let [name, reason, node] =
            [&j.name, &reason, &node].map(|s| for_terminal(s, Keep::Nothing));
        println!(
            "{:<10} {:<7} {:<28} {:<10} {:<16} {:<12} {:<10} {}",
            j.id,
            kind(&j.name),
            name,
            j.word,
            reason,
            node,
            time_left,
            cells
        );
    }
    Ok(0)
}

async fn check_mine(b: &Scheduler, id: &str) -> anyhow::Result<()> {
    if !rows(b).await?.iter().any(|j| j.id == id) {
        bail!("{id} is not one of your noyau jobs in the queue (see `noyau ps`)");
    }
    Ok(())
}

pub async fn cancel(backend: Option<&str>, id: &str) -> anyhow::Result<i32> {
    let b = batch(backend)?;
    check_mine(&b, id).await?;
    b.cancel(&[id.to_string()])
        .await
        .with_context(|| format!("cancelling {id}"))?;
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
    println!("{}", b.extend(id, secs).await?);
    Ok(0)
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
