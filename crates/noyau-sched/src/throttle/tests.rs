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

/// Whether every slot is taken now (one round of tries, from a fresh
/// open: another process's view).
fn all_taken(slots: &Slots) -> bool {
    matches!(try_each(slots.open_all().unwrap()), Round::Busy(_))
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
    assert!(
        !third.is_finished(),
        "a third slot was given while two were held"
    );
    drop(a);
    eventually("the third takes the slot released", || third.is_finished()).await;
    let c = third.await.unwrap().unwrap();
    assert!(all_taken(&slots), "the third holds the slot it took");
    drop((b, c));
    assert!(!all_taken(&slots));
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
    assert!(
        !mine.is_finished(),
        "a slot another process holds was taken"
    );
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
