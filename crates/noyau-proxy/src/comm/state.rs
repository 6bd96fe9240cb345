//! The `state` message (docs/comm.md), built from what the proxy's
//! components know: the job's watcher, the profile, the agent's last
//! usage sample, the targets and the Dask cluster.

use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use noyau_sched::JobState;
use serde_json::{json, Value};

use crate::relay::Proxy;
use crate::targets::{State, Target};

pub(crate) fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

/// `job`'s fields for a scheduler's state; `since`: when it was first
/// seen running.
fn job_fields(id: &str, st: &JobState, since: Option<&str>) -> Value {
    let mut job = json!({
        "id": id, "state": "unknown", "reason": null, "estimated_start": null,
        "partition": null, "node": null, "started_at": null, "ends_at": null,
        "ended": null,
    });
    match st {
        JobState::Pending {
            reason,
            start,
            partition,
        } => {
            job["state"] = json!("pending");
            job["reason"] = json!(reason);
            job["estimated_start"] = json!(start.map(rfc3339));
            job["partition"] = json!(partition);
        }
        JobState::Running { node, ends_at } => {
            job["state"] = json!("running");
            job["node"] = json!(node);
            job["started_at"] = json!(since);
            job["ends_at"] = json!(ends_at.map(rfc3339));
        }
        JobState::Ended(end) => {
            job["state"] = json!("ended");
            job["ended"] = json!(end.description);
        }
        JobState::Unknown { why } => job["reason"] = json!(why),
    }
    job
}

/// `can.extend`: the scheduler lets this user (`allowed`), and the job
/// (its [`job_fields`]) has an end to push back; not one that waits or has
/// no limit (Slurm's UNLIMITED, which `noyau extend` refuses).
fn offers_extend(job: Option<&Value>, allowed: bool) -> bool {
    allowed && job.is_some_and(|j| !j["ends_at"].is_null())
}

fn target_fields(t: &Target) -> Value {
    let state = match t.state {
        State::Queued => "pending",
        State::Starting | State::Ready => "running",
        State::Releasing => "ended",
    };
    // Why it waits and when its walltime ends: its scheduler's word.
    let job = t
        .job_state
        .as_ref()
        .map(|rx| job_fields(&t.job, &rx.borrow(), None));
    let field = |k: &str| job.as_ref().map_or(Value::Null, |j| j[k].clone());
    json!({
        "name": t.name, "backend": t.backend, "job": t.job, "state": state,
        "node": t.node, "ends_at": field("ends_at"), "reason": field("reason"),
    })
}

impl Proxy {
    /// The `state` message now.
    pub async fn comm_state(&mut self) -> Value {
        let batch = self.cfg.backend != "local";
        let job = batch.then(|| self.job_now());
        let partition = self.cfg.resources.partition.clone();
        let job = job.map(|mut j| {
            if j["partition"].is_null() {
                j["partition"] = json!(partition);
            }
            j["warnings_s"] = json!(noyau_sched::walltime_warnings());
            j
        });
        let targets: Vec<Value> = self.targets.map.values().map(target_fields).collect();
        let can = json!({
            "extend": offers_extend(job.as_ref(), self.comms.can_extend),
            "release_target": true,
            "cancel_worker": self.magics.dask.is_up(),
            // its own job's on a batch scheduler; its targets' and Dask jobs' anywhere
            "log": batch || !self.targets.map.is_empty() || self.magics.dask.is_up(),
        });
        json!({
            "type": "state",
            "version": 1,
            "backend": self.cfg.backend,
            "now": now(),
            "job": job,
            "resources": self.resources(),
            "usage": self.comms.usage,
            "targets": targets,
            "dask": self.dask_state(),
            "can": can,
            "idle": self.idle_state(),
        })
    }

    /// The kernel's own job as its watcher last saw it.
    fn job_now(&mut self) -> Value {
        let id = self.agent.job_label();
        let st = match self.agent.job_state() {
            Some(rx) => rx.borrow().clone(),
            None => JobState::Unknown {
                why: "this kernel does not follow its job".into(),
            },
        };
        if matches!(st, JobState::Running { .. }) && self.comms.running_since.is_none() {
            self.comms.running_since = Some(now());
        }
        job_fields(&id, &st, self.comms.running_since.as_deref())
    }

    /// What the profile asked for; a field is null when it does not say
    /// (the cores: what the agent found it may use, once it sampled).
    fn resources(&self) -> Value {
        let p = &self.cfg.resources;
        let cpus = match (p.cpus_per_task, p.ntasks) {
            (None, None) => self.comms.usage.as_ref().and_then(|u| u.cpus),
            (c, n) => Some(c.unwrap_or(1) * n.unwrap_or(1)),
        };
        let key = |k: &str| match p.scheduler_keys.get(k) {
            Some(noyau_sched::Value::One(v)) => Some(v.clone()),
            _ => None,
        };
        // Slurm's megabytes (MiB), as `parse_size` reads them.
        let mem = key("mem").and_then(|m| noyau_sched::parse_size(&m).ok().map(|mb| mb << 20));
        let gpus = key("gpus").and_then(|g| g.rsplit(':').next()?.parse::<u64>().ok());
        json!({"cpus": cpus, "mem_bytes": mem, "gpus": gpus})
    }

    /// The cluster as its task last showed it (never waiting for the task).
    fn dask_state(&self) -> Value {
        let Some(c) = self.magics.dask.cluster() else {
            return Value::Null;
        };
        let view = c.view();
        let jobs: Vec<Value> = (view.jobs.into_iter())
            .map(|w| {
                let role = if w.is_worker() { "worker" } else { "scheduler" };
                let st = job_fields(&w.id, &w.state, None);
                json!({"id": w.id, "role": role, "state": st["state"]})
            })
            .collect();
        // (its token, when it has one, is neither logged here nor by the extension)
        json!({"workers": c.dir().workers().len(), "dashboard": view.dashboard, "jobs": jobs})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_fields_follow_the_scheduler() {
        let pending = JobState::Pending {
            reason: "Resources".into(),
            start: None,
            partition: Some("batch".into()),
        };
        let j = job_fields("42", &pending, None);
        assert_eq!(
            (&j["state"], &j["reason"], &j["partition"]),
            (&json!("pending"), &json!("Resources"), &json!("batch"))
        );
        let end = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let running = JobState::Running {
            node: "n1".into(),
            ends_at: Some(end),
        };
        let j = job_fields("42", &running, Some("2026-12-06T13:00:00Z"));
        assert_eq!(j["ends_at"], "2027-01-15T08:00:00Z");
        assert_eq!(j["node"], "n1");
        let unknown = JobState::Unknown { why: "x".into() };
        assert_eq!(job_fields("42", &unknown, None)["state"], "unknown");
    }

    #[test]
    fn extend_is_offered_only_for_a_job_with_an_end() {
        let end = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let running = |ends_at| JobState::Running {
            node: "n1".into(),
            ends_at,
        };
        let ends = job_fields("42", &running(Some(end)), None);
        assert!(offers_extend(Some(&ends), true));
        assert!(!offers_extend(Some(&ends), false));
        let unlimited = job_fields("42", &running(None), None);
        assert!(!offers_extend(Some(&unlimited), true));
        let pending = JobState::Pending {
            reason: "Resources".into(),
            start: Some(end),
            partition: None,
        };
        assert!(!offers_extend(
            Some(&job_fields("42", &pending, None)),
            true
        ));
        assert!(!offers_extend(None, true));
    }
}
