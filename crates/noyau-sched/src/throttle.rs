//! At most N scheduler commands that submit, cancel or release jobs of
//! one user running at once on one host, whatever the number of the
//! user's noyau processes. 200 kernels started at once are 200 proxies
//! that would each fork `sbatch` or `oarsub` (a Perl program) at the same
//! instant on a shared login node; a centre limits the rate of such calls
//! (slurmctld's RPC limits) and so does noyau. An extend is not throttled
//! (rare, asked by a person, and it holds a per-job lock meanwhile).
//!
//! The slots are N lock files, `HOST-slot-I.lock` in the user's private
//! directory for what is shared on this host (`$XDG_RUNTIME_DIR/noyau/
//! submit`, else `STATE/submit`): a call holds an exclusive `flock` on one
//! while its command runs. Waiters are served in the order they came
//! (see [`queue`]): the first in line tries every slot without blocking
//! each round, the others only whether the one ahead still waits. Waiting
//! never blocks a tokio worker: between rounds the task sleeps with a
//! backoff (at most [`MAX_PAUSE`]); a blocking `flock` in `spawn_blocking`
//! would hold a thread per waiter and could not be given up when the
//! caller is. The lock dies with its process, so a killed submitter frees
//! its slot.
//!
//! Slot files go through noyau-trust: created 0600, never through a link,
//! and one that is not a regular file of this user's is refused: another
//! user must not be able to hold a slot forever or make noyau lock a file
//! of theirs. A refused slot is logged and the call goes on unthrottled:
//! the throttle spares the scheduler, it never stops a user's work.
//!
//! Calls made as another user (the hub, root, spawning for users) take
//! permits of an in-process pool instead: the hub is one long-lived
//! process, and root's files would be shared by every user's spawns.
//! `noyau hub-submit`, which the hub runs as the user, takes no slot: its
//! hub holds one. A cancel waits for a slot at most [`CANCEL_WAIT`], then
//! runs anyway: a job left running holds its allocation.
//!
//! A command run as a user is the user's process, which they can stop
//! (SIGSTOP) so that it holds its permit until its timeout kills it. So
//! such calls take first a turn of their user's ([`Turns`]): one call as
//! a user at a time, a second refused at once, before any permit is
//! waited for. One user then holds at most one permit, and the pool
//! (first come, first served) is never theirs alone.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use nix::fcntl::{Flock, FlockArg};

use crate::run::AsUser;
use crate::SchedError;

mod queue;

/// The default number of slots: enough to keep a scheduler busy, few
/// enough for a login node shared by many users.
pub const DEFAULT_SLOTS: usize = 4;
/// The most slots a site may set: beyond, the throttle limits nothing.
pub const MAX_SLOTS: usize = 64;
/// The longest pause between two rounds of tries: a slot given back waits
/// for the next in line to look (or the one behind a waiter served to see
/// it gone), so short; a round is one `flock` try for most waiters.
const MAX_PAUSE: Duration = Duration::from_millis(25);

static SLOTS: AtomicUsize = AtomicUsize::new(DEFAULT_SLOTS);

/// Sets this process's number of slots (`concurrent_submissions` in the
/// config, or in hub.toml for the hub's pool); every process of the user
/// should say the same. Set before the first throttled call: the pool of
/// calls made as other users is sized then.
pub fn set_concurrent_submissions(n: usize) -> Result<(), SchedError> {
    let n = check_slots(i64::try_from(n).unwrap_or(i64::MAX))?;
    SLOTS.store(n, Ordering::Relaxed);
    Ok(())
}

/// `n` slots, if that makes sense: 1 to [`MAX_SLOTS`].
pub fn check_slots(n: i64) -> Result<usize, SchedError> {
    match usize::try_from(n) {
        Ok(n) if (1..=MAX_SLOTS).contains(&n) => Ok(n),
        _ => Err(SchedError::BadSlots(n)),
    }
}

/// A slot held: the lock is released when it is dropped (None: this
/// filesystem has no locks, and the call is not throttled).
#[derive(Debug)]
pub(crate) struct Slot {
    _lock: Option<Flock<File>>,
}

/// What a call holds while it runs: a slot file's lock, a permit of the
/// process's pool, or nothing (not throttled).
#[derive(Debug)]
enum Held {
    File { _slot: Slot },
    Permit { _permit: SemaphorePermit<'static> },
    Nothing,
}

/// How long a cancel waits for a slot before it runs anyway: a job left
/// running holds its allocation, and Jupyter kills a kernel's proxy a few
/// seconds after asking it to shut down.
pub(crate) const CANCEL_WAIT: Duration = Duration::from_secs(2);

/// How long a submission as another user (the hub's) waits for a permit
/// before it is refused ([`SchedError::Busy`]). Users' turns already make
/// an endless wait impossible for one user to cause: each holds at most
/// one permit, for at most its command's timeout (then the command is
/// killed and the permit given back), and the pool serves waiters in the
/// order they came, so a user who stops their command again and again
/// queues behind those who waited. The bound is for when the commands of
/// several users are slow at once (a stalled scheduler, or hostile users
/// together): the person at the spawn form is told to try again rather
/// than left before a page that never loads (a reverse proxy gives up
/// after 60 s).
pub(crate) const SUBMIT_WAIT: Duration = Duration::from_secs(30);

/// What a throttled call is: it says how long the call waits for a slot
/// and what a second call of the same user's while it runs is told.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Call<'a> {
    /// A submission or a release: it waits for its slot (as another user,
    /// at most [`SUBMIT_WAIT`], then it is refused).
    Other,
    /// A cancel of these jobs: it waits for a slot at most
    /// [`CANCEL_WAIT`], then cancels anyway. As another user, a cancel of
    /// the same jobs as one under way is answered
    /// [`SchedError::CancelUnderWay`], without a second command.
    Cancel(&'a [String]),
}

/// Runs `call` once a slot is free; `as_user`: the call is made as
/// another user (see [`Pool::of`]), in their turn ([`Turns`]).
pub(crate) async fn throttled<T>(
    as_user: Option<&AsUser>,
    what: Call<'_>,
    call: impl Future<Output = Result<T, SchedError>>,
) -> Result<T, SchedError> {
    let (wait, cancel) = match what {
        Call::Cancel(ids) => (Wait::ThenRun(CANCEL_WAIT), Some(ids)),
        Call::Other if as_user.is_some() => (Wait::ThenRefuse(SUBMIT_WAIT), None),
        Call::Other => (Wait::Always, None),
    };
    match as_user {
        None => gated(Pool::of(false), wait, call).await,
        Some(u) => {
            let turns = Turns::of_process();
            turn_gated(turns, &u.user, cancel, Pool::of(true), wait, call).await
        }
    }
}

/// Runs `call` as `user` in their turn of `turns` (a cancel of `cancel`,
/// or another call), then holding a slot of `pool`: the turn is taken
/// first, so a user's calls refused hold no permit nor wait for one.
async fn turn_gated<T>(
    turns: &Turns,
    user: &str,
    cancel: Option<&[String]>,
    pool: Pool,
    wait: Wait,
    call: impl Future<Output = Result<T, SchedError>>,
) -> Result<T, SchedError> {
    let _turn = turns.take(user, cancel)?;
    gated(pool, wait, call).await
}

/// How long a call waits for a slot.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// As long as it takes.
    Always,
    /// At most this long, then it runs unthrottled (a cancel).
    ThenRun(Duration),
    /// At most this long, then it is refused ([`SchedError::Busy`]).
    ThenRefuse(Duration),
}

/// Runs `call` holding a slot of `pool`, waited for as `wait` says.
async fn gated<T>(
    pool: Pool,
    wait: Wait,
    call: impl Future<Output = Result<T, SchedError>>,
) -> Result<T, SchedError> {
    let take = pool.hold();
    let _held = match wait {
        Wait::Always => take.await,
        Wait::ThenRun(most) => tokio::time::timeout(most, take).await.unwrap_or_else(|_| {
            tracing::info!("no submission slot within {most:?}: going on anyway");
            Held::Nothing
        }),
        Wait::ThenRefuse(most) => tokio::time::timeout(most, take)
            .await
            .map_err(|_| SchedError::Busy(most))?,
    };
    call.await
}

/// The users with a call made as them running in this process (the
/// hub's), and which: a cancel's job ids, or None for any other call.
///
/// A second call as a user while one runs is refused at once rather than
/// queued: a queued call is a task and an open request that the user can
/// multiply at will, and the hub has no second call of one user's to make
/// (one live session per user: a second spawn is refused by its database
/// before any command; a second cancel is of the same session's job, and
/// is answered that it is under way, not run again).
#[derive(Debug, Default)]
pub(crate) struct Turns(Mutex<HashMap<String, Option<Vec<String>>>>);

/// A user's turn: given back when dropped (the call ended, or its caller
/// gave it up).
#[derive(Debug)]
pub(crate) struct Turn<'a> {
    turns: &'a Turns,
    user: String,
}

impl Turns {
    fn of_process() -> &'static Turns {
        static TURNS: OnceLock<Turns> = OnceLock::new();
        TURNS.get_or_init(Turns::default)
    }

    /// `user`'s turn, for a cancel of `cancel` or (None) another call;
    /// refused while another call as `user` runs.
    pub(crate) fn take(
        &self,
        user: &str,
        cancel: Option<&[String]>,
    ) -> Result<Turn<'_>, SchedError> {
        let mut running = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(now) = running.get(user) {
            return Err(match (now, cancel) {
                (Some(under_way), Some(ids)) if ids.iter().all(|i| under_way.contains(i)) => {
                    SchedError::CancelUnderWay(ids.to_vec())
                }
                _ => SchedError::UserBusy(user.to_string()),
            });
        }
        running.insert(user.to_string(), cancel.map(<[String]>::to_vec));
        Ok(Turn {
            turns: self,
            user: user.to_string(),
        })
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut running = self.turns.0.lock().unwrap_or_else(|e| e.into_inner());
        running.remove(&self.user);
    }
}

/// Where a call's slot comes from.
#[derive(Debug)]
enum Pool {
    /// The user's slot files on this host, shared by their processes.
    Files(Slots),
    /// The process's own permits.
    Process(&'static Semaphore),
}

impl Pool {
    /// A call made as another user (`as_other`: the hub, one long-lived
    /// process running as root for every user) takes a permit of the
    /// process's pool, sized when first used: slot files of root's would
    /// be wherever root's environment points (/tmp when it has neither
    /// HOME nor XDG_RUNTIME_DIR), where another user could plant them.
    /// Any other call, a slot of the user's files.
    fn of(as_other: bool) -> Pool {
        static POOL: OnceLock<Semaphore> = OnceLock::new();
        match as_other {
            true => {
                Pool::Process(POOL.get_or_init(|| Semaphore::new(SLOTS.load(Ordering::Relaxed))))
            }
            false => Pool::Files(Slots::here()),
        }
    }

    async fn hold(self) -> Held {
        match self {
            Pool::Process(pool) => match pool.acquire().await {
                Ok(p) => Held::Permit { _permit: p },
                Err(_) => Held::Nothing, // (never closed)
            },
            Pool::Files(slots) => slots.hold().await,
        }
    }
}

/// The slot files of one user on one host.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    dir: PathBuf,
    host: String,
    n: usize,
    /// How long a first in line may stay first (see [`queue`]).
    stuck: Duration,
}

impl Slots {
    /// This process's user's slots on this host.
    pub(crate) fn here() -> Slots {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "host".into());
        Slots::new(
            crate::paths::host_dir("submit"),
            host,
            SLOTS.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn new(dir: PathBuf, host: String, n: usize) -> Slots {
        let stuck = queue::STUCK;
        Slots {
            dir,
            host,
            n,
            stuck,
        }
    }

    /// These slots, with a first in line taken for stuck after `stuck`.
    #[cfg(test)]
    fn stuck_after(self, stuck: Duration) -> Slots {
        Slots { stuck, ..self }
    }

    fn path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}-slot-{i}.lock", self.host))
    }

    /// Waits for a free slot and holds it; a slot that cannot be had (its
    /// directory or a file refused, planted by another user) is logged and
    /// the call goes on unthrottled: the throttle spares the scheduler, it
    /// must never stop a user's work.
    async fn hold(&self) -> Held {
        match self.take().await {
            Ok(slot) => Held::File { _slot: slot },
            Err(e) => {
                tracing::warn!("{e}; going on without waiting for a submission slot");
                Held::Nothing
            }
        }
    }

    /// Waits for a free slot, in turn, and holds it.
    pub(crate) async fn take(&self) -> Result<Slot, SchedError> {
        let me = self.clone();
        let waiting = spawn_blocking(move || me.queue().map(Box::new)).await?;
        crate::paths::poll_lock(waiting, in_turn, MAX_PAUSE, None)
            .await
            .ok_or_else(|| {
                SchedError::Invalid(
                    "a submission slot could not be taken: its thread failed".into(),
                )
            })
    }

    /// Opens the slot files and takes a place in the queue (blocking).
    fn queue(&self) -> Result<Waiting, SchedError> {
        let files = self.open_all()?;
        let place = queue::Place::take(&self.dir, &self.host, self.stuck)?;
        Ok(Waiting { files, place })
    }

    /// Opens (making them where missing) the slot files, each checked.
    fn open_all(&self) -> Result<Vec<File>, SchedError> {
        crate::paths::private_dir(&self.dir)?;
        (0..self.n).map(|i| open_slot(&self.path(i))).collect()
    }
}

/// A slot file: a regular file of ours, 0600, not a link.
fn open_slot(path: &Path) -> Result<File, SchedError> {
    let f = noyau_trust::Expect::file().open_with(path, &mut crate::paths::lock_file())?;
    Ok(f)
}

/// What a waiter keeps between rounds: the slot files and its place.
#[derive(Debug)]
struct Waiting {
    files: Vec<File>,
    place: queue::Place,
}

/// One round: when no waiter that came before still waits (or the first
/// is stuck), a try of every slot ([`try_each`]); the place is given up
/// with a slot held.
fn in_turn(mut w: Box<Waiting>) -> Result<Slot, Box<Waiting>> {
    if !w.place.may_try() {
        return Err(w);
    }
    match try_each(std::mem::take(&mut w.files)) {
        Ok(slot) => Ok(slot),
        Err(files) => {
            w.files = files;
            Err(w)
        }
    }
}

/// One round: the first slot whose lock is free, held; else the files
/// back for the next round. Where the filesystem has no locks (`ENOLCK`
/// on some network filesystems) the call goes on unthrottled: the
/// throttle spares the login node, it must not stop every submission.
fn try_each(files: Vec<File>) -> Result<Slot, Vec<File>> {
    let mut back = Vec::with_capacity(files.len());
    for f in files {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(held) => return Ok(Slot { _lock: Some(held) }),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => back.push(f),
            Err((_, e)) => {
                tracing::warn!("submission slots cannot be locked ({e}): not throttled");
                return Ok(Slot { _lock: None });
            }
        }
    }
    Err(back)
}

/// Runs blocking file work off the tokio workers.
async fn spawn_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SchedError> + Send + 'static,
) -> Result<T, SchedError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SchedError::Invalid(format!("a submission slot could not be taken: {e}")))?
}

#[cfg(test)]
mod tests;
