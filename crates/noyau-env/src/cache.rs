//! A content-addressed cache of built environments, safe for many agents
//! sharing one filesystem.
//!
//! Layout under the root: `KEY/` a finished entry, whose `noyau-env.json`
//! (the record) is its completion marker and is written inside the
//! temporary directory before the rename; `KEY.lock` the lock file;
//! `.tmp-KEY-PID-N/` a build in progress. Lookup without a lock is a
//! single `stat` of the marker (a finished entry never changes). A builder
//! takes `flock(KEY.lock, LOCK_EX)`, looks again (someone else may have
//! finished while it waited), removes leftovers of killed builds (temporary
//! directories, an entry without marker), builds in a fresh temporary
//! directory and renames it into place. A failed build removes its
//! temporary directory, so a failure leaves nothing behind.
//!
//! `flock` is honoured across nodes on NFSv4 and on Lustre/GPFS mounted
//! with locking enabled; on a filesystem without it, `NOYAU_ENV_CACHE`
//! should point to node-local storage.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::EnvError;

/// The name of the completion marker (the record) inside an entry.
pub const MARKER: &str = "noyau-env.json";

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// `NOYAU_ENV_CACHE`, else `$XDG_CACHE_HOME/noyau/envs`, else `~/.cache/noyau/envs`.
pub fn default_root() -> PathBuf {
    if let Some(p) = std::env::var_os("NOYAU_ENV_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| std::env::temp_dir().join("noyau-cache"))
        .join("noyau")
        .join("envs")
}

/// An exclusive flock held until dropped.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<FileLock, EnvError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| EnvError::io(format!("opening the lock file {}", path.display()), e))?;
        loop {
            // SAFETY: flock on a descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(EnvError::io(format!("locking {}", path.display()), err));
            }
        }
    }
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    pub fn at_default() -> Self {
        Cache::new(default_root())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn entry(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The record of a finished entry, if there is one.
    pub fn lookup(&self, key: &str) -> Option<Value> {
        let text = std::fs::read(self.entry(key).join(MARKER)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The finished entry for `key`, built by `build` if nobody has. `build`
    /// fills the directory it is given and returns the record, which is
    /// written as the completion marker. Returns the entry's path and record.
    pub fn get_or_build(
        &self,
        key: &str,
        progress: crate::Progress<'_>,
        build: impl FnOnce(&Path, crate::Progress<'_>) -> Result<Value, EnvError>,
    ) -> Result<(PathBuf, Value), EnvError> {
        let entry = self.entry(key);
        if let Some(rec) = self.lookup(key) {
            return Ok((entry, rec));
        }
        std::fs::create_dir_all(&self.root)
            .map_err(|e| EnvError::io(format!("creating the cache {}", self.root.display()), e))?;
        let lock_path = self.root.join(format!("{key}.lock"));
        let waiting = std::time::Instant::now();
        let _lock = FileLock::acquire(&lock_path)?;
        if let Some(rec) = self.lookup(key) {
            if waiting.elapsed().as_millis() > 100 {
                progress(&format!(
                    "environment {key} was built by another job meanwhile; using it"
                ));
            }
            return Ok((entry, rec));
        }
        self.remove_leftovers(key, progress)?;
        let tmp = self
            .root
            .join(format!(".tmp-{key}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir(&tmp)
            .map_err(|e| EnvError::io(format!("creating {}", tmp.display()), e))?;
        let built = build(&tmp, progress).and_then(|record| {
            let text = serde_json::to_vec_pretty(&record).expect("a record serialises");
            std::fs::write(tmp.join(MARKER), text)
                .map_err(|e| EnvError::io(format!("writing {}", tmp.join(MARKER).display()), e))?;
            std::fs::rename(&tmp, &entry)
                .map_err(|e| EnvError::io(format!("moving the build to {}", entry.display()), e))?;
            Ok(record)
        });
        match built {
            Ok(record) => Ok((entry, record)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Removes what killed builds of `key` left (call with the lock held).
    fn remove_leftovers(&self, key: &str, progress: crate::Progress<'_>) -> Result<(), EnvError> {
        let entry = self.entry(key);
        if entry.exists() {
            progress(&format!(
                "{} has no completion record (a build was killed?); removing it and building again",
                entry.display()
            ));
            std::fs::remove_dir_all(&entry)
                .map_err(|e| EnvError::io(format!("removing {}", entry.display()), e))?;
        }
        let prefix = format!(".tmp-{key}-");
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    progress(&format!(
                        "removing {} left by a killed build",
                        e.path().display()
                    ));
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    t ^ (N.fetch_add(1, Ordering::Relaxed) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_failed_build_leaves_nothing_and_a_half_built_entry_is_rebuilt() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let mut lines = Vec::new();
        let mut p = |l: &str| lines.push(l.to_string());
        let e = cache
            .get_or_build("k", &mut p, |dir, _| {
                std::fs::write(dir.join("half"), "x").unwrap();
                Err(EnvError::Build {
                    summary: "no".into(),
                    output: "resolver said no".into(),
                })
            })
            .unwrap_err();
        assert!(e.to_string().contains("resolver said no"));
        let left: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert!(left.is_empty(), "{left:?}");

        // What a killed build leaves: an entry without marker, a temp dir.
        std::fs::create_dir_all(root.path().join("k/venv")).unwrap();
        std::fs::create_dir_all(root.path().join(".tmp-k-999-1/venv")).unwrap();
        let (path, rec) = cache
            .get_or_build("k", &mut p, |dir, _| {
                std::fs::write(dir.join("done"), "x").unwrap();
                Ok(json!({"ok": 1}))
            })
            .unwrap();
        assert_eq!(rec, json!({"ok": 1}));
        assert!(path.join("done").exists() && !path.join("venv").exists());
        assert!(!root.path().join(".tmp-k-999-1").exists());
        assert_eq!(cache.lookup("k"), Some(json!({"ok": 1})));
        assert!(
            lines.iter().any(|l| l.contains("no completion record")),
            "{lines:?}"
        );
    }
}
