//! The Grid Engine scheduler through noyau-sched's `Scheduler` handle,
//! against the real test cluster that `scripts/test` starts
//! (`scripts/sge-up`, which exports NOYAU_SGE_DIR): jobs go through the
//! real `qsub`, and their states, reasons and ends come from the watcher
//! (`qstat`, `qstat -j`, `qacct`). The tests take turns (a lock file): some
//! fill the cluster's slots. They are `#[ignore]`d, so a plain `cargo
//! nextest run` reports them skipped; `scripts/test` runs them
//! (`--run-ignored all`) as root or under CI, and one run without a
//! cluster fails.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

mod common;

use nix::fcntl::{Flock, FlockArg};
use noyau_sched::{ArrayTasks, Job, JobSpec, JobState, Profile, SchedError, Scheduler};

/// The cluster's turn; fails the test when the cluster is not up.
fn cluster() -> Flock<std::fs::File> {
    let up = std::env::var_os("NOYAU_SGE_DIR").is_some()
        && Command::new("qstat")
            .output()
            .is_ok_and(|o| o.status.success());
    assert!(
        up,
        "no Grid Engine test cluster: scripts/test starts one as root (scripts/sge-up; export NOYAU_SGE_DIR)"
    );
    let lock = std::env::temp_dir().join("noyau-sge-tests.lock");
    let file = std::fs::File::create(&lock).unwrap();
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap()
}

/// A handle with its own watcher, asking often.
fn sge() -> Scheduler {
    Scheduler::builder("sge")
        .unwrap()
        .interval(Duration::from_millis(300))
        .build()
}

/// Deletes the jobs it holds when the test ends, however it ends.
struct Jobs(Vec<String>);

impl Drop for Jobs {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = Command::new("qdel").args(&self.0).output();
        }
    }
}

/// A job running `script` with sh in `dir` (its log there too).
fn spec(name: &str, profile: Profile, dir: &Path, script: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        cwd: Some(dir.into()),
        profile,
        log_dir: Some(dir.into()),
        ..Default::default()
    }
}

fn profile(overrides: &[&str]) -> Profile {
    let mut p = Profile::default();
    for o in overrides {
        p.apply_override(o).unwrap();
    }
    p
}

async fn submit(s: &Scheduler, spec: &JobSpec, jobs: &mut Jobs) -> Job {
    let job = s.submit(spec).await.unwrap();
    jobs.0.push(job.id.clone());
    job
}

/// Waits (at most `secs`) for the job's state to satisfy `f`.
async fn state(job: &Job, what: &str, secs: u64, f: impl Fn(&JobState) -> bool) -> JobState {
    let mut st = job.state.clone();
    let got = tokio::time::timeout(Duration::from_secs(secs), st.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "job {} not {what} after {secs} s: {:?}",
                job.id,
                *job.state.borrow()
            )
        })
        .unwrap()
        .clone();
    got
}

async fn running(job: &Job) -> (String, Option<SystemTime>) {
    match state(job, "running", 60, |s| {
        matches!(s, JobState::Running { .. })
    })
    .await
    {
        JobState::Running { node, ends_at } => (node, ends_at),
        _ => unreachable!(),
    }
}

async fn ended(job: &Job, secs: u64) -> noyau_sched::JobEnd {
    match state(job, "ended", secs, |s| matches!(s, JobState::Ended(_))).await {
        JobState::Ended(e) => e,
        _ => unreachable!(),
    }
}

/// Polls `f` every 200 ms until it gives a value; fails after `secs`.
async fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not after {secs} s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many tasks of job `id` qstat lists as running (`r`, `t`).
fn qstat_running(id: &str) -> usize {
    let out = Command::new("qstat").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 4 && f[0] == id && (f[4] == "r" || f[4] == "t"))
        .count()
}

/// The notify delay of a queue (`qconf -sq`): SIGUSR2 to SIGKILL.
fn notify(queue: &str) -> Duration {
    let out = Command::new("qconf").args(["-sq", queue]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("notify"))
        .unwrap_or_else(|| panic!("no notify in qconf -sq {queue}: {text}"));
    let secs = v
        .trim()
        .split(':')
        .fold(0, |a, p| a * 60 + p.parse::<u64>().unwrap());
    Duration::from_secs(secs)
}

/// A script that records SIGUSR2 in `dir/usr2` (seconds since the epoch)
/// and runs until it is killed; `dir/ready` once it handles the signal
/// (its login shell reads /etc/profile first).
fn usr2_recorder(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "trap 'date +%s > {d}/usr2' USR2\necho \"$NOYAU_SGE_END\" > {d}/end\ntouch {d}/ready\nwhile :; do sleep 1 & wait $!; done\n"
    )
}

fn ready(dir: &Path) -> impl FnMut() -> Option<()> + '_ {
    move || dir.join("ready").exists().then_some(())
}

#[tokio::test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
async fn a_job_waits_in_a_full_queue_with_its_reason_then_runs() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let s = sge();
    let queues = s.partitions().await.unwrap();
    let slots = queues
        .iter()
        .find(|q| q.partition == "all.q")
        .unwrap()
        .total_cores;
    // every slot of the host, from all.q
    let fill = profile(&["queue=all.q", "time=5", &format!("cpus_per_task={slots}")]);
    let fill = submit(
        &s,
        &spec("noyau-test-fill", fill, dir.path(), "sleep 300"),
        &mut jobs,
    )
    .await;
    running(&fill).await;
    // batch has slots of its own, but the host has none left
    let batch = s.partitions().await.unwrap();
    let batch = batch.iter().find(|q| q.partition == "batch").unwrap();
    assert_eq!(
        (batch.idle_cores, batch.total_cores),
        (0, slots),
        "{batch:?}"
    );

    let wait = || {
        spec(
            "noyau-test-wait",
            profile(&["queue=batch", "time=5"]),
            dir.path(),
            "sleep 300",
        )
    };
    let waiter = submit(&s, &wait(), &mut jobs).await;
    let dropped = submit(&s, &wait(), &mut jobs).await;
    for j in [&waiter, &dropped] {
        let why = state(
            j,
            "waiting for slots",
            30,
            |s| matches!(s, JobState::Pending { reason, .. } if reason.contains("slots")),
        )
        .await;
        assert!(
            matches!(why, JobState::Pending { partition: Some(ref p), .. } if p == "batch"),
            "{why:?}"
        );
        eprintln!("job {} waits: {why:?}", j.id);
    }

    // cancelled while it waits: Grid Engine keeps no record of it
    let t0 = Instant::now();
    dropped.cancel().await;
    fill.cancel().await;
    let (node, ends_at) = running(&waiter).await;
    assert!(!node.is_empty());
    let left = ends_at
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        left > Duration::from_secs(240) && left <= Duration::from_secs(300),
        "ends in {left:?} (h_rt 300 s)"
    );
    let end = ended(&dropped, 60).await;
    assert!(
        !end.success && end.description.contains("keeps no record"),
        "{end:?}"
    );
    eprintln!(
        "the job deleted while it waited ended {:?} later: {}",
        t0.elapsed(),
        end.description
    );
}

#[tokio::test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
async fn a_job_ends_with_its_exit_status_and_its_log() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let s = sge();
    let p = || profile(&["queue=all.q", "time=5"]);
    let script = "pwd\necho \"out of $JOB_NAME\"\nexit 3\n";
    let spec3 = spec("noyau-test-exit3", p(), dir.path(), script);
    let fail = submit(&s, &spec3, &mut jobs).await;
    let ok = submit(
        &s,
        &spec("noyau-test-exit0", p(), dir.path(), "exit 0"),
        &mut jobs,
    )
    .await;
    let end = ended(&fail, 60).await;
    assert_eq!(end.description, "failed (exit code 3)");
    assert!(!end.success);
    let log = spec3.log_path(&fail.id);
    let log = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    assert_eq!(
        log,
        format!("{}\nout of noyau-test-exit3\n", dir.path().display())
    );
    let end = ended(&ok, 60).await;
    assert!(end.success && end.description == "completed", "{end:?}");
    // the environment files are gone with the jobs that read them
    let left: Vec<_> = std::fs::read_dir(noyau_sched::state_dir().join("sge"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !left
            .iter()
            .any(|f| f.to_string_lossy().starts_with("noyau-test-exit")),
        "{left:?}"
    );
}

#[tokio::test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
async fn cores_and_memory_reach_the_job_and_secrets_do_not_show() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let s = sge();
    let token = format!("tok{}Zq81xw", std::process::id());
    let mut job = spec(
        "noyau-test-res",
        profile(&["queue=all.q", "time=5", "cpus_per_task=2", "mem=1G"]),
        dir.path(),
        "echo \"$NSLOTS $(ulimit -v) $NOYAU_LINK_TOKEN\"; sleep 300",
    );
    job.env.insert("NOYAU_LINK_TOKEN".into(), token.clone());
    let id = submit(&s, &job, &mut jobs).await;
    running(&id).await;
    // h_vmem is per slot: 512M each, 1G for the job's processes
    let log = job.log_path(&id.id);
    until("the job's output", 30, || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.ends_with('\n'))
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("2 1048576 {token}\n")
    );
    // every user sees `qstat -j`: it holds the job's environment and arguments
    let show = Command::new("qstat").args(["-j", &id.id]).output().unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("noyau-test-res"), "{show}");
    assert!(!show.contains(&token), "qstat -j shows the token:\n{show}");
    let spool = Command::new("grep")
        .args(["-rl", &token, "/var/spool/gridengine"])
        .output()
        .unwrap();
    assert!(
        spool.stdout.is_empty(),
        "the spool holds the token: {spool:?}"
    );
    id.cancel().await;
    ended(&id, 60).await;
}

#[tokio::test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
async fn cancel_sends_sigusr2_then_kills_after_the_notify_delay() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let s = sge();
    let p = profile(&["queue=all.q", "time=5"]);
    let job = submit(
        &s,
        &spec("noyau-test-qdel", p, dir.path(), &usr2_recorder(dir.path())),
        &mut jobs,
    )
    .await;
    running(&job).await;
    until("the job's SIGUSR2 handler", 60, ready(dir.path())).await;
    let t0 = Instant::now();
    s.cancel(std::slice::from_ref(&job.id)).await.unwrap();
    until("SIGUSR2 after the cancel", 15, || {
        dir.path().join("usr2").exists().then_some(())
    })
    .await;
    let delay = notify("all.q");
    let end = ended(&job, delay.as_secs() + 30).await;
    // the kill waits for the queue's notify delay
    assert!(
        t0.elapsed() + Duration::from_secs(2) >= delay,
        "ended {:?} after the cancel",
        t0.elapsed()
    );
    assert_eq!(
        end.description,
        "was killed by signal 9 (cancelled, or a kill)"
    );
    // a job already gone: cancelling it again is no error
    s.cancel(std::slice::from_ref(&job.id)).await.unwrap();
    let e = s.cancel(&["999999".into()]).await;
    assert!(e.is_ok(), "{e:?}");
}

#[tokio::test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
async fn h_rt_sends_sigusr2_then_kills_after_the_notify_delay() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let s = sge();
    let p = profile(&["queue=all.q", "time=0:15"]);
    let job = submit(
        &s,
        &spec("noyau-test-hrt", p, dir.path(), &usr2_recorder(dir.path())),
        &mut jobs,
    )
    .await;
    let (_, ends_at) = running(&job).await;
    let ends_at = ends_at.expect("a job with h_rt has an end");
    until("the job's SIGUSR2 handler", 60, ready(dir.path())).await;
    let delay = notify("all.q");
    let end = ended(&job, 15 + delay.as_secs() + 30).await;
    assert_eq!(end.description, "reached its walltime (Grid Engine h_rt)");
    let epoch = |f: &str| {
        let t = std::fs::read_to_string(dir.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.trim().parse().unwrap())
    };
    let usr2 = epoch("usr2");
    let off = |a: SystemTime, b: SystemTime| a.duration_since(b).unwrap_or_else(|e| e.duration());
    // SIGUSR2 at h_rt: at the end the watcher announced, and at the one the
    // script exported for its processes
    assert!(
        off(usr2, ends_at) <= Duration::from_secs(3),
        "SIGUSR2 {:?} from the end",
        off(usr2, ends_at)
    );
    assert!(off(usr2, epoch("end")) <= Duration::from_secs(3));
}

#[tokio::test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
async fn an_array_of_six_tasks_runs_two_at_a_time() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let s = sge();
    let script = format!(
        "echo $SGE_TASK_ID > {}/task.$NOYAU_ARRAY_TASK_ID\nsleep 3\n",
        dir.path().display()
    );
    let mut job = spec(
        "noyau-test-array",
        profile(&["queue=batch", "time=5"]),
        dir.path(),
        &script,
    );
    let ids = vec![0, 2, 4, 6, 8, 10];
    job.array = Some(ArrayTasks {
        ids: ids.clone(),
        max_parallel: 2,
    });
    let array = s.submit_array(&job).await.unwrap();
    let _jobs = Jobs(vec![array.id.clone()]);
    assert_eq!(array.note, "-t 1-6 -tc 2");
    let (mut most, mut waited) = (0, false);
    let states = until("the array's end", 120, || {
        let st = array.states();
        // (the watcher keeps a task that left qstat running until qacct
        // says how it ended: ask qstat itself how many run)
        let running = qstat_running(&array.id);
        most = most.max(running);
        waited |= st
            .iter()
            .any(|s| matches!(s, JobState::Pending { reason, .. } if reason != "submitted"));
        assert!(
            running <= 2,
            "{running} tasks of array {} run at once: {st:?}",
            array.id
        );
        st.iter()
            .all(|s| matches!(s, JobState::Ended(_)))
            .then_some(st)
    })
    .await;
    assert_eq!(most, 2, "never 2 tasks at once");
    assert!(waited, "no task seen waiting");
    assert!(
        states
            .iter()
            .all(|s| matches!(s, JobState::Ended(e) if e.success)),
        "{states:?}"
    );
    for (k, i) in ids.iter().enumerate() {
        let f = std::fs::read_to_string(dir.path().join(format!("task.{i}"))).unwrap();
        assert_eq!(f.trim(), (k + 1).to_string());
        let log = job.log_path(&format!("{}.{}", array.id, k + 1));
        assert!(log.is_file(), "no log {}", log.display());
    }
}

#[tokio::test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
async fn one_listing_per_interval_for_ten_jobs_and_no_extension() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let wrapper = common::logging_wrapper(dir.path(), "qstat", &log);
    let interval = Duration::from_millis(500);
    let s = Scheduler::builder("sge")
        .unwrap()
        .command("qstat", wrapper.to_str().unwrap())
        .unwrap()
        .interval(interval)
        .build();
    let mut jobs = Jobs(Vec::new());
    let mut held = Vec::new();
    for i in 0..10 {
        let p = profile(&["queue=all.q", "time=5"]);
        held.push(
            submit(
                &s,
                &spec(&format!("noyau-test-many-{i}"), p, dir.path(), "sleep 300"),
                &mut jobs,
            )
            .await,
        );
    }
    let _ = std::fs::remove_file(&log);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let elapsed = t0.elapsed();
    let total = common::calls(&log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let calls: Vec<&str> = text.lines().take(total).collect();
    // the listing, and why the waiting jobs wait (one call for all of them)
    let listings = calls.iter().filter(|l| l.starts_with("-r -xml")).count();
    let reasons = calls.iter().filter(|l| l.starts_with("-j ")).count();
    common::assert_one_call_per_interval(listings, elapsed, interval, "qstat -r");
    assert!(
        reasons <= listings,
        "{reasons} qstat -j for {listings} listings"
    );
    assert_eq!(total, listings + reasons, "{calls:?}");
    for j in &held {
        let st = j.state.borrow().clone();
        assert!(
            matches!(st, JobState::Pending { .. } | JobState::Running { .. }),
            "job {}: {st:?}",
            j.id
        );
    }
    let e = s.extend(&held[0].id, 600).await.unwrap_err();
    assert!(matches!(e, SchedError::Unsupported(_)), "{e:?}");
    assert!(e.to_string().contains("cannot extend"), "{e}");
    let ids: Vec<String> = held.iter().map(|j| j.id.clone()).collect();
    let ran: Vec<&Job> = held
        .iter()
        .filter(|j| matches!(*j.state.borrow(), JobState::Running { .. }))
        .collect();
    s.cancel(&ids).await.unwrap();
    // (those deleted while they waited end once the records lag has passed)
    for j in ran {
        ended(j, 60).await;
    }
    eprintln!("{listings} listings and {reasons} qstat -j in {elapsed:?}");
}
