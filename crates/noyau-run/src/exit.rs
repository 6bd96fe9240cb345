//! Exit codes of `noyau run` (`noyau run --help` lists them).

/// Every cell ran (errors allowed by `--allow-errors` or a
/// `raises-exception` tag included).
pub const OK: i32 = 0;
/// A cell raised an error; the run stopped there.
pub const CELL_ERROR: i32 = 1;
/// Bad input or usage: unreadable or malformed notebook, bad parameter,
/// unknown kernelspec, unwritable output.
pub const BAD_INPUT: i32 = 2;
/// The kernel died during the run.
pub const KERNEL_DIED: i32 = 3;
/// A cell ran longer than `--timeout`.
pub const TIMEOUT: i32 = 4;
/// The kernel could not be started (or not within `--start-timeout`).
pub const KERNEL_START: i32 = 5;
/// The batch job reached (or was about to reach) its walltime: the run
/// stopped, every finished cell saved, the running cell marked.
pub const WALLTIME: i32 = 6;
/// Stopped by SIGINT (Ctrl-C) / SIGTERM; the output was saved first.
pub const SIGINT: i32 = 130;
pub const SIGTERM: i32 = 143;
