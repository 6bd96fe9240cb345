//! Text for noyau's own stderr and stdout: escape sequences parsed (by
//! vte's state machine, from anstyle-parse) and dropped whole, so that a
//! `[31m` or an OSC's payload does not stay behind as litter, and only
//! colours (SGR) may be kept, rewritten from their parsed numbers.

use anstyle_parse::{Params, Parser, Perform};

use crate::is_unsafe;

/// What [`for_terminal`] keeps of a text besides its printable characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: one line, each run of line breaks and tabs a space. For a
    /// name, a reason, a file name, a cell's first line.
    Nothing,
    /// Line breaks and tabs: for an error message quoting a file, an
    /// exception's value.
    Lines,
    /// Line breaks, tabs and colours (SGR, `ESC [ … m`): for a kernel's
    /// streams and tracebacks (ipykernel colours its tracebacks).
    Colours,
}

/// `s` as noyau may print it: every escape sequence (CSI other than a
/// kept SGR, OSC, DCS, SOS/PM/APC, a lone ESC) and every character
/// [`is_unsafe`] (C0 and C1 controls, bidi and other format characters)
/// left out, except line breaks and tabs as `keep` says.
///
/// A carriage return becomes a line break (`\r\n` one break): kept, it
/// could return to the start of a line the kernel wrote and leave the
/// cursor there, so that noyau's next line is printed over it with the
/// kernel's text still showing after it. A progress bar that redraws its
/// line with `\r` (tqdm) shows as one line per redraw.
pub fn for_terminal(s: &str, keep: Keep) -> String {
    let mut out = Out {
        keep,
        text: String::with_capacity(s.len()),
        after_cr: false,
    };
    let mut parser: Parser = Parser::default();
    for b in s.bytes() {
        parser.advance(&mut out, b);
    }
    out.text
}

struct Out {
    keep: Keep,
    text: String,
    /// The last thing seen was a `\r` (made a break): a `\n` right after
    /// it is the same break.
    after_cr: bool,
}

impl Out {
    fn push(&mut self, c: char) {
        self.after_cr = false;
        self.text.push(c);
    }

    /// A line break (`\n`, `\r`, VT, FF, NEL, U+2028, U+2029) or a tab.
    fn space(&mut self, c: char) {
        match self.keep {
            Keep::Nothing if self.text.ends_with(' ') => self.after_cr = false,
            Keep::Nothing => self.push(' '),
            _ => self.push(c),
        }
    }

    fn line_break(&mut self, cr: bool) {
        // `\r\n` is one break, made at the `\r`.
        if cr || !self.after_cr {
            self.space('\n');
        }
        self.after_cr = cr;
    }
}

impl Perform for Out {
    fn print(&mut self, c: char) {
        match c {
            '\u{85}' | '\u{2028}' | '\u{2029}' => self.line_break(false),
            c if is_unsafe(c) => {}
            c => self.push(c),
        }
    }

    fn execute(&mut self, byte: u8) {
        match byte {
            b'\n' | 0x0b | 0x0c => self.line_break(false),
            b'\r' => self.line_break(true),
            b'\t' => self.space('\t'),
            _ => {}
        }
    }

    fn csi_dispatch(&mut self, params: &Params, intermediates: &[u8], ignore: bool, action: u8) {
        // A private marker (`ESC [ > 4 m`, xterm's key modes) is collected
        // as an intermediate: not a colour.
        if self.keep != Keep::Colours || action != b'm' || ignore || !intermediates.is_empty() {
            return;
        }
        let numbers: Vec<String> = params
            .iter()
            .map(|p| p.iter().map(u16::to_string).collect::<Vec<_>>().join(":"))
            .collect();
        self.text.push_str("\u{1b}[");
        self.text.push_str(&numbers.join(";"));
        self.text.push('m');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Keep; 3] = [Keep::Nothing, Keep::Lines, Keep::Colours];

    fn no_escape(s: &str) -> bool {
        !s.chars().any(|c| is_unsafe(c) && c != '\n' && c != '\t')
    }

    #[test]
    fn osc_52_and_osc_8_are_dropped_whole() {
        // The clipboard write, ended by BEL and by ST.
        for end in ["\u{7}", "\u{1b}\\"] {
            let evil = format!("a\u{1b}]52;c;Y3VybCBldmlsfHNoCg=={end}b");
            for keep in ALL {
                assert_eq!(for_terminal(&evil, keep), "ab", "{keep:?} {evil:?}");
            }
        }
        // A link whose text is kept, its target gone.
        let link = "\u{1b}]8;;https://evil/\u{1b}\\click\u{1b}]8;;\u{1b}\\";
        assert_eq!(for_terminal(link, Keep::Colours), "click");
        // The window title, a DCS, an APC, and a sequence left open at the
        // end: nothing of them is printed.
        let more = "x\u{1b}]0;title\u{7}y\u{1b}P1$r\u{1b}\\z\u{1b}_apc\u{1b}\\w\u{1b}]52;c;AAA";
        assert_eq!(for_terminal(more, Keep::Colours), "xyzw");
    }

    #[test]
    fn cursor_moves_and_erasures_are_dropped_colours_kept_only_when_asked() {
        let evil =
            "ok\u{1b}[1A\u{1b}[2K\u{1b}[10;5H\u{1b}[?25l\u{1b}7\u{1b}c\u{1b}[31mred\u{1b}[0m";
        assert_eq!(
            for_terminal(evil, Keep::Colours),
            "ok\u{1b}[31mred\u{1b}[0m"
        );
        assert_eq!(for_terminal(evil, Keep::Lines), "okred");
        assert_eq!(for_terminal(evil, Keep::Nothing), "okred");
        // ipykernel's colours, with several numbers and 256-colour and
        // true-colour forms, come out as they went in.
        let tb =
            "\u{1b}[0;31mValueError\u{1b}[0m: \u{1b}[38;5;208mx\u{1b}[38:2:0:1:2:3my\u{1b}[39m";
        assert_eq!(for_terminal(tb, Keep::Colours), tb);
        // xterm's key modes look like SGR with a private marker: dropped.
        assert_eq!(for_terminal("\u{1b}[>4;2mk", Keep::Colours), "k");
    }

    #[test]
    fn c1_controls_bidi_and_invisible_characters_are_dropped() {
        // C1 CSI (U+009B) and OSC (U+009D) as UTF-8, which some terminals
        // act on; a bidi override and isolate; zero-width and tag
        // characters; DEL and BEL.
        let evil = "a\u{9b}31m\u{9d}b\u{202e}c\u{2066}d\u{2069}\u{200b}e\u{200d}\u{feff}f\u{e0041}g\u{7f}\u{7}h";
        for keep in ALL {
            let out = for_terminal(evil, keep);
            assert!(no_escape(&out), "{keep:?} {out:?}");
            assert!(
                !out.contains('\u{202e}') && out.ends_with("cdefgh"),
                "{out:?}"
            );
        }
    }

    #[test]
    fn line_breaks_tabs_and_carriage_returns() {
        let s = "a\tb\nc\r\nd\re\r\r\nf\u{2028}g\u{85}h";
        assert_eq!(for_terminal(s, Keep::Colours), "a\tb\nc\nd\ne\n\nf\ng\nh");
        assert_eq!(for_terminal(s, Keep::Lines), "a\tb\nc\nd\ne\n\nf\ng\nh");
        assert_eq!(for_terminal(s, Keep::Nothing), "a b c d e f g h");
        // Non-ASCII text passes as it is.
        let t = "héllo wörld 日本 🙂";
        assert_eq!(for_terminal(t, Keep::Nothing), t);
    }
}
