//! The frontend's requests on the noyau comm (docs/comm.md, "Frontend →
//! kernel"). Each gets exactly one reply; a scheduler command or a log read
//! runs in a task of its own and comes back to the loop as a [`Done`], so
//! the kernel's messages keep flowing meanwhile. Only this kernel's jobs
//! are touched: its own, its targets', its Dask workers'.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::Done;
use crate::relay::Proxy;

/// At most this much of a log is read (its end).
const TAIL_BYTES: u64 = 1024 * 1024;
/// At most this many lines are sent.
const MAX_LINES: usize = 5000;

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Action {
    Refresh,
    /// The frontend is still there (it sends this every 30 s; a comm not
    /// heard from is closed: [`super::EXPIRE_AFTER`]).
    Ping,
    Extend {
        duration: String,
    },
    Release {
        target: String,
    },
    Cancel {
        job: String,
    },
    Log {
        job: Option<String>,
        #[serde(default = "default_lines")]
        lines: usize,
    },
}

fn default_lines() -> usize {
    200
}

impl Done {
    fn answer(mut self, result: Result<String, String>) -> Done {
        (self.ok, self.message) = match result {
            Ok(m) => (true, m),
            Err(m) => (false, m),
        };
        self
    }
}

impl Proxy {
    /// A request on comm `comm_id` (its `busy` went out).
    pub(super) async fn comm_request(&mut self, parent: Bytes, comm_id: String, data: Value) {
        let d = Done {
            parent,
            comm_id,
            id: data.get("id").cloned().unwrap_or(Value::Null),
            logs: Vec::new(),
            ok: false,
            message: String::new(),
        };
        let action = match serde_json::from_value::<Action>(data) {
            Ok(a) => a,
            Err(e) => {
                let m = format!("noyau cannot do this request ({e}); it knows refresh, ping, extend, release, cancel and log");
                return self.on_done(d.answer(Err(m))).await;
            }
        };
        match action {
            Action::Refresh => self.on_done(d.answer(Ok("state sent".into()))).await,
            Action::Ping => self.comm_reply(d.answer(Ok("pong".into()))).await,
            Action::Extend { duration } => self.extend(d, &duration).await,
            Action::Release { target } => {
                let r = self.release_target(&target).map_err(|e| e.to_string());
                self.on_done(d.answer(r)).await
            }
            Action::Cancel { job } => self.cancel_job(d, &job).await,
            Action::Log { job, lines } => match self.log_path(job.as_deref()) {
                Ok(path) => {
                    let tx = self.comms.done_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let d = match tail(&path, lines.clamp(1, MAX_LINES)) {
                            Ok(text) => Done {
                                logs: vec![text],
                                ..d.answer(Ok(format!("the end of {}", path.display())))
                            },
                            Err(m) => d.answer(Err(m)),
                        };
                        let _ = tx.send(d);
                    });
                }
                Err(m) => self.on_done(d.answer(Err(m))).await,
            },
        }
    }

    /// More walltime for the kernel's own job, where the scheduler allows it.
    async fn extend(&mut self, d: Done, duration: &str) {
        let secs = noyau_config::parse_time(duration).ok().filter(|s| *s > 0);
        let job = self.agent.watch.job_id().map(str::to_string);
        let sched = noyau_sched::Scheduler::named(&self.cfg.backend);
        let (secs, job, sched) = match (secs, job, sched) {
            _ if self.cfg.backend == "local" => {
                let m = "this kernel runs on the local backend: it has no walltime to extend";
                return self.on_done(d.answer(Err(m.into()))).await;
            }
            (None, ..) => {
                let m = format!("{duration:?} is not a duration; write MM, HH:MM:SS or D-HH:MM:SS (e.g. 30, 1:00:00)");
                return self.on_done(d.answer(Err(m))).await;
            }
            (Some(s), Some(j), Ok(b)) => (s, j, b),
            (_, None, _) => {
                let m =
                    "this kernel does not know its job's id (it was taken over from another proxy)";
                return self.on_done(d.answer(Err(m.into()))).await;
            }
            (_, _, Err(e)) => return self.on_done(d.answer(Err(e.to_string()))).await,
        };
        let tx = self.comms.done_tx.clone();
        tokio::spawn(async move {
            let r = sched.extend(&job, secs).await.map_err(|e| e.to_string());
            if r.is_ok() {
                // The new end, in the state that follows.
                sched.refresh().await;
            }
            let _ = tx.send(d.answer(r));
        });
    }

    /// Ends a target's job or a Dask worker job of this kernel's; any
    /// other job is refused. A worker job is cancelled by the cluster's
    /// task, which may be busy: its answer comes back as a [`Done`].
    async fn cancel_job(&mut self, d: Done, id: &str) {
        let target = (self.targets.map.values())
            .find(|t| t.job == id)
            .map(|t| t.name.clone());
        if let Some(name) = target {
            let r = self.release_target(&name).map_err(|e| e.to_string());
            return self.on_done(d.answer(r)).await;
        }
        let cancel = (self.magics.dask.cluster()).and_then(|c| c.cancel_worker(id));
        let Some(cancel) = cancel else {
            let m = format!("job {id} is not one of this kernel's target or Dask worker jobs: noyau cancels only those here");
            return self.on_done(d.answer(Err(m))).await;
        };
        let (tx, id) = (self.comms.done_tx.clone(), id.to_string());
        tokio::spawn(async move {
            let r = match cancel.await {
                true => Ok(format!("Dask worker job {id} cancelled")),
                false => Err(format!("Dask worker job {id} had ended already")),
            };
            let _ = tx.send(d.answer(r));
        });
    }

    /// The log of the kernel's own job (`job`: None), a target's or a Dask job's.
    fn log_path(&self, job: Option<&str>) -> Result<PathBuf, String> {
        let (name, id) = match job {
            None if self.cfg.backend == "local" => {
                return Err("this kernel runs on the local backend: its agent's messages go to the Jupyter server's log, not to a job log".into());
            }
            None => (
                format!("noyau-kernel-{}", self.cfg.inner),
                self.agent
                    .watch
                    .job_id()
                    .ok_or("this kernel does not know its job's id")?
                    .to_string(),
            ),
            Some(id) => match self.targets.map.values().find(|t| t.job == id) {
                Some(t) => (format!("noyau-target-{}", t.name), id.to_string()),
                None => return self.dask_log_path(id),
            },
        };
        let spec = noyau_sched::JobSpec {
            name,
            ..Default::default()
        };
        Ok(spec.log_path(&id))
    }

    /// The log of one of the Dask cluster's jobs (its scheduler's or a worker's).
    fn dask_log_path(&self, id: &str) -> Result<PathBuf, String> {
        let view = (self.magics.dask.cluster())
            .map(|c| c.view())
            .unwrap_or_default();
        let job = view.jobs.into_iter().find(|j| j.id == id);
        job.map(|j| j.log).ok_or_else(|| {
            format!("job {id} is not one of this kernel's target or Dask jobs: noyau shows only their logs and the kernel's own")
        })
    }
}

/// The last `lines` lines of the log at `path`, if it is a regular file of
/// ours (not a link another user planted).
fn tail(path: &Path, lines: usize) -> Result<String, String> {
    let uid = nix::unistd::geteuid().as_raw();
    match noyau_sched::tail_log(path, uid, TAIL_BYTES, lines) {
        Ok(Some(text)) => Ok(text),
        Ok(None) => Err(format!(
            "{} is not a file of yours: noyau does not show it",
            path.display()
        )),
        Err(e) => Err(format!("cannot read the job's log {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_only_our_regular_files() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("a.log");
        std::fs::write(&log, "1\n2\n3\n").unwrap();
        assert_eq!(tail(&log, 2).unwrap(), "2\n3");
        let link = d.path().join("b.log");
        std::os::unix::fs::symlink(&log, &link).unwrap();
        assert!(tail(&link, 2).is_err(), "a symbolic link is not followed");
        assert!(tail(d.path(), 2).is_err(), "a directory is no log");
    }

    #[test]
    fn parses_the_requests() {
        let a: Action = serde_json::from_str(r#"{"id":"r5","action":"log","job":null}"#).unwrap();
        assert!(matches!(
            a,
            Action::Log {
                job: None,
                lines: 200
            }
        ));
        assert!(serde_json::from_str::<Action>(r#"{"id":"r","action":"rm"}"#).is_err());
    }
}
