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
//!
//! A name typed in the login form has proved nothing: anyone can send a
//! flood of made-up ones. Their answers are kept apart (a small table of
//! their own, so they never crowd out the answers for the users logged
//! in), at most [`TYPED_LOOKUPS`] of their lookups run at once (the next
//! waits [`TYPED_WAIT`] at most for one to end, then is refused, so that
//! they never fill the blocking pool the hub's other work runs on), and a
//! name is looked up once at a time whoever asks (the others wait for that
//! answer). The login counts a refusal against the address that sent it,
//! so a flood of made-up names soon waits out its throttle instead of
//! keeping the slots from real users.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::unistd::{Group, User};
use tokio::sync::{OnceCell, Semaphore};

use crate::config::HubConfig;

/// How long an answer is reused.
const TTL: Duration = Duration::from_secs(60);
/// Answers kept at most for logged-in users (the expired go first; past
/// this, a new answer is not kept).
const KEPT: usize = 10_000;
/// Answers kept at most for names typed in the login form.
const KEPT_TYPED: usize = 1_000;
/// Lookups of typed names at once, at most.
pub const TYPED_LOOKUPS: usize = 8;
/// How long a typed name waits for a lookup slot before it is [`Busy`]:
/// long enough for a lookup to end, short enough for a login form.
const TYPED_WAIT: Duration = Duration::from_secs(3);

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

/// Every lookup of a typed name was under way for [`TYPED_WAIT`]: the
/// login is refused (try again shortly).
#[derive(Debug, PartialEq, Eq)]
pub struct Busy;

type Verdict = Result<(), Refusal>;

/// How an account is judged under the rules (NSS, blocking).
type Lookup = Arc<dyn Fn(&Rules, &str) -> Verdict + Send + Sync>;

/// hub.toml's keys that say who may log in.
#[derive(Debug, Clone)]
struct Rules {
    min_uid: u32,
    allowed_users: Vec<String>,
    allowed_groups: Vec<String>,
    admins: Vec<String>,
}

impl Rules {
    fn of(cfg: &HubConfig) -> Rules {
        Rules {
            min_uid: cfg.min_uid,
            allowed_users: cfg.allowed_users.clone(),
            allowed_groups: cfg.allowed_groups.clone(),
            admins: cfg.admins.clone(),
        }
    }
}

/// Answers of the last minute, at most `kept` of them.
struct Answers {
    kept: usize,
    by_name: Mutex<HashMap<String, (Instant, Verdict)>>,
}

impl Answers {
    fn new(kept: usize) -> Answers {
        Answers {
            kept,
            by_name: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Verdict)>> {
        self.by_name.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, name: &str) -> Option<Verdict> {
        let answers = self.lock();
        let (at, r) = answers.get(name)?;
        (at.elapsed() < TTL).then(|| r.clone())
    }

    fn put(&self, name: &str, r: &Verdict) {
        let mut answers = self.lock();
        if answers.len() >= self.kept {
            answers.retain(|_, (at, _)| at.elapsed() < TTL);
        }
        if answers.len() < self.kept || answers.contains_key(name) {
            answers.insert(name.to_string(), (Instant::now(), r.clone()));
        }
    }
}

/// The rules, with their answers of the last minute.
pub struct Access {
    rules: Arc<Rules>,
    lookup: Lookup,
    /// For the users logged in (or named by the SSO proxy).
    answers: Answers,
    /// For the names typed in the login form.
    typed: Answers,
    typed_slots: Arc<Semaphore>,
    /// The lookups under way, one per name.
    pending: Mutex<HashMap<String, Arc<OnceCell<Verdict>>>>,
}

impl Access {
    pub fn new(cfg: &HubConfig) -> Access {
        Access::with_lookup(cfg, Arc::new(decide))
    }

    fn with_lookup(cfg: &HubConfig, lookup: Lookup) -> Access {
        Access {
            rules: Arc::new(Rules::of(cfg)),
            lookup,
            answers: Answers::new(KEPT),
            typed: Answers::new(KEPT_TYPED),
            typed_slots: Arc::new(Semaphore::new(TYPED_LOOKUPS)),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `name`, logged in or named by the SSO proxy, may log in:
    /// the answer of the last minute, or one looked up on the blocking pool.
    pub async fn check(&self, name: &str) -> Verdict {
        if let Some(r) = self.answers.get(name) {
            return r;
        }
        // (Only a lookup that takes a slot can be busy.)
        self.look_up(name, None, &self.answers)
            .await
            .unwrap_or_else(|Busy| Err(cannot_look_up(name, "busy")))
    }

    /// Whether `name`, typed in the login form, may log in: as
    /// [`Access::check`], but its answer kept apart, and [`Busy`] if
    /// [`TYPED_LOOKUPS`] lookups of typed names stay under way for
    /// [`TYPED_WAIT`].
    pub async fn check_typed(&self, name: &str) -> Result<Verdict, Busy> {
        if let Some(r) = self.answers.get(name).or_else(|| self.typed.get(name)) {
            return Ok(r);
        }
        self.look_up(name, Some(&self.typed_slots), &self.typed)
            .await
    }

    /// `name` logged in: its answer is kept with the logged-in users'.
    pub fn logged_in(&self, name: &str) {
        if let Some(r) = self.typed.get(name) {
            self.answers.put(name, &r);
        }
    }

    /// `name` looked up on the blocking pool, and its answer kept `into`;
    /// once at a time: a second caller waits for the first one's answer
    /// (and takes over if the first goes away, or was busy). With `slots`,
    /// the lookup takes one of them, held until NSS answers (a caller that
    /// goes away leaves it taken until then), or is [`Busy`] when none is
    /// free within [`TYPED_WAIT`].
    async fn look_up(
        &self,
        name: &str,
        slots: Option<&Arc<Semaphore>>,
        into: &Answers,
    ) -> Result<Verdict, Busy> {
        let cell = self.pending().entry(name.to_string()).or_default().clone();
        let r = cell
            .get_or_try_init(|| async {
                let slot = match slots {
                    Some(s) => Some(
                        tokio::time::timeout(TYPED_WAIT, s.clone().acquire_owned())
                            .await
                            .map_err(|_| Busy)?
                            .map_err(|_| Busy)?,
                    ),
                    None => None,
                };
                let (rules, lookup, who) =
                    (self.rules.clone(), self.lookup.clone(), name.to_string());
                let r = tokio::task::spawn_blocking(move || {
                    let r = lookup(&rules, &who);
                    drop(slot);
                    r
                })
                .await
                .unwrap_or_else(|e| Err(cannot_look_up(name, e)));
                into.put(name, &r);
                Ok(r)
            })
            .await
            .cloned();
        // Answered (and kept), or busy: the next caller starts afresh.
        let mut pending = self.pending();
        if pending.get(name).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            pending.remove(name);
        }
        r
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<OnceCell<Verdict>>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn cannot_look_up(name: &str, e: impl std::fmt::Display) -> Refusal {
    Refusal::Unknown(format!(
        "The hub cannot look up the account {name} ({e}); try again later."
    ))
}

fn decide(cfg: &Rules, name: &str) -> Verdict {
    let user = match User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => {
            return Err(Refusal::Unknown(format!(
                "There is no account {name} on this host."
            )))
        }
        Err(e) => return Err(cannot_look_up(name, e)),
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
    use std::future::Future;
    use std::task::Poll;

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

    /// A lookup that counts its calls and records the thread it ran on.
    fn recording() -> (Lookup, Arc<Mutex<Vec<std::thread::ThreadId>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        let lookup: Lookup = Arc::new(move |_: &Rules, _: &str| {
            c.lock().unwrap().push(std::thread::current().id());
            Ok(())
        });
        (lookup, calls)
    }

    #[test]
    fn accounts_are_looked_up_off_the_async_thread_and_kept_a_minute() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (lookup, calls) = recording();
        let access = Access::with_lookup(&cfg(""), lookup);
        assert_eq!(rt.block_on(access.check("alice")), Ok(()));
        let on = calls.lock().unwrap().clone();
        assert!(
            on.len() == 1 && on[0] != std::thread::current().id(),
            "the lookup ran on the runtime's thread, or not once: {on:?}"
        );
        // The answer is kept: no second lookup.
        assert_eq!(rt.block_on(access.check("alice")), Ok(()));
        assert_eq!(calls.lock().unwrap().len(), 1);
    }

    #[test]
    fn typed_names_are_kept_apart_and_looked_up_once_at_a_time() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (lookup, calls) = recording();
        let access = Access::with_lookup(&cfg(""), lookup);
        let n = || calls.lock().unwrap().len();
        // Three logins with one name at once: one lookup. (join! polls all
        // three before the first can see its answer.)
        let (a, b, c) = rt.block_on(async {
            tokio::join!(
                access.check_typed("mallory"),
                access.check_typed("mallory"),
                access.check_typed("mallory")
            )
        });
        assert_eq!((a, b, c), (Ok(Ok(())), Ok(Ok(())), Ok(Ok(()))));
        assert_eq!(n(), 1, "a name was looked up more than once at a time");
        assert_eq!(rt.block_on(access.check_typed("mallory")), Ok(Ok(())));
        assert_eq!(n(), 1);
        // A typed name's answer is not one for the logged-in users...
        assert_eq!(rt.block_on(access.check("mallory")), Ok(()));
        assert_eq!(
            n(),
            2,
            "a typed name's answer filled the logged-in users' table"
        );
        // ...until its login succeeds.
        assert_eq!(rt.block_on(access.check_typed("alice")), Ok(Ok(())));
        access.logged_in("alice");
        assert_eq!(rt.block_on(access.check("alice")), Ok(()));
        assert_eq!(n(), 3);
    }

    #[test]
    fn typed_names_take_a_few_lookups_at_most_and_others_go_on() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Lookups of typed names (t0, t1, …) hang until the gate opens,
        // as a directory that stopped answering would.
        let gate = Arc::new((Mutex::new((0usize, false)), std::sync::Condvar::new()));
        let g = gate.clone();
        let lookup: Lookup = Arc::new(move |_: &Rules, name: &str| {
            if name.starts_with('t') {
                let (m, cv) = &*g;
                let mut s = m.lock().unwrap();
                s.0 += 1;
                cv.notify_all();
                let _s = cv.wait_while(s, |s| !s.1).unwrap();
            }
            Ok(())
        });
        let access = Arc::new(Access::with_lookup(&cfg(""), lookup));
        // Opens the gate however the test ends (the runtime waits for its
        // blocking threads when dropped, a failed assert included).
        struct Opens(Arc<(Mutex<(usize, bool)>, std::sync::Condvar)>);
        impl Drop for Opens {
            fn drop(&mut self) {
                self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
                self.0 .1.notify_all();
            }
        }
        let opens = Opens(gate.clone());
        rt.block_on(async {
            let hanging: Vec<_> = (0..TYPED_LOOKUPS)
                .map(|i| {
                    let a = access.clone();
                    tokio::spawn(async move { a.check_typed(&format!("t{i}")).await })
                })
                .collect();
            let g = gate.clone();
            tokio::task::spawn_blocking(move || {
                let (m, cv) = &*g;
                let _s = cv.wait_while(m.lock().unwrap(), |s| s.0 < TYPED_LOOKUPS);
            })
            .await
            .unwrap();
            // Every slot taken: the next typed name waits for one (its
            // lookup would not hang)...
            let mut waits = std::pin::pin!(access.check_typed("u-wait"));
            let first = std::future::poll_fn(|cx| Poll::Ready(waits.as_mut().poll(cx))).await;
            assert!(first.is_pending(), "refused at once: {first:?}");
            // ...and is refused if none frees in time...
            assert_eq!(access.check_typed("u-next").await, Err(Busy));
            // ...while a logged-in user's lookup goes on.
            assert_eq!(access.check("bob").await, Ok(()));
            drop(opens);
            for h in hanging {
                assert_eq!(h.await.unwrap(), Ok(Ok(())));
            }
            // A slot freed: the waiting name is looked up.
            assert_eq!(waits.await, Ok(Ok(())));
        });
        assert_eq!(rt.block_on(access.check_typed("u-next")), Ok(Ok(())));
    }
}
