//! Resource profiles: loading them from the config files.
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
//! The keys, what each means on each scheduler and how it translates, are
//! noyau-sched's ([`Profile`], each scheduler's file declaring its own):
//! this crate reads the files, merges them and applies the overrides. A
//! top-level `scheduler = "oar"` (typically in the system file) names the
//! site's scheduler for the commands about jobs (`noyau ps`, `cancel`,
//! `extend`).
//!
//! A top-level `concurrent_submissions = 4` says how many scheduler
//! commands that submit or cancel jobs one user runs at once on a host,
//! across all of their noyau processes (1 to 64, default 4): in the system
//! or the user's file only (a project's is ignored, with a warning).
//!
//! A top-level `trusted_projects = ["/scratch/team/project"]`, in the
//! system or the user's file only, names directories whose `noyau.toml`
//! is read whoever wrote it. Elsewhere a project's file is read only if it
//! is a regular file that the user or root owns and that no one else can
//! write; the site's and the user's files must be so too (see [`files`]).
//! Only the user's own entries also trust a project's code (a wildcard
//! `DIR/*` only over directories no one else could have written: see
//! [`trusted`]). A project's file whose directory is not so trusted may
//! choose resources but not code: its profiles may not set `prologue`,
//! `env` (but thread counts, `OMP_NUM_THREADS = "8"`…) or a scheduler's
//! options (`sbatch`, `oarsub`, `qsub`): see `code_key`.
//! Such a profile is refused when it is used ([`Config::profile`]), not
//! when the file is read: its other profiles, and commands that use none
//! (`noyau ps`, `cancel`, `extend`), still work there.
//!
//! A top-level `[idle]` table says when an idle allocation is given back
//! ([`IdleLimits`]): the site's default in the system file, the user's
//! own in theirs.
//!
//! ```toml
//! [idle]
//! kernel = "1:00:00"   # a batch kernel's own job (default 1 h; "off": kept)
//! target = "30:00"     # a `%%noyau on` target's job (default 30 min)
//!
//! [profiles.gpu]
//! backend = "slurm"
//! partition = "gpu"
//! time = "2:00:00"
//! cpus_per_task = 8
//! mem = "32G"
//! gpus = "1"
//! prologue = "module load cuda"
//! env = { OMP_NUM_THREADS = "8" }
//!
//! [profiles.oar-big]
//! backend = "oar"
//! queue = "default"
//! project = "myproject"
//! properties = "cluster='dahu'"
//! walltime = "2:00:00"
//! cpus_per_task = 8
//! ```

mod files;
mod trust;
mod trusted;

use noyau_vars::EnvVars;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use noyau_sched::Given;
use noyau_trust::anchor::ProjectDir;
use serde::Deserialize;
use toml::Spanned;

pub use files::{MAX_LOCK_SIZE, MAX_SIZE};
pub use noyau_sched::{parse_size, parse_time, suggest, Profile, ProfileError};
pub use trust::trust_project;
pub use trusted::{CodeTrust, TrustedProjects};

use files::Origin;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The site's or the user's file is not one only they could have written.
    #[error(transparent)]
    Untrusted(noyau_trust::TrustError),
    /// A project's file another user could have written, in a directory
    /// not in `trusted_projects`; `fix` says the ways out.
    #[error("{} {problem}: {fix}", path.display())]
    UntrustedProject {
        path: PathBuf,
        problem: noyau_trust::Problem,
        fix: String,
    },
    /// A project's file that is a link leading out of its directory
    /// (read whoever wrote it, under `trusted_projects`): what it leads to
    /// may be a file of the user's that an error would show.
    #[error(
        "{} is a link that leads out of its directory ({}), or an absolute link: noyau does \
         not read a project's file from elsewhere; put the file itself in the directory (a \
         link to a file in it must be relative: `ln -sr`)",
        path.display(),
        dir.display()
    )]
    LinkOut { path: PathBuf, dir: PathBuf },
    /// A profile key of an untrusted project's file that makes noyau run
    /// what the file says ([`code_key`]).
    #[error(transparent)]
    UntrustedProjectKey(Box<UntrustedKey>),
    /// A profile key a notebook cell's `%%noyau on T key=value` word may
    /// not set: it names code ([`code_key`]) and the notebook's directory
    /// is not trusted.
    #[error(
        "%%noyau on … {key}=…: a notebook cell may not set `{key}` ({why}), unless you trust \
         the notebook's directory. Put it in this profile in your own config file \
         ({user_file}), or, if you trust everyone who can write in {dir}, run \
         `noyau trust {dir}`{}",
        spaced(note),
        dir = dir.display()
    )]
    CellKey {
        key: String,
        why: String,
        /// Why the entries that name the directory do not trust it
        /// ([`CodeTrust::note`]).
        note: String,
        /// The notebook's directory, the one to trust.
        dir: PathBuf,
        /// The user's config file, or how it is found.
        user_file: String,
    },
    /// A file the user named that is not a regular file (a FIFO, a device).
    #[error("{} {problem}: noyau reads only a regular file there", path.display())]
    NotAFile {
        path: PathBuf,
        problem: noyau_trust::Problem,
    },
    #[error("{} is {size} bytes, more than noyau reads from such a file ({limit} bytes): is it the file you meant?", path.display())]
    TooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("no profile {name:?}{}; {}", suggest(name, known.iter().map(String::as_str)), available(known))]
    UnknownProfile { name: String, known: Vec<String> },
    #[error("profile {profile:?}: {message}")]
    Invalid { profile: String, message: String },
    #[error("-o {arg}: {message}")]
    Override { arg: String, message: String },
}

/// A profile key of an untrusted project's file that makes noyau run
/// what the file says ([`code_key`]).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{}: [profiles.{profile}] {key} ({at}): {why}. The project's directory is not trusted, so \
     its noyau.toml may choose resources, not code to run. If you trust everyone who can \
     write in {dir}, run `noyau trust {dir}` (it adds `trusted_projects = [\"{dir}\"]` to \
     {user_file}); or set this profile in {user_file} yourself{}",
    path.display(), spaced(note), dir = dir.display()
)]
pub struct UntrustedKey {
    pub path: PathBuf,
    pub profile: String,
    pub key: String,
    /// `line L, column C`.
    pub at: String,
    pub why: String,
    /// Why the entries that name the directory do not trust it
    /// ([`CodeTrust::note`]).
    pub note: String,
    /// The project's directory, the one to trust.
    pub dir: PathBuf,
    /// The user's config file, or how it is found.
    pub user_file: String,
}

/// `note` as the last sentence of a message: after a `.` and a space,
/// or nothing.
pub fn spaced(note: &str) -> String {
    if note.is_empty() {
        String::new()
    } else {
        format!(". {note}")
    }
}

fn available(known: &[String]) -> String {
    if known.is_empty() {
        "no profile is defined (add [profiles.NAME] to ./noyau.toml or ~/.config/noyau/config.toml)"
            .into()
    } else {
        format!("defined profiles: {}", known.join(", "))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The site's batch scheduler, see [`Config::scheduler`].
    scheduler: Option<String>,
    /// See [`Config::concurrent_submissions`].
    concurrent_submissions: Option<i64>,
    /// See [`Config::trusted_projects`].
    trusted_projects: Option<Vec<String>>,
    #[serde(default)]
    profiles: BTreeMap<String, BTreeMap<Spanned<String>, Spanned<toml::Value>>>,
    /// The kernel's environment: read and checked by noyau-env, not here.
    #[serde(default, rename = "environment")]
    _environment: Option<toml::Value>,
    /// Data files pinned by hash: read and checked by noyau-env, not here.
    #[serde(default, rename = "data")]
    _data: Option<toml::Value>,
    #[serde(default)]
    dask: Option<DaskSettings>,
    #[serde(default)]
    idle: Option<IdleFile>,
}

/// `[idle]` as written: Slurm times, or `"off"` (values of any other type
/// are refused by [`parse_idle_value`], saying how to write them).
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table: [idle] with kernel = \"1:00:00\" and target = \"30:00\" (Slurm times, or \"off\")"
)]
struct IdleFile {
    kernel: Option<toml::Value>,
    target: Option<toml::Value>,
}

/// How long an allocation may stay idle before it is given back; None:
/// never. The kernel's own job is only ever released on a batch scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleLimits {
    pub kernel: Option<std::time::Duration>,
    pub target: Option<std::time::Duration>,
}

impl Default for IdleLimits {
    /// A kernel's job after 1 h (what a centre's idle culler commonly
    /// uses), a target's after 30 min (a second allocation, often bigger).
    fn default() -> Self {
        IdleLimits {
            kernel: Some(std::time::Duration::from_secs(3600)),
            target: Some(std::time::Duration::from_secs(1800)),
        }
    }
}

/// An idle limit: `"off"` (or a zero time) is none, else a Slurm time.
pub fn parse_idle(v: &str) -> Result<Option<std::time::Duration>, String> {
    let v = v.trim();
    let zero = !v.is_empty() && v.chars().all(|c| matches!(c, '0' | ':' | '-'));
    if v.eq_ignore_ascii_case("off") || zero {
        return Ok(None);
    }
    match parse_time(v) {
        Ok(0) => Ok(None),
        Ok(secs) => Ok(Some(std::time::Duration::from_secs(secs))),
        Err(e) => Err(format!("{}, or \"off\"", e.message)),
    }
}

/// `[idle] KEY = VALUE`: a string as [`parse_idle`] reads it; a number
/// is refused, since a bare number is minutes in a Slurm time and seconds
/// in hub.toml's `idle_timeout`: the user says which.
fn parse_idle_value(key: &str, v: &toml::Value) -> Result<Option<std::time::Duration>, String> {
    match v {
        toml::Value::String(s) => parse_idle(s).map_err(|e| format!("[idle] {key}: {e}")),
        other => Err(format!(
            "[idle] {key} = {other}: write the time as a string, e.g. \"1:00:00\" (HH:MM:SS) \
             or \"60\" (minutes), or \"off\""
        )),
    }
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
/// scheduler_cores = 1     # the scheduler job's own allocation (default 1 core,
/// scheduler_mem = "1G"    # 1G where the scheduler takes a memory key)
/// scheduler_profile = "small"  # or a profile for the scheduler job
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
    pub scheduler_cores: Option<u32>,
    pub scheduler_mem: Option<String>,
    pub scheduler_profile: Option<String>,
}

/// `[dask]`'s keys, for suggestions.
const DASK_KEYS: [&str; 10] = [
    "target",
    "workers",
    "adapt",
    "worker_cores",
    "worker_mem",
    "worker_time",
    "nanny",
    "scheduler_cores",
    "scheduler_mem",
    "scheduler_profile",
];

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
        take!(
            target,
            worker_cores,
            worker_mem,
            worker_time,
            nanny,
            scheduler_cores,
            scheduler_mem,
            scheduler_profile
        );
    }
}

/// One value of a profile table, as noyau-sched takes it.
fn given(v: &toml::Value) -> Result<Given, String> {
    let text = |v: &toml::Value| v.as_str().map(str::to_string);
    Ok(match v {
        toml::Value::String(s) => Given::Text(s.clone()),
        toml::Value::Integer(n) => Given::Number(*n),
        toml::Value::Array(a) => Given::Texts(
            a.iter()
                .map(text)
                .collect::<Option<_>>()
                .ok_or("a list of text is expected")?,
        ),
        toml::Value::Table(t) => Given::Table(
            t.iter()
                .map(|(k, v)| Some((k.clone(), text(v)?)))
                .collect::<Option<_>>()
                .ok_or("a table of text is expected")?,
        ),
        other => {
            return Err(format!(
                "{} is not a value a profile key takes",
                other.type_str()
            ))
        }
    })
}

/// `line L, column C` of byte `at` in `text`.
fn position(text: &str, at: usize) -> String {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}")
}

/// Why profile key `key` names code that noyau runs outside any sandbox
/// (in the job before its agent and kernel, or the scheduler's submit
/// command), or None when it only chooses resources: what a project's
/// file may set only if the user trusts its directory. A profile's
/// `environment` is not here: noyau-env holds it to the rules of a
/// project's `[environment]` (see [`Profile::environment_from`]).
fn code_key(key: &noyau_sched::Key) -> Option<String> {
    use noyau_sched::Kind;
    match (key.name, key.kind) {
        ("prologue", _) => Some(
            "its shell lines run in the job before noyau's agent and the kernel, outside any \
             sandbox"
                .into(),
        ),
        ("env", _) => Some(format!(
            "its variables are set for noyau's agent and the kernel before they start, outside \
             any sandbox, and a variable can name code to run (LD_PRELOAD, PATH, PYTHONPATH, \
             BASH_ENV, NOYAU_DASK_PYTHON…); only thread counts ({} = a whole number) are a \
             project's to set",
            THREAD_VARS.join(", ")
        )),
        (name, Kind::Options | Kind::Args) => Some(format!(
            "its items go as they are to the scheduler's submit command (`{name}` options), \
             which can name a script to run, a file of yours to overwrite or variables to export"
        )),
        _ => None,
    }
}

/// The variables a project's profile, or a cell, may set without trust:
/// thread counts, whose value is a number that names nothing to run.
const THREAD_VARS: [&str; 4] = [
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
];

/// Whether `NAME=value` is a thread count ([`THREAD_VARS`], a whole
/// number of at most four digits).
fn thread_count(name: &str, value: &str) -> bool {
    THREAD_VARS.contains(&name)
        && (1..=4).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a profile's `env` table holds thread counts only (a number
/// not written as a string is one too: [`given`] then says how to write it).
fn thread_counts_only(env: &toml::Value) -> bool {
    env.as_table().is_some_and(|t| {
        t.iter().all(|(k, v)| match v {
            toml::Value::String(v) => thread_count(k, v),
            toml::Value::Integer(n) => thread_count(k, &n.to_string()),
            _ => false,
        })
    })
}

/// Sets one file's `[profiles.NAME]` table over `p`; an error names the
/// key's position.
fn merge_table(
    p: &mut Profile,
    name: &str,
    table: &BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    text: &str,
) -> Result<(), String> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (k, v) in table {
        let at = |span: std::ops::Range<usize>| position(text, span.start);
        let key = k.get_ref();
        if let Some(canon) = noyau_sched::canonical_key(key) {
            if let Some(other) = seen.insert(canon, key) {
                return Err(format!(
                    "{}: [profiles.{name}] {other} and {key} are the same key; keep one",
                    at(k.span())
                ));
            }
        }
        // A target's environment is noyau-env's table, checked there: it
        // travels as JSON text.
        let value = match v.get_ref() {
            toml::Value::Table(t) if noyau_sched::canonical_key(key) == Some("environment") => {
                Given::Text(serde_json::to_string(t).unwrap_or_default())
            }
            other => given(other).map_err(|e| format!("{}: {key}: {e}", at(v.span())))?,
        };
        p.set(key, value).map_err(|e| {
            let span = if e.message.starts_with("unknown key") {
                k.span()
            } else {
                v.span()
            };
            format!("{}: [profiles.{name}] {e}", at(span))
        })?;
    }
    Ok(())
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
    /// How many scheduler commands that submit or cancel jobs one user
    /// runs at once on a host (top-level `concurrent_submissions = 4`, the
    /// last of the system and user files that sets it wins; see
    /// noyau-sched's `throttle`).
    pub concurrent_submissions: Option<usize>,
    /// `[idle]`, key by key over the defaults.
    pub idle: IdleLimits,
    /// The directories whose project file is read whoever wrote it, and
    /// whose code is trusted (top-level `trusted_projects`, the system's
    /// and the user's lists, each entry knowing whose it is; a project's
    /// own is ignored).
    pub trusted_projects: TrustedProjects,
    /// The profiles of an untrusted project's file that name code, by
    /// name: refused when used ([`Config::profile`]), not when the file is
    /// read, so a command or kernel that uses another profile, or none,
    /// still works there.
    refused: BTreeMap<String, UntrustedKey>,
    /// The files read, in order.
    pub sources: Vec<PathBuf>,
}

/// The project's file, in the working directory.
const PROJECT_FILE: &str = "noyau.toml";

/// The site's and the user's config files (not the project's), read in
/// this order: kept apart, since only the user's trusts a project's code
/// ([`trusted`]).
#[derive(Debug, Clone)]
pub struct SiteFiles {
    /// `/etc/noyau/config.toml`, or `$NOYAU_SYSTEM_CONFIG`.
    pub system: Option<PathBuf>,
    /// [`user_file`].
    pub user: Option<PathBuf>,
}

impl SiteFiles {
    /// The files in the order they are read, each with what its
    /// `trusted_projects` grants.
    fn each(&self) -> impl Iterator<Item = (&Path, trusted::Grantor)> {
        let system = self.system.as_deref().map(|p| (p, trusted::Grantor::Site));
        let user = self.user.as_deref().map(|p| (p, trusted::Grantor::User));
        system.into_iter().chain(user)
    }
}

#[cfg(test)]
impl SiteFiles {
    /// Only a user's file, at `user`.
    pub(crate) fn user_only(user: &Path) -> Self {
        SiteFiles {
            system: None,
            user: Some(user.into()),
        }
    }
}

/// The site's and the user's files, as the environment names them.
pub fn site_paths() -> SiteFiles {
    let system = std::env::var_os(EnvVars::NOYAU_SYSTEM_CONFIG)
        .map(PathBuf::from)
        .unwrap_or_else(|| "/etc/noyau/config.toml".into());
    SiteFiles {
        system: Some(system),
        user: user_path(&|name| std::env::var_os(name)),
    }
}

/// The user's file: `$XDG_CONFIG_HOME/noyau/config.toml`, else
/// `~/.config/noyau/config.toml`. A relative (or empty) `XDG_CONFIG_HOME`
/// is ignored, as the XDG Base Directory spec says, and so is such a
/// `HOME`: either would name a file in whatever directory noyau runs in.
fn user_path(var: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    noyau_vars::absolute(var(EnvVars::XDG_CONFIG_HOME))
        .or_else(|| noyau_vars::absolute(var(EnvVars::HOME)).map(|h| h.join(".config")))
        .map(|x| x.join("noyau").join("config.toml"))
}

/// The user's own config file (where `trusted_projects` goes), if `HOME`
/// or `XDG_CONFIG_HOME` names one: for messages that tell the user to
/// trust a project.
pub fn user_file() -> Option<PathBuf> {
    user_path(&|name| std::env::var_os(name))
}

/// The site's and the user's `trusted_projects`, read now, as
/// [`Config::load`] reads them (at each call, not cached: a running kernel
/// that was refused a project's code sees `noyau trust DIR` at its next
/// look, as the message says): whether the user trusts the code of a
/// project ([`TrustedProjects::code`]: what its noyau.toml and its
/// notebooks declare may name code that runs outside the sandbox while
/// their environment is prepared, noyau-env's `trust`), and the files it
/// names ([`TrustedProjects::read_named`]). Only the user's own
/// `trusted_projects` grants code ([`trusted`]). noyau-env's `merge`
/// reads them once for all its sources and the lock file it reads; the
/// readers of a project's noyau.toml ([`project_file`], [`Config::load`])
/// and of a file a source names read them again, each for itself.
pub fn trusted_projects() -> Result<TrustedProjects, ConfigError> {
    site_trusted(&site_paths())
}

/// The project file in `dir` (`dir/noyau.toml`), if there is one: its
/// path, its text, checked as [`Config::load`] checks it, and whether its
/// code is trusted, decided on what was read; for the other readers of
/// that file (noyau-env's `[environment]` and `[data]`).
pub fn project_file(dir: &ProjectDir) -> Result<Option<(PathBuf, String, CodeTrust)>, ConfigError> {
    let site = site_paths();
    let name = Path::new(PROJECT_FILE);
    let read = site_trusted(&site)?.read_in(dir, name, MAX_SIZE, false, site.user.as_deref())?;
    Ok(read.map(|(text, trust)| (dir.join(name), text, trust)))
}

/// The text of a file of a project's (at most `limit` bytes), checked as
/// its noyau.toml is, in the file's own directory: for a file the
/// project's `[environment]` names that noyau reads itself (`lock_file`)
/// in a spec the user's own code built, where no project was read: its
/// directory is anchored here.
pub fn project_text(path: &Path, limit: u64) -> Result<Option<String>, ConfigError> {
    let site = site_paths();
    let name = Path::new(path.file_name().unwrap_or_default());
    let dir = match ProjectDir::open(files::dir_of(path)) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.into(),
                source,
            })
        }
    };
    let read = site_trusted(&site)?.read_in(&dir, name, limit, false, site.user.as_deref())?;
    Ok(read.map(|(text, _)| text))
}

/// The text of a file the user named themselves (at most `limit` bytes),
/// None when there is none: whoever's it is, but a regular file, opened
/// without blocking (a FIFO is refused, not waited on), for `--env FILE`.
pub fn named_text(path: &Path, limit: u64) -> Result<Option<String>, ConfigError> {
    files::read(path, Origin::Named, limit)
}

/// The site files' `trusted_projects`, read at each call, as
/// [`Config::load`] reads them: a running kernel that was refused a
/// project's code sees `noyau trust DIR` at its next look, as the message
/// says. (Two small files: a few reads per kernel start or cell.)
fn site_trusted(site: &SiteFiles) -> Result<TrustedProjects, ConfigError> {
    Ok(Config::load_from(site)?.trusted_projects)
}

/// A project's file being read: whether its directory's code is trusted,
/// and what a refusal names.
struct ProjectFile {
    /// Its directory, resolved (the one to trust).
    dir: PathBuf,
    trusted: CodeTrust,
    /// The user's config file, where a profile of theirs would go.
    user_file: String,
}

impl ProjectFile {
    /// The first key of profile `name` that names code ([`code_key`]).
    fn code_in(
        &self,
        path: &Path,
        name: &str,
        table: &BTreeMap<Spanned<String>, Spanned<toml::Value>>,
        text: &str,
    ) -> Option<UntrustedKey> {
        for (k, v) in table {
            let Some(key) = noyau_sched::find_key(k.get_ref()) else {
                continue; // unknown: named by merge_table
            };
            if key.name == "env" && thread_counts_only(v.get_ref()) {
                continue;
            }
            if let Some(why) = code_key(&key) {
                return Some(UntrustedKey {
                    path: path.into(),
                    profile: name.into(),
                    key: k.get_ref().clone(),
                    at: position(text, k.span().start),
                    why,
                    note: self.trusted.note().into(),
                    dir: self.dir.clone(),
                    user_file: self.user_file.clone(),
                });
            }
        }
        None
    }
}

/// `concurrent_submissions` as the site's and the user's files say (a
/// project's file may not set it: see [`Config::load_with`]).
pub fn site_concurrent_submissions() -> Result<Option<usize>, ConfigError> {
    Ok(Config::load_from(&site_paths())?.concurrent_submissions)
}

impl Config {
    /// Reads the system, user and project files.
    pub fn load(cwd: &ProjectDir) -> Result<Self, ConfigError> {
        Self::load_in(&site_paths(), cwd, Path::new(PROJECT_FILE))
    }

    /// [`load_in`](Self::load_in) of the file `project`, its directory
    /// anchored now.
    #[cfg(test)]
    fn load_with(site: &SiteFiles, project: &Path) -> Result<Self, ConfigError> {
        let dir = files::dir_of(project);
        let dir = ProjectDir::open(dir).map_err(|source| ConfigError::Read {
            path: dir.into(),
            source,
        })?;
        Self::load_in(
            site,
            &dir,
            Path::new(project.file_name().unwrap_or_default()),
        )
    }

    /// Reads the `site` files then the project's `name` in `dir` (checked as
    /// [`files`] says, read whoever wrote it if its directory is in the
    /// site files' `trusted_projects`), whose `concurrent_submissions` and
    /// `trusted_projects` are ignored with a warning: a project's
    /// directory may be another user's, and the settings pace every
    /// command of the user's on the host and say whose files are trusted.
    fn load_in(site: &SiteFiles, dir: &ProjectDir, name: &Path) -> Result<Self, ConfigError> {
        let mut c = Self::load_from(site)?;
        let theirs = c.concurrent_submissions.take();
        let project = &dir.join(name);
        // Its code trusted on what was read (under a wildcard, the file
        // opened, not the one at its path afterwards).
        let read = c
            .trusted_projects
            .read_in(dir, name, MAX_SIZE, false, site.user.as_deref())?;
        if let Some((text, trusted)) = read {
            let author = ProjectFile {
                dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
                trusted,
                user_file: site.user.as_ref().map_or_else(
                    || "your config file (~/.config/noyau/config.toml)".into(),
                    |f| f.display().to_string(),
                ),
            };
            c.add(project, &text, Role::Project(&author))?;
        }
        if let Some(n) = std::mem::replace(&mut c.concurrent_submissions, theirs) {
            ignored_in_project(project, &format!("concurrent_submissions = {n}"));
        }
        Ok(c)
    }

    /// Reads the site's and the user's files, in order.
    pub fn load_from(site: &SiteFiles) -> Result<Self, ConfigError> {
        let mut c = Config::default();
        for (p, grantor) in site.each() {
            if let Some(text) = files::read(p, Origin::Site, MAX_SIZE)? {
                c.add(p, &text, Role::Site(grantor))?;
            }
        }
        Ok(c)
    }

    /// Adds one file's text (named `path` in errors), as the system's.
    #[cfg(test)]
    fn add_str(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        self.add(path, text, Role::Site(trusted::Grantor::Site))
    }

    /// Adds one file's text, whose file it is saying what it may set.
    fn add(&mut self, path: &Path, text: &str, role: Role<'_>) -> Result<(), ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::File {
            path: path.into(),
            // A project's file may be anyone's, or a link to one of the
            // user's (the banner would show its line): not quoted.
            message: explain(&e, text, !matches!(role, Role::Project(_))),
        })?;
        let bad = |message: String| ConfigError::File {
            path: path.into(),
            message,
        };
        if let Some(sched) = file.scheduler {
            let known = noyau_sched::schedulers();
            if !known.contains(&sched.as_str()) {
                return Err(bad(format!(
                    "scheduler {sched:?} is not a batch scheduler noyau knows{}; schedulers: {}",
                    suggest(&sched, known.iter().copied()),
                    known.join(", ")
                )));
            }
            self.scheduler = Some(sched);
        }
        if let Some(n) = file.concurrent_submissions {
            let n = noyau_sched::check_slots(n).map_err(|e| bad(e.to_string()))?;
            self.concurrent_submissions = Some(n);
        }
        match (file.trusted_projects, role) {
            (Some(dirs), Role::Site(grantor)) => {
                self.trusted_projects.extend(dirs, grantor).map_err(bad)?
            }
            (Some(_), Role::Project(_)) => ignored_in_project(path, "trusted_projects"),
            (None, _) => {}
        }
        let project = match role {
            Role::Project(p) => Some(p),
            Role::Site(_) => None,
        };
        for (name, table) in &file.profiles {
            let untrusted = project.filter(|p| !p.trusted.is_trusted());
            if let Some(refusal) = untrusted.and_then(|p| p.code_in(path, name, table, text)) {
                // Kept out of the profiles: nothing of it is used.
                self.refused.insert(name.clone(), refusal);
                continue;
            }
            let p = self.profiles.entry(name.clone()).or_default();
            merge_table(p, name, table, text).map_err(bad)?;
            let sets_environment = table
                .keys()
                .any(|k| noyau_sched::canonical_key(k.get_ref()) == Some("environment"));
            if let (Some(project), true) = (project, sets_environment) {
                p.environment_from = Some(project.dir.clone());
            }
        }
        if let Some(d) = file.dask {
            self.dask.merge(d);
        }
        if let Some(i) = file.idle {
            let limit = |key: &str, v: &toml::Value| parse_idle_value(key, v).map_err(&bad);
            if let Some(k) = &i.kernel {
                self.idle.kernel = limit("kernel", k)?;
            }
            if let Some(t) = &i.target {
                self.idle.target = limit("target", t)?;
            }
        }
        self.sources.push(path.into());
        Ok(())
    }

    /// The profiles' names, a refused one's included.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.profiles.keys().cloned().collect();
        names.extend(self.refused.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// The named profile (or an empty one for `None`) with the user's
    /// overrides applied, validated; refused if an untrusted project's
    /// file set code in it ([`ConfigError::UntrustedProjectKey`]).
    pub fn profile(
        &self,
        name: Option<&str>,
        overrides: &[String],
    ) -> Result<Profile, ConfigError> {
        self.profile_from(name, overrides, OverridesFrom::User)
    }

    /// The named profile with overrides that `origin` gave: a cell's may
    /// not name code ([`code_key`]) unless its notebook's directory is
    /// trusted, and its `environment` is the notebook's.
    pub fn profile_from(
        &self,
        name: Option<&str>,
        overrides: &[String],
        origin: OverridesFrom<'_>,
    ) -> Result<Profile, ConfigError> {
        if let Some(refusal) = name.and_then(|n| self.refused.get(n)) {
            return Err(ConfigError::UntrustedProjectKey(Box::new(refusal.clone())));
        }
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
            if let OverridesFrom::Cell(dir) = origin {
                self.refuse_cell_code(o, dir)?;
            }
            p.apply_override(o).map_err(|e| ConfigError::Override {
                arg: o.clone(),
                message: e.message,
            })?;
            let key = o.split_once('=').map(|(k, _)| k.trim());
            if let (OverridesFrom::Cell(dir), Some("environment")) =
                (origin, key.and_then(noyau_sched::canonical_key))
            {
                p.environment_from = Some(dir.to_path_buf());
                p.environment_from_cell = true;
            }
        }
        p.validate().map_err(|e| ConfigError::Invalid {
            profile: name.unwrap_or("(none)").into(),
            message: e.message,
        })?;
        Ok(p)
    }
}

impl Config {
    /// Refuses a cell's override `o` that names code ([`code_key`]) unless
    /// the notebook's directory `dir` is trusted.
    fn refuse_cell_code(&self, o: &str, dir: &ProjectDir) -> Result<(), ConfigError> {
        let (key, value) = o.split_once('=').unwrap_or((o, ""));
        let key = key.trim();
        let found = match key.strip_prefix("env.") {
            Some(var) if thread_count(var.trim(), value.trim()) => return Ok(()),
            Some(_) => noyau_sched::find_key("env"),
            None => noyau_sched::find_key(key),
        };
        let Some(why) = found.as_ref().and_then(code_key) else {
            return Ok(());
        };
        let trust = self.trusted_projects.code(dir);
        if trust.is_trusted() {
            return Ok(());
        }
        Err(ConfigError::CellKey {
            key: key.into(),
            why,
            note: trust.note().into(),
            dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
            user_file: user_file().map_or_else(
                || "~/.config/noyau/config.toml".into(),
                |f| f.display().to_string(),
            ),
        })
    }
}

/// Whose file [`Config::add`] reads.
#[derive(Clone, Copy)]
enum Role<'a> {
    /// The system's or the user's: what its `trusted_projects` grants.
    Site(trusted::Grantor),
    /// The project's, whose directory may be another user's.
    Project(&'a ProjectFile),
}

/// Warns that `key` of the project file `path` is ignored.
fn ignored_in_project(path: &Path, key: &str) {
    tracing::warn!(
        "{}: {key} is ignored in a project's file; set it in ~/.config/noyau/config.toml \
         (yours) or /etc/noyau/config.toml (the site's)",
        path.display()
    )
}

/// Who gave a profile's overrides (`key=value` words).
#[derive(Debug, Clone, Copy)]
pub enum OverridesFrom<'a> {
    /// The user: `noyau run -o key=value`, their kernelspec's options.
    User,
    /// A notebook cell in this directory (`%%noyau on T key=value`):
    /// anyone may have written it, so it is held to a project's rules.
    Cell(&'a ProjectDir),
}

/// What the command line and the config files in effect at the current
/// directory say: the profile `name` (none: an empty one) with `overrides`,
/// and the backend (`backend` if given, else the profile's, else `local`).
pub fn resolve(
    backend: Option<&str>,
    name: Option<&str>,
    overrides: &[String],
) -> Result<(String, Profile), ConfigError> {
    resolve_from(backend, name, overrides, OverridesFrom::User)
}

/// [`resolve`] with overrides that `origin` gave ([`Config::profile_from`]).
pub fn resolve_from(
    backend: Option<&str>,
    name: Option<&str>,
    overrides: &[String],
    origin: OverridesFrom<'_>,
) -> Result<(String, Profile), ConfigError> {
    let cwd = ProjectDir::cwd().map_err(|source| ConfigError::Read {
        path: ".".into(),
        source,
    })?;
    let profile = Config::load(&cwd)?.profile_from(name, overrides, origin)?;
    let backend = backend
        .map(str::to_string)
        .or_else(|| profile.backend.clone())
        .unwrap_or_else(|| "local".into());
    Ok((backend, profile))
}

/// toml's message with its position, plus the closest valid key for an
/// unknown one; the offending line of `text` quoted only when `quote`
/// (the site's or the user's own file), else its line and column.
fn explain(e: &toml::de::Error, text: &str, quote: bool) -> String {
    let mut s = if quote {
        e.to_string().trim_end().to_string()
    } else {
        let at = toml_error_at(e, text).map_or_else(String::new, |(line, col)| {
            format!("TOML parse error at line {line}, column {col}: ")
        });
        format!("{at}{}", e.message().trim_end())
    };
    let msg = e.message();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some(word) = rest.split('`').next() {
            let cands: &[&str] = if msg.contains("`profiles`") {
                &[
                    "scheduler",
                    "concurrent_submissions",
                    "trusted_projects",
                    "profiles",
                    "environment",
                    "data",
                    "dask",
                    "idle",
                ]
            } else if msg.contains("`kernel`") {
                &["kernel", "target"]
            } else {
                &DASK_KEYS
            };
            let hint = suggest(word, cands.iter().copied());
            if !hint.is_empty() {
                s.push_str(&format!("\n{}", hint.trim_start_matches(", ")));
            }
        }
    }
    s
}

/// Where in `text` toml's error `e` is, as a line and a column, if toml
/// says: for messages that place an error in a file whose text must not be
/// quoted (toml's own message quotes the line).
pub fn toml_error_at(e: &toml::de::Error, text: &str) -> Option<(usize, usize)> {
    e.span().map(|s| line_col(text, s.start))
}

/// The line and column (from 1, in characters) of byte `at` of `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

#[cfg(test)]
mod trust_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust_tests::write;

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
    fn concurrent_submissions_last_file_wins_and_bad_values_are_explained() {
        let c = cfg(&[
            "concurrent_submissions = 8\n",
            "concurrent_submissions = 2\n",
        ]);
        assert_eq!(c.unwrap().concurrent_submissions, Some(2));
        assert_eq!(
            cfg(&["[profiles.a]\n"]).unwrap().concurrent_submissions,
            None
        );
        for bad in ["0", "-1", "100"] {
            let e = cfg(&[&format!("concurrent_submissions = {bad}\n")])
                .unwrap_err()
                .to_string();
            assert!(e.contains("give a whole number from 1 to 64"), "{e}");
        }
        let e = cfg(&["concurrent_submissions = \"4\"\n"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("concurrent_submissions"), "{e}");
    }

    /// A project's file (maybe in a directory another user controls) does
    /// not set `concurrent_submissions`; its other settings count.
    #[test]
    fn concurrent_submissions_is_not_taken_from_the_project_file() {
        let d = tempfile::tempdir().unwrap();
        let (user, project) = (d.path().join("config.toml"), d.path().join("noyau.toml"));
        write(
            &project,
            "concurrent_submissions = 1\n[profiles.p]\ncpus_per_task = 2\n",
        );
        let c = Config::load_with(&SiteFiles::user_only(&user), &project).unwrap();
        assert_eq!(c.concurrent_submissions, None);
        assert!(
            c.names().contains(&"p".to_string()),
            "the project's profiles are read"
        );
        write(&user, "concurrent_submissions = 3\n");
        let c = Config::load_with(&SiteFiles::user_only(&user), &project).unwrap();
        assert_eq!(
            c.concurrent_submissions,
            Some(3),
            "the user's, not the project's"
        );
        assert_eq!(
            Config::load_from(&SiteFiles::user_only(&user))
                .unwrap()
                .concurrent_submissions,
            Some(3)
        );
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
    fn walltime_is_time_and_other_names_are_one_key() {
        let c = cfg(&["[profiles.o]\nwalltime = \"1:00:00\"\nqueue = \"q\"\nproject = \"p\"\n"])
            .unwrap();
        let p = c.profile(Some("o"), &[]).unwrap();
        assert_eq!(p.time.as_deref(), Some("1:00:00"));
        assert_eq!(
            (p.partition.as_deref(), p.account.as_deref()),
            (Some("q"), Some("p"))
        );
        let e = cfg(&["[profiles.o]\npartition = \"a\"\nqueue = \"b\"\n"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("partition and queue are the same key"),
            "{e}"
        );
        let e = cfg(&["[profiles.o]\nwalltme = \"1:00:00\"\n"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `walltime`?"), "{e}");
    }

    #[test]
    fn a_bad_backend_is_named() {
        let c = cfg(&["[profiles.p]\ntime = \"1:00:00\"\n"]).unwrap();
        let e = c
            .profile(Some("p"), &["backend=oarr".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `oar`"), "{e}");
    }

    #[test]
    fn idle_limits_default_merge_and_explain() {
        assert_eq!(cfg(&[]).unwrap().idle, IdleLimits::default());
        // The site's default, then the user's own: key by key.
        let c = cfg(&[
            "[idle]\nkernel = \"2:00:00\"\ntarget = \"10\"\n",
            "[idle]\nkernel = \"off\"\n",
        ])
        .unwrap();
        assert_eq!(c.idle.kernel, None);
        assert_eq!(c.idle.target, Some(std::time::Duration::from_secs(600)));
        let c = cfg(&["[idle]\nkernel = \"0:30\"\n"]).unwrap();
        assert_eq!(c.idle.kernel, Some(std::time::Duration::from_secs(30)));
        let e = cfg(&["[idle]\nkernel = \"1h\"\n"]).unwrap_err().to_string();
        assert!(
            e.contains("[idle] kernel") && e.contains("HH:MM:SS") && e.contains("off"),
            "{e}"
        );
        let e = cfg(&["[idle]\nkernell = \"10\"\n"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `kernel`"), "{e}");
        // A number, a zero time, and [idle] that is not a table.
        let e = cfg(&["[idle]\nkernel = 3600\n"]).unwrap_err().to_string();
        assert!(
            e.contains("[idle] kernel = 3600: write the time as a string"),
            "{e}"
        );
        assert_eq!(
            cfg(&["[idle]\nkernel = \"0:00\"\n"]).unwrap().idle.kernel,
            None
        );
        let e = cfg(&["idle = \"1:00:00\"\n"]).unwrap_err().to_string();
        assert!(e.contains("a table: [idle] with kernel"), "{e}");
    }

    #[test]
    fn dask_settings_merge_and_unknown_keys_are_named() {
        let c = cfg(&[
            "[dask]\ntarget = \"hpc\"\nworkers = 4\nworker_mem = \"2G\"\n",
            "[dask]\nadapt = [0, 8]\nworker_time = \"30\"\nnanny = true\nscheduler_mem = \"2G\"\n",
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
                scheduler_cores: None,
                scheduler_mem: Some("2G".into()),
                scheduler_profile: None,
            }
        );
        let e = cfg(&["[dask]\nworker = 2\n"]).unwrap_err().to_string();
        assert!(e.contains("worker"), "{e}");
    }
}
