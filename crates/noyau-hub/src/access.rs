//! Who may log in, in every auth mode: an account of this host, never root,
//! never a system account (uid below `min_uid`), and, when `allowed_users`
//! or `allowed_groups` are set, only those users, members of those groups
//! and the admins.
//!
//! A PAM login is checked before PAM is asked (a system account's right
//! password opens nothing), and every request is checked again, since in
//! header mode the proxy names the user each time and an admin may narrow
//! the rules. Answers are kept a minute: with LDAP behind NSS a lookup may
//! cost a network round trip.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::unistd::{Group, User};

use crate::config::HubConfig;

/// How long an answer is reused.
const TTL: Duration = Duration::from_secs(60);
/// Answers kept at most (the oldest go first).
const KEPT: usize = 10_000;

/// Why an account may not log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No account of that name on this host (or NSS failed to say).
    Unknown(String),
    /// The account exists; the hub's rules keep it out. Said to a user the
    /// SSO proxy names or who is logged in; a PAM login's form says only
    /// "wrong user name or password" (the audit table says why).
    Rule(String),
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::Unknown(m) | Refusal::Rule(m) => m,
        }
    }
}

/// An answer, and when it was given.
type Answer = (Instant, Result<(), Refusal>);

/// The rules, with their answers of the last minute.
#[derive(Default)]
pub struct Access {
    answers: Mutex<HashMap<String, Answer>>,
}

impl Access {
    /// Whether `name` may log in under `cfg`'s rules.
    pub fn check(&self, cfg: &HubConfig, name: &str) -> Result<(), Refusal> {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, r)) = answers.get(name) {
            if at.elapsed() < TTL {
                return r.clone();
            }
        }
        let r = decide(cfg, name);
        if answers.len() >= KEPT {
            answers.retain(|_, (at, _)| at.elapsed() < TTL);
        }
        if answers.len() < KEPT {
            answers.insert(name.to_string(), (Instant::now(), r.clone()));
        }
        r
    }
}

fn decide(cfg: &HubConfig, name: &str) -> Result<(), Refusal> {
    let user = match User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => {
            return Err(Refusal::Unknown(format!(
                "There is no account {name} on this host."
            )))
        }
        Err(e) => {
            return Err(Refusal::Unknown(format!(
                "The hub cannot look up the account {name} ({e}); try again later."
            )))
        }
    };
    let uid = user.uid.as_raw();
    if uid == 0 {
        return Err(Refusal::Rule(format!(
            "{name} may not log in to the hub: root (uid 0) never does."
        )));
    }
    if uid < cfg.min_uid {
        return Err(Refusal::Rule(format!(
            "{name} may not log in to the hub: it is a system account (uid {uid}, below min_uid {}).",
            cfg.min_uid
        )));
    }
    let restricted = !cfg.allowed_users.is_empty() || !cfg.allowed_groups.is_empty();
    if !restricted
        || cfg.allowed_users.iter().any(|u| u == name)
        || cfg.admins.iter().any(|u| u == name)
        || in_groups(&user, &cfg.allowed_groups)
    {
        return Ok(());
    }
    Err(Refusal::Rule(format!(
        "{name} may not log in to the hub: it is not among its allowed users{}. \
         Ask the hub's administrators.",
        if cfg.allowed_groups.is_empty() {
            String::new()
        } else {
            format!(" nor in its groups ({})", cfg.allowed_groups.join(", "))
        }
    )))
}

/// Whether `user` is in one of `groups` (primary or supplementary).
fn in_groups(user: &User, groups: &[String]) -> bool {
    if groups.is_empty() {
        return false;
    }
    let Ok(cname) = CString::new(user.name.as_str()) else {
        return false;
    };
    let Ok(mine) = nix::unistd::getgrouplist(&cname, user.gid) else {
        return false;
    };
    groups.iter().any(|g| {
        Group::from_name(g)
            .ok()
            .flatten()
            .is_some_and(|g| mine.contains(&g.gid))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> HubConfig {
        toml::from_str(&format!(
            "listen = \"127.0.0.1:1\"\nlink_bind = \"127.0.0.1:2\"\nstate_dir = \"/x\"\n{extra}\n\
             [profiles.p]\npartitions = [\"q\"]\ncores = {{ min = 1, max = 2, default = 1 }}\n\
             minutes = {{ min = 1, max = 9, default = 5 }}\n"
        ))
        .unwrap()
    }

    #[test]
    fn root_system_accounts_and_strangers_are_refused() {
        let check = |extra: &str, name: &str| Access::default().check(&cfg(extra), name);
        let r = check("min_uid = 0", "root");
        assert!(
            matches!(&r, Err(Refusal::Rule(m)) if m.contains("root")),
            "{r:?}"
        );
        // Debian's `daemon` is uid 1.
        let r = check("", "daemon");
        assert!(
            matches!(&r, Err(Refusal::Rule(m)) if m.contains("system account")),
            "{r:?}"
        );
        assert!(check("min_uid = 0", "daemon").is_ok());
        let r = check("min_uid = 0", "no-such-account-here");
        assert!(matches!(r, Err(Refusal::Unknown(_))), "{r:?}");
        let listed = "min_uid = 0\nallowed_users = [\"bin\"]\nadmins = [\"sys\"]";
        assert!(check(listed, "daemon").is_err());
        assert!(check(listed, "bin").is_ok() && check(listed, "sys").is_ok());
        // `daemon`'s primary group is `daemon`.
        let grouped = "min_uid = 0\nallowed_groups = [\"daemon\"]";
        assert!(check(grouped, "daemon").is_ok());
        assert!(check(grouped, "bin").is_err());
    }
}
