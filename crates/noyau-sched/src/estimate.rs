//! When a queued job should start, as the notebook's queue note, the hub's
//! session card and the lab extension's status bar say it: relative and
//! absolute (`start in about 4 min, 14:02`), or `start time not known yet`
//! when the scheduler gave none or one that cannot be right.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Datelike, TimeZone, Timelike};

/// An estimate this far in the past is stale, and one this far ahead is a
/// placeholder: neither is shown. Slurm's backfill puts a job it cannot
/// place at its pass's time plus 365 days, which is a little less than a
/// year from when it is read, so anything past 364 days is that. The lab
/// extension's status bar reads them the same way.
const ESTIMATE_PAST_SECS: i64 = 10 * 60;
const ESTIMATE_FUTURE_SECS: i64 = 364 * 24 * 3600;
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

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
pub fn start_estimate<Tz: TimeZone>(start: Option<SystemTime>, now: SystemTime, tz: &Tz) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            start_estimate(at(0, 14, 2), now(), utc),
            "start in about 4 min, 14:02"
        );
        assert_eq!(
            start_estimate(at(0, 16, 8), now(), utc),
            "start in about 2 h 10 min, 16:08"
        );
        assert_eq!(
            start_estimate(at(0, 15, 58), now(), utc),
            "start in about 2 h, 15:58"
        );
        assert_eq!(
            start_estimate(at(3, 9, 30), now(), utc),
            "start in about 3 days, 9 Dec 09:30"
        );
        assert_eq!(
            start_estimate(at(0, 13, 58), now(), utc),
            "start in under a minute, 13:58"
        );
        // A start just past (the scheduler has not started it yet) still reads.
        assert_eq!(
            start_estimate(at(0, 13, 55), now(), utc),
            "start in under a minute, 13:55"
        );
    }

    #[test]
    fn unknown_or_absurd_estimates_are_not_shown() {
        let utc = &chrono::Utc;
        let unknown = "start time not known yet";
        assert_eq!(start_estimate(None, now(), utc), unknown);
        // Long past, and Slurm's placeholder a year ahead.
        assert_eq!(start_estimate(at(0, 13, 0), now(), utc), unknown);
        assert_eq!(start_estimate(at(367, 0, 47), now(), utc), unknown);
        // Slurm's placeholder, a year after its last backfill pass (which
        // was a few minutes ago).
        assert_eq!(start_estimate(at(365, 13, 50), now(), utc), unknown);
        assert_eq!(start_estimate(Some(UNIX_EPOCH), now(), utc), unknown);
    }
}
