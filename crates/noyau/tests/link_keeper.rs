//! `noyau link-keeper` as the process a restarting proxy starts: it holds
//! the link's port while it waits, hands it to the next proxy, and lets it
//! go at the end of its grace, removing its Unix socket either way; a
//! socket whose path is too long for a Unix socket address is reached
//! through its directory.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
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

/// The kept listener, fetched from the keeper at `socket` as the next
/// proxy does; it must be the one listening on `addr`.
async fn fetched(socket: &Path, addr: SocketAddr) -> TcpListener {
    let path = socket.to_path_buf();
    let taken = tokio::task::spawn_blocking(move || keeper::fetch(&path))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.local_addr().unwrap(), addr);
    taken
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
    let taken = fetched(&socket, addr).await;
    wait_until("the keeper ends once it has handed the socket over", || {
        !socket.exists()
    });
    // Still listening, now ours alone.
    let _client = std::net::TcpStream::connect(addr).unwrap();
    taken.accept().unwrap();
    assert!(TcpListener::bind(addr).is_err());
}

#[tokio::test]
async fn a_keeper_in_a_runtime_dir_too_long_for_a_socket_address_still_hands_the_port_over() {
    // A runtime directory of ~90 bytes (a long `NOYAU_RUNTIME_DIR`, a
    // `$TMPDIR/noyau-UID-XXXX` fallback): with the record's name, the
    // socket's path is longer than a Unix socket address holds (107).
    let top = tempfile::tempdir().unwrap();
    let pad = 90usize.saturating_sub(top.path().as_os_str().len() + 1);
    let dir = top.path().join("r".repeat(pad.max(1)));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    let socket = dir.join(format!("handover-{}.sock", "0123456789abcdef".repeat(2)));
    assert!(socket.as_os_str().len() > 107, "{}", socket.display());
    let addr = keep(&socket, Duration::from_secs(60));
    assert!(
        TcpListener::bind(addr).is_err(),
        "the port is free while kept"
    );
    let _taken = fetched(&socket, addr).await;
    wait_until(
        "the keeper removes its socket once it has handed over",
        || !socket.exists(),
    );
}

#[test]
fn a_socket_path_that_cannot_be_reached_is_named_with_its_length() {
    // The directory is not private: the long path is not reached through it.
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("o".repeat(100));
    std::fs::DirBuilder::new().mode(0o755).create(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("handover-x.sock");
    let len = socket.as_os_str().len();
    let e = keeper::fetch(&socket).unwrap_err().to_string();
    assert!(
        e.contains(&socket.display().to_string()) && e.contains(&format!("{len} bytes")),
        "{e}"
    );
}
