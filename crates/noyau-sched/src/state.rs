//! What a job is doing, as every caller sees it whatever the scheduler, and
//! the times in it: typed ([`SystemTime`]) from the scheduler's answer on,
//! formatted only for people.

use noyau_vars::EnvVars;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JobState {
    Pending {
        /// The scheduler's reason (Slurm: Priority, Resources, …).
        reason: String,
        /// The scheduler's estimated start time, when it has one.
        start: Option<SystemTime>,
        partition: Option<String>,
    },
    Running {
        node: String,
        /// When the scheduler will end the job (its walltime), if it has one.
        ends_at: Option<SystemTime>,
    },
    Ended(JobEnd),
    /// The scheduler could not be asked; the job may well be alive.
    Unknown {
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobEnd {
    /// E.g. "exited with status 0", "was killed by signal 9 (SIGKILL)".
    pub description: String,
    pub success: bool,
}

impl JobState {
    /// Whether `other` says something new. An end time computed from a
    /// time left (Slurm) moves by a second or two between two answers:
    /// that is not a change.
    pub(crate) fn differs(&self, other: &JobState) -> bool {
        match (self, other) {
            (
                JobState::Running { node, ends_at },
                JobState::Running {
                    node: n2,
                    ends_at: e2,
                },
            ) => {
                node != n2
                    || match (ends_at, e2) {
                        (Some(a), Some(b)) => gap(*a, *b) > Duration::from_secs(2),
                        (a, b) => a != b,
                    }
            }
            (a, b) => a != b,
        }
    }

    /// Seconds until the scheduler ends the running job.
    pub fn seconds_left(&self) -> Option<u64> {
        match self {
            JobState::Running {
                ends_at: Some(t), ..
            } => Some(seconds_until(*t)),
            _ => None,
        }
    }
}

fn gap(a: SystemTime, b: SystemTime) -> Duration {
    a.duration_since(b)
        .or_else(|_| b.duration_since(a))
        .unwrap_or_default()
}

/// Walltime warning thresholds in seconds before the end, largest first
/// (`NOYAU_WALLTIME_WARN`, default 600 and 60): read by the agent, which
/// warns, and by the proxy, which shows them.
pub fn walltime_warnings() -> Vec<u64> {
    let mut t: Vec<u64> = match std::env::var(EnvVars::NOYAU_WALLTIME_WARN) {
        Ok(v) => v
            .split(',')
            .filter_map(|x| x.trim().parse::<u64>().ok())
            .collect(),
        Err(_) => vec![600, 60],
    };
    t.sort_unstable_by(|a, b| b.cmp(a));
    t.dedup();
    t
}

/// Whole seconds from now until `t` (0 once passed).
pub fn seconds_until(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::now())
        .map_or(0, |d| d.as_secs_f64().round() as u64)
}

/// An epoch (seconds) as a time.
pub(crate) fn from_epoch(secs: i64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))
}

/// A time as people here read it: `2026-01-01T10:00:00`, local time.
pub fn local_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let Ok(t) = libc::time_t::try_from(secs) else {
        return "?".into();
    };
    // SAFETY: an all-zero tm is valid; localtime_r only writes the tm we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return "?".into();
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The inverse of [`local_time`] (`YYYY-MM-DDTHH:MM:SS`, local time);
/// None for anything else.
pub fn parse_local_time(s: &str) -> Option<SystemTime> {
    let (date, time) = s.trim().split_once('T')?;
    let num = |v: &str| v.parse::<libc::c_int>().ok();
    let d: Vec<_> = date.split('-').map(num).collect::<Option<_>>()?;
    let t: Vec<_> = time.split(':').map(num).collect::<Option<_>>()?;
    let (&[y, mo, da], &[h, mi, se]) = (&d[..], &t[..]) else {
        return None;
    };
    // SAFETY: an all-zero tm is valid; mktime reads and normalises ours.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    (tm.tm_year, tm.tm_mon, tm.tm_mday) = (y - 1900, mo - 1, da);
    (tm.tm_hour, tm.tm_min, tm.tm_sec) = (h, mi, se);
    tm.tm_isdst = -1;
    let epoch = unsafe { libc::mktime(&mut tm) };
    (epoch != -1).then(|| from_epoch(epoch)).flatten()
}

/// A duration as schedulers show a time left: `MM:SS` never, always
/// `HH:MM:SS`, or `D-HH:MM:SS` from a day on.
pub fn duration_text(secs: u64) -> String {
    let hms = format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    );
    match secs / 86400 {
        0 => hms,
        d => format!("{d}-{hms}"),
    }
}

/// Seconds in a time left as schedulers show it: `SS`, `MM:SS`, `H:MM:SS`,
/// `D-HH:MM:SS`, `D-HH`, `D-HH:MM`. None for `UNLIMITED`, `NOT_SET`,
/// `INVALID` and garbage (numbers too big for seconds included).
pub fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    let hms = |h: u64, m: u64, ss: u64| {
        h.checked_mul(3600)?
            .checked_add(m.checked_mul(60)?)?
            .checked_add(ss)
    };
    let secs = match (s.contains('-'), parts.as_slice()) {
        (false, [ss]) => *ss,
        (false, [m, ss]) => hms(0, *m, *ss)?,
        (_, [h, m, ss]) => hms(*h, *m, *ss)?,
        (true, [h]) => hms(*h, 0, 0)?,
        (true, [h, m]) => hms(*h, *m, 0)?,
        _ => return None,
    };
    days.checked_mul(86400)?.checked_add(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left() {
        let p = parse_duration;
        assert_eq!(p("45"), Some(45));
        assert_eq!(p("1:05"), Some(65));
        assert_eq!(p("2:00:01"), Some(7201));
        assert_eq!(p("1-02:03:04"), Some(93784));
        assert_eq!(p("1-02"), Some(93600));
        assert_eq!(p("1-02:03"), Some(93780));
        assert_eq!(p("UNLIMITED"), None);
        assert_eq!(p("NOT_SET"), None);
        assert_eq!(p(""), None);
        // Numbers too big for seconds: garbage, not an overflow panic.
        assert_eq!(p("213503982334602-00"), None);
        assert_eq!(p("999999999999999999:00"), None);
        assert_eq!(p("1-5124095576030432:00:00"), None);
    }

    #[test]
    fn time_left_as_slurm_shows_it() {
        assert_eq!(duration_text(59), "00:00:59");
        assert_eq!(duration_text(3600 + 61), "01:01:01");
        assert_eq!(duration_text(86400 + 7200), "1-02:00:00");
        assert_eq!(parse_duration(&duration_text(5000)), Some(5000));
    }

    #[test]
    fn local_times_round_trip() {
        let t = parse_local_time("2026-01-01T10:00:00").unwrap();
        assert_eq!(local_time(t), "2026-01-01T10:00:00");
        for bad in ["N/A", "2026-01-01", "2026-01-01T10:00", "x-y-zTa:b:c"] {
            assert_eq!(parse_local_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_second_or_two_is_no_change() {
        let t = SystemTime::now();
        let run = |e: SystemTime| JobState::Running {
            node: "n".into(),
            ends_at: Some(e),
        };
        assert!(!run(t).differs(&run(t + Duration::from_secs(1))));
        assert!(run(t).differs(&run(t + Duration::from_secs(60))));
        assert!(run(t).differs(&JobState::Unknown { why: "x".into() }));
    }
}
