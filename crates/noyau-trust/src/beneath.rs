//! Opening a file a directory holds, judged on what was opened: a path
//! checked to resolve into a directory and then opened could be swapped
//! in between by anyone who can write a directory on the way.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

use crate::{Expect, Problem, TrustError};

/// A directory held open, to open what it holds beneath it.
#[derive(Debug)]
pub struct Beneath {
    dir: OwnedFd,
    /// The directory as named, for messages and the fallback.
    path: PathBuf,
}

impl Beneath {
    /// Opens the directory `dir` (links followed: the directory as named).
    pub fn open(dir: &Path) -> Result<Self, TrustError> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::open(dir, flags, nix::sys::stat::Mode::empty())
            .map_err(|e| TrustError::io("open", dir, e.into()))?;
        Ok(Beneath {
            dir: fd,
            path: dir.into(),
        })
    }

    /// The directory's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The directory as named.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `rel` beneath the directory for reading, never blocking, and
    /// checks what was opened with `expect`: no `..`, absolute path or
    /// link on the way leads out of it (`openat2`'s `RESOLVE_BENEATH`, and
    /// no /proc magic link: [`Problem::Outside`]); a link at the last
    /// component is followed only with [`Expect::follow_links`]. A kernel
    /// without `openat2` (before Linux 5.6, still on some clusters), or a
    /// path `openat2` will not resolve beneath (a step out, an absolute
    /// link), has the file opened by its path and then refused if the
    /// descriptor's path (`/proc/self/fd`) is not under the directory's.
    pub fn open_file(&self, expect: &Expect, rel: &Path) -> Result<File, TrustError> {
        let shown = self.path.join(rel);
        let mut flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        if !expect.follow {
            flags |= OFlag::O_NOFOLLOW;
        }
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let file = match nix::fcntl::openat2(self.fd(), rel, how) {
            Ok(fd) => File::from(fd),
            // EXDEV: a step leads out, or is an absolute link, which
            // RESOLVE_BENEATH refuses even when it names a file inside
            // (`ln -s /home/me/project/envs/a.toml`): judged as without
            // openat2, on where the descriptor opened is.
            Err(Errno::ENOSYS | Errno::EXDEV) => self.open_by_path(flags, rel)?,
            Err(Errno::ELOOP) if !expect.follow => {
                return Err(TrustError::refused(&shown, Problem::Symlink))
            }
            Err(e) => return Err(TrustError::io("open", &shown, e.into())),
        };
        let meta = file
            .metadata()
            .map_err(|e| TrustError::io("examine", &shown, e))?;
        expect.check_meta(&shown, &meta)?;
        Ok(file)
    }

    /// The fallback of [`Beneath::open_file`]: `rel` opened from the held
    /// directory (not its path, which may have been swapped since), links
    /// followed wherever they lead, then judged on where it is.
    pub(crate) fn open_by_path(&self, flags: OFlag, rel: &Path) -> Result<File, TrustError> {
        let shown = &self.path.join(rel);
        let fd = nix::fcntl::openat(self.fd(), rel, flags, nix::sys::stat::Mode::empty())
            .map_err(|e| TrustError::io("open", shown, e.into()))?;
        let real =
            |fd: BorrowedFd<'_>| std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let (dir, file) = (real(self.fd()), real(fd.as_fd()));
        match (dir, file) {
            (Ok(dir), Ok(file)) if file.starts_with(&dir) => Ok(File::from(fd)),
            (Ok(_), Ok(_)) => Err(TrustError::refused(shown, Problem::Outside)),
            (Err(e), _) | (_, Err(e)) => Err(TrustError::io("examine", shown, e)),
        }
    }
}
