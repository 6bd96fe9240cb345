//! Every environment variable of noyau's own (`NOYAU_*`), by name, in one
//! place: what it is for, who sets it and who reads it. Code names a
//! variable through [`EnvVars`], never by a string of its own, so that a
//! name cannot drift between the process that sets it and the one that
//! reads it (the agent, the proxy and the hub's jobs share several).
//!
//! The schedulers' variables (`SLURM_JOB_ID`, `OAR_JOB_ID`, `JOB_ID`…) are
//! read by noyau-sched, the one seam that knows the schedulers, and named
//! there. Those of the system and other tools that noyau reads itself
//! (`USER`, `HOME`, `PATH`, `XDG_*`…) are named here too, at the end; the
//! ones it only sets or passes on for a tool (`UV_*`,
//! `CUDA_VISIBLE_DEVICES`) stay with the code that follows that tool's
//! rules. `NOYAU_TASK_ID` and `NOYAU_NTASKS`, set and read
//! only by the Python that noyau-sched writes for `%%noyau on --tasks N`,
//! live in that text.

/// The environment variables of noyau, as associated constants.
pub struct EnvVars;

impl EnvVars {
    // ---- the link between a proxy (or the hub) and its agent ----------

    /// Where the agent dials its proxy or the hub (`HOST:PORT`). Set by
    /// the proxy (noyau-client's `start_agent`) and the hub's jobs; read
    /// and removed from its environment by the agent.
    pub const NOYAU_LINK_ADDR: &'static str = "NOYAU_LINK_ADDR";
    /// The SHA-256 pin of the link listener's certificate (same path).
    pub const NOYAU_LINK_PIN: &'static str = "NOYAU_LINK_PIN";
    /// The agent's one-time link token: a secret, never on a command line
    /// or in a job name (same path).
    pub const NOYAU_LINK_TOKEN: &'static str = "NOYAU_LINK_TOKEN";
    /// What every link variable starts with: noyau sets them, a profile
    /// may not (noyau-sched's profile check).
    pub const NOYAU_LINK_PREFIX: &'static str = "NOYAU_LINK_";
    /// Seconds an agent keeps redialling a proxy that vanished (120; 10
    /// for the local backend); also the Dask cluster's owner grace.
    pub const NOYAU_LINK_GIVE_UP: &'static str = "NOYAU_LINK_GIVE_UP";
    /// Seconds a detached agent waits for the next proxy, and for which
    /// the proxy trusts a handover record and its keeper holds the link's
    /// port (30; 10 for the local backend's agent).
    pub const NOYAU_REATTACH_GRACE: &'static str = "NOYAU_REATTACH_GRACE";
    /// MiB of output an agent keeps while its link is down (256).
    pub const NOYAU_LINK_BUFFER_MB: &'static str = "NOYAU_LINK_BUFFER_MB";
    /// The kernelspec the agent runs (set by the proxy, read by the agent).
    pub const NOYAU_INNER: &'static str = "NOYAU_INNER";

    // ---- the kernel and its proxy --------------------------------------

    /// A private (0700) directory for sockets, connection files and
    /// handover records (noyau-client's runtime directory).
    pub const NOYAU_RUNTIME_DIR: &'static str = "NOYAU_RUNTIME_DIR";
    /// Where a headless IPython kernel keeps its history (`noyau run` to
    /// its agent): a file, `:memory:`, or empty for IPython's default.
    pub const NOYAU_IPYTHON_HIST_FILE: &'static str = "NOYAU_IPYTHON_HIST_FILE";
    /// Seconds of idleness after which a kernel's batch job is given back,
    /// or `off`: over `[idle] kernel` of the config files (the proxy).
    pub const NOYAU_KERNEL_IDLE: &'static str = "NOYAU_KERNEL_IDLE";
    /// The same for a `%%noyau on` target's job (`[idle] target`).
    pub const NOYAU_TARGET_IDLE: &'static str = "NOYAU_TARGET_IDLE";
    /// Seconds after which a `noyau` comm not heard from is closed (150).
    pub const NOYAU_COMM_EXPIRE: &'static str = "NOYAU_COMM_EXPIRE";
    /// When, before a job's walltime, its agent warns (seconds, comma
    /// separated), read in noyau-sched for the agent and the comm.
    pub const NOYAU_WALLTIME_WARN: &'static str = "NOYAU_WALLTIME_WARN";

    // ---- environments and data -----------------------------------------

    /// The kernel's environment spec, as `%noyau env SPEC` would take it.
    pub const NOYAU_ENV: &'static str = "NOYAU_ENV";
    /// A spec (normalised JSON) carried to the agent.
    pub const NOYAU_ENV_SPEC: &'static str = "NOYAU_ENV_SPEC";
    /// What the submitting host prepared (JSON) for the job to check.
    pub const NOYAU_ENV_PREPARED: &'static str = "NOYAU_ENV_PREPARED";
    /// The environment cache's root (default `$XDG_CACHE_HOME/noyau/envs`).
    pub const NOYAU_ENV_CACHE: &'static str = "NOYAU_ENV_CACHE";
    /// A site's read-only cache, looked in before the user's own.
    pub const NOYAU_ENV_SITE_CACHE: &'static str = "NOYAU_ENV_SITE_CACHE";
    /// The uv binary to use.
    pub const NOYAU_UV: &'static str = "NOYAU_UV";
    /// Set in the kernel's environment: the directory of its data files.
    pub const NOYAU_DATA: &'static str = "NOYAU_DATA";

    // ---- jobs ----------------------------------------------------------

    /// What every variable of noyau's starts with: a job's environment
    /// file carries this process's (noyau-sched's job files).
    pub const NOYAU_PREFIX: &'static str = "NOYAU_";
    /// Set in a detached run's job: the runner writes its status file.
    pub const NOYAU_DETACHED: &'static str = "NOYAU_DETACHED";
    /// A detached run's `-p`, `-r`, `-y` values (JSON), in its job's
    /// environment rather than on the runner's argv (taken out by the runner).
    pub const NOYAU_RUN_PARAMETERS: &'static str = "NOYAU_RUN_PARAMETERS";
    /// A detached run's notebook as read at submission: the path of its
    /// private copy (0600, in `STATE/runs`), which the job runs and removes.
    pub const NOYAU_RUN_INPUT: &'static str = "NOYAU_RUN_INPUT";
    /// A detached run's notebook directory as anchored at submission, its
    /// `DEV:INO`: the job's runner refuses a directory that is no longer it.
    pub const NOYAU_RUN_INPUT_DIR: &'static str = "NOYAU_RUN_INPUT_DIR";
    /// Exported by a job array's script: the task's id (a sweep's point).
    pub const NOYAU_ARRAY_TASK_ID: &'static str = "NOYAU_ARRAY_TASK_ID";
    /// Exported by a Grid Engine job's script: when `h_rt` comes (seconds
    /// since the epoch).
    pub const NOYAU_SGE_END: &'static str = "NOYAU_SGE_END";

    /// A scheduler watcher's poll interval in seconds (2), e.g.
    /// `NOYAU_SLURM_POLL`.
    pub fn poll(scheduler: &str) -> String {
        format!("NOYAU_{}_POLL", scheduler.to_ascii_uppercase())
    }

    // ---- Dask ----------------------------------------------------------

    /// The cluster's directory, in each of its jobs.
    pub const NOYAU_DASK_DIR: &'static str = "NOYAU_DASK_DIR";
    /// The Python that runs Dask in the cluster's jobs.
    pub const NOYAU_DASK_PYTHON: &'static str = "NOYAU_DASK_PYTHON";
    /// The grace period (seconds) the cluster's jobs give a silent owner.
    pub const NOYAU_DASK_OWNER_GRACE: &'static str = "NOYAU_DASK_OWNER_GRACE";
    /// How many workers were submitted with the scheduler: its dashboard
    /// loads once they are in (or at its first page), not while they register.
    pub const NOYAU_DASK_FIRST_WORKERS: &'static str = "NOYAU_DASK_FIRST_WORKERS";
    /// The local port the proxy forwards the Dask dashboard to.
    pub const NOYAU_DASK_DASHBOARD_PORT: &'static str = "NOYAU_DASK_DASHBOARD_PORT";

    // ---- the hub's sessions ----------------------------------------------

    /// The session's id, in its job (the agent serves JupyterLab for it).
    pub const NOYAU_HUB_SESSION: &'static str = "NOYAU_HUB_SESSION";
    /// JupyterLab's base URL in the hub (`/user/NAME/`).
    pub const NOYAU_HUB_BASE_URL: &'static str = "NOYAU_HUB_BASE_URL";
    /// The `jupyter` command a session's job starts (default `jupyter`).
    pub const NOYAU_JUPYTER: &'static str = "NOYAU_JUPYTER";

    // ---- the program -----------------------------------------------------

    /// The site's config file (default `/etc/noyau/config.toml`).
    pub const NOYAU_SYSTEM_CONFIG: &'static str = "NOYAU_SYSTEM_CONFIG";
    /// The log filter (tracing's `EnvFilter` syntax), to stderr.
    pub const NOYAU_LOG: &'static str = "NOYAU_LOG";

    // ---- the system's and other tools' that noyau reads --------------------

    /// The user's name as the login set it (noyau-sched; the uid's account
    /// when unset).
    pub const USER: &'static str = "USER";
    /// The user's home: the XDG directories' default parent.
    pub const HOME: &'static str = "HOME";
    /// Where programs are looked for.
    pub const PATH: &'static str = "PATH";
    /// noyau's state directory's parent (default `~/.local/state`).
    pub const XDG_STATE_HOME: &'static str = "XDG_STATE_HOME";
    /// The caches' parent (default `~/.cache`).
    pub const XDG_CACHE_HOME: &'static str = "XDG_CACHE_HOME";
    /// The config files' parent (default `~/.config`).
    pub const XDG_CONFIG_HOME: &'static str = "XDG_CONFIG_HOME";
    /// The login session's private runtime directory.
    pub const XDG_RUNTIME_DIR: &'static str = "XDG_RUNTIME_DIR";
    /// The user's own Jupyter config directories (the hub's sessions keep
    /// them after the hub's own).
    pub const JUPYTER_CONFIG_PATH: &'static str = "JUPYTER_CONFIG_PATH";
    /// An active virtualenv (its `pip.conf` is read).
    pub const VIRTUAL_ENV: &'static str = "VIRTUAL_ENV";
    /// The uv config file the user chose: left to uv, which then reads no
    /// other (noyau names one itself only when this is unset).
    pub const UV_CONFIG_FILE: &'static str = "UV_CONFIG_FILE";
}

/// The value of `name`, a variable that holds seconds: None when unset,
/// else the duration, or what is wrong with the value (not a number,
/// negative, not finite, or too large for a duration), for the caller to
/// report with the variable's name.
pub fn seconds(name: &str) -> Option<Result<std::time::Duration, String>> {
    let v = std::env::var(name).ok()?;
    Some(parse_seconds(&v).ok_or_else(|| format!("{name}={v:?} is not a number of seconds")))
}

/// A value of seconds as [`seconds`] reads it: None when it is not one.
pub fn parse_seconds(v: &str) -> Option<std::time::Duration> {
    let s = v.trim().parse::<f64>().ok().filter(|s| *s >= 0.0)?;
    std::time::Duration::try_from_secs_f64(s).ok()
}

/// The value of an XDG base directory variable (`XDG_STATE_HOME`,
/// `XDG_RUNTIME_DIR`) as a path, if it is an absolute one: the XDG Base Directory
/// Specification says a relative path in its variables is invalid and
/// must be ignored (it would put noyau's files under whatever directory
/// the process was started in); an empty one is unset.
pub fn absolute(value: Option<std::ffi::OsString>) -> Option<std::path::PathBuf> {
    value
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_absolute())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_an_absolute_path_is_a_directory() {
        let abs = |v: &str| absolute(Some(v.into()));
        assert_eq!(abs("/run/user/1000"), Some("/run/user/1000".into()));
        for ignored in ["", "state", "./state", "../state", "~/state"] {
            assert_eq!(abs(ignored), None, "{ignored}");
        }
        assert_eq!(absolute(None), None);
    }

    #[test]
    fn seconds_are_non_negative_finite_numbers_a_duration_can_hold() {
        assert_eq!(parse_seconds("2.5"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_seconds(" 0 "), Some(Duration::ZERO));
        for bad in ["-1", "nan", "inf", "1e20", "ten", ""] {
            assert_eq!(parse_seconds(bad), None, "{bad}");
        }
    }
}
