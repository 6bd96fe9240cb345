//! `kind = "python"`: a venv made by uv from requirements or a lock.
//!
//! Without a lock, uv resolves the requirements (plus ipykernel, when they
//! do not name it) into a lock with exact versions and hashes
//! (`uv pip compile --generate-hashes`); with one, the lock is used as is.
//! Either way the venv is filled by `uv pip sync --require-hashes`, which
//! installs exactly the lock and nothing else, so a spec that carries the
//! lock an earlier build recorded reproduces that build.
//!
//! The venv's modules are compiled to `.pyc` at build time
//! (`--compile-bytecode`; uv does not by default): the entry is shared and
//! shown read-only under isolation, so a kernel could not write them, and
//! without them every kernel start recompiles ipykernel's imports (about
//! +0.3 s here). Not for requirements from a notebook or project the user
//! has not trusted ([`EnvSpec::wheels_only`]): compiling runs the venv's
//! python outside the sandbox, and with it any `.pth` file a wheel put in
//! site-packages.
//!
//! The venv is made `--relocatable` (it is built in a temporary directory
//! and renamed into the cache) and with `UV_LINK_MODE=copy` (hard links
//! into uv's cache would not survive on another filesystem).
//!
//! uv comes from `NOYAU_UV`, else PATH, else noyau installs it once into
//! `CACHE/.tools/uv` with `python3 -m venv` + `pip install uv==UV_VERSION`
//! (under the same lock-and-rename discipline as environments, pip checking
//! the wheel's pinned sha256). That binary lives in a cache others may
//! share, so its sha256 is checked against the one pinned here before each
//! use: a uv replaced there is refused ([`crate::cache::Untrusted`]).

use noyau_trust::{Expect, Mode, Owner};
use noyau_vars::EnvVars;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::cache::Cache;
use crate::cmd;
use crate::index::Network;
use crate::{EnvError, EnvSpec};

/// The uv noyau installs when none is on PATH.
pub const UV_VERSION: &str = "0.13.9";

/// sha256 of the `uv` binary in the manylinux wheels of uv 0.13.9 (what
/// pip installs on a glibc Linux), per architecture.
const UV_BINARY_SHA256: &[(&str, &str)] = &[
    (
        "x86_64",
        "b73acdf73b96c3ac9e56d2fa933427b3ee6a901e3cce6ba1e3ecb3f91ca0d86a",
    ),
    (
        "aarch64",
        "bbecb5ac518030bb5e84f1999c577228460192832ac24a92bd772735682979f4",
    ),
];

/// sha256 of those wheels (x86_64, aarch64), for pip's `--require-hashes`.
const UV_WHEEL_SHA256: &[&str] = &[
    "d7f459fe4fd247d830351c75686d3996ace3c6f3f728eb0e85a30b7ada0cef19",
    "5435c5ce14a56431208ca0996416d310f1598e8c2c8ba707688985a16bb82dbe",
];

/// The pinned sha256 of noyau's own uv on this machine's architecture.
fn pinned_uv_sha256() -> Result<&'static str, EnvError> {
    let arch = std::env::consts::ARCH;
    UV_BINARY_SHA256
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, h)| *h)
        .ok_or_else(|| EnvError::Build {
            summary: "cannot install uv".into(),
            output: format!(
                "noyau knows no uv=={UV_VERSION} binary for {arch}; install uv (https://docs.astral.sh/uv/) on PATH or set NOYAU_UV"
            ),
        })
}

/// Refuses a cached uv whose bytes are not the pinned ones.
fn check_uv(uv: &Path, want: &str) -> Result<(), EnvError> {
    let bytes =
        std::fs::read(uv).map_err(|e| EnvError::io(format!("reading {}", uv.display()), e))?;
    let got = crate::sha256_hex(&bytes);
    if got != want {
        return Err(crate::cache::Untrusted {
            path: uv.to_path_buf(),
            why: format!("has sha256 {got}, not uv {UV_VERSION}'s {want}"),
        }
        .into());
    }
    Ok(())
}

/// uv to use: `NOYAU_UV`, PATH, or noyau's own (installed on first use).
pub fn find_uv(cache: &Cache, progress: crate::Progress<'_>) -> Result<PathBuf, EnvError> {
    if let Some(p) = std::env::var_os(EnvVars::NOYAU_UV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = cmd::which("uv") {
        return Ok(p);
    }
    let want = pinned_uv_sha256()?;
    let tools = cache.sub(".tools");
    let key = format!("uv-{UV_VERSION}");
    let (dir, _) = tools.get_or_build(&key, progress, |tmp, progress| {
        progress(&format!(
            "uv is not on PATH; installing uv=={UV_VERSION} from PyPI into {}",
            tools.entry(&key).display()
        ));
        let python = cmd::which("python3").ok_or_else(|| EnvError::Build {
            summary: "cannot install uv".into(),
            output: "neither uv nor python3 is on PATH; install uv (https://docs.astral.sh/uv/) or python3".into(),
        })?;
        let venv = tmp.join("venv");
        // In a directory of noyau's own and isolated (`-I`): with `-m`,
        // the current directory comes first on sys.path, and a project's
        // `venv/` or `pip/` there would be run instead of the stdlib's.
        cmd::run(
            Command::new(&python)
                .current_dir(tmp)
                .args(["-I", "-m", "venv"])
                .arg(&venv),
            "making a venv for uv failed",
            progress,
        )?;
        let pins = tmp.join("uv-requirements.txt");
        let hashes: Vec<String> = UV_WHEEL_SHA256
            .iter()
            .map(|h| format!("--hash=sha256:{h}"))
            .collect();
        std::fs::write(&pins, format!("uv=={UV_VERSION} {}\n", hashes.join(" ")))
            .map_err(|e| EnvError::io(format!("writing {}", pins.display()), e))?;
        cmd::run(
            Command::new(venv.join("bin/python"))
                .current_dir(tmp)
                .args(["-I", "-m", "pip", "install", "--disable-pip-version-check", "-q"])
                .args(["--require-hashes", "--no-deps", "--only-binary=:all:", "-r"])
                .arg(&pins),
            &format!(
                "installing uv with pip failed, from {}",
                Network::from_env().pip_index_shown()
            ),
            progress,
        )?;
        check_uv(&venv.join("bin/uv"), want)?;
        Ok(json!({"uv": UV_VERSION}))
    })?;
    let uv = dir.join("venv/bin/uv");
    check_uv(&uv, want)?;
    Ok(uv)
}

/// uv's configuration flags for every uv noyau runs: the user's own
/// settings (a site's mirror) are kept, a project's never read.
///
/// uv reads `uv.toml` and `pyproject.toml`'s `[tool.uv]` from its current
/// directory and every parent: run in a cloned project, those would set
/// `compile-bytecode`, an index or builds, whatever noyau asked. So noyau
/// runs uv in a directory of its own (see [`Uv::cmd`]) and turns discovery
/// off: `UV_CONFIG_FILE`, if set, is left to uv; else the user's
/// `$XDG_CONFIG_HOME/uv/uv.toml` (or `~/.config/uv/uv.toml`), theirs and
/// not writable by others, else the site's `/etc/xdg/uv/uv.toml` or
/// `/etc/uv/uv.toml` (not writable by others), is named with
/// `--config-file` (which stops discovery: one file only, so a site file
/// after the chosen one is not read, and a warning says so); else
/// `--no-config`.
pub fn uv_config_args() -> Result<Vec<OsString>, noyau_trust::TrustError> {
    if std::env::var_os(EnvVars::UV_CONFIG_FILE).is_some_and(|v| !v.is_empty()) {
        return Ok(Vec::new());
    }
    // A relative XDG_CONFIG_HOME or HOME would name a file wherever noyau
    // runs: ignored, as noyau-config ignores them.
    let user_dir = noyau_vars::absolute(std::env::var_os(EnvVars::XDG_CONFIG_HOME)).or_else(|| {
        noyau_vars::absolute(std::env::var_os(EnvVars::HOME)).map(|h| h.join(".config"))
    });
    let candidates = user_dir
        .map(|d| (d.join("uv/uv.toml"), Owner::Me))
        .into_iter()
        .chain(
            SITE_UV_CONFIGS
                .iter()
                .map(|f| (PathBuf::from(f), Owner::Any)),
        );
    let mut chosen = None;
    for (file, owner) in candidates {
        let expect = Expect::file()
            .owner(owner)
            .mode(Mode::NoOthersWrite)
            .follow_links();
        match expect.check(&file) {
            Ok(_) if chosen.is_none() => chosen = Some(file),
            Ok(_) => tracing::warn!(
                "uv's {} is not read: uv is given one config file, and {} comes first \
                 (copy the site's settings you need, such as its index, into it)",
                file.display(),
                chosen
                    .as_ref()
                    .map_or(String::new(), |c| c.display().to_string())
            ),
            Err(e) if e.is_not_found() => {}
            Err(e) if chosen.is_some() => tracing::warn!("{e}"),
            Err(e) => return Err(e),
        }
    }
    Ok(match chosen {
        Some(file) => vec!["--config-file".into(), file.into()],
        None => vec!["--no-config".into()],
    })
}

/// The site's uv config files, in uv's own order (its system-level
/// `$XDG_CONFIG_DIRS` default, then `/etc`).
const SITE_UV_CONFIGS: [&str; 2] = ["/etc/xdg/uv/uv.toml", "/etc/uv/uv.toml"];

/// True when a requirement line names ipykernel.
fn names_ipykernel(req: &str) -> bool {
    let name: String = req
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    name.to_ascii_lowercase().replace('_', "-") == "ipykernel"
}

/// uv, and how it reaches packages.
#[derive(Debug, Clone)]
pub struct Uv {
    pub path: PathBuf,
    /// The site's index and proxy, as the submitting host sees them.
    pub network: Network,
    /// `--offline`: only what uv's cache holds (a job installing a lock
    /// prepared elsewhere); no index is contacted.
    pub offline: bool,
    /// Wheels only (`--no-build`): see [`EnvSpec::wheels_only`].
    pub wheels_only: bool,
}

impl Uv {
    pub fn new(path: PathBuf) -> Uv {
        Uv {
            path,
            network: Network::from_env(),
            offline: false,
            wheels_only: false,
        }
    }

    /// uv run in `cwd`, a directory of noyau's own, with
    /// [`uv_config_args`] (so no project's configuration is read).
    fn cmd(&self, cwd: &Path) -> Result<Command, EnvError> {
        let config = uv_config_args().map_err(|e| EnvError::Build {
            summary: "your uv configuration file is not used".into(),
            output: e.to_string(),
        })?;
        let mut c = Command::new(&self.path);
        c.current_dir(cwd)
            .args(config)
            .env("UV_LINK_MODE", "copy")
            .env("UV_NO_PROGRESS", "1")
            .env_remove("VIRTUAL_ENV");
        for v in self.network.uv_env_removed() {
            c.env_remove(v);
        }
        c.envs(self.network.uv_env());
        if self.offline {
            c.env("UV_OFFLINE", "1");
        }
        Ok(c)
    }

    /// `uv pip SUB`, wheels only when asked. (A flag: uv 0.13's `pip`
    /// commands read no `UV_NO_BUILD`, so the variable would do nothing.)
    fn pip(&self, sub: &str, cwd: &Path) -> Result<Command, EnvError> {
        let mut c = self.cmd(cwd)?;
        c.args(["pip", sub]);
        if self.wheels_only {
            c.arg("--no-build");
        }
        Ok(c)
    }

    /// What to do when a package has no wheel here, for an error.
    fn wheels_only_note(&self) -> &'static str {
        if self.wheels_only {
            " (only wheels are installed: the requirements come from a notebook or project you \
             have not trusted, and building a source distribution runs its code outside the \
             sandbox. If a package has no wheel for this machine, read the project and trust \
             it with `noyau trust DIR`, or give the requirements yourself with --env)"
        } else {
            ""
        }
    }

    /// "… from INDEX" for an error: which index could not be reached.
    fn source(&self) -> String {
        if self.offline {
            "offline, from uv's cache only".into()
        } else {
            format!("from {}", self.network.index_shown())
        }
    }
}

/// Builds the environment for `spec` into `dir` and returns its record.
pub fn build(
    spec: &EnvSpec,
    uv: &Uv,
    dir: &Path,
    progress: crate::Progress<'_>,
) -> Result<Value, EnvError> {
    // Absolute, as uv's resolve runs inside `dir` (a relative cache root).
    let dir = &std::path::absolute(dir)
        .map_err(|e| EnvError::io(format!("resolving {}", dir.display()), e))?;
    let venv = dir.join("venv");
    let uv = &Uv {
        wheels_only: uv.wheels_only || spec.wheels_only,
        ..uv.clone()
    };
    let python = spec.python.clone().unwrap_or_else(|| "python3".into());
    progress(&format!("creating a Python {python} venv with uv"));
    cmd::run(
        uv.cmd(dir)?
            .args(["venv", "--relocatable", "--no-project", "--python"])
            .arg(&python)
            .arg(&venv),
        &format!("uv could not make a venv with Python {python:?}"),
        progress,
    )?;
    let interp = venv.join("bin/python");
    let lock_path = dir.join("requirements.lock");
    let lock = match &spec.lock {
        Some(lock) => {
            progress("installing exactly the given lock");
            std::fs::write(&lock_path, lock)
                .map_err(|e| EnvError::io(format!("writing {}", lock_path.display()), e))?;
            lock.clone()
        }
        None => {
            let mut reqs = spec.requirements.clone();
            if !reqs.iter().any(|r| names_ipykernel(r)) {
                reqs.push("ipykernel".into());
            }
            let input = dir.join("requirements.in");
            std::fs::write(&input, reqs.join("\n") + "\n")
                .map_err(|e| EnvError::io(format!("writing {}", input.display()), e))?;
            progress(&format!("resolving {} with uv", reqs.join(", ")));
            // Run in the build directory and name the input relatively: uv's
            // `# via -r FILE` annotations then say `requirements.in`, not the
            // temporary path, so the same spec gives the same lock (and
            // lock_sha256) whatever the cache's path, on any node.
            cmd::run(
                uv.pip("compile", dir)?
                    .args(["--generate-hashes", "--no-header", "--quiet"])
                    .arg("--python")
                    .arg(&interp)
                    .arg("requirements.in")
                    .arg("-o")
                    .arg(&lock_path),
                &format!(
                    "uv could not resolve the requirements {}{}",
                    uv.source(),
                    uv.wheels_only_note()
                ),
                progress,
            )?;
            std::fs::read_to_string(&lock_path)
                .map_err(|e| EnvError::io(format!("reading {}", lock_path.display()), e))?
        }
    };
    progress("installing the locked packages with uv");
    let mut sync = uv.pip("sync", dir)?;
    sync.arg("--require-hashes");
    // Compiling runs the venv's python here, outside any sandbox, and its
    // start runs the `.pth` files the wheels just installed: not for
    // packages a notebook or project chose that the user has not trusted
    // (their kernels then compile in memory at each start).
    // (Said either way: the user's own uv.toml may ask for it.)
    sync.arg(if uv.wheels_only {
        "--no-compile-bytecode"
    } else {
        "--compile-bytecode"
    });
    cmd::run(
        sync.arg("--python").arg(&interp).arg(&lock_path),
        &format!(
            "uv could not install the lock {}{}",
            uv.source(),
            uv.wheels_only_note()
        ),
        progress,
    )?;
    let freeze = cmd::run(
        uv.cmd(dir)?
            .args(["pip", "freeze", "--python"])
            .arg(&interp),
        "uv pip freeze failed",
        progress,
    )?;
    if !freeze.lines().any(names_ipykernel) {
        return Err(EnvError::Build {
            summary: "the environment has no ipykernel, so no kernel can start in it".into(),
            output:
                "add ipykernel to the lock (resolve it from requirements that include ipykernel)"
                    .into(),
        });
    }
    let version = pyvenv_cfg(&venv, "version_info")
        .or_else(|| pyvenv_cfg(&venv, "version"))
        .unwrap_or_default();
    let mut record = json!({
        "kind": "python",
        "key": spec.cache_key(),
        "python": version,
        "requirements": spec.requirements,
        "lock": lock,
        "lock_sha256": crate::sha256_hex(lock.as_bytes()),
        "freeze": freeze,
        "built_at": crate::now_secs(),
        "built_on": crate::hostname(),
        "build_id": format!("{}-{}", std::process::id(), now_nanos()),
        "uv": uv_version(&uv.path, dir),
    });
    if uv.offline {
        record["offline"] = json!(true);
    } else {
        record["network"] = uv.network.record();
    }
    Ok(record)
}

/// A key of the venv's pyvenv.cfg (`home` is the base interpreter's bin).
pub fn pyvenv_cfg(venv: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(venv.join("pyvenv.cfg")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

fn uv_version(uv: &Path, cwd: &Path) -> String {
    Command::new(uv)
        .current_dir(cwd)
        .args(["--no-config", "--version"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_uv_that_is_not_the_pinned_one_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let uv = t.path().join("uv");
        std::fs::write(&uv, "#!/bin/sh\necho planted\n").unwrap();
        let want = crate::sha256_hex(b"the real one");
        let e = super::check_uv(&uv, &want).unwrap_err().to_string();
        assert!(
            e.contains("not uv 0.13.9's") && e.contains("not used"),
            "{e}"
        );
        std::fs::write(&uv, "the real one").unwrap();
        super::check_uv(&uv, &want).unwrap();
        assert!(super::pinned_uv_sha256().is_ok(), "no pin for this machine");
    }

    #[test]
    fn ipykernel_is_recognised() {
        for r in [
            "ipykernel",
            "ipykernel==7.4.0",
            "IPyKernel>=6",
            "ipykernel[x]",
        ] {
            assert!(super::names_ipykernel(r), "{r}");
        }
        assert!(!super::names_ipykernel("ipykernel-extras"));
    }
}
