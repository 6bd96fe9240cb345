//! The `%%noyau on TARGET` and `%noyau …` magics: recognised the same way
//! by the proxy kernel (interactive notebooks) and by `noyau run`
//! (headless), so a notebook delegates the same cells either way.

/// A parsed `%%noyau on NAME [key=value …] [--quiet]` first line.
#[derive(Debug, PartialEq, Eq)]
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

/// What the proxy does with a cell.
#[derive(Debug, PartialEq, Eq)]
pub enum Magic {
    /// Run `body` on a target.
    On(OnMagic, String),
    /// A `%noyau …` line magic the proxy answers itself.
    Line(Vec<String>),
    /// Not ours.
    None,
}

/// Recognises a cell's magic from its code.
pub fn parse(code: &str) -> Result<Magic, String> {
    let trimmed = code.trim_start();
    let (first, body) = trimmed.split_once('\n').unwrap_or((trimmed, ""));
    let words: Vec<&str> = first.split_whitespace().collect();
    match words.first() {
        Some(&"%%noyau") => {
            if words.get(1) != Some(&"on") || words.len() < 3 {
                return Err("usage: %%noyau on TARGET [key=value …] [--tasks N] [--env SPEC] [--quiet] as the cell's first line, the code below it".into());
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
                        m.env = Some(rest.next().ok_or("%%noyau on: --env needs a spec")?.to_string());
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
                        return Err(format!(
                            "%%noyau on: {other:?} is neither key=value, --tasks N, --env SPEC nor --quiet"
                        ))
                    }
                };
                match tasks.and_then(|t| t.parse::<u32>().ok()).filter(|n| *n > 0) {
                    Some(n) => m.tasks = Some(n),
                    None => return Err("%%noyau on: --tasks needs a positive number".into()),
                }
            }
            Ok(Magic::On(m, body.to_string()))
        }
        Some(&"%noyau") => Ok(Magic::Line(
            words[1..].iter().map(|w| w.to_string()).collect(),
        )),
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
            Magic::Line(vec!["release".into(), "gpu".into()])
        );
        assert_eq!(parse("print('%%noyau on x')").unwrap(), Magic::None);
        assert!(parse("%%noyau gpu\n1").unwrap_err().contains("usage"));
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
            .contains("--env needs"));
        assert!(parse("%%noyau on gpu bogus\n1").is_err());
    }
}
