//! Resource profiles: what a job asks its scheduler for.
//!
//! Every key is declared once. The keys every backend knows are [`GENERIC`]
//! (with the other names a scheduler's users write for them: `queue` is
//! `partition`, `project` is `account`, `walltime` is `time`); each
//! scheduler's file declares the keys only it knows (Slurm's `mem`,
//! `sbatch`…, OAR's `properties`, `oarsub`) and translates every key into
//! its own arguments. A key that means nothing on the chosen scheduler is
//! an error naming the key and the scheduler; `local` ignores scheduler
//! keys. Loading and merging the files is noyau-config's.

use noyau_vars::EnvVars;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One profile key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    /// Other names of the same key.
    pub aliases: &'static [&'static str],
    pub kind: Kind,
}

/// What a key's value is, and how it is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One word: no space, not empty.
    Word,
    /// One line, not empty.
    Line,
    /// Any text.
    Text,
    /// A walltime ([`parse_time`]).
    Time,
    /// A memory size ([`parse_size`]).
    Size,
    /// A whole number, at least 1.
    Count,
    /// A whole number.
    Number,
    /// Options of a command, one per item, each starting with `-`
    /// (`-o KEY=V` adds one).
    Options,
    /// Arguments of a command, one per item (`-o KEY=V` adds one).
    Args,
    /// Environment variables (`-o env.NAME=V` sets one).
    Table,
}

impl Key {
    /// A key with no other name.
    pub const fn new(name: &'static str, kind: Kind) -> Key {
        Key {
            name,
            aliases: &[],
            kind,
        }
    }
}

/// The keys every backend knows (the scheduler's file says how each
/// translates).
pub const GENERIC: &[Key] = &[
    Key::new("backend", Kind::Word),
    Key {
        name: "partition",
        aliases: &["queue"],
        kind: Kind::Word,
    },
    Key {
        name: "time",
        aliases: &["walltime"],
        kind: Kind::Time,
    },
    Key::new("nodes", Kind::Count),
    Key::new("ntasks", Kind::Count),
    Key::new("cpus_per_task", Kind::Count),
    Key {
        name: "account",
        aliases: &["project"],
        kind: Kind::Word,
    },
    Key::new("prologue", Kind::Text),
    Key::new("env", Kind::Table),
    Key::new("link_bind", Kind::Text),
    Key::new("link_advertise", Kind::Text),
    Key::new("walltime_signal", Kind::Number),
    Key::new("kernel", Kind::Text),
    Key::new("environment", Kind::Text),
];

/// One profile, after merging files and overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// `local` or a batch scheduler's name.
    pub backend: Option<String>,
    /// Slurm's partition, OAR's queue.
    pub partition: Option<String>,
    /// Walltime, as Slurm writes it (checked by [`parse_time`]).
    pub time: Option<String>,
    pub nodes: Option<u32>,
    pub ntasks: Option<u32>,
    pub cpus_per_task: Option<u32>,
    /// Slurm's account, OAR's project.
    pub account: Option<String>,
    /// Shell lines run in the job before the agent (e.g. `module load python`).
    pub prologue: Option<String>,
    /// Environment variables set in the job (not secrets: the script is readable).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where the proxy listens for its agent (`0.0.0.0:0` by default for batch backends).
    pub link_bind: Option<String>,
    /// The address the agent dials (default: this host's name and the bound port).
    pub link_advertise: Option<String>,
    /// Seconds before the walltime at which the scheduler sends the job
    /// SIGUSR1, for a run to save and stop [default: a tenth of `time`,
    /// 30 s to 10 min].
    pub walltime_signal: Option<u32>,
    /// The kernelspec a target of this profile runs (`%%noyau on`), when it
    /// is not the notebook's own (e.g. `ir` for R cells in a Python notebook).
    pub kernel: Option<String>,
    /// The environment a target (or Dask cluster) of this profile runs in,
    /// when not the notebook kernel's: noyau-env's spec as a JSON or TOML
    /// inline table (`environment = { requirements = [...] }` in a file).
    pub environment: Option<String>,
    /// The project directory whose `noyau.toml` set `environment` (None:
    /// the site's or the user's file, or `-o`): noyau-env holds a
    /// project's spec to what a project may name unless it is trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_from: Option<std::path::PathBuf>,
    /// `environment` came from a cell's `%%noyau on T environment=…` word
    /// (the notebook in `environment_from`): held to a cell's rules, as
    /// `--env` in a cell is (no sandbox key at all).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub environment_from_cell: bool,
    /// The keys only some schedulers know, by name (declared in their files).
    #[serde(default)]
    pub scheduler_keys: BTreeMap<String, Value>,
}

/// A scheduler key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    One(String),
    Many(Vec<String>),
}

/// A value as a file or the command line gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Given {
    Text(String),
    Number(i64),
    Texts(Vec<String>),
    Table(BTreeMap<String, String>),
}

/// What is wrong with a key or its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProfileError {
    pub message: String,
}

fn err<T>(message: impl Into<String>) -> Result<T, ProfileError> {
    Err(ProfileError {
        message: message.into(),
    })
}

/// Every key: the generic ones, then each scheduler's, in the order the
/// schedulers are registered (a key two schedulers declare is listed once).
pub fn keys() -> Vec<Key> {
    let mut all: Vec<Key> = GENERIC.to_vec();
    for name in crate::schedulers() {
        for k in crate::scheduler_keys(name) {
            if !all.iter().any(|a| a.name == k.name) {
                all.push(*k);
            }
        }
    }
    all
}

/// Every name a key may be written with, for suggestions.
pub fn key_names() -> Vec<&'static str> {
    keys()
        .iter()
        .flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied()))
        .collect()
}

/// The key written `name` (an alias gives its key).
pub fn find_key(name: &str) -> Option<Key> {
    keys()
        .into_iter()
        .find(|k| k.name == name || k.aliases.contains(&name))
}

/// The name of the key written `name` (`queue` → `partition`).
pub fn canonical_key(name: &str) -> Option<&'static str> {
    find_key(name).map(|k| k.name)
}

fn unknown(name: &str) -> ProfileError {
    let names = key_names();
    ProfileError {
        message: format!(
            "unknown key `{name}`{}; valid keys: {}, env.NAME",
            suggest(name, names.iter().copied()),
            names.join(", ")
        ),
    }
}

impl Profile {
    /// Sets key `name` (or one of its aliases) to `v`, as a file gives it:
    /// a list replaces the list, `env` adds its variables.
    pub fn set(&mut self, name: &str, v: Given) -> Result<(), ProfileError> {
        let k = find_key(name).ok_or_else(|| unknown(name))?;
        let text = |v: Given| match v {
            Given::Text(t) => Ok(t),
            Given::Number(n) => Ok(n.to_string()),
            other => err(format!("{name} must be text, not {}", what(&other))),
        };
        let num = |v: Given| match v {
            Given::Number(n) => u32::try_from(n)
                .or_else(|_| err(format!("{name} must be a whole number from 0, not {n}"))),
            Given::Text(t) => err(format!("{name} must be a whole number, not the text {t:?}")),
            other => err(format!(
                "{name} must be a whole number, not {}",
                what(&other)
            )),
        };
        match k.name {
            "backend" => self.backend = Some(text(v)?),
            "partition" => self.partition = Some(text(v)?),
            "time" => self.time = Some(text(v)?),
            "nodes" => self.nodes = Some(num(v)?),
            "ntasks" => self.ntasks = Some(num(v)?),
            "cpus_per_task" => self.cpus_per_task = Some(num(v)?),
            "account" => self.account = Some(text(v)?),
            "prologue" => self.prologue = Some(text(v)?),
            "env" => match v {
                Given::Table(t) => self.env.extend(t),
                other => return err(format!("env must be a table, not {}", what(&other))),
            },
            "link_bind" => self.link_bind = Some(text(v)?),
            "link_advertise" => self.link_advertise = Some(text(v)?),
            "walltime_signal" => self.walltime_signal = Some(num(v)?),
            "kernel" => self.kernel = Some(text(v)?),
            "environment" => {
                self.environment = Some(text(v)?);
                self.environment_from = None;
                self.environment_from_cell = false;
            }
            _ => {
                let value = match (k.kind, v) {
                    (Kind::Options | Kind::Args, Given::Texts(l)) => Value::Many(l),
                    (Kind::Options | Kind::Args, other) => {
                        return err(format!(
                            "{name} must be a list of text, not {}",
                            what(&other)
                        ))
                    }
                    (_, v) => Value::One(text(v)?),
                };
                self.scheduler_keys.insert(k.name.into(), value);
            }
        }
        Ok(())
    }

    /// Applies one `key=value` override. `env.NAME=value` sets a variable;
    /// a list key (`sbatch=--opt`) gets one more item.
    pub fn apply_override(&mut self, arg: &str) -> Result<(), ProfileError> {
        let Some((key, value)) = arg.split_once('=') else {
            return err("expected key=value");
        };
        let (key, value) = (key.trim(), value.trim().to_string());
        if let Some(var) = key.strip_prefix("env.") {
            if var.is_empty() {
                return err("expected env.NAME=value");
            }
            self.env.insert(var.into(), value);
            return Ok(());
        }
        match find_key(key).map(|k| k.kind) {
            Some(Kind::Options | Kind::Args) => {
                let k = find_key(key).expect("just found").name;
                match self
                    .scheduler_keys
                    .entry(k.into())
                    .or_insert(Value::Many(Vec::new()))
                {
                    Value::Many(l) => l.push(value),
                    one => *one = Value::Many(vec![value]),
                }
                Ok(())
            }
            Some(Kind::Table) => err("set a variable with env.NAME=value"),
            Some(Kind::Count | Kind::Number) => match value.parse::<i64>() {
                Ok(n) => self.set(key, Given::Number(n)),
                Err(_) => err(format!("{key} must be a whole number, not {value:?}")),
            },
            _ => self.set(key, Given::Text(value)),
        }
    }

    /// A scheduler key's value, when it has one value.
    pub fn get(&self, key: &str) -> Option<&str> {
        match self.scheduler_keys.get(key) {
            Some(Value::One(v)) => Some(v),
            _ => None,
        }
    }

    /// A scheduler key's items (none when unset).
    pub fn items(&self, key: &str) -> &[String] {
        match self.scheduler_keys.get(key) {
            Some(Value::Many(l)) => l,
            _ => &[],
        }
    }

    /// Seconds before the walltime at which the job asks its scheduler
    /// for SIGUSR1: `walltime_signal`, else a tenth of `time`, 30 s to 10 min.
    pub fn warning_secs(&self) -> u64 {
        if let Some(s) = self.walltime_signal {
            return s.into();
        }
        match self.time_secs() {
            Some(t) if t > 0 => (t / 10).clamp(30, 600),
            _ => 600,
        }
    }

    /// The walltime in seconds, when one is set (and valid).
    pub fn time_secs(&self) -> Option<u64> {
        self.time.as_deref().and_then(|t| parse_time(t).ok())
    }

    /// Checks what can be checked without the scheduler: every value
    /// against its key's kind.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if let Some(b) = &self.backend {
            let known = crate::backends();
            if !known.contains(&b.as_str()) {
                return err(format!(
                    "backend {b:?} is not known{}; backends: {}",
                    suggest(b, known.iter().copied()),
                    known.join(", ")
                ));
            }
        }
        let one = |v: &Option<String>| v.clone().map(Value::One);
        let counts = [
            ("nodes", self.nodes),
            ("ntasks", self.ntasks),
            ("cpus_per_task", self.cpus_per_task),
        ];
        for (k, v) in counts {
            if v == Some(0) {
                return err(format!("{k} must be at least 1"));
            }
        }
        let generic = [
            ("partition", one(&self.partition)),
            ("time", one(&self.time)),
            ("account", one(&self.account)),
        ];
        let given = generic
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?)))
            .chain(self.scheduler_keys.clone());
        for (name, v) in given {
            let k = find_key(&name).ok_or_else(|| unknown(&name))?;
            check_value(&k, &v)?;
        }
        for k in self.env.keys() {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return err(format!("env: {k:?} is not a variable name"));
            }
            if k.starts_with(EnvVars::NOYAU_LINK_PREFIX) {
                return err(format!("env: {k} is set by noyau itself"));
            }
        }
        Ok(())
    }

    /// The scheduler keys set that `scheduler` does not declare: an error
    /// naming them and the scheduler, with its hint of what to write.
    pub(crate) fn check_keys(
        &self,
        display: &str,
        own: &[Key],
        hint: &str,
    ) -> Result<(), ProfileError> {
        let bad: Vec<&str> = keys()
            .iter()
            .map(|k| k.name)
            .filter(|k| self.scheduler_keys.contains_key(*k))
            .filter(|k| !own.iter().any(|o| o.name == *k))
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        err(format!(
            "{} {} no meaning on {display}; {hint}",
            bad.join(", "),
            if bad.len() == 1 { "has" } else { "have" },
        ))
    }
}

fn what(v: &Given) -> &'static str {
    match v {
        Given::Text(_) => "text",
        Given::Number(_) => "a number",
        Given::Texts(_) => "a list",
        Given::Table(_) => "a table",
    }
}

fn check_value(k: &Key, v: &Value) -> Result<(), ProfileError> {
    let name = k.name;
    match (k.kind, v) {
        (Kind::Word, Value::One(s)) if s.is_empty() || s.contains(char::is_whitespace) => {
            err(format!("{name}: {s:?} must be one word"))
        }
        (Kind::Line, Value::One(s)) if s.trim().is_empty() || s.contains('\n') => {
            err(format!("{name}: {s:?} must be one line"))
        }
        (Kind::Time, Value::One(s)) => parse_time(s)
            .map(drop)
            .or_else(|e| err(format!("{name}: {e}"))),
        (Kind::Size, Value::One(s)) => parse_size(s)
            .map(drop)
            .or_else(|e| err(format!("{name}: {e}"))),
        (Kind::Options, Value::Many(l)) => match l.iter().find(|o| !o.trim_start().starts_with('-')) {
            Some(o) => err(format!(
                "{name}: {o:?} is not an option (write e.g. \"--exclusive\" or \"--licenses=matlab\")"
            )),
            None if l.iter().any(|o| o.contains('\n')) => {
                err(format!("{name}: one option per item, without newlines"))
            }
            None => Ok(()),
        },
        (Kind::Args, Value::Many(l)) if l.iter().any(|a| a.contains('\n')) => {
            err(format!("{name}: one argument per item, without newlines"))
        }
        _ => Ok(()),
    }
}

/// ", did you mean `x`?" when a candidate is close enough, else "".
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| format!(", did you mean `{c}`?"))
        .unwrap_or_default()
}

/// Seconds in a Slurm time: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
/// `D-HH:MM:SS`; `UNLIMITED`/`INFINITE` are 0 (no limit).
pub fn parse_time(t: &str) -> Result<u64, ProfileError> {
    let t = t.trim();
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("infinite") {
        return Ok(0);
    }
    let help = || {
        ProfileError {
        message: format!(
            "{t:?} is not a Slurm time; write MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. \"90\", \"1:30:00\", \"2-00:00:00\")"
        ),
    }
    };
    let num = |s: &str| -> Result<u64, ProfileError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 6 {
            return Err(help());
        }
        s.parse().map_err(|_| help())
    };
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(num(d)?), r),
        None => (None, t),
    };
    let parts: Vec<u64> = rest.split(':').map(num).collect::<Result<_, _>>()?;
    let secs = match (days, parts.as_slice()) {
        (None, [m]) => m * 60,
        (None, [m, s]) => m * 60 + s,
        (None, [h, m, s]) => h * 3600 + m * 60 + s,
        (Some(d), [h]) => d * 86400 + h * 3600,
        (Some(d), [h, m]) => d * 86400 + h * 3600 + m * 60,
        (Some(d), [h, m, s]) => d * 86400 + h * 3600 + m * 60 + s,
        _ => return Err(help()),
    };
    if parts.len() > 1 && parts[1..].iter().any(|&v| v >= 60) {
        return err(format!("{}: minutes and seconds must be below 60", help()));
    }
    if secs == 0 {
        return err(format!("{t:?} is a zero walltime"));
    }
    Ok(secs)
}

/// Megabytes in a Slurm size: a number with an optional unit K, M, G or T
/// (case-insensitive, an optional trailing B); no unit means megabytes.
pub fn parse_size(s: &str) -> Result<u64, ProfileError> {
    let t = s.trim();
    let help = || ProfileError {
        message: format!("{s:?} is not a size; write e.g. \"500M\", \"4G\" or \"1T\""),
    };
    let t = t
        .strip_suffix(['B', 'b'])
        .filter(|r| r.ends_with(|c: char| c.is_ascii_alphabetic()))
        .unwrap_or(t);
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() || digits.len() > 12 {
        return Err(help());
    }
    let n: u64 = digits.parse().map_err(|_| help())?;
    let mb = match unit.to_ascii_uppercase().as_str() {
        "K" => n.div_ceil(1024),
        "" | "M" => n,
        "G" => n * 1024,
        "T" => n * 1024 * 1024,
        _ => return Err(help()),
    };
    if mb == 0 {
        return err(format!("{s:?} is no memory at all"));
    }
    Ok(mb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("90"), Ok(5400));
        assert_eq!(parse_time("10:30"), Ok(630));
        assert_eq!(parse_time("1:00:00"), Ok(3600));
        assert_eq!(parse_time("2-0"), Ok(172800));
        assert_eq!(parse_time("1-02:03"), Ok(93780));
        assert_eq!(parse_time("1-02:03:04"), Ok(93784));
        assert_eq!(parse_time("UNLIMITED"), Ok(0));
        for bad in ["", "1h", "1:2:3:4", "-1", "1-", "1:60", "0", "1-2-3", "a:b"] {
            let e = parse_time(bad).unwrap_err();
            let e = e.message;
            assert!(e.contains("Slurm time") || e.contains("zero"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500M"), Ok(500));
        assert_eq!(parse_size("4G"), Ok(4096));
        assert_eq!(parse_size("4gb"), Ok(4096));
        assert_eq!(parse_size("2048"), Ok(2048));
        assert_eq!(parse_size("1T"), Ok(1 << 20));
        for bad in ["", "G", "4X", "4.5G", "0", "-1G", "4 G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_checked_against_the_scheduler() {
        let profile = |overrides: &[&str]| {
            let mut p = Profile::default();
            for o in overrides {
                p.apply_override(o).unwrap();
            }
            p.validate().unwrap();
            p
        };
        let check_for = |p: &Profile, b: &str| match b {
            "local" => Ok(()),
            s => crate::Scheduler::named(s)
                .unwrap()
                .check(p)
                .map_err(|e| e.to_string()),
        };
        let p = profile(&["time=1:00:00", "cpus_per_task=4", "partition=debug"]);
        for b in ["local", "slurm", "oar"] {
            assert_eq!(check_for(&p, b), Ok(()), "{b}");
        }
        let s = profile(&["mem=4G", "sbatch=--exclusive"]);
        assert_eq!(check_for(&s, "slurm"), Ok(()));
        let e = check_for(&s, "oar").unwrap_err();
        assert!(e.starts_with("mem, sbatch have no meaning on OAR"), "{e}");
        assert!(e.contains("properties"), "{e}");
        let o = profile(&["properties=host='a'", "oarsub=-t", "oarsub=besteffort"]);
        assert_eq!(check_for(&o, "oar"), Ok(()));
        let e = check_for(&o, "slurm").unwrap_err();
        assert!(
            e.starts_with("properties, oarsub have no meaning on Slurm"),
            "{e}"
        );
    }

    #[test]
    fn aliases_are_one_key_and_lists_grow_with_overrides() {
        let mut p = Profile::default();
        for o in [
            "queue=q",
            "project=pr",
            "walltime=1:00:00",
            "sbatch=--a",
            "sbatch=--b",
        ] {
            p.apply_override(o).unwrap();
        }
        assert_eq!(
            (p.partition.as_deref(), p.account.as_deref(), p.time_secs()),
            (Some("q"), Some("pr"), Some(3600))
        );
        assert_eq!(p.items("sbatch"), ["--a", "--b"]);
        p.set("sbatch", Given::Texts(vec!["--c".into()])).unwrap();
        assert_eq!(p.items("sbatch"), ["--c"]);
        assert_eq!(canonical_key("queue"), Some("partition"));
        let e = p
            .apply_override("sbatch=exclusive")
            .and_then(|()| p.validate());
        assert!(e.unwrap_err().message.contains("is not an option"));
        let e = Profile::default()
            .set("nodes", Given::Texts(vec![]))
            .unwrap_err();
        assert!(e.message.contains("whole number"), "{e}");
    }
}
