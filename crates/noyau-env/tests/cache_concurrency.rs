//! 8 processes ask the same cache for the same new entry at once: it is
//! built once (the build step counts itself in a file) and all 8 get it.
//! The processes are this test binary, re-run with NOYAU_ENV_TEST_CHILD.
//!
//! "At once" is proven, not hoped for: each child marks that it has asked
//! (a `started-PID` file) before it calls the cache, the one that builds
//! waits inside its build until all 8 have asked, and each child reports
//! the interval it spent in the cache; the test checks that they overlap.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use noyau_env::Cache;
use serde_json::json;

const CHILD: &str = "NOYAU_ENV_TEST_CHILD";
const CHILDREN: usize = 8;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Waits (polling, with a deadline) until every child has asked the cache.
fn all_started(root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = std::fs::read_dir(root)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("started-"))
            .count();
        if started == CHILDREN {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {started} of {CHILDREN} children asked"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn child(root: &str) {
    let cache = Cache::new(root);
    let mut quiet = |_: &str| {};
    let start = now_ns();
    std::fs::write(
        Path::new(root).join(format!("started-{}", std::process::id())),
        "",
    )
    .unwrap();
    let (path, rec) = cache
        .get_or_build("same-spec", &mut quiet, |dir, _| {
            let counter = Path::new(root).join("builds");
            let mut n: u32 = std::fs::read_to_string(&counter)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            n += 1;
            std::fs::write(&counter, n.to_string()).unwrap();
            all_started(Path::new(root));
            std::fs::write(dir.join("payload"), "built").unwrap();
            Ok(json!({"built_by": std::process::id()}))
        })
        .unwrap();
    let end = now_ns();
    assert_eq!(
        std::fs::read_to_string(path.join("payload")).unwrap(),
        "built"
    );
    println!("BUILT_BY {}", rec["built_by"]);
    println!("INTERVAL {start} {end}");
}

#[test]
fn eight_processes_build_the_same_entry_once() {
    if let Ok(root) = std::env::var(CHILD) {
        child(&root);
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..CHILDREN)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "eight_processes_build_the_same_entry_once",
                    "--nocapture",
                ])
                .env(CHILD, root.path())
                .output_async()
        })
        .collect();
    let mut builders = std::collections::BTreeSet::new();
    let mut intervals: Vec<(u128, u128)> = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "a child failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_string()
        };
        builders.insert(field("BUILT_BY "));
        let interval = field("INTERVAL ");
        let (a, b) = interval.split_once(' ').unwrap();
        intervals.push((a.parse().unwrap(), b.parse().unwrap()));
    }
    let builds = std::fs::read_to_string(root.path().join("builds")).unwrap();
    assert_eq!(builds.trim(), "1", "the entry was built {builds} times");
    assert_eq!(builders.len(), 1, "{builders:?}");
    // Every child was in the cache while the builder built: all 8 intervals
    // share a moment (the latest start is before the earliest end).
    let latest_start = intervals.iter().map(|i| i.0).max().unwrap();
    let earliest_end = intervals.iter().map(|i| i.1).min().unwrap();
    assert!(
        latest_start < earliest_end,
        "the children did not ask at once: {intervals:?}"
    );
}

trait SpawnNow {
    fn output_async(&mut self) -> std::process::Child;
}
impl SpawnNow for Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}
