//! What the kernel's allocation uses, sampled while a frontend shows it (a
//! `noyau` comm is open: the proxy sends `SampleUsage`).
//!
//! Where the scheduler put the job in a cgroup, the cgroup says it for the
//! whole job: on cgroup v2 `cpu.stat`'s `usage_usec`, `memory.current`,
//! `memory.max`; on v1 (many RHEL 8 nodes) the `memory` hierarchy's
//! `memory.usage_in_bytes` and `memory.limit_in_bytes` (a huge value: no
//! limit) and the `cpuacct` hierarchy's `cpuacct.usage` (ns; where the job
//! has no `cpuacct` cgroup of its own, CPU comes from the process tree).
//!
//! Which cgroup is the job's: a scheduler puts the kernel in a leaf (Slurm:
//! `…/job_J/step_batch/task_0`) and the allocation's limit on an ancestor
//! (`…/job_J`). The candidates are the kernel's cgroup and its ancestors
//! below the hierarchy's root, going up only while every process in the
//! ancestor's whole subtree is of the kernel's session or root's (a user,
//! hostile or not, cannot put a process in another's session nor make a
//! root one, Slurm's slurmstepd is root's (in the kernel's own cgroup the
//! session's alone: it may be a daemon's), and a login session's or a
//! user's cgroup holds processes of other sessions: their use is not the
//! job's); of these, the highest that sets a memory limit of its own, else
//! the kernel's cgroup. The rule is checked again before each sample, and
//! the cgroup picked again when it no longer holds (a process of another
//! session came in), and every `REPICK_EVERY` samples while the cgroup
//! read is below the first picked; the limit reported is the one that
//! holds for the cgroup read (its ancestors' too), read at the pick. Otherwise the kernel's process tree from
//! /proc: CPU time and resident memory of the kernel and its descendants,
//! without a limit. GPUs come from
//! `nvidia-smi --query-gpu` when it is on PATH, only those the job may use:
//! `CUDA_VISIBLE_DEVICES` (indices or UUIDs, read as CUDA reads it), else
//! the GPUs the scheduler bound to the job (`noyau_sched::this_job_gpus`);
//! nvidia-smi lists every GPU of the node, other users' too.
//!
//! One sample reads a few small files (the cgroup's subtree's
//! `cgroup.procs` for the check; the process tree: the `stat` of every
//! process of the machine, to find the kernel's children); at one sample
//! every 5 s the agent stays far below 1% of a core (`bench/idle --comm`
//! and the `sampling_cost` bench below measure it: docs/comm.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::unistd::{getsid, Pid};
use noyau_client::process::{proc_stats, Cgroup, ProcStat};
use noyau_link::envelope::{GpuSample, UsageSample};

/// Environment variables read here.
const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// How long `nvidia-smi` may take before GPUs are no longer sampled.
const NVIDIA_SMI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A v1 `memory.limit_in_bytes` at least this big means no limit (the
/// kernel writes 2^63 rounded down to a page).
const V1_UNLIMITED: u64 = 1 << 62;

/// While the source read is below the one first picked (a process of
/// another session came in, maybe only for a moment), it is picked again
/// every this many samples (about a minute at one every 5 s).
const REPICK_EVERY: u32 = 12;

/// At most this many cgroups are gone up from the kernel's (a deeper path
/// is not a scheduler's).
const MAX_DEPTH: usize = 32;

/// Where the numbers come from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// cgroup v2: the job's directory.
    Cgroup(PathBuf),
    /// cgroup v1: the job's directory in the `memory` hierarchy, and in
    /// the `cpuacct` one when it has its own there.
    CgroupV1 {
        memory: PathBuf,
        cpuacct: Option<PathBuf>,
    },
    ProcessTree,
}

impl Source {
    /// The name samples carry (docs/comm.md).
    fn name(&self) -> &'static str {
        match self {
            Source::Cgroup(_) => "cgroup",
            Source::CgroupV1 { .. } => "cgroup-v1",
            Source::ProcessTree => "process-tree",
        }
    }
}

/// A source as picked: the kernel's own cgroups (its session's alone,
/// root's processes refused there, checked again before each sample) and
/// the memory limit that holds for the source, read once at the pick.
#[derive(Debug, Clone)]
struct Pick {
    source: Source,
    own: Vec<PathBuf>,
    limit: Option<u64>,
}

impl Pick {
    fn tree() -> Pick {
        Pick {
            source: Source::ProcessTree,
            own: vec![],
            limit: None,
        }
    }
}

/// Samples one kernel's use; keeps the last CPU reading for the rate.
pub struct Sampler {
    /// The kernel's process, and its session (whose processes alone may be
    /// in the cgroup read).
    pid: u32,
    sid: Option<Pid>,
    pick: Pick,
    /// The source first picked, and the samples since the last pick.
    first: Source,
    since_pick: u32,
    last_cpu: Option<(Instant, u64)>,
    /// `nvidia-smi`, when on PATH and GPUs are not all hidden: looked up
    /// once, not at every sample.
    nvidia_smi: Option<PathBuf>,
    /// The GPUs the job may use.
    visible: Visible,
}

/// Which GPUs the job may use, as `nvidia-smi` names them.
#[derive(Debug, Clone, PartialEq)]
enum Visible {
    All,
    /// By index (`2`) or UUID (`GPU-5d1c…`, or a prefix of it as CUDA takes).
    Only(Vec<String>),
}

impl Visible {
    /// From `CUDA_VISIBLE_DEVICES` when set, else from the scheduler's binding.
    fn from_env() -> Visible {
        match std::env::var(CUDA_VISIBLE_DEVICES) {
            Ok(v) => Visible::Only(cuda_visible(&v)),
            Err(_) => noyau_sched::this_job_gpus().map_or(Visible::All, Visible::Only),
        }
    }

    fn none(&self) -> bool {
        matches!(self, Visible::Only(ids) if ids.is_empty())
    }

    fn allows(&self, index: u32, uuid: &str) -> bool {
        match self {
            Visible::All => true,
            Visible::Only(ids) => ids.iter().any(|id| match id.parse::<u32>() {
                Ok(i) => i == index,
                Err(_) => !uuid.is_empty() && uuid.starts_with(id.as_str()),
            }),
        }
    }
}

/// `CUDA_VISIBLE_DEVICES`'s devices, as CUDA reads the list: up to the
/// first entry that is neither an index nor a GPU UUID (`-1`, `NoDevFiles`
/// hide everything after them; MIG instances are not GPUs nvidia-smi's
/// `--query-gpu` lists).
fn cuda_visible(v: &str) -> Vec<String> {
    (v.split(','))
        .map(str::trim)
        .take_while(|d| d.parse::<u32>().is_ok() || d.starts_with("GPU-"))
        .map(str::to_string)
        .collect()
}

/// CPU time (µs) and memory (bytes) at one moment.
struct Reading {
    cpu_usec: u64,
    mem_bytes: u64,
}

impl Sampler {
    /// A sampler for the kernel whose process is `pid` (the cgroup walk
    /// reads files: off the runtime's thread).
    pub async fn new(pid: u32) -> Sampler {
        let sid = getsid(Some(Pid::from_raw(pid as i32))).ok();
        let pick = move || sid.map_or_else(Pick::tree, |sid| job_cgroup(pid, sid));
        let pick = (tokio::task::spawn_blocking(pick).await).unwrap_or_else(|_| Pick::tree());
        let visible = Visible::from_env();
        let nvidia_smi = nvidia_smi().filter(|_| !visible.none());
        tracing::info!(
            ?pick,
            ?nvidia_smi,
            ?visible,
            "sampling the kernel's resource use"
        );
        Sampler {
            pid,
            sid,
            first: pick.source.clone(),
            pick,
            since_pick: 0,
            last_cpu: None,
            nvidia_smi,
            visible,
        }
    }

    /// One sample; None when the source cannot be read (the kernel is gone).
    pub async fn sample(&mut self) -> Option<UsageSample> {
        let (pid, sid, pick) = (self.pid, self.sid, self.pick.clone());
        self.since_pick += 1;
        let repick = self.pick.source != self.first && self.since_pick >= REPICK_EVERY;
        if repick {
            self.since_pick = 0;
        }
        let reading = tokio::task::spawn_blocking(move || read(pid, sid, pick, repick));
        let gpus = match &self.nvidia_smi {
            Some(tool) => match gpus(tool, &self.visible).await {
                Some(g) => g,
                None => {
                    tracing::warn!(
                        "nvidia-smi did not answer within {}s: GPUs are no longer sampled",
                        NVIDIA_SMI_TIMEOUT.as_secs()
                    );
                    self.nvidia_smi = None;
                    vec![]
                }
            },
            None => vec![],
        };
        let (pick, reading) = reading.await.ok()?;
        if pick.source != self.pick.source {
            tracing::warn!(from = ?self.pick.source, to = ?pick.source, "the cgroup sampled changed (a process of another session came in, or left): sampling another source");
            // another counter: no rate against the last reading
            self.last_cpu = None;
            // REPICK_EVERY samples from this pick, not from the last timed one
            self.since_pick = 0;
        }
        // a re-pick of the same cgroup may find a new limit
        self.pick = pick;
        let reading = reading?;
        let now = Instant::now();
        let cpu_percent = self.last_cpu.map(|(t, usec)| {
            let wall = now.duration_since(t).as_micros().max(1) as f64;
            reading.cpu_usec.saturating_sub(usec) as f64 * 100.0 / wall
        });
        self.last_cpu = Some((now, reading.cpu_usec));
        Some(UsageSample {
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            cpu_percent,
            mem_bytes: reading.mem_bytes,
            mem_limit_bytes: self.pick.limit,
            source: self.pick.source.name().into(),
            gpus,
            cpus: std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok()),
        })
    }
}

/// One reading of `pick`'s source, after checking it still holds
/// (`still_holds`; else, or when `repick`, the source picked again, and read).
fn read(pid: u32, sid: Option<Pid>, pick: Pick, repick: bool) -> (Pick, Option<Reading>) {
    let pick = match sid {
        Some(sid) if repick || !still_holds(&pick, sid) => job_cgroup(pid, sid),
        _ => pick,
    };
    let reading = match &pick.source {
        Source::Cgroup(dir) => read_cgroup(dir),
        Source::CgroupV1 { memory, cpuacct } => read_cgroup_v1(memory, cpuacct.as_deref(), pid),
        Source::ProcessTree => read_tree(pid),
    };
    (pick, reading)
}

/// Whether the cgroups picked still hold only the session's processes, as
/// at the pick: root's too above the kernel's own cgroups, not in them.
fn still_holds(pick: &Pick, sid: Pid) -> bool {
    let read: Vec<&PathBuf> = match &pick.source {
        Source::Cgroup(d) => vec![d],
        Source::CgroupV1 { memory, cpuacct } => std::iter::once(memory).chain(cpuacct).collect(),
        Source::ProcessTree => return true,
    };
    (pick.own.iter()).all(|d| session_only(d, sid, false))
        && (read.into_iter())
            .filter(|d| !pick.own.contains(d))
            .all(|d| session_only(d, sid, true))
}

/// One hierarchy of the kernel's: where it is mounted, and the kernel's
/// cgroup in it.
struct Hierarchy {
    root: PathBuf,
    leaf: PathBuf,
}

impl Hierarchy {
    /// The kernel's cgroup in one hierarchy, from its /proc/PID/cgroup
    /// text (`noyau_client::process::Cgroup::of`). None when the kernel
    /// sits at the hierarchy's root.
    fn of(cgroups: &str, controller: Option<&str>) -> Option<Hierarchy> {
        let c = Cgroup::of(cgroups, controller)?;
        (c.dir != c.root).then_some(Hierarchy {
            root: c.root,
            leaf: c.dir,
        })
    }

    /// The kernel's cgroup and its ancestors below the root (at most
    /// `MAX_DEPTH`), up to the first whose subtree holds a process of
    /// another session; only those with every file of `files` (a v2 leaf
    /// may not have the memory controller its parent has). None when the
    /// leaf does not hold the kernel (a cgroup named with a newline can
    /// fake a line of /proc/PID/cgroup); the leaf alone in a PID
    /// namespace (another's processes there read as pid 0).
    fn own_chain(&self, pid: u32, sid: Pid, files: &[&str]) -> Vec<PathBuf> {
        let pid = pid.to_string();
        let holds_kernel = std::fs::read_to_string(self.leaf.join("cgroup.procs"))
            .is_ok_and(|procs| procs.split_whitespace().any(|p| p == pid));
        if !holds_kernel {
            return vec![];
        }
        let depth = if in_pid_namespace() { 1 } else { MAX_DEPTH };
        let mut chain = vec![];
        let mut dir = self.leaf.clone();
        for level in 0..depth {
            // root's processes only above the leaf: a leaf shared with a
            // daemon (a Slurm without cgroups) is not the job's
            let below_root = dir != self.root && dir.starts_with(&self.root);
            if !below_root || !session_only(&dir, sid, level > 0) {
                break;
            }
            if files.iter().all(|f| dir.join(f).is_file()) {
                chain.push(dir.clone());
            }
            dir.pop();
        }
        chain
    }

    /// The highest cgroup of `chain` that sets a memory limit of its own,
    /// else the lowest (the kernel's own, where it has the files).
    fn job(chain: &[PathBuf], limit: fn(&Path) -> Option<u64>) -> Option<PathBuf> {
        (chain.iter().rev().find(|d| limit(d).is_some()))
            .or(chain.first())
            .cloned()
    }
}

/// The job's cgroup (v2, else v1), or its process tree (see the module's doc).
fn job_cgroup(pid: u32, sid: Pid) -> Pick {
    match std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
        Ok(text) => job_cgroup_of(&text, pid, sid),
        Err(_) => Pick::tree(),
    }
}

/// The job's cgroup, from the kernel's /proc/PID/cgroup `text` (a
/// non-empty chain: the leaf, the kernel's own cgroup, passed the check).
fn job_cgroup_of(text: &str, pid: u32, sid: Pid) -> Pick {
    if let Some(h) = Hierarchy::of(text, None) {
        let chain = h.own_chain(pid, sid, &["memory.current", "cpu.stat"]);
        if let Some(dir) = Hierarchy::job(&chain, v2_limit) {
            return Pick {
                limit: v2_effective_limit(&dir),
                source: Source::Cgroup(dir),
                own: vec![h.leaf],
            };
        }
    }
    let Some(mem) = Hierarchy::of(text, Some("memory")) else {
        return Pick::tree();
    };
    let chain = mem.own_chain(
        pid,
        sid,
        &["memory.usage_in_bytes", "memory.limit_in_bytes"],
    );
    let Some(mut memory) = Hierarchy::job(&chain, v1_limit) else {
        return Pick::tree();
    };
    // v1 counts a child's memory in its parent's only with use_hierarchy
    let hierarchical =
        std::fs::read_to_string(memory.join("memory.use_hierarchy")).is_ok_and(|v| v.trim() == "1");
    if !hierarchical {
        memory = chain[0].clone();
    }
    // cpuacct: the same level as memory's when it is the job's there too
    // (Slurm's hierarchies are parallel), else the kernel's own cgroup
    let mut own = vec![mem.leaf];
    let cpuacct = Hierarchy::of(text, Some("cpuacct")).and_then(|h| {
        let chain = h.own_chain(pid, sid, &["cpuacct.usage"]);
        let same = h.root.join(memory.strip_prefix(&mem.root).ok()?);
        let dir = (chain.iter().find(|d| **d == same))
            .or(chain.first())
            .cloned()?;
        own.push(h.leaf);
        Some(dir)
    });
    Pick {
        limit: v1_effective_limit(&memory),
        source: Source::CgroupV1 { memory, cpuacct },
        own,
    }
}

/// At most this many cgroups are looked into below one (a bigger subtree is
/// taken for not the job's alone).
const MAX_SUBTREE: usize = 256;

/// Whether this process is in a PID namespace below the first (its
/// /proc/self/status `NSpid:` lists more than one pid): processes outside
/// it then read as pid 0 in cgroup.procs, whoever's they are.
/// Read once: a process does not change its PID namespace.
fn in_pid_namespace() -> bool {
    static NESTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NESTED.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status").map_or(true, |s| nested_pids(&s))
    })
}

/// Whether a /proc/PID/status text's `NSpid:` lists more than one pid.
fn nested_pids(status: &str) -> bool {
    (status.lines())
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_some_and(|pids| pids.split_whitespace().count() > 1)
}

/// Whether a line of cgroup.procs is a process that makes its cgroup not
/// the job's alone: of another session and, with `allow_root`, not root's
/// (Slurm's slurmstepd sits in the job's cgroup, in its own session; a
/// user cannot make a root process). A pid the kernel could not name here (0: outside our
/// PID namespace) or that vanished while its owner was read is foreign;
/// one gone before its session was read is no one's.
fn foreign(line: &str, sid: Pid, allow_root: bool) -> bool {
    let Ok(pid) = line.parse::<i32>() else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    match getsid(Some(Pid::from_raw(pid))) {
        Ok(s) if s == sid => false,
        Ok(_) => !(allow_root && root_owned(pid)),
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

/// Whether process `pid` runs as root (its real uid, /proc/PID/status).
fn root_owned(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        (status.lines())
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
}

/// Whether every process in `dir`'s subtree is of session `sid`, or root's
/// with `allow_root` (`foreign`).
fn session_only(dir: &Path, sid: Pid, allow_root: bool) -> bool {
    let mut todo = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(d) = todo.pop() {
        seen += 1;
        if seen > MAX_SUBTREE {
            return false;
        }
        let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) else {
            return false;
        };
        if procs
            .split_whitespace()
            .any(|p| foreign(p, sid, allow_root))
        {
            return false;
        }
        let Ok(entries) = std::fs::read_dir(&d) else {
            return false;
        };
        todo.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    true
}

/// A v2 cgroup's own memory limit (`memory.max`; "max": none).
fn v2_limit(dir: &Path) -> Option<u64> {
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    max.trim().parse().ok()
}

/// A v1 cgroup's own memory limit (a huge value: none).
fn v1_limit(dir: &Path) -> Option<u64> {
    let max = std::fs::read_to_string(dir.join("memory.limit_in_bytes")).ok()?;
    max.trim().parse().ok().filter(|&v| v < V1_UNLIMITED)
}

/// The memory limit that holds for a v2 cgroup: the least `memory.max` of
/// it and its ancestors below the root (which has none); the limit is
/// reported even when a lower cgroup than the job's is read.
fn v2_effective_limit(dir: &Path) -> Option<u64> {
    (dir.ancestors().take(MAX_DEPTH))
        .take_while(|d| d.join("memory.max").is_file())
        .filter_map(v2_limit)
        .min()
}

/// The memory limit that holds for a v1 cgroup: `memory.stat`'s
/// `hierarchical_memory_limit` (its ancestors' where they count), else
/// its own.
fn v1_effective_limit(dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    (stat.lines())
        .find_map(|l| l.strip_prefix("hierarchical_memory_limit "))
        .and_then(|v| v.trim().parse().ok())
        .filter(|&v| v < V1_UNLIMITED)
        .or_else(|| v1_limit(dir))
}

fn read_cgroup(dir: &Path) -> Option<Reading> {
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    let cpu_usec = stat.lines().find_map(|l| {
        l.strip_prefix("usage_usec ")
            .and_then(|v| v.trim().parse().ok())
    })?;
    let mem = std::fs::read_to_string(dir.join("memory.current")).ok()?;
    Some(Reading {
        cpu_usec,
        mem_bytes: mem.trim().parse().ok()?,
    })
}

/// v1: memory from `memory`'s cgroup, CPU from `cpuacct`'s (ns), or from
/// the kernel's process tree where the job has no `cpuacct` cgroup.
fn read_cgroup_v1(memory: &Path, cpuacct: Option<&Path>, pid: u32) -> Option<Reading> {
    let mem = std::fs::read_to_string(memory.join("memory.usage_in_bytes")).ok()?;
    let cpu_usec = match cpuacct {
        Some(d) => {
            let ns: u64 = (std::fs::read_to_string(d.join("cpuacct.usage")).ok()?)
                .trim()
                .parse()
                .ok()?;
            ns / 1000
        }
        None => read_tree(pid)?.cpu_usec,
    };
    Some(Reading {
        cpu_usec,
        mem_bytes: mem.trim().parse().ok()?,
    })
}

/// The kernel and its descendants, summed.
fn read_tree(root: u32) -> Option<Reading> {
    let stats: HashMap<u32, ProcStat> = proc_stats().into_iter().map(|p| (p.pid, p)).collect();
    stats.get(&root)?;
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for p in stats.values() {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let (mut ticks, mut pages) = (0, 0);
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        if let Some(p) = stats.get(&pid) {
            ticks += p.cpu_ticks;
            pages += p.rss_pages;
        }
        todo.extend(children.get(&pid).into_iter().flatten());
    }
    Some(Reading {
        cpu_usec: ticks * 1_000_000 / tick,
        mem_bytes: pages * page,
    })
}

/// `nvidia-smi` on PATH.
fn nvidia_smi() -> Option<PathBuf> {
    let path = std::env::var_os(noyau_vars::EnvVars::PATH)?;
    std::env::split_paths(&path)
        .map(|d| d.join("nvidia-smi"))
        .find(|p| p.is_file())
}

/// The GPUs `nvidia-smi` reports that the job may use (empty when it
/// fails); None when it did not answer in time (a GPU in a bad state can
/// hang it), killed then.
async fn gpus(nvidia_smi: &Path, visible: &Visible) -> Option<Vec<GpuSample>> {
    let out = tokio::process::Command::new(nvidia_smi)
        .args([
            "--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(NVIDIA_SMI_TIMEOUT, out).await {
        Err(_) => None,
        Ok(Ok(o)) if o.status.success() => {
            let all = parse_gpus(&String::from_utf8_lossy(&o.stdout));
            Some(
                all.into_iter()
                    .filter(|(uuid, g)| visible.allows(g.index, uuid))
                    .map(|(_, g)| g)
                    .collect(),
            )
        }
        Ok(_) => Some(vec![]),
    }
}

/// `0, GPU-5d1c…, NVIDIA A100-SXM4-40GB, 30, 1024, 40960` per line (MiB);
/// `[N/A]` fields are unknown. Each GPU with its UUID.
fn parse_gpus(text: &str) -> Vec<(String, GpuSample)> {
    const MIB: f64 = 1024.0 * 1024.0;
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
            let gpu = GpuSample {
                index: f.first()?.parse().ok()?,
                name: f.get(2)?.to_string(),
                util_percent: num(3),
                mem_used_bytes: num(4).map(|m| (m * MIB) as u64),
                mem_total_bytes: num(5).map(|m| (m * MIB) as u64),
            };
            Some((f.get(1)?.to_string(), gpu))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::statfs;

    #[test]
    fn parses_nvidia_smi_lines() {
        let g = parse_gpus(
            "0, GPU-aa, NVIDIA A100-SXM4-40GB, 30, 1024, 40960\n1, GPU-bb, T4, [N/A], 0, 15360\n",
        );
        let g: Vec<GpuSample> = g.into_iter().map(|(_, g)| g).collect();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].name, "NVIDIA A100-SXM4-40GB");
        assert_eq!(g[0].util_percent, Some(30.0));
        assert_eq!(g[0].mem_used_bytes, Some(1024 * 1024 * 1024));
        assert_eq!(g[1].util_percent, None);
        assert!(parse_gpus("garbage\n").is_empty());
    }

    #[test]
    fn reads_a_cgroup_directory() {
        let d = std::env::temp_dir().join(format!("noyau-usage-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("cpu.stat"),
            "usage_usec 2500000\nuser_usec 2000000\n",
        )
        .unwrap();
        std::fs::write(d.join("memory.current"), "1048576\n").unwrap();
        std::fs::write(d.join("memory.max"), "max\n").unwrap();
        let r = read_cgroup(&d).unwrap();
        assert_eq!((r.cpu_usec, r.mem_bytes), (2_500_000, 1_048_576));
        assert_eq!(v2_effective_limit(&d), None);
        std::fs::write(d.join("memory.max"), "8589934592\n").unwrap();
        assert_eq!(v2_effective_limit(&d), Some(8589934592));
        // v1: the limit the kernel writes for none, then one; cpuacct in ns
        std::fs::write(d.join("memory.usage_in_bytes"), "2097152\n").unwrap();
        std::fs::write(d.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        std::fs::write(d.join("cpuacct.usage"), "3000000000\n").unwrap();
        let r = read_cgroup_v1(&d, Some(&d), std::process::id()).unwrap();
        assert_eq!((r.cpu_usec, r.mem_bytes), (3_000_000, 2_097_152));
        assert_eq!(v1_effective_limit(&d), None);
        std::fs::write(d.join("memory.limit_in_bytes"), "314572800\n").unwrap();
        let t = Instant::now();
        while t.elapsed().as_millis() < 100 {
            std::hint::black_box(());
        }
        let r = read_cgroup_v1(&d, None, std::process::id()).unwrap();
        assert_eq!(v1_effective_limit(&d), Some(314572800));
        assert!(r.cpu_usec > 0, "CPU from the process tree without cpuacct");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reports_the_least_limit_of_a_v2_cgroups_ancestors() {
        // files as cgroup v2 lays them out (the root has no memory.max)
        let root = std::env::temp_dir().join(format!("noyau-usage-v2-{}", std::process::id()));
        let task = root.join("job/step/task");
        std::fs::create_dir_all(&task).unwrap();
        for (d, max) in [
            ("job", "314572800"),
            ("job/step", "max"),
            ("job/step/task", "max"),
        ] {
            std::fs::write(root.join(d).join("memory.max"), max).unwrap();
        }
        assert_eq!(v2_effective_limit(&task), Some(314572800));
        std::fs::write(task.join("memory.max"), "104857600").unwrap();
        assert_eq!(v2_effective_limit(&task), Some(104857600));
        // no limit on the way up: none
        std::fs::write(root.join("job/memory.max"), "max").unwrap();
        std::fs::write(task.join("memory.max"), "max").unwrap();
        assert_eq!(v2_effective_limit(&task), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn reads_proc_cgroup_lines() {
        // a hierarchy that is not a mounted cgroup file system is none
        assert!(Hierarchy::of("4:nosuch:/a/b\n", Some("nosuch")).is_none());
        assert!(Hierarchy::of("4:memory:/\n0::/\n", Some("memory")).is_none());
        assert!(Hierarchy::of("4:memory:/a/../b\n", Some("memory")).is_none());
        assert!(Hierarchy::of("0::/\n", None).is_none());
    }

    /// A scratch cgroup tree made as root in the machine's memory hierarchy
    /// (v1 `memory`, and `cpuacct` beside it, else v2): job (limited) /
    /// step / task.
    struct Scratch {
        base: PathBuf,
        cpuacct: Option<PathBuf>,
        v1: bool,
    }

    impl Scratch {
        fn new() -> Option<Scratch> {
            let name = format!("noyau-usage-test-{}", std::process::id());
            let fs = |p: &str, m| statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == m);
            let (root, v1) = if fs("/sys/fs/cgroup/memory", statfs::CGROUP_SUPER_MAGIC) {
                ("/sys/fs/cgroup/memory", true)
            } else if fs("/sys/fs/cgroup", statfs::CGROUP2_SUPER_MAGIC) {
                ("/sys/fs/cgroup", false)
            } else {
                return None;
            };
            let base = Path::new(root).join(name);
            std::fs::create_dir_all(base.join("job/step/task")).ok()?;
            if !v1 {
                for d in ["", "job", "job/step"] {
                    std::fs::write(base.join(d).join("cgroup.subtree_control"), "+memory +cpu")
                        .ok()?;
                }
            }
            let limit = if v1 {
                "memory.limit_in_bytes"
            } else {
                "memory.max"
            };
            std::fs::write(base.join("job").join(limit), "314572800").ok()?;
            let cpuacct = Path::new("/sys/fs/cgroup/cpuacct").join(base.file_name()?);
            let cpuacct = (v1 && std::fs::create_dir_all(cpuacct.join("job/step/task")).is_ok())
                .then_some(cpuacct);
            Some(Scratch { base, cpuacct, v1 })
        }

        /// A process in its own session (`setsid sleep`) moved into `dir`.
        fn spawn_in(&self, dir: &str) -> std::process::Child {
            self.spawn_as(dir, None)
        }

        /// The same, as user `uid` (root's when None).
        fn spawn_as(&self, dir: &str, uid: Option<u32>) -> std::process::Child {
            use std::os::unix::process::CommandExt;
            let mut cmd = std::process::Command::new("sleep");
            cmd.arg("60");
            if let Some(uid) = uid {
                cmd.uid(uid);
            }
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(Into::into));
            }
            let child = cmd.spawn().unwrap();
            for base in [Some(&self.base), self.cpuacct.as_ref()]
                .into_iter()
                .flatten()
            {
                std::fs::write(base.join(dir).join("cgroup.procs"), child.id().to_string())
                    .unwrap();
            }
            child
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            for base in [Some(&self.base), self.cpuacct.as_ref()]
                .into_iter()
                .flatten()
            {
                for d in ["job/step/task", "job/step", "job", ""] {
                    let _ = std::fs::remove_dir(base.join(d));
                }
            }
        }
    }

    #[tokio::test]
    async fn picks_the_highest_cgroup_of_the_kernels_session_alone() {
        let Some(scratch) = Scratch::new() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "no memory cgroup to write here (run as root): the job cgroup's choice is untested"
            );
            eprintln!("skipped: no memory cgroup writable here (run as root)");
            return;
        };
        let mut kernel = scratch.spawn_in("job/step/task");
        // root's process of another session beside the task (Slurm's
        // slurmstepd): no user could have made it, the job is still ours
        let mut stepd = scratch.spawn_in("job/step");
        let mut sampler = Sampler::new(kernel.id()).await;
        let job = scratch.base.join("job");
        let task = scratch.base.join("job/step/task");
        let (memory, name) = match &sampler.pick.source {
            Source::CgroupV1 { memory, cpuacct } => {
                // cpuacct at memory's level: the job's
                let cpuacct_job = scratch.cpuacct.as_ref().map(|d| d.join("job"));
                assert_eq!(cpuacct, &cpuacct_job);
                (memory.clone(), "cgroup-v1")
            }
            Source::Cgroup(d) => (d.clone(), "cgroup"),
            Source::ProcessTree => panic!("the scratch job's cgroup was not picked"),
        };
        assert_eq!((memory, scratch.v1), (job.clone(), name == "cgroup-v1"));
        let first = sampler.sample().await.unwrap();
        assert_eq!(first.source, name);
        assert_eq!(first.mem_limit_bytes, Some(314572800));
        // another user's process, of another session, in the job's step
        // (a hostile user's, had they the right): the job's cgroup is no
        // longer read, but its limit still holds and is reported
        let mut stranger = scratch.spawn_as("job/step", Some(65534));
        let second = sampler.sample().await.unwrap();
        let memory = |s: &Sampler| match &s.pick.source {
            Source::CgroupV1 { memory, .. } | Source::Cgroup(memory) => memory.clone(),
            Source::ProcessTree => panic!("the task's cgroup is still the kernel's alone"),
        };
        assert_eq!(memory(&sampler), task);
        assert_eq!(second.mem_limit_bytes, Some(314572800), "{second:?}");
        // the stranger gone, the job's cgroup is picked again within
        // REPICK_EVERY samples
        stranger.kill().unwrap();
        stranger.wait().unwrap();
        for _ in 0..REPICK_EVERY {
            sampler.sample().await.unwrap();
        }
        assert_eq!(memory(&sampler), job);
        // root's process of another session in the kernel's own cgroup (a
        // daemon's, not a stepd above it): refused before each sample as
        // at the pick, though the job's cgroup allows root's
        let mut daemon = scratch.spawn_in("job/step/task");
        let third = sampler.sample().await.unwrap();
        assert_eq!(third.source, "process-tree", "{third:?}");
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        // a /proc/PID/cgroup line naming a cgroup the kernel is not in (a
        // cgroup named with a newline can fake one) is not taken, though
        // its subtree (the step's, root's stepd gone) is the kernel's alone
        stepd.kill().unwrap();
        stepd.wait().unwrap();
        let sid = getsid(Some(Pid::from_raw(kernel.id() as i32))).unwrap();
        let rel = |d: &str| {
            let rel = scratch.base.join(d);
            let rel = rel.strip_prefix(scratch.base.parent().unwrap()).unwrap();
            let line = if scratch.v1 { "4:memory:/" } else { "0::/" };
            format!("{line}{}\n", rel.display())
        };
        let own = job_cgroup_of(&rel("job/step/task"), kernel.id(), sid);
        assert_ne!(own.source, Source::ProcessTree);
        let fake = job_cgroup_of(&rel("job/step"), kernel.id(), sid);
        assert_eq!(fake.source, Source::ProcessTree);
        // root's process of another session in the kernel's own cgroup (a
        // Slurm without cgroups leaves the kernel in slurmd's): not the job's
        let mut daemon = scratch.spawn_in("job/step/task");
        assert_eq!(job_cgroup(kernel.id(), sid).source, Source::ProcessTree);
        for c in [&mut kernel, &mut daemon] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    #[test]
    fn a_pid_outside_our_namespace_is_foreign() {
        let me = std::process::id();
        let sid = getsid(None).unwrap();
        assert!(!foreign(&me.to_string(), sid, false));
        // cgroup.procs prints 0 for a process outside our PID namespace:
        // getsid(0) would be our own session
        for line in ["0", "-1", "x", ""] {
            assert!(foreign(line, sid, true), "{line:?}");
        }
        assert!(nested_pids("Name:\tpython3\nNSpid:\t4242\t7\n"));
        assert!(!nested_pids("Name:\tpython3\nNSpid:\t4242\n"));
    }

    /// The CPU time of one sample from each source (the cgroup read with
    /// its check, the process tree); run with `cargo test -p noyau-agent
    /// --release -- --ignored --nocapture sampling_cost` (docs/comm.md
    /// records the figures).
    #[test]
    #[ignore = "a measurement, not a test"]
    fn sampling_cost() {
        // this thread's CPU time (ns), where the reads run
        let cpu = || -> f64 {
            let t = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
            t.split_whitespace().next().unwrap().parse().unwrap()
        };
        let time = |pick: Pick, pid: u32, sid: Option<Pid>| {
            let before = cpu();
            for _ in 0..1000 {
                assert!(read(pid, sid, pick.clone(), false).1.is_some());
            }
            (cpu() - before) / 1000.0 / 1000.0
        };
        let scratch = Scratch::new().expect("a writable memory cgroup (run as root)");
        let mut kernel = scratch.spawn_in("job/step/task");
        let pid = kernel.id();
        let sid = getsid(Some(Pid::from_raw(pid as i32))).ok();
        let pick = job_cgroup(pid, sid.unwrap());
        let procs = proc_stats().len();
        let cg = time(pick.clone(), pid, sid);
        let tree = time(Pick::tree(), pid, sid);
        println!(
            "one sample's CPU time: {} {cg:.0} µs, process tree {tree:.0} µs ({procs} processes on the machine)",
            pick.source.name()
        );
        kernel.kill().unwrap();
        kernel.wait().unwrap();
    }

    #[tokio::test]
    async fn samples_this_process_tree() {
        let mut s = Sampler {
            pid: std::process::id(),
            sid: None,
            pick: Pick::tree(),
            first: Source::ProcessTree,
            since_pick: 0,
            last_cpu: None,
            nvidia_smi: None,
            visible: Visible::All,
        };
        let first = s.sample().await.unwrap();
        assert_eq!(first.source, "process-tree");
        assert!(first.cpu_percent.is_none());
        assert!(first.mem_bytes > 1024 * 1024, "{first:?}");
        // Burn some CPU so the rate cannot be zero.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 200 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        let second = s.sample().await.unwrap();
        assert!(second.cpu_percent.unwrap() > 10.0, "{second:?}");
    }

    #[test]
    fn reads_cuda_visible_devices_as_cuda_does() {
        assert_eq!(cuda_visible("0, 2"), ["0", "2"]);
        assert_eq!(cuda_visible("GPU-5d1c,1"), ["GPU-5d1c", "1"]);
        assert_eq!(cuda_visible("1,-1,0"), ["1"], "-1 ends the list");
        assert!(cuda_visible("NoDevFiles").is_empty());
        assert!(cuda_visible("").is_empty());
        assert!(Visible::Only(vec![]).none());
    }

    // A STAND-IN nvidia-smi (there is no GPU here): a node of four GPUs,
    // as the real one lists them whichever the job may use.
    const NVIDIA_SMI_STANDIN: &str = r#"#!/bin/sh
# STAND-IN nvidia-smi for noyau-agent's usage tests: there is no GPU here.
case "$*" in
  *--query-gpu=index,uuid,name,*)
    echo "0, GPU-00aa, STAND-IN A100, 10, 1024, 40960"
    echo "1, GPU-11bb, STAND-IN A100, 20, 1024, 40960"
    echo "2, GPU-22cc, STAND-IN A100, 30, 1024, 40960"
    echo "3, GPU-33dd, STAND-IN A100, 40, 1024, 40960" ;;
  *) exit 2 ;;
esac
"#;

    #[tokio::test]
    async fn reports_only_the_gpus_the_job_may_use() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("noyau-gpus-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let tool = d.join("nvidia-smi");
        std::fs::write(&tool, NVIDIA_SMI_STANDIN).unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let indices = |v: Visible| {
            let tool = tool.clone();
            async move {
                let g = gpus(&tool, &v).await.unwrap();
                g.iter().map(|g| g.index).collect::<Vec<_>>()
            }
        };
        assert_eq!(indices(Visible::All).await, [0, 1, 2, 3]);
        // CUDA_VISIBLE_DEVICES by index, by UUID (or its prefix), mixed
        assert_eq!(indices(Visible::Only(cuda_visible("2,0"))).await, [0, 2]);
        assert_eq!(
            indices(Visible::Only(cuda_visible("GPU-33dd,GPU-11"))).await,
            [1, 3]
        );
        assert_eq!(
            indices(Visible::Only(cuda_visible("GPU-22cc,3"))).await,
            [2, 3]
        );
        // Slurm's binding (SLURM_JOB_GPUS=1), and a job bound to none
        assert_eq!(indices(Visible::Only(vec!["1".into()])).await, [1]);
        assert!(indices(Visible::Only(vec![])).await.is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
