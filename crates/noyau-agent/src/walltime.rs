//! The job's walltime, seen from inside the job.
//!
//! A batch job ends at its time limit whatever the kernel is doing. The
//! agent learns how long its job has left (`squeue -h -j $SLURM_JOB_ID -o %L`,
//! asked again before each warning, since an administrator may extend a
//! job) and tells the proxy or runner at each warning threshold (default
//! 10 min and 1 min before the end; `NOYAU_WALLTIME_WARN=600,60` in
//! seconds) with [`Event::WalltimeWarning`]. The job script asks Slurm for
//! SIGUSR1 shortly before the end (`--signal=B:USR1@…`); the agent turns it
//! into [`Event::WalltimeNear`], on which `noyau run` saves and stops while
//! there is still time. Only relative times travel: no clock or time zone
//! of the compute node is trusted.
//!
//! [`Event::WalltimeWarning`]: noyau_link::envelope::Event::WalltimeWarning
//! [`Event::WalltimeNear`]: noyau_link::envelope::Event::WalltimeNear

use std::sync::{Arc, Mutex};
use std::time::Duration;

use noyau_link::envelope::Event;
use noyau_link::Lane;
use tokio::time::Instant;

use crate::outbox::Outbox;

/// The Slurm job this agent runs in, if any.
pub fn slurm_job() -> Option<String> {
    std::env::var("SLURM_JOB_ID").ok().filter(|v| !v.is_empty())
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

async fn ask_time_left(job: &str) -> Result<Option<u64>, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("squeue")
            .args(["-h", "-j", job, "-o", "%L"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "squeue did not answer within 30 s".to_string())?
    .map_err(|e| format!("cannot run squeue: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "squeue failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(noyau_sched::slurm::parse_time_left))
}

/// When the job ends, as far as this agent knows (shared with the USR1 handler).
#[derive(Clone, Default)]
pub struct End(Arc<Mutex<Option<Instant>>>);

impl End {
    pub fn seconds_left(&self) -> Option<u64> {
        self.0
            .lock()
            .unwrap()
            .map(|e| e.saturating_duration_since(Instant::now()).as_secs())
    }
}

/// Follows the job's walltime and sends a warning at each threshold still
/// ahead. Returns when there is no job, no limit, or no threshold left.
pub async fn watch(job: String, outbox: Arc<Outbox>, end: End) {
    let mut warned: Vec<u64> = Vec::new();
    let mut failures = 0;
    let thresholds = thresholds();
    loop {
        let left = match ask_time_left(&job).await {
            Ok(Some(l)) => l,
            Ok(None) => {
                tracing::info!(job, "the job has no time limit squeue can tell");
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
