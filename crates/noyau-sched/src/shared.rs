//! One listing for all of a user's processes. Each kernel has its own
//! proxy, each run or sweep its own driver: 200 kernels queued on Slurm
//! were 200 processes calling `squeue` every interval. Their watchers share
//! what they learn through `STATE/listings/NAME-KEY.json`: under an
//! exclusive `flock` of `NAME-KEY.lock`, a watcher whose turn comes reads
//! the listing another made if it was asked less than its interval before
//! the watcher began waiting (or since), and else asks the scheduler and
//! writes what it got for the others. The scheduler is then asked about
//! once per interval (or per call, when one call takes longer), whatever
//! the number of processes.
//!
//! A watcher waits for the lock as long as its holder may be asking the
//! scheduler ([`PATIENCE`], longer than a command's timeout), not one
//! interval: with a scheduler slower than the interval (oarstat under
//! load), watchers that gave up after an interval each asked it
//! themselves, which made it slower still (a herd of 300 oarstat at once
//! for 200 kernels). The wait runs in a blocking thread, bounded, so a
//! watcher dropped meanwhile leaves no thread waiting for ever.
//!
//! The file is trusted only when it is a regular file of this user's, not
//! a link, that no one else can write; otherwise it is replaced. Whatever
//! goes wrong (no lock on this filesystem, a planted lock file, a holder
//! past [`PATIENCE`], a file being rewritten), the watcher asks the
//! scheduler itself: sharing saves calls, it never decides a job's fate.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, JobInfo, Scope, COMMAND_TIMEOUT};
use crate::paths::{private_dir, write_private};
use crate::SchedError;

/// How long a watcher waits for the lock another process holds: that
/// process is asking the scheduler, in at most two commands (Grid
/// Engine's listing is `qstat -r -xml` then `qstat -j`), each killed after
/// [`COMMAND_TIMEOUT`]; a few seconds more for it to write the listing.
const PATIENCE: Duration = Duration::from_secs(2 * COMMAND_TIMEOUT.as_secs() + 5);

/// What one watcher wrote for the others.
#[derive(Serialize, Deserialize)]
struct Listing {
    /// When the scheduler was asked: a job tracked after that is not
    /// missing from it.
    asked: SystemTime,
    jobs: Vec<JobInfo>,
}

/// Where the watchers of one scheduler (and one cluster) meet.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    lock: PathBuf,
    file: PathBuf,
}

impl Shared {
    /// The meeting place of `imp`'s watchers in `dir`. The key tells
    /// clusters apart: one home may reach two (`SLURM_CONF`), and the
    /// listing of one says nothing about the other's jobs.
    pub(crate) fn new(dir: PathBuf, imp: &dyn Batch) -> Shared {
        let mut key = String::new();
        for var in imp.config_vars() {
            key.push_str(&std::env::var(var).unwrap_or_default());
            key.push('\0');
        }
        let stem = format!("{}-{:016x}", imp.name(), fnv1a(key.as_bytes()));
        Shared {
            lock: dir.join(format!("{stem}.lock")),
            file: dir.join(format!("{stem}.json")),
        }
    }

    /// This user's jobs, as another process saw them less than `fresh`
    /// before this call (or during it), or as the scheduler says now; and
    /// when it was asked. `asked` counts the calls to the scheduler.
    pub(crate) async fn list(
        &self,
        imp: &dyn Batch,
        fresh: Duration,
        asked: impl FnOnce(),
    ) -> Result<(Vec<JobInfo>, SystemTime), SchedError> {
        let since = SystemTime::now();
        let Some(guard) = take_lock(self.lock.clone(), PATIENCE).await else {
            asked();
            let now = SystemTime::now();
            return Ok((imp.list(Scope::Mine, None).await?, now));
        };
        if let Some(l) = self.read().filter(|l| is_fresh(l.asked, since, fresh)) {
            return Ok((l.jobs, l.asked));
        }
        asked();
        let now = SystemTime::now();
        let jobs = imp.list(Scope::Mine, None).await?;
        let listing = Listing { asked: now, jobs };
        if let Ok(text) = serde_json::to_string(&listing) {
            if let Err(e) = write_private(&self.file, &text, 0o600) {
                tracing::debug!("the shared listing is not written: {e}");
            }
        }
        drop(guard);
        Ok((listing.jobs, now))
    }

    /// The listing another process wrote, if it is ours alone and whole.
    fn read(&self) -> Option<Listing> {
        let mut f = ours_alone().open(&self.file).ok()?;
        let mut text = String::new();
        f.read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// A regular file of this user's that no one else can write.
fn ours_alone() -> noyau_trust::Expect {
    noyau_trust::Expect::file().mode(noyau_trust::Mode::NoOthersWrite)
}

/// An exclusive `flock` of `lock` (a regular file of ours that no one
/// else can write, made with its private directory where missing),
/// waited for up to `patience`; None where there is no lock to be had.
/// Never an unbounded wait (a lock on a network filesystem may hang), and
/// no thread held while waiting: each try is a non-blocking `flock` in a
/// blocking thread, then the task sleeps, so a caller dropped (a process
/// ending) gives the wait up; a thread blocked in it would keep the
/// runtime, and so the process, alive until the holder let go.
pub(crate) async fn take_lock(lock: PathBuf, patience: Duration) -> Option<Flock<File>> {
    let deadline = tokio::time::Instant::now() + patience;
    let opened = tokio::task::spawn_blocking(move || open_lock(&lock).map(|f| (lock, f)))
        .await
        .ok()??;
    crate::paths::poll_lock(opened, try_lock, Duration::from_millis(50), Some(deadline))
        .await
        .flatten()
}

/// One try of [`take_lock`]: the lock, if the path still names the file
/// locked; else the file to try next. A holder may remove the file before
/// it lets go (a Slurm extend's, so that they do not pile up): a waiter
/// that opened it before then would hold a lock on a file no longer there
/// while a newcomer makes and locks a new one, so it opens the path again.
fn try_lock((lock, f): (PathBuf, File)) -> Result<Option<Flock<File>>, (PathBuf, File)> {
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(held) if crate::paths::still_at(&lock, &held) => Ok(Some(held)),
        Ok(_gone) => match open_lock(&lock) {
            Some(f) => Err((lock, f)),
            None => Ok(None),
        },
        Err((back, nix::errno::Errno::EWOULDBLOCK)) => Err((lock, back)),
        Err(_) => Ok(None),
    }
}

/// The lock file, checked (see [`take_lock`]); None, with a warning when
/// it was refused, where there is none to be had.
fn open_lock(lock: &Path) -> Option<File> {
    checked_dir(lock.parent()?)?;
    match ours_alone().open_with(lock, &mut crate::paths::lock_file()) {
        Ok(f) => Some(f),
        Err(e @ noyau_trust::TrustError::Refused { .. }) => {
            tracing::warn!("{e}: not used");
            None
        }
        Err(_) => None,
    }
}

/// `dir` made or checked by [`private_dir`] (ours, 0700; in the state
/// directory of /tmp, that one too) the first time this process uses it,
/// not at every poll: a directory another user made first (with the
/// usual name in /tmp) is refused before a lock or a listing goes in it,
/// and once checked it is ours, which no one else can swap.
fn checked_dir(dir: &Path) -> Option<()> {
    static CHECKED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if !checked.contains(dir) {
        if let Err(e) = private_dir(dir) {
            tracing::warn!("{e}: no shared listing");
            return None;
        }
        checked.insert(dir.to_path_buf());
    }
    Some(())
}

/// Asked less than `fresh` before `since` (when the watcher began waiting
/// for the lock), or after it: a listing another process got while this
/// one waited is as new as the one it would get. Never one asked in the
/// future (a clock set back must not make an old listing look new for
/// ever).
fn is_fresh(asked: SystemTime, since: SystemTime, fresh: Duration) -> bool {
    let past = SystemTime::now().duration_since(asked).is_ok();
    past && since.duration_since(asked).map_or(true, |age| age < fresh)
}

/// FNV-1a: a hash that is the same in every build of noyau (std's is not
/// promised to be), so that two versions on one cluster meet too.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_or_future_listing_is_not_fresh() {
        let now = SystemTime::now();
        let two = Duration::from_secs(2);
        assert!(is_fresh(now, now, two));
        assert!(!is_fresh(now - Duration::from_secs(3), now, two));
        assert!(!is_fresh(now + Duration::from_secs(60), now, two));
        // asked while this watcher waited for the lock: fresh, however long
        // ago (a scheduler slower than the interval)
        let began = now - Duration::from_secs(10);
        assert!(is_fresh(now - Duration::from_secs(9), began, two));
        assert!(is_fresh(now - Duration::from_secs(11), began, two));
        assert!(!is_fresh(now - Duration::from_secs(13), began, two));
    }

    /// A wait for a lock another holds is given up with its caller: a
    /// process whose runtime ends mid-wait ends then, not when the holder
    /// lets go (a blocking thread waiting in it kept the runtime alive).
    #[test]
    fn a_lock_wait_ends_with_its_runtime_and_takes_the_lock_once_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/x.lock");
        let rt = || tokio::runtime::Runtime::new().unwrap();
        // the directory and file made, the lock taken and held
        let holder = rt()
            .block_on(take_lock(path.clone(), Duration::ZERO))
            .unwrap();
        let runtime = rt();
        let waiting = runtime.spawn(take_lock(path.clone(), Duration::from_secs(600)));
        runtime.block_on(async {
            // the wait has begun and keeps waiting while the lock is held
            let held_back = tokio::time::timeout(Duration::from_millis(300), async {
                while !waiting.is_finished() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            assert!(held_back.await.is_err(), "the lock was taken while held");
        });
        let dropped = std::time::Instant::now();
        drop(runtime);
        assert!(
            dropped.elapsed() < Duration::from_secs(60),
            "the runtime waited for the lock's holder"
        );
        drop(holder);
        assert!(rt().block_on(take_lock(path, Duration::ZERO)).is_some());
    }

    /// A listings directory that was already there (made first by another,
    /// under the usual name in /tmp) is checked before a lock goes in it:
    /// one of ours is made 0700 again (another user's would be refused).
    #[test]
    fn the_listings_directory_is_checked_even_when_it_exists() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let listings = dir.path().join("listings");
        std::fs::create_dir(&listings).unwrap();
        std::fs::set_permissions(&listings, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(open_lock(&listings.join("x.lock")).is_some());
        let mode = std::fs::metadata(&listings).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "a lock was made in an open directory");
    }

    #[test]
    fn a_listing_others_could_write_or_a_link_is_not_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = Shared {
            lock: dir.path().join("x.lock"),
            file: dir.path().join("x.json"),
        };
        let text = r#"{"asked":{"secs_since_epoch":1,"nanos_since_epoch":0},"jobs":[]}"#;
        write_private(&s.file, text, 0o600).unwrap();
        assert!(s.read().is_some());
        std::fs::set_permissions(&s.file, std::fs::Permissions::from_mode(0o622)).unwrap();
        assert!(s.read().is_none(), "a group-writable listing was read");
        let real = dir.path().join("real.json");
        write_private(&real, text, 0o600).unwrap();
        std::fs::remove_file(&s.file).unwrap();
        std::os::unix::fs::symlink(&real, &s.file).unwrap();
        assert!(s.read().is_none(), "a listing read through a link");
    }
}
