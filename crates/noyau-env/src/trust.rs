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
//! them names code and the project's directory is not in the user's or
//! the site's `trusted_projects` (noyau-config), the environment is
//! refused with [`EnvError::UntrustedCode`], never silently changed. The
//! user's own sources (`--env`, `NOYAU_ENV`) are not checked.
//!
//! Requirements by name (`numpy==2.1`) are allowed from anyone, but only
//! as wheels ([`crate::EnvSpec::wheels_only`]): uv builds a source
//! distribution by running its build backend.

use serde_json::Value;

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
/// * a requirement that is not a name from the index: a URL, a path, an
///   archive, or a pip option (`-e`, `-i`, `--find-links`, `-r`…).
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
        "requirements" => strings()
            .into_iter()
            .find_map(|r| requirement_names_code(r).map(|why| format!("{}: {why}", quoted(r)))),
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

/// Why a requirement line is not a plain name from the index, if it is not.
pub fn requirement_names_code(line: &str) -> Option<&'static str> {
    // One line: uv ends a line (and a comment) at a `\n` or a bare `\r`,
    // so what follows one would be a requirement of its own, unchecked.
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Some("it holds a control character (a line break would start another line)");
    }
    let line = line.trim();
    if line.starts_with('-') {
        return Some("a pip option (an index, a link page, an editable or a file to read)");
    }
    // Before the markers: `name[extras] (specifiers)`. A name, its extras
    // and its versions hold no `/`, `\`, `:` or `@`; a direct reference
    // (`name @ URL`), a URL or a path does.
    let req = line.split(';').next().unwrap_or_default().trim();
    // The markers (`; python_version >= "3.10"`) are names, operators,
    // quoted versions: nothing there may be a URL, a path, an option or a
    // comment hiding one.
    if let Some((_, markers)) = line.split_once(';') {
        if !markers
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " \t_.-<>=!~()'\",*".contains(c))
        {
            return Some("its markers hold more than names, operators and quoted versions");
        }
    }
    if req.contains("://") || req.contains('@') || req.starts_with("git+") {
        return Some("a direct reference (a URL or a VCS checkout), built or installed as it is");
    }
    if req.contains('/')
        || req.contains('\\')
        || req.starts_with('.')
        || req.starts_with('~')
        || req.contains(':')
        || [".whl", ".tar.gz", ".zip", ".tar.bz2", ".tgz"]
            .iter()
            .any(|ext| req.ends_with(ext))
    {
        return Some("a local path or archive, built or installed as it is");
    }
    None
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
    // A requirement and the line it starts on, continuation lines joined.
    let mut logical: Vec<(usize, String)> = Vec::new();
    let mut open = false;
    for (n, l) in lines() {
        let (text, continued) = match l.strip_suffix('\\') {
            Some(head) => (head, true),
            None => (l, false),
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
        let line = match line
            .find(" #")
            .or_else(|| line.find('#').filter(|&i| i == 0))
        {
            Some(i) => &line[..i],
            None => line,
        };
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
        if let Some(why) = requirement_names_code(&req) {
            return Some(format!("{}: {why}", at(*n, &req)));
        }
        let mut i = 0;
        while i < options.len() {
            match options[i] {
                o if o.starts_with("--hash=") => {}
                "--hash" => i += 1,
                o => {
                    let option = match show {
                        Show::Text => format!("the option {o:?}"),
                        Show::LineNumbers => "an option other than --hash".into(),
                    };
                    return Some(format!(
                        "{} has {option}: only --hash is allowed",
                        at(*n, &req)
                    ));
                }
            }
            i += 1;
        }
    }
    None
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
            assert!(requirement_names_code(r).is_some(), "{r}");
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
            assert_eq!(requirement_names_code(r), None, "{r}");
        }
    }

    /// A line break in a requirement, or a bare carriage return in a lock
    /// (ending its comment for uv), would start a line that is not checked.
    #[test]
    fn control_characters_and_markers_cannot_hide_a_line() {
        let req = "six ; python_version>'0'\nevil @ https://e/x-1.0-py3-none-any.whl";
        assert!(requirement_names_code(req).is_some(), "{req}");
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
            assert!(requirement_names_code(marker).is_some(), "{marker}");
        }
        // A lock with CRLF line ends, tabs, and markers, is fine.
        let lock = "six==1.16.0 ; python_version >= \"3.8\" and platform_machine != 'x86_64' \\\r\n\t--hash=sha256:ab\r\n";
        assert_eq!(lock_names_code(lock, Show::Text), None);
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
}
