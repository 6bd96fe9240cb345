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
