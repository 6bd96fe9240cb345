//! Running a scheduler's commands: one child process each, its stdin fed,
//! its stdout returned, killed when it takes longer than its timeout. Each
//! runs in its own process group, killed whole on timeout or when the
//! caller is gone: a site's wrapper shell around `squeue` or `oarsub` must
//! not leave the real command running after its slot (`throttle.rs`) is
//! freed. Only then: a signal to noyau's own group (Jupyter's kill of a
//! kernel's proxy) no longer reaches a command in flight, so an `sbatch`
//! under way still submits (and the submission's task cancels its job when
//! its caller is gone: `Scheduler::submit_raw`; after a SIGKILL of noyau, its
//! job's agent finds no proxy and ends) and a `scancel` under way still
//! cancels. A failure is a [`CommandError`] that names the command (as it would be
//! typed), its exit status and what it wrote on stderr.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// Why a command gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}`: writing its input: {source}")]
    Input {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}`: {source}")]
    Wait {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {}", stderr.trim())]
    Failed {
        command: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
    #[error("`{command}` did not answer within {after:?}")]
    Timeout { command: String, after: Duration },
}

impl CommandError {
    /// What the command said (stdout and stderr), when it ran and failed.
    pub fn said(&self) -> Option<String> {
        match self {
            CommandError::Failed { stdout, stderr, .. } => Some(format!("{stdout}{stderr}")),
            _ => None,
        }
    }
}

/// Commands run as another user through a prefix (`runuser -u USER --`,
/// `sudo -n -u USER --`), with a clean environment: the hub's way to submit
/// and cancel a user's job without operator rights.
#[derive(Debug, Clone)]
pub struct AsUser {
    /// The user's account name: one call as them at a time (see
    /// `throttle::Turns`).
    pub user: String,
    /// The prefix, the user's name already in it.
    pub prefix: Vec<String>,
    /// The user's home directory.
    pub home: PathBuf,
    /// A noyau binary the user can run (for what must be done as the user
    /// beyond one command: see `submit_through`).
    pub noyau: PathBuf,
}

/// This user's name (`$USER`, else the account of this process's uid).
pub(crate) fn user_name() -> Result<String, crate::SchedError> {
    std::env::var(noyau_vars::EnvVars::USER)
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| uid_name(nix::unistd::getuid()))
        .ok_or_else(|| crate::SchedError::Invalid("cannot tell this user's name".into()))
}

/// The account name of `uid` (None: the system has no user of that uid).
pub(crate) fn uid_name(uid: nix::unistd::Uid) -> Option<String> {
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// One command to run.
#[derive(Debug)]
pub(crate) struct Cmd {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    /// Start from an empty environment rather than this process's.
    clean: bool,
    stdin: Option<String>,
    timeout: Duration,
}

impl Cmd {
    pub(crate) fn new(program: &Path, timeout: Duration) -> Cmd {
        Cmd {
            argv: vec![program.display().to_string()],
            env: BTreeMap::new(),
            clean: false,
            stdin: None,
            timeout,
        }
    }

    pub(crate) fn arg(mut self, a: impl Into<String>) -> Cmd {
        self.argv.push(a.into());
        self
    }

    pub(crate) fn args<S: Into<String>>(mut self, a: impl IntoIterator<Item = S>) -> Cmd {
        self.argv.extend(a.into_iter().map(Into::into));
        self
    }

    pub(crate) fn envs(mut self, env: &BTreeMap<String, String>) -> Cmd {
        self.env
            .extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        self
    }

    pub(crate) fn stdin(mut self, text: impl Into<String>) -> Cmd {
        self.stdin = Some(text.into());
        self
    }

    pub(crate) fn env(mut self, k: &str, v: impl Into<String>) -> Cmd {
        self.env.insert(k.into(), v.into());
        self
    }

    /// Runs it with only the variables set on the command, none of this
    /// process's.
    pub(crate) fn env_clear(mut self) -> Cmd {
        self.clean = true;
        self
    }

    /// Runs it as `as_user` says (nothing changes without one): after the
    /// prefix, in a clean environment holding only `PATH`, `LANG`, `keep`
    /// (this process's values) and what is set on the command.
    pub(crate) fn run_as(mut self, as_user: Option<&AsUser>, keep: &[&str]) -> Cmd {
        let Some(u) = as_user else { return self };
        self.argv.splice(0..0, u.prefix.iter().cloned());
        self.clean = true;
        for k in ["PATH", "LANG"].iter().chain(keep) {
            if let Ok(v) = std::env::var(k) {
                self.env.entry(k.to_string()).or_insert(v);
            }
        }
        self
    }

    /// The command line, as shown in errors.
    pub(crate) fn shown(&self) -> String {
        self.argv.join(" ")
    }

    /// Runs it: its stdout, or why not.
    pub(crate) async fn output(self) -> Result<String, CommandError> {
        let command = self.shown();
        let mut cmd = tokio::process::Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if self.clean {
            cmd.env_clear();
        }
        cmd.envs(&self.env);
        let run = async {
            let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
                command: command.clone(),
                source,
            })?;
            let group = child.id().map(Group::of);
            if let (Some(text), Some(mut w)) = (&self.stdin, child.stdin.take()) {
                w.write_all(text.as_bytes())
                    .await
                    .map_err(|source| CommandError::Input {
                        command: command.clone(),
                        source,
                    })?;
            }
            let out = child
                .wait_with_output()
                .await
                .map_err(|source| CommandError::Wait {
                    command: command.clone(),
                    source,
                })?;
            // Reaped: its pid, the group's id, may be given to another
            // process from now on, so the group is no longer killed.
            if let Some(g) = group {
                g.disarm();
            }
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            if out.status.success() {
                Ok(text(&out.stdout))
            } else {
                Err(CommandError::Failed {
                    command: command.clone(),
                    status: out.status,
                    stdout: text(&out.stdout),
                    stderr: text(&out.stderr),
                })
            }
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(CommandError::Timeout {
                command,
                after: self.timeout,
            }),
        }
    }
}

/// The process group of a command (its leader's pid), killed when this
/// is dropped before the leader is reaped: on timeout, when the caller is
/// gone. Not after the command ended: once reaped, the pid may be another
/// process's (and as root, killing it would hit anyone).
struct Group(nix::unistd::Pid);

impl Group {
    fn of(pid: u32) -> Group {
        Group(nix::unistd::Pid::from_raw(pid.cast_signed()))
    }

    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // ESRCH: the group is gone already
        let _ = nix::sys::signal::killpg(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_status_stderr_and_timeout() {
        let sh = Path::new("sh");
        let t = Duration::from_secs(10);
        let out = Cmd::new(sh, t)
            .args(["-c", "cat; echo \"$X\""])
            .stdin("in\n")
            .envs(&[("X".to_string(), "x".to_string())].into())
            .output()
            .await
            .unwrap();
        assert_eq!(out, "in\nx\n");
        let e = Cmd::new(sh, t)
            .args(["-c", "echo no >&2; exit 3"])
            .output()
            .await
            .unwrap_err();
        assert!(matches!(e, CommandError::Failed { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("`sh -c echo no >&2; exit 3` failed (exit status: 3): no"),
            "{e}"
        );
        let e = Cmd::new(sh, Duration::from_millis(100))
            .args(["-c", "sleep 5"])
            .output()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("did not answer within"), "{e}");
        let e = Cmd::new(Path::new("/nonexistent/x"), t)
            .output()
            .await
            .unwrap_err();
        assert!(
            e.to_string().starts_with("cannot run `/nonexistent/x`"),
            "{e}"
        );
    }

    /// A wrapper shell that timed out does not leave the command it
    /// started running.
    #[tokio::test]
    async fn a_timeout_kills_the_commands_grandchildren_too() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 100 & echo $! > {}; wait", pidfile.display());
        // long enough for sh to write the pid file under load
        let e = Cmd::new(Path::new("sh"), Duration::from_secs(3))
            .args(["-c", &script])
            .output()
            .await
            .unwrap_err();
        assert!(matches!(e, CommandError::Timeout { .. }), "{e:?}");
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // gone, or a zombie waiting for its reaper
        while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the shell's `sleep 100` still runs after the timeout"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn as_another_user_through_the_prefix_with_a_clean_environment() {
        let u = AsUser {
            user: "u".into(),
            prefix: vec!["env".into(), "A=1".into()],
            home: "/".into(),
            noyau: "noyau".into(),
        };
        let out = Cmd::new(Path::new("sh"), Duration::from_secs(10))
            .args(["-c", "echo $A $B ${HOME:-none} ${PATH:+path}"])
            .env("B", "2")
            .run_as(Some(&u), &[])
            .output()
            .await
            .unwrap();
        assert_eq!(out, "1 2 none path\n");
    }
}
