//! The cache as a user and an admin see it: what is there ([`list`]) and
//! removing what has not been used for a while ([`gc`]).
//!
//! An entry's last use is its lock file's mtime, which every kernel that
//! runs in it touches ([`Cache::hold`]); an entry whose lock file is older
//! than the threshold is removed only when its lock can be taken
//! exclusively, so never while a kernel holds it or a build fills it. It
//! is renamed out of the way first (`.tmp-KEY-gc-…`, which a later build
//! of the same key would also clear), so no one finds half of it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::cache::{Cache, MARKER};
use crate::data::{self, Store};
use crate::EnvError;

/// One built environment.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub key: String,
    pub path: PathBuf,
    pub size: u64,
    pub last_use: SystemTime,
    pub record: Value,
}

impl EntryInfo {
    /// `python 3.11.2: six==1.16.0, numpy` or `python 3.11.2: a lock of 12 packages`.
    pub fn summary(&self) -> String {
        summary(&self.record)
    }
}

/// What a record says it was built from, in one line.
pub fn summary(record: &Value) -> String {
    let spec = &record["spec"];
    let kind = record["kind"].as_str().unwrap_or("?");
    let version = record["python"].as_str().unwrap_or("");
    let reqs = spec["requirements"]
        .as_array()
        .or(record["requirements"].as_array());
    let what = match reqs {
        Some(r) if !r.is_empty() => r
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        _ => {
            let n = record["lock"]
                .as_str()
                .map(|l| l.lines().filter(|l| l.contains("==")).count())
                .unwrap_or(0);
            format!("a lock of {n} packages")
        }
    };
    format!("{kind} {version}: {what}")
}

/// The finished entries of `cache` (not what it holds besides: uv, data).
pub fn list(cache: &Cache) -> Vec<EntryInfo> {
    let Ok(rd) = std::fs::read_dir(cache.root()) else {
        return Vec::new();
    };
    let mut out: Vec<EntryInfo> = rd
        .flatten()
        .filter_map(|e| {
            let key = e.file_name().to_string_lossy().into_owned();
            if key.starts_with('.') || !e.path().join(MARKER).is_file() {
                return None;
            }
            let record = cache.lookup(&key).ok().flatten()?;
            Some(EntryInfo {
                size: size_of(&e.path()),
                last_use: last_use(cache.root(), &key, &e.path()),
                path: e.path(),
                key,
                record,
            })
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.last_use));
    out
}

/// The lock file's mtime (touched at each use), else the record's.
fn last_use(root: &Path, key: &str, entry: &Path) -> SystemTime {
    std::fs::metadata(root.join(format!("{key}.lock")))
        .and_then(|m| m.modified())
        .or_else(|_| std::fs::metadata(entry.join(MARKER)).and_then(|m| m.modified()))
        .unwrap_or(std::time::UNIX_EPOCH)
}

/// Bytes under `path`, symlinks not followed.
pub fn size_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.size();
    }
    std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| size_of(&e.path())).sum())
        .unwrap_or(0)
}

/// What [`gc`] did (or, dry, would do).
#[derive(Debug, Default)]
pub struct GcReport {
    /// (what, bytes): an environment key or `data HEX (name)`.
    pub removed: Vec<(String, u64)>,
    /// Unused for long enough, but held by a kernel (or being built).
    pub in_use: Vec<String>,
    pub kept: usize,
}

/// Removes the entries and data files of `cache` unused for `older_than`,
/// except those in use; with `dry_run`, only says which.
pub fn gc(cache: &Cache, older_than: Duration, dry_run: bool) -> Result<GcReport, EnvError> {
    let now = SystemTime::now();
    let old = |t: SystemTime| now.duration_since(t).unwrap_or_default() > older_than;
    let mut report = GcReport::default();
    for e in list(cache) {
        if !old(e.last_use) {
            report.kept += 1;
            continue;
        }
        let Some(_lock) = cache.try_exclusive(&e.key)? else {
            report.in_use.push(e.key);
            continue;
        };
        if !dry_run {
            let aside = cache
                .root()
                .join(format!(".tmp-{}-gc-{}", e.key, std::process::id()));
            std::fs::rename(&e.path, &aside)
                .and_then(|()| std::fs::remove_dir_all(&aside))
                .map_err(|err| EnvError::io(format!("removing {}", e.path.display()), err))?;
        }
        report.removed.push((e.key, e.size));
    }
    let store = Store::of(cache);
    for f in data::list(&store) {
        let what = format!(
            "data {} ({})",
            f.sha256,
            f.about["name"].as_str().unwrap_or("?")
        );
        if !old(f.last_use) {
            report.kept += 1;
        } else if store.remove_unused(&f.sha256, dry_run)? {
            report.removed.push((what, f.size));
        } else {
            report.in_use.push(what);
        }
    }
    Ok(report)
}

/// `30d`, `12h`, `90m`, `45s`, `2w`: a duration for `--older-than`.
pub fn parse_age(s: &str) -> Result<Duration, EnvError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" | "" => 86400,
        "w" => 7 * 86400,
        _ => 0,
    };
    match n.parse::<u64>() {
        Ok(n) if secs > 0 => Ok(Duration::from_secs(n * secs)),
        _ => Err(EnvError::Invalid(format!(
            "{s:?} is not an age: a number and s, m, h, d or w (30d, 12h)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages() {
        assert_eq!(super::parse_age("30d").unwrap().as_secs(), 30 * 86400);
        assert_eq!(super::parse_age("90m").unwrap().as_secs(), 5400);
        assert_eq!(super::parse_age("7").unwrap().as_secs(), 7 * 86400);
        assert!(super::parse_age("3y").is_err() && super::parse_age("d").is_err());
    }
}
