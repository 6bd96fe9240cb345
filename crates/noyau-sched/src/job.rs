//! Submitted jobs, as callers hold them: a [`Job`] (its id, its state as
//! the watcher sees it, and how to cancel it), or an [`ArrayJob`] (one
//! state per task, and the pacing of schedulers that cannot limit how many
//! tasks run at once).

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::batch::{Batch, Submission};
use crate::run::AsUser;
use crate::{JobState, SchedError};

/// A job array's task ids and how many may run at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayTasks {
    pub ids: Vec<usize>,
    pub max_parallel: usize,
}

impl ArrayTasks {
    /// Fewer may run at once than there are tasks.
    pub fn limited(&self) -> bool {
        self.max_parallel < self.ids.len()
    }
}

/// How a job is made to end: the local backend's signals, a scheduler's
/// cancel.
#[async_trait]
pub(crate) trait Ending: Send + Sync + std::fmt::Debug {
    /// Asks job `id` to end, and makes sure it does; a failure is logged.
    async fn end(&self, id: &str);
}

/// A submitted job.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    /// The backend's name (`local`, `slurm`…).
    pub backend: &'static str,
    pub state: watch::Receiver<JobState>,
    ending: Box<dyn Ending>,
}

impl Job {
    pub(crate) fn new(
        id: String,
        backend: &'static str,
        state: watch::Receiver<JobState>,
        ending: Box<dyn Ending>,
    ) -> Job {
        Job {
            id,
            backend,
            state,
            ending,
        }
    }

    /// Asks the job to end (the agent then stops its kernel), and makes
    /// sure it does; a failure to ask is logged.
    pub async fn cancel(&self) {
        self.ending.end(&self.id).await
    }
}

/// A batch job's end: the scheduler's cancel, as its submitter.
#[derive(Debug)]
pub(crate) struct Cancel {
    pub imp: Arc<dyn Batch>,
    pub as_user: Option<Arc<AsUser>>,
    /// What the submission wrote that the job removes when it starts: a
    /// job cancelled before leaves them to its canceller.
    pub files: Vec<PathBuf>,
}

impl Cancel {
    /// Cancels `ids` (as the submitting user), through the throttle.
    async fn ids(&self, ids: &[String]) -> Result<(), SchedError> {
        let u = self.as_user.as_deref();
        let what = crate::throttle::Call::Cancel(ids);
        crate::throttle::throttled(u, what, self.imp.cancel(ids, u)).await
    }

    /// Cancels `ids`, saying why not, and removes the submission's files.
    pub(crate) async fn end_all(&self, ids: &[String]) {
        if let Err(e) = self.ids(ids).await {
            tracing::warn!("{e}");
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[async_trait]
impl Ending for Cancel {
    async fn end(&self, id: &str) {
        self.end_all(&[id.to_string()]).await
    }
}

/// A submitted job array: its tasks' states come from the process's
/// watcher like any job's.
#[derive(Debug)]
pub struct ArrayJob {
    /// The array's id, as the scheduler shows it.
    pub id: String,
    pub tasks: ArrayTasks,
    /// How the array was asked for, for people (`--array=0-5%2`).
    pub note: String,
    cancel: Cancel,
    interval: Duration,
    /// Each task's id and state, in task order.
    states: Vec<(String, watch::Receiver<JobState>)>,
    /// Tasks submitted held and not released yet (see `pace`).
    held: Vec<bool>,
}

impl ArrayJob {
    /// `states`: each task's, as the watcher follows it; `interval`: the
    /// watcher's.
    pub(crate) fn new(
        sub: Submission,
        tasks: ArrayTasks,
        cancel: Cancel,
        states: Vec<(String, watch::Receiver<JobState>)>,
        interval: Duration,
    ) -> ArrayJob {
        ArrayJob {
            id: sub.id,
            held: vec![sub.held; states.len()],
            states,
            tasks,
            note: sub.note,
            cancel,
            interval,
        }
    }

    /// The tasks' states, in task order.
    pub fn states(&self) -> Vec<JobState> {
        self.states
            .iter()
            .map(|(_, s)| s.borrow().clone())
            .collect()
    }

    /// How often the watcher asks the scheduler.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// For a scheduler without a limit of its own (OAR), tasks wait held:
    /// while fewer than K are queued or running, the next held ones are
    /// released, in task order. A released task counts as active at once
    /// (the scheduler may still show it held for a while).
    pub async fn pace(&mut self) -> Result<(), SchedError> {
        let active = self
            .states
            .iter()
            .zip(&self.held)
            .filter(|((_, s), held)| !**held && !matches!(*s.borrow(), JobState::Ended(_)))
            .count();
        let room = self.tasks.max_parallel.saturating_sub(active);
        let next: Vec<usize> = (0..self.held.len())
            .filter(|i| self.held[*i])
            .take(room)
            .collect();
        if next.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = next.iter().map(|i| self.states[*i].0.clone()).collect();
        let u = self.cancel.as_user.as_deref();
        let what = crate::throttle::Call::Other;
        crate::throttle::throttled(u, what, self.cancel.imp.release(&ids)).await?;
        for i in next {
            self.held[i] = false;
        }
        Ok(())
    }

    /// Cancels every task, held ones included.
    pub async fn cancel(&self) -> Result<(), SchedError> {
        let ids: Vec<String> = self.states.iter().map(|(id, _)| id.clone()).collect();
        self.cancel.ids(&ids).await
    }
}

impl Drop for ArrayJob {
    /// The submission's files (environment, script, task list) are read by
    /// every task: they go once the submitter is done with the array.
    fn drop(&mut self) {
        for f in &self.cancel.files {
            let _ = std::fs::remove_file(f);
        }
    }
}
