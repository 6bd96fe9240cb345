//! `guix`: `guix time-machine -C channels.scm -- shell -m manifest.scm
//! [--container …] -- KERNEL…`, recording `guix describe` for the pinned
//! channels. Under `isolation = "container"` Guix's own container is used
//! (instead of bubblewrap), sharing the notebook's and runtime directories
//! and the network only when `network = true`.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::{cmd, EnvError, EnvSpec, Isolation};

/// `guix time-machine -C CH --` (or just `guix`, without channels).
fn prefix(spec: &EnvSpec) -> Vec<String> {
    let mut v = vec!["guix".to_string()];
    if let Some(ch) = &spec.channels {
        v.extend([
            "time-machine".into(),
            "-C".into(),
            ch.display().to_string(),
            "--".into(),
        ]);
    }
    v
}

pub fn wrap(spec: &EnvSpec, runtime_dir: &Path, argv: Vec<String>) -> Vec<String> {
    let mut v = prefix(spec);
    v.push("shell".into());
    if let Some(m) = &spec.manifest {
        v.extend(["-m".into(), m.display().to_string()]);
    }
    v.extend(spec.packages.iter().cloned());
    if spec.isolation == Isolation::Container {
        v.push("--container".into());
        if spec.network {
            v.push("--network".into());
        }
        v.push(format!("--share={}", spec.notebook_dir().display()));
        v.push(format!("--share={}", runtime_dir.display()));
        if let Some(s) = &spec.scratch {
            v.push(format!("--share={}", s.display()));
        }
    }
    v.push("--".into());
    v.extend(argv);
    v
}

pub fn record(spec: &EnvSpec, progress: crate::Progress<'_>) -> Result<Value, EnvError> {
    let mut argv = prefix(spec);
    argv.extend(["describe".into(), "-f".into(), "channels".into()]);
    progress(&format!("pinning Guix: {}", argv.join(" ")));
    let describe = cmd::run(
        Command::new(&argv[0]).args(&argv[1..]),
        "`guix describe` failed (is Guix installed where the kernel runs?)",
        progress,
    )?;
    let file_hash = |p: &Option<std::path::PathBuf>| -> Result<Option<String>, EnvError> {
        match p {
            None => Ok(None),
            Some(p) => std::fs::read(p)
                .map(|b| Some(crate::sha256_hex(&b)))
                .map_err(|e| EnvError::Invalid(format!("cannot read {}: {e}", p.display()))),
        }
    };
    Ok(json!({
        "kind": "guix",
        "describe": describe,
        "channels_sha256": file_hash(&spec.channels)?,
        "manifest_sha256": file_hash(&spec.manifest)?,
        "lock": describe,
        "lock_sha256": crate::sha256_hex(describe.as_bytes()),
    }))
}
