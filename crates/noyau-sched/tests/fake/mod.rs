//! Helpers shared by the tests whose scheduler commands are scripts of
//! the test's own.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Points noyau's state and runtime directories into `d` (the runtime one
/// made 0700, as noyau wants it). Each test runs in a process of its own:
/// no other thread reads the environment.
pub fn private_dirs(d: &Path) {
    let run = d.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::env::set_var("XDG_STATE_HOME", d.join("state"));
    std::env::set_var("XDG_RUNTIME_DIR", &run);
}

/// An executable shell script at `path` running `text`.
pub fn script(path: &Path, text: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{text}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
