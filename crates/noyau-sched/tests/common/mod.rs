//! Helpers shared by the real-scheduler tests.

use std::path::{Path, PathBuf};

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
