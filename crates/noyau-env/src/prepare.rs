//! Build where the network is, run where the cores are.
//!
//! The submitting host (the login node: `noyau run`, `noyau sweep`, the
//! `noyau kernel` proxy, the hub) calls [`prepare()`] before it submits the
//! job: a `python` spec is resolved, locked and built into the shared cache
//! there (uv with the site's index and proxy, [`crate::index`]), and every
//! declared data file is fetched into the store ([`crate::data`]). What the
//! job needs to find and check them offline is a small [`Prepared`] (the
//! entry's key, cache, lock hash and record hash; each data file's store
//! path, hash and size), which travels in the job's environment
//! (`NOYAU_ENV_PREPARED`) next to the spec.
//!
//! The job calls [`realise_job`]: the entry must be there, trusted, its
//! record naming the key and the lock it was prepared with; nothing
//! contacts an index. When it is missing on the node (the cache is not on a
//! filesystem the node shares, or `noyau env gc` removed it meanwhile) the
//! lock is installed with uv `--offline`, from uv's own cache, and the
//! error, if that fails too, says where the cache must be. `build = "node"`
//! in the spec skips the submitting host: the job builds as before, and an
//! index it cannot reach is named in the error.

use noyau_vars::EnvVars;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::Cache;
use crate::data::{DataFile, DataRef};
use crate::index::Network;
use crate::realise::{assemble, build_entry, find_uv, python_entry, Entry, Realised};
use crate::spec::BuildAt;
use crate::{EnvError, EnvSpec, Kind};

/// What the submitting host prepared, for the job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Prepared {
    /// The host that prepared it.
    pub host: String,
    /// The python entry, when the spec is built on the submitting host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<PreparedEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<DataFile>,
}

/// A cache entry the job is to use as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreparedEntry {
    pub key: String,
    /// The cache holding it (a path the compute nodes share).
    pub cache: std::path::PathBuf,
    /// The cache is the site's (only its owner is trusted).
    #[serde(default)]
    pub site: bool,
    /// The resolved lock: what an offline rebuild installs.
    pub lock: String,
    pub lock_sha256: String,
    /// sha256 of the entry's record (its build), for the record.
    pub record_sha256: String,
    /// The indexes it was built from, without credentials (the record's
    /// `network`): an offline install finds their files in uv's cache.
    #[serde(default)]
    pub network: Value,
}

impl Prepared {
    /// As it travels in `NOYAU_ENV_PREPARED`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("Prepared serialises")
    }

    pub fn from_json(s: &str) -> Result<Prepared, EnvError> {
        serde_json::from_str(s).map_err(|e| {
            EnvError::Invalid(format!(
                "{}: not what `noyau` prepared: {e}",
                EnvVars::NOYAU_ENV_PREPARED
            ))
        })
    }

    /// `metadata.noyau.data` of an output notebook.
    pub fn data_record(&self) -> Value {
        Value::Array(self.data.iter().map(DataFile::record).collect())
    }
}

/// Prepares `spec` (when given) and `data` here, into `cache`.
pub fn prepare(
    spec: Option<&EnvSpec>,
    data: &[DataRef],
    cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<Prepared, EnvError> {
    let mut out = Prepared {
        host: crate::hostname(),
        ..Prepared::default()
    };
    if let Some(spec) = spec.filter(|s| builds_here(s)) {
        let e = python_entry(spec, cache, progress)?;
        out.entry = Some(prepared_entry(&e)?);
    }
    let net = Network::from_env();
    for r in data {
        out.data
            .push(crate::data::prepare(r, cache, &net, progress)?);
    }
    Ok(out)
}

/// True when `spec` is built on the submitting host.
pub fn builds_here(spec: &EnvSpec) -> bool {
    spec.build == BuildAt::Submit && matches!(spec.kind(), Ok(Kind::Python))
}

fn prepared_entry(e: &Entry) -> Result<PreparedEntry, EnvError> {
    // A use: `noyau env gc` counts from here.
    drop(e.cache.hold(&e.key)?);
    let bytes = e.cache.lookup_bytes(&e.key)?.ok_or_else(|| {
        EnvError::Invalid(format!(
            "the entry {} vanished from {} right after it was built",
            e.key,
            e.cache.root().display()
        ))
    })?;
    let s = |k: &str| {
        e.record
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Ok(PreparedEntry {
        key: e.key.clone(),
        cache: std::path::absolute(e.cache.root())
            .map_err(|err| EnvError::io(format!("resolving {}", e.cache.root().display()), err))?,
        site: e.cache.is_site(),
        lock: s("lock"),
        lock_sha256: s("lock_sha256"),
        record_sha256: crate::sha256_hex(&bytes),
        network: e.record["network"].clone(),
    })
}

/// In the job: the kernel's environment from what was prepared (`spec`
/// built on the node when nothing was, or for `build = "node"`), with the
/// prepared data files; None when there is neither.
pub fn realise_job(
    spec: Option<&EnvSpec>,
    prepared: Option<&Prepared>,
    cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<Option<Realised>, EnvError> {
    let data = prepared.map(|p| p.data.clone()).unwrap_or_default();
    for d in &data {
        d.check()?;
    }
    let Some(spec) = spec else {
        return if data.is_empty() {
            Ok(None)
        } else {
            Realised::plain(data).map(Some)
        };
    };
    let entry = match (spec.kind()?, prepared.and_then(|p| p.entry.as_ref())) {
        (Kind::Python, Some(pe)) if spec.build == BuildAt::Submit => {
            let host = prepared.map(|p| p.host.as_str()).unwrap_or("?");
            Some(use_prepared(spec, pe, host, progress)?)
        }
        (Kind::Python, _) => {
            if spec.build == BuildAt::Node {
                progress(&format!(
                    "build = \"node\": building the environment here, on {}",
                    crate::hostname()
                ));
            }
            Some(python_entry(spec, cache, progress)?)
        }
        _ => None,
    };
    assemble(spec, entry, data, cache, progress).map(Some)
}

/// The prepared entry, checked; installed offline from its lock when it
/// is not in the cache on this node.
fn use_prepared(
    spec: &EnvSpec,
    pe: &PreparedEntry,
    host: &str,
    progress: crate::Progress<'_>,
) -> Result<Entry, EnvError> {
    let cache = if pe.site {
        Cache::site(&pe.cache)
    } else {
        Cache::new(&pe.cache)
    };
    let found = cache.lookup_bytes(&pe.key)?;
    let record = match found {
        Some(bytes) => {
            let record: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let lock_sha = record.get("lock_sha256").and_then(Value::as_str);
            if lock_sha != Some(pe.lock_sha256.as_str()) {
                return Err(EnvError::Invalid(format!(
                    "the environment {} in {} is not the one prepared on {host}: its lock's sha256 is {}, \
                     not {}; submit again (the submitting host prepares it anew)",
                    pe.key,
                    cache.root().display(),
                    lock_sha.unwrap_or("missing"),
                    pe.lock_sha256
                )));
            }
            if crate::sha256_hex(&bytes) != pe.record_sha256 {
                progress(&format!(
                    "the environment {} was rebuilt from the same lock since it was prepared; using it",
                    pe.key
                ));
            }
            progress(&format!(
                "using the environment {} prepared on {host} (lock sha256 {}…), offline",
                pe.key,
                &pe.lock_sha256[..pe.lock_sha256.len().min(12)]
            ));
            record
        }
        None => install_offline(spec, pe, &cache, host, progress)?,
    };
    Ok(Entry {
        cache,
        key: pe.key.clone(),
        record,
    })
}

/// The entry is not where it was prepared (as seen from this node): its
/// lock, installed with uv `--offline` into the same place.
fn install_offline(
    spec: &EnvSpec,
    pe: &PreparedEntry,
    cache: &Cache,
    host: &str,
    progress: crate::Progress<'_>,
) -> Result<Value, EnvError> {
    let missing = format!(
        "the environment {} prepared on {host} is not in {} on this node ({})",
        pe.key,
        cache.root().display(),
        crate::hostname()
    );
    progress(&format!(
        "{missing}; installing its lock offline, from uv's cache"
    ));
    let mut locked = spec.clone();
    locked.lock = Some(pe.lock.clone());
    locked.requirements.clear();
    let built = if cache.is_site() {
        Err(EnvError::Invalid("the site's cache is read-only".into()))
    } else {
        find_uv(cache, cache, true, progress).and_then(|mut uv| {
            uv.network = Network::recorded(&pe.network);
            build_entry(&locked, &pe.key, cache, &uv, progress)
        })
    };
    built.map_err(|e| EnvError::Build {
        summary: format!(
            "{missing}, and it could not be installed offline: put NOYAU_ENV_CACHE on a filesystem \
             the compute nodes share, or set build = \"node\" under [environment] if they can reach \
             a package index"
        ),
        output: e.to_string(),
    })
}
