//! A cell's magic, recognised once: `%%noyau on TARGET` as its first line
//! (the cell runs on a target), `%noyau …` (a [`Command`]), or none. The
//! proxy kernel and `noyau run` read cells through [`parse`], so a
//! notebook means the same either way.

use crate::{Command, MagicError};

/// A parsed `%%noyau on NAME [key=value …] [--quiet]` first line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OnMagic {
    pub target: String,
    pub overrides: Vec<String>,
    pub quiet: bool,
    /// `--tasks N`: run the cell as N tasks of the allocation.
    pub tasks: Option<u32>,
    /// `--env SPEC`: the target's environment (an inline table without
    /// spaces, or a file, as `noyau run --env` takes), when it is not the
    /// profile's `environment` or the notebook kernel's.
    pub env: Option<String>,
}

impl OnMagic {
    /// The code the target runs for `body`: with `--tasks N`, a driver that
    /// runs it as N tasks of the allocation, which must hold them
    /// (`ntasks=N` unless the line says; only the first cell sizes it).
    pub fn code_for(&mut self, body: String) -> String {
        let Some(n) = self.tasks else { return body };
        if !self.overrides.iter().any(|o| o.starts_with("ntasks=")) {
            self.overrides.push(format!("ntasks={n}"));
        }
        noyau_sched::fan_out(&body, n)
    }
}

/// What a cell is to noyau.
#[derive(Debug, PartialEq, Eq)]
pub enum Magic {
    /// Run `body` on a target.
    On(OnMagic, String),
    /// A `%noyau …` line magic noyau answers itself.
    Line(Command),
    /// Not ours: the notebook's kernel runs it.
    None,
}

/// Recognises a cell's magic from its code.
pub fn parse(code: &str) -> Result<Magic, MagicError> {
    let trimmed = code.trim_start();
    let (first, body) = trimmed.split_once('\n').unwrap_or((trimmed, ""));
    let words: Vec<&str> = first.split_whitespace().collect();
    match words.first() {
        Some(&"%%noyau") => {
            if words.get(1) != Some(&"on") || words.len() < 3 {
                return Err(MagicError::Usage("usage: %%noyau on TARGET [key=value …] [--tasks N] [--env SPEC] [--quiet] as the cell's first line, the code below it".into()));
            }
            let mut m = OnMagic {
                target: words[2].to_string(),
                overrides: vec![],
                quiet: false,
                tasks: None,
                env: None,
            };
            let mut rest = words[3..].iter();
            while let Some(w) = rest.next() {
                let tasks = match *w {
                    "--quiet" | "-q" => {
                        m.quiet = true;
                        continue;
                    }
                    "--env" => {
                        m.env = Some(
                            rest.next()
                                .ok_or_else(|| MagicError::Usage("%%noyau on: --env needs a spec".into()))?
                                .to_string(),
                        );
                        continue;
                    }
                    e if e.starts_with("--env=") => {
                        m.env = e.strip_prefix("--env=").map(str::to_string);
                        continue;
                    }
                    "--tasks" => rest.next().copied(),
                    t if t.starts_with("--tasks=") => t.strip_prefix("--tasks="),
                    kv if kv.contains('=') && !kv.starts_with('-') => {
                        m.overrides.push(kv.to_string());
                        continue;
                    }
                    other => {
                        return Err(MagicError::Usage(format!(
                            "%%noyau on: {other:?} is neither key=value, --tasks N, --env SPEC nor --quiet"
                        )))
                    }
                };
                match tasks.and_then(|t| t.parse::<u32>().ok()).filter(|n| *n > 0) {
                    Some(n) => m.tasks = Some(n),
                    None => {
                        return Err(MagicError::Usage(
                            "%%noyau on: --tasks needs a positive number".into(),
                        ))
                    }
                }
            }
            Ok(Magic::On(m, body.to_string()))
        }
        Some(&"%noyau") => Command::parse(&words[1..]).map(Magic::Line),
        _ => Ok(Magic::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_magics() {
        assert_eq!(
            parse("%%noyau on gpu mem=4G --quiet\nimport torch\nx = 1").unwrap(),
            Magic::On(
                OnMagic {
                    target: "gpu".into(),
                    overrides: vec!["mem=4G".into()],
                    quiet: true,
                    tasks: None,
                    env: None,
                },
                "import torch\nx = 1".into()
            )
        );
        assert_eq!(
            parse("%noyau release gpu").unwrap(),
            Magic::Line(Command::Release("gpu".into()))
        );
        assert_eq!(parse("print('%%noyau on x')").unwrap(), Magic::None);
        let e = parse("%%noyau gpu\n1").unwrap_err();
        assert!(
            matches!(&e, MagicError::Usage(u) if u.contains("usage")),
            "{e:?}"
        );
        assert_eq!(parse("%noyau bogus").unwrap_err().ename(), "UsageError");
        match parse("%%noyau on cpu --tasks 4\nprint(1)").unwrap() {
            Magic::On(m, _) => assert_eq!(m.tasks, Some(4)),
            other => panic!("{other:?}"),
        }
        assert!(parse("%%noyau on cpu --tasks zero\n1").is_err());
        match parse("%%noyau on cpu --env {requirements=[\"six\"]} --quiet\n1").unwrap() {
            Magic::On(m, _) => assert_eq!(m.env.as_deref(), Some("{requirements=[\"six\"]}")),
            other => panic!("{other:?}"),
        }
        assert!(parse("%%noyau on cpu --env\n1")
            .unwrap_err()
            .to_string()
            .contains("--env needs"));
        assert!(parse("%%noyau on gpu bogus\n1").is_err());
    }
}
