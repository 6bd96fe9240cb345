//! Who is asking: PAM logins with a cookie, or a user name set by a trusted
//! SSO reverse proxy; and the CSRF tokens every form carries.
//!
//! A login cookie is 32 random bytes; the database keeps only its SHA-256,
//! so a copy of the database opens no session. CSRF tokens are HMACs under
//! the hub's key (of the login cookie, or of the user name in header mode,
//! or of a pre-login cookie for the login form itself): nothing to store,
//! and another site cannot compute them.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::Auth;
use crate::Hub;

pub const LOGIN_COOKIE: &str = "noyau_hub";
pub const PRE_COOKIE: &str = "noyau_hub_pre";
/// How long a login lasts.
pub const LOGIN_SECS: i64 = 12 * 3600;

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
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(what.as_bytes());
        hex::encode(m.finalize().into_bytes())
    }

    /// The user this request is made for, if logged in.
    pub fn who(&self, headers: &HeaderMap) -> Option<Who> {
        let (name, csrf) = match self.cfg.auth {
            Auth::Header => {
                let name = headers
                    .get(self.cfg.auth_header.as_str())?
                    .to_str()
                    .ok()?
                    .trim()
                    .to_string();
                if !valid_user_name(&name) {
                    return None;
                }
                let csrf = self.mac(&format!("csrf-user:{name}"));
                (name, csrf)
            }
            Auth::Pam => {
                let cookie = cookie(headers, LOGIN_COOKIE)?;
                let name = self.db.login_user(&sha256_hex(&cookie)).ok()??;
                (name, self.mac(&format!("csrf:{cookie}")))
            }
        };
        Some(Who {
            admin: self.cfg.admins.contains(&name),
            name,
            csrf,
        })
    }

    /// Checks a form's CSRF token, in constant time.
    pub fn csrf_ok(&self, who: &Who, token: &str) -> bool {
        ct_eq(who.csrf.as_bytes(), token.as_bytes())
    }

    /// The token the login form carries, bound to its pre-login cookie.
    pub fn login_csrf(&self, pre: &str) -> String {
        self.mac(&format!("login:{pre}"))
    }

    /// A `Set-Cookie` value (HttpOnly, SameSite=Lax, Secure unless the
    /// configuration says the hub is tested over plain HTTP).
    pub fn set_cookie(&self, name: &str, value: &str, max_age: i64) -> String {
        format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{}",
            if self.cfg.cookie_secure {
                "; Secure"
            } else {
                ""
            }
        )
    }
}

pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A cookie's value from the request.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
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

/// Checks a password with PAM (blocking: run it off the async threads).
pub fn pam_check(service: &str, user: &str, password: &str) -> Result<(), String> {
    crate::pam::authenticate(service, user, password).map_err(|e| e.to_string())
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

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "x=1; noyau_hub=abc; _xsrf=2".parse().unwrap());
        assert_eq!(cookie(&h, LOGIN_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "nope"), None);
    }
}
