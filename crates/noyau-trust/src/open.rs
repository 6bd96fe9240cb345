//! Opening and making paths, checked on what was opened: a path checked
//! and then opened could be swapped in between.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::libc;

use crate::{Expect, Kind, Mode, Problem, TrustError};

impl Expect {
    /// Opens `path` for reading and checks the open file. A followed link
    /// that leads nowhere is a file not found (as a config file named by a
    /// link into an unmounted filesystem: there is none to read).
    pub fn open(&self, path: &Path) -> Result<File, TrustError> {
        self.open_checked(path, OpenOptions::new().read(true), false)
    }

    /// Opens `path` with `options` and checks the open file. Opening never
    /// blocks (a FIFO is refused at once, not waited on), never makes a
    /// terminal ours, and follows a symlink only with
    /// [`Expect::follow_links`]. With [`Mode::Set`] the mode is then set.
    /// std's `OpenOptions` does not tell its custom flags: any set on
    /// `options` are replaced by the ones this needs (`O_NONBLOCK`,
    /// `O_NOCTTY`, `O_CLOEXEC`, and `O_NOFOLLOW` unless links are followed).
    pub fn open_with(&self, path: &Path, options: &mut OpenOptions) -> Result<File, TrustError> {
        self.open_checked(path, options, true)
    }

    /// [`Expect::open_with`]; a followed link to nothing is refused only
    /// when the options `may_create` a file (`OpenOptions` does not tell).
    fn open_checked(
        &self,
        path: &Path,
        options: &mut OpenOptions,
        may_create: bool,
    ) -> Result<File, TrustError> {
        let path = &crate::plain(path);
        let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        if !self.follow {
            flags |= libc::O_NOFOLLOW;
        } else if may_create && dangling(path) {
            // Opening it to create would make a file wherever it leads.
            return Err(TrustError::refused(path, Problem::Symlink));
        }
        let file = options
            .custom_flags(flags)
            .open(path)
            .map_err(|e| self.explain("open", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| TrustError::io("examine", path, e))?;
        self.check_meta(path, &meta)?;
        if let Mode::Set(mode) = self.mode {
            if meta.permissions().mode() & 0o7777 != mode {
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| TrustError::io("set the mode of", path, e))?;
            }
        }
        Ok(file)
    }

    /// Makes the directory `path` (and missing parents) 0700 where it is
    /// missing, and checks the one there (opened, so the check and a
    /// [`Mode::Set`] apply to the same directory).
    pub fn make_dir(&self, path: &Path) -> Result<(), TrustError> {
        let path = &crate::plain(path);
        if self.kind != Kind::Dir {
            return Err(crate::misuse("create", path, "make_dir needs Expect::dir"));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| self.explain("create", path, e))?;
        self.open(path).map(drop)
    }

    /// The refusal that explains why `action` failed on `path` (a symlink
    /// under `O_NOFOLLOW`, a directory where a file is written, another
    /// user's file), else the I/O error itself.
    fn explain(&self, action: &'static str, path: &Path, e: std::io::Error) -> TrustError {
        // (A mode to set is set only on what was opened: not checked here.)
        let probe = match self.mode {
            Mode::Set(_) => self.mode(Mode::Any),
            _ => *self,
        };
        if e.kind() != std::io::ErrorKind::NotFound {
            if let Err(refused @ TrustError::Refused { .. }) = probe.check(path) {
                return refused;
            }
        }
        TrustError::io(action, path, e)
    }
}

/// A symlink at `path` that leads nowhere.
fn dangling(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
        && std::fs::metadata(path).is_err()
}

/// Opens `path` for writing from its start, as a regular file of ours with
/// `mode` (made so, whatever the umask or an earlier mode): created if
/// missing; one already there is used only if it is a regular file of ours
/// with no other name (never written through a symlink or a hard link,
/// and checked before it is emptied).
pub fn create_private(path: &Path, mode: u32) -> Result<File, TrustError> {
    let file = Expect::file().mode(Mode::Any).open_with(
        path,
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode),
    )?;
    let meta = file
        .metadata()
        .map_err(|e| TrustError::io("examine", path, e))?;
    // Another name for the same file (a hard link another user made to a
    // file of ours elsewhere) would be emptied and rewritten under it.
    if meta.nlink() != 1 {
        return Err(TrustError::refused(
            path,
            Problem::HardLinked {
                links: meta.nlink(),
            },
        ));
    }
    if meta.mode() & 0o7777 != mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| TrustError::io("set the mode of", path, e))?;
    }
    file.set_len(0)
        .map_err(|e| TrustError::io("empty", path, e))?;
    Ok(file)
}
