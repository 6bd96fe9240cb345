//! The run's kernel: which kernelspec (a managed Python kernel when there
//! is none), its environment, its backend and profile, and its start
//! through an agent (`noyau_client::remote`), the queue's state shown
//! while a batch job waits.

use std::collections::BTreeMap;
use std::time::Duration;

use noyau_client::agent::AgentLaunch;
use noyau_client::remote::RemoteKernel;
use noyau_notebook::Notebook;
use noyau_sched::JobState;
use serde_json::json;

use crate::cells::Signals;
use crate::detach::allocation;
use crate::error::{bad, RunError};
use crate::options::RunOptions;

/// The backend and profile from `--backend`, `--profile` and `-o`
/// overrides (as `noyau kernel` takes them); the backend is `--backend`,
/// else the profile's, else local.
pub fn backend_and_profile(
    backend: Option<&str>,
    profile: Option<&str>,
    options: &[String],
) -> Result<(String, noyau_config::Profile), RunError> {
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

/// The kernelspec: `--kernel`, else the notebook's, else python3
/// (`python` means `python3`, as in jupyter_client).
pub fn kernel_name(opts: &RunOptions, nb: &Notebook) -> String {
    crate::kernelenv::kernel_name(opts.kernel.as_deref(), nb.kernel_name())
}

/// The kernel's environment and data files (noyau.toml next to the
/// notebook, the notebook's metadata and `%noyau data` cells, `--env`),
/// built and fetched here before the job is submitted, each line shown on
/// `progress`; the job environment that carries them.
pub async fn prepared_env(
    opts: &RunOptions,
    nb: &Notebook,
    project: &noyau_trust::anchor::ProjectDir,
    progress: &crate::progress::Progress,
) -> Result<(noyau_env::Prepared, BTreeMap<String, String>), RunError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let declared = crate::environment::declared(nb, project, opts.env.as_deref(), &cwd)
        .map_err(|e| bad(format!("{e}")))?;
    crate::environment::prepare(&declared, progress).await
}

/// What starts the notebook's kernel: its kernelspec through an agent on
/// `backend`, with `env` and the profile.
pub fn launch(
    opts: &RunOptions,
    name: &str,
    backend: &str,
    env: &BTreeMap<String, String>,
    profile: &noyau_config::Profile,
) -> Result<AgentLaunch, RunError> {
    if let Some(cwd) = opts.cwd.as_ref().filter(|c| !c.is_dir()) {
        return Err(bad(format!("--cwd {}: not a directory", cwd.display())));
    }
    let mut launch = noyau_client::remote::local_launch(name, opts.cwd.clone());
    launch.backend = backend.to_string();
    launch.env = env.clone();
    launch.job_name = crate::input::job_name(&opts.input);
    launch.profile = profile.clone();
    Ok(launch)
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

/// How the kernel's start ended.
pub(crate) enum Started {
    Kernel(Box<RemoteKernel>, Option<String>),
    /// A signal came first: its name and exit code.
    Signal(&'static str, i32),
}

/// Starts the kernel; the node its job runs on, when the scheduler said.
pub(crate) async fn start(
    launch: AgentLaunch,
    opts: &RunOptions,
    signals: &mut Signals,
) -> Result<Started, RunError> {
    let timeout = Duration::from_secs_f64(opts.start_timeout.max(0.1));
    let got: std::cell::Cell<Option<(&'static str, i32)>> = std::cell::Cell::new(None);
    let node: std::cell::RefCell<Option<String>> = Default::default();
    let show_queue = !opts.no_progress && launch.backend != "local";
    let mut last_note = String::new();
    let started = RemoteKernel::start_watching(
        launch,
        timeout,
        async {
            got.set(Some(signals.recv().await));
        },
        |st| {
            if let JobState::Running { node: n, .. } = st {
                *node.borrow_mut() = Some(n.clone()).filter(|n| !n.is_empty());
            }
            let note = queue_note(st);
            if show_queue && !note.is_empty() && note != last_note {
                eprintln!(
                    "noyau: {}",
                    noyau_text::for_terminal(&note, noyau_text::Keep::Nothing)
                );
                last_note = note;
            }
        },
    )
    .await;
    match (started, got.get()) {
        (Ok(k), _) => Ok(Started::Kernel(Box::new(k), node.into_inner())),
        (Err(_), Some((name, code))) => Ok(Started::Signal(name, code)),
        (Err(e), None) => Err(e.into()),
    }
}

/// `metadata.noyau` (where the kernel ran, the environment it ran in, the
/// data files prepared for it) and the kernel's `language_info`.
pub fn record(
    nb: &mut Notebook,
    kernel: &RemoteKernel,
    node: Option<String>,
    name: &str,
    prepared: &noyau_env::Prepared,
) {
    nb.metadata.insert(
        "noyau".into(),
        json!({
            "backend": kernel.backend,
            "host": kernel.host,
            "node": node.or_else(|| kernel.host.clone()),
            "job_id": kernel.job_id(),
            "allocation": allocation(),
            "kernel": name,
            "version": env!("CARGO_PKG_VERSION"),
        }),
    );
    if let Some(record) = &kernel.environment {
        // spec, resolved lock and its hash: running this output again
        // rebuilds the same environment (sources::from_metadata reads it
        // back) as notebook content: not its sandbox (those keys are
        // dropped there), and what names code (an interpreter by path,
        // module_use…) only in a trusted project; its lock is installed
        // from wheels.
        nb.metadata["noyau"]["environment"] = record.clone();
    }
    crate::environment::record(nb, prepared);
    if let Some(li) = kernel.language_info() {
        nb.metadata.insert("language_info".into(), li.clone());
    }
}
