//! Opening a file a directory holds, judged on what was opened: a path
//! checked to resolve into a directory and then opened could be swapped
//! in between by anyone who can write a directory on the way.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::anchor::ProjectDir;
use crate::{Expect, Problem, TrustError};

/// How many times `openat2` is asked again when it answers EAGAIN (a
/// `..` on the way raced a rename or a mount anywhere on the system).
const RETRIES: usize = 3;

/// A directory held open, to open what it holds beneath it.
#[derive(Debug)]
pub struct Beneath {
    dir: OwnedFd,
    /// The directory as named, for messages.
    path: PathBuf,
}

/// Why [`Beneath::walk`] stopped.
#[derive(Debug)]
pub enum WalkError<E> {
    /// The relative path is empty or has a component other than a name
    /// (`..`, `.` first, `/`).
    NotPlain,
    /// The directory `at` on the way could not be opened as a directory
    /// reached through no link.
    Dir { at: PathBuf, errno: Errno },
    /// The last name, `at`, could not be examined.
    Last { at: PathBuf, errno: Errno },
    /// The visitor refused a directory on the way.
    Refused(E),
}

impl Beneath {
    /// Opens the directory `dir` (links followed: the directory as named).
    pub fn open(dir: &Path) -> Result<Self, TrustError> {
        let fd = crate::anchor::open_dir(dir).map_err(|e| TrustError::io("open", dir, e))?;
        Ok(Beneath {
            dir: fd,
            path: dir.into(),
        })
    }

    /// The project's directory, as held since it was anchored
    /// ([`crate::anchor`]), refused if its path no longer leads there
    /// ([`Problem::Moved`]: what is read for the project must be what its
    /// path, by which it is trusted and shown, names).
    pub fn project(dir: &ProjectDir) -> Result<Self, TrustError> {
        let now = Self::open(dir)?;
        dir.check(now.fd())?;
        let held = dir
            .fd()
            .try_clone_to_owned()
            .map_err(|e| TrustError::io("open", dir, e))?;
        Ok(Beneath {
            dir: held,
            path: dir.path().into(),
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
    /// link on the way leads out of it, no mount is crossed, and with
    /// `openat2` no absolute link is followed at all, even to a file
    /// inside (`RESOLVE_BENEATH | RESOLVE_NO_XDEV`, and no /proc magic
    /// link: [`Problem::Outside`]); a link at the last component is
    /// followed only with [`Expect::follow_links`]. What `rel` leads to
    /// is opened as a place only (`O_PATH`: a device's driver or a FIFO is
    /// not opened), checked, and only then reopened for reading. Where
    /// `openat2` cannot be used (a kernel before Linux 5.6, still on some
    /// clusters, or a seccomp filter that predates it), see
    /// [`Beneath::open_walked`], which reads an absolute link that leads
    /// to a file inside.
    pub fn open_file(&self, expect: &Expect, rel: &Path) -> Result<File, TrustError> {
        let shown = self.path.join(rel);
        let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
        if !expect.follow {
            flags |= OFlag::O_NOFOLLOW;
        }
        let how = OpenHow::new().flags(flags).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
        let mut tries = 0;
        let place = loop {
            match nix::fcntl::openat2(self.fd(), rel, how) {
                Ok(fd) => break fd,
                Err(Errno::EAGAIN) if tries < RETRIES => tries += 1,
                // No openat2 (ENOSYS), or a seccomp filter written before
                // it (Docker before 20.10, systemd's SystemCallFilter)
                // answering EPERM.
                Err(Errno::ENOSYS | Errno::EPERM) => return self.open_walked(expect, rel, || {}),
                // A step out, a mount, or an absolute link even to a file
                // inside: refused, never judged afterwards on where it led.
                Err(Errno::EXDEV) => return Err(TrustError::refused(&shown, Problem::Outside)),
                Err(e) => return Err(TrustError::io("open", &shown, e.into())),
            }
        };
        reopen(place, expect, &shown)
    }

    /// The fallback of [`Beneath::open_file`] where `openat2` cannot be
    /// used (missing, or refused by a seccomp filter). The path
    /// `/proc/self/fd` gives of what was opened is only where to walk
    /// from the held directory, never trusted itself (it is stale once
    /// anything on it is renamed, and `/` on a detached mount): what `rel`
    /// leads to from the held directory is opened as a place only
    /// (`O_PATH`: a device or FIFO is not opened), and accepted only if it
    /// is the very file (device and inode) at its own path beneath the
    /// held directory, reached from it by names through no link
    /// ([`Beneath::walk`]); then checked with `expect` and only then
    /// opened for reading. Any failure past the held directory gets the
    /// one answer [`Problem::Outside`] (whether and why it failed out
    /// there is not told), as does a failure inside that the walk cannot
    /// tell from one outside (EACCES, ENOTDIR, a relative link to a
    /// missing file); an absolute link to a file inside is read (it is
    /// judged on where it led, unlike with `openat2`); a name missing inside, reached through no link,
    /// is missing. `between` runs after the place is opened (for tests:
    /// a rename then).
    pub(crate) fn open_walked(
        &self,
        expect: &Expect,
        rel: &Path,
        between: impl FnOnce(),
    ) -> Result<File, TrustError> {
        let shown = self.path.join(rel);
        let outside = || TrustError::refused(&shown, Problem::Outside);
        let no_visit = |_: &Path, _: &FileStat, _: bool| Ok::<(), std::convert::Infallible>(());
        // No mount crossed on the way (as `RESOLVE_NO_XDEV`): a FUSE
        // mounted there could say anything of its files, or hang.
        let dev = nix::sys::stat::fstat(self.fd())
            .map_err(|_| outside())?
            .st_dev;
        let same_dev =
            |_: &Path, m: &FileStat, _: bool| if m.st_dev == dev { Ok(()) } else { Err(()) };
        // Missing where nothing was followed: said before anything is.
        if let Err(
            WalkError::Dir {
                errno: Errno::ENOENT,
                ..
            }
            | WalkError::Last {
                errno: Errno::ENOENT,
                ..
            },
        ) = self.walk(rel, no_visit)
        {
            return Err(TrustError::io("open", &shown, Errno::ENOENT.into()));
        }
        let held = proc_path(self.fd()).ok_or_else(outside)?;
        let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
        if !expect.follow {
            flags |= OFlag::O_NOFOLLOW;
        }
        let place =
            nix::fcntl::openat(self.fd(), rel, flags, Mode::empty()).map_err(|_| outside())?;
        between();
        let at = proc_path(place.as_fd()).ok_or_else(outside)?;
        let at = at.strip_prefix(&held).map_err(|_| outside())?;
        let found = self.walk(at, same_dev).map_err(|_| outside())?;
        let opened = nix::sys::stat::fstat(&place).map_err(|_| outside())?;
        if (found.st_dev, found.st_ino) != (opened.st_dev, opened.st_ino) || found.st_dev != dev {
            return Err(outside());
        }
        // Inside: judged as openat2's answer would be.
        reopen(place, expect, &shown)
    }

    /// What is at `rel` beneath the directory, reached through no link:
    /// each directory on the way opened from the one above without
    /// following a link and given to `visit` (its path as shown, its
    /// metadata, whether it is the last one), then the last name examined
    /// without following it (a link there is what is returned).
    pub fn walk<E>(
        &self,
        rel: &Path,
        mut visit: impl FnMut(&Path, &FileStat, bool) -> Result<(), E>,
    ) -> Result<FileStat, WalkError<E>> {
        let names: Vec<&OsStr> = rel
            .components()
            .map(|c| match c {
                Component::Normal(n) => Some(n),
                _ => None,
            })
            .collect::<Option<_>>()
            .ok_or(WalkError::NotPlain)?;
        let Some((last, on_the_way)) = names.split_last() else {
            return Err(WalkError::NotPlain);
        };
        let mut here = self.path.clone();
        let mut held: Option<OwnedFd> = None;
        for (i, name) in on_the_way.iter().enumerate() {
            here.push(name);
            let at = held.as_ref().map_or(self.fd(), |f| f.as_fd());
            let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let dir_err = |errno| WalkError::Dir {
                at: here.clone(),
                errno,
            };
            let next = nix::fcntl::openat(at, *name, flags, Mode::empty()).map_err(dir_err)?;
            let meta = nix::sys::stat::fstat(&next).map_err(dir_err)?;
            visit(&here, &meta, i + 1 == on_the_way.len()).map_err(WalkError::Refused)?;
            held = Some(next);
        }
        let at = held.as_ref().map_or(self.fd(), |f| f.as_fd());
        nix::sys::stat::fstatat(at, *last, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|errno| {
            WalkError::Last {
                at: self.path.join(rel),
                errno,
            }
        })
    }
}

/// Where a descriptor is reopened from: its magic link there.
const PROC_FD: &str = "/proc/self/fd";

/// `place`, opened `O_PATH` as `shown`, checked with `expect` (a link
/// there is refused) and only then opened for reading, never blocking,
/// through `/proc/self/fd` (the same inode, whatever its path is now).
fn reopen(place: OwnedFd, expect: &Expect, shown: &Path) -> Result<File, TrustError> {
    reopen_through(PROC_FD, place, expect, shown)
}

/// [`reopen`] through `proc_fd` (another one in tests: /proc missing).
/// A descriptor's magic link always opens, even to a removed file, so
/// ENOENT there means `proc_fd` itself is missing (a chroot or sandbox
/// without /proc): said so, and not as a missing file, which callers
/// take for "there is none" (a project's noyau.toml skipped).
pub(crate) fn reopen_through(
    proc_fd: &str,
    place: OwnedFd,
    expect: &Expect,
    shown: &Path,
) -> Result<File, TrustError> {
    let place = File::from(place);
    let meta = place
        .metadata()
        .map_err(|e| TrustError::io("examine", shown, e))?;
    expect.check_meta(shown, &meta)?;
    let read = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let proc = format!("{proc_fd}/{}", place.as_raw_fd());
    nix::fcntl::open(proc.as_str(), read, Mode::empty())
        .map(File::from)
        .map_err(|e| {
            let source = match e {
                Errno::ENOENT => std::io::Error::other(format!(
                    "{proc} is missing: noyau reads a file it checked through it, so /proc \
                     must be mounted (mount it in the chroot or container: `mount -t proc \
                     proc /proc`, or bwrap's --proc /proc)"
                )),
                e => e.into(),
            };
            TrustError::io("open", shown, source)
        })
}

/// Whether `meta` is a symlink's.
pub fn is_link(meta: &FileStat) -> bool {
    SFlag::from_bits_truncate(meta.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
}

/// Where the kernel says `fd` is (`/proc/self/fd`), if it can.
fn proc_path(fd: BorrowedFd<'_>) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
}
