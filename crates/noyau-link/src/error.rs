//! Errors of the link, each carrying enough context to tell the user what went
//! wrong and what to do.

use std::io;

use crate::{CloseReason, Lane};

/// Everything that can go wrong on the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A socket operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Nothing accepted the TCP connection (after a few tries on first dial).
    #[error("cannot connect to the noyau proxy at {addr}: {source} (is the proxy running and reachable from this node?)")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The TLS layer failed (bad certificate, handshake error, ...).
    #[error("TLS error: {0}")]
    Tls(#[from] rustls::Error),
    /// The proxy presented a certificate whose fingerprint is not the pinned one.
    #[error("the proxy's certificate does not match the pin (expected sha256 {expected}, got {got}): wrong address, a restarted proxy, or someone in the middle")]
    PinMismatch { expected: String, got: String },
    /// The pin given to `dial` is not 64 lowercase hex digits.
    #[error("invalid certificate pin {0:?}: expected the SHA-256 of the certificate DER as 64 hex digits")]
    BadPin(String),
    /// The server identity (certificate or key PEM) is unusable.
    #[error("invalid server identity: {0}")]
    Identity(String),
    /// The peer refused us, with its reason (e.g. unknown or already used token).
    #[error("the proxy refused the connection: {0}")]
    Refused(String),
    /// The peer broke the protocol (malformed frame, unexpected frame, gap in sequence).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A frame announced a length above the cap.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    /// Nothing was received for the idle timeout: the connection is presumed dead.
    #[error("nothing received for {0:?}; connection presumed dead")]
    IdleTimeout(std::time::Duration),
    /// A handshake step took too long.
    #[error("timed out while {0}")]
    Timeout(&'static str),
    /// The peer closed the TCP/TLS stream without a goodbye.
    #[error("connection closed by peer without goodbye")]
    Eof,
    /// The bounded send buffer is full: this message was NOT queued.
    #[error("link buffer full on lane {lane:?}: {buffered} bytes buffered, limit {limit}; message not sent")]
    BufferFull {
        lane: Lane,
        buffered: usize,
        limit: usize,
    },
    /// A single message is larger than one frame may be.
    #[error("message of {len} bytes exceeds the {max}-byte frame limit")]
    MessageTooLarge { len: usize, max: usize },
    /// A tunnel has as many streams open as it may.
    #[error("{0} streams are open on this tunnel, the most it carries: close some of the session's tabs, notebooks or terminals")]
    TooManyStreams(usize),
    /// The link is closed for good.
    #[error("link closed: {0}")]
    Closed(CloseReason),
    /// The listener's accept loop has stopped.
    #[error("the link listener has stopped")]
    ListenerClosed,
}

impl LinkError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        LinkError::Io {
            context: context.into(),
            source,
        }
    }
}
