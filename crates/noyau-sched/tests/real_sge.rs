//! Grid Engine's arguments and readers (`noyau_sched::sge`) against the real
//! test cluster that `scripts/test` starts (`scripts/sge-up`, which exports
//! NOYAU_SGE_DIR): jobs go through the real `qsub` with `qsub_args`, and
//! what `qstat`, `qstat -j` and `qacct` answer is read with the parsers.
//! The tests take turns (a lock file): some fill the cluster's slots.
//! They are `#[ignore]`d, so a plain `cargo nextest run` reports them
//! skipped; `scripts/test` runs them (`--run-ignored all`) as root or under
//! CI, and one run without a cluster fails.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use noyau_sched::sge::{self, Array, Ending, QstatJob, SgeState, Site, Submission};
use noyau_sched::Profile;

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

/// Deletes the jobs it holds when the test ends, however it ends.
struct Jobs(Vec<String>);

impl Drop for Jobs {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = Command::new("qdel").args(&self.0).output();
        }
    }
}

fn me() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .name
}

/// Polls `f` every 200 ms until it gives a value; fails after `secs`.
fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not after {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn output(cmd: &str, args: &[String]) -> std::process::Output {
    Command::new(cmd).args(args).output().unwrap()
}

/// Submits `script` with the arguments `sge::qsub_args` makes, qsub
/// running with `sge::qsub_env` only, as noyau will.
fn qsub(sub: &Submission, script: &str, jobs: &mut Jobs) -> String {
    let args = sge::qsub_args(sub, &Site::default()).unwrap();
    let mut child = Command::new("qsub")
        .args(&args)
        .env_clear()
        .envs(sge::qsub_env(std::env::vars()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qsub {args:?} refused: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = sge::parse_qsub(&text).unwrap();
    jobs.0.push(id.clone());
    id
}

/// This user's jobs, as `qstat -r -xml -u USER` lists them.
fn qstat() -> Vec<QstatJob> {
    let out = output("qstat", &sge::qstat_args(&me()));
    assert!(out.status.success(), "{out:?}");
    sge::parse_qstat(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

fn lines_of(id: &str) -> Vec<QstatJob> {
    qstat().into_iter().filter(|j| j.id == id).collect()
}

/// The job's `count` accounting records (one per task), once qacct has them.
fn qacct(id: &str, count: usize) -> Vec<sge::AcctRecord> {
    until(&format!("{count} records of job {id} in qacct"), 60, || {
        let out = output("qacct", &sge::qacct_args(id));
        if !out.status.success() {
            assert!(
                sge::qacct_not_found(&String::from_utf8_lossy(&out.stderr)),
                "{out:?}"
            );
            return None;
        }
        let records = sge::parse_qacct(&String::from_utf8_lossy(&out.stdout)).unwrap();
        (records.len() >= count).then_some(records)
    })
}

fn gone(id: &str, secs: u64) -> Instant {
    until(&format!("job {id} gone from qstat"), secs, || {
        lines_of(id).is_empty().then(Instant::now)
    })
}

fn running(id: &str) -> QstatJob {
    until(&format!("job {id} running"), 60, || {
        lines_of(id)
            .into_iter()
            .find(|j| j.state == SgeState::Running)
    })
}

/// The notify delay of the queue (`qconf -sq`): SIGUSR2 to SIGKILL.
fn notify(queue: &str) -> Duration {
    let out = output("qconf", &["-sq".into(), queue.into()]);
    sge::parse_notify(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

fn submission<'a>(name: &'a str, profile: &'a Profile, dir: &'a Path) -> Submission<'a> {
    Submission {
        name,
        profile,
        log_dir: dir,
        cwd: Some(dir),
        array: None,
    }
}

fn minutes(queue: &str, m: u32) -> Profile {
    Profile {
        partition: Some(queue.into()),
        time: Some(m.to_string()),
        ..Default::default()
    }
}

/// A script that records SIGUSR2 in `dir/usr2` (seconds since the epoch)
/// and runs until it is killed; `dir/ready` once it handles the signal
/// (its login shell reads /etc/profile first).
fn usr2_recorder(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "trap 'date +%s > {d}/usr2' USR2\ntouch {d}/ready\nwhile :; do sleep 1 & wait $!; done\n"
    )
}

fn ready(dir: &Path) {
    until("the job's SIGUSR2 handler", 60, || {
        dir.join("ready").exists().then_some(())
    });
}

#[test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
fn a_job_waits_in_a_full_queue_with_its_reason_then_runs() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let site = Site::default();
    let queues = || {
        let out = output("qstat", &sge::queues_args(&me(), &site));
        sge::free_by_queue(
            &sge::parse_queues(&String::from_utf8_lossy(&out.stdout)).unwrap(),
            &site,
        )
    };
    let slots = queues()
        .iter()
        .find(|q| q.queue == "all.q")
        .unwrap()
        .total_slots;
    // every slot of the host, from all.q
    let fill = Profile {
        cpus_per_task: Some(slots),
        ..minutes("all.q", 5)
    };
    let fill = qsub(
        &submission("noyau-test-fill", &fill, dir.path()),
        "sleep 300",
        &mut jobs,
    );
    assert_eq!(running(&fill).slots, slots);
    // batch has slots of its own, but the host has none left
    let batch = queues().into_iter().find(|q| q.queue == "batch").unwrap();
    assert_eq!(
        (batch.free_slots, batch.total_slots),
        (0, slots),
        "{batch:?}"
    );

    let wait = Profile {
        partition: Some("batch".into()),
        ..minutes("batch", 5)
    };
    let waiter = qsub(
        &submission("noyau-test-wait", &wait, dir.path()),
        "sleep 300",
        &mut jobs,
    );
    let line = until("the waiter listed", 30, || lines_of(&waiter).pop());
    assert_eq!(line.state, SgeState::Pending, "{line:?}");
    assert_eq!(line.queue.as_deref(), Some("batch"));
    assert_eq!(line.h_rt, Some(Duration::from_secs(300)));
    let why = until("a reason for the waiter", 30, || {
        let out = output("qstat", &sge::qstat_j_args(std::slice::from_ref(&waiter)));
        let reasons = sge::parse_qstat_j(&String::from_utf8_lossy(&out.stdout)).unwrap();
        reasons.reason(&waiter).filter(|r| r.contains("slots"))
    });
    eprintln!("job {waiter} waits: {why}");

    Command::new("qdel").arg(&fill).output().unwrap();
    let r = running(&waiter);
    assert!(r.host.as_deref().is_some_and(|h| !h.is_empty()), "{r:?}");
    let started = r.started.unwrap();
    let age = SystemTime::now()
        .duration_since(started)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "started {age:?} ago");
    assert_eq!(
        r.ends_at().unwrap().duration_since(started).unwrap(),
        Duration::from_secs(300)
    );
}

#[test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
fn a_job_ends_with_its_exit_status_and_its_log() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let p = minutes("all.q", 5);
    let fail = qsub(
        &submission("noyau-test-exit3", &p, dir.path()),
        "pwd\necho \"out of $JOB_NAME\"\nexit 3\n",
        &mut jobs,
    );
    let ok = qsub(
        &submission("noyau-test-exit0", &p, dir.path()),
        "exit 0\n",
        &mut jobs,
    );
    let left = gone(&fail, 60);
    let records = qacct(&fail, 1);
    eprintln!(
        "job {fail} in qacct {:?} after it left qstat",
        left.elapsed()
    );
    assert_eq!(records.len(), 1, "{records:?}");
    let end = records[0].ending();
    assert_eq!(end, Ending::Exited(3));
    assert!(!end.success() && end.to_string().contains("exit code 3"));
    let log = dir.path().join(format!("noyau-test-exit3-{fail}.log"));
    let log = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    assert_eq!(
        log,
        format!("{}\nout of noyau-test-exit3\n", dir.path().display())
    );

    gone(&ok, 60);
    assert!(qacct(&ok, 1)[0].ending().success());
}

#[test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
fn cores_and_memory_reach_the_job() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let p = Profile {
        cpus_per_task: Some(2),
        scheduler_keys: [("mem".to_string(), noyau_sched::Value::One("1G".into()))].into(),
        ..minutes("all.q", 5)
    };
    let id = qsub(
        &submission("noyau-test-res", &p, dir.path()),
        "echo \"$NSLOTS $(ulimit -v)\"\n",
        &mut jobs,
    );
    gone(&id, 60);
    assert_eq!(qacct(&id, 1)[0].ending(), Ending::Exited(0));
    // h_vmem is per slot: 512M each, 1G for the job's processes
    let log = std::fs::read_to_string(dir.path().join(format!("noyau-test-res-{id}.log"))).unwrap();
    assert_eq!(log, "2 1048576\n");
}

#[test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
fn qdel_sends_sigusr2_then_kills_after_the_notify_delay() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let id = qsub(
        &submission("noyau-test-qdel", &minutes("all.q", 5), dir.path()),
        &usr2_recorder(dir.path()),
        &mut jobs,
    );
    running(&id);
    ready(dir.path());
    let t0 = Instant::now();
    let out = Command::new("qdel").arg(&id).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    until("SIGUSR2 after qdel", 15, || {
        dir.path().join("usr2").exists().then_some(())
    });
    let delay = notify("all.q");
    let after = gone(&id, delay.as_secs() + 30).duration_since(t0);
    // the kill waits for the queue's notify delay
    assert!(
        after + Duration::from_secs(2) >= delay,
        "gone {after:?} after qdel (notify {delay:?})"
    );
    assert_eq!(qacct(&id, 1)[0].ending(), Ending::Signalled(9));
    let again = Command::new("qdel").arg(&id).output().unwrap();
    assert!(!again.status.success());
    assert!(
        sge::qdel_gone(&String::from_utf8_lossy(&again.stdout)),
        "{again:?}"
    );
}

#[test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
fn h_rt_sends_sigusr2_then_kills_after_the_notify_delay() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let p = Profile {
        time: Some("0:15".into()),
        ..minutes("all.q", 1)
    };
    let id = qsub(
        &submission("noyau-test-hrt", &p, dir.path()),
        &usr2_recorder(dir.path()),
        &mut jobs,
    );
    let started = running(&id).started.unwrap();
    ready(dir.path());
    let delay = notify("all.q");
    gone(&id, 15 + delay.as_secs() + 30);
    let end = SystemTime::now();
    let usr2: u64 = std::fs::read_to_string(dir.path().join("usr2"))
        .expect("no SIGUSR2 before the kill")
        .trim()
        .parse()
        .unwrap();
    let usr2 = SystemTime::UNIX_EPOCH + Duration::from_secs(usr2);
    let ran = usr2.duration_since(started).unwrap();
    assert!(
        ran >= Duration::from_secs(14),
        "SIGUSR2 {ran:?} after the start (h_rt 15 s)"
    );
    let warned = end.duration_since(usr2).unwrap();
    assert!(
        warned + Duration::from_secs(2) >= delay,
        "SIGUSR2 only {warned:?} before the end"
    );
    assert_eq!(qacct(&id, 1)[0].ending(), Ending::Walltime);
}

#[test]
#[ignore = "needs the Grid Engine test cluster (scripts/sge-up, as root); scripts/test runs it"]
fn an_array_of_six_tasks_runs_two_at_a_time() {
    let _turn = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Jobs(Vec::new());
    let ids: Vec<usize> = (0..6).collect();
    let script = format!(
        "{}echo $SGE_TASK_ID > {}/task.$NOYAU_ARRAY_TASK_ID\nsleep 3\n",
        sge::array_task_id(&ids),
        dir.path().display()
    );
    let p = minutes("batch", 5);
    let sub = Submission {
        array: Some(Array {
            tasks: 6,
            max_parallel: 2,
        }),
        ..submission("noyau-test-array", &p, dir.path())
    };
    let id = qsub(&sub, &script, &mut jobs);
    let (mut most, mut waiting_seen) = (0, false);
    until("the array's end", 120, || {
        let lines = lines_of(&id);
        let running: Vec<u32> = lines
            .iter()
            .filter(|l| l.state == SgeState::Running)
            .flat_map(|l| l.tasks.clone())
            .collect();
        most = most.max(running.len());
        waiting_seen |= lines
            .iter()
            .any(|l| l.state == SgeState::Pending && l.tasks.len() > 1);
        assert!(
            running.len() <= 2,
            "tasks {running:?} of job {id} run at once"
        );
        lines.is_empty().then_some(())
    });
    assert_eq!(most, 2, "never 2 tasks at once");
    assert!(waiting_seen, "no line of waiting tasks seen");
    for (k, i) in ids.iter().enumerate() {
        let f = std::fs::read_to_string(dir.path().join(format!("task.{i}"))).unwrap();
        assert_eq!(f.trim(), (k + 1).to_string());
    }
    let records = qacct(&id, 6);
    let mut tasks: Vec<u32> = records.iter().filter_map(|r| r.task).collect();
    tasks.sort();
    assert_eq!(tasks, [1, 2, 3, 4, 5, 6]);
    assert!(records.iter().all(|r| r.ending().success()), "{records:?}");
}
