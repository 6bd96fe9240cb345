//! The cells in order ([`Runner::run_cells`]), each ended like nbclient
//! ends it, and what a cell's end means for the run: papermill's statuses
//! and error markers, the exit code, whether the kernel is still there.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Instant;

use noyau_client::remote::{KernelMessage, RemoteKernel};
use noyau_magic::dask::KernelSide;
use noyau_magic::{Magic, Magics};
use noyau_notebook::{Notebook, OutputBuilder};
use noyau_text::{for_terminal, Keep};
use serde_json::json;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::detach::StatusFile;
use crate::error::RunError;
use crate::exit;
use crate::options::RunOptions;
use crate::papermill as pm;
use crate::progress::Progress;
use crate::save::Saver;

/// How a cell ended.
pub(crate) enum CellEnd {
    Ok,
    Error {
        ename: String,
        evalue: String,
    },
    Died(String),
    Timeout(f64),
    Signal(&'static str, i32),
    /// The job's walltime is near (the scheduler's early signal) or reached.
    Walltime {
        job: String,
        seconds_left: Option<u64>,
    },
}

/// The signals that stop a run.
pub(crate) struct Signals {
    int: Signal,
    term: Signal,
    /// The scheduler's early walltime signal, when this runner is itself
    /// the batch job (a sweep task, a detached run): Slurm's
    /// `--signal=B:USR1@…`, Grid Engine's SIGUSR2 (also its cancel).
    walltime: Signal,
    job: Option<noyau_sched::Scheduler>,
}

impl Signals {
    pub fn new() -> Result<Signals, RunError> {
        let mk = |k| signal(k).map_err(|e| RunError::Input(format!("cannot handle signals: {e}")));
        let job = noyau_sched::this_job().map(|(s, _)| s);
        let walltime = job.as_ref().map_or(libc::SIGUSR1, |s| s.walltime_signal());
        Ok(Signals {
            int: mk(SignalKind::interrupt())?,
            term: mk(SignalKind::terminate())?,
            walltime: mk(SignalKind::from_raw(walltime))?,
            job,
        })
    }

    pub async fn recv(&mut self) -> (&'static str, i32) {
        tokio::select! {
            _ = self.int.recv() => ("SIGINT", exit::SIGINT),
            _ = self.term.recv() => ("SIGTERM", exit::SIGTERM),
            _ = self.walltime.recv() => match &self.job {
                Some(s) if s.signal_means_cancel() => ("a cancel of the batch job", exit::SIGTERM),
                _ => ("the walltime signal (the job's walltime is near)", exit::WALLTIME),
            },
        }
    }
}

/// The notebook being written, and what writes it.
pub(crate) struct Doc {
    pub nb: Notebook,
    pub builder: OutputBuilder,
    pub saver: Saver,
    pub progress: Progress,
    pub status: StatusFile,
}

impl Doc {
    pub fn new(
        nb: Notebook,
        saver: Saver,
        mode: noyau_notebook::StreamMode,
        progress: Progress,
    ) -> Doc {
        Doc {
            builder: OutputBuilder::new(mode),
            progress,
            status: StatusFile::new(nb.cells.len()),
            nb,
            saver,
        }
    }

    /// Records an error noyau itself raised for cell `i`.
    pub fn cell_error(&mut self, i: usize, ename: &str, evalue: String) -> CellEnd {
        self.nb.cells[i]
            .outputs_mut()
            .push(noyau_error_output(ename, &evalue));
        CellEnd::Error {
            ename: ename.into(),
            evalue,
        }
    }
}

/// The kernels a run drives: the notebook's, and its targets'.
pub(crate) struct Kernels {
    pub main: RemoteKernel,
    /// Kernels of `%%noyau on` targets, started on first use.
    pub targets: BTreeMap<String, RunTarget>,
}

/// Which kernel a cell runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum On {
    Main,
    Target(String),
}

impl Kernels {
    pub fn get(&mut self, on: &On) -> Option<&mut RemoteKernel> {
        match on {
            On::Main => Some(&mut self.main),
            On::Target(name) => self.targets.get_mut(name).map(|t| &mut t.kernel),
        }
    }
}

pub(crate) struct Runner<'a> {
    pub doc: Doc,
    pub kernels: Kernels,
    pub opts: &'a RunOptions,
    /// The next cell's request, already sent so the kernel never waits for
    /// us between cells: (cell index, msg_id).
    pub ahead: Option<(usize, String)>,
    /// Messages for the request sent ahead that came before its turn.
    pub early: VecDeque<KernelMessage>,
    /// The notebook has magics: no cell is sent ahead.
    pub delegating: bool,
    /// The batch job and when it ends, once a walltime warning said so.
    pub walltime: Option<(String, Instant)>,
    pub magics: Magics<usize>,
    /// What the magics need of the run (`dask up`'s defaults, the record).
    pub ctx: Context,
    /// The notebook's execution counts (a target's cells take its own).
    pub counts: crate::outputs::Counts,
    /// ipywidgets' state, saved in the notebook's metadata after each cell.
    pub widgets: crate::widgets::Widgets,
}

/// A target's kernel, and when it last ran a cell.
pub(crate) struct RunTarget {
    pub kernel: RemoteKernel,
    pub last_used: Instant,
}

/// What the magics need of the run.
pub(crate) struct Context {
    /// The notebook's kernelspec (a target's default).
    pub kernel_name: String,
    /// Where the notebook's kernel runs (`dask up` without `--target`).
    pub side: KernelSide,
    /// msg_ids of the magics' own requests still waiting for a reply.
    pub own: HashSet<String>,
    /// The environment and data files prepared before the kernel started
    /// (`%noyau data` cells are answered from it; targets get its data).
    pub prepared: noyau_env::Prepared,
    /// The notebook's directory, anchored when it was read: what its
    /// cells may do is judged by it (`%%noyau on T key=value`, `--env`),
    /// and `%noyau env lock` writes there. Not the working directory,
    /// which is the user's (a trusted project run on someone else's
    /// notebook would lend it its trust).
    pub project: noyau_trust::anchor::ProjectDir,
}

pub(crate) fn runnable(cell: &noyau_notebook::Cell) -> bool {
    cell.is_code() && !cell.source.trim().is_empty() && !cell.has_tag("skip-execution")
}

/// Why a run stops: its exit code, whether the kernel lives on, and the
/// stop marker's reason (a signal or the walltime).
struct Stop {
    code: i32,
    alive: bool,
    marker: Option<String>,
}

impl Runner<'_> {
    /// Returns (exit code, whether the kernel is still alive).
    pub async fn run_cells(
        &mut self,
        signals: &mut Signals,
        run_start: chrono::DateTime<chrono::Utc>,
    ) -> (i32, bool) {
        let total = self.doc.nb.cells.len();
        for i in 0..total {
            let start = chrono::Utc::now();
            pm::cell_start(&mut self.doc.nb.cells[i], &pm::iso(start));
            if !runnable(&self.doc.nb.cells[i]) {
                pm::cell_complete(&mut self.doc.nb.cells[i], start);
                self.doc.progress.cell_done();
                self.doc.status.cell_done();
                continue;
            }
            self.doc
                .progress
                .cell_start(i, total, &self.doc.nb.cells[i].source);
            let stop = self.run_one(signals, i).await;
            self.widgets.save(&mut self.doc.nb);
            pm::cell_complete(&mut self.doc.nb.cells[i], start);
            self.doc.progress.cell_done();
            self.doc.status.cell_done();
            if let Some(stop) = stop {
                let exec_count = self.doc.nb.cells[i].execution_count();
                pm::notebook_complete(&mut self.doc.nb, run_start, false);
                if let Some(name) = stop.marker {
                    pm::add_stop_marker(&mut self.doc.nb, &name, Some((i, exec_count)));
                } else if stop.code != exit::OK {
                    pm::add_error_markers(&mut self.doc.nb, i, exec_count);
                }
                return (stop.code, stop.alive);
            }
            self.doc.saver.cell_finished(&self.doc.nb);
        }
        pm::notebook_complete(&mut self.doc.nb, run_start, true);
        (exit::OK, true)
    }

    /// Runs cell `i`; why the run stops there, if it does.
    async fn run_one(&mut self, signals: &mut Signals, i: usize) -> Option<Stop> {
        let may_raise = self.opts.allow_errors || self.doc.nb.cells[i].has_tag("raises-exception");
        let end = match noyau_magic::parse(&self.doc.nb.cells[i].source) {
            Ok(Magic::None) => self.run_cell(On::Main, signals, i, may_raise, None).await,
            Ok(Magic::On(m, body)) => self.run_on_target(m, body, signals, i, may_raise).await,
            Ok(Magic::Line(cmd)) => self.run_magic(cmd, signals, i).await,
            Err(usage) => self.doc.cell_error(i, usage.ename(), usage.to_string()),
        };
        self.stop_for(end, i, may_raise)
    }

    /// What a cell's end means for the run.
    fn stop_for(&mut self, end: CellEnd, i: usize, may_raise: bool) -> Option<Stop> {
        let exec_count = self.doc.nb.cells[i].execution_count();
        let (code, alive, marker, error) = match end {
            CellEnd::Ok => return None,
            CellEnd::Error { ename, evalue } => {
                let sys_exit = ename == "SystemExit" && (evalue.is_empty() || evalue == "0");
                if may_raise && !sys_exit {
                    return None;
                }
                if sys_exit {
                    (exit::OK, true, None, None)
                } else {
                    // The kernel's text: one line, no escape sequence.
                    eprintln!(
                        "noyau: cell {} (In [{}]) raised {}: {}",
                        i + 1,
                        exec_count.map_or("None".into(), |n| n.to_string()),
                        for_terminal(&ename, Keep::Nothing),
                        for_terminal(&evalue, Keep::Nothing)
                    );
                    (exit::CELL_ERROR, true, None, None)
                }
            }
            CellEnd::Died(desc) => {
                eprintln!("noyau: cell {} : the kernel died: {desc}", i + 1);
                let error = ("DeadKernelError", format!("Kernel died: {desc}"));
                (exit::KERNEL_DIED, false, None, Some(error))
            }
            CellEnd::Timeout(secs) => {
                let text = format!("Cell execution timed out after {secs} s (--timeout)");
                eprintln!("noyau: cell {}: {text}", i + 1);
                let alive = !self.kernels.main.is_dead();
                (exit::TIMEOUT, alive, None, Some(("CellTimeoutError", text)))
            }
            CellEnd::Signal(name, code) => {
                eprintln!("noyau: {name}: saving the output and stopping");
                (code, false, Some(name.to_string()), None)
            }
            CellEnd::Walltime { job, seconds_left } => {
                let when = seconds_left.map_or(String::new(), |s| format!(" (in about {s} s)"));
                let text = format!(
                    "walltime reached: the batch job {job} ends at its time limit{when}; \
                     noyau stopped the run and saved every finished cell"
                );
                eprintln!("noyau: cell {}: {text}", i + 1);
                let marker = Some(format!("the walltime of batch job {job}"));
                (exit::WALLTIME, false, marker, Some(("WalltimeError", text)))
            }
        };
        pm::cell_exception(&mut self.doc.nb, i);
        if let Some((ename, text)) = error {
            self.doc.nb.cells[i]
                .outputs_mut()
                .push(noyau_error_output(ename, &text));
        }
        Some(Stop {
            code,
            alive,
            marker,
        })
    }
}

/// An `error` output for a failure noyau itself detected (not the kernel's),
/// with a one-line traceback so frontends that only show tracebacks show it.
pub(crate) fn noyau_error_output(ename: &str, evalue: &str) -> serde_json::Value {
    json!({
        "output_type": "error", "ename": ename, "evalue": evalue,
        "traceback": [format!("{ename}: {evalue}")],
    })
}

/// `9 min 58 s`.
pub(crate) fn human(secs: u64) -> String {
    match (secs / 60, secs % 60) {
        (0, s) => format!("{s} s"),
        (m, 0) => format!("{m} min"),
        (m, s) => format!("{m} min {s} s"),
    }
}

pub(crate) async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
