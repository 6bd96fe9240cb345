//! The command lines of `noyau run`, `noyau sweep` and `noyau sweep-task`
//! (clap lives in the binary): each becomes the noyau-run library's plain
//! options.

use std::path::PathBuf;

use clap::Args;
use noyau_run::{RunOptions, SweepOptions, SweepTask};

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    every cell ran (errors allowed by --allow-errors or a raises-exception tag included)
  1    a cell raised an error; the run stopped at it (error markers added, as papermill does)
  2    bad input or usage: unreadable/malformed notebook, bad parameter, unknown kernelspec,
       unwritable output (the input file is never modified)
  3    the kernel died during the run (the running cell is marked failed)
  4    a cell ran longer than --timeout
  5    the kernel could not be started (or not within --start-timeout)
  6    walltime reached: the batch job hit (or was about to hit) its time limit; every
       finished cell is saved, the running cell has a WalltimeError and a marker is at the top
  130  interrupted by SIGINT (Ctrl-C), 143 terminated by SIGTERM: the output was saved first

The output notebook is saved atomically while the run goes on: every finished cell is on
disk within about a second, a long cell's partial output every few seconds.";

/// Run a notebook headless, with parameters, like papermill
#[derive(Args, Debug, Clone)]
#[command(after_long_help = EXIT_CODES_HELP, after_help = "Run `noyau run --help` for the exit codes.")]
pub struct RunArgs {
    /// The notebook to run (`-` reads it from stdin)
    pub input: String,
    /// Where to write the executed notebook [default: INPUT with .out.ipynb; stdout for `-`]
    /// (`-` writes to stdout)
    pub output: Option<String>,
    /// A parameter, typed like papermill (int, float, True/False, None, else string)
    #[arg(short = 'p', long = "parameters", num_args = 2, value_names = ["NAME", "VALUE"], action = clap::ArgAction::Append)]
    pub parameters: Vec<String>,
    /// A parameter kept as a string
    #[arg(short = 'r', long = "parameters-raw", alias = "parameters_raw", num_args = 2, value_names = ["NAME", "VALUE"], action = clap::ArgAction::Append)]
    pub parameters_raw: Vec<String>,
    /// A YAML file of parameters
    #[arg(short = 'f', long = "parameters-file", alias = "parameters_file", value_name = "FILE", action = clap::ArgAction::Append)]
    pub parameters_file: Vec<PathBuf>,
    /// Parameters as a YAML string
    #[arg(short = 'y', long = "parameters-yaml", alias = "parameters_yaml", value_name = "YAML", action = clap::ArgAction::Append)]
    pub parameters_yaml: Vec<String>,
    /// The language for parameters, when the notebook does not say
    #[arg(long)]
    pub language: Option<String>,
    /// The working directory of the kernel [default: the current directory]
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Copy cell output to stderr as it comes
    #[arg(long)]
    pub log_output: bool,
    /// No progress bar or progress lines
    #[arg(long)]
    pub no_progress: bool,
    /// Write the parameterised notebook without running it
    #[arg(long)]
    pub prepare_only: bool,
    /// Hide the source of code cells in the output (papermill's report mode)
    #[arg(long)]
    pub report_mode: bool,
    /// The kernel's environment: an inline TOML or JSON table
    /// (`--env '{requirements = ["six==1.16.0"]}'`) or a file (.json, or
    /// .toml with the keys at top level or under [environment]). Its keys
    /// override `[environment]` in noyau.toml next to the notebook and the
    /// notebook's `metadata.noyau.environment`. The environment used (spec,
    /// lock, lock hash) is recorded in the output's metadata.noyau.environment.
    #[arg(long, value_name = "TABLE|FILE")]
    pub env: Option<String>,
    /// Override one profile key (KEY=VALUE, env.NAME=VALUE); repeatable
    #[arg(short = 'o', long = "option", value_name = "KEY=VALUE")]
    pub options: Vec<String>,
    /// How stream output becomes notebook outputs: coalesce (one output per
    /// run of the same stream, as Jupyter frontends save), separate (one per
    /// message, like papermill), nbclient (jupyter execute --coalesce-streams)
    #[arg(long, value_name = "MODE", default_value = "coalesce")]
    pub stream_mode: String,
    /// Submit the runner itself as the batch job and return at once
    /// (`noyau ps` shows its progress); needs a batch backend
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub kernel: KernelFlags,
}

/// What `noyau run` and `noyau sweep` both take: the kernel, where it runs,
/// and its limits (each point of a sweep is a run).
#[derive(Args, Debug, Clone)]
pub struct KernelFlags {
    /// The kernelspec to run [default: the notebook's, else python3]
    #[arg(short = 'k', long = "kernel", value_name = "NAME")]
    pub kernel: Option<String>,
    /// Seconds a cell may run before it is interrupted and the run (the
    /// point) stops [default: no limit]
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Seconds to wait for the kernel to start (for a batch job, counted from
    /// the job's start: the time it waits in the queue does not count)
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub start_timeout: f64,
    /// Keep going after a cell raises an error
    #[arg(long)]
    pub allow_errors: bool,
    /// Where the kernel runs: local (a child process), or a batch scheduler
    /// (slurm, oar, sge: a job; a sweep's points are one job array)
    /// [default: the profile's, else local]
    #[arg(long)]
    pub backend: Option<String>,
    /// Resource profile ([profiles.NAME] in /etc/noyau/config.toml,
    /// ~/.config/noyau/config.toml, ./noyau.toml); a sweep's for each task
    #[arg(long)]
    pub profile: Option<String>,
}

/// Run one notebook over a parameter grid: one output per point, a summary
#[derive(Args, Debug, Clone)]
#[command(after_long_help = noyau_run::sweep::SWEEP_HELP)]
pub struct SweepArgs {
    /// The notebook to run
    pub notebook: PathBuf,
    /// A parameter and its values (typed like -p); the points are the product of all grids
    #[arg(long = "grid", value_name = "NAME=V1,V2,...")]
    pub grid: Vec<String>,
    /// A YAML sweep file (parameters, grid, points)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// How many points run at once (the job array's %K)
    #[arg(long, value_name = "K", default_value_t = 4)]
    pub max_parallel: usize,
    /// Rerun only the points whose status in OUTDIR/summary.json is not ok
    #[arg(long)]
    pub retry_failed: bool,
    /// Where the outputs and the summary go [default: NOTEBOOK's name + .sweep, beside it]
    #[arg(short = 'o', long = "output-dir", value_name = "OUTDIR")]
    pub output_dir: Option<PathBuf>,
    /// Override one profile key (KEY=VALUE, env.NAME=VALUE); repeatable
    #[arg(long = "option", value_name = "KEY=VALUE")]
    pub options: Vec<String>,
    #[command(flatten)]
    pub kernel: KernelFlags,
}

/// `noyau sweep-task`: one point of a sweep (run by the sweep, not by hand).
#[derive(Args, Debug, Clone)]
pub struct SweepTaskArgs {
    /// The sweep's plan (a file of the user's in STATE/sweeps)
    pub plan: PathBuf,
    /// The point [default: $NOYAU_ARRAY_TASK_ID, which a job array's script exports]
    #[arg(long)]
    pub index: Option<usize>,
}

impl From<RunArgs> for RunOptions {
    fn from(a: RunArgs) -> Self {
        RunOptions {
            input: a.input,
            output: a.output,
            parameters: a.parameters,
            parameters_raw: a.parameters_raw,
            parameters_file: a.parameters_file,
            parameters_yaml: a.parameters_yaml,
            kernel: a.kernel.kernel,
            language: a.language,
            cwd: a.cwd,
            timeout: a.kernel.timeout,
            start_timeout: a.kernel.start_timeout,
            allow_errors: a.kernel.allow_errors,
            log_output: a.log_output,
            no_progress: a.no_progress,
            prepare_only: a.prepare_only,
            report_mode: a.report_mode,
            env: a.env,
            backend: a.kernel.backend,
            profile: a.kernel.profile,
            options: a.options,
            stream_mode: a.stream_mode,
            detach: a.detach,
            preset: Default::default(),
            input_copy: None,
            input_dir: None,
        }
    }
}

impl From<SweepArgs> for SweepOptions {
    fn from(a: SweepArgs) -> Self {
        SweepOptions {
            notebook: a.notebook,
            grid: a.grid,
            file: a.file,
            max_parallel: a.max_parallel,
            retry_failed: a.retry_failed,
            output_dir: a.output_dir,
            backend: a.kernel.backend,
            profile: a.kernel.profile,
            options: a.options,
            kernel: a.kernel.kernel,
            timeout: a.kernel.timeout,
            start_timeout: a.kernel.start_timeout,
            allow_errors: a.kernel.allow_errors,
        }
    }
}

impl From<SweepTaskArgs> for SweepTask {
    fn from(a: SweepTaskArgs) -> Self {
        SweepTask {
            plan: a.plan,
            index: a.index,
        }
    }
}
