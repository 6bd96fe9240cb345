//! The agent↔proxy link: one TLS 1.3 connection that carries Jupyter
//! messages between a batch job and the user's side, and survives network
//! breaks without losing or duplicating a message.
//!
//! The *agent* runs inside the batch job and dials out ([`dial`]); the
//! *proxy* listens ([`LinkListener`]). Nothing listens on the compute node.
//!
//! How the pieces fit:
//!
//! * [`tls`](ServerIdentity): the proxy makes a self-signed certificate; the
//!   agent pins its SHA-256 fingerprint and still checks the handshake
//!   signature. TLS 1.3 only.
//! * `codec`: length-prefixed frames (hello, resume, welcome, refused, data,
//!   ack, ping, goodbye), decoded defensively with a cap per link
//!   ([`LinkConfig::max_frame`], 512 MiB by default).
//! * `listener`/`dial`: authentication. A new session needs a one-time token
//!   from [`LinkListener::issue_token`]; the proxy answers with a session id
//!   and a resume secret. Each reconnect hands out a new one; the old one
//!   stays valid only until the new one has been used (so a connection lost
//!   mid-handshake cannot lock the agent out).
//! * `state`: what outlives a connection. Every message gets a per-lane
//!   sequence number and stays queued until the peer acks it; a reconnect
//!   exchanges "last received" per lane and resends from there, dropping
//!   duplicates on receipt.
//! * `connection`: a reader and a batching writer over one connection. The
//!   writer always takes the highest-priority lane ([`Lane::Control`] first,
//!   [`Lane::Iopub`] last), so an interrupt never waits behind output.
//! * `session`: the [`Link`] the user holds and the task that swaps
//!   connections under it; breaks show up only as [`LinkEvent`]s.
//!
//! Memory stays bounded: queued bytes are capped by
//! [`LinkConfig::buffer_limit`] (`send` then fails with
//! [`LinkError::BufferFull`] rather than blocking or dropping silently) and
//! received messages wait in a bounded channel, so a slow reader pushes back
//! through TCP.

mod codec;
mod connection;
mod dial;
pub mod envelope;
mod error;
mod listener;
mod session;
mod state;
mod tls;
pub mod tunnel;

use std::fmt;
use std::time::Duration;

/// Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): the decoders
/// that read bytes from the network.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use bytes::BytesMut;

    use crate::codec::{decode, encode, MAX_FRAME, MAX_HANDSHAKE_FRAME};

    /// Decodes `data` as a stream of link frames until it is used up or an
    /// error ends it, as a connection would; each frame decoded must encode
    /// back to itself. With `handshake`, the handshake's size cap applies.
    pub fn decode_stream(data: &[u8], handshake: bool) {
        let max = if handshake {
            MAX_HANDSHAKE_FRAME
        } else {
            MAX_FRAME
        };
        let mut buf = BytesMut::from(data);
        while let Ok(Some(frame)) = decode(&mut buf, max) {
            let mut again = BytesMut::new();
            encode(&frame, &mut again);
            let back = decode(&mut again, MAX_FRAME).expect("an encoded frame decodes");
            assert_eq!(back.as_ref(), Some(&frame));
            assert!(again.is_empty());
        }
    }
}

pub use dial::dial;
pub use error::LinkError;
pub use listener::{LinkListener, Tokens};
pub use session::{Link, LinkSender};
pub use tls::ServerIdentity;

/// A logical channel of the link. Each lane is reliable and ordered on its
/// own; when several have messages waiting, the lower number goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Lane {
    Control = 0,
    Stdin = 1,
    Shell = 2,
    Iopub = 3,
}

impl Lane {
    /// All lanes, highest priority first.
    pub const ALL: [Lane; 4] = [Lane::Control, Lane::Stdin, Lane::Shell, Lane::Iopub];

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Option<Lane> {
        Lane::ALL.get(v as usize).copied()
    }
}

/// Tuning of a link; the defaults suit a kernel session.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Cap on bytes queued for sending or awaiting ack (control lane exempt).
    pub buffer_limit: usize,
    /// How long to keep trying to reconnect (agent) or to wait for the agent
    /// to come back (proxy) before the session is closed with `GaveUp`.
    pub give_up_after: Duration,
    /// Nothing received for this long: the connection is presumed dead. A
    /// peer whose host or network is gone is found sooner, by TCP itself
    /// (keepalive and user timeout, `connection::keep_alive`): this catches
    /// a peer process that is stuck.
    pub idle_timeout: Duration,
    /// Send a ping after this long without sending anything. Rare, so that
    /// an idle link costs its processes no wake-ups to speak of.
    pub ping_interval: Duration,
    /// Largest frame read or sent once the handshake is over: a peer can
    /// make us hold this much for one frame. Jupyter messages may carry
    /// big buffers; a link that carries only a tunnel needs
    /// [`tunnel::MAX_FRAME`].
    pub max_frame: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            buffer_limit: 256 * 1024 * 1024,
            give_up_after: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(90),
            ping_interval: Duration::from_secs(30),
            max_frame: codec::MAX_FRAME,
        }
    }
}

/// What `Link::recv` yields.
#[derive(Debug)]
pub enum Incoming {
    Message(Lane, Vec<bytes::Bytes>),
    Event(LinkEvent),
}

/// Changes in the state of the link, for the user to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The connection broke; messages are kept and will follow on reconnect.
    Disconnected,
    /// The session resumed on a new connection; nothing was lost.
    Reconnected,
    /// The session is over; `recv` returns `None` next.
    Closed(CloseReason),
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed the link gracefully.
    PeerClosed,
    /// We closed it (`Link::close` or drop).
    LocalClose,
    /// No reconnection within `LinkConfig::give_up_after`.
    GaveUp,
    /// The proxy refused to resume the session (e.g. it was restarted).
    ResumeRefused(String),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("closed by the peer"),
            CloseReason::LocalClose => f.write_str("closed locally"),
            CloseReason::GaveUp => f.write_str("gave up waiting for the connection to come back"),
            CloseReason::ResumeRefused(r) => write!(f, "the proxy refused to resume: {r}"),
        }
    }
}
