//! A project's directory anchored to what it was when the notebook was
//! read: its device and inode. A directory named by a path is
//! re-resolved at each use, so anyone who can write its parent could
//! swap it, after noyau read the notebook, for a link to a directory of
//! the user's (their `~/.ssh`, a project they trust) and have a notebook
//! of theirs read a file there, or run its code as trusted. Each later
//! use of the directory ([`crate::Beneath::open`], trusted_projects'
//! matching) compares what it resolved to with the anchor.
//!
//! The anchors are kept per process, by the directory's absolute path as
//! given (the one that travels with the project): noyau reads one
//! notebook per process, or works in a kernel's working directory. Each
//! keeps the directory's `O_PATH` descriptor open beside its identity:
//! held, an automounted directory (autofs, an NFS submount) is busy and
//! not expired while a job waits, to come back on another device, and
//! its inode number is not given to another directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::{Problem, TrustError};

/// A directory's device and inode.
pub type Identity = (u64, u64);

/// A directory's identity and its descriptor, held for as long as the
/// process runs.
struct Anchor {
    id: Identity,
    #[allow(dead_code)] // Only held: its being open is what counts.
    held: OwnedFd,
}

static ANCHORS: Mutex<BTreeMap<PathBuf, Anchor>> = Mutex::new(BTreeMap::new());

/// The key of `dir`: absolute, without `.` or a trailing separator.
fn key(dir: &Path) -> PathBuf {
    std::path::absolute(dir).map_or_else(|_| crate::plain(dir), |p| crate::plain(&p))
}

/// The device and inode of what `fd` is.
pub fn identity(fd: BorrowedFd<'_>) -> std::io::Result<Identity> {
    let st = nix::sys::stat::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// The device and inode `path` resolves to (links followed).
pub fn identity_of(path: &Path) -> std::io::Result<Identity> {
    let st = nix::sys::stat::stat(path)?;
    Ok((st.st_dev, st.st_ino))
}

/// Opens the directory `dir` as a place only (`O_PATH`), links followed.
pub fn open_dir(dir: &Path) -> std::io::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    Ok(nix::fcntl::open(dir, flags, Mode::empty())?)
}

/// Records that the project in `dir` is the directory `held` (a
/// descriptor of it, kept open), and returns its identity.
pub fn anchor(dir: &Path, held: OwnedFd) -> std::io::Result<Identity> {
    let id = identity(held.as_fd())?;
    let mut anchors = ANCHORS.lock().unwrap_or_else(|p| p.into_inner());
    anchors.insert(key(dir), Anchor { id, held });
    Ok(id)
}

/// The identity `dir` was anchored to, if it was.
pub fn anchored(dir: &Path) -> Option<Identity> {
    let anchors = ANCHORS.lock().unwrap_or_else(|p| p.into_inner());
    anchors.get(&key(dir)).map(|a| a.id)
}

/// The identity of the descriptor held for `dir`, as `fstat` says now.
#[cfg(test)]
pub(crate) fn held_identity(dir: &Path) -> Option<std::io::Result<Identity>> {
    let anchors = ANCHORS.lock().unwrap_or_else(|p| p.into_inner());
    anchors.get(&key(dir)).map(|a| identity(a.held.as_fd()))
}

/// Reads the notebook at `path`, anchoring its directory: the directory
/// is opened once (`O_PATH`), its identity recorded, and the notebook
/// opened from that descriptor, so the anchor is the directory the
/// notebook was read from.
pub fn read_notebook(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let abs = std::path::absolute(path)?;
    let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else {
        return std::fs::read(path);
    };
    let held = open_dir(dir)?;
    let fd = nix::fcntl::openat(
        &held,
        name,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut bytes = Vec::new();
    File::from(fd).read_to_end(&mut bytes)?;
    anchor(dir, held)?;
    Ok(bytes)
}

/// The working directory, anchored to the process's own (an inode, which
/// others can rename but not swap): `getcwd`'s string may resolve
/// elsewhere by the time it is used.
pub fn cwd() -> std::io::Result<PathBuf> {
    let here = std::env::current_dir()?;
    anchor(&here, open_dir(Path::new("."))?)?;
    Ok(here)
}

/// Refuses `fd`, the directory `dir` was opened as, if `dir` was anchored
/// to another directory.
pub fn check(dir: &Path, fd: BorrowedFd<'_>) -> Result<(), TrustError> {
    let Some(want) = anchored(dir) else {
        return Ok(());
    };
    let found = identity(fd).map_err(|e| TrustError::io("examine", dir, e))?;
    if found != want {
        return Err(TrustError::refused(dir, Problem::Moved));
    }
    Ok(())
}

/// [`check`] for `dir` as it resolves now (`path`, resolved from `dir`).
pub fn check_path(dir: &Path, path: &Path) -> Result<(), TrustError> {
    let Some(want) = anchored(dir) else {
        return Ok(());
    };
    match identity_of(path) {
        Ok(found) if found == want => Ok(()),
        Ok(_) => Err(TrustError::refused(dir, Problem::Moved)),
        Err(e) => Err(TrustError::io("examine", path, e)),
    }
}
