//! When the output notebook is written.
//!
//! papermill rewrites the whole file at every cell start and end, which
//! dominates the run time of notebooks of many small cells. noyau saves
//! less often but with a bound on what can be lost: a finished cell is
//! saved at once if the last save is at least [`MIN_GAP`] old, else by a
//! timer at most [`MIN_GAP`] later (so it is on disk within a second), and
//! a running cell's new output at least every [`PARTIAL_EVERY`]. Every save
//! is an atomic replace, so the file is always a complete notebook (a full
//! disk fails the save and leaves the previous one in place).
//!
//! One run owns its output: [`OutputLock`] refuses a second run writing the
//! same file, whose saves would otherwise replace ours turn about.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use noyau_notebook::Notebook;
use noyau_trust::{Expect, Mode, Problem, TrustError};

use crate::error::{bad, untrusted, RunError};

/// An exclusive `flock` on `.OUTPUT.noyau-lock` next to the output, held for
/// the whole run. The output itself cannot carry the lock: every atomic save
/// replaces its inode. A lock file next to it is seen by runs on other nodes
/// sharing the filesystem (flock works across nodes on NFSv4, Lustre, GPFS).
/// The output's directory may be shared with other users, who could put
/// anything at the lock's path: it is used only as a regular file of ours
/// with no other name, opened without following a link or waiting on a
/// FIFO, and made 0600 (others could hold the lock of a file they can read).
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    _file: File,
}

impl OutputLock {
    pub fn acquire(output: &Path) -> Result<OutputLock, RunError> {
        let name = output
            .file_name()
            .ok_or_else(|| bad(format!("the output {} names no file", output.display())))?
            .to_string_lossy();
        let path = output.with_file_name(format!(".{name}.noyau-lock"));
        let err = |e: std::io::Error| RunError::io("cannot lock the output with", &path)(e);
        let refused = || {
            untrusted(format!(
                "cannot lock the output {} (another user may be writing it, or have put \
                 something in its place; or name another output)",
                output.display()
            ))
        };
        loop {
            let mut file = Expect::file()
                .mode(Mode::Any)
                .open_with(
                    &path,
                    OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .read(true)
                        .write(true)
                        .mode(0o600),
                )
                .map_err(refused())?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EWOULDBLOCK) => return Err(busy(output, &mut file)),
                    _ => return Err(err(e)),
                }
            }
            // The last holder removes the file before unlocking it: a lock
            // taken on a removed file protects nothing, take the new one.
            let (ours, now) = (
                file.metadata().map_err(err)?,
                std::fs::symlink_metadata(&path),
            );
            if !now.is_ok_and(|m| m.ino() == ours.ino() && m.dev() == ours.dev()) {
                continue;
            }
            // Another name for it (a hard link to a file of ours elsewhere)
            // would be emptied below.
            if ours.nlink() != 1 {
                let problem = Problem::HardLinked {
                    links: ours.nlink(),
                };
                return Err(refused()(TrustError::Refused { path, problem }));
            }
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default();
            let _ = file
                .set_permissions(std::fs::Permissions::from_mode(0o600))
                .and_then(|()| file.set_len(0))
                .and_then(|()| {
                    write!(
                        file,
                        "pid {} on {host}, since {}",
                        std::process::id(),
                        chrono::Local::now().format("%Y-%m-%d %H:%M:%S")
                    )
                });
            return Ok(OutputLock { path, _file: file });
        }
    }
}

/// The error of a run that finds `output` locked: who holds it, as the
/// holder wrote in the lock file (read from the file opened, not the path).
fn busy(output: &Path, lock: &mut File) -> RunError {
    let mut holder = String::new();
    let _ = lock.take(512).read_to_string(&mut holder);
    let holder = holder.trim();
    RunError::Busy {
        output: output.to_path_buf(),
        holder: if holder.is_empty() {
            String::new()
        } else {
            format!(" ({holder})")
        },
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked (the file closes after this).
        let _ = std::fs::remove_file(&self.path);
    }
}

pub const MIN_GAP: Duration = Duration::from_millis(500);
pub const PARTIAL_EVERY: Duration = Duration::from_secs(3);

pub struct Saver {
    /// `None`: the notebook goes to stdout at the end.
    path: Option<PathBuf>,
    _lock: Option<OutputLock>,
    last: Instant,
    due: Option<Instant>,
    warned: bool,
}

impl Saver {
    /// Fails when another run holds the output.
    pub fn new(path: Option<PathBuf>) -> Result<Saver, RunError> {
        let lock = path.as_deref().map(OutputLock::acquire).transpose()?;
        Ok(Saver {
            path,
            _lock: lock,
            last: Instant::now(),
            due: None,
            warned: false,
        })
    }

    /// When the next timed save is due.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Writes now; errors are returned (the first save and the last one
    /// must succeed).
    pub fn save(&mut self, nb: &Notebook) -> Result<(), RunError> {
        self.due = None;
        self.last = Instant::now();
        match &self.path {
            Some(p) => nb.save(p).map_err(|source| RunError::Save { source }),
            None => Ok(()),
        }
    }

    /// A save during the run: a failure is a warning (the run goes on, and
    /// the file keeps the last save that succeeded).
    fn save_soft(&mut self, nb: &Notebook) {
        match self.save(nb) {
            Err(e) if !self.warned => {
                eprintln!("noyau: warning: {e}; the file keeps the last complete save; will retry");
                self.warned = true;
            }
            Err(_) => {}
            Ok(()) if self.warned => {
                eprintln!("noyau: saving works again");
                self.warned = false;
            }
            Ok(()) => {}
        }
    }

    /// A cell finished.
    pub fn cell_finished(&mut self, nb: &Notebook) {
        if self.path.is_none() {
            return;
        }
        let next = self.last + MIN_GAP;
        if Instant::now() >= next {
            self.save_soft(nb);
        } else {
            self.due = Some(self.due.map_or(next, |d| d.min(next)));
        }
    }

    /// The running cell has new output.
    pub fn output_changed(&mut self) {
        if self.path.is_none() {
            return;
        }
        let next = (self.last + PARTIAL_EVERY).max(self.last + MIN_GAP);
        self.due = Some(self.due.map_or(next, |d| d.min(next)));
    }

    /// The timer fired.
    pub fn on_due(&mut self, nb: &Notebook) {
        self.save_soft(nb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use noyau_trust::testing::root;

    fn lock_path(dir: &Path) -> PathBuf {
        dir.join(".out.ipynb.noyau-lock")
    }

    /// What another run holding the output sees, from the file's content;
    /// the lock is the user's alone (0600) and goes with its run.
    #[test]
    fn a_second_run_on_the_same_output_is_told_who_holds_it() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out.ipynb");
        let first = OutputLock::acquire(&out).unwrap();
        let mode = std::fs::metadata(lock_path(t.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = OutputLock::acquire(&out).unwrap_err();
        assert!(matches!(e, RunError::Busy { .. }), "{e}");
        let pid = format!("(pid {} on ", std::process::id());
        assert!(e.to_string().contains(&pid), "{e}");
        drop(first);
        assert!(!lock_path(t.path()).exists());
        OutputLock::acquire(&out).unwrap();
    }

    /// A link (to a file of the user's) or a hard link planted at the lock's
    /// path: refused, naming it, and the file it leads to is left as it was.
    #[test]
    fn a_link_at_the_lock_path_is_refused_and_its_target_kept() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out.ipynb");
        let canary = t.path().join("authorized_keys");
        std::fs::write(&canary, "the user's key\n").unwrap();
        std::os::unix::fs::symlink(&canary, lock_path(t.path())).unwrap();
        let e = OutputLock::acquire(&out).unwrap_err();
        assert!(matches!(e, RunError::Untrusted { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains(".out.ipynb.noyau-lock is a symlink"),
            "{text}"
        );
        assert!(text.contains("name another output"), "{text}");
        std::fs::remove_file(lock_path(t.path())).unwrap();
        std::fs::hard_link(&canary, lock_path(t.path())).unwrap();
        let e = OutputLock::acquire(&out).unwrap_err();
        assert!(e.to_string().contains("has 2 names (hard links)"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&canary).unwrap(),
            "the user's key\n"
        );
    }

    /// A FIFO at the lock's path, held open and locked by another user's
    /// process: refused at once (reading the holder from it would wait
    /// forever).
    #[test]
    fn a_fifo_at_the_lock_path_is_refused_without_waiting() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out.ipynb");
        let fifo = lock_path(t.path());
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Read-write: opening does not wait for the other end.
        let held = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(
            unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(
                OutputLock::acquire(&out)
                    .map(drop)
                    .map_err(|e| e.to_string()),
            );
        });
        let got = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("acquiring the lock waited on the FIFO");
        let e = got.unwrap_err();
        assert!(e.contains("is a FIFO, not a regular file"), "{e}");
    }

    /// Another user's file at the lock's path (they hold it, or planted it):
    /// refused naming its owner, never emptied, even by root.
    #[test]
    fn another_users_lock_file_is_refused_and_kept() {
        if !root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out.ipynb");
        let theirs = lock_path(t.path());
        std::fs::write(&theirs, "theirs").unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let e = OutputLock::acquire(&out).unwrap_err();
        assert!(
            e.to_string().contains("noyau-lock belongs to uid 65534"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "theirs");
    }
}
