//! A requirement line that names a package from the index, and nothing
//! else: the part of PEP 508 that does, as an allowlist.
//!
//! ```text
//! line      = name [ "[" name { "," name } "]" ] [ specs | "(" specs ")" ] [ ";" marker ]
//! name      = [A-Za-z0-9] ( [A-Za-z0-9._-]* [A-Za-z0-9] )?, not ending in `.whl`, `.tar.xz`…
//! specs     = op version { "," op version }
//! op        = "===" | "~=" | "==" | "!=" | "<=" | ">=" | "<" | ">"
//! version   = [A-Za-z0-9.*+!_-]+
//! marker    = and { "or" and };  and = atom { "and" atom }
//! atom      = "(" marker ")" | value ( op | "in" | "not" "in" ) value
//! value     = an environment marker's name (`python_version`…) | a quoted [A-Za-z0-9 ._*+!~-]*
//! ```
//!
//! with spaces and tabs between, ASCII only. Anything else is refused: a
//! URL, a path, an archive of any extension, a pip option, a `${VAR}` (uv
//! expands variables in a requirements file), a look-alike letter, a
//! comment. Written here rather than taken from `pep508_rs`: that crate
//! parses the whole grammar (direct references, URLs, paths) and what is
//! wanted is to refuse all but this small part, which these few rules
//! state directly; and uv reads more than PEP 508 in a requirements file
//! (variables, options, continuations), which no PEP 508 parser knows.

use super::Show;

/// Why `line` is not a requirement by name, if it is not; what stopped
/// it is quoted only if `show` is [`Show::Text`] (a column otherwise).
pub(crate) fn not_by_name(line: &str, show: Show) -> Option<String> {
    // One line: uv ends a line (and a comment) at a `\n` or a bare `\r`,
    // so what follows one would be a requirement of its own, unchecked.
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Some("it holds a control character (a line break would start another line)".into());
    }
    if let Some((i, c)) = line.char_indices().find(|(_, c)| !c.is_ascii()) {
        let c = match show {
            Show::Text => format!("{c:?}"),
            Show::LineNumbers => format!("a character at column {}", i + 1),
        };
        return Some(format!(
            "it holds {c}, not ASCII: a package's name, extras and versions are ASCII (a \
             look-alike letter would name another package, or none)"
        ));
    }
    let mut c = Cursor { s: line, i: 0 };
    match c.requirement() {
        Ok(()) => None,
        Err(at) => Some(why_not(line, at, show)),
    }
}

/// What `line`, which failed to parse at byte `at`, looks like instead.
fn why_not(line: &str, at: usize, show: Show) -> String {
    let req = line.split(';').next().unwrap_or_default().trim();
    let what = if req.split_whitespace().any(|w| w.starts_with('-')) {
        "a pip option (an index, a link page, an editable or a file to read)"
    } else if line.contains('$') {
        "uv would expand the variable (`${VAR}`) it names, to a path or a URL"
    } else if req.contains("://") || req.contains('@') || req.starts_with("git+") {
        "a direct reference (a URL or a VCS checkout), built or installed as it is"
    } else if req.contains(['/', '\\', ':', '~'])
        || req.starts_with('.')
        || ARCHIVES
            .iter()
            .any(|ext| req.to_ascii_lowercase().contains(&format!(".{ext}")))
    {
        "a local path or archive, built or installed as it is"
    } else {
        "it is not a package by name from the index"
    };
    let rest: String = line[at..].chars().take(20).collect();
    let found = match show {
        _ if rest.is_empty() => "its end".to_string(),
        Show::Text => format!("{rest:?}"),
        Show::LineNumbers => "what is".to_string(),
    };
    format!(
        "{what} (only `name[extras] specifiers ; markers` is allowed, e.g. \
         `numpy[extra]>=2,<3 ; python_version >= \"3.10\"`; {found} at column {} is not)",
        at + 1
    )
}

/// The environment markers PEP 508 defines (`extra` included).
const MARKER_NAMES: [&str; 12] = [
    "python_version",
    "python_full_version",
    "os_name",
    "sys_platform",
    "platform_release",
    "platform_system",
    "platform_version",
    "platform_machine",
    "platform_python_implementation",
    "implementation_name",
    "implementation_version",
    "extra",
];

/// What uv takes a name ending in `.EXT` for: a wheel or a source
/// distribution by path (`pkg-1.0.tar.xz` is a valid name by PEP 508).
/// uv's `looks_like_archive`: `.whl`, `.zip`, `.tar.{gz,bz2,xz,zst,lz,lzma}`,
/// `.tgz`, `.tbz`, `.txz`, `.tlz`; and a bare `.tar`, `.egg`, to be safe.
const ARCHIVES: [&str; 14] = [
    "whl", "zip", "tar", "gz", "tgz", "bz2", "tbz", "xz", "txz", "zst", "lz", "lzma", "tlz", "egg",
];

/// The version comparisons, longest first (`===` before `==`).
const OPS: [&str; 8] = ["===", "~=", "==", "!=", "<=", ">=", "<", ">"];

/// A parse of one line; an error is the byte where it stopped.
struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

type Parsed<T = ()> = Result<T, usize>;

impl Cursor<'_> {
    fn rest(&self) -> &str {
        &self.s[self.i..]
    }

    fn spaces(&mut self) {
        let n = self.rest().len() - self.rest().trim_start_matches([' ', '\t']).len();
        self.i += n;
    }

    /// Takes `lit` (after spaces) if it comes next.
    fn eat(&mut self, lit: &str) -> bool {
        self.spaces();
        let ok = self.rest().starts_with(lit);
        if ok {
            self.i += lit.len();
        }
        ok
    }

    fn expect(&mut self, lit: &str) -> Parsed {
        if self.eat(lit) {
            Ok(())
        } else {
            Err(self.i)
        }
    }

    /// The longest run (after spaces) of bytes `ok` accepts; none is an error.
    fn run(&mut self, ok: impl Fn(u8) -> bool) -> Parsed<&str> {
        self.spaces();
        let start = self.i;
        let n = self.rest().bytes().take_while(|&b| ok(b)).count();
        self.i += n;
        if n == 0 {
            Err(start)
        } else {
            Ok(&self.s[start..self.i])
        }
    }

    fn requirement(&mut self) -> Parsed {
        self.name()?;
        // `[]`, or `[a, b]`.
        if self.eat("[") && !self.eat("]") {
            self.name()?;
            while self.eat(",") {
                self.name()?;
            }
            self.expect("]")?;
        }
        if self.eat("(") {
            self.specs()?;
            self.expect(")")?;
        } else if self.at_op() {
            self.specs()?;
        }
        if self.eat(";") {
            self.or()?;
        }
        self.spaces();
        if self.i == self.s.len() {
            Ok(())
        } else {
            Err(self.i)
        }
    }

    fn name(&mut self) -> Parsed {
        let start = {
            self.spaces();
            self.i
        };
        let name = self.run(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))?;
        let ends = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
        let last = name.rsplit('.').next().unwrap_or_default();
        let archive =
            name.contains('.') && ARCHIVES.iter().any(|ext| last.eq_ignore_ascii_case(ext));
        if ends(name.bytes().next()) && ends(name.bytes().last()) && !archive {
            Ok(())
        } else {
            Err(start)
        }
    }

    fn at_op(&mut self) -> bool {
        self.spaces();
        OPS.iter().any(|op| self.rest().starts_with(op))
    }

    fn op(&mut self) -> Parsed {
        self.spaces();
        match OPS.iter().find(|op| self.rest().starts_with(**op)) {
            Some(op) => {
                self.i += op.len();
                Ok(())
            }
            None => Err(self.i),
        }
    }

    fn specs(&mut self) -> Parsed {
        loop {
            self.op()?;
            self.run(|b| b.is_ascii_alphanumeric() || b".*+!_-".contains(&b))?;
            if !self.eat(",") {
                return Ok(());
            }
        }
    }

    fn or(&mut self) -> Parsed {
        self.and()?;
        while self.word("or") {
            self.and()?;
        }
        Ok(())
    }

    fn and(&mut self) -> Parsed {
        self.atom()?;
        while self.word("and") {
            self.atom()?;
        }
        Ok(())
    }

    fn atom(&mut self) -> Parsed {
        if self.eat("(") {
            self.or()?;
            return self.expect(")");
        }
        self.value()?;
        if self.word("not") {
            if !self.word("in") {
                return Err(self.i);
            }
        } else if !self.word("in") {
            self.op()?;
        }
        self.value()
    }

    /// Takes the keyword `w` (a whole word) if it comes next.
    fn word(&mut self, w: &str) -> bool {
        self.spaces();
        let after = self.rest().as_bytes().get(w.len()).copied();
        let whole = !after.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        let ok = self.rest().starts_with(w) && whole;
        if ok {
            self.i += w.len();
        }
        ok
    }

    fn value(&mut self) -> Parsed {
        self.spaces();
        let start = self.i;
        if let Some(q @ (b'"' | b'\'')) = self.rest().bytes().next() {
            self.i += 1;
            let n = self.rest().bytes().take_while(|&b| b != q).count();
            let text = &self.rest()[..n];
            let plain = |b: u8| b.is_ascii_alphanumeric() || b" ._*+!~-".contains(&b);
            if let Some(bad) = text.bytes().position(|b| !plain(b)) {
                return Err(self.i + bad);
            }
            self.i += n;
            return self.expect(if q == b'"' { "\"" } else { "'" });
        }
        let name = self.run(|b| b.is_ascii_lowercase() || b == b'_')?;
        if MARKER_NAMES.contains(&name) {
            Ok(())
        } else {
            Err(start)
        }
    }
}
