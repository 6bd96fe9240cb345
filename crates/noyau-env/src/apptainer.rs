//! `apptainer`: `apptainer exec --cleanenv [--nv] --bind RUNTIME_DIR
//! --bind NOTEBOOK_DIR IMAGE KERNEL…`, recording the image's digest.
//!
//! `--cleanenv` keeps the host's environment out; the kernel's own
//! variables go in as `APPTAINERENV_NAME`, which Apptainer passes through.
//! Under `isolation = "container"`, `--containall` is added (no home, its
//! own /tmp, IPC and PID namespaces); the binds stay.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};

use crate::cache::Cache;
use crate::{EnvError, EnvSpec, Isolation};

pub fn wrap(
    spec: &EnvSpec,
    runtime_dir: &Path,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
) -> (Vec<String>, BTreeMap<String, String>) {
    let mut v = vec!["apptainer".to_string(), "exec".into(), "--cleanenv".into()];
    if spec.nv {
        v.push("--nv".into());
    }
    if spec.isolation == Isolation::Container {
        v.push("--containall".into());
    }
    let mut binds = vec![runtime_dir.to_path_buf(), spec.notebook_dir()];
    binds.extend(spec.scratch.clone());
    for b in binds {
        v.extend(["--bind".into(), b.display().to_string()]);
    }
    v.push(spec.image.clone().unwrap_or_default());
    v.extend(argv);
    let env = env
        .into_iter()
        .map(|(k, val)| (format!("APPTAINERENV_{k}"), val))
        .collect();
    (v, env)
}

/// The digest of the image: sha256 of a local file, or the URI (pinned when
/// it carries `@sha256:`).
pub fn record(
    spec: &EnvSpec,
    cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<Value, EnvError> {
    let image = spec.image.clone().unwrap_or_default();
    let digest = if image.contains("://") {
        image
            .split_once("@sha256:")
            .map(|(_, d)| format!("sha256:{d}"))
    } else {
        Some(file_digest(&image, cache, progress)?)
    };
    if digest.is_none() {
        progress(&format!(
            "warning: {image} is not pinned by digest (use IMAGE@sha256:… or a local .sif)"
        ));
    }
    Ok(json!({
        "kind": "apptainer",
        "image": image,
        "digest": digest,
        "lock": digest,
        "lock_sha256": digest.as_deref().map(|d| crate::sha256_hex(d.as_bytes())),
    }))
}

/// sha256 of a local image, remembered in the cache under the file's
/// identity (path, device, inode, size, mtime, ctime): an image of several
/// GB is read once, not at every kernel start. Rewriting or replacing the
/// file changes its identity, so it is hashed again.
fn file_digest(
    image: &str,
    cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<String, EnvError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(image)
        .map_err(|e| EnvError::Invalid(format!("cannot open the image {image}: {e}")))?;
    let identity = format!(
        "{image}\0{}:{}:{}:{}.{}:{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let memo = cache
        .root()
        .join("image-digests")
        .join(crate::sha256_hex(identity.as_bytes()));
    if let Some(d) = std::fs::read_to_string(&memo)
        .ok()
        .map(|d| d.trim().to_string())
        .filter(|d| d.starts_with("sha256:"))
    {
        return Ok(d);
    }
    progress(&format!("hashing the image {image}"));
    let mut f = std::fs::File::open(image)
        .map_err(|e| EnvError::Invalid(format!("cannot open the image {image}: {e}")))?;
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| EnvError::io(format!("reading {image}"), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = format!("sha256:{}", hex::encode(h.finalize()));
    // Losing the memo only costs the next start a hash: errors are ignored.
    if let Some(dir) = memo.parent() {
        let tmp = memo.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(dir).is_ok() && std::fs::write(&tmp, &digest).is_ok() {
            let _ = std::fs::rename(&tmp, &memo);
        }
    }
    Ok(digest)
}
