//! The job's walltime, seen from inside the job.
//!
//! A batch job ends at its time limit whatever the kernel is doing. The
//! agent learns when its job ends from its scheduler, through noyau-sched's
//! watcher (every [`POLL`], since the limit may change: `noyau extend`, an
//! administrator; a change is seen at the next poll, within 30 s, also
//! after the last warning, and arms again the warnings it pushed back),
//! and tells the proxy or runner at each warning threshold
//! (default 10 min and 1 min before the end; `NOYAU_WALLTIME_WARN=600,60`
//! in seconds) with [`Event::WalltimeWarning`]. The scheduler sends its
//! walltime signal shortly before the end (`Scheduler::walltime_signal`:
//! SIGUSR1, Grid Engine's SIGUSR2); the agent turns it into
//! [`Event::WalltimeNear`], on which `noyau run` saves and stops while
//! there is still time. Only relative times travel to the proxy: no time
//! zone of the compute node is trusted.
//!
//! [`Event::WalltimeWarning`]: noyau_link::envelope::Event::WalltimeWarning
//! [`Event::WalltimeNear`]: noyau_link::envelope::Event::WalltimeNear

use std::sync::{Arc, Mutex};
use std::time::Duration;

use noyau_link::envelope::Event;
use noyau_link::Lane;
use noyau_sched::{JobState, Scheduler};
use tokio::time::Instant;

use crate::outbox::Outbox;

/// How often the agent asks when its job ends.
const POLL: Duration = Duration::from_secs(30);

/// Seconds an end must move later for a warning already given to be given
/// again; the walltime signal's handler counts an extension the same way.
pub(crate) const REARM_AFTER: u64 = 60;

/// Whether a warning given at `threshold` seconds left still holds with
/// `left` seconds left: the end did not move [`REARM_AFTER`] past it
/// (saturating: a threshold is whatever NOYAU_WALLTIME_WARN says).
fn still_warned(threshold: u64, left: u64) -> bool {
    threshold.saturating_add(REARM_AFTER) >= left
}

/// The batch job this agent runs in, if any, and its scheduler (whose
/// watcher, in this process, follows only this job).
pub fn batch_job() -> Option<(Scheduler, String)> {
    let (sched, job) = noyau_sched::this_job()?;
    Some((sched.with_interval(POLL), job))
}

/// When the job ends, as far as this agent knows (shared with the walltime signal's handler).
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
/// ahead. Returns when the job has no limit or has ended.
pub async fn watch(sched: Scheduler, job: String, outbox: Arc<Outbox>, end: End) {
    let mut state = sched.adopt(&job).state;
    sched.refresh().await;
    let mut warned: Vec<u64> = Vec::new();
    let thresholds = noyau_sched::walltime_warnings();
    loop {
        let st = state.borrow_and_update().clone();
        let ends_at = match st {
            JobState::Running {
                ends_at: Some(t), ..
            } => t,
            JobState::Running { ends_at: None, .. } => {
                tracing::info!(job, "the job has no time limit its scheduler can tell");
                return;
            }
            JobState::Ended(_) => return,
            // Not asked yet, or the scheduler does not answer: wait for news.
            JobState::Pending { .. } | JobState::Unknown { .. } => {
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        let left = noyau_sched::seconds_until(ends_at);
        // checked: an absurd time left from the scheduler is no end, not a panic
        *end.0.lock().unwrap() = Instant::now().checked_add(Duration::from_secs(left));
        if warned.is_empty() {
            tracing::info!(job, left, "walltime: seconds left");
        }
        // An extension moved the end well past a threshold already
        // announced (not the scheduler's second of rounding): it is
        // announced again when reached.
        warned.retain(|t| still_warned(*t, left));
        // The next threshold below what is left (one already passed at the
        // start is not announced: a 1-minute job needs no "10 minutes left").
        let Some(&next) = thresholds
            .iter()
            .find(|t| **t < left && !warned.contains(t))
        else {
            // None left, unless the end moves (the signal's handler reads
            // the end too).
            if state.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(left - next)) => {}
            // The end moved (an extension): count again.
            r = state.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        }
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
    use super::*;

    #[test]
    fn a_warning_is_given_again_only_when_the_end_moved_past_it() {
        assert!(still_warned(600, 590));
        assert!(still_warned(600, 660));
        assert!(!still_warned(600, 661));
        // an absurd NOYAU_WALLTIME_WARN threshold: no overflow
        assert!(still_warned(u64::MAX, u64::MAX));
        assert!(still_warned(u64::MAX - 1, 5));
    }
}
