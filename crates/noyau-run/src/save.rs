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
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use noyau_notebook::Notebook;

use crate::error::{bad, RunError};

/// An exclusive `flock` on `.OUTPUT.noyau-lock` next to the output, held for
/// the whole run. The output itself cannot carry the lock: every atomic save
/// replaces its inode. A lock file next to it is seen by runs on other nodes
/// sharing the filesystem (flock works across nodes on NFSv4, Lustre, GPFS).
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
        loop {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(err)?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EWOULDBLOCK) => {
                        let holder = std::fs::read_to_string(&path).unwrap_or_default();
                        let holder = holder.trim();
                        return Err(RunError::Busy {
                            output: output.to_path_buf(),
                            holder: if holder.is_empty() {
                                String::new()
                            } else {
                                format!(" ({holder})")
                            },
                        });
                    }
                    _ => return Err(err(e)),
                }
            }
            // The last holder removes the file before unlocking it: a lock
            // taken on a removed file protects nothing, take the new one.
            let (ours, now) = (file.metadata().map_err(err)?, std::fs::metadata(&path));
            if !now.is_ok_and(|m| m.ino() == ours.ino() && m.dev() == ours.dev()) {
                continue;
            }
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default();
            let _ = file.set_len(0).and_then(|()| {
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
