//! When the output notebook is written.
//!
//! papermill rewrites the whole file at every cell start and end, which
//! dominates the run time of notebooks of many small cells. noyau saves
//! less often but with a bound on what can be lost: a finished cell is
//! saved at once if the last save is at least [`MIN_GAP`] old, else by a
//! timer at most [`MIN_GAP`] later (so it is on disk within a second), and
//! a running cell's new output at least every [`PARTIAL_EVERY`]. Every save
//! is an atomic replace, so the file is always a complete notebook.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use noyau_notebook::Notebook;

pub const MIN_GAP: Duration = Duration::from_millis(500);
pub const PARTIAL_EVERY: Duration = Duration::from_secs(3);

pub struct Saver {
    /// `None`: the notebook goes to stdout at the end.
    path: Option<PathBuf>,
    last: Instant,
    due: Option<Instant>,
    warned: bool,
}

impl Saver {
    pub fn new(path: Option<PathBuf>) -> Saver {
        Saver {
            path,
            last: Instant::now(),
            due: None,
            warned: false,
        }
    }

    /// When the next timed save is due.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Writes now; errors are returned (the first save and the last one
    /// must succeed).
    pub fn save(&mut self, nb: &Notebook) -> Result<(), String> {
        self.due = None;
        self.last = Instant::now();
        match &self.path {
            Some(p) => nb
                .save(p)
                .map_err(|e| format!("{e} (check the directory exists and is writable)")),
            None => Ok(()),
        }
    }

    /// A save during the run: a failure is a warning (the run goes on).
    fn save_soft(&mut self, nb: &Notebook) {
        if let Err(e) = self.save(nb) {
            if !self.warned {
                eprintln!("noyau: warning: {e}; will retry");
                self.warned = true;
            }
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
