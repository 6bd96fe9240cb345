//! Resource profiles: what a kernel or a run asks the scheduler for.
//!
//! A profile is a `[profiles.NAME]` table in a TOML file. Three files are
//! read, each optional, and a later one wins key by key:
//!
//! 1. the system file, `/etc/noyau/config.toml` (or `$NOYAU_SYSTEM_CONFIG`),
//! 2. the user's, `$XDG_CONFIG_HOME/noyau/config.toml` (default `~/.config/…`),
//! 3. the project's, `./noyau.toml` in the working directory,
//!
//! and then `-o key=value` overrides from the command line
//! ([`Config::profile`]). Everything is checked before a job is submitted:
//! an unknown key is named with its position and the closest valid key,
//! times must be Slurm times (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
//! `D-HH:MM:SS`) and sizes Slurm sizes (`500M`, `4G`). What only the
//! scheduler knows (does this partition exist?) is checked by the backend.
//!
//! One profile serves Slurm and OAR where the keys translate
//! ([`Profile::check_for`]): `partition` is OAR's queue and `queue` Slurm's
//! partition, `account` OAR's project and `project` Slurm's account; `time`,
//! `nodes`, `ntasks` and `cpus_per_task` become `-l nodes=N/core=C,walltime=…`.
//! A key that means nothing on the chosen scheduler (`mem` or `sbatch` on
//! OAR, `properties` or `oarsub` on Slurm) is an error naming it. A
//! top-level `scheduler = "oar"` (typically in the system file) names the
//! site's scheduler for the commands about jobs (`noyau ps`, `cancel`,
//! `extend`).
//!
//! ```toml
//! [profiles.gpu]
//! backend = "slurm"
//! partition = "gpu"
//! time = "2:00:00"
//! cpus_per_task = 8
//! mem = "32G"
//! gpus = "1"
//! prologue = "module load cuda"
//! sbatch = ["--exclusive"]
//! env = { OMP_NUM_THREADS = "8" }
//!
//! [profiles.oar-big]
//! backend = "oar"
//! queue = "default"
//! project = "myproject"
//! properties = "cluster='dahu'"
//! time = "2:00:00"
//! cpus_per_task = 8
//! oarsub = ["-t", "besteffort"]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One resource profile, after merging files and overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `local`, `slurm` or `oar`.
    pub backend: Option<String>,
    pub partition: Option<String>,
    /// Walltime, as Slurm writes it (checked by [`parse_time`]).
    pub time: Option<String>,
    pub nodes: Option<u32>,
    pub ntasks: Option<u32>,
    pub cpus_per_task: Option<u32>,
    /// Memory per node, as Slurm writes it (checked by [`parse_size`]).
    pub mem: Option<String>,
    pub gpus: Option<String>,
    pub gres: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub reservation: Option<String>,
    pub constraint: Option<String>,
    /// Extra `#SBATCH` options, one per item (e.g. `"--exclusive"`).
    #[serde(default)]
    pub sbatch: Vec<String>,
    /// OAR's queue (`oarsub -q`); Slurm's partition when `partition` is unset.
    pub queue: Option<String>,
    /// OAR's project (`oarsub --project`); Slurm's account when `account` is unset.
    pub project: Option<String>,
    /// OAR's resource properties, an SQL expression (`oarsub -p`, e.g. `"cluster='dahu'"`).
    pub properties: Option<String>,
    /// Extra `oarsub` arguments, one per item (e.g. `"-t"`, `"besteffort"`).
    #[serde(default)]
    pub oarsub: Vec<String>,
    /// Shell lines run in the job before the agent (e.g. `module load python`).
    pub prologue: Option<String>,
    /// Environment variables set in the job (not secrets: the script is readable).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where the proxy listens for its agent (`0.0.0.0:0` by default for batch backends).
    pub link_bind: Option<String>,
    /// The address the agent dials (default: this host's name and the bound port).
    pub link_advertise: Option<String>,
    /// Seconds before the walltime at which Slurm sends the job SIGUSR1
    /// (`--signal=B:USR1@N`), for a run to save and stop [default: a tenth
    /// of `time`, 30 s to 10 min].
    pub walltime_signal: Option<u32>,
    /// The kernelspec a target of this profile runs (`%%noyau on`), when it
    /// is not the notebook's own (e.g. `ir` for R cells in a Python notebook).
    pub kernel: Option<String>,
}

/// The backends a profile may name.
pub const BACKENDS: &[&str] = &["local", "slurm", "oar"];

/// The batch schedulers, of which a config file's `scheduler` names one.
pub const SCHEDULERS: &[&str] = &["slurm", "oar"];

/// The keys a profile may hold, for suggestions and `-o`.
pub const KEYS: &[&str] = &[
    "backend",
    "partition",
    "time",
    "nodes",
    "ntasks",
    "cpus_per_task",
    "mem",
    "gpus",
    "gres",
    "account",
    "qos",
    "reservation",
    "constraint",
    "sbatch",
    "queue",
    "project",
    "properties",
    "oarsub",
    "prologue",
    "env",
    "link_bind",
    "link_advertise",
    "walltime_signal",
    "kernel",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no profile {name:?}{}; {}", suggest(name, known.iter().map(String::as_str)), available(known))]
    UnknownProfile { name: String, known: Vec<String> },
    #[error("profile {profile:?}: {message}")]
    Invalid { profile: String, message: String },
    #[error("-o {arg}: {message}")]
    Override { arg: String, message: String },
}

fn available(known: &[String]) -> String {
    if known.is_empty() {
        "no profile is defined (add [profiles.NAME] to ./noyau.toml or ~/.config/noyau/config.toml)"
            .into()
    } else {
        format!("defined profiles: {}", known.join(", "))
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The site's batch scheduler, see [`Config::scheduler`].
    scheduler: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
    /// The kernel's environment: read and checked by noyau-env, not here.
    #[serde(default, rename = "environment")]
    _environment: Option<toml::Value>,
    #[serde(default)]
    dask: Option<DaskSettings>,
}

/// `[dask]`: defaults for `%noyau dask up` (its flags win). Checked where
/// they are used, with the flags.
///
/// ```toml
/// [dask]
/// target = "hpc"          # the profile the jobs come from
/// workers = 4             # or: adapt = [0, 20]
/// worker_cores = 2
/// worker_mem = "4G"
/// worker_time = "1:00:00" # workers retire before it and are replaced
/// nanny = false           # true: workers under Dask's nanny (Client.restart())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaskSettings {
    pub target: Option<String>,
    pub workers: Option<u32>,
    /// `[MIN, MAX]`.
    pub adapt: Option<[u32; 2]>,
    pub worker_cores: Option<u32>,
    pub worker_mem: Option<String>,
    pub worker_time: Option<String>,
    pub nanny: Option<bool>,
}

impl DaskSettings {
    /// Key by key, `later` wins; `workers` and `adapt` replace each other.
    fn merge(&mut self, later: DaskSettings) {
        if later.workers.is_some() || later.adapt.is_some() {
            self.workers = later.workers;
            self.adapt = later.adapt;
        }
        macro_rules! take {
            ($($f:ident),*) => { $( if later.$f.is_some() { self.$f = later.$f; } )* };
        }
        take!(target, worker_cores, worker_mem, worker_time, nanny);
    }
}

/// A profile as one file writes it: every key optional, so layers merge.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    backend: Option<String>,
    partition: Option<String>,
    time: Option<String>,
    nodes: Option<u32>,
    ntasks: Option<u32>,
    cpus_per_task: Option<u32>,
    mem: Option<String>,
    gpus: Option<String>,
    gres: Option<String>,
    account: Option<String>,
    qos: Option<String>,
    reservation: Option<String>,
    constraint: Option<String>,
    sbatch: Option<Vec<String>>,
    queue: Option<String>,
    project: Option<String>,
    properties: Option<String>,
    oarsub: Option<Vec<String>>,
    prologue: Option<String>,
    env: Option<BTreeMap<String, String>>,
    link_bind: Option<String>,
    link_advertise: Option<String>,
    walltime_signal: Option<u32>,
    kernel: Option<String>,
}

impl Profile {
    fn merge(&mut self, r: RawProfile) {
        macro_rules! take {
            ($($f:ident),*) => { $( if r.$f.is_some() { self.$f = r.$f; } )* };
        }
        take!(
            backend,
            partition,
            time,
            nodes,
            ntasks,
            cpus_per_task,
            mem,
            gpus,
            gres,
            account,
            qos,
            reservation,
            constraint,
            queue,
            project,
            properties,
            prologue,
            link_bind,
            link_advertise,
            walltime_signal,
            kernel
        );
        if let Some(s) = r.sbatch {
            self.sbatch = s;
        }
        if let Some(s) = r.oarsub {
            self.oarsub = s;
        }
        if let Some(env) = r.env {
            self.env.extend(env);
        }
    }

    /// Applies one `key=value` override. `env.NAME=value` sets a variable;
    /// `sbatch=--opt` adds an extra line.
    pub fn apply_override(&mut self, arg: &str) -> Result<(), ConfigError> {
        let err = |message: String| ConfigError::Override {
            arg: arg.into(),
            message,
        };
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| err("expected key=value".into()))?;
        let (key, value) = (key.trim(), value.trim().to_string());
        if let Some(var) = key.strip_prefix("env.") {
            if var.is_empty() {
                return Err(err("expected env.NAME=value".into()));
            }
            self.env.insert(var.into(), value);
            return Ok(());
        }
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| err(format!("{key} must be a whole number, not {v:?}")))
        };
        let s = Some(value.clone());
        match key {
            "backend" => self.backend = s,
            "partition" => self.partition = s,
            "time" => self.time = s,
            "nodes" => self.nodes = Some(num(&value)?),
            "ntasks" => self.ntasks = Some(num(&value)?),
            "cpus_per_task" => self.cpus_per_task = Some(num(&value)?),
            "mem" => self.mem = s,
            "gpus" => self.gpus = s,
            "gres" => self.gres = s,
            "account" => self.account = s,
            "qos" => self.qos = s,
            "reservation" => self.reservation = s,
            "constraint" => self.constraint = s,
            "sbatch" => self.sbatch.push(value),
            "queue" => self.queue = s,
            "project" => self.project = s,
            "properties" => self.properties = s,
            "oarsub" => self.oarsub.push(value),
            "prologue" => self.prologue = s,
            "link_bind" => self.link_bind = s,
            "link_advertise" => self.link_advertise = s,
            "walltime_signal" => self.walltime_signal = Some(num(&value)?),
            "kernel" => self.kernel = s,
            other => {
                return Err(err(format!(
                    "unknown key `{other}`{}; valid keys: {}, env.NAME",
                    suggest(other, KEYS.iter().copied()),
                    KEYS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// Checks what can be checked without the scheduler.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            profile: name.into(),
            message,
        };
        if let Some(b) = &self.backend {
            if !BACKENDS.contains(&b.as_str()) {
                return Err(bad(format!(
                    "backend {b:?} is not known{}; backends: {}",
                    suggest(b, BACKENDS.iter().copied()),
                    BACKENDS.join(", ")
                )));
            }
        }
        if let Some(t) = &self.time {
            parse_time(t).map_err(|e| bad(format!("time: {e}")))?;
        }
        if let Some(m) = &self.mem {
            parse_size(m).map_err(|e| bad(format!("mem: {e}")))?;
        }
        for (k, v) in [
            ("nodes", self.nodes),
            ("ntasks", self.ntasks),
            ("cpus_per_task", self.cpus_per_task),
        ] {
            if v == Some(0) {
                return Err(bad(format!("{k} must be at least 1")));
            }
        }
        for line in &self.sbatch {
            if !line.trim_start().starts_with('-') {
                return Err(bad(format!(
                    "sbatch: {line:?} is not an option (write e.g. \"--exclusive\" or \"--licenses=matlab\")"
                )));
            }
            if line.contains('\n') {
                return Err(bad("sbatch: one option per item, without newlines".into()));
            }
        }
        for k in self.env.keys() {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(bad(format!("env: {k:?} is not a variable name")));
            }
            if k.starts_with("NOYAU_LINK_") {
                return Err(bad(format!("env: {k} is set by noyau itself")));
            }
        }
        for (k, v) in [
            ("partition", &self.partition),
            ("account", &self.account),
            ("qos", &self.qos),
            ("reservation", &self.reservation),
            ("constraint", &self.constraint),
            ("gpus", &self.gpus),
            ("gres", &self.gres),
            ("queue", &self.queue),
            ("project", &self.project),
        ] {
            if let Some(v) = v {
                if v.is_empty() || v.contains(char::is_whitespace) {
                    return Err(bad(format!("{k}: {v:?} must be one word")));
                }
            }
        }
        Ok(())
    }

    /// Checks that every key set means something on `backend` (`local`
    /// ignores the scheduler keys): a Slurm-only key on OAR or an OAR-only
    /// key on Slurm is an error naming the key and what to write instead.
    pub fn check_for(&self, backend: &str) -> Result<(), String> {
        let set = |k: &str| match k {
            "mem" => self.mem.is_some(),
            "gpus" => self.gpus.is_some(),
            "gres" => self.gres.is_some(),
            "qos" => self.qos.is_some(),
            "reservation" => self.reservation.is_some(),
            "constraint" => self.constraint.is_some(),
            "sbatch" => !self.sbatch.is_empty(),
            "properties" => self.properties.is_some(),
            "oarsub" => !self.oarsub.is_empty(),
            _ => false,
        };
        let (foreign, hint): (&[&str], &str) = match backend {
            "oar" => (
                &["mem", "gpus", "gres", "qos", "reservation", "constraint", "sbatch"],
                "OAR allocates whole resources (memory comes with the cores): select \
                 nodes with `properties` (e.g. properties = \"gpu_count > 0\") and pass other \
                 oarsub options in `oarsub`",
            ),
            "slurm" => (
                &["properties", "oarsub"],
                "on Slurm, select nodes with `constraint` and pass other sbatch options in `sbatch`",
            ),
            _ => return Ok(()),
        };
        let bad: Vec<&str> = foreign.iter().copied().filter(|k| set(k)).collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{} {} no meaning on {}; {hint}",
            bad.join(", "),
            if bad.len() == 1 { "has" } else { "have" },
            if backend == "oar" { "OAR" } else { "Slurm" },
        ))
    }

    /// The walltime in seconds, when one is set (and valid).
    pub fn time_secs(&self) -> Option<u64> {
        self.time.as_deref().and_then(|t| parse_time(t).ok())
    }
}

/// Profiles loaded from the config files.
#[derive(Debug, Default, Clone)]
pub struct Config {
    profiles: BTreeMap<String, Profile>,
    /// `[dask]`, merged over the files.
    pub dask: DaskSettings,
    /// The site's batch scheduler (top-level `scheduler = "slurm"|"oar"`,
    /// the last file that sets it wins): what `noyau ps`, `cancel` and
    /// `extend` ask when not told.
    pub scheduler: Option<String>,
    /// The files read, in order.
    pub sources: Vec<PathBuf>,
}

/// The files noyau reads, in order (later wins); they need not exist.
pub fn default_paths(cwd: &Path) -> Vec<PathBuf> {
    let system = std::env::var_os("NOYAU_SYSTEM_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/etc/noyau/config.toml".into());
    let mut v = vec![system];
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(x) = xdg {
        v.push(x.join("noyau").join("config.toml"));
    }
    v.push(cwd.join("noyau.toml"));
    v
}

impl Config {
    /// Reads the system, user and project files.
    pub fn load(cwd: &Path) -> Result<Self, ConfigError> {
        Self::load_from(&default_paths(cwd))
    }

    pub fn load_from(paths: &[PathBuf]) -> Result<Self, ConfigError> {
        let mut c = Config::default();
        for p in paths {
            let text = match std::fs::read_to_string(p) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: p.clone(),
                        source,
                    })
                }
            };
            c.add_str(p, &text)?;
        }
        Ok(c)
    }

    /// Adds one file's text (named `path` in errors).
    pub fn add_str(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::File {
            path: path.into(),
            message: explain(&e),
        })?;
        if let Some(sched) = file.scheduler {
            if !SCHEDULERS.contains(&sched.as_str()) {
                return Err(ConfigError::File {
                    path: path.into(),
                    message: format!(
                        "scheduler {sched:?} is not a batch scheduler noyau knows{}; schedulers: {}",
                        suggest(&sched, SCHEDULERS.iter().copied()),
                        SCHEDULERS.join(", ")
                    ),
                });
            }
            self.scheduler = Some(sched);
        }
        for (name, raw) in file.profiles {
            self.profiles.entry(name).or_default().merge(raw);
        }
        if let Some(d) = file.dask {
            self.dask.merge(d);
        }
        self.sources.push(path.into());
        Ok(())
    }

    pub fn names(&self) -> Vec<String> {
        self.profiles.keys().cloned().collect()
    }

    /// The named profile (or an empty one for `None`) with the overrides
    /// applied, validated.
    pub fn profile(
        &self,
        name: Option<&str>,
        overrides: &[String],
    ) -> Result<Profile, ConfigError> {
        let mut p = match name {
            None => Profile::default(),
            Some(n) => {
                self.profiles
                    .get(n)
                    .cloned()
                    .ok_or_else(|| ConfigError::UnknownProfile {
                        name: n.into(),
                        known: self.names(),
                    })?
            }
        };
        for o in overrides {
            p.apply_override(o)?;
        }
        p.validate(name.unwrap_or("(none)"))?;
        Ok(p)
    }
}

/// What the command line and the config files in effect at the current
/// directory say: the profile `name` (none: an empty one) with `overrides`,
/// and the backend (`backend` if given, else the profile's, else `local`).
pub fn resolve(
    backend: Option<&str>,
    name: Option<&str>,
    overrides: &[String],
) -> Result<(String, Profile), ConfigError> {
    let cwd = std::env::current_dir().map_err(|source| ConfigError::Read {
        path: ".".into(),
        source,
    })?;
    let profile = Config::load(&cwd)?.profile(name, overrides)?;
    let backend = backend
        .map(str::to_string)
        .or_else(|| profile.backend.clone())
        .unwrap_or_else(|| "local".into());
    Ok((backend, profile))
}

/// toml's message with its position, plus the closest valid key for an unknown one.
fn explain(e: &toml::de::Error) -> String {
    let mut s = e.to_string().trim_end().to_string();
    let msg = e.message();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some(word) = rest.split('`').next() {
            let cands: Vec<&str> = if msg.contains("`profiles`") {
                vec!["profiles"]
            } else {
                KEYS.to_vec()
            };
            let hint = suggest(word, cands.iter().copied());
            if !hint.is_empty() {
                s.push_str(&format!("\n{}", hint.trim_start_matches(", ")));
            }
        }
    }
    s
}

/// Seconds in a Slurm time: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
/// `D-HH:MM:SS`; `UNLIMITED`/`INFINITE` are 0 (no limit).
pub fn parse_time(t: &str) -> Result<u64, String> {
    let t = t.trim();
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("infinite") {
        return Ok(0);
    }
    let help = || {
        format!(
            "{t:?} is not a Slurm time; write MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. \"90\", \"1:30:00\", \"2-00:00:00\")"
        )
    };
    let num = |s: &str| -> Result<u64, String> {
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
        return Err(format!("{}: minutes and seconds must be below 60", help()));
    }
    if secs == 0 {
        return Err(format!("{t:?} is a zero walltime"));
    }
    Ok(secs)
}

/// Megabytes in a Slurm size: a number with an optional unit K, M, G or T
/// (case-insensitive, an optional trailing B); no unit means megabytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let help = || format!("{s:?} is not a size; write e.g. \"500M\", \"4G\" or \"1T\"");
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
        return Err(format!("{s:?} is no memory at all"));
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

    fn cfg(files: &[&str]) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        for (i, f) in files.iter().enumerate() {
            c.add_str(Path::new(&format!("file{i}.toml")), f)?;
        }
        Ok(c)
    }

    #[test]
    fn later_files_win_key_by_key() {
        let c = cfg(&[
            "[profiles.a]\npartition = \"debug\"\ntime = \"10\"\nenv = { A = \"1\" }\n",
            "[profiles.a]\ntime = \"20\"\nenv = { B = \"2\" }\n",
        ])
        .unwrap();
        let p = c.profile(Some("a"), &[]).unwrap();
        assert_eq!(p.partition.as_deref(), Some("debug"));
        assert_eq!(p.time.as_deref(), Some("20"));
        assert_eq!(p.env.len(), 2);
        let p = c
            .profile(
                Some("a"),
                &[
                    "partition=batch".into(),
                    "env.C=3".into(),
                    "cpus_per_task=4".into(),
                ],
            )
            .unwrap();
        assert_eq!(p.partition.as_deref(), Some("batch"));
        assert_eq!(p.cpus_per_task, Some(4));
        assert_eq!(p.env["C"], "3");
    }

    #[test]
    fn the_site_scheduler_is_the_last_file_that_names_one() {
        let c = cfg(&[
            "scheduler = \"slurm\"\n",
            "[profiles.a]\n",
            "scheduler = \"oar\"\n",
        ]);
        assert_eq!(c.unwrap().scheduler.as_deref(), Some("oar"));
        assert_eq!(cfg(&["[profiles.a]\n"]).unwrap().scheduler, None);
        let e = cfg(&["scheduler = \"oarr\"\n"]).unwrap_err().to_string();
        assert!(
            e.contains("did you mean `oar`") && e.contains("slurm, oar"),
            "{e}"
        );
        let e = cfg(&["scheduler = \"local\"\n"]).unwrap_err().to_string();
        assert!(e.contains("not a batch scheduler"), "{e}");
    }

    #[test]
    fn unknown_key_has_position_and_suggestion() {
        let e = cfg(&["[profiles.a]\npartiton = \"debug\"\n"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("file0.toml"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("did you mean `partition`?"), "{e}");
        let e = Profile::default()
            .apply_override("cpus-per-task=2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `cpus_per_task`?"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let c = cfg(&["[profiles.a]\ntime = \"1h\"\n[profiles.b]\nmem = \"lots\"\n"]).unwrap();
        let e = c.profile(Some("a"), &[]).unwrap_err().to_string();
        assert!(
            e.contains("profile \"a\": time:") && e.contains("HH:MM:SS"),
            "{e}"
        );
        let e = c.profile(Some("b"), &[]).unwrap_err().to_string();
        assert!(e.contains("mem:") && e.contains("4G"), "{e}");
        let e = c.profile(Some("x"), &[]).unwrap_err().to_string();
        assert!(e.contains("defined profiles: a, b"), "{e}");
        let e = c
            .profile(Some("a"), &["nodes=two".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole number"), "{e}");
        let e = cfg(&["[profiles.a]\nnodes = \"2\"\n"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn keys_are_checked_against_the_scheduler() {
        let c = cfg(&["[profiles.p]\ntime = \"1:00:00\"\ncpus_per_task = 4\npartition = \"debug\"\n\
                       [profiles.s]\nmem = \"4G\"\nsbatch = [\"--exclusive\"]\n\
                       [profiles.o]\nproperties = \"host='a'\"\noarsub = [\"-t\", \"besteffort\"]\n"])
        .unwrap();
        let p = c.profile(Some("p"), &[]).unwrap();
        for b in ["local", "slurm", "oar"] {
            assert_eq!(p.check_for(b), Ok(()), "{b}");
        }
        let s = c.profile(Some("s"), &[]).unwrap();
        assert_eq!(s.check_for("slurm"), Ok(()));
        let e = s.check_for("oar").unwrap_err();
        assert!(e.starts_with("mem, sbatch have no meaning on OAR"), "{e}");
        assert!(e.contains("properties"), "{e}");
        let o = c.profile(Some("o"), &[]).unwrap();
        assert_eq!(o.check_for("oar"), Ok(()));
        let e = o.check_for("slurm").unwrap_err();
        assert!(
            e.starts_with("properties, oarsub have no meaning on Slurm"),
            "{e}"
        );
        let e = c
            .profile(Some("p"), &["backend=oarr".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `oar`"), "{e}");
    }

    #[test]
    fn xdg_config_home_is_respected() {
        let d = tempfile::tempdir().unwrap();
        let paths = default_paths(d.path());
        assert_eq!(paths.last().unwrap(), &d.path().join("noyau.toml"));
    }

    #[test]
    fn dask_settings_merge_and_unknown_keys_are_named() {
        let c = cfg(&[
            "[dask]\ntarget = \"hpc\"\nworkers = 4\nworker_mem = \"2G\"\n",
            "[dask]\nadapt = [0, 8]\nworker_time = \"30\"\nnanny = true\n",
        ])
        .unwrap();
        assert_eq!(
            c.dask,
            DaskSettings {
                target: Some("hpc".into()),
                workers: None,
                adapt: Some([0, 8]),
                worker_cores: None,
                worker_mem: Some("2G".into()),
                worker_time: Some("30".into()),
                nanny: Some(true),
            }
        );
        let e = cfg(&["[dask]\nworker = 2\n"]).unwrap_err().to_string();
        assert!(e.contains("worker"), "{e}");
    }
}
