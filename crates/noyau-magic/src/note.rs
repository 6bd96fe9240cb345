//! Notes about jobs that wait in the queue: one line from the scheduler's
//! state ([`describe`]), shown as a display in a cell and updated in place
//! ([`Note`]) as the reason or the estimated start changes. A queued
//! kernel, a queued target and a Dask cluster's waiting jobs all say why
//! they wait this way.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Datelike, Local, TimeZone, Timelike};
use noyau_sched::JobState;

use crate::Output;

/// An estimate this far in the past is stale, and one this far ahead is a
/// placeholder (Slurm puts a year ahead when it cannot estimate): neither
/// is shown. The lab extension's status bar reads them the same way.
const ESTIMATE_PAST_SECS: i64 = 10 * 60;
const ESTIMATE_FUTURE_SECS: i64 = 366 * 24 * 3600;
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `1m05s`, `42s`.
pub fn waited(secs: u64) -> String {
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

/// `queued on slurm job 42 (partition batch): reason Resources, estimated
/// start …`, the part of a note that names one job; None once it runs.
pub fn job_wait(backend: &str, job: &str, state: &JobState) -> Option<String> {
    match state {
        JobState::Pending {
            reason,
            start,
            partition,
        } => {
            let part = partition
                .as_deref()
                .map(|p| format!(" (partition {p})"))
                .unwrap_or_default();
            let start = format!(", {}", estimate(*start, SystemTime::now(), &Local));
            Some(format!(
                "queued on {backend} job {job}{part}: reason {reason}{start}"
            ))
        }
        JobState::Unknown { why } => Some(format!(
            "{backend} job {job} is queued or starting, but the scheduler does not answer ({why})"
        )),
        JobState::Running { .. } | JobState::Ended(_) => None,
    }
}

/// A rough span: `4 min`, `2 h 10 min`, `3 days`.
fn about(secs: i64) -> String {
    let min = (secs + 30) / 60;
    match min {
        ..60 => format!("{} min", min.max(1)),
        60..2880 => match (min / 60, min % 60) {
            (h, 0) => format!("{h} h"),
            (h, m) => format!("{h} h {m} min"),
        },
        _ => format!("{} days", (min + 720) / 1440),
    }
}

/// When a queued job should start, in `tz`: `start in about 4 min, 14:02`
/// (the day named when it is not today), or `start time not known yet`
/// when the scheduler gave none or one that cannot be right.
pub fn estimate<Tz: TimeZone>(start: Option<SystemTime>, now: SystemTime, tz: &Tz) -> String {
    let secs = |t: SystemTime| match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let unknown = "start time not known yet".to_string();
    let Some(start) = start else { return unknown };
    let ahead = secs(start).saturating_sub(secs(now));
    if !(-ESTIMATE_PAST_SECS..=ESTIMATE_FUTURE_SECS).contains(&ahead) {
        return unknown;
    }
    let (at, today): (DateTime<Tz>, DateTime<Tz>) = (
        DateTime::<chrono::Utc>::from(start).with_timezone(tz),
        DateTime::<chrono::Utc>::from(now).with_timezone(tz),
    );
    let clock = format!("{:02}:{:02}", at.hour(), at.minute());
    let when = if at.date_naive() == today.date_naive() {
        clock
    } else {
        format!("{} {} {clock}", at.day(), MONTHS[at.month0() as usize])
    };
    if ahead < 60 {
        format!("start in under a minute, {when}")
    } else {
        format!("start in about {}, {when}", about(ahead))
    }
}

/// The line the notebook shows while a kernel's job waits; None once it runs.
pub fn describe(backend: &str, job: &str, state: &JobState, waited_secs: u64) -> Option<String> {
    let wait = job_wait(backend, job, state)?;
    let waited = waited(waited_secs);
    Some(match state {
        JobState::Unknown { .. } => format!("noyau: {wait}; still waiting ({waited})."),
        _ => format!(
            "noyau: {wait}; waiting for {waited}. \
             Cells run when the job starts; interrupt or shut down the kernel to cancel the job."
        ),
    })
}

/// A note's display: a fresh `display_data`, then `update_display_data`s.
#[derive(Debug, Clone)]
pub struct Note {
    pub display_id: String,
    /// The display was sent (a later text is an update).
    pub shown: bool,
    pub last: String,
}

impl Default for Note {
    fn default() -> Self {
        Note::new()
    }
}

impl Note {
    pub fn new() -> Self {
        Note {
            display_id: format!("noyau-queue-{}", uuid::Uuid::new_v4()),
            shown: false,
            last: String::new(),
        }
    }

    /// The output that shows `text`, or None when it is unchanged.
    pub fn update(&mut self, text: &str) -> Option<Output> {
        if self.shown && self.last == text {
            return None;
        }
        let out = if self.shown {
            Output::update(&self.display_id, text)
        } else {
            Output::display(&self.display_id, text)
        };
        self.shown = true;
        self.last = text.to_string();
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_the_queue() {
        let s = JobState::Pending {
            reason: "Resources".into(),
            start: None,
            partition: Some("batch".into()),
        };
        let t = describe("slurm", "42", &s, 75).unwrap();
        assert!(
            t.contains("queued on slurm job 42 (partition batch): reason Resources, start time not known yet; waiting for 1m15s"),
            "{t}"
        );
        // The counter is the one given: each update shows the time waited so far.
        assert!(describe("slurm", "42", &s, 85)
            .unwrap()
            .contains("waiting for 1m25s"));
        let running = JobState::Running {
            node: "n".into(),
            ends_at: None,
        };
        assert!(describe("slurm", "42", &running, 1).is_none());
        let unknown = JobState::Unknown { why: "x".into() };
        assert_eq!(
            describe("slurm", "42", &unknown, 3).unwrap(),
            "noyau: slurm job 42 is queued or starting, but the scheduler does not answer (x); still waiting (3s)."
        );
    }

    /// 2026-12-06 13:58:00 UTC, and `h:m` (+ `days`) after it.
    fn now() -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(1_796_565_480)
    }
    fn at(days: u64, h: u64, m: u64) -> Option<SystemTime> {
        let midnight = 1_796_565_480 - (13 * 3600 + 58 * 60);
        Some(
            UNIX_EPOCH
                + std::time::Duration::from_secs(midnight + days * 86400 + h * 3600 + m * 60),
        )
    }

    #[test]
    fn estimates_read_relative_and_absolute() {
        let utc = &chrono::Utc;
        assert_eq!(
            estimate(at(0, 14, 2), now(), utc),
            "start in about 4 min, 14:02"
        );
        assert_eq!(
            estimate(at(0, 16, 8), now(), utc),
            "start in about 2 h 10 min, 16:08"
        );
        assert_eq!(
            estimate(at(0, 15, 58), now(), utc),
            "start in about 2 h, 15:58"
        );
        assert_eq!(
            estimate(at(3, 9, 30), now(), utc),
            "start in about 3 days, 9 Dec 09:30"
        );
        assert_eq!(
            estimate(at(0, 13, 58), now(), utc),
            "start in under a minute, 13:58"
        );
        // A start just past (the scheduler has not started it yet) still reads.
        assert_eq!(
            estimate(at(0, 13, 55), now(), utc),
            "start in under a minute, 13:55"
        );
    }

    #[test]
    fn unknown_or_absurd_estimates_are_not_shown() {
        let utc = &chrono::Utc;
        let unknown = "start time not known yet";
        assert_eq!(estimate(None, now(), utc), unknown);
        // Long past, and Slurm's placeholder a year ahead.
        assert_eq!(estimate(at(0, 13, 0), now(), utc), unknown);
        assert_eq!(estimate(at(367, 0, 47), now(), utc), unknown);
        assert_eq!(estimate(Some(UNIX_EPOCH), now(), utc), unknown);
    }

    #[test]
    fn note_shows_then_updates() {
        let mut n = Note::new();
        assert_eq!(n.update("a").unwrap().msg_type, "display_data");
        assert!(n.update("a").is_none());
        let out = n.update("b").unwrap();
        assert_eq!(out.msg_type, "update_display_data");
        assert_eq!(
            out.content["transient"]["display_id"],
            n.display_id.as_str()
        );
    }
}
