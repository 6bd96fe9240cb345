//! `%noyau …` line magics, parsed once into a [`Command`] (one variant per
//! magic); each host then runs the command (`crate::Magics`).

use crate::MagicError;

/// Every line magic and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `%noyau targets`: the table of targets.
    Targets,
    /// `%noyau release NAME`: ends a target's job.
    Release(String),
    /// `%noyau cancel NAME`: the same, for a target still queued.
    Cancel(String),
    /// `%noyau push TARGET a b`: variables to the target's kernel.
    Push {
        target: String,
        names: Vec<String>,
    },
    /// `%noyau pull TARGET c`: variables from the target's kernel.
    Pull {
        target: String,
        names: Vec<String>,
    },
    /// `%noyau env` / `%noyau env show`.
    EnvShow,
    /// `%noyau env lock`: the resolved lock to `./noyau.lock`.
    EnvLock,
    /// `%noyau env help`.
    EnvHelp,
    /// `%noyau env SPEC`: another environment for the kernel.
    EnvSwitch(String),
    /// `%noyau dask up [words…]` (read with `[dask]`'s defaults, see
    /// [`crate::dask::parse_up`]).
    DaskUp(Vec<String>),
    DaskStatus,
    DaskDown,
    /// `%noyau data URL --sha256 HEX [--name N]`: a data file pinned by
    /// its hash (noyau-env's `data::parse_magic` reads the words).
    Data(Vec<String>),
}

/// Every line magic, for a usage error.
pub const USAGE: &str = "usage: %noyau data URL --sha256 HEX [--name NAME] | %noyau env [show] | %noyau env lock | %noyau env SPEC (see %noyau env help) | %noyau targets | %noyau dask up|status|down | %noyau release TARGET | %noyau cancel TARGET | \
     %noyau push TARGET NAME… | %noyau pull TARGET NAME…; \
     %%noyau on TARGET [key=value …] [--quiet] runs a cell on a target";

impl Command {
    /// The words after `%noyau`.
    pub fn parse(words: &[&str]) -> Result<Command, MagicError> {
        let owned = |w: &[&str]| w.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        Ok(match words {
            ["targets"] => Command::Targets,
            ["dask", "up", rest @ ..] => Command::DaskUp(owned(rest)),
            ["dask", "status"] => Command::DaskStatus,
            ["dask", "down"] => Command::DaskDown,
            ["dask", ..] => return Err(MagicError::Usage(crate::dask::USAGE.into())),
            ["data", rest @ ..] => Command::Data(owned(rest)),
            ["env"] | ["env", "show"] => Command::EnvShow,
            ["env", "lock"] => Command::EnvLock,
            ["env", "help"] => Command::EnvHelp,
            ["env", spec @ ..] => Command::EnvSwitch(spec.join(" ")),
            ["push", target, names @ ..] => Command::Push {
                target: target.to_string(),
                names: checked_names(names)?,
            },
            ["pull", target, names @ ..] => Command::Pull {
                target: target.to_string(),
                names: checked_names(names)?,
            },
            ["release", name] => Command::Release(name.to_string()),
            ["cancel", name] => Command::Cancel(name.to_string()),
            _ => return Err(MagicError::Usage(USAGE.into())),
        })
    }
}

/// Names must be Python identifiers: they are pasted into code.
fn checked_names(names: &[&str]) -> Result<Vec<String>, MagicError> {
    let bad = |m: String| MagicError::Transfer(m);
    if names.is_empty() {
        return Err(bad("name at least one variable".into()));
    }
    for n in names {
        let mut chars = n.chars();
        let ok = chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
            && chars.all(|c| c == '_' || c.is_alphanumeric());
        if !ok {
            return Err(bad(format!("{n:?} is not a Python variable name")));
        }
    }
    Ok(names.iter().map(|n| n.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_magic_parses() {
        let p = |s: &str| Command::parse(&s.split_whitespace().collect::<Vec<_>>());
        assert_eq!(p("targets").unwrap(), Command::Targets);
        assert_eq!(
            p("dask up 2 --target t").unwrap(),
            Command::DaskUp(vec!["2".into(), "--target".into(), "t".into()])
        );
        assert_eq!(p("env").unwrap(), Command::EnvShow);
        assert_eq!(
            p("env python 3.11").unwrap(),
            Command::EnvSwitch("python 3.11".into())
        );
        assert_eq!(
            p("pull t a b").unwrap(),
            Command::Pull {
                target: "t".into(),
                names: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(p("cancel t").unwrap(), Command::Cancel("t".into()));
        assert_eq!(p("dask sideways").unwrap_err().ename(), "UsageError");
        assert_eq!(p("").unwrap_err().ename(), "UsageError");
        assert_eq!(p("push t").unwrap_err().ename(), "NoyauTransferError");
        assert!(p("push t a;b").is_err());
    }
}
