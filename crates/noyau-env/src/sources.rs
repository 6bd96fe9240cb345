//! Where a spec comes from, and how the sources combine.
//!
//! Later wins, key by key: `[environment]` in `noyau.toml` in the
//! notebook's directory, then `metadata.noyau.environment` in the notebook,
//! then `--env`. `--env` takes either an inline table, TOML
//! (`--env '{requirements = ["six==1.16.0"]}'`) or JSON
//! (`--env '{"requirements": ["six==1.16.0"]}'`), or a path to a file: a
//! `.json` file holding the table, or a TOML file holding it at top level
//! or under `[environment]` (so `--env other/noyau.toml` works).
//!
//! Paths inside each source are made absolute against that source's
//! directory (the notebook's directory for the first two, the file's for an
//! `--env` file, the current directory for an inline table) before merging.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::spec::{absolute, PATH_KEYS, PATH_LIST_KEYS};
use crate::{EnvError, EnvSpec};

/// One source's table, with the directory its relative paths are based on.
#[derive(Debug, Clone)]
pub struct Source {
    pub what: String,
    pub table: Map<String, Value>,
    pub base: PathBuf,
}

/// The `[environment]` table of `dir/noyau.toml`, if there is one.
pub fn from_noyau_toml(dir: &Path) -> Result<Option<Source>, EnvError> {
    let path = dir.join("noyau.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EnvError::io(format!("reading {}", path.display()), e)),
    };
    let doc: toml::Table =
        toml::from_str(&text).map_err(|e| EnvError::Invalid(format!("{}: {e}", path.display())))?;
    match doc.get("environment") {
        None => Ok(None),
        Some(v) => Ok(Some(Source {
            what: format!("[environment] in {}", path.display()),
            table: as_table(toml_to_json(v.clone()), &path.display().to_string())?,
            base: dir.to_path_buf(),
        })),
    }
}

/// `metadata.noyau.environment` of a notebook's metadata, if present.
pub fn from_metadata(metadata: &Value, notebook_dir: &Path) -> Result<Option<Source>, EnvError> {
    match metadata.get("noyau").and_then(|n| n.get("environment")) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            // A recorded environment (an earlier run's output) carries the
            // spec under "spec"; a hand-written one is the spec itself.
            // Its lock comes along, so running an output notebook again
            // reproduces the environment it was run in.
            let mut table = match v.get("spec") {
                Some(spec) => {
                    let mut t = as_table(spec.clone(), "metadata.noyau.environment.spec")?;
                    if let Some(Value::String(lock)) = v.get("lock") {
                        if t.get("kind").and_then(Value::as_str).unwrap_or("python") == "python"
                            && !t.contains_key("lock_file")
                        {
                            t.insert("lock".into(), Value::String(lock.clone()));
                        }
                    }
                    t
                }
                None => as_table(v.clone(), "metadata.noyau.environment")?,
            };
            table.remove("notebook_dir");
            Ok(Some(Source {
                what: "metadata.noyau.environment in the notebook".into(),
                table,
                base: notebook_dir.to_path_buf(),
            }))
        }
    }
}

/// The value of `--env`: an inline TOML/JSON table, or a file.
pub fn from_cli(arg: &str, cwd: &Path) -> Result<Source, EnvError> {
    let t = arg.trim();
    if t.starts_with('{') {
        let v = match serde_json::from_str::<Value>(t) {
            Ok(v) => v,
            Err(_) => {
                let doc: toml::Table =
                    toml::from_str(&format!("environment = {t}")).map_err(|e| {
                        EnvError::Invalid(format!(
                            "--env {t:?} is neither a JSON object nor a TOML inline table: {e}"
                        ))
                    })?;
                toml_to_json(doc["environment"].clone())
            }
        };
        return Ok(Source {
            what: "--env".into(),
            table: as_table(v, "--env")?,
            base: cwd.to_path_buf(),
        });
    }
    let path = absolute(cwd, Path::new(t));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        EnvError::Invalid(format!(
            "--env {t:?}: not an inline table (starting with `{{`) and not a readable file: {e}"
        ))
    })?;
    let base = path.parent().unwrap_or(cwd).to_path_buf();
    let v = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str::<Value>(&text)
            .map_err(|e| EnvError::Invalid(format!("{}: {e}", path.display())))?
    } else {
        let doc: toml::Table = toml::from_str(&text)
            .map_err(|e| EnvError::Invalid(format!("{}: {e}", path.display())))?;
        toml_to_json(
            doc.get("environment")
                .cloned()
                .unwrap_or(toml::Value::Table(doc)),
        )
    };
    Ok(Source {
        what: format!("--env {}", path.display()),
        table: as_table(v, &path.display().to_string())?,
        base,
    })
}

/// Merges sources (later wins per key) into one normalised spec, with
/// `notebook_dir` set; None when no source says anything.
pub fn merge(sources: &[Source], notebook_dir: &Path) -> Result<Option<EnvSpec>, EnvError> {
    if sources.is_empty() {
        return Ok(None);
    }
    let mut merged = Map::new();
    for s in sources {
        for (k, v) in resolve_paths(&s.table, &s.base) {
            merged.insert(k, v);
        }
    }
    merged
        .entry("notebook_dir")
        .or_insert_with(|| Value::String(notebook_dir.display().to_string()));
    let names: Vec<&str> = sources.iter().map(|s| s.what.as_str()).collect();
    let spec = EnvSpec::from_value(Value::Object(merged))
        .and_then(EnvSpec::normalise)
        .map_err(|e| match e {
            EnvError::Invalid(m) => EnvError::Invalid(format!("{m} (from {})", names.join(", "))),
            other => other,
        })?;
    Ok(Some(spec))
}

/// Everything `noyau run` looks at, in order: noyau.toml, the notebook's
/// metadata, `--env`.
pub fn for_notebook(
    notebook_dir: &Path,
    metadata: Option<&Value>,
    cli: Option<&str>,
    cwd: &Path,
) -> Result<Option<EnvSpec>, EnvError> {
    let mut sources = Vec::new();
    sources.extend(from_noyau_toml(notebook_dir)?);
    if let Some(m) = metadata {
        sources.extend(from_metadata(m, notebook_dir)?);
    }
    if let Some(c) = cli {
        sources.push(from_cli(c, cwd)?);
    }
    merge(&sources, notebook_dir)
}

fn resolve_paths(table: &Map<String, Value>, base: &Path) -> Map<String, Value> {
    let abs = |v: &Value| match v {
        Value::String(s) => Value::String(absolute(base, Path::new(s)).display().to_string()),
        other => other.clone(),
    };
    table
        .iter()
        .map(|(k, v)| {
            let v = if PATH_KEYS.contains(&k.as_str()) {
                abs(v)
            } else if PATH_LIST_KEYS.contains(&k.as_str()) {
                match v {
                    Value::Array(a) => Value::Array(a.iter().map(abs).collect()),
                    other => other.clone(),
                }
            } else if k == "image" {
                // a local image file, not a URI
                match v {
                    Value::String(s) if !s.contains("://") => abs(v),
                    other => other.clone(),
                }
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

fn as_table(v: Value, what: &str) -> Result<Map<String, Value>, EnvError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(EnvError::Invalid(format!(
            "{what} must be a table of keys, not {other}"
        ))),
    }
}

fn toml_to_json(v: toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn later_sources_win_key_by_key_and_paths_are_resolved() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("noyau.toml"),
            "[environment]\nrequirements = [\"six==1.16.0\"]\nisolation = \"container\"\nscratch = \"work\"\n",
        )
        .unwrap();
        let meta = json!({"noyau": {"environment": {"python": "3.11"}}});
        let spec = for_notebook(
            dir.path(),
            Some(&meta),
            Some(r#"{isolation = "none", network = true}"#),
            Path::new("/elsewhere"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(spec.requirements, vec!["six==1.16.0"]);
        assert_eq!(spec.python.as_deref(), Some("3.11"));
        assert_eq!(spec.isolation, crate::Isolation::None);
        assert!(spec.network);
        assert_eq!(spec.scratch, Some(dir.path().join("work")));
        assert_eq!(spec.notebook_dir.as_deref(), Some(dir.path()));
    }

    #[test]
    fn cli_accepts_json_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = from_cli(r#"{"requirements": ["idna"]}"#, dir.path()).unwrap();
        assert_eq!(s.table["requirements"], json!(["idna"]));
        std::fs::write(
            dir.path().join("e.toml"),
            "[environment]\nprefix = \"venv\"\n",
        )
        .unwrap();
        let s = from_cli("e.toml", dir.path()).unwrap();
        let spec = merge(&[s], dir.path()).unwrap().unwrap();
        assert_eq!(spec.prefix, Some(dir.path().join("venv")));
        let e = from_cli("nope.toml", dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a readable file"), "{e}");
        assert!(for_notebook(dir.path(), None, None, dir.path())
            .unwrap()
            .is_none());
    }
}
