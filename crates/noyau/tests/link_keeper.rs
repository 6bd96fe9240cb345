//! `noyau link-keeper` as the process a restarting proxy starts: it holds
//! the link's port while it waits, hands it to the next proxy, and lets it
//! go at the end of its grace, removing its Unix socket either way.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use noyau_proxy::keeper::{self, Hold};

/// Waits (a deadline, not a sleep standing in for an event) until `done`.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A listening socket handed to a keeper process; its address.
fn keep(socket: &Path, grace: Duration) -> SocketAddr {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let hold = Hold { grace, agent: None };
    keeper::spawn(
        Path::new(env!("CARGO_BIN_EXE_noyau")),
        OwnedFd::from(tcp),
        socket,
        hold,
    )
    .unwrap();
    addr
}

#[tokio::test]
async fn a_keeper_holds_the_port_through_its_grace_then_lets_it_go() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("handover-a.sock");
    let addr = keep(&socket, Duration::from_millis(1500));
    // Our descriptor went with the spawn: only the keeper's holds the port.
    assert!(
        TcpListener::bind(addr).is_err(),
        "the port is free while kept"
    );
    wait_until("the keeper ends at its grace", || !socket.exists());
    wait_until("the port is let go", || TcpListener::bind(addr).is_ok());
}

#[tokio::test]
async fn the_next_proxy_fetches_the_kept_socket_and_the_keeper_ends() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("handover-b.sock");
    let addr = keep(&socket, Duration::from_secs(60));
    let path = socket.clone();
    let taken = tokio::task::spawn_blocking(move || keeper::fetch(&path))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.local_addr().unwrap(), addr);
    wait_until("the keeper ends once it has handed the socket over", || {
        !socket.exists()
    });
    // Still listening, now ours alone.
    let _client = std::net::TcpStream::connect(addr).unwrap();
    taken.accept().unwrap();
    assert!(TcpListener::bind(addr).is_err());
}
