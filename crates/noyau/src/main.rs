//! The `noyau` command: a thin CLI over the crates that do the work.

mod env;
mod install;
mod jobs;
mod run_cli;

use noyau_vars::EnvVars;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "noyau",
    version,
    about = "Jupyter kernels and notebooks on HPC clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a notebook headless, with parameters (papermill-compatible)
    Run(run_cli::RunArgs),
    /// Run a notebook over a parameter grid: one output per point, a summary
    /// (one Slurm job array, or local processes K at a time)
    Sweep(run_cli::SweepArgs),
    /// One point of a sweep (run by `noyau sweep`, not by hand)
    #[command(hide = true)]
    SweepTask(run_cli::SweepTaskArgs),
    /// The proxy kernel a noyau kernelspec starts (run by Jupyter, not by hand)
    Kernel(KernelArgs),
    /// The compute-node side, started by a backend (run by noyau, not by hand)
    Agent(AgentArgs),
    /// Install a kernelspec that runs an existing kernel through noyau
    Install(install::InstallArgs),
    /// List the kernelspecs on the Jupyter paths
    Kernelspecs(install::KernelspecsArgs),
    /// List this user's noyau jobs (kind, name, state, reason, node, time left)
    Ps(PsArgs),
    /// Cancel one of this user's noyau jobs
    Cancel(CancelArgs),
    /// Ask the scheduler for more walltime for one of this user's noyau jobs
    /// (where the scheduler lets users ask for it)
    Extend(ExtendArgs),
    /// The web portal: JupyterLab in batch jobs for a centre's users
    Hub(HubArgs),
    /// Kernel environments and data files in the cache: build, list, show, gc, lock
    #[command(subcommand)]
    Env(env::EnvCommand),
    /// Trust a project's directory (add it to `trusted_projects` in your
    /// config file): its noyau.toml and notebooks may then name code that
    /// runs while their environment is prepared, outside the sandbox
    Trust(TrustArgs),
    /// A Dask scheduler or worker of `%noyau dask up` (run by noyau in a job, not by hand)
    #[command(hide = true)]
    DaskJob(DaskJobArgs),
    /// Hold a restarting kernel's link port for its next proxy (run by
    /// `noyau kernel`, its sockets as stdin and stdout; not by hand)
    #[command(hide = true)]
    LinkKeeper(LinkKeeperArgs),
    /// Submit a hub session's job as this user, where the scheduler's
    /// submission writes the user's files (run by `noyau hub` through
    /// `submit_as`, the job as JSON on stdin; not by hand)
    #[command(hide = true)]
    HubSubmit,
}

#[derive(clap::Args)]
struct TrustArgs {
    /// The project's directory (default: the current one)
    #[arg(default_value = ".")]
    dir: PathBuf,
}

/// `noyau trust DIR`.
fn trust(a: &TrustArgs) -> anyhow::Result<i32> {
    let (dir, file, added) = noyau_config::trust_project(&a.dir)?;
    let d = dir.display();
    if added {
        println!(
            "noyau: trusted {d} (added to trusted_projects in {}): its noyau.toml and notebooks may \
             now name code that runs while their environment is prepared, outside the sandbox; \
             remove it from that list to take it back",
            file.display()
        );
    } else {
        println!(
            "noyau: {d} is already in trusted_projects in {}",
            file.display()
        );
    }
    Ok(0)
}

#[derive(clap::Args)]
struct LinkKeeperArgs {
    /// Let the port go after this many seconds
    #[arg(long = "for", value_name = "SECONDS")]
    grace: u64,
    /// Or once this process (a local agent) has ended
    #[arg(long, value_name = "PID")]
    while_pid: Option<u32>,
    /// The path of the Unix socket given as stdout (removed at the end)
    #[arg(long, value_name = "PATH")]
    socket: std::path::PathBuf,
}

#[derive(clap::Args)]
struct DaskJobArgs {
    /// scheduler or worker
    role: noyau_dask::job::Role,
    /// The cluster's directory (TLS material, scheduler file)
    #[arg(long)]
    dir: PathBuf,
    /// The kernelspec whose Python runs Dask
    #[arg(long, default_value = "python3")]
    inner: String,
    #[arg(long)]
    nthreads: Option<u32>,
    #[arg(long)]
    memory_limit: Option<String>,
    /// The worker's name in the cluster
    #[arg(long)]
    name: Option<String>,
    /// Retire the worker gracefully after this many seconds
    #[arg(long)]
    lifetime: Option<u64>,
    /// Run the worker under a Dask nanny
    #[arg(long)]
    nanny: bool,
}

#[derive(clap::Args)]
struct HubArgs {
    /// The hub's configuration (listen addresses, login, profiles)
    #[arg(
        long,
        value_name = "FILE",
        global = true,
        default_value = "/etc/noyau/hub.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    action: Option<HubAction>,
}

#[derive(Subcommand)]
enum HubAction {
    /// Print the hub's audit table (logins, refusals, spawns, cancels, ends),
    /// oldest first
    Audit {
        /// Only this user's events
        #[arg(long)]
        user: Option<String>,
        /// Only events from this time on: a local date or time (2026-12-06,
        /// "2026-12-06 14:00") or how long ago (90m, 12h, 7d)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
    },
}

#[derive(clap::Args)]
struct PsArgs {
    /// The scheduler to ask: slurm, oar or sge [default: `scheduler` in the config
    /// files, else the one whose commands are on PATH]
    #[arg(long)]
    backend: Option<String>,
}

#[derive(clap::Args)]
struct CancelArgs {
    /// The job id (as `noyau ps` shows it)
    id: String,
    /// The scheduler: slurm, oar or sge [default: as for `noyau ps`]
    #[arg(long)]
    backend: Option<String>,
}

#[derive(clap::Args)]
struct ExtendArgs {
    /// The job id (as `noyau ps` shows it)
    id: String,
    /// How much more time: MM, HH:MM:SS or D-HH:MM:SS
    duration: String,
    /// The scheduler: slurm, oar or sge [default: as for `noyau ps`]
    #[arg(long)]
    backend: Option<String>,
}

#[derive(clap::Args)]
struct KernelArgs {
    /// The connection file written by the frontend
    #[arg(
        short = 'f',
        long = "connection-file",
        value_name = "FILE",
        required_unless_present = "dry_run"
    )]
    connection_file: Option<PathBuf>,
    /// The kernelspec to run where the job runs
    #[arg(long, default_value = "python3")]
    inner: String,
    /// Where the kernel runs: local (a child process), slurm, oar or sge [default: the profile's, else local]
    #[arg(long)]
    backend: Option<String>,
    /// Resource profile ([profiles.NAME] in /etc/noyau/config.toml,
    /// ~/.config/noyau/config.toml, ./noyau.toml)
    #[arg(long)]
    profile: Option<String>,
    /// Override one profile key (KEY=VALUE, env.NAME=VALUE); repeatable
    #[arg(short = 'o', long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
    /// Print the job script (or command) that would start the agent, and exit
    #[arg(long)]
    dry_run: bool,
    /// Address the proxy listens on for its agent [default: 127.0.0.1, any free port]
    #[arg(long, value_name = "ADDR:PORT")]
    link_bind: Option<SocketAddr>,
    /// Address the agent is told to dial, when it differs (a forwarder, a gateway)
    #[arg(long, value_name = "HOST:PORT")]
    link_advertise: Option<String>,
    /// Accept a connection file with an empty HMAC key (unsigned messages:
    /// a forged message cannot be told from a real one); refused otherwise
    #[arg(long)]
    allow_unsigned: bool,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Read the link address, pin and token from this 0600 file (deleted once
    /// read) instead of NOYAU_LINK_ADDR/NOYAU_LINK_PIN/NOYAU_LINK_TOKEN
    #[arg(long, value_name = "FILE")]
    secrets_file: Option<PathBuf>,
    /// The kernelspec to run [default: $NOYAU_INNER, else python3]
    #[arg(long)]
    inner: Option<String>,
    /// Serve a Jupyter server to `noyau hub` instead of running a kernel:
    /// lab (JupyterLab) or server (jupyter_server)
    #[arg(long, value_name = "APP")]
    serve: Option<noyau_agent::web::Server>,
}

/// Logs to stderr, filtered by NOYAU_LOG, else by `default`.
fn init_logging(default: &str) {
    // The zeromq crate warns of each failed redial of a kernel's IOPub
    // socket, which happens once whenever a kernel exits: no news for a
    // user. Its logs show only when the filter names zeromq.
    const QUIET: &str = "zeromq=error";
    let wanted = std::env::var(EnvVars::NOYAU_LOG).unwrap_or_else(|_| default.to_string());
    let filter = if wanted.contains("zeromq") {
        wanted
    } else {
        format!("{wanted},{QUIET}")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},{QUIET}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// A single-threaded runtime: the proxy and the agent are relays whose work
/// is mostly waiting, and one thread keeps their latency and memory low.
/// The runtime is dropped only once no submission is under way (see
/// [`noyau_sched::settled`]).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(noyau_sched::settled(f))
}

/// [`block_on`] for a relay on the latency path: `f` runs as a task, since
/// every wake of `block_on`'s own future also writes the runtime's eventfd
/// (an extra syscall and epoll round per message).
fn block_on_task<T: Send + 'static>(
    f: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    block_on(async { tokio::spawn(f).await? })
}

fn kernel(a: KernelArgs) -> anyhow::Result<i32> {
    let resolved = noyau_config::resolve(a.backend.as_deref(), a.profile.as_deref(), &a.options);
    let (refused, (backend, resources)) = match resolved {
        Ok(r) => (None, r),
        // The kernel stays and says why: JupyterLab shows one that exits as
        // dead, the reason only in the server's log. (--dry-run fails.)
        Err(e @ noyau_config::ConfigError::UntrustedProjectKey(_)) if !a.dry_run => {
            (Some(e), ("local".into(), Default::default()))
        }
        Err(e) => return Err(e.into()),
    };
    let noyau_exe = std::env::current_exe().unwrap_or_else(|_| "noyau".into());
    if a.dry_run {
        return block_on(jobs::dry_run(&backend, &a.inner, noyau_exe, resources));
    }
    let Some(connection_file) = a.connection_file else {
        anyhow::bail!("-f CONNECTION_FILE is required");
    };
    let shown = connection_file.display().to_string();
    let cfg = noyau_proxy::ProxyConfig {
        connection_file,
        inner: a.inner,
        backend,
        profile: a.profile,
        link_bind: a.link_bind,
        link_advertise: a.link_advertise,
        noyau_exe,
        resources,
        allow_unsigned: a.allow_unsigned,
    };
    block_on_task(async move {
        Ok(match refused {
            Some(why) => noyau_proxy::refuse(cfg, &why).await?,
            None => noyau_proxy::run(cfg).await?,
        })
    })
    .with_context(|| format!("the kernel for {shown} could not start"))
}

fn hub(a: HubArgs) -> anyhow::Result<i32> {
    match a.action {
        None => block_on_task(noyau_hub::run(a.config)).map(|()| 0),
        Some(HubAction::Audit { user, since }) => {
            let q = noyau_hub::audit::AuditQuery {
                user: user.as_deref(),
                since: since.as_deref(),
            };
            noyau_hub::audit::print(&a.config, &q, &mut std::io::stdout().lock()).map(|()| 0)
        }
    }
}

/// The site's and user's `concurrent_submissions` (never a project's),
/// for the commands that run scheduler commands as their user: a kernel's
/// proxy, a run, a sweep, cancel. Not ps (it only lists), extend (not
/// throttled), the hub (root, with a pool of its own), `hub-submit` (its
/// hub holds a slot), an agent or a Dask job (in a job, on a compute
/// node). A config that does not load is left to the command to report:
/// the default holds meanwhile.
fn throttle_from_config(command: &Command) {
    let submits = matches!(
        command,
        Command::Kernel(_) | Command::Run(_) | Command::Sweep(_) | Command::Cancel(_)
    );
    if let (true, Ok(Some(n))) = (submits, noyau_config::site_concurrent_submissions()) {
        // (checked when the file was read)
        let _ = noyau_sched::set_concurrent_submissions(n);
    }
}

fn main() {
    let cli = Cli::parse();
    throttle_from_config(&cli.command);
    // The hub says what happens (logins, refusals, spawns, ends) unless told otherwise.
    init_logging(match &cli.command {
        Command::Hub(_) => "warn,noyau_hub=info",
        _ => "warn,zeromq=error",
    });
    let result: anyhow::Result<i32> = match cli.command {
        Command::Run(a) => Ok(noyau_run::main(a.into())),
        Command::Sweep(a) => Ok(noyau_run::sweep::main(a.into())),
        Command::SweepTask(a) => Ok(noyau_run::sweep::task_main(a.into())),
        Command::Kernel(a) => kernel(a),
        Command::Agent(a) => noyau_agent::AgentConfig::load(a.secrets_file.as_deref(), a.inner)
            .and_then(|cfg| match a.serve {
                Some(server) => noyau_agent::web::WebConfig::from_env(cfg, server)
                    .and_then(|w| block_on_task(noyau_agent::web::serve(w))),
                None => block_on_task(noyau_agent::run(cfg)),
            }),
        Command::Hub(a) => hub(a),
        Command::Env(c) => env::main(c),
        Command::Trust(a) => trust(&a),
        Command::Install(a) => install::install(&a).map(|()| 0),
        Command::Kernelspecs(a) => install::kernelspecs(&a).map(|()| 0),
        Command::Ps(a) => block_on(jobs::ps(a.backend.as_deref())),
        Command::Cancel(a) => block_on(jobs::cancel(a.backend.as_deref(), &a.id)),
        Command::Extend(a) => block_on(jobs::extend(a.backend.as_deref(), &a.id, &a.duration)),
        Command::LinkKeeper(a) => block_on(noyau_proxy::keeper::keep(
            noyau_proxy::keeper::Hold {
                grace: std::time::Duration::from_secs(a.grace),
                agent: a.while_pid,
            },
            &a.socket,
        ))
        .map(|()| 0)
        .map_err(Into::into),
        Command::HubSubmit => block_on(noyau_sched::serve_submit_request())
            .map(|()| 0)
            .map_err(Into::into),
        Command::DaskJob(a) => noyau_dask::job::run(noyau_dask::job::JobArgs {
            role: a.role,
            dir: a.dir,
            inner: a.inner,
            nthreads: a.nthreads,
            memory_limit: a.memory_limit,
            name: a.name,
            lifetime: a.lifetime,
            nanny: a.nanny,
        }),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // The chain may quote files, notebooks and what a scheduler said.
            let text = noyau_text::for_terminal(&format!("{e:#}"), noyau_text::Keep::Lines);
            eprintln!("noyau: error: {text}");
            std::process::exit(2);
        }
    }
}
