//! Private runtime directories (0700) for connection files and ipc sockets.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("cannot create runtime directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("runtime directory {path} has mode {mode:o}; it must be 0700 (only its owner may enter it). Fix it with `chmod 700 {path}` or remove it")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("runtime directory {path} belongs to uid {owner}, not to you (uid {me}); remove it or set NOYAU_RUNTIME_DIR")]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
}

/// A directory only its owner can enter; removed when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

/// The base directory for noyau's runtime files: `$NOYAU_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/noyau`, else `$TMPDIR/noyau-<uid>`.
pub fn base_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NOYAU_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("noyau");
    }
    std::env::temp_dir().join(format!("noyau-{}", nix::unistd::getuid()))
}

/// Creates `path` with mode 0700 if missing, and checks that an existing one
/// is ours and closed to others: a socket in a directory others can enter
/// is a socket others can connect to.
pub fn ensure_private_dir(path: &Path) -> Result<(), RuntimeDirError> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => {}
        Err(source) => {
            return Err(RuntimeDirError::Create {
                path: path.into(),
                source,
            })
        }
    }
    let meta = std::fs::metadata(path).map_err(|source| RuntimeDirError::Create {
        path: path.into(),
        source,
    })?;
    let me = nix::unistd::getuid().as_raw();
    if meta.uid() != me {
        return Err(RuntimeDirError::NotOwned {
            path: path.into(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(RuntimeDirError::TooOpen {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

impl RuntimeDir {
    /// A fresh private directory named `prefix-<pid>-<random>` under [`base_dir`].
    pub fn create(prefix: &str) -> Result<Self, RuntimeDirError> {
        let base = base_dir();
        ensure_private_dir(&base)?;
        let name = format!("{prefix}-{}-{:08x}", std::process::id(), rand_u32());
        let path = base.join(name);
        ensure_private_dir(&path)?;
        Ok(RuntimeDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn rand_u32() -> u32 {
    // Uniqueness, not secrecy: the directory's mode is what protects it.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ std::process::id().rotate_left(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_0700_and_refuses_open_dirs() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("rt");
        ensure_private_dir(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = ensure_private_dir(&p).unwrap_err();
        assert!(
            matches!(e, RuntimeDirError::TooOpen { mode: 0o755, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 700"));
    }
}
