//! `isolation = "container"` with bubblewrap, like `guix shell --container`:
//!
//! * the whole system read-only (`--ro-bind / /`), fresh `/dev`, `/proc`,
//!   and a private `/tmp`;
//! * the home directory and `/run/user` (the user's D-Bus and systemd
//!   sockets) hidden under empty tmpfs mounts (the environment and the
//!   interpreter it needs are shown again read-only when they live there,
//!   as are the paths in `ro_bind`);
//! * writable: the notebook's directory, `scratch`, and the agent's runtime
//!   directory (the kernel's ipc sockets and connection file);
//! * no network (`--unshare-net`: only a loopback of its own) unless
//!   `network = true`;
//! * its own PID and IPC namespaces: the host's processes are not in its
//!   `/proc`, so `/proc/PID/root` cannot lead back to the hidden home;
//! * a new session (`--new-session`): no controlling terminal, so no
//!   TIOCSTI keystrokes into the terminal noyau was started from;
//! * no capabilities (`--cap-drop ALL`; bwrap keeps root's otherwise).
//!
//! Interrupts: the new session takes the kernel out of the process group
//! the agent made, so SIGINT to that group no longer reaches it. The agent
//! signals the kernel's own group instead, found from the host's `/proc`
//! (`Realised::own_session`; the first process below bwrap that leads its
//! own session is the one bwrap started with `setsid`). bwrap itself runs with
//! SIGINT ignored (`env --ignore-signal=INT`), so a stray SIGINT to the
//! agent's group cannot end the sandbox, and the kernel with it restored
//! (`env --default-signal=INT`): an ignored signal stays ignored across
//! exec, and Python would then install no KeyboardInterrupt handler.

use std::path::{Path, PathBuf};

use crate::EnvSpec;

/// Hidden under an empty tmpfs when it exists (bwrap cannot make a mount
/// point in the read-only root).
const RUN_USER: &str = "/run/user";

pub fn wrap(
    spec: &EnvSpec,
    runtime_dir: &Path,
    ro_binds: &[PathBuf],
    argv: Vec<String>,
) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    let mut v: Vec<String> = [
        "env",
        "--ignore-signal=INT",
        "bwrap",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--die-with-parent",
        "--unshare-pid",
        "--unshare-ipc",
        "--new-session",
        "--cap-drop",
        "ALL",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let home = std::env::var_os(noyau_vars::EnvVars::HOME)
        .map(PathBuf::from)
        .filter(|h| h.is_dir() && h != Path::new("/"));
    if let Some(h) = &home {
        v.extend(["--tmpfs".into(), s(h)]);
    }
    if Path::new(RUN_USER).is_dir() {
        v.extend(["--tmpfs".into(), RUN_USER.into()]);
    }
    let hidden = |p: &Path| {
        p.starts_with("/tmp")
            || p.starts_with(RUN_USER)
            || home.as_ref().is_some_and(|h| p.starts_with(h))
    };
    let mut ro: Vec<PathBuf> = ro_binds
        .iter()
        .filter(|p| p.exists())
        .map(|p| match std::fs::canonicalize(p) {
            // A symlink the sandbox shows (`/` is bound) cannot be a mount
            // point: show what it points to, where it is. One under a
            // hidden directory is not there, so bwrap makes it a directory.
            Ok(real) if !hidden(p) => real,
            _ => p.clone(),
        })
        .collect();
    ro.sort_by_key(|p| p.components().count());
    ro.dedup();
    for p in ro {
        v.extend(["--ro-bind".into(), s(&p), s(&p)]);
    }
    let nb = spec.notebook_dir();
    let mut rw = vec![nb.clone(), runtime_dir.to_path_buf()];
    rw.extend(spec.scratch.clone());
    for p in &rw {
        if p.exists() {
            v.extend(["--bind".into(), s(p), s(p)]);
        }
    }
    if !spec.network {
        v.push("--unshare-net".into());
    }
    let cwd = std::env::current_dir().ok();
    let chdir = match (&cwd, &home) {
        (Some(c), Some(h)) if c.starts_with(h) && !c.starts_with(&nb) => nb.clone(),
        (Some(c), _) if !hidden(c) || rw.iter().any(|r| c.starts_with(r)) => c.clone(),
        _ => nb.clone(),
    };
    v.extend(["--chdir".into(), s(&chdir)]);
    if let Some(s) = &spec.scratch {
        v.extend(["--setenv".into(), "TMPDIR".into(), s.display().to_string()]);
    }
    // In its own PID namespace the kernel's parent is pid 1 (bwrap's
    // reaper); ipykernel, given its launcher's pid there, takes that for
    // its parent's death and exits. The agent ends the kernel itself.
    v.extend(["--unsetenv".into(), "JPY_PARENT_PID".into()]);
    v.extend(["--".into(), "env".into(), "--default-signal=INT".into()]);
    v.extend(argv);
    v
}

/// The installation prefixes of an executable, as written and with
/// symlinks followed (`/x/.venv/bin/python` → `/x/.venv`, and the prefix of
/// the interpreter the venv links to): what a sandbox must show for it to
/// run. A venv under a hidden directory (`/tmp`, home) needs both.
pub fn exe_prefixes(exe: &str) -> Vec<PathBuf> {
    let p = if exe.contains('/') {
        PathBuf::from(exe)
    } else {
        match crate::cmd::which(exe) {
            Some(p) => p,
            None => return vec![],
        }
    };
    let lexical = std::path::absolute(&p)
        .ok()
        .and_then(|a| a.parent()?.parent().map(Path::to_path_buf));
    let real = std::fs::canonicalize(&p)
        .ok()
        .and_then(|r| r.parent()?.parent().map(Path::to_path_buf));
    let mut out: Vec<PathBuf> = lexical.into_iter().chain(real).collect();
    out.dedup();
    out
}
