//! `noyau run --detach`: the runner itself becomes the batch job (a local
//! kernel inside the allocation); this command returns once it is
//! submitted. The run in the job reports its progress in a status file
//! that `noyau ps` reads ([`StatusFile`]). The parameters given as values
//! (`-p`, `-r`, `-y`: a token, a path) go to the job in its environment
//! (`NOYAU_RUN_PARAMETERS`, which noyau-sched keeps off every command line
//! and out of what other users see), not on the runner's argv, which `ps`
//! shows every user of the compute node for the whole run.

use noyau_vars::EnvVars;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{bad, RunError};
use crate::exit;
use crate::input::{job_name, output_for, parse_input, read_bytes, Output};
use crate::options::RunOptions;

/// Where a detached run in job `id` reports its progress (`noyau ps` reads it).
fn status_path(id: &str) -> PathBuf {
    noyau_sched::state_dir()
        .join("runs")
        .join(format!("{id}.json"))
}

/// "done/total" cells of the detached run in job `id`, for `noyau ps`;
/// None without a status file of ours there (anyone may plant a FIFO, a
/// link or a file of theirs at its path).
pub fn cells(id: &str) -> Option<String> {
    read_cells(&status_path(id))
}

fn read_cells(path: &Path) -> Option<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut noyau_trust::Expect::file().open(path).ok()?, &mut text)
        .ok()?;
    let v = serde_json::from_str::<serde_json::Value>(&text).ok()?;
    Some(format!("{}/{}", v["done"], v["total"]))
}

/// The batch allocation this runner itself runs in (a sweep task, a
/// detached run): `1234` or `1234_5` for an array task.
pub fn allocation() -> Option<String> {
    noyau_sched::this_job().map(|(_, id)| id)
}

/// A detached run's progress, in a 0600 file: `{"done": 3, "total": 10}`,
/// rewritten (atomically) after each cell. Only when this runner is the job.
pub(crate) struct StatusFile {
    path: Option<PathBuf>,
    done: usize,
    total: usize,
}

impl StatusFile {
    pub fn new(total: usize) -> StatusFile {
        let path = (std::env::var_os(EnvVars::NOYAU_DETACHED).is_some())
            .then(allocation)
            .flatten()
            .map(|id| status_path(&id));
        StatusFile::at(path, total)
    }

    /// The status file at `path` (its directory made private once, here),
    /// written a first time.
    fn at(path: Option<PathBuf>, total: usize) -> StatusFile {
        let s = StatusFile {
            path: path.filter(|p| Self::dir_ready(p)),
            done: 0,
            total,
        };
        s.write();
        s
    }

    /// The status file's directory, made private (checked once here, not
    /// at each cell's write: it is this user's, no one else can change it).
    fn dir_ready(p: &Path) -> bool {
        let dir = p.parent().unwrap_or(Path::new("."));
        match noyau_sched::private_dir(dir) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("no status file for the run in {}: {e}", dir.display());
                false
            }
        }
    }

    pub fn cell_done(&mut self) {
        self.done += 1;
        self.write();
    }

    /// The run is over and its job leaves the queue: nothing to report.
    pub fn finish(&self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }

    fn write(&self) {
        use std::io::Write;
        let Some(p) = &self.path else { return };
        let tmp = p.with_extension("tmp");
        let text = json!({"done": self.done, "total": self.total}).to_string();
        let ok = noyau_trust::create_private(&tmp, 0o600)
            .map_err(std::io::Error::from)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, p));
        if let Err(e) = ok {
            tracing::warn!("cannot write the run's status file {}: {e}", p.display());
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    }
}

/// The command line the job runs: this run, with a local kernel.
fn job_args(opts: &RunOptions, out: &Path) -> Vec<String> {
    let path_arg = |p: &Path| absolute(p).display().to_string();
    let mut a: Vec<String> = vec![
        "run".into(),
        path_arg(Path::new(&opts.input)),
        path_arg(out),
        "--backend".into(),
        "local".into(),
        "--no-progress".into(),
        "--start-timeout".into(),
        opts.start_timeout.to_string(),
        "--stream-mode".into(),
        opts.stream_mode.clone(),
    ];
    for f in &opts.parameters_file {
        a.extend(["-f".into(), path_arg(f)]);
    }
    let opt = |a: &mut Vec<String>, k: &str, v: Option<String>| {
        if let Some(v) = v {
            a.extend([k.to_string(), v]);
        }
    };
    opt(&mut a, "--kernel", opts.kernel.clone());
    opt(&mut a, "--language", opts.language.clone());
    opt(&mut a, "--cwd", opts.cwd.as_deref().map(path_arg));
    opt(&mut a, "--timeout", opts.timeout.map(|t| t.to_string()));
    opt(&mut a, "--env", opts.env.clone());
    for (on, flag) in [
        (opts.allow_errors, "--allow-errors"),
        (opts.log_output, "--log-output"),
        (opts.report_mode, "--report-mode"),
    ] {
        if on {
            a.push(flag.into());
        }
    }
    a
}

/// The command line's parameter values, as the job's runner takes them
/// back ([`take_parameters`]); None without any.
fn parameters_value(opts: &RunOptions) -> Option<String> {
    let lists = [
        &opts.parameters,
        &opts.parameters_raw,
        &opts.parameters_yaml,
    ];
    lists
        .iter()
        .any(|l| !l.is_empty())
        .then(|| json!(lists).to_string())
}

/// In a detached run's job: the parameter values its submitter put in
/// `NOYAU_RUN_PARAMETERS` (`[[-p…], [-r…], [-y…]]`), added to `opts`. The
/// variable is taken out of this process's environment: the kernel, and a
/// run it starts, must not take them for theirs. Call it before any
/// thread starts (it changes the environment).
pub fn take_parameters(opts: &mut RunOptions) -> Result<(), RunError> {
    let var = EnvVars::NOYAU_RUN_PARAMETERS;
    let Some(text) = std::env::var_os(var) else {
        return Ok(());
    };
    std::env::remove_var(var);
    let lists: [Vec<String>; 3] = text
        .to_str()
        .and_then(|t| serde_json::from_str(t).ok())
        .ok_or_else(|| {
            bad(format!(
                "{var} is not the parameters `noyau run --detach` writes (three lists of strings); unset it"
            ))
        })?;
    let [p, r, y] = lists;
    opts.parameters.extend(p);
    opts.parameters_raw.extend(r);
    opts.parameters_yaml.extend(y);
    Ok(())
}

/// The notebook as read at submission, which the detached job runs: a
/// 0600 file in `STATE/runs` (0700), removed here if the submission
/// fails, else by the job's runner when its run ends ([`take_input`]).
pub(crate) struct InputCopy(PathBuf);

impl InputCopy {
    fn keep(bytes: &[u8]) -> Result<InputCopy, RunError> {
        let [path] = crate::input::private_names("runs", "input", [".ipynb"])?;
        crate::input::keep_copy(&path, bytes)?;
        Ok(InputCopy(path))
    }
}

impl Drop for InputCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// In a detached run's job: the notebook its submitter kept
/// (`NOYAU_RUN_INPUT`), set as the run's input copy, with its directory's
/// identity (`NOYAU_RUN_INPUT_DIR`), the variables taken out of this
/// process's environment (a run the kernel starts must not take them for
/// its own). Returns the guard that removes the copy when
/// the run ends, for a copy where [`InputCopy::keep`] makes them only
/// (the variable set by hand never has a file of the user's removed).
/// Call it before any thread starts (it changes the environment).
pub(crate) fn take_input(opts: &mut RunOptions) -> Option<InputCopy> {
    let var = EnvVars::NOYAU_RUN_INPUT;
    let path = PathBuf::from(std::env::var_os(var)?);
    std::env::remove_var(var);
    opts.input_copy = Some(path.clone());
    let dir = EnvVars::NOYAU_RUN_INPUT_DIR;
    opts.input_dir =
        (std::env::var(dir).ok().as_deref()).and_then(crate::input::SubmittedDir::parse);
    std::env::remove_var(dir);
    let ours = path.parent() == Some(&noyau_sched::state_dir().join("runs"))
        && (path.file_name().and_then(|n| n.to_str())).is_some_and(|n| n.starts_with("input-"));
    ours.then_some(InputCopy(path))
}

/// Submits the run as the job; returns once it is submitted.
pub async fn detach(
    opts: &RunOptions,
    backend: &str,
    profile: noyau_sched::Profile,
) -> Result<i32, RunError> {
    if backend == "local" {
        return Err(bad(format!(
            "--detach needs a batch backend (--backend {}, or a profile that names one)",
            noyau_sched::schedulers().join("|")
        )));
    }
    if opts.input == "-" || opts.output.as_deref() == Some("-") {
        return Err(bad(
            "--detach needs an input and an output file, not stdin/stdout",
        ));
    }
    let (bytes, project) = read_bytes(&opts.input)?;
    let nb = parse_input(&opts.input, &bytes)?;
    let kernel = crate::kernel::kernel_name(opts, &nb);
    let kernel_env = crate::kernelenv::job_env(&kernel, backend)?;
    let Output::File(out) = output_for(&opts.input, opts.output.as_deref()) else {
        return Err(bad("--detach needs an output file"));
    };
    // Built and fetched here, before the job is submitted; the job's runner
    // finds it in NOYAU_ENV_PREPARED.
    let mut env =
        crate::environment::for_job(&nb, &project, opts.env.as_deref(), !opts.no_progress).await?;
    env.extend(kernel_env);
    env.insert(EnvVars::NOYAU_DETACHED.to_string(), "1".to_string());
    if let Some(params) = parameters_value(opts) {
        env.insert(EnvVars::NOYAU_RUN_PARAMETERS.to_string(), params);
    }
    let copy = InputCopy::keep(&bytes)?;
    env.insert(
        EnvVars::NOYAU_RUN_INPUT.to_string(),
        copy.0.display().to_string(),
    );
    env.insert(
        EnvVars::NOYAU_RUN_INPUT_DIR.to_string(),
        crate::input::SubmittedDir::of(&project)?.to_string(),
    );
    let spec = noyau_sched::JobSpec {
        name: job_name(&opts.input),
        program: std::env::current_exe().unwrap_or_else(|_| "noyau".into()),
        args: job_args(opts, &out),
        env,
        cwd: std::env::current_dir().ok(),
        profile,
        ..Default::default()
    };
    let id = noyau_sched::Scheduler::named(backend)?
        .submit_detached(&spec)
        .await?;
    // Submitted: the job removes the copy when its run ends.
    std::mem::forget(copy);
    // A status file left by an earlier job with the same id (another or a
    // reset cluster) must not pass for this run's progress.
    let _ = std::fs::remove_file(status_path(&id));
    eprintln!(
        "noyau: submitted {backend} job {id} ({}): the run goes on in the job; output {}; `noyau ps --backend {backend}` shows its progress, `noyau cancel --backend {backend} {id}` stops it",
        spec.name,
        absolute(&out).display()
    );
    println!("{id}");
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parameter_values_go_in_the_environment_not_on_the_runners_command_line() {
        let opts = RunOptions {
            input: "/nb/a.ipynb".into(),
            parameters: vec!["x".into(), "7".into()],
            parameters_raw: vec!["token".into(), "s3cret-p".into()],
            parameters_yaml: vec!["{path: /s3cret/y}".into()],
            parameters_file: vec!["/nb/p.yaml".into()],
            ..Default::default()
        };
        let args = job_args(&opts, Path::new("/nb/a.out.ipynb"));
        assert!(!args.iter().any(|a| a.contains("s3cret")), "{args:?}");
        assert!(!args
            .iter()
            .any(|a| ["-p", "-r", "-y"].contains(&a.as_str())));
        assert!(
            args.windows(2).any(|w| w == ["-f", "/nb/p.yaml"]),
            "{args:?}"
        );
        let value = parameters_value(&opts).unwrap();
        assert_eq!(parameters_value(&RunOptions::default()), None);
        // The job's runner takes them back, and out of its environment.
        std::env::set_var(EnvVars::NOYAU_RUN_PARAMETERS, &value);
        let mut job = RunOptions::default();
        take_parameters(&mut job).unwrap();
        assert!(std::env::var_os(EnvVars::NOYAU_RUN_PARAMETERS).is_none());
        assert_eq!(
            (job.parameters, job.parameters_raw, job.parameters_yaml),
            (opts.parameters, opts.parameters_raw, opts.parameters_yaml)
        );
        std::env::set_var(EnvVars::NOYAU_RUN_PARAMETERS, "-p x 7");
        let e = take_parameters(&mut RunOptions::default()).unwrap_err();
        assert!(e.to_string().contains("NOYAU_RUN_PARAMETERS is not"), "{e}");
    }

    #[test]
    fn the_status_file_is_private_and_read_only_if_ours() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state/runs/7.json");
        let mut s = StatusFile::at(Some(p.clone()), 3);
        s.cell_done();
        let dir = std::fs::metadata(p.parent().unwrap()).unwrap();
        assert_eq!(dir.permissions().mode() & 0o777, 0o700);
        assert_eq!(read_cells(&p).as_deref(), Some("1/3"));
        // A FIFO (reading would wait for a writer) or a link: not read.
        let fifo = t.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(read_cells(&fifo), None);
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(read_cells(&link), None);
    }
}
