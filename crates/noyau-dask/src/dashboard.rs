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
//! scheduler answers only requests that show the cluster's dashboard secret
//! ([`SECRET_HEADER`], checked by job.rs's preload): the relay adds it to
//! each request it lets through. It checks only a connection's first
//! request, so it asks for one request per connection (`Connection: close`,
//! a websocket's upgrade aside): a later one would go on without the secret.

use noyau_vars::EnvVars;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request head larger than this is refused.
const HEAD_MAX: usize = 16 * 1024;
/// A client that has not sent its request head by then is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The header that carries the dashboard secret to the scheduler (the
/// preload in job.rs reads the same name).
const SECRET_HEADER: &str = "X-Noyau-Dashboard";

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

/// Who may pass: the token, and the cookie that carries it; and the secret
/// their requests show the scheduler.
#[derive(Clone)]
struct Gate {
    token: String,
    cookie: String,
    secret: String,
}

/// Listens on 127.0.0.1 (a free port; `NOYAU_DASK_DASHBOARD_PORT` picks
/// one) and relays every connection that shows the token, with `secret`.
pub(crate) async fn forward(host: String, port: u16, secret: String) -> std::io::Result<Dashboard> {
    let local: u16 = std::env::var(EnvVars::NOYAU_DASK_DASHBOARD_PORT)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let listener = TcpListener::bind(("127.0.0.1", local)).await?;
    let local = listener.local_addr()?.port();
    let gate = Gate {
        token: noyau_wire::connection::random_key(),
        cookie: format!("noyau-dask-{local}"),
        secret,
    };
    let link = format!("http://127.0.0.1:{local}/status?token={}", gate.token);
    let task = tokio::spawn(accept_loop(listener, gate, host, port));
    Ok(Dashboard { link, task })
}

async fn accept_loop(listener: TcpListener, gate: Gate, host: String, port: u16) {
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
        let (gate, host) = (gate.clone(), host.clone());
        tokio::spawn(async move {
            if let Err(e) = relay(inbound, &gate, &host, port).await {
                tracing::debug!("dashboard: {e}");
            }
        });
    }
}

/// One connection: its first request is checked, then bytes flow both ways.
async fn relay(mut inbound: TcpStream, gate: &Gate, host: &str, port: u16) -> std::io::Result<()> {
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
    let mut out = TcpStream::connect((host, port)).await?;
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
async fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
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
        out.extend_from_slice(format!("{SECRET_HEADER}: {}\r\n\r\n", self.secret).as_bytes());
        out.extend_from_slice(&head[len..]);
        Some(Pass {
            head: out,
            set_cookie: by_query,
        })
    }

    /// A header's value as it goes on, or None to leave it out: the token's
    /// cookie, a secret header the client made up, and (but for an upgrade)
    /// its keep-alive wishes stay here.
    fn forwarded(&self, h: &httparse::Header) -> Option<Vec<u8>> {
        let name = h.name;
        if name.eq_ignore_ascii_case(SECRET_HEADER) || name.eq_ignore_ascii_case("keep-alive") {
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
            secret: "s3".into(),
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
            "GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Noyau-Dashboard: s3\r\n\r\n"
        );
        assert!(pass.set_cookie);
        // The token's cookie, a made-up secret and keep-alive stay here.
        let pass = g
            .check(b"GET /static/a.js?v=1 HTTP/1.1\r\nCookie: a=b; noyau-dask-9=abc\r\nConnection: keep-alive\r\nX-Noyau-Dashboard: forged\r\n\r\nbody")
            .unwrap();
        let sent = String::from_utf8(pass.head).unwrap();
        assert_eq!(
            sent,
            "GET /static/a.js?v=1 HTTP/1.1\r\nCookie: a=b\r\nConnection: close\r\nX-Noyau-Dashboard: s3\r\n\r\nbody"
        );
        assert!(!pass.set_cookie);
        // A websocket keeps its upgrade; a cookie that was only the token goes.
        let pass = g
            .check(b"GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nCookie: noyau-dask-9=abc\r\n\r\n")
            .unwrap();
        let sent = String::from_utf8(pass.head).unwrap();
        assert_eq!(
            sent,
            "GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nX-Noyau-Dashboard: s3\r\n\r\n"
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
