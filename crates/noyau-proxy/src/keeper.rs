//! Keeping the link's port between two proxies.
//!
//! A frontend restarting a kernel waits for the old proxy to exit before it
//! starts the next one, which must listen on the same address: the agent
//! dials it. Were the port free in between, anyone on the host could bind
//! it first (`/proc/net/tcp` shows every listener's port and uid): the next
//! proxy could not listen, and the agent, dialling a stranger its
//! certificate pin refuses, would give up and end its job. So the port is
//! never free: the leaving proxy gives a second descriptor of its listening
//! socket to a keeper (`noyau link-keeper`, in a process group of its own so
//! that it outlives the proxy's), which holds it, still listening, until the
//! next proxy fetches it over a Unix socket beside the handover record (in
//! the private runtime directory), or until the grace period ends. The
//! agent's connections meanwhile wait in the socket's backlog.
//!
//! A socket address holds 107 bytes: when the socket's path is longer (a
//! long runtime directory), both ends bind or connect through
//! `/proc/self/fd/N/NAME`, N a descriptor of the directory opened and
//! checked ours and 0700 ([`address`]).
//!
//! Each end checks that the other is of the same user (SO_PEERCRED), and
//! the next proxy checks what it got (a listening TCP socket; the caller
//! checks its address) before serving on it.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketType,
};

/// How long the next proxy waits for the keeper's answer (it answers at once).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a socket could not be kept, handed over or taken.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{who} is uid {uid}'s, not ours")]
    NotOurs { who: String, uid: u32 },
    #[error("the keeper at {0} closed without handing a socket over")]
    NothingHanded(PathBuf),
    #[error("what was handed over is not a listening TCP socket ({0})")]
    NotListening(String),
    #[error(
        "the keeper's socket {} ({len} bytes) cannot be reached: {why}; set NOYAU_RUNTIME_DIR to a shorter directory",
        path.display()
    )]
    Unreachable {
        path: PathBuf,
        len: usize,
        why: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KeeperError {
    let what = what.into();
    move |source| KeeperError::Io { what, source }
}

/// The keeper's Unix socket for a handover record.
pub fn socket_path(record: &Path) -> PathBuf {
    record.with_extension("sock")
}

/// The longest path a Unix socket address holds (`sun_path`, less its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Where to bind or connect to the Unix socket `path`: the path itself,
/// or, when it is too long for a socket address, its name under
/// `/proc/self/fd/N`, N the returned descriptor of its directory (opened
/// without following a link and checked ours and 0700; keep it open
/// until bound or connected).
fn address(path: &Path) -> Result<(PathBuf, Option<OwnedFd>), KeeperError> {
    let len = path.as_os_str().len();
    if len <= SOCKET_PATH_MAX {
        return Ok((path.to_path_buf(), None));
    }
    let unreachable = |why: String| KeeperError::Unreachable {
        path: path.to_path_buf(),
        len,
        why,
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(unreachable("it names no file".into()));
    };
    let dir = noyau_trust::Expect::dir()
        .open(dir)
        .map_err(|e| unreachable(format!("longer than a socket address holds, and {e}")))?;
    let dir = OwnedFd::from(dir);
    let short = Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    if short.as_os_str().len() > SOCKET_PATH_MAX {
        return Err(unreachable(format!(
            "its name is longer than a socket address holds ({SOCKET_PATH_MAX} bytes)"
        )));
    }
    Ok((short, Some(dir)))
}

/// How long a keeper holds the port for the next proxy: `grace`, or until
/// the local agent `agent` ends (it gives up sooner than a remote one).
#[derive(Debug, Clone, Copy)]
pub struct Hold {
    pub grace: Duration,
    pub agent: Option<u32>,
}

/// Starts a keeper holding `listener` (a descriptor of the link's
/// listening socket) until the next proxy fetches it from `socket`, or
/// while `hold` says. The Unix socket is bound here, before the handover
/// record is written, so the next proxy finds it whenever it finds the
/// record. Must be called within a tokio runtime (the child is tokio's, so
/// that it is reaped if it ends first).
pub fn spawn(exe: &Path, listener: OwnedFd, socket: &Path, hold: Hold) -> Result<(), KeeperError> {
    // The runtime directory is ours alone: what is there is a socket an
    // earlier keeper could not remove (killed).
    let _ = std::fs::remove_file(socket);
    let (addr, _dir) = address(socket)?;
    let unix = UnixListener::bind(&addr).map_err(io(format!(
        "cannot listen on {} ({} bytes, bound as {}) for the next proxy",
        socket.display(),
        socket.as_os_str().len(),
        addr.display()
    )))?;
    // Both sockets as its stdin and stdout, as inetd passes a socket.
    let mut keeper = tokio::process::Command::new(exe);
    // Whole seconds, rounded up: letting go before the agent stops
    // dialling would open the window again.
    let secs = hold.grace.as_secs() + u64::from(hold.grace.subsec_nanos() > 0);
    keeper
        .arg("link-keeper")
        .arg("--for")
        .arg(secs.max(1).to_string())
        // Its path, to remove (its address may be this process's
        // `/proc/self/fd/N/…`).
        .arg("--socket")
        .arg(socket);
    if let Some(pid) = hold.agent {
        keeper.arg("--while-pid").arg(pid.to_string());
    }
    let started = keeper
        .stdin(std::process::Stdio::from(listener))
        .stdout(std::process::Stdio::from(OwnedFd::from(unix)))
        // Not in the proxy's group: a frontend that kills the kernel's
        // group once it has exited must not end the keeper with it.
        .process_group(0)
        // Nor holding the notebook's directory busy.
        .current_dir("/")
        .spawn();
    // Dropped, the child is left running and reaped by tokio if it ends first.
    started.map(drop).map_err(|e| {
        let _ = std::fs::remove_file(socket);
        io(format!("cannot start {} link-keeper", exe.display()))(e)
    })
}

/// The keeper's work (`noyau link-keeper`): holds the listening socket it
/// was given as stdin and hands it to the first process of its user that
/// connects to the Unix socket it was given as stdout (at `path`); or,
/// once the agent has given up (after the grace period, or at its end
/// when it is local), lets it go.
pub async fn keep(hold: Hold, path: &Path) -> Result<(), KeeperError> {
    let inherited = |what: &str, fd: std::io::Result<OwnedFd>| fd.map_err(io(what));
    let link = inherited("stdin", std::io::stdin().as_fd().try_clone_to_owned())?;
    let link = OwnedFd::from(listening_tcp(link)?);
    let unix = inherited("stdout", std::io::stdout().as_fd().try_clone_to_owned())?;
    let unix = UnixListener::from(unix);
    let placed = std::fs::metadata(path).ok();
    let unix = unix
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(unix))
        .map_err(io("stdout is not a listening Unix socket"))?;
    let why = tokio::select! {
        () = hand(&unix, &link) => None,
        () = ended(hold.agent) => Some("the agent ended"),
        () = tokio::time::sleep(hold.grace) => Some("no proxy came for it within the grace period"),
    };
    // Removed only if still ours: a later keeper for the same record binds anew.
    if let Some(was) = placed {
        let same = std::fs::metadata(path).is_ok_and(|now| now.ino() == was.ino());
        if same {
            let _ = std::fs::remove_file(path);
        }
    }
    if let Some(why) = why {
        tracing::info!("link keeper: {why}; letting the link's port go");
    }
    Ok(())
}

/// Returns once process `pid` has ended; never without one.
async fn ended(pid: Option<u32>) {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while noyau_client::agent::pid_alive(pid) {
        tick.tick().await;
    }
}

/// Hands `link` to the first process of ours that connects.
pub(crate) async fn hand(unix: &tokio::net::UnixListener, link: &OwnedFd) {
    loop {
        let stream = match unix.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("link keeper: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match send(&stream, link) {
            Ok(()) => return,
            Err(e) => tracing::warn!("link keeper: not handed over: {e}"),
        }
    }
}

fn send(stream: &tokio::net::UnixStream, link: &OwnedFd) -> Result<(), KeeperError> {
    let uid = stream
        .peer_cred()
        .map_err(io("reading the next proxy's credentials"))?
        .uid();
    if uid != nix::unistd::geteuid().as_raw() {
        return Err(KeeperError::NotOurs {
            who: "the process asking for the link's socket".into(),
            uid,
        });
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [link.as_fd()];
    control.push(SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(
        stream,
        &[IoSlice::new(b"L")],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(|e| io("sending the socket")(e.into()))?;
    Ok(())
}

/// The listening socket the previous proxy's keeper holds, fetched from
/// `socket`. An error says why there is none (no keeper: it could not be
/// started, or it ended, killed or at the end of its grace).
pub fn fetch(socket: &Path) -> Result<TcpListener, KeeperError> {
    let (addr, _dir) = address(socket)?;
    let stream = UnixStream::connect(&addr).map_err(io(format!(
        "no link keeper answers at {}",
        socket.display()
    )))?;
    let uid = rustix::net::sockopt::socket_peercred(&stream)
        .map_err(|e| io("reading the keeper's credentials")(e.into()))?
        .uid
        .as_raw();
    if uid != nix::unistd::geteuid().as_raw() {
        return Err(KeeperError::NotOurs {
            who: format!("the keeper at {}", socket.display()),
            uid,
        });
    }
    stream
        .set_read_timeout(Some(FETCH_TIMEOUT))
        .map_err(io("setting a timeout"))?;
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        // Not inherited by the agents and kernels this proxy starts.
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| io(format!("reading from the keeper at {}", socket.display()))(e.into()))?;
    let fd = control.drain().find_map(|m| match m {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    let fd = fd.ok_or_else(|| KeeperError::NothingHanded(socket.to_path_buf()))?;
    listening_tcp(fd)
}

/// `fd` if it is a listening TCP socket.
fn listening_tcp(fd: OwnedFd) -> Result<TcpListener, KeeperError> {
    let what = |e: rustix::io::Errno| KeeperError::NotListening(e.to_string());
    let family = rustix::net::sockopt::socket_domain(&fd).map_err(what)?;
    if family != AddressFamily::INET && family != AddressFamily::INET6 {
        return Err(KeeperError::NotListening(format!(
            "address family {}",
            family.as_raw()
        )));
    }
    if rustix::net::sockopt::socket_type(&fd).map_err(what)? != SocketType::STREAM {
        return Err(KeeperError::NotListening("not a stream socket".into()));
    }
    if !rustix::net::sockopt::socket_acceptconn(&fd).map_err(what)? {
        return Err(KeeperError::NotListening("not listening".into()));
    }
    Ok(TcpListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listening_tcp_socket_is_taken() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let connected = std::net::TcpStream::connect(addr).unwrap();
        let e = listening_tcp(OwnedFd::from(connected)).unwrap_err();
        assert!(e.to_string().contains("not listening"), "{e}");
        let taken = listening_tcp(OwnedFd::from(tcp)).unwrap();
        assert_eq!(taken.local_addr().unwrap(), addr);

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = listening_tcp(OwnedFd::from(udp)).unwrap_err();
        assert!(e.to_string().contains("not a stream socket"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let unix = UnixListener::bind(dir.path().join("s")).unwrap();
        let e = listening_tcp(OwnedFd::from(unix)).unwrap_err();
        assert!(e.to_string().contains("address family"), "{e}");
    }

    #[tokio::test]
    async fn a_kept_socket_is_fetched_still_listening_at_its_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir.path().join("handover-x.json"));
        let e = fetch(&path).unwrap_err();
        assert!(
            e.to_string().starts_with("no link keeper answers at"),
            "{e}"
        );

        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let unix = tokio::net::UnixListener::bind(&path).unwrap();
        let keeper = tokio::spawn(async move { hand(&unix, &OwnedFd::from(tcp)).await });
        let fetched = tokio::task::spawn_blocking(move || fetch(&path));
        let taken = fetched.await.unwrap().unwrap();
        keeper.await.unwrap();
        // The keeper's descriptor is closed: what was fetched still listens.
        assert_eq!(taken.local_addr().unwrap(), addr);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (_, peer) = taken.accept().unwrap();
        assert!(peer.ip().is_loopback());
    }
}
