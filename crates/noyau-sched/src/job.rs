//! Submitted jobs, as callers hold them: a [`Job`] (its id, its state as
//! the watcher sees it, and how to cancel it), or an [`ArrayJob`] (one
//! state per task, and the pacing of schedulers that cannot limit how many
//! tasks run at once).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::local::LocalHandle;
use crate::{JobState, SchedError, Scheduler};

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

/// A submitted job.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    /// The backend's name (`local`, `slurm`…).
    pub backend: &'static str,
    pub state: watch::Receiver<JobState>,
    owner: Owner,
}

#[derive(Debug)]
enum Owner {
    Local(LocalHandle),
    Batch {
        sched: Scheduler,
        /// What the submission wrote that the job removes when it starts:
        /// a job cancelled before leaves them to its canceller.
        files: Vec<PathBuf>,
    },
}

impl Job {
    pub(crate) fn local(id: String, state: watch::Receiver<JobState>, h: LocalHandle) -> Job {
        Job {
            id,
            backend: "local",
            state,
            owner: Owner::Local(h),
        }
    }

    pub(crate) fn batch(
        sched: Scheduler,
        id: String,
        state: watch::Receiver<JobState>,
        files: Vec<PathBuf>,
    ) -> Job {
        Job {
            id,
            backend: sched.name(),
            state,
            owner: Owner::Batch { sched, files },
        }
    }

    /// Asks the job to end (the agent then stops its kernel), and makes
    /// sure it does; a failure to ask is logged.
    pub async fn cancel(&self) {
        match &self.owner {
            Owner::Local(h) => h.cancel().await,
            Owner::Batch { sched, files } => {
                if let Err(e) = sched.cancel(std::slice::from_ref(&self.id)).await {
                    tracing::warn!("{e}");
                }
                for f in files {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
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
    sched: Scheduler,
    /// Each task's id and state, in task order.
    states: Vec<(String, watch::Receiver<JobState>)>,
    /// Tasks submitted held and not released yet (see `pace`).
    held: Vec<bool>,
    files: Vec<PathBuf>,
}

impl ArrayJob {
    pub(crate) fn new(
        sched: Scheduler,
        tasks: ArrayTasks,
        sub: crate::batch::Submission,
        partition: Option<String>,
    ) -> ArrayJob {
        let states: Vec<_> = sub
            .tasks
            .iter()
            .map(|t| (t.clone(), sched.watcher().track(t, partition.clone())))
            .collect();
        ArrayJob {
            id: sub.id,
            held: vec![sub.held; states.len()],
            states,
            tasks,
            note: sub.note,
            sched,
            files: sub.files,
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
        self.sched.interval()
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
        self.sched.imp().release(&ids).await?;
        for i in next {
            self.held[i] = false;
        }
        Ok(())
    }

    /// Cancels every task, held ones included.
    pub async fn cancel(&self) -> Result<(), SchedError> {
        let ids: Vec<String> = self.states.iter().map(|(id, _)| id.clone()).collect();
        self.sched.cancel(&ids).await
    }
}

impl Drop for ArrayJob {
    /// The submission's files (environment, script, task list) are read by
    /// every task: they go once the submitter is done with the array.
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}
