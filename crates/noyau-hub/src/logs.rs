//! The last lines of an ended session's job log, shown on its card.
//!
//! The hub reads them as root from a path the user controls: the user may
//! have put a FIFO there (opening it would wait for a writer forever), a
//! symlink to a file they may not read, another user's file, or a file on a
//! mount that hangs. So the file is opened with `O_NONBLOCK|O_NOFOLLOW`,
//! shown only if fstat says it is a regular file owned by the session's
//! user, and only its last 16 KiB are read; and the reading happens on the
//! blocking pool, a few at a time, while the page waits at most
//! [`DEADLINE`] for it. An ended session's log no longer changes, so each
//! is read once: a read that has not finished by the deadline fills the
//! cache when it does, and one that never does costs one blocked thread,
//! never a page.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::db::{Session, State};

/// How long a page waits for the tails it asked for.
pub const DEADLINE: Duration = Duration::from_millis(300);
/// Lines shown.
const LINES: usize = 12;
/// Bytes read from the end of the log.
const TAIL_BYTES: u64 = 16 * 1024;
/// A tail's line's characters kept at most.
const LINE_MAX: usize = 1024;
/// Reads in flight at once (each on a blocking thread).
const READERS: usize = 4;
/// Tails kept; past this the cache starts again.
const KEPT: usize = 4096;

enum Slot {
    Reading,
    Done(Option<Arc<str>>),
}

/// Ended sessions' log tails, by session id.
pub struct Tails {
    cache: Arc<Mutex<HashMap<String, Slot>>>,
    readers: Arc<Semaphore>,
}

impl Default for Tails {
    fn default() -> Self {
        Tails {
            cache: Arc::default(),
            readers: Arc::new(Semaphore::new(READERS)),
        }
    }
}

fn lock(m: &Mutex<HashMap<String, Slot>>) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tails {
    /// The tails of `sessions`' ended ones that can be shown, waiting at
    /// most [`DEADLINE`] for those not read yet.
    pub async fn of(&self, sessions: &[Session]) -> HashMap<String, Arc<str>> {
        let mut out = HashMap::new();
        let mut reading = Vec::new();
        {
            let mut cache = lock(&self.cache);
            if cache.len() > KEPT {
                cache.retain(|_, s| matches!(s, Slot::Reading));
            }
            for s in sessions.iter().filter(|s| s.state == State::Ended) {
                let Some(path) = s.log_path.clone() else {
                    continue;
                };
                match cache.get(&s.id) {
                    Some(Slot::Done(t)) => {
                        if let Some(t) = t {
                            out.insert(s.id.clone(), t.clone());
                        }
                    }
                    Some(Slot::Reading) => {}
                    None => {
                        // No reader free: no tail this time, a later page asks again.
                        let Ok(permit) = self.readers.clone().try_acquire_owned() else {
                            continue;
                        };
                        cache.insert(s.id.clone(), Slot::Reading);
                        let (cache, id, user) = (self.cache.clone(), s.id.clone(), s.user.clone());
                        reading.push((
                            s.id.clone(),
                            tokio::task::spawn_blocking(move || {
                                let t: Option<Arc<str>> = tail(&path, &user).map(Into::into);
                                lock(&cache).insert(id, Slot::Done(t.clone()));
                                drop(permit);
                                t
                            }),
                        ));
                    }
                }
            }
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        for (id, task) in reading {
            if let Ok(Ok(Some(t))) = tokio::time::timeout_at(deadline, task).await {
                out.insert(id, t);
            }
        }
        out
    }
}

/// The last lines of the log at `path`, if it is a regular file of `user`'s
/// (blocking); each line without control or invisible characters
/// ([`crate::text::clean`]): the user writes the log, an admin reads it too.
fn tail(path: &str, user: &str) -> Option<String> {
    let uid = nix::unistd::User::from_name(user).ok()??.uid.as_raw();
    let t = noyau_sched::tail_log(path.as_ref(), uid, TAIL_BYTES, LINES).ok()??;
    let lines: Vec<String> = t
        .lines()
        .map(|l| crate::text::clean(l, LINE_MAX, crate::text::Unsafe::Strip))
        .collect();
    Some(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> String {
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap()
            .name
    }

    #[test]
    fn only_a_regular_file_of_the_user_not_through_a_symlink() {
        let dir = std::env::temp_dir().join(format!("noyau-hub-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("job.log");
        let lines: String = (0..20).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, lines + "x\u{1b}[2J\u{202e}\ry\n").unwrap();
        let t = tail(log.to_str().unwrap(), &me()).unwrap();
        // (The user's own escapes and overrides: not on the page.)
        assert!(
            t.starts_with("line 9\n") && t.ends_with("line 19\nx[2Jy"),
            "{t:?}"
        );
        let link = dir.join("link.log");
        std::os::unix::fs::symlink(&log, &link).unwrap();
        assert_eq!(tail(link.to_str().unwrap(), &me()), None);
        // A FIFO: answered at once (no writer is waited for), and not shown.
        let fifo = dir.join("fifo.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(tail(fifo.to_str().unwrap(), &me()), None);
        // Another user's file (daemon's, as far as the owner check goes).
        let other = if me() == "daemon" { "bin" } else { "daemon" };
        assert_eq!(tail(log.to_str().unwrap(), other), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
