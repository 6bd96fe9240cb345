//! [`ProxyError`]: why the proxy kernel could not start.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why `noyau kernel` could not start (once running, what goes wrong is
/// told to the frontend instead).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Connection(#[from] noyau_wire::connection::ConnectionError),
    #[error("connection file {0} has an empty \"key\": messages would be unsigned, so anyone who can reach the kernel's ports could run code as you and noyau could not tell; let the frontend write a key (jupyter_client does by default), or pass --allow-unsigned to accept it anyway")]
    Unsigned(PathBuf),
    #[error("cannot bind the {socket} socket at {endpoint} (is another kernel using this connection file?): {source}")]
    Bind {
        socket: &'static str,
        endpoint: String,
        source: zeromq::ZmqError,
    },
    #[error("cannot listen for the agent on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: noyau_link::LinkError,
    },
    #[error("the link's port {addr} is held by another process (a stranger that bound it while the kernel restarted, or a keeper of it that did not answer), so the agent cannot come back: it ends after its grace period, and its job with it (the previous proxy's listening socket was not handed to this one: {why}). Restart the kernel again to start a new agent; `ss -ltnp` shows who holds the port")]
    PortTaken {
        addr: SocketAddr,
        why: Box<crate::keeper::KeeperError>,
    },
    #[error("cannot listen for the agent on {addr} again (the previous proxy's listening socket was not kept for this one: {why})")]
    Relisten {
        addr: SocketAddr,
        why: Box<crate::keeper::KeeperError>,
        source: noyau_link::LinkError,
    },
    #[error("cannot handle SIGTERM and SIGINT: {0}")]
    Signals(std::io::Error),
    #[error("the kernel's working directory: {0}")]
    Cwd(std::io::Error),
    #[error(transparent)]
    Env(#[from] noyau_env::EnvError),
    #[error(transparent)]
    Agent(#[from] noyau_client::agent::StartError),
    #[error(transparent)]
    Handover(#[from] crate::handover::HandoverError),
}
