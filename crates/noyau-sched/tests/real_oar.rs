//! OAR's job watcher against the real test cluster that `scripts/test`
//! starts (`scripts/oar-up`, which exports NOYAU_OAR_USER). OAR runs no job
//! of root's, so the jobs are submitted as that user (`runuser`); the
//! watcher follows them as a kernel's proxy does. They are `#[ignore]`d,
//! so a plain `cargo nextest run` reports them skipped; `scripts/test` runs
//! them (`--run-ignored all`) as root or under CI, and one run without a
//! cluster fails.

use std::time::{Duration, Instant};

mod common;

use noyau_sched::{JobState, Scheduler};

/// The test user; fails the test when the cluster is not up.
fn cluster() -> String {
    let user = std::env::var("NOYAU_OAR_USER").ok().filter(|u| {
        std::process::Command::new("oarstat")
            .arg("-J")
            .output()
            .is_ok_and(|o| o.status.success())
            && !u.is_empty()
    });
    user.expect("no OAR test cluster: scripts/test starts one as root (scripts/oar-up)")
}

/// `oarsub` as the test user, from their home (oarsub takes its directory
/// from there); the job's id.
fn submit_as(user: &str, name: &str) -> String {
    let home = std::process::Command::new("sh")
        .args(["-c", &format!("getent passwd {user} | cut -d: -f6")])
        .output()
        .unwrap();
    let home = String::from_utf8(home.stdout).unwrap().trim().to_string();
    let out = std::process::Command::new("runuser")
        .args(["-u", user, "--", "env", &format!("PWD={home}"), "oarsub"])
        .args(["-n", name, "-l", "core=1,walltime=0:05:00"])
        .args(["-O", "/dev/null", "-E", "/dev/null", "sleep 300"])
        .current_dir(&home)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("OAR_JOB_ID="))
        .unwrap_or_else(|| {
            panic!(
                "oarsub refused: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .trim()
        .to_string()
}

#[tokio::test]
#[ignore = "needs the OAR test cluster (scripts/oar-up, as root); scripts/test runs it"]
async fn one_oarstat_call_per_interval_for_ten_jobs() {
    let user = cluster();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let interval = Duration::from_millis(500);
    let wrapper = common::logging_wrapper(dir.path(), "oarstat", &log);
    let watcher = Scheduler::builder("oar")
        .unwrap()
        .command("oarstat", wrapper.to_str().unwrap())
        .unwrap()
        .interval(interval)
        .build();
    // 10 jobs on the cluster's 4 cores: some run, the others wait.
    let ids: Vec<String> = (0..10)
        .map(|i| submit_as(&user, &format!("noyau-test-many-{i}")))
        .collect();
    let states: Vec<_> = ids.iter().map(|id| watcher.adopt(id).state).collect();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let elapsed = t0.elapsed();
    let calls = common::calls(&log);
    let seen: Vec<JobState> = states.iter().map(|s| s.borrow().clone()).collect();
    let _ = std::process::Command::new("oardel").args(&ids).output();
    // Gone before the test ends: deletions the server has not processed yet
    // would hold the cores of the tests after this one.
    for (id, mut st) in ids.iter().zip(states) {
        let ended = st.wait_for(|s| matches!(s, JobState::Ended(_)));
        let gone = tokio::time::timeout(Duration::from_secs(60), ended).await;
        assert!(
            gone.is_ok_and(|r| r.is_ok()),
            "job {id} still {:?} 60 s after oardel",
            *st.borrow()
        );
    }
    for (id, st) in ids.iter().zip(&seen) {
        assert!(
            matches!(st, JobState::Pending { .. } | JobState::Running { .. }),
            "job {id}: {st:?}"
        );
    }
    common::assert_one_call_per_interval(calls, elapsed, interval, "oarstat");
    let running = seen
        .iter()
        .filter(|s| matches!(s, JobState::Running { .. }))
        .count();
    eprintln!("{calls} oarstat calls in {elapsed:?}; {running} of 10 jobs were running");
}
