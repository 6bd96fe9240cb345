//! Byte streams over a real link (TCP + TLS on 127.0.0.1): what the hub
//! relies on to reach a Jupyter server through its agent.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{listener, pair};
use noyau_link::tunnel::{Delivered, Tunnel, WINDOW};
use noyau_link::{Incoming, Link, LinkConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The agent side: says hello (granting credit or not, as an older agent
/// does not) and hands every stream the hub opens to `server`.
async fn serve(
    mut agent: Link,
    credit: bool,
    tunnel_out: tokio::sync::oneshot::Sender<Arc<Tunnel>>,
    server: fn(DuplexStream),
) {
    let tunnel = Tunnel::new(agent.sender());
    let _ = tunnel_out.send(tunnel.clone());
    tunnel
        .notice(&serde_json::json!({"hello": "s1", "credit": credit}))
        .unwrap();
    while let Some(m) = agent.recv().await {
        if let Incoming::Message(_, frames) = m {
            if let Delivered::Opened { id, credit } = tunnel.deliver(&frames) {
                let (ours, theirs) = tokio::io::duplex(1024);
                tunnel.attach(id, ours, credit);
                server(theirs);
            }
        }
    }
}

/// Upper-cases what it reads, and closes its side when the hub closes its own.
fn echo(mut server: DuplexStream) {
    tokio::spawn(async move {
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.unwrap();
        server.write_all(&all.to_ascii_uppercase()).await.unwrap();
        server.shutdown().await.unwrap();
    });
}

/// A hub tunnel and an agent tunnel over a real link, the agent's streams
/// served by `server`.
async fn tunnels(credit: bool, server: fn(DuplexStream)) -> (Arc<Tunnel>, Arc<Tunnel>) {
    let mut l = listener(LinkConfig::default()).await;
    let a = l.local_addr();
    let (agent, mut hub) = pair(&mut l, a, LinkConfig::default()).await;
    let (agent_tx, agent_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(serve(agent, credit, agent_tx, server));
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
    let hello = hello_rx.await.unwrap();
    assert_eq!(hello["hello"], "s1");
    tunnel.set_peer_credit(hello["credit"] == true);
    (tunnel, agent_rx.await.unwrap())
}

async fn streams_carry_bytes_both_ways_with_half_close(credit: bool) {
    let (tunnel, _agent) = tunnels(credit, echo).await;
    // Several streams at once, bigger than the link's chunks, the duplex
    // buffers and the credit window, each answered on its own stream.
    let mut tasks = Vec::new();
    for i in 0..4usize {
        let mut s = tunnel.open().unwrap();
        tasks.push(tokio::spawn(async move {
            let body: Vec<u8> = (0..(1 + i * 1_000_000))
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tunnel.open_streams() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "streams left open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_with_credit_carry_bytes_both_ways() {
    streams_carry_bytes_both_ways_with_half_close(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_an_agent_without_credit_still_work() {
    streams_carry_bytes_both_ways_with_half_close(false).await;
}

/// The agent's server reads nothing until told to.
static HELD: std::sync::Mutex<Option<DuplexStream>> = std::sync::Mutex::new(None);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_holds_at_most_a_window_then_gets_everything() {
    let (tunnel, agent) = tunnels(true, |s| *HELD.lock().unwrap() = Some(s)).await;
    let mut s = tunnel.open().unwrap();
    let total = 20 * WINDOW;
    let sent = Arc::new(AtomicUsize::new(0));
    let sent2 = sent.clone();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        while sent2.load(Ordering::SeqCst) < total {
            s.write_all(&chunk).await.unwrap();
            sent2.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        s.shutdown().await.unwrap();
        s
    });
    // The sender fills the window, and then waits for credit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while agent.queued_bytes() < (WINDOW - 64 * 1024) as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the window never filled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // However long the reader stalls, the agent queues no more than the
    // window (without credit, all 20 MiB would pile up there).
    for _ in 0..50 {
        let q = agent.queued_bytes();
        assert!(q <= WINDOW as u64, "{q} bytes queued for a stalled reader");
        assert!(
            sent.load(Ordering::SeqCst) < total,
            "the writer was never held back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The reader resumes: every byte arrives, in order.
    let mut server = HELD
        .lock()
        .unwrap()
        .take()
        .expect("the stream reached the server");
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), total);
    assert!(got.iter().all(|b| *b == 7));
    drop(writer.await.unwrap());
}
