//! The managed Python kernel: what makes `noyau run nb.ipynb` work on a
//! machine where no Python kernel is installed.
//!
//! When the `python3` kernelspec is nowhere on the Jupyter paths, noyau
//! makes a virtual environment with a pinned ipykernel in its cache
//! (`$XDG_CACHE_HOME/noyau/kernels/python3-ipykernel-7.4.0`, with uv when it
//! is on PATH, else `python3 -m venv` + pip), writes a kernelspec beside it
//! whose argv names that environment's interpreter, and points the agent at
//! it through `JUPYTER_PATH`. The environment is built in a temporary
//! directory and renamed into place, so concurrent first runs do not see a
//! half-made one. A finished one is used only when it, its marker and its
//! kernelspec are the user's (writable by no one else, not links); without
//! a home the cache is `/tmp/noyau-cache-EUID`, used only when that is the
//! user's only (0700): another user could have made it first, with a
//! kernelspec that runs their code.
//!
//! A batch job gets what it needs to find the kernel this host found in
//! its environment ([`job_env`]), since a scheduler may not copy the
//! submitting shell's (OAR copies nothing): `JUPYTER_PATH` naming every data
//! dir searched here, and the IPython history setting of headless kernels.

use noyau_vars::EnvVars;
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use noyau_trust::{Expect, Mode};
use noyau_wire::kernelspec::{self, KernelSpecError, NATIVE_KERNEL_NAME};

use crate::error::{bad, RunError};

pub const IPYKERNEL_VERSION: &str = "7.4.0";

/// Where headless IPython kernels keep their history unless
/// `NOYAU_IPYTHON_HIST_FILE` says otherwise: in memory, as nbclient does, so
/// that many kernels do not share (and lock) one SQLite file on a shared
/// filesystem.
pub const DEFAULT_HIST_FILE: &str = ":memory:";

/// The kernelspec a run uses: `--kernel`, else the notebook's, else
/// `python3`; `python` means `python3`, as in jupyter_client.
pub fn kernel_name(given: Option<&str>, notebook: Option<&str>) -> String {
    kernelspec::resolve_alias(given.or(notebook).unwrap_or(NATIVE_KERNEL_NAME)).to_string()
}

/// The environment the kernel's agent needs, on every backend: the search
/// path of this host (the managed Python kernel's first when `python3` is
/// nowhere, made now, here, where the network is) and the history setting.
/// A kernel missing here is an error on the local backend only: a batch
/// job may see kernelspecs this host does not.
pub fn job_env(kernel: &str, backend: &str) -> Result<BTreeMap<String, String>, RunError> {
    let mut managed = None;
    if let Err(e) = kernelspec::find(kernel) {
        if kernel == NATIVE_KERNEL_NAME && matches!(e, KernelSpecError::NotFound { .. }) {
            managed =
                Some(ensure_python_kernel().map_err(|e| RunError::ManagedKernel(Box::new(e)))?);
        } else if backend == "local" {
            return Err(bad(format!(
                "{e}\n(choose a kernel with --kernel NAME; `noyau kernelspecs` lists them)"
            )));
        }
    }
    let hist = std::env::var(EnvVars::NOYAU_IPYTHON_HIST_FILE)
        .unwrap_or_else(|_| DEFAULT_HIST_FILE.into());
    Ok(BTreeMap::from([
        (
            "JUPYTER_PATH".to_string(),
            kernelspec::search_path_from(&kernelspec::process_env, managed.as_deref()),
        ),
        (EnvVars::NOYAU_IPYTHON_HIST_FILE.to_string(), hist),
    ]))
}

/// Where the managed kernel is made: in the user's cache home
/// (`$XDG_CACHE_HOME`, `~/.cache`, else `/tmp/noyau-cache-EUID`:
/// [`noyau_env::cache::cache_home`]).
pub fn cache_dir() -> PathBuf {
    noyau_env::cache::cache_home()
        .join("noyau")
        .join("kernels")
        .join(format!("python3-ipykernel-{IPYKERNEL_VERSION}"))
}

/// The kernelspec's directory in the managed kernel's.
const SPEC_DIR: &str = "share/jupyter/kernels/python3";

/// The marker of a finished managed kernel.
const COMPLETE: &str = ".complete";

/// The Jupyter data dir (`…/share/jupyter`) holding the managed `python3`
/// kernelspec, made on first use. In a cache home in /tmp, which another
/// user may have made first with a kernelspec of theirs, nothing is used
/// or made unless that directory is the user's only.
pub fn ensure_python_kernel() -> Result<PathBuf, RunError> {
    let dir = cache_dir();
    noyau_env::cache::ensure_home(&dir).map_err(|e| {
        bad(format!(
            "{e} (noyau's cache is there because neither XDG_CACHE_HOME nor HOME is an \
             absolute path)"
        ))
    })?;
    let data = dir.join("share").join("jupyter");
    if finished(&dir)? {
        return Ok(data);
    }
    let parent = dir.parent().expect("cache dir has a parent");
    std::fs::create_dir_all(parent).map_err(RunError::io("cannot create", parent))?;
    eprintln!(
        "noyau: no python3 kernelspec is installed; making a managed Python kernel \
         (ipykernel=={IPYKERNEL_VERSION}) in {} — once, it is reused by later runs",
        dir.display()
    );
    let tmp = parent.join(format!(".tmp-{}-{}", std::process::id(), IPYKERNEL_VERSION));
    let _ = std::fs::remove_dir_all(&tmp);
    // The kernel is whole before it is renamed into place: a run that
    // loses the race to another finds the winner's finished.
    let built = build(&tmp)
        .and_then(|()| write_spec(&tmp, &dir))
        .and_then(|()| kernel_file(&tmp.join(COMPLETE), b""));
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another run may have finished first: then its environment is used.
        if !finished(&dir)? {
            return Err(bad(format!(
                "cannot move the managed kernel to {}: {e}; if an unfinished one is \
                 there (left by an older noyau), remove it and run again",
                dir.display()
            )));
        }
    }
    eprintln!("noyau: managed Python kernel ready");
    Ok(data)
}

/// True when the managed kernel in `dir` was finished (its marker is
/// there), and then only if the kernel, its marker and its kernelspec (whose
/// argv runs as the user) are the user's, writable by no one else and not
/// links; a refusal says which and what to do.
fn finished(dir: &Path) -> Result<bool, RunError> {
    let ours = |expect: Expect, path: &Path| {
        expect
            .mode(Mode::NoOthersWrite)
            .check(path)
            .map(drop)
            .map_err(|e| bad(e.to_string()))
    };
    if !dir.join(COMPLETE).exists() {
        return Ok(false);
    }
    let mut at = dir.to_path_buf();
    ours(Expect::dir(), &at)?;
    ours(Expect::file(), &at.join(COMPLETE))?;
    for part in Path::new(SPEC_DIR).components() {
        at.push(part);
        ours(Expect::dir(), &at)?;
    }
    ours(Expect::file(), &at.join("kernel.json"))?;
    Ok(true)
}

fn on_path(exe: &str) -> bool {
    std::env::var_os(EnvVars::PATH)
        .map(|p| std::env::split_paths(&p).any(|d| d.join(exe).is_file()))
        .unwrap_or(false)
}

/// Runs a command that makes part of the managed kernel, under umask 022
/// whatever the user's: [`finished`] refuses a kernel its group could
/// write, and 002 (RHEL's, for users of a group of their own) would make
/// every file of it so.
fn run(cmd: &mut Command) -> Result<(), RunError> {
    let shown = format!("{cmd:?}");
    // SAFETY: umask is async-signal-safe, and the closure touches nothing
    // of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    let out = cmd.output().map_err(|source| RunError::Io {
        what: "cannot run",
        path: shown.clone().into(),
        source,
    })?;
    if !out.status.success() {
        return Err(RunError::Command {
            command: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// Makes the kernel's venv in `tmp`. Every command runs in its parent
/// (noyau's cache), not in
/// the directory `noyau run` was started in (a cloned project's): uv reads
/// a `uv.toml`, `pyproject.toml` or `.python-version` from its current
/// directory and its parents (so it is also told its configuration and
/// its python), and `python -m` puts the current directory first on
/// sys.path, where a project's `venv/` or `pip/` would shadow the stdlib's
/// (so also `-I`).
fn build(tmp: &Path) -> Result<(), RunError> {
    let pin = format!("ipykernel=={IPYKERNEL_VERSION}");
    let python = tmp.join("bin").join("python");
    let cwd = tmp.parent().expect("made in noyau's cache");
    if on_path("uv") {
        let config = noyau_env::python::uv_config_args().map_err(|source| RunError::Untrusted {
            what: "your uv configuration file is not used".into(),
            source,
        })?;
        let uv = || {
            let mut c = Command::new("uv");
            c.current_dir(cwd).args(&config);
            c
        };
        run(uv()
            .args(["venv", "--quiet", "--no-project", "--python", "python3"])
            .arg(tmp))?;
        run(uv()
            .args(["pip", "install", "--quiet", "--python"])
            .arg(&python)
            .arg(&pin))?;
    } else {
        run(Command::new("python3")
            .current_dir(cwd)
            .args(["-I", "-m", "venv"])
            .arg(tmp))
        .map_err(|e| {
            RunError::Input(format!("{e}\nnoyau needs python3 with the venv module (Debian: apt install python3-venv), or uv"))
        })?;
        run(Command::new(&python).current_dir(cwd).args([
            "-I",
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &pin,
        ]))?;
    }
    Ok(())
}

/// Writes the kernelspec into `at`, the kernel being made, for its place
/// once finished, `dir` (its argv names the interpreter there); 0755
/// directories and a 0644 file whatever the umask (as [`run`]).
fn write_spec(at: &Path, dir: &Path) -> Result<(), RunError> {
    let spec_dir = at.join(SPEC_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&spec_dir)
        .map_err(RunError::io("cannot create", &spec_dir))?;
    let spec = serde_json::json!({
        "argv": [dir.join("bin/python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (noyau managed)",
        "language": "python",
        "metadata": {"debugger": true},
    });
    let json = serde_json::to_vec_pretty(&spec).expect("json");
    kernel_file(&spec_dir.join("kernel.json"), &json)
}

/// A file of the kernel being made, new, 0644 whatever the umask (the
/// kernelspec replaces the one ipykernel's wheel installs there).
fn kernel_file(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    noyau_trust::replace(path, bytes, 0o644).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A managed kernel as [`ensure_python_kernel`] leaves it (no venv:
    /// only its marker and kernelspec are looked at).
    fn made(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        write_spec(dir, dir).unwrap();
        kernel_file(&dir.join(COMPLETE), b"").unwrap();
    }

    fn refused(dir: &Path) -> String {
        finished(dir).unwrap_err().to_string()
    }

    #[test]
    fn a_managed_kernel_is_used_only_if_its_marker_and_kernelspec_are_ours() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("k");
        assert!(!finished(&dir).unwrap(), "nothing there: not finished");
        made(&dir);
        assert!(finished(&dir).unwrap());
        // A kernelspec directory swapped for a link to one whose argv runs
        // someone else's code.
        let spec = dir.join(SPEC_DIR);
        let theirs = t.path().join("theirs");
        std::fs::rename(&spec, &theirs).unwrap();
        std::os::unix::fs::symlink(&theirs, &spec).unwrap();
        let e = refused(&dir);
        assert!(
            e.contains(&format!("{} is a symlink", spec.display())),
            "{e}"
        );
        std::fs::remove_file(&spec).unwrap();
        std::fs::rename(&theirs, &spec).unwrap();
        // A kernelspec others may rewrite.
        let json = spec.join("kernel.json");
        std::fs::set_permissions(&json, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = refused(&dir);
        assert!(e.contains("is writable by its group or others"), "{e}");
        std::fs::set_permissions(&json, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Another user's marker (or kernel): giving it away needs root.
        if !noyau_trust::testing::root() {
            return;
        }
        std::os::unix::fs::chown(dir.join(COMPLETE), Some(65534), None).unwrap();
        let e = refused(&dir);
        assert!(e.contains("belongs to uid 65534"), "{e}");
    }
}
