//! End-to-end tests over real TCP on 127.0.0.1 and real TLS.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{listener, pair, recv, wait_event, Hop};
use noyau_link::{
    dial, CloseReason, Incoming, Lane, LinkConfig, LinkError, LinkEvent, ServerIdentity,
};

fn b(v: &[u8]) -> Bytes {
    Bytes::copy_from_slice(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_both_ways() {
    let mut l = listener(LinkConfig::default()).await;
    let (mut agent, mut proxy) = {
        let a = l.local_addr();
        pair(&mut l, a, LinkConfig::default())
    }
    .await;

    let msg = vec![
        b(b"<IDS|MSG>"),
        b(&[0, 255, 1, 254]),
        Bytes::new(),
        b(&[7; 100_000]),
    ];
    agent.sender().send(Lane::Shell, msg.clone()).unwrap();
    match recv(&mut proxy).await {
        Incoming::Message(Lane::Shell, got) => assert_eq!(got, msg),
        other => panic!("unexpected {other:?}"),
    }
    let reply = vec![b(b"reply"), b(&[0; 3])];
    proxy.sender().send(Lane::Iopub, reply.clone()).unwrap();
    proxy.sender().send(Lane::Stdin, vec![b(b"input")]).unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        match recv(&mut agent).await {
            Incoming::Message(lane, m) => got.push((lane, m)),
            other => panic!("unexpected {other:?}"),
        }
    }
    got.sort_by_key(|(l, _)| *l);
    assert_eq!(got[0], (Lane::Stdin, vec![b(b"input")]));
    assert_eq!(got[1], (Lane::Iopub, reply));

    // A graceful close reaches the peer as Closed(PeerClosed), then None.
    agent.close().await;
    wait_event(&mut proxy, LinkEvent::Closed(CloseReason::PeerClosed)).await;
    assert!(proxy.recv().await.is_none());
    assert!(matches!(
        proxy.sender().send(Lane::Shell, vec![]),
        Err(LinkError::Closed(_))
    ));
}

#[tokio::test]
async fn wrong_pin_is_refused() {
    let mut l = listener(LinkConfig::default()).await;
    let token = l.issue_token();
    let other = ServerIdentity::generate(&[]).unwrap().pin().unwrap();
    let err = dial(
        &l.local_addr().to_string(),
        &other,
        &token,
        LinkConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LinkError::PinMismatch { .. }), "{err}");
    assert!(err.to_string().contains("does not match the pin"));
    // The token was not spent by the failed attempt.
    let (addr, pin) = (l.local_addr().to_string(), l.pin());
    let (a, p) = tokio::join!(dial(&addr, &pin, &token, LinkConfig::default()), l.accept());
    a.unwrap();
    p.unwrap();
    assert!(matches!(
        dial(
            &l.local_addr().to_string(),
            "zz",
            &token,
            LinkConfig::default()
        )
        .await,
        Err(LinkError::BadPin(_))
    ));
}

#[tokio::test]
async fn tokens_work_once() {
    let mut l = listener(LinkConfig::default()).await;
    let addr = l.local_addr().to_string();
    let pin = l.pin();

    let err = dial(&addr, &pin, "not-a-token", LinkConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LinkError::Refused(r) if r.contains("token")),
        "{err}"
    );

    let token = l.issue_token();
    assert_eq!(token.len(), 64);
    let (a, p) = tokio::join!(dial(&addr, &pin, &token, LinkConfig::default()), l.accept());
    let (_a, _p) = (a.unwrap(), p.unwrap());
    let err = dial(&addr, &pin, &token, LinkConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LinkError::Refused(r) if r.contains("already used")),
        "{err}"
    );
}

#[tokio::test]
async fn revoked_tokens_are_refused() {
    let l = listener(LinkConfig::default()).await;
    let (addr, pin) = (l.local_addr().to_string(), l.pin());
    let token = "a".repeat(64);
    l.tokens().add(&token);
    l.tokens().revoke(&token);
    let err = dial(&addr, &pin, &token, LinkConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LinkError::Refused(r) if r.contains("token")),
        "{err}"
    );
}

#[tokio::test]
async fn nothing_listening_fails_fast() {
    let addr = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let pin = ServerIdentity::generate(&[]).unwrap().pin().unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        dial(&addr.to_string(), &pin, "t", LinkConfig::default()),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(err, LinkError::Connect { .. }), "{err}");
}

// Single-threaded on purpose: the whole flood is queued before the link's
// writer gets to run, which is the situation priority is for.
#[tokio::test(flavor = "current_thread")]
async fn control_overtakes_iopub_flood() {
    let mut l = listener(LinkConfig::default()).await;
    let (agent, mut proxy) = {
        let a = l.local_addr();
        pair(&mut l, a, LinkConfig::default()).await
    };
    let tx = agent.sender();
    const N: u32 = 100_000;
    for i in 0..N {
        tx.send(
            Lane::Iopub,
            vec![b(&i.to_be_bytes()), b(b"some output text")],
        )
        .unwrap();
    }
    tx.send(Lane::Control, vec![b(b"interrupt_request")])
        .unwrap();

    // Receives until the next control message; returns the IOPub count seen.
    async fn until_control(proxy: &mut noyau_link::Link, next: &mut u32) -> u32 {
        let mut seen = 0;
        loop {
            match recv(proxy).await {
                Incoming::Message(Lane::Control, _) => return seen,
                Incoming::Message(Lane::Iopub, m) => {
                    assert_eq!(u32::from_be_bytes(m[0][..].try_into().unwrap()), *next);
                    *next += 1;
                    seen += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let mut next = 0;
    let before = until_control(&mut proxy, &mut next).await;
    eprintln!("queued flood: control arrived after {before} of {N} iopub messages");
    assert!(
        before < 300,
        "control waited behind {before} iopub messages"
    );

    // Again while the flood is moving: what is already in socket buffers
    // cannot be overtaken, the rest can.
    while next < N / 10 {
        until_iopub(&mut proxy, &mut next).await;
    }
    tx.send(Lane::Control, vec![b(b"interrupt_request")])
        .unwrap();
    let behind = until_control(&mut proxy, &mut next).await;
    eprintln!("moving flood: control arrived after {behind} more iopub messages");
    assert!(next < N, "control arrived after the last iopub message");
    while next < N {
        until_iopub(&mut proxy, &mut next).await;
    }
    drop(agent);
}

async fn until_iopub(proxy: &mut noyau_link::Link, next: &mut u32) {
    match recv(proxy).await {
        Incoming::Message(Lane::Iopub, m) => {
            assert_eq!(u32::from_be_bytes(m[0][..].try_into().unwrap()), *next);
            *next += 1;
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_cuts_loses_and_duplicates_nothing() {
    let cfg = LinkConfig::default();
    let mut l = listener(cfg).await;
    let hop = Hop::start(l.local_addr()).await;
    let (mut agent, mut proxy) = pair(&mut l, hop.addr, cfg).await;

    const N: u64 = 100_000;
    let tx = agent.sender();
    let sender = tokio::spawn(async move {
        for i in 0..N {
            tx.send(Lane::Iopub, vec![b(&i.to_be_bytes()), b(b"stream")])
                .unwrap();
            // Spread the sends out so the cuts land mid-stream.
            if i % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    // The agent side collects what the proxy sends during the cuts.
    let agent_rx = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut events = Vec::new();
        while got.len() < 2 {
            match recv(&mut agent).await {
                Incoming::Message(lane, m) => got.push((lane, m)),
                Incoming::Event(e) => events.push(e),
            }
        }
        (agent, got, events)
    });

    let mut next = 0u64;
    let mut events = Vec::new();
    let cuts = [N / 3, 2 * N / 3];
    while next < N {
        match recv(&mut proxy).await {
            Incoming::Message(Lane::Iopub, m) => {
                let i = u64::from_be_bytes(m[0][..].try_into().unwrap());
                assert_eq!(i, next, "out of order or duplicated");
                next += 1;
                if let Some(k) = cuts.iter().position(|&c| c == next) {
                    hop.cut();
                    proxy
                        .sender()
                        .send(Lane::Shell, vec![b(format!("during cut {k}").as_bytes())])
                        .unwrap();
                    // Wait (with a timeout) until the proxy notices the cut,
                    // then let the agent back in.
                    loop {
                        match recv(&mut proxy).await {
                            Incoming::Event(LinkEvent::Disconnected) => break,
                            Incoming::Message(Lane::Iopub, m) => {
                                let i = u64::from_be_bytes(m[0][..].try_into().unwrap());
                                assert_eq!(i, next, "out of order or duplicated");
                                next += 1;
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                    events.push(LinkEvent::Disconnected);
                    hop.restore();
                }
            }
            Incoming::Event(e) => events.push(e),
            other => panic!("unexpected {other:?}"),
        }
    }
    sender.await.unwrap();
    assert_eq!(
        events,
        [
            LinkEvent::Disconnected,
            LinkEvent::Reconnected,
            LinkEvent::Disconnected,
            LinkEvent::Reconnected
        ]
    );
    let (_agent, got, agent_events) = agent_rx.await.unwrap();
    assert_eq!(
        got,
        [
            (Lane::Shell, vec![b(b"during cut 0")]),
            (Lane::Shell, vec![b(b"during cut 1")])
        ]
    );
    assert!(agent_events.contains(&LinkEvent::Reconnected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_bound_returns_buffer_full() {
    let cfg = LinkConfig {
        buffer_limit: 1024 * 1024,
        ..LinkConfig::default()
    };
    let mut l = listener(cfg).await;
    let hop = Hop::start(l.local_addr()).await;
    let (agent, _proxy) = pair(&mut l, hop.addr, cfg).await;
    hop.cut();
    let tx = agent.sender();
    let chunk = Bytes::from(vec![0u8; 4096]);
    let mut sent = 0usize;
    let err = loop {
        match tx.send(Lane::Iopub, vec![chunk.clone()]) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000, "never hit the bound");
    };
    assert!(
        matches!(
            err,
            LinkError::BufferFull {
                lane: Lane::Iopub,
                ..
            }
        ),
        "{err}"
    );
    assert!(tx.buffered_bytes() <= cfg.buffer_limit);
    assert!(sent >= 200, "bound hit too early: {sent}");
    // Control still gets through the bound.
    tx.send(Lane::Control, vec![b(b"interrupt")]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gives_up_when_proxy_is_gone() {
    let cfg = LinkConfig {
        give_up_after: Duration::from_millis(1500),
        ..LinkConfig::default()
    };
    let mut l = listener(cfg).await;
    let hop = Hop::start(l.local_addr()).await;
    let (mut agent, mut proxy) = pair(&mut l, hop.addr, cfg).await;
    hop.cut();
    agent.sender().send(Lane::Iopub, vec![b(b"lost?")]).unwrap();
    wait_event(&mut agent, LinkEvent::Closed(CloseReason::GaveUp)).await;
    assert!(agent.recv().await.is_none());
    wait_event(&mut proxy, LinkEvent::Closed(CloseReason::GaveUp)).await;
    assert!(matches!(
        agent.sender().send(Lane::Iopub, vec![]),
        Err(LinkError::Closed(CloseReason::GaveUp))
    ));
}

/// A receiver busy for longer than the idle timeout while the peer keeps
/// sending (the link's reader waits on its full delivery channel) is not a
/// silent peer: the link must not drop and reconnect. (When the reader
/// comes back, its idle timer and the next ping are both ready and either
/// may be taken: six rounds make the old behaviour show almost surely.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_not_an_idle_peer() {
    let cfg = LinkConfig {
        idle_timeout: Duration::from_secs(1),
        ping_interval: Duration::from_millis(200),
        ..LinkConfig::default()
    };
    let mut l = listener(cfg).await;
    let (agent, mut proxy) = {
        let a = l.local_addr();
        pair(&mut l, a, cfg)
    }
    .await;
    let n = 1500;
    let mut events = Vec::new();
    for _round in 0..6 {
        for i in 0..n {
            agent
                .sender()
                .send(Lane::Iopub, vec![Bytes::from(format!("m{i}"))])
                .unwrap();
        }
        // The proxy's user is busy for longer than the idle timeout (this
        // sleep is the scenario, not a wait for something).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut got = 0;
        while got < n {
            match recv(&mut proxy).await {
                Incoming::Message(_, _) => got += 1,
                Incoming::Event(e) => events.push(e),
            }
        }
    }
    drop(agent);
    assert!(
        events.is_empty(),
        "link events while a slow consumer caught up: {events:?}"
    );
}

/// The proxy side knows which one-time token its agent dialled with, so
/// that what the agent says later can be held to it; the agent's side knows
/// none.
#[tokio::test]
async fn the_proxy_side_knows_the_token_its_agent_dialled_with() {
    let mut l = listener(LinkConfig::default()).await;
    let (addr, pin) = (l.local_addr().to_string(), l.pin());
    let token = l.issue_token();
    let other = l.issue_token();
    let (a, p) = tokio::join!(dial(&addr, &pin, &token, LinkConfig::default()), l.accept());
    let (agent, proxy) = (a.unwrap(), p.unwrap());
    assert!(proxy.dialled_with(&token));
    assert!(!proxy.dialled_with(&other));
    assert!(!proxy.dialled_with(""));
    assert!(!agent.dialled_with(&token));
}

/// A link whose `max_frame` is small (the hub's, which carries only a
/// tunnel) never takes a bigger frame from its peer, whatever the peer's
/// own setting: the connection is dropped instead, and the message never
/// delivered. Its own sends are held to it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_links_max_frame_is_refused() {
    let small = LinkConfig {
        max_frame: 64 * 1024,
        give_up_after: Duration::from_secs(5),
        ..LinkConfig::default()
    };
    let mut l = listener(small).await;
    let a = l.local_addr();
    let (agent, mut proxy) = pair(&mut l, a, LinkConfig::default()).await;
    agent
        .sender()
        .send(Lane::Shell, vec![b(&[1; 128 * 1024])])
        .unwrap();
    match recv(&mut proxy).await {
        Incoming::Event(LinkEvent::Disconnected) => {}
        other => panic!("the big frame was not refused: {other:?}"),
    }
    let e = proxy
        .sender()
        .send(Lane::Shell, vec![b(&[1; 128 * 1024])])
        .unwrap_err();
    assert!(
        matches!(e, LinkError::MessageTooLarge { max, .. } if max == 64 * 1024),
        "{e}"
    );
    // What fits goes through.
    proxy.sender().send(Lane::Shell, vec![b(b"small")]).unwrap();
}

#[tokio::test]
async fn an_expected_token_is_refused_until_added_then_works_once() {
    let l = listener(LinkConfig::default()).await;
    let (addr, pin) = (l.local_addr().to_string(), l.pin());
    let token = "b".repeat(64);
    l.tokens().expect(&token);
    let err = dial(&addr, &pin, &token, LinkConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LinkError::Refused(r) if r.contains("token")),
        "{err}"
    );
    l.tokens().add(&token);
    dial(&addr, &pin, &token, LinkConfig::default())
        .await
        .unwrap();
    let err = dial(&addr, &pin, &token, LinkConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(&err, LinkError::Refused(_)), "{err}");
}
