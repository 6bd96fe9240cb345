//! `%noyau dask up|status|down`: a Dask cluster on the batch scheduler,
//! owned by the notebook's kernel (noyau-dask's [`Cluster`], a task of its
//! own).
//!
//! `up` starts the cluster and keeps its cell busy until the scheduler is
//! up; the host's kernel then gets a silent request of noyau's own that
//! puts the address and the TLS files in `dask.config` and the
//! environment, so a bare `Client()` connects, and the cell ends with a
//! `Client('tls://…')` line. While jobs of the cluster wait in the queue,
//! a note says why (the scheduler's reason), in the `up` cell, and later in
//! the cell that runs while worker jobs wait (after [`NOTE_AFTER`]), as a
//! queued kernel's note does. `down`, and the end of the kernel or the
//! run, cancel every job of the cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use noyau_dask::ClusterEvent;
use noyau_dask::{Cluster, Plan, Size, Waiting};
use noyau_sched::{Backend, Profile};
use serde_json::{json, Value};

use crate::note::{job_wait, waited, Note};
use crate::{Host, MagicError, Output, Peer};

pub const USAGE: &str =
    "usage: %noyau dask up [N | --adapt MIN MAX] [--target T] [--worker-cores C] [--worker-mem M] [--worker-time T] [--nanny] | \
                         %noyau dask status | %noyau dask down";

/// At most this many workers (fixed or adaptive).
const MAX_WORKERS: u32 = 1000;

/// Worker jobs that waited less than this are not worth a note in the
/// running cell (they start as the cell starts).
pub const NOTE_AFTER: Duration = Duration::from_secs(5);

/// What `%noyau dask up` was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpArgs {
    pub workers: u32,
    /// `--adapt MIN MAX`: the worker jobs follow Dask's adaptive target.
    pub adapt: Option<(u32, u32)>,
    pub target: Option<String>,
    pub worker_cores: Option<u32>,
    pub worker_mem: Option<String>,
    /// The worker jobs' walltime (Slurm time), when not the profile's.
    pub worker_time: Option<String>,
    /// `--nanny`: workers under Dask's nanny (needed by `Client.restart()`).
    pub nanny: bool,
}

/// Where the host's own kernel runs: what `dask up` without `--target`
/// uses, and what every job of a cluster needs.
#[derive(Debug, Clone)]
pub struct KernelSide {
    /// The kernel's backend (`local`, a scheduler).
    pub backend: String,
    /// The kernel's profile.
    pub profile: Profile,
    /// The kernelspec whose Python runs Dask.
    pub inner: String,
    pub noyau_exe: PathBuf,
    /// The jobs' environment (the kernel's environment spec, …).
    pub env: BTreeMap<String, String>,
}

/// Parses the words after `dask up`; what they leave out comes from
/// `[dask]` in noyau.toml (`defaults`), checked the same way.
pub fn parse_up(
    words: &[String],
    defaults: &noyau_config::DaskSettings,
) -> Result<UpArgs, MagicError> {
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    read_up(&words, defaults).map_err(MagicError::Usage)
}

/// [`parse_up`], its error the usage text.
fn read_up(words: &[&str], defaults: &noyau_config::DaskSettings) -> Result<UpArgs, String> {
    let mut a = UpArgs::default();
    let mut it = words.iter();
    let mut n: Option<u32> = None;
    while let Some(w) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .map(|v| v.to_string())
                .ok_or_else(|| format!("{name} needs a value; {USAGE}"))
        };
        match *w {
            "--target" => a.target = Some(value("--target")?),
            "--worker-cores" => {
                let v = value("--worker-cores")?;
                a.worker_cores =
                    Some(v.parse().map_err(|_| {
                        format!("--worker-cores {v:?}: expected a positive integer")
                    })?);
            }
            "--adapt" => {
                let mut bound = |what: &str| -> Result<u32, String> {
                    let v = value("--adapt")?;
                    v.parse()
                        .map_err(|_| format!("--adapt {what} {v:?}: expected a number; {USAGE}"))
                };
                a.adapt = Some((bound("MIN")?, bound("MAX")?));
            }
            "--worker-time" => a.worker_time = Some(value("--worker-time")?),
            "--nanny" => a.nanny = true,
            "--worker-mem" => a.worker_mem = Some(value("--worker-mem")?),
            w if n.is_none() && !w.starts_with('-') => {
                n = Some(w.parse().map_err(|_| {
                    format!("{w:?}: the number of workers is 1 to {MAX_WORKERS}; {USAGE}")
                })?);
            }
            other => return Err(format!("unexpected {other:?}; {USAGE}")),
        }
    }
    if n.is_some() && a.adapt.is_some() {
        return Err(format!(
            "give a number of workers or --adapt MIN MAX, not both; {USAGE}"
        ));
    }
    check(&a, n, "--")?;
    // What the line leaves out comes from [dask]; a size on the line
    // (N or --adapt) replaces [dask]'s (workers or adapt).
    let from_file = n.is_none() && a.adapt.is_none();
    let d = UpArgs {
        workers: 0,
        adapt: defaults
            .adapt
            .map(|[lo, hi]| (lo, hi))
            .filter(|_| from_file),
        target: defaults.target.clone(),
        worker_cores: defaults.worker_cores,
        worker_mem: defaults.worker_mem.clone(),
        worker_time: defaults.worker_time.clone(),
        nanny: defaults.nanny.unwrap_or(false),
    };
    let dn = defaults.workers.filter(|_| from_file);
    if dn.is_some() && d.adapt.is_some() {
        return Err("[dask] in noyau.toml: give `workers` or `adapt`, not both".into());
    }
    check(&d, dn, "[dask] ")?;
    Ok(UpArgs {
        workers: n.or(dn).unwrap_or(1),
        adapt: a.adapt.or(d.adapt),
        target: a.target.or(d.target),
        worker_cores: a.worker_cores.or(d.worker_cores),
        worker_mem: a.worker_mem.or(d.worker_mem),
        worker_time: a.worker_time.or(d.worker_time),
        nanny: a.nanny || d.nanny,
    })
}

/// The target `dask up` with these words runs on (`--target`, else
/// `[dask] target`), when it names one.
pub fn target_of(words: &[String]) -> Option<String> {
    let cwd = noyau_trust::anchor::ProjectDir::cwd().ok()?;
    let cfg = noyau_config::Config::load(&cwd).ok()?;
    parse_up(words, &cfg.dask).ok()?.target
}

/// Checks the values of `dask up`'s flags (`src` "--") or of `[dask]`
/// (`src` "[dask] "), naming the one at fault as the user wrote it.
fn check(a: &UpArgs, workers: Option<u32>, src: &str) -> Result<(), String> {
    let key = |flag: &str| {
        if src == "--" {
            format!("--{flag}")
        } else {
            format!("{src}{}", flag.replace('-', "_"))
        }
    };
    if let Some(n) = workers.filter(|n| !(1..=MAX_WORKERS).contains(n)) {
        let what = if src == "--" {
            "the number of workers".to_string()
        } else {
            key("workers")
        };
        return Err(format!("{what} {n}: expected 1 to {MAX_WORKERS}"));
    }
    if let Some((min, max)) = a.adapt {
        if max == 0 || min > max || max > MAX_WORKERS {
            return Err(format!(
                "{} {min} {max}: expected MIN <= MAX, MAX from 1 to {MAX_WORKERS} (e.g. 0 10)",
                key("adapt")
            ));
        }
    }
    if a.worker_cores == Some(0) {
        return Err(format!(
            "{} 0: expected a positive integer",
            key("worker-cores")
        ));
    }
    if let Some(m) = &a.worker_mem {
        noyau_config::parse_size(m).map_err(|e| format!("{}: {e}", key("worker-mem")))?;
    }
    if let Some(t) = &a.worker_time {
        noyau_config::parse_time(t).map_err(|e| format!("{}: {e}", key("worker-time")))?;
    }
    Ok(())
}

/// The cluster to make for `a`: its jobs through the target's profile and
/// backend (or the kernel's), the scheduler's own allocation from `[dask]`.
fn plan(a: &UpArgs, d: &noyau_config::DaskSettings, k: &KernelSide) -> Result<Plan, MagicError> {
    let bad = |e: &dyn std::fmt::Display| MagicError::Dask(e.to_string());
    let (from, profile) = match &a.target {
        Some(t) => (
            format!("target {t}"),
            noyau_config::resolve(None, Some(t), &[])
                .map_err(|e| bad(&e))?
                .1,
        ),
        None => ("the kernel's profile".to_string(), k.profile.clone()),
    };
    let backend = profile
        .backend
        .clone()
        .or_else(|| a.target.is_none().then(|| k.backend.clone()))
        .unwrap_or_else(|| "local".into());
    let scheduler_profile = match &d.scheduler_profile {
        Some(p) => Some(
            noyau_config::resolve(None, Some(p), &[])
                .map_err(|e| bad(&format!("[dask] scheduler_profile: {e}")))?
                .1,
        ),
        None => None,
    };
    Ok(Plan {
        from,
        backend: Backend::from_name(&backend).map_err(|e| bad(&e))?,
        profile,
        scheduler_profile,
        scheduler_cores: d.scheduler_cores.unwrap_or(noyau_dask::SCHEDULER_CORES),
        scheduler_mem: Some(
            d.scheduler_mem
                .clone()
                .unwrap_or_else(|| noyau_dask::SCHEDULER_MEM.into()),
        ),
        size: match a.adapt {
            Some((min, max)) => Size::Adapt { min, max },
            None => Size::Fixed(a.workers),
        },
        worker_cores: a.worker_cores,
        worker_mem: a.worker_mem.clone(),
        worker_time: a.worker_time.clone(),
        nanny: a.nanny,
        inner: k.inner.clone(),
        noyau_exe: k.noyau_exe.clone(),
        env: k.env.clone(),
    })
}

/// A `dask up` cell until it ends.
struct Up<C> {
    cell: C,
    /// Why the cluster's jobs wait, while they do.
    note: Note,
    /// msg_id of the setup request to the notebook's kernel.
    setup: Option<String>,
    address: String,
    dashboard: String,
    started: Instant,
}

/// The kernel's Dask cluster, as the magics see it.
pub struct Dask<C> {
    cluster: Option<Cluster>,
    up: Option<Up<C>>,
    /// Why worker jobs wait, in the cell that runs meanwhile.
    note: Option<(C, Note)>,
}

impl<C> Default for Dask<C> {
    fn default() -> Self {
        Dask {
            cluster: None,
            up: None,
            note: None,
        }
    }
}

/// What the notebook's kernel runs as the jobs start.
fn preimport() -> Value {
    json!({
        "code": noyau_dask::KERNEL_PREIMPORT, "silent": true, "store_history": false,
        "allow_stdin": false, "stop_on_error": false, "user_expressions": {},
    })
}

impl<C: Clone + PartialEq> Dask<C> {
    /// The cluster, while one exists.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// True while a cluster exists (its events matter).
    pub fn is_up(&self) -> bool {
        self.cluster.is_some()
    }

    /// True while a `dask up` cell waits for its cluster.
    pub fn starting(&self) -> bool {
        self.up.is_some()
    }

    /// `%noyau dask up`: starts the cluster; the cell ends once the
    /// scheduler is up and the kernel configured (or the cluster failed).
    pub async fn up<H: Host<Cell = C>>(
        &mut self,
        host: &mut H,
        cell: C,
        words: &[String],
        k: &KernelSide,
    ) {
        match self.start(words, k).await {
            Ok(cluster) => {
                host.output(&cell, Output::stream("stdout", cluster.summary()));
                // The kernel is idle while the jobs start (its cell is
                // noyau's): it imports `distributed` now rather than once
                // the scheduler is up, when the setup and `Client()` need it.
                if let Err(e) = host.request(Peer::Kernel, preimport()) {
                    tracing::debug!("no early import of distributed in the kernel: {e}");
                }
                self.cluster = Some(cluster);
                self.up = Some(Up {
                    cell,
                    note: Note::new(),
                    setup: None,
                    address: String::new(),
                    dashboard: String::new(),
                    started: Instant::now(),
                });
            }
            Err(e) => host.finish(&cell, Err(e)),
        }
    }

    async fn start(&self, words: &[String], k: &KernelSide) -> Result<Cluster, MagicError> {
        if self.cluster.is_some() {
            return Err(MagicError::Dask("this kernel already has a Dask cluster; `%noyau dask status` shows it, `%noyau dask down` ends it".into()));
        }
        let cwd =
            noyau_trust::anchor::ProjectDir::cwd().map_err(|e| MagicError::Usage(e.to_string()))?;
        let cfg = noyau_config::Config::load(&cwd).map_err(|e| MagicError::Usage(e.to_string()))?;
        let a = parse_up(words, &cfg.dask)?;
        let plan = plan(&a, &cfg.dask, k)?;
        Cluster::start(plan)
            .await
            .map_err(|e| MagicError::Dask(e.to_string()))
    }

    /// `%noyau dask status`.
    pub async fn status(&self) -> String {
        match &self.cluster {
            Some(c) => c.status().await,
            None => "[noyau] no Dask cluster; `%noyau dask up N` starts one\n".into(),
        }
    }

    /// `%noyau dask down`.
    pub async fn down<H: Host<Cell = C>>(&mut self, host: &mut H) -> String {
        match self.release(host, "it was taken down").await {
            Some(n) => format!("[noyau] Dask cluster down: cancelled its {n} jobs\n"),
            None => "[noyau] no Dask cluster is running\n".into(),
        }
    }

    /// Ends the cluster (down, a kernel's shutdown or restart, the end of
    /// a run); a `dask up` cell still waiting fails with `why`. How many
    /// jobs it had.
    pub async fn release<H: Host<Cell = C>>(&mut self, host: &mut H, why: &str) -> Option<usize> {
        let c = self.cluster.take()?;
        if let Some(up) = self.up.take() {
            host.finish(
                &up.cell,
                Err(MagicError::Dask(format!("the cluster ended: {why}"))),
            );
        }
        self.note = None;
        Some(c.down().await)
    }

    /// The cluster's next event; never resolves without a cluster.
    pub async fn event(&mut self) -> ClusterEvent {
        match self.cluster.as_mut() {
            Some(c) => c.next_event().await,
            None => std::future::pending().await,
        }
    }
}

impl<C: Clone + PartialEq> Dask<C> {
    /// One event of the cluster's task.
    pub fn on_event<H: Host<Cell = C>>(&mut self, host: &mut H, ev: ClusterEvent) {
        let backend = self.cluster.as_ref().map_or("", |c| c.backend());
        match ev {
            ClusterEvent::Waiting { jobs, since } => {
                let text = waiting_text(backend, &jobs, since);
                self.note_waiting(host, &jobs, since, &text);
            }
            ClusterEvent::Running { waited: w } => {
                let text = format!(
                    "noyau: Dask: every job of the cluster runs now (they waited up to {}).",
                    waited(w.as_secs())
                );
                if let Some(up) = self.up.as_mut().filter(|u| u.note.shown) {
                    if let Some(out) = up.note.update(&text) {
                        host.output(&up.cell, out);
                    }
                }
                if let Some((cell, mut note)) = self.note.take() {
                    if let Some(out) = note.update(&text) {
                        host.output(&cell, out);
                    }
                }
            }
            ClusterEvent::Up { address, dashboard } => self.configure(host, address, dashboard),
            ClusterEvent::Failed(why) => {
                self.cluster = None;
                self.note = None;
                let Some(up) = self.up.take() else {
                    tracing::warn!("the Dask cluster ended: {why}");
                    return;
                };
                let text = format!(
                    "{why}; every job of the cluster was cancelled (job logs: {})",
                    noyau_sched::log_dir().display()
                );
                host.finish(&up.cell, Err(MagicError::Dask(text)));
            }
        }
    }

    /// Why jobs wait: in the `dask up` cell while it waits; later, in the
    /// cell that runs, when worker jobs waited [`NOTE_AFTER`].
    fn note_waiting<H: Host<Cell = C>>(
        &mut self,
        host: &mut H,
        jobs: &[Waiting],
        since: Duration,
        text: &str,
    ) {
        if let Some(up) = self.up.as_mut() {
            if let Some(out) = up.note.update(text) {
                host.output(&up.cell, out);
            }
            return;
        }
        if since < NOTE_AFTER || !jobs.iter().any(Waiting::is_worker) {
            return;
        }
        let Some(cell) = host.running_cell() else {
            return;
        };
        if self.note.as_ref().is_none_or(|(c, _)| *c != cell) {
            self.note = Some((cell.clone(), Note::new()));
        }
        if let Some((cell, note)) = self.note.as_mut() {
            if let Some(out) = note.update(text) {
                host.output(cell, out);
            }
        }
    }

    /// The scheduler is up: the notebook's kernel is set up for it.
    fn configure<H: Host<Cell = C>>(&mut self, host: &mut H, address: String, dashboard: String) {
        let (Some(up), Some(c)) = (self.up.as_mut(), self.cluster.as_ref()) else {
            return;
        };
        let code = noyau_dask::kernel_setup_code(c.dir(), &address);
        let request = json!({
            "code": code, "silent": true, "store_history": false,
            "allow_stdin": false, "stop_on_error": false,
            "user_expressions": {"noyau_dask": noyau_dask::KERNEL_SETUP_EXPR},
        });
        up.address = address;
        up.dashboard = dashboard;
        match host.request(Peer::Kernel, request) {
            Ok(id) => up.setup = Some(id),
            Err(e) => {
                let cell = up.cell.clone();
                self.up = None;
                // Dropping the handle takes the cluster down.
                self.cluster = None;
                let why = format!(
                    "cannot configure the notebook's kernel: {e}; the cluster was taken down"
                );
                host.finish(&cell, Err(MagicError::Dask(why)));
            }
        }
    }

    /// The reply to request `id`, if it is the setup's: the `up` cell ends.
    pub fn on_reply<H: Host<Cell = C>>(&mut self, host: &mut H, id: &str, reply: &Value) -> bool {
        if self.up.as_ref().and_then(|u| u.setup.as_deref()) != Some(id) {
            return false;
        }
        let Some(up) = self.up.take() else {
            return false;
        };
        let got = &reply["user_expressions"]["noyau_dask"];
        let result = if got["data"]["text/plain"].as_str() == Some("'ok'") {
            Ok(format!(
                "[noyau] scheduler up after {} s; this kernel is configured for it (TLS, certificate of this cluster only)\n\
                 Client({})  # `from dask.distributed import Client; client = Client()` connects\ndashboard: {}\n",
                up.started.elapsed().as_secs(),
                noyau_dask::py_str(&up.address),
                up.dashboard
            ))
        } else {
            let why = got["data"]["text/plain"]
                .as_str()
                .map(|s| s.trim_matches('\'').to_string())
                .or_else(|| got["evalue"].as_str().map(str::to_string))
                .unwrap_or_else(|| "the setup request failed".into());
            Err(MagicError::Dask(format!(
                "the cluster is up at {} but {why}; `%noyau dask down` ends it",
                up.address
            )))
        };
        host.finish(&up.cell, result);
        true
    }
}

/// `noyau: Dask: worker w1 queued on slurm job 13 …; waiting for 12s. …`
fn waiting_text(backend: &str, jobs: &[Waiting], since: Duration) -> String {
    let each: Vec<String> = jobs
        .iter()
        .filter_map(|w| {
            Some(format!(
                "{} {}",
                w.role,
                job_wait(backend, &w.id, &w.state)?
            ))
        })
        .collect();
    format!(
        "noyau: Dask: {}; waiting for {}. Work on the cluster waits for its workers; `%noyau dask status` shows it.",
        each.join("; "),
        waited(since.as_secs())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Recorder;

    #[test]
    fn up_arguments() {
        let none = noyau_config::DaskSettings::default();
        let parse = |w: &[&str]| {
            let w: Vec<String> = w.iter().map(|s| s.to_string()).collect();
            parse_up(&w, &none)
        };
        assert_eq!(parse(&[]).unwrap().workers, 1);
        let a = parse(&[
            "2",
            "--target",
            "gpu",
            "--worker-cores",
            "4",
            "--worker-mem",
            "2G",
        ])
        .unwrap();
        assert_eq!(
            a,
            UpArgs {
                workers: 2,
                target: Some("gpu".into()),
                worker_cores: Some(4),
                worker_mem: Some("2G".into()),
                ..Default::default()
            }
        );
        let a = parse(&["--adapt", "0", "3", "--worker-time", "2"]).unwrap();
        assert_eq!(a.adapt, Some((0, 3)));
        assert_eq!(a.worker_time.as_deref(), Some("2"));
        assert!(parse(&["--adapt", "3", "1"]).is_err());
        assert!(parse(&["--adapt", "0", "0"]).is_err());
        assert!(parse(&["--adapt", "0"]).is_err());
        assert!(parse(&["2", "--adapt", "0", "3"]).is_err());
        assert!(parse(&["--worker-time", "soon"]).is_err());
        assert!(parse(&["0"]).is_err());
        assert!(parse(&["--worker-cores"]).is_err());
        assert!(parse(&["--worker-cores", "0"]).is_err());
        assert!(parse(&["--worker-mem", "lots"]).is_err());
        assert!(parse(&["2", "3"]).is_err());
        assert!(!parse(&["2"]).unwrap().nanny);
        assert!(parse(&["2", "--nanny"]).unwrap().nanny);
    }

    #[test]
    fn dask_settings_fill_what_the_line_leaves_out() {
        let d = noyau_config::DaskSettings {
            target: Some("hpc".into()),
            adapt: Some([0, 8]),
            worker_mem: Some("2G".into()),
            ..Default::default()
        };
        let p = |w: &[&str], d: &noyau_config::DaskSettings| {
            let w: Vec<String> = w.iter().map(|s| s.to_string()).collect();
            parse_up(&w, d)
        };
        let a = p(&["--worker-mem", "1G"], &d).unwrap();
        assert_eq!(a.adapt, Some((0, 8)));
        assert_eq!(a.target.as_deref(), Some("hpc"));
        assert_eq!(a.worker_mem.as_deref(), Some("1G"));
        // a size on the line replaces [dask]'s
        let a = p(&["3"], &d).unwrap();
        assert_eq!((a.workers, a.adapt), (3, None));
        let bad = noyau_config::DaskSettings {
            worker_time: Some("soon".into()),
            ..Default::default()
        };
        let e = p(&[], &bad).unwrap_err().to_string();
        assert!(e.starts_with("[dask] worker_time:"), "{e}");
        let both = noyau_config::DaskSettings {
            workers: Some(2),
            adapt: Some([0, 2]),
            ..Default::default()
        };
        assert!(p(&[], &both).unwrap_err().to_string().contains("not both"));
        let nanny = noyau_config::DaskSettings {
            nanny: Some(true),
            ..Default::default()
        };
        assert!(p(&["2"], &nanny).unwrap().nanny);
    }

    fn waiting(role: &str, id: &str) -> Waiting {
        Waiting {
            role: role.into(),
            id: id.into(),
            state: noyau_sched::JobState::Pending {
                reason: "Resources".into(),
                start: None,
                partition: Some("debug".into()),
            },
            log: std::path::PathBuf::new(),
        }
    }

    #[test]
    fn waiting_workers_are_noted_in_the_running_cell() {
        let mut h = Recorder {
            running: Some(4),
            ..Default::default()
        };
        let mut d: Dask<u32> = Dask::default();
        let jobs = vec![waiting("worker w1", "13")];
        // a short wait is not worth a note
        d.on_event(
            &mut h,
            ClusterEvent::Waiting {
                jobs: jobs.clone(),
                since: Duration::from_secs(1),
            },
        );
        assert!(h.outputs.is_empty());
        d.on_event(
            &mut h,
            ClusterEvent::Waiting {
                jobs: jobs.clone(),
                since: Duration::from_secs(6),
            },
        );
        let (cell, out) = &h.outputs[0];
        assert_eq!((*cell, out.msg_type), (4, "display_data"));
        let text = out.content["data"]["text/plain"].as_str().unwrap();
        assert!(
            text.starts_with("noyau: Dask: worker w1 queued on  job 13 (partition debug): reason Resources, start time not known yet; waiting for 6s."),
            "{text}"
        );
        // the next cell gets a note of its own; the end of the wait updates it
        h.running = Some(5);
        d.on_event(
            &mut h,
            ClusterEvent::Waiting {
                jobs,
                since: Duration::from_secs(11),
            },
        );
        assert_eq!(
            (h.outputs[1].0, h.outputs[1].1.msg_type),
            (5, "display_data")
        );
        d.on_event(
            &mut h,
            ClusterEvent::Running {
                waited: Duration::from_secs(12),
            },
        );
        assert_eq!(
            (h.outputs[2].0, h.outputs[2].1.msg_type),
            (5, "update_display_data")
        );
        // the scheduler alone waiting is not the workers
        d.on_event(
            &mut h,
            ClusterEvent::Waiting {
                jobs: vec![waiting("scheduler", "12")],
                since: Duration::from_secs(30),
            },
        );
        assert_eq!(h.outputs.len(), 3);
    }
}
