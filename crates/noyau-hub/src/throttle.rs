//! Password guessing: failed logins are counted per user and per client
//! address. After `login_failures` of them within a minute, that user (or
//! address) waits `login_delay` seconds before PAM is asked again, and the
//! wait doubles with each failure after that, up to an hour. A success
//! clears the user's count, not the address's (an attacker's own account
//! must not reset the count of the address it guesses from).
//!
//! Per user and per address: an attacker spreading guesses over many names
//! is slowed by the address, one spreading them over many addresses by the
//! user. Guesses would then lock the real user out (up to an hour, again
//! and again): a login from a browser the user logged in from before,
//! carrying its device cookie ([`crate::auth`]), is counted under that
//! device (`device:NONCE`) instead of the user, so others' guesses do not
//! hold it, while the address's count holds it as any other.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures older than this do not count.
const WINDOW: Duration = Duration::from_secs(60);
/// A key with no failure for this long starts again from the first delay.
const FORGET: Duration = Duration::from_secs(3600);
/// The longest wait.
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// Keys kept at most; past this, those with no wait left are dropped.
const KEPT: usize = 100_000;

#[derive(Default)]
struct Entry {
    recent: VecDeque<Instant>,
    locked_until: Option<Instant>,
    /// Waits imposed since the last quiet hour: the next is 2^strikes × delay.
    strikes: u32,
    last: Option<Instant>,
}

pub struct Throttle {
    entries: Mutex<HashMap<String, Entry>>,
    failures: usize,
    delay: Duration,
}

impl Throttle {
    pub fn new(failures: u32, delay: Duration) -> Self {
        Throttle {
            entries: Mutex::new(HashMap::new()),
            failures: failures.max(1) as usize,
            delay,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long the longest-waiting of `keys` must still wait, if any.
    pub fn wait(&self, keys: &[String]) -> Option<Duration> {
        let now = Instant::now();
        let entries = self.entries();
        keys.iter()
            .filter_map(|k| entries.get(k)?.locked_until)
            .filter(|&t| t > now)
            .map(|t| t - now)
            .max()
    }

    /// Counts a failure for each of `keys`; returns the wait it imposed,
    /// if it imposed one.
    pub fn failed(&self, keys: &[String]) -> Option<Duration> {
        let now = Instant::now();
        let mut entries = self.entries();
        if entries.len() >= KEPT {
            entries.retain(|_, e| {
                e.locked_until.is_some_and(|t| t > now) || e.last.is_some_and(|l| now - l < WINDOW)
            });
        }
        let mut imposed = None;
        for k in keys {
            let e = entries.entry(k.clone()).or_default();
            if e.last.is_some_and(|l| now - l > FORGET) {
                *e = Entry::default();
            }
            e.recent.retain(|&t| now - t < WINDOW);
            e.recent.push_back(now);
            e.last = Some(now);
            if e.recent.len() >= self.failures {
                let wait = self
                    .delay
                    .saturating_mul(1 << e.strikes.min(20))
                    .min(MAX_DELAY);
                e.locked_until = Some(now + wait);
                e.strikes += 1;
                imposed = imposed.max(Some(wait));
            }
            // Only the last `failures` matter.
            while e.recent.len() > self.failures {
                e.recent.pop_front();
            }
        }
        imposed
    }

    /// A right password: the user (or the device) starts afresh.
    pub fn succeeded(&self, key: &str) {
        self.entries().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fifth_failure_imposes_a_wait_that_doubles() {
        let t = Throttle::new(5, Duration::from_secs(30));
        let (user, addr) = ("user:a".to_string(), "addr:192.0.2.1".to_string());
        let keys = [user.clone(), addr.clone()];
        for _ in 0..4 {
            assert_eq!(t.failed(&keys), None);
            assert_eq!(t.wait(&keys), None);
        }
        assert_eq!(t.failed(&keys), Some(Duration::from_secs(30)));
        let w = t.wait(&keys).unwrap();
        assert!(w > Duration::from_secs(29) && w <= Duration::from_secs(30));
        // Another address for the same user waits too; another user there too.
        assert!(t.wait(&[user.clone(), "addr:x".into()]).is_some());
        assert!(t.wait(&["user:b".into(), addr.clone()]).is_some());
        assert!(t.wait(&["user:b".into(), "addr:x".into()]).is_none());
        // The next failure (once allowed) doubles the wait.
        assert_eq!(t.failed(&keys), Some(Duration::from_secs(60)));
        // Success clears the user, not the address.
        t.succeeded(&user);
        assert!(t.wait(std::slice::from_ref(&user)).is_none());
        assert!(t.wait(std::slice::from_ref(&addr)).is_some());
    }
}
