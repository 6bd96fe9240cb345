//! The scheduler's dashboard as the user's browser reaches it: a port on
//! 127.0.0.1 of the kernel's host, relayed byte for byte (HTTP and the
//! dashboard's websockets alike) to the dashboard in the scheduler's
//! allocation, for the holder of a token only.
//!
//! Every user of the host can reach 127.0.0.1, so the link carries a
//! random token (`/status?token=…`): the first request that shows it gets
//! a cookie (HttpOnly, SameSite=Strict, named after the port, since
//! browsers share cookies between the ports of a host) that the page's
//! later requests and websockets carry. Any other request gets 403 and
//! never reaches Dask. The token (query or cookie) is taken off the
//! request before it goes on, so Dask never sees or logs it.
//!
//! The dashboard's port on the compute node is open to the network, so the
//! scheduler's HTTP server speaks TLS only and requires a client
//! certificate signed by the cluster's CA (job.rs's preload): the relay
//! connects with TLS, checks the server's certificate against the
//! cluster's CA (and its name, [`certs::NAME`]), and shows the cluster's
//! own certificate. Whoever lacks the cluster's key can neither read what
//! the relay and the scheduler say nor ask the scheduler anything.
//!
//! The relay rewrites only a connection's first request (the token taken
//! off), so it asks for one request per connection (`Connection: close`, a
//! websocket's upgrade aside): a later one would take the token's cookie
//! on to Dask.

use noyau_vars::EnvVars;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::{certs, ClusterDir};

/// A request head larger than this is refused.
const HEAD_MAX: usize = 16 * 1024;
/// A client that has not sent its request head by then is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The forwarded dashboard; relaying stops when it is dropped.
pub(crate) struct Dashboard {
    /// `http://127.0.0.1:PORT/status?token=…`.
    pub link: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Who may pass: the token, and the cookie that carries it.
#[derive(Clone)]
struct Gate {
    token: String,
    cookie: String,
}

/// The scheduler's HTTP server, and the cluster's TLS to reach it.
#[derive(Clone)]
struct Upstream {
    host: String,
    port: u16,
    tls: TlsConnector,
}

/// Listens on 127.0.0.1 (a free port; `NOYAU_DASK_DASHBOARD_PORT` picks
/// one) and relays every connection that shows the token to the
/// scheduler's HTTP server at `host:port`, with the TLS material of `dir`.
pub(crate) async fn forward(
    dir: &ClusterDir,
    host: String,
    port: u16,
) -> std::io::Result<Dashboard> {
    let up = Upstream {
        host,
        port,
        tls: connector(dir)?,
    };
    let local: u16 = std::env::var(EnvVars::NOYAU_DASK_DASHBOARD_PORT)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let listener = TcpListener::bind(("127.0.0.1", local)).await?;
    let local = listener.local_addr()?.port();
    let gate = Gate {
        token: noyau_wire::connection::random_key(),
        cookie: format!("noyau-dask-{local}"),
    };
    let link = format!("http://127.0.0.1:{local}/status?token={}", gate.token);
    let task = tokio::spawn(accept_loop(listener, gate, up));
    Ok(Dashboard { link, task })
}

/// The client side of the cluster's TLS: the cluster's CA as the only
/// root, the cluster's certificate and key shown to the server. Read from
/// files that are ours, 0600 (checked as opened).
fn connector(dir: &ClusterDir) -> std::io::Result<TlsConnector> {
    let bad = |what: &Path, e: &dyn std::fmt::Display| {
        std::io::Error::other(format!("{}: {e}", what.display()))
    };
    let pem = |path: &Path| -> std::io::Result<Vec<u8>> {
        let mut data = Vec::new();
        noyau_trust::Expect::file()
            .open(path)?
            .read_to_end(&mut data)?;
        Ok(data)
    };
    let cert_of =
        |path: &Path| CertificateDer::from_pem_slice(&pem(path)?).map_err(|e| bad(path, &e));
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(cert_of(&dir.ca())?)
        .map_err(|e| bad(&dir.ca(), &e))?;
    let cert = cert_of(&dir.cert())?;
    let key = PrivateKeyDer::from_pem_slice(&pem(&dir.key())?).map_err(|e| bad(&dir.key(), &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_root_certificates(roots)
                .with_client_auth_cert(vec![cert], key)
        })
        .map_err(|e| bad(dir.path(), &e))?;
    Ok(TlsConnector::from(Arc::new(config)))
}

async fn accept_loop(listener: TcpListener, gate: Gate, up: Upstream) {
    loop {
        let inbound = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // e.g. out of file descriptors: try again shortly
                tracing::warn!("dashboard: accept: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (gate, up) = (gate.clone(), up.clone());
        tokio::spawn(async move {
            if let Err(e) = relay(inbound, &gate, &up).await {
                tracing::debug!("dashboard: {e}");
            }
        });
    }
}

/// One connection: its first request is checked, then bytes flow both ways.
async fn relay(mut inbound: TcpStream, gate: &Gate, up: &Upstream) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut inbound)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let Some(pass) = gate.check(&head) else {
        let body = "403 Forbidden: this Dask dashboard needs the link with its token, which `%noyau dask status` prints\n";
        let answer = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return inbound.write_all(answer.as_bytes()).await;
    };
    let tcp = TcpStream::connect((up.host.as_str(), up.port)).await?;
    let name = ServerName::try_from(certs::NAME).map_err(std::io::Error::other)?;
    let mut out = up.tls.connect(name, tcp).await?;
    out.write_all(&pass.head).await?;
    if pass.set_cookie {
        // The answer to the request that showed the token sets the cookie.
        let head = read_head(&mut out).await?;
        inbound
            .write_all(&with_header(&head, &gate.set_cookie()))
            .await?;
    }
    tokio::io::copy_bidirectional(&mut inbound, &mut out).await?;
    Ok(())
}

/// Reads up to the end of an HTTP head (`\r\n\r\n`), and what came with it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > HEAD_MAX {
            return Err(std::io::Error::other("request head too large"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before its head ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// A request allowed through: its bytes as they go on, and whether its
/// answer must set the cookie.
struct Pass {
    head: Vec<u8>,
    set_cookie: bool,
}

impl Gate {
    /// The request as it goes on, if it shows the token (in its query or
    /// its cookie); None otherwise.
    fn check(&self, head: &[u8]) -> Option<Pass> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(len) = req.parse(head).ok()? else {
            return None;
        };
        let target = req.path?;
        let by_cookie = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .any(|(k, v)| k == self.cookie && same(v, &self.token));
        let (path, token) = without_token(target);
        let by_query = token.is_some_and(|t| same(&t, &self.token));
        if !(by_cookie || by_query) {
            return None;
        }
        let mut out = format!(
            "{} {path} HTTP/1.{}\r\n",
            req.method?,
            req.version.unwrap_or(1)
        )
        .into_bytes();
        for h in req.headers.iter() {
            if let Some(line) = self.forwarded(h) {
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(&line);
                out.extend_from_slice(b"\r\n");
            }
        }
        if !is_upgrade(req.headers) {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&head[len..]);
        Some(Pass {
            head: out,
            set_cookie: by_query,
        })
    }

    /// A header's value as it goes on, or None to leave it out: the token's
    /// cookie and (but for an upgrade) its keep-alive wishes stay here.
    fn forwarded(&self, h: &httparse::Header) -> Option<Vec<u8>> {
        let name = h.name;
        if name.eq_ignore_ascii_case("keep-alive") {
            return None;
        }
        if name.eq_ignore_ascii_case("connection") {
            return is_upgrade(std::slice::from_ref(h)).then(|| h.value.to_vec());
        }
        if !name.eq_ignore_ascii_case("cookie") {
            return Some(h.value.to_vec());
        }
        let kept: Vec<&str> = std::str::from_utf8(h.value)
            .ok()?
            .split(';')
            .map(str::trim)
            .filter(|c| c.split_once('=').is_none_or(|(k, _)| k != self.cookie))
            .collect();
        (!kept.is_empty()).then(|| kept.join("; ").into_bytes())
    }

    fn set_cookie(&self) -> String {
        format!(
            "Set-Cookie: {}={}; Path=/; HttpOnly; SameSite=Strict",
            self.cookie, self.token
        )
    }
}

/// `/status?token=T&x=1` → (`/status?x=1`, Some(T)).
fn without_token(target: &str) -> (String, Option<String>) {
    let Some((path, query)) = target.split_once('?') else {
        return (target.to_string(), None);
    };
    let mut token = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("token=") {
            Some(t) => {
                token = Some(t.to_string());
                false
            }
            None => true,
        })
        .collect();
    if kept.is_empty() {
        (path.to_string(), token)
    } else {
        (format!("{path}?{}", kept.join("&")), token)
    }
}

/// Whether the request asks to upgrade its connection (a websocket).
fn is_upgrade(headers: &[httparse::Header]) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Compares in a time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// An HTTP head with one more header line.
fn with_header(head: &[u8], line: &str) -> Vec<u8> {
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(head.len());
    let mut out = head[..end].to_vec();
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(&head[end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate {
            token: "abc".into(),
            cookie: "noyau-dask-9".into(),
        }
    }

    #[test]
    fn only_the_token_passes_and_it_goes_no_further() {
        let g = gate();
        let pass = g
            .check(b"GET /status?token=abc HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let sent = String::from_utf8(pass.head).unwrap();
        assert_eq!(
            sent,
            "GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        assert!(pass.set_cookie);
        // The token's cookie and keep-alive stay here.
        let pass = g
            .check(b"GET /static/a.js?v=1 HTTP/1.1\r\nCookie: a=b; noyau-dask-9=abc\r\nConnection: keep-alive\r\n\r\nbody")
            .unwrap();
        let sent = String::from_utf8(pass.head).unwrap();
        assert_eq!(
            sent,
            "GET /static/a.js?v=1 HTTP/1.1\r\nCookie: a=b\r\nConnection: close\r\n\r\nbody"
        );
        assert!(!pass.set_cookie);
        // A websocket keeps its upgrade; a cookie that was only the token goes.
        let pass = g
            .check(b"GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nCookie: noyau-dask-9=abc\r\n\r\n")
            .unwrap();
        let sent = String::from_utf8(pass.head).unwrap();
        assert_eq!(
            sent,
            "GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
        );
        for bad in [
            &b"GET /status HTTP/1.1\r\n\r\n"[..],
            b"GET /status?token=abd HTTP/1.1\r\n\r\n",
            b"GET /status?token=ab HTTP/1.1\r\n\r\n",
            b"GET /status HTTP/1.1\r\nCookie: noyau-dask-8=abc\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert!(g.check(bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            without_token("/s?x=1&token=t&y=2"),
            ("/s?x=1&y=2".to_string(), Some("t".to_string()))
        );
    }

    #[test]
    fn the_cookie_goes_into_the_answer_head() {
        assert_eq!(
            with_header(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody", "Set-Cookie: c=d"),
            b"HTTP/1.1 200 OK\r\nA: b\r\nSet-Cookie: c=d\r\n\r\nbody"
        );
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use rustls::server::WebPkiClientVerifier;
    use std::path::PathBuf;
    use tokio_rustls::TlsAcceptor;

    /// A scheduler's HTTP server as job.rs's preload makes it: the
    /// certificate of `dir`'s cluster, a client certificate of that
    /// cluster's CA required (unless `!client_auth`). Answers one request;
    /// its task returns the request's head.
    async fn upstream(
        dir: &ClusterDir,
        client_auth: bool,
    ) -> (u16, tokio::task::JoinHandle<std::io::Result<String>>) {
        let pem = |p: PathBuf| std::fs::read(p).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(&pem(dir.ca())).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = if client_auth {
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap()
        } else {
            WebPkiClientVerifier::no_client_auth()
        };
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(&pem(dir.cert())).unwrap()],
                PrivateKeyDer::from_pem_slice(&pem(dir.key())).unwrap(),
            )
            .unwrap();
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut s = TlsAcceptor::from(Arc::new(config)).accept(tcp).await?;
            let head = read_head(&mut s).await?;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await?;
            s.shutdown().await?;
            Ok(String::from_utf8_lossy(&head).into_owned())
        });
        (port, task)
    }

    /// What the relay answers a request with the token, relayed to a
    /// server of cluster `server` by the relay of cluster `relay`.
    async fn ask(
        relay: &ClusterDir,
        server: &ClusterDir,
        client_auth: bool,
    ) -> (String, std::io::Result<String>) {
        let (port, seen) = upstream(server, client_auth).await;
        let d = forward(relay, "127.0.0.1".into(), port).await.unwrap();
        let local = d.link.strip_prefix("http://").unwrap();
        let (addr, target) = local.split_once('/').unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET /{target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        (
            String::from_utf8_lossy(&answer).into_owned(),
            seen.await.unwrap(),
        )
    }

    fn cluster(t: &Path) -> ClusterDir {
        certs::write(t).unwrap();
        ClusterDir(t.to_path_buf())
    }

    #[tokio::test]
    async fn the_relay_speaks_tls_to_its_own_cluster_only() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (cluster(a.path()), cluster(b.path()));
        // Its own cluster's server, which wants the cluster's client
        // certificate: the request goes on (token off), the answer comes
        // back with the cookie.
        let (answer, seen) = ask(&a, &a, true).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("Set-Cookie: noyau-dask-"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
        let seen = seen.unwrap();
        assert!(seen.starts_with("GET /status HTTP/1.1\r\n"), "{seen}");
        // Another cluster's server (a stranger's, listening on the port),
        // even one that asks nothing of the client: its certificate is
        // refused, no request reaches it, nothing comes back.
        let (answer, seen) = ask(&a, &b, false).await;
        assert_eq!(answer, "");
        assert!(seen.is_err(), "{seen:?}");
    }
}
