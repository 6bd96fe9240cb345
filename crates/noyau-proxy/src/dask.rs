//! `%noyau dask up|status|down`: a Dask cluster on the batch scheduler,
//! owned by the notebook's kernel.
//!
//! `up` makes the cluster's directory and TLS material ([`noyau_dask`]),
//! submits one scheduler job and N worker jobs through the target's backend
//! (each runs `noyau dask-job`), and keeps the user's cell busy until the
//! scheduler has written its address. The proxy then sends the notebook's
//! kernel a silent request of its own (as `%noyau push` does) that puts the
//! address and the TLS files in `dask.config` and the environment, so a
//! bare `Client()` connects; the cell ends with a `Client('tls://…')` line.
//! `down`, and any shutdown of the kernel, cancel every job of the cluster.

use std::time::Instant;

use bytes::Bytes;
use noyau_dask::ClusterDir;
use noyau_sched::{Backend, Job, JobSpec, JobState};
use serde_json::json;

use crate::Proxy;

/// What `%noyau dask up` was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpArgs {
    pub workers: u32,
    pub target: Option<String>,
    pub worker_cores: Option<u32>,
    pub worker_mem: Option<String>,
}

pub const USAGE: &str =
    "usage: %noyau dask up [N] [--target T] [--worker-cores C] [--worker-mem M] | \
                         %noyau dask status | %noyau dask down";

/// Parses the words after `dask up`.
pub fn parse_up(words: &[&str]) -> Result<UpArgs, String> {
    let mut a = UpArgs {
        workers: 1,
        ..Default::default()
    };
    let mut it = words.iter();
    let mut seen_n = false;
    while let Some(w) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .map(|v| v.to_string())
                .ok_or_else(|| format!("{name} needs a value; {USAGE}"))
        };
        match *w {
            "--target" => a.target = Some(value("--target")?),
            "--worker-cores" => {
                let v = value("--worker-cores")?;
                a.worker_cores =
                    Some(v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("--worker-cores {v:?}: expected a positive integer")
                    })?);
            }
            "--worker-mem" => {
                let v = value("--worker-mem")?;
                noyau_config::parse_size(&v).map_err(|e| format!("--worker-mem {v:?}: {e}"))?;
                a.worker_mem = Some(v);
            }
            n if !seen_n && !n.starts_with('-') => {
                a.workers = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| format!("{n:?}: the number of workers is 1 to 1000; {USAGE}"))?;
                seen_n = true;
            }
            other => return Err(format!("unexpected {other:?}; {USAGE}")),
        }
    }
    Ok(a)
}

/// Slurm's `4G` (GiB) as Dask writes it (`4GiB`).
fn dask_memory(slurm: &str) -> String {
    let s = slurm.trim();
    match s.chars().last() {
        Some(c) if "KMGTkmgt".contains(c) => {
            format!("{}{}iB", &s[..s.len() - 1], c.to_ascii_uppercase())
        }
        _ => format!("{s}MiB"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Scheduler,
    Worker,
}

struct ClusterJob {
    role: Role,
    job: Job,
}

/// The one cluster of this kernel.
pub(crate) struct Cluster {
    dir: ClusterDir,
    backend: Backend,
    /// The profile the jobs came from ("the kernel's own" or a target).
    target: String,
    jobs: Vec<ClusterJob>,
    address: Option<String>,
    /// The `dask up` cell, answered once the kernel is configured.
    waiting: Option<(Vec<Bytes>, Bytes)>,
    /// msg_id of the proxy's setup request to the notebook's kernel.
    setup: Option<String>,
    started: Instant,
    /// The owner heartbeat ([`noyau_dask::owner`]).
    beat: u64,
    last_beat: Instant,
}

impl Cluster {
    pub(crate) fn waiting(&self) -> bool {
        self.waiting.is_some() && self.setup.is_none()
    }

    pub(crate) fn is_setup(&self, id: &str) -> bool {
        self.setup.as_deref() == Some(id)
    }

    /// Keeps `DIR/jobs` equal to the jobs submitted.
    fn record_jobs(&self) {
        let jobs = self.jobs.iter().map(|j| (j.job.backend, j.job.id.as_str()));
        if let Err(e) = self.dir.write_jobs(jobs) {
            tracing::warn!("cannot list the Dask cluster's jobs in its directory: {e}");
        }
    }

    async fn cancel_all(&mut self) {
        for j in &self.jobs {
            self.backend.cancel(&j.job).await;
        }
    }

    fn describe_jobs(&self) -> String {
        let mut out = String::new();
        for j in &self.jobs {
            let role = match j.role {
                Role::Scheduler => "scheduler",
                Role::Worker => "worker",
            };
            let state = match &*j.job.state.borrow() {
                JobState::Pending { reason, .. } => format!("pending ({reason})"),
                JobState::Running { node } => format!("running on {node}"),
                JobState::Ended(e) => format!("ended: {}", e.description),
                JobState::Unknown { why } => format!("unknown ({why})"),
            };
            out.push_str(&format!(
                "  {:<10} {} job {:<10} {state}\n",
                role,
                self.backend.name(),
                j.job.id
            ));
        }
        out
    }
}

impl Proxy {
    /// `%noyau dask …`; answers the cell unless it stays busy (`up`).
    pub(crate) async fn dask_magic(
        &mut self,
        words: &[&str],
        identities: Vec<Bytes>,
        header: Bytes,
    ) {
        let result = match words {
            ["up", rest @ ..] => match parse_up(rest) {
                Err(e) => Err(("UsageError", e)),
                Ok(a) => match self.dask_up(a, &identities, &header).await {
                    Ok(()) => return,
                    Err(e) => Err(("NoyauDaskError", format!("{e:#}"))),
                },
            },
            ["status"] => Ok(self.dask_status()),
            ["down"] => match self.dask.take() {
                Some(mut c) => {
                    c.cancel_all().await;
                    let n = c.jobs.len();
                    let _ = std::fs::remove_dir_all(c.dir.path());
                    Ok(format!(
                        "[noyau] Dask cluster down: cancelled its {n} jobs\n"
                    ))
                }
                None => Ok("[noyau] no Dask cluster is running\n".into()),
            },
            _ => Err(("UsageError", USAGE.to_string())),
        };
        self.answer_to(identities, &header, result).await;
    }

    async fn dask_up(
        &mut self,
        a: UpArgs,
        identities: &[Bytes],
        header: &Bytes,
    ) -> anyhow::Result<()> {
        if self.dask.is_some() {
            anyhow::bail!("this kernel already has a Dask cluster; `%noyau dask status` shows it, `%noyau dask down` ends it");
        }
        let (target, profile) = match &a.target {
            Some(t) => (
                format!("target {t}"),
                noyau_config::resolve(None, Some(t), &[])?.1,
            ),
            None => (
                "the kernel's profile".to_string(),
                self.cfg.resources.clone(),
            ),
        };
        let backend_name = profile
            .backend
            .clone()
            .or_else(|| a.target.is_none().then(|| self.cfg.backend.clone()))
            .unwrap_or_else(|| "local".into());
        let backend = Backend::from_name(&backend_name)?;
        let id = format!(
            "{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let dir = ClusterDir::create(&noyau_sched::slurm::state_dir().join("dask"), &id)?;
        dir.heartbeat(0)?;
        let mut env = crate::env_spec_for_agent()?;
        env.insert(
            noyau_dask::owner::GRACE_ENV.into(),
            noyau_dask::owner::grace_from_env()
                .as_secs_f64()
                .to_string(),
        );
        let spec = |role: &str, profile: noyau_config::Profile, extra: Vec<String>| {
            let mut args = vec![
                "dask-job".to_string(),
                role.to_string(),
                "--dir".into(),
                dir.path().display().to_string(),
                "--inner".into(),
                self.cfg.inner.clone(),
            ];
            args.extend(extra);
            JobSpec {
                name: format!("noyau-dask-{role}"),
                program: self.cfg.noyau_exe.clone(),
                args,
                env: env.clone(),
                cwd: None,
                profile,
                array: None,
            }
        };
        let mut cluster = Cluster {
            dir: dir.clone(),
            backend: backend.clone(),
            target,
            jobs: Vec::new(),
            address: None,
            waiting: Some((identities.to_vec(), header.clone())),
            setup: None,
            started: Instant::now(),
            beat: 0,
            last_beat: Instant::now(),
        };
        let submitted = async {
            let job = backend
                .submit(spec("scheduler", profile.clone(), vec![]))
                .await?;
            cluster.jobs.push(ClusterJob {
                role: Role::Scheduler,
                job,
            });
            let mut wp = profile.clone();
            let mut extra = Vec::new();
            if let Some(c) = a.worker_cores {
                wp.cpus_per_task = Some(c);
                extra.extend(["--nthreads".to_string(), c.to_string()]);
            }
            if let Some(m) = &a.worker_mem {
                wp.mem = Some(m.clone());
                extra.extend(["--memory-limit".to_string(), dask_memory(m)]);
            }
            for _ in 0..a.workers {
                let job = backend
                    .submit(spec("worker", wp.clone(), extra.clone()))
                    .await?;
                cluster.jobs.push(ClusterJob {
                    role: Role::Worker,
                    job,
                });
            }
            Ok::<(), noyau_sched::SchedError>(())
        }
        .await;
        cluster.record_jobs();
        if let Err(e) = submitted {
            cluster.cancel_all().await;
            let _ = std::fs::remove_dir_all(dir.path());
            return Err(e.into());
        }
        let ids: Vec<String> = cluster.jobs.iter().map(|j| j.job.id.clone()).collect();
        let text = format!(
            "[noyau] Dask cluster from {}: scheduler job {} and {} worker job(s) {} ({}); waiting for the scheduler…\n",
            cluster.target,
            ids[0],
            a.workers,
            ids[1..].join(", "),
            backend.name()
        );
        self.dask = Some(cluster);
        self.publish_stream(header, "stdout", &text).await;
        Ok(())
    }

    /// Called every half second while a cluster exists.
    pub(crate) async fn dask_tick(&mut self) {
        let Some(c) = self.dask.as_mut() else { return };
        if c.last_beat.elapsed() >= noyau_dask::owner::HEARTBEAT {
            c.beat += 1;
            c.last_beat = Instant::now();
            if let Err(e) = c.dir.heartbeat(c.beat) {
                tracing::warn!("cannot write the Dask cluster's owner heartbeat: {e}");
            }
        }
        if c.waiting() {
            self.dask_poll().await;
        }
    }

    /// While `dask up` waits: the scheduler's address, or why it will not come.
    async fn dask_poll(&mut self) {
        let Some(c) = self.dask.as_mut() else { return };
        let failure = if let Some(e) = c.dir.error() {
            Some(format!("a job of the cluster failed: {}", e.trim()))
        } else {
            c.jobs
                .iter()
                .find(|j| j.role == Role::Scheduler)
                .and_then(|j| match &*j.job.state.borrow() {
                    JobState::Ended(e) => Some(format!(
                        "the scheduler job {} ended before the scheduler started: it {}",
                        j.job.id, e.description
                    )),
                    _ => None,
                })
        };
        if let Some(why) = failure {
            self.dask_fail(why).await;
            return;
        }
        let Some(info) = c.dir.scheduler() else {
            return;
        };
        c.address = Some(info.address.clone());
        let code = noyau_dask::kernel_setup_code(&c.dir, &info.address);
        let (request, id) = self.own_request(json!({
            "code": code, "silent": true, "store_history": false,
            "allow_stdin": false, "stop_on_error": false,
            "user_expressions": {"noyau_dask": noyau_dask::KERNEL_SETUP_EXPR},
        }));
        match self.send_internal(None, request) {
            Ok(()) => {
                self.internal.insert(id.clone());
                if let Some(c) = self.dask.as_mut() {
                    c.setup = Some(id);
                }
            }
            Err(e) => {
                self.dask_fail(format!("cannot configure the notebook's kernel: {e}"))
                    .await
            }
        }
    }

    /// The notebook kernel's reply to the setup request.
    pub(crate) async fn dask_setup_reply(&mut self, content: &Bytes) {
        let reply: serde_json::Value = serde_json::from_slice(content).unwrap_or_default();
        let got = reply["user_expressions"]["noyau_dask"].clone();
        let ok = got["data"]["text/plain"].as_str() == Some("'ok'");
        let Some(c) = self.dask.as_mut() else { return };
        c.setup = None;
        let Some((identities, header)) = c.waiting.take() else {
            return;
        };
        let address = c.address.clone().unwrap_or_default();
        let result = if ok {
            let dashboard = c
                .dir
                .dashboard()
                .map(|d| format!("dashboard: {d}\n"))
                .unwrap_or_else(|| "no dashboard (the cluster's environment lacks bokeh)\n".into());
            Ok(format!(
                "[noyau] scheduler up after {} s; this kernel is configured for it (TLS, certificate of this cluster only)\n\
                 Client({})  # `from dask.distributed import Client; client = Client()` connects\n{dashboard}",
                c.started.elapsed().as_secs(),
                noyau_dask::py_str(&address)
            ))
        } else {
            let why = got["data"]["text/plain"]
                .as_str()
                .map(|s| s.trim_matches('\'').to_string())
                .or_else(|| got["evalue"].as_str().map(str::to_string))
                .unwrap_or_else(|| "the setup request failed".into());
            Err((
                "NoyauDaskError",
                format!("the cluster is up at {address} but {why}; `%noyau dask down` ends it"),
            ))
        };
        self.answer_to(identities, &header, result).await;
    }

    async fn dask_fail(&mut self, why: String) {
        let Some(mut c) = self.dask.take() else {
            return;
        };
        c.cancel_all().await;
        let log = noyau_sched::slurm::log_dir();
        let _ = std::fs::remove_dir_all(c.dir.path());
        if let Some((identities, header)) = c.waiting.take() {
            let text = format!(
                "{why}; every job of the cluster was cancelled (job logs: {})",
                log.display()
            );
            self.answer_to(identities, &header, Err(("NoyauDaskError", text)))
                .await;
        }
    }

    fn dask_status(&self) -> String {
        let Some(c) = &self.dask else {
            return "[noyau] no Dask cluster; `%noyau dask up N` starts one\n".into();
        };
        let mut out = format!(
            "[noyau] Dask cluster from {} ({}), up {} s\n",
            c.target,
            c.backend.name(),
            c.started.elapsed().as_secs()
        );
        out.push_str(&format!(
            "scheduler: {}\n",
            c.address.as_deref().unwrap_or("(not started yet)")
        ));
        out.push_str(&format!(
            "dashboard: {}\n",
            c.dir.dashboard().unwrap_or_else(|| "none".into())
        ));
        let workers = c.dir.workers();
        out.push_str(&format!("workers: {}\n", workers.len()));
        for w in &workers {
            out.push_str(&format!(
                "  {:<14} {} threads={} memory={}\n",
                w.name, w.address, w.nthreads, w.memory_limit
            ));
        }
        out.push_str("jobs:\n");
        out.push_str(&c.describe_jobs());
        out
    }

    /// Ends the cluster's jobs (kernel shutdown or restart, the proxy ending).
    pub(crate) async fn dask_release(&mut self) {
        if let Some(mut c) = self.dask.take() {
            tracing::info!("ending the Dask cluster's {} jobs", c.jobs.len());
            c.cancel_all().await;
            let _ = std::fs::remove_dir_all(c.dir.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_arguments() {
        assert_eq!(parse_up(&[]).unwrap().workers, 1);
        let a = parse_up(&[
            "2",
            "--target",
            "gpu",
            "--worker-cores",
            "4",
            "--worker-mem",
            "2G",
        ])
        .unwrap();
        assert_eq!(
            a,
            UpArgs {
                workers: 2,
                target: Some("gpu".into()),
                worker_cores: Some(4),
                worker_mem: Some("2G".into())
            }
        );
        assert!(parse_up(&["0"]).is_err());
        assert!(parse_up(&["--worker-cores"]).is_err());
        assert!(parse_up(&["--worker-mem", "lots"]).is_err());
        assert!(parse_up(&["2", "3"]).is_err());
    }

    #[test]
    fn memory_in_dask_units() {
        assert_eq!(dask_memory("4G"), "4GiB");
        assert_eq!(dask_memory("512"), "512MiB");
        assert_eq!(dask_memory("1t"), "1TiB");
    }
}
