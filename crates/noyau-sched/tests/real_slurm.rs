//! The Slurm backend against the real test cluster that `scripts/test`
//! starts (`scripts/slurm-up`, which exports SLURM_CONF). They are
//! `#[ignore]`d, so a plain `cargo nextest run` reports them skipped;
//! `scripts/test` runs them (`--run-ignored all`) as root or under CI, and
//! one run without a cluster fails.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod common;

use noyau_sched::{Backend, JobSpec, JobState, Profile, Scheduler};

/// Fails the test when the cluster is not up.
fn cluster() {
    let up = std::env::var_os("SLURM_CONF").is_some()
        && std::process::Command::new("sinfo")
            .arg("-h")
            .output()
            .is_ok_and(|o| o.status.success());
    assert!(
        up,
        "no Slurm test cluster: scripts/test starts one as root (scripts/slurm-up; export SLURM_CONF)"
    );
}

fn sleeper(name: &str, env: BTreeMap<String, String>) -> JobSpec {
    let mut profile = Profile {
        partition: Some("debug".into()),
        time: Some("5".into()),
        ..Default::default()
    };
    profile.apply_override("mem=100M").unwrap();
    JobSpec {
        name: name.into(),
        program: "sleep".into(),
        args: vec!["300".into()],
        env,
        cwd: Some(std::env::temp_dir()),
        profile,
        ..Default::default()
    }
}

async fn wait_state(job: &noyau_sched::Job, what: &str, f: impl Fn(&JobState) -> bool) -> JobState {
    let mut st = job.state.clone();
    let got = tokio::time::timeout(Duration::from_secs(30), st.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "job {} not {what} after 30 s: {:?}",
                job.id,
                *job.state.borrow()
            )
        })
        .unwrap()
        .clone();
    got
}

#[tokio::test]
#[ignore = "needs the Slurm test cluster (scripts/slurm-up, as root); scripts/test runs it"]
async fn the_token_never_shows_and_cancel_ends_the_job() {
    cluster();
    token_reaches_the_job_unseen("noyau-test-secret", None).await;
}

/// A site whose sbatch exports nothing (`--export=NONE` in the profile, as
/// SBATCH_EXPORT=NONE would say): the token still reaches the job, through
/// the 0600 file its script sources and deletes.
#[tokio::test]
#[ignore = "needs the Slurm test cluster (scripts/slurm-up, as root); scripts/test runs it"]
async fn with_export_none_the_token_reaches_the_job_through_a_private_file() {
    cluster();
    let name = "noyau-test-export-none";
    token_reaches_the_job_unseen(name, Some("sbatch=--export=NONE")).await;
    let dir = noyau_sched::state_dir().join("slurm");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(name))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "the job left its environment file: {left:?}"
    );
}

/// Submits a sleeper with a token (and `tweak` to its profile), checks
/// that a process of the job has the token and that neither scontrol nor
/// any command line shows it, then cancels it.
async fn token_reaches_the_job_unseen(name: &str, tweak: Option<&str>) {
    let b = Backend::Batch(
        Scheduler::builder("slurm")
            .unwrap()
            .interval(Duration::from_millis(300))
            .build(),
    );
    let token = format!("tok{}", std::process::id()) + name + "Zq81xw";
    let mut env = BTreeMap::new();
    env.insert("NOYAU_LINK_TOKEN".to_string(), token.clone());
    let mut spec = sleeper(name, env);
    spec.program = "/bin/sleep".into();
    if let Some(t) = tweak {
        spec.profile.apply_override(t).unwrap();
    }
    let job = b.submit(spec).await.unwrap();
    let st = wait_state(&job, "running", |s| matches!(s, JobState::Running { .. })).await;
    assert!(
        matches!(st, JobState::Running { ref node, .. } if !node.is_empty()),
        "{st:?}"
    );

    // Slurm says RUNNING before the batch script has started: wait (with a
    // deadline) for a process of the job, which has the token in its environment.
    let has_token = |e: &std::fs::DirEntry| {
        std::fs::read(e.path().join("environ")).is_ok_and(|env| {
            String::from_utf8_lossy(&env).contains(&format!("NOYAU_LINK_TOKEN={token}"))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sleeper_env = false;
    while !sleeper_env && Instant::now() < deadline {
        sleeper_env = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .any(|e| has_token(&e));
        if !sleeper_env {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // the job did get it, through its environment
    assert!(
        sleeper_env,
        "no process of the job has the token in its environment"
    );

    let show = std::process::Command::new("scontrol")
        .args(["show", "job", &job.id])
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains(&format!("JobName={name}")), "{show}");
    assert!(!show.contains(&token), "scontrol shows the token:\n{show}");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            assert!(
                !String::from_utf8_lossy(&cmd).contains(&token),
                "the token is on the command line of process {:?}",
                e.file_name()
            );
        }
    }

    b.cancel(&job).await;
    let st = wait_state(&job, "ended", |s| matches!(s, JobState::Ended(_))).await;
    assert!(
        matches!(st, JobState::Ended(ref e) if e.description.contains("cancelled")),
        "{st:?}"
    );
}

#[tokio::test]
#[ignore = "needs the Slurm test cluster (scripts/slurm-up, as root); scripts/test runs it"]
async fn an_unknown_partition_is_refused_with_the_partitions_that_exist() {
    cluster();
    let b = Backend::from_name("slurm").unwrap();
    let mut spec = sleeper("noyau-test-badpart", BTreeMap::new());
    spec.profile.partition = Some("debgu".into());
    let e = b.submit(spec).await.unwrap_err().to_string();
    assert!(
        e.contains("no partition \"debgu\", did you mean `debug`?"),
        "{e}"
    );
}

#[tokio::test]
#[ignore = "needs the Slurm test cluster (scripts/slurm-up, as root); scripts/test runs it"]
async fn one_squeue_call_per_interval_for_ten_jobs() {
    cluster();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let wrapper = common::logging_wrapper(dir.path(), "squeue", &log);
    let interval = Duration::from_millis(500);
    let b = Backend::Batch(
        Scheduler::builder("slurm")
            .unwrap()
            .command("squeue", wrapper.to_str().unwrap())
            .unwrap()
            .interval(interval)
            .build(),
    );
    let mut jobs = Vec::new();
    for i in 0..10 {
        jobs.push(
            b.submit(sleeper(&format!("noyau-test-many-{i}"), BTreeMap::new()))
                .await
                .unwrap(),
        );
    }
    let _ = std::fs::remove_file(&log);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let elapsed = t0.elapsed();
    let calls = common::calls(&log);
    for j in &jobs {
        let st = j.state.borrow().clone();
        assert!(
            matches!(st, JobState::Pending { .. } | JobState::Running { .. }),
            "job {}: {st:?}",
            j.id
        );
    }
    for j in &jobs {
        b.cancel(j).await;
    }
    common::assert_one_call_per_interval(calls, elapsed, interval, "squeue");
    let running = jobs
        .iter()
        .filter(|j| matches!(*j.state.borrow(), JobState::Running { .. }))
        .count();
    eprintln!("{calls} squeue calls in {elapsed:?}; {running} of 10 jobs were running");
}

/// Five processes' watchers (five handles, each with its own watcher, as
/// five proxies have) sharing their listings ask Slurm about as often as
/// one: the calls are counted through a wrapper all five run.
#[tokio::test]
#[ignore = "needs the Slurm test cluster (scripts/slurm-up, as root); scripts/test runs it"]
async fn five_watchers_sharing_their_listing_make_one_squeue_call_per_interval() {
    cluster();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let wrapper = common::logging_wrapper(dir.path(), "squeue", &log);
    let interval = Duration::from_millis(500);
    let handles: Vec<Backend> = (0..5)
        .map(|_| {
            Backend::Batch(
                Scheduler::builder("slurm")
                    .unwrap()
                    .command("squeue", wrapper.to_str().unwrap())
                    .unwrap()
                    .interval(interval)
                    .shared_listing(dir.path().join("listings"))
                    .build(),
            )
        })
        .collect();
    let mut jobs = Vec::new();
    for (i, b) in handles.iter().cycle().take(10).enumerate() {
        let job = b
            .submit(sleeper(&format!("noyau-test-shared-{i}"), BTreeMap::new()))
            .await
            .unwrap();
        jobs.push((b, job));
    }
    let _ = std::fs::remove_file(&log);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let elapsed = t0.elapsed();
    let calls = common::calls(&log);
    for (_, j) in &jobs {
        let st = j.state.borrow().clone();
        assert!(
            matches!(st, JobState::Pending { .. } | JobState::Running { .. }),
            "job {}: {st:?}",
            j.id
        );
    }
    // and an end reaches the watcher of another process than the one that asked
    let (b, first) = &jobs[0];
    b.cancel(first).await;
    wait_state(first, "ended", |s| matches!(s, JobState::Ended(_))).await;
    for (b, j) in &jobs[1..] {
        b.cancel(j).await;
    }
    common::assert_one_call_per_interval(calls, elapsed, interval, "squeue");
    eprintln!("{calls} squeue calls in {elapsed:?} for 5 watchers");
}

/// Cancels these jobs when dropped: a failed assertion or a panic must not
/// leave a job queued for the tests after this one.
struct Scancel(Vec<String>);

impl Drop for Scancel {
    fn drop(&mut self) {
        let _ = std::process::Command::new("scancel").args(&self.0).status();
    }
}

/// Any user may name a job `x\nID|CANCELLED|…`: slurmctld checks only a
/// name's length, and squeue prints it raw. The listing of every user's
/// jobs (the hub's) must not take that line for job ID's.
#[tokio::test]
#[ignore = "needs the Slurm test cluster (scripts/slurm-up, as root); scripts/test runs it"]
async fn a_job_name_with_a_line_break_does_not_end_another_users_job() {
    cluster();
    let hub = Scheduler::builder("slurm")
        .unwrap()
        .scope(noyau_sched::Scope::All)
        .interval(Duration::from_secs(3600))
        .build();
    let victim = hub
        .submit(&sleeper("noyau-test-victim", BTreeMap::new()))
        .await
        .unwrap();
    // Whatever fails below, no job of this test is left in the queue.
    let mut queued = Scancel(vec![victim.id.clone()]);
    let forged = format!("{}|CANCELLED|None||N/A|debug|0:00|noyau-hub", victim.id);
    let sbatch = std::process::Command::new("sbatch")
        .args([
            "--parsable",
            "-p",
            "debug",
            "-t",
            "5",
            "--mem=100M",
            "-o",
            "/dev/null",
        ])
        .args(["-J", &format!("x\n{forged}"), "--wrap", "sleep 300"])
        .output()
        .unwrap();
    assert!(sbatch.status.success(), "{sbatch:?}");
    let forger = String::from_utf8_lossy(&sbatch.stdout).trim().to_string();
    queued.0.push(forger);
    // squeue does print the forged line, for whoever asks for names
    let named = std::process::Command::new("squeue")
        .args(["-h", "--states=all", "-o", "%i|%T|%r|%N|%S|%P|%L|%j"])
        .output()
        .unwrap();
    let named = String::from_utf8_lossy(&named.stdout).to_string();
    let mut states = Vec::new();
    for _ in 0..3 {
        hub.refresh().await;
        states.push(victim.state.borrow().clone());
    }
    drop(queued);
    assert!(named.lines().any(|l| l == forged), "{named}");
    assert!(
        states
            .iter()
            .all(|st| matches!(st, JobState::Pending { .. } | JobState::Running { .. })),
        "{states:?}"
    );
}
