//! Ownership: a cluster lives only as long as the proxy that made it.
//!
//! The proxy rewrites `DIR/owner` every [`HEARTBEAT`] and lists the
//! cluster's jobs in `DIR/jobs`. Every job of the cluster watches the owner
//! file: when its content has not changed for the grace period (the agent's,
//! `NOYAU_LINK_GIVE_UP`), or it is gone, the owner is dead (kill -9, a lost
//! login node) or the cluster was taken down. The worker then stops Dask and
//! ends; the scheduler job also cancels every job listed (pending ones too,
//! which no watcher runs in) and removes the directory.
//!
//! Why content rather than mtime: the compute nodes' clocks are not the
//! login node's, so only "it changed" is trusted, timed by the watcher's own
//! monotonic clock.

use noyau_vars::EnvVars;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::ClusterDir;

/// How often the proxy rewrites the owner file.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// The grace period the proxy gives its jobs: the agent's
/// (`NOYAU_LINK_GIVE_UP`, default 120 s), never under 3 heartbeats.
pub fn grace_from_env() -> Duration {
    let secs = noyau_vars::seconds(EnvVars::NOYAU_LINK_GIVE_UP).and_then(Result::ok);
    secs.unwrap_or(Duration::from_secs(120)).max(HEARTBEAT * 3)
}

impl ClusterDir {
    pub fn owner_file(&self) -> std::path::PathBuf {
        self.0.join("owner")
    }
    pub fn jobs_file(&self) -> std::path::PathBuf {
        self.0.join("jobs")
    }

    /// The proxy's heartbeat: a new content each time.
    pub fn heartbeat(&self, beat: u64) -> std::io::Result<()> {
        std::fs::write(
            self.owner_file(),
            format!("{} {beat}\n", std::process::id()),
        )
    }

    /// Lists the cluster's jobs (`BACKEND ID` per line) for the scheduler
    /// job to cancel when the owner is gone.
    pub fn write_jobs<'a>(
        &self,
        jobs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> std::io::Result<()> {
        let text: String = jobs
            .into_iter()
            .map(|(b, id)| format!("{b} {id}\n"))
            .collect();
        // Atomic: the scheduler job may read it at any time.
        let tmp = self.0.join(".jobs.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, self.jobs_file())
    }

    /// The jobs listed in `jobs` whose backend is `scheduler` (`slurm`, `oar`).
    pub fn batch_jobs(&self, scheduler: &str) -> Vec<String> {
        std::fs::read_to_string(self.jobs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' ').filter(|(b, _)| *b == scheduler))
            .map(|(_, id)| id.trim().to_string())
            .filter(|id| !id.is_empty())
            .collect()
    }
}

/// Follows the owner file from inside a job.
pub struct OwnerWatch {
    last: Option<String>,
    changed: Instant,
    grace: Duration,
}

impl OwnerWatch {
    pub fn new(grace: Duration) -> Self {
        OwnerWatch {
            last: None,
            changed: Instant::now(),
            grace,
        }
    }

    /// The grace from [`EnvVars::NOYAU_DASK_OWNER_GRACE`], else 120 s.
    pub fn from_env() -> Self {
        let grace = noyau_vars::seconds(EnvVars::NOYAU_DASK_OWNER_GRACE)
            .and_then(Result::ok)
            .unwrap_or(Duration::from_secs(120));
        Self::new(grace)
    }

    /// Some(why) once the owner is gone.
    pub fn check(&mut self, owner_file: &Path, now: Instant) -> Option<String> {
        match std::fs::read_to_string(owner_file) {
            Ok(text) => {
                if self.last.as_deref() != Some(text.as_str()) {
                    self.last = Some(text);
                    self.changed = now;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Some("the cluster was taken down (its directory is gone)".into());
            }
            // A shared filesystem's hiccup is not the owner's death: the
            // grace period decides.
            Err(_) => {}
        }
        let quiet = now.saturating_duration_since(self.changed);
        (quiet > self.grace).then(|| {
            format!(
                "the notebook's kernel that owns the cluster gave no sign of life for {} s",
                quiet.as_secs()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_gone_after_grace_or_when_removed() {
        let root = tempfile::tempdir().unwrap();
        let c = ClusterDir::create(root.path(), "c").unwrap();
        c.heartbeat(1).unwrap();
        let mut w = OwnerWatch::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(w.check(&c.owner_file(), t0), None);
        assert_eq!(w.check(&c.owner_file(), t0 + Duration::from_secs(8)), None);
        c.heartbeat(2).unwrap();
        // a new beat restarts the grace
        assert_eq!(w.check(&c.owner_file(), t0 + Duration::from_secs(9)), None);
        assert_eq!(w.check(&c.owner_file(), t0 + Duration::from_secs(18)), None);
        assert!(w
            .check(&c.owner_file(), t0 + Duration::from_secs(20))
            .unwrap()
            .contains("no sign of life for 11 s"));
        std::fs::remove_file(c.owner_file()).unwrap();
        assert!(w.check(&c.owner_file(), t0).unwrap().contains("taken down"));
    }

    #[test]
    fn jobs_file_lists_ids_by_scheduler() {
        let root = tempfile::tempdir().unwrap();
        let c = ClusterDir::create(root.path(), "c").unwrap();
        c.write_jobs([
            ("slurm", "12"),
            ("local", "345"),
            ("slurm", "13"),
            ("oar", "7"),
        ])
        .unwrap();
        assert_eq!(c.batch_jobs("slurm"), ["12", "13"]);
        assert_eq!(c.batch_jobs("oar"), ["7"]);
    }
}
