//! Handing an agent from one proxy process to the next.
//!
//! A frontend restarts a kernel by ending the kernel process and starting a
//! new one with the same connection file. For noyau that process is the
//! proxy, but the allocation (and so the agent) should survive. The leaving
//! proxy writes a handover record (0600, in the private runtime directory,
//! named after the connection file) with the link's address, certificate and
//! a fresh one-time token it has also sent to the agent; the next proxy for
//! the same connection file takes the record, listens on the same address
//! (on the very socket, which a keeper held in between: [`crate::keeper`])
//! with the same certificate, and the agent dials in with that token.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use noyau_link::ServerIdentity;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    pub link_addr: std::net::SocketAddr,
    pub advertise: String,
    pub identity: ServerIdentity,
    pub token: String,
    pub agent_pid: Option<u32>,
    pub backend: String,
    pub job_id: String,
    pub written_at: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Why a record cannot be placed or written.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(transparent)]
    Runtime(#[from] noyau_client::runtime::RuntimeDirError),
    #[error("cannot resolve {path}: {source}")]
    Resolve {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The record's path for a connection file (same file → same record).
pub fn path_for(connection_file: &Path) -> Result<PathBuf, HandoverError> {
    let base = noyau_client::runtime::base_dir()?;
    let abs = std::fs::canonicalize(connection_file).map_err(|source| HandoverError::Resolve {
        path: connection_file.to_path_buf(),
        source,
    })?;
    let digest = Sha256::digest(abs.as_os_str().as_encoded_bytes());
    Ok(base.join(format!("handover-{}.json", &hex::encode(digest)[..32])))
}

pub fn write(path: &Path, h: &Handover) -> Result<(), HandoverError> {
    let tmp = path.with_extension("tmp");
    let created = noyau_trust::create_private(&tmp, 0o600).map_err(std::io::Error::from);
    let written = created.and_then(|mut f| {
        let json = serde_json::to_vec(h).map_err(std::io::Error::other)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    });
    written.map_err(|source| HandoverError::Write {
        path: tmp.clone(),
        source,
    })
}

/// Takes (reads and removes) a record not older than `max_age`.
pub fn take(path: &Path, max_age: Duration) -> Option<Handover> {
    use std::io::Read;
    // It holds a link token and the certificate's key: one that others could
    // have read or written (or a link to one) is not used.
    let opened = noyau_trust::Expect::file().open(path);
    if opened.as_ref().is_err_and(|e| e.is_not_found()) {
        return None;
    }
    let _ = std::fs::remove_file(path);
    let mut text = Vec::new();
    let read = opened.and_then(|mut f| {
        f.read_to_end(&mut text)
            .map_err(|e| noyau_trust::TrustError::io("read", path, e))
    });
    if let Err(e) = read {
        tracing::warn!("ignoring handover record: {e}; starting a new agent");
        return None;
    }
    let h: Handover = match serde_json::from_slice(&text) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(
                "ignoring unreadable handover record {}: {e}",
                path.display()
            );
            return None;
        }
    };
    if now().saturating_sub(h.written_at) > max_age.as_secs() {
        tracing::info!(
            "handover record {} is stale; starting a new agent",
            path.display()
        );
        return None;
    }
    Some(h)
}

pub fn stamp() -> u64 {
    now()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn record() -> Handover {
        sample("127.0.0.1:1".parse().unwrap())
    }

    /// A record of a local agent's link at `link_addr` (for agent.rs's tests too).
    pub(crate) fn sample(link_addr: std::net::SocketAddr) -> Handover {
        Handover {
            link_addr,
            advertise: "localhost".into(),
            identity: ServerIdentity::generate(&[]).unwrap(),
            token: "t".into(),
            agent_pid: None,
            backend: "local".into(),
            job_id: "1".into(),
            written_at: stamp(),
        }
    }

    #[test]
    fn a_record_others_can_read_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("handover.json");
        write(&p, &record()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(take(&p, Duration::from_secs(60)).is_none());
        assert!(!p.exists(), "a refused record is removed");
        write(&p, &record()).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(take(&p, Duration::from_secs(60)).unwrap().token, "t");
        // A link to a record of ours: not followed, not used.
        let real = dir.path().join("real.json");
        write(&real, &record()).unwrap();
        std::os::unix::fs::symlink(&real, &p).unwrap();
        assert!(take(&p, Duration::from_secs(60)).is_none());
        assert!(!p.exists(), "a refused link is removed");
    }
}
