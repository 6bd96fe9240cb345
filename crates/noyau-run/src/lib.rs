//! `noyau run`: a notebook run headless, papermill-compatible, durable.
//!
//! The runner is a frontend of a kernel that a backend started: it uses the
//! same agent and link as the proxy kernel (`noyau_client::remote`), so a
//! run on a laptop and a run in a batch job take the same path.
//!
//! How the pieces fit, in the order of a run:
//!
//! * [`options`]: what a run is asked to do ([`RunOptions`], which the
//!   binary's command line fills) and the documented [`exit`] codes;
//!   parameters merged like papermill's CLI (`-f`, `-y`, `-p`, `-r`), YAML
//!   typed by [`yaml`] the way PyYAML types it. [`RunError`] is the one
//!   error type, with the exit code each error means.
//! * [`input`]: the input (a file or stdin), nbformat 3 and 4.0–4.4 made
//!   current by [`upgrade`] without losing fields; then parameters
//!   injected (`noyau_notebook::inject`) and [`papermill`]'s notebook and
//!   cell metadata laid out as papermill does.
//! * [`environment`]: the kernel's environment and data files, built and
//!   fetched here before the job is submitted, and recorded.
//! * [`kernel`]: which kernelspec (with [`kernelenv`], a managed Python
//!   kernel when there is none), the backend and profile, the start.
//! * [`runner`]: the run from end to end; [`detach`]: `--detach`, the
//!   runner submitted as the batch job.
//! * `cells` and `execute`: the cells in order, each ended like nbclient
//!   ends it (`execute_reply` and IOPub `idle`), with nbclient's
//!   `metadata.execution` timings (`outputs`), papermill's statuses and
//!   error markers, kernel death, timeouts, SIGINT/SIGTERM, walltime.
//! * `magics`: every `%noyau` magic, through noyau-magic's host seam;
//!   `%%noyau on` cells on their targets' kernels.
//! * [`save`]: when the output is written: atomically, soon after each
//!   cell, and every few seconds during a long one, never on every message.
//! * [`progress`]: the bar or the plain lines on stderr.
//! * [`sweep`]: one notebook over a parameter set (a job array).

mod cells;
pub mod detach;
pub mod environment;
mod error;
mod execute;
pub mod exit;
pub mod input;
pub mod kernel;
pub mod kernelenv;
mod magics;
pub mod options;
mod outputs;
pub mod papermill;
pub mod progress;
pub mod runner;
pub mod save;
pub mod sweep;
pub mod upgrade;
mod widgets;
pub mod yaml;

use tokio::signal::unix::{signal, SignalKind};

pub use error::RunError;
pub use options::RunOptions;
pub use sweep::{SweepOptions, SweepTask};

/// An error as printed: it may quote a notebook, a parameter file or a
/// kernel, so its lines go without escape sequences or controls.
pub fn shown(e: &dyn std::fmt::Display) -> String {
    noyau_text::for_terminal(&e.to_string(), noyau_text::Keep::Lines)
}

/// `f`, then the wait for the submissions still under way
/// ([`noyau_sched::settled_or`]), which can last until the scheduler
/// answers (two command timeouts): said on stderr, and a second Ctrl-C
/// leaves at once, saying how to find a job then left.
async fn settled<F: std::future::Future>(f: F) -> F::Output {
    let notice = || {
        eprintln!(
            "noyau: waiting for the scheduler to answer a submission, to cancel the job it gives; Ctrl-C again to leave now"
        )
    };
    // Made once the wait begins: a Ctrl-C that ended `f` is not this one.
    let leave = async {
        let Ok(mut int) = signal(SignalKind::interrupt()) else {
            return std::future::pending().await;
        };
        int.recv().await;
        eprintln!(
            "noyau: warning: left without the scheduler's answer: a job it gives is not cancelled; `noyau ps` lists your noyau jobs, `noyau cancel ID` cancels one"
        );
    };
    noyau_sched::settled_or(f, notice, leave).await
}

/// Runs `noyau run` to the end; returns the process exit code. Errors are
/// printed to stderr here.
pub fn main(mut opts: RunOptions) -> i32 {
    // (before the runtime's threads: it changes the environment)
    if let Err(e) = detach::take_parameters(&mut opts) {
        eprintln!("noyau run: error: {}", shown(&e));
        return e.code();
    }
    let _input_copy = detach::take_input(&mut opts);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("noyau run: cannot start: {e}");
            return exit::KERNEL_START;
        }
    };
    match rt.block_on(settled(runner::run(opts))) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("noyau run: error: {}", shown(&e));
            e.code()
        }
    }
}
