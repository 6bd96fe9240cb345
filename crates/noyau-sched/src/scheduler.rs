//! [`Scheduler`]: the handle callers hold on one batch scheduler. Cheap to
//! clone; its jobs are followed by the process's one watcher for that
//! scheduler and scope; with [`Scheduler::as_user`] its submissions and
//! cancels run as another user, through a command prefix.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::batch::{Batch, Commands, JobInfo, PartitionLoad, Scope};
use crate::job::{ArrayJob, Cancel, Job};
use crate::profile::{Profile, GENERIC};
use crate::run::{AsUser, Cmd};
use crate::throttle::{throttled, Call};
use crate::watcher::Watcher;
use crate::{registered, JobSpec, SchedError};

/// One batch scheduler, as callers use it.
#[derive(Debug, Clone)]
pub struct Scheduler {
    watcher: Watcher,
    as_user: Option<Arc<AsUser>>,
}

/// The watcher's poll interval: `NOYAU_<NAME>_POLL` seconds (e.g.
/// `NOYAU_SLURM_POLL`), default 2.
fn default_interval(name: &str) -> Duration {
    noyau_vars::seconds(&noyau_vars::EnvVars::poll(name))
        .and_then(Result::ok)
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(2))
}

impl Scheduler {
    /// The process's handle on scheduler `name`: this user's jobs,
    /// followed by the process's one watcher, which shares its listings
    /// with the user's other processes on this host (one `squeue` per
    /// interval for all of a user's kernels, runs and sweeps).
    pub fn named(name: &str) -> Result<Scheduler, SchedError> {
        static WATCHERS: OnceLock<Mutex<HashMap<String, Watcher>>> = OnceLock::new();
        let make = registered(name).ok_or_else(|| SchedError::UnknownBackend(name.into()))?;
        let mut all = WATCHERS.get_or_init(Default::default).lock().unwrap();
        let watcher = all.entry(name.into()).or_insert_with(|| {
            Watcher::new(
                make(Commands::default()),
                Scope::Mine,
                default_interval(name),
                Some(crate::paths::listings_dir()),
            )
        });
        Ok(Scheduler {
            watcher: watcher.clone(),
            as_user: None,
        })
    }

    /// A handle with its own watcher: commands at other paths, another
    /// interval or scope (the hub's, which follows every user's jobs).
    pub fn builder(name: &str) -> Result<Builder, SchedError> {
        let make = registered(name).ok_or_else(|| SchedError::UnknownBackend(name.into()))?;
        Ok(Builder {
            name: name.into(),
            make,
            commands: Commands::default(),
            interval: default_interval(name),
            scope: Scope::Mine,
            shared: None,
        })
    }

    /// The same scheduler, followed by a watcher of its own that asks every
    /// `interval` (a job's agent, which follows only its own job's end).
    pub fn with_interval(&self, interval: Duration) -> Scheduler {
        // not shared: an agent's watcher runs on a compute node, where the
        // state directory is on a network filesystem whose locks may hang
        let w = &self.watcher;
        Scheduler {
            watcher: Watcher::new(w.imp().clone(), w.scope(), interval, None),
            as_user: self.as_user.clone(),
        }
    }

    /// The same scheduler, submitting and cancelling as another user.
    pub fn as_user(&self, u: AsUser) -> Scheduler {
        Scheduler {
            watcher: self.watcher.clone(),
            as_user: Some(Arc::new(u)),
        }
    }

    pub(crate) fn imp(&self) -> &Arc<dyn Batch> {
        self.watcher.imp()
    }

    fn user(&self) -> Option<&AsUser> {
        self.as_user.as_deref()
    }

    /// `slurm`.
    pub fn name(&self) -> &'static str {
        self.imp().name()
    }

    /// `Slurm`.
    pub fn display(&self) -> &'static str {
        self.imp().display()
    }

    /// What the scheduler calls a job's queue: `Partition`, `Queue`.
    pub fn queue_word(&self) -> &'static str {
        self.imp().queue_word()
    }

    /// Whether `line` of a job's log is the scheduler's own notice that it
    /// ended the job (Slurm's `*** JOB 12 ON n1 CANCELLED AT … ***`): a
    /// page that says how the job ended leaves it out.
    pub fn is_end_notice(&self, line: &str) -> bool {
        self.imp().end_notice(line)
    }

    /// The commands the scheduler runs, by name.
    pub fn commands(&self) -> &'static [&'static str] {
        self.imp().commands()
    }

    /// The signal this scheduler's jobs get shortly before their walltime
    /// (SIGUSR1; SIGUSR2 on Grid Engine): what a job's processes handle as
    /// "the walltime is near" (save and stop), as its default action would
    /// end them.
    pub fn walltime_signal(&self) -> i32 {
        self.imp().walltime_signal()
    }

    /// Whether the walltime signal, just received in one of this
    /// scheduler's jobs, is a cancel rather than the walltime (Grid Engine
    /// sends the same signal on both): then handle it as SIGTERM.
    pub fn signal_means_cancel(&self) -> bool {
        self.imp().signal_means_cancel()
    }

    /// How often the watcher asks the scheduler.
    pub fn interval(&self) -> Duration {
        self.watcher.interval()
    }

    /// The watcher's listing calls so far.
    pub fn polls(&self) -> u64 {
        self.watcher.polls()
    }

    /// Asks the scheduler now for every tracked job (one listing call),
    /// rather than at the next interval.
    pub async fn refresh(&self) {
        self.watcher.poll_once().await
    }

    /// Checks a profile for this scheduler (without asking it): no key
    /// only another scheduler knows.
    pub fn check(&self, profile: &Profile) -> Result<(), SchedError> {
        let imp = self.imp();
        profile
            .check_keys(imp.display(), imp.keys(), imp.foreign_hint())
            .map_err(SchedError::Profile)
    }

    /// Whether a profile key means something on this scheduler.
    pub fn accepts(&self, key: &str) -> bool {
        GENERIC.iter().any(|k| k.name == key) || self.imp().keys().iter().any(|k| k.name == key)
    }

    /// What `submit` would run, for `--dry-run`.
    pub async fn dry_run(&self, spec: &JobSpec) -> Result<String, SchedError> {
        self.check(&spec.profile)?;
        spec.check_lines()?;
        self.imp().dry_run(spec).await
    }

    /// Submits one job and follows it.
    pub async fn submit(&self, spec: &JobSpec) -> Result<Job, SchedError> {
        let sub = self.submit_raw(spec).await?;
        let state = self.watcher.track(&sub.id, spec.profile.partition.clone());
        Ok(self.job(sub.id, state, sub.files))
    }

    /// Submits `spec.array`'s tasks as one job array.
    pub async fn submit_array(&self, spec: &JobSpec) -> Result<ArrayJob, SchedError> {
        let Some(tasks) = spec.array.clone() else {
            return Err(SchedError::Invalid("a job array needs its task ids".into()));
        };
        let mut sub = self.submit_raw(spec).await?;
        let part = &spec.profile.partition;
        let states = (sub.tasks.iter())
            .map(|t| (t.clone(), self.watcher.track(t, part.clone())))
            .collect();
        let cancel = self.canceller(std::mem::take(&mut sub.files));
        Ok(ArrayJob::new(sub, tasks, cancel, states, self.interval()))
    }

    /// Submits a job nobody in this process follows (a detached run, a
    /// hub session); its id.
    pub async fn submit_detached(&self, spec: &JobSpec) -> Result<String, SchedError> {
        Ok(self.submit_raw(spec).await?.id)
    }

    /// Submits through the throttle, in a task of its own that finishes
    /// whatever its caller does. A caller may give up while the command
    /// runs (a kernel shut down, a hub request dropped); the scheduler may
    /// have taken the job all the same, even from a command killed then,
    /// and its id would come to no one: the task waits for the answer and
    /// cancels that job at once, saying so. A caller gone before the
    /// command started (waiting for a slot) submits nothing.
    /// [`submissions_settled`] waits for these tasks.
    async fn submit_raw(&self, spec: &JobSpec) -> Result<crate::batch::Submission, SchedError> {
        let (mut tx, rx) = tokio::sync::oneshot::channel();
        let (me, spec) = (self.clone(), spec.clone());
        let in_flight = InFlight::enter();
        tokio::spawn(async move {
            let _counted = in_flight;
            let started = AtomicBool::new(false);
            let answer = {
                let submit = throttled(me.user(), Call::Other, async {
                    started.store(true, Ordering::Relaxed);
                    me.submit_now(&spec).await
                });
                let gone = async {
                    tx.closed().await;
                    if started.load(Ordering::Relaxed) {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    r = submit => r,
                    () = gone => return,
                }
            };
            if let Err(Ok(sub)) = tx.send(answer) {
                me.cancel_unwanted(sub).await;
            }
        });
        let mut answer = Answer {
            rx,
            me: self.clone(),
            _counted: InFlight::enter(),
        };
        (&mut answer.rx).await.unwrap_or(Err(SchedError::NoAnswer))
    }

    /// Cancels a job given to a caller that gave up, saying so: every
    /// task of an array (an OAR array's id is its first task's).
    async fn cancel_unwanted(&self, sub: crate::batch::Submission) {
        tracing::warn!(job = %sub.id, "{} job {} was submitted after its caller gave up (a cancel, a shutdown): cancelling it", self.display(), sub.id);
        let ids = match sub.tasks.is_empty() {
            true => vec![sub.id],
            false => sub.tasks,
        };
        self.canceller(sub.files).end_all(&ids).await;
    }

    /// Submits without waiting for a slot: `noyau hub-submit`'s, whose hub
    /// holds one for it (waiting there would put the hub's pool at the
    /// mercy of the user's own slot files).
    async fn submit_now(&self, spec: &JobSpec) -> Result<crate::batch::Submission, SchedError> {
        self.check(&spec.profile)?;
        spec.check_lines()?;
        let sub = self.imp().submit(spec, self.user()).await?;
        tracing::info!(job = %sub.id, log = %spec.log_path(&sub.id).display(), "submitted to {}", self.display());
        Ok(sub)
    }

    /// Follows a job another process submitted (a proxy taking over from
    /// the one that submitted it, the hub after a restart).
    pub fn adopt(&self, id: &str) -> Job {
        let state = self.watcher.track(id, None);
        self.job(id.into(), state, Vec::new())
    }

    fn canceller(&self, files: Vec<std::path::PathBuf>) -> Cancel {
        Cancel {
            imp: self.imp().clone(),
            as_user: self.as_user.clone(),
            files,
        }
    }

    fn job(
        &self,
        id: String,
        state: tokio::sync::watch::Receiver<crate::JobState>,
        files: Vec<std::path::PathBuf>,
    ) -> Job {
        Job::new(id, self.name(), state, Box::new(self.canceller(files)))
    }

    /// Cancels jobs by id.
    pub async fn cancel(&self, ids: &[String]) -> Result<(), SchedError> {
        let call = self.imp().cancel(ids, self.user());
        throttled(self.user(), Call::Cancel(ids), call).await
    }

    /// The noyau jobs (names `noyau-…`) of this user's that have not
    /// ended, in one listing call ([`Scope::All`] lists no names on Slurm).
    pub async fn list(&self) -> Result<Vec<JobInfo>, SchedError> {
        Ok(self
            .imp()
            .list(self.watcher.scope(), None)
            .await?
            .into_iter()
            .filter(|j| j.name.starts_with("noyau-"))
            .filter(|j| !matches!(j.state, crate::JobState::Ended(_)))
            .collect())
    }

    /// Whether this process's user may ask for more walltime
    /// ([`Scheduler::extend`]): the scheduler is asked where the answer
    /// depends on the user (Slurm: its operators only), and its answer
    /// kept for the process; an error when it could not be asked (the
    /// caller may ask again later). A handle acting as another user
    /// ([`Scheduler::as_user`]) is not offered it: the answer would be
    /// this process's user's.
    pub async fn users_extend(&self) -> Result<bool, SchedError> {
        match self.as_user {
            Some(_) => Ok(false),
            None => self.imp().users_extend().await,
        }
    }

    /// More walltime for a job, where the scheduler lets users ask (at
    /// most [`crate::MAX_EXTEND_SECS`] at once).
    pub async fn extend(&self, id: &str, secs: u64) -> Result<String, SchedError> {
        check_extension(secs)?;
        self.imp().extend(id, secs, self.user()).await
    }

    /// Free and total resources per partition (or queue).
    pub async fn partitions(&self) -> Result<Vec<PartitionLoad>, SchedError> {
        self.imp().partitions().await
    }
}

/// The answer of a submission's task, as its caller waits for it. A caller
/// that gives up with the job's id already sent (the task ended, the
/// caller not polled since) drops it here: that job is cancelled like one
/// given after the caller left. Counted in flight until its caller has it
/// (an id sent but not yet read, or not yet recorded, is still under way).
struct Answer {
    rx: tokio::sync::oneshot::Receiver<Result<crate::batch::Submission, SchedError>>,
    me: Scheduler,
    _counted: InFlight,
}

impl Drop for Answer {
    fn drop(&mut self) {
        // Closed first: the task then either sent already (read here) or
        // finds the caller gone (and cancels): never both, never neither.
        self.rx.close();
        let Ok(Ok(sub)) = self.rx.try_recv() else {
            return;
        };
        let me = self.me.clone();
        let counted = InFlight::enter();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(async move {
                let _counted = counted;
                me.cancel_unwanted(sub).await;
            })),
            Err(_) => {
                tracing::warn!(job = %sub.id, "{} job {} was submitted after its caller gave up, and cannot be cancelled now (no runtime)", me.display(), sub.id)
            }
        }
    }
}

/// How many submissions of this process are under way (see the task of
/// `Scheduler::submit_raw`, which every submission goes through).
fn in_flight() -> &'static tokio::sync::watch::Sender<usize> {
    static N: OnceLock<tokio::sync::watch::Sender<usize>> = OnceLock::new();
    N.get_or_init(|| tokio::sync::watch::Sender::new(0))
}

/// One submission under way, counted while it lives.
struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        in_flight().send_modify(|n| *n += 1);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        in_flight().send_modify(|n| *n -= 1);
    }
}

/// Waits until no submission of this process is under way: a process that
/// ends (a kernel shut down while its job was being submitted) lets the
/// scheduler answer first, so that a job it took is cancelled rather than
/// left with no one to follow it. Bounded by the submit command's timeout
/// and a cancel's.
pub async fn submissions_settled() {
    let mut rx = in_flight().subscribe();
    let _ = rx.wait_for(|n| *n == 0).await;
}

/// How long a process that ends waits for its submissions under way: the
/// submit command's timeout, then a cancel's, and a few seconds more.
const SETTLE: Duration = Duration::from_secs(2 * crate::batch::COMMAND_TIMEOUT.as_secs() + 5);

/// How long a process that ends waits for a cancel it asked for: the
/// cancel's wait for a slot, its command's timeout, and a few seconds more.
pub const CANCEL_PATIENCE: Duration = Duration::from_secs(
    crate::throttle::CANCEL_WAIT.as_secs() + crate::batch::COMMAND_TIMEOUT.as_secs() + 3,
);

/// `f`, then [`submissions_settled`] (at most [`SETTLE`]): what a command
/// runs on its runtime, whose end drops every task on it, a submission's
/// too (its command killed, a job the scheduler took left to no one).
/// Quiet: [`settled_or`] for a command that may say what it waits for.
pub async fn settled<F: std::future::Future>(f: F) -> F::Output {
    settled_or(f, || {}, std::future::pending()).await
}

/// [`settled`], for a command whose user watches: when `f` ends with a
/// submission still under way, `notice` is called once (to say what the
/// process waits for), and the wait ends at once when `leave` resolves (a
/// second Ctrl-C: a job the scheduler still gives is then left).
pub async fn settled_or<F, L>(f: F, notice: impl FnOnce(), leave: L) -> F::Output
where
    F: std::future::Future,
    L: std::future::Future<Output = ()>,
{
    let out = f.await;
    if *in_flight().borrow() == 0 {
        return out;
    }
    notice();
    tokio::select! {
        settled = tokio::time::timeout(SETTLE, submissions_settled()) => if settled.is_err() {
            tracing::warn!(
                "a submission still had no answer after {} s; ending without it (a job it gives is not cancelled)",
                SETTLE.as_secs()
            );
        },
        () = leave => {}
    }
    out
}

/// A walltime extension noyau asks for: at most [`crate::MAX_EXTEND_SECS`]
/// (a typo's `365-0` is not a year more on a shared cluster, and Slurm's
/// limits are 32-bit minutes).
fn check_extension(secs: u64) -> Result<(), SchedError> {
    match secs > crate::MAX_EXTEND_SECS {
        true => Err(SchedError::TooLong(secs)),
        false => Ok(()),
    }
}

/// Builds a [`Scheduler`] with its own watcher.
pub struct Builder {
    name: String,
    make: crate::Make,
    commands: Commands,
    interval: Duration,
    scope: Scope,
    /// Where listings are shared with other processes; none by default (the
    /// process's own handle, [`Scheduler::named`], shares).
    shared: Option<std::path::PathBuf>,
}

impl Builder {
    /// Runs the command `name` from `path` (an error names the commands
    /// this scheduler runs when it runs no such command).
    pub fn command(mut self, name: &str, path: &str) -> Result<Builder, SchedError> {
        let known = (self.make)(Commands::default()).commands();
        if !known.contains(&name) {
            return Err(SchedError::Invalid(format!(
                "{} runs no command {name:?}{}; its commands: {}",
                self.name,
                crate::profile::suggest(name, known.iter().copied()),
                known.join(", ")
            )));
        }
        self.commands.set(name, path.into());
        Ok(self)
    }

    pub fn interval(mut self, interval: Duration) -> Builder {
        self.interval = interval;
        self
    }

    pub fn scope(mut self, scope: Scope) -> Builder {
        self.scope = scope;
        self
    }

    /// Shares this user's listings with the other processes that share in
    /// `dir` (see [`Scheduler::named`]).
    pub fn shared_listing(mut self, dir: std::path::PathBuf) -> Builder {
        self.shared = Some(dir);
        self
    }

    pub fn build(self) -> Scheduler {
        Scheduler {
            watcher: Watcher::new(
                (self.make)(self.commands),
                self.scope,
                self.interval,
                self.shared,
            ),
            as_user: None,
        }
    }
}

/// A job submitted as another user by `noyau hub-submit`, run as that user
/// through the prefix, for a scheduler whose submission must make files or
/// directories as the user (OAR's 0600 environment file, Slurm's log
/// directory, made 0700 and checked as theirs): the job (secrets included)
/// on its stdin, never on a command line; the scheduler's command paths
/// the hub was given.
#[derive(Debug, Serialize, Deserialize)]
struct SubmitRequest {
    scheduler: String,
    spec: JobSpec,
    #[serde(default)]
    commands: BTreeMap<String, PathBuf>,
}

/// Runs `noyau hub-submit` as `u` for `spec`, with `imp`'s command paths
/// `cmds` and its `config_vars`; the job's id.
pub(crate) async fn submit_through(
    u: &AsUser,
    imp: &dyn Batch,
    cmds: &Commands,
    spec: &JobSpec,
) -> Result<String, SchedError> {
    let req = SubmitRequest {
        scheduler: imp.name().into(),
        spec: spec.clone(),
        commands: cmds.paths().clone(),
    };
    let json = serde_json::to_string(&req).map_err(|e| SchedError::Invalid(e.to_string()))?;
    let out = Cmd::new(&u.noyau, Duration::from_secs(60))
        .arg("hub-submit")
        .env("HOME", u.home.display().to_string())
        .stdin(json)
        .run_as(Some(u), imp.config_vars())
        .output()
        .await
        .map_err(SchedError::Submit)?;
    // It runs as the user, who may have changed it: its answer is a job
    // id of this scheduler's, or nothing the hub will act on.
    match out.lines().find_map(|l| l.trim().strip_prefix("id=")) {
        Some(id) if imp.is_single_job_id(id) => Ok(id.to_string()),
        _ => Err(SchedError::NoJobId {
            command: "noyau hub-submit",
            output: out,
        }),
    }
}

/// `noyau hub-submit`: the job on stdin (see [`submit_through`]), submitted
/// from this user's home; prints `id=ID`.
pub async fn serve_submit_request() -> Result<(), SchedError> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|source| {
        SchedError::Io {
            what: "cannot read",
            path: "stdin".into(),
            source,
        }
    })?;
    let req: SubmitRequest = serde_json::from_str(&text).map_err(|e| {
        SchedError::Invalid(format!(
            "`noyau hub-submit` is run by `noyau hub`, with the job as JSON on its stdin: {e}"
        ))
    })?;
    let home = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .ok_or_else(|| SchedError::Invalid("cannot find this user's account".into()))?;
    // The job's directory, and the scheduler's (OAR takes it from $PWD).
    std::env::set_current_dir(&home).map_err(|source| SchedError::Io {
        what: "cannot enter",
        path: home.clone(),
        source,
    })?;
    let mut b = Scheduler::builder(&req.scheduler)?;
    for (name, path) in &req.commands {
        b = b.command(name, &path.display().to_string())?;
    }
    let id = b.build().submit_now(&req.spec).await?.id;
    println!("id={id}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extension_is_at_most_a_year() {
        assert!(check_extension(600).is_ok());
        assert!(check_extension(crate::MAX_EXTEND_SECS).is_ok());
        let e = check_extension(crate::MAX_EXTEND_SECS + 1).unwrap_err();
        assert!(matches!(e, SchedError::TooLong(_)), "{e}");
        let m = check_extension(u64::MAX).unwrap_err().to_string();
        assert!(
            m.contains("at most 365 days") && m.contains("ask for less"),
            "{m}"
        );
    }
}
