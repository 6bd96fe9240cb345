//! Data files pinned by their sha256: declared by a notebook, fetched once
//! on the submitting host into a content-addressed store in the shared
//! cache, and shown to the kernel read-only by name.
//!
//! Declarations ([`declared`]), later wins by name: `[data]` in the
//! notebook's `noyau.toml` (`NAME = { url = "…", sha256 = "…" }`), the
//! notebook's `metadata.noyau.data` (a list of `{url, sha256, name}`), and
//! `%noyau data URL --sha256 HEX [--name N]` lines in its cells
//! ([`parse_magic`]). A URL is `http(s)://` (through the site's proxy,
//! [`crate::index::Network`]), `file://`, or a local path (relative to the
//! notebook's directory).
//!
//! The store ([`Store`], `CACHE/data/`): `sha256/HEX` is the file (0444),
//! `sha256/HEX.json` says what it is (URL without credentials, names, size,
//! when fetched; written before the file is renamed in, so the file's
//! presence means complete); `HEX.lock` serialises fetchers of one hash,
//! so however many kernels and sweep points ask at once it is fetched
//! once; `.part-HEX` is a download in progress, continued with an HTTP
//! `Range` request after an interruption. The whole file is hashed before
//! it is renamed in: a hash other than the declared one is an error naming
//! the URL and both hashes, and the bytes are removed (a resumed download
//! is tried once more from the start first, in case the part was stale).
//! Only a file whose name is its hash is ever used, and only when the
//! cache's trust rules hold (owner, mode, no symlink: [`crate::cache`])
//! and its `HEX.json` names that hash and its size; a site's store
//! (`NOYAU_ENV_SITE_CACHE/data`) is looked in first.
//!
//! The store may be in a cache others can write (a team's), so nothing
//! in it is written by name: the part is opened without following a link
//! and checked (`open_part`), then written, hashed and sealed through
//! that open file; `HEX.json` is a new file renamed in. A store refused
//! (another member's `data/`, a link) is not written at all: [`prepare`]
//! fetches into the user's own cache instead, saying why, as environments
//! are built there. A site's file without its `HEX.json` is refused too,
//! saying so (nothing fetches it again there).
//!
//! In the job, the kernel's runtime directory gets a `data/` directory of
//! symlinks, one per name, to the store ([`expose`]); `NOYAU_DATA` names it.

use noyau_trust::anchor::ProjectDir;
use noyau_trust::{Expect, Mode, TrustError};
use noyau_vars::EnvVars;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cache::Cache;
use crate::index::{redact, Network};
use crate::EnvError;

/// A data file as a notebook declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRef {
    /// As written (credentials included): only ever used to fetch.
    pub url: String,
    /// Lower-case hex.
    pub sha256: String,
    pub name: String,
    /// The directory a relative local path is based on.
    pub base: PathBuf,
}

/// A data file in a store, as the job gets it from the submitting host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    pub name: String,
    /// Where it came from, without credentials.
    pub url: String,
    pub sha256: String,
    pub size: u64,
    /// The store (`CACHE/data`) holding `sha256/HEX`.
    pub store: PathBuf,
    /// The store is a site's (only its owner is trusted).
    #[serde(default)]
    pub site: bool,
}

impl DataFile {
    pub fn path(&self) -> PathBuf {
        self.store.join("sha256").join(&self.sha256)
    }

    /// What a `%noyau data` cell answers: the file, its hash and where
    /// the kernel finds it.
    pub fn shown(&self) -> String {
        format!(
            "[noyau] data {}: sha256 {}, {} bytes, at ${}/{}\n",
            self.name,
            self.sha256,
            self.size,
            EnvVars::NOYAU_DATA,
            self.name
        )
    }

    /// What the output notebook records (`metadata.noyau.data`).
    pub fn record(&self) -> Value {
        json!({"name": self.name, "url": self.url, "sha256": self.sha256, "size": self.size})
    }

    /// In the job: the file is still the one prepared (trusted, same
    /// size). Its bytes were hashed when it entered the store, whose
    /// files no one else may change.
    pub fn check(&self) -> Result<(), EnvError> {
        let store = self.store_cache();
        let path = self.path();
        store.check(&path, false)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.len() == self.size => Ok(()),
            Ok(m) => Err(EnvError::Invalid(format!(
                "data file {}: {} has {} bytes, not the {} it had when it was fetched",
                self.name,
                path.display(),
                m.len(),
                self.size
            ))),
            Err(e) => Err(EnvError::Invalid(format!(
                "data file {} ({}) is not at {} on this node ({e}): the cache must be on a \
                 filesystem the compute nodes share (NOYAU_ENV_CACHE)",
                self.name,
                self.url,
                path.display()
            ))),
        }
    }

    /// Marks the file in use (as [`Cache::hold`] does an entry) until dropped.
    pub fn hold(&self) -> Result<Option<crate::cache::FileLock>, EnvError> {
        self.store_cache().hold(&self.sha256)
    }

    fn store_cache(&self) -> Cache {
        if self.site {
            Cache::site(&self.store)
        } else {
            Cache::new(&self.store)
        }
    }
}

fn invalid(m: String) -> EnvError {
    EnvError::Invalid(m)
}

/// `sha256` as 64 lower-case hex digits (an optional `sha256:` prefix).
pub fn check_sha256(s: &str) -> Result<String, EnvError> {
    let h = s.trim().strip_prefix("sha256:").unwrap_or(s.trim());
    if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(invalid(format!(
            "{s:?} is not a sha256 (64 hexadecimal digits; `sha256sum FILE` prints it)"
        )))
    }
}

/// A name a file can have in the kernel's data directory.
fn check_name(name: &str) -> Result<String, EnvError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
        // It is printed and becomes a file name in the kernel's `data/`:
        // no control, format (bidi, zero-width) or separator character.
        && !name.chars().any(noyau_text::is_unsafe)
        && name.len() <= 200;
    if ok {
        Ok(name.to_string())
    } else {
        Err(invalid(format!(
            "{name:?} cannot name a data file (give --name / `name` without `/` or control, bidi and other invisible characters)"
        )))
    }
}

/// The last segment of a URL or path, as the default name.
fn default_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path).to_string()
}

impl DataRef {
    pub fn new(
        url: &str,
        sha256: &str,
        name: Option<&str>,
        base: &Path,
    ) -> Result<DataRef, EnvError> {
        let url = url.trim();
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        if let Some(s) = &scheme {
            if !matches!(s.as_str(), "http" | "https" | "file") {
                return Err(invalid(format!(
                    "data URL {}: noyau fetches http://, https:// and file:// URLs and local paths, not {s}://",
                    redact(url)
                )));
            }
        }
        Ok(DataRef {
            sha256: check_sha256(sha256)?,
            name: check_name(&name.map_or_else(|| default_name(url), str::to_string))?,
            url: url.to_string(),
            base: base.to_path_buf(),
        })
    }

    /// Fetched over HTTP(S), not copied from a path on this host.
    fn is_remote(&self) -> bool {
        self.url.starts_with("http://") || self.url.starts_with("https://")
    }

    fn from_value(
        v: &Value,
        name: Option<&str>,
        base: &Path,
        what: &str,
    ) -> Result<Self, EnvError> {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        let (Some(url), Some(sha)) = (s("url"), s("sha256")) else {
            return Err(invalid(format!(
                "{what}: each data file needs `url` and `sha256` (and may have `name`), not {v}"
            )));
        };
        DataRef::new(url, sha, name.or(s("name")), base).map_err(|e| match e {
            EnvError::Invalid(m) => invalid(format!("{what}: {m}")),
            other => other,
        })
    }
}

/// The usage of `%noyau data`, for error messages.
pub const MAGIC_USAGE: &str = "%noyau data URL --sha256 HEX [--name NAME]";

/// `URL --sha256 HEX [--name N]`, a relative path based on `base`.
pub fn parse_magic(args: &str, base: &Path) -> Result<DataRef, EnvError> {
    let mut words = args.split_whitespace();
    let (mut url, mut sha, mut name) = (None, None, None);
    while let Some(w) = words.next() {
        let (flag, inline) = match w.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v)),
            _ => (w, None),
        };
        let slot = match flag {
            "--sha256" => &mut sha,
            "--name" => &mut name,
            _ if url.is_none() && !w.starts_with("--") => {
                url = Some(w);
                continue;
            }
            _ => return Err(invalid(format!("unexpected {w:?}; usage: {MAGIC_USAGE}"))),
        };
        *slot = inline.or_else(|| words.next());
    }
    match (url, sha) {
        (Some(u), Some(h)) => DataRef::new(u, h, name, base),
        _ => Err(invalid(format!(
            "a data file needs its URL and --sha256; usage: {MAGIC_USAGE}"
        ))),
    }
}

/// The arguments of the `%noyau data` cells among `sources` (a line magic
/// is a cell's first line, as the proxy and `noyau run` read it).
pub fn magic_lines<'a>(sources: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    sources
        .into_iter()
        .filter_map(|src| {
            let first = src.trim_start().lines().next()?;
            let rest = first.trim().strip_prefix("%noyau")?;
            let rest = rest.trim_start().strip_prefix("data")?;
            rest.starts_with(char::is_whitespace)
                .then(|| rest.trim().to_string())
        })
        .collect()
}

/// Every data file a notebook declares: `[data]` of `dir/noyau.toml`, its
/// `metadata.noyau.data`, then its `%noyau data` lines; later wins by name.
pub fn declared(
    dir: &ProjectDir,
    metadata: Option<&Value>,
    magics: &[String],
) -> Result<Vec<DataRef>, EnvError> {
    let mut all = from_noyau_toml(dir)?;
    if let Some(list) = metadata
        .and_then(|m| m.get("noyau"))
        .and_then(|n| n.get("data"))
    {
        let what = "metadata.noyau.data";
        let items = list
            .as_array()
            .ok_or_else(|| invalid(format!("{what} must be a list of {{url, sha256, name}}")))?;
        for v in items {
            all.push(DataRef::from_value(v, None, dir, what)?);
        }
    }
    for m in magics {
        all.push(parse_magic(m, dir)?);
    }
    let mut out: Vec<DataRef> = Vec::new();
    for r in all {
        out.retain(|o| o.name != r.name);
        out.push(r);
    }
    Ok(out)
}

fn from_noyau_toml(dir: &ProjectDir) -> Result<Vec<DataRef>, EnvError> {
    let Some((path, doc, _)) = crate::sources::noyau_toml(dir)? else {
        return Ok(Vec::new());
    };
    let Some(data) = doc.get("data") else {
        return Ok(Vec::new());
    };
    let what = format!("[data] in {}", path.display());
    let table = data.as_table().ok_or_else(|| {
        invalid(format!(
            "{what} must be a table: NAME = {{ url = \"…\", sha256 = \"…\" }}"
        ))
    })?;
    table
        .iter()
        .map(|(name, v)| {
            let v = serde_json::to_value(v).unwrap_or(Value::Null);
            DataRef::from_value(&v, Some(name), dir, &what)
        })
        .collect()
}

/// A content-addressed store of data files: `CACHE/data`.
#[derive(Debug, Clone)]
pub struct Store {
    cache: Cache,
}

impl Store {
    /// The store of `cache` (its `data/` directory, trusting the same owners).
    pub fn of(cache: &Cache) -> Store {
        Store {
            cache: cache.sub("data"),
        }
    }

    pub fn root(&self) -> &Path {
        self.cache.root()
    }

    fn file(&self, sha: &str) -> PathBuf {
        self.root().join("sha256").join(sha)
    }

    /// The stored file of `sha` as a [`DataFile`] named `name`, if there
    /// is one we trust: its directories, description and file pass the
    /// cache's checks, and the description names `sha` (not a file
    /// renamed under another hash by someone who may write the store).
    pub fn find(&self, sha: &str, name: &str, url: &str) -> Result<Option<DataFile>, EnvError> {
        self.check_dirs(false)?;
        let path = self.file(sha);
        let json_path = path.with_extension("json");
        self.cache.check(&path, false)?;
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return Ok(None);
        };
        // Opened once and checked on what was opened: a refused
        // description is untrusted, a missing or unreadable one is none.
        let about = match self.cache.expect(false).and_then(|e| e.open(&json_path)) {
            Ok(f) => serde_json::from_reader::<_, Value>(f).ok(),
            Err(TrustError::Refused { path, problem }) => {
                return Err(crate::cache::Untrusted::refused(path, problem).into())
            }
            Err(_) => None,
        };
        let Some(about) = about else {
            if self.cache.is_site() {
                // Nothing fetches it again there: say why it is not used.
                return Err(EnvError::Untrusted(crate::cache::Untrusted {
                    path,
                    why: format!(
                        "has no readable {sha}.json naming its sha256 and size (fill the site \
                         cache with `noyau env build NOTEBOOK` run with NOYAU_ENV_CACHE set to \
                         it, which writes it; docs/environments.md, \"Caches\")"
                    ),
                }));
            }
            return Ok(None); // described after it is fetched again
        };
        let named = about.get("sha256").and_then(Value::as_str);
        let size = about.get("size").and_then(Value::as_u64);
        if named != Some(sha) || size != Some(meta.len()) {
            return Err(EnvError::Untrusted(crate::cache::Untrusted {
                path,
                why: format!(
                    "is described as another file ({} of {} bytes)",
                    named.unwrap_or("no sha256"),
                    size.map_or("unknown".into(), |n| n.to_string())
                ),
            }));
        }
        Ok(Some(DataFile {
            name: name.to_string(),
            url: redact(url),
            sha256: sha.to_string(),
            size: meta.len(),
            store: self.root().to_path_buf(),
            site: self.cache.is_site(),
        }))
    }

    /// `data/` and `data/sha256/` are directories (not links) of the user
    /// or the cache's owner; made (with the umask: a team's store is
    /// shared) when `make`, else a missing one is fine.
    fn check_dirs(&self, make: bool) -> Result<(), EnvError> {
        let expect = self.cache.expect(true)?.mode(Mode::Any);
        for dir in [self.root().to_path_buf(), self.root().join("sha256")] {
            if make {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| EnvError::io(format!("creating {}", dir.display()), e))?;
            }
            match expect.check(&dir) {
                Err(e @ TrustError::Refused { .. }) => return Err(e.into()),
                Err(e) if !make && e.is_not_found() => {}
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// The file of `r`, fetched into this store unless it is there.
    pub fn fetch(
        &self,
        r: &DataRef,
        net: &Network,
        progress: crate::Progress<'_>,
    ) -> Result<DataFile, EnvError> {
        match self.ready(r, progress)? {
            Ready::Found(f) => Ok(f),
            Ready::Locked(lock) => self.fetch_locked(r, net, progress, lock),
        }
    }

    /// The file of `r` if it is here, else this store made ready to fetch
    /// it (its directories, its lock taken): everything that may refuse
    /// a store others can write is checked before anything is fetched.
    fn ready(&self, r: &DataRef, progress: crate::Progress<'_>) -> Result<Ready, EnvError> {
        if let Some(f) = self.find(&r.sha256, &r.name, &r.url)? {
            return Ok(Ready::Found(f));
        }
        self.check_dirs(true)?;
        let lock = self.cache.lock(&r.sha256)?;
        if let Some(f) = self.find(&r.sha256, &r.name, &r.url)? {
            progress(&format!(
                "{} was fetched by another job meanwhile; using it",
                r.name
            ));
            return Ok(Ready::Found(f));
        }
        Ok(Ready::Locked(lock))
    }

    /// Fetches `r` into this store, holding its lock.
    fn fetch_locked(
        &self,
        r: &DataRef,
        net: &Network,
        progress: crate::Progress<'_>,
        _lock: crate::cache::FileLock,
    ) -> Result<DataFile, EnvError> {
        let stable = self.root().join(format!(".part-{}", r.sha256));
        // A part under a random name is removed on any error (`random`
        // dropped): it is never continued.
        let (mut out, part, random) = open_part(&stable)?;
        let resumed = fetch_to(r, net, &mut out, &part, progress).inspect_err(|_| {
            // Nothing to continue: leave no part that would not be.
            if out.metadata().is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(&part);
            }
        })?;
        let mut got = sha256_open(&mut out, &part)?;
        if got != r.sha256 && resumed {
            progress(&format!(
                "{}: the resumed download does not have the expected sha256; fetching it again from the start",
                redact(&r.url)
            ));
            out.set_len(0)
                .map_err(|e| EnvError::io(format!("emptying {}", part.display()), e))?;
            fetch_to(r, net, &mut out, &part, progress)?;
            got = sha256_open(&mut out, &part)?;
        }
        if got != r.sha256 {
            let _ = std::fs::remove_file(&part);
            return Err(EnvError::HashMismatch {
                url: redact(&r.url),
                expected: r.sha256.clone(),
                // A local file's hash is not told: the notebook may have
                // named a file of the user's (a hash of a short secret
                // is as good as the secret).
                got: r.is_remote().then_some(got),
            });
        }
        let stored = self.store_part(r, &out, &part)?;
        if let Some(random) = random {
            let _ = random.keep(); // renamed in: nothing left to remove
        }
        Ok(stored)
    }

    /// Seals a verified download (`out`, open at `part`) and renames it
    /// in, its description first (a new file renamed over whatever is at
    /// its name, never written through a link planted there).
    fn store_part(&self, r: &DataRef, out: &File, part: &Path) -> Result<DataFile, EnvError> {
        let file = self.file(&r.sha256);
        let meta = out
            .metadata()
            .map_err(|e| EnvError::io(format!("reading {}", part.display()), e))?;
        let about = json!({
            "sha256": r.sha256, "size": meta.len(), "url": redact(&r.url), "name": r.name,
            "fetched_at": crate::now_secs(), "fetched_on": crate::hostname(),
        });
        let text = serde_json::to_vec_pretty(&about).expect("json");
        noyau_trust::replace(&file.with_extension("json"), &text, 0o444)?;
        out.set_permissions(std::fs::Permissions::from_mode(0o444))
            .and_then(|()| std::fs::rename(part, &file))
            .map_err(|e| EnvError::io(format!("moving the download to {}", file.display()), e))?;
        // The name is renamed, not the file: someone who may write the
        // store could have put something else at `part` meanwhile.
        let moved = std::fs::symlink_metadata(&file)
            .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()));
        if !moved {
            let _ = std::fs::remove_file(&file);
            return Err(EnvError::Untrusted(crate::cache::Untrusted {
                path: part.to_path_buf(),
                why: "was replaced by something else while it was downloaded".into(),
            }));
        }
        Ok(DataFile {
            name: r.name.clone(),
            url: redact(&r.url),
            sha256: r.sha256.clone(),
            size: meta.len(),
            store: self.root().to_path_buf(),
            site: false,
        })
    }
}

/// Where a store stands for one hash ([`Store::ready`]).
enum Ready {
    /// The file is there.
    Found(DataFile),
    /// It is to be fetched, under this lock.
    Locked(crate::cache::FileLock),
}

/// The download in progress of `part` and where it is: `part` itself,
/// opened (or made, 0600) without following a link and checked on what
/// was opened (a regular file of ours with one name); anything else there
/// (a link, another user's file, a hard link) is removed and a new file
/// made in its place. When it cannot be removed (another user's, in a
/// sticky directory) or is planted again, a new file under a random name
/// (made with `O_EXCL`), which is not continued after an interruption:
/// it is removed when the returned guard is dropped (unless kept).
fn open_part(part: &Path) -> Result<(File, PathBuf, Option<tempfile::TempPath>), EnvError> {
    if let Some(f) = open_ours(part)? {
        return Ok((f, part.to_path_buf(), None));
    }
    if std::fs::remove_file(part).is_ok() {
        if let Some(f) = open_ours(part)? {
            return Ok((f, part.to_path_buf(), None));
        }
    }
    let dir = part.parent().unwrap_or(Path::new("."));
    let name = part.file_name().unwrap_or_default().to_string_lossy();
    let (f, guard) = tempfile::Builder::new()
        .prefix(&format!("{name}."))
        .tempfile_in(dir)
        .map_err(|e| EnvError::io(format!("creating a file in {}", dir.display()), e))?
        .into_parts();
    Ok((f, guard.to_path_buf(), Some(guard)))
}

/// `path` opened to read and write (made 0600 if missing), without
/// following a link; None when it is not a regular file of ours with one
/// name.
fn open_ours(path: &Path) -> Result<Option<File>, EnvError> {
    let opened = Expect::file().mode(Mode::Any).open_with(
        path,
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600),
    );
    match opened {
        Ok(f) => {
            let meta = f
                .metadata()
                .map_err(|e| EnvError::io(format!("reading {}", path.display()), e))?;
            Ok((meta.nlink() == 1).then_some(f))
        }
        Err(TrustError::Refused { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The file of `r` from the site's store, else `cache`'s (fetched there),
/// else, when `cache`'s store is refused (a team's, made by another
/// member), the user's own cache's, saying why.
pub fn prepare(
    r: &DataRef,
    cache: &Cache,
    net: &Network,
    progress: crate::Progress<'_>,
) -> Result<DataFile, EnvError> {
    if let Some(site) = crate::cache::site_cache() {
        match Store::of(&site).find(&r.sha256, &r.name, &r.url) {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(e) => {
                let said = format!("not using the site cache's copy of {}: {e}", r.name);
                tracing::warn!("{said}");
                progress(&said);
            }
        }
    }
    let store = Store::of(cache);
    match store.ready(r, progress) {
        Ok(Ready::Found(f)) => Ok(f),
        Ok(Ready::Locked(lock)) => store.fetch_locked(r, net, progress, lock),
        Err(EnvError::Untrusted(why)) => fetch_into_own(r, cache, why, net, progress),
        Err(e) => Err(e),
    }
}

/// `r` fetched into the user's own cache ([`crate::cache::private_root`]),
/// the shared `cache`'s store being refused for `why`: nothing is written
/// through another user's directories.
fn fetch_into_own(
    r: &DataRef,
    cache: &Cache,
    why: crate::cache::Untrusted,
    net: &Network,
    progress: crate::Progress<'_>,
) -> Result<DataFile, EnvError> {
    let own = Cache::new(crate::cache::private_root());
    if crate::cache::same_dir(own.root(), cache.root()) {
        return Err(EnvError::Untrusted(why));
    }
    let said = format!(
        "not using the shared cache's data store: {why}; fetching {} into your own cache {} instead",
        r.name,
        own.root().display()
    );
    tracing::warn!("{said}");
    progress(&said);
    Store::of(&own).fetch(r, net, progress)
}

/// Downloads or copies `r` into `out` (open at `part`), continuing a
/// partial download; true when it continued one.
fn fetch_to(
    r: &DataRef,
    net: &Network,
    out: &mut File,
    part: &Path,
    progress: crate::Progress<'_>,
) -> Result<bool, EnvError> {
    let shown = redact(&r.url);
    let t0 = Instant::now();
    let writing = |e| EnvError::io(format!("writing {}", part.display()), e);
    let resumed = if r.is_remote() {
        download(r, net, out, part, progress)?
    } else {
        let src = match r.url.strip_prefix("file://") {
            Some(p) => PathBuf::from(p),
            None => crate::spec::absolute(&r.base, Path::new(&r.url)),
        };
        progress(&format!("copying {} into the data store", src.display()));
        let copying = |e| {
            EnvError::io(
                format!("data file {}: copying {}", r.name, src.display()),
                e,
            )
        };
        let mut from = open_local(&src).map_err(|e| match e {
            TrustError::Io { source, .. } => copying(source),
            refused => refused.into(),
        })?;
        rewind(out, 0).map_err(writing)?;
        std::io::copy(&mut from, out).map_err(copying)?;
        out.sync_all().map_err(writing)?;
        false
    };
    let size = out.metadata().map(|m| m.len()).unwrap_or(0);
    progress(&format!(
        "{}: {} bytes from {shown} in {:.1} s",
        r.name,
        size,
        t0.elapsed().as_secs_f64()
    ));
    Ok(resumed)
}

/// Empties `out` and writes from its start (`keep` 0), or continues
/// after its first `keep` bytes.
fn rewind(out: &mut File, keep: u64) -> std::io::Result<()> {
    if keep == 0 {
        out.set_len(0)?;
    }
    out.seek(SeekFrom::Start(keep)).map(drop)
}

/// An HTTP(S) GET into `out`, from its current length when it has one.
fn download(
    r: &DataRef,
    net: &Network,
    out: &mut File,
    part: &Path,
    progress: crate::Progress<'_>,
) -> Result<bool, EnvError> {
    let shown = redact(&r.url);
    let failed = |why: String| EnvError::Fetch {
        url: shown.clone(),
        why,
    };
    let writing = |e| EnvError::io(format!("writing {}", part.display()), e);
    let have = out.metadata().map(|m| m.len()).unwrap_or(0);
    let client = net.http_client().map_err(|e| failed(e.to_string()))?;
    let mut req = client.get(&r.url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = req.send().map_err(|e| failed(error_chain(&e)))?;
    let status = resp.status();
    let resumed = have > 0 && status == reqwest::StatusCode::PARTIAL_CONTENT;
    if have > 0 && status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        return Ok(true); // the part is complete; its hash decides
    }
    if !status.is_success() {
        return Err(failed(format!("the server answered {status}")));
    }
    match (resumed, have > 0) {
        (true, _) => progress(&format!("{}: continuing {shown} from byte {have}", r.name)),
        (false, true) => progress(&format!(
            "{}: the server does not resume; fetching {shown} again",
            r.name
        )),
        (false, false) => progress(&format!("{}: fetching {shown}", r.name)),
    }
    rewind(out, if resumed { have } else { 0 }).map_err(writing)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = resp.read(&mut buf).map_err(|e| {
            failed(format!(
                "the download broke off ({e}); run again to continue it"
            ))
        })?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(writing)?;
    }
    out.sync_all().map_err(writing)?;
    Ok(resumed)
}

/// reqwest's error with its causes (the connection's own reason).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, EnvError> {
    let mut f = open_local(path).map_err(|e| match e {
        TrustError::Io { source, .. } => {
            EnvError::io(format!("reading {}", path.display()), source)
        }
        refused => refused.into(),
    })?;
    sha256_open(&mut f, path)
}

/// A local file a notebook may name (a data file, an image), opened once
/// and checked: anyone's (a team's data, a site's image), but a regular
/// file: a FIFO would hang the kernel's start, a device (`/dev/zero`) be
/// read without end.
fn open_local(path: &Path) -> Result<File, TrustError> {
    Expect::file()
        .owner(noyau_trust::Owner::Any)
        .mode(Mode::Any)
        .follow_links()
        .open(path)
}

/// sha256 of the open file `f` (at `path`), from its start.
fn sha256_open(f: &mut File, path: &Path) -> Result<String, EnvError> {
    use sha2::Digest;
    let reading = |e| EnvError::io(format!("reading {}", path.display()), e);
    f.seek(SeekFrom::Start(0)).map_err(reading)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(reading)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Makes `dir` hold one symlink per data file, named by its name, to its
/// place in the store (replacing a link of the same name atomically: the
/// workers of a Dask cluster share one directory).
pub fn expose(dir: &Path, files: &[DataFile]) -> Result<(), EnvError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| EnvError::io(format!("creating {}", dir.display()), e))?;
    for f in files {
        f.check()?;
        let link = dir.join(&f.name);
        if std::fs::symlink_metadata(&link).is_ok_and(|m| !m.file_type().is_symlink()) {
            return Err(invalid(format!(
                "{} exists and is not a data link; not replacing it",
                link.display()
            )));
        }
        let tmp = dir.join(format!(".{}.{}", f.name, std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(f.path(), &tmp)
            .and_then(|()| std::fs::rename(&tmp, &link))
            .map_err(|e| EnvError::io(format!("linking {}", link.display()), e))?;
    }
    Ok(())
}

/// One store entry, for `noyau env list` and `gc`.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sha256: String,
    pub size: u64,
    pub about: Value,
    pub last_use: std::time::SystemTime,
}

/// The files of a store.
pub fn list(store: &Store) -> Vec<Stored> {
    let dir = store.root().join("sha256");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<Stored> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            check_sha256(&name).ok().filter(|h| *h == name)?;
            let meta = e.metadata().ok()?;
            let about = std::fs::read(e.path().with_extension("json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null);
            let lock = store.root().join(format!("{name}.lock"));
            let last_use = std::fs::metadata(&lock)
                .and_then(|m| m.modified())
                .or_else(|_| meta.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            Some(Stored {
                sha256: name,
                size: meta.size(),
                about,
                last_use,
            })
        })
        .collect();
    out.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    out
}

impl Store {
    /// Removes the file of `sha` unless someone holds it (`dry`: only
    /// says whether it would); true if removed.
    pub(crate) fn remove_unused(&self, sha: &str, dry: bool) -> Result<bool, EnvError> {
        let Some(_lock) = self.cache.try_exclusive(sha)? else {
            return Ok(false);
        };
        if dry {
            return Ok(true);
        }
        let file = self.file(sha);
        let _ = std::fs::remove_file(file.with_extension("json"));
        std::fs::remove_file(&file)
            .map_err(|e| EnvError::io(format!("removing {}", file.display()), e))?;
        Ok(true)
    }
}

/// How long a download may wait for its first byte.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::tests::pd;

    const H: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn magic_and_declarations() {
        let base = Path::new("/nb");
        let r = parse_magic(&format!("https://h/d/iris.csv?x=1 --sha256 {H}"), base).unwrap();
        assert_eq!((r.name.as_str(), r.sha256.as_str()), ("iris.csv", H));
        let r = parse_magic(
            &format!("data/x.bin --name=y --sha256=sha256:{}", H.to_uppercase()),
            base,
        )
        .unwrap();
        assert_eq!((r.name.as_str(), r.sha256.as_str()), ("y", H));
        for (bad, says) in [
            ("https://h/x", "--sha256"),
            ("https://h/x --sha256 abc", "not a sha256"),
            (&format!("ftp://h/x --sha256 {H}") as &str, "not ftp://"),
            (&format!("https://h/ --sha256 {H}"), "cannot name"),
            // A name from the notebook is printed and becomes a file name:
            // an escape (OSC 52), a bidi override, a zero-width space.
            (
                &format!("https://h/x --name=a\u{1b}]52;c;eA==\u{7} --sha256 {H}"),
                "cannot name",
            ),
            (
                &format!("https://h/x --name=gpj\u{202e}.exe --sha256 {H}"),
                "cannot name",
            ),
            (
                &format!("https://h/x --name=a\u{200b}b --sha256 {H}"),
                "cannot name",
            ),
            (&format!("https://h/x --sha256 {H} --bogus"), "unexpected"),
        ] {
            let e = parse_magic(bad, base).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("noyau.toml"),
            format!("[data]\na = {{ url = \"https://h/a\", sha256 = \"{H}\" }}\nb = {{ url = \"https://h/b\", sha256 = \"{H}\" }}\n"),
        )
        .unwrap();
        let meta =
            json!({"noyau": {"data": [{"url": "file:///x/other", "sha256": H, "name": "b"}]}});
        let all = declared(&pd(t.path()), Some(&meta), &[format!("c.txt --sha256 {H}")]).unwrap();
        let names: Vec<(&str, &str)> = all
            .iter()
            .map(|r| (r.name.as_str(), r.url.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("a", "https://h/a"),
                ("b", "file:///x/other"),
                ("c.txt", "c.txt")
            ]
        );
        let e = declared(
            &pd(t.path()),
            Some(&json!({"noyau": {"data": [{"url": "x"}]}})),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("needs `url` and `sha256`"), "{e}");
    }
}
