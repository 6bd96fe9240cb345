//! The frontend's side of the proxy: the five sockets its connection file
//! names, bound as a kernel binds them.
//!
//! Each ROUTER is read by its own task, which drops (and logs) any message
//! whose signature does not verify with the frontend's key before it can go
//! further. IOPub is an XPUB so that the proxy sees subscriptions and can
//! greet each subscriber with `iopub_welcome` (JEP 65). The heartbeat is
//! answered only while the kernel is alive, so a frontend watching it sees
//! a dead kernel as dead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use noyau_link::Lane;
use noyau_wire::{Channel, ConnectionInfo, RawMessage, Signer};
use tokio::sync::{mpsc, watch};

use crate::ProxyError;
use zeromq::{
    RepSocket, RouterRecvHalf, RouterSendHalf, RouterSocket, Socket, SocketRecv, SocketSend,
    XPubSocket,
};

pub struct Frontend {
    pub shell: RouterSendHalf,
    pub control: RouterSendHalf,
    pub stdin: RouterSendHalf,
    pub iopub: XPubSocket,
    /// Verified messages from the frontend, by lane.
    pub incoming: mpsc::Receiver<(Lane, RawMessage)>,
    alive: watch::Sender<bool>,
    dropped: Arc<AtomicBool>,
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
        let (shell_tx, shell_rx) = shell.split();
        let (control_tx, control_rx) = control.split();
        let (stdin_tx, stdin_rx) = stdin.split();
        let dropped = Arc::new(AtomicBool::new(false));
        for (rx, lane) in [
            (shell_rx, Lane::Shell),
            (control_rx, Lane::Control),
            (stdin_rx, Lane::Stdin),
        ] {
            tokio::spawn(read_router(
                rx,
                lane,
                signer.clone(),
                tx.clone(),
                dropped.clone(),
            ));
        }
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
        })
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
