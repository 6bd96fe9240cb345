//! Password guessing: failed logins are counted per user and per client
//! address. After `login_failures` of them within a minute, that user (or
//! address) waits `login_delay` seconds before PAM is asked again, and the
//! wait doubles with each failure after that, up to an hour. A success
//! clears the user's (or the device's) count, not the address's (an attacker's own account
//! must not reset the count of the address it guesses from).
//!
//! Per user and per address: an attacker spreading guesses over many names
//! is slowed by the address, one spreading them over many addresses by the
//! user. Guesses would then lock the real user out (up to an hour, again
//! and again): a login from a browser the user logged in from before,
//! carrying its device cookie ([`crate::auth`]), is counted under that
//! device (`device:NONCE`) instead of the user, so others' guesses do not
//! hold it, while the address's count holds it as any other. A device
//! whose own count reaches a wait is spent: it counts under the user again,
//! until a right password from it or `FORGET` without a failure from it.
//!
//! A burst of guesses sent at once would all pass the check before the
//! first failure is counted: a user's (or device's) attempts under way
//! count as failures until they end ([`Throttle::attempt`]), so a burst
//! gets no more guesses than one attempt after another would.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures older than this do not count.
const WINDOW: Duration = Duration::from_secs(60);
/// The longest wait.
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// A key with no failure for this long starts again from the first delay:
/// longer than the longest wait, so that waiting it out does not.
const FORGET: Duration = MAX_DELAY.saturating_mul(2);
/// The keys of devices: one whose count reaches a wait is spent
/// ([`Throttle::spent`]).
pub const DEVICE: &str = "device:";
/// Keys kept at most; past this, those with no wait left are dropped.
const KEPT: usize = 100_000;

#[derive(Default)]
struct Entry {
    recent: VecDeque<Instant>,
    locked_until: Option<Instant>,
    /// Waits imposed since the last quiet hour: the next is 2^strikes × delay.
    strikes: u32,
    last: Option<Instant>,
    /// Attempts under way ([`Throttle::attempt`]).
    in_flight: usize,
}

impl Entry {
    /// The entry with its count and waits forgotten, its attempts kept.
    fn afresh(&self) -> Entry {
        Entry {
            in_flight: self.in_flight,
            ..Entry::default()
        }
    }
}

/// An attempt under way, counted until dropped.
pub struct Attempt<'a> {
    throttle: &'a Throttle,
    key: String,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut entries = self.throttle.entries();
        if let Some(e) = entries.get_mut(&self.key) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }
}

pub struct Throttle {
    entries: Mutex<HashMap<String, Entry>>,
    /// Devices whose count reached a wait, and when it last did (few: each
    /// is a browser a user logged in from; the older than `FORGET` go).
    spent: Mutex<HashMap<String, Instant>>,
    failures: usize,
    delay: Duration,
}

impl Throttle {
    pub fn new(failures: u32, delay: Duration) -> Self {
        Throttle {
            entries: Mutex::new(HashMap::new()),
            spent: Mutex::new(HashMap::new()),
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
                e.locked_until.is_some_and(|t| t > now)
                    || e.last.is_some_and(|l| now - l < WINDOW)
                    || e.in_flight > 0
            });
        }
        let mut imposed = None;
        let mut spent = Vec::new();
        for k in keys {
            let e = entries.entry(k.clone()).or_default();
            if e.last.is_some_and(|l| now - l > FORGET) {
                *e = e.afresh();
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
                if k.starts_with(DEVICE) {
                    spent.push(k.clone());
                }
                imposed = imposed.max(Some(wait));
            }
            // Only the last `failures` matter.
            while e.recent.len() > self.failures {
                e.recent.pop_front();
            }
        }
        drop(entries);
        let mut marks = self.spent();
        marks.retain(|_, &mut at| now - at < FORGET);
        marks.extend(spent.into_iter().map(|k| (k, now)));
        imposed
    }

    fn spent(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a device's count has reached a wait: from then on, its
    /// logins count under the user, until a right password from it or
    /// `FORGET` after it last reached one.
    pub fn is_spent(&self, key: &str) -> bool {
        self.spent_at(key, Instant::now())
    }

    fn spent_at(&self, key: &str, now: Instant) -> bool {
        self.spent()
            .get(key)
            .is_some_and(|&at| now.saturating_duration_since(at) < FORGET)
    }

    /// An attempt for `key` (a user or a device), unless attempts are under
    /// way and they and its recent failures reach `login_failures` (at the
    /// threshold, one at a time: as many as one after another would get).
    pub fn attempt(&self, key: &str) -> Option<Attempt<'_>> {
        let now = Instant::now();
        let mut entries = self.entries();
        let e = entries.entry(key.to_string()).or_default();
        let recent = e.recent.iter().filter(|&&t| now - t < WINDOW).count();
        if e.in_flight > 0 && recent + e.in_flight >= self.failures {
            return None;
        }
        e.in_flight += 1;
        Some(Attempt {
            throttle: self,
            key: key.to_string(),
        })
    }

    /// A right password: the user (or the device) starts afresh, and a
    /// spent device is one again.
    pub fn succeeded(&self, key: &str) {
        let mut entries = self.entries();
        if let Some(e) = entries.get_mut(key) {
            *e = e.afresh();
        }
        drop(entries);
        self.spent().remove(key);
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

    #[test]
    fn a_device_that_reached_a_wait_is_spent() {
        let t = Throttle::new(2, Duration::from_secs(30));
        let device = format!("{DEVICE}n1");
        t.failed(std::slice::from_ref(&device));
        assert!(!t.is_spent(&device));
        t.failed(std::slice::from_ref(&device));
        assert!(t.is_spent(&device));
        // Users are never spent.
        let user = "user:a".to_string();
        t.failed(&[user.clone(), user.clone()]);
        assert!(!t.is_spent(&user));
        // A right password from it makes it a device again.
        t.succeeded(&device);
        assert!(!t.is_spent(&device));
    }

    #[test]
    fn a_spent_device_is_forgotten_after_forget() {
        let t = Throttle::new(1, Duration::from_secs(30));
        let device = format!("{DEVICE}n1");
        t.failed(std::slice::from_ref(&device));
        let now = Instant::now();
        assert!(t.spent_at(&device, now + FORGET - Duration::from_secs(1)));
        assert!(!t.spent_at(&device, now + FORGET + Duration::from_secs(1)));
    }

    #[test]
    fn attempts_under_way_count_as_failures() {
        let t = Throttle::new(5, Duration::from_secs(30));
        let user = "user:a".to_string();
        // A burst of ten at once: five get to PAM, and the five failures
        // they then record impose the wait.
        let burst: Vec<_> = (0..10).filter_map(|_| t.attempt(&user)).collect();
        assert_eq!(burst.len(), 5);
        for attempt in burst {
            t.failed(std::slice::from_ref(&user));
            drop(attempt);
        }
        assert!(t.wait(std::slice::from_ref(&user)).is_some());
        // At the threshold (once the wait is over), one at a time.
        let one = t.attempt(&user).unwrap();
        assert!(t.attempt(&user).is_none());
        drop(one);
        // Another user is not held; a finished attempt frees its place.
        let b = "user:b".to_string();
        drop(t.attempt(&b).unwrap());
        let four: Vec<_> = (0..4).map(|_| t.attempt(&b).unwrap()).collect();
        assert!(t.attempt(&b).is_some());
        drop(four);
    }
}
