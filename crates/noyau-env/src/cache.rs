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
//!
//! Trust: a cache may be shared (a group-writable directory, a site's
//! cache), so anyone who can write there could plant an entry whose venv
//! runs their code in every kernel that uses it. An entry, its record and
//! its lock file are used only when they are what they claim (a directory,
//! regular files, no symlink), owned by the user or by the owner of the
//! cache's root (the site's account), and writable by no one else
//! ([`Untrusted`] otherwise; `realise` then builds in the user's own cache,
//! [`private_root`], and says so). A build's directory is 0700 until it
//! is sealed, before it is renamed into place: its top made 0755, group and
//! other write bits cleared throughout, whatever the builder's umask, each
//! on what was opened without following a symlink.
//!
//! Without a home (no absolute `XDG_CACHE_HOME` nor `HOME`: a job or a
//! service started with an empty environment), the user's cache is under
//! `/tmp/noyau-cache-EUID` ([`tmp_cache_home`]), which anyone may have made
//! first to have their entries trusted as the cache's owner's: nothing in
//! a cache under it is trusted or made until it is checked the user's only
//! (0700, not a link; [`ensure_home`]).
//!
//! A site cache (`NOYAU_ENV_SITE_CACHE`, [`Cache::site`]) is built by an
//! admin and only read by users: there, only the owner of its root is
//! trusted (not the user), and it is looked in before the user's own.
//!
//! In use: whoever runs a kernel in an entry holds a shared `flock` on
//! `KEY.lock` ([`Cache::hold`]) for as long, and touches that file (its
//! mtime is the entry's last use); `noyau env gc` removes an entry only
//! when it can take the lock exclusively, so never one a kernel uses.

use noyau_vars::EnvVars;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};

use noyau_trust::{Expect, Mode, Owner, Problem, TrustError};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::EnvError;

/// The name of the completion marker (the record) inside an entry.
pub const MARKER: &str = "noyau-env.json";

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    /// The directory whose owner is trusted besides the user: the root
    /// itself, or the cache a sub-cache (`.tools`) lives in.
    anchor: PathBuf,
    /// A site's read-only cache: only the anchor's owner is trusted.
    site: bool,
}

/// Why something in the cache is not used.
#[derive(Debug, thiserror::Error)]
#[error("{} {why}: another user could have planted or changed it, so it is not used", path.display())]
pub struct Untrusted {
    pub path: PathBuf,
    pub why: String,
}

/// `NOYAU_ENV_CACHE`, else [`private_root`].
pub fn default_root() -> PathBuf {
    if let Some(p) = std::env::var_os(EnvVars::NOYAU_ENV_CACHE).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    private_root()
}

/// The site's read-only cache, `NOYAU_ENV_SITE_CACHE`, when set.
pub fn site_cache() -> Option<Cache> {
    std::env::var_os(EnvVars::NOYAU_ENV_SITE_CACHE)
        .filter(|v| !v.is_empty())
        .map(|p| Cache::site(PathBuf::from(p)))
}

/// The user's own cache: `CACHE_HOME/noyau/envs` ([`cache_home`]).
pub fn private_root() -> PathBuf {
    cache_home().join("noyau").join("envs")
}

/// `a` and `b` are one directory (the shared cache is the user's own).
pub(crate) fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The directory of the user's caches: `$XDG_CACHE_HOME`, else
/// `$HOME/.cache`, else [`tmp_cache_home`].
pub fn cache_home() -> PathBuf {
    cache_home_from(
        std::env::var_os(EnvVars::XDG_CACHE_HOME),
        std::env::var_os(EnvVars::HOME),
    )
}

/// [`cache_home`] from these variables' values. An empty or relative
/// value is none: it would put the cache under the working directory,
/// wherever that is (someone else's directory, whose owner the cache would
/// then trust).
fn cache_home_from(xdg_cache: Option<OsString>, home: Option<OsString>) -> PathBuf {
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    absolute(xdg_cache)
        .or_else(|| absolute(home).map(|h| h.join(".cache")))
        .unwrap_or_else(tmp_cache_home)
}

/// The cache home without a home: this user's directory in /tmp, where
/// anyone may have made it first ([`ensure_home`] checks it).
pub fn tmp_cache_home() -> PathBuf {
    std::env::temp_dir().join(format!("noyau-cache-{}", noyau_trust::me()))
}

/// When `path` is under [`tmp_cache_home`], makes that directory (0700)
/// and checks it is the user's only (not a link, nothing for others):
/// another user who made it first would own everything the user then
/// finds or makes there (a kernelspec, an environment). Elsewhere (a home's
/// cache, a cache someone configured), nothing is done.
pub fn ensure_home(path: &Path) -> Result<(), TrustError> {
    let home = tmp_cache_home();
    if path.starts_with(&home) {
        Expect::dir().make_dir(&home)?;
    }
    Ok(())
}

/// An exclusive (or, for [`Cache::hold`], shared) flock held until dropped.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// `flock(op)` on `file`, retried on EINTR; None when `op` has
    /// `LOCK_NB` and someone else holds the lock.
    fn lock(file: File, path: &Path, op: i32) -> Result<Option<FileLock>, EnvError> {
        loop {
            // SAFETY: flock on a descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Some(FileLock { _file: file }));
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) && op & libc::LOCK_NB != 0 {
                return Ok(None);
            }
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(EnvError::io(format!("locking {}", path.display()), err));
            }
        }
    }
}

impl Untrusted {
    pub(crate) fn refused(path: PathBuf, problem: Problem) -> Self {
        Untrusted {
            path,
            why: problem.to_string(),
        }
    }
}

impl From<TrustError> for EnvError {
    fn from(e: TrustError) -> Self {
        match e {
            TrustError::Io {
                action,
                path,
                source,
            } => EnvError::io(format!("cannot {action} {}", path.display()), source),
            TrustError::Refused { path, problem } => {
                EnvError::Untrusted(Untrusted::refused(path, problem))
            }
        }
    }
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Cache {
            anchor: root.clone(),
            root,
            site: false,
        }
    }

    /// A site's cache, read by users: only its root's owner is trusted.
    pub fn site(root: impl Into<PathBuf>) -> Self {
        Cache {
            site: true,
            ..Cache::new(root)
        }
    }

    /// True for a site's cache ([`Cache::site`]).
    pub fn is_site(&self) -> bool {
        self.site
    }

    /// A cache in `name` under this one, trusting the same owners.
    pub fn sub(&self, name: &str) -> Cache {
        Cache {
            root: self.root.join(name),
            anchor: self.anchor.clone(),
            site: self.site,
        }
    }

    /// A directory (or a regular file), not a symlink, owned by the user
    /// or by the owner of the cache's root (a site's account; in a site's
    /// cache, that owner only), and writable by no one else; refused
    /// when the cache is under a home in /tmp that is not the user's only.
    pub(crate) fn expect(&self, dir: bool) -> Result<Expect, TrustError> {
        ensure_home(&self.root)?;
        let me = noyau_trust::me();
        let owner = std::fs::metadata(&self.anchor).map_or(me, |m| m.uid());
        let owners = if self.site {
            Owner::Uid(owner, "the site cache's owner")
        } else {
            Owner::MeOr(owner, "the cache's owner")
        };
        let kind = if dir { Expect::dir() } else { Expect::file() };
        Ok(kind.owner(owners).mode(Mode::NoOthersWrite))
    }

    /// Checks one path ([`Cache::expect`]): missing is fine.
    pub(crate) fn check(&self, path: &Path, dir: bool) -> Result<(), Untrusted> {
        match self.expect(dir).and_then(|e| e.check(path)) {
            Err(TrustError::Refused { path, problem }) => Err(Untrusted::refused(path, problem)),
            _ => Ok(()),
        }
    }

    /// Opens (without following a symlink) or creates the lock file `path`,
    /// checked as [`Cache::check`] does.
    fn open_lock(&self, path: &Path) -> Result<File, EnvError> {
        let mut create = std::fs::OpenOptions::new();
        create.create(true).truncate(false).write(true).mode(0o644);
        Ok(self.expect(false)?.open_with(path, &mut create)?)
    }

    /// Checks an entry, its record and its lock file before any is used.
    pub fn check_entry(&self, key: &str) -> Result<(), Untrusted> {
        let entry = self.entry(key);
        self.check(&entry, true)?;
        self.check(&entry.join(MARKER), false)?;
        self.check(&self.root.join(format!("{key}.lock")), false)
    }

    /// Takes the build lock of `key`, checking the file that was opened.
    pub(crate) fn lock(&self, key: &str) -> Result<FileLock, EnvError> {
        let path = self.root.join(format!("{key}.lock"));
        FileLock::lock(self.open_lock(&path)?, &path, libc::LOCK_EX)
            .map(|l| l.expect("a blocking lock is always taken"))
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

    /// The record of a finished entry, if there is one we trust.
    pub fn lookup(&self, key: &str) -> Result<Option<Value>, Untrusted> {
        Ok(self
            .lookup_bytes(key)?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// The record's bytes (for its hash), checked as [`Cache::lookup`] does:
    /// a record naming another key (an entry renamed under this one by
    /// someone who may write the directory) is refused.
    pub fn lookup_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, Untrusted> {
        self.check_entry(key)?;
        let Ok(bytes) = std::fs::read(self.entry(key).join(MARKER)) else {
            return Ok(None);
        };
        let named = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("key").and_then(Value::as_str).map(str::to_string));
        match named {
            Some(k) if k != key => Err(Untrusted {
                path: self.entry(key),
                why: format!("holds the record of another entry ({k})"),
            }),
            _ => Ok(Some(bytes)),
        }
    }

    /// Marks `key` in use until the lock is dropped (a shared `flock` on
    /// its lock file, which `noyau env gc` must take exclusively), and
    /// records the use (the lock file's mtime) where we may. None when
    /// there is no lock file to hold and none can be made (a site's cache).
    pub fn hold(&self, key: &str) -> Result<Option<FileLock>, EnvError> {
        let path = self.root.join(format!("{key}.lock"));
        let file = match self.expect(false).and_then(|e| e.open(&path)) {
            Ok(f) => f,
            Err(e) if e.is_not_found() && !self.site => self.open_lock(&path)?,
            Err(TrustError::Refused { path, problem }) => {
                return Err(EnvError::Untrusted(Untrusted::refused(path, problem)))
            }
            Err(_) => return Ok(None),
        };
        // Only the owner may set the time; others' uses go unrecorded.
        let _ = file.set_modified(std::time::SystemTime::now());
        FileLock::lock(file, &path, libc::LOCK_SH)
    }

    /// The exclusive lock of `key` if nobody holds it (in use or building).
    pub(crate) fn try_exclusive(&self, key: &str) -> Result<Option<FileLock>, EnvError> {
        let path = self.root.join(format!("{key}.lock"));
        FileLock::lock(self.open_lock(&path)?, &path, libc::LOCK_EX | libc::LOCK_NB)
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
        if let Some(rec) = self.lookup(key)? {
            return Ok((entry, rec));
        }
        std::fs::create_dir_all(&self.root)
            .map_err(|e| EnvError::io(format!("creating the cache {}", self.root.display()), e))?;
        let waiting = std::time::Instant::now();
        let _lock = self.lock(key)?;
        if let Some(rec) = self.lookup(key)? {
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
        // 0700 while building, whatever the umask (002 in a group's cache):
        // no one else may change a build before it is sealed.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| EnvError::io(format!("creating {}", tmp.display()), e))?;
        let built = build(&tmp, progress).and_then(|record| {
            let text = serde_json::to_vec_pretty(&record).expect("a record serialises");
            write_marker(&tmp.join(MARKER), &text)?;
            seal(&tmp).map_err(|e| EnvError::io(format!("sealing {}", tmp.display()), e))?;
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

/// Writes the record as a new file (never through a link the build left
/// there), readable by the cache's users.
fn write_marker(path: &Path, text: &[u8]) -> Result<(), EnvError> {
    use std::io::Write;
    let mut new = std::fs::OpenOptions::new();
    new.write(true).create_new(true).mode(0o644);
    let mut f = Expect::file().mode(Mode::Any).open_with(path, &mut new)?;
    f.write_all(text)
        .map_err(|e| EnvError::io(format!("writing {}", path.display()), e))
}

/// Makes a finished build readable by the cache's users (its top 0755: a
/// site's cache is read by everyone) and clears group and other write bits
/// throughout, so what is shared cannot be changed by others. Each mode is
/// set on what was opened without following a symlink (a link swapped in
/// is left alone, never what it leads to).
fn seal(dir: &Path) -> std::io::Result<()> {
    let top = open_nofollow(dir)?.ok_or_else(|| std::io::Error::other("is a symlink"))?;
    if !top.metadata()?.is_dir() {
        return Err(std::io::Error::other("is not a directory"));
    }
    top.set_permissions(std::fs::Permissions::from_mode(0o755))?;
    for e in std::fs::read_dir(dir)? {
        seal_entry(&e?.path())?;
    }
    Ok(())
}

fn seal_entry(path: &Path) -> std::io::Result<()> {
    let Some(file) = open_nofollow(path)? else {
        return Ok(());
    };
    let meta = file.metadata()?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & !0o022))?;
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(path)? {
            seal_entry(&e?.path())?;
        }
    }
    Ok(())
}

/// `path` opened for its descriptor only (no blocking on a FIFO), or None
/// for a symlink or a socket (which cannot be opened; neither has modes
/// that matter).
fn open_nofollow(path: &Path) -> std::io::Result<Option<File>> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    match opened {
        Ok(f) => Ok(Some(f)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO)) => Ok(None),
        Err(e) => Err(e),
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
    fn a_build_is_private_until_sealed_and_its_record_never_written_through_a_link() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path().join("c"));
        let mut p = |_: &str| {};
        let (entry, _) = cache
            .get_or_build("k", &mut p, |dir, _| {
                let mode = std::fs::metadata(dir).unwrap().mode() & 0o777;
                assert_eq!(mode, 0o700, "a build in progress is ours only");
                std::fs::write(dir.join("open"), "x").unwrap();
                std::fs::set_permissions(dir.join("open"), PermissionsExt::from_mode(0o666))
                    .unwrap();
                Ok(json!({"key": "k"}))
            })
            .unwrap();
        assert_eq!(std::fs::metadata(&entry).unwrap().mode() & 0o777, 0o755);
        assert_eq!(
            std::fs::metadata(entry.join("open")).unwrap().mode() & 0o777,
            0o644
        );
        // A link the build left where the record goes: refused, and what it
        // leads to neither written nor chmodded.
        let outside = root.path().join("outside");
        std::fs::write(&outside, "theirs").unwrap();
        std::fs::set_permissions(&outside, PermissionsExt::from_mode(0o666)).unwrap();
        let mut p = |_: &str| {};
        let e = cache
            .get_or_build("j", &mut p, |dir, _| {
                std::os::unix::fs::symlink(&outside, dir.join(MARKER)).unwrap();
                std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
                Ok(json!({"key": "j"}))
            })
            .unwrap_err();
        assert!(e.to_string().contains(MARKER), "{e}");
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "theirs");
        assert_eq!(std::fs::metadata(&outside).unwrap().mode() & 0o777, 0o666);
    }

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
        assert_eq!(cache.lookup("k").unwrap(), Some(json!({"ok": 1})));
        assert!(
            lines.iter().any(|l| l.contains("no completion record")),
            "{lines:?}"
        );
    }

    fn entries_made_by(cache: &Cache, key: &str, record: Value) {
        let dir = cache.entry(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MARKER), record.to_string()).unwrap();
    }

    #[test]
    fn entries_others_could_have_planted_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let mut quiet = |_: &str| {};
        // Group-writable: anyone in the group could have changed it.
        entries_made_by(&cache, "open", json!({"planted": 1}));
        std::fs::set_permissions(cache.entry("open"), std::fs::Permissions::from_mode(0o775))
            .unwrap();
        let e = cache.lookup("open").unwrap_err();
        assert!(e.to_string().contains("writable by its group"), "{e}");
        let e = cache
            .get_or_build("open", &mut quiet, |_, _| Ok(json!({})))
            .unwrap_err();
        assert!(matches!(e, EnvError::Untrusted(_)), "{e}");
        // A symlink to an entry elsewhere, and a lock file that is a symlink.
        let elsewhere = tempfile::tempdir().unwrap();
        entries_made_by(&Cache::new(elsewhere.path()), "k", json!({"planted": 2}));
        std::os::unix::fs::symlink(elsewhere.path().join("k"), cache.entry("link")).unwrap();
        let e = cache.lookup("link").unwrap_err();
        assert!(e.to_string().contains("is a symlink"), "{e}");
        std::os::unix::fs::symlink(elsewhere.path().join("x"), root.path().join("l.lock")).unwrap();
        let e = cache
            .get_or_build("l", &mut quiet, |_, _| Ok(json!({})))
            .unwrap_err();
        assert!(e.to_string().contains("l.lock is a symlink"), "{e}");
        assert!(!elsewhere.path().join("x").exists());
    }

    #[test]
    fn builds_are_sealed_against_group_and_other_writes() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let (path, _) = cache
            .get_or_build("k", &mut |_: &str| {}, |dir, _| {
                let sub = dir.join("venv/lib");
                std::fs::create_dir_all(&sub).unwrap();
                std::fs::write(sub.join("m.py"), "x").unwrap();
                for p in [
                    dir.to_path_buf(),
                    dir.join("venv"),
                    sub.clone(),
                    sub.join("m.py"),
                ] {
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
                }
                Ok(json!({"ok": 1}))
            })
            .unwrap();
        for p in [path.clone(), path.join("venv"), path.join("venv/lib/m.py")] {
            let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o755, "{}", p.display());
        }
        assert_eq!(cache.lookup("k").unwrap(), Some(json!({"ok": 1})));
    }
}
