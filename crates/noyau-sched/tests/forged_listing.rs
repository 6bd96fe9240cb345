//! A job name cannot end another user's job. Slurm's squeue prints a job's
//! name raw and slurmctld checks only its length, so any user may name a
//! job `x\n12|CANCELLED|…` and squeue then prints a line of theirs for job
//! 12. The `squeue` here prints what the real one would for a victim's
//! running job 12 and an attacker's job 13 so named, in the format it is
//! asked for (the name only where `%j` is asked).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use noyau_sched::{JobState, Scheduler, Scope};

fn fake_squeue(dir: &Path) -> PathBuf {
    let path = dir.join("squeue");
    let script = r#"#!/bin/sh
for a; do case "$a" in *%j*) named=1 ;; esac; done
if [ -n "$named" ]; then
  printf '%s\n' '12|RUNNING|None|node7|2026-01-01T09:00:00|debug|59:00|noyau-hub' \
    '13|PENDING|Priority||N/A|debug|1:00:00|x' '12|CANCELLED|None||N/A|debug|0:00|noyau-hub'
else
  printf '%s\n' '12|RUNNING|None|node7|2026-01-01T09:00:00|debug|59:00' \
    '13|PENDING|Priority||N/A|debug|1:00:00'
fi
"#;
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Job 12's state after one listing, followed in `scope`.
async fn state_of_12(scope: Scope) -> JobState {
    let dir = tempfile::tempdir().unwrap();
    let squeue = fake_squeue(dir.path());
    let s = Scheduler::builder("slurm")
        .unwrap()
        .command("squeue", squeue.to_str().unwrap())
        .unwrap()
        .interval(Duration::from_secs(3600))
        .scope(scope)
        .build();
    let job = s.adopt("12");
    s.refresh().await;
    let st = job.state.borrow().clone();
    st
}

/// The hub's listing (every user's jobs) asks for no names.
#[tokio::test]
async fn another_users_job_name_does_not_end_a_hub_session() {
    let st = state_of_12(Scope::All).await;
    assert!(
        matches!(&st, JobState::Running { node, .. } if node == "node7"),
        "{st:?}"
    );
}

/// A user's own listing has the names (`noyau ps` shows them): a line
/// for a job listed twice in different states is not trusted.
#[tokio::test]
async fn a_job_listed_twice_is_not_ended_by_the_second_line() {
    let st = state_of_12(Scope::Mine).await;
    assert!(
        matches!(&st, JobState::Unknown { why } if why.contains("listed job 12 twice")),
        "{st:?}"
    );
}
