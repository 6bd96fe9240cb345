//! `noyau dask-job scheduler|worker`: what a cluster's batch job runs.
//!
//! It realises the target's environment as an agent does (the spec comes in
//! `NOYAU_ENV_SPEC`), takes the Python of the inner kernelspec (the one the
//! target's kernel would run), checks that this Python imports
//! `distributed`, and execs Dask's own scheduler or worker CLI with TLS.
//! When it cannot, it writes the reason into the cluster directory's
//! `error` file, which the proxy shows in the notebook.

use noyau_client::RuntimeDir;
use noyau_trust::{Expect, Mode};
use noyau_vars::EnvVars;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::owner::OwnerWatch;
use crate::ClusterDir;

/// Dask's configuration, in the worker's environment, of its HTTP server's
/// routes: none. Dask starts that server even without a dashboard, and its
/// default routes (`/metrics`, `/health`) would tell anyone who reaches it
/// about the worker's tasks and memory; no one of noyau's uses it.
const WORKER_HTTP_ROUTES: (&str, &str) = ("DASK_DISTRIBUTED__WORKER__HTTP__ROUTES", "[]");

/// Dask's configuration variable for where it keeps its files (the
/// `temporary-directory` setting).
const DASK_TEMPORARY_DIRECTORY: &str = "DASK_TEMPORARY_DIRECTORY";

/// Set by SIGTERM (the job cancelled, or at its walltime).
static TERMINATED: AtomicBool = AtomicBool::new(false);

/// A worker's preload, imported before Dask reads the scheduler's file:
/// Dask looks for that file every 100 ms (`json_load_robust`), and the
/// workers start while the scheduler does (their jobs are submitted
/// together), so each lost up to 100 ms after the scheduler was up. It
/// waits, looking every 5 ms, until the file holds the scheduler's JSON
/// (Dask writes it in place: it can be seen empty); every 5 ms for the
/// first 5 s (the scheduler starts with its workers: it is up about then),
/// then at Dask's pace, 100 ms, so that hundreds of workers waiting for a
/// scheduler still queued do not load a shared filesystem's metadata
/// server; for at most a minute: past that, Dask waits on its own terms
/// (its death timeout).
pub const WORKER_PRELOAD: &str = r#"# Written by noyau: waits for the scheduler's file before Dask looks for it
# every 100 ms: every 5 ms for 5 s, then every 100 ms; at most a minute, then
# Dask goes on as usual.
import json
import os
import sys
import time


def _wait():
    try:
        path = sys.argv[sys.argv.index("--scheduler-file") + 1]
    except (ValueError, IndexError):
        return
    start = time.monotonic()
    while time.monotonic() < start + 60:
        try:
            with open(path) as f:
                if json.load(f):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.005 if time.monotonic() < start + 5 else 0.1)


_wait()
"#;

/// The scheduler's preload: serves the scheduler's HTTP server over TLS
/// to clients with the cluster's certificate only (noyau's relay), writes
/// the worker list into `status.json` every second, for `%noyau dask
/// status`, and loads the dashboard once the workers submitted with the
/// scheduler are in, or at the first page asked for. Dask would import bokeh
/// for it before listening: over a second, as long as the rest of the
/// scheduler's start, and every worker and client would wait for it
/// (`dask_argv` turns that off). Loaded as soon as the scheduler listened,
/// its import held the GIL while the workers registered: on the test
/// machine, 140 ms from a worker listening to its registration.
pub const PRELOAD: &str = r#"# Written by noyau: reports the scheduler's workers and its adaptive target in
# status.json every second, retires the workers noyau names in retire.json, and
# loads the dashboard once the workers submitted with the scheduler are in, or
# at its first page (bokeh's import is as long as the rest of the start, and
# holds the GIL while it runs: workers registering need not wait for it). Its HTTP server
# (dashboard, /info pages, websockets) speaks TLS only, with the cluster's
# certificate, and serves only clients showing a certificate of the cluster's
# CA (noyau's relay): the port is open to the network.
import asyncio
import json
import logging
import os
import ssl
import threading

import dask
from distributed import Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web
from tornado.ioloop import IOLoop, PeriodicCallback


def tls():
    """The server side of the cluster's TLS, a client certificate required:
    whoever lacks the cluster's key (0600 in its directory) cannot complete
    the handshake, so no request of theirs is ever read."""
    d = os.environ["NOYAU_DASK_DIR"]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=os.path.join(d, "ca.pem"))
    context.load_cert_chain(os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


# The scheduler's HTTP server listens from its constructor on, before
# dask_setup runs: it is made with TLS from the start (this module is
# imported by the constructor, before the server is made). Dask imports this
# module twice (the second time by reloading it): Dask's own method is kept
# once, on the class.
if not hasattr(Scheduler, "noyau_dask_http_server"):
    Scheduler.noyau_dask_http_server = Scheduler.start_http_server


def start_http_server(self, *args, **kwargs):
    kwargs["ssl_options"] = tls()
    # Dask's own dashboard TLS settings, if the environment had any, would
    # replace this context with one that asks no client certificate.
    with dask.config.set({"distributed.scheduler.dashboard.tls.cert": None}):
        self.noyau_dask_http_server(*args, **kwargs)


Scheduler.start_http_server = start_http_server

# A page asked for while the dashboard loads waits for it, then reloads
# itself (its address still has noyau's token).
RELOAD = b'<!DOCTYPE html><meta http-equiv="refresh" content="0"><title>Dask</title>'


def load_dashboard(scheduler):
    """Routes the dashboard's pages to a wait until it is loaded; returns
    the function that starts loading it (once, whoever calls it)."""
    app = scheduler.http_application
    loop = IOLoop.current()
    loaded = asyncio.Event()
    started = []

    class Wait(web.RequestHandler):
        async def get(self, *args):
            start()
            try:
                await asyncio.wait_for(loaded.wait(), 60)
            except asyncio.TimeoutError:
                pass
            self.set_header("Cache-Control", "no-store")
            self.write(RELOAD)

    # Consulted only for the paths the scheduler's own routes do not serve.
    waiting = web.Application([(r".*", Wait)])
    app.applications.insert(0, waiting)

    def missing():
        from distributed.http.utils import get_handlers
        app.add_handlers(r".*$", get_handlers(
            scheduler, ["distributed.http.scheduler.missing_bokeh"], prefix=""))

    # Whatever happens, pages stop waiting: a dashboard that fails to load
    # shows Dask's own page for it, never an endless reload.
    def connect(dashboard):
        try:
            if dashboard is None:
                missing()
            else:
                try:
                    dashboard.connect(app, scheduler.http_server, scheduler, prefix="")
                except Exception:
                    logging.getLogger("noyau").exception("the Dask dashboard failed to load")
                    missing()
        finally:
            app.applications.remove(waiting)
            loaded.set()

    def load():
        try:
            import distributed.dashboard.scheduler as dashboard
        except ImportError:
            dashboard = None
        except Exception:
            logging.getLogger("noyau").exception("the Dask dashboard failed to import")
            dashboard = None
        loop.add_callback(connect, dashboard)

    def start():
        if not started:
            started.append(True)
            threading.Thread(target=load, name="noyau-dashboard", daemon=True).start()

    return start


class FirstWorkers(SchedulerPlugin):
    """Starts the dashboard's load once the workers submitted with the
    scheduler have registered."""

    name = "noyau-first-workers"

    def __init__(self, expected, load):
        self.expected = expected
        self.load = load  # (`start` is the plugin's own hook)

    def add_worker(self, scheduler, worker):
        if len(scheduler.workers) >= self.expected:
            self.load()


def dask_setup(scheduler):
    d = os.environ["NOYAU_DASK_DIR"]
    path = os.path.join(d, "status.json")
    retire_path = os.path.join(d, "retire.json")
    done = {"seq": 0}

    def retire():
        try:
            with open(retire_path) as f:
                req = json.load(f)
        except (OSError, ValueError):
            return
        if req.get("seq", 0) <= done["seq"]:
            return
        done["seq"] = req["seq"]
        # Moves their data to the other workers first, then closes them
        # (and their nannies): their jobs end by themselves.
        asyncio.ensure_future(
            scheduler.retire_workers(names=req["names"], close_workers=True, remove=True))

    def write():
        retire()
        workers = [
            {"address": a, "name": str(w.name), "nthreads": w.nthreads,
             "memory_limit": w.memory_limit or 0, "host": w.host}
            for a, w in list(scheduler.workers.items())
        ]
        status = {
            "workers": workers,
            "target": scheduler.adaptive_target(),
            "to_close": [str(n) for n in scheduler.workers_to_close(attribute="name")],
            "tasks": len(scheduler.tasks),
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(status, f)
        os.replace(tmp, path)

    write()
    PeriodicCallback(write, 1000).start()
    start = load_dashboard(scheduler)
    expected = int(os.environ.get("NOYAU_DASK_FIRST_WORKERS") or 0)
    if len(scheduler.workers) >= expected:
        start()
    else:
        scheduler.add_plugin(FirstWorkers(expected, start))
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Scheduler,
    Worker,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "scheduler" => Ok(Role::Scheduler),
            "worker" => Ok(Role::Worker),
            o => Err(format!("{o:?}: expected scheduler or worker")),
        }
    }
}

/// What `noyau dask-job` was asked to run.
#[derive(Debug, Clone)]
pub struct JobArgs {
    pub role: Role,
    pub dir: PathBuf,
    /// The kernelspec whose Python runs Dask.
    pub inner: String,
    pub nthreads: Option<u32>,
    pub memory_limit: Option<String>,
    /// The worker's name, chosen by the proxy (`w1`, `w2`…).
    pub name: Option<String>,
    /// Seconds after which the worker retires gracefully (before its walltime).
    pub lifetime: Option<u64>,
    /// Run the worker under a Dask nanny (a second Python process that
    /// restarts it). Off by default: the batch job already plays that part
    /// (the proxy replaces a worker job that ends), and the nanny's extra
    /// Python start and `distributed` import doubles a worker's start time.
    pub nanny: bool,
}

/// The Dask command line (before the environment wraps it); `scratch` is
/// the job's private directory for Dask's files ([`prepare`]).
pub fn dask_argv(a: &JobArgs, python: &str, scratch: &Path) -> Vec<String> {
    let d = ClusterDir(a.dir.clone());
    let p = |p: PathBuf| p.display().to_string();
    let mut argv = vec![python.to_string(), "-m".into()];
    match a.role {
        Role::Scheduler => {
            argv.push("distributed.cli.dask_scheduler".into());
            argv.extend([
                "--port".into(),
                "0".into(),
                "--dashboard-address".into(),
                ":0".into(),
                // The preload loads it once the scheduler listens.
                "--no-dashboard".into(),
                "--preload".into(),
                p(d.preload()),
            ]);
        }
        Role::Worker => {
            argv.push("distributed.cli.dask_worker".into());
            argv.extend([
                "--preload".into(),
                p(d.worker_preload()),
                "--local-directory".into(),
                p(scratch.to_path_buf()),
            ]);
            if !a.nanny {
                argv.push("--no-nanny".into());
            }
            // Only the scheduler's dashboard is forwarded; a worker's would
            // be unreachable, and importing bokeh for it delays the worker.
            // Dask still starts the worker's HTTP server: on the node's
            // loopback only, and with no route (WORKER_HTTP_ROUTES).
            argv.extend([
                "--no-dashboard".into(),
                "--dashboard-address".into(),
                "127.0.0.1:0".into(),
            ]);
            if let Some(n) = a.nthreads {
                argv.extend(["--nthreads".into(), n.to_string()]);
            }
            if let Some(m) = &a.memory_limit {
                argv.extend(["--memory-limit".into(), m.clone()]);
            }
            if let Some(n) = &a.name {
                argv.extend(["--name".into(), n.clone()]);
            }
            if let Some(l) = a.lifetime {
                argv.extend(["--lifetime".into(), format!("{l}s")]);
            }
        }
    }
    argv.extend([
        "--scheduler-file".into(),
        p(d.scheduler_file()),
        "--protocol".into(),
        "tls".into(),
        "--tls-ca-file".into(),
        p(d.ca()),
        "--tls-cert".into(),
        p(d.cert()),
        "--tls-key".into(),
        p(d.key()),
    ]);
    argv
}

/// Runs the job: Dask as a child process, watched together with the
/// cluster's owner ([`crate::owner`]); returns Dask's exit code.
pub fn run(a: JobArgs) -> anyhow::Result<i32> {
    let d = ClusterDir(a.dir.clone());
    // Before anything is read from the directory or written into it (an
    // error file written into someone else's could follow their link).
    check_cluster_dir(&d)?;
    let fail = |msg: String| {
        report(&d, &msg);
        anyhow::anyhow!(msg)
    };
    let p = prepare(&a).map_err(|e| fail(format!("{e:#}")))?;
    let argv = &p.argv;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear().envs(&p.env);
    // SAFETY: prctl is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Dask must not outlive this job's noyau (cancelled, or killed).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The scheduler's walltime signal (the agent's warning: Slurm's SIGUSR1,
    // Grid Engine's SIGUSR2) comes before the walltime; its default action
    // would end this job early. Workers retire by their own --lifetime
    // instead. (Grid Engine's cancel sends it to Dask too, which ends.)
    let walltime = nix::sys::signal::Signal::try_from(noyau_sched::walltime_signal())?;
    // SAFETY: the handlers only store to an atomic: async-signal-safe.
    unsafe {
        use nix::sys::signal::{signal, SigHandler, Signal};
        extern "C" fn ignore(_: libc::c_int) {}
        extern "C" fn terminate(_: libc::c_int) {
            TERMINATED.store(true, Ordering::SeqCst);
        }
        signal(walltime, SigHandler::Handler(ignore))?;
        signal(Signal::SIGTERM, SigHandler::Handler(terminate))?;
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", argv.join(" "))))?;
    let mut owner = OwnerWatch::from_env();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() && status.code().is_some() {
                return Err(fail(explain_failure(&p, a.role, status)));
            }
            return Ok(status.code().unwrap_or(1));
        }
        // Cancelled: this process stays until Dask has ended. Dying first
        // would orphan Dask, and a scheduler that tracks a job's processes
        // by parentage (Slurm's proctrack/linuxproc) would then never kill
        // it: a worker without a nanny can hang in its graceful close.
        if TERMINATED.load(Ordering::SeqCst) {
            eprintln!("noyau dask-job: terminated; ending the {:?}", a.role);
            stop(&mut child);
            return Ok(128 + libc::SIGTERM);
        }
        if let Some(why) = owner.check(&d.owner_file(), Instant::now()) {
            eprintln!("noyau dask-job: {why}; ending the {:?}", a.role);
            if a.role == Role::Scheduler {
                end_cluster(&d);
            }
            stop(&mut child);
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The cluster directory gives Dask its code (the preloads) and its TLS
/// key, and names the jobs to cancel: it must be ours and closed to others
/// (not a link), the key a 0600 regular file of ours, the preloads regular
/// files of ours no one else can write. The proxy makes them so; anything
/// else was made or changed by someone else.
fn check_cluster_dir(d: &ClusterDir) -> anyhow::Result<()> {
    let what = "the Dask cluster's directory";
    Expect::dir().check(d.path()).with_context(|| {
        format!("{what} (from `noyau dask-job --dir`; `%noyau dask up` makes it 0700, yours)")
    })?;
    Expect::file()
        .check(&d.key())
        .context("the Dask cluster's TLS key (a 0600 file of yours in its directory)")?;
    for preload in [d.preload(), d.worker_preload()] {
        Expect::file()
            .mode(Mode::NoOthersWrite)
            .check(&preload)
            .context("a Dask preload noyau wrote (a file of yours no one else can write)")?;
    }
    Ok(())
}

/// The owner is gone: cancels every job of the cluster (this one last) and
/// removes its directory (its keys with it).
fn end_cluster(d: &ClusterDir) {
    let me = noyau_sched::this_job().map(|(_, id)| id);
    let cancels = noyau_sched::schedulers().into_iter().filter_map(|name| {
        let mut ids = d.batch_jobs(name);
        ids.retain(|id| Some(id) != me.as_ref());
        (!ids.is_empty()).then_some((name, ids))
    });
    let cancels: Vec<_> = cancels.collect();
    if !cancels.is_empty() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        match runtime {
            Ok(rt) => rt.block_on(async {
                for (name, ids) in cancels {
                    let done = match noyau_sched::Scheduler::named(name) {
                        Ok(s) => s.cancel(&ids).await,
                        Err(e) => Err(e),
                    };
                    match done {
                        Ok(()) => eprintln!("noyau dask-job: cancelled jobs {}", ids.join(" ")),
                        Err(e) => eprintln!("noyau dask-job: cancelling {}: {e}", ids.join(" ")),
                    }
                }
            }),
            Err(e) => eprintln!("noyau dask-job: cannot cancel the cluster's jobs: {e}"),
        }
    }
    if let Err(e) = std::fs::remove_dir_all(d.path()) {
        eprintln!("noyau dask-job: cannot remove {}: {e}", d.path().display());
    }
}

/// SIGTERM, then SIGKILL if Dask has not ended within 10 s.
fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn report(d: &ClusterDir, msg: &str) {
    eprintln!("noyau dask-job: {msg}");
    // The first error wins: it is the one that explains the others.
    if d.error().is_none() {
        let _ = std::fs::write(d.error_file(), msg);
    }
}

/// Dask's command line and environment, and the check that explains a failure.
struct Prepared {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    check: Vec<String>,
    python: String,
    /// Held while Dask runs: its entry and data are in use.
    _env: Option<noyau_env::Realised>,
    /// Dask's scratch directory, removed when Dask has ended.
    _scratch: RuntimeDir,
}

/// A private directory (0700, ours, made fresh under noyau's runtime
/// directory on this node) for Dask's files: without one, Dask takes
/// `$TMPDIR/dask-scratch-space` whoever made it, puts it (or a directory
/// in it) first on `sys.path`, and spills task data there as pickles, so
/// another user on the node who made it first would run code as this user.
fn scratch_dir() -> anyhow::Result<RuntimeDir> {
    RuntimeDir::create("dask").context("Dask's private scratch directory")
}

fn prepare(a: &JobArgs) -> anyhow::Result<Prepared> {
    let mut env: BTreeMap<String, String> = std::env::vars().collect();
    env.insert(EnvVars::NOYAU_DASK_DIR.into(), a.dir.display().to_string());
    let scratch = scratch_dir()?;
    // Dask's scheduler has no --local-directory: its configuration, read
    // from this variable by the scheduler, the nanny and the worker alike.
    env.insert(
        DASK_TEMPORARY_DIRECTORY.into(),
        scratch.path().display().to_string(),
    );
    if a.role == Role::Worker {
        let (name, routes) = WORKER_HTTP_ROUTES;
        env.insert(name.into(), routes.into());
    }
    let spec_json = env.remove(EnvVars::NOYAU_ENV_SPEC);
    let prepared = env
        .remove(EnvVars::NOYAU_ENV_PREPARED)
        .map(|j| noyau_env::Prepared::from_json(&j))
        .transpose()?;
    let python = python_of(&a.inner);
    let mut argv = dask_argv(a, &python, scratch.path());
    let mut check = vec![
        python.clone(),
        "-c".into(),
        "import distributed, sys; print(distributed.__version__)".into(),
    ];
    let spec = spec_json
        .map(|json| noyau_env::EnvSpec::from_json(&json).context("the environment spec"))
        .transpose()?;
    // What the proxy's host prepared is checked and used as it is (offline).
    let cache = noyau_env::Cache::at_default();
    let realised =
        noyau_env::realise_job(spec.as_ref(), prepared.as_ref(), &cache, &mut |l: &str| {
            eprintln!("environment: {l}");
        })
        .map_err(|e| anyhow::anyhow!("the cluster's environment: {e}"))?;
    if let Some(r) = &realised {
        let (a2, e2) = r.command(&argv, &env, &a.dir)?;
        (check, _) = r.command(&check, &env, &a.dir)?;
        argv = a2;
        env = e2;
    }
    Ok(Prepared {
        argv,
        env,
        check,
        python,
        _env: realised,
        _scratch: scratch,
    })
}

/// Dask failed: says why, in the words a user can act on when the
/// environment lacks `distributed` (checked only now, so that a sound
/// environment pays no extra Python start on the way to a running cluster).
fn explain_failure(p: &Prepared, role: Role, status: std::process::ExitStatus) -> String {
    let out = Command::new(&p.check[0])
        .args(&p.check[1..])
        .env_clear()
        .envs(&p.env)
        .output();
    match out {
        Ok(out) if !out.status.success() => {
            let why = String::from_utf8_lossy(&out.stderr);
            let last = why.lines().last().unwrap_or("").trim().to_string();
            format!(
                "the environment has no usable `distributed` ({}: {last}); \
                 add `distributed` to the requirements under [environment] in noyau.toml \
                 (or install it into the kernel's Python) and run `%noyau dask up` again",
                p.python
            )
        }
        Err(e) => format!("cannot run {}: {e}", p.check[0]),
        Ok(_) => format!("Dask's {role:?} exited ({status}); its job log says why"),
    }
}

/// The inner kernelspec's Python, else `python3`.
fn python_of(inner: &str) -> String {
    if let Ok(p) = std::env::var(EnvVars::NOYAU_DASK_PYTHON) {
        if !p.is_empty() {
            return p;
        }
    }
    noyau_wire::kernelspec::find(inner)
        .ok()
        .and_then(|f| f.spec.argv.first().cloned())
        .filter(|a0| {
            std::path::Path::new(a0)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python"))
        })
        .unwrap_or_else(|| "python3".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_argv_has_tls_and_resources() {
        let a = JobArgs {
            role: Role::Worker,
            dir: "/d".into(),
            inner: "python3".into(),
            nthreads: Some(2),
            memory_limit: Some("1GB".into()),
            name: Some("w3".into()),
            lifetime: Some(90),
            nanny: false,
        };
        let scratch = Path::new("/s");
        let argv = dask_argv(&a, "py", scratch).join(" ");
        assert!(
            argv.starts_with("py -m distributed.cli.dask_worker --preload /d/noyau_dask_wait.py --local-directory /s --no-nanny --no-dashboard --dashboard-address 127.0.0.1:0 --nthreads 2 --memory-limit 1GB --name w3 --lifetime 90s"),
            "{argv}"
        );
        let with_nanny = dask_argv(
            &JobArgs {
                nanny: true,
                ..a.clone()
            },
            "py",
            scratch,
        )
        .join(" ");
        assert!(!with_nanny.contains("-nanny"), "{with_nanny}");
        assert!(argv.contains("--scheduler-file /d/scheduler.json --protocol tls --tls-ca-file /d/ca.pem --tls-cert /d/cert.pem --tls-key /d/key.pem"));
        // the scheduler listens before its dashboard loads (the preload's)
        let sched = dask_argv(
            &JobArgs {
                role: Role::Scheduler,
                ..a
            },
            "py",
            scratch,
        )
        .join(" ");
        assert!(
            sched.contains("--dashboard-address :0 --no-dashboard --preload /d/noyau_dask_preload.py --scheduler-file /d/scheduler.json"),
            "{sched}"
        );
    }

    /// `noyau dask-job` refuses a cluster directory, key or preload that
    /// someone else could have made or changed, naming it, before Dask
    /// starts; the proxy's own directory passes.
    #[test]
    fn a_cluster_dir_or_key_open_to_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let root = tempfile::tempdir().unwrap();
        let d = ClusterDir::create(root.path(), "c1").unwrap();
        check_cluster_dir(&d).unwrap();
        let refused = |d: &ClusterDir, path: &Path| {
            let e = format!("{:#}", check_cluster_dir(d).unwrap_err());
            assert!(e.contains(&path.display().to_string()), "{e}");
        };
        chmod(d.path(), 0o777);
        refused(&d, d.path());
        chmod(d.path(), 0o700);
        chmod(&d.key(), 0o644);
        refused(&d, &d.key());
        chmod(&d.key(), 0o600);
        chmod(&d.preload(), 0o666);
        refused(&d, &d.preload());
        chmod(&d.preload(), 0o644);
        check_cluster_dir(&d).unwrap();
        // a link to the user's own directory is not the directory
        let link = ClusterDir(root.path().join("link"));
        std::os::unix::fs::symlink(d.path(), link.path()).unwrap();
        refused(&link, link.path());
    }

    /// The workers' preload returns once the scheduler's file holds its
    /// JSON, not before (an empty file, as Dask leaves it while it writes,
    /// or an empty object, is waited past): run by the real python3.
    #[test]
    fn the_worker_preload_waits_for_the_schedulers_json() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        let preload = t.path().join("noyau_dask_wait.py");
        std::fs::write(&preload, WORKER_PRELOAD).unwrap();
        let file = t.path().join("scheduler.json");
        let mut child = Command::new("python3")
            .arg(&preload)
            .arg("--scheduler-file")
            .arg(&file)
            .spawn()
            .expect("python3 runs the preload (a Debian machine has it)");
        let still_waits = |child: &mut Child, what: &str| {
            // a file it could read is read within 5 ms; 300 ms is ample
            std::thread::sleep(Duration::from_millis(300));
            assert!(child.try_wait().unwrap().is_none(), "returned on {what}");
        };
        still_waits(&mut child, "no file");
        std::fs::write(&file, "").unwrap();
        still_waits(&mut child, "an empty file");
        std::fs::write(&file, "{}").unwrap();
        still_waits(&mut child, "an empty object");
        let mut f = std::fs::File::create(&file).unwrap();
        f.write_all(br#"{"address": "tls://10.0.0.1:8786"}"#)
            .unwrap();
        drop(f);
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "it did not see the scheduler's file"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(child.wait().unwrap().success());
    }
}
