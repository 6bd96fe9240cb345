//! `noyau run`: a notebook run headless, papermill-compatible, durable.
//!
//! The runner is a frontend of a kernel that a backend started: it uses the
//! same agent and link as the proxy kernel (`noyau_client::remote`), so a
//! run on a laptop and a run in a batch job take the same path.
//!
//! How the pieces fit, in the order of a run:
//!
//! * [`options`]: the command line ([`RunArgs`]) and the documented
//!   [`exit`] codes; parameters merged like papermill's CLI (`-f`, `-y`,
//!   `-p`, `-r`), YAML typed by [`yaml`] the way PyYAML types it.
//! * [`runner::read_input`]: the input (a file or stdin), nbformat 3 and
//!   4.0–4.4 made current by [`upgrade`] without losing fields; then
//!   parameters injected (`noyau_notebook::inject`) and [`papermill`]'s
//!   notebook and cell metadata laid out as papermill does.
//! * [`environment`]: the kernel's environment and data files, built and
//!   fetched here before the job is submitted, and recorded.
//! * [`kernelenv`]: when no `python3` kernelspec exists, a managed Python
//!   kernel in noyau's cache.
//! * [`runner`]: the cells in order, each ended like nbclient ends it
//!   (`execute_reply` and IOPub `idle`), with nbclient's
//!   `metadata.execution` timings, papermill's statuses and error markers,
//!   kernel death, timeouts, SIGINT/SIGTERM.
//! * [`save`]: when the output is written: atomically, soon after each
//!   cell, and every few seconds during a long one, never on every message.
//! * [`progress`]: the bar or the plain lines on stderr.

pub mod environment;
pub mod kernelenv;
pub mod options;
pub mod papermill;
pub mod progress;
pub mod runner;
pub mod save;
pub mod sweep;
pub mod upgrade;
pub mod yaml;

pub use options::{exit, RunArgs};
pub use sweep::{SweepArgs, SweepTaskArgs};

/// Runs `noyau run` to the end; returns the process exit code. Errors are
/// printed to stderr here.
pub fn main(args: RunArgs) -> i32 {
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
    match rt.block_on(runner::run(args)) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("noyau run: error: {}", f.message);
            f.code
        }
    }
}
