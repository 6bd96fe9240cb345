//! A submission whose caller gave up while the scheduler's command ran (a
//! kernel shut down, a hub request dropped): the job id that comes after
//! is cancelled at once, not left with no one to follow it. `sbatch` here
//! answers only once the test opens a FIFO, after it has given up.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use noyau_sched::{JobSpec, Scheduler};

mod fake;
use fake::script;

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

/// A Slurm whose `sbatch` answers 4242 once `gate` is opened (or at once
/// without one), and whose `scancel` writes its arguments to `cancelled`.
struct Fake {
    dir: tempfile::TempDir,
    s: Scheduler,
}

impl Fake {
    fn new(gated: bool) -> Fake {
        Fake::of("slurm", ["sbatch", "scancel"], "echo 4242", gated)
    }

    /// Scheduler `name`, whose submit command prints `answer` and whose
    /// cancel command writes its arguments to `cancelled`.
    fn of(name: &str, [submit, cancel]: [&str; 2], answer: &str, gated: bool) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fake::private_dirs(d);
        let (gate, began, cancelled) = (d.join("gate"), d.join("began"), d.join("cancelled"));
        let (g, b, c) = (gate.display(), began.display(), cancelled.display());
        let held = match gated {
            true => {
                nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::S_IRWXU).unwrap();
                format!("cat {g} >/dev/null; ")
            }
            false => String::new(),
        };
        let (submit_path, cancel_path) = (d.join(submit), d.join(cancel));
        script(
            &submit_path,
            &format!("cat >/dev/null; touch {b}; {held}{answer}"),
        );
        script(&cancel_path, &format!("echo \"$@\" >> {c}"));
        let s = Scheduler::builder(name)
            .unwrap()
            .command(submit, submit_path.to_str().unwrap())
            .unwrap()
            .command(cancel, cancel_path.to_str().unwrap())
            .unwrap()
            .interval(Duration::from_secs(3600))
            .build();
        Fake { dir, s }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn cancelled(&self) -> String {
        std::fs::read_to_string(self.path("cancelled")).unwrap_or_default()
    }
}

/// A waker that tells the test.
struct Woken(tokio::sync::Notify);

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
}

fn spec() -> JobSpec {
    JobSpec {
        name: "noyau-late".into(),
        program: "/bin/true".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_job_given_after_its_caller_gave_up_is_cancelled_at_once() {
    let f = Fake::new(true);
    let (spec, began) = (spec(), f.path("began"));
    tokio::select! {
        r = f.s.submit(&spec) => panic!("submitted before sbatch could answer: {r:?}"),
        () = exists(&began) => {}
    }
    // The caller is gone; sbatch answers now.
    let gate = f.path("gate");
    tokio::task::spawn_blocking(move || std::fs::write(&gate, b""))
        .await
        .unwrap()
        .unwrap();
    noyau_sched::submissions_settled().await;
    assert_eq!(f.cancelled(), "4242\n");
}

/// Polls `submit` once, with a waker of the test's, and returns once it is
/// woken (its answer sent), without polling it again: an answer the
/// caller has not read.
async fn answered_unread<F: Future + ?Sized>(submit: std::pin::Pin<&mut F>) {
    let woken = Arc::new(Woken(tokio::sync::Notify::new()));
    let waker = std::task::Waker::from(woken.clone());
    let polled = submit.poll(&mut std::task::Context::from_waker(&waker));
    assert!(polled.is_pending(), "answered before its task ran");
    woken.0.notified().await;
}

/// The caller gives up with the job's id already sent to it, before it
/// read it (two events in one turn of a select): that job is cancelled
/// too. (Before, the id was dropped with the caller, the job left queued.)
#[tokio::test]
async fn a_job_whose_id_the_caller_dropped_unread_is_cancelled() {
    let f = Fake::new(false);
    let spec = spec();
    let mut submit = Box::pin(f.s.submit(&spec));
    answered_unread(submit.as_mut()).await;
    assert_eq!(f.cancelled(), "");
    drop(submit);
    noyau_sched::submissions_settled().await;
    assert_eq!(f.cancelled(), "4242\n");
}

/// An OAR array (whose id is its first task's) given to a caller that gave
/// up: every task of it is cancelled. (Before, only the first one.)
#[tokio::test]
async fn every_task_of_an_unwanted_oar_array_is_cancelled() {
    let answer = "printf 'OAR_JOB_ID=100\\nOAR_JOB_ID=101\\n'";
    let f = Fake::of("oar", ["oarsub", "oardel"], answer, false);
    let spec = JobSpec {
        array: Some(noyau_sched::ArrayTasks {
            ids: vec![0, 1],
            max_parallel: 2,
        }),
        ..spec()
    };
    let mut submit = Box::pin(f.s.submit_array(&spec));
    answered_unread(submit.as_mut()).await;
    drop(submit);
    noyau_sched::submissions_settled().await;
    assert_eq!(f.cancelled(), "100 101\n");
}

/// A command's end with a submission under way: `notice` is called once as
/// the wait begins, and `leave` ends the wait at once, before the
/// scheduler answers (the CLI's second Ctrl-C). With none under way the
/// end is quiet.
#[tokio::test]
async fn settled_or_says_it_waits_and_leaves_when_asked() {
    noyau_sched::settled_or(
        async {},
        || panic!("noticed with nothing under way"),
        async {},
    )
    .await;
    let f = Fake::new(true);
    let (spec, began) = (spec(), f.path("began"));
    let gave_up = async {
        tokio::select! {
            r = f.s.submit(&spec) => panic!("submitted before sbatch could answer: {r:?}"),
            () = exists(&began) => 7,
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let leave = async {
        let _ = rx.await;
    };
    let out = noyau_sched::settled_or(gave_up, || tx.send(()).unwrap(), leave).await;
    assert_eq!(out, 7);
    assert_eq!(f.cancelled(), "", "left before the scheduler answered");
}
