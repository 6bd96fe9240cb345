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

/// The user column of an event with no valid user name (a login form's
/// garbage): never a name useradd accepts, so no `--user` selects it.
pub const NO_USER: &str = "(invalid)";

/// `s` as the audit table records it: at most `max` characters, controls
/// and bidirectional overrides escaped (`\n`, `\u{1b}`) and `\` as `\\`,
/// so that no cell moves a terminal's cursor, recolours it or reorders the
/// text, and a typed `\n` does not read as a newline. The one place text
/// is escaped for the audit table ([`crate::db::Db::audit`]).
pub fn recorded(s: &str, max: usize) -> String {
    crate::text::clean(s, max, crate::text::Unsafe::Record)
}

/// A recorded cell as `noyau hub audit` prints it: as recorded (escaping
/// again would double every backslash), at most `max` characters; a row
/// an older hub recorded raw has its unsafe characters escaped all the
/// same.
pub fn shown(s: &str, max: usize) -> String {
    crate::text::clean(s, max, crate::text::Unsafe::Show)
}

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

/// The widest user or action cell (a user name is at most 32 bytes).
const CELL_MAX: usize = 32;
/// The longest detail printed.
const DETAIL_MAX: usize = 1000;

fn write_table(rows: &[AuditRow], out: &mut impl Write) -> std::io::Result<()> {
    let time = |ts: i64| {
        Local
            .timestamp_opt(ts, 0)
            .single()
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| ts.to_string())
    };
    // Every cell escaped; the padded ones bounded, so that one long value
    // (older hubs recorded a login form's name raw) does not pad every line.
    let rows: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            [
                time(r.ts),
                shown(&r.user, CELL_MAX),
                shown(&r.action, CELL_MAX),
                shown(&r.detail, DETAIL_MAX),
            ]
        })
        .collect();
    let width = |i: usize, header: &str| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .fold(header.len(), usize::max)
    };
    let (user_w, action_w) = (width(1, "USER"), width(2, "ACTION"));
    writeln!(
        out,
        "{:19}  {:user_w$}  {:action_w$}  DETAIL",
        "TIME", "USER", "ACTION"
    )?;
    for [time, user, action, detail] in &rows {
        writeln!(
            out,
            "{time:19}  {user:user_w$}  {action:action_w$}  {detail}"
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
                .ends_with("alice  login-failed  bad\\npassword"),
            "{text}"
        );
    }

    #[test]
    fn no_cell_reaches_the_terminal_raw_nor_pads_every_line() {
        let evil = format!(
            "\u{1b}]0;owned\u{7}\u{1b}[2J\u{202e}{}",
            "x".repeat(100_000)
        );
        let rows = [
            AuditRow {
                ts: 0,
                user: evil.clone(),
                action: "login-failed\u{1b}[31m".into(),
                detail: evil.clone(),
            },
            AuditRow {
                ts: 0,
                user: "alice".into(),
                action: "login".into(),
                detail: "pam".into(),
            },
        ];
        let mut out = Vec::new();
        write_table(&rows, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text
                .chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
            "{text:?}"
        );
        assert!(text.contains("\\u{1b}]0;owned\\u{7}"), "{text}");
        assert_eq!(text.lines().count(), 3);
        assert!(
            text.lines().all(|l| l.chars().count() < 1200),
            "{}",
            text.len()
        );
        assert!(shown("abcdef", 3) == "abc…" && shown("abc", 3) == "abc");
    }

    #[test]
    fn a_backslash_and_a_newline_are_recorded_apart_and_shown_once_escaped() {
        let db = Db::open(Path::new(":memory:")).unwrap();
        // A name with a typed backslash-n, a reason with a real newline.
        db.audit("a\\nb", "login-failed", "ended:\nbye \\ 1");
        db.audit("a\nb", "login-failed", "ended:\\nbye");
        let rows = db.audit_rows(None, None).unwrap();
        let stored: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.user.as_str(), r.detail.as_str()))
            .collect();
        assert_eq!(
            stored,
            [
                ("a\\\\nb", "ended:\\nbye \\\\ 1"),
                ("a\\nb", "ended:\\\\nbye"),
            ]
        );
        let mut out = Vec::new();
        write_table(&rows, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[1].ends_with("  a\\\\nb  login-failed  ended:\\nbye \\\\ 1")
                && lines[2].ends_with("  a\\nb   login-failed  ended:\\\\nbye"),
            "{text}"
        );
    }
}
