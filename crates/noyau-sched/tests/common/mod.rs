//! Helpers shared by the real-scheduler tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A wrapper in `dir` around the real `command` that logs each call to `log`.
pub fn logging_wrapper(dir: &Path, command: &str, log: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let real = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .unwrap();
    let real = String::from_utf8(real.stdout).unwrap();
    let wrapper = dir.join(command);
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec {} \"$@\"\n",
            log.display(),
            real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

/// How many calls `log` holds so far.
pub fn calls(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .count()
}

/// `calls` over `elapsed` is one call per `interval` (±20 % jitter, the
/// first one interval after the first job is tracked), for 10 jobs.
pub fn assert_one_call_per_interval(
    calls: usize,
    elapsed: Duration,
    interval: Duration,
    command: &str,
) {
    let max = (elapsed.as_secs_f64() / (interval.as_secs_f64() * 0.8)).ceil() as usize + 1;
    assert!(
        (3..=max).contains(&calls),
        "{calls} {command} calls in {elapsed:?} for 10 jobs (interval {interval:?}, at most {max} expected)"
    );
}
