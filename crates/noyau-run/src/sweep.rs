//! `noyau sweep`: one notebook run over a parameter set, one output
//! notebook per point, and a summary of them all.
//!
//! The points (a `--grid` product, or a YAML file's `grid`/`points`) are
//! written once to a plan, a 0600 file in noyau's private state directory
//! (`STATE/sweeps/`: OUTDIR is often in a shared project or scratch
//! directory, and whoever could change the plan there would choose what
//! each task runs). Each point is then run by `noyau sweep-task PLAN
//! --index I`, which is `noyau run` headless on that point with a local
//! kernel, and which writes the point's result to `OUTDIR/results/I.json`
//! when it ends. OUTDIR must be the user's and writable by no one else
//! (checked by the sweep and again by each task); the files noyau writes
//! there replace what is at their paths, never write through a link, and
//! those it reads back (results, the summary) are read only when they are
//! the user's:
//!
//! * with Slurm, the whole set is ONE job array (`--array=0-N%K`): each
//!   array task is a runner inside its allocation, like `noyau run
//!   --detach` (no link to this host, no secret anywhere: the kernel's key
//!   is made inside the task);
//! * with OAR, likewise ONE job array (`--array-param-file`, a point index
//!   per line); OAR has no `%K`, so beyond K points the tasks are submitted
//!   held and the sweep releases them K at a time as it polls;
//! * locally, the tasks are child processes, K at a time.
//!
//! The sweep command waits, showing progress, and writes `summary.json`
//! and `summary.csv` (parameters, status, duration, output path) when all
//! are done. Ctrl-C (or SIGTERM) cancels what runs (running points save
//! their finished cells and a marker, as `noyau run` does on SIGTERM), the
//! summary is still written, and the exit code is 130. `--retry-failed`
//! reads the summary and reruns only the points that are not `ok`.

use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use noyau_notebook::{Param, Parameters};
use noyau_trust::{Expect, Mode, TrustError};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};

use crate::error::{bad, untrusted, RunError};
use crate::exit;
use crate::options::RunOptions;

/// Exit codes of `noyau sweep`.
pub mod sweep_exit {
    /// Every point ran to the end (status `ok`).
    pub const OK: i32 = 0;
    /// At least one point did not (see the summary's statuses).
    pub const SOME_FAILED: i32 = 1;
    /// Bad input or usage, or the job array could not be submitted.
    pub const BAD_INPUT: i32 = 2;
    /// Stopped by Ctrl-C / SIGTERM: running points were cancelled and saved.
    pub const INTERRUPTED: i32 = 130;
}

pub const SWEEP_HELP: &str = "\
Each point's output is OUTDIR/<name>-<index>.ipynb; OUTDIR/summary.json and summary.csv list
every point's parameters, status, exit code, duration and output when all are done.
Statuses: ok, failed (a cell raised), error (bad input), kernel died, timeout,
kernel start failed, walltime, cancelled, not run (no result: never started, or killed).

With --backend slurm the whole set is one job array (--array=0-N%K); each task runs the
notebook headless inside its allocation. With --backend oar it is one OAR job array
(--array-param-file); OAR cannot limit how many tasks run at once, so beyond K points the
tasks are submitted held and this command releases them K at a time (if it is killed,
the held tasks stay held: `noyau cancel` them, or rerun with --retry-failed).
Ctrl-C cancels the running points (they save their finished cells), writes the summary
and exits 130.

A sweep file (-f) is YAML:
  parameters: {common: 1}        # given to every point
  grid: {alpha: [0.1, 0.2], n: [10, 20]}   # the product of these lists
  points: [{alpha: 0.5, n: 7}]   # or: explicit points (not with grid)

Exit codes: 0 every point ok; 1 some point not ok; 2 bad input or submission error;
130 interrupted.";

/// A sweep: one notebook run over a parameter grid, one output per point,
/// a summary. The fields are the command line's (`noyau sweep --help`
/// documents them).
#[derive(Debug, Clone, Default)]
pub struct SweepOptions {
    pub notebook: PathBuf,
    pub grid: Vec<String>,
    pub file: Option<PathBuf>,
    pub max_parallel: usize,
    pub retry_failed: bool,
    pub output_dir: Option<PathBuf>,
    pub backend: Option<String>,
    pub profile: Option<String>,
    pub options: Vec<String>,
    pub kernel: Option<String>,
    pub timeout: Option<f64>,
    pub start_timeout: f64,
    pub allow_errors: bool,
}

/// `noyau sweep-task`: one point of a sweep (run by the sweep, not by hand).
#[derive(Debug, Clone)]
pub struct SweepTask {
    /// The sweep's plan (a file of the user's in STATE/sweeps)
    pub plan: PathBuf,
    /// The point [default: $NOYAU_ARRAY_TASK_ID, which a job array's script exports]
    pub index: Option<usize>,
}

/// This program, which each point runs as `noyau sweep-task`.
fn noyau_exe() -> Result<PathBuf, RunError> {
    std::env::current_exe().map_err(bad_io("cannot find this program", Path::new("noyau")))
}

fn bad_io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RunError {
    RunError::io(what, path.to_path_buf())
}

/// `name=v1,v2` → (name, typed values).
pub fn parse_grid(arg: &str) -> Result<(String, Vec<Param>), RunError> {
    let (name, values) = arg
        .split_once('=')
        .ok_or_else(|| bad(format!("--grid {arg:?}: expected NAME=V1,V2,...")))?;
    let name = name.trim();
    noyau_notebook::check_name(name).map_err(|e| bad(format!("--grid {arg:?}: {e}")))?;
    if values.is_empty() {
        return Err(bad(format!("--grid {arg:?}: no values")));
    }
    Ok((
        name.to_string(),
        values.split(',').map(Param::from_cli).collect(),
    ))
}

/// What a sweep file says.
#[derive(Debug, Default)]
pub struct SweepSpec {
    pub common: Parameters,
    pub grid: Vec<(String, Vec<Param>)>,
    pub points: Vec<Parameters>,
}

/// A sweep file (YAML: parameters, grid, points).
pub fn parse_file(text: &str) -> Result<SweepSpec, RunError> {
    let doc = crate::yaml::parse(text).map_err(|e| bad(e.to_string()))?;
    let mut spec = SweepSpec::default();
    let entries = match doc {
        Param::None => return Ok(spec),
        Param::Dict(d) => d,
        _ => return Err(bad("expected a mapping with parameters, grid or points")),
    };
    for (k, v) in entries {
        match (k.as_str(), v) {
            ("parameters", v) => spec
                .common
                .merge(v)
                .map_err(|e| bad(format!("parameters: {e}")))?,
            ("grid", Param::Dict(g)) => {
                for (name, values) in g {
                    noyau_notebook::check_name(&name).map_err(|e| bad(format!("grid: {e}")))?;
                    let values = match values {
                        Param::List(l) if !l.is_empty() => l,
                        Param::List(_) => return Err(bad(format!("grid: {name} has no values"))),
                        one => vec![one],
                    };
                    spec.grid.push((name, values));
                }
            }
            ("grid", _) => return Err(bad("grid: expected a mapping NAME: [values]")),
            ("points", Param::List(l)) => {
                for (i, p) in l.into_iter().enumerate() {
                    let mut params = Parameters::new();
                    params
                        .merge(p)
                        .map_err(|e| bad(format!("points[{i}]: {e}")))?;
                    spec.points.push(params);
                }
            }
            ("points", _) => return Err(bad("points: expected a list of mappings")),
            (other, _) => {
                return Err(bad(format!(
                    "unknown key `{other}`{}; a sweep file has parameters, grid, points",
                    noyau_config::suggest(other, ["parameters", "grid", "points"])
                )))
            }
        }
    }
    Ok(spec)
}

/// The most points one sweep expands to (its plan and tally hold them all
/// on the login node).
const MAX_POINTS: usize = 100_000;

/// Every point: the grid's product (first name varies slowest), or the
/// explicit points, each with the common parameters first.
pub fn expand(spec: &SweepSpec) -> Result<Vec<Parameters>, RunError> {
    if !spec.points.is_empty() && !spec.grid.is_empty() {
        return Err(bad("give either a grid or explicit points, not both"));
    }
    if !spec.points.is_empty() {
        return Ok(spec
            .points
            .iter()
            .map(|p| {
                let mut all = spec.common.clone();
                for (k, v) in p.iter() {
                    all.set(k, v.clone());
                }
                all
            })
            .collect());
    }
    if spec.grid.is_empty() {
        return Ok(vec![]);
    }
    // Counted before it is made: ten names of ten values are 10^10 points.
    let n = (spec.grid.iter()).try_fold(1usize, |n, (_, values)| n.checked_mul(values.len()));
    if n.is_none_or(|n| n > MAX_POINTS) {
        let sizes: Vec<_> = spec.grid.iter().map(|(_, v)| v.len().to_string()).collect();
        return Err(bad(format!(
            "the grid makes {} points, more than a sweep takes ({MAX_POINTS}): split it",
            sizes.join(" × ")
        )));
    }
    let mut acc = vec![spec.common.clone()];
    for (name, values) in &spec.grid {
        acc = acc
            .iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut q = p.clone();
                    q.set(name.clone(), v.clone());
                    q
                })
            })
            .collect();
    }
    Ok(acc)
}

/// A point's status from its runner's exit code.
pub fn status_of(code: i32) -> &'static str {
    match code {
        exit::OK => "ok",
        exit::CELL_ERROR => "failed",
        exit::BAD_INPUT => "error",
        exit::KERNEL_DIED => "kernel died",
        exit::TIMEOUT => "timeout",
        exit::KERNEL_START => "kernel start failed",
        exit::WALLTIME => "walltime",
        exit::SIGINT | exit::SIGTERM => "cancelled",
        _ => "error",
    }
}

/// Replaces `path` with `text` (mode `mode`): what was there, a link
/// another user planted included, is replaced, never written through.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), RunError> {
    noyau_trust::replace(path, text.as_bytes(), mode).map_err(|e| bad(e.to_string()))
}

/// How a point's result (written by the task, read back by the sweep) must be.
fn result_file() -> Expect {
    Expect::file()
}

/// How the summary (0644: the user's to share) must be when `--retry-failed`
/// reads it back.
fn summary_file() -> Expect {
    Expect::file().mode(Mode::NoOthersWrite)
}

/// Makes `dir` (and its parents) where missing, 0755 less the umask, then
/// checks it as [`check_dir`] does.
fn own_dir(dir: &Path) -> Result<(), RunError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(bad_io("cannot make", dir))?;
    check_dir(dir)
}

/// `dir` must be a directory of the user's (not a link) that no one else
/// can write: another user could otherwise plant or swap the files the
/// sweep and its tasks write and read there.
fn check_dir(dir: &Path) -> Result<(), RunError> {
    Expect::dir()
        .mode(Mode::NoOthersWrite)
        .check(dir)
        .map(drop)
        .map_err(untrusted(
            "a sweep writes only in directories of yours that no one else can write (or give another -o)",
        ))
}

fn abs(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    }
}

fn results_dir(outdir: &Path) -> PathBuf {
    outdir.join("results")
}

fn result_path(outdir: &Path, i: usize) -> PathBuf {
    results_dir(outdir).join(format!("{i}.json"))
}

/// The JSON of the file at `path`, read from what was opened when `expect`
/// trusts it (never through a link, never waiting on a FIFO).
fn read_json(path: &Path, expect: Expect) -> Result<Value, TrustError> {
    let mut text = String::new();
    expect
        .open(path)?
        .read_to_string(&mut text)
        .map_err(|e| TrustError::io("read", path, e))?;
    serde_json::from_str(&text).map_err(|e| TrustError::io("parse", path, e.into()))
}

// ---------------------------------------------------------------- the task

/// `noyau sweep-task`: runs one point, writes its result; returns the
/// runner's exit code.
pub fn task_main(a: SweepTask) -> i32 {
    let t = match TaskPoint::read(&a) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("noyau sweep-task: {}", crate::shown(&e));
            return exit::BAD_INPUT;
        }
    };
    let run = point_run(&t.plan, &t.point, &t.output);
    let t0 = Instant::now();
    let code = crate::main(run);
    let result = json!({
        "index": t.index,
        "status": status_of(code),
        "exit_code": code,
        "duration_s": (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        "output": t.output,
        "job": crate::detach::allocation(),
    });
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    if let Err(e) = write_file(&result_path(&t.outdir, t.index), &text, 0o600) {
        eprintln!(
            "noyau sweep-task: cannot write the result of point {}: {e}",
            t.index
        );
    }
    code
}

/// A task's point, from its plan, and where it writes.
#[derive(Debug)]
struct TaskPoint {
    plan: Value,
    index: usize,
    point: Value,
    output: String,
    outdir: PathBuf,
}

impl TaskPoint {
    /// The plan is used only as a 0600 file of the user's (not a link, nor
    /// a FIFO, which would block), and the output directory, its results
    /// and the point's output only if still the user's alone: the task may
    /// start long after the sweep checked them.
    fn read(a: &SweepTask) -> Result<TaskPoint, RunError> {
        let plan = read_json(&a.plan, Expect::file()).map_err(untrusted("the sweep's plan"))?;
        let index = (a.index.or_else(noyau_sched::array_task))
            .ok_or_else(|| bad("no --index, and not a task of a job array"))?;
        let point = (plan["points"].as_array())
            .and_then(|p| p.iter().find(|p| p["index"].as_u64() == Some(index as u64)))
            .cloned()
            .ok_or_else(|| bad(format!("the plan has no point {index}")))?;
        if plan["notebook_copy"].as_str().is_none() {
            return Err(bad(
                "the sweep's plan keeps no copy of the notebook (an older noyau wrote it): run the sweep again",
            ));
        }
        let output = point["output"].as_str().unwrap_or_default().to_string();
        let outdir = PathBuf::from(plan["output_dir"].as_str().unwrap_or_default());
        check_dir(&outdir)?;
        own_dir(&results_dir(&outdir))?;
        check_output(Path::new(&output))?;
        Ok(TaskPoint {
            plan,
            index,
            point,
            output,
            outdir,
        })
    }
}

/// A point's output is saved through a link at its path (`noyau run`
/// keeps a user's link): its directory must be the user's alone, and what
/// is there now a file of the user's, not a link.
fn check_output(output: &Path) -> Result<(), RunError> {
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        check_dir(dir)?;
    }
    match Expect::file().mode(Mode::Any).check(output) {
        Err(e) if !e.is_not_found() => Err(untrusted("the point's output")(e)),
        _ => Ok(()),
    }
}

/// The run of one point: the notebook headless with a local kernel (in
/// the array task's allocation), the point's parameters preset.
fn point_run(plan: &Value, point: &Value, output: &str) -> RunOptions {
    let mut preset = Parameters::new();
    if let Some(Value::Object(m)) = point.get("parameters") {
        for (k, v) in m {
            preset.set(k.clone(), Param::from_json(v));
        }
    }
    RunOptions {
        input: plan["notebook"].as_str().unwrap_or_default().to_string(),
        input_copy: plan["notebook_copy"].as_str().map(PathBuf::from),
        input_dir: (plan["notebook_dir_id"].as_str()).and_then(crate::input::SubmittedDir::parse),
        output: Some(output.to_string()),
        no_progress: true,
        backend: Some("local".into()),
        start_timeout: plan["start_timeout"].as_f64().unwrap_or(60.0),
        kernel: plan["kernel"].as_str().map(str::to_string),
        timeout: plan["timeout"].as_f64(),
        allow_errors: plan["allow_errors"].as_bool() == Some(true),
        stream_mode: "coalesce".into(),
        preset,
        ..Default::default()
    }
}

// ---------------------------------------------------------------- the sweep

/// Runs `noyau sweep`; returns the exit code.
pub fn main(args: SweepOptions) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("noyau sweep: cannot start: {e}");
            return sweep_exit::BAD_INPUT;
        }
    };
    match rt.block_on(crate::settled(sweep(args))) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("noyau sweep: error: {}", crate::shown(&e));
            sweep_exit::BAD_INPUT
        }
    }
}

struct Point {
    index: usize,
    params: Value,
    output: PathBuf,
}

/// The sweep's points, and those to run now (all, or with
/// `--retry-failed` those of the last summary that are not ok).
struct Points {
    all: Vec<Point>,
    todo: Vec<usize>,
    /// The last summary's rows, when retrying.
    previous: Option<Vec<Value>>,
}

/// The sweep's notebook, its name (the outputs' stem) and the output
/// directory.
struct Where {
    notebook: PathBuf,
    /// The notebook as read (what it declares is prepared here).
    nb: noyau_notebook::Notebook,
    /// The directory it was read from, anchored.
    project: noyau_trust::anchor::ProjectDir,
    /// Its bytes as read: the copy the tasks run.
    bytes: Vec<u8>,
    stem: String,
    outdir: PathBuf,
}

async fn sweep(a: SweepOptions) -> Result<i32, RunError> {
    if a.max_parallel == 0 {
        return Err(bad("--max-parallel must be at least 1"));
    }
    let w = where_of(&a)?;
    let summary_path = w.outdir.join("summary.json");
    let p = points(&a, &w, &summary_path)?;
    if p.todo.is_empty() {
        eprintln!(
            "noyau sweep: every point of {} is ok: nothing to retry",
            summary_path.display()
        );
        return Ok(sweep_exit::OK);
    }
    let plan = write_plan(&a, &w, &p)?;
    let plan_path = &plan.path;
    // Built and fetched once, here, for every point.
    let env = crate::environment::for_job(&w.nb, &w.project, None, true).await?;
    let (backend, profile) =
        crate::kernel::backend_and_profile(a.backend.as_deref(), a.profile.as_deref(), &a.options)?;
    eprintln!(
        "noyau sweep: {} point(s) of {} ({backend}), at most {} at a time; outputs in {}",
        p.todo.len(),
        w.notebook.display(),
        a.max_parallel,
        w.outdir.display()
    );
    let t0 = Instant::now();
    let (interrupted, job_id) = match backend.as_str() {
        "local" => (
            run_local(&a, plan_path, &w.outdir, &p.todo, &env).await?,
            None,
        ),
        _ => {
            let mut env = env;
            env.extend(kernel_env(&a, &w.nb, &backend)?);
            let spec = array_job(&a, &w.stem, plan_path, &p.todo, profile, env)?;
            run_array(&backend, spec, &w.outdir, &p.todo).await?
        }
    };
    let rows = write_summary(&w, &p, &backend, job_id, &summary_path)?;
    let ok = rows.iter().filter(|r| r["status"] == "ok").count();
    eprintln!(
        "noyau sweep: {ok}/{} ok in {:.1} s; summary: {} and {}",
        rows.len(),
        t0.elapsed().as_secs_f64(),
        summary_path.display(),
        w.outdir.join("summary.csv").display()
    );
    Ok(if interrupted {
        sweep_exit::INTERRUPTED
    } else if ok == rows.len() {
        sweep_exit::OK
    } else {
        sweep_exit::SOME_FAILED
    })
}

/// The notebook (read once: it must be one before anything is
/// submitted), its stem and the output directory.
fn where_of(a: &SweepOptions) -> Result<Where, RunError> {
    let notebook = abs(&a.notebook);
    let shown = notebook.display().to_string();
    let (bytes, project) = crate::input::read_bytes(&shown)?;
    let nb = crate::input::parse_input(&shown, &bytes)?;
    let stem = notebook
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem.strip_suffix(".ipynb").unwrap_or(&stem).to_string();
    let outdir = abs(&a
        .output_dir
        .clone()
        .unwrap_or_else(|| notebook.with_file_name(format!("{stem}.sweep"))));
    Ok(Where {
        notebook,
        nb,
        project,
        bytes,
        stem,
        outdir,
    })
}

/// The points the command line and the sweep file give.
fn given(a: &SweepOptions) -> Result<Vec<Parameters>, RunError> {
    let mut spec = match &a.file {
        Some(f) => {
            let text = std::fs::read_to_string(f).map_err(bad_io("cannot read", f))?;
            parse_file(&text).map_err(|e| bad(format!("{}: {e}", f.display())))?
        }
        None => SweepSpec::default(),
    };
    for g in &a.grid {
        let (name, values) = parse_grid(g)?;
        spec.grid.retain(|(n, _)| *n != name);
        spec.grid.push((name, values));
    }
    expand(&spec)
}

/// The last summary's rows, for `--retry-failed` (which must retry the
/// same points).
fn previous(
    a: &SweepOptions,
    given: &[Parameters],
    summary_path: &Path,
) -> Result<Option<Vec<Value>>, RunError> {
    if !a.retry_failed {
        return Ok(None);
    }
    let s = read_json(summary_path, summary_file()).map_err(|e| {
        if e.is_not_found() {
            bad(format!(
                "--retry-failed: no summary at {} (run the sweep first, with the same -o)",
                summary_path.display()
            ))
        } else {
            untrusted("--retry-failed: the last summary")(e)
        }
    })?;
    let pts = s["points"].as_array().cloned().unwrap_or_default();
    let same = given.len() == pts.len()
        && given
            .iter()
            .zip(&pts)
            .all(|(g, p)| g.to_json() == p["parameters"]);
    if !given.is_empty() && !same {
        return Err(bad(format!(
            "--retry-failed: the points given differ from those of {}; drop --grid/-f to retry that sweep",
            summary_path.display()
        )));
    }
    Ok(Some(pts))
}

/// The points: from the command line / file, or from the summary to retry.
fn points(a: &SweepOptions, w: &Where, summary_path: &Path) -> Result<Points, RunError> {
    let given = given(a)?;
    let previous = previous(a, &given, summary_path)?;
    let all: Vec<Point> = match &previous {
        Some(pts) => pts
            .iter()
            .enumerate()
            .map(|(i, p)| Point {
                index: i,
                params: p["parameters"].clone(),
                output: PathBuf::from(p["output"].as_str().unwrap_or_default()),
            })
            .collect(),
        None => {
            if given.is_empty() {
                return Err(bad(
                    "no points: give --grid NAME=V1,V2 (repeatable) or -f sweep.yaml",
                ));
            }
            let width = (given.len() - 1).to_string().len();
            let stem = &w.stem;
            given
                .iter()
                .enumerate()
                .map(|(i, p)| Point {
                    index: i,
                    params: p.to_json(),
                    output: w.outdir.join(format!("{stem}-{i:0width$}.ipynb")),
                })
                .collect()
        }
    };
    let todo: Vec<usize> = match &previous {
        Some(pts) => pts
            .iter()
            .enumerate()
            .filter(|(_, p)| p["status"].as_str() != Some("ok"))
            .map(|(i, _)| i)
            .collect(),
        None => all.iter().map(|p| p.index).collect(),
    };
    Ok(Points {
        all,
        todo,
        previous,
    })
}

/// The plan each task reads, a 0600 file in `STATE/sweeps` (0700), and
/// beside it the notebook as read at submission (0600), which the tasks
/// run; both removed when the sweep ends.
struct Plan {
    path: PathBuf,
    notebook: PathBuf,
}

impl Drop for Plan {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.notebook);
    }
}

/// Makes (or checks) the output directory and writes the plan; this
/// round's old results are removed first.
fn write_plan(a: &SweepOptions, w: &Where, p: &Points) -> Result<Plan, RunError> {
    own_dir(&w.outdir)?;
    own_dir(&results_dir(&w.outdir))?;
    for &i in &p.todo {
        let _ = std::fs::remove_file(result_path(&w.outdir, i));
    }
    let [path, notebook] = crate::input::private_names("sweeps", &w.stem, [".json", ".ipynb"])?;
    let plan = Plan { path, notebook };
    crate::input::keep_copy(&plan.notebook, &w.bytes)?;
    let text = json!({
        "notebook": w.notebook,
        "notebook_copy": plan.notebook,
        "notebook_dir_id": crate::input::SubmittedDir::of(&w.project)?.to_string(),
        "output_dir": w.outdir,
        "kernel": a.kernel,
        "timeout": a.timeout,
        "start_timeout": a.start_timeout,
        "allow_errors": a.allow_errors,
        "points": p.all.iter().map(|p| json!({
            "index": p.index, "parameters": p.params, "output": p.output,
        })).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&text).unwrap_or_default();
    write_file(&plan.path, &text, 0o600)?;
    Ok(plan)
}

/// `summary.json` and `summary.csv`: this round's results, the previous
/// summary for the rest. The rows.
fn write_summary(
    w: &Where,
    p: &Points,
    backend: &str,
    job_id: Option<String>,
    summary_path: &Path,
) -> Result<Vec<Value>, RunError> {
    let mut rows = Vec::new();
    for pt in &p.all {
        let mut row = json!({
            "index": pt.index, "parameters": pt.params, "status": "not run",
            "exit_code": null, "duration_s": null, "output": pt.output, "job": null,
        });
        if let Ok(r) = read_json(&result_path(&w.outdir, pt.index), result_file()) {
            for k in ["status", "exit_code", "duration_s", "job"] {
                row[k] = r[k].clone();
            }
        } else if !p.todo.contains(&pt.index) {
            if let Some(old) = p.previous.as_ref().and_then(|v| v.get(pt.index)) {
                row = old.clone();
            }
        }
        rows.push(row);
    }
    let summary = json!({
        "notebook": w.notebook,
        "output_dir": w.outdir,
        "backend": backend,
        "job_id": job_id,
        "finished": chrono::Utc::now().to_rfc3339(),
        "points": rows,
    });
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default() + "\n";
    write_file(summary_path, &text, 0o644)?;
    write_file(&w.outdir.join("summary.csv"), &csv(&rows), 0o644)?;
    Ok(rows)
}

/// The summary as CSV: index, one column per parameter, status, exit_code,
/// duration_s, output.
pub fn csv(rows: &[Value]) -> String {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        if let Some(m) = r["parameters"].as_object() {
            for k in m.keys() {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
    }
    fn field(v: &Value) -> String {
        let s = match v {
            Value::Null => String::new(),
            // A text a spreadsheet would read as a formula (a grid value
            // from someone else's sweep file: `=HYPERLINK(…)`) is written
            // as text, after a `'`, as OWASP advises for CSV files.
            Value::String(s)
                if s.starts_with(['=', '+', '-', '@', '\t', '\r']) && s.parse::<f64>().is_err() =>
            {
                format!("'{s}")
            }
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s
        }
    }
    let mut out = String::from("index");
    for n in &names {
        out.push(',');
        out.push_str(&field(&Value::String(n.clone())));
    }
    out.push_str(",status,exit_code,duration_s,output\n");
    for r in rows {
        let mut line = vec![field(&r["index"])];
        for n in &names {
            line.push(field(&r["parameters"][n.as_str()]));
        }
        for k in ["status", "exit_code", "duration_s", "output"] {
            line.push(field(&r[k]));
        }
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// The points' results as they come. A point's result file is written
/// once (renamed into place) when it ends, so each poll lists the results
/// directory and reads only the files it has not read: a 1000-point sweep
/// used to open 1000 files every poll.
struct Tally {
    /// This round's points.
    todo: std::collections::BTreeSet<usize>,
    /// The points that ended, and whether they did so ok.
    ended: std::collections::HashMap<usize, bool>,
}

impl Tally {
    fn new(todo: &[usize]) -> Tally {
        Tally {
            todo: todo.iter().copied().collect(),
            ended: Default::default(),
        }
    }

    /// Points ended and points ok, after reading what ended since.
    fn update(&mut self, outdir: &Path) -> (usize, usize) {
        let listed = std::fs::read_dir(results_dir(outdir)).into_iter().flatten();
        for entry in listed.flatten() {
            let name = entry.file_name();
            let Some(i) = (name.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|i| self.todo.contains(i) && !self.ended.contains_key(i))
            else {
                continue;
            };
            if let Ok(r) = read_json(&entry.path(), result_file()) {
                self.ended.insert(i, r["status"] == "ok");
            }
        }
        let ok = self.ended.values().filter(|ok| **ok).count();
        (self.ended.len(), ok)
    }
}

struct Stop {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> Result<Stop, RunError> {
        Ok(Stop {
            int: signal(SignalKind::interrupt())
                .map_err(bad_io("cannot handle", Path::new("SIGINT")))?,
            term: signal(SignalKind::terminate())
                .map_err(bad_io("cannot handle", Path::new("SIGTERM")))?,
        })
    }
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// The points as child processes, K at a time; true when interrupted.
async fn run_local(
    a: &SweepOptions,
    plan: &Path,
    outdir: &Path,
    todo: &[usize],
    env: &std::collections::BTreeMap<String, String>,
) -> Result<bool, RunError> {
    let exe = noyau_exe()?;
    let logs = outdir.join("logs");
    own_dir(&logs)?;
    let mut stop = Stop::new()?;
    let mut queue = todo.iter().copied();
    let mut running: Vec<(usize, tokio::process::Child)> = Vec::new();
    let mut interrupted = false;
    let mut shown = String::new();
    let mut tally = Tally::new(todo);
    loop {
        while !interrupted && running.len() < a.max_parallel {
            let Some(i) = queue.next() else { break };
            let log = new_log(&logs.join(format!("{i}.log")))?;
            let child = tokio::process::Command::new(&exe)
                .arg("sweep-task")
                .arg(plan)
                .arg("--index")
                .arg(i.to_string())
                .envs(env)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .process_group(0)
                .spawn()
                .map_err(bad_io("cannot start", &exe))?;
            running.push((i, child));
        }
        if running.is_empty() {
            break;
        }
        tokio::select! {
            () = stop.recv(), if !interrupted => {
                eprintln!("noyau sweep: interrupted: stopping the running points (they save what they finished)");
                interrupted = true;
                for (_, c) in &running {
                    if let Some(pid) = c.id() {
                        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        running.retain_mut(|(_, c)| matches!(c.try_wait(), Ok(None)));
        let (done, ok) = tally.update(outdir);
        let line = format!(
            "{done}/{} done ({ok} ok), {} running",
            todo.len(),
            running.len()
        );
        if line != shown {
            eprintln!("noyau sweep: {line}");
            shown = line;
        }
    }
    Ok(interrupted)
}

/// A point's log, made afresh: what was at its path (a link planted while
/// the directory was open to others) is removed, never written through.
fn new_log(path: &Path) -> Result<std::fs::File, RunError> {
    let _ = std::fs::remove_file(path);
    noyau_trust::create_private(path, 0o644).map_err(untrusted("a point's log"))
}

/// What each point's job needs to find the kernel this host finds
/// (`kernelenv::job_env`), whatever the scheduler exports.
fn kernel_env(
    a: &SweepOptions,
    nb: &noyau_notebook::Notebook,
    backend: &str,
) -> Result<std::collections::BTreeMap<String, String>, RunError> {
    let kernel = crate::kernelenv::kernel_name(a.kernel.as_deref(), nb.kernel_name());
    crate::kernelenv::job_env(&kernel, backend)
}

/// The job array of a sweep: `noyau sweep-task PLAN` for each point.
fn array_job(
    a: &SweepOptions,
    stem: &str,
    plan: &Path,
    todo: &[usize],
    profile: noyau_config::Profile,
    env: std::collections::BTreeMap<String, String>,
) -> Result<noyau_sched::JobSpec, RunError> {
    Ok(noyau_sched::JobSpec {
        name: crate::input::job_name(stem).replacen("noyau-run-", "noyau-sweep-", 1),
        program: noyau_exe()?,
        args: vec!["sweep-task".into(), plan.display().to_string()],
        cwd: std::env::current_dir().ok(),
        profile,
        env,
        array: Some(noyau_sched::ArrayTasks {
            ids: todo.to_vec(),
            max_parallel: a.max_parallel.max(1),
        }),
        ..Default::default()
    })
}

/// The progress note of an array's tasks: how many run, whether any will
/// still run, and why the first pending one waits.
fn tasks_note(states: &[noyau_sched::JobState]) -> (usize, bool, String) {
    use noyau_sched::JobState;
    let running = states
        .iter()
        .filter(|s| matches!(s, JobState::Running { .. }))
        .count();
    let alive = states.iter().any(|s| !matches!(s, JobState::Ended(_)));
    let reason = states.iter().find_map(|s| match s {
        JobState::Unknown { why } => Some(format!(
            "; the scheduler does not answer ({why}), still waiting"
        )),
        _ => None,
    });
    let reason = reason.or_else(|| {
        states.iter().find_map(|s| match s {
            JobState::Pending { reason, start, .. } => Some(format!(
                "; pending: {reason}, est. start {}",
                start.map_or("unknown".into(), noyau_sched::local_time)
            )),
            _ => None,
        })
    });
    (running, alive, reason.unwrap_or_default())
}

/// The points as ONE job array of the batch scheduler `backend`; true when
/// interrupted, and the array's id.
async fn run_array(
    backend: &str,
    spec: noyau_sched::JobSpec,
    outdir: &Path,
    todo: &[usize],
) -> Result<(bool, Option<String>), RunError> {
    let sched = noyau_sched::Scheduler::named(backend)?;
    // Ours from before the submission: a Ctrl-C while it waits for a slot
    // submits nothing; one while the command runs (in its own process
    // group, out of the Ctrl-C's reach) lets noyau-sched cancel the array
    // it gives, before the process ends (`crate::settled` in `main`).
    let mut stop = Stop::new()?;
    let submitted = tokio::select! {
        r = sched.submit_array(&spec) => r,
        () = stop.recv() => {
            eprintln!("noyau sweep: interrupted while submitting the job array: an array the scheduler still takes is cancelled");
            return Ok((true, None));
        }
    };
    let mut array = submitted?;
    let id = array.id.clone();
    eprintln!(
        "noyau sweep: submitted {} job array {id} ({} tasks, {} at a time; {}), job name {}",
        sched.display(),
        array.tasks.ids.len(),
        array.tasks.max_parallel,
        array.note,
        spec.name
    );
    let mut interrupted = false;
    let mut shown = String::new();
    let mut tally = Tally::new(todo);
    let mut gone_since: Option<Instant> = None;
    loop {
        tokio::select! {
            () = stop.recv(), if !interrupted => {
                eprintln!("noyau sweep: interrupted: cancelling job array {id} (running points save what they finished)");
                interrupted = true;
                if let Err(e) = array.cancel().await {
                    eprintln!("noyau sweep: {}", crate::shown(&e));
                }
            }
            _ = tokio::time::sleep(array.interval()) => {}
        }
        let (done, ok) = tally.update(outdir);
        let paced = if interrupted {
            Ok(())
        } else {
            array.pace().await
        };
        let (running, alive, mut note) = tasks_note(&array.states());
        if let Err(e) = paced {
            note.push_str(&format!("; cannot release held tasks ({e})"));
        }
        let line = format!(
            "{done}/{} done ({ok} ok), {running} running{note}",
            todo.len()
        );
        if line != shown {
            eprintln!("noyau sweep: {line}");
            shown = line;
        }
        if done == todo.len() {
            break;
        }
        if alive {
            gone_since = None;
        } else {
            // Every task has ended: give their last result files a moment
            // (a shared file system may lag), then stop waiting.
            let since = *gone_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
    }
    Ok((interrupted, Some(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result as a task writes it.
    fn put(path: &Path, text: &str) {
        write_file(path, text, 0o600).unwrap();
    }

    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A sweep file or `--grid` from someone else: a name that is not an
    /// identifier is refused before anything runs (it would be code in
    /// every point's parameters cell).
    #[test]
    fn a_parameter_name_that_is_code_is_refused_wherever_it_comes() {
        let evil = "lr = 1; __import__('os').system('id'); lr";
        for text in [
            format!("grid:\n  \"{evil}\": [1, 2]\n"),
            format!("points:\n  - \"{evil}\": 1\n"),
            format!("parameters:\n  \"{evil}\": 1\n"),
        ] {
            let e = parse_file(&text).unwrap_err().to_string();
            assert!(e.contains("not a plain identifier"), "{text}: {e}");
        }
        let e = parse_grid("x; import os; os.system('id'); x=1,2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a plain identifier"), "{e}");
        assert_eq!(parse_grid("lr=1,2").unwrap().0, "lr");
    }

    #[test]
    fn a_text_a_spreadsheet_would_run_is_written_as_text() {
        let rows = [serde_json::json!({
            "index": 0, "status": "ok", "exit_code": 0, "duration_s": 1.5, "output": "o.ipynb",
            "parameters": {"f": "=HYPERLINK(\"http://x\",\"y\")", "g": "@SUM(A1)", "n": -3, "s": "plain", "t": "-1e-3"}
        })];
        let text = csv(&rows);
        let line = text.lines().nth(1).unwrap();
        assert_eq!(
            line,
            "0,\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\",'@SUM(A1),-3,plain,-1e-3,ok,0,1.5,o.ipynb"
        );
    }

    #[test]
    fn a_grid_too_large_is_refused_before_it_is_made() {
        let values: Vec<Param> = (0..10).map(Param::Int).collect();
        let mut spec = SweepSpec::default();
        for name in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"] {
            spec.grid.push((name.into(), values.clone()));
        }
        let e = expand(&spec).unwrap_err().to_string();
        assert!(e.contains("10 × 10 × 10"), "{e}");
        spec.grid.truncate(4);
        assert_eq!(expand(&spec).unwrap().len(), 10_000);
    }

    #[test]
    fn the_tally_reads_each_result_once_and_only_this_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let res = results_dir(dir.path());
        std::fs::create_dir_all(&res).unwrap();
        let mut tally = Tally::new(&[0, 1, 2, 3]);
        assert_eq!(tally.update(dir.path()), (0, 0));
        put(&res.join("0.json"), r#"{"status": "ok"}"#);
        put(&res.join("1.json"), r#"{"status": "failed"}"#);
        put(&res.join("7.json"), r#"{"status": "ok"}"#); // not this round's
        std::fs::write(res.join(".2.json.tmp"), "{").unwrap(); // being written
        assert_eq!(tally.update(dir.path()), (2, 1));
        // read once: a point's result is final when it is renamed into place
        std::fs::remove_file(res.join("1.json")).unwrap();
        put(&res.join("2.json"), r#"{"status": "ok"}"#);
        assert_eq!(tally.update(dir.path()), (3, 2));
    }

    /// Results another user could have forged (a file others could write
    /// or read, a link to a result of theirs, a FIFO) are not counted.
    #[test]
    fn the_tally_counts_only_results_of_ours_alone() {
        let dir = tempfile::tempdir().unwrap();
        let res = results_dir(dir.path());
        std::fs::create_dir_all(&res).unwrap();
        let mut tally = Tally::new(&[0, 1, 2]);
        write_file(&res.join("0.json"), r#"{"status": "ok"}"#, 0o644).unwrap();
        put(&dir.path().join("forged.json"), r#"{"status": "ok"}"#);
        std::os::unix::fs::symlink(dir.path().join("forged.json"), res.join("1.json")).unwrap();
        nix::unistd::mkfifo(&res.join("2.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(tally.update(dir.path()), (0, 0));
    }

    fn task(plan: &Path) -> Result<TaskPoint, String> {
        let a = SweepTask {
            plan: plan.to_path_buf(),
            index: Some(0),
        };
        TaskPoint::read(&a).map_err(|e| e.to_string())
    }

    /// A task runs the plan only from a 0600 file of the user's, and only
    /// while the output directory is still theirs alone and the point's
    /// output no link: checked when it starts, long after the sweep did.
    #[test]
    fn a_task_trusts_its_plan_and_output_directory_only_if_ours_alone() {
        let t = tempfile::tempdir().unwrap();
        let outdir = t.path().join("out");
        own_dir(&outdir).unwrap();
        assert_eq!(mode_of(&outdir) & 0o022, 0);
        let output = outdir.join("nb-0.ipynb");
        let plan = t.path().join("plan.json");
        let text = json!({"notebook": "/nb.ipynb", "notebook_copy": "/copy.ipynb",
                          "output_dir": outdir, "points": [{"index": 0, "parameters": {}, "output": output}]})
        .to_string();
        write_file(&plan, &text, 0o600).unwrap();
        let ok = task(&plan).unwrap();
        assert_eq!(
            (ok.outdir, ok.output),
            (outdir.clone(), output.display().to_string())
        );
        assert!(results_dir(&outdir).is_dir());

        // An older noyau's plan (no copy of the notebook): refused, not
        // run from the notebook's path.
        let old = t.path().join("old.json");
        let old_text = json!({"notebook": "/nb.ipynb", "output_dir": outdir,
                              "points": [{"index": 0, "parameters": {}, "output": output}]});
        write_file(&old, &old_text.to_string(), 0o600).unwrap();
        assert!(task(&old).unwrap_err().contains("keeps no copy"));

        let link = t.path().join("link.json");
        std::os::unix::fs::symlink(&plan, &link).unwrap();
        assert!(task(&link).unwrap_err().contains("is a symlink"));
        let open = t.path().join("open.json");
        write_file(&open, &text, 0o644).unwrap();
        assert!(task(&open).unwrap_err().contains("has mode 0644"));
        let fifo = t.path().join("fifo.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(task(&fifo).unwrap_err().contains("is a FIFO"));

        std::os::unix::fs::symlink(t.path().join("elsewhere"), &output).unwrap();
        assert!(task(&plan).unwrap_err().contains("nb-0.ipynb is a symlink"));
        std::fs::remove_file(&output).unwrap();
        std::fs::set_permissions(&outdir, std::os::unix::fs::PermissionsExt::from_mode(0o775))
            .unwrap();
        let e = task(&plan).unwrap_err();
        assert!(
            e.contains("is writable by its group or others (mode 0775)"),
            "{e}"
        );
        assert!(
            e.contains(&format!("`chmod go-w {}`", outdir.display())),
            "{e}"
        );
    }

    /// Another user's output directory (one they made first at the name
    /// the user gives) is refused, naming its owner, even to root.
    #[test]
    fn another_users_output_directory_is_refused() {
        if !noyau_trust::testing::root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let theirs = t.path().join("run1");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let e = own_dir(&theirs).unwrap_err().to_string();
        assert!(e.contains("run1 belongs to uid 65534"), "{e}");
        assert!(e.contains("give another -o"), "{e}");
    }

    /// `--retry-failed` reruns what the last summary says only when that
    /// summary is the user's and no one else could write it.
    #[test]
    fn retry_reads_only_a_summary_of_ours() {
        let t = tempfile::tempdir().unwrap();
        let summary = t.path().join("summary.json");
        let a = SweepOptions {
            retry_failed: true,
            ..Default::default()
        };
        let text = r#"{"points": [{"index": 0, "parameters": {}, "status": "failed"}]}"#;
        let err = |a: &SweepOptions| previous(a, &[], &summary).unwrap_err().to_string();
        assert!(err(&a).contains("no summary at"));
        write_file(&summary, text, 0o664).unwrap();
        assert!(err(&a).contains("is writable by its group or others"));
        std::fs::remove_file(&summary).unwrap();
        write_file(&t.path().join("theirs.json"), text, 0o644).unwrap();
        std::os::unix::fs::symlink(t.path().join("theirs.json"), &summary).unwrap();
        assert!(err(&a).contains("is a symlink"));
        std::fs::remove_file(&summary).unwrap();
        write_file(&summary, text, 0o644).unwrap();
        assert_eq!(previous(&a, &[], &summary).unwrap().unwrap().len(), 1);
    }

    /// A link planted at a point's log is removed, not written through.
    #[test]
    fn a_log_is_made_afresh_never_through_a_link() {
        let t = tempfile::tempdir().unwrap();
        let canary = t.path().join("canary");
        std::fs::write(&canary, "the user's").unwrap();
        let log = t.path().join("0.log");
        std::os::unix::fs::symlink(&canary, &log).unwrap();
        std::io::Write::write_all(&mut new_log(&log).unwrap(), b"log").unwrap();
        assert_eq!(std::fs::read_to_string(&canary).unwrap(), "the user's");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "log");
        assert_eq!(mode_of(&log), 0o644);
    }

    #[test]
    fn grid_product_and_file() {
        let mut spec = SweepSpec::default();
        spec.grid.push(parse_grid("a=1,2").unwrap());
        spec.grid.push(parse_grid("b=x,0.5,True").unwrap());
        let pts = expand(&spec).unwrap();
        assert_eq!(pts.len(), 6);
        assert_eq!(pts[0].to_json(), json!({"a": 1, "b": "x"}));
        assert_eq!(pts[5].to_json(), json!({"a": 2, "b": true}));
        let f = parse_file("parameters: {c: 3}\ngrid:\n  n: [1, 2]\n  s: hi\n").unwrap();
        let pts = expand(&f).unwrap();
        assert_eq!(pts[1].to_json(), json!({"c": 3, "n": 2, "s": "hi"}));
        let f = parse_file("points:\n  - {n: 1}\n  - {n: 2, m: 0}\n").unwrap();
        assert_eq!(expand(&f).unwrap()[1].to_json(), json!({"n": 2, "m": 0}));
        assert!(parse_file("grdi: {a: [1]}")
            .unwrap_err()
            .to_string()
            .contains("did you mean `grid`"));
        assert!(parse_grid("a").is_err() && parse_grid("=1").is_err());
    }

    #[test]
    fn csv_quotes() {
        let rows = vec![
            json!({"index": 0, "parameters": {"a": "x,y", "b": 1.5}, "status": "ok",
                               "exit_code": 0, "duration_s": 1.2, "output": "/o/n-0.ipynb"}),
        ];
        assert_eq!(
            csv(&rows),
            "index,a,b,status,exit_code,duration_s,output\n0,\"x,y\",1.5,ok,0,1.2,/o/n-0.ipynb\n"
        );
    }
}
