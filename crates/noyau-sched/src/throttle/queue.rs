//! First come, first served among a user's waiters for the submission
//! slots of one host. When every waiter tried every slot each round, with
//! pauses growing from 5 ms to 100 ms, a newcomer (trying every 5 ms)
//! took a slot given back before a waiter of long standing (every 100 ms)
//! looked again, round after round, under sustained load. Shorter or
//! jittered pauses only make that less likely; a queue rules it out: a
//! waiter tries the slots only when no waiter that came before it still
//! waits, so it is served after those ahead of it and at most a few that
//! took their place at the same instant.
//!
//! A place is a file `HOST-wait-SEQ-PID.lock` beside the slots, SEQ past
//! every place there (two waiters taking the same SEQ at once are ordered
//! by PID), locked (`flock`) by its waiter until it holds a slot or gives
//! up, when the file is removed. A place whose lock is free is a killed
//! waiter's (the lock died with it): a waiter behind it removes it and
//! goes on. Each waiter watches only the place just ahead of it (one
//! non-blocking `flock` a round, on a file kept open), and lists the
//! directory again only when that one is gone: a round costs about what
//! it cost before, whatever the number of waiters.
//!
//! The first in line gets a slot once one of the commands running ends,
//! and those are killed after [`COMMAND_TIMEOUT`]. One that stays first
//! much longer is stuck (its process stopped with Ctrl-Z): past
//! [`STUCK`] the waiters behind it try the slots too, as all did
//! before the queue, since the throttle must never stop a user's work.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::batch::COMMAND_TIMEOUT;
use crate::SchedError;

/// How long a first in line may stay first before it is taken for stuck.
pub(super) const STUCK: Duration = Duration::from_secs(2 * COMMAND_TIMEOUT.as_secs());

/// A place's key: (SEQ, PID).
type Key = (u64, u32);

/// A waiter's place in the queue, given up (its file removed) when dropped.
#[derive(Debug)]
pub(super) struct Place {
    dir: PathBuf,
    prefix: String,
    key: Key,
    /// The place just ahead, open, while its waiter waits.
    ahead: Option<File>,
    /// No live place was ahead when last looked: none can come ahead since
    /// (later places are further back), so the directory is not listed
    /// again (but for one made at the same instant, with the same SEQ).
    front: bool,
    /// The first in line as last seen, and since when.
    first: Option<(Key, Instant)>,
    /// How long a first in line may stay first ([`STUCK`]).
    stuck: Duration,
    /// The place's file, locked, removed with the place while still
    /// locked, so that no waiter behind takes it for a killed waiter's.
    _lock: crate::paths::RemovedLock,
}

/// How many places a waiter tries to make: one is missed only when a
/// waiter behind took the new file for a killed waiter's and removed it
/// before it was locked, which does not happen often in a row.
const TRIES: usize = 20;

impl Place {
    /// A place behind every waiter of `host`'s in `dir` (blocking).
    pub(super) fn take(dir: &Path, host: &str, stuck: Duration) -> Result<Place, SchedError> {
        let prefix = format!("{host}-wait-");
        let pid = std::process::id();
        for _ in 0..TRIES {
            let seq = places(dir, &prefix)?.last().map_or(0, |(k, _)| k.0 + 1);
            let path = dir.join(format!("{prefix}{seq}-{pid}.lock"));
            if let Some(lock) = make_and_lock(&path)? {
                return Ok(Place {
                    dir: dir.into(),
                    prefix,
                    key: (seq, pid),
                    ahead: None,
                    front: false,
                    first: None,
                    stuck,
                    _lock: crate::paths::RemovedLock::new(path, lock),
                });
            }
        }
        Err(SchedError::Invalid(format!(
            "no place could be made in the submission queue in {}",
            dir.display()
        )))
    }

    /// Whether this waiter may try the slots now: no waiter that came
    /// before still waits, or the first in line is stuck (blocking).
    pub(super) fn may_try(&mut self) -> bool {
        if self.front {
            return true;
        }
        if let Some(f) = self.ahead.take() {
            // (its lock free: served, gone or killed; look again)
            if let Err((f, Errno::EWOULDBLOCK)) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                self.ahead = Some(f);
                return self.first_is_stuck();
            }
        }
        self.ahead = self.live(true).map(|(_, f)| f);
        self.front = self.ahead.is_none();
        self.front
    }

    /// Whether the first in line has been first for longer than `stuck`
    /// (looked for again only then).
    fn first_is_stuck(&mut self) -> bool {
        let now = Instant::now();
        if self
            .first
            .is_some_and(|(_, since)| now.duration_since(since) < self.stuck)
        {
            return false;
        }
        let first = self.live(false).map(|(k, _)| k);
        match self.first {
            Some((key, _)) if first == Some(key) => true,
            _ => {
                self.first = first.map(|k| (k, now));
                false
            }
        }
    }

    /// The live place ahead of this one nearest to it (`nearest`), or
    /// farthest (the first in line), open; the places of killed waiters on
    /// the way (their lock free) are removed. A directory that cannot be
    /// listed gives none: the queue must never stop a submission.
    fn live(&self, nearest: bool) -> Option<(Key, File)> {
        let places = places(&self.dir, &self.prefix).ok()?;
        let mut before: Vec<_> = places.into_iter().filter(|(k, _)| *k < self.key).collect();
        if nearest {
            before.reverse();
        }
        before.into_iter().find_map(|(key, path)| {
            let f = noyau_trust::Expect::file().open(&path).ok()?;
            match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Err((f, Errno::EWOULDBLOCK)) => Some((key, f)),
                Ok(dead) if crate::paths::still_at(&path, &dead) => {
                    let _ = std::fs::remove_file(&path);
                    None
                }
                _ => None,
            }
        })
    }
}

/// The places in `dir` (files `PREFIXSEQ-PID.lock`), by key.
fn places(dir: &Path, prefix: &str) -> Result<Vec<(Key, PathBuf)>, SchedError> {
    let io = |source| SchedError::Io {
        what: "cannot list",
        path: dir.into(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        if let Some(key) = name.to_str().and_then(|n| key_of(n, prefix)) {
            found.push((key, dir.join(&name)));
        }
    }
    found.sort();
    Ok(found)
}

/// The key of a place's file name.
fn key_of(name: &str, prefix: &str) -> Option<Key> {
    let (seq, pid) = name
        .strip_prefix(prefix)?
        .strip_suffix(".lock")?
        .split_once('-')?;
    Some((seq.parse().ok()?, pid.parse().ok()?))
}

/// Makes the place `path` and locks it: None when that file was there
/// already, or was removed (taken for a killed waiter's) before it was
/// locked.
fn make_and_lock(path: &Path) -> Result<Option<Flock<File>>, SchedError> {
    let mut made = crate::paths::lock_file();
    made.create_new(true);
    let f = match noyau_trust::Expect::file().open_with(path, &mut made) {
        Ok(f) => f,
        Err(noyau_trust::TrustError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::AlreadyExists =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(lock) if crate::paths::still_at(path, &lock) => Ok(Some(lock)),
        Ok(_) | Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(SchedError::Io {
            what: "cannot lock",
            path: path.into(),
            source: e.into(),
        }),
    }
}
