//! Where the hub's web server listens: `listen = "127.0.0.1:8000"`, or
//! `listen = "unix:/run/noyau-hub/web.sock"`, a unix socket the web server
//! in front (nginx, Apache) connects to.
//!
//! A TCP port above 1024 is anyone's to take while the hub is down (an
//! upgrade, a crash, a reboot): a local user who binds it first receives
//! what the web server forwards, every user's password and cookie. A unix
//! socket lives in a directory only root or the hub's account can write,
//! so no one else can put theirs in its place; its mode (0660, the group
//! `listen_group`) lets only the web server connect.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::Router;
use listenfd::ListenFd;
use noyau_trust::{Expect, Mode, Owner, TrustError};
use serde::Deserialize;

/// The socket's mode: the hub's account and `listen_group` (the web server).
const SOCKET_MODE: u32 = 0o660;

/// The peer of every request on the unix socket, for `proxy_addresses` and
/// the login throttle: the web server on this host, as if on loopback.
pub const UNIX_PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// `listen` in hub.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Listen {
    Tcp(SocketAddr),
    /// `unix:PATH`, an absolute path.
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() || path.file_name().is_none() {
                return Err(format!(
                    "listen = \"{s}\": give the socket's absolute path, \
                     e.g. \"unix:/run/noyau-hub/web.sock\""
                ));
            }
            return Ok(Listen::Unix(path));
        }
        s.parse().map(Listen::Tcp).map_err(|_| {
            format!(
                "listen = \"{s}\": give an address and port (\"127.0.0.1:8000\") \
                 or a unix socket (\"unix:/run/noyau-hub/web.sock\")"
            )
        })
    }
}

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Why the hub cannot listen on its unix socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "the directory of listen's socket: {0} (it must exist, be root's or the hub's \
         account's, and be writable by no one else, e.g. systemd's \
         RuntimeDirectory=noyau-hub)"
    )]
    Dir(#[source] TrustError),
    #[error("listen's socket, left by an earlier run: {0}")]
    Stale(#[source] TrustError),
    #[error(
        "{}: a process is serving this socket (another hub?); stop it first",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("listen_group = \"{0}\": no such group")]
    NoGroup(String),
    #[error(
        "cannot give {} to the group {group}: the hub's account must be root or a \
         member of {group}: {source}",
        path.display()
    )]
    Chown {
        path: PathBuf,
        group: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The web server's listener, bound.
pub enum Web {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Web {
    /// The listener systemd passed (socket activation: `noyau-hub.socket`
    /// holds it while the hub restarts), else `listen` bound; a unix
    /// socket the hub makes is given to `group` (a name).
    pub async fn bind(
        listen: &Listen,
        group: Option<&str>,
        mut systemd: ListenFd,
    ) -> anyhow::Result<Web> {
        match systemd.len() {
            0 => {}
            1 => return passed(listen, &mut systemd),
            // listenfd makes a socket close-on-exec only when it is taken:
            // a second one would be inherited by the commands the hub runs
            // as users (runuser closes nothing), who could accept on it.
            n => anyhow::bail!(
                "systemd passed the hub {n} sockets; it serves one: give its socket unit a \
                 single ListenStream= (the one hub.toml's listen names)"
            ),
        }
        match listen {
            Listen::Tcp(addr) => {
                let tcp = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
                Ok(Web::Tcp(tcp))
            }
            Listen::Unix(path) => Ok(Web::Unix(bind_unix(path, group)?, path.clone())),
        }
    }

    /// Serves `app` until the listener fails. Requests on the unix socket
    /// come from [`UNIX_PEER`].
    pub async fn serve(self, app: Router) -> std::io::Result<()> {
        match self {
            Web::Tcp(tcp) => {
                // Responses go out as headers then body: without NODELAY,
                // Nagle and the client's delayed ACK add 40 ms to every
                // proxied request.
                let tcp = axum::serve::ListenerExt::tap_io(tcp, |t| {
                    if let Err(e) = t.set_nodelay(true) {
                        tracing::debug!("TCP_NODELAY: {e}");
                    }
                });
                axum::serve(tcp, app.into_make_service_with_connect_info::<SocketAddr>()).await
            }
            Web::Unix(unix, _) => {
                let app = app.layer(axum::Extension(ConnectInfo(UNIX_PEER)));
                axum::serve(unix, app.into_make_service()).await
            }
        }
    }
}

impl fmt::Display for Web {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Web::Tcp(t) => match t.local_addr() {
                Ok(a) => write!(f, "http://{a}"),
                Err(_) => f.write_str("a TCP port"),
            },
            Web::Unix(_, p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The socket systemd passed, if it is the one `listen` names: the same
/// address, or the same path in a directory no one else can write, with a
/// mode that does not let every local user connect (systemd's default
/// `SocketMode` is 0666).
fn passed(listen: &Listen, systemd: &mut ListenFd) -> anyhow::Result<Web> {
    let mismatch = |found: String| {
        anyhow::anyhow!(
            "systemd passed the hub {found}, but hub.toml says listen = \"{listen}\": \
             give the socket unit's ListenStream= the same address"
        )
    };
    let web = match listen {
        Listen::Tcp(addr) => {
            let tcp = systemd
                .take_tcp_listener(0)
                .map_err(|e| mismatch(e.to_string()))?
                .context("systemd passed no socket")?;
            let local = tcp.local_addr()?;
            if local != *addr {
                return Err(mismatch(local.to_string()));
            }
            tcp.set_nonblocking(true)?;
            Web::Tcp(tokio::net::TcpListener::from_std(tcp)?)
        }
        Listen::Unix(path) => {
            let unix = systemd
                .take_unix_listener(0)
                .map_err(|e| mismatch(e.to_string()))?
                .context("systemd passed no socket")?;
            let local = unix.local_addr()?;
            if local.as_pathname() != Some(path.as_path()) {
                return Err(mismatch(format!("{local:?}")));
            }
            check_dir(path)?;
            let meta = Expect::socket()
                .owner(Owner::MeOr(0, "root"))
                .check(path)
                .context("the socket systemd passed")?;
            if meta.mode() & 0o002 != 0 {
                anyhow::bail!(
                    "{}: every local user can connect (mode {:04o}): give the socket unit \
                     SocketMode=0660 and SocketGroup= the web server's group",
                    path.display(),
                    meta.mode() & 0o7777
                );
            }
            unix.set_nonblocking(true)?;
            Web::Unix(tokio::net::UnixListener::from_std(unix)?, path.clone())
        }
    };
    tracing::info!("listening on the socket systemd passed");
    Ok(web)
}

/// `path`'s directory: root's or the hub's, writable by no one else.
fn check_dir(path: &Path) -> Result<(), ListenError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    Expect::dir()
        .owner(Owner::MeOr(0, "root"))
        .mode(Mode::NoOthersWrite)
        .follow_links()
        .check(dir)
        .map(drop)
        .map_err(ListenError::Dir)
}

/// Makes the socket at `path`: its directory checked, a stale socket of the
/// hub's replaced, mode [`SOCKET_MODE`] and its group set before it listens
/// (no one connects through a wider mode meanwhile).
pub fn bind_unix(
    path: &Path,
    group: Option<&str>,
) -> Result<tokio::net::UnixListener, ListenError> {
    check_dir(path)?;
    let gid = group
        .map(|g| match nix::unistd::Group::from_name(g) {
            Ok(Some(grp)) => Ok(grp.gid),
            _ => Err(ListenError::NoGroup(g.into())),
        })
        .transpose()?;
    remove_stale(path)?;
    let io = |source| ListenError::Io {
        path: path.into(),
        source,
    };
    let socket =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).map_err(io)?;
    socket
        .bind(&socket2::SockAddr::unix(path).map_err(io)?)
        .map_err(io)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid.as_raw())).map_err(|source| {
            ListenError::Chown {
                path: path.into(),
                group: group.unwrap_or_default().into(),
                source,
            }
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io)?;
    socket.listen(1024).map_err(io)?;
    socket.set_nonblocking(true).map_err(io)?;
    tokio::net::UnixListener::from_std(socket.into()).map_err(io)
}

/// Removes the socket a previous run left at `path`: only a socket of the
/// hub's account (the directory is no one else's, so none other is
/// expected), and only if nothing serves it.
fn remove_stale(path: &Path) -> Result<(), ListenError> {
    match Expect::socket().check(path) {
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(ListenError::Stale(e)),
        Ok(_) => {}
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ListenError::InUse(path.into()));
    }
    std::fs::remove_file(path).map_err(|source| ListenError::Io {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;

    use axum::routing::get;

    use super::*;

    /// A directory of the test's, with `mode`.
    fn dir(mode: u32) -> tempfile::TempDir {
        let d = tempfile::Builder::new()
            .prefix("noyau-hub-listen-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        d
    }

    /// GET `uri` through the unix socket at `path`: the status and body.
    async fn get_over(path: &Path, uri: &str) -> (u16, String) {
        let stream = tokio::net::UnixStream::connect(path).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = axum::http::Request::get(uri)
            .header("host", "hub")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The hub's handlers, and header mode's `auth::gate` layer, take the
    /// peer's address (`ConnectInfo`, a 500 if missing): on the socket they
    /// get [`UNIX_PEER`].
    fn app() -> Router {
        let gate = |ConnectInfo(_): ConnectInfo<SocketAddr>,
                    req: axum::extract::Request,
                    next: axum::middleware::Next| next.run(req);
        Router::new()
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
            )
            .layer(axum::middleware::from_fn(gate))
    }

    #[test]
    fn listen_is_an_address_or_an_absolute_unix_path() {
        let l: Listen = "unix:/run/noyau-hub/web.sock".parse().unwrap();
        assert_eq!(l, Listen::Unix("/run/noyau-hub/web.sock".into()));
        assert_eq!(l.to_string(), "unix:/run/noyau-hub/web.sock");
        for bad in ["unix:web.sock", "unix:", "localhost", "unix:/"] {
            let e = bad.parse::<Listen>().unwrap_err();
            assert!(
                e.contains(bad) && e.contains("unix:/run/noyau-hub/web.sock"),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn the_hub_serves_http_on_its_unix_socket() {
        let d = dir(0o755);
        let path = d.path().join("web.sock");
        // The group the web server is in: here, this process's own.
        let gid = nix::unistd::getegid();
        let group = nix::unistd::Group::from_gid(gid).unwrap().unwrap().name;
        let web = Web::bind(&Listen::Unix(path.clone()), Some(&group), ListenFd::empty())
            .await
            .unwrap();
        assert_eq!(web.to_string(), format!("unix:{}", path.display()));
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, SOCKET_MODE);
        assert_eq!(meta.gid(), gid.as_raw());
        tokio::spawn(web.serve(app()));
        assert_eq!(get_over(&path, "/peer").await, (200, UNIX_PEER.to_string()));
    }

    #[tokio::test]
    async fn a_directory_others_can_write_is_refused() {
        let d = dir(0o777);
        let path = d.path().join("web.sock");
        let e = Web::bind(&Listen::Unix(path.clone()), None, ListenFd::empty())
            .await
            .err()
            .unwrap();
        let e = format!("{e:#}");
        assert!(
            e.contains("writable by its group or others")
                && e.contains(&format!("chmod go-w {}", d.path().display()))
                && e.contains("RuntimeDirectory"),
            "{e}"
        );
        assert!(!path.exists(), "no socket made");
        let e = bind_unix(&d.path().join("missing/web.sock"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("it must exist"), "{e}");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_served_one_or_another_file_is_not() {
        let d = dir(0o755);
        let path = d.path().join("web.sock");
        // An earlier run's socket, no longer served (the hub was killed).
        // (binding over it fails with EADDRINUSE)
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let web = Web::bind(&Listen::Unix(path.clone()), None, ListenFd::empty())
            .await
            .unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, SOCKET_MODE, "a new socket");
        tokio::spawn(web.serve(app()));
        assert_eq!(get_over(&path, "/peer").await.0, 200);
        // A second hub leaves the first one's socket alone.
        let e = bind_unix(&path, None).err().unwrap().to_string();
        assert!(e.contains("a process is serving this socket"), "{e}");
        assert_eq!(get_over(&path, "/peer").await.0, 200);
        // Something else at the path is not removed.
        let file = d.path().join("file.sock");
        std::fs::write(&file, "x").unwrap();
        let e = bind_unix(&file, None).err().unwrap().to_string();
        assert!(e.contains("is a regular file, not a socket"), "{e}");
        assert!(file.is_file());
    }

    #[test]
    fn an_unknown_group_is_named() {
        let d = dir(0o755);
        let e = bind_unix(&d.path().join("web.sock"), Some("no-such-group-xyz"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("listen_group = \"no-such-group-xyz\": no such group"),
            "{e}"
        );
    }

    /// hub.toml with `listen_lines` (and one profile).
    fn load(listen_lines: &str) -> anyhow::Result<crate::config::HubConfig> {
        let d = dir(0o700);
        let toml = d.path().join("hub.toml");
        std::fs::write(
            &toml,
            format!(
                "{listen_lines}\nlink_bind = \"127.0.0.1:2\"\nstate_dir = \"/x\"\n\
                 [profiles.p]\npartitions = [\"q\"]\ncores = {{ min = 1, max = 2, default = 1 }}\n\
                 minutes = {{ min = 1, max = 9, default = 5 }}\n"
            ),
        )
        .unwrap();
        crate::config::HubConfig::load(&toml)
    }

    #[test]
    fn hub_toml_takes_a_unix_listen_and_its_group() {
        let cfg =
            load("listen = \"unix:/run/noyau-hub/web.sock\"\nlisten_group = \"www-data\"").unwrap();
        assert_eq!(cfg.listen, Listen::Unix("/run/noyau-hub/web.sock".into()));
        assert_eq!(cfg.listen_group.as_deref(), Some("www-data"));
        // Its one peer is the web server, whose X-Forwarded-For is taken
        // only when proxy_addresses lists it (nginx passes a client's own
        // header on unless told to set it); else a warning at start.
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-forwarded-for", "192.0.2.7".parse().unwrap());
        let client = crate::auth::client_addr(&cfg, UNIX_PEER.ip(), &headers);
        assert_eq!(client, UNIX_PEER.ip());
        let warning = cfg.unix_peer_warning().unwrap();
        assert!(
            warning.contains("proxy_addresses = [\"127.0.0.1\"]"),
            "{warning}"
        );
        let proxied =
            load("listen = \"unix:/run/noyau-hub/web.sock\"\nproxy_addresses = [\"127.0.0.1\"]")
                .unwrap();
        assert_eq!(proxied.unix_peer_warning(), None);
        let client = crate::auth::client_addr(&proxied, UNIX_PEER.ip(), &headers);
        assert_eq!(client.to_string(), "192.0.2.7");
        let tcp = load("listen = \"127.0.0.1:8000\"").unwrap();
        assert_eq!(tcp.unix_peer_warning(), None);
        // Only listen_group connects, but header mode still needs the
        // proxy's secret: a member of that group must not name a user.
        let e = format!(
            "{:#}",
            load("listen = \"unix:/run/h/web.sock\"\nauth = \"header\"").unwrap_err()
        );
        assert!(e.contains("on a unix socket"), "{e}");
        let e = format!(
            "{:#}",
            load("listen = \"127.0.0.1:1\"\nlisten_group = \"www\"").unwrap_err()
        );
        assert!(
            e.contains("listen_group is the group of a unix socket"),
            "{e}"
        );
        let e = format!("{:#}", load("listen = \"web.sock\"").unwrap_err());
        assert!(e.contains("listen = \"web.sock\": give an address"), "{e}");
    }
}
