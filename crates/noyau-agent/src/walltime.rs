//! The job's walltime, seen from inside the job.
//!
//! A batch job ends at its time limit whatever the kernel is doing. The
//! agent learns how long its job has left from the job's own scheduler
//! (Slurm: `squeue -h -j $SLURM_JOB_ID -o %L`; OAR: `oarstat -J -f -j
//! $OAR_JOB_ID`'s start time plus walltime, less now), asked again before
//! each warning, since the limit may be extended (`oarwalltime`, an
//! administrator), and tells the proxy or runner at each warning threshold
//! (default 10 min and 1 min before the end; `NOYAU_WALLTIME_WARN=600,60`
//! in seconds) with [`Event::WalltimeWarning`]. The job script asks for
//! SIGUSR1 shortly before the end (Slurm: `--signal=B:USR1@…`; OAR:
//! `--checkpoint N --signal 10`); the agent turns it into
//! [`Event::WalltimeNear`], on which `noyau run` saves and stops while
//! there is still time. Only relative times travel: no time zone of the
//! compute node is trusted (OAR's answer is an epoch, compared with the
//! node's clock: the one place a node's clock counts, to the seconds NTP
//! leaves).
//!
//! [`Event::WalltimeWarning`]: noyau_link::envelope::Event::WalltimeWarning
//! [`Event::WalltimeNear`]: noyau_link::envelope::Event::WalltimeNear

use std::sync::{Arc, Mutex};
use std::time::Duration;

use noyau_link::envelope::Event;
use noyau_link::Lane;
use tokio::time::Instant;

use crate::outbox::Outbox;

/// The scheduler a batch job runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    Slurm,
    Oar,
}

/// The batch job this agent runs in, if any, and its scheduler.
pub fn batch_job() -> Option<(Scheduler, String)> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    var("SLURM_JOB_ID")
        .map(|j| (Scheduler::Slurm, j))
        .or_else(|| var("OAR_JOB_ID").map(|j| (Scheduler::Oar, j)))
}

/// Warning thresholds in seconds before the end, largest first.
pub fn thresholds() -> Vec<u64> {
    let mut t: Vec<u64> = match std::env::var("NOYAU_WALLTIME_WARN") {
        Ok(v) => v
            .split(',')
            .filter_map(|x| x.trim().parse::<u64>().ok())
            .collect(),
        Err(_) => vec![600, 60],
    };
    t.sort_unstable_by(|a, b| b.cmp(a));
    t.dedup();
    t
}

/// Runs a scheduler command (30 s at most); its stdout.
async fn ask(program: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("{program} did not answer within 30 s"))?
    .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Seconds left of an OAR job: `start + walltime - now` (None when OAR
/// has not started it or gives it no walltime).
pub fn oar_time_left(job: &noyau_sched::oar::OarJob, now_epoch: i64) -> Option<u64> {
    let start = job.start_time.filter(|s| *s > 0)?;
    let walltime = job.walltime.filter(|w| *w > 0)?;
    Some((start + walltime - now_epoch).max(0) as u64)
}

async fn ask_time_left(scheduler: Scheduler, job: &str) -> Result<Option<u64>, String> {
    match scheduler {
        Scheduler::Slurm => Ok(ask("squeue", &["-h", "-j", job, "-o", "%L"])
            .await?
            .lines()
            .find_map(noyau_sched::slurm::parse_time_left)),
        Scheduler::Oar => {
            let jobs =
                noyau_sched::oar::parse_oarstat(&ask("oarstat", &["-J", "-f", "-j", job]).await?)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|e| format!("the clock is before 1970: {e}"))?
                .as_secs() as i64;
            Ok(jobs
                .iter()
                .find(|j| j.id.to_string() == job)
                .and_then(|j| oar_time_left(j, now)))
        }
    }
}

/// When the job ends, as far as this agent knows (shared with the USR1 handler).
#[derive(Clone, Default)]
pub struct End(Arc<Mutex<Option<Instant>>>);

impl End {
    pub fn at(&self) -> Option<Instant> {
        *self.0.lock().unwrap()
    }

    pub fn seconds_left(&self) -> Option<u64> {
        self.at()
            .map(|e| e.saturating_duration_since(Instant::now()).as_secs())
    }
}

/// Follows the job's walltime and sends a warning at each threshold still
/// ahead. Returns when there is no job, no limit, or no threshold left.
pub async fn watch(scheduler: Scheduler, job: String, outbox: Arc<Outbox>, end: End) {
    let mut warned: Vec<u64> = Vec::new();
    let mut failures = 0;
    let thresholds = thresholds();
    loop {
        let left = match ask_time_left(scheduler, &job).await {
            Ok(Some(l)) => l,
            Ok(None) => {
                tracing::info!(
                    job,
                    ?scheduler,
                    "the job has no time limit its scheduler can tell"
                );
                return;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!("cannot learn the job's time left: {e}");
                if failures > 5 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
        };
        let now = Instant::now();
        *end.0.lock().unwrap() = Some(now + Duration::from_secs(left));
        if warned.is_empty() {
            tracing::info!(job, left, "walltime: seconds left");
        }
        // The next threshold below what is left (one already passed at the
        // start is not announced: a 1-minute job needs no "10 minutes left").
        let Some(&next) = thresholds
            .iter()
            .find(|t| **t < left && !warned.contains(t))
        else {
            return;
        };
        let wait = left - next;
        if wait > 120 {
            // Ask again nearer the time: the limit may change.
            tokio::time::sleep(Duration::from_secs(wait - 60)).await;
            continue;
        }
        tokio::time::sleep(Duration::from_secs(wait)).await;
        warned.push(next);
        let seconds_left = end.seconds_left().unwrap_or(next);
        tracing::warn!(job, seconds_left, "walltime warning");
        outbox.event(
            Lane::Iopub,
            &Event::WalltimeWarning {
                job: job.clone(),
                seconds_left,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn oar_time_left() {
        let j = |start, walltime| noyau_sched::oar::OarJob {
            start_time: start,
            walltime,
            ..Default::default()
        };
        assert_eq!(
            super::oar_time_left(&j(Some(1000), Some(60)), 1015),
            Some(45)
        );
        assert_eq!(
            super::oar_time_left(&j(Some(1000), Some(60)), 2000),
            Some(0)
        );
        assert_eq!(super::oar_time_left(&j(Some(0), Some(60)), 1015), None);
        assert_eq!(super::oar_time_left(&j(Some(1000), None), 1015), None);
    }
}
