//! The hub's state in SQLite: users (their last choices), logins, sessions
//! and the audit log. Everything the hub must remember across a restart is
//! here; what a running job is doing is asked of Slurm again.
//!
//! One connection behind a mutex: every statement is a few microseconds, far
//! below the cost of the HTTP request around it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
-- WAL with NORMAL syncs at checkpoints, not at every commit: a power cut
-- may lose the last card updates, which the watcher rewrites anyway.
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    last_choice TEXT
);
CREATE TABLE IF NOT EXISTS logins (
    id_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    expires INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    choice TEXT NOT NULL,
    job_id TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    start_est TEXT,
    node TEXT,
    time_left TEXT,
    ended_why TEXT,
    log_path TEXT,
    created INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user);
-- One live session per user, whatever runs at once: the insert itself is
-- refused, not a check before it.
CREATE UNIQUE INDEX IF NOT EXISTS sessions_one_live ON sessions(user) WHERE state != 'ended';
CREATE TABLE IF NOT EXISTS audit (
    ts INTEGER NOT NULL,
    user TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
";

/// What the user picked in the spawn form.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Choice {
    pub profile: String,
    pub partition: String,
    pub cores: u32,
    pub mem_gb: u32,
    pub gpus: u32,
    pub minutes: u32,
}

/// A session's life: queued → starting (job running, agent not yet
/// connected) → running → ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Starting,
    Running,
    Ended,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Starting => "starting",
            State::Running => "running",
            State::Ended => "ended",
        }
    }
    fn parse(s: &str) -> State {
        match s {
            "queued" => State::Queued,
            "starting" => State::Starting,
            "running" => State::Running,
            _ => State::Ended,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Session {
    pub id: String,
    pub user: String,
    pub choice: Choice,
    pub job_id: Option<String>,
    pub state: State,
    pub reason: Option<String>,
    pub start_est: Option<String>,
    pub node: Option<String>,
    pub time_left: Option<String>,
    pub ended_why: Option<String>,
    pub log_path: Option<String>,
    pub created: i64,
}

/// One event of the audit table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub ts: i64,
    pub user: String,
    pub action: String,
    pub detail: String,
}

pub struct Db {
    conn: Mutex<Connection>,
    /// Logins by cookie hash (user, expiry): every proxied request asks who
    /// it is for, and a query costs more than the rest of the hub's work on
    /// it. This process is the only writer of `logins`, so the cache follows
    /// every change (add, logout, expiry).
    logins: Mutex<HashMap<String, (String, i64)>>,
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The link token columns, added to databases made before them.
fn add_link_columns(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('sessions') WHERE name = 'link_gen'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has {
        conn.execute_batch(
            "ALTER TABLE sessions ADD COLUMN link_gen INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE sessions ADD COLUMN link_next INTEGER;",
        )?;
    }
    Ok(())
}

const SESSION_COLS: &str = "id, user, choice, job_id, state, reason, start_est, node, time_left, ended_why, log_path, created";

fn session_row(r: &rusqlite::Row) -> rusqlite::Result<Session> {
    let choice: String = r.get(2)?;
    Ok(Session {
        id: r.get(0)?,
        user: r.get(1)?,
        choice: serde_json::from_str(&choice).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
        })?,
        job_id: r.get(3)?,
        state: State::parse(&r.get::<_, String>(4)?),
        reason: r.get(5)?,
        start_est: r.get(6)?,
        node: r.get(7)?,
        time_left: r.get(8)?,
        ended_why: r.get(9)?,
        log_path: r.get(10)?,
        created: r.get(11)?,
    })
}

impl Session {
    /// A session being submitted: queued, no job yet.
    pub fn submitting(id: String, user: String, choice: Choice) -> Session {
        Session {
            id,
            user,
            choice,
            job_id: None,
            state: State::Queued,
            reason: Some("submitting".into()),
            start_est: None,
            node: None,
            time_left: None,
            ended_why: None,
            log_path: None,
            created: now(),
        }
    }
}

/// A change to a session's card, from the watcher or the link: `None`
/// leaves a field as it is.
#[derive(Debug, Default)]
pub struct Update {
    pub state: Option<State>,
    pub reason: Option<Option<String>>,
    pub start_est: Option<Option<String>>,
    pub node: Option<Option<String>>,
    pub time_left: Option<Option<String>>,
    pub ended_why: Option<String>,
}

impl Update {
    /// Whether applying this would change `s` (the watcher writes only then).
    pub fn changes(&self, s: &Session) -> bool {
        let differs = |new: &Option<Option<String>>, cur: &Option<String>| {
            new.as_ref().is_some_and(|n| n != cur)
        };
        self.state.is_some_and(|st| st != s.state)
            || differs(&self.reason, &s.reason)
            || differs(&self.start_est, &s.start_est)
            || differs(&self.node, &s.node)
            || differs(&self.time_left, &s.time_left)
            || (self.ended_why.is_some() && s.ended_why.is_none())
    }
}

/// The longest user or action an audit record keeps (a user name is at
/// most 32 bytes).
const AUDIT_CELL_MAX: usize = 64;
/// The longest detail an audit record keeps.
const AUDIT_DETAIL_MAX: usize = 2000;

impl Db {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the hub database {}", path.display()))?;
        conn.execute_batch(SCHEMA)
            .and_then(|()| add_link_columns(&conn))
            .with_context(|| format!("cannot set up the hub database {}", path.display()))?;
        Ok(Db {
            conn: Mutex::new(conn),
            logins: Mutex::new(HashMap::new()),
        })
    }

    /// The database of a hub (running or not) for reading only: nothing
    /// is created or changed, so a root reader leaves no file the hub's
    /// account could not open.
    pub fn open_read_only(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            anyhow::bail!(
                "there is no hub database at {}: has the hub run with this configuration?",
                path.display()
            );
        }
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open the hub database {}", path.display()))?;
        Ok(Db {
            conn: Mutex::new(conn),
            logins: Mutex::new(HashMap::new()),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event in the audit table, and logs it (info): every
    /// field escaped and bounded ([`crate::audit::recorded`]; the one
    /// place that escapes it), since users choose parts of them.
    pub fn audit(&self, user: &str, action: &str, detail: &str) {
        let user = crate::audit::recorded(user, AUDIT_CELL_MAX);
        let action = crate::audit::recorded(action, AUDIT_CELL_MAX);
        let detail = crate::audit::recorded(detail, AUDIT_DETAIL_MAX);
        tracing::info!(user, action, detail, "audit");
        if let Err(e) = self.conn().execute(
            "INSERT INTO audit (ts, user, action, detail) VALUES (?1, ?2, ?3, ?4)",
            params![now(), user, action, detail],
        ) {
            tracing::error!("cannot write the audit log: {e}");
        }
    }

    pub fn audit_count(&self, action: &str) -> anyhow::Result<i64> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM audit WHERE action = ?1",
            [action],
            |r| r.get(0),
        )?)
    }

    /// The audit table, oldest first: `user`'s events only, if given, and
    /// from `since` (a time stamp) on.
    pub fn audit_rows(
        &self,
        user: Option<&str>,
        since: Option<i64>,
    ) -> anyhow::Result<Vec<AuditRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT ts, user, action, detail FROM audit
             WHERE (?1 IS NULL OR user = ?1) AND (?2 IS NULL OR ts >= ?2) ORDER BY ts, rowid",
        )?;
        let rows = st.query_map(params![user, since], |r| {
            Ok(AuditRow {
                ts: r.get(0)?,
                user: r.get(1)?,
                action: r.get(2)?,
                detail: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn add_login(&self, id_hash: &str, user: &str, expires: i64) -> anyhow::Result<()> {
        let c = self.conn();
        c.execute("DELETE FROM logins WHERE expires < ?1", [now()])?;
        c.execute(
            "INSERT INTO logins (id_hash, user, expires) VALUES (?1, ?2, ?3)",
            params![id_hash, user, expires],
        )?;
        c.execute(
            "INSERT OR IGNORE INTO users (name) VALUES (?1)",
            params![user],
        )?;
        drop(c);
        let mut cache = self.login_cache();
        let t = now();
        cache.retain(|_, (_, exp)| *exp >= t);
        cache.insert(id_hash.to_string(), (user.to_string(), expires));
        Ok(())
    }

    fn login_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, i64)>> {
        self.logins.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn login_user(&self, id_hash: &str) -> anyhow::Result<Option<String>> {
        let t = now();
        if let Some((user, exp)) = self.login_cache().get(id_hash) {
            return Ok((*exp >= t).then(|| user.clone()));
        }
        // Logins from before a restart.
        let found: Option<(String, i64)> = self
            .conn()
            .query_row(
                "SELECT user, expires FROM logins WHERE id_hash = ?1 AND expires >= ?2",
                params![id_hash, t],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(found.map(|(user, exp)| {
            self.login_cache()
                .insert(id_hash.to_string(), (user.clone(), exp));
            user
        }))
    }

    pub fn remove_login(&self, id_hash: &str) -> anyhow::Result<()> {
        self.login_cache().remove(id_hash);
        self.conn()
            .execute("DELETE FROM logins WHERE id_hash = ?1", [id_hash])?;
        Ok(())
    }

    pub fn last_choice(&self, user: &str) -> anyhow::Result<Option<Choice>> {
        let s: Option<Option<String>> = self
            .conn()
            .query_row(
                "SELECT last_choice FROM users WHERE name = ?1",
                [user],
                |r| r.get(0),
            )
            .optional()?;
        Ok(s.flatten().and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Records a new session; `false` if its user already has a live one.
    pub fn new_session(&self, s: &Session) -> anyhow::Result<bool> {
        let choice = serde_json::to_string(&s.choice)?;
        let c = self.conn();
        let inserted = c.execute(
            "INSERT INTO sessions (id, user, choice, state, reason, log_path, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![s.id, s.user, choice, s.state.as_str(), s.reason, s.log_path, s.created],
        );
        match inserted {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                return Ok(false)
            }
            r => r?,
        };
        c.execute(
            "INSERT INTO users (name, last_choice) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET last_choice = excluded.last_choice",
            params![s.user, choice],
        )?;
        Ok(true)
    }

    /// The generations of the link tokens a session's agent may dial with:
    /// the one it is known to hold, and one given to it but not yet
    /// acknowledged (see `crate::agents`).
    pub fn link_gens(&self, id: &str) -> anyhow::Result<(i64, Option<i64>)> {
        Ok(self.conn().query_row(
            "SELECT link_gen, link_next FROM sessions WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    pub fn set_link_gens(&self, id: &str, gen: i64, next: Option<i64>) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE sessions SET link_gen = ?2, link_next = ?3 WHERE id = ?1",
            params![id, gen, next],
        )?;
        Ok(())
    }

    /// Records the session's job; false when the session had ended
    /// meanwhile (cancelled while its job was being submitted: the job is
    /// recorded all the same, for the caller to cancel it).
    pub fn set_job(&self, id: &str, job_id: &str, log_path: &str) -> anyhow::Result<bool> {
        let state: String = self.conn().query_row(
            "UPDATE sessions SET job_id = ?2, log_path = ?3 WHERE id = ?1 RETURNING state",
            params![id, job_id, log_path],
            |r| r.get(0),
        )?;
        Ok(State::parse(&state) != State::Ended)
    }

    /// Ends a session cancelled while it had no job yet; the job its
    /// submission recorded since, if any, for the caller to cancel. One
    /// statement, as `set_job`'s: of the two, exactly one sees the other
    /// (the submission's `set_job` returns false when this came first).
    pub fn end_jobless(&self, id: &str, why: &str) -> anyhow::Result<Option<String>> {
        Ok(self.conn().query_row(
            "UPDATE sessions SET state = ?2, ended_why = COALESCE(ended_why, ?3)
             WHERE id = ?1 RETURNING job_id",
            params![id, State::Ended.as_str(), why],
            |r| r.get(0),
        )?)
    }

    /// Applies `u` in one statement (one transaction).
    pub fn update(&self, id: &str, u: &Update) -> anyhow::Result<()> {
        let set = |v: &Option<Option<String>>| (v.is_some(), v.clone().flatten());
        let (reason, start, node, left) = (
            set(&u.reason),
            set(&u.start_est),
            set(&u.node),
            set(&u.time_left),
        );
        self.conn().execute(
            "UPDATE sessions SET state = COALESCE(?2, state),
                reason = CASE WHEN ?3 THEN ?4 ELSE reason END,
                start_est = CASE WHEN ?5 THEN ?6 ELSE start_est END,
                node = CASE WHEN ?7 THEN ?8 ELSE node END,
                time_left = CASE WHEN ?9 THEN ?10 ELSE time_left END,
                ended_why = COALESCE(ended_why, ?11)
             WHERE id = ?1",
            params![
                id,
                u.state.map(State::as_str),
                reason.0,
                reason.1,
                start.0,
                start.1,
                node.0,
                node.1,
                left.0,
                left.1,
                u.ended_why
            ],
        )?;
        Ok(())
    }

    pub fn session(&self, id: &str) -> anyhow::Result<Option<Session>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {SESSION_COLS} FROM sessions WHERE id = ?1"),
                [id],
                session_row,
            )
            .optional()?)
    }

    /// A user's sessions (every user's when `user` is None), newest first:
    /// every live one, and at most `ended` ended ones.
    pub fn sessions(&self, user: Option<&str>, ended: usize) -> anyhow::Result<Vec<Session>> {
        let c = self.conn();
        let mut st = c.prepare_cached(&format!(
            "SELECT {SESSION_COLS}, rowid AS r FROM sessions
                WHERE (?1 IS NULL OR user = ?1) AND state != 'ended'
             UNION ALL
             SELECT * FROM (SELECT {SESSION_COLS}, rowid AS r FROM sessions
                WHERE (?1 IS NULL OR user = ?1) AND state = 'ended'
                ORDER BY created DESC, rowid DESC LIMIT ?2)
             ORDER BY created DESC, r DESC"
        ))?;
        let rows = st.query_map(params![user, ended as i64], session_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sessions not ended: what the watcher follows and the link accepts.
    pub fn live_sessions(&self) -> anyhow::Result<Vec<Session>> {
        let c = self.conn();
        let mut st = c.prepare(&format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE state != 'ended'"
        ))?;
        let rows = st.query_map([], session_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, user: &str) -> Session {
        let choice = Choice {
            profile: "p".into(),
            partition: "q".into(),
            cores: 1,
            mem_gb: 0,
            gpus: 0,
            minutes: 5,
        };
        Session::submitting(id.into(), user.into(), choice)
    }

    #[test]
    fn one_live_session_per_user_even_from_two_threads() {
        let db = Db::open(Path::new(":memory:")).unwrap();
        let made: Vec<bool> = std::thread::scope(|t| {
            let a = t.spawn(|| db.new_session(&session("s1", "alice")).unwrap());
            let b = t.spawn(|| db.new_session(&session("s2", "alice")).unwrap());
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        assert_eq!(made.iter().filter(|m| **m).count(), 1, "{made:?}");
        assert!(db.new_session(&session("s3", "bob")).unwrap());
        // Once it has ended, the user may start another.
        let live = db.live_sessions().unwrap();
        let alices = live.iter().find(|s| s.user == "alice").unwrap();
        db.update(
            &alices.id,
            &Update {
                state: Some(State::Ended),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(db.new_session(&session("s4", "alice")).unwrap());
        assert_eq!(db.link_gens("s4").unwrap(), (0, None));
    }

    /// A job id that comes after its session was cancelled is recorded on
    /// it, and `set_job` says so: the caller cancels that job.
    #[test]
    fn a_job_given_to_a_cancelled_session_is_recorded_and_said() {
        let db = Db::open(Path::new(":memory:")).unwrap();
        assert!(db.new_session(&session("s1", "alice")).unwrap());
        assert!(db.set_job("s1", "41", "/log41").unwrap());
        assert!(db.new_session(&session("s2", "bob")).unwrap());
        let ended = Update {
            state: Some(State::Ended),
            ..Default::default()
        };
        db.update("s2", &ended).unwrap();
        assert!(!db.set_job("s2", "42", "/log42").unwrap());
        assert_eq!(
            db.session("s2").unwrap().unwrap().job_id.as_deref(),
            Some("42")
        );
    }

    /// A session cancelled with no job yet, and its submission's job id,
    /// in either order: exactly one of the two is told to cancel the job.
    #[test]
    fn a_cancel_and_a_late_job_id_cancel_the_job_once() {
        let db = Db::open(Path::new(":memory:")).unwrap();
        assert!(db.new_session(&session("s1", "alice")).unwrap());
        assert!(db.set_job("s1", "41", "/log41").unwrap()); // the submission: not to cancel
        assert_eq!(
            db.end_jobless("s1", "cancelled").unwrap().as_deref(),
            Some("41")
        );
        let s1 = db.session("s1").unwrap().unwrap();
        assert_eq!(
            (s1.state, s1.ended_why.as_deref()),
            (State::Ended, Some("cancelled"))
        );
        assert!(db.new_session(&session("s2", "bob")).unwrap());
        assert_eq!(db.end_jobless("s2", "cancelled").unwrap(), None);
        assert!(!db.set_job("s2", "42", "/log42").unwrap()); // the submission cancels it
    }
}
