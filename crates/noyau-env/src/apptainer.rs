//! `apptainer`: `apptainer exec --cleanenv [--nv] --bind RUNTIME_DIR
//! --bind NOTEBOOK_DIR IMAGE KERNEL…`, recording the image's digest.
//!
//! `--cleanenv` keeps the host's environment out; the kernel's own
//! variables go in as `APPTAINERENV_NAME`, which Apptainer passes through.
//! Under `isolation = "container"`, `--containall` is added (no home, its
//! own /tmp, IPC and PID namespaces; the binds stay) and, unless
//! `network = true`, `--net --network none` (a network namespace with only
//! a loopback, which `allow net none` in apptainer.conf lets any user ask
//! for).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use noyau_trust::TrustError;
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
        if !spec.network {
            v.extend(["--net".into(), "--network".into(), "none".into()]);
        }
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
/// file changes its identity, so it is hashed again. The memo is the
/// environment's provenance and may be in a shared cache: one that is not
/// what the cache's entries must be ([`read_memo`]) is not used.
fn file_digest(
    image: &str,
    cache: &Cache,
    progress: crate::Progress<'_>,
) -> Result<String, EnvError> {
    let meta = std::fs::metadata(image)
        .map_err(|e| EnvError::Invalid(format!("cannot open the image {image}: {e}")))?;
    let memo = memo_path(cache, image, &meta);
    if let Some(d) = read_memo(cache, &memo, progress) {
        return Ok(d);
    }
    progress(&format!("hashing the image {image}"));
    let digest = format!("sha256:{}", crate::data::sha256_file(Path::new(image))?);
    write_memo(cache, &memo, &digest, progress);
    Ok(digest)
}

/// Where the digest of `image` (with this metadata) is remembered.
fn memo_path(cache: &Cache, image: &str, meta: &std::fs::Metadata) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
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
    cache
        .root()
        .join(MEMOS)
        .join(crate::sha256_hex(identity.as_bytes()))
}

/// The memos' directory in the cache.
const MEMOS: &str = "image-digests";

/// The longest memo read: `sha256:` and 64 hex digits, and a newline.
const MEMO_MAX: u64 = 80;

/// The remembered digest, if there is one to trust: in a directory and a
/// file as the cache's entries must be (the user's or the cache owner's,
/// writable by no one else, not links; so never a FIFO to wait on), the
/// file with no other name (a hard link to a memo of another image) and
/// holding a digest. Anything else is said and ignored: the image is
/// hashed again.
fn read_memo(cache: &Cache, memo: &Path, progress: crate::Progress<'_>) -> Option<String> {
    let dir = memo.parent()?;
    let read = cache
        .expect(true)
        .and_then(|e| e.check(dir))
        .and_then(|_| cache.expect(false)?.open(memo));
    let why = match read {
        Err(e) if e.is_not_found() => return None,
        Err(e) => e.to_string(),
        Ok(f) => match memo_digest(f) {
            Ok(d) => return Some(d),
            Err(why) => format!("{} {why}", memo.display()),
        },
    };
    let said =
        format!("warning: not using the image's remembered digest ({why}); hashing it again");
    tracing::warn!("{said}");
    progress(&said);
    None
}

/// The digest a memo file holds, or what is wrong with it.
fn memo_digest(f: std::fs::File) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let links = f.metadata().map_err(|e| e.to_string())?.nlink();
    if links != 1 {
        return Err(format!("has {links} names (hard links)"));
    }
    let mut text = String::new();
    f.take(MEMO_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot be read: {e}"))?;
    let d = text.trim_end();
    let hex = d.strip_prefix("sha256:").unwrap_or_default();
    if text.len() as u64 > MEMO_MAX
        || hex.len() != 64
        || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err("does not hold a sha256 digest".into());
    }
    Ok(d.to_string())
}

/// Remembers `digest` at `memo`: written to a new file of the user's under
/// a random name (never through a link planted at a name known in
/// advance), then renamed into place (`noyau_trust::replace`). Losing the
/// memo only costs the next start a hash: a failure is said, not an error.
fn write_memo(cache: &Cache, memo: &Path, digest: &str, progress: crate::Progress<'_>) {
    let Some(dir) = memo.parent() else { return };
    let written = make_memo_dir(cache, dir)
        .and_then(|()| noyau_trust::replace(memo, digest.as_bytes(), 0o644));
    if let Err(e) = written {
        let said = format!("warning: the image's digest is not remembered: {e}");
        tracing::warn!("{said}");
        progress(&said);
    }
}

/// Makes the memos' directory (0755: no group write even under a group
/// cache's umask 002) and checks it as [`read_memo`] does, once the cache's
/// home is checked (nothing is made in one another user made).
fn make_memo_dir(cache: &Cache, dir: &Path) -> Result<(), TrustError> {
    use std::os::unix::fs::DirBuilderExt;
    let expect = cache.expect(true)?;
    std::fs::create_dir_all(cache.root())
        .and_then(
            |_| match std::fs::DirBuilder::new().mode(0o755).create(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                made => made,
            },
        )
        .map_err(|e| TrustError::io("create", dir, e))?;
    expect.check(dir).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    /// A small file standing in for a `.sif` image (no Apptainer runtime
    /// here: only its digest is computed), its true digest, its memo's path.
    fn image(dir: &Path, cache: &Cache) -> (String, String, PathBuf) {
        let image = dir.join("img.sif");
        std::fs::write(&image, b"not really an image").unwrap();
        let image = image.display().to_string();
        let truth = format!(
            "sha256:{}",
            crate::sha256_hex(b"not really an image".as_slice())
        );
        let memo = memo_path(cache, &image, &std::fs::metadata(&image).unwrap());
        std::fs::create_dir_all(memo.parent().unwrap()).unwrap();
        (image, truth, memo)
    }

    /// `file_digest` with a deadline (a FIFO read would block it forever),
    /// and what it said.
    fn digest(image: &str, cache: &Cache) -> (String, Vec<String>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (image, cache) = (image.to_string(), cache.clone());
        std::thread::spawn(move || {
            let mut said = Vec::new();
            let d = file_digest(&image, &cache, &mut |l: &str| said.push(l.to_string()));
            let _ = tx.send((d.unwrap(), said));
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the image's digest was not computed within 30 s (blocked on the memo?)")
    }

    /// The command line only: no Apptainer runtime here (a stand-in for
    /// running it).
    #[test]
    fn a_contained_image_has_no_network_unless_asked() {
        let argv = |network: bool| {
            let spec = EnvSpec::from_value(json!({"image": "img.sif", "notebook_dir": "/nb",
                "isolation": "container", "network": network}))
            .unwrap();
            wrap(
                &spec,
                Path::new("/run/k"),
                vec!["python".into()],
                BTreeMap::new(),
            )
            .0
        };
        let off = argv(false);
        let net = off.iter().position(|a| a == "--net").expect("--net");
        assert_eq!(off[net + 1..net + 3], ["--network", "none"]);
        assert!(net < off.iter().position(|a| a == "img.sif").unwrap());
        assert!(!argv(true).iter().any(|a| a.starts_with("--net")));
    }

    /// An image a notebook names that is a FIFO or a device is refused at
    /// once: hashing it would block the kernel's start, or never end.
    #[test]
    fn an_image_that_is_a_fifo_or_a_device_is_refused_without_waiting() {
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::new(t.path().join("cache"));
        let fifo = t.path().join("img.sif");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        for image in [fifo.display().to_string(), "/dev/zero".into()] {
            let e = file_digest(&image, &cache, &mut |_: &str| {}).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{image}: {e}");
        }
    }

    #[test]
    fn a_planted_memo_is_never_trusted_nor_waited_on() {
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::new(t.path().join("cache"));
        let (image, truth, memo) = image(t.path(), &cache);
        let forged = format!("sha256:{}", "f".repeat(64));
        // A FIFO: read, it would block the kernel's start forever.
        let c = std::ffi::CString::new(memo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let (d, said) = digest(&image, &cache);
        assert_eq!(d, truth);
        assert!(said.iter().any(|l| l.contains("is a FIFO")), "{said:?}");
        // A symlink to a file of forged digest: not followed, and replaced
        // by the memo without writing where it led.
        std::fs::remove_file(&memo).unwrap();
        let elsewhere = t.path().join("elsewhere");
        std::fs::write(&elsewhere, &forged).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &memo).unwrap();
        let (d, said) = digest(&image, &cache);
        assert_eq!(d, truth);
        assert!(said.iter().any(|l| l.contains("is a symlink")), "{said:?}");
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), forged);
        // Remembered now, as a regular file of ours, and used.
        let meta = std::fs::symlink_metadata(&memo).unwrap();
        assert!(meta.is_file() && meta.permissions().mode() & 0o777 == 0o644);
        assert_eq!(std::fs::read_to_string(&memo).unwrap(), truth);
        let (d, said) = digest(&image, &cache);
        assert_eq!((d.as_str(), said.len()), (truth.as_str(), 0), "{said:?}");
        // Ours but not a digest, or a digest with another name (a hard link
        // to the memo of another image): ignored.
        std::fs::write(&memo, "sha256:<anything>").unwrap();
        let (d, said) = digest(&image, &cache);
        assert_eq!(d, truth);
        assert!(said.iter().any(|l| l.contains("does not hold")), "{said:?}");
        std::fs::remove_file(&memo).unwrap();
        std::fs::write(&elsewhere, &forged).unwrap();
        std::fs::hard_link(&elsewhere, &memo).unwrap();
        let (d, said) = digest(&image, &cache);
        assert_eq!(d, truth);
        assert!(said.iter().any(|l| l.contains("2 names")), "{said:?}");
    }

    #[test]
    fn a_memo_or_memo_dir_of_another_user_is_not_trusted() {
        if !noyau_trust::testing::root() {
            return;
        }
        const NOBODY: u32 = 65534;
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::new(t.path().join("cache"));
        let (image, truth, memo) = image(t.path(), &cache);
        std::fs::write(&memo, format!("sha256:{}", "0".repeat(64))).unwrap();
        std::os::unix::fs::chown(&memo, Some(NOBODY), None).unwrap();
        let (d, said) = digest(&image, &cache);
        assert_eq!(d, truth);
        assert!(
            said.iter().any(|l| l.contains("belongs to uid 65534")),
            "{said:?}"
        );
        // The memos' directory another user made first: neither read nor
        // written.
        std::os::unix::fs::chown(memo.parent().unwrap(), Some(NOBODY), None).unwrap();
        std::fs::remove_file(&memo).unwrap();
        let (d, said) = digest(&image, &cache);
        assert_eq!(d, truth);
        assert!(
            said.iter()
                .any(|l| l.contains("not remembered") && l.contains("65534")),
            "{said:?}"
        );
        assert!(!memo.exists());
    }
}
