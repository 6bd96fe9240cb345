//! The local backend: the agent runs as a child process of the caller, by
//! the same command line a batch job would run.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;

use async_trait::async_trait;

use crate::job::{Ending, Job};
use crate::{JobEnd, JobSpec, JobState, SchedError};

#[derive(Debug, Clone, Default)]
pub struct LocalBackend;

#[derive(Debug)]
pub(crate) struct LocalHandle {
    pid: u32,
    state: watch::Receiver<JobState>,
}

fn describe(status: std::process::ExitStatus) -> JobEnd {
    match status.signal() {
        Some(sig) => JobEnd {
            description: format!(
                "was killed by signal {sig} ({})",
                Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("?")
            ),
            success: false,
        },
        None => JobEnd {
            description: format!("exited with status {}", status.code().unwrap_or(-1)),
            success: status.success(),
        },
    }
}

fn agent_stdout() -> Stdio {
    use std::os::fd::AsFd;
    match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => Stdio::from(fd),
        Err(_) => Stdio::null(),
    }
}

impl LocalBackend {
    pub(crate) async fn submit(&self, spec: JobSpec) -> Result<Job, SchedError> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(&spec.env)
            // The profile's variables, as a batch job script exports them.
            .envs(&spec.profile.env)
            .stdin(Stdio::null())
            // The caller's stdout may be data (`noyau run nb.ipynb -`): what
            // the agent or its kernel print goes to stderr, as a job's log.
            .stdout(agent_stdout())
            // Its own group: a Ctrl-C meant for the frontend must not reach the agent.
            .process_group(0);
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().map_err(|source| SchedError::LocalSpawn {
            program: spec.program.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        let (tx, rx) = watch::channel(JobState::Running {
            node: host,
            ends_at: None,
        });
        tokio::spawn(async move {
            let end = match child.wait().await {
                Ok(status) => describe(status),
                Err(e) => JobEnd {
                    description: format!("could not be waited for: {e}"),
                    success: false,
                },
            };
            tracing::debug!(pid, end = %end.description, "local agent ended");
            let _ = tx.send(JobState::Ended(end));
        });
        Ok(Job::new(
            format!("local:{pid}"),
            "local",
            rx.clone(),
            Box::new(LocalHandle { pid, state: rx }),
        ))
    }
}

#[async_trait]
impl Ending for LocalHandle {
    /// SIGTERM (the agent stops its kernel and exits), then SIGKILL after 5 s.
    async fn end(&self, _id: &str) {
        let mut state = self.state.clone();
        if matches!(*state.borrow(), JobState::Ended(_)) {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        let ended = state.wait_for(|s| matches!(s, JobState::Ended(_)));
        if tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .is_err()
        {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn runs_and_reports_end() {
        let b = Backend::from_name("local").unwrap();
        let mut env = BTreeMap::new();
        env.insert("NOYAU_TEST_SECRET".into(), "7".into());
        let job = b
            .submit(JobSpec {
                name: "noyau-test".into(),
                program: "sh".into(),
                args: vec!["-c".into(), "exit $NOYAU_TEST_SECRET".into()],
                env,
                cwd: None,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut st = job.state.clone();
        let s = st
            .wait_for(|s| matches!(s, JobState::Ended(_)))
            .await
            .unwrap()
            .clone();
        assert_eq!(
            s,
            JobState::Ended(JobEnd {
                description: "exited with status 7".into(),
                success: false
            })
        );
    }

    #[tokio::test]
    async fn cancel_ends_the_job() {
        let b = Backend::from_name("local").unwrap();
        let job = b
            .submit(JobSpec {
                name: "noyau-test".into(),
                program: "sleep".into(),
                args: vec!["60".into()],
                env: BTreeMap::new(),
                cwd: None,
                ..Default::default()
            })
            .await
            .unwrap();
        b.cancel(&job).await;
        assert!(matches!(*job.state.borrow(), JobState::Ended(_)));
    }

    #[test]
    fn unknown_backend_names_the_known_ones() {
        let e = Backend::from_name("slurmm").unwrap_err().to_string();
        assert!(e.contains("local"), "{e}");
    }
}
