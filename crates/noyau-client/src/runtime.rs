//! Private runtime directories (0700) for connection files and ipc sockets.
//!
//! The base directory is `$NOYAU_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/noyau`
//! (when that runtime directory exists and is ours and private: a job gets
//! the login node's value, which may name nothing on the compute node),
//! else `$TMPDIR/noyau-<uid>`. That last one is a name anyone can take
//! first in a directory every user writes to: when it is not ours and
//! private (another user's, a symlink, or open), noyau uses a private
//! directory of its own beside it instead, `$TMPDIR/noyau-<uid>-XXXXXX`
//! (mkdtemp, 0700), and warns. Every noyau process of the user picks the
//! same one: the first by name of those that are ours, 0700 and not
//! symlinks (no one else can make such a directory), so a proxy's
//! successor finds its handover record there; only two processes making
//! the first fallback at the same instant could pick different ones.

use noyau_trust::{Expect, Mode, TrustError};
use noyau_vars::EnvVars;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// A runtime directory that cannot be made, or is not private.
#[derive(Debug, thiserror::Error)]
#[error("runtime directory: {0}; or set NOYAU_RUNTIME_DIR to a private directory of yours")]
pub struct RuntimeDirError(#[from] pub TrustError);

/// A directory only its owner can enter; removed when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

/// The base directory for noyau's runtime files, made and checked private:
/// `$NOYAU_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/noyau` (see [`chosen`]), else
/// `$TMPDIR/noyau-<uid>` or, when someone else took that name, a private
/// fallback beside it ([`tmp_base`]).
pub fn base_dir() -> Result<PathBuf, RuntimeDirError> {
    let chosen = chosen(
        std::env::var_os(EnvVars::NOYAU_RUNTIME_DIR),
        std::env::var_os(EnvVars::XDG_RUNTIME_DIR),
    );
    match chosen {
        Some(dir) => ensure_private_dir(&dir).map(|()| dir),
        None => tmp_base(&std::env::temp_dir(), nix::unistd::getuid().as_raw()),
    }
}

/// The base directory these variables' values name, if any. An
/// XDG_RUNTIME_DIR that is relative (the XDG spec says to ignore it), or
/// that is not a directory of ours closed to others (the login node's,
/// carried into a job on a node without it, or someone else's), counts as
/// unset: the caller falls back to `$TMPDIR`, with a warning for the latter.
fn chosen(noyau: Option<OsString>, xdg: Option<OsString>) -> Option<PathBuf> {
    if let Some(n) = noyau.filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(n));
    }
    let named = noyau_vars::absolute(xdg)?;
    match noyau_sched::runtime_dir_from(Some(named.clone().into_os_string())) {
        Some(d) => Some(d.join("noyau")),
        None => {
            // once: every socket and record path asks again
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    "ignoring XDG_RUNTIME_DIR={}: not a private directory of yours on this host",
                    named.display()
                )
            });
            None
        }
    }
}

/// `TMP/noyau-<uid>` if it is (or can be made) ours and private, else the
/// first of our private `TMP/noyau-<uid>-*` fallbacks, else a new one.
fn tmp_base(tmp: &Path, uid: u32) -> Result<PathBuf, RuntimeDirError> {
    let usual = tmp.join(format!("noyau-{uid}"));
    let squatted = match ensure_private_dir(&usual) {
        Ok(()) => return Ok(usual),
        Err(e) => e.0,
    };
    let prefix = format!("noyau-{uid}-");
    let mut ours: Vec<PathBuf> = std::fs::read_dir(tmp)
        .map_err(|e| TrustError::io("list", tmp, e))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .filter(|p| is_private(p))
        .collect();
    ours.sort();
    let template = tmp.join(format!("{prefix}XXXXXX"));
    let dir = match ours.into_iter().next() {
        Some(d) => d,
        None => nix::unistd::mkdtemp(&template)
            .map_err(|e| TrustError::io("create", &template, e.into()))?,
    };
    tracing::warn!(
        "not using {}: {squatted}; using the private directory {} instead",
        usual.display(),
        dir.display()
    );
    Ok(dir)
}

/// A directory (not a symlink) of ours (the effective uid's, the owner of
/// what [`tmp_base`] makes) with mode 0700.
fn is_private(path: &Path) -> bool {
    Expect::dir().mode(Mode::Exactly(0o700)).check(path).is_ok()
}

/// Creates `path` with mode 0700 if missing, and checks that an existing one
/// is ours, closed to others and not a symlink (which could lead to any
/// directory of ours): a socket in a directory others can enter is a
/// socket others can connect to.
pub fn ensure_private_dir(path: &Path) -> Result<(), RuntimeDirError> {
    Ok(Expect::dir().make_dir(path)?)
}

impl RuntimeDir {
    /// A fresh private directory named `prefix-<pid>-<random>` under [`base_dir`].
    pub fn create(prefix: &str) -> Result<Self, RuntimeDirError> {
        let base = base_dir()?;
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
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

    #[test]
    fn a_relative_xdg_runtime_dir_is_ignored() {
        let some = |v: &str| Some(OsString::from(v));
        let run = tempfile::tempdir().unwrap();
        std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let run_s = run.path().to_str().unwrap();
        assert_eq!(chosen(None, some("run")), None);
        assert_eq!(chosen(None, some("")), None);
        assert_eq!(chosen(None, some(run_s)), Some(run.path().join("noyau")));
        assert_eq!(chosen(some("/x"), some(run_s)), Some("/x".into()));
        assert_eq!(chosen(some(""), some("rel")), None);
    }

    /// A job inherits the login node's XDG_RUNTIME_DIR: on a compute node
    /// where it does not exist, or is not ours and private, it is unset
    /// (base_dir then falls back to $TMPDIR) rather than a directory the
    /// agent fails to make.
    #[test]
    fn an_xdg_runtime_dir_missing_or_not_private_here_is_unset() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("run-user-1000");
        assert_eq!(chosen(None, Some(missing.into_os_string())), None);
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(chosen(None, Some(open.into_os_string())), None);
        let link = t.path().join("link");
        let private = tempfile::tempdir().unwrap();
        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(private.path(), &link).unwrap();
        assert_eq!(chosen(None, Some(link.into_os_string())), None);
        assert_eq!(
            chosen(None, Some(private.path().into())),
            Some(private.path().join("noyau"))
        );
    }

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
        assert_eq!(
            e.0.problem(),
            Some(&noyau_trust::Problem::TooOpen {
                mode: 0o755,
                want: 0o700
            }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 700"));
    }

    #[test]
    fn a_squatted_tmp_dir_falls_back_to_one_private_dir_of_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let usual = tmp.path().join(format!("noyau-{uid}"));
        // Free: the usual name, made 0700.
        assert_eq!(tmp_base(tmp.path(), uid).unwrap(), usual);
        std::fs::remove_dir(&usual).unwrap();

        // Taken by a symlink to a private directory of ours elsewhere.
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &usual).unwrap();
        let first = tmp_base(tmp.path(), uid).unwrap();
        assert_ne!(first, usual);
        assert!(is_private(&first), "{}", first.display());
        // Every later process finds the same fallback.
        assert_eq!(tmp_base(tmp.path(), uid).unwrap(), first);

        // Open (someone could have put sockets in it): same fallback.
        std::fs::remove_file(&usual).unwrap();
        std::fs::DirBuilder::new()
            .mode(0o777)
            .create(&usual)
            .unwrap();
        std::fs::set_permissions(&usual, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(tmp_base(tmp.path(), uid).unwrap(), first);

        // A decoy named like a fallback but open is never chosen.
        let decoy = tmp.path().join(format!("noyau-{uid}-000000"));
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&decoy)
            .unwrap();
        assert_eq!(tmp_base(tmp.path(), uid).unwrap(), first);
    }
}
