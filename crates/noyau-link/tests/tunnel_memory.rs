//! What a hostile agent's messages cost the hub's memory, measured by a
//! counting allocator (alone in this test binary, so nothing else
//! allocates beside it).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{listener, pair};
use noyau_link::tunnel::{self, Delivered, Op, Tunnel};
use noyau_link::{Incoming, LinkConfig};

/// Bytes allocated and not yet freed.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// An agent sends a stalled stream (a browser that reads nothing) many
/// 1-byte messages, each followed by 32 KiB for a stream that does not
/// exist, so that every byte queued comes from a read buffer of its own.
/// Queued as slices of those buffers, 2000 bytes would hold 64 MiB of the
/// hub's memory; the hub must hold little more than what it counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_messages_cost_the_hub_what_they_count() {
    const N: usize = 2000;
    let mut l = listener(LinkConfig::default()).await;
    let a = l.local_addr();
    let (mut agent, mut hub) = pair(&mut l, a, LinkConfig::default()).await;
    let tunnel = Tunnel::new(hub.sender());
    let t = tunnel.clone();
    tokio::spawn(async move {
        while let Some(m) = hub.recv().await {
            if let Incoming::Message(_, frames) = m {
                if let Delivered::Violation(why) = t.deliver(&frames) {
                    panic!("{why}");
                }
            }
        }
    });
    let _browser = tunnel.open().unwrap();
    let id = loop {
        if let Some(Incoming::Message(_, frames)) = agent.recv().await {
            if let Some((Op::Open, id, _)) = tunnel::decode(&frames) {
                break id;
            }
        }
    };
    // One shared padding: the agent's unacknowledged copies cost nothing.
    let pad = Bytes::from(vec![0u8; 32 * 1024]);
    let sender = agent.sender();
    tokio::spawn(async move { while agent.recv().await.is_some() {} });
    // More than the browser's end buffers (64 KiB): the stream stalls for
    // good with these bytes counted.
    let stuck = 64 * 1024 + 1;
    let fill = tunnel::encode(Op::Data, id, Bytes::from(vec![b'x'; stuck]));
    sender.send(tunnel::TUNNEL_LANE, fill).unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..N {
        let one = tunnel::encode(Op::Data, id, Bytes::from_static(b"x"));
        sender.send(tunnel::TUNNEL_LANE, one).unwrap();
        let none = tunnel::encode(Op::Data, u64::MAX, pad.clone());
        sender.send(tunnel::TUNNEL_LANE, none).unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tunnel.queued_bytes() < (stuck + N) as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bytes never came"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let grown = LIVE.load(Ordering::Relaxed) - before;
    eprintln!("{N} queued bytes hold {grown} bytes of memory");
    assert!(
        grown < 8 * 1024 * 1024,
        "{N} queued bytes hold {grown} bytes of memory"
    );
}
