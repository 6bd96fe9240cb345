//! Shared test helpers: a real listener, and a TCP hop that can be cut.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use noyau_link::{Incoming, Link, LinkConfig, LinkEvent, LinkListener, ServerIdentity};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub async fn listener(cfg: LinkConfig) -> LinkListener {
    let id = ServerIdentity::generate(&["localhost".into()]).unwrap();
    LinkListener::bind("127.0.0.1:0".parse().unwrap(), id, cfg)
        .await
        .unwrap()
}

/// A TCP forwarder between agent and proxy. `cut` closes every live
/// connection and refuses new ones until `restore`.
pub struct Hop {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Hop {
    pub async fn start(target: SocketAddr) -> Hop {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (cut2, live2) = (cut.clone(), live.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut a, _)) = l.accept().await else {
                    continue;
                };
                if cut2.load(Ordering::SeqCst) {
                    drop(a);
                    continue;
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut b) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
                let mut live = live2.lock().unwrap();
                live.retain(|h| !h.is_finished());
                live.push(h.abort_handle());
            }
        })
        .abort_handle();
        Hop {
            addr,
            cut,
            live,
            accept,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.live.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Hop {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Receives with a timeout, failing the test instead of hanging.
pub async fn recv(link: &mut Link) -> Incoming {
    tokio::time::timeout(Duration::from_secs(30), link.recv())
        .await
        .expect("timed out waiting for the link")
        .expect("link closed")
}

/// Skips messages until the given event.
pub async fn wait_event(link: &mut Link, want: LinkEvent) {
    loop {
        if let Incoming::Event(e) = recv(link).await {
            if e == want {
                return;
            }
        }
    }
}

/// Dials `addr` (the listener or a hop in front of it) with a fresh token and
/// returns (agent, proxy).
pub async fn pair(l: &mut LinkListener, addr: SocketAddr, cfg: LinkConfig) -> (Link, Link) {
    let token = l.issue_token();
    let pin = l.pin();
    let addr = addr.to_string();
    let (a, p) = tokio::join!(noyau_link::dial(&addr, &pin, &token, cfg), l.accept());
    (a.unwrap(), p.unwrap())
}
