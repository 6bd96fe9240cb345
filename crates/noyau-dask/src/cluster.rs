//! A cluster's life, as a task of its own: [`Cluster::start`] submits the
//! scheduler job and the first workers, then a task follows the cluster
//! until it is taken down. The jobs' states come from noyau-sched's
//! watcher (each job's state channel wakes the task); Dask's own files
//! (the scheduler file, its preload's `status.json`) are read in the task:
//! every 100 ms until the scheduler is up, then once a second. Its owner
//! (the proxy kernel, `noyau run`) hears of it through [`ClusterEvent`]s
//! and asks it through the [`Cluster`] handle; dropping the handle takes
//! the cluster down.
//!
//! Sizing, once the scheduler is up: the wanted number of workers is the
//! plan's, or Dask's adaptive target clamped to MIN..MAX. Worker jobs
//! pending or running count, except those retiring; the difference is
//! submitted at once. Scaling down waits until the target stayed below
//! the count for [`SCALE_DOWN_AFTER`] (no start/cancel loop on a lull):
//! pending jobs are cancelled first, then the workers Dask would close
//! first are retired gracefully through the preload. Workers whose
//! walltime nears stop counting once less than their startup time is
//! left, so their replacements start ahead of time.

use std::time::{Duration, Instant};

use noyau_sched::{Backend, Job, JobSpec, JobState};
use tokio::sync::{mpsc, oneshot, watch};

use crate::dashboard::Dashboard;
use crate::plan::{Plan, Size};
use crate::{ClusterDir, DaskError};

/// Dask's target must stay below the number of worker jobs this long
/// before jobs are cancelled: starting a batch job costs a queue wait, so a
/// short lull must not cancel what the next burst needs.
const SCALE_DOWN_AFTER: Duration = Duration::from_secs(20);
/// A retired worker whose job has not ended by then is cancelled.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(60);
/// While jobs wait, [`ClusterEvent::Waiting`] comes again this often (its
/// "waiting for" counts on).
const WAITING_EVERY: Duration = Duration::from_secs(5);

/// What the cluster's task tells its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterEvent {
    /// Jobs of the cluster wait in the queue, each with the scheduler's
    /// state (its reason and estimated start); again when that changes,
    /// and every few seconds while they wait.
    Waiting { jobs: Vec<Waiting>, since: Duration },
    /// Every job the cluster keeps runs now, after some waited this long.
    Running { waited: Duration },
    /// The scheduler is up; `dashboard` says where its dashboard is (the
    /// link to give the user, or why there is none).
    Up { address: String, dashboard: String },
    /// The cluster failed before its scheduler was up: why. Every job was
    /// cancelled and the directory removed; the task has ended.
    Failed(String),
}

/// What a frontend shows of a cluster: its jobs that have not ended, and
/// where its dashboard is (noyau's relay with its token, when it relays).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub jobs: Vec<Waiting>,
    pub dashboard: Option<String>,
}

/// One waiting job of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    /// `scheduler`, or `worker w3`.
    pub role: String,
    pub id: String,
    pub state: JobState,
    /// Its log (the scheduler writes it; checked before it is read).
    pub log: std::path::PathBuf,
}

impl Waiting {
    pub fn is_worker(&self) -> bool {
        self.role != "scheduler"
    }
}

enum Cmd {
    Status(oneshot::Sender<String>),
    Down(oneshot::Sender<usize>),
    CancelWorker(String, oneshot::Sender<bool>),
}

/// The owner's handle on a cluster.
pub struct Cluster {
    cmds: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<ClusterEvent>,
    /// What the task last showed ([`Cluster::view`]), read without asking it.
    view: watch::Receiver<View>,
    summary: String,
    backend: &'static str,
    dir: ClusterDir,
    /// The task's end (taken down, or failed).
    ended: bool,
}

impl Cluster {
    /// Makes the cluster's directory, submits its scheduler job and first
    /// workers, and starts following it. On failure nothing is left.
    pub async fn start(plan: Plan) -> Result<Cluster, DaskError> {
        let id = format!(
            "{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let dir = ClusterDir::create(&noyau_sched::state_dir().join("dask"), &id)?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut task = Task::new(&plan, dir.clone(), events_tx).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(dir.path());
        })?;
        let scheduler = task.scheduler_spec.clone();
        if let Err(e) = task.submit_first(scheduler, plan.size.first()).await {
            task.end().await;
            return Err(e.into());
        }
        let summary = task.summary(&plan);
        let (cmds, cmds_rx) = mpsc::unbounded_channel();
        let (view_tx, view) = watch::channel(task.view());
        tokio::spawn(task.run(cmds_rx, view_tx));
        Ok(Cluster {
            cmds,
            events,
            view,
            summary,
            backend: plan.backend.name(),
            dir,
            ended: false,
        })
    }

    /// `[noyau] Dask cluster from …: scheduler job … and N worker job(s) …`.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The cluster's directory (its TLS material, for the notebook's client).
    pub fn dir(&self) -> &ClusterDir {
        &self.dir
    }

    /// The next event; never resolves once the task has ended. Cancel-safe.
    pub async fn next_event(&mut self) -> ClusterEvent {
        if !self.ended {
            if let Some(ev) = self.events.recv().await {
                if matches!(ev, ClusterEvent::Failed(_)) {
                    self.ended = true;
                }
                return ev;
            }
            self.ended = true;
        }
        std::future::pending().await
    }

    /// What `%noyau dask status` shows.
    pub async fn status(&self) -> String {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Status(tx));
        rx.await
            .unwrap_or_else(|_| "[noyau] the Dask cluster has ended\n".into())
    }

    /// The cluster's jobs that have not ended (role `scheduler` or `worker
    /// wN`) and its dashboard's link, as the task last saw them: at once,
    /// even while the task is busy (submitting, forwarding the dashboard).
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// Asks the task to end the worker job `id`, if the last view shows it
    /// (None at once: no worker job of this cluster has that id; the
    /// scheduler's job is not a worker's). The future, which holds nothing
    /// of the handle, says whether it was ended. The cluster submits a
    /// replacement if its size asks for one.
    pub fn cancel_worker(&self, id: &str) -> Option<impl std::future::Future<Output = bool>> {
        let view = self.view.borrow();
        if !view.jobs.iter().any(|j| j.is_worker() && j.id == id) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::CancelWorker(id.to_string(), tx));
        Some(async move { rx.await.unwrap_or(false) })
    }

    /// Cancels every job of the cluster and removes its directory; how
    /// many jobs it had.
    pub async fn down(self) -> usize {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Down(tx));
        rx.await.unwrap_or(0)
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
    fn state(&self) -> JobState {
        self.job.state.borrow().clone()
    }
    fn ended(&self) -> bool {
        matches!(*self.job.state.borrow(), JobState::Ended(_))
    }
    fn running(&self) -> bool {
        matches!(*self.job.state.borrow(), JobState::Running { .. })
    }
    fn waiting(&self) -> bool {
        matches!(
            *self.job.state.borrow(),
            JobState::Pending { .. } | JobState::Unknown { .. }
        )
    }
    fn role_name(&self) -> String {
        match self.role {
            Role::Scheduler => "scheduler".into(),
            Role::Worker => format!("worker {}", self.name),
        }
    }
}

/// What the task counts, for `%noyau dask status`.
#[derive(Default)]
struct Counts {
    started: u32,
    scaled_down: u32,
    replaced: u32,
}

/// How long after its start a cluster looks for its scheduler's file
/// every 10 ms whatever its job's state (see `Task::pause`): most jobs
/// start at once where there is room.
const EAGER: Duration = Duration::from_secs(30);

/// The cluster's task and everything it keeps.
struct Task {
    dir: ClusterDir,
    backend: Backend,
    from: String,
    size: Size,
    jobs: Vec<ClusterJob>,
    scheduler_spec: JobSpec,
    /// What each worker job runs, before its `--name` and `--lifetime`.
    worker_spec: JobSpec,
    workers_made: u32,
    /// Workers retire this long after they start, before their walltime.
    lifetime: Option<Duration>,
    /// How long the last worker job took from submission to running.
    startup: Duration,
    address: Option<String>,
    dashboard: Option<Dashboard>,
    started: Instant,
    /// Since when the scheduler's job is known to run.
    scheduler_runs_since: Option<Instant>,
    beat: u64,
    /// Since when Dask's target has been below the worker jobs counted.
    low_since: Option<Instant>,
    retire_seq: u64,
    last_target: Option<u32>,
    counts: Counts,
    events: mpsc::UnboundedSender<ClusterEvent>,
    /// Job states changed (one forwarder task per job feeds it).
    changes: (mpsc::UnboundedSender<()>, mpsc::UnboundedReceiver<()>),
    forwarders: tokio::task::JoinSet<()>,
    /// Since when jobs wait, what was said last and when.
    waiting: Option<(Instant, Vec<Waiting>, Instant)>,
}

impl Task {
    fn new(
        plan: &Plan,
        dir: ClusterDir,
        events: mpsc::UnboundedSender<ClusterEvent>,
    ) -> Result<Task, DaskError> {
        let specs = plan.specs(&dir)?;
        Ok(Task {
            dir,
            backend: plan.backend.clone(),
            from: plan.from.clone(),
            size: plan.size,
            jobs: Vec::new(),
            scheduler_spec: specs.scheduler,
            worker_spec: specs.worker,
            workers_made: 0,
            lifetime: specs.lifetime,
            startup: Duration::ZERO,
            address: None,
            dashboard: None,
            started: Instant::now(),
            scheduler_runs_since: None,
            beat: 0,
            low_since: None,
            retire_seq: 0,
            last_target: None,
            counts: Counts::default(),
            events,
            changes: mpsc::unbounded_channel(),
            forwarders: tokio::task::JoinSet::new(),
            waiting: None,
        })
    }

    /// Submits the scheduler's job, then the first workers' (at once). The
    /// scheduler goes first so that it is ahead of them in the queue: on a
    /// full cluster, workers that started before it would hold the cores
    /// it waits for, waiting for its file.
    async fn submit_first(
        &mut self,
        scheduler: JobSpec,
        workers: u32,
    ) -> Result<(), noyau_sched::SchedError> {
        let job = self.backend.submit(scheduler).await?;
        self.add(Role::Scheduler, job, "scheduler".into());
        let specs = self.worker_specs(workers);
        self.submit_together(specs).await
    }

    /// Submits `n` more workers (a scale-up, replacements), one after the
    /// other, up to the first error: they are asked for again at the next
    /// round, a second later, and a scheduler refusing them (a per-user job
    /// limit reached) should get one call a second, not n.
    async fn submit_workers(&mut self, n: u32) -> Result<(), noyau_sched::SchedError> {
        for (name, spec) in self.worker_specs(n) {
            let job = self.backend.submit(spec).await?;
            self.add_worker(job, name);
        }
        Ok(())
    }

    /// The next `n` workers' names and specs.
    fn worker_specs(&mut self, n: u32) -> Vec<(String, JobSpec)> {
        (0..n)
            .map(|_| {
                self.workers_made += 1;
                let name = format!("w{}", self.workers_made);
                let mut spec = self.worker_spec.clone();
                spec.args.extend(["--name".into(), name.clone()]);
                if let Some(l) = self.lifetime {
                    spec.args
                        .extend(["--lifetime".into(), l.as_secs().to_string()]);
                }
                (name, spec)
            })
            .collect()
    }

    /// Submits these workers concurrently (the submission throttle bounds
    /// how many scheduler commands run at once: 4 by default); each one
    /// submitted is followed as soon as it is (so that it is cancelled with
    /// the cluster whatever happens to the others); the first error is the
    /// answer.
    async fn submit_together(
        &mut self,
        specs: Vec<(String, JobSpec)>,
    ) -> Result<(), noyau_sched::SchedError> {
        let mut set = tokio::task::JoinSet::new();
        for (name, spec) in specs {
            let backend = self.backend.clone();
            set.spawn(async move { (name, backend.submit(spec).await) });
        }
        let mut first_error = None;
        // (the set is never aborted: a task ends or panics)
        while let Some(joined) = set.join_next().await {
            match joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())) {
                (name, Ok(job)) => self.add_worker(job, name),
                (_, Err(e)) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn add_worker(&mut self, job: Job, name: String) {
        tracing::info!(job = %job.id, %name, "submitted a Dask worker job");
        self.counts.started += 1;
        self.add(Role::Worker, job, name);
    }

    /// Follows a new job: its state changes wake the task.
    fn add(&mut self, role: Role, job: Job, name: String) {
        let mut rx = job.state.clone();
        let tx = self.changes.0.clone();
        self.forwarders.spawn(async move {
            while rx.changed().await.is_ok() {
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
        self.jobs.push(ClusterJob {
            role,
            job,
            name,
            submitted: Instant::now(),
            running_since: None,
            retiring: None,
            replaced: false,
        });
        self.record_jobs();
    }

    /// Keeps `DIR/jobs` equal to the jobs submitted (the scheduler job
    /// cancels them if the owner dies).
    fn record_jobs(&self) {
        let jobs = self.jobs.iter().map(|j| (j.job.backend, j.job.id.as_str()));
        if let Err(e) = self.dir.write_jobs(jobs) {
            tracing::warn!("cannot list the Dask cluster's jobs in its directory: {e}");
        }
    }

    fn summary(&self, plan: &Plan) -> String {
        let ids: Vec<&str> = self.jobs.iter().map(|j| j.job.id.as_str()).collect();
        let sizing = match self.size {
            Size::Fixed(_) => String::new(),
            Size::Adapt { min, max } => {
                format!(", adaptive {min} to {max} workers (Dask's own target)")
            }
        };
        format!(
            "[noyau] Dask cluster from {}: scheduler job {} and {} worker job(s) {} ({}){sizing}{}; waiting for the scheduler…\n",
            self.from,
            ids[0],
            plan.size.first(),
            ids[1..].join(", "),
            self.backend.name(),
            self.lifetime.map_or(String::new(), |l| format!(
                "; workers retire after {} s, before their walltime, and are replaced ahead of time",
                l.as_secs()
            )),
        )
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>, view: watch::Sender<View>) {
        let mut beat = tokio::time::interval(crate::owner::HEARTBEAT);
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Status(tx)) => { let _ = tx.send(self.status()); }
                    Some(Cmd::CancelWorker(id, tx)) => {
                        let job = self.jobs.iter().find(|j| j.role == Role::Worker && j.job.id == id && !j.ended());
                        if let Some(j) = job {
                            tracing::info!(job = %id, "cancelling a Dask worker job, as asked");
                            j.job.cancel().await;
                        }
                        let _ = tx.send(job.is_some());
                    }
                    Some(Cmd::Down(tx)) => {
                        let n = self.end().await;
                        let _ = tx.send(n);
                        return;
                    }
                    // The owner dropped its handle: the cluster goes with it.
                    None => { self.end().await; return; }
                },
                Some(()) = self.changes.1.recv() => {
                    self.on_change();
                    // (the scheduler's job may run now: look sooner)
                    next = next.min(tokio::time::Instant::now() + self.pause());
                }
                _ = beat.tick() => self.heartbeat(),
                _ = tokio::time::sleep_until(next) => {
                    if self.address.is_none() {
                        self.poll_scheduler().await;
                    } else {
                        self.manage().await;
                    }
                    next = tokio::time::Instant::now() + self.pause();
                }
            }
            if let Some(why) = self.failure() {
                self.end().await;
                let _ = self.events.send(ClusterEvent::Failed(why));
                return;
            }
            self.report_waiting();
            let now = self.view();
            view.send_if_modified(|v| {
                let changed = *v != now;
                *v = now;
                changed
            });
        }
    }

    /// The owner's heartbeat ([`crate::owner`]).
    fn heartbeat(&mut self) {
        self.beat += 1;
        if let Err(e) = self.dir.heartbeat(self.beat) {
            tracing::warn!("cannot write the Dask cluster's owner heartbeat: {e}");
        }
    }

    /// A job's state changed: workers that run now start their clocks, and
    /// the scheduler's job that runs now is noted.
    fn on_change(&mut self) {
        let now = Instant::now();
        let scheduler_runs = self
            .jobs
            .iter()
            .any(|j| j.role == Role::Scheduler && j.running());
        if scheduler_runs && self.scheduler_runs_since.is_none() {
            self.scheduler_runs_since = Some(now);
        }
        for j in self.jobs.iter_mut() {
            if j.role == Role::Worker && j.running_since.is_none() && j.running() {
                j.running_since = Some(now);
                self.startup = now.saturating_duration_since(j.submitted);
            }
        }
    }

    /// Before the scheduler is up: why it never will be, if so.
    fn failure(&self) -> Option<String> {
        if self.address.is_some() {
            return None;
        }
        if let Some(e) = self.dir.error() {
            return Some(format!("a job of the cluster failed: {}", e.trim()));
        }
        self.jobs
            .iter()
            .find(|j| j.role == Role::Scheduler)
            .and_then(|j| match &*j.job.state.borrow() {
                JobState::Ended(e) => Some(format!(
                    "the scheduler job {} ended before the scheduler started: it {}",
                    j.job.id, e.description
                )),
                _ => None,
            })
    }

    /// The pause before the next look at the cluster. Its scheduler's file
    /// is looked for every 10 ms in the first [`EAGER`] after the start
    /// and after its job starts to run (the file comes a second or two
    /// later, and the user is waiting for it; the watcher may learn that
    /// the job runs only after the file is there), else every 100 ms (a
    /// job waiting in the queue for hours, a scheduler that hangs). Once the
    /// scheduler is up, the cluster is managed every second.
    fn pause(&self) -> Duration {
        if self.address.is_some() {
            return Duration::from_secs(1);
        }
        let eager = |since: Instant| since.elapsed() < EAGER;
        if eager(self.started) || self.scheduler_runs_since.is_some_and(eager) {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(100)
        }
    }

    /// While the scheduler is not up: its address, once it wrote it.
    async fn poll_scheduler(&mut self) {
        let Some(info) = self.dir.scheduler() else {
            return;
        };
        if let Some((host, port)) = self.dir.dashboard() {
            match crate::dashboard::forward(&self.dir, host, port).await {
                Ok(d) => self.dashboard = Some(d),
                Err(e) => tracing::warn!("cannot forward the Dask dashboard: {e}"),
            }
        }
        self.address = Some(info.address.clone());
        let _ = self.events.send(ClusterEvent::Up {
            address: info.address,
            dashboard: self.dashboard_line(),
        });
    }

    /// A job as the owner sees it.
    fn shown(&self, j: &ClusterJob) -> Waiting {
        let spec = match j.role {
            Role::Scheduler => &self.scheduler_spec,
            Role::Worker => &self.worker_spec,
        };
        Waiting {
            role: j.role_name(),
            id: j.job.id.clone(),
            state: j.state(),
            log: spec.log_path(&j.job.id),
        }
    }

    fn view(&self) -> View {
        let jobs = (self.jobs.iter().filter(|j| !j.ended()))
            .map(|j| self.shown(j))
            .collect();
        // The scheduler's own port refuses whoever lacks the cluster's
        // certificate: only the relay's link is of use.
        let dashboard = self.dashboard.as_ref().map(|d| d.link.clone());
        View { jobs, dashboard }
    }

    /// Tells the owner which jobs wait, when that changed or every
    /// [`WAITING_EVERY`], and when they all run again.
    fn report_waiting(&mut self) {
        let now: Vec<Waiting> = self
            .jobs
            .iter()
            .filter(|j| j.retiring.is_none() && j.waiting())
            .map(|j| self.shown(j))
            .collect();
        match (&mut self.waiting, now.is_empty()) {
            (None, true) => {}
            (Some((since, _, _)), true) => {
                let waited = since.elapsed();
                self.waiting = None;
                let _ = self.events.send(ClusterEvent::Running { waited });
            }
            (Some((since, last, said)), false) => {
                if *last != now || said.elapsed() >= WAITING_EVERY {
                    let _ = self.events.send(ClusterEvent::Waiting {
                        jobs: now.clone(),
                        since: since.elapsed(),
                    });
                    *last = now;
                    *said = Instant::now();
                }
            }
            (None, false) => {
                let _ = self.events.send(ClusterEvent::Waiting {
                    jobs: now.clone(),
                    since: Duration::ZERO,
                });
                self.waiting = Some((Instant::now(), now, Instant::now()));
            }
        }
    }

    /// Cancels every job and removes the directory; how many jobs there were.
    async fn end(&mut self) -> usize {
        tracing::info!("ending the Dask cluster's {} jobs", self.jobs.len());
        for j in &self.jobs {
            self.backend.cancel(&j.job).await;
        }
        self.dashboard = None;
        let _ = std::fs::remove_dir_all(self.dir.path());
        self.jobs.len()
    }
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

impl Task {
    /// Once a second after the scheduler is up: forgets ended workers and
    /// keeps as many as the size asks for.
    async fn manage(&mut self) {
        let now = Instant::now();
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
        self.resize(desired, now, status.unwrap_or_default()).await;
    }

    /// Submits or ends worker jobs toward `desired`.
    async fn resize(&mut self, desired: u32, now: Instant, status: crate::Status) {
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
                    self.counts.replaced += 1;
                }
            }
            if let Err(e) = self.submit_workers(n).await {
                tracing::warn!("cannot submit Dask worker jobs: {e}");
            }
        } else if desired < active {
            let since = *self.low_since.get_or_insert(now);
            if now.duration_since(since) >= SCALE_DOWN_AFTER {
                self.low_since = None;
                self.scale_down(active - desired, &counted, status).await;
            }
        } else {
            self.low_since = None;
        }
    }

    /// Ends `n` of the counted worker jobs: pending ones first (newest
    /// first), then the running workers Dask would close first, retired
    /// gracefully (their data moves to the others).
    async fn scale_down(&mut self, n: u32, counted: &[usize], status: crate::Status) {
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
        self.counts.scaled_down += (cancel.len() + names.len()) as u32;
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

    fn dashboard_line(&self) -> String {
        match (&self.dashboard, self.dir.dashboard()) {
            (Some(d), _) => d.link.clone(),
            (None, Some(_)) => "not forwarded (noyau could not relay it: see its log)".into(),
            (None, None) => {
                "none (the cluster's environment lacks bokeh, which Dask's dashboard needs)".into()
            }
        }
    }

    /// `%noyau dask status`.
    fn status(&self) -> String {
        let mut out = format!(
            "[noyau] Dask cluster from {} ({}), up {} s\n",
            self.from,
            self.backend.name(),
            self.started.elapsed().as_secs()
        );
        out.push_str(&format!(
            "scheduler: {}\n",
            self.address.as_deref().unwrap_or("(not started yet)")
        ));
        out.push_str(&format!("dashboard: {}\n", self.dashboard_line()));
        out.push_str(&match self.size {
            Size::Fixed(n) => format!("size: {n} worker(s)\n"),
            Size::Adapt { min, max } => format!(
                "size: adaptive {min} to {max}; Dask's target: {}\n",
                self.last_target
                    .map_or("not known yet".to_string(), |t| t.to_string())
            ),
        });
        out.push_str(&format!(
            "worker jobs: {} started, {} ended by scale-down, {} replaced before their walltime\n",
            self.counts.started, self.counts.scaled_down, self.counts.replaced
        ));
        let workers = self.dir.workers();
        out.push_str(&format!("workers: {}\n", workers.len()));
        for w in &workers {
            out.push_str(&format!(
                "  {:<14} {} threads={} memory={}\n",
                w.name, w.address, w.nthreads, w.memory_limit
            ));
        }
        out.push_str("jobs:\n");
        out.push_str(&self.describe_jobs());
        out
    }

    fn describe_jobs(&self) -> String {
        let now = Instant::now();
        let mut out = String::new();
        for j in &self.jobs {
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
                j.role_name(),
                self.backend.name(),
                j.job.id
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(role: &str, id: &str) -> Waiting {
        Waiting {
            role: role.into(),
            id: id.into(),
            state: JobState::Unknown { why: "test".into() },
            log: std::path::PathBuf::new(),
        }
    }

    /// A handle whose task never answers (busy, as while it submits):
    /// its view and a worker's check still answer at once.
    #[test]
    fn the_view_and_the_cancel_check_never_wait_for_a_busy_task() {
        let d = tempfile::tempdir().unwrap();
        let dir = ClusterDir::create(d.path(), "c1").unwrap();
        let (cmds, mut busy) = mpsc::unbounded_channel();
        let (_events_tx, events) = mpsc::unbounded_channel();
        let shown = View {
            jobs: vec![waiting("scheduler", "10"), waiting("worker w1", "11")],
            dashboard: None,
        };
        let (view_tx, view) = watch::channel(shown.clone());
        let c = Cluster {
            cmds,
            events,
            view,
            summary: String::new(),
            backend: "slurm",
            dir,
            ended: false,
        };
        assert_eq!(c.view(), shown);
        assert!(
            c.cancel_worker("10").is_none(),
            "the scheduler's job is no worker's"
        );
        assert!(c.cancel_worker("99").is_none());
        assert!(c.cancel_worker("11").is_some());
        assert!(matches!(busy.try_recv(), Ok(Cmd::CancelWorker(id, _)) if id == "11"));
        view_tx.send_replace(View::default());
        assert!(c.view().jobs.is_empty() && c.cancel_worker("11").is_none());
    }
}
