//! Client-side sockets to a kernel's channels.
//!
//! Shell and stdin share one routing identity: a kernel sends its
//! `input_request` on stdin to the identity that sent the `execute_request`
//! on shell, so with two identities the prompt would never arrive.

use std::time::Duration;

use bytes::Bytes;
use noyau_wire::{Channel, ConnectionInfo};
use zeromq::{DealerSocket, Socket, SocketOptions, SubSocket, ZmqMessage};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot connect to the kernel's {channel} channel at {endpoint}: {source}")]
    Connect {
        channel: &'static str,
        endpoint: String,
        source: zeromq::ZmqError,
    },
    #[error("subscribing to the kernel's iopub channel failed: {0}")]
    Subscribe(zeromq::ZmqError),
}

pub struct KernelSockets {
    pub shell: DealerSocket,
    pub control: DealerSocket,
    pub stdin: DealerSocket,
    pub iopub: SubSocket,
}

fn options(identity: Option<&Bytes>, timeout: Duration) -> SocketOptions {
    let mut o = SocketOptions::default();
    o.connect_timeout(timeout);
    if let Some(id) = identity {
        if let Ok(pid) = zeromq::util::PeerIdentity::try_from(id.clone()) {
            o.peer_identity(pid);
        }
    }
    o
}

async fn connect<S: Socket>(
    mut socket: S,
    info: &ConnectionInfo,
    channel: Channel,
) -> Result<S, SocketError> {
    let endpoint = info.endpoint(channel);
    socket
        .connect(&endpoint)
        .await
        .map_err(|source| SocketError::Connect {
            channel: channel.name(),
            endpoint,
            source,
        })?;
    Ok(socket)
}

impl KernelSockets {
    /// Connects to every channel but heartbeat, waiting up to `timeout` for
    /// each endpoint to appear (a kernel binds a moment after it starts).
    pub async fn connect(info: &ConnectionInfo, timeout: Duration) -> Result<Self, SocketError> {
        let identity = Bytes::from(format!("noyau-{}", uuid_like()));
        let shell = connect(
            DealerSocket::with_options(options(Some(&identity), timeout)),
            info,
            Channel::Shell,
        )
        .await?;
        let stdin = connect(
            DealerSocket::with_options(options(Some(&identity), timeout)),
            info,
            Channel::Stdin,
        )
        .await?;
        let control = connect(
            DealerSocket::with_options(options(None, timeout)),
            info,
            Channel::Control,
        )
        .await?;
        let mut iopub = connect(
            SubSocket::with_options(options(None, timeout)),
            info,
            Channel::IoPub,
        )
        .await?;
        iopub.subscribe("").await.map_err(SocketError::Subscribe)?;
        Ok(KernelSockets {
            shell,
            control,
            stdin,
            iopub,
        })
    }
}

fn uuid_like() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}-{:x}", std::process::id(), t.as_nanos())
}

/// Frames to a zmq message (a message needs at least one frame).
pub fn to_zmq(frames: Vec<Bytes>) -> Option<ZmqMessage> {
    ZmqMessage::try_from(frames).ok()
}
