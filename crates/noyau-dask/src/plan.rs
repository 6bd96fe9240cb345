//! What a cluster is asked for ([`Plan`]) and the two job specs it makes:
//! the scheduler's, a small allocation of its own, and the workers', from
//! the target's profile and the sizes `%noyau dask up` gives.

use noyau_vars::EnvVars;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use noyau_sched::{Backend, JobSpec, Profile};

use crate::{ClusterDir, DaskError};

/// How many workers the cluster keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Fixed(u32),
    /// Dask's adaptive target, clamped to MIN..MAX.
    Adapt {
        min: u32,
        max: u32,
    },
}

impl Size {
    /// The workers submitted with the scheduler.
    pub fn first(self) -> u32 {
        match self {
            Size::Fixed(n) => n,
            Size::Adapt { min, .. } => min,
        }
    }
}

/// The scheduler job's size when the plan says nothing: one core and
/// this memory (where the scheduler takes a `mem` key). A Dask scheduler
/// needs little; the target's resources are the workers'.
pub const SCHEDULER_CORES: u32 = 1;
pub const SCHEDULER_MEM: &str = "1G";

/// A cluster to make.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where its jobs come from, for people ("target hpc").
    pub from: String,
    pub backend: Backend,
    /// The workers' profile (the target's).
    pub profile: Profile,
    /// The scheduler job's profile, when `[dask] scheduler_profile` names one;
    /// otherwise the target's, sized `scheduler_cores`/`scheduler_mem`.
    pub scheduler_profile: Option<Profile>,
    pub scheduler_cores: u32,
    pub scheduler_mem: Option<String>,
    pub size: Size,
    pub worker_cores: Option<u32>,
    pub worker_mem: Option<String>,
    /// The worker jobs' walltime, when not the profile's.
    pub worker_time: Option<String>,
    /// Workers under Dask's nanny (`Client.restart()` needs it).
    pub nanny: bool,
    /// The kernelspec whose Python runs Dask.
    pub inner: String,
    pub noyau_exe: PathBuf,
    /// The jobs' environment (the kernel's environment spec, …).
    pub env: BTreeMap<String, String>,
}

/// The two job specs of a cluster, and how long its workers live.
pub(crate) struct Specs {
    pub scheduler: JobSpec,
    /// A worker's, before its `--name` and `--lifetime`.
    pub worker: JobSpec,
    pub lifetime: Option<Duration>,
}

impl Plan {
    pub(crate) fn specs(&self, dir: &ClusterDir) -> Result<Specs, DaskError> {
        let mut env = self.env.clone();
        env.insert(
            EnvVars::NOYAU_DASK_OWNER_GRACE.into(),
            crate::owner::grace_from_env().as_secs_f64().to_string(),
        );
        let spec = |role: &str, profile: Profile, extra: Vec<String>| {
            let mut args = vec![
                "dask-job".to_string(),
                role.to_string(),
                "--dir".into(),
                dir.path().display().to_string(),
                "--inner".into(),
                self.inner.clone(),
            ];
            args.extend(extra);
            JobSpec {
                name: format!("noyau-dask-{role}"),
                program: self.noyau_exe.clone(),
                args,
                env: env.clone(),
                cwd: None,
                profile,
                ..Default::default()
            }
        };
        let (worker, extra) = self.worker_profile()?;
        let lifetime = self.lifetime(&worker)?;
        let mut scheduler = spec("scheduler", self.scheduler_profile()?, vec![]);
        scheduler.env.insert(
            EnvVars::NOYAU_DASK_FIRST_WORKERS.into(),
            self.size.first().to_string(),
        );
        Ok(Specs {
            scheduler,
            worker: spec("worker", worker, extra),
            lifetime,
        })
    }

    /// The workers' profile and the Dask flags that match it.
    fn worker_profile(&self) -> Result<(Profile, Vec<String>), DaskError> {
        let mut wp = self.profile.clone();
        let mut extra = Vec::new();
        if let Some(c) = self.worker_cores {
            wp.cpus_per_task = Some(c);
            extra.extend(["--nthreads".to_string(), c.to_string()]);
        }
        if let Some(m) = &self.worker_mem {
            wp.apply_override(&format!("mem={m}"))?;
            extra.extend(["--memory-limit".to_string(), dask_memory(m)]);
        }
        if let Some(t) = &self.worker_time {
            wp.time = Some(t.clone());
        }
        if self.nanny {
            extra.push("--nanny".to_string());
        }
        Ok((wp, extra))
    }

    /// The scheduler's own allocation: `scheduler_profile`, else the
    /// target's partition, account, walltime, prologue and environment with
    /// `scheduler_cores` and `scheduler_mem` (where the scheduler has a
    /// `mem` key) and none of the target's other resources: its
    /// scheduler-specific keys (GPUs, extra options…) are the workers'.
    fn scheduler_profile(&self) -> Result<Profile, DaskError> {
        if let Some(p) = &self.scheduler_profile {
            return Ok(p.clone());
        }
        let mut p = self.profile.clone();
        p.nodes = None;
        p.ntasks = None;
        p.cpus_per_task = Some(self.scheduler_cores);
        p.scheduler_keys.clear();
        if let (Backend::Batch(s), Some(m)) = (&self.backend, &self.scheduler_mem) {
            if s.accepts("mem") {
                p.apply_override(&format!("mem={m}"))?;
            }
        }
        Ok(p)
    }

    /// Workers retire this long after they start, before their job's
    /// walltime (batch backends only).
    fn lifetime(&self, worker: &Profile) -> Result<Option<Duration>, DaskError> {
        let (Backend::Batch(_), Some(t)) = (&self.backend, &worker.time) else {
            return Ok(None);
        };
        let secs = noyau_sched::parse_time(t)?;
        Ok((secs > 0).then(|| lifetime_for(Duration::from_secs(secs))))
    }
}

/// Slurm's `4G` (GiB) as Dask writes it (`4GiB`).
pub(crate) fn dask_memory(slurm: &str) -> String {
    let s = slurm.trim();
    match s.chars().last() {
        Some(c) if "KMGTkmgt".contains(c) => {
            format!("{}{}iB", &s[..s.len() - 1], c.to_ascii_uppercase())
        }
        _ => format!("{s}MiB"),
    }
}

/// The margin between a worker's graceful retirement and its job's
/// walltime: a quarter of the walltime, 30 s to 5 min (at most half).
pub(crate) fn lifetime_for(walltime: Duration) -> Duration {
    let margin = (walltime / 4)
        .clamp(Duration::from_secs(30), Duration::from_secs(300))
        .min(walltime / 2);
    walltime - margin
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(backend: &str) -> Plan {
        let mut profile = Profile {
            partition: Some("batch".into()),
            time: Some("10".into()),
            cpus_per_task: Some(8),
            ntasks: Some(2),
            ..Default::default()
        };
        if backend == "slurm" {
            profile.apply_override("mem=64G").unwrap();
            profile.apply_override("gpus=2").unwrap();
        }
        Plan {
            from: "target t".into(),
            backend: Backend::from_name(backend).unwrap(),
            profile,
            scheduler_profile: None,
            scheduler_cores: SCHEDULER_CORES,
            scheduler_mem: Some(SCHEDULER_MEM.into()),
            size: Size::Fixed(2),
            worker_cores: Some(2),
            worker_mem: None,
            worker_time: None,
            nanny: false,
            inner: "python3".into(),
            noyau_exe: "/bin/noyau".into(),
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn the_scheduler_job_asks_for_a_small_allocation_of_its_own() {
        let dir = ClusterDir(PathBuf::from("/d"));
        let s = plan("slurm").specs(&dir).unwrap();
        let sp = &s.scheduler.profile;
        assert_eq!((sp.cpus_per_task, sp.ntasks), (Some(1), None));
        assert_eq!(sp.get("mem"), Some("1G"));
        assert_eq!(sp.get("gpus"), None);
        assert_eq!(sp.partition.as_deref(), Some("batch"));
        let wp = &s.worker.profile;
        assert_eq!((wp.cpus_per_task, wp.get("gpus")), (Some(2), Some("2")));
        assert_eq!(s.lifetime, Some(Duration::from_secs(450)));
        assert!(s
            .worker
            .args
            .join(" ")
            .ends_with("--inner python3 --nthreads 2"));
        // OAR has no memory key: none is asked
        let s = plan("oar").specs(&dir).unwrap();
        assert_eq!(s.scheduler.profile.get("mem"), None);
        // locally, no walltime to retire before
        assert_eq!(plan("local").specs(&dir).unwrap().lifetime, None);
    }

    #[test]
    fn workers_retire_before_their_walltime() {
        let s = Duration::from_secs;
        assert_eq!(lifetime_for(s(120)), s(90));
        assert_eq!(lifetime_for(s(3600)), s(3300));
        assert_eq!(lifetime_for(s(40)), s(20));
    }

    #[test]
    fn memory_in_dask_units() {
        assert_eq!(dask_memory("4G"), "4GiB");
        assert_eq!(dask_memory("512"), "512MiB");
        assert_eq!(dask_memory("1t"), "1TiB");
    }
}
