//! Connection files: where a kernel's five sockets are and which key signs
//! its messages.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use noyau_trust::{Expect, Mode, TrustError};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The five channels of a kernel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Shell,
    Control,
    Stdin,
    IoPub,
    Heartbeat,
}

impl Channel {
    pub const ALL: [Channel; 5] = [
        Channel::Shell,
        Channel::Control,
        Channel::Stdin,
        Channel::IoPub,
        Channel::Heartbeat,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Channel::Shell => "shell",
            Channel::Control => "control",
            Channel::Stdin => "stdin",
            Channel::IoPub => "iopub",
            Channel::Heartbeat => "hb",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot read connection file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connection file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("connection file {path} uses transport {transport:?}; only \"tcp\" and \"ipc\" are supported")]
    Transport { path: PathBuf, transport: String },
    #[error("connection file {path} uses signature scheme {scheme:?}; only \"hmac-sha256\" is supported")]
    Scheme { path: PathBuf, scheme: String },
    /// Not a regular file of ours, or (with a key) one others may read:
    /// whoever can read the key can run code in the kernel.
    #[error("connection file {0} (it holds the kernel's signing key)")]
    Untrusted(#[from] TrustError),
    #[error("cannot write connection file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A connection file's contents. Keys noyau does not know are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionInfo {
    #[serde(default = "default_transport")]
    pub transport: String,
    pub ip: String,
    pub shell_port: u16,
    pub iopub_port: u16,
    pub stdin_port: u16,
    pub control_port: u16,
    pub hb_port: u16,
    #[serde(default)]
    pub key: String,
    #[serde(default = "default_scheme")]
    pub signature_scheme: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_name: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn default_transport() -> String {
    "tcp".into()
}

fn default_scheme() -> String {
    "hmac-sha256".into()
}

impl ConnectionInfo {
    pub fn read(path: &Path) -> Result<Self, ConnectionError> {
        let read = |source| ConnectionError::Read {
            path: path.into(),
            source,
        };
        let mut file = Expect::file()
            .mode(Mode::Any)
            .open(path)
            .map_err(|e| match e {
                TrustError::Io { source, .. } => read(source),
                refused => refused.into(),
            })?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(read)?;
        let info: ConnectionInfo =
            serde_json::from_slice(&text).map_err(|source| ConnectionError::Parse {
                path: path.into(),
                source,
            })?;
        if info.transport != "tcp" && info.transport != "ipc" {
            return Err(ConnectionError::Transport {
                path: path.into(),
                transport: info.transport,
            });
        }
        if !info.key.is_empty() {
            Expect::file().check_meta(path, &file.metadata().map_err(read)?)?;
        }
        if !info.key.is_empty() && info.signature_scheme != "hmac-sha256" {
            return Err(ConnectionError::Scheme {
                path: path.into(),
                scheme: info.signature_scheme,
            });
        }
        Ok(info)
    }

    /// Writes the file with mode 0600: it holds the signing key.
    pub fn write(&self, path: &Path) -> Result<(), ConnectionError> {
        let err = |source| ConnectionError::Write {
            path: path.into(),
            source,
        };
        let text = serde_json::to_vec_pretty(self).expect("connection info serialises");
        // Only a refusal is "untrusted"; a missing directory or a full
        // disk is a failure to write.
        let mut f = noyau_trust::create_private(path, 0o600).map_err(|e| match e {
            TrustError::Io { source, .. } => err(source),
            refused => refused.into(),
        })?;
        f.write_all(&text).map_err(err)?;
        Ok(())
    }

    /// An ipc connection whose sockets live under `dir` (which the caller
    /// keeps 0700), with a fresh random key.
    pub fn new_ipc(dir: &Path, kernel_name: Option<String>) -> Self {
        ConnectionInfo {
            transport: "ipc".into(),
            ip: dir.join("kernel").to_string_lossy().into_owned(),
            shell_port: 1,
            iopub_port: 2,
            stdin_port: 3,
            control_port: 4,
            hb_port: 5,
            key: random_key(),
            signature_scheme: default_scheme(),
            kernel_name,
            extra: BTreeMap::new(),
        }
    }

    pub fn port(&self, channel: Channel) -> u16 {
        match channel {
            Channel::Shell => self.shell_port,
            Channel::Control => self.control_port,
            Channel::Stdin => self.stdin_port,
            Channel::IoPub => self.iopub_port,
            Channel::Heartbeat => self.hb_port,
        }
    }

    /// The ZeroMQ endpoint of a channel. For ipc, Jupyter names the socket
    /// file `{ip}-{port}`.
    pub fn endpoint(&self, channel: Channel) -> String {
        let port = self.port(channel);
        if self.transport == "ipc" {
            format!("ipc://{}-{}", self.ip, port)
        } else if self.ip.contains(':') {
            format!("tcp://[{}]:{}", self.ip, port)
        } else {
            format!("tcp://{}:{}", self.ip, port)
        }
    }

    /// The ipc socket file of a channel, when the transport is ipc.
    pub fn ipc_path(&self, channel: Channel) -> Option<PathBuf> {
        (self.transport == "ipc")
            .then(|| PathBuf::from(format!("{}-{}", self.ip, self.port(channel))))
    }
}

/// 32 random bytes, hex: the same strength as jupyter_client's uuid4 keys.
pub fn random_key() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_cannot_be_written_is_a_write_error_not_untrusted() {
        let dir = tempfile::tempdir().unwrap();
        let info = ConnectionInfo::new_ipc(dir.path(), None);
        let p = dir.path().join("missing/k.json");
        let e = info.write(&p).unwrap_err();
        assert!(matches!(e, ConnectionError::Write { .. }), "{e:?}");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let e = info.write(&dir.path().join("link")).unwrap_err();
        assert!(matches!(e, ConnectionError::Untrusted(_)), "{e:?}");
    }

    #[test]
    fn reads_jupyter_client_file_and_keeps_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        std::fs::write(
            &p,
            r#"{"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4,
                "hb_port": 5, "ip": "127.0.0.1", "key": "abc", "transport": "tcp",
                "signature_scheme": "hmac-sha256", "kernel_name": "noyau",
                "jupyter_session": "/x.ipynb"}"#,
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        // Readable by others: refused, saying how to fix it.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ConnectionInfo::read(&p).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let info = ConnectionInfo::read(&p).unwrap();
        assert_eq!(info.endpoint(Channel::Control), "tcp://127.0.0.1:4");
        assert_eq!(info.extra["jupyter_session"], "/x.ipynb");
        let out = dir.path().join("o.json");
        info.write(&out).unwrap();
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            ConnectionInfo::read(&out).unwrap().extra["jupyter_session"],
            "/x.ipynb"
        );
    }

    #[test]
    fn ipc_endpoints_follow_jupyter_naming() {
        let info = ConnectionInfo::new_ipc(Path::new("/run/x"), None);
        assert_eq!(info.endpoint(Channel::IoPub), "ipc:///run/x/kernel-2");
        assert_eq!(info.key.len(), 64);
    }

    #[test]
    fn unsupported_transport_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        std::fs::write(
            &p,
            r#"{"shell_port":1,"iopub_port":2,"stdin_port":3,"control_port":4,"hb_port":5,
                "ip":"x","transport":"inproc"}"#,
        )
        .unwrap();
        let e = ConnectionInfo::read(&p).unwrap_err().to_string();
        assert!(e.contains("inproc"), "{e}");
    }
}
