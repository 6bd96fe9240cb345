//! Byte streams over a real link (TCP + TLS on 127.0.0.1): what the hub
//! relies on to reach a Jupyter server through its agent.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{listener, pair};
use noyau_link::tunnel::{self, Delivered, Op, Tunnel, MAX_QUEUED, MAX_STREAMS, WINDOW};
use noyau_link::{Incoming, Link, LinkConfig, LinkError, LinkSender};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The agent side: says hello and hands every stream the hub opens to
/// `server`.
async fn serve(
    mut agent: Link,
    tunnel_out: tokio::sync::oneshot::Sender<Arc<Tunnel>>,
    server: fn(DuplexStream),
) {
    let tunnel = Tunnel::new(agent.sender());
    let _ = tunnel_out.send(tunnel.clone());
    tunnel
        .notice(&serde_json::json!({"hello": "s1", "credit": true}))
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

/// The hub's end of a link: its tunnel, with what the agent said in its
/// hello and what the tunnel reported of the agent's breaking its limits.
struct Hub {
    tunnel: Arc<Tunnel>,
    hello: serde_json::Value,
    violations: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// Feeds the hub's link to its tunnel, as the hub does.
async fn hub_side(mut hub: Link) -> Hub {
    let tunnel = Tunnel::new(hub.sender());
    let t = tunnel.clone();
    let (hello_tx, hello_rx) = tokio::sync::oneshot::channel();
    let (bad_tx, violations) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut hello = Some(hello_tx);
        while let Some(m) = hub.recv().await {
            if let Incoming::Message(_, frames) = m {
                match t.deliver(&frames) {
                    Delivered::Notice(v) => {
                        if let Some(tx) = hello.take() {
                            let _ = tx.send(v);
                        }
                    }
                    Delivered::Violation(why) => {
                        let _ = bad_tx.send(why);
                        return;
                    }
                    _ => {}
                }
            }
        }
    });
    let hello = hello_rx.await.unwrap();
    assert_eq!(hello["hello"], "s1");
    Hub {
        tunnel,
        hello,
        violations,
    }
}

/// A link: (agent, hub), with frames no bigger than the hub's links take.
async fn link() -> (Link, Link) {
    let cfg = LinkConfig {
        max_frame: tunnel::MAX_FRAME,
        ..LinkConfig::default()
    };
    let mut l = listener(cfg).await;
    let a = l.local_addr();
    pair(&mut l, a, cfg).await
}

/// A hub tunnel and an agent tunnel over a real link, the agent's streams
/// served by `server`.
async fn tunnels(server: fn(DuplexStream)) -> (Arc<Tunnel>, Arc<Tunnel>) {
    let (agent, hub) = link().await;
    let (agent_tx, agent_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(serve(agent, agent_tx, server));
    let hub = hub_side(hub).await;
    assert_eq!(hub.hello["credit"], true);
    (hub.tunnel, agent_rx.await.unwrap())
}

/// A hostile agent: says hello (without granting credit), then hands the
/// id of every stream the hub opens to the test, which sends what it likes
/// on the agent's link.
async fn hostile(mut agent: Link) -> (LinkSender, tokio::sync::mpsc::UnboundedReceiver<u64>) {
    let sender = agent.sender();
    let (opened_tx, opened) = tokio::sync::mpsc::unbounded_channel();
    sender
        .send(
            tunnel::NOTICE_LANE,
            tunnel::encode(Op::Notice, 0, Bytes::from_static(br#"{"hello": "s1"}"#)),
        )
        .unwrap();
    tokio::spawn(async move {
        while let Some(m) = agent.recv().await {
            if let Incoming::Message(_, frames) = m {
                if let Some((Op::Open, id, _)) = tunnel::decode(&frames) {
                    let _ = opened_tx.send(id);
                }
            }
        }
    });
    (sender, opened)
}

/// Sends `bytes` of data on stream `id` in 64 KiB messages, ignoring the
/// window, until the hub closes the link.
fn flood(agent: &LinkSender, id: u64, bytes: usize) {
    for _ in 0..bytes / (64 * 1024) {
        let data = tunnel::encode(Op::Data, id, Bytes::from(vec![b'x'; 64 * 1024]));
        if let Err(e) = agent.send(tunnel::TUNNEL_LANE, data) {
            assert!(matches!(e, LinkError::Closed(_)), "{e}");
            return;
        }
    }
}

/// Waits for the hub's tunnel to report the agent.
async fn violation(hub: &mut Hub) -> String {
    tokio::time::timeout(Duration::from_secs(30), hub.violations.recv())
        .await
        .expect("the hub never cut the agent off")
        .expect("the hub's link ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_bytes_both_ways_with_half_close() {
    let (tunnel, _agent) = tunnels(echo).await;
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

/// The agent's server reads nothing until told to.
static HELD: std::sync::Mutex<Option<DuplexStream>> = std::sync::Mutex::new(None);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_holds_at_most_a_window_then_gets_everything() {
    let (tunnel, agent) = tunnels(|s| *HELD.lock().unwrap() = Some(s)).await;
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
    // Every byte consumed is out of the count (a running total that kept
    // some would cut off a long-lived tunnel at MAX_QUEUED).
    assert_eq!(agent.queued_bytes(), 0);
    drop(writer.await.unwrap());
}

/// An agent that never granted credit in its hello, and sends on a stream
/// whose reader (the browser) reads nothing, as fast as it can: the hub
/// holds the window whatever the hello said, and cuts the agent off once
/// it passes it, dropping what it had queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_ignores_the_window_is_cut_off() {
    let (agent, hub) = link().await;
    let (agent, mut opened) = hostile(agent).await;
    let mut hub = hub_side(hub).await;
    let mut browser = hub.tunnel.open().unwrap();
    let id = opened.recv().await.unwrap();
    flood(&agent, id, 3 * WINDOW);
    let why = violation(&mut hub).await;
    assert!(why.contains("window"), "{why}");
    assert_eq!(hub.tunnel.queued_bytes(), 0);
    assert_eq!(hub.tunnel.open_streams(), 0);
    // A request arriving before the hub forgets the agent opens nothing.
    assert!(matches!(hub.tunnel.open(), Err(LinkError::Closed(_))));
    // The browser's request ends (a reset) instead of waiting for more.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), browser.read_to_end(&mut got))
        .await
        .expect("the stream was left open");
    assert!(
        got.len() <= WINDOW,
        "{} bytes reached the browser",
        got.len()
    );
}

/// Within each stream's window, but on many streams whose readers all
/// stall: past MAX_QUEUED bytes in all the hub cuts the agent off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_fills_many_windows_at_once_is_cut_off() {
    let (agent, hub) = link().await;
    let (agent, mut opened) = hostile(agent).await;
    let mut hub = hub_side(hub).await;
    let streams = MAX_QUEUED as usize / WINDOW + 8;
    let mut browsers = Vec::new();
    for _ in 0..streams {
        // (once the hub has cut the agent off, it opens no more)
        let Ok(b) = hub.tunnel.open() else { break };
        browsers.push(b);
        let id = opened.recv().await.unwrap();
        flood(&agent, id, WINDOW);
    }
    let why = violation(&mut hub).await;
    assert!(why.contains("together"), "{why}");
    assert_eq!(hub.tunnel.queued_bytes(), 0);
    assert_eq!(hub.tunnel.open_streams(), 0);
}

/// However many connections the user's browser opens, a tunnel carries at
/// most MAX_STREAMS streams, and says why it refuses one more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_opens_at_most_max_streams() {
    let (agent, hub) = link().await;
    let (_agent, _opened) = hostile(agent).await;
    let hub = hub_side(hub).await;
    let held: Vec<_> = (0..MAX_STREAMS)
        .map(|_| hub.tunnel.open().unwrap())
        .collect();
    let e = hub.tunnel.open().unwrap_err();
    assert!(
        matches!(e, LinkError::TooManyStreams(n) if n == MAX_STREAMS),
        "{e}"
    );
    assert!(e.to_string().contains("close some"), "{e}");
    drop(held);
}

/// An empty data message counts no bytes against any limit, yet a reader
/// that stalls would keep every one: the hub cuts off the agent at the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_sends_empty_data_is_cut_off() {
    let (agent, hub) = link().await;
    let (agent, mut opened) = hostile(agent).await;
    let mut hub = hub_side(hub).await;
    let _browser = hub.tunnel.open().unwrap();
    let id = opened.recv().await.unwrap();
    for _ in 0..1000 {
        let empty = tunnel::encode(Op::Data, id, Bytes::new());
        if agent.send(tunnel::TUNNEL_LANE, empty).is_err() {
            break;
        }
    }
    let why = violation(&mut hub).await;
    assert!(why.contains("empty"), "{why}");
    assert_eq!(hub.tunnel.open_streams(), 0);
}

/// The agent's server ends its answer, then goes (a write to it fails): the
/// agent resets the stream after its end of data, and the hub's writer,
/// waiting for credit that will never come, stops instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_the_end_of_data_stops_the_writer() {
    let (tunnel, _agent) = tunnels(|mut s| {
        tokio::spawn(async move {
            s.shutdown().await.unwrap();
            drop(s);
        });
    })
    .await;
    let mut s = tunnel.open().unwrap();
    let chunk = vec![1u8; 64 * 1024];
    let write = async {
        for _ in 0..4 * WINDOW / chunk.len() {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("the writer waits for credit forever");
}

/// A notice is a small JSON object: a bigger one is not even parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_over_max_notice_is_malformed() {
    let (_agent, hub) = link().await;
    let t = Tunnel::new(hub.sender());
    let notice = |n: usize| {
        let v = serde_json::json!({ "ended": "x".repeat(n) }).to_string();
        t.deliver(&tunnel::encode(Op::Notice, 0, Bytes::from(v)))
    };
    assert!(matches!(notice(100), Delivered::Notice(_)));
    assert!(matches!(notice(tunnel::MAX_NOTICE), Delivered::Malformed));
}
