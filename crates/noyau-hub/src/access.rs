//! Who may log in, in every auth mode: an account of this host, never root,
//! never a system account (uid below `min_uid`), and, when `allowed_users`
//! or `allowed_groups` are set, only those users, members of those groups
//! and the admins.
//!
//! A PAM login is checked before PAM is asked (a system account's right
//! password opens nothing), and every request is checked again, since in
//! header mode the proxy names the user each time and an admin may narrow
//! the rules. Answers are kept a minute: with LDAP behind NSS a lookup may
//! cost a network round trip, and it runs on the blocking pool, never on
//! the hub's one async thread (a slow directory would stall every page
//! and every proxied request with it).

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex};
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

/// What decides who may log in: hub.toml's rules, and how an account is
/// judged under them (NSS, blocking).
type Lookup = fn(&Rules, &str) -> Result<(), Refusal>;

/// hub.toml's keys that say who may log in.
#[derive(Debug, Clone)]
pub struct Rules {
    min_uid: u32,
    allowed_users: Vec<String>,
    allowed_groups: Vec<String>,
    admins: Vec<String>,
}

impl Rules {
    pub fn of(cfg: &HubConfig) -> Rules {
        Rules {
            min_uid: cfg.min_uid,
            allowed_users: cfg.allowed_users.clone(),
            allowed_groups: cfg.allowed_groups.clone(),
            admins: cfg.admins.clone(),
        }
    }
}

/// The rules, with their answers of the last minute.
pub struct Access {
    rules: Arc<Rules>,
    lookup: Lookup,
    answers: Mutex<HashMap<String, Answer>>,
}

impl Access {
    pub fn new(cfg: &HubConfig) -> Access {
        Access::with_lookup(cfg, decide)
    }

    fn with_lookup(cfg: &HubConfig, lookup: Lookup) -> Access {
        Access {
            rules: Arc::new(Rules::of(cfg)),
            lookup,
            answers: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `name` may log in: the answer of the last minute, or one
    /// looked up on the blocking pool.
    pub async fn check(&self, name: &str) -> Result<(), Refusal> {
        if let Some(r) = self.cached(name) {
            return r;
        }
        let (rules, lookup, who) = (self.rules.clone(), self.lookup, name.to_string());
        let r = tokio::task::spawn_blocking(move || lookup(&rules, &who))
            .await
            .unwrap_or_else(|e| {
                Err(Refusal::Unknown(format!(
                    "The hub cannot look up the account {name} ({e}); try again later."
                )))
            });
        self.remember(name, &r);
        r
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Answer>> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached(&self, name: &str) -> Option<Result<(), Refusal>> {
        let answers = self.answers();
        let (at, r) = answers.get(name)?;
        (at.elapsed() < TTL).then(|| r.clone())
    }

    fn remember(&self, name: &str, r: &Result<(), Refusal>) {
        let mut answers = self.answers();
        if answers.len() >= KEPT {
            answers.retain(|_, (at, _)| at.elapsed() < TTL);
        }
        if answers.len() < KEPT {
            answers.insert(name.to_string(), (Instant::now(), r.clone()));
        }
    }
}

fn decide(cfg: &Rules, name: &str) -> Result<(), Refusal> {
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
        let check = |extra: &str, name: &str| decide(&Rules::of(&cfg(extra)), name);
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

    /// The thread the last lookup ran on.
    static LOOKED_UP_ON: Mutex<Option<std::thread::ThreadId>> = Mutex::new(None);

    fn recording(_: &Rules, _: &str) -> Result<(), Refusal> {
        *LOOKED_UP_ON.lock().unwrap() = Some(std::thread::current().id());
        Ok(())
    }

    #[test]
    fn accounts_are_looked_up_off_the_async_thread_and_kept_a_minute() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let access = Access::with_lookup(&cfg(""), recording);
        assert_eq!(rt.block_on(access.check("alice")), Ok(()));
        let on = LOOKED_UP_ON.lock().unwrap().take();
        assert!(
            on.is_some_and(|t| t != std::thread::current().id()),
            "the lookup ran on the runtime's thread"
        );
        // The answer is kept: no second lookup.
        assert_eq!(rt.block_on(access.check("alice")), Ok(()));
        assert_eq!(LOOKED_UP_ON.lock().unwrap().take(), None);
    }
}
