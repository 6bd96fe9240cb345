//! `isolation = "container"` with bubblewrap, like `guix shell --container`:
//!
//! * the whole system read-only (`--ro-bind / /`), fresh `/dev`, `/proc`,
//!   and a private `/tmp`;
//! * the home directory and `/run/user` (the user's D-Bus and systemd
//!   sockets) hidden under empty tmpfs mounts (the environment and the
//!   interpreter it needs are shown again read-only when they live there,
//!   as are the paths in `ro_bind`; never the home itself or a directory
//!   holding it);
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

use crate::{EnvError, EnvSpec};

/// Hidden under an empty tmpfs when it exists (bwrap cannot make a mount
/// point in the read-only root).
const RUN_USER: &str = "/run/user";

/// The user's home, as the sandbox hides it.
fn home() -> Option<PathBuf> {
    std::env::var_os(noyau_vars::EnvVars::HOME)
        .map(PathBuf::from)
        .filter(|h| h.is_dir() && h != Path::new("/"))
}

/// Refuses a writable directory of the sandbox (the notebook's directory,
/// `scratch`) that is the home or holds it (`noyau run ~/nb.ipynb`):
/// bound writable over the tmpfs that hides the home, it would give the
/// notebook's code the whole home (keys, shell startup files) to read and
/// write. Any wrapper binding them (bubblewrap, Guix, Apptainer) is held
/// to this.
pub fn check_writable(spec: &EnvSpec) -> Result<(), EnvError> {
    check_writable_in(spec, home().as_deref())
}

fn check_writable_in(spec: &EnvSpec, home: Option<&Path>) -> Result<(), EnvError> {
    let Some(home) = home else { return Ok(()) };
    let nb = spec.notebook_dir();
    let dirs = [
        ("the notebook's directory", Some(&nb)),
        ("scratch", spec.scratch.as_ref()),
    ];
    for dir in &spec.ro_bind {
        if is_or_holds(dir, home) {
            return Err(EnvError::Invalid(format!(
                "isolation = \"container\": ro_bind {} is your home directory or holds it, \
                 and would show the whole home (keys, tokens) to the notebook's code; name \
                 the directories it needs instead",
                dir.display()
            )));
        }
    }
    for (what, dir) in dirs {
        let Some(dir) = dir else { continue };
        if is_or_holds(dir, home) {
            return Err(EnvError::Invalid(format!(
                "isolation = \"container\": {what} {} is your home directory or holds it, and \
                 the sandbox would make it writable, opening the whole home to the notebook's \
                 code; put the notebook (or scratch) in a directory of its own, e.g. {}",
                dir.display(),
                home.join("notebooks").display()
            )));
        }
    }
    Ok(())
}

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
    let home = home();
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
        .filter(|p| p.exists() && !holds_home(p, home.as_deref()))
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

/// True when `dir` is `home` or holds it, links followed on both sides
/// (a path that cannot be resolved is taken as written).
fn is_or_holds(dir: &Path, home: &Path) -> bool {
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    real(home).starts_with(real(dir))
}

/// True when `p` is the home or holds it (`/home`, `/`): bound over the
/// tmpfs that hides the home, it would show all of it. What the spec's
/// `ro_bind` names is refused before ([`check_writable`]); a path found
/// from the environment (a prefix, the interpreter a pyvenv.cfg names, the
/// kernel's executable) is not shown, and the kernel fails to start
/// rather than see the home.
fn holds_home(p: &Path, home: Option<&Path>) -> bool {
    let Some(home) = home else { return false };
    let held = is_or_holds(p, home);
    if held {
        tracing::warn!(
            "not showing {} in the sandbox: it is the home directory or holds it",
            p.display()
        );
    }
    held
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(nb: &Path, scratch: Option<&Path>) -> EnvSpec {
        let mut v = json!({"isolation": "container", "notebook_dir": nb});
        if let Some(s) = scratch {
            v["scratch"] = json!(s);
        }
        EnvSpec::from_value(v).unwrap()
    }

    /// Nothing bound read-only shows the hidden home: a `ro_bind` naming
    /// it or a parent is refused, and a path found from the environment
    /// (the parent of a pyvenv.cfg's `home = /home/bin`) is left out.
    #[test]
    fn the_home_or_what_holds_it_is_never_shown() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home/u");
        let nb = home.join("notebooks");
        std::fs::create_dir_all(&nb).unwrap();
        for bind in [home.clone(), t.path().join("home"), PathBuf::from("/")] {
            let mut s = spec(&nb, None);
            s.ro_bind = vec![bind.clone()];
            let e = check_writable_in(&s, Some(&home)).unwrap_err().to_string();
            assert!(e.contains("ro_bind") && e.contains("home directory"), "{e}");
        }
        let mut s = spec(&nb, None);
        s.ro_bind = vec![home.join(".data")];
        assert!(check_writable_in(&s, Some(&home)).is_ok());

        let real_home = home_dir_or_skip();
        let parent = real_home.parent().unwrap().to_path_buf();
        let shown = t.path().join("shown");
        std::fs::create_dir(&shown).unwrap();
        let argv = wrap(
            &spec(&nb, None),
            t.path(),
            &[parent.clone(), real_home.clone(), shown.clone()],
            vec!["k".into()],
        );
        // (after the home's tmpfs: `/` itself is bound first, before it)
        let after = argv
            .iter()
            .position(|a| a == &real_home.display().to_string());
        let binds: Vec<&String> = argv[after.expect("the home is hidden")..]
            .windows(2)
            .filter(|w| w[0] == "--ro-bind")
            .map(|w| &w[1])
            .collect();
        let s = |p: &Path| p.display().to_string();
        assert!(binds.contains(&&s(&shown)), "{argv:?}");
        assert!(
            !binds.contains(&&s(&parent)) && !binds.contains(&&s(&real_home)),
            "{argv:?}"
        );
    }

    /// This process's home, as [`wrap`] hides it (HOME is set under test).
    fn home_dir_or_skip() -> PathBuf {
        home().expect("HOME is a directory other than /")
    }

    #[test]
    fn the_home_or_what_holds_it_is_never_made_writable() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home/u");
        let nb = home.join("notebooks");
        std::fs::create_dir_all(&nb).unwrap();
        std::os::unix::fs::symlink(&home, t.path().join("link")).unwrap();
        let ok = |s: &EnvSpec| check_writable_in(s, Some(&home));
        assert!(ok(&spec(&nb, None)).is_ok());
        assert!(ok(&spec(&nb, Some(&t.path().join("scratch")))).is_ok());
        for (s, what) in [
            (spec(&home, None), "the notebook's directory"),
            (
                spec(&t.path().join("home"), None),
                "the notebook's directory",
            ),
            (spec(Path::new("/"), None), "the notebook's directory"),
            (spec(&nb, Some(&home)), "scratch"),
            // Reached through a link, it is still the home.
            (spec(&nb, Some(&t.path().join("link"))), "scratch"),
        ] {
            let e = ok(&s).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("home directory"), "{e}");
        }
    }
}
