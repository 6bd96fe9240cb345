//! A project's directory anchored to what it was when the notebook was
//! read (or the working directory taken): its device and inode. A
//! directory named by a path is re-resolved at each use, so anyone who
//! can write its parent could swap it, after noyau read the notebook, for
//! a link to a directory of the user's (their `~/.ssh`, a project they
//! trust) and have a notebook of theirs read a file there, or run its
//! code as trusted.
//!
//! The anchor travels with the value that names the project, a
//! [`ProjectDir`]: its path, for messages and trusted_projects' matching,
//! and the directory's `O_PATH` descriptor with its identity. Each use of
//! the project ([`crate::Beneath::project`], trusted_projects' matching,
//! the home check) compares what its path resolves to now with the
//! identity of the value it was given: there is no table by path, so
//! another value for the same path (made later, after a swap) has its
//! own directory and cannot change what this one checks against. Every
//! way to make one opens the directory; there is no unanchored project.
//!
//! The descriptor is held as long as a value (or a clone) lives: held, an
//! automounted directory (autofs, an NFS submount) is busy and not
//! expired while a job waits, to come back on another device, and its
//! inode number is not given to another directory.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::{Problem, TrustError};

/// A directory's device and inode.
pub type Identity = (u64, u64);

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

/// A project's directory: the path it was named by, and the directory
/// that path led to when the value was made, held open. Derefs to the
/// path, for messages and for resolving relative paths against it; what
/// judges the directory takes the value itself.
#[derive(Debug, Clone)]
pub struct ProjectDir {
    /// Absolute, as given (the one that travels with the project).
    path: PathBuf,
    id: Identity,
    held: Arc<OwnedFd>,
}

impl ProjectDir {
    /// Anchors the directory `dir` names now (links followed: a project
    /// named through a link of the user's is that link's directory).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let path = std::path::absolute(dir)?;
        Self::held(path, open_dir(dir)?)
    }

    /// The working directory, anchored to the process's own (an inode,
    /// which others can rename but not swap): `getcwd`'s string may
    /// resolve elsewhere by the time it is used.
    pub fn cwd() -> std::io::Result<Self> {
        Self::held(std::env::current_dir()?, open_dir(Path::new("."))?)
    }

    /// The project `path` names, anchored to `held`, a descriptor of it.
    fn held(path: PathBuf, held: OwnedFd) -> std::io::Result<Self> {
        Ok(ProjectDir {
            path: crate::plain(&path),
            id: identity(held.as_fd())?,
            held: Arc::new(held),
        })
    }

    /// The directory as named.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The identity it was anchored to.
    pub fn identity(&self) -> Identity {
        self.id
    }

    /// The held directory's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.held.as_fd()
    }

    /// Refuses `fd`, the directory its path was opened as, if it is not
    /// the anchored directory ([`Problem::Moved`]).
    pub fn check(&self, fd: BorrowedFd<'_>) -> Result<(), TrustError> {
        let found = identity(fd).map_err(|e| TrustError::io("examine", &self.path, e))?;
        if found != self.id {
            return Err(TrustError::refused(&self.path, Problem::Moved));
        }
        Ok(())
    }

    /// [`check`](Self::check) for the directory as it resolves now
    /// (`path`, resolved from its path).
    pub fn check_path(&self, path: &Path) -> Result<(), TrustError> {
        match identity_of(path) {
            Ok(found) if found == self.id => Ok(()),
            Ok(_) => Err(TrustError::refused(&self.path, Problem::Moved)),
            Err(e) => Err(TrustError::io("examine", path, e)),
        }
    }
}

/// Two values name the same project when they have the same path and
/// were anchored to the same directory.
impl PartialEq for ProjectDir {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.id == other.id
    }
}

impl Eq for ProjectDir {}

impl std::ops::Deref for ProjectDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for ProjectDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// Reads the notebook at `path`, anchoring its directory: the directory
/// is opened once (`O_PATH`), and the notebook opened from that
/// descriptor, so the project returned is the directory the notebook was
/// read from.
pub fn read_notebook(path: &Path) -> std::io::Result<(Vec<u8>, ProjectDir)> {
    use std::io::Read;
    let abs = std::path::absolute(path)?;
    let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file's path",
        ));
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
    Ok((bytes, ProjectDir::held(dir.into(), held)?))
}
