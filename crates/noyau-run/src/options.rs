//! The command line of `noyau run`, and the exit codes it documents.

use std::path::PathBuf;

use clap::Args;
use noyau_notebook::{Param, Parameters};

/// Exit codes of `noyau run`.
pub mod exit {
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
}

pub const EXIT_CODES_HELP: &str = "\
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
    /// The kernelspec to run [default: the notebook's, else python3]
    #[arg(short = 'k', long = "kernel", value_name = "NAME")]
    pub kernel: Option<String>,
    /// The language for parameters, when the notebook does not say
    #[arg(long)]
    pub language: Option<String>,
    /// The working directory of the kernel [default: the current directory]
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Seconds a cell may run before it is interrupted and the run stops [default: no limit]
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Seconds to wait for the kernel to start (for a batch job, counted from
    /// the job's start: the time it waits in the queue does not count)
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub start_timeout: f64,
    /// Keep going after a cell raises an error (exit 0)
    #[arg(long)]
    pub allow_errors: bool,
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
    /// Where the kernel runs: local (a child process) or slurm (a batch job;
    /// this command stays here and drives it) [default: the profile's, else local]
    #[arg(long)]
    pub backend: Option<String>,
    /// Resource profile ([profiles.NAME] in /etc/noyau/config.toml,
    /// ~/.config/noyau/config.toml, ./noyau.toml)
    #[arg(long)]
    pub profile: Option<String>,
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
    /// Parameters set before the command line's (a sweep's point).
    #[arg(skip)]
    pub preset: Parameters,
}

impl RunArgs {
    /// The parameters, merged like papermill: `-f` files, then `-y`, then
    /// `-p` and `-r` in order.
    pub fn parameters(&self) -> Result<Parameters, String> {
        let mut params = self.preset.clone();
        for f in &self.parameters_file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read the parameters file {}: {e}", f.display()))?;
            let v = crate::yaml::parse(&text)
                .map_err(|e| format!("parameters file {}: {e}", f.display()))?;
            params
                .merge(v)
                .map_err(|e| format!("parameters file {}: {e}", f.display()))?;
        }
        for y in &self.parameters_yaml {
            let v = crate::yaml::parse(y).map_err(|e| format!("-y {y:?}: {e}"))?;
            params.merge(v).map_err(|e| format!("-y {y:?}: {e}"))?;
        }
        for (list, raw) in [(&self.parameters, false), (&self.parameters_raw, true)] {
            for pair in list.chunks(2) {
                let [name, value] = pair else {
                    return Err("-p/-r take a NAME and a VALUE".into());
                };
                if name.is_empty() {
                    return Err("a parameter name cannot be empty".into());
                }
                let v = if raw {
                    Param::raw(value)
                } else {
                    Param::from_cli(value)
                };
                params.set(name.clone(), v);
            }
        }
        Ok(params)
    }
}
