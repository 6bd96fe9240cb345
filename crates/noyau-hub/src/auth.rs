//! Who is asking: PAM logins with a cookie, or a user name set by a trusted
//! SSO reverse proxy; and the CSRF tokens every form carries.
//!
//! In header mode, [`gate`] runs before every handler: the user header
//! counts only on a request that carries the proxy's secret header (always
//! configured in that mode, loopback or not: every local account can reach
//! a loopback port) and comes from one of `proxy_addresses` (when they are
//! listed), and appears once; otherwise it is removed, so the request
//! is nobody's. The secret header is always removed: neither the handlers
//! nor the users' Jupyter servers ever see it. Every account named, in
//! either mode, must also pass [`crate::access`].
//!
//! A login cookie is 32 random bytes; the database keeps only its SHA-256,
//! so a copy of the database opens no session. CSRF tokens are HMACs under
//! the hub's key (of the login cookie, or of the user name in header mode,
//! or of a pre-login cookie for the login form itself): nothing to store,
//! and another site cannot compute them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::access::Refusal;
use crate::config::{Auth, HubConfig};
use crate::Hub;

/// The names of the hub's cookies: the login's, the login form's, and the
/// device's (see [`device_cookie`]).
pub struct CookieNames {
    pub login: &'static str,
    pub pre: &'static str,
    pub device: &'static str,
}

/// With `Secure`: the `__Host-` prefix makes browsers refuse such a cookie
/// unless it is Secure, `Path=/` and has no `Domain`, so another host of
/// the site (`evil.example.org` beside `hub.example.org`) cannot plant one.
pub const SECURE_COOKIES: CookieNames = CookieNames {
    login: "__Host-noyau_hub",
    pre: "__Host-noyau_hub_pre",
    device: "__Host-noyau_hub_device",
};
/// Without `Secure` (plain-HTTP tests) browsers refuse `__Host-` cookies.
pub const PLAIN_COOKIES: CookieNames = CookieNames {
    login: "noyau_hub",
    pre: "noyau_hub_pre",
    device: "noyau_hub_device",
};

/// Whether `name` is one of the hub's cookies, in either mode (as browsers
/// read the `__Host-` prefix: in any case).
pub fn is_hub_cookie(name: &str) -> bool {
    [SECURE_COOKIES, PLAIN_COOKIES].iter().any(|c| {
        [c.login, c.pre, c.device]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
    })
}
/// How long a login lasts.
pub const LOGIN_SECS: i64 = 12 * 3600;
/// How long a device cookie lasts (each login on the device renews it).
pub const DEVICE_SECS: i64 = 30 * 86400;

/// A user the request is made for.
#[derive(Debug, Clone)]
pub struct Who {
    pub name: String,
    pub admin: bool,
    /// The token this user's forms must carry.
    pub csrf: String,
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Hub {
    pub fn mac(&self, what: &str) -> String {
        mac_with(&self.key, what)
    }

    /// A new device cookie's value for `user` (see [`device_cookie`]).
    pub fn device_cookie(&self, user: &str) -> String {
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        device_cookie(&self.key, user, crate::db::now() + DEVICE_SECS, &nonce)
    }

    /// The device a login as `user` comes from: the nonce of the request's
    /// device cookie, if it carries one (once) that the hub gave `user`
    /// and that has not expired.
    pub fn device_of(&self, headers: &HeaderMap, cookies: &Cookies, user: &str) -> Option<String> {
        let value = cookie(headers, cookies.names.device)?;
        device_nonce(&self.key, &value, user, crate::db::now())
    }

    /// The user this request is made for, if logged in and allowed.
    pub async fn who(&self, headers: &HeaderMap) -> Option<Who> {
        self.identify(headers).await.ok()
    }

    /// The user this request is made for, or why there is none.
    pub async fn identify(&self, headers: &HeaderMap) -> Result<Who, Denied> {
        let (name, cookie) = self.allowed(headers).await?;
        let csrf = match cookie {
            Some(c) => self.mac(&format!("csrf:{c}")),
            None => self.mac(&format!("csrf-user:{name}")),
        };
        Ok(Who {
            admin: self.cfg.admins.contains(&name),
            name,
            csrf,
        })
    }

    /// The account this request is made for, if logged in and allowed:
    /// the same checks as [`Hub::identify`], without the CSRF token, which
    /// only the hub's forms need. The proxy's check, on every request to a
    /// user's server.
    pub async fn identify_name(&self, headers: &HeaderMap) -> Result<String, Denied> {
        self.allowed(headers).await.map(|(name, _)| name)
    }

    /// The claimed user (and, in PAM mode, the login cookie), once the
    /// access rules let them in.
    async fn allowed(&self, headers: &HeaderMap) -> Result<(String, Option<String>), Denied> {
        let (name, cookie) = self.claimed(headers).ok_or(Denied::Anonymous)?;
        match self.access.check(&name).await {
            Ok(()) => Ok((name, cookie)),
            Err(r) => Err(Denied::Refused(r)),
        }
    }

    /// The user name the request carries (header or login cookie), with
    /// the login cookie in PAM mode.
    fn claimed(&self, headers: &HeaderMap) -> Option<(String, Option<String>)> {
        match self.cfg.auth {
            Auth::Header => {
                let name = headers
                    .get(self.cfg.auth_header.as_str())?
                    .to_str()
                    .ok()?
                    .trim()
                    .to_string();
                valid_user_name(&name).then_some((name, None))
            }
            Auth::Pam => {
                let cookie = cookie(headers, self.cookies(headers).names.login)?;
                let name = self.db.login_user(&sha256_hex(&cookie)).ok()??;
                Some((name, Some(cookie)))
            }
        }
    }

    /// Checks a form's CSRF token, in constant time.
    pub fn csrf_ok(&self, who: &Who, token: &str) -> bool {
        ct_eq(who.csrf.as_bytes(), token.as_bytes())
    }

    /// The token the login form carries, bound to its pre-login cookie.
    pub fn login_csrf(&self, pre: &str) -> String {
        self.mac(&format!("login:{pre}"))
    }

    /// The cookies this request is answered with and carries: `Secure`
    /// `__Host-` ones, unless hub.toml says `cookie_secure = false` and
    /// the request did not come over HTTPS (see [`secure_cookies`]).
    pub fn cookies(&self, headers: &HeaderMap) -> Cookies {
        let secure = secure_cookies(self.cfg.cookie_secure, headers);
        if secure && !self.cfg.cookie_secure {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "hub.toml says cookie_secure = false, but requests come over HTTPS \
                     (X-Forwarded-Proto): they get Secure __Host- cookies all the same. \
                     Remove cookie_secure from hub.toml (it is for plain-HTTP tests on \
                     127.0.0.1)"
                );
            });
        }
        Cookies {
            names: if secure {
                &SECURE_COOKIES
            } else {
                &PLAIN_COOKIES
            },
            secure,
        }
    }
}

/// The cookies of one request: their names, and whether they are `Secure`.
pub struct Cookies {
    pub names: &'static CookieNames,
    secure: bool,
}

impl Cookies {
    /// A `Set-Cookie` value (HttpOnly, SameSite=Lax, `Path=/` and no
    /// `Domain`, as `__Host-` needs; Secure unless plain HTTP is allowed
    /// and used).
    pub fn set(&self, name: &str, value: &str, max_age: i64) -> String {
        format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{}",
            if self.secure { "; Secure" } else { "" }
        )
    }
}

/// Whether a request's cookies are `Secure`: always with `cookie_secure`
/// (hub.toml's default); without it, when the request came over HTTPS all
/// the same (its web server's `X-Forwarded-Proto: https` or `Forwarded:
/// proto=https`): a `cookie_secure = false` left from a plain-HTTP test
/// must not make the cookies of a TLS site unsafe, and Secure cookies
/// always work over HTTPS. The header is the requester's own word, but it
/// only ever makes their own cookies stricter.
pub fn secure_cookies(cookie_secure: bool, headers: &HeaderMap) -> bool {
    let says_https = |name: &str, is_https: &dyn Fn(&str) -> bool| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(is_https)
    };
    cookie_secure
        || says_https("x-forwarded-proto", &|v| {
            v.split(',').any(|p| p.trim().eq_ignore_ascii_case("https"))
        })
        || says_https("forwarded", &|v| {
            v.split([',', ';'])
                .filter_map(|kv| kv.trim().split_once('='))
                .any(|(k, p)| {
                    k.eq_ignore_ascii_case("proto")
                        && p.trim_matches('"').eq_ignore_ascii_case("https")
                })
        })
}

/// Why a request is nobody's.
#[derive(Debug)]
pub enum Denied {
    /// Not logged in (no cookie, no trusted header).
    Anonymous,
    /// An account the hub's rules keep out.
    Refused(Refusal),
}

/// Header mode: strips the proxy's secret header from every request, and
/// the user header from any that does not prove it came through the proxy.
pub async fn gate(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    if !trusted_header(&hub.cfg, peer.ip(), req.headers_mut()) {
        tracing::warn!(%peer, header = hub.cfg.auth_header, "ignored a user header that did not come through the SSO proxy");
    }
    next.run(req).await
}

/// Whether the user header of a request from `peer` can be trusted; removes
/// it if not (returns false only when there was one to remove), and
/// removes the secret header in any case.
fn trusted_header(cfg: &HubConfig, peer: IpAddr, headers: &mut HeaderMap) -> bool {
    let secret_ok = match (&cfg.auth_secret_header, &cfg.proxy_secret) {
        (Some(h), Some(secret)) => {
            let sent: Vec<_> = headers.get_all(h.as_str()).iter().cloned().collect();
            headers.remove(h.as_str());
            matches!(&sent[..], [v] if ct_eq(v.as_bytes(), secret.as_bytes()))
        }
        // No secret configured (refused at start): no one to trust.
        _ => false,
    };
    let from_proxy = cfg.proxy_addresses.is_empty() || cfg.proxy_addresses.contains(&peer);
    let names = headers.get_all(cfg.auth_header.as_str()).iter().count();
    if secret_ok && from_proxy && names <= 1 {
        return true;
    }
    headers.remove(cfg.auth_header.as_str());
    names == 0
}

/// The client's address: the peer's, or, from one of `proxy_addresses`,
/// the last hop of the `X-Forwarded-For` it added.
pub fn client_addr(cfg: &HubConfig, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    if !cfg.proxy_addresses.contains(&peer) {
        return peer;
    }
    // Only the last hop, the one the proxy added: the ones before it are
    // whatever the client sent.
    headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok()?.rsplit(',').next()?.trim().parse().ok())
        .unwrap_or(peer)
}

/// HMAC-SHA256 of `what` under `key`, in hex.
fn mac_with(key: &[u8], what: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(what.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// A device cookie (OWASP's "device cookies" against lockout by
/// guessing): `USER:UNTIL:NONCE:MAC`, the MAC under the hub's key over the
/// rest, given at each successful login. A login carrying a valid one for
/// its user is held by that device's own failure count instead of the
/// user's, so that others' guesses (which lock the user out) do not keep
/// the user from their own browser. Only the hub can make one (the key),
/// it names its user (another user's is worth nothing) and its end
/// (`UNTIL`, seconds since the epoch, inside the MAC: the browser's
/// `Max-Age` is no limit to whoever copies the value).
fn device_cookie(key: &[u8], user: &str, until: i64, nonce: &str) -> String {
    let body = format!("{user}:{until}:{nonce}");
    let mac = mac_with(key, &format!("device:{body}"));
    format!("{body}:{mac}")
}

/// The nonce of device cookie `value` if it is one the hub made for `user`
/// and it is still valid at `now`.
fn device_nonce(key: &[u8], value: &str, user: &str, now: i64) -> Option<String> {
    let (body, mac) = value.rsplit_once(':')?;
    let expected = mac_with(key, &format!("device:{body}"));
    if !ct_eq(expected.as_bytes(), mac.as_bytes()) {
        return None;
    }
    let mut parts = body.split(':');
    let (who, until, nonce) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = who == user && until.parse::<i64>().is_ok_and(|t| t > now);
    (valid && parts.next().is_none()).then(|| nonce.to_string())
}

pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A cookie's value from the request, if it carries that cookie once. Two
/// of one name are the hub's and one planted by another host of the site
/// or for a path under the hub (browsers send both): the hub cannot tell
/// which is its own, so the request has none (logged in again, the user
/// is at least never in the planter's session).
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut found = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v);
    let first = found.next()?;
    found.next().is_none().then(|| first.to_string())
}

/// A Unix user name as useradd accepts it: also what keeps names safe in
/// paths, URLs and command lines.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && name != "."
        && name != ".."
}

/// Checks a password with PAM, for a login from `client` (blocking: run it
/// off the async threads).
pub fn pam_check(service: &str, user: &str, password: &str, client: IpAddr) -> Result<(), String> {
    crate::pam::authenticate(service, user, password, &client.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        assert!(valid_user_name("alice"));
        assert!(valid_user_name("a.b-c_1"));
        assert!(!valid_user_name("../root"));
        assert!(!valid_user_name("-x"));
        assert!(!valid_user_name("a b"));
        assert!(!valid_user_name(""));
    }

    fn header_cfg(extra: &str) -> HubConfig {
        let mut c: HubConfig = toml::from_str(&format!(
            "listen = \"127.0.0.1:1\"\nlink_bind = \"127.0.0.1:2\"\nstate_dir = \"/x\"\n\
             auth = \"header\"\n{extra}\n[profiles.p]\npartitions = [\"q\"]\n\
             cores = {{ min = 1, max = 2, default = 1 }}\nminutes = {{ min = 1, max = 9, default = 5 }}\n"
        ))
        .unwrap();
        c.proxy_secret = c.auth_secret.clone();
        c
    }

    #[test]
    fn the_user_header_counts_only_with_the_proxys_secret() {
        let cfg = header_cfg(
            "auth_secret_header = \"X-S\"\nauth_secret = \"0123456789abcdefXYZ\"\n\
             proxy_addresses = [\"10.0.0.1\"]",
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let ask = |peer: IpAddr, pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            let ok = trusted_header(&cfg, peer, &mut h);
            assert!(h.get("x-s").is_none(), "the secret must never go further");
            (ok, h.get("x-remote-user").is_some())
        };
        let user = ("X-Remote-User", "alice");
        let right = ("X-S", "0123456789abcdefXYZ");
        assert_eq!(ask(proxy, &[user, right]), (true, true));
        assert_eq!(ask(proxy, &[user]), (false, false));
        assert_eq!(
            ask(proxy, &[user, ("X-S", "0123456789abcdefXY")]),
            (false, false)
        );
        assert_eq!(ask(proxy, &[user, right, right]), (false, false));
        assert_eq!(
            ask(proxy, &[user, ("X-Remote-User", "bob"), right]),
            (false, false)
        );
        assert_eq!(
            ask("10.0.0.2".parse().unwrap(), &[user, right]),
            (false, false)
        );
        // No user header: nothing to distrust.
        assert_eq!(ask("10.0.0.2".parse().unwrap(), &[]), (true, false));
    }

    #[test]
    fn without_a_secret_no_user_header_counts_even_from_loopback() {
        let cfg = header_cfg("");
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", "bob".parse().unwrap());
        assert!(!trusted_header(&cfg, "127.0.0.1".parse().unwrap(), &mut h));
        assert!(h.get("x-remote-user").is_none());
    }

    #[test]
    fn the_client_address_comes_from_the_proxy_only() {
        let cfg = header_cfg("proxy_addresses = [\"10.0.0.1\"]");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 192.0.2.9".parse().unwrap());
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_addr(&cfg, proxy, &h),
            "192.0.2.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_addr(&cfg, other, &h), other);
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "x=1; noyau_hub=abc; _xsrf=2".parse().unwrap());
        assert_eq!(cookie(&h, PLAIN_COOKIES.login).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "nope"), None);
    }

    #[test]
    fn a_cookie_sent_twice_is_none() {
        let mut h = HeaderMap::new();
        h.insert(
            "cookie",
            "noyau_hub=planted; noyau_hub=mine".parse().unwrap(),
        );
        assert_eq!(cookie(&h, "noyau_hub"), None);
        let mut h = HeaderMap::new();
        h.append("cookie", "noyau_hub=planted".parse().unwrap());
        h.append("cookie", "noyau_hub=mine".parse().unwrap());
        assert_eq!(cookie(&h, "noyau_hub"), None);
    }

    #[test]
    fn hub_cookies_in_either_mode() {
        for name in [
            "noyau_hub",
            "noyau_hub_pre",
            "noyau_hub_device",
            "__Host-noyau_hub",
            "__host-noyau_hub_pre",
            "__Host-noyau_hub_device",
        ] {
            assert!(is_hub_cookie(name), "{name}");
        }
        assert!(!is_hub_cookie("_xsrf") && !is_hub_cookie("noyau_hubx"));
        assert!(SECURE_COOKIES.login.starts_with("__Host-"));
    }

    #[test]
    fn a_device_cookie_is_the_hubs_for_its_user_until_it_expires() {
        let (key, now) = ([7u8; 32], 1_000_000);
        let value = device_cookie(&key, "alice", now + 60, "n0nce");
        assert_eq!(
            device_nonce(&key, &value, "alice", now).as_deref(),
            Some("n0nce")
        );
        // Another user's is worth nothing for alice, and alice's for bob.
        let bobs = device_cookie(&key, "bob", now + 60, "n0nce");
        assert_eq!(device_nonce(&key, &bobs, "alice", now), None);
        assert_eq!(device_nonce(&key, &value, "bob", now), None);
        // Forged: renamed, extended, made under another key, or no MAC.
        let mac = value.rsplit_once(':').unwrap().1;
        for forged in [
            format!("bob:{}:n0nce:{mac}", now + 60),
            format!("alice:{}:n0nce:{mac}", now + 999_999),
            device_cookie(&[8u8; 32], "alice", now + 60, "n0nce"),
            format!("alice:{}:n0nce", now + 60),
            format!("alice:{}:n0nce:x:{mac}", now + 60),
            String::new(),
        ] {
            assert_eq!(device_nonce(&key, &forged, "alice", now), None, "{forged}");
        }
        // Expired.
        assert_eq!(device_nonce(&key, &value, "alice", now + 60), None);
    }

    #[test]
    fn cookies_are_secure_over_https_whatever_hub_toml_says() {
        let with = |name: &str, value: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            h
        };
        assert!(secure_cookies(true, &HeaderMap::new()));
        assert!(!secure_cookies(false, &HeaderMap::new()));
        assert!(!secure_cookies(false, &with("x-forwarded-proto", "http")));
        assert!(secure_cookies(false, &with("x-forwarded-proto", "https")));
        assert!(secure_cookies(false, &with("X-Forwarded-Proto", "HTTPS")));
        assert!(secure_cookies(
            false,
            &with("forwarded", "for=192.0.2.1;proto=https;host=hub")
        ));
        assert!(!secure_cookies(
            false,
            &with("forwarded", "for=192.0.2.1;proto=http")
        ));
    }
}
