//! A run's environment and data files, prepared on this host (the
//! submitting one) before the kernel's job is submitted, and recorded in
//! the output.
//!
//! What the notebook declares ([`declared`]: `noyau.toml`, its metadata,
//! its `%noyau data` cells, `--env`) is built and fetched here
//! ([`prepare`], noyau-env's `prepare`), the lines shown on the progress
//! bar, and travels to the job in its environment. A run inside a job that
//! a sweep or `--detach` submitted finds what its submitting host prepared
//! in `NOYAU_ENV_PREPARED` and uses that, contacting no index from the
//! compute node.

use noyau_vars::EnvVars;
use std::path::Path;

use noyau_env::sources::Declared;
use noyau_env::Prepared;
use noyau_notebook::Notebook;
use noyau_trust::anchor::ProjectDir;
use serde_json::Value;

use crate::error::{bad, RunError};
use crate::progress::Progress;

/// Everything the notebook declares for its kernel.
pub fn declared(
    nb: &Notebook,
    nb_dir: &ProjectDir,
    env_arg: Option<&str>,
    cwd: &Path,
) -> Result<Declared, noyau_env::EnvError> {
    let sources = nb
        .cells
        .iter()
        .filter(|c| c.is_code())
        .map(|c| c.source.as_str());
    let metadata = Value::Object(nb.metadata.clone());
    noyau_env::sources::declared(nb_dir, Some(&metadata), sources, env_arg, cwd)
}

/// What the submitting host prepared, when this run is a job it submitted.
fn inherited() -> Option<Prepared> {
    let json = std::env::var(EnvVars::NOYAU_ENV_PREPARED).ok()?;
    match Prepared::from_json(&json) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", EnvVars::NOYAU_ENV_PREPARED);
            None
        }
    }
}

/// Builds and fetches `declared` here (or takes what was inherited), each
/// line shown on `progress`; the job environment that carries it.
pub async fn prepare(
    declared: &Declared,
    progress: &Progress,
) -> Result<(Prepared, std::collections::BTreeMap<String, String>), RunError> {
    let prepared = match inherited() {
        Some(p) => p,
        None if declared.spec.is_none() && declared.data.is_empty() => Prepared::default(),
        None => noyau_client::prepare::prepare(declared, |line| progress.environment(line))
            .await
            .map_err(|e| bad(format!("the notebook's environment: {e}")))?,
    };
    let env = noyau_client::prepare::job_env(declared.spec.as_ref(), &prepared);
    Ok((prepared, env))
}

/// For a job that runs the notebook itself (the points of a sweep, a
/// `--detach` run): prepared here, before it is submitted; the job's
/// runner finds the result in `NOYAU_ENV_PREPARED`.
pub async fn for_job(
    nb: &Notebook,
    nb_dir: &ProjectDir,
    env_arg: Option<&str>,
    show: bool,
) -> Result<std::collections::BTreeMap<String, String>, RunError> {
    let cwd =
        std::env::current_dir().map_err(RunError::io("cannot read", "the current directory"))?;
    let d = declared(nb, nb_dir, env_arg, &cwd).map_err(|e| bad(e.to_string()))?;
    let (_, mut env) = prepare(&d, &Progress::new(show, 0)).await?;
    env.retain(|k, _| k == EnvVars::NOYAU_ENV_PREPARED);
    Ok(env)
}

/// `metadata.noyau.data` of the output: each data file with its hash.
pub fn record(nb: &mut Notebook, prepared: &Prepared) {
    if prepared.data.is_empty() {
        return;
    }
    if let Some(noyau) = nb.metadata.get_mut("noyau") {
        noyau["data"] = prepared.data_record();
    }
}

/// What a `%noyau data` cell of a run says: the file was prepared before
/// the kernel started.
pub fn data_cell(prepared: &Prepared, args: &[String]) -> Result<String, noyau_magic::MagicError> {
    let data_error = |e: String| noyau_magic::MagicError::Data(e);
    let r = noyau_env::data::parse_magic(&args.join(" "), Path::new("."))
        .map_err(|e| data_error(e.to_string()))?;
    prepared
        .data
        .iter()
        .find(|f| f.name == r.name && f.sha256 == r.sha256)
        .map(noyau_env::DataFile::shown)
        .ok_or_else(|| {
            data_error(format!(
                "data file {} was not prepared for this run",
                r.name
            ))
        })
}
