//! Replacing a file in a directory others may write (a shared project
//! directory): what is at the path now (a symlink, a FIFO, another user's
//! file) is replaced by a new file of ours, never written through.
//!
//! The directory is opened once and every step (the new file, the rename,
//! the cleanup) is relative to that descriptor: a directory named by a
//! path is re-resolved at each use, and anyone who can write its parent
//! could swap it between two steps for a link to a directory of the
//! user's. [`replace_at`] writes into a project's directory as it was
//! anchored ([`ProjectDir`]), never into what its path leads to now.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

use nix::fcntl::{renameat, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::anchor::{open_dir, ProjectDir};
use crate::TrustError;

/// Writes `contents` to a new file beside `path` (made with `O_EXCL`, so
/// never through a link, under a name no one can guess ahead; `mode`
/// exactly), syncs it, and renames it over `path`; all within the
/// directory `path`'s parent led to when this began.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), TrustError> {
    let path = &crate::plain(path);
    let name = path
        .file_name()
        .ok_or_else(|| crate::misuse("replace", path, "the path names no file"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = open_dir(parent).map_err(|e| TrustError::io("open the directory of", path, e))?;
    replace_in(dir.as_fd(), path, name, contents, mode)
}

/// [`replace`] for the file `name` (one component) in `project`'s
/// directory as anchored: where its path leads now plays no part.
pub fn replace_at(
    project: &ProjectDir,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> Result<(), TrustError> {
    let shown = project.join(name);
    if !matches!(
        Path::new(name).components().collect::<Vec<_>>()[..],
        [Component::Normal(_)]
    ) {
        return Err(crate::misuse(
            "replace",
            &shown,
            "the name is not one component",
        ));
    }
    replace_in(project.fd(), &shown, OsStr::new(name), contents, mode)
}

/// Writes `name` in the directory `dir` (`shown` names it in errors).
fn replace_in(
    dir: BorrowedFd<'_>,
    shown: &Path,
    name: &OsStr,
    contents: &[u8],
    mode: u32,
) -> Result<(), TrustError> {
    let (mut file, tmp) = create_beside(dir, shown, name, mode)?;
    let tmp_shown = shown.with_file_name(&tmp);
    let written = file
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents))
        .and_then(|()| file.sync_all())
        .map_err(|e| TrustError::io("write", &tmp_shown, e))
        .and_then(|()| {
            renameat(dir, tmp.as_str(), dir, name)
                .map_err(|e| TrustError::io("replace", shown, e.into()))
        });
    if written.is_err() {
        let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    written
}

/// A new file in `dir`, named after `name`: `O_EXCL` fails on anything
/// already there (a name planted ahead is skipped, not used). Its name.
fn create_beside(
    dir: BorrowedFd<'_>,
    shown: &Path,
    name: &OsStr,
    mode: u32,
) -> Result<(File, String), TrustError> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mode = Mode::from_bits_truncate(mode);
    let mut last = None;
    for _ in 0..16 {
        let tmp = format!(".{}.{}.tmp", name.to_string_lossy(), unguessable());
        match nix::fcntl::openat(dir, tmp.as_str(), flags, mode) {
            Ok(fd) => return Ok((File::from(fd), tmp)),
            Err(nix::errno::Errno::EEXIST) => last = Some(nix::errno::Errno::EEXIST),
            Err(e) => return Err(TrustError::io("create a file beside", shown, e.into())),
        }
    }
    let e = last.map_or_else(|| std::io::Error::other("no free name"), Into::into);
    Err(TrustError::io("create a file beside", shown, e))
}

/// 16 hex digits no other process can predict: std's hasher keys come
/// from the OS's random source.
fn unguessable() -> String {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{r:016x}")
}
