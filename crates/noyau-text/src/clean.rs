//! Character-by-character cleaning: a text held to safe characters and a
//! bound, its unsafe ones escaped (for a record) or left out (for a page).

/// Whether `c` could move a terminal's cursor, change its colours, break a
/// line, reorder the text around it, or hide in it: a control character
/// (C0, DEL, C1), a line or paragraph separator (U+2028, U+2029), or a
/// format character (Unicode's general category Cf, as of Unicode 15: the
/// bidirectional marks, embeddings, overrides and isolates, where an
/// override makes `gpj.exe` read `exe.jpg`; zero-width spaces and joiners,
/// the soft hyphen, the byte order mark, invisible operators, interlinear
/// annotations, tags).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061c}'
                | '\u{06dd}'
                | '\u{070f}'
                | '\u{0890}'..='\u{0891}'
                | '\u{08e2}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{110bd}'
                | '\u{110cd}'
                | '\u{13430}'..='\u{1343f}'
                | '\u{1bca0}'..='\u{1bca3}'
                | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0001}'
                | '\u{e0020}'..='\u{e007f}'
        )
}

/// What [`clean`] makes of an unsafe character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsafe {
    /// Written as its escape (`\n`, `\u{1b}`), and `\` as `\\`: for the
    /// audit table's records, where an admin must see what was sent, and a
    /// typed backslash-n must not read as an escaped newline.
    Record,
    /// Written as its escape, `\` left as it is: for showing what
    /// [`Unsafe::Record`] made (a no-op on it), where a row recorded raw
    /// by an older hub must still not reach the terminal raw.
    Show,
    /// Left out: for what a page shows (a card's reason).
    Strip,
}

/// At most `max` characters of `s` (then `…`), as it is.
pub fn bounded(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_string(),
    }
}

/// `s` with its unsafe characters ([`is_unsafe`]) escaped or left out, and
/// at most `max` characters of it kept (then `…`, one more).
pub fn clean(s: &str, max: usize, unsafe_chars: Unsafe) -> String {
    let mut out = String::new();
    let mut kept = 0;
    for c in s.chars() {
        let bad = is_unsafe(c);
        if bad && unsafe_chars == Unsafe::Strip {
            continue;
        }
        if kept == max {
            out.push('…');
            break;
        }
        kept += 1;
        match (bad, c, unsafe_chars) {
            (true, _, _) => out.extend(c.escape_default()),
            (false, '\\', Unsafe::Record) => out.push_str("\\\\"),
            (false, _, _) => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_overrides_are_escaped_or_stripped() {
        let evil = "a\nb\r\u{1b}[31mc\u{7f}\u{85}d\u{202e}e\u{2066}f\u{2069}\u{200f}g";
        assert_eq!(clean(evil, 100, Unsafe::Strip), "ab[31mcdefg");
        let escaped = clean(evil, 100, Unsafe::Record);
        assert!(!escaped.chars().any(is_unsafe), "{escaped:?}");
        assert!(
            escaped.contains("\\u{1b}[31m") && escaped.contains("\\u{202e}e"),
            "{escaped}"
        );
        // Every override and isolate, one by one.
        for c in ('\u{202a}'..='\u{202e}').chain('\u{2066}'..='\u{2069}') {
            assert_eq!(clean(&format!("x{c}y"), 10, Unsafe::Strip), "xy", "{c:?}");
        }
        // Separators and invisible format characters, one by one.
        let hidden = [
            '\u{2028}',
            '\u{2029}',
            '\u{00ad}',
            '\u{180e}',
            '\u{feff}',
            '\u{e0001}',
        ]
        .into_iter()
        .chain('\u{200b}'..='\u{200d}')
        .chain('\u{2060}'..='\u{2064}')
        .chain('\u{206a}'..='\u{206f}')
        .chain('\u{fff9}'..='\u{fffb}')
        .chain('\u{e0020}'..='\u{e007f}');
        for c in hidden {
            assert_eq!(clean(&format!("x{c}y"), 10, Unsafe::Strip), "xy", "{c:?}");
            let escaped = clean(&format!("x{c}y"), 20, Unsafe::Record);
            assert!(
                escaped.starts_with("x\\u{") && escaped.ends_with("}y"),
                "{escaped}"
            );
        }
        assert!(
            clean("abcdef", 3, Unsafe::Record) == "abc…" && clean("abc", 3, Unsafe::Strip) == "abc"
        );
        assert_eq!(
            clean("é".repeat(5000).as_str(), 1024, Unsafe::Strip)
                .chars()
                .count(),
            1025
        );
    }

    #[test]
    fn a_record_is_unambiguous_and_showing_it_adds_nothing() {
        let typed = "a\\nb"; // a backslash and an n, as typed
        let newline = "a\nb";
        let (t, n) = (
            clean(typed, 99, Unsafe::Record),
            clean(newline, 99, Unsafe::Record),
        );
        assert_eq!((t.as_str(), n.as_str()), ("a\\\\nb", "a\\nb"));
        assert_eq!(clean(&t, 99, Unsafe::Show), t);
        assert_eq!(clean(&n, 99, Unsafe::Show), n);
        assert_eq!(clean(newline, 99, Unsafe::Show), "a\\nb");
        assert_eq!(bounded("abcdef", 3), "abc…");
        assert_eq!(bounded("é\u{1b}", 2), "é\u{1b}");
    }
}
