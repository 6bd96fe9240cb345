//! `/user/NAME/…`: forwards a user's requests to their JupyterLab through
//! the tunnel of their running session, only for that user.
//!
//! Each upstream HTTP/1.1 connection is one tunnel stream, spoken by
//! hyper's client. [`Upstream`] keeps a few idle ones per session and
//! reuses one once the previous response's body has been read to its end
//! (opening a stream costs the agent a connect and Jupyter a new
//! connection). A WebSocket upgrade is forwarded as a request too; once
//! both sides have switched protocols the two upgraded connections are
//! spliced, so kernel traffic is bytes to the hub.
//!
//! The target is never taken from the request: the only place a request
//! can go is the owner's Jupyter server socket on the node. Requests that
//! try to name another target (an absolute URI, `..` segments, the
//! `/proxy/PORT` paths of jupyter-server-proxy) are refused.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use noyau_link::tunnel::Tunnel;

use crate::auth::is_hub_cookie;
use crate::Hub;

pub async fn user_route(State(hub): State<Arc<Hub>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/user/").unwrap_or_default();
    let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
    let who = match hub.identify_name(req.headers()).await {
        Ok(w) => w,
        Err(d) => {
            let login = format!("/hub/login?next={}", crate::pages::url_encode(&path));
            return crate::denied(&hub, d, login);
        }
    };
    if who != name {
        hub.db.audit(&who, "forbidden", &path);
        return crate::pages::error(
            &hub.site,
            StatusCode::FORBIDDEN,
            "This is another user's server: only its owner can reach it.",
        );
    }
    if let Err(why) = check_target(&req, sub) {
        hub.db.audit(&who, "refused-path", &path);
        return crate::pages::error(&hub.site, StatusCode::BAD_REQUEST, why);
    }
    let Some(upstream) = hub.user_upstream(name) else {
        return crate::pages::error(
            &hub.site,
            StatusCode::SERVICE_UNAVAILABLE,
            "You have no running session (or it is still starting): start one from the home page, /hub/home.",
        );
    };
    match forward(&upstream, req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(user = name, "forwarding {path}: {e:#}");
            let (status, why) = failure(&e);
            crate::pages::error(&hub.site, status, why)
        }
    }
}

/// What the user is told when forwarding failed.
fn failure(e: &anyhow::Error) -> (StatusCode, &'static str) {
    match e.downcast_ref() {
        // Not the server's fault: relaunching the session would not help.
        Some(noyau_link::LinkError::TooManyStreams(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many open connections to your Jupyter server: close some of its tabs, notebooks or terminals, then try again.",
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            "Your Jupyter server did not answer; it may be stopping. Try again, or relaunch the session from /hub/home.",
        ),
    }
}

/// Refuses requests that try to reach something else than the user's own
/// Jupyter server.
fn check_target(req: &Request, sub: &str) -> Result<(), &'static str> {
    if req.uri().authority().is_some() {
        return Err(
            "Absolute request URIs are refused: the hub forwards only to your own Jupyter server.",
        );
    }
    let decoded = percent_decode(sub);
    if decoded
        .split(['/', '\\'])
        .any(|seg| seg == ".." || seg == ".")
    {
        return Err("Paths with `.` or `..` segments are refused.");
    }
    let first = decoded.split('/').next().unwrap_or("");
    if matches!(first, "proxy" | "absproxy") || decoded.contains("://") {
        return Err(
            "The hub does not forward to other hosts or ports, only to your own Jupyter server.",
        );
    }
    Ok(())
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The request's cookies minus the hub's own, which the user's server has
/// no use for. Built in one string: this is on every proxied request.
fn strip_hub_cookies(req: &mut Request) {
    let mut kept = String::new();
    let cookies = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim);
    for kv in cookies {
        let k = kv.split('=').next().unwrap_or("");
        if kv.is_empty() || is_hub_cookie(k.trim()) {
            continue;
        }
        if !kept.is_empty() {
            kept.push_str("; ");
        }
        kept.push_str(kv);
    }
    req.headers_mut().remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept) {
            req.headers_mut().insert(header::COOKIE, v);
        }
    }
}

/// What a user's server may not tell the browser: to set one of the hub's
/// cookies (a user's server could log its visitor in or out, or plant a
/// cookie under its path), nor `Service-Worker-Allowed` (a service worker
/// of `/user/NAME/` whose scope covers the hub's pages would see and
/// answer every request to them).
fn strip_upstream_headers(headers: &mut HeaderMap) {
    headers.remove("service-worker-allowed");
    let set: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            let name = v.to_str().ok().and_then(|v| v.split_once('='));
            // An unreadable one cannot be checked: dropped too.
            name.is_some_and(|(k, _)| !is_hub_cookie(k.trim()))
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in set {
        headers.append(header::SET_COOKIE, v);
    }
}

/// Idle connections kept per session.
const IDLE_MAX: usize = 8;

/// A session's Jupyter server, as the hub reaches it: its tunnel and the
/// idle HTTP connections over it.
pub struct Upstream {
    pub user: String,
    /// The node its agent's hello named (cleaned; never empty).
    pub node: Option<String>,
    pub tunnel: Arc<Tunnel>,
    idle: Mutex<Vec<SendRequest<Body>>>,
}

impl Upstream {
    pub fn new(user: String, node: Option<String>, tunnel: Arc<Tunnel>) -> Arc<Self> {
        Arc::new(Upstream {
            user,
            node,
            tunnel,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection still open, or a new one.
    async fn sender(&self) -> anyhow::Result<SendRequest<Body>> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(mut s) if !s.is_closed() => {
                    if s.ready().await.is_ok() {
                        return Ok(s);
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        let stream = self.tunnel.open()?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("tunnelled connection: {e}");
            }
        });
        Ok(sender)
    }

    fn put_back(&self, s: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_MAX && !s.is_closed() {
            idle.push(s);
        }
    }
}

/// A response body that gives its connection back to the pool once read to
/// its end (dropped before that, the connection is closed with it).
struct Reusing {
    inner: hyper::body::Incoming,
    back: Option<(SendRequest<Body>, Arc<Upstream>)>,
}

impl Reusing {
    fn give_back(&mut self) {
        if let Some((s, up)) = self.back.take() {
            up.put_back(s);
        }
    }
}

impl http_body::Body for Reusing {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        // hyper stops polling once `is_end_stream` says so (a body with a
        // Content-Length), so the last frame gives the connection back too.
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.give_back();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The hub's own GET of `path` on a session's server (not a user's
/// request: no cookie, nothing forwarded), its JSON answer; at most 1 MiB.
pub(crate) async fn get_json(up: &Arc<Upstream>, path: &str) -> anyhow::Result<serde_json::Value> {
    let mut sender = up.sender().await?;
    let req = Request::get(path)
        .header(header::HOST, "localhost")
        .body(Body::empty())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = axum::body::to_bytes(Body::new(resp.into_body()), 1 << 20).await?;
    up.put_back(sender);
    anyhow::ensure!(status.is_success(), "{path} answered {status}");
    Ok(serde_json::from_slice(&body)?)
}

async fn forward(up: &Arc<Upstream>, mut req: Request) -> anyhow::Result<Response> {
    let mut sender = up.sender().await?;
    strip_hub_cookies(&mut req);
    let upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let mut resp = sender.send_request(req).await?;
    strip_upstream_headers(resp.headers_mut());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, inner) = resp.into_parts();
        let mut body = Reusing {
            inner,
            back: Some((sender, up.clone())),
        };
        // An empty body (204, 304, HEAD) may never be polled.
        if http_body::Body::is_end_stream(&body) {
            body.give_back();
        }
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    // Switched protocols: splice the two upgraded connections.
    if let Some(client_side) = upgrade {
        let server_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_side, server_side) {
                Ok((c, s)) => {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(s))
                            .await;
                }
                Err(e) => tracing::debug!("WebSocket upgrade: {e}"),
            }
        });
    }
    Ok(resp.map(Body::new).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str) -> Request {
        Request::builder().uri(uri).body(Body::empty()).unwrap()
    }

    #[test]
    fn the_hubs_cookies_stay_on_the_hub() {
        let mut r = Request::builder()
            .uri("/user/a/lab")
            .header(header::COOKIE, "noyau_hub=secret; _xsrf=x1")
            .header(
                header::COOKIE,
                "noyau_hub_pre=p;; theme=dark; __Host-noyau_hub=s",
            )
            .body(Body::empty())
            .unwrap();
        strip_hub_cookies(&mut r);
        let sent: Vec<_> = r.headers().get_all(header::COOKIE).iter().collect();
        assert_eq!(sent, ["_xsrf=x1; theme=dark"]);
        let mut r = Request::builder()
            .uri("/user/a/lab")
            .header(header::COOKIE, "noyau_hub=secret")
            .body(Body::empty())
            .unwrap();
        strip_hub_cookies(&mut r);
        assert!(r.headers().get(header::COOKIE).is_none());
    }

    #[test]
    fn a_users_server_sets_no_hub_cookie_nor_a_wider_service_worker() {
        let mut h = HeaderMap::new();
        for v in [
            "_xsrf=x1; Path=/user/a/",
            "noyau_hub=planted; Path=/",
            "__Host-noyau_hub=planted; Path=/; Secure",
            " noyau_hub_pre=p; Path=/user/a/",
            "__HOST-NOYAU_HUB_PRE=p",
            "theme=dark",
        ] {
            h.append(header::SET_COOKIE, v.parse().unwrap());
        }
        h.insert("service-worker-allowed", "/".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "text/html".parse().unwrap());
        strip_upstream_headers(&mut h);
        let set: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(set, ["_xsrf=x1; Path=/user/a/", "theme=dark"]);
        assert!(h.get("service-worker-allowed").is_none());
        assert_eq!(h.get(header::CONTENT_TYPE).unwrap(), "text/html");
    }

    /// A tunnel at its most streams is the user's many tabs, not a server
    /// to relaunch: the user is told which.
    #[test]
    fn too_many_connections_is_told_as_such() {
        let full = anyhow::Error::from(noyau_link::LinkError::TooManyStreams(128));
        let (status, why) = failure(&full);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            why.contains("close some") && !why.contains("relaunch"),
            "{why}"
        );
        let gone = anyhow::anyhow!("connection reset");
        assert_eq!(failure(&gone).0, StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn only_the_users_own_server_is_a_target() {
        assert!(check_target(&req("/user/a/lab"), "lab").is_ok());
        assert!(check_target(&req("/user/a/api/contents/d%2Ff"), "api/contents/d%2Ff").is_ok());
        assert!(check_target(&req("/user/a/proxy/8080/"), "proxy/8080/").is_err());
        assert!(check_target(&req("/user/a/%2e%2e/b/lab"), "%2e%2e/b/lab").is_err());
        assert!(check_target(&req("http://evil:22/user/a/lab"), "lab").is_err());
        assert!(check_target(&req("/user/a/x"), "http://evil:22/").is_err());
    }
}
