//! Replacing a file in a directory others may write (a shared project
//! directory): what is at the path now (a symlink, a FIFO, another user's
//! file) is replaced by a new file of ours, never written through.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::TrustError;

/// Writes `contents` to a new file beside `path` (made with `O_EXCL`, so
/// never through a link, under a name no one can guess ahead; `mode`
/// exactly), syncs it, and renames it over `path`.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), TrustError> {
    let path = &crate::plain(path);
    let (mut file, tmp) = create_beside(path, mode)?;
    let written = file
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents))
        .and_then(|()| file.sync_all())
        .map_err(|e| TrustError::io("write", &tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| TrustError::io("replace", path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A new file in `path`'s directory, named after it: `O_EXCL` fails on
/// anything already there (a name planted ahead is skipped, not used).
fn create_beside(path: &Path, mode: u32) -> Result<(File, PathBuf), TrustError> {
    let name = path
        .file_name()
        .ok_or_else(|| crate::misuse("replace", path, "the path names no file"))?
        .to_string_lossy();
    let mut last = None;
    for _ in 0..16 {
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", unguessable()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(TrustError::io("create a file beside", path, e)),
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::other("no free name"));
    Err(TrustError::io("create a file beside", path, e))
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
