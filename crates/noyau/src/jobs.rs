//! `noyau ps`, `noyau cancel` and `noyau kernel --dry-run`: thin wrappers
//! over the scheduler backends.

use std::path::PathBuf;

use anyhow::{bail, Context};
use noyau_sched::slurm::SlurmBackend;
use noyau_sched::{Backend, JobSpec};

fn slurm(backend: &str) -> anyhow::Result<SlurmBackend> {
    match Backend::from_name(backend)? {
        Backend::Slurm(b) => Ok(b),
        other => bail!(
            "the {} backend keeps no job list: its agents are child processes of their proxies",
            other.name()
        ),
    }
}

/// The kind of job a noyau job name says: `noyau-kernel-…` → kernel.
fn kind(name: &str) -> &str {
    name.strip_prefix("noyau-")
        .and_then(|r| r.split('-').next())
        .unwrap_or("?")
}

pub async fn ps(backend: &str) -> anyhow::Result<i32> {
    let b = slurm(backend)?;
    let jobs = b.list_mine().await.map_err(anyhow::Error::msg)?;
    println!(
        "{:<10} {:<7} {:<28} {:<10} {:<16} {:<12} {:<10} CELLS",
        "JOBID", "KIND", "NAME", "STATE", "REASON", "NODE", "TIME_LEFT"
    );
    for j in jobs {
        let reason = if j.state == "PENDING" {
            j.reason.as_str()
        } else {
            ""
        };
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
            reason,
            j.node,
            j.time_left,
            cells
        );
    }
    Ok(0)
}

pub async fn cancel(backend: &str, id: &str) -> anyhow::Result<i32> {
    let b = slurm(backend)?;
    let mine = b.list_mine().await.map_err(anyhow::Error::msg)?;
    if !mine.iter().any(|j| j.id == id) {
        bail!("{id} is not one of your noyau jobs in the queue (see `noyau ps`)");
    }
    b.scancel(id).await.map_err(anyhow::Error::msg)?;
    println!("cancelled {id}");
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
