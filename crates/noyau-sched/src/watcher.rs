//! One watcher per process and scheduler: every tracked job's state comes
//! from one listing call per interval (±20 %, so many processes do not poll
//! in step), whatever the number of jobs. What differs between schedulers,
//! the listing and how a job that left it ended, is a [`Listing`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;

use crate::{JobEnd, JobState};

/// A scheduler's side of the watcher.
pub trait Listing: Send + Sync + 'static {
    /// One call for the jobs `ids`: the state of each job it lists, by id.
    fn list(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<HashMap<String, JobState>, String>> + Send;

    /// How jobs the listing no longer shows ended, for those it can say.
    fn gone(&self, ids: &[String]) -> impl Future<Output = HashMap<String, JobEnd>> + Send;
}

struct Tracked {
    tx: watch::Sender<JobState>,
    since: Instant,
}

struct Inner<L> {
    listing: L,
    interval: Duration,
    jobs: Mutex<HashMap<String, Tracked>>,
    running: AtomicBool,
}

/// Follows every tracked job of one scheduler.
pub struct Watcher<L>(Arc<Inner<L>>);

impl<L> Clone for Watcher<L> {
    fn clone(&self) -> Self {
        Watcher(self.0.clone())
    }
}

impl<L> std::fmt::Debug for Watcher<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("interval", &self.0.interval)
            .finish()
    }
}

/// A poll interval from `var` (seconds), default 2 s.
pub fn interval_from_env(var: &str) -> Duration {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(2))
}

impl<L: Listing> Watcher<L> {
    pub fn new(listing: L, interval: Duration) -> Self {
        Watcher(Arc::new(Inner {
            listing,
            interval,
            jobs: Mutex::new(HashMap::new()),
            running: false.into(),
        }))
    }

    /// The scheduler's commands.
    pub fn commands(&self) -> &L {
        &self.0.listing
    }

    /// Starts following a job; its state starts as pending. The polling
    /// loop runs on the first runtime that tracks a job.
    pub fn track(&self, id: &str, partition: Option<String>) -> watch::Receiver<JobState> {
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

    /// One listing call for every tracked job; updates their states.
    pub async fn poll_once(&self) {
        let asked = Instant::now();
        let ids: Vec<String> = self.0.jobs.lock().unwrap().keys().cloned().collect();
        let states = match self.0.listing.list(&ids).await {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!("{why}");
                for t in self.0.jobs.lock().unwrap().values() {
                    t.tx.send_replace(JobState::Unknown { why: why.clone() });
                }
                return;
            }
        };
        let mut gone = Vec::new();
        self.0
            .jobs
            .lock()
            .unwrap()
            .retain(|id, t| match states.get(id) {
                Some(st) => {
                    t.tx.send_if_modified(|cur| {
                        let changed = cur != st;
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
                    gone.push(id.clone());
                    true
                }
            });
        if gone.is_empty() {
            return;
        }
        let mut ends = self.0.listing.gone(&gone).await;
        let mut jobs = self.0.jobs.lock().unwrap();
        for id in gone {
            if let Some(t) = jobs.remove(&id) {
                let end = ends.remove(&id).unwrap_or_else(|| JobEnd {
                    description: "left the scheduler's listing".into(),
                    success: false,
                });
                t.tx.send_replace(JobState::Ended(end));
            }
        }
    }
}
