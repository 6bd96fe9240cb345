//! What a project or a notebook may not declare unless the user trusts it:
//! the keys whose value names code that runs while the environment is
//! prepared, on the submitting host, outside any sandbox (`isolation =
//! "container"` wraps the kernel, not its preparation).
//!
//! A notebook or a project comes from anyone (sent by mail, `git clone`d,
//! left in a shared directory), and opening its notebook in JupyterLab
//! prepares its environment before any cell runs. So what the notebook's
//! metadata, its `%noyau env` cells and the project's `noyau.toml`
//! `[environment]` declare is checked against [`names_code`]; when one of
//! them names code and the user's own `trusted_projects` does not trust
//! the project's directory (noyau-config's `TrustedProjects::code`: the site's
//! entries only let its noyau.toml be read), the environment is
//! refused with [`EnvError::UntrustedCode`], never silently changed. The
//! user's own sources (`--env`, `NOYAU_ENV`) are not checked.
//!
//! Requirements by name (`numpy==2.1`) are allowed from anyone, but only
//! as wheels ([`crate::EnvSpec::wheels_only`]): uv builds a source
//! distribution by running its build backend.

use serde_json::Value;

mod requirement;

/// Why `key = value` (as a source writes it, paths made absolute) names
/// code that runs while the environment is prepared, or None when it does
/// not. `lock` is checked line by line ([`lock_names_code`]); a
/// `lock_file` is checked once it is read, as `lock`.
///
/// * `python` that is not a version: `uv venv --python X` runs the
///   interpreter X names, by path or found on PATH (a version such as
///   `3.11` or `python3.12` is found by uv among the user's own
///   interpreters);
/// * `module_use`, `modules_init`: the modules check sources the init
///   file and runs the modulefiles it finds;
/// * a module named by a path (`/x/mf`, `./mf`, `a/../../mf`): Lmod and
///   Environment Modules load a modulefile by path;
/// * `channels`, `manifest`: Scheme the guix client evaluates;
/// * a requirement that is not a package by name from the index (an
///   allowlist, [`requirement_names_code`]): a URL, a path, an archive, a
///   pip option (`-e`, `-i`, `--find-links`, `-r`…), a `${VAR}`…
///
/// `prefix` is not here: preparing a prefix reads its files and runs
/// nothing. But the sandbox shows it, so it is in [`loosens_sandbox`].
///
/// `show` says whether the offending value is quoted: not one read from a
/// file, which may be a file of the user's a notebook named.
pub fn names_code(key: &str, value: &Value, show: Show) -> Option<String> {
    let quoted = |v: &str| match show {
        Show::Text => format!("{v:?}"),
        Show::LineNumbers => "one (not shown: it was read from a file)".to_string(),
    };
    let strings = || -> Vec<&str> {
        match value {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    };
    match key {
        "python" => strings().into_iter().find(|p| !version_shaped(p)).map(|p| {
            format!(
                "{} is not a Python version (`3.12`, `python3.12`, `cpython@3.12`, \
                     `pypy3.10`): `uv venv --python` runs the interpreter it names, found by \
                     path or on PATH",
                quoted(p)
            )
        }),
        "module_use" => Some("the modulefiles in those directories are run".into()),
        "modules_init" => Some("that shell file is sourced".into()),
        "modules" => strings()
            .into_iter()
            .find(|m| module_by_path(m))
            .map(|m| format!("module {} is a modulefile by path, which is run", quoted(m))),
        "channels" | "manifest" => Some("guix evaluates that Scheme file".into()),
        "requirements" => strings().into_iter().find_map(|r| {
            requirement_names_code(r, show).map(|why| format!("{}: {why}", quoted(r)))
        }),
        "lock" => value.as_str().and_then(|l| lock_names_code(l, show)),
        _ => None,
    }
}

/// How a refusal points at what it refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// Quoted: a value the notebook or the project wrote inline (a cell's
    /// words, metadata, noyau.toml), already visible to its writer.
    Text,
    /// Not quoted: a lock line by its number, a value as "one". For what
    /// noyau read from a file a source named, which may be one of the
    /// user's that a notebook named (`~/.git-credentials`): its text must
    /// not reach the cell's output or the log.
    LineNumbers,
}

/// What a refused key would do, for [`crate::EnvError::UntrustedCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Risk {
    /// [`names_code`]
    RunsCode,
    /// [`loosens_sandbox`]
    Loosens,
}

impl std::fmt::Display for Risk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Risk::RunsCode => {
                "That code would run while the environment is prepared, outside the sandbox"
            }
            Risk::Loosens => "That loosens the sandbox the kernel runs in",
        })
    }
}

/// Why `key = value` from a project's noyau.toml (or, for `prefix`, its
/// notebook) loosens the sandbox of `isolation = "container"`, or None
/// when it does not: a cloned project may tighten it (`isolation = "container"`, `network = false`), not
/// show the user's files, make them writable, open the network or switch
/// the sandbox off. (A notebook's metadata never sets these keys, nor a
/// cell: [`crate::sources::SANDBOX_KEYS`].)
pub fn loosens_sandbox(key: &str, value: &Value) -> Option<&'static str> {
    match (key, value) {
        ("isolation", Value::String(s)) if s == "none" => Some("the kernel would run unsandboxed"),
        ("network", Value::Bool(true)) => Some("the kernel would reach the network"),
        ("scratch", Value::String(_)) => Some("that directory would be writable in the sandbox"),
        ("ro_bind", Value::Array(a)) if !a.is_empty() => {
            Some("those paths would be shown in the sandbox")
        }
        // Any source may name one (metadata, a cell): the sandbox shows
        // it read-only, and the interpreter its pyvenv.cfg names.
        ("prefix", Value::String(_)) => Some(
            "the sandbox would show that directory, and the interpreter its pyvenv.cfg names \
             (a home, `/home`), to the notebook's code",
        ),
        _ => None,
    }
}

/// A Python request that names a version, which uv finds among the
/// user's own interpreters: `3`, `3.12`, `3.12.1`, `3.13t`, optionally
/// after `python`, `cpython`, `pypy` or `graalpy` (with `@` or `-` between
/// for the last three). Anything else (`pyx`, `.venv`, a path) is a name
/// uv resolves in its directory or on PATH.
fn version_shaped(p: &str) -> bool {
    let rest = ["cpython", "pypy", "graalpy", "python"]
        .iter()
        .find_map(|impl_| {
            let r = p.strip_prefix(impl_)?;
            Some(match r.strip_prefix(['@', '-']) {
                Some(v) if *impl_ != "python" => v,
                _ => r,
            })
        })
        .unwrap_or(p);
    let version = rest.strip_suffix('t').unwrap_or(rest);
    let parts: Vec<&str> = version.split('.').collect();
    parts.len() <= 3
        && parts
            .iter()
            .all(|n| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A module name the tool would take as a path.
fn module_by_path(m: &str) -> bool {
    let m = m.trim();
    m.starts_with('/') || m.starts_with('.') || m.starts_with('~') || m.contains("..")
}

/// Why a requirement line is not a plain name from the index, if it is
/// not: an allowlist ([`requirement`]). What in the line stopped it is
/// quoted only as `show` says.
pub fn requirement_names_code(line: &str, show: Show) -> Option<String> {
    requirement::not_by_name(line, show)
}

/// Why a lock (`uv pip compile --generate-hashes` output) names code, if
/// it does: each requirement (continuation lines joined, comments removed)
/// must be a plain name whose only options are `--hash`. The line is
/// pointed at as `show` says.
pub fn lock_names_code(lock: &str, show: Show) -> Option<String> {
    let at = |number: usize, text: &str| match show {
        Show::Text => format!("lock line {text:?}"),
        Show::LineNumbers => format!("lock line {number}"),
    };
    // Lines end at `\n` or `\r\n` only: a bare `\r` ends one for uv (and
    // its comment with it), not for `str::lines`.
    let lock = lock.replace("\r\n", "\n");
    let lines = || lock.lines().enumerate().map(|(i, l)| (i + 1, l));
    if let Some((n, l)) = lines().find(|(_, l)| l.chars().any(|c| c.is_control() && c != '\t')) {
        return Some(format!(
            "{} holds a control character (a bare carriage return starts another line)",
            at(n, l)
        ));
    }
    // A requirement and the line it starts on, continuation lines joined,
    // read one line at a time as uv reads them: a comment ends at the end
    // of its line, backslash or not, so its comment is cut from each line
    // before a `\` at its end is taken to continue it.
    let mut logical: Vec<(usize, String)> = Vec::new();
    let mut open = false;
    for (n, l) in lines() {
        let (code, comment) = split_comment(l);
        if comment.is_some_and(|c| c.ends_with('\\')) {
            // pip joins such a line with the next (into the comment), uv
            // does not: which the next line is, is not clear.
            return Some(format!(
                "{} has a comment that ends in a backslash: uv ends a comment at its line's end, \
                 so the next line would not be a continuation (remove the backslash)",
                at(n, l)
            ));
        }
        let (text, continued) = match code.strip_suffix('\\') {
            Some(head) => (head, true),
            None => (code, false),
        };
        match logical.last_mut() {
            Some((_, joined)) if open => {
                joined.push(' ');
                joined.push_str(text);
            }
            _ => logical.push((n, text.to_string())),
        }
        open = continued;
    }
    for (n, line) in &logical {
        let line = line.as_str();
        // (Before the words are split: Unicode spaces would split them.)
        if let Some(c) = line.chars().find(|c| !c.is_ascii()) {
            let c = match show {
                Show::Text => format!("{c:?}"),
                Show::LineNumbers => "a character".into(),
            };
            return Some(format!(
                "{} holds {c}, not ASCII: a lock's requirements and hashes are ASCII",
                at(*n, line)
            ));
        }
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        let rest: Vec<&str> = words.collect();
        // `name==1.0 --hash=sha256:…`; markers (`; python_version < "3.12"`)
        // may hold spaces: only the words from the first option on are options.
        let options_from = rest.iter().position(|w| w.starts_with('-'));
        let (req_words, options) = match options_from {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (&rest[..], &[][..]),
        };
        let req = std::iter::once(first)
            .chain(req_words.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        if let Some(why) = requirement_names_code(&req, show) {
            return Some(format!("{}: {why}", at(*n, &req)));
        }
        let mut options = options.iter();
        while let Some(&o) = options.next() {
            let hash = match o {
                "--hash" => options.next().copied().unwrap_or_default(),
                o => o.strip_prefix("--hash=").unwrap_or(o),
            };
            if !sha256(hash) {
                let option = match show {
                    Show::Text => format!("the option {o:?}"),
                    Show::LineNumbers => "an option that is not --hash=sha256:HEX".into(),
                };
                return Some(format!(
                    "{} has {option}: only --hash=sha256:HEX is allowed",
                    at(*n, &req)
                ));
            }
        }
    }
    None
}

/// `line` and its comment, if it has one: from a `#` first on the line or
/// after a space or a tab, to the end of the line (uv's requirements.txt
/// rule).
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let b = line.as_bytes();
    let start =
        (0..b.len()).find(|&i| b[i] == b'#' && (i == 0 || b[i - 1] == b' ' || b[i - 1] == b'\t'));
    match start {
        Some(i) => (&line[..i], Some(&line[i..])),
        None => (line, None),
    }
}

/// `sha256:` and hexadecimal digits: what `--hash` may say.
fn sha256(h: &str) -> bool {
    h.strip_prefix("sha256:")
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_code_naming_key_is_named() {
        for (key, value) in [
            ("python", json!("/home/attacker/bin/python")),
            ("python", json!("./python")),
            ("python", json!("pyx")),
            ("python", json!(".venv")),
            ("python", json!("python")),
            ("python", json!("cpython")),
            ("python", json!("3.12/x")),
            ("python", json!("python-3.12")),
            ("python", json!("3..12")),
            ("python", json!(">=3.11")),
            ("module_use", json!(["/home/attacker/mf"])),
            ("modules_init", json!("/home/attacker/init.sh")),
            ("modules", json!(["gcc/12", "/home/x/mf"])),
            ("modules", json!(["./mf"])),
            ("modules", json!(["gcc/../../../home/x/mf"])),
            ("modules", json!(["~/mf"])),
            ("channels", json!("/p/channels.scm")),
            ("manifest", json!("/p/manifest.scm")),
        ] {
            assert!(
                names_code(key, &value, Show::Text).is_some(),
                "{key} = {value}"
            );
        }
        for (key, value) in [
            ("python", json!("3.11")),
            ("python", json!("python3.12")),
            ("python", json!("cpython@3.12")),
            ("python", json!("3")),
            ("python", json!("3.12.1")),
            ("python", json!("3.13t")),
            ("python", json!("python3")),
            ("python", json!("cpython-3.12")),
            ("python", json!("pypy3.10")),
            ("python", json!("pypy@3.10")),
            ("python", json!("graalpy-24.1")),
            ("modules", json!(["gcc/12", "cuda/12.4", "py-numpy/1.26.4-x"])),
            ("prefix", json!("/home/someone/venv")),
            ("packages", json!(["python", "python-numpy"])),
            ("image", json!("/p/img.sif")),
            ("isolation", json!("none")),
            ("requirements", json!(["six==1.16.0", "numpy>=2; python_version >= \"3.10\""])),
            ("lock", json!("six==1.16.0 \\\n    --hash=sha256:1e61c374 \\\n    --hash sha256:8abb2f1d\n    # via -r requirements.in\n")),
        ] {
            assert_eq!(names_code(key, &value, Show::Text), None, "{key} = {value}");
        }
    }

    #[test]
    fn requirements_that_are_not_names_from_the_index() {
        for r in [
            "pkg @ https://evil.example/pkg.whl",
            "pkg@file:///home/x/pkg",
            "git+https://github.com/x/y",
            "https://evil.example/pkg-1.0.tar.gz",
            "./local/pkg",
            "/home/x/pkg",
            "../pkg",
            "~/pkg",
            "pkg-1.0.tar.gz",
            "pkg-1.0-py3-none-any.whl",
            "-e .",
            "-e git+https://x/y",
            "--index-url https://evil.example/simple",
            "-i https://evil.example/simple",
            "--extra-index-url=https://evil.example/simple",
            "--find-links /home/x/wheels",
            "-f https://evil.example/links",
            "-r other.txt",
            "C:\\pkg",
        ] {
            assert!(requirement_names_code(r, Show::Text).is_some(), "{r}");
            assert!(
                names_code("requirements", &json!([r]), Show::Text).is_some(),
                "{r}"
            );
            assert!(
                lock_names_code(&format!("{r}\n"), Show::Text).is_some(),
                "lock {r}"
            );
        }
        for r in [
            "six",
            "six==1.16.0",
            "Foo_Bar[extra1,extra2]>=1.0,<2",
            "x ; sys_platform == 'linux'",
        ] {
            assert_eq!(requirement_names_code(r, Show::Text), None, "{r}");
        }
    }

    /// A line break in a requirement, or a bare carriage return in a lock
    /// (ending its comment for uv), would start a line that is not checked.
    #[test]
    fn control_characters_and_markers_cannot_hide_a_line() {
        let req = "six ; python_version>'0'\nevil @ https://e/x-1.0-py3-none-any.whl";
        assert!(requirement_names_code(req, Show::Text).is_some(), "{req}");
        assert!(
            names_code("requirements", &json!([req]), Show::Text).is_some(),
            "{req}"
        );
        let lock = "six==1.16.0 --hash=sha256:ab # x\revil @ https://e/x-1.0-py3-none-any.whl --hash=sha256:cd\n";
        assert!(lock_names_code(lock, Show::Text).is_some(), "{lock}");
        for marker in [
            "six ; python_version > '0' # evil @ https://e/x.whl",
            "six ; sys_platform == 'linux' --index-url=https://e/simple",
            "six ; extra == 'a/b'",
        ] {
            assert!(
                requirement_names_code(marker, Show::Text).is_some(),
                "{marker}"
            );
        }
        // A lock with CRLF line ends, tabs, and markers, is fine.
        let lock = "six==1.16.0 ; python_version >= \"3.8\" and platform_machine != 'x86_64' \\\r\n\t--hash=sha256:ab\r\n";
        assert_eq!(lock_names_code(lock, Show::Text), None);
    }

    /// Requirement lines are held to an allowlist (a package by name from
    /// the index): what a blocklist of URLs, paths and options let through
    /// is refused, with a reason.
    #[test]
    fn only_a_requirement_by_name_is_allowed() {
        for (r, why) in [
            // An archive by path, whatever its extension (a valid name by
            // PEP 508, but uv installs it as a file).
            ("pkg-1.0.tar.xz", "archive"),
            ("pkg-1.0.tar.zst", "archive"),
            ("pkg-1.0.tar.lz", "archive"),
            ("pkg-1.0.tar.lzma", "archive"),
            ("pkg-1.0.tar.bz2", "archive"),
            ("pkg-1.0.tar.gz", "archive"),
            ("pkg-1.0.tbz", "archive"),
            ("pkg-1.0.tlz", "archive"),
            ("pkg-1.0.tgz", "archive"),
            ("pkg-1.0.zip", "archive"),
            ("pkg-1.0-py3-none-any.whl", "archive"),
            ("pkg-1.0.TXZ", "archive"),
            ("pkg-1.0.egg", "archive"),
            // uv expands variables in a requirements file.
            ("${HOME}/x", "expand the variable"),
            ("pkg @ ${URL}", "expand the variable"),
            ("six==${V}", "expand the variable"),
            ("$PKG", "expand the variable"),
            ("six ; python_version > \"${X}\"", "expand the variable"),
            // Markers: names, operators, quoted versions only.
            (
                "pkg==1.0 ; extra == \"x\" and os_name == \"$(id)\"",
                "expand the variable",
            ),
            ("six ; os_name == 'a#b'", "not a package by name"),
            ("six ; evil == '1'", "not a package by name"),
            ("six ; python_version", "not a package by name"),
            ("six ; (python_version > '3'", "not a package by name"),
            ("six ; python_version > '3' or", "not a package by name"),
            // Extras and versions.
            ("pkg[$(x)]", "expand the variable"),
            ("pkg[a b]", "not a package by name"),
            ("pkg[-x]", "not a package by name"),
            ("six==1.0 --hash=sha256:ab", "pip option"),
            ("six==1.0 -i https://e/simple", "pip option"),
            ("six==", "not a package by name"),
            ("six==1.0,", "not a package by name"),
            ("six=1.0", "not a package by name"),
            ("six 1.0", "not a package by name"),
            ("six==1.0 # comment", "not a package by name"),
            ("six==1.0 \\", "path or archive"),
            ("six==1.0)", "not a package by name"),
            // Names: ASCII, no look-alike letters or spaces.
            ("nump\u{0443}", "not ASCII"),
            ("s\u{0131}x", "not ASCII"),
            ("six\u{00a0}", "not ASCII"),
            ("\u{ff53}ix", "not ASCII"),
            ("-six", "pip option"),
            ("six-", "not a package by name"),
            ("_six", "not a package by name"),
            ("", "not a package by name"),
            ("six\x0b", "control character"),
        ] {
            let e = requirement_names_code(r, Show::Text)
                .unwrap_or_else(|| panic!("{r:?} was allowed"));
            assert!(e.contains(why), "{r:?}: {e}");
            assert!(
                names_code("requirements", &json!([r]), Show::Text).is_some(),
                "{r:?}"
            );
            // (A lock may hold a hash and a comment.)
            if !r.contains("--hash") && !r.contains(" #") {
                let lock = format!("{r} --hash=sha256:ab\n");
                assert!(lock_names_code(&lock, Show::Text).is_some(), "lock {r:?}");
            }
        }
        let e = requirement_names_code("six==1.0 @", Show::Text).unwrap();
        assert!(e.contains("\"@\" at column 10"), "{e}");
        // Read from a file, what stopped it is pointed at, not quoted.
        let e = requirement_names_code("six==1.0 @ab", Show::LineNumbers).unwrap();
        assert!(
            e.contains("what is at column 10 is not") && !e.contains("@ab"),
            "{e}"
        );
        let e = requirement_names_code("nump\u{0443}", Show::LineNumbers).unwrap();
        assert!(
            e.contains("a character at column 5, not ASCII") && !e.contains('\u{0443}'),
            "{e}"
        );
        let e = lock_names_code("nump\u{0443}\n", Show::LineNumbers).unwrap();
        assert!(
            e.starts_with("lock line 1 holds a character, not ASCII"),
            "{e}"
        );
        for r in [
            "six",
            "  six  ",
            "Six_2.x-y",
            "six==1.16.0",
            "six===1.16.0-local",
            "six (>=1.0, <2)",
            "six[]",
            "six [ a , b ] ~= 1.0.0",
            "torch==2.1.0+cpu",
            "numpy!=1.*,>=1.2rc1",
            "x ; sys_platform == 'linux'",
            "x;python_version>='3.8'and(os_name!=\"nt\"or extra=='a-b')",
            "x ; 'linux' in sys_platform and extra not in \"a b\"",
            "six ; platform_release >= \"5.10.0-1~bpo+1\"",
        ] {
            assert_eq!(requirement_names_code(r, Show::Text), None, "{r}");
        }
    }

    /// A lock's options are `--hash=sha256:HEX` (or `--hash sha256:HEX`)
    /// and nothing else; what `uv pip compile --generate-hashes` writes
    /// passes.
    #[test]
    fn a_lock_may_hold_only_sha256_hashes() {
        let uv = "# This file was autogenerated by uv via the following command:\n\
                  #    uv pip compile --generate-hashes requirements.in -o requirements.txt\n\
                  numpy==2.1.3 ; python_version >= \"3.10\" \\\n    \
                  --hash=sha256:016d0f6f5e77b0f0d45d77387ffa4bb89816b57c835580c3ce8e099ef830befe \\\n    \
                  --hash=sha256:02135ade8b8a84011cbb67dc44e07c58f28575cf9ecf8ab304e51c05528c19f0\n    \
                  # via -r requirements.in\n\
                  six==1.16.0 \\\n    --hash=sha256:1E61C374\n    # via\n    #   -r requirements.in\n";
        assert_eq!(lock_names_code(uv, Show::Text), None);
        for lock in [
            "six==1.16.0 --hash=md5:ab\n",
            "six==1.16.0 --hash=sha256:\n",
            "six==1.16.0 --hash=sha256:xyz\n",
            "six==1.16.0 --hash\n",
            "six==1.16.0 --hash=sha256:ab --hash=${H}\n",
            "six==1.16.0 --hash=sha256:ab --no-binary=:all:\n",
        ] {
            let e =
                lock_names_code(lock, Show::Text).unwrap_or_else(|| panic!("{lock:?} was allowed"));
            assert!(
                e.contains("only --hash=sha256:HEX is allowed"),
                "{lock:?}: {e}"
            );
            let e = lock_names_code(lock, Show::LineNumbers).unwrap();
            assert!(
                e == "lock line 1 has an option that is not --hash=sha256:HEX: only \
                      --hash=sha256:HEX is allowed",
                "{lock:?}: {e}"
            );
        }
    }

    #[test]
    fn keys_that_loosen_the_sandbox_are_named() {
        for (key, value) in [
            ("prefix", json!("/home/victim")),
            ("ro_bind", json!(["/home/victim/.ssh"])),
            ("scratch", json!("/home/victim")),
            ("network", json!(true)),
            ("isolation", json!("none")),
        ] {
            assert!(loosens_sandbox(key, &value).is_some(), "{key} = {value}");
        }
        for (key, value) in [
            ("ro_bind", json!([])),
            ("network", json!(false)),
            ("isolation", json!("container")),
            ("image", json!("/p/img.sif")),
        ] {
            assert_eq!(loosens_sandbox(key, &value), None, "{key} = {value}");
        }
    }

    #[test]
    fn lock_options_other_than_hash_are_named() {
        for lock in [
            "six==1.16.0 --hash=sha256:ab --index-url https://evil.example/simple\n",
            "six==1.16.0 \\\n    --hash=sha256:ab \\\n    --find-links=/home/x\n",
            "--extra-index-url https://evil.example/simple\nsix==1.16.0 --hash=sha256:ab\n",
            "six==1.16.0 --hash=sha256:ab\n-e ./pkg\n",
        ] {
            assert!(lock_names_code(lock, Show::Text).is_some(), "{lock}");
        }
    }

    /// uv ends a comment at its line's end even when it ends in `\`: the
    /// next line is read as a line of its own (an option), not joined into
    /// the comment and dropped with it.
    #[test]
    fn a_comment_ending_in_a_backslash_does_not_hide_the_next_line() {
        for (lock, line) in [
            ("# pinned \\\n-e /tmp/x\n", 1),
            (
                "six==1.16.0 --hash=sha256:ab # via \\\n--index-url https://evil/simple\n",
                1,
            ),
            (
                "six==1.16.0 \\\n\t--hash=sha256:ab\n\t# via \\\n-e /tmp/x\n",
                3,
            ),
        ] {
            let e = lock_names_code(lock, Show::LineNumbers)
                .unwrap_or_else(|| panic!("{lock:?} was allowed"));
            assert!(
                e.starts_with(&format!(
                    "lock line {line} has a comment that ends in a backslash"
                )),
                "{lock:?}: {e}"
            );
        }
        // The line after a comment is its own, backslash or not.
        for lock in [
            "# pinned \\ \n-e /tmp/x\n",
            "six==1.16.0 --hash=sha256:ab # via \\ \n--index-url https://evil/simple\n",
        ] {
            let e = lock_names_code(lock, Show::LineNumbers)
                .unwrap_or_else(|| panic!("{lock:?} was allowed"));
            assert!(e.starts_with("lock line 2: a pip option"), "{lock:?}: {e}");
        }
        // Comments after a tab, or on continued lines, are still comments.
        let lock = "six==1.16.0 \\\n\t--hash=sha256:ab \\\n\t# via x\n\t# via -r r.in\n";
        assert_eq!(lock_names_code(lock, Show::Text), None);
    }
}
