//! Where noyau keeps what outlives a process: its state directory (job
//! logs, detached runs' progress, Dask clusters, OAR's job files), and the
//! private (0700 / 0600) directories and files made there, and the tail of
//! a job log read without trusting what is at its path.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use noyau_trust::{Expect, Mode, Owner};
use noyau_vars::EnvVars;

use crate::SchedError;

/// noyau's state directory: `$XDG_STATE_HOME/noyau` (default
/// `~/.local/state/noyau`), which a cluster's compute nodes see when home
/// directories are shared.
pub fn state_dir() -> PathBuf {
    state_dir_from(
        std::env::var_os(EnvVars::XDG_STATE_HOME),
        std::env::var_os(EnvVars::HOME),
    )
}

/// [`state_dir`] from these variables' values. An XDG_STATE_HOME or a
/// HOME that is empty or relative is ignored: it would put the state
/// under the working directory, wherever that is (the XDG spec says so of
/// its variables).
fn state_dir_from(xdg_state: Option<OsString>, home: Option<OsString>) -> PathBuf {
    noyau_vars::absolute(xdg_state)
        .or_else(|| noyau_vars::absolute(home).map(|h| h.join(".local/state")))
        .map(|d| d.join("noyau"))
        .unwrap_or_else(tmp_state_dir)
}

/// The state directory when there is no home (a job or service started
/// with an empty environment): one of this user's name in /tmp, where
/// anyone may have made it first. [`private_dir`] checks it itself before
/// making anything in it, rather than refusing to run without
/// `XDG_STATE_HOME`: the checks make it as safe as a home directory.
fn tmp_state_dir() -> PathBuf {
    std::env::temp_dir().join(format!("noyau-{}", nix::unistd::geteuid()))
}

/// Where a user's processes on this host share their scheduler listings:
/// `$XDG_RUNTIME_DIR/noyau/listings` (local, private: the session's) when
/// that is a directory of this user's only, else `STATE/listings`.
pub(crate) fn listings_dir() -> PathBuf {
    host_dir("listings")
}

/// `$XDG_RUNTIME_DIR/noyau/NAME` when that runtime directory is this
/// user's only, else `STATE/NAME`: what a user's processes on this host
/// share (listings, submission slots).
pub(crate) fn host_dir(name: &str) -> PathBuf {
    match runtime_dir_from(std::env::var_os(EnvVars::XDG_RUNTIME_DIR)) {
        Some(d) => d.join("noyau").join(name),
        None => state_dir().join(name),
    }
}

/// The runtime directory XDG_RUNTIME_DIR's value names, if it is absolute
/// (a relative one is ignored, as the XDG spec says) and a directory of
/// this user's only (the spec's 0700, not a link). One exported from a
/// login node into a job may not exist on the compute node, or belong to
/// someone else there: it is then unset, and callers fall back.
pub fn runtime_dir_from(xdg_runtime: Option<OsString>) -> Option<PathBuf> {
    noyau_vars::absolute(xdg_runtime).filter(|d| Expect::dir().check(d).is_ok())
}

/// Where job logs go by default: `STATE/jobs`.
pub fn log_dir() -> PathBuf {
    state_dir().join("jobs")
}

/// Makes `dir` (and its parents) and gives it mode 0700; one that is (or
/// leads to) another user's is refused, even where root could chmod it:
/// the job files written there hold secrets and are sourced by the job.
/// A symlink is followed: the user may have put their logs elsewhere.
/// In the state directory of /tmp ([`state_dir`] without a home), that
/// directory itself must first be ours, 0700 and not a link: whoever owns
/// or may write it could swap a directory below it for theirs.
pub fn private_dir(dir: &Path) -> Result<(), SchedError> {
    private_dir_under(&tmp_state_dir(), dir)
}

/// [`private_dir`], with `tmp_state` the state directory of /tmp.
fn private_dir_under(tmp_state: &Path, dir: &Path) -> Result<(), SchedError> {
    if dir.starts_with(tmp_state) {
        Expect::dir().make_dir(tmp_state)?;
    }
    Ok(Expect::dir()
        .mode(Mode::Set(0o700))
        .follow_links()
        .make_dir(dir)?)
}

/// How a lock file is opened: read-write, made 0600 where missing, never
/// emptied (another process may hold it).
pub(crate) fn lock_file() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600);
    o
}

/// Whether `path` still names the open file `f` (same device and inode):
/// a lock taken on a file removed since it was opened (by its holder, or
/// as a killed waiter's) keeps no one else out.
pub(crate) fn still_at(path: &Path, f: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(path), f.metadata()) {
        (Ok(p), Ok(f)) => p.dev() == f.dev() && p.ino() == f.ino(),
        _ => false,
    }
}

/// A lock on a file that is removed when the lock is let go, while still
/// held: no other process takes the file for one left by a killed holder
/// meanwhile, and files do not pile up. Safe because a waiter checks,
/// once it holds a lock, that the path still names the file it locked
/// ([`still_at`]).
#[derive(Debug)]
pub(crate) struct RemovedLock {
    path: PathBuf,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl RemovedLock {
    pub(crate) fn new(path: PathBuf, lock: nix::fcntl::Flock<std::fs::File>) -> RemovedLock {
        RemovedLock { path, _lock: lock }
    }

    #[cfg(test)]
    pub(crate) fn file(&self) -> &std::fs::File {
        &self._lock
    }
}

impl Drop for RemovedLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Calls `attempt` until it holds what it tries for (`Ok`), each call in a
/// blocking thread (a lock on a network filesystem may hang), sleeping
/// between calls from 5 ms doubling to `max_pause`. No thread is held
/// while it waits, so a caller dropped (a process ending) gives the wait
/// up. A call that fails gives back its state (the open lock files) for
/// the next. None: `deadline` passed, or the blocking thread failed.
/// The backoff favours a newcomer over a caller that has waited long (it
/// tries more often): the submission slots, waited for without a
/// deadline, order their waiters themselves (`throttle::queue`).
pub(crate) async fn poll_lock<S: Send + 'static, T: Send + 'static>(
    mut state: S,
    attempt: fn(S) -> Result<T, S>,
    max_pause: std::time::Duration,
    deadline: Option<tokio::time::Instant>,
) -> Option<T> {
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        state = match tokio::task::spawn_blocking(move || attempt(state))
            .await
            .ok()?
        {
            Ok(held) => return Some(held),
            Err(back) => back,
        };
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(max_pause);
    }
}

/// Writes `path` afresh with `mode`, never through a link (one planted
/// there, or another user's file, is refused).
pub(crate) fn write_private(path: &Path, text: &str, mode: u32) -> Result<(), SchedError> {
    use std::io::Write;
    noyau_trust::create_private(path, mode)?
        .write_all(text.as_bytes())
        .map_err(|source| SchedError::Io {
            what: "cannot write",
            path: path.into(),
            source,
        })
}

/// The last `lines` lines (from its last `max_bytes`) of the log at
/// `path`, or None when it is not a regular file of `uid`'s (blocking).
/// Anyone may have planted something at a log's path: a FIFO (opening it
/// would wait for a writer), a link to a file they may not read, another
/// user's file. So it is opened without following links or blocking, and
/// checked on the open file.
pub fn tail_log(
    path: &Path,
    uid: u32,
    max_bytes: u64,
    lines: usize,
) -> std::io::Result<Option<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let log = Expect::file()
        .owner(Owner::Uid(uid, "the job's user"))
        .mode(Mode::Any);
    let mut f = match log.open(path) {
        Ok(f) => f,
        Err(noyau_trust::TrustError::Io { source, .. }) => return Err(source),
        Err(_) => return Ok(None),
    };
    let meta = f.metadata()?;
    f.seek(SeekFrom::Start(meta.len().saturating_sub(max_bytes)))?;
    let mut text = Vec::new();
    f.take(max_bytes).read_to_end(&mut text)?;
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    Ok(Some(all[all.len().saturating_sub(lines)..].join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_relative_home_is_no_home() {
        let tmp = tmp_state_dir();
        assert_eq!(state_dir_from(None, Some("".into())), tmp);
        assert_eq!(state_dir_from(Some("".into()), Some("".into())), tmp);
        assert_eq!(state_dir_from(None, Some("rel".into())), tmp);
        assert_eq!(state_dir_from(None, None), tmp);
        assert_eq!(
            state_dir_from(None, Some("/home/u".into())),
            Path::new("/home/u/.local/state/noyau")
        );
        assert_eq!(
            state_dir_from(Some("/s".into()), Some("".into())),
            Path::new("/s/noyau")
        );
    }

    #[test]
    fn a_relative_xdg_state_home_is_ignored() {
        let home = Some("/home/u".into());
        let want = Path::new("/home/u/.local/state/noyau");
        for rel in ["state", "./state", "../s", "~/s"] {
            assert_eq!(state_dir_from(Some(rel.into()), home.clone()), want);
        }
        assert_eq!(state_dir_from(Some("rel".into()), None), tmp_state_dir());
    }

    /// A private directory of ours named by a relative path (from the
    /// working directory) is not the runtime directory; by its absolute
    /// path it is.
    #[test]
    fn a_relative_xdg_runtime_dir_is_ignored() {
        let t = tempfile::tempdir().unwrap();
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o700);
        std::fs::set_permissions(t.path(), private).unwrap();
        let up = std::env::current_dir().unwrap().components().count() - 1;
        let rel = "../".repeat(up) + t.path().to_str().unwrap().trim_start_matches('/');
        assert!(Path::new(&rel).is_dir() && Path::new(&rel).is_relative());
        assert_eq!(runtime_dir_from(Some(rel.into())), None);
        assert_eq!(
            runtime_dir_from(Some(t.path().into())).as_deref(),
            Some(t.path())
        );
        assert_eq!(runtime_dir_from(Some("".into())), None);
    }

    #[test]
    fn another_users_directory_is_not_private_even_for_root() {
        let t = tempfile::tempdir().unwrap();
        private_dir(&t.path().join("new/sub")).unwrap();
        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        if !nix::unistd::geteuid().is_root() {
            // (only root can give a directory away; scripts/test runs as root)
            assert!(
                std::env::var_os("CI").is_none(),
                "this test needs root under CI"
            );
            return;
        }
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&theirs, &link).unwrap();
        for d in [&theirs, &link] {
            let e = private_dir(d).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534, not to you"), "{e}");
        }
    }

    #[test]
    fn a_tmp_state_dir_planted_by_another_user_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("noyau-1000");
        private_dir_under(&state, &state.join("slurm")).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        // Open to others (made so by an older noyau or the umask): refused,
        // since someone may already have swapped what is inside.
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let e = private_dir_under(&state, &state.join("slurm"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode 0777"), "{e}");
        // A link to a private directory of ours: refused as well.
        let planted = t.path().join("planted");
        std::os::unix::fs::symlink(t.path().join("elsewhere"), &planted).unwrap();
        private_dir(&t.path().join("elsewhere")).unwrap();
        let e = private_dir_under(&planted, &planted.join("slurm"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a symlink"), "{e}");
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "this test needs root under CI"
            );
            return;
        }
        // Another user's, as anyone may make it first in /tmp.
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
        let e = private_dir_under(&state, &state.join("slurm"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("belongs to uid 65534, not to you"), "{e}");
        // A directory elsewhere is not affected.
        private_dir_under(&state, &t.path().join("other")).unwrap();
    }
}
