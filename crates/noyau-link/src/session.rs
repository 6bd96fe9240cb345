//! The user-facing `Link` and the task that keeps its session alive across
//! connections.
//!
//! The `Link` never touches a socket: it owns the receiving end of a bounded
//! channel and shares the lane queues with a session task. The task runs one
//! connection at a time and, when one breaks, asks its side (agent or proxy)
//! for the next, so reconnects are invisible except for the
//! `Disconnected`/`Reconnected` events. The bounded channel means a user who
//! stops reading eventually stops the reader, and TCP pushes back on the peer,
//! instead of memory growing without limit.

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::connection::{self, Conn, End};
use crate::state::Shared;
use crate::{CloseReason, Incoming, Lane, LinkConfig, LinkError, LinkEvent};

/// Messages delivered but not yet taken by `Link::recv`.
const INCOMING_CAPACITY: usize = 1024;

/// One end of an agent↔proxy session. Survives reconnects.
pub struct Link {
    rx: mpsc::Receiver<Incoming>,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
    /// Proxy side: the SHA-256 of the one-time token the agent dialled with.
    token_digest: Option<[u8; 32]>,
}

/// Queues messages on a link; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct LinkSender {
    shared: Arc<Shared>,
}

impl LinkSender {
    /// Queues a multipart message on `lane` without blocking. Fails, without
    /// queueing, with `BufferFull` when unsent+unacked bytes would pass
    /// `LinkConfig::buffer_limit` (control lane exempt), or `Closed`.
    pub fn send(&self, lane: Lane, frames: Vec<Bytes>) -> Result<(), LinkError> {
        self.shared.enqueue(lane, frames)
    }

    /// Bytes currently held for sending or awaiting acknowledgement.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.out().buffered
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

impl Link {
    pub fn sender(&self) -> LinkSender {
        LinkSender {
            shared: self.shared.clone(),
        }
    }

    /// Proxy side: whether `token` is the one-time token this link's agent
    /// dialled with (the listener consumed it), so that what the agent
    /// says over the link can be held to the token it proved it had.
    pub fn dialled_with(&self, token: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.token_digest
            .is_some_and(|d| crate::tls::ct_eq(&d, &digest))
    }

    /// Next message or event; `None` once the link is closed for good (after
    /// a `LinkEvent::Closed`).
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    /// Sends everything queued, then a goodbye, and waits for the session to
    /// end. If the connection is down, this waits for the reconnect (or for
    /// `give_up_after`).
    pub async fn close(mut self) {
        request_close(&self.shared);
        // Keep reading so the session task never blocks on a full channel.
        if let Some(task) = self.task.take() {
            tokio::pin!(task);
            loop {
                tokio::select! {
                    _ = &mut task => break,
                    m = self.rx.recv() => if m.is_none() { let _ = (&mut task).await; break; },
                }
            }
        }
    }
}

impl Drop for Link {
    /// Dropping a link closes it gracefully in the background.
    fn drop(&mut self) {
        request_close(&self.shared);
    }
}

fn request_close(shared: &Shared) {
    shared.out().closing = true;
    shared.wake_writer.notify_one();
}

/// Where the next connection of a session comes from.
pub(crate) trait Reconnect: Send + 'static {
    /// A newer connection that may arrive while one is live (proxy side).
    type Replacement: Send + 'static;
    fn replacements(&mut self) -> Option<&mut mpsc::Receiver<Self::Replacement>>;
    /// Makes a replacement usable (handshake answer, rewinding lanes).
    fn adopt(
        &mut self,
        shared: &Arc<Shared>,
        r: Self::Replacement,
    ) -> impl std::future::Future<Output = Result<Conn, LinkError>> + Send;
    /// Waits for or makes the next connection; `Err` ends the session.
    fn reconnect(
        &mut self,
        shared: &Arc<Shared>,
    ) -> impl std::future::Future<Output = Result<Conn, CloseReason>> + Send;
    /// Called once when the session ends for good.
    fn finished(&mut self) {}
}

pub(crate) fn new_shared(cfg: LinkConfig) -> Arc<Shared> {
    Arc::new(Shared::new(cfg))
}

/// Creates the `Link` and spawns its session task, starting on `first`;
/// `token_digest`: the token the agent dialled with (proxy side).
pub(crate) fn start<R: Reconnect>(
    shared: Arc<Shared>,
    first: Conn,
    side: R,
    token_digest: Option<[u8; 32]>,
) -> Link {
    let (tx, rx) = mpsc::channel(INCOMING_CAPACITY);
    let task = tokio::spawn(drive(shared.clone(), first, side, tx));
    Link {
        rx,
        shared,
        task: Some(task),
        token_digest,
    }
}

async fn drive<R: Reconnect>(
    shared: Arc<Shared>,
    first: Conn,
    mut side: R,
    tx: mpsc::Sender<Incoming>,
) {
    let mut conn = first;
    let reason = loop {
        let end = connection::run(&shared, conn, &tx, side.replacements()).await;
        let next = match end {
            End::LocalClose => break CloseReason::LocalClose,
            End::PeerClosed => break CloseReason::PeerClosed,
            End::Replaced(r) => {
                tracing::info!("link: peer reconnected over a connection that still looked alive");
                let _ = tx.send(Incoming::Event(LinkEvent::Disconnected)).await;
                match side.adopt(&shared, r).await {
                    Ok(c) => Ok(c),
                    Err(e) => {
                        tracing::warn!("link: reconnect failed: {e}");
                        side.reconnect(&shared).await
                    }
                }
            }
            End::Broken(e) => {
                tracing::warn!("link: connection lost: {e}");
                let _ = tx.send(Incoming::Event(LinkEvent::Disconnected)).await;
                side.reconnect(&shared).await
            }
        };
        match next {
            Ok(c) => {
                tracing::info!("link: session resumed");
                let _ = tx.send(Incoming::Event(LinkEvent::Reconnected)).await;
                conn = c;
            }
            Err(reason) => break reason,
        }
    };
    shared.out().closed = Some(reason.clone());
    side.finished();
    tracing::info!("link: session closed: {reason}");
    if reason != CloseReason::LocalClose {
        let _ = tx.send(Incoming::Event(LinkEvent::Closed(reason))).await;
    }
}
