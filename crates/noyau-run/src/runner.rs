//! One run, start to end: read and prepare the notebook, start the kernel,
//! execute the cells in order the way nbclient does (IOPub `idle` after the
//! `execute_reply` ends a cell), record papermill's and nbclient's metadata,
//! save as it goes, and stop cleanly on errors, kernel death, timeouts and
//! signals.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use noyau_client::magic::{self as magic, Magic};
use noyau_client::remote::{
    ExecuteOptions, KernelError, KernelEvent, KernelMessage, Lane, RemoteKernel, Walltime,
};
use noyau_notebook::{InjectOptions, Notebook, OutputBuilder, StreamMode};
use noyau_sched::JobState;
use serde_json::{json, Value};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::options::{exit, RunArgs};
use crate::papermill as pm;
use crate::progress::Progress;
use crate::save::Saver;

/// A run that could not go on: exit code and what to tell the user.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

fn bad(message: impl Into<String>) -> Failure {
    Failure {
        code: exit::BAD_INPUT,
        message: message.into(),
    }
}

/// Where the output goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

impl Output {
    fn shown(&self) -> String {
        match self {
            Output::Stdout => "-".into(),
            Output::File(p) => p.display().to_string(),
        }
    }
}

/// `OUTPUT`, or the default: `name.out.ipynb` beside the input, stdout for stdin.
pub fn output_for(input: &str, output: Option<&str>) -> Output {
    match output {
        Some("-") => Output::Stdout,
        Some(p) => Output::File(p.into()),
        None if input == "-" => Output::Stdout,
        None => {
            let p = Path::new(input);
            let stem = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let stem = stem.strip_suffix(".ipynb").unwrap_or(&stem).to_string();
            Output::File(p.with_file_name(format!("{stem}.out.ipynb")))
        }
    }
}

/// Reads and parses the input (upgrading nbformat 3 and 4.0–4.4).
pub fn read_input(input: &str) -> Result<Notebook, Failure> {
    let mut bytes = Vec::new();
    let res = if input == "-" {
        std::io::stdin().read_to_end(&mut bytes).map(|_| ())
    } else {
        std::fs::read(input).map(|b| bytes = b)
    };
    res.map_err(|e| bad(format!("cannot read {input}: {e}")))?;
    let what = if input == "-" { "stdin" } else { input };
    let b = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let mut v: Value = serde_json::from_slice(b).map_err(|e| {
        bad(format!(
            "{what} is not a notebook: invalid JSON ({e}); pass a Jupyter .ipynb file"
        ))
    })?;
    if crate::upgrade::is_v3(&v) {
        v = crate::upgrade::v3_to_v4(v)
            .map_err(|e| bad(format!("{what}: malformed nbformat 3 notebook: {e}")))?;
    }
    let mut nb = Notebook::from_value(v).map_err(|e| bad(format!("{what}: {e}")))?;
    nb.upgrade_minor();
    Ok(nb)
}

/// What tells that a file was rewritten (an editor's atomic save makes a new
/// inode; an in-place one changes the time or size). None for stdin.
fn file_stamp(input: &str) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    if input == "-" {
        return None;
    }
    let m = std::fs::metadata(input).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn stream_mode(s: &str) -> Result<StreamMode, Failure> {
    match s {
        "coalesce" => Ok(StreamMode::Coalesce),
        "separate" => Ok(StreamMode::Separate),
        "nbclient" => Ok(StreamMode::Nbclient),
        other => Err(bad(format!(
            "--stream-mode {other:?}: use coalesce, separate or nbclient"
        ))),
    }
}

/// nbclient's `timestamp(msg)`: the header date, `%Y-%m-%dT%H:%M:%S.%fZ`.
fn timestamp(m: &KernelMessage) -> String {
    let t = m
        .date
        .as_deref()
        .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
        .map(|d| d.to_utc())
        .unwrap_or_else(chrono::Utc::now);
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// How a cell ended.
enum CellEnd {
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

struct Signals {
    int: Signal,
    term: Signal,
    /// The scheduler's early walltime signal, when this runner is itself
    /// the batch job (a sweep task, a detached run): Slurm's
    /// `--signal=B:USR1@…`, Grid Engine's SIGUSR2 (also its cancel).
    walltime: Signal,
    job: Option<noyau_sched::Scheduler>,
}

impl Signals {
    fn new() -> Result<Signals, Failure> {
        let mk = |k| {
            signal(k).map_err(|e| Failure {
                code: exit::BAD_INPUT,
                message: format!("cannot handle signals: {e}"),
            })
        };
        let job = noyau_sched::this_job().map(|(s, _)| s);
        let walltime = job.as_ref().map_or(libc::SIGUSR1, |s| s.walltime_signal());
        Ok(Signals {
            int: mk(SignalKind::interrupt())?,
            term: mk(SignalKind::terminate())?,
            walltime: mk(SignalKind::from_raw(walltime))?,
            job,
        })
    }

    async fn recv(&mut self) -> (&'static str, i32) {
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

/// The backend and the resource profile: `--profile` and `-o` overrides
/// (as `noyau kernel` takes them); the backend is `--backend`, else the
/// profile's, else local.
fn resources(args: &RunArgs) -> Result<(String, noyau_config::Profile), Failure> {
    backend_and_profile(
        args.backend.as_deref(),
        args.profile.as_deref(),
        &args.options,
    )
}

/// The backend and profile from `--backend`, `--profile` and `-o` overrides.
pub fn backend_and_profile(
    backend: Option<&str>,
    profile: Option<&str>,
    options: &[String],
) -> Result<(String, noyau_config::Profile), Failure> {
    let (backend, profile) =
        noyau_config::resolve(backend, profile, options).map_err(|e| bad(e.to_string()))?;
    if !noyau_sched::backends().contains(&backend.as_str()) {
        return Err(bad(format!(
            "unknown backend {backend:?}; available backends: {}",
            noyau_sched::backends().join(", ")
        )));
    }
    Ok((backend, profile))
}

/// The job name schedulers show: what runs, never a secret
/// (`noyau-run-analysis` for analysis.ipynb).
pub fn job_name(input: &str) -> String {
    let stem = Path::new(input)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem.strip_suffix(".ipynb").unwrap_or(&stem);
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if clean.is_empty() || input == "-" {
        "noyau-run-stdin".into()
    } else {
        format!("noyau-run-{clean}")
    }
}

/// One line saying where the kernel's job is ("" when there is nothing to say).
fn queue_note(st: &JobState) -> String {
    match st {
        JobState::Pending {
            reason,
            start,
            partition,
        } => {
            let mut s = format!("queued: {reason}");
            if let Some(p) = partition {
                s.push_str(&format!(", partition {p}"));
            }
            s.push_str(&format!(
                ", est. start {}",
                start.map_or("unknown".into(), noyau_sched::local_time)
            ));
            s
        }
        JobState::Running { node, .. } if node.is_empty() => {
            "job running; starting the kernel".into()
        }
        JobState::Running { node, .. } => format!("job running on {node}; starting the kernel"),
        JobState::Unknown { why } => {
            format!("the scheduler does not answer ({why}); still waiting")
        }
        JobState::Ended(_) => String::new(),
    }
}

/// Where a detached run in job `id` reports its progress (`noyau ps` reads it).
pub fn status_path(id: &str) -> PathBuf {
    noyau_sched::state_dir()
        .join("runs")
        .join(format!("{id}.json"))
}

/// A detached run's progress, in a 0600 file: `{"done": 3, "total": 10}`,
/// rewritten (atomically) after each cell. Only when this runner is the job.
struct StatusFile {
    path: Option<PathBuf>,
    done: usize,
    total: usize,
}

impl StatusFile {
    fn new(total: usize) -> StatusFile {
        let path = (std::env::var_os("NOYAU_DETACHED").is_some())
            .then(allocation)
            .flatten()
            .map(|id| status_path(&id));
        let s = StatusFile {
            path,
            done: 0,
            total,
        };
        s.write();
        s
    }

    fn cell_done(&mut self) {
        self.done += 1;
        self.write();
    }

    /// The run is over and its job leaves the queue: nothing to report.
    fn finish(&self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }

    fn write(&self) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let Some(p) = &self.path else { return };
        let _ = std::fs::create_dir_all(p.parent().unwrap_or(Path::new(".")));
        let tmp = p.with_extension("tmp");
        let text = json!({"done": self.done, "total": self.total}).to_string();
        let ok = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, p));
        if let Err(e) = ok {
            tracing::warn!("cannot write the run's status file {}: {e}", p.display());
        }
    }
}

/// `noyau run --detach`: the runner itself becomes the batch job (a local
/// kernel inside the allocation); this command returns once it is submitted.
async fn detach(
    args: &RunArgs,
    backend: &str,
    profile: noyau_config::Profile,
) -> Result<i32, Failure> {
    if backend == "local" {
        return Err(bad(format!(
            "--detach needs a batch backend (--backend {}, or a profile that names one)",
            noyau_sched::schedulers().join("|")
        )));
    }
    if args.input == "-" || args.output.as_deref() == Some("-") {
        return Err(bad(
            "--detach needs an input and an output file, not stdin/stdout",
        ));
    }
    let nb = read_input(&args.input)?;
    let kernel = crate::kernelenv::kernel_name(args.kernel.as_deref(), nb.kernel_name());
    let kernel_env = crate::kernelenv::job_env(&kernel, backend).map_err(kernel_env_failure)?;
    let Output::File(out) = output_for(&args.input, args.output.as_deref()) else {
        return Err(bad("--detach needs an output file"));
    };
    let mut env = crate::environment::for_job(
        &nb,
        Path::new(&args.input),
        args.env.as_deref(),
        !args.no_progress,
    )
    .await
    .map_err(bad)?;
    env.extend(kernel_env);
    env.insert("NOYAU_DETACHED".to_string(), "1".to_string());
    let abs = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        }
    };
    let path_arg = |p: &Path| abs(p).display().to_string();
    let mut a: Vec<String> = vec![
        "run".into(),
        path_arg(Path::new(&args.input)),
        path_arg(&out),
        "--backend".into(),
        "local".into(),
        "--no-progress".into(),
        "--start-timeout".into(),
        args.start_timeout.to_string(),
        "--stream-mode".into(),
        args.stream_mode.clone(),
    ];
    for (flag, list) in [("-p", &args.parameters), ("-r", &args.parameters_raw)] {
        for pair in list.chunks(2) {
            a.push(flag.into());
            a.extend(pair.iter().cloned());
        }
    }
    for f in &args.parameters_file {
        a.extend(["-f".into(), path_arg(f)]);
    }
    for y in &args.parameters_yaml {
        a.extend(["-y".into(), y.clone()]);
    }
    let opt = |a: &mut Vec<String>, k: &str, v: Option<String>| {
        if let Some(v) = v {
            a.extend([k.to_string(), v]);
        }
    };
    opt(&mut a, "--kernel", args.kernel.clone());
    opt(&mut a, "--env", args.env.clone());
    opt(&mut a, "--language", args.language.clone());
    opt(&mut a, "--cwd", args.cwd.as_deref().map(path_arg));
    opt(&mut a, "--timeout", args.timeout.map(|t| t.to_string()));
    for (on, flag) in [
        (args.allow_errors, "--allow-errors"),
        (args.log_output, "--log-output"),
        (args.report_mode, "--report-mode"),
    ] {
        if on {
            a.push(flag.into());
        }
    }
    let spec = noyau_sched::JobSpec {
        name: job_name(&args.input),
        program: std::env::current_exe().unwrap_or_else(|_| "noyau".into()),
        args: a,
        env,
        cwd: std::env::current_dir().ok(),
        profile,
        ..Default::default()
    };
    let submitted = match noyau_sched::Scheduler::named(backend) {
        Ok(s) => s.submit_detached(&spec).await,
        Err(e) => Err(e),
    };
    let id = submitted.map_err(|e| Failure {
        code: exit::KERNEL_START,
        message: e.to_string(),
    })?;
    // A status file left by an earlier job with the same id (another or a
    // reset cluster) must not pass for this run's progress.
    let _ = std::fs::remove_file(status_path(&id));
    eprintln!(
        "noyau: submitted {backend} job {id} ({}): the run goes on in the job; output {}; `noyau ps --backend {backend}` shows its progress, `noyau cancel --backend {backend} {id}` stops it",
        spec.name,
        abs(&out).display()
    );
    println!("{id}");
    Ok(exit::OK)
}

/// The batch allocation this runner itself runs in (a sweep task, a
/// detached run): `1234` or `1234_5` for an array task.
pub fn allocation() -> Option<String> {
    noyau_sched::this_job().map(|(_, id)| id)
}

fn kernel_env_failure(e: crate::kernelenv::KernelEnvError) -> Failure {
    match e {
        crate::kernelenv::KernelEnvError::Spec(_) => bad(e.to_string()),
        crate::kernelenv::KernelEnvError::Managed(_) => Failure {
            code: exit::KERNEL_START,
            message: e.to_string(),
        },
    }
}

fn kernel_failure(e: anyhow::Error) -> Failure {
    Failure {
        code: exit::KERNEL_START,
        message: format!("{e:#}"),
    }
}

/// Runs the whole thing; returns the exit code.
pub async fn run(args: RunArgs) -> Result<i32, Failure> {
    let params = args.parameters().map_err(bad)?;
    let (backend, resources) = resources(&args)?;
    if args.detach {
        return detach(&args, &backend, resources).await;
    }
    let mode = stream_mode(&args.stream_mode)?;
    let output = output_for(&args.input, args.output.as_deref());
    if let Output::File(p) = &output {
        if args.input != "-" && same_file(Path::new(&args.input), p) {
            return Err(bad(format!(
                "the output {} is the input notebook; noyau never modifies its input: name another OUTPUT",
                p.display()
            )));
        }
    }
    // The run uses the input as read now; an edit saved meanwhile (a user
    // in JupyterLab) is left alone and reported at the end.
    let input_stamp = file_stamp(&args.input);
    let mut nb = read_input(&args.input)?;
    pm::on_load(&mut nb);
    if !params.is_empty() {
        let injected = noyau_notebook::inject(
            &mut nb,
            &params,
            &InjectOptions {
                kernel_name: args.kernel.as_deref(),
                language: args.language.as_deref(),
                hide_source: args.report_mode,
                ..Default::default()
            },
        )
        .map_err(|e| bad(format!("{e}")))?;
        if let Some(w) = injected.warning {
            eprintln!("noyau: warning: {w}; the parameters go in a new cell at the top");
        }
    }
    pm::prepare(&mut nb, &args.input, &output.shown(), args.report_mode);

    let out_path = match &output {
        Output::File(p) => Some(p.clone()),
        Output::Stdout => None,
    };
    let mut saver = Saver::new(out_path).map_err(bad)?;
    if args.prepare_only {
        finish_output(&mut saver, &nb, &output)?;
        return Ok(exit::OK);
    }

    // Which kernel, and where its spec is.
    let kernel_name = crate::kernelenv::kernel_name(args.kernel.as_deref(), nb.kernel_name());
    let mut env = crate::kernelenv::job_env(&kernel_name, &backend).map_err(kernel_env_failure)?;

    let run_start = chrono::Utc::now();
    pm::notebook_start(&mut nb, &pm::iso(run_start));
    // The first save checks the output is writable before any work.
    if let Err(e) = saver.save(&nb) {
        return Err(bad(format!(
            "cannot write the output {}: {e}",
            output.shown()
        )));
    }

    // The kernel's environment: noyau.toml, the notebook's metadata, --env.
    let cwd = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let nb_dir = if args.input == "-" {
        cwd.clone()
    } else {
        std::path::absolute(Path::new(&args.input))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| cwd.clone())
    };
    // Built and fetched here, before the job is submitted.
    let declared = crate::environment::declared(&nb, &nb_dir, args.env.as_deref(), &cwd)
        .map_err(|e| bad(format!("{e}")))?;
    let progress = Progress::new(!args.no_progress, nb.cells.len());
    let (prepared, job_env) = crate::environment::prepare(&declared, &progress)
        .await
        .map_err(bad)?;
    env.extend(job_env);

    let mut signals = Signals::new()?;
    let mut launch = noyau_client::remote::local_launch(&kernel_name, args.cwd.clone());
    launch.backend = backend.clone();
    launch.env = env;
    launch.job_name = job_name(&args.input);
    launch.profile = resources;
    if let Some(cwd) = &args.cwd {
        if !cwd.is_dir() {
            return Err(bad(format!("--cwd {}: not a directory", cwd.display())));
        }
    }
    let start_timeout = Duration::from_secs_f64(args.start_timeout.max(0.1));
    let got: std::cell::Cell<Option<(&'static str, i32)>> = std::cell::Cell::new(None);
    let node: std::cell::RefCell<Option<String>> = Default::default();
    let show_queue = !args.no_progress && backend != "local";
    let mut last_note = String::new();
    let started = RemoteKernel::start_watching(
        launch,
        start_timeout,
        async {
            got.set(Some(signals.recv().await));
        },
        |st| {
            if let JobState::Running { node: n, .. } = st {
                *node.borrow_mut() = Some(n.clone()).filter(|n| !n.is_empty());
            }
            let note = queue_note(st);
            if show_queue && !note.is_empty() && note != last_note {
                eprintln!("noyau: {note}");
                last_note = note;
            }
        },
    )
    .await;
    let mut kernel = match (started, got.get()) {
        (Ok(k), _) => k,
        (Err(_), Some((name, code))) => {
            eprintln!("noyau: {name} while the kernel was starting; stopping");
            pm::add_stop_marker(&mut nb, name, None);
            finish_output(&mut saver, &nb, &output)?;
            return Ok(code);
        }
        (Err(e), None) => return Err(kernel_failure(e)),
    };
    nb.metadata.insert(
        "noyau".into(),
        json!({
            "backend": kernel.backend,
            "host": kernel.host,
            "node": node.into_inner().or_else(|| kernel.host.clone()),
            "job_id": kernel.job_id(),
            "allocation": allocation(),
            "kernel": kernel_name,
            "version": env!("CARGO_PKG_VERSION"),
        }),
    );
    if let Some(record) = &kernel.environment {
        // spec, resolved lock and its hash: running this output again
        // reproduces the environment (sources::from_metadata reads it back).
        nb.metadata["noyau"]["environment"] = record.clone();
    }
    crate::environment::record(&mut nb, &prepared);
    if let Some(li) = kernel.language_info() {
        nb.metadata.insert("language_info".into(), li.clone());
    }

    let total_cells = nb.cells.len();
    // Cells delegated with `%%noyau on` run on kernels of their own; sending
    // cells ahead is for one kernel only.
    let delegating = nb
        .cells
        .iter()
        .any(|c| c.is_code() && !matches!(magic::parse(&c.source), Ok(Magic::None)));
    let mut runner = Runner {
        builder: OutputBuilder::new(mode),
        progress,
        nb,
        saver,
        args: &args,
        ahead: None,
        early: Default::default(),
        walltime: None,
        status: StatusFile::new(total_cells),
        delegating,
        targets: Default::default(),
        target_base: kernel_name.clone(),
        prepared,
    };
    let (code, kernel_alive) = runner.run_cells(&mut kernel, &mut signals, run_start).await;
    runner.progress.finish();
    for (_, t) in std::mem::take(&mut runner.targets) {
        t.shutdown(Duration::from_secs(5)).await;
    }
    runner.status.finish();
    let Runner { nb, mut saver, .. } = runner;
    let out = finish_output(&mut saver, &nb, &output);
    if input_stamp.is_some() && file_stamp(&args.input) != input_stamp {
        eprintln!(
            "noyau: warning: {} changed on disk during the run; the run used the version read \
             at its start (the output has those cells) and left your changes in place",
            args.input
        );
    }
    if kernel_alive {
        kernel.shutdown(Duration::from_secs(5)).await;
    } else {
        kernel.kill().await;
    }
    out?;
    Ok(code)
}

fn finish_output(saver: &mut Saver, nb: &Notebook, output: &Output) -> Result<(), Failure> {
    match output {
        Output::Stdout => {
            use std::io::Write;
            let mut o = std::io::stdout().lock();
            o.write_all(nb.to_json_string().as_bytes())
                .and_then(|()| o.flush())
                .map_err(|e| bad(format!("cannot write the notebook to stdout: {e}")))
        }
        Output::File(p) => saver.save(nb).map_err(|e| {
            bad(match rescue(nb, p) {
                Ok(r) => format!(
                    "cannot write the output: {e}; the whole notebook was rescued to {} \
                     (the output file keeps its last complete save)",
                    r.display()
                ),
                Err(r) => format!("cannot write the output: {e}; nor rescue it: {r}"),
            })
        }),
    }
}

/// The last save failed (a full disk, a directory gone): the notebook goes
/// to `$XDG_STATE_HOME/noyau/unsaved/` rather than being lost.
fn rescue(nb: &Notebook, output: &Path) -> Result<PathBuf, String> {
    let dir = noyau_sched::state_dir().join("unsaved");
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "notebook".into());
    let path = dir.join(format!(
        "{stem}-{}-{}.ipynb",
        chrono::Local::now().format("%Y%m%d-%H%M%S"),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)
        .and_then(|()| noyau_notebook::write_atomic(&path, nb.to_json_string().as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

struct Runner<'a> {
    nb: Notebook,
    builder: OutputBuilder,
    saver: Saver,
    progress: Progress,
    args: &'a RunArgs,
    /// The next cell's request, already sent so the kernel never waits for
    /// us between cells: (cell index, msg_id).
    ahead: Option<(usize, String)>,
    /// Messages for the request sent ahead that came before its turn.
    early: std::collections::VecDeque<KernelMessage>,
    /// The notebook has `%%noyau on` cells: no cell is sent ahead.
    delegating: bool,
    /// Kernels of `%%noyau on` targets, started on first use.
    targets: std::collections::BTreeMap<String, RemoteKernel>,
    /// The notebook's kernelspec (a target's default).
    target_base: String,
    /// The batch job and when it ends, once a walltime warning said so.
    walltime: Option<(String, Instant)>,
    status: StatusFile,
    /// The environment and data files prepared before the kernel started.
    prepared: noyau_env::Prepared,
}

fn runnable(cell: &noyau_notebook::Cell) -> bool {
    cell.is_code() && !cell.source.trim().is_empty() && !cell.has_tag("skip-execution")
}

impl Runner<'_> {
    /// Returns (exit code, whether the kernel is still alive).
    async fn run_cells(
        &mut self,
        kernel: &mut RemoteKernel,
        signals: &mut Signals,
        run_start: chrono::DateTime<chrono::Utc>,
    ) -> (i32, bool) {
        let total = self.nb.cells.len();
        let mut i = 0;
        while i < self.nb.cells.len() {
            let start = chrono::Utc::now();
            pm::cell_start(&mut self.nb.cells[i], &pm::iso(start));
            if !runnable(&self.nb.cells[i]) {
                pm::cell_complete(&mut self.nb.cells[i], start);
                self.progress.cell_done();
                self.status.cell_done();
                i += 1;
                continue;
            }
            self.progress.cell_start(i, total, &self.nb.cells[i].source);
            let may_raise = self.args.allow_errors || self.nb.cells[i].has_tag("raises-exception");
            let end = match magic::parse(&self.nb.cells[i].source) {
                Ok(Magic::None) => self.run_cell(kernel, signals, i, may_raise, None).await,
                Ok(Magic::On(m, body)) => self.run_on_target(m, body, signals, i, may_raise).await,
                Ok(Magic::Line(words)) => self.line_magic(&words, i).await,
                Err(usage) => self.cell_error(i, "UsageError", usage),
            };
            let exec_count = self.nb.cells[i].execution_count();
            let stop = match end {
                CellEnd::Ok => None,
                CellEnd::Error { ename, evalue } => {
                    let sys_exit = ename == "SystemExit" && (evalue.is_empty() || evalue == "0");
                    if may_raise && !sys_exit {
                        None
                    } else {
                        pm::cell_exception(&mut self.nb, i);
                        if sys_exit {
                            Some((exit::OK, true, None))
                        } else {
                            eprintln!(
                                "noyau: cell {} (In [{}]) raised {ename}: {evalue}",
                                i + 1,
                                exec_count.map_or("None".into(), |n| n.to_string())
                            );
                            Some((exit::CELL_ERROR, true, None))
                        }
                    }
                }
                CellEnd::Died(desc) => {
                    pm::cell_exception(&mut self.nb, i);
                    let text = format!("Kernel died: {desc}");
                    self.nb.cells[i]
                        .outputs_mut()
                        .push(noyau_error_output("DeadKernelError", &text));
                    eprintln!("noyau: cell {} : the kernel died: {desc}", i + 1);
                    Some((exit::KERNEL_DIED, false, None))
                }
                CellEnd::Timeout(secs) => {
                    pm::cell_exception(&mut self.nb, i);
                    let text = format!("Cell execution timed out after {secs} s (--timeout)");
                    self.nb.cells[i]
                        .outputs_mut()
                        .push(noyau_error_output("CellTimeoutError", &text));
                    eprintln!("noyau: cell {}: {text}", i + 1);
                    Some((exit::TIMEOUT, !kernel.is_dead(), None))
                }
                CellEnd::Signal(name, code) => {
                    pm::cell_exception(&mut self.nb, i);
                    eprintln!("noyau: {name}: saving the output and stopping");
                    Some((code, false, Some(name.to_string())))
                }
                CellEnd::Walltime { job, seconds_left } => {
                    pm::cell_exception(&mut self.nb, i);
                    let when = match seconds_left {
                        Some(s) => format!(" (in about {s} s)"),
                        None => String::new(),
                    };
                    let text = format!(
                        "walltime reached: the batch job {job} ends at its time limit{when}; \
                         noyau stopped the run and saved every finished cell"
                    );
                    self.nb.cells[i]
                        .outputs_mut()
                        .push(noyau_error_output("WalltimeError", &text));
                    eprintln!("noyau: cell {}: {text}", i + 1);
                    Some((
                        exit::WALLTIME,
                        false,
                        Some(format!("the walltime of batch job {job}")),
                    ))
                }
            };
            pm::cell_complete(&mut self.nb.cells[i], start);
            self.progress.cell_done();
            self.status.cell_done();
            if let Some((code, alive, signal)) = stop {
                let markers = code != exit::OK;
                pm::notebook_complete(&mut self.nb, run_start, false);
                if let Some(name) = signal {
                    pm::add_stop_marker(&mut self.nb, &name, Some((i, exec_count)));
                } else if markers {
                    pm::add_error_markers(&mut self.nb, i, exec_count);
                }
                return (code, alive);
            }
            self.saver.cell_finished(&self.nb);
            i += 1;
        }
        pm::notebook_complete(&mut self.nb, run_start, true);
        (exit::OK, true)
    }

    async fn run_cell(
        &mut self,
        kernel: &mut RemoteKernel,
        signals: &mut Signals,
        i: usize,
        may_raise: bool,
        code: Option<String>,
    ) -> CellEnd {
        let code = code.unwrap_or_else(|| self.nb.cells[i].source.clone());
        self.nb.cells[i]
            .metadata
            .insert("execution".into(), json!({}));
        let _ = self.builder.start_cell(&mut self.nb, i);
        let opts = ExecuteOptions {
            stop_on_error: !may_raise,
            ..Default::default()
        };
        // What came early was for this cell (the one sent ahead); what comes
        // early from now on is for the next.
        let mut backlog = std::mem::take(&mut self.early);
        let id = match self.ahead.take() {
            Some((j, id)) if j == i => id,
            _ => match kernel.execute_request(&code, &opts) {
                Ok(id) => id,
                Err(e) => return self.died(e),
            },
        };
        // Send the next cell now: the kernel runs it as soon as this one ends,
        // and if this one fails, stop_on_error makes the kernel abort it. Not
        // with a timeout (an interrupt could hit the next cell) nor when this
        // cell may raise (the next must not run if this one calls sys.exit).
        if self.args.timeout.is_none() && !may_raise && !self.delegating {
            if let Some(j) = (i + 1..self.nb.cells.len()).find(|&j| runnable(&self.nb.cells[j])) {
                let next_may_raise =
                    self.args.allow_errors || self.nb.cells[j].has_tag("raises-exception");
                let opts = ExecuteOptions {
                    stop_on_error: !next_may_raise,
                    ..Default::default()
                };
                if let Ok(next) = kernel.execute_request(&self.nb.cells[j].source, &opts) {
                    self.ahead = Some((j, next));
                }
            }
        }
        let deadline = self
            .args
            .timeout
            .map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let mut reply: Option<Value> = None;
        let mut idle = false;
        loop {
            if reply.is_some() && idle {
                break;
            }
            let m = match backlog.pop_front() {
                Some(m) => Ok(m),
                None => {
                    let save_at = self.saver.due();
                    tokio::select! {
                        biased;
                        (name, code) = signals.recv() => {
                            if code == exit::WALLTIME {
                                return CellEnd::Walltime {
                                    job: allocation().unwrap_or_else(|| "?".into()),
                                    seconds_left: None,
                                };
                            }
                            return CellEnd::Signal(name, code);
                        }
                        _ = sleep_until(deadline) => {
                            let _ = kernel.interrupt();
                            // Give the interrupted cell a moment to report.
                            return self.drain_after_timeout(kernel, i, &id).await;
                        }
                        _ = sleep_until(save_at) => {
                            self.saver.on_due(&self.nb);
                            continue;
                        }
                        e = kernel.next_event() => match e {
                            Ok(KernelEvent::Message(m)) => Ok(m),
                            Ok(KernelEvent::Walltime(w)) => {
                                if let Some(end) = self.on_walltime(w) {
                                    return end;
                                }
                                continue;
                            }
                            Err(e) => Err(e),
                        },
                    }
                }
            };
            let m = match m {
                // The kernel died after this cell ended (its reply, or IOPub
                // idle, came; with the next cell sent ahead, a kernel killed by
                // that cell can lose this one's last IOPub messages): the cell
                // itself is done, the death belongs to the next one.
                Err(_) if idle || reply.is_some() => {
                    let _ = self.builder.finish_cell(&mut self.nb, i);
                    return match reply
                        .as_ref()
                        .and_then(|r| r.get("status"))
                        .and_then(Value::as_str)
                    {
                        Some("error") => {
                            let s = |k: &str| {
                                reply
                                    .as_ref()
                                    .and_then(|r| r.get(k))
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_string()
                            };
                            CellEnd::Error {
                                ename: s("ename"),
                                evalue: s("evalue"),
                            }
                        }
                        Some(_) => CellEnd::Ok,
                        None => self.end_from_outputs(i),
                    };
                }
                // Neither this cell's reply nor its idle came, and the next
                // cell was already sent: a kernel killed as the next cell
                // began can lose this one's last messages too, so which of
                // the two killed it cannot be told; say so.
                Err(e) if self.ahead.is_some() => {
                    return match self.died(e) {
                        CellEnd::Died(desc) => CellEnd::Died(format!(
                            "{desc} (while running this cell or the next one, which was \
                             already sent to it: its last messages were lost)"
                        )),
                        other => other,
                    };
                }
                Err(e) => return self.died(e),
                Ok(m) => m,
            };
            if m.parent_id.as_deref() != Some(id.as_str()) {
                if self
                    .ahead
                    .as_ref()
                    .is_some_and(|(_, a)| m.parent_id.as_deref() == Some(a.as_str()))
                {
                    self.early.push_back(m);
                }
                continue;
            }
            match m.lane {
                Lane::Iopub => idle |= self.on_iopub(i, &m),
                Lane::Shell if m.msg_type == "execute_reply" => {
                    if let Some(e) = self.nb.cells[i]
                        .metadata
                        .get_mut("execution")
                        .and_then(Value::as_object_mut)
                    {
                        e.insert("shell.execute_reply".into(), timestamp(&m).into());
                    }
                    reply = Some(m.content);
                }
                _ => {}
            }
        }
        let _ = self.builder.finish_cell(&mut self.nb, i);
        let content = reply.unwrap_or(Value::Null);
        if content.get("status").and_then(Value::as_str) == Some("error") {
            let s = |k: &str| {
                content
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            return CellEnd::Error {
                ename: s("ename"),
                evalue: s("evalue"),
            };
        }
        CellEnd::Ok
    }

    /// A `%%noyau on TARGET` cell: its body runs in the target's kernel
    /// (started on first use from the profile), its outputs in this cell.
    async fn run_on_target(
        &mut self,
        mut m: magic::OnMagic,
        body: String,
        signals: &mut Signals,
        i: usize,
        may_raise: bool,
    ) -> CellEnd {
        let body = match m.tasks {
            Some(n) => {
                if !m.overrides.iter().any(|o| o.starts_with("ntasks=")) {
                    m.overrides.push(format!("ntasks={n}"));
                }
                noyau_sched::fan_out(&body, n)
            }
            None => body,
        };
        if !self.targets.contains_key(&m.target) {
            if let Err(e) = self.start_target(&m).await {
                return self.cell_error(
                    i,
                    "NoyauTargetError",
                    format!("cannot start target {:?}: {e:#}", m.target),
                );
            }
        }
        let Some(mut t) = self.targets.remove(&m.target) else {
            return self.cell_error(i, "NoyauTargetError", "the target is gone".into());
        };
        let end = self
            .run_cell(&mut t, signals, i, may_raise, Some(body))
            .await;
        let where_ =
            json!({"target": m.target, "backend": t.backend, "job_id": t.job_id(), "host": t.host});
        if let Some(md) = self.nb.cells[i]
            .metadata
            .get_mut("noyau")
            .and_then(Value::as_object_mut)
        {
            md.insert("target".into(), where_);
        } else {
            self.nb.cells[i]
                .metadata
                .insert("noyau".into(), json!({"target": where_}));
        }
        self.targets.insert(m.target, t);
        end
    }

    async fn start_target(&mut self, m: &magic::OnMagic) -> anyhow::Result<()> {
        let (backend, profile) = noyau_config::resolve(None, Some(&m.target), &m.overrides)?;
        let inner = profile
            .kernel
            .clone()
            .unwrap_or_else(|| self.target_base.clone());
        let mut launch = noyau_client::remote::local_launch(&inner, self.args.cwd.clone());
        if let Some(e) = m.env.as_deref().or(profile.environment.as_deref()) {
            // The target's own environment, prepared here like the kernel's.
            let cwd = std::env::current_dir()?;
            let declared = noyau_env::sources::Declared {
                spec: noyau_env::sources::merge(&[noyau_env::sources::from_cli(e, &cwd)?], &cwd)?,
                data: Vec::new(),
            };
            let progress = &self.progress;
            let mut p =
                noyau_client::prepare::prepare(&declared, |l| progress.environment(l)).await?;
            p.data = self.prepared.data.clone();
            launch.env = noyau_client::prepare::job_env(declared.spec.as_ref(), &p);
        }
        launch.backend = backend;
        launch.job_name = format!("noyau-target-{}", m.target);
        launch.profile = profile;
        let timeout = Duration::from_secs_f64(self.args.start_timeout.max(0.1));
        self.progress.log(&format!(
            "noyau: starting target {} ({})\n",
            m.target, launch.backend
        ));
        let kernel = RemoteKernel::start_until(launch, timeout, std::future::pending()).await?;
        self.targets.insert(m.target.clone(), kernel);
        Ok(())
    }

    /// `%noyau …` in a headless run: `release` ends a target; the rest is
    /// for interactive kernels.
    async fn line_magic(&mut self, words: &[String], i: usize) -> CellEnd {
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        match words.as_slice() {
            ["release", name] | ["cancel", name] => {
                if let Some(t) = self.targets.remove(*name) {
                    t.shutdown(Duration::from_secs(5)).await;
                }
                CellEnd::Ok
            }
            ["data", args @ ..] => {
                let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
                match crate::environment::data_cell(&self.prepared, &args) {
                    Ok(text) => {
                        self.nb.cells[i].outputs_mut().push(
                            json!({"output_type": "stream", "name": "stdout", "text": text}),
                        );
                        CellEnd::Ok
                    }
                    Err(e) => self.cell_error(i, "NoyauDataError", e),
                }
            }
            ["env", ..] => self.cell_error(
                i,
                "NoyauMagicError",
                format!("`%noyau {}` is for interactive kernels; `noyau run` takes the environment from --env, \
                         metadata.noyau.environment or [environment] in noyau.toml, and records it in the output's metadata", words.join(" ")),
            ),
            other => self.cell_error(
                i,
                "NoyauMagicError",
                format!("`%noyau {}` is for interactive kernels; `noyau run` handles %%noyau on and %noyau release", other.join(" ")),
            ),
        }
    }

    /// Records an error noyau itself raised for cell `i`.
    fn cell_error(&mut self, i: usize, ename: &str, evalue: String) -> CellEnd {
        self.nb.cells[i]
            .outputs_mut()
            .push(noyau_error_output(ename, &evalue));
        CellEnd::Error {
            ename: ename.into(),
            evalue,
        }
    }

    /// A finished cell's end, read from its outputs (an `error` output
    /// means it failed), for when its reply never came.
    fn end_from_outputs(&self, i: usize) -> CellEnd {
        let error = self.nb.cells[i]
            .outputs
            .iter()
            .flatten()
            .find(|o| o.get("output_type").and_then(Value::as_str) == Some("error"));
        match error {
            Some(o) => {
                let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                CellEnd::Error {
                    ename: s("ename"),
                    evalue: s("evalue"),
                }
            }
            None => CellEnd::Ok,
        }
    }

    async fn drain_after_timeout(
        &mut self,
        kernel: &mut RemoteKernel,
        i: usize,
        id: &str,
    ) -> CellEnd {
        let secs = self.args.timeout.unwrap_or(0.0);
        let until = Instant::now() + Duration::from_secs(5);
        let (mut reply, mut idle) = (false, false);
        while !(reply && idle) {
            let m = tokio::select! {
                m = kernel.next() => m,
                _ = tokio::time::sleep_until(until.into()) => break,
            };
            let Ok(m) = m else { break };
            if m.parent_id.as_deref() != Some(id) {
                continue;
            }
            match m.lane {
                Lane::Iopub => idle |= self.on_iopub(i, &m),
                _ => reply |= m.msg_type == "execute_reply",
            }
        }
        CellEnd::Timeout(secs)
    }

    /// One IOPub message of cell `i`; true on `idle`.
    fn on_iopub(&mut self, i: usize, m: &KernelMessage) -> bool {
        let exec = |nb: &mut Notebook, k: &str| {
            if let Some(e) = nb.cells[i]
                .metadata
                .get_mut("execution")
                .and_then(Value::as_object_mut)
            {
                e.insert(k.into(), timestamp(m).into());
            }
        };
        match m.msg_type.as_str() {
            "status" => {
                match m.content.get("execution_state").and_then(Value::as_str) {
                    Some("busy") => exec(&mut self.nb, "iopub.status.busy"),
                    Some("idle") => {
                        exec(&mut self.nb, "iopub.status.idle");
                        return true;
                    }
                    _ => {}
                }
                return false;
            }
            "execute_input" => {
                exec(&mut self.nb, "iopub.execute_input");
                if let Some(n) = m.content.get("execution_count") {
                    self.nb.cells[i].set_execution_count(n.as_i64());
                }
                return false;
            }
            _ => {}
        }
        if self.args.log_output {
            self.log(m);
        }
        match self
            .builder
            .handle(&mut self.nb, i, &m.msg_type, &m.content)
        {
            Ok(noyau_notebook::OutputEvent::Ignored) => {}
            Ok(_) => self.saver.output_changed(),
            Err(e) => tracing::warn!("an output could not be recorded: {e}"),
        }
        false
    }

    fn log(&self, m: &KernelMessage) {
        let c = &m.content;
        let text = match m.msg_type.as_str() {
            "stream" => c.get("text").and_then(Value::as_str).map(str::to_string),
            "error" => c.get("traceback").and_then(Value::as_array).map(|t| {
                let mut s = t
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n");
                s.push('\n');
                s
            }),
            "execute_result" | "display_data" => c
                .get("data")
                .and_then(|d| d.get("text/plain"))
                .and_then(Value::as_str)
                .map(|t| format!("{t}\n")),
            _ => None,
        };
        if let Some(t) = text {
            self.progress.log(&t);
        }
    }
}

impl Runner<'_> {
    /// A kernel that is gone: at (or past) the walltime a warning announced,
    /// or by Slurm's TIMEOUT, that is the walltime, not a crash.
    fn died(&self, e: KernelError) -> CellEnd {
        let desc = match e {
            KernelError::Died(d) => d,
            other => other.to_string(),
        };
        let past_end = self
            .walltime
            .as_ref()
            .is_some_and(|(_, end)| Instant::now() + Duration::from_secs(5) >= *end);
        if past_end || desc.contains("walltime") {
            let job = self
                .walltime
                .as_ref()
                .map(|(j, _)| j.clone())
                .unwrap_or_else(|| "?".into());
            return CellEnd::Walltime {
                job,
                seconds_left: Some(0),
            };
        }
        CellEnd::Died(desc)
    }

    /// A walltime notice from the agent: a warning is logged; the early
    /// signal ends the cell (Some).
    fn on_walltime(&mut self, w: Walltime) -> Option<CellEnd> {
        match w {
            Walltime::Warning { job, seconds_left } => {
                self.walltime = Some((
                    job.clone(),
                    Instant::now() + Duration::from_secs(seconds_left),
                ));
                self.progress.log(&format!(
                    "noyau: walltime: batch job {job} ends in {} (at its time limit); \
                     the run will be saved and stopped then\n",
                    human(seconds_left)
                ));
                None
            }
            Walltime::Near { job, seconds_left } => Some(CellEnd::Walltime { job, seconds_left }),
        }
    }
}

/// `9 min 58 s`.
fn human(secs: u64) -> String {
    match (secs / 60, secs % 60) {
        (0, s) => format!("{s} s"),
        (m, 0) => format!("{m} min"),
        (m, s) => format!("{m} min {s} s"),
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// An `error` output for a failure noyau itself detected (not the kernel's),
/// with a one-line traceback so frontends that only show tracebacks show it.
fn noyau_error_output(ename: &str, evalue: &str) -> serde_json::Value {
    json!({
        "output_type": "error", "ename": ename, "evalue": evalue,
        "traceback": [format!("{ename}: {evalue}")],
    })
}
