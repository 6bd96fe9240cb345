//! The frontend's side of the proxy: the five sockets its connection file
//! names, bound as a kernel binds them.
//!
//! Each ROUTER is read by its own task, which drops (and logs) any message
//! whose signature does not verify with the frontend's key before it can go
//! further. IOPub is an XPUB so that the proxy sees subscriptions and can
//! greet each subscriber with `iopub_welcome` (JEP 65). The heartbeat is
//! answered only while the kernel is alive, so a frontend watching it sees
//! a dead kernel as dead.
//!
//! A ROUTER's `send` only queues: a task per connection, inside the zeromq
//! crate, writes the queue out. [`Frontend::close`] is the proxy's
//! ZMQ_LINGER: it waits for those tasks, so the last replies (a
//! `shutdown_reply`, the errors for a dead kernel) are written before the
//! process exits and its runtime drops them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use noyau_link::Lane;
use noyau_wire::{Channel, ConnectionInfo, RawMessage, Signer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::ProxyError;
use zeromq::{
    MultiPeerBackend, RepSocket, RouterRecvHalf, RouterSendHalf, RouterSocket, Socket, SocketRecv,
    SocketSend, XPubSocket,
};

/// How long [`Frontend::close`] waits for the replies to be written: a
/// safety net, not the normal path. Only a frontend that stopped reading
/// (hung, or cut off without a reset), or a connection that never finished
/// its ZMTP greeting, is waited for this long: a gone frontend fails the
/// writes at once.
const LINGER: Duration = Duration::from_secs(2);

/// How often [`Frontend::close`] looks whether the writers are done: the
/// zeromq crate gives no handle on its writer tasks, nor a notice when
/// they end.
const LINGER_POLL: Duration = Duration::from_millis(2);

pub struct Frontend {
    pub shell: RouterSendHalf,
    pub control: RouterSendHalf,
    pub stdin: RouterSendHalf,
    pub iopub: XPubSocket,
    /// Verified messages from the frontend, by lane.
    pub incoming: mpsc::Receiver<(Lane, RawMessage)>,
    alive: watch::Sender<bool>,
    dropped: Arc<AtomicBool>,
    /// The tasks reading the ROUTERs: each holds its socket open.
    readers: Vec<JoinHandle<()>>,
    /// The ROUTERs' backends. Each connection's writer task holds its
    /// socket's backend until its queue is written out (or its write
    /// failed), so once the sockets are dropped, no strong reference left
    /// means every queued reply was handed to the connection.
    writers: Vec<Weak<dyn MultiPeerBackend>>,
}

async fn bind<S: Socket>(mut s: S, info: &ConnectionInfo, ch: Channel) -> Result<S, ProxyError> {
    let endpoint = info.endpoint(ch);
    s.bind(&endpoint).await.map_err(|source| ProxyError::Bind {
        socket: ch.name(),
        endpoint,
        source,
    })?;
    Ok(s)
}

impl Frontend {
    pub async fn bind(info: &ConnectionInfo, signer: Signer) -> Result<Self, ProxyError> {
        let shell = bind(RouterSocket::new(), info, Channel::Shell).await?;
        let control = bind(RouterSocket::new(), info, Channel::Control).await?;
        let stdin = bind(RouterSocket::new(), info, Channel::Stdin).await?;
        let iopub = bind(XPubSocket::new(), info, Channel::IoPub).await?;
        let hb = bind(RepSocket::new(), info, Channel::Heartbeat).await?;

        let (tx, incoming) = mpsc::channel(1024);
        let writers = [&shell, &control, &stdin]
            .map(|s| Arc::downgrade(&s.backend()))
            .into();
        let (shell_tx, shell_rx) = shell.split();
        let (control_tx, control_rx) = control.split();
        let (stdin_tx, stdin_rx) = stdin.split();
        let dropped = Arc::new(AtomicBool::new(false));
        let readers = [
            (shell_rx, Lane::Shell),
            (control_rx, Lane::Control),
            (stdin_rx, Lane::Stdin),
        ]
        .map(|(rx, lane)| {
            tokio::spawn(read_router(
                rx,
                lane,
                signer.clone(),
                tx.clone(),
                dropped.clone(),
            ))
        })
        .into();
        let (alive, alive_rx) = watch::channel(true);
        tokio::spawn(heartbeat(hb, alive_rx));
        Ok(Frontend {
            shell: shell_tx,
            control: control_tx,
            stdin: stdin_tx,
            iopub,
            incoming,
            alive,
            dropped,
            readers,
            writers,
        })
    }

    /// Closes the sockets and waits until every reply queued on a ROUTER
    /// has been written to its connection, or [`LINGER`] has passed (a
    /// frontend that stopped reading). IOPub needs no wait: an XPUB's
    /// `send` writes before it returns.
    pub async fn close(self) {
        let Frontend {
            shell,
            control,
            stdin,
            readers,
            writers,
            ..
        } = self;
        // A ROUTER shuts (and lets its writers finish) once both halves
        // are gone: the read halves live in the reader tasks.
        for r in &readers {
            r.abort();
        }
        for r in readers {
            let _ = r.await;
        }
        drop((shell, control, stdin));
        let written = async {
            while writers.iter().any(|w| w.strong_count() > 0) {
                tokio::time::sleep(LINGER_POLL).await;
            }
        };
        if tokio::time::timeout(LINGER, written).await.is_err() {
            tracing::warn!(
                "replies to the frontend still unwritten after {LINGER:?} (a frontend that stopped reading, or a connection still in its handshake); ending without them"
            );
        }
    }

    pub fn set_alive(&self, alive: bool) {
        let _ = self.alive.send(alive);
    }

    /// True once any message was dropped for a bad signature.
    pub fn dropped_any(&self) -> bool {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn read_router(
    mut rx: RouterRecvHalf,
    lane: Lane,
    signer: Signer,
    tx: mpsc::Sender<(Lane, RawMessage)>,
    dropped: Arc<AtomicBool>,
) {
    while let Ok(m) = rx.recv().await {
        let msg = match RawMessage::from_frames(m.into_vec()) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(?lane, "dropped a malformed message from the frontend: {e}");
                continue;
            }
        };
        if let Err(e) = signer.verify(&msg) {
            let what = msg
                .peek_header()
                .map(|h| h.msg_type)
                .unwrap_or_else(|_| "?".into());
            tracing::warn!(?lane, msg_type = %what, "dropped a message from the frontend: {e}");
            dropped.store(true, Ordering::Relaxed);
            continue;
        }
        if tx.send((lane, msg)).await.is_err() {
            return;
        }
    }
}

async fn heartbeat(mut hb: RepSocket, mut alive: watch::Receiver<bool>) {
    loop {
        let Ok(ping) = hb.recv().await else { return };
        if alive.wait_for(|a| *a).await.is_err() {
            return;
        }
        if hb.send(ping).await.is_err() {
            return;
        }
    }
}

pub fn router_for(fe: &mut Frontend, lane: Lane) -> Option<&mut RouterSendHalf> {
    match lane {
        Lane::Shell => Some(&mut fe.shell),
        Lane::Control => Some(&mut fe.control),
        Lane::Stdin => Some(&mut fe.stdin),
        Lane::Iopub => None,
    }
}

pub async fn send_router(fe: &mut Frontend, lane: Lane, msg: RawMessage) {
    let Some(router) = router_for(fe, lane) else {
        return;
    };
    if msg.identities.is_empty() {
        tracing::warn!(
            ?lane,
            "a reply without a routing identity cannot reach any frontend; dropped"
        );
        return;
    }
    let Ok(z) = zeromq::ZmqMessage::try_from(msg.into_frames()) else {
        return;
    };
    if let Err(e) = router.send(z).await {
        tracing::debug!(?lane, "frontend went away before its reply: {e}");
    }
}

pub async fn publish(fe: &mut Frontend, msg: RawMessage) {
    let Ok(z) = zeromq::ZmqMessage::try_from(msg.into_frames()) else {
        return;
    };
    if let Err(e) = fe.iopub.send(z).await {
        tracing::warn!("publishing on iopub failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use noyau_client::sockets::{to_zmq, KernelSockets};
    use noyau_wire::build;
    use serde_json::json;

    /// More replies than the connection's socket buffer holds: the writer
    /// has to wait for the frontend to read some before it can go on.
    const REPLIES: usize = 2000;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    }

    /// A proxy on its own runtime (as `noyau kernel` has) answers one
    /// request with `REPLIES` replies, closes, and lets the runtime drop,
    /// with its tasks, as the process does when it exits.
    fn answer_then_exit(info: ConnectionInfo, signer: Signer) {
        runtime().block_on(async move {
            let mut fe = Frontend::bind(&info, signer.clone()).await.unwrap();
            let (lane, request) = fe.incoming.recv().await.unwrap();
            for i in 0..REPLIES {
                let content = json!({"i": i, "pad": "x".repeat(1000)});
                let ids = request.identities.clone();
                let reply =
                    build::message(&signer, ids, "test_reply", "s", &request.header, content);
                send_router(&mut fe, lane, reply).await;
            }
            fe.close().await;
        });
    }

    #[test]
    fn close_writes_every_queued_reply_before_the_process_would_exit() {
        let dir = tempfile::tempdir().unwrap();
        let info = ConnectionInfo::new_ipc(dir.path(), None);
        let signer = Signer::new(info.key.as_bytes());
        let kernel = {
            let (info, signer) = (info.clone(), signer.clone());
            std::thread::spawn(move || answer_then_exit(info, signer))
        };
        let got = runtime().block_on(async {
            let mut client = KernelSockets::connect(&info, Duration::from_secs(30))
                .await
                .unwrap();
            let request = build::message(
                &signer,
                vec![],
                "test_request",
                "s",
                &Bytes::new(),
                json!({}),
            );
            let request = to_zmq(request.into_frames()).unwrap();
            client.shell.send(request).await.unwrap();
            let mut got = 0;
            // (the bound only turns a lost reply into a failure, not a hang)
            while got < REPLIES {
                match tokio::time::timeout(Duration::from_secs(20), client.shell.recv()).await {
                    Ok(Ok(_)) => got += 1,
                    _ => break,
                }
            }
            got
        });
        kernel.join().unwrap();
        assert_eq!(got, REPLIES, "replies lost when the proxy exited");
    }
}
