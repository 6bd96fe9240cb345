//! From a spec to a command line: [`realise`] builds or checks the
//! environment once (slow: uv, `module load`, `guix describe`, hashing an
//! image) and returns a [`Realised`], whose [`Realised::command`] wraps
//! every kernel start (fast: no subprocess), so restarts cost nothing.
//!
//! Layers, outermost first: bubblewrap (isolation) → the modules shell →
//! guix/apptainer → the kernel's argv, whose interpreter is swapped for the
//! environment's when argv[0] is a `python*`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::cache::Cache;
use crate::{apptainer, guix, isolate, modules, prefix, python};
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
}

/// Builds (or finds in the cache) the environment for a normalised spec.
pub fn realise(
    spec: &EnvSpec,
    cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<Realised, EnvError> {
    let kind = spec.kind()?;
    let mut ro_binds: Vec<PathBuf> = spec.ro_bind.clone();
    let mut env_prefix = None;
    let mut record = match kind {
        Kind::Python => {
            let (entry, rec) = python_entry(spec, cache, progress)?;
            let venv = entry.join("venv");
            ro_binds.push(entry.clone());
            if let Some(home) = python::pyvenv_cfg(&venv, "home") {
                if let Some(base) = Path::new(&home).parent() {
                    ro_binds.push(base.to_path_buf());
                }
            }
            env_prefix = Some(venv);
            rec
        }
        Kind::Prefix => {
            let p = spec.prefix.clone().expect("normalised");
            let rec = prefix::record(&p)?;
            ro_binds.push(p.clone());
            if let Some(home) = python::pyvenv_cfg(&p, "home") {
                if let Some(base) = Path::new(&home).parent() {
                    ro_binds.push(base.to_path_buf());
                }
            }
            env_prefix = Some(p);
            rec
        }
        Kind::Modules => json!({"kind": "modules"}),
        Kind::System => json!({"kind": "system"}),
        Kind::Guix => guix::record(spec, progress)?,
        Kind::Apptainer => apptainer::record(spec, cache, progress)?,
    };
    if !spec.modules.is_empty() {
        let list = modules::check(spec, progress)?;
        record["modules"] = json!(spec.modules);
        record["module_list"] = json!(list.trim());
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
    })
}

/// The finished entry for a python spec: found in `cache` or built there;
/// when something there is not to be trusted (planted by another user of
/// a shared cache), built in the user's own cache instead, saying why.
fn python_entry(
    spec: &EnvSpec,
    cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<(PathBuf, Value), EnvError> {
    match entry_in(spec, cache, cache, progress) {
        Err(EnvError::Untrusted(why)) => {
            let own = Cache::new(crate::cache::private_root());
            if same_dir(own.root(), cache.root()) {
                return Err(EnvError::Untrusted(why));
            }
            let said = format!(
                "refusing the shared cache's entry: {why}; building it in your own cache {} instead",
                own.root().display()
            );
            tracing::warn!("{said}");
            progress(&said);
            entry_in(spec, &own, cache, progress)
        }
        other => other,
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Finds or builds the entry in `cache`, with uv from `uv_cache` (the
/// shared cache's uv when it is trusted, else the user's own).
fn entry_in(
    spec: &EnvSpec,
    cache: &Cache,
    uv_cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<(PathBuf, Value), EnvError> {
    let key = spec.cache_key();
    if let Some(rec) = cache.lookup(&key)? {
        return Ok((cache.entry(&key), rec));
    }
    let uv = match python::find_uv(uv_cache, progress) {
        Err(EnvError::Untrusted(_)) if !same_dir(uv_cache.root(), cache.root()) => {
            python::find_uv(cache, progress)?
        }
        other => other?,
    };
    progress(&format!(
        "building the Python environment {key} in {}",
        cache.root().display()
    ));
    let r = cache
        .get_or_build(&key, progress, |dir, p| python::build(spec, &uv, dir, p))
        .map_err(|e| match e {
            EnvError::Build { summary, output } => EnvError::Build {
                summary: format!(
                    "the Python environment could not be built: {summary}; nothing was cached; fix the spec and try again"
                ),
                output,
            },
            other => other,
        })?;
    progress("environment ready");
    Ok(r)
}

fn is_python(arg0: &str) -> bool {
    Path::new(arg0)
        .file_name()
        .map(|n| n.to_string_lossy().starts_with("python"))
        .unwrap_or(false)
}

impl Realised {
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
    /// agent's private directory holding the connection file and sockets.
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
                .get("PATH")
                .cloned()
                .or_else(|| std::env::var("PATH").ok())
                .unwrap_or_default();
            env.insert("PATH".into(), format!("{}:{old}", bin.display()));
            if p.join("conda-meta").is_dir() {
                env.insert("CONDA_PREFIX".into(), p.display().to_string());
            } else {
                env.insert("VIRTUAL_ENV".into(), p.display().to_string());
            }
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
