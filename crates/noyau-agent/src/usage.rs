//! What the kernel's allocation uses, sampled while a frontend shows it (a
//! `noyau` comm is open: the proxy sends `SampleUsage`).
//!
//! Where the kernel has a cgroup (v2) of its own, the cgroup says it for
//! the whole job: `cpu.stat`'s `usage_usec`, `memory.current`,
//! `memory.max`. "Of its own": not the root, and every process in it is
//! of the kernel's session (a login session's or a container's cgroup
//! holds other processes, whose use is not the job's). Otherwise the
//! kernel's process tree from /proc: CPU time and resident memory of the
//! kernel and its descendants, without a limit. GPUs come from
//! `nvidia-smi --query-gpu` when it is on PATH, only those the job may use:
//! `CUDA_VISIBLE_DEVICES` (indices or UUIDs, read as CUDA reads it), else
//! the GPUs the scheduler bound to the job (`noyau_sched::this_job_gpus`);
//! nvidia-smi lists every GPU of the node, other users' too.
//!
//! One sample reads a few small files (the process tree: the `stat` of
//! every process of the machine, to find the kernel's children); at one
//! sample every 5 s the agent stays far below 1% of a core (`bench/idle
//! --comm` measures it: docs/comm.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use noyau_client::process::{proc_stats, ProcStat};
use noyau_link::envelope::{GpuSample, UsageSample};

/// Environment variables read here.
const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// How long `nvidia-smi` may take before GPUs are no longer sampled.
const NVIDIA_SMI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Where the numbers come from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Cgroup(PathBuf),
    ProcessTree(u32),
}

/// Samples one kernel's use; keeps the last CPU reading for the rate.
pub struct Sampler {
    source: Source,
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

/// CPU time (µs) and memory (bytes) at one moment, and the memory limit.
struct Reading {
    cpu_usec: u64,
    mem_bytes: u64,
    mem_limit: Option<u64>,
}

impl Sampler {
    /// A sampler for the kernel whose process is `pid`.
    pub fn new(pid: u32) -> Sampler {
        let source = match own_cgroup(pid) {
            Some(dir) => Source::Cgroup(dir),
            None => Source::ProcessTree(pid),
        };
        let visible = Visible::from_env();
        let nvidia_smi = nvidia_smi().filter(|_| !visible.none());
        tracing::info!(
            ?source,
            ?nvidia_smi,
            ?visible,
            "sampling the kernel's resource use"
        );
        Sampler {
            source,
            last_cpu: None,
            nvidia_smi,
            visible,
        }
    }

    /// One sample; None when the source cannot be read (the kernel is gone).
    pub async fn sample(&mut self) -> Option<UsageSample> {
        let source = self.source.clone();
        let reading = tokio::task::spawn_blocking(move || match &source {
            Source::Cgroup(dir) => read_cgroup(dir),
            Source::ProcessTree(pid) => read_tree(*pid),
        });
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
        let reading = reading.await.ok()??;
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
            mem_limit_bytes: reading.mem_limit,
            source: match self.source {
                Source::Cgroup(_) => "cgroup",
                Source::ProcessTree(_) => "process-tree",
            }
            .into(),
            gpus,
            cpus: std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok()),
        })
    }
}

/// The cgroup v2 hierarchy's mount: /sys/fs/cgroup, or its `unified`
/// part on a hybrid (v1 + v2) system.
fn cgroup_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").is_file())
}

/// The kernel's cgroup directory, when it is the job's own (see the module's doc).
fn own_cgroup(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    if rel == "/" || rel.contains("..") {
        return None;
    }
    let dir = cgroup_root()?.join(rel.trim_start_matches('/'));
    if !dir.join("memory.current").is_file() || !dir.join("cpu.stat").is_file() {
        return None;
    }
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32))).ok()?;
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    let alone = procs.split_whitespace().all(|p| {
        p.parse::<i32>().ok().is_some_and(|p| {
            nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(p))).is_ok_and(|s| s == sid)
        })
    });
    alone.then_some(dir)
}

fn read_cgroup(dir: &Path) -> Option<Reading> {
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    let cpu_usec = stat.lines().find_map(|l| {
        l.strip_prefix("usage_usec ")
            .and_then(|v| v.trim().parse().ok())
    })?;
    let mem = std::fs::read_to_string(dir.join("memory.current")).ok()?;
    let max = std::fs::read_to_string(dir.join("memory.max")).unwrap_or_default();
    Some(Reading {
        cpu_usec,
        mem_bytes: mem.trim().parse().ok()?,
        // "max": no limit.
        mem_limit: max.trim().parse().ok(),
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
        mem_limit: None,
    })
}

/// `nvidia-smi` on PATH.
fn nvidia_smi() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
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
        assert_eq!(
            (r.cpu_usec, r.mem_bytes, r.mem_limit),
            (2_500_000, 1_048_576, None)
        );
        std::fs::write(d.join("memory.max"), "8589934592\n").unwrap();
        assert_eq!(read_cgroup(&d).unwrap().mem_limit, Some(8589934592));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn samples_this_process_tree() {
        let mut s = Sampler {
            source: Source::ProcessTree(std::process::id()),
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
