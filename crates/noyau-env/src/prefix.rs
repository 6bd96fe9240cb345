//! `prefix`: an existing venv or conda environment, used as it is and
//! recorded by its package list and a hash of that list.
//!
//! The list is read from the filesystem, without running any tool: a conda
//! environment's `conda-meta/*.json` names (name-version-build), else the
//! `*.dist-info` directories of the venv's site-packages (`name==version`).

use std::path::Path;

use serde_json::{json, Value};

use crate::EnvError;

pub fn packages(prefix: &Path) -> Result<Vec<String>, EnvError> {
    if !prefix.is_dir() {
        return Err(EnvError::Invalid(format!(
            "prefix {} is not a directory",
            prefix.display()
        )));
    }
    let mut out = Vec::new();
    let meta = prefix.join("conda-meta");
    if meta.is_dir() {
        for e in std::fs::read_dir(&meta)
            .map_err(|e| EnvError::io(format!("reading {}", meta.display()), e))?
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = n.strip_suffix(".json") {
                out.push(stem.to_string());
            }
        }
    } else {
        for lib in ["lib", "lib64"] {
            let Ok(rd) = std::fs::read_dir(prefix.join(lib)) else {
                continue;
            };
            for py in rd.flatten() {
                let sp = py.path().join("site-packages");
                let Ok(rd) = std::fs::read_dir(&sp) else {
                    continue;
                };
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if let Some(stem) = n.strip_suffix(".dist-info") {
                        if let Some((name, version)) = stem.rsplit_once('-') {
                            out.push(format!("{name}=={version}"));
                        }
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

pub fn record(prefix: &Path) -> Result<Value, EnvError> {
    let list = packages(prefix)?;
    let text = list.join("\n");
    Ok(json!({
        "kind": "prefix",
        "prefix": prefix.display().to_string(),
        "packages": list,
        "packages_sha256": crate::sha256_hex(text.as_bytes()),
    }))
}
