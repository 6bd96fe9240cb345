//! At most N scheduler commands that change something (submit, cancel,
//! extend, release) of one user running at once on one host, whatever the
//! number of the user's noyau processes. 200 kernels started at once are
//! 200 proxies that would each fork `sbatch` or `oarsub` (a Perl program)
//! at the same instant on a shared login node; a centre limits the rate of
//! such calls (slurmctld's RPC limits) and so does noyau.
//!
//! The slots are N lock files, `HOST-slot-I.lock` in the user's private
//! directory for what is shared on this host (`$XDG_RUNTIME_DIR/noyau/
//! submit`, else `STATE/submit`): a call holds an exclusive `flock` on one
//! while its command runs. Waiting never blocks a tokio worker: each round
//! tries every slot without blocking, then sleeps with a backoff (at most
//! [`MAX_PAUSE`]); a blocking `flock` in `spawn_blocking` would hold a
//! thread per waiter and could not be given up when the caller is. The
//! lock dies with its process, so a killed submitter frees its slot.
//!
//! Slot files go through noyau-trust: created 0600, never through a link,
//! and one that is not a regular file of this user's is refused with an
//! error that names it: another user must not be able to hold a slot
//! forever or make noyau lock a file of theirs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::SchedError;

/// The default number of slots: enough to keep a scheduler busy, few
/// enough for a login node shared by many users.
pub const DEFAULT_SLOTS: usize = 4;
/// The most slots a site may set: beyond, the throttle limits nothing.
pub const MAX_SLOTS: usize = 64;
/// The longest pause between two rounds of tries.
const MAX_PAUSE: Duration = Duration::from_millis(100);

static SLOTS: AtomicUsize = AtomicUsize::new(DEFAULT_SLOTS);

/// Sets this process's number of slots (`concurrent_submissions` in the
/// config); every process of the user should say the same.
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

/// Runs `call` once a slot of this user's on this host is free.
pub(crate) async fn throttled<T>(
    call: impl std::future::Future<Output = Result<T, SchedError>>,
) -> Result<T, SchedError> {
    let _slot = Slots::here().take().await?;
    call.await
}

/// [`throttled`] for a cancel: a slot that cannot be had (a planted slot
/// file) is logged and the job cancelled anyway, since a job left running
/// holds the allocation.
pub(crate) async fn throttled_cancel<T>(
    call: impl std::future::Future<Output = Result<T, SchedError>>,
) -> Result<T, SchedError> {
    let _slot = match Slots::here().take().await {
        Ok(slot) => Some(slot),
        Err(e) => {
            tracing::warn!("{e}; cancelling without waiting for a slot");
            None
        }
    };
    call.await
}

/// One round of tries.
enum Round {
    Held(Slot),
    /// Every slot is taken: the files, for the next round.
    Busy(Vec<File>),
}

/// The slot files of one user on one host.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    dir: PathBuf,
    host: String,
    n: usize,
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
        Slots { dir, host, n }
    }

    fn path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}-slot-{i}.lock", self.host))
    }

    /// Waits for a free slot and holds it.
    pub(crate) async fn take(&self) -> Result<Slot, SchedError> {
        let me = self.clone();
        let mut files = spawn_blocking(move || me.open_all()).await?;
        let mut pause = Duration::from_millis(5);
        let mut told = false;
        loop {
            let back = match spawn_blocking(move || Ok(try_each(files))).await? {
                Round::Held(slot) => return Ok(slot),
                Round::Busy(back) => back,
            };
            if !told {
                tracing::debug!("{} scheduler calls of yours are running: waiting", self.n);
                told = true;
            }
            files = back;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
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

/// One round: the first slot whose lock is free, held; else the files
/// back for the next round. Where the filesystem has no locks (`ENOLCK`
/// on some network filesystems) the call goes on unthrottled: the
/// throttle spares the login node, it must not stop every submission.
fn try_each(files: Vec<File>) -> Round {
    let mut back = Vec::with_capacity(files.len());
    for f in files {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(held) => return Round::Held(Slot { _lock: Some(held) }),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => back.push(f),
            Err((_, e)) => {
                tracing::warn!("submission slots cannot be locked ({e}): not throttled");
                return Round::Held(Slot { _lock: None });
            }
        }
    }
    Round::Busy(back)
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
