//! One watcher per process, scheduler and scope: every tracked job's state
//! comes from one listing call per interval (±20 %, so many processes do
//! not poll in step), whatever the number of jobs and of callers. A
//! failing listing makes every job [`JobState::Unknown`], never ended: a
//! controller restart must not end a kernel; nor does a job listed twice
//! in different states (a forged line, see `by_id`). A job that left the listing
//! ends as [`Batch::gone`] says, once it can say (a scheduler whose
//! accounting is written late is asked again for a while). The watchers
//! of a user's processes share their listings where the scheduler allows
//! (`shared.rs`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio::sync::watch;

use crate::batch::{Batch, JobInfo, Scope};
use crate::shared::Shared;
use crate::SchedError;
use crate::{JobEnd, JobState};

struct Tracked {
    tx: watch::Sender<JobState>,
    since: Instant,
    /// When a listing first left it out.
    left: Option<Instant>,
}

struct Inner {
    imp: Arc<dyn Batch>,
    scope: Scope,
    interval: Duration,
    /// Where this user's other processes' watchers leave their listings.
    shared: Option<Shared>,
    jobs: Mutex<HashMap<String, Tracked>>,
    running: AtomicBool,
    polls: AtomicU64,
}

/// Follows every tracked job of one scheduler and scope.
#[derive(Clone)]
pub(crate) struct Watcher(Arc<Inner>);

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("scheduler", &self.0.imp)
            .field("scope", &self.0.scope)
            .field("interval", &self.0.interval)
            .finish()
    }
}

impl Watcher {
    /// A watcher; with `shared`, the directory where it shares its
    /// listings with the user's other processes (only for this user's
    /// jobs, and where the scheduler's listing allows it).
    pub(crate) fn new(
        imp: Arc<dyn Batch>,
        scope: Scope,
        interval: Duration,
        shared: Option<PathBuf>,
    ) -> Self {
        let shared = shared
            .filter(|_| scope == Scope::Mine && imp.shares_listing())
            .map(|dir| Shared::new(dir, &*imp));
        Watcher(Arc::new(Inner {
            imp,
            scope,
            interval,
            shared,
            jobs: Mutex::new(HashMap::new()),
            running: false.into(),
            polls: AtomicU64::new(0),
        }))
    }

    pub(crate) fn imp(&self) -> &Arc<dyn Batch> {
        &self.0.imp
    }

    pub(crate) fn scope(&self) -> Scope {
        self.0.scope
    }

    pub(crate) fn interval(&self) -> Duration {
        self.0.interval
    }

    /// Listing calls made so far.
    pub(crate) fn polls(&self) -> u64 {
        self.0.polls.load(Ordering::Relaxed)
    }

    /// Starts following a job; its state starts as pending. The polling
    /// loop runs on the first runtime that tracks a job.
    pub(crate) fn track(&self, id: &str, partition: Option<String>) -> watch::Receiver<JobState> {
        let (tx, rx) = watch::channel(JobState::Pending {
            reason: "submitted".into(),
            start: None,
            partition,
        });
        self.0.jobs.lock().unwrap().insert(
            id.into(),
            Tracked {
                tx,
                since: Instant::now(),
                left: None,
            },
        );
        if !self.0.running.swap(true, Ordering::SeqCst) {
            let me = self.clone();
            tokio::spawn(async move { me.poll_loop().await });
        }
        rx
    }

    async fn poll_loop(self) {
        loop {
            // a sleep after each poll, not a ticking interval: a poll that
            // waited long for the shared listing is not followed at once by
            // another
            let jitter = rand::rng().random_range(0.8..1.2);
            tokio::time::sleep(self.0.interval.mul_f64(jitter)).await;
            if Arc::strong_count(&self.0) == 1 {
                // nobody can track a job any more
                return;
            }
            if self.0.jobs.lock().unwrap().is_empty() {
                continue;
            }
            self.poll_once().await;
        }
    }

    /// One listing for every tracked job (the scheduler's, or one another
    /// process of the user's got); and when it was asked.
    async fn listing(&self) -> Result<(Vec<JobInfo>, Instant), SchedError> {
        let count = || {
            self.0.polls.fetch_add(1, Ordering::Relaxed);
        };
        if let Some(s) = &self.0.shared {
            let (jobs, at) = s.list(&*self.0.imp, self.0.interval, count).await?;
            let age = SystemTime::now().duration_since(at).unwrap_or_default();
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            return Ok((jobs, at));
        }
        let asked = Instant::now();
        let ids: Vec<String> = self.0.jobs.lock().unwrap().keys().cloned().collect();
        count();
        Ok((self.0.imp.list(self.0.scope, Some(&ids)).await?, asked))
    }

    /// One listing for every tracked job; updates their states.
    pub(crate) async fn poll_once(&self) {
        let (listed, asked) = match self.listing().await {
            Ok(l) => l,
            Err(e) => {
                let why = e.to_string();
                tracing::warn!("{why}");
                for t in self.0.jobs.lock().unwrap().values() {
                    t.tx.send_replace(JobState::Unknown { why: why.clone() });
                }
                return;
            }
        };
        let states = by_id(listed, self.0.imp.display());
        let gone = self.update(&states, asked);
        if gone.is_empty() {
            return;
        }
        let mut ends = self.0.imp.gone(&gone).await;
        let lag = self.0.imp.records_lag();
        let mut jobs = self.0.jobs.lock().unwrap();
        for id in gone {
            let end = match (ends.remove(&id), jobs.get(&id).and_then(|t| t.left)) {
                (Some(end), _) => end,
                // its end may not be recorded yet: asked again next time
                (None, Some(left)) if left.elapsed() < lag => continue,
                (None, _) => JobEnd {
                    description: format!(
                        "left the {0} queue, and {0} keeps no record of how it ended",
                        self.0.imp.display()
                    ),
                    success: false,
                },
            };
            if let Some(t) = jobs.remove(&id) {
                t.tx.send_replace(JobState::Ended(end));
            }
        }
    }

    /// Sends every listed job its state (ended ones stop being tracked);
    /// the tracked jobs the listing left out.
    fn update(&self, states: &HashMap<String, JobState>, asked: Instant) -> Vec<String> {
        let mut gone = Vec::new();
        self.0
            .jobs
            .lock()
            .unwrap()
            .retain(|id, t| match states.get(id) {
                Some(st) => {
                    t.left = None;
                    t.tx.send_if_modified(|cur| {
                        let changed = cur.differs(st);
                        if changed {
                            *cur = st.clone();
                        }
                        changed
                    });
                    !matches!(st, JobState::Ended(_))
                }
                // Tracked after this listing was asked for: not a verdict.
                None if t.since > asked => true,
                None => {
                    t.left.get_or_insert(asked);
                    gone.push(id.clone());
                    true
                }
            });
        gone
    }
}

/// Each listed job's state. A job listed twice in different states is
/// [`JobState::Unknown`], not the last line's: a scheduler that prints a
/// job's name raw (squeue) lets a name with a line break add a line for
/// any job id, and a listing must not end a job on its word.
fn by_id(listed: Vec<JobInfo>, scheduler: &str) -> HashMap<String, JobState> {
    let mut states: HashMap<String, JobState> = HashMap::new();
    for j in listed {
        match states.entry(j.id) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(j.state);
            }
            std::collections::hash_map::Entry::Occupied(mut e) => {
                if e.get().differs(&j.state) && !matches!(e.get(), JobState::Unknown { .. }) {
                    let why = format!(
                        "{scheduler} listed job {} twice, in different states (a job name with a line break?): its state is not trusted while it does",
                        e.key()
                    );
                    tracing::warn!("{why}");
                    e.insert(JobState::Unknown { why });
                }
            }
        }
    }
    states
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, state: JobState) -> JobInfo {
        JobInfo {
            id: id.into(),
            name: "noyau-x".into(),
            state,
            word: String::new(),
        }
    }

    #[test]
    fn a_job_listed_twice_in_different_states_is_unknown_not_the_last_lines() {
        let running = JobState::Running {
            node: "n1".into(),
            ends_at: None,
        };
        let ended = JobState::Ended(JobEnd {
            description: "was cancelled".into(),
            success: false,
        });
        let states = by_id(
            vec![
                info("12", running.clone()),
                info("13", running.clone()),
                info("13", running.clone()),
                info("12", ended.clone()),
                info("12", running.clone()),
            ],
            "Slurm",
        );
        assert!(
            matches!(&states["12"], JobState::Unknown { why } if why.contains("Slurm listed job 12 twice")),
            "{:?}",
            states["12"]
        );
        // The same state twice is not a forgery that changes anything.
        assert_eq!(states["13"], running);
        assert_eq!(by_id(vec![info("14", ended.clone())], "Slurm")["14"], ended);
    }
}
