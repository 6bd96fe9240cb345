//! `noyau hub audit [--user U] [--since T]`: the hub's audit table (logins,
//! refusals, spawns, cancels, ends, …), oldest first, as a table for
//! people. The database is opened read-only, so the command may run beside
//! the hub, as root or as the hub's account.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use chrono::{Local, NaiveDate, NaiveDateTime, TimeZone};

use crate::config::HubConfig;
use crate::db::{AuditRow, Db};

/// What to print.
pub struct AuditQuery<'a> {
    pub user: Option<&'a str>,
    /// A time (`2026-12-06`, `2026-12-06 14:00`, local) or how long ago
    /// (`90m`, `12h`, `7d`).
    pub since: Option<&'a str>,
}

/// Prints the audit table of the hub configured by `config` to `out`.
pub fn print(config: &Path, q: &AuditQuery, out: &mut impl Write) -> anyhow::Result<()> {
    let since = q.since.map(parse_since).transpose()?;
    let state_dir = HubConfig::state_dir_of(config)?;
    let db = Db::open_read_only(&state_dir.join("hub.sqlite"))?;
    let rows = db
        .audit_rows(q.user, since)
        .context("reading the audit table")?;
    write_table(&rows, out)?;
    Ok(())
}

fn write_table(rows: &[AuditRow], out: &mut impl Write) -> std::io::Result<()> {
    let time = |ts: i64| {
        Local
            .timestamp_opt(ts, 0)
            .single()
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| ts.to_string())
    };
    // A column as wide as its widest value or its header.
    let width = |cell: fn(&AuditRow) -> &str, header: &str| {
        rows.iter()
            .map(|r| cell(r).len())
            .fold(header.len(), usize::max)
    };
    let user_w = width(|r| &r.user, "USER");
    let action_w = width(|r| &r.action, "ACTION");
    writeln!(
        out,
        "{:19}  {:user_w$}  {:action_w$}  DETAIL",
        "TIME", "USER", "ACTION"
    )?;
    for r in rows {
        // One event a line, whatever a detail holds.
        let detail: String = r
            .detail
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        writeln!(
            out,
            "{:19}  {:user_w$}  {:action_w$}  {detail}",
            time(r.ts),
            r.user,
            r.action
        )?;
    }
    Ok(())
}

/// `--since`: a local date or date and time, or a duration back from now.
fn parse_since(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    let ago = |n: &str, unit: i64| {
        n.parse::<i64>()
            .ok()
            .map(|n| chrono::Utc::now().timestamp() - n * unit)
    };
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let back = match unit {
        "s" => ago(num, 1),
        "m" => ago(num, 60),
        "h" => ago(num, 3600),
        "d" => ago(num, 86400),
        _ => None,
    };
    if let Some(t) = back {
        return Ok(t);
    }
    let local = |t: NaiveDateTime| {
        Local
            .from_local_datetime(&t)
            .earliest()
            .map(|t| t.timestamp())
    };
    for format in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Some(t) = NaiveDateTime::parse_from_str(s, format)
            .ok()
            .and_then(local)
        {
            return Ok(t);
        }
    }
    if let Some(t) = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .and_then(local)
    {
        return Ok(t);
    }
    bail!(
        "--since {s:?}: give a local date or time (2026-12-06, 2026-12-06 14:00) \
         or how long ago (90m, 12h, 7d)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_dates_times_and_durations() {
        let now = chrono::Utc::now().timestamp();
        assert!((parse_since("2h").unwrap() - (now - 7200)).abs() <= 2);
        assert!((parse_since("7d").unwrap() - (now - 7 * 86400)).abs() <= 2);
        let day = parse_since("2026-12-06").unwrap();
        assert_eq!(parse_since("2026-12-06 00:00").unwrap(), day);
        assert_eq!(parse_since("2026-12-06T01:30").unwrap(), day + 5400);
        for bad in ["yesterday", "12x", "2026-13-01", ""] {
            let e = parse_since(bad).unwrap_err().to_string();
            assert!(e.contains("how long ago"), "{bad}: {e}");
        }
    }

    #[test]
    fn one_event_a_line() {
        let rows = [AuditRow {
            ts: 0,
            user: "alice".into(),
            action: "login-failed".into(),
            detail: "bad\npassword".into(),
        }];
        let mut out = Vec::new();
        write_table(&rows, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .ends_with("alice  login-failed  bad password"),
            "{text}"
        );
    }
}
