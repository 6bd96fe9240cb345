//! What `noyau run` is asked to do ([`RunOptions`], parsed by the
//! binary's command line), and the exit codes it documents.

use std::path::PathBuf;

use noyau_notebook::{Param, Parameters};

use crate::error::{bad, RunError};

/// A run: a notebook headless, with parameters, like papermill. The
/// fields are the command line's (`noyau run --help` documents them).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The notebook to run (`-` reads it from stdin)
    pub input: String,
    /// Where to write the executed notebook [default: INPUT with .out.ipynb; stdout for `-`]
    /// (`-` writes to stdout)
    pub output: Option<String>,
    /// A parameter, typed like papermill (int, float, True/False, None, else string)
    pub parameters: Vec<String>,
    /// A parameter kept as a string
    pub parameters_raw: Vec<String>,
    /// A YAML file of parameters
    pub parameters_file: Vec<PathBuf>,
    /// Parameters as a YAML string
    pub parameters_yaml: Vec<String>,
    /// The kernelspec to run [default: the notebook's, else python3]
    pub kernel: Option<String>,
    /// The language for parameters, when the notebook does not say
    pub language: Option<String>,
    /// The working directory of the kernel [default: the current directory]
    pub cwd: Option<PathBuf>,
    /// Seconds a cell may run before it is interrupted and the run stops [default: no limit]
    pub timeout: Option<f64>,
    /// Seconds to wait for the kernel to start (for a batch job, counted from
    /// the job's start: the time it waits in the queue does not count)
    pub start_timeout: f64,
    /// Keep going after a cell raises an error (exit 0)
    pub allow_errors: bool,
    /// Copy cell output to stderr as it comes
    pub log_output: bool,
    /// No progress bar or progress lines
    pub no_progress: bool,
    /// Write the parameterised notebook without running it
    pub prepare_only: bool,
    /// Hide the source of code cells in the output (papermill's report mode)
    pub report_mode: bool,
    /// The kernel's environment: an inline TOML or JSON table
    /// (`--env '{requirements = ["six==1.16.0"]}'`) or a file (.json, or
    /// .toml with the keys at top level or under [environment]). Its keys
    /// override `[environment]` in noyau.toml next to the notebook and the
    /// notebook's `metadata.noyau.environment`. The environment used (spec,
    /// lock, lock hash) is recorded in the output's metadata.noyau.environment.
    pub env: Option<String>,
    /// Where the kernel runs: local (a child process) or slurm (a batch job;
    /// this command stays here and drives it) [default: the profile's, else local]
    pub backend: Option<String>,
    /// Resource profile ([profiles.NAME] in /etc/noyau/config.toml,
    /// ~/.config/noyau/config.toml, ./noyau.toml)
    pub profile: Option<String>,
    /// Override one profile key (KEY=VALUE, env.NAME=VALUE); repeatable
    pub options: Vec<String>,
    /// How stream output becomes notebook outputs: coalesce (one output per
    /// run of the same stream, as Jupyter frontends save), separate (one per
    /// message, like papermill), nbclient (jupyter execute --coalesce-streams)
    pub stream_mode: String,
    /// Submit the runner itself as the batch job and return at once
    /// (`noyau ps` shows its progress); needs a batch backend
    pub detach: bool,
    /// Parameters set before the command line's (a sweep's point).
    pub preset: Parameters,
    /// The notebook's content kept at submission (a sweep's task, a
    /// detached run): a private copy run instead of what INPUT holds now.
    /// INPUT still names the notebook (its directory, the default output,
    /// papermill's metadata).
    pub input_copy: Option<PathBuf>,
    /// With `input_copy`: the device and inode of the notebook's directory
    /// when it was read at submission. The job anchors the directory again
    /// by its path, and refuses it if it is no longer that one: moved or
    /// swapped (for a link to a trusted project of the user's) while the
    /// job waited, it would lend its trust to the notebook's cells.
    pub input_dir: Option<crate::input::SubmittedDir>,
}

impl RunOptions {
    /// The parameters, merged like papermill: `-f` files, then `-y`, then
    /// `-p` and `-r` in order.
    pub fn parameters(&self) -> Result<Parameters, RunError> {
        let mut params = self.preset.clone();
        for f in &self.parameters_file {
            let text = std::fs::read_to_string(f)
                .map_err(RunError::io("cannot read the parameters file", f))?;
            let in_file =
                |e: &dyn std::fmt::Display| bad(format!("parameters file {}: {e}", f.display()));
            let v = crate::yaml::parse(&text).map_err(|e| in_file(&e))?;
            params.merge(v).map_err(|e| in_file(&e))?;
        }
        for y in &self.parameters_yaml {
            let v = crate::yaml::parse(y).map_err(|e| bad(format!("-y {y:?}: {e}")))?;
            params.merge(v).map_err(|e| bad(format!("-y {y:?}: {e}")))?;
        }
        for (list, raw) in [(&self.parameters, false), (&self.parameters_raw, true)] {
            for pair in list.chunks(2) {
                let [name, value] = pair else {
                    return Err(bad("-p/-r take a NAME and a VALUE"));
                };
                noyau_notebook::check_name(name).map_err(|e| bad(format!("-p/-r: {e}")))?;
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
