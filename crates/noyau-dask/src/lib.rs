//! Dask clusters on the batch scheduler, owned by a notebook's kernel
//! (`%noyau dask up`).
//!
//! The proxy makes a private *cluster directory* (0700, on the filesystem
//! the compute nodes share with the login node, under
//! `$XDG_STATE_HOME/noyau/dask/`), writes TLS material into it
//! ([`certs`]), and submits one scheduler job and N worker jobs through the
//! target's backend. Each job runs `noyau dask-job` ([`job`]), which
//! realises the target's environment like an agent does, checks that it
//! holds `distributed`, and execs `dask scheduler` / `dask worker` with TLS
//! on. The scheduler writes `scheduler.json` (its `tls://` address) and,
//! through a preload, `status.json` (its workers) into the directory; the
//! proxy reads both ([`ClusterDir`]).
//!
//! Why files rather than talking Dask's protocol from Rust: the scheduler
//! file is Dask's own rendezvous, and a shared filesystem is already what
//! job logs rely on; the proxy stays a relay.

pub mod certs;
mod cluster;
mod dashboard;
mod error;
pub mod job;
pub mod owner;
mod plan;

pub use cluster::{Cluster, ClusterEvent, View, Waiting};
pub use error::DaskError;
pub use plan::{Plan, Size, SCHEDULER_CORES, SCHEDULER_MEM};

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The files of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterDir(pub PathBuf);

/// What the scheduler wrote in its scheduler file.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerInfo {
    pub address: String,
    #[serde(default)]
    pub services: serde_json::Map<String, serde_json::Value>,
}

/// The scheduler's state as its preload writes it every second.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub workers: Vec<WorkerInfo>,
    /// Dask's own adaptive target (`Scheduler.adaptive_target`): how many
    /// workers the current load asks for.
    #[serde(default)]
    pub target: Option<u32>,
    /// The workers Dask would close first (`Scheduler.workers_to_close`), by name.
    #[serde(default)]
    pub to_close: Vec<String>,
}

/// One worker as the scheduler's preload lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerInfo {
    pub address: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub nthreads: u64,
    #[serde(default)]
    pub memory_limit: u64,
    #[serde(default)]
    pub host: String,
}

impl ClusterDir {
    /// Makes a new private directory with the cluster's TLS material.
    pub fn create(root: &Path, id: &str) -> Result<Self, DaskError> {
        use std::os::unix::fs::DirBuilderExt;
        let at = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DaskError::Dir { path, source }
        };
        // Ours (a link followed, as for the state directory's others), made
        // 0700; in /tmp's state directory, that one checked first.
        noyau_sched::private_dir(root)?;
        let dir = root.join(id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(at(&dir))?;
        let c = ClusterDir(dir);
        certs::write(&c.0)?;
        std::fs::write(c.preload(), job::PRELOAD).map_err(at(&c.0))?;
        std::fs::write(c.worker_preload(), job::WORKER_PRELOAD).map_err(at(&c.0))?;
        c.heartbeat(0).map_err(at(&c.0))?;
        Ok(c)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn scheduler_file(&self) -> PathBuf {
        self.0.join("scheduler.json")
    }
    pub fn status_file(&self) -> PathBuf {
        self.0.join("status.json")
    }
    pub fn preload(&self) -> PathBuf {
        self.0.join("noyau_dask_preload.py")
    }
    /// The workers' preload ([`job::WORKER_PRELOAD`]).
    pub fn worker_preload(&self) -> PathBuf {
        self.0.join("noyau_dask_wait.py")
    }
    /// Written by a job that could not start Dask (e.g. no `distributed`).
    pub fn error_file(&self) -> PathBuf {
        self.0.join("error")
    }
    pub fn ca(&self) -> PathBuf {
        self.0.join(certs::CA)
    }
    pub fn cert(&self) -> PathBuf {
        self.0.join(certs::CERT)
    }
    pub fn key(&self) -> PathBuf {
        self.0.join(certs::KEY)
    }
    /// The scheduler's address once it is up.
    pub fn scheduler(&self) -> Option<SchedulerInfo> {
        let text = std::fs::read_to_string(self.scheduler_file()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The first job error, if a job wrote one.
    pub fn error(&self) -> Option<String> {
        std::fs::read_to_string(self.error_file())
            .ok()
            .filter(|s| !s.trim().is_empty())
    }

    /// What the scheduler wrote at its last status write (every second).
    pub fn status(&self) -> Option<Status> {
        let text = std::fs::read_to_string(self.status_file()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The workers the scheduler knew at its last status write.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.status().map(|s| s.workers).unwrap_or_default()
    }

    /// Asks the scheduler to retire these workers gracefully (request
    /// `seq`, increasing): their data moves to other workers, then they close.
    pub fn retire(&self, seq: u64, names: &[String]) -> std::io::Result<()> {
        let text = serde_json::json!({"seq": seq, "names": names}).to_string();
        let tmp = self.0.join(".retire.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, self.0.join("retire.json"))
    }

    /// The scheduler's dashboard (host, port), when it serves one (the
    /// environment has bokeh).
    pub fn dashboard(&self) -> Option<(String, u16)> {
        let info = self.scheduler()?;
        let port = info.services.get("dashboard")?.as_u64()?;
        let host = host_of(&info.address)?;
        Some((host.to_string(), u16::try_from(port).ok()?))
    }
}

/// `tls://node1:40123` → `node1`.
pub fn host_of(address: &str) -> Option<&str> {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let (host, _port) = rest.rsplit_once(':')?;
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

/// The Python the notebook kernel runs (silently) so that a bare
/// `Client()` finds the cluster: the address and TLS files in
/// `dask.config` and in the environment (`DASK_…`, read by processes the
/// kernel starts and by `dask` when it is imported later).
pub fn kernel_setup_code(dir: &ClusterDir, address: &str) -> String {
    let q = |p: PathBuf| py_str(&p.display().to_string());
    let (ca, cert, key) = (q(dir.ca()), q(dir.cert()), q(dir.key()));
    let addr = py_str(address);
    format!(
        "def _noyau_dask_setup():\n\
         \x20   import os\n\
         \x20   env = {{'DASK_SCHEDULER_ADDRESS': {addr},\n\
         \x20          'DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION': 'True',\n\
         \x20          'DASK_DISTRIBUTED__COMM__TLS__CA_FILE': {ca},\n\
         \x20          'DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT': {cert},\n\
         \x20          'DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY': {key}}}\n\
         \x20   os.environ.update(env)\n\
         \x20   try:\n\
         \x20       import dask, distributed\n\
         \x20   except ImportError as e:\n\
         \x20       return 'the notebook kernel cannot import dask.distributed (' + str(e) + '): install distributed in its environment to use the cluster'\n\
         \x20   dask.config.set({{'scheduler-address': {addr},\n\
         \x20                    'distributed.comm.require-encryption': True,\n\
         \x20                    'distributed.comm.tls.ca-file': {ca},\n\
         \x20                    'distributed.comm.tls.client.cert': {cert},\n\
         \x20                    'distributed.comm.tls.client.key': {key}}})\n\
         \x20   return 'ok'\n"
    )
}

/// What the notebook's kernel runs while the cluster's jobs start (a
/// missing `distributed` is reported later, by the setup request).
pub const KERNEL_PREIMPORT: &str = "try:\n    import distributed\nexcept ImportError:\n    pass\n";

/// The `user_expressions` entry that runs [`kernel_setup_code`]'s function.
pub const KERNEL_SETUP_EXPR: &str = "_noyau_dask_setup()";

/// A Python string literal (JSON's escapes are valid Python).
pub fn py_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("tls://node1:40123"), Some("node1"));
        assert_eq!(host_of("tls://[::1]:5"), Some("::1"));
        assert_eq!(host_of("nohost"), None);
    }

    #[test]
    fn cluster_dir_is_private_and_holds_tls_material() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let c = ClusterDir::create(root.path(), "c1").unwrap();
        let mode = std::fs::metadata(c.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let kmode = std::fs::metadata(c.key()).unwrap().permissions().mode() & 0o777;
        assert_eq!(kmode, 0o600);
        assert!(std::fs::read_to_string(c.ca())
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
        assert!(c.scheduler().is_none());
        assert!(c.workers().is_empty());
        std::fs::write(
            c.scheduler_file(),
            r#"{"type":"Scheduler","address":"tls://n1:4000","services":{"dashboard":8787}}"#,
        )
        .unwrap();
        assert_eq!(c.scheduler().unwrap().address, "tls://n1:4000");
        assert_eq!(c.dashboard().unwrap(), ("n1".to_string(), 8787));
    }

    #[test]
    fn setup_code_quotes_paths() {
        let c = ClusterDir(PathBuf::from("/tmp/it's"));
        let code = kernel_setup_code(&c, "tls://n:1");
        assert!(code.contains(r#""/tmp/it's/ca.pem""#));
        assert!(code.contains("'scheduler-address': \"tls://n:1\""));
    }
}
