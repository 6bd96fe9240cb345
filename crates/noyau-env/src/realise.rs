//! From a spec to a command line: [`realise`] builds or checks the
//! environment once (slow: uv, `module load`, `guix describe`, hashing an
//! image) and returns a [`Realised`], whose [`Realised::command`] wraps
//! every kernel start (fast: no subprocess), so restarts cost nothing.
//!
//! Layers, outermost first: bubblewrap (isolation) → the modules shell →
//! guix/apptainer → the kernel's argv, whose interpreter is swapped for the
//! environment's when argv[0] is a `python*`.

use noyau_vars::EnvVars;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::cache::{Cache, FileLock};
use crate::data::DataFile;
use crate::{apptainer, data, guix, isolate, modules, prefix, python};
use crate::{EnvError, EnvSpec, Isolation, Kind};

#[derive(Debug, Clone)]
pub struct Realised {
    pub spec: EnvSpec,
    /// What was used: the spec, the lock and its hash, and kind-specific
    /// facts (python version, package list, `guix describe`, image digest).
    pub record: Value,
    /// The prefix whose `bin/python*` replaces a kernelspec's python.
    env_prefix: Option<PathBuf>,
    /// Shown read-only under isolation.
    ro_binds: Vec<PathBuf>,
    /// Data files, shown by name in `RUNTIME_DIR/data` (`NOYAU_DATA`).
    data: Vec<DataFile>,
    /// The in-use locks (shared) of the entry and data files, held while
    /// this lives (`noyau env gc` leaves them alone).
    holds: Vec<Arc<FileLock>>,
}

/// A python entry found or built: where, and its record.
pub(crate) struct Entry {
    pub cache: Cache,
    pub key: String,
    pub record: Value,
}

/// Builds (or finds in the cache) the environment for a normalised spec,
/// here: on the compute node for `build = "node"` or when nothing was
/// prepared; on the submitting host through [`crate::prepare()`].
pub fn realise(
    spec: &EnvSpec,
    cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<Realised, EnvError> {
    let entry = match spec.kind()? {
        Kind::Python => Some(python_entry(spec, cache, progress)?),
        _ => None,
    };
    assemble(spec, entry, Vec::new(), cache, progress)
}

/// Everything but the python entry: prefix, modules, guix, apptainer, and
/// the record; holds the entry (in use) for as long as the result lives.
pub(crate) fn assemble(
    spec: &EnvSpec,
    entry: Option<Entry>,
    data: Vec<DataFile>,
    cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<Realised, EnvError> {
    let mut ro_binds: Vec<PathBuf> = spec.ro_bind.clone();
    let mut env_prefix = None;
    let mut holds = hold_data(&data)?;
    let mut record = match (spec.kind()?, entry) {
        (Kind::Python, Some(e)) => {
            holds.extend(e.cache.hold(&e.key)?.map(Arc::new));
            let dir = e.cache.entry(&e.key);
            let venv = dir.join("venv");
            ro_binds.push(dir);
            ro_binds.extend(base_interpreter(&venv));
            env_prefix = Some(venv);
            e.record
        }
        (Kind::Prefix, _) => {
            let p = spec.prefix.clone().expect("normalised");
            let rec = prefix::record(&p)?;
            ro_binds.push(p.clone());
            ro_binds.extend(base_interpreter(&p));
            env_prefix = Some(p);
            rec
        }
        (Kind::Python, None) => unreachable!("a python spec comes with its entry"),
        (Kind::Modules, _) => json!({"kind": "modules"}),
        (Kind::System, _) => json!({"kind": "system"}),
        (Kind::Guix, _) => guix::record(spec, progress)?,
        (Kind::Apptainer, _) => apptainer::record(spec, cache, progress)?,
    };
    if !spec.modules.is_empty() {
        let checked = modules::check(spec, progress)?;
        record["modules"] = json!(spec.modules);
        record["module_list"] = json!(checked.list.trim());
        record["modules_tool"] = json!(checked.tool);
    }
    let mut shown = spec.clone();
    shown.notebook_dir = None;
    if let Value::Object(m) = &mut record {
        m.insert("spec".into(), shown.to_value());
    }
    Ok(Realised {
        spec: spec.clone(),
        record,
        env_prefix,
        ro_binds,
        data,
        holds,
    })
}

fn hold_data(data: &[DataFile]) -> Result<Vec<Arc<FileLock>>, EnvError> {
    let mut holds = Vec::new();
    for d in data {
        holds.extend(d.hold()?.map(Arc::new));
    }
    Ok(holds)
}

/// The base interpreter's prefix of a venv (pyvenv.cfg's `home`'s parent).
fn base_interpreter(venv: &Path) -> Option<PathBuf> {
    let home = python::pyvenv_cfg(venv, "home")?;
    Path::new(&home).parent().map(Path::to_path_buf)
}

/// The finished entry for a python spec: the site's (`NOYAU_ENV_SITE_CACHE`),
/// else found in `cache` or built there; when something there is not to be
/// trusted (planted by another user of a shared cache), built in the
/// user's own cache instead, saying why.
pub(crate) fn python_entry(
    spec: &EnvSpec,
    cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<Entry, EnvError> {
    let key = spec.cache_key();
    if let Some(site) = crate::cache::site_cache() {
        match site.lookup(&key) {
            Ok(Some(record)) => {
                progress(&format!(
                    "using the site's environment {key} in {}",
                    site.root().display()
                ));
                return Ok(Entry {
                    cache: site,
                    key,
                    record,
                });
            }
            Ok(None) => {}
            Err(why) => {
                let said = format!("not using the site cache's entry: {why}");
                tracing::warn!("{said}");
                progress(&said);
            }
        }
    }
    match entry_in(spec, cache, cache, progress) {
        Err(EnvError::Untrusted(why)) => {
            let own = Cache::new(crate::cache::private_root());
            if crate::cache::same_dir(own.root(), cache.root()) {
                return Err(EnvError::Untrusted(why));
            }
            let said = format!(
                "refusing the shared cache's entry: {why}; building it in your own cache {} instead",
                own.root().display()
            );
            tracing::warn!("{said}");
            progress(&said);
            let record = entry_in(spec, &own, cache, progress)?;
            Ok(Entry {
                cache: own,
                key,
                record,
            })
        }
        Ok(record) => Ok(Entry {
            cache: cache.clone(),
            key,
            record,
        }),
        Err(e) => Err(e),
    }
}

/// uv from `uv_cache` (the shared cache's uv when it is trusted, else the
/// one in `cache`), online or offline.
pub(crate) fn find_uv(
    cache: &Cache,
    uv_cache: &Cache,
    offline: bool,
    progress: crate::Progress<'_>,
) -> Result<python::Uv, EnvError> {
    let path = match python::find_uv(uv_cache, progress) {
        Err(EnvError::Untrusted(_)) if !crate::cache::same_dir(uv_cache.root(), cache.root()) => {
            python::find_uv(cache, progress)?
        }
        other => other?,
    };
    let mut uv = python::Uv::new(path);
    uv.offline = offline;
    Ok(uv)
}

/// Finds or builds the entry of `spec` in `cache`, with uv from `uv_cache`.
fn entry_in(
    spec: &EnvSpec,
    cache: &Cache,
    uv_cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<Value, EnvError> {
    let key = spec.cache_key();
    if let Some(rec) = cache.lookup(&key)? {
        return Ok(rec);
    }
    let uv = find_uv(cache, uv_cache, false, progress)?;
    progress(&format!(
        "building the Python environment {key} in {} on {}",
        cache.root().display(),
        crate::hostname()
    ));
    let rec = build_entry(spec, &key, cache, &uv, progress)?;
    progress("environment ready");
    Ok(rec)
}

/// Builds `spec` with `uv` into `cache` under `key` (or finds it built).
pub(crate) fn build_entry(
    spec: &EnvSpec,
    key: &str,
    cache: &Cache,
    uv: &python::Uv,
    progress: crate::Progress<'_>,
) -> Result<Value, EnvError> {
    let (_, rec) = cache
        .get_or_build(key, progress, |dir, p| {
            // The record names the entry it is in (an offline rebuild of a
            // lock goes in under the key it was prepared with).
            python::build(spec, uv, dir, p).map(|mut r| {
                r["key"] = json!(key);
                r
            })
        })
        .map_err(|e| match e {
            EnvError::Build { summary, output } => EnvError::Build {
                summary: format!(
                    "the Python environment could not be built: {summary}; nothing was cached; fix the spec and try again"
                ),
                output,
            },
            other => other,
        })?;
    Ok(rec)
}

fn is_python(arg0: &str) -> bool {
    Path::new(arg0)
        .file_name()
        .map(|n| n.to_string_lossy().starts_with("python"))
        .unwrap_or(false)
}

impl Realised {
    /// No environment: the kernelspec as it is, with data files only.
    pub fn plain(data: Vec<DataFile>) -> Result<Realised, EnvError> {
        Ok(Realised {
            spec: EnvSpec {
                kind: Some(Kind::System),
                ..EnvSpec::default()
            },
            record: Value::Null,
            env_prefix: None,
            ro_binds: Vec::new(),
            holds: hold_data(&data)?,
            data,
        })
    }

    /// The data files the kernel sees.
    pub fn data(&self) -> &[DataFile] {
        &self.data
    }

    /// Shows one more data file to a running kernel (`%noyau data` in a
    /// cell), in the directory [`Realised::command`] made.
    pub fn add_data(&mut self, file: DataFile, runtime_dir: &Path) -> Result<(), EnvError> {
        data::expose(&runtime_dir.join("data"), std::slice::from_ref(&file))?;
        self.holds.extend(file.hold()?.map(Arc::new));
        self.data.retain(|d| d.name != file.name);
        self.data.push(file);
        Ok(())
    }

    /// True when [`Realised::command`] starts the kernel in a session of
    /// its own below a wrapper (bubblewrap's `--new-session`): a signal for
    /// the kernel's process group must go to the group inside
    /// (`noyau_client::process::KernelProcess::signal_inner_session`).
    pub fn own_session(&self) -> bool {
        let own_container = matches!(self.spec.kind(), Ok(Kind::Guix | Kind::Apptainer));
        self.spec.isolation == Isolation::Container && !own_container
    }

    /// The argv and environment that start `argv` (the kernelspec's,
    /// expanded) with `env` inside this environment. `runtime_dir` is the
    /// agent's private directory holding the connection file and sockets;
    /// its `data/` holds the data files by name (`NOYAU_DATA`).
    pub fn command(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        runtime_dir: &Path,
    ) -> Result<(Vec<String>, BTreeMap<String, String>), EnvError> {
        let mut argv = argv.to_vec();
        let mut env = env.clone();
        let kind = self.spec.kind()?;
        if let Some(p) = &self.env_prefix {
            let bin = p.join("bin");
            if let Some(a0) = argv.first_mut() {
                if is_python(a0) {
                    *a0 = bin.join("python").display().to_string();
                }
            }
            let old = env
                .get(EnvVars::PATH)
                .cloned()
                .or_else(|| std::env::var(EnvVars::PATH).ok())
                .unwrap_or_default();
            env.insert(EnvVars::PATH.into(), format!("{}:{old}", bin.display()));
            if p.join("conda-meta").is_dir() {
                env.insert("CONDA_PREFIX".into(), p.display().to_string());
            } else {
                env.insert(EnvVars::VIRTUAL_ENV.into(), p.display().to_string());
            }
        }
        let data_dir = runtime_dir.join("data");
        data::expose(&data_dir, &self.data)?;
        env.insert(EnvVars::NOYAU_DATA.into(), data_dir.display().to_string());
        if self.spec.isolation == Isolation::Container {
            isolate::check_writable(&self.spec)?;
        }
        let kernel_exe = argv.first().cloned();
        match kind {
            Kind::Guix => argv = guix::wrap(&self.spec, runtime_dir, argv),
            Kind::Apptainer => {
                (argv, env) = apptainer::wrap(&self.spec, runtime_dir, argv, env);
            }
            _ => {}
        }
        if !self.spec.modules.is_empty() {
            argv = modules::wrap(&self.spec, argv)?;
        }
        let own_container = matches!(kind, Kind::Guix | Kind::Apptainer);
        if self.spec.isolation == Isolation::Container && !own_container {
            // What the kernel's interpreter needs, from where it was before any wrapping.
            let mut ro = self.ro_binds.clone();
            ro.extend(self.data.iter().map(|d| d.store.clone()));
            ro.dedup();
            ro.extend(
                kernel_exe
                    .as_deref()
                    .map(isolate::exe_prefixes)
                    .unwrap_or_default(),
            );
            argv = isolate::wrap(&self.spec, runtime_dir, &ro, argv);
        }
        Ok((argv, env))
    }
}
