//! Rough throughput check, not run by default:
//! `cargo test -p noyau-link --release --test throughput -- --ignored --nocapture`

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::{listener, pair, recv};
use noyau_link::{Incoming, Lane, LinkConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by hand with --release (see the top of this file)"]
async fn small_messages_per_second() {
    // A producer that outruns the link fills the buffer up to the limit;
    // keep it small here so peak RSS shows the link's own footprint.
    let cfg = LinkConfig {
        buffer_limit: 4 * 1024 * 1024,
        ..LinkConfig::default()
    };
    let mut l = listener(cfg).await;
    let a = l.local_addr();
    let (agent, mut proxy) = pair(&mut l, a, cfg).await;
    const N: usize = 1_000_000;
    let tx = agent.sender();
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        let body = Bytes::from_static(b"{\"name\":\"stdout\",\"text\":\"x\\n\"}");
        for i in 0..N {
            // Retry on a full buffer, as a producer would after backing off.
            while tx
                .send(
                    Lane::Iopub,
                    vec![
                        Bytes::copy_from_slice(&(i as u64).to_be_bytes()),
                        body.clone(),
                    ],
                )
                .is_err()
            {
                tokio::task::yield_now().await;
            }
            if i % 4096 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    let mut n = 0;
    while n < N {
        if let Incoming::Message(..) = recv(&mut proxy).await {
            n += 1;
        }
    }
    let dt = start.elapsed();
    sender.await.unwrap();
    eprintln!(
        "{N} messages in {dt:?}: {:.0} msg/s",
        N as f64 / dt.as_secs_f64()
    );
    drop(agent);
}

/// Bulk bytes through one tunnel stream (a download through the hub): the
/// agent's server writes, the hub's end reads, each tunnel copying what it
/// receives once into its stream's buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by hand with --release (see the top of this file)"]
async fn tunnel_bulk_bytes_per_second() {
    use noyau_link::tunnel::{Delivered, Tunnel};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TOTAL: usize = 1024 * 1024 * 1024;
    let mut l = listener(LinkConfig::default()).await;
    let a = l.local_addr();
    let (mut agent, mut hub) = pair(&mut l, a, LinkConfig::default()).await;
    let at = Tunnel::new(agent.sender());
    tokio::spawn(async move {
        while let Some(m) = agent.recv().await {
            if let Incoming::Message(_, frames) = m {
                if let Delivered::Opened { id, credit } = at.deliver(&frames) {
                    let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
                    at.attach(id, ours, credit);
                    tokio::spawn(async move {
                        let chunk = vec![7u8; 256 * 1024];
                        for _ in 0..TOTAL / chunk.len() {
                            theirs.write_all(&chunk).await.unwrap();
                        }
                        theirs.shutdown().await.unwrap();
                    });
                }
            }
        }
    });
    let ht = Tunnel::new(hub.sender());
    let t = ht.clone();
    tokio::spawn(async move {
        while let Some(m) = hub.recv().await {
            if let Incoming::Message(_, frames) = m {
                t.deliver(&frames);
            }
        }
    });
    let start = Instant::now();
    let mut s = ht.open().unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    loop {
        match s.read(&mut buf).await.unwrap() {
            0 => break,
            k => n += k,
        }
    }
    let dt = start.elapsed();
    assert_eq!(n, TOTAL);
    eprintln!(
        "{TOTAL} bytes in {dt:?}: {:.0} MB/s",
        TOTAL as f64 / dt.as_secs_f64() / 1e6
    );
}
