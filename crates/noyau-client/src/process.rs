//! The kernel process: started in its own process group with every signal
//! at its default action, signalled as a group, killed with its parent, and
//! described in words when it ends.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("the kernelspec's argv is empty; its kernel.json must give the command that starts the kernel")]
    EmptyArgv,
    #[error("cannot start the kernel `{program}`: {source}. Is it installed where the kernel runs, and on PATH?")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

/// How a kernel process ended, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitDescription {
    pub text: String,
    pub signal: Option<i32>,
    pub code: Option<i32>,
    pub oom_killed: bool,
}

impl std::fmt::Display for ExitDescription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl ExitDescription {
    pub fn from_status(status: ExitStatus, oom_killed: bool) -> Self {
        let signal = status.signal();
        let code = status.code();
        let text = if oom_killed {
            format!(
                "was killed by the out-of-memory killer ({}); ask for more memory or use less",
                signal_name(signal.unwrap_or(libc::SIGKILL))
            )
        } else if let Some(sig) = signal {
            format!("was killed by signal {sig} ({})", signal_name(sig))
        } else {
            format!("exited with status {}", code.unwrap_or(-1))
        };
        ExitDescription {
            text,
            signal,
            code,
            oom_killed,
        }
    }
}

pub fn signal_name(sig: i32) -> String {
    Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// A running kernel.
#[derive(Debug)]
pub struct KernelProcess {
    child: Child,
    pid: u32,
    oom_kills_at_start: Option<u64>,
}

/// Substitutes the kernelspec templates Jupyter defines.
pub fn expand_argv(argv: &[String], connection_file: &Path, resource_dir: &Path) -> Vec<String> {
    argv.iter()
        .map(|a| {
            a.replace("{connection_file}", &connection_file.to_string_lossy())
                .replace("{resource_dir}", &resource_dir.to_string_lossy())
        })
        .collect()
}

impl KernelProcess {
    /// Starts `argv` (already expanded) with `env` added to ours.
    pub fn launch(
        argv: &[String],
        env: &BTreeMap<String, String>,
        cwd: Option<&Path>,
    ) -> Result<Self, LaunchError> {
        let (program, args) = argv.split_first().ok_or(LaunchError::EmptyArgv)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env)
            .stdin(Stdio::null())
            // A kernel's own stdout carries only its start-up banner (ipykernel
            // captures everything else into IOPub); stderr keeps tracebacks.
            .stdout(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        // SAFETY: prctl is async-signal-safe; it runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // The kernel must not outlive its agent, even one killed by SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                default_signals()
            });
        }
        let oom_kills_at_start = oom_kill_count();
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        Ok(KernelProcess {
            child,
            pid,
            oom_kills_at_start,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends a signal to the kernel's whole process group.
    pub fn signal(&self, sig: Signal) -> std::io::Result<()> {
        killpg(Pid::from_raw(self.pid as i32), sig).map_err(std::io::Error::from)
    }

    /// Sends a signal to the process group of the kernel inside a wrapper
    /// that starts it in a session of its own (bubblewrap's
    /// `--new-session`): the first process below ours, breadth first, that
    /// leads its own session. Our own group no longer holds it.
    pub fn signal_inner_session(&self, sig: Signal) -> std::io::Result<()> {
        let leader = inner_session_leader(self.pid as i32).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the kernel inside its sandbox has not started yet",
            )
        })?;
        killpg(Pid::from_raw(leader), sig).map_err(std::io::Error::from)
    }

    /// Waits for the kernel to end and says how. Cancel-safe.
    pub async fn wait(&mut self) -> ExitDescription {
        let status = match self.child.wait().await {
            Ok(s) => s,
            Err(e) => {
                return ExitDescription {
                    text: format!("could not be waited for: {e}"),
                    signal: None,
                    code: None,
                    oom_killed: false,
                }
            }
        };
        let oom = status.signal() == Some(libc::SIGKILL)
            && matches!((self.oom_kills_at_start, oom_kill_count()), (Some(a), Some(b)) if b > a);
        // Whatever the kernel started goes with it.
        let _ = self.signal(Signal::SIGKILL);
        ExitDescription::from_status(status, oom)
    }

    /// Kills the process group and reaps the kernel.
    pub async fn kill(&mut self) -> ExitDescription {
        let _ = self.signal(Signal::SIGKILL);
        self.wait().await
    }
}

/// Gives every signal its default action (between fork and exec). A signal
/// ignored in the process that started noyau stays ignored across exec:
/// `nohup` ignores SIGHUP, a script's `&` SIGINT and SIGQUIT, and a kernel
/// would then survive the signal that should end it, or never see an
/// interrupt. A kernel starts as a fresh program would, whatever started us.
/// (Handlers installed here are reset by exec anyway; sigaction is
/// async-signal-safe.)
fn default_signals() -> std::io::Result<()> {
    use nix::sys::signal::{signal, SigHandler};
    for sig in Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP)) {
        // SAFETY: SIG_DFL installs no handler of ours.
        unsafe { signal(sig, SigHandler::SigDfl) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// One process as its `/proc/PID/stat` line shows it: the fields noyau reads.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub pid: u32,
    pub ppid: u32,
    pub session: u32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_pages: u64,
}

/// Every process's stat (blocking); one gone meanwhile is left out.
pub fn proc_stats() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            parse_stat(pid, &std::fs::read_to_string(e.path().join("stat")).ok()?)
        })
        .collect()
}

fn parse_stat(pid: u32, stat: &str) -> Option<ProcStat> {
    // The command name (in parentheses) may hold anything: the fields
    // follow the last ')', from state (0): ppid 1, session 3, utime 11,
    // stime 12, rss 21.
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        pid,
        ppid: u32::try_from(num(1)?).ok()?,
        session: u32::try_from(num(3)?).ok()?,
        cpu_ticks: num(11)? + num(12)?,
        rss_pages: num(21)?,
    })
}

/// The first process below `root` (breadth first) that leads its own
/// session.
fn inner_session_leader(root: i32) -> Option<i32> {
    let procs = proc_stats();
    let mut level = vec![u32::try_from(root).ok()?];
    while !level.is_empty() {
        let below: Vec<&ProcStat> = procs.iter().filter(|p| level.contains(&p.ppid)).collect();
        if let Some(p) = below.iter().find(|p| p.pid == p.session) {
            return i32::try_from(p.pid).ok();
        }
        level = below.iter().map(|p| p.pid).collect();
    }
    None
}

/// The `oom_kill` counter of our memory cgroup, to tell an OOM kill from
/// another SIGKILL. cgroup v2 keeps it in `memory.events`, v1 in
/// `memory.oom_control`; hybrid hosts mount v2 under `unified`.
fn oom_kill_count() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let v1 = Cgroup::of(&cgroups, Some("memory")).map(|c| c.dir.join("memory.oom_control"));
    let v2 = Cgroup::of(&cgroups, None).map(|c| c.dir.join("memory.events"));
    v1.into_iter().chain(v2).find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// A process's cgroup in one hierarchy: where the hierarchy is mounted,
/// and the cgroup's directory there (the root itself for a process at it).
pub struct Cgroup {
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl Cgroup {
    /// From a /proc/PID/cgroup text's line `0::/rel` (v2, mounted at
    /// /sys/fs/cgroup or, on a hybrid system, /sys/fs/cgroup/unified) or
    /// `N:controllers:/rel` (v1, at /sys/fs/cgroup/controllers, e.g.
    /// `cpu,cpuacct`), for the controller named (None: v2). None when that
    /// hierarchy is not a mounted cgroup file system (statfs), or the path
    /// has a `..` or `.` (the kernel writes none: a cgroup named with a
    /// newline can fake a line).
    pub fn of(cgroups: &str, controller: Option<&str>) -> Option<Cgroup> {
        use nix::sys::statfs;
        let (roots, rel) = cgroups.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, names, rel) = (f.next()?, f.next()?, f.next()?);
            match controller {
                None if names.is_empty() => Some((
                    vec![
                        PathBuf::from("/sys/fs/cgroup"),
                        PathBuf::from("/sys/fs/cgroup/unified"),
                    ],
                    rel,
                )),
                Some(c) if names.split(',').any(|n| n == c) => {
                    Some((vec![Path::new("/sys/fs/cgroup").join(names)], rel))
                }
                _ => None,
            }
        })?;
        let magic = if controller.is_some() {
            statfs::CGROUP_SUPER_MAGIC
        } else {
            statfs::CGROUP2_SUPER_MAGIC
        };
        let root = (roots.into_iter())
            .find(|r| statfs::statfs(r).is_ok_and(|s| s.filesystem_type() == magic))?;
        let rel = rel.trim_start_matches('/');
        if rel.split('/').any(|c| c == ".." || c == ".") {
            return None;
        }
        Some(Cgroup {
            dir: root.join(rel),
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_stat_line_is_read_after_its_command_name() {
        // (a command name may hold spaces and parentheses)
        let line = "42 (a) (b c) S 7 42 40 0 -1 4194560 1 0 0 0 30 12 0 0 20 0 1 0 5 10 99 0";
        let p = parse_stat(42, line).unwrap();
        assert_eq!(
            (p.ppid, p.session, p.cpu_ticks, p.rss_pages),
            (7, 40, 42, 99)
        );
        assert!(parse_stat(1, "1 (x) S").is_none());
    }

    use super::*;

    #[tokio::test]
    async fn describes_exit_and_signal() {
        let mut p = KernelProcess::launch(
            &["sh".into(), "-c".into(), "exit 3".into()],
            &BTreeMap::new(),
            None,
        )
        .unwrap();
        let d = p.wait().await;
        assert_eq!(d.code, Some(3));
        assert_eq!(d.text, "exited with status 3");

        let mut p =
            KernelProcess::launch(&["sleep".into(), "30".into()], &BTreeMap::new(), None).unwrap();
        p.signal(Signal::SIGKILL).unwrap();
        let d = p.wait().await;
        assert_eq!(d.signal, Some(9));
        assert!(d.text.contains("SIGKILL"), "{}", d.text);
    }

    /// Signals ignored where noyau was started (as `nohup` and a script's
    /// `&` leave SIGHUP, SIGINT, SIGQUIT) are not ignored by the kernel.
    /// (Before, the kernel inherited them: a SIGHUP left it running.)
    #[tokio::test]
    async fn the_kernel_ignores_no_signal_its_starter_ignored() {
        use nix::sys::signal::{signal, SigHandler};
        let ignored = [Signal::SIGHUP, Signal::SIGINT, Signal::SIGQUIT];
        // SAFETY: SIG_IGN and the handlers read back install no code of ours.
        let before: Vec<_> = ignored
            .iter()
            .map(|&s| unsafe { signal(s, SigHandler::SigIgn) }.unwrap())
            .collect();
        let launched =
            KernelProcess::launch(&["sleep".into(), "30".into()], &BTreeMap::new(), None);
        for (&s, &h) in ignored.iter().zip(&before) {
            unsafe { signal(s, h) }.unwrap();
        }
        let mut p = launched.unwrap();
        // (spawn returns once exec succeeded: this is the kernel's own state)
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
        let sig_ign = status.lines().find(|l| l.starts_with("SigIgn:")).unwrap();
        let mask = u64::from_str_radix(sig_ign.split_whitespace().nth(1).unwrap(), 16).unwrap();
        p.kill().await;
        let still: Vec<Signal> = ignored
            .into_iter()
            .filter(|&s| mask & (1 << (s as u64 - 1)) != 0)
            .collect();
        assert!(still.is_empty(), "{still:?} still ignored ({sig_ign})");
    }

    #[tokio::test]
    async fn signals_reach_the_session_inside_a_wrapper() {
        // setsid stands in for bubblewrap's --new-session: a shell below
        // ours leads its own session and traps SIGINT.
        let t = tempfile::tempdir().unwrap();
        let (ready, flag) = (t.path().join("ready"), t.path().join("interrupted"));
        let script = format!(
            "trap 'echo int > {}; exit 0' INT; touch {}; while :; do sleep 0.05; done",
            flag.display(),
            ready.display()
        );
        let argv = ["setsid", "--wait", "sh", "-c", &script].map(String::from);
        let mut p = KernelProcess::launch(&argv, &BTreeMap::new(), None).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ready.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the shell never started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        p.signal_inner_session(Signal::SIGINT).unwrap();
        let d = p.wait().await;
        assert_eq!(d.code, Some(0), "{}", d.text);
        assert_eq!(std::fs::read_to_string(&flag).unwrap().trim(), "int");
    }

    #[test]
    fn missing_program_is_a_clear_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let e = KernelProcess::launch(&["/nonexistent/kernel".into()], &BTreeMap::new(), None)
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/kernel"), "{e}");
    }

    #[test]
    fn argv_templates() {
        let a = expand_argv(
            &[
                "py".into(),
                "-f".into(),
                "{connection_file}".into(),
                "{resource_dir}/x".into(),
            ],
            Path::new("/r/k.json"),
            Path::new("/spec"),
        );
        assert_eq!(a, vec!["py", "-f", "/r/k.json", "/spec/x"]);
    }
}
