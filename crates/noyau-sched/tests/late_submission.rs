//! A submission whose caller gave up while the scheduler's command ran (a
//! kernel shut down, a hub request dropped): the job id that comes after
//! is cancelled at once, not left with no one to follow it. `sbatch` here
//! answers only once the test opens a FIFO, after it has given up.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use noyau_sched::{JobSpec, Scheduler};

fn script(path: &Path, text: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{text}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

async fn exists(path: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path:?} never came"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_job_given_after_its_caller_gave_up_is_cancelled_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = d.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    // (this test binary runs alone: no other thread reads the environment)
    std::env::set_var("XDG_STATE_HOME", d.join("state"));
    std::env::set_var("XDG_RUNTIME_DIR", &run);
    let (gate, began, cancelled) = (d.join("gate"), d.join("began"), d.join("cancelled"));
    nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let (sbatch, scancel) = (d.join("sbatch"), d.join("scancel"));
    let (g, b, c) = (gate.display(), began.display(), cancelled.display());
    script(
        &sbatch,
        &format!("cat >/dev/null; touch {b}; cat {g} >/dev/null; echo 4242"),
    );
    script(&scancel, &format!("echo \"$@\" >> {c}"));
    let s = Scheduler::builder("slurm")
        .unwrap()
        .command("sbatch", sbatch.to_str().unwrap())
        .unwrap()
        .command("scancel", scancel.to_str().unwrap())
        .unwrap()
        .interval(Duration::from_secs(3600))
        .build();
    let spec = JobSpec {
        name: "noyau-late".into(),
        program: "/bin/true".into(),
        ..Default::default()
    };
    tokio::select! {
        r = s.submit(&spec) => panic!("submitted before sbatch could answer: {r:?}"),
        () = exists(&began) => {}
    }
    // The caller is gone; sbatch answers now.
    tokio::task::spawn_blocking(move || std::fs::write(&gate, b""))
        .await
        .unwrap()
        .unwrap();
    noyau_sched::submissions_settled().await;
    assert_eq!(std::fs::read_to_string(&cancelled).unwrap(), "4242\n");
}
