//! 8 processes ask the same cache for the same new entry at once: it is
//! built once (the build step counts itself in a file) and all 8 get it.
//! The processes are this test binary, re-run with NOYAU_ENV_TEST_CHILD.

use std::process::Command;
use std::time::Duration;

use noyau_env::Cache;
use serde_json::json;

const CHILD: &str = "NOYAU_ENV_TEST_CHILD";

fn child(root: &str) {
    let cache = Cache::new(root);
    let mut quiet = |_: &str| {};
    let (path, rec) = cache
        .get_or_build("same-spec", &mut quiet, |dir, _| {
            let counter = std::path::Path::new(root).join("builds");
            let mut n: u32 = std::fs::read_to_string(&counter)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            n += 1;
            std::fs::write(&counter, n.to_string()).unwrap();
            std::thread::sleep(Duration::from_millis(400));
            std::fs::write(dir.join("payload"), "built").unwrap();
            Ok(json!({"built_by": std::process::id()}))
        })
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(path.join("payload")).unwrap(),
        "built"
    );
    println!("BUILT_BY {}", rec["built_by"]);
}

#[test]
fn eight_processes_build_the_same_entry_once() {
    if let Ok(root) = std::env::var(CHILD) {
        child(&root);
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..8)
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
    for c in children {
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "a child failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let by = text
            .lines()
            .find_map(|l| l.strip_prefix("BUILT_BY "))
            .unwrap_or_else(|| panic!("no BUILT_BY in {text}"))
            .to_string();
        builders.insert(by);
    }
    let builds = std::fs::read_to_string(root.path().join("builds")).unwrap();
    assert_eq!(builds.trim(), "1", "the entry was built {builds} times");
    assert_eq!(builders.len(), 1, "{builders:?}");
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
