//! Kernelspecs on the Jupyter paths: find, list, and write them the way
//! `jupyter_client` does.
//!
//! A kernelspec is a directory `NAME/` holding a `kernel.json` (and optional
//! logo files) under one of the `kernels/` directories returned by
//! [`kernel_dirs`]. The first directory that has `NAME/kernel.json` wins, and
//! names compare case-insensitively (jupyter lowercases them).
//!
//! Every function that reads the environment has a `*_from` twin taking an
//! injectable environment lookup (`&dyn Fn(&str) -> Option<String>`), so tests
//! and callers never have to mutate the process-global environment.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// A lookup of environment variables; `std::env::var` in production.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, as an [`EnvLookup`]. Non-UTF-8 values count as unset.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// The contents of a `kernel.json`. Keys this struct does not name are kept in
/// [`KernelSpec::extra`] and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelSpec {
    pub argv: Vec<String>,
    pub display_name: String,
    #[serde(default)]
    pub language: String,
    /// `"signal"` (the default when absent) or `"message"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupt_mode: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, Value>,
    /// Every other key of the file (e.g. `kernel_protocol_version`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl KernelSpec {
    /// True when the kernel wants interrupts as `interrupt_request` messages
    /// on the control channel rather than as SIGINT.
    pub fn interrupt_by_message(&self) -> bool {
        self.interrupt_mode.as_deref() == Some("message")
    }

    /// Parse and check a `kernel.json` file.
    pub fn from_file(path: &Path) -> Result<Self, KernelSpecError> {
        let bytes = std::fs::read(path).map_err(|source| KernelSpecError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let spec: KernelSpec =
            serde_json::from_slice(&bytes).map_err(|source| KernelSpecError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        spec.check(path)?;
        Ok(spec)
    }

    fn check(&self, path: &Path) -> Result<(), KernelSpecError> {
        let invalid = |reason: &str| KernelSpecError::Invalid {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if self.argv.is_empty() {
            return Err(invalid(
                "\"argv\" is empty; it must name the kernel program",
            ));
        }
        match self.interrupt_mode.as_deref() {
            None | Some("signal") | Some("message") => Ok(()),
            Some(other) => Err(invalid(&format!(
                "\"interrupt_mode\" is {other:?}; it must be \"signal\" or \"message\""
            ))),
        }
    }
}

/// A kernelspec found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundSpec {
    /// The lowercased directory name.
    pub name: String,
    /// The spec directory (holding `kernel.json`).
    pub dir: PathBuf,
    pub spec: KernelSpec,
}

/// Where `install` puts a kernelspec, like `jupyter kernelspec install
/// --user / --sys-prefix / --prefix DIR`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InstallLocation {
    /// The user data dir: `$JUPYTER_DATA_DIR`, else `$XDG_DATA_HOME/jupyter`,
    /// else `~/.local/share/jupyter`.
    #[default]
    User,
    /// `sys.prefix/share/jupyter` of the active Python environment.
    SysPrefix,
    /// `DIR/share/jupyter`.
    Prefix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum KernelSpecError {
    #[error("{}", not_found_message(.name, .searched, .available, .suggestion.as_deref()))]
    NotFound {
        name: String,
        searched: Vec<PathBuf>,
        available: Vec<String>,
        suggestion: Option<String>,
    },
    #[error("invalid kernelspec name {name:?}: use only ASCII letters, digits, '.', '_' and '-'")]
    InvalidName { name: String },
    #[error("cannot read kernelspec {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed kernelspec {}: {source}; fix or remove the file", .path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid kernelspec {}: {reason}", .path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write kernelspec to {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot locate the user's Jupyter data dir: HOME is unset; set JUPYTER_DATA_DIR or HOME"
    )]
    NoHome,
    #[error(
        "no Python environment found for --sys-prefix: VIRTUAL_ENV and CONDA_PREFIX are unset \
         and no python3 is on PATH; activate the environment or use --prefix DIR"
    )]
    NoSysPrefix,
}

fn not_found_message(
    name: &str,
    searched: &[PathBuf],
    available: &[String],
    suggestion: Option<&str>,
) -> String {
    let mut s = format!("no kernelspec named '{name}' on the Jupyter paths (searched: ");
    if searched.is_empty() {
        s.push_str("nothing");
    } else {
        let dirs: Vec<String> = searched.iter().map(|p| p.display().to_string()).collect();
        s.push_str(&dirs.join(", "));
    }
    s.push_str("); ");
    if available.is_empty() {
        s.push_str("no kernelspecs are installed; install one (e.g. `python3 -m ipykernel install --user`) or set JUPYTER_PATH");
    } else {
        let _ = write!(s, "available: {}", available.join(", "));
    }
    if let Some(sug) = suggestion {
        let _ = write!(s, ". Did you mean '{sug}'?");
    }
    s
}

/// Jupyter's rule for kernelspec names: ASCII letters, digits, `.`, `_`, `-`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_name(name: &str) -> Result<(), KernelSpecError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(KernelSpecError::InvalidName {
            name: name.to_string(),
        })
    }
}

fn non_empty(env: EnvLookup, key: &str) -> Option<String> {
    env(key).filter(|v| !v.is_empty())
}

/// The user data dir: `$JUPYTER_DATA_DIR`, else `$XDG_DATA_HOME/jupyter`,
/// else `$HOME/.local/share/jupyter` (jupyter_core's rule on Linux).
pub fn user_data_dir_from(env: EnvLookup) -> Option<PathBuf> {
    if let Some(d) = non_empty(env, "JUPYTER_DATA_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(x) = non_empty(env, "XDG_DATA_HOME") {
        return Some(PathBuf::from(x).join("jupyter"));
    }
    non_empty(env, "HOME").map(|h| PathBuf::from(h).join(".local/share/jupyter"))
}

/// Python's `sys.prefix` without running Python: `$VIRTUAL_ENV`, else
/// `$CONDA_PREFIX`, else the parent of the directory holding the first
/// `python3` on `$PATH`.
pub fn sys_prefix_from(env: EnvLookup) -> Option<PathBuf> {
    if let Some(v) = non_empty(env, "VIRTUAL_ENV") {
        return Some(PathBuf::from(v));
    }
    if let Some(c) = non_empty(env, "CONDA_PREFIX") {
        return Some(PathBuf::from(c));
    }
    let path = env("PATH")?;
    std::env::split_paths(&path)
        .filter(|d| !d.as_os_str().is_empty())
        .find(|d| is_executable(&d.join("python3")))
        .and_then(|bin| bin.parent().map(Path::to_path_buf))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Whether the environment's data dir goes before the user's, as in
/// jupyter_core 5: `$JUPYTER_PREFER_ENV_PATH` decides when set; otherwise an
/// active virtualenv or a non-base conda env is preferred.
fn prefer_env_path(env: EnvLookup) -> bool {
    if let Some(v) = env("JUPYTER_PREFER_ENV_PATH") {
        let v = v.trim().to_ascii_lowercase();
        return !matches!(v.as_str(), "" | "0" | "false" | "no" | "off" | "n" | "f");
    }
    if non_empty(env, "VIRTUAL_ENV").is_some() {
        return true;
    }
    non_empty(env, "CONDA_PREFIX").is_some()
        && !matches!(
            non_empty(env, "CONDA_DEFAULT_ENV").as_deref(),
            None | Some("base") | Some("root")
        )
}

/// The `kernels/` directories searched, in order (see [`kernel_dirs_from`]).
pub fn kernel_dirs() -> Vec<PathBuf> {
    kernel_dirs_from(&process_env)
}

/// The `kernels/` directories searched, in order, like jupyter_client:
/// `$JUPYTER_PATH` entries, the user data dir, `sys.prefix/share/jupyter`
/// (before the user dir inside an active virtualenv/conda env or with
/// `JUPYTER_PREFER_ENV_PATH`), `/usr/local/share/jupyter`,
/// `/usr/share/jupyter`; each with `/kernels` appended, duplicates removed.
pub fn kernel_dirs_from(env: EnvLookup) -> Vec<PathBuf> {
    let mut data: Vec<PathBuf> = Vec::new();
    if let Some(jp) = non_empty(env, "JUPYTER_PATH") {
        data.extend(std::env::split_paths(&jp).filter(|p| !p.as_os_str().is_empty()));
    }
    let user = user_data_dir_from(env);
    let prefix = sys_prefix_from(env).map(|p| p.join("share/jupyter"));
    if prefer_env_path(env) {
        data.extend(prefix);
        data.extend(user);
    } else {
        data.extend(user);
        data.extend(prefix);
    }
    data.push(PathBuf::from("/usr/local/share/jupyter"));
    data.push(PathBuf::from("/usr/share/jupyter"));

    let mut out: Vec<PathBuf> = Vec::new();
    for d in data {
        let k = d.join("kernels");
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

/// The kernel of the Python a frontend runs in, as jupyter_client names it.
pub const NATIVE_KERNEL_NAME: &str = "python3";

/// The kernelspec a notebook's kernel name means, as jupyter_client's
/// `KernelManager` reads it before any lookup: `python` (older notebooks,
/// some tools' output) is the native [`NATIVE_KERNEL_NAME`]; other names
/// are themselves.
pub fn resolve_alias(name: &str) -> &str {
    if name == "python" {
        NATIVE_KERNEL_NAME
    } else {
        name
    }
}

/// A `JUPYTER_PATH` value that makes another process (a batch job, whose
/// environment the scheduler may not copy) search kernelspecs as this one
/// does: `first` if given, then the data dirs behind [`kernel_dirs_from`]
/// in their order (the shell's `JUPYTER_PATH` first). Dirs whose name holds
/// the path separator cannot be listed and are left out.
pub fn search_path_from(env: EnvLookup, first: Option<&Path>) -> String {
    let mut dirs: Vec<PathBuf> = first.map(Path::to_path_buf).into_iter().collect();
    for k in kernel_dirs_from(env) {
        if let Some(d) = k.parent().filter(|d| !dirs.iter().any(|x| x == d)) {
            dirs.push(d.to_path_buf());
        }
    }
    let listed: Vec<String> = dirs
        .iter()
        .filter_map(|d| d.to_str())
        .filter(|d| !d.contains(':'))
        .map(str::to_string)
        .collect();
    listed.join(":")
}

/// Find kernelspec `name` (case-insensitive) on the Jupyter paths.
pub fn find(name: &str) -> Result<FoundSpec, KernelSpecError> {
    find_in(name, &kernel_dirs())
}

/// Find kernelspec `name` (case-insensitive) in the given `kernels/` dirs;
/// the first dir that has `NAME/kernel.json` wins.
pub fn find_in(name: &str, dirs: &[PathBuf]) -> Result<FoundSpec, KernelSpecError> {
    check_name(name)?;
    let wanted = name.to_ascii_lowercase();
    for dir in dirs {
        if let Some(spec_dir) = entries(dir)
            .into_iter()
            .find(|(n, _)| *n == wanted)
            .map(|(_, d)| d)
        {
            let spec = KernelSpec::from_file(&spec_dir.join("kernel.json"))?;
            return Ok(FoundSpec {
                name: wanted,
                dir: spec_dir,
                spec,
            });
        }
    }
    let available: Vec<String> = names_in(dirs);
    let suggestion = closest(&wanted, &available);
    Err(KernelSpecError::NotFound {
        name: name.to_string(),
        searched: dirs.to_vec(),
        available,
        suggestion,
    })
}

/// All kernelspecs on the Jupyter paths (see [`list_in`]).
pub fn list() -> (Vec<FoundSpec>, Vec<KernelSpecError>) {
    list_in(&kernel_dirs())
}

/// All kernelspecs in the given `kernels/` dirs, first one per name wins,
/// sorted by name. Malformed ones are skipped and returned as errors.
pub fn list_in(dirs: &[PathBuf]) -> (Vec<FoundSpec>, Vec<KernelSpecError>) {
    let mut found: BTreeMap<String, Result<FoundSpec, KernelSpecError>> = BTreeMap::new();
    for dir in dirs {
        for (name, spec_dir) in entries(dir) {
            found.entry(name.clone()).or_insert_with(|| {
                KernelSpec::from_file(&spec_dir.join("kernel.json")).map(|spec| FoundSpec {
                    name,
                    dir: spec_dir,
                    spec,
                })
            });
        }
    }
    let mut specs = Vec::new();
    let mut errors = Vec::new();
    for r in found.into_values() {
        match r {
            Ok(s) => specs.push(s),
            Err(e) => errors.push(e),
        }
    }
    (specs, errors)
}

/// `(lowercased name, spec dir)` for every valid-named subdirectory of `dir`
/// holding a `kernel.json`, sorted so the result does not depend on readdir order.
fn entries(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !is_valid_name(&name) {
                return None;
            }
            let p = e.path();
            p.join("kernel.json")
                .is_file()
                .then(|| (name.to_ascii_lowercase(), p))
        })
        .collect();
    out.sort();
    out
}

fn names_in(dirs: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = dirs
        .iter()
        .flat_map(|d| entries(d))
        .map(|(n, _)| n)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The available name closest to `name` by edit distance, if close enough.
fn closest(name: &str, available: &[String]) -> Option<String> {
    let max = (name.chars().count() / 3).max(2);
    available
        .iter()
        .map(|a| (levenshtein(name, a), a))
        .filter(|(d, _)| *d <= max)
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a.clone())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The directory kernelspec `name` would be installed to (see [`install_dir_from`]).
pub fn install_dir(loc: &InstallLocation, name: &str) -> Result<PathBuf, KernelSpecError> {
    install_dir_from(loc, name, &process_env)
}

/// The directory kernelspec `name` (lowercased, like jupyter) would be
/// installed to: `<data dir>/kernels/<name>`.
pub fn install_dir_from(
    loc: &InstallLocation,
    name: &str,
    env: EnvLookup,
) -> Result<PathBuf, KernelSpecError> {
    check_name(name)?;
    let data = match loc {
        InstallLocation::User => user_data_dir_from(env).ok_or(KernelSpecError::NoHome)?,
        InstallLocation::SysPrefix => sys_prefix_from(env)
            .ok_or(KernelSpecError::NoSysPrefix)?
            .join("share/jupyter"),
        InstallLocation::Prefix(p) => p.join("share/jupyter"),
    };
    Ok(data.join("kernels").join(name.to_ascii_lowercase()))
}

/// Create `dir` (and parents) and write `dir/kernel.json` atomically: a
/// temporary file in the same directory, synced, then renamed over.
pub fn write_spec(dir: &Path, spec: &KernelSpec) -> Result<(), KernelSpecError> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KernelSpecError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(werr(dir))?;
    let mut json = serde_json::to_vec_pretty(spec).expect("a KernelSpec always serialises");
    json.push(b'\n');
    let target = dir.join("kernel.json");
    let tmp = dir.join(format!(
        ".kernel.json.{}.{:08x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(werr(&target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn put(kernels: &Path, name: &str, json: &str) -> PathBuf {
        let d = kernels.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("kernel.json"), json).unwrap();
        d
    }

    fn simple(display: &str) -> String {
        format!(
            r#"{{"argv": ["python3", "-m", "ipykernel_launcher", "-f", "{{connection_file}}"], "display_name": "{display}", "language": "python"}}"#
        )
    }

    #[test]
    fn dirs_order_default() {
        let env = env_of(&[
            ("JUPYTER_PATH", "/a:/b"),
            ("HOME", "/home/u"),
            ("CONDA_PREFIX", "/opt/conda"),
            ("CONDA_DEFAULT_ENV", "base"),
        ]);
        let dirs = kernel_dirs_from(&env);
        let want: Vec<PathBuf> = [
            "/a/kernels",
            "/b/kernels",
            "/home/u/.local/share/jupyter/kernels",
            "/opt/conda/share/jupyter/kernels",
            "/usr/local/share/jupyter/kernels",
            "/usr/share/jupyter/kernels",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(dirs, want);
    }

    #[test]
    fn python_means_the_native_kernel_as_in_jupyter_client() {
        assert_eq!(resolve_alias("python"), "python3");
        assert_eq!(resolve_alias("python3"), "python3");
        // jupyter_client compares exactly: other spellings are names of their own
        assert_eq!(resolve_alias("Python"), "Python");
        assert_eq!(resolve_alias("ir"), "ir");
    }

    #[test]
    fn search_path_lists_the_data_dirs_in_search_order() {
        let env = env_of(&[
            ("JUPYTER_PATH", "/a:/b:/a"),
            ("HOME", "/home/u"),
            ("VIRTUAL_ENV", "/venv"),
        ]);
        // the venv's dir goes before the user's, as the search does; each once
        assert_eq!(
            search_path_from(&env, Some(Path::new("/managed"))),
            "/managed:/a:/b:/venv/share/jupyter:/home/u/.local/share/jupyter:\
             /usr/local/share/jupyter:/usr/share/jupyter"
        );
        let odd = env_of(&[("JUPYTER_DATA_DIR", "/x:y"), ("HOME", "/h")]);
        assert!(!search_path_from(&odd, None).contains("/x:y"));
    }

    #[test]
    fn dirs_venv_first_and_data_dir_override() {
        let env = env_of(&[
            ("JUPYTER_DATA_DIR", "/data"),
            ("HOME", "/home/u"),
            ("VIRTUAL_ENV", "/venv"),
        ]);
        let dirs = kernel_dirs_from(&env);
        assert_eq!(dirs[0], PathBuf::from("/venv/share/jupyter/kernels"));
        assert_eq!(dirs[1], PathBuf::from("/data/kernels"));
        let env = env_of(&[
            ("HOME", "/h"),
            ("VIRTUAL_ENV", "/venv"),
            ("JUPYTER_PREFER_ENV_PATH", "0"),
        ]);
        let dirs = kernel_dirs_from(&env);
        assert_eq!(dirs[0], PathBuf::from("/h/.local/share/jupyter/kernels"));
        assert_eq!(dirs[1], PathBuf::from("/venv/share/jupyter/kernels"));
    }

    #[test]
    fn sys_prefix_from_python_on_path() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("env/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let py = bin.join("python3");
        std::fs::write(&py, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:{}", tmp.path().join("nope").display(), bin.display());
        let env = env_of(&[("PATH", &path)]);
        assert_eq!(sys_prefix_from(&env), Some(tmp.path().join("env")));
        assert_eq!(sys_prefix_from(&env_of(&[("PATH", "/nonexistent")])), None);
    }

    #[test]
    fn find_first_wins_case_insensitive() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a/kernels");
        let b = tmp.path().join("b/kernels");
        put(&a, "Python3", &simple("A"));
        put(&b, "python3", &simple("B"));
        put(&b, "ir", &simple("R"));
        let dirs = vec![a.clone(), b.clone()];
        let f = find_in("PYTHON3", &dirs).unwrap();
        assert_eq!(f.name, "python3");
        assert_eq!(f.dir, a.join("Python3"));
        assert_eq!(f.spec.display_name, "A");
        assert!(!f.spec.interrupt_by_message());
        assert_eq!(find_in("ir", &dirs).unwrap().spec.display_name, "R");
    }

    #[test]
    fn not_found_suggests() {
        let tmp = tempfile::tempdir().unwrap();
        let k = tmp.path().join("kernels");
        put(&k, "python3", &simple("P"));
        put(&k, "ir", &simple("R"));
        let err = find_in("pyhton3", std::slice::from_ref(&k)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("no kernelspec named 'pyhton3'"), "{msg}");
        assert!(msg.contains("available: ir, python3"), "{msg}");
        assert!(msg.contains("Did you mean 'python3'?"), "{msg}");
        assert!(msg.contains(&k.display().to_string()), "{msg}");
        let msg = find_in("julia-1.10", &[k]).unwrap_err().to_string();
        assert!(!msg.contains("Did you mean"), "{msg}");
    }

    #[test]
    fn invalid_names() {
        assert!(is_valid_name("python3.11_x-y"));
        for bad in ["", "a b", "../x", "a/b", "é"] {
            assert!(!is_valid_name(bad), "{bad}");
            assert!(matches!(
                find_in(bad, &[]),
                Err(KernelSpecError::InvalidName { .. })
            ));
        }
    }

    #[test]
    fn list_skips_malformed_and_reports() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a/kernels");
        let b = tmp.path().join("b/kernels");
        put(&a, "zeta", &simple("Z"));
        put(&a, "broken", "{not json");
        put(&a, "empty", r#"{"argv": [], "display_name": "E"}"#);
        put(&b, "zeta", &simple("Z2"));
        put(&b, "alpha", &simple("A"));
        std::fs::create_dir_all(a.join("nojson")).unwrap();
        let (specs, errors) = list_in(&[a, b]);
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["alpha", "zeta"]);
        assert_eq!(specs[1].spec.display_name, "Z");
        assert_eq!(errors.len(), 2);
        assert!(errors
            .iter()
            .any(|e| matches!(e, KernelSpecError::Parse { .. })));
        assert!(errors
            .iter()
            .any(|e| matches!(e, KernelSpecError::Invalid { .. })));
    }

    #[test]
    fn unknown_keys_round_trip_and_write_is_atomic() {
        let tmp = tempfile::tempdir().unwrap();
        let src = put(
            tmp.path(),
            "x",
            r#"{"argv": ["k"], "display_name": "X", "language": "x",
                "interrupt_mode": "message", "kernel_protocol_version": "5.3",
                "metadata": {"debugger": true}, "env": {"A": "1"}}"#,
        );
        let spec = KernelSpec::from_file(&src.join("kernel.json")).unwrap();
        assert!(spec.interrupt_by_message());
        assert_eq!(spec.extra["kernel_protocol_version"], "5.3");
        let out = tmp.path().join("deep/new/dir");
        write_spec(&out, &spec).unwrap();
        let back = KernelSpec::from_file(&out.join("kernel.json")).unwrap();
        assert_eq!(back, spec);
        let files: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert_eq!(files.len(), 1, "no temp file left behind");
        // Overwrite in place.
        let mut spec2 = spec.clone();
        spec2.display_name = "Y".into();
        write_spec(&out, &spec2).unwrap();
        assert_eq!(
            KernelSpec::from_file(&out.join("kernel.json"))
                .unwrap()
                .display_name,
            "Y"
        );
    }

    #[test]
    fn bad_interrupt_mode_is_invalid() {
        let tmp = tempfile::tempdir().unwrap();
        let d = put(
            tmp.path(),
            "x",
            r#"{"argv": ["k"], "display_name": "X", "interrupt_mode": "sigint"}"#,
        );
        let e = KernelSpec::from_file(&d.join("kernel.json")).unwrap_err();
        assert!(e.to_string().contains("\"signal\" or \"message\""), "{e}");
    }

    #[test]
    fn install_dirs() {
        let env = env_of(&[("HOME", "/home/u"), ("VIRTUAL_ENV", "/venv")]);
        assert_eq!(
            install_dir_from(&InstallLocation::User, "Noyau-Py", &env).unwrap(),
            PathBuf::from("/home/u/.local/share/jupyter/kernels/noyau-py")
        );
        assert_eq!(
            install_dir_from(&InstallLocation::SysPrefix, "k", &env).unwrap(),
            PathBuf::from("/venv/share/jupyter/kernels/k")
        );
        assert_eq!(
            install_dir_from(&InstallLocation::Prefix("/p".into()), "k", &env).unwrap(),
            PathBuf::from("/p/share/jupyter/kernels/k")
        );
        assert!(matches!(
            install_dir_from(&InstallLocation::User, "k", &env_of(&[])),
            Err(KernelSpecError::NoHome)
        ));
        assert!(matches!(
            install_dir_from(&InstallLocation::User, "a/b", &env),
            Err(KernelSpecError::InvalidName { .. })
        ));
    }
}
