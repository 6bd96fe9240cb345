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

use std::time::{Duration, Instant};

use bytes::Bytes;
use noyau_dask::ClusterDir;
use noyau_sched::{Backend, Job, JobSpec, JobState};
use serde_json::json;

use crate::Proxy;

/// What `%noyau dask up` was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpArgs {
    pub workers: u32,
    /// `--adapt MIN MAX`: the worker jobs follow Dask's adaptive target.
    pub adapt: Option<(u32, u32)>,
    pub target: Option<String>,
    pub worker_cores: Option<u32>,
    pub worker_mem: Option<String>,
    /// The worker jobs' walltime (Slurm time), when not the profile's.
    pub worker_time: Option<String>,
    /// `--nanny`: workers under Dask's nanny (needed by `Client.restart()`).
    pub nanny: bool,
}

pub const USAGE: &str =
    "usage: %noyau dask up [N | --adapt MIN MAX] [--target T] [--worker-cores C] [--worker-mem M] [--worker-time T] [--nanny] | \
                         %noyau dask status | %noyau dask down";

/// At most this many workers (fixed or adaptive).
const MAX_WORKERS: u32 = 1000;

/// Parses the words after `dask up`; what they leave out comes from
/// `[dask]` in noyau.toml (`defaults`), checked the same way.
pub fn parse_up(words: &[&str], defaults: &noyau_config::DaskSettings) -> Result<UpArgs, String> {
    let mut a = UpArgs::default();
    let mut it = words.iter();
    let mut n: Option<u32> = None;
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
                    Some(v.parse().map_err(|_| {
                        format!("--worker-cores {v:?}: expected a positive integer")
                    })?);
            }
            "--adapt" => {
                let mut bound = |what: &str| -> Result<u32, String> {
                    let v = value("--adapt")?;
                    v.parse()
                        .map_err(|_| format!("--adapt {what} {v:?}: expected a number; {USAGE}"))
                };
                a.adapt = Some((bound("MIN")?, bound("MAX")?));
            }
            "--worker-time" => a.worker_time = Some(value("--worker-time")?),
            "--nanny" => a.nanny = true,
            "--worker-mem" => a.worker_mem = Some(value("--worker-mem")?),
            w if n.is_none() && !w.starts_with('-') => {
                n = Some(w.parse().map_err(|_| {
                    format!("{w:?}: the number of workers is 1 to {MAX_WORKERS}; {USAGE}")
                })?);
            }
            other => return Err(format!("unexpected {other:?}; {USAGE}")),
        }
    }
    if n.is_some() && a.adapt.is_some() {
        return Err(format!(
            "give a number of workers or --adapt MIN MAX, not both; {USAGE}"
        ));
    }
    check(&a, n, "--")?;
    // What the line leaves out comes from [dask]; a size on the line
    // (N or --adapt) replaces [dask]'s (workers or adapt).
    let from_file = n.is_none() && a.adapt.is_none();
    let d = UpArgs {
        workers: 0,
        adapt: defaults
            .adapt
            .map(|[lo, hi]| (lo, hi))
            .filter(|_| from_file),
        target: defaults.target.clone(),
        worker_cores: defaults.worker_cores,
        worker_mem: defaults.worker_mem.clone(),
        worker_time: defaults.worker_time.clone(),
        nanny: defaults.nanny.unwrap_or(false),
    };
    let dn = defaults.workers.filter(|_| from_file);
    if dn.is_some() && d.adapt.is_some() {
        return Err("[dask] in noyau.toml: give `workers` or `adapt`, not both".into());
    }
    check(&d, dn, "[dask] ")?;
    Ok(UpArgs {
        workers: n.or(dn).unwrap_or(1),
        adapt: a.adapt.or(d.adapt),
        target: a.target.or(d.target),
        worker_cores: a.worker_cores.or(d.worker_cores),
        worker_mem: a.worker_mem.or(d.worker_mem),
        worker_time: a.worker_time.or(d.worker_time),
        nanny: a.nanny || d.nanny,
    })
}

/// Checks the values of `dask up`'s flags (`src` "--") or of `[dask]`
/// (`src` "[dask] "), naming the one at fault as the user wrote it.
fn check(a: &UpArgs, workers: Option<u32>, src: &str) -> Result<(), String> {
    let key = |flag: &str| {
        if src == "--" {
            format!("--{flag}")
        } else {
            format!("{src}{}", flag.replace('-', "_"))
        }
    };
    if let Some(n) = workers.filter(|n| !(1..=MAX_WORKERS).contains(n)) {
        let what = if src == "--" {
            "the number of workers".to_string()
        } else {
            key("workers")
        };
        return Err(format!("{what} {n}: expected 1 to {MAX_WORKERS}"));
    }
    if let Some((min, max)) = a.adapt {
        if max == 0 || min > max || max > MAX_WORKERS {
            return Err(format!(
                "{} {min} {max}: expected MIN <= MAX, MAX from 1 to {MAX_WORKERS} (e.g. 0 10)",
                key("adapt")
            ));
        }
    }
    if a.worker_cores == Some(0) {
        return Err(format!(
            "{} 0: expected a positive integer",
            key("worker-cores")
        ));
    }
    if let Some(m) = &a.worker_mem {
        noyau_config::parse_size(m).map_err(|e| format!("{}: {e}", key("worker-mem")))?;
    }
    if let Some(t) = &a.worker_time {
        noyau_config::parse_time(t).map_err(|e| format!("{}: {e}", key("worker-time")))?;
    }
    Ok(())
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
    /// The worker's name in Dask (`w1`…), "scheduler" for the scheduler.
    name: String,
    submitted: Instant,
    running_since: Option<Instant>,
    /// Asked to retire (scale down) at this time.
    retiring: Option<Instant>,
    /// A replacement was submitted ahead of its walltime.
    replaced: bool,
}

impl ClusterJob {
    fn ended(&self) -> bool {
        matches!(*self.job.state.borrow(), JobState::Ended(_))
    }
    fn running(&self) -> bool {
        matches!(*self.job.state.borrow(), JobState::Running { .. })
    }
}

/// How many workers the cluster keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Size {
    Fixed(u32),
    Adapt { min: u32, max: u32 },
}

/// Dask's target must stay below the number of worker jobs this long
/// before jobs are cancelled: starting a batch job costs a queue wait, so a
/// short lull must not cancel what the next burst needs (no start/cancel loop).
const SCALE_DOWN_AFTER: Duration = Duration::from_secs(20);
/// A retired worker whose job has not ended by then is cancelled.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(60);

/// The margin between a worker's graceful retirement and its job's
/// walltime: a quarter of the walltime, 30 s to 5 min (at most half).
fn lifetime_for(walltime: Duration) -> Duration {
    let margin = (walltime / 4)
        .clamp(Duration::from_secs(30), Duration::from_secs(300))
        .min(walltime / 2);
    walltime - margin
}

/// True when the worker job retires for its walltime (after `lifetime`)
/// before a job submitted now would be up (`startup` plus 30 s): it no
/// longer counts, so its replacement is started ahead of time.
fn expiring(lifetime: Option<Duration>, startup: Duration, j: &ClusterJob, now: Instant) -> bool {
    match (lifetime, j.running_since) {
        (Some(l), Some(t)) => {
            let lead = (startup + Duration::from_secs(30)).min(l / 2);
            now.saturating_duration_since(t) + lead >= l
        }
        _ => false,
    }
}

/// The dashboard as the user's browser reaches it: a port on the proxy's
/// host, forwarded to the scheduler's dashboard in its allocation.
pub(crate) struct Dashboard {
    /// `http://127.0.0.1:PORT/status`.
    link: String,
    /// Where it goes (`http://node:port/status`).
    upstream: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on 127.0.0.1 (a free port; `NOYAU_DASK_DASHBOARD_PORT` picks
/// one) and relays every connection, bytes as they are (HTTP and the
/// dashboard's websockets alike), to the scheduler's dashboard.
async fn forward_dashboard(host: String, port: u16) -> std::io::Result<Dashboard> {
    let local: u16 = std::env::var("NOYAU_DASK_DASHBOARD_PORT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", local)).await?;
    let local = listener.local_addr()?.port();
    let upstream = format!("http://{host}:{port}/status");
    let task = tokio::spawn(async move {
        loop {
            let mut inbound = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // e.g. out of file descriptors: try again shortly
                    tracing::warn!("dashboard: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let host = host.clone();
            tokio::spawn(async move {
                match tokio::net::TcpStream::connect((host.as_str(), port)).await {
                    Ok(mut out) => {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                    Err(e) => tracing::warn!("dashboard: cannot reach {host}:{port}: {e}"),
                }
            });
        }
    });
    Ok(Dashboard {
        link: format!("http://127.0.0.1:{local}/status"),
        upstream,
        task,
    })
}

/// The one cluster of this kernel.
pub(crate) struct Cluster {
    dir: ClusterDir,
    backend: Backend,
    /// The profile the jobs came from ("the kernel's own" or a target).
    target: String,
    jobs: Vec<ClusterJob>,
    address: Option<String>,
    dashboard: Option<Dashboard>,
    /// The `dask up` cell, answered once the kernel is configured.
    waiting: Option<(Vec<Bytes>, Bytes)>,
    /// msg_id of the proxy's setup request to the notebook's kernel.
    setup: Option<String>,
    started: Instant,
    /// The owner heartbeat ([`noyau_dask::owner`]).
    beat: u64,
    last_beat: Instant,
    last_manage: Instant,
    size: Size,
    /// What each worker job runs, before its `--name` and `--lifetime`.
    worker_spec: JobSpec,
    workers_made: u32,
    /// Workers retire this long after they start, before their walltime.
    lifetime: Option<Duration>,
    /// How long the last worker job took from submission to running.
    startup: Duration,
    /// Since when Dask's target has been below the worker jobs counted.
    low_since: Option<Instant>,
    retire_seq: u64,
    last_target: Option<u32>,
    /// Worker jobs: started, cancelled or retired by scale-down, replaced
    /// before their walltime.
    n_started: u32,
    n_scaled_down: u32,
    n_replaced: u32,
}

impl Cluster {
    pub(crate) fn waiting(&self) -> bool {
        self.waiting.is_some() && self.setup.is_none()
    }

    pub(crate) fn is_setup(&self, id: &str) -> bool {
        self.setup.as_deref() == Some(id)
    }

    fn dashboard_line(&self) -> String {
        match (&self.dashboard, self.dir.dashboard()) {
            (Some(d), _) => format!("{} (noyau forwards it to {})", d.link, d.upstream),
            (None, Some((host, port))) => format!("http://{host}:{port}/status"),
            (None, None) => {
                "none (the cluster's environment lacks bokeh, which Dask's dashboard needs)".into()
            }
        }
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

    async fn submit_workers(&mut self, n: u32) -> Result<(), noyau_sched::SchedError> {
        for _ in 0..n {
            self.workers_made += 1;
            let name = format!("w{}", self.workers_made);
            let mut spec = self.worker_spec.clone();
            spec.args.extend(["--name".into(), name.clone()]);
            if let Some(l) = self.lifetime {
                spec.args
                    .extend(["--lifetime".into(), l.as_secs().to_string()]);
            }
            let job = self.backend.submit(spec).await?;
            tracing::info!(job = %job.id, %name, "submitted a Dask worker job");
            self.n_started += 1;
            self.jobs.push(ClusterJob {
                role: Role::Worker,
                job,
                name,
                submitted: Instant::now(),
                running_since: None,
                retiring: None,
                replaced: false,
            });
            self.record_jobs();
        }
        Ok(())
    }

    /// Once a second after the scheduler is up: follows the worker jobs and
    /// keeps as many as the size asks for (fixed, or Dask's adaptive
    /// target), replacing workers ahead of their walltime.
    async fn manage(&mut self) {
        let now = Instant::now();
        for j in self.jobs.iter_mut() {
            if j.role == Role::Worker && j.running_since.is_none() && j.running() {
                j.running_since = Some(now);
                self.startup = now.saturating_duration_since(j.submitted);
            }
        }
        let before = self.jobs.len();
        self.jobs
            .retain(|j| j.role == Role::Scheduler || !j.ended());
        if self.jobs.len() != before {
            self.record_jobs();
        }
        for j in &self.jobs {
            if j.retiring
                .is_some_and(|t| now.duration_since(t) > RETIRE_TIMEOUT)
            {
                tracing::warn!(job = %j.job.id, "a retired worker's job did not end; cancelling it");
                self.backend.cancel(&j.job).await;
            }
        }
        let scheduler_gone = self
            .jobs
            .iter()
            .any(|j| j.role == Role::Scheduler && j.ended());
        // A job that could not start Dask wrote why: resubmitting would loop.
        if scheduler_gone || self.dir.error().is_some() {
            return;
        }
        let status = self.dir.status();
        self.last_target = status.as_ref().and_then(|s| s.target);
        let desired = match self.size {
            Size::Fixed(n) => n,
            Size::Adapt { min, max } => match self.last_target {
                Some(t) => t.clamp(min, max),
                None => return,
            },
        };
        let (lifetime, startup) = (self.lifetime, self.startup);
        let expiring = |j: &ClusterJob| expiring(lifetime, startup, j, now);
        let counted: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| {
                let j = &self.jobs[i];
                j.role == Role::Worker && j.retiring.is_none() && !expiring(j)
            })
            .collect();
        let active = counted.len() as u32;
        if desired > active {
            self.low_since = None;
            // Pending jobs count: only the difference is submitted.
            let n = desired - active;
            let mut replacing = n;
            for j in self.jobs.iter_mut() {
                if replacing > 0 && j.role == Role::Worker && !j.replaced && expiring(j) {
                    j.replaced = true;
                    replacing -= 1;
                    self.n_replaced += 1;
                }
            }
            if let Err(e) = self.submit_workers(n).await {
                tracing::warn!("cannot submit Dask worker jobs: {e}");
            }
        } else if desired < active {
            let since = *self.low_since.get_or_insert(now);
            if now.duration_since(since) >= SCALE_DOWN_AFTER {
                self.low_since = None;
                self.scale_down(active - desired, &counted, status.unwrap_or_default())
                    .await;
            }
        } else {
            self.low_since = None;
        }
    }

    /// Ends `n` of the counted worker jobs: pending ones first (newest
    /// first), then the running workers Dask would close first, retired
    /// gracefully (their data moves to the others).
    async fn scale_down(&mut self, n: u32, counted: &[usize], status: noyau_dask::Status) {
        let mut left = n as usize;
        let mut cancel = Vec::new();
        for &i in counted.iter().rev() {
            if left > 0 && !self.jobs[i].running() {
                cancel.push(i);
                left -= 1;
            }
        }
        let mut names = Vec::new();
        for name in &status.to_close {
            if left == 0 {
                break;
            }
            if let Some(&i) = counted
                .iter()
                .find(|&&i| &self.jobs[i].name == name && self.jobs[i].running())
            {
                names.push(name.clone());
                self.jobs[i].retiring = Some(Instant::now());
                left -= 1;
            }
        }
        for &i in &cancel {
            tracing::info!(job = %self.jobs[i].job.id, "scale down: cancelling a pending worker job");
            self.backend.cancel(&self.jobs[i].job).await;
        }
        self.n_scaled_down += (cancel.len() + names.len()) as u32;
        let mut i = 0;
        self.jobs.retain(|_| {
            i += 1;
            !cancel.contains(&(i - 1))
        });
        if !cancel.is_empty() {
            self.record_jobs();
        }
        if !names.is_empty() {
            tracing::info!(?names, "scale down: retiring workers");
            self.retire_seq += 1;
            if let Err(e) = self.dir.retire(self.retire_seq, &names) {
                tracing::warn!("cannot ask the Dask scheduler to retire workers: {e}");
            }
        }
    }

    fn describe_jobs(&self) -> String {
        let now = Instant::now();
        let mut out = String::new();
        for j in &self.jobs {
            let role = match j.role {
                Role::Scheduler => "scheduler".to_string(),
                Role::Worker => format!("worker {}", j.name),
            };
            let state = match &*j.job.state.borrow() {
                JobState::Pending { reason, .. } => format!("pending ({reason})"),
                JobState::Running { node, .. } => format!("running on {node}"),
                JobState::Ended(e) => format!("ended: {}", e.description),
                JobState::Unknown { why } => format!("unknown ({why})"),
            };
            let note = if j.retiring.is_some() {
                ", retiring (scale down)"
            } else if j.role == Role::Worker && expiring(self.lifetime, self.startup, j, now) {
                ", retiring before its walltime (replaced)"
            } else {
                ""
            };
            out.push_str(&format!(
                "  {:<12} {} job {:<10} {state}{note}\n",
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
            ["up", rest @ ..] => match std::env::current_dir()
                .map_err(|e| e.to_string())
                .and_then(|cwd| noyau_config::Config::load(&cwd).map_err(|e| e.to_string()))
                .and_then(|cfg| parse_up(rest, &cfg.dask))
            {
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
        let dir = ClusterDir::create(&noyau_sched::state_dir().join("dask"), &id)?;
        dir.heartbeat(0)?;
        // The target's environment (its profile's), else the kernel's.
        let mut env = self.job_env_for(&profile, None, None).await?;
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
                ..Default::default()
            }
        };
        let mut wp = profile.clone();
        let mut extra = Vec::new();
        if let Some(c) = a.worker_cores {
            wp.cpus_per_task = Some(c);
            extra.extend(["--nthreads".to_string(), c.to_string()]);
        }
        if let Some(m) = &a.worker_mem {
            wp.apply_override(&format!("mem={m}"))?;
            extra.extend(["--memory-limit".to_string(), dask_memory(m)]);
        }
        if let Some(t) = &a.worker_time {
            wp.time = Some(t.clone());
        }
        if a.nanny {
            extra.push("--nanny".to_string());
        }
        // Only a batch job has a walltime to retire before.
        let lifetime = match (&backend, &wp.time) {
            (Backend::Local(_), _) | (_, None) => None,
            (_, Some(t)) => Some(noyau_config::parse_time(t).map_err(anyhow::Error::msg)?)
                .filter(|s| *s > 0)
                .map(|s| lifetime_for(Duration::from_secs(s))),
        };
        let size = match a.adapt {
            Some((min, max)) => Size::Adapt { min, max },
            None => Size::Fixed(a.workers),
        };
        let mut cluster = Cluster {
            dir: dir.clone(),
            backend: backend.clone(),
            target,
            jobs: Vec::new(),
            address: None,
            dashboard: None,
            waiting: Some((identities.to_vec(), header.clone())),
            setup: None,
            started: Instant::now(),
            beat: 0,
            last_beat: Instant::now(),
            last_manage: Instant::now(),
            size,
            worker_spec: spec("worker", wp, extra),
            workers_made: 0,
            lifetime,
            startup: Duration::ZERO,
            low_since: None,
            retire_seq: 0,
            last_target: None,
            n_started: 0,
            n_scaled_down: 0,
            n_replaced: 0,
        };
        let first = match size {
            Size::Fixed(n) => n,
            Size::Adapt { min, .. } => min,
        };
        let submitted = async {
            let job = backend
                .submit(spec("scheduler", profile.clone(), vec![]))
                .await?;
            cluster.jobs.push(ClusterJob {
                role: Role::Scheduler,
                job,
                name: "scheduler".into(),
                submitted: Instant::now(),
                running_since: None,
                retiring: None,
                replaced: false,
            });
            cluster.record_jobs();
            cluster.submit_workers(first).await
        }
        .await;
        if let Err(e) = submitted {
            cluster.cancel_all().await;
            let _ = std::fs::remove_dir_all(dir.path());
            return Err(e.into());
        }
        let ids: Vec<String> = cluster.jobs.iter().map(|j| j.job.id.clone()).collect();
        let sizing = match size {
            Size::Fixed(_) => String::new(),
            Size::Adapt { min, max } => {
                format!(", adaptive {min} to {max} workers (Dask's own target)")
            }
        };
        let text = format!(
            "[noyau] Dask cluster from {}: scheduler job {} and {first} worker job(s) {} ({}){sizing}{}; waiting for the scheduler…\n",
            cluster.target,
            ids[0],
            ids[1..].join(", "),
            backend.name(),
            lifetime.map_or(String::new(), |l| format!(
                "; workers retire after {} s, before their walltime, and are replaced ahead of time",
                l.as_secs()
            )),
        );
        self.dask = Some(cluster);
        self.publish_stream(header, "stdout", &text).await;
        // The notebook's kernel is idle while the jobs start (the proxy
        // holds the cell): it imports `distributed` now rather than once
        // the scheduler is up, when the setup request and `Client()` need it.
        let (request, id) = self.own_request(json!({
            "code": noyau_dask::KERNEL_PREIMPORT, "silent": true, "store_history": false,
            "allow_stdin": false, "stop_on_error": false,
        }));
        match self.send_internal(None, request) {
            Ok(()) => self.internal.insert(id),
            Err(e) => tracing::debug!("no early import of distributed in the kernel: {e}"),
        }
        Ok(())
    }

    /// Called every 100 ms while a cluster exists.
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
        } else if c.address.is_some() && c.last_manage.elapsed() >= Duration::from_secs(1) {
            c.last_manage = Instant::now();
            c.manage().await;
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
        if let Some((host, port)) = c.dir.dashboard() {
            match forward_dashboard(host, port).await {
                Ok(d) => c.dashboard = Some(d),
                Err(e) => tracing::warn!("cannot forward the Dask dashboard: {e}"),
            }
        }
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
            let dashboard = format!("dashboard: {}\n", c.dashboard_line());
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
        let log = noyau_sched::log_dir();
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
        out.push_str(&format!("dashboard: {}\n", c.dashboard_line()));
        out.push_str(&match c.size {
            Size::Fixed(n) => format!("size: {n} worker(s)\n"),
            Size::Adapt { min, max } => format!(
                "size: adaptive {min} to {max}; Dask's target: {}\n",
                c.last_target
                    .map_or("not known yet".to_string(), |t| t.to_string())
            ),
        });
        out.push_str(&format!(
            "worker jobs: {} started, {} ended by scale-down, {} replaced before their walltime\n",
            c.n_started, c.n_scaled_down, c.n_replaced
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
        let none = noyau_config::DaskSettings::default();
        let parse = |w: &[&str]| parse_up(w, &none);
        assert_eq!(parse(&[]).unwrap().workers, 1);
        let a = parse(&[
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
                worker_mem: Some("2G".into()),
                ..Default::default()
            }
        );
        let a = parse(&["--adapt", "0", "3", "--worker-time", "2"]).unwrap();
        assert_eq!(a.adapt, Some((0, 3)));
        assert_eq!(a.worker_time.as_deref(), Some("2"));
        assert!(parse(&["--adapt", "3", "1"]).is_err());
        assert!(parse(&["--adapt", "0", "0"]).is_err());
        assert!(parse(&["--adapt", "0"]).is_err());
        assert!(parse(&["2", "--adapt", "0", "3"]).is_err());
        assert!(parse(&["--worker-time", "soon"]).is_err());
        assert!(parse(&["0"]).is_err());
        assert!(parse(&["--worker-cores"]).is_err());
        assert!(parse(&["--worker-cores", "0"]).is_err());
        assert!(parse(&["--worker-mem", "lots"]).is_err());
        assert!(parse(&["2", "3"]).is_err());
        assert!(!parse(&["2"]).unwrap().nanny);
        assert!(parse(&["2", "--nanny"]).unwrap().nanny);
    }

    #[test]
    fn dask_settings_fill_what_the_line_leaves_out() {
        let d = noyau_config::DaskSettings {
            target: Some("hpc".into()),
            adapt: Some([0, 8]),
            worker_mem: Some("2G".into()),
            ..Default::default()
        };
        let a = parse_up(&["--worker-mem", "1G"], &d).unwrap();
        assert_eq!(a.adapt, Some((0, 8)));
        assert_eq!(a.target.as_deref(), Some("hpc"));
        assert_eq!(a.worker_mem.as_deref(), Some("1G"));
        // a size on the line replaces [dask]'s
        let a = parse_up(&["3"], &d).unwrap();
        assert_eq!((a.workers, a.adapt), (3, None));
        let bad = noyau_config::DaskSettings {
            worker_time: Some("soon".into()),
            ..Default::default()
        };
        let e = parse_up(&[], &bad).unwrap_err();
        assert!(e.starts_with("[dask] worker_time:"), "{e}");
        let both = noyau_config::DaskSettings {
            workers: Some(2),
            adapt: Some([0, 2]),
            ..Default::default()
        };
        assert!(parse_up(&[], &both).unwrap_err().contains("not both"));
        let nanny = noyau_config::DaskSettings {
            nanny: Some(true),
            ..Default::default()
        };
        assert!(parse_up(&["2"], &nanny).unwrap().nanny);
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
