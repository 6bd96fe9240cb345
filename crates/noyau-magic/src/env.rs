//! `%noyau env show` and `%noyau env lock`: what the kernel's environment
//! was built from, from the record its agent sent (`EnvReady`, noyau-env's
//! record: spec, lock, lock hash, versions). Choosing another environment
//! (`%noyau env SPEC`) restarts the kernel: the proxy does it.

use noyau_trust::anchor::ProjectDir;
use serde_json::Value;

use crate::MagicError;

/// `%noyau env help`.
pub fn usage() -> String {
    format!(
        "usage: {}\n\
         A python spec is resolved and installed with uv into the shared cache (built once); \
         the kernel is then restarted in the new environment (variables are lost). \
         The kernel keeps its sandbox (isolation/network/scratch/ro_bind from noyau.toml or \
         NOYAU_ENV): a cell may not set it. What would run code while the environment is \
         prepared (python other than a version, module_use, modules_init, modules by path, guix \
         channels or manifest, requirements that are URLs, paths or pip options), and a prefix \
         (the sandbox shows it), need a trusted project (`noyau trust DIR`).\n\
         examples:\n  %noyau env six==1.16.0\n  %noyau env python 3.11 numpy==2.1.3\n  \
         %noyau env modules gcc/12 cuda/12.4\n  %noyau env prefix /path/to/venv\n  \
         %noyau env file other/noyau.toml\n  %noyau env system\n",
        noyau_env::sources::MAGIC_USAGE
    )
}

/// `%noyau env show`: the environment the kernel runs in.
pub fn show(record: Option<&Value>) -> String {
    let Some(record) = record else {
        return "[noyau] the kernel runs in its kernelspec's own environment \
                (no [environment] in ./noyau.toml, no NOYAU_ENV, no `%noyau env SPEC` cell)\n"
            .into();
    };
    let mut shown = record.clone();
    if let Some(o) = shown.as_object_mut() {
        // The full lock and freeze are long; `%noyau env lock` writes them.
        for k in ["lock", "freeze"] {
            if let Some(v) = o.get(k).and_then(|v| v.as_str()) {
                let n = v.lines().count();
                o.insert(k.into(), Value::String(format!("({n} lines)")));
            }
        }
    }
    format!(
        "{}\n",
        serde_json::to_string_pretty(&shown).unwrap_or_default()
    )
}

/// `%noyau env lock`: writes the resolved lock to `noyau.lock` in `dir`,
/// the notebook's directory as anchored: written beneath the directory
/// held, never where its path leads now (a directory others can rename
/// could have been swapped for a link to a trusted project of the
/// user's, whose next run would install these pins).
pub fn lock(record: Option<&Value>, dir: &ProjectDir) -> Result<String, MagicError> {
    let lock = record
        .and_then(|r| r.get("lock"))
        .and_then(|l| l.as_str())
        .ok_or_else(|| {
            MagicError::Env(
                "this kernel's environment has no lock (no [environment], or a kind without one)"
                    .into(),
            )
        })?;
    // The kernel's directory may be shared: a link planted at the name is
    // replaced, never written through.
    noyau_trust::replace_at(dir, "noyau.lock", lock.as_bytes(), 0o644)
        .map_err(|e| MagicError::Env(e.to_string()))?;
    Ok(format!(
        "[noyau] wrote {} ({} lines); `lock_file = \"noyau.lock\"` under [environment] in noyau.toml reproduces it\n",
        dir.join("noyau.lock").display(),
        lock.lines().count()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_abridges_and_lock_writes() {
        let rec = serde_json::json!({"kind": "python", "lock": "a==1\nb==2\n"});
        assert!(show(Some(&rec)).contains("\"lock\": \"(2 lines)\""));
        assert!(show(None).contains("kernelspec's own environment"));
        let d = tempfile::tempdir().unwrap();
        let dir = ProjectDir::open(d.path()).unwrap();
        assert!(lock(Some(&rec), &dir).unwrap().contains("(2 lines)"));
        assert_eq!(
            std::fs::read_to_string(d.path().join("noyau.lock")).unwrap(),
            "a==1\nb==2\n"
        );
        assert_eq!(lock(None, &dir).unwrap_err().ename(), "NoyauEnvError");
    }

    /// The kernel's directory may be shared: a link another user planted
    /// at `noyau.lock` (or at the temporary name an older noyau used) is
    /// replaced, and the file it leads to left as it was.
    #[test]
    fn lock_never_writes_through_a_planted_link() {
        let rec = serde_json::json!({"kind": "python", "lock": "a==1\n"});
        let d = tempfile::tempdir().unwrap();
        let canary = d.path().join("authorized_keys");
        std::fs::write(&canary, "the user's key\n").unwrap();
        for name in ["noyau.lock", "noyau.lock.tmp"] {
            std::os::unix::fs::symlink(&canary, d.path().join(name)).unwrap();
        }
        lock(Some(&rec), &ProjectDir::open(d.path()).unwrap()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&canary).unwrap(),
            "the user's key\n"
        );
        let written = d.path().join("noyau.lock");
        assert!(std::fs::symlink_metadata(&written).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&written).unwrap(), "a==1\n");
    }

    /// The lock goes into the notebook's directory as anchored, even after
    /// its path was swapped for a link to another directory (a trusted
    /// project of the user's), which is left as it was.
    #[test]
    fn lock_goes_into_the_anchored_directory_not_a_swapped_in_one() {
        let rec = serde_json::json!({"kind": "python", "lock": "mallory==6.6.6\n"});
        let d = tempfile::tempdir().unwrap();
        let (proj, trusted) = (d.path().join("proj"), d.path().join("trusted"));
        std::fs::create_dir(&proj).unwrap();
        std::fs::create_dir(&trusted).unwrap();
        let dir = ProjectDir::open(&proj).unwrap();
        std::fs::rename(&proj, d.path().join("proj.x")).unwrap();
        std::os::unix::fs::symlink(&trusted, &proj).unwrap();
        lock(Some(&rec), &dir).unwrap();
        assert!(
            !trusted.join("noyau.lock").exists(),
            "written into the swapped-in directory"
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("proj.x/noyau.lock")).unwrap(),
            "mallory==6.6.6\n"
        );
    }
}
