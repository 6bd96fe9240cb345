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
//! +0.3 s here).
//!
//! The venv is made `--relocatable` (it is built in a temporary directory
//! and renamed into the cache) and with `UV_LINK_MODE=copy` (hard links
//! into uv's cache would not survive on another filesystem).
//!
//! uv comes from `NOYAU_UV`, else PATH, else noyau installs it once into
//! `CACHE/.tools/uv` with `python3 -m venv` + `pip install uv==UV_VERSION`
//! (under the same lock-and-rename discipline as environments).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::cache::Cache;
use crate::cmd;
use crate::{EnvError, EnvSpec};

/// The uv noyau installs when none is on PATH.
pub const UV_VERSION: &str = "0.13.9";

/// uv to use: `NOYAU_UV`, PATH, or noyau's own (installed on first use).
pub fn find_uv(cache: &Cache, progress: crate::Progress<'_>) -> Result<PathBuf, EnvError> {
    if let Some(p) = std::env::var_os("NOYAU_UV").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = cmd::which("uv") {
        return Ok(p);
    }
    let tools = Cache::new(cache.root().join(".tools"));
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
        cmd::run(
            Command::new(&python).arg("-m").arg("venv").arg(&venv),
            "making a venv for uv failed",
            progress,
        )?;
        cmd::run(
            Command::new(venv.join("bin/python"))
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
                .arg(format!("uv=={UV_VERSION}")),
            "installing uv with pip failed",
            progress,
        )?;
        Ok(json!({"uv": UV_VERSION}))
    })?;
    Ok(dir.join("venv/bin/uv"))
}

/// True when a requirement line names ipykernel.
fn names_ipykernel(req: &str) -> bool {
    let name: String = req
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    name.to_ascii_lowercase().replace('_', "-") == "ipykernel"
}

fn uv_cmd(uv: &Path) -> Command {
    let mut c = Command::new(uv);
    c.env("UV_LINK_MODE", "copy")
        .env("UV_NO_PROGRESS", "1")
        .env_remove("VIRTUAL_ENV");
    c
}

/// Builds the environment for `spec` into `dir` and returns its record.
pub fn build(
    spec: &EnvSpec,
    uv: &Path,
    dir: &Path,
    progress: crate::Progress<'_>,
) -> Result<Value, EnvError> {
    // Absolute, as uv's resolve runs inside `dir` (a relative cache root).
    let dir = &std::path::absolute(dir)
        .map_err(|e| EnvError::io(format!("resolving {}", dir.display()), e))?;
    let venv = dir.join("venv");
    let python = spec.python.clone().unwrap_or_else(|| "python3".into());
    progress(&format!("creating a Python {python} venv with uv"));
    cmd::run(
        uv_cmd(uv)
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
                uv_cmd(uv)
                    .current_dir(dir)
                    .args([
                        "pip",
                        "compile",
                        "--generate-hashes",
                        "--no-header",
                        "--quiet",
                    ])
                    .arg("--python")
                    .arg(&interp)
                    .arg("requirements.in")
                    .arg("-o")
                    .arg(&lock_path),
                "uv could not resolve the requirements",
                progress,
            )?;
            std::fs::read_to_string(&lock_path)
                .map_err(|e| EnvError::io(format!("reading {}", lock_path.display()), e))?
        }
    };
    progress("installing the locked packages with uv");
    cmd::run(
        uv_cmd(uv)
            .args([
                "pip",
                "sync",
                "--require-hashes",
                "--compile-bytecode",
                "--python",
            ])
            .arg(&interp)
            .arg(&lock_path),
        "uv could not install the lock",
        progress,
    )?;
    let freeze = cmd::run(
        uv_cmd(uv).args(["pip", "freeze", "--python"]).arg(&interp),
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
    Ok(json!({
        "kind": "python",
        "key": spec.cache_key(),
        "python": version,
        "lock": lock,
        "lock_sha256": crate::sha256_hex(lock.as_bytes()),
        "freeze": freeze,
        "built_at": now_secs(),
        "build_id": format!("{}-{}", std::process::id(), now_nanos()),
        "uv": uv_version(uv),
    }))
}

/// A key of the venv's pyvenv.cfg (`home` is the base interpreter's bin).
pub fn pyvenv_cfg(venv: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(venv.join("pyvenv.cfg")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

fn uv_version(uv: &Path) -> String {
    Command::new(uv)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
