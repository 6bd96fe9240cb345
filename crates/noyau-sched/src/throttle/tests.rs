use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use super::*;

/// `f` becomes true within 20 s (polled), or the test fails with `what`.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `task` is still waiting 300 ms after it began: it is polled meanwhile
/// (a task just spawned has not run yet, so `is_finished` alone says
/// nothing).
async fn still_waits<T>(task: &tokio::task::JoinHandle<T>, what: &str) {
    let done = tokio::time::timeout(Duration::from_millis(300), async {
        while !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(done.await.is_err(), "{what}");
}

/// Whether every slot is taken now (one round of tries, from a fresh
/// open: another process's view).
fn all_taken(slots: &Slots) -> bool {
    try_each(slots.open_all().unwrap()).is_err()
}

#[tokio::test]
async fn the_n_plus_first_waits_until_one_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let slots = Slots::new(dir.path().join("submit"), "h".into(), 2);
    let a = slots.take().await.unwrap();
    assert!(!all_taken(&slots), "one of two slots held: one is free");
    let b = slots.take().await.unwrap();
    assert!(all_taken(&slots), "two of two held: none is free");
    let s = slots.clone();
    let third = tokio::spawn(async move { s.take().await });
    still_waits(&third, "a third slot was given while two were held").await;
    drop(a);
    eventually("the third takes the slot released", || third.is_finished()).await;
    let c = third.await.unwrap().unwrap();
    assert!(all_taken(&slots), "the third holds the slot it took");
    drop((b, c));
    assert!(!all_taken(&slots));
}

/// The places in the queue of `slots`' directory.
fn queued(slots: &Slots) -> usize {
    let names = std::fs::read_dir(&slots.dir).unwrap().flatten();
    let names = names.map(|e| e.file_name().to_string_lossy().into_owned());
    names.filter(|n| n.starts_with("h-wait-")).count()
}

/// First come, first served: one slot, given back in turn while two
/// newcomers come each time (the second as it is given back), goes each
/// time to the waiter that came first. With every waiter trying every
/// round (5 ms doubling to 100 ms between tries), a newcomer took it
/// before a waiter of long standing looked again, nearly every time.
#[tokio::test]
async fn waiters_are_served_in_the_order_they_came() {
    let dir = tempfile::tempdir().unwrap();
    let slots = Slots::new(dir.path().join("submit"), "h".into(), 1);
    let mut held = slots.take().await.unwrap();
    let take = || {
        let s = slots.clone();
        tokio::spawn(async move { s.take().await })
    };
    let mut waiting = std::collections::VecDeque::from([take()]);
    still_waits(&waiting[0], "a slot held was given").await;
    let placed = |n: usize| {
        let s = slots.clone();
        move || queued(&s) == n
    };
    for round in 0..4 {
        eventually("every waiter has its place", placed(waiting.len())).await;
        waiting.push_back(take());
        eventually("the newcomer has its place", placed(waiting.len())).await;
        // one more, trying as the slot is given back
        waiting.push_back(take());
        drop(held);
        eventually("a waiter takes the slot", || {
            waiting.iter().any(|t| t.is_finished())
        })
        .await;
        let served: Vec<usize> = (0..waiting.len())
            .filter(|&i| waiting[i].is_finished())
            .collect();
        assert_eq!(served, [0], "round {round}: not the first come");
        held = waiting.pop_front().unwrap().await.unwrap().unwrap();
    }
    drop(held);
    for t in waiting {
        t.await.unwrap().unwrap();
    }
    assert_eq!(queued(&slots), 0, "a place outlived its waiter");
}

/// The place of a waiter that was killed (a file left, its lock free) is
/// passed over and removed.
#[tokio::test]
async fn a_killed_waiters_place_is_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let slots = Slots::new(dir.path().join("submit"), "h".into(), 1);
    slots.open_all().unwrap();
    let dead = slots.dir.join("h-wait-0-1.lock");
    std::fs::write(&dead, "").unwrap();
    std::fs::set_permissions(&dead, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    tokio::time::timeout(Duration::from_secs(20), slots.take())
        .await
        .expect("a killed waiter's place was waited for")
        .unwrap();
    assert!(!dead.exists(), "a killed waiter's place was left");
}

/// A first in line that never takes a slot (its process stopped with
/// Ctrl-Z: its place stays locked) holds up those behind it only for its
/// bound.
#[tokio::test]
async fn a_stuck_first_in_line_is_passed_after_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let bound = Duration::from_millis(500);
    let slots = Slots::new(dir.path().join("submit"), "h".into(), 1).stuck_after(bound);
    slots.open_all().unwrap();
    let stopped = crate::paths::lock_file()
        .open(slots.dir.join("h-wait-0-1.lock"))
        .unwrap();
    let _stopped = Flock::lock(stopped, FlockArg::LockExclusive).unwrap();
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), slots.take())
        .await
        .expect("a stuck first in line stopped the others")
        .unwrap();
    assert!(
        start.elapsed() >= bound,
        "the first in line was passed at once"
    );
}

/// Another process (util-linux's `flock`, a real process of its own)
/// holding the only slot makes noyau wait until it exits.
#[tokio::test]
async fn a_slot_held_by_another_process_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let slots = Slots::new(dir.path().join("submit"), "h".into(), 1);
    slots.open_all().unwrap();
    let mut holder = std::process::Command::new("flock")
        .arg(slots.path(0))
        .args(["-c", "cat"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("util-linux's flock");
    eventually("the other process holds the slot", || all_taken(&slots)).await;
    let s = slots.clone();
    let mine = tokio::spawn(async move { s.take().await });
    still_waits(&mine, "a slot another process holds was taken").await;
    drop(holder.stdin.take());
    holder.wait().unwrap();
    eventually("the slot is taken once the other process exits", || {
        mine.is_finished()
    })
    .await;
    mine.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_planted_slot_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let slots = Slots::new(dir.path().join("submit"), "h".into(), 2);
    slots.open_all().unwrap();
    let slot = slots.path(1);
    std::fs::remove_file(&slot).unwrap();
    std::os::unix::fs::symlink(dir.path().join("theirs"), &slot).unwrap();
    let e = slots.take().await.unwrap_err().to_string();
    assert!(e.contains("h-slot-1.lock is a symlink"), "{e}");
    assert!(
        !dir.path().join("theirs").exists(),
        "created through a link"
    );
    std::fs::remove_file(&slot).unwrap();
    nix::unistd::mkfifo(&slot, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let e = slots.take().await.unwrap_err().to_string();
    assert!(e.contains("is a FIFO, not a regular file"), "{e}");
    std::fs::remove_file(&slot).unwrap();
    std::fs::write(&slot, "").unwrap();
    std::fs::set_permissions(&slot, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let e = slots.take().await.unwrap_err().to_string();
    assert!(e.contains("has mode 0666"), "{e}");
    if !nix::unistd::geteuid().is_root() {
        // (only root can give a file away; scripts/test runs as root)
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root under CI"
        );
        return;
    }
    std::fs::set_permissions(&slot, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&slot, Some(65534), None).unwrap();
    let e = slots.take().await.unwrap_err().to_string();
    assert!(e.contains("belongs to uid 65534, not to you"), "{e}");
}

#[test]
fn a_bad_number_of_slots_is_explained() {
    for n in [0, -3, 65] {
        let e = check_slots(n).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("concurrent_submissions = {n}: ")),
            "{e}"
        );
        assert!(e.contains("give a whole number from 1 to 64"), "{e}");
    }
    assert_eq!(check_slots(1).unwrap(), 1);
    assert_eq!(check_slots(64).unwrap(), MAX_SLOTS);
}

/// A call that says it ran.
async fn ran(flag: Arc<AtomicBool>) -> Result<(), SchedError> {
    flag.store(true, Ordering::SeqCst);
    Ok(())
}

/// A cancel with every slot held (by another process, here this test)
/// waits [`CANCEL_WAIT`] at most, then runs; so does one made as another
/// user (the hub's) with every permit of its pool taken.
#[tokio::test]
async fn a_cancel_with_every_slot_held_runs_after_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let slots = Slots::new(dir.path().join("submit"), "h".into(), 1);
    let _held = slots.take().await.unwrap();
    let empty: &'static Semaphore = Box::leak(Box::new(Semaphore::new(0)));
    for pool in [Pool::Files(slots.clone()), Pool::Process(empty)] {
        let flag = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let cancel = gated(pool, Wait::ThenRun(CANCEL_WAIT), ran(flag.clone()));
        tokio::time::timeout(Duration::from_secs(20), cancel)
            .await
            .expect("the cancel waited past its bound")
            .unwrap();
        assert!(flag.load(Ordering::SeqCst), "the cancel did not run");
        assert!(
            start.elapsed() >= CANCEL_WAIT,
            "it did not wait for a slot first"
        );
    }
    assert!(all_taken(&slots), "the cancel took the slot held");
}

/// A slot directory another user planted (here: a file where the
/// directory goes) is warned about and the submission goes on.
#[tokio::test]
async fn a_refused_slot_directory_leaves_the_call_unthrottled() {
    let dir = tempfile::tempdir().unwrap();
    let planted = dir.path().join("submit");
    std::fs::write(&planted, "").unwrap();
    let slots = Slots::new(planted, "h".into(), 2);
    assert!(
        slots.take().await.is_err(),
        "the planted directory was used"
    );
    let flag = Arc::new(AtomicBool::new(false));
    let call = gated(Pool::Files(slots), Wait::Always, ran(flag.clone()));
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the submission waited on a refused directory")
        .unwrap();
    assert!(flag.load(Ordering::SeqCst), "the submission did not run");
}

/// Calls made as other users (the hub's) take permits of the process's
/// pool, no file: the (N+1)th waits until one is given back.
#[tokio::test]
async fn calls_as_another_user_wait_for_the_process_pool() {
    assert!(matches!(Pool::of(true), Pool::Process(_)));
    assert!(matches!(Pool::of(false), Pool::Files(_)));
    let pool: &'static Semaphore = Box::leak(Box::new(Semaphore::new(1)));
    let first = pool.acquire().await.unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let second = gated(Pool::Process(pool), Wait::Always, ran(flag.clone()));
    let waited = tokio::time::timeout(Duration::from_millis(300), second).await;
    assert!(waited.is_err(), "a call ran with the pool taken");
    assert!(
        !flag.load(Ordering::SeqCst),
        "a call ran with the pool taken"
    );
    drop(first);
    let third = gated(Pool::Process(pool), Wait::Always, ran(flag.clone()));
    tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("no permit once the first was given back")
        .unwrap();
    assert!(flag.load(Ordering::SeqCst));
}

/// A stand-in for a scheduler command run as a user that they stopped
/// (SIGSTOP): it holds whatever it was given until `go` is notified. The
/// thing under test is the gate, not the scheduler.
async fn stopped(go: Arc<tokio::sync::Notify>) -> Result<(), SchedError> {
    go.notified().await;
    Ok(())
}

/// A call as `user` through the hub's gate (their turn of `turns`, then a
/// permit of `pool`), spawned; `cancel`: the job ids it cancels.
fn spawn_as(
    turns: &'static Turns,
    pool: &'static Semaphore,
    user: &'static str,
    cancel: Option<Vec<String>>,
    call: impl Future<Output = Result<(), SchedError>> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), SchedError>> {
    tokio::spawn(async move {
        let wait = Wait::ThenRefuse(SUBMIT_WAIT);
        turn_gated(
            turns,
            user,
            cancel.as_deref(),
            Pool::Process(pool),
            wait,
            call,
        )
        .await
    })
}

/// The hole: a user whose commands the hub runs as them stops each one;
/// eight at once took every permit of the hub's pool (four), and every
/// other user's spawn waited. Now one user's calls hold at most one permit
/// (the others are refused at once, a cancel of the same job said to be
/// under way) and another user's call runs.
#[tokio::test]
async fn one_users_concurrent_calls_hold_one_permit_and_another_user_proceeds() {
    let turns: &'static Turns = Box::leak(Box::default());
    let pool: &'static Semaphore = Box::leak(Box::new(Semaphore::new(4)));
    let go = Arc::new(tokio::sync::Notify::new());
    let job = || Some(vec!["12".to_string()]);
    let first = spawn_as(turns, pool, "mallory", job(), stopped(go.clone()));
    eventually("the first call takes a permit", || {
        pool.available_permits() == 3
    })
    .await;
    let more: Vec<_> = (0..8)
        .map(|i| {
            let cancel = if i % 2 == 0 { job() } else { None };
            spawn_as(turns, pool, "mallory", cancel, stopped(go.clone()))
        })
        .collect();
    for (i, call) in more.into_iter().enumerate() {
        let e = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("a second call of the same user's waited")
            .unwrap()
            .unwrap_err();
        match i % 2 {
            0 => assert!(matches!(e, SchedError::CancelUnderWay(_)), "{e:?}"),
            _ => assert!(
                matches!(e, SchedError::UserBusy(ref u) if u == "mallory"),
                "{e:?}"
            ),
        }
    }
    assert_eq!(
        pool.available_permits(),
        3,
        "one user holds more than one permit"
    );
    let flag = Arc::new(AtomicBool::new(false));
    let other = spawn_as(turns, pool, "alice", None, ran(flag.clone()));
    tokio::time::timeout(Duration::from_secs(20), other)
        .await
        .expect("another user's call waited behind the stopped one")
        .unwrap()
        .unwrap();
    assert!(
        flag.load(Ordering::SeqCst),
        "another user's call did not run"
    );
    go.notify_one();
    first.await.unwrap().unwrap();
    assert_eq!(pool.available_permits(), 4, "the permit was not given back");
    let again = spawn_as(turns, pool, "mallory", None, ran(flag.clone()));
    again
        .await
        .unwrap()
        .expect("the user's turn was not given back");
}

/// A submission as another user with every permit of the pool taken (by
/// several users' slow commands) is refused with a clear word once its
/// wait is over, holding no turn after; a cancel runs anyway.
#[tokio::test]
async fn a_submission_as_another_user_is_refused_when_the_pool_stays_taken() {
    let turns = Turns::default();
    let empty: &'static Semaphore = Box::leak(Box::new(Semaphore::new(0)));
    let flag = Arc::new(AtomicBool::new(false));
    let wait = Wait::ThenRefuse(Duration::from_millis(100));
    let call = turn_gated(
        &turns,
        "alice",
        None,
        Pool::Process(empty),
        wait,
        ran(flag.clone()),
    );
    let e = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the submission waited past its bound")
        .unwrap_err();
    assert!(matches!(e, SchedError::Busy(_)), "{e:?}");
    assert!(e.to_string().contains("try again"), "{e}");
    assert!(!flag.load(Ordering::SeqCst), "the refused submission ran");
    let ids = ["7".to_string()];
    let wait = Wait::ThenRun(Duration::from_millis(100));
    let cancel = turn_gated(
        &turns,
        "alice",
        Some(&ids),
        Pool::Process(empty),
        wait,
        ran(flag.clone()),
    );
    tokio::time::timeout(Duration::from_secs(20), cancel)
        .await
        .expect("the cancel waited past its bound")
        .expect("the refused submission kept the user's turn");
    assert!(flag.load(Ordering::SeqCst), "the cancel did not run");
}

/// A real command run through the hub's gate that stops itself (as a user
/// would stop theirs) is killed at its timeout, and its permit and turn
/// are given back.
#[tokio::test]
async fn a_stopped_command_is_killed_at_its_timeout_and_frees_its_permit() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let turns = Turns::default();
    let pool: &'static Semaphore = Box::leak(Box::new(Semaphore::new(1)));
    let script = format!("echo $$ > {}; kill -STOP $$", pidfile.display());
    // long enough for sh to write its pid under load
    let cmd = crate::run::Cmd::new(Path::new("sh"), Duration::from_secs(3)).args(["-c", &script]);
    let call = async { Ok(cmd.output().await?) };
    let wait = Wait::ThenRefuse(SUBMIT_WAIT);
    let e = turn_gated(&turns, "mallory", None, Pool::Process(pool), wait, call)
        .await
        .unwrap_err();
    assert!(
        matches!(e, SchedError::Command(crate::CommandError::Timeout { .. })),
        "{e:?}"
    );
    assert_eq!(pool.available_permits(), 1, "the permit was not given back");
    assert!(
        turns.take("mallory", None).is_ok(),
        "the turn was not given back"
    );
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    // gone, or a zombie waiting for its reaper
    eventually("the stopped command is killed", || {
        !std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z "))
    })
    .await;
}
