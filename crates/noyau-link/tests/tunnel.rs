//! Byte streams over a real link (TCP + TLS on 127.0.0.1): what the hub
//! relies on to reach a Jupyter server through its agent.

mod common;

use common::{listener, pair};
use noyau_link::tunnel::{Delivered, Tunnel};
use noyau_link::{Incoming, Link, LinkConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The agent side: answers every stream with an echo server that upper-cases
/// what it reads and closes its side when the hub closes its own.
async fn serve_echo(mut agent: Link) {
    let tunnel = Tunnel::new(agent.sender());
    tunnel.notice(&serde_json::json!({"hello": "s1"})).unwrap();
    while let Some(m) = agent.recv().await {
        if let Incoming::Message(_, frames) = m {
            if let Delivered::Opened(id) = tunnel.deliver(&frames) {
                let (ours, mut server) = tokio::io::duplex(1024);
                tunnel.attach(id, ours);
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    server.read_to_end(&mut all).await.unwrap();
                    server.write_all(&all.to_ascii_uppercase()).await.unwrap();
                    server.shutdown().await.unwrap();
                });
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_bytes_both_ways_with_half_close() {
    let mut l = listener(LinkConfig::default()).await;
    let a = l.local_addr();
    let (agent, mut hub) = pair(&mut l, a, LinkConfig::default()).await;
    tokio::spawn(serve_echo(agent));
    let tunnel = Tunnel::new(hub.sender());
    let t = tunnel.clone();
    let (hello_tx, hello_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut hello = Some(hello_tx);
        while let Some(m) = hub.recv().await {
            if let Incoming::Message(_, frames) = m {
                if let Delivered::Notice(v) = t.deliver(&frames) {
                    if let Some(tx) = hello.take() {
                        let _ = tx.send(v);
                    }
                }
            }
        }
    });
    assert_eq!(hello_rx.await.unwrap()["hello"], "s1");

    // Several streams at once, one bigger than the link's chunks and the
    // duplex buffers, each answered on its own stream.
    let mut tasks = Vec::new();
    for i in 0..4usize {
        let mut s = tunnel.open().unwrap();
        tasks.push(tokio::spawn(async move {
            let body: Vec<u8> = (0..(1 + i * 100_000))
                .map(|k| b'a' + (k % 26) as u8)
                .collect();
            let (mut r, mut w) = tokio::io::split(&mut s);
            let write = async {
                w.write_all(&body).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let read = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(write, read);
            n.unwrap();
            assert_eq!(got, body.to_ascii_uppercase(), "stream {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Finished streams are forgotten on both ends.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while tunnel.open_streams() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "streams left open");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
