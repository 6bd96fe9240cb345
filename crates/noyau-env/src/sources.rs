//! Where a spec comes from, and how the sources combine.
//!
//! Later wins, key by key: `[environment]` in `noyau.toml` in the
//! notebook's directory, then `metadata.noyau.environment` in the notebook,
//! then `--env`. The notebook's metadata never sets the sandbox
//! ([`SANDBOX_KEYS`]: `isolation`, `network`, `scratch`, `ro_bind`): a
//! notebook sent by someone else must not switch off or open up the
//! isolation its runner chose. `--env` takes either an inline table, TOML
//! (`--env '{requirements = ["six==1.16.0"]}'`) or JSON
//! (`--env '{"requirements": ["six==1.16.0"]}'`), or a path to a file: a
//! `.json` file holding the table, or a TOML file holding it at top level
//! or under `[environment]` (so `--env other/noyau.toml` works).
//!
//! Paths inside each source are made absolute against that source's
//! directory (the notebook's directory for the first two, the file's for an
//! `--env` file, the current directory for an inline table) before merging.
//!
//! An interactive kernel cannot see its notebook's metadata; a cell chooses
//! its environment with `%noyau env …` instead ([`from_magic`],
//! [`for_cell`]). The cell says what to build and replaces that part of the
//! kernel's start spec whole (a `modules` cell does not inherit a
//! `requirements` list); how the kernel is run (`build`, and the sandbox:
//! `isolation`, `network`, `scratch`, `ro_bind`) is kept from
//! `noyau.toml`/`NOYAU_ENV`. A cell may set `build` but not the sandbox.
//!
//! The notebook's metadata, its cells and the project's `noyau.toml` may
//! come from anyone: what they name that would run while the environment
//! is prepared is refused unless the user trusts the project
//! ([`crate::trust`]); `--env` and `NOYAU_ENV` are the user's own.

use std::path::{Path, PathBuf};

use noyau_trust::anchor::ProjectDir;
use serde_json::{Map, Value};

use crate::spec::{absolute, PATH_KEYS, PATH_LIST_KEYS};
use crate::{EnvError, EnvSpec};

/// One source's table, with the directory its relative paths are based on.
#[derive(Debug, Clone)]
pub struct Source {
    pub what: String,
    pub table: Map<String, Value>,
    pub base: PathBuf,
    pub author: Author,
    /// Whether its code is trusted, if the table was read from a file
    /// (`--env FILE`), decided on what was read: every key of the source
    /// is trusted as that file, and a refusal names its keys, not their
    /// values, which may be a file's the notebook had noyau read
    /// ([`crate::named`]).
    pub file: Option<noyau_config::CodeTrust>,
    /// Whether its code is trusted, when that was decided as it was read
    /// (the project's noyau.toml: under a wildcard, on the file read, not
    /// the one at its path afterwards); its values are still quoted.
    pub read: Option<noyau_config::CodeTrust>,
}

/// Who wrote a source, which decides whether it may name code that runs
/// while the environment is prepared ([`crate::trust`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Author {
    /// The user: `--env`, `NOYAU_ENV` (their kernelspec or environment).
    User,
    /// The project or notebook in this directory (its noyau.toml, the
    /// notebook's metadata, a cell): anyone may have written it; trusted
    /// only if the directory is in `trusted_projects`. The directory is the
    /// one anchored when the project was read (noyau-trust's anchor): each
    /// use judges that directory, not wherever its path leads by then.
    Project(ProjectDir),
}

/// `dir/noyau.toml`, its path, its TOML and whether its code is trusted
/// (decided on what was read), if there is one: read as noyau-config
/// reads a project's file (refused if another user could have written
/// it, unless the user trusts `dir`).
pub(crate) fn noyau_toml(
    dir: &ProjectDir,
) -> Result<Option<(PathBuf, toml::Table, noyau_config::CodeTrust)>, EnvError> {
    let Some((path, text, trust)) = noyau_config::project_file(dir)? else {
        return Ok(None);
    };
    let doc: toml::Table =
        toml::from_str(&text).map_err(|e| crate::named::toml_error(&path, &text, &e))?;
    Ok(Some((path, doc, trust)))
}

/// The `[environment]` table of `dir/noyau.toml`, if there is one.
pub fn from_noyau_toml(dir: &ProjectDir) -> Result<Option<Source>, EnvError> {
    let Some((path, doc, trust)) = noyau_toml(dir)? else {
        return Ok(None);
    };
    match doc.get("environment") {
        None => Ok(None),
        Some(v) => Ok(Some(Source {
            what: format!("[environment] in {}", path.display()),
            table: as_table(toml_to_json(v.clone()), &path.display().to_string())?,
            base: dir.to_path_buf(),
            author: Author::Project(dir.clone()),
            file: None,
            read: Some(trust),
        })),
    }
}

/// `metadata.noyau.environment` of a notebook's metadata, if present.
pub fn from_metadata(
    metadata: &Value,
    notebook_dir: &ProjectDir,
) -> Result<Option<Source>, EnvError> {
    match metadata.get("noyau").and_then(|n| n.get("environment")) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            // A recorded environment (an earlier run's output) carries the
            // spec under "spec"; a hand-written one is the spec itself.
            // Its lock comes along, so running an output notebook again
            // reproduces the environment it was run in.
            let mut table = match v.get("spec") {
                Some(spec) => {
                    let mut t = as_table(spec.clone(), "metadata.noyau.environment.spec")?;
                    if let Some(Value::String(lock)) = v.get("lock") {
                        if t.get("kind").and_then(Value::as_str).unwrap_or("python") == "python"
                            && !t.contains_key("lock_file")
                        {
                            t.insert("lock".into(), Value::String(lock.clone()));
                        }
                    }
                    t
                }
                None => as_table(v.clone(), "metadata.noyau.environment")?,
            };
            table.remove("notebook_dir");
            drop_sandbox_keys(&mut table);
            Ok(Some(Source {
                what: "metadata.noyau.environment in the notebook".into(),
                table,
                base: notebook_dir.to_path_buf(),
                author: Author::Project(notebook_dir.clone()),
                file: None,
                read: None,
            }))
        }
    }
}

/// Keys that decide the sandbox of `isolation = "container"`: whether
/// there is one, the network, what is writable or shown. A notebook may
/// come from anyone, so these are never read from its metadata: only
/// `--env`, `NOYAU_ENV` and a trusted project's `noyau.toml` set them (an
/// untrusted one may only tighten them, [`crate::trust::loosens_sandbox`]).
pub const SANDBOX_KEYS: &[&str] = &["isolation", "network", "scratch", "ro_bind"];

/// Removes [`SANDBOX_KEYS`] from a notebook's table, saying which.
fn drop_sandbox_keys(table: &mut Map<String, Value>) {
    let dropped: Vec<&str> = SANDBOX_KEYS
        .iter()
        .copied()
        .filter(|k| table.remove(*k).is_some())
        .collect();
    if !dropped.is_empty() {
        tracing::warn!(
            "ignoring {} in the notebook's metadata.noyau.environment: a notebook may not \
             choose its own sandbox; set them in noyau.toml's [environment] or with --env",
            dropped.join(", ")
        );
    }
}

/// The value of `--env`: an inline TOML/JSON table, or a file.
pub fn from_cli(arg: &str, cwd: &Path) -> Result<Source, EnvError> {
    from_spec(arg, cwd, Author::User)
}

/// A spec in the forms `--env` takes, by `author`: a file a project
/// names must be in its directory ([`crate::named`]).
fn from_spec(arg: &str, cwd: &Path, author: Author) -> Result<Source, EnvError> {
    let t = arg.trim();
    if t.starts_with('{') {
        let v = match serde_json::from_str::<Value>(t) {
            Ok(v) => v,
            Err(_) => {
                let doc: toml::Table =
                    toml::from_str(&format!("environment = {t}")).map_err(|e| {
                        EnvError::Invalid(format!(
                            "--env {t:?} is neither a JSON object nor a TOML inline table: {e}"
                        ))
                    })?;
                toml_to_json(doc["environment"].clone())
            }
        };
        return Ok(Source {
            what: "--env".into(),
            table: as_table(v, "--env")?,
            base: cwd.to_path_buf(),
            author,
            file: None,
            read: None,
        });
    }
    let path = absolute(cwd, Path::new(t));
    let what = format!("--env {t:?}");
    let (text, trust) = crate::named::read(
        &path,
        &author,
        &what,
        noyau_config::MAX_SIZE,
        noyau_config::named_text,
        &mut Site::default(),
    )?
    .ok_or_else(|| {
        EnvError::Invalid(format!(
            "{what}: not an inline table (starting with `{{`) and not a readable file: {} does not exist",
            path.display()
        ))
    })?;
    let base = path.parent().unwrap_or(cwd).to_path_buf();
    let v = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str::<Value>(&text).map_err(|e| crate::named::json_error(&path, &e))?
    } else {
        let doc: toml::Table =
            toml::from_str(&text).map_err(|e| crate::named::toml_error(&path, &text, &e))?;
        toml_to_json(
            doc.get("environment")
                .cloned()
                .unwrap_or(toml::Value::Table(doc)),
        )
    };
    let table = as_table(v, &path.display().to_string())?;
    check_file_table(&path, &table)?;
    Ok(Source {
        what: format!("--env {}", path.display()),
        table,
        base,
        author,
        file: Some(trust),
        read: None,
    })
}

/// A profile's `environment` (in the forms `--env` takes): the user's when
/// the site's or the user's file (or `-o`) set it; else `project`, the
/// directory whose noyau.toml set it, and it is held to what that
/// project's `[environment]` may name.
pub fn from_profile(
    spec: &str,
    project: Option<&ProjectDir>,
    cwd: &Path,
) -> Result<Source, EnvError> {
    Ok(match project {
        None => from_cli(spec, cwd)?,
        Some(dir) => Source {
            what: format!(
                "the environment of a profile in {}",
                dir.join("noyau.toml").display()
            ),
            ..from_spec(spec, cwd, Author::Project(dir.clone()))?
        },
    })
}

/// The spec of a target's (or a Dask cluster's) job, and who gave it.
#[derive(Debug, Clone, Copy)]
pub enum TargetSpec<'a> {
    /// `%%noyau on T --env SPEC`: the notebook's ([`from_cell_env`]).
    Cell(&'a str),
    /// A profile's `environment` and the project directory whose
    /// noyau.toml set it, if one did ([`from_profile`]).
    Profile(&'a str, Option<&'a Path>),
}

impl<'a> TargetSpec<'a> {
    /// A profile's `environment`, if it has one, held to the rules of
    /// who set it.
    pub fn profile(p: &'a noyau_config::Profile) -> Option<Self> {
        let e = p.environment.as_deref()?;
        // A cell's `%%noyau on T environment=…` is its `--env`.
        Some(if p.environment_from_cell {
            TargetSpec::Cell(e)
        } else {
            TargetSpec::Profile(e, p.environment_from.as_deref())
        })
    }

    /// Its source, relative paths from `cwd`. A profile's project is the
    /// one its noyau.toml was read from, `cwd`'s (noyau-config reads the
    /// working directory's): its path must still lead to `cwd`'s anchor,
    /// else what that file set would be judged as another directory's.
    pub fn source(self, cwd: &ProjectDir) -> Result<Source, EnvError> {
        match self {
            TargetSpec::Cell(e) => from_cell_env(e, cwd),
            TargetSpec::Profile(e, None) => from_profile(e, None, cwd),
            TargetSpec::Profile(e, Some(dir)) => {
                cwd.check_path(dir)
                    .map_err(|e| EnvError::from(noyau_config::ConfigError::Untrusted(e)))?;
                from_profile(e, Some(cwd), cwd)
            }
        }
    }
}

/// A spec a cell gives (`%%noyau on TARGET --env SPEC`), in the forms
/// `--env` takes: the notebook's, not the user's.
pub fn from_cell_env(arg: &str, notebook_dir: &ProjectDir) -> Result<Source, EnvError> {
    let s = Source {
        what: format!("--env {arg} in a cell"),
        ..from_spec(arg, notebook_dir, Author::Project(notebook_dir.clone()))?
    };
    refuse_sandbox_keys(&s, "`%%noyau on … --env` (or `environment=`)")?;
    Ok(s)
}

/// Merges sources (later wins per key) into one normalised spec, with
/// `notebook_dir` set; None when no source says anything.
pub fn merge(sources: &[Source], notebook_dir: &Path) -> Result<Option<EnvSpec>, EnvError> {
    if sources.is_empty() {
        return Ok(None);
    }
    // Each source's trust, decided once (the site's and user's files read
    // at most once here, and only for a project's source; reading a
    // source, its noyau.toml or `--env` file, read them for itself).
    let mut site = Site::default();
    let judged = sources
        .iter()
        .map(|s| Judged::new(s, &mut site))
        .collect::<Result<Vec<_>, _>>()?;
    let mut merged = Map::new();
    // Which source each key's value comes from.
    let mut from: std::collections::BTreeMap<String, &Judged> = Default::default();
    for j in &judged {
        // An untrusted project does not place its notebook (its directory
        // is writable in the sandbox), as the notebook's metadata does not.
        let untrusted = untrusted_dir(j, None).is_some();
        for (k, v) in resolve_paths(&j.s.table, &j.s.base) {
            if untrusted && k == "notebook_dir" {
                continue;
            }
            from.insert(k.clone(), j);
            merged.insert(k, v);
        }
    }
    for (k, v) in &merged {
        if let Some(why) = crate::trust::names_code(k, v, show(from[k].s)) {
            refuse_untrusted(from[k], None, k, why, crate::trust::Risk::RunsCode)?;
        }
        if let Some(why) = crate::trust::loosens_sandbox(k, v) {
            refuse_untrusted(from[k], None, k, why.into(), crate::trust::Risk::Loosens)?;
        }
    }
    if let Some(Value::String(image)) = merged.get("image") {
        if !image.contains("://") {
            let j = from["image"];
            let trusted = untrusted_dir(j, None).is_none();
            let what = format!("image in {}", j.s.what);
            crate::named::check_image(Path::new(image), &j.s.author, &what, trusted)?;
        }
    }
    merged
        .entry("notebook_dir")
        .or_insert_with(|| Value::String(notebook_dir.display().to_string()));
    let lock_trust = match from.get("lock_file") {
        Some(j) => Some(read_lock_file(&mut merged, j.s, &mut site)?),
        None => None,
    };
    let names: Vec<&str> = sources.iter().map(|s| s.what.as_str()).collect();
    let mut spec = EnvSpec::from_value(Value::Object(merged))
        .and_then(EnvSpec::normalise)
        .map_err(|e| match e {
            EnvError::Invalid(m) => EnvError::Invalid(format!("{m} (from {})", names.join(", "))),
            other => other,
        })?;
    // A lock_file is checked once read, as a lock (its lines by number:
    // the file may not be the project's own).
    // (Its trust is the file's, decided on what was read: under a wildcard
    // entry, a lock file others could have written is not trusted,
    // [`noyau_config::TrustedProjects::read_named`].)
    let lock_trust = lock_trust.as_ref();
    if let (Some(j), Some(lock)) = (from.get("lock_file"), &spec.lock) {
        if let Some(why) = crate::trust::lock_names_code(lock, crate::trust::Show::LineNumbers) {
            refuse_untrusted(
                j,
                lock_trust,
                "lock_file",
                why,
                crate::trust::Risk::RunsCode,
            )?;
        }
    }
    for k in ["requirements", "lock", "lock_file"] {
        if let Some(j) = from.get(k) {
            let file = if k == "lock_file" { lock_trust } else { None };
            spec.wheels_only |= untrusted_dir(j, file).is_some();
        }
    }
    Ok(Some(spec))
}

/// The site's and the user's `trusted_projects`, read at most once for
/// one decision, and only when a project's source asks.
#[derive(Default)]
pub(crate) struct Site(Option<noyau_config::TrustedProjects>);

impl Site {
    pub(crate) fn get(&mut self) -> Result<&noyau_config::TrustedProjects, EnvError> {
        let t = match self.0.take() {
            Some(t) => t,
            None => noyau_config::trusted_projects()?,
        };
        Ok(self.0.insert(t))
    }
}

/// A source and whether its code is trusted, decided once: its file's
/// trust if it was read from one ([`Source::file`]), else its project
/// directory's; the user's own sources are.
struct Judged<'a> {
    s: &'a Source,
    trust: noyau_config::CodeTrust,
}

impl<'a> Judged<'a> {
    fn new(s: &'a Source, site: &mut Site) -> Result<Self, EnvError> {
        let trust = match (s.file.as_ref().or(s.read.as_ref()), &s.author) {
            (Some(t), _) => t.clone(),
            (None, Author::Project(dir)) => site.get()?.code(dir),
            (None, Author::User) => noyau_config::CodeTrust::Trusted,
        };
        Ok(Judged { s, trust })
    }
}

/// How a refusal shows the values of `s`: not a file's ([`Source::file`]).
fn show(s: &Source) -> crate::trust::Show {
    match s.file {
        Some(_) => crate::trust::Show::LineNumbers,
        None => crate::trust::Show::Text,
    }
}

/// Replaces `lock_file` in `merged` (set by `s`) with the `lock` it
/// holds, read as `s`'s author may name it ([`crate::named`]); whether
/// its code is trusted, decided on what was read.
fn read_lock_file(
    merged: &mut Map<String, Value>,
    s: &Source,
    site: &mut Site,
) -> Result<noyau_config::CodeTrust, EnvError> {
    let Some(Value::String(f)) = merged.remove("lock_file") else {
        return Err(EnvError::Invalid("`lock_file` is a path".into()));
    };
    if merged.contains_key("lock") {
        return Err(EnvError::Invalid(format!(
            "both `lock` and `lock_file` are given (lock_file from {}); keep one",
            s.what
        )));
    }
    let path = PathBuf::from(&f);
    let what = format!("lock_file in {}", s.what);
    let (text, trust) = crate::named::read(
        &path,
        &s.author,
        &what,
        noyau_config::MAX_LOCK_SIZE,
        // The user's own lock (their `--env` file's): anyone's, as the
        // `--env` file itself, but a regular file of bounded size; not
        // held to a trusted directory's rules (a wildcard's link check).
        noyau_config::named_text,
        site,
    )?
    .ok_or_else(|| EnvError::Invalid(format!("cannot read {what} ({f}): it does not exist")))?;
    merged.insert("lock".into(), Value::String(text));
    Ok(trust)
}

/// The project directory of a source the user does not trust, if it is
/// one, with why the entries that name it do not trust it
/// ([`noyau_config::CodeTrust::note`]); for the code in a file of the
/// project's, `file` its trust when given (a lock file's: trusted only
/// if the file `j` was read from, which named it, is too), else `j`'s
/// ([`Source::file`]: under a wildcard, a settings file others could have
/// written is no more trusted than such a lock file).
fn untrusted_dir<'a>(
    j: &'a Judged,
    file: Option<&'a noyau_config::CodeTrust>,
) -> Option<(&'a Path, &'a str)> {
    let Author::Project(dir) = &j.s.author else {
        return None;
    };
    // A lock a settings file names is trusted only if both are: the
    // settings file chose which lock.
    let trust = match file {
        Some(noyau_config::CodeTrust::Trusted) if j.s.file.is_some() => &j.trust,
        Some(t) => t,
        None => &j.trust,
    };
    match trust {
        noyau_config::CodeTrust::Trusted => None,
        noyau_config::CodeTrust::Untrusted { note } => Some((dir.path(), note.as_str())),
    }
}

/// Refuses `key` of `j` (which names code or loosens the sandbox: `why`,
/// `risk`) unless the user trusts `j` (and `file`, the trust of the file
/// of `j`'s it was read from, if any).
fn refuse_untrusted(
    j: &Judged,
    file: Option<&noyau_config::CodeTrust>,
    key: &str,
    why: String,
    risk: crate::trust::Risk,
) -> Result<(), EnvError> {
    let Some((dir, note)) = untrusted_dir(j, file) else {
        return Ok(());
    };
    Err(EnvError::UntrustedCode(Box::new(crate::UntrustedCode {
        what: j.s.what.clone(),
        key: key.into(),
        why,
        risk,
        note: note.into(),
        dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.into()),
    })))
}

/// Everything `noyau run` looks at, in order: noyau.toml, the notebook's
/// metadata, `--env`.
pub fn for_notebook(
    notebook_dir: &ProjectDir,
    metadata: Option<&Value>,
    cli: Option<&str>,
    cwd: &Path,
) -> Result<Option<EnvSpec>, EnvError> {
    let mut sources = Vec::new();
    sources.extend(from_noyau_toml(notebook_dir)?);
    if let Some(m) = metadata {
        sources.extend(from_metadata(m, notebook_dir)?);
    }
    if let Some(c) = cli {
        sources.push(from_cli(c, cwd)?);
    }
    merge(&sources, notebook_dir)
}

/// What a notebook declares for its kernel: its environment and data files.
#[derive(Debug, Clone, Default)]
pub struct Declared {
    pub spec: Option<EnvSpec>,
    pub data: Vec<crate::DataRef>,
}

/// Everything a notebook declares: the environment as [`for_notebook`]
/// reads it, and the data files of `noyau.toml`, its metadata and its
/// `%noyau data` cells ([`crate::data::declared`]).
pub fn declared<'a>(
    notebook_dir: &ProjectDir,
    metadata: Option<&Value>,
    cell_sources: impl IntoIterator<Item = &'a str>,
    cli: Option<&str>,
    cwd: &Path,
) -> Result<Declared, EnvError> {
    let magics = crate::data::magic_lines(cell_sources);
    Ok(Declared {
        spec: for_notebook(notebook_dir, metadata, cli, cwd)?,
        data: crate::data::declared(notebook_dir, metadata, &magics)?,
    })
}

/// [`declared`] for a notebook file (`.ipynb`), with its project: the
/// directory it was read from, anchored (where its lock is written).
pub fn declared_in_file(
    path: &Path,
    cli: Option<&str>,
    cwd: &Path,
) -> Result<(Declared, ProjectDir), EnvError> {
    let path = absolute(cwd, path);
    // Its directory anchored: the project is the directory it was read from.
    let (text, dir) = noyau_trust::anchor::read_notebook(&path)
        .map_err(|e| EnvError::io(format!("reading {}", path.display()), e))?;
    let nb: Value = serde_json::from_slice(&text)
        .map_err(|e| EnvError::Invalid(format!("{} is not a notebook: {e}", path.display())))?;
    let sources: Vec<String> = nb["cells"]
        .as_array()
        .map(|cells| {
            cells
                .iter()
                .filter(|c| c["cell_type"] == "code")
                .map(|c| match &c["source"] {
                    Value::Array(lines) => lines.iter().filter_map(Value::as_str).collect(),
                    other => other.as_str().unwrap_or_default().to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    let d = declared(
        &dir,
        nb.get("metadata"),
        sources.iter().map(String::as_str),
        cli,
        cwd,
    )?;
    Ok((d, dir))
}

/// Keys saying how the kernel runs rather than what is built: a cell's
/// `%noyau env` keeps them from the kernel's start sources.
const RUN_KEYS: &[&str] = &["build", "isolation", "network", "scratch", "ro_bind"];
/// Keys taking a list; in a cell's `key=value` words the items are
/// separated by commas.
const LIST_KEYS: &[&str] = &[
    "requirements",
    "modules",
    "module_use",
    "packages",
    "ro_bind",
];
const BOOL_KEYS: &[&str] = &["nv", "network"];
/// Keys a cell may set with `key=value` (not `notebook_dir`, which is the
/// kernel's directory).
const CELL_KEYS: &[&str] = &[
    "kind",
    "python",
    "requirements",
    "lock",
    "lock_file",
    "modules",
    "module_use",
    "modules_init",
    "prefix",
    "channels",
    "manifest",
    "packages",
    "image",
    "nv",
    "build",
    "isolation",
    "network",
    "scratch",
    "ro_bind",
];

/// The usage of `%noyau env`, for error messages.
pub const MAGIC_USAGE: &str = "%noyau env [python] REQUIREMENT… [key=value…] | %noyau env modules MODULE… | \
     %noyau env prefix PATH | %noyau env apptainer IMAGE | %noyau env guix PACKAGE… | %noyau env system | \
     %noyau env file PATH/noyau.toml | %noyau env {TOML inline table}";

/// What a `%noyau env ARGS` cell says, relative paths based on `cwd` (the
/// notebook's directory). The forms:
///
/// * `{…}`: an inline TOML/JSON table, as `--env` takes;
/// * `file PATH`: a file, as `--env PATH` takes (`[environment]` of a
///   noyau.toml, a bare TOML table, or `.json`);
/// * `KIND WORD…` with KIND one of `python` (words: requirements, and a
///   bare version such as `3.11` for the interpreter), `modules` (module
///   names), `prefix` / `apptainer` (one path or image), `guix` (package
///   names), `system` (no words: the kernelspec's own environment);
/// * words alone: requirements (`six==1.16.0 idna`), so `python` is implied.
///
/// Any form of words may add `key=value` words for the spec's keys
/// (`python=3.11`, `nv=true`, `modules=gcc/12,cuda/12.4`: lists by
/// commas; the sandbox's keys parse, then are refused below). A word whose text before
/// `=` is not a spec key (`six==1.16.0`) is a requirement.
///
/// A cell is the notebook's, whoever sent it: it may not set the sandbox
/// ([`SANDBOX_KEYS`]; the kernel keeps the one it was started with), and
/// what it names is checked as the notebook's ([`Author::Project`]).
pub fn from_magic(args: &str, cwd: &ProjectDir) -> Result<Source, EnvError> {
    let s = magic_source(args, cwd)?;
    refuse_sandbox_keys(&s, "`%noyau env`")?;
    Ok(s)
}

/// Refuses a cell's source that would choose its sandbox: [`SANDBOX_KEYS`],
/// and `notebook_dir` (writable under isolation).
fn refuse_sandbox_keys(s: &Source, what: &str) -> Result<(), EnvError> {
    let set: Vec<&str> = SANDBOX_KEYS
        .iter()
        .copied()
        .chain(["notebook_dir"])
        .filter(|k| s.table.contains_key(*k))
        .collect();
    if set.is_empty() {
        return Ok(());
    }
    Err(EnvError::Invalid(format!(
        "{what} may not set {}: a cell is part of the notebook, and a notebook may not \
         choose its own sandbox; the kernel keeps the one it was started with (set it in \
         noyau.toml's [environment] or NOYAU_ENV, then restart the kernel)",
        set.join(", ")
    )))
}

fn magic_source(args: &str, cwd: &ProjectDir) -> Result<Source, EnvError> {
    let args = args.trim();
    let what = format!("%noyau env {args}");
    let invalid = |m: String| EnvError::Invalid(format!("{m}; usage: {MAGIC_USAGE}"));
    let ours = || Author::Project(cwd.clone());
    if args.starts_with('{') {
        return from_spec(args, cwd, ours()).map(|s| Source { what, ..s });
    }
    let mut words = args.split_whitespace().peekable();
    if words.peek() == Some(&"file") {
        words.next();
        return match (words.next(), words.next()) {
            (Some(path), None) => from_spec(path, cwd, ours()).map(|s| Source { what, ..s }),
            _ => Err(invalid("`%noyau env file` takes one path".into())),
        };
    }
    let kind = match words.peek().copied() {
        Some(k @ ("python" | "modules" | "prefix" | "apptainer" | "guix" | "system")) => {
            words.next();
            Some(k)
        }
        _ => None,
    };
    let mut table = Map::new();
    let mut bare = Vec::new();
    for w in words {
        match w.split_once('=') {
            Some((k, v)) if CELL_KEYS.contains(&k) && !v.starts_with('=') => {
                let value = if LIST_KEYS.contains(&k) {
                    Value::Array(
                        v.split(',')
                            .filter(|s| !s.is_empty())
                            .map(|s| Value::String(s.to_string()))
                            .collect(),
                    )
                } else if BOOL_KEYS.contains(&k) {
                    match v {
                        "true" => Value::Bool(true),
                        "false" => Value::Bool(false),
                        _ => return Err(invalid(format!("{k}={v}: {k} is true or false"))),
                    }
                } else {
                    Value::String(v.to_string())
                };
                table.insert(k.to_string(), value);
            }
            _ => bare.push(Value::String(w.to_string())),
        }
    }
    let one = |bare: Vec<Value>, what: &str| match <[Value; 1]>::try_from(bare) {
        Ok([v]) => Ok(v),
        Err(b) => Err(invalid(format!(
            "`%noyau env {what}` takes one {what}, not {}",
            b.len()
        ))),
    };
    match kind {
        Some("python") | None => {
            if kind.is_some() {
                table.insert("kind".into(), Value::String("python".into()));
            }
            // `python 3.11`: a bare version right after the kind is the interpreter.
            if kind.is_some()
                && bare.first().and_then(Value::as_str).is_some_and(|v| {
                    v.chars().all(|c| c.is_ascii_digit() || c == '.')
                        && v.starts_with(|c: char| c.is_ascii_digit())
                })
            {
                table.insert("python".into(), bare.remove(0));
            }
            if !bare.is_empty() {
                table.insert("requirements".into(), Value::Array(bare));
            }
            if table.is_empty() {
                return Err(invalid("it names no environment".into()));
            }
        }
        Some(k @ ("modules" | "guix")) => {
            table.insert("kind".into(), Value::String(k.into()));
            if !bare.is_empty() {
                let key = if k == "modules" {
                    "modules"
                } else {
                    "packages"
                };
                table.insert(key.into(), Value::Array(bare));
            }
        }
        Some(k @ ("prefix" | "apptainer")) => {
            table.insert("kind".into(), Value::String(k.into()));
            let key = if k == "prefix" { "prefix" } else { "image" };
            if !table.contains_key(key) {
                table.insert(key.into(), one(bare, key)?);
            } else if !bare.is_empty() {
                return Err(invalid(format!("unexpected words {bare:?}")));
            }
        }
        Some(k) => {
            table.insert("kind".into(), Value::String(k.into()));
            if !bare.is_empty() {
                return Err(invalid(format!(
                    "`%noyau env {k}` takes no words but key=value, not {bare:?}"
                )));
            }
        }
    }
    Ok(Source {
        what,
        table,
        base: cwd.to_path_buf(),
        author: ours(),
        file: None,
        read: None,
    })
}

/// The environment a `%noyau env ARGS` cell chooses for the kernel started
/// in `notebook_dir` with `kernel_env` (its `NOYAU_ENV`): the cell's spec,
/// with the run keys of the kernel's start sources it does not set.
pub fn for_cell(
    notebook_dir: &ProjectDir,
    kernel_env: Option<&str>,
    args: &str,
) -> Result<EnvSpec, EnvError> {
    let cell = from_magic(args, notebook_dir)?;
    let mut sources = Vec::new();
    sources.extend(from_noyau_toml(notebook_dir)?);
    if let Some(e) = kernel_env {
        sources.push(from_cli(e, notebook_dir)?);
    }
    for s in &mut sources {
        s.table.retain(|k, _| RUN_KEYS.contains(&k.as_str()));
    }
    sources.retain(|s| !s.table.is_empty());
    sources.push(cell);
    Ok(merge(&sources, notebook_dir)?.expect("the cell is a source"))
}

fn resolve_paths(table: &Map<String, Value>, base: &Path) -> Map<String, Value> {
    let abs = |v: &Value| match v {
        Value::String(s) => Value::String(absolute(base, Path::new(s)).display().to_string()),
        other => other.clone(),
    };
    table
        .iter()
        .map(|(k, v)| {
            let v = if PATH_KEYS.contains(&k.as_str()) {
                abs(v)
            } else if PATH_LIST_KEYS.contains(&k.as_str()) {
                match v {
                    Value::Array(a) => Value::Array(a.iter().map(abs).collect()),
                    other => other.clone(),
                }
            } else if k == "image" {
                // a local image file, not a URI
                match v {
                    Value::String(s) if !s.contains("://") => abs(v),
                    other => other.clone(),
                }
            } else if k == "python" {
                // an interpreter by path (`.venv/bin/python`), not a
                // version: uv runs in a directory of noyau's own
                match v {
                    Value::String(s) if s.contains('/') && !s.starts_with('~') => abs(v),
                    other => other.clone(),
                }
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

fn as_table(v: Value, what: &str) -> Result<Map<String, Value>, EnvError> {
    match v {
        Value::Object(m) => Ok(m),
        // (Its kind, not its text: it may be a file's.)
        other => Err(EnvError::Invalid(format!(
            "{what} must be a table of keys, not {}",
            match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "a list",
                Value::Object(_) => unreachable!("matched above"),
            }
        ))),
    }
}

/// Checks each key of a table read from `path` as a spec key, so that a
/// wrong one is named by its key alone: serde's message quotes the value
/// (`invalid type: string "…"`), and the file may be one of the user's
/// that a notebook named.
fn check_file_table(path: &Path, table: &Map<String, Value>) -> Result<(), EnvError> {
    for (k, v) in table {
        let one = Map::from_iter([(k.clone(), v.clone())]);
        if EnvSpec::from_value(Value::Object(one)).is_err() {
            return Err(EnvError::Invalid(format!(
                "{}: `{k}` is not a spec key, or its value is not of the kind that key takes \
                 (a string, a list of strings, a boolean); known keys: {}",
                path.display(),
                crate::spec::KNOWN_KEYS
            )));
        }
    }
    Ok(())
}

fn toml_to_json(v: toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// The project `dir`, anchored now.
    pub(crate) fn pd(dir: &Path) -> ProjectDir {
        ProjectDir::open(dir).unwrap()
    }

    #[test]
    fn later_sources_win_key_by_key_and_paths_are_resolved() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("noyau.toml"),
            "[environment]\nrequirements = [\"six==1.16.0\"]\nisolation = \"container\"\nlock_file = \"r.lock\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("r.lock"), "six==1.16.0 --hash=sha256:ab\n").unwrap();
        let meta = json!({"noyau": {"environment": {"python": "3.11"}}});
        let spec = for_notebook(
            &pd(dir.path()),
            Some(&meta),
            Some(r#"{isolation = "none", network = true, scratch = "work"}"#),
            Path::new("/elsewhere"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(spec.requirements, vec!["six==1.16.0"]);
        assert_eq!(spec.python.as_deref(), Some("3.11"));
        assert_eq!(spec.isolation, crate::Isolation::None);
        assert!(spec.network);
        assert_eq!(spec.scratch, Some(PathBuf::from("/elsewhere/work")));
        // (read from the project's directory)
        assert_eq!(spec.lock.as_deref(), Some("six==1.16.0 --hash=sha256:ab\n"));
        assert_eq!(spec.notebook_dir.as_deref(), Some(dir.path()));
    }

    /// An interpreter given by a relative path is the one next to its
    /// source (uv runs elsewhere); a version stays a version.
    #[test]
    fn a_relative_python_path_is_resolved_against_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |python: &str| {
            for_notebook(
                &pd(dir.path()),
                None,
                Some(&format!(r#"{{python = "{python}"}}"#)),
                Path::new("/work/proj"),
            )
            .unwrap()
            .unwrap()
            .python
        };
        assert_eq!(
            spec(".venv/bin/python").as_deref(),
            Some("/work/proj/.venv/bin/python")
        );
        assert_eq!(
            spec("/opt/py/bin/python3").as_deref(),
            Some("/opt/py/bin/python3")
        );
        assert_eq!(spec("3.12").as_deref(), Some("3.12"));
    }

    /// A cloned project's noyau.toml may tighten the sandbox, not loosen
    /// it (show a secret, make the home writable, open the network, switch
    /// it off), nor move the notebook's directory (writable in the
    /// sandbox), unless the user trusts the project; `--env` may.
    #[test]
    fn an_untrusted_project_cannot_loosen_its_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (line, key) in [
            ("ro_bind = [\"/home/victim/.ssh\"]", "ro_bind"),
            ("scratch = \"/home/victim/.config/noyau\"", "scratch"),
            ("network = true", "network"),
            ("isolation = \"none\"", "isolation"),
        ] {
            std::fs::write(
                d.join("noyau.toml"),
                format!("[environment]\nkind = \"system\"\n{line}\n"),
            )
            .unwrap();
            let e = for_notebook(&pd(d), None, None, d).unwrap_err();
            assert!(matches!(e, EnvError::UntrustedCode(_)), "{line}: {e}");
            let e = e.to_string();
            assert!(
                e.contains(&format!("sets `{key}`")) && e.contains("loosens the sandbox"),
                "{e}"
            );
            let spec = for_notebook(&pd(d), None, Some(&format!("{{{line}}}")), d);
            assert!(spec.is_ok(), "from --env: {spec:?}");
        }
        std::fs::write(
            d.join("noyau.toml"),
            "[environment]\nkind = \"system\"\nisolation = \"container\"\nnetwork = false\n\
             notebook_dir = \"../../.config/noyau\"\n",
        )
        .unwrap();
        let spec = for_notebook(&pd(d), None, None, d).unwrap().unwrap();
        assert_eq!(spec.isolation, crate::Isolation::Container);
        assert_eq!(spec.notebook_dir.as_deref(), Some(d));
        // A prefix is shown by the sandbox: the notebook's or a cell's too.
        std::fs::remove_file(d.join("noyau.toml")).unwrap();
        let meta = json!({"noyau": {"environment": {"prefix": "/home/victim"}}});
        let e = for_notebook(&pd(d), Some(&meta), None, d).unwrap_err();
        assert!(e.to_string().contains("sets `prefix`"), "{e}");
        let e = for_cell(&pd(d), None, "prefix /home").unwrap_err();
        assert!(matches!(e, EnvError::UntrustedCode(_)), "{e}");
        assert!(for_notebook(&pd(d), None, Some(r#"{prefix = "/home/me/venv"}"#), d).is_ok());
    }

    #[test]
    fn a_notebook_cannot_choose_its_own_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("noyau.toml"),
            "[environment]\nisolation = \"container\"\n",
        )
        .unwrap();
        let open = json!({"kind": "system", "isolation": "none", "network": true,
                          "scratch": "/home/victim", "ro_bind": ["/home/victim/.ssh"],
                          "modules": ["gcc/12"]});
        // Hand-written, and as an earlier run records it (under "spec").
        for meta in [
            json!({"noyau": {"environment": open.clone()}}),
            json!({"noyau": {"environment": {"spec": open.clone()}}}),
        ] {
            let spec = for_notebook(&pd(d), Some(&meta), None, d).unwrap().unwrap();
            assert_eq!(spec.isolation, crate::Isolation::Container);
            assert!(!spec.network);
            assert_eq!(spec.scratch, None);
            assert!(spec.ro_bind.is_empty());
            // What it builds still comes from the notebook.
            assert_eq!(spec.kind, Some(crate::Kind::System));
            assert_eq!(spec.modules, vec!["gcc/12"]);
            // With isolation from --env alone, the notebook still adds nothing.
            let other = tempfile::tempdir().unwrap();
            let spec = for_notebook(
                &pd(other.path()),
                Some(&meta),
                Some(r#"{isolation = "container"}"#),
                d,
            )
            .unwrap()
            .unwrap();
            assert_eq!(spec.isolation, crate::Isolation::Container);
            assert!(!spec.network && spec.scratch.is_none() && spec.ro_bind.is_empty());
        }
    }

    /// A cell's spec as its forms parse, trusted as the user's own (what
    /// an untrusted cell may name is checked below).
    fn cell(args: &str, dir: &Path) -> Result<EnvSpec, EnvError> {
        let s = magic_source(args, &pd(dir))?;
        Ok(merge(
            &[Source {
                author: Author::User,
                ..s
            }],
            dir,
        )?
        .expect("a source"))
    }

    #[test]
    fn cell_forms() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let s = cell("six==1.16.0 idna", d).unwrap();
        assert_eq!(s.kind, Some(crate::Kind::Python));
        assert_eq!(s.requirements, vec!["idna", "six==1.16.0"]);
        let s = cell("python 3.11 six==1.16.0 isolation=container", d).unwrap();
        assert_eq!(s.python.as_deref(), Some("3.11"));
        assert_eq!(s.requirements, vec!["six==1.16.0"]);
        assert_eq!(s.isolation, crate::Isolation::Container);
        let s = cell("python=3.12 image==1.5.2", d).unwrap();
        assert_eq!(s.python.as_deref(), Some("3.12"));
        assert_eq!(s.requirements, vec!["image==1.5.2"]);
        let s = cell("modules gcc/12 cuda/12.4 module_use=mf,other", d).unwrap();
        assert_eq!(s.modules, vec!["gcc/12", "cuda/12.4"]);
        assert_eq!(s.module_use, vec![d.join("mf"), d.join("other")]);
        let s = cell("prefix envs/x network=true", d).unwrap();
        assert_eq!(s.kind, Some(crate::Kind::Prefix));
        assert_eq!(s.prefix, Some(d.join("envs/x")));
        assert!(s.network);
        let s = cell(r#"{requirements = ["six"], python = "3.11"}"#, d).unwrap();
        assert_eq!(s.requirements, vec!["six"]);
        let s = cell("apptainer img.sif nv=true", d).unwrap();
        assert_eq!(
            s.image.as_deref(),
            Some(d.join("img.sif").to_str().unwrap())
        );
        assert!(s.nv);
        let s = cell("guix python python-numpy channels=ch.scm", d).unwrap();
        assert_eq!(s.packages, vec!["python", "python-numpy"]);
        assert_eq!(s.channels, Some(d.join("ch.scm")));
        let s = cell("system", d).unwrap();
        assert_eq!(s.kind, Some(crate::Kind::System));
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(
            d.join("sub/noyau.toml"),
            "[environment]\nprefix = \"venv\"\n",
        )
        .unwrap();
        let s = cell("file sub/noyau.toml", d).unwrap();
        assert_eq!(s.prefix, Some(d.join("sub/venv")));

        for (bad, says) in [
            ("prefix", "takes one prefix"),
            ("prefix a b", "takes one prefix"),
            ("modules", "modules = "),
            ("system numpy", "takes no words"),
            ("network=maybe six", "true or false"),
            ("file", "one path"),
            ("kind=conda", "conda"),
            ("isolation=bogus", "bogus"),
        ] {
            let e = cell(bad, d).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(says)),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn a_cell_replaces_what_is_built_and_keeps_how_the_kernel_runs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("noyau.toml"),
            "[environment]\nrequirements = [\"numpy\"]\nisolation = \"container\"\n",
        )
        .unwrap();
        let s = for_cell(&pd(dir.path()), Some("{network = true}"), "modules gcc/12").unwrap();
        assert_eq!(s.kind, Some(crate::Kind::Modules));
        assert!(s.requirements.is_empty());
        assert_eq!(s.isolation, crate::Isolation::Container);
        assert!(s.network);
        let s = for_cell(&pd(dir.path()), None, "six build=node").unwrap();
        assert_eq!(s.isolation, crate::Isolation::Container);
        assert_eq!(s.build, crate::BuildAt::Node);
        assert_eq!(s.requirements, vec!["six"]);
    }

    /// A cell is the notebook's: it may not change the sandbox the kernel
    /// was started with, in any of its forms.
    #[test]
    fn a_cell_may_not_set_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("open.toml"),
            "isolation = \"none\"\nnetwork = true\n",
        )
        .unwrap();
        for args in [
            "six isolation=none",
            "system network=true",
            "six scratch=/home/victim",
            "prefix /p ro_bind=/home/victim/.ssh",
            r#"{isolation = "none"}"#,
            r#"{kind = "system", notebook_dir = "/home/victim/.ssh"}"#,
            "file open.toml",
        ] {
            let e = for_cell(&pd(d), Some(r#"{isolation = "container"}"#), args)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("may not set") && e.contains("own sandbox"),
                "{args}: {e}"
            );
        }
        let e = from_cell_env(r#"{isolation = "none"}"#, &pd(d))
            .unwrap_err()
            .to_string();
        assert!(e.contains("may not set isolation"), "{e}");
    }

    /// A lock a settings file names is trusted only if the settings file
    /// is too (it chose the lock).
    #[test]
    fn a_lock_is_no_more_trusted_than_the_settings_file_naming_it() {
        use noyau_config::CodeTrust;
        let d = tempfile::tempdir().unwrap();
        let untrusted = CodeTrust::Untrusted {
            note: "writable by its group".into(),
        };
        let source = |file: Option<CodeTrust>| Source {
            what: "%noyau env file e.toml".into(),
            table: Map::new(),
            base: d.path().into(),
            author: Author::Project(pd(d.path())),
            file,
            read: None,
        };
        let s = source(Some(untrusted.clone()));
        let j = Judged::new(&s, &mut Site::default()).unwrap();
        let (_, note) = untrusted_dir(&j, Some(&CodeTrust::Trusted)).unwrap();
        assert_eq!(note, "writable by its group");
        let s = source(Some(CodeTrust::Trusted));
        let j = Judged::new(&s, &mut Site::default()).unwrap();
        assert!(untrusted_dir(&j, Some(&untrusted)).is_some());
        assert!(untrusted_dir(&j, Some(&CodeTrust::Trusted)).is_none());
    }

    /// A notebook's local image must be in its directory, or readable by
    /// everyone (a site's shared image): noyau hashes it and records (and
    /// shows) the sha256 of whatever file it names.
    #[test]
    fn a_notebooks_image_must_be_in_its_directory_or_shared() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("nb");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(d.path().join(".pgpass"), "x").unwrap();
        std::fs::write(dir.join("img.sif"), "x").unwrap();
        let chmod =
            |p: &Path, m| std::fs::set_permissions(p, PermissionsExt::from_mode(m)).unwrap();
        // /apps/containers: others may search it and read its images.
        let apps = d.path().join("apps");
        std::fs::create_dir(&apps).unwrap();
        for (f, m) in [("pytorch.sif", 0o644), ("mine.sif", 0o600)] {
            std::fs::write(apps.join(f), "x").unwrap();
            chmod(&apps.join(f), m);
        }
        chmod(d.path(), 0o755);
        chmod(&apps, 0o755);
        let source = |image: &str| Source {
            what: "the notebook's metadata".into(),
            table: serde_json::from_value(json!({"kind": "apptainer", "image": image})).unwrap(),
            base: dir.clone(),
            author: Author::Project(pd(&dir)),
            file: None,
            read: None,
        };
        chmod(&d.path().join(".pgpass"), 0o600);
        let shared = apps.join("pytorch.sif");
        let spec = merge(&[source(shared.to_str().unwrap())], &dir)
            .unwrap()
            .unwrap();
        assert_eq!(spec.image.as_deref(), shared.to_str());
        for private in ["../.pgpass", "../apps/mine.sif"] {
            let e = merge(&[source(private)], &dir).unwrap_err();
            assert!(matches!(e, EnvError::PrivateImage { .. }), "{e}");
            let e = e.to_string();
            assert!(
                e.contains("readable by everyone") && !e.contains("Copy the file"),
                "{e}"
            );
        }
        // Readable, but in a directory others may not search.
        chmod(&apps, 0o700);
        let e = merge(&[source(shared.to_str().unwrap())], &dir).unwrap_err();
        assert!(matches!(e, EnvError::PrivateImage { .. }), "{e}");
        let spec = merge(&[source("img.sif")], &dir).unwrap().unwrap();
        assert_eq!(
            spec.image.as_deref(),
            Some(dir.join("img.sif").to_str().unwrap())
        );
        // The user's own may be anywhere.
        let mut mine = source("../.pgpass");
        mine.author = Author::User;
        assert!(merge(&[mine], &dir).is_ok());
        // A URI is not a file.
        assert!(merge(&[source("docker://x/y@sha256:00")], &dir).is_ok());
    }

    /// What the project's noyau.toml, the notebook's metadata and a cell
    /// name that would run while the environment is prepared is refused
    /// (the directory is in no `trusted_projects`); the same from `--env`
    /// is the user's, and `--env` overriding the key clears it.
    #[test]
    fn untrusted_sources_may_not_name_code() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let refused = |r: Result<Option<EnvSpec>, EnvError>, key: &str, what: &str| {
            let e = r.unwrap_err();
            assert!(matches!(e, EnvError::UntrustedCode(_)), "{e}");
            let e = e.to_string();
            let real = std::fs::canonicalize(d).unwrap();
            assert!(
                e.contains(&format!("sets `{key}`"))
                    && e.contains(what)
                    && e.contains("outside the sandbox")
                    && e.contains(&format!("trusted_projects = [\"{}\"]", real.display()))
                    && e.contains("--env FILE_OR_TABLE")
                    && e.contains("copy the keys you have read")
                    // Not "--env DIR/noyau.toml": that runs the untrusted file as the user's.
                    && !e.contains(&format!("--env {}/noyau.toml", real.display())),
                "{e}"
            );
        };
        std::fs::write(
            d.join("noyau.toml"),
            "[environment]\npython = \"/home/attacker/bin/python\"\n",
        )
        .unwrap();
        refused(for_notebook(&pd(d), None, None, d), "python", "noyau.toml");
        let spec = for_notebook(&pd(d), None, Some(r#"{python = "3.11"}"#), d)
            .unwrap()
            .unwrap();
        assert_eq!(spec.python.as_deref(), Some("3.11"));
        std::fs::remove_file(d.join("noyau.toml")).unwrap();

        for (table, key) in [
            (
                json!({"module_use": ["/home/attacker/mf"], "modules": ["x"]}),
                "module_use",
            ),
            (json!({"modules": ["/home/attacker/mf/x"]}), "modules"),
            (
                json!({"kind": "modules", "modules": ["x"], "modules_init": "init.sh"}),
                "modules_init",
            ),
            (
                json!({"channels": "ch.scm", "packages": ["python"]}),
                "channels",
            ),
            (json!({"manifest": "m.scm"}), "manifest"),
            (
                json!({"requirements": ["pkg @ https://evil.example/pkg.whl"]}),
                "requirements",
            ),
            (
                json!({"lock": "six==1.16.0 --index-url https://evil.example\n"}),
                "lock",
            ),
        ] {
            let meta = json!({"noyau": {"environment": table.clone()}});
            refused(for_notebook(&pd(d), Some(&meta), None, d), key, "metadata");
            let cli = table.to_string();
            assert!(for_notebook(&pd(d), None, Some(&cli), d).is_ok(), "{cli}");
        }
        std::fs::write(d.join("evil.lock"), "-e ./pkg\n").unwrap();
        let meta = json!({"noyau": {"environment": {"kind": "python", "lock_file": "evil.lock"}}});
        refused(
            for_notebook(&pd(d), Some(&meta), None, d),
            "lock_file",
            "metadata",
        );

        for args in [
            "modules x module_use=mf",
            "python=/home/attacker/python six",
        ] {
            let e = for_cell(&pd(d), None, args).unwrap_err();
            assert!(matches!(e, EnvError::UntrustedCode(_)), "{args}: {e}");
        }
        std::fs::write(
            d.join("e.toml"),
            "[environment]\nmodules_init = \"i.sh\"\nmodules = [\"x\"]\n",
        )
        .unwrap();
        let e = for_cell(&pd(d), None, "file e.toml").unwrap_err();
        assert!(matches!(e, EnvError::UntrustedCode(_)), "{e}");
    }

    /// What a test's refusal must not show: a secret line of a file the
    /// notebook named.
    const SECRET: &str = "https://user:ghp_SECRET0123@git.example";

    /// A file of the user's outside the notebook's directory (`dir/../`),
    /// holding [`SECRET`] (not TOML, not a lock).
    fn secret_outside(d: &Path) -> PathBuf {
        let f = d.parent().unwrap().join(format!(
            "{}.git-credentials",
            d.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&f, format!("{SECRET}\n")).unwrap();
        f
    }

    fn outside(r: Result<impl std::fmt::Debug, EnvError>, what: &str) {
        let e = r.unwrap_err();
        assert!(matches!(e, EnvError::OutsideProject { .. }), "{what}: {e}");
        let e = e.to_string();
        assert!(
            !e.contains("ghp_SECRET")
                && e.contains("may name only files in its own directory")
                && e.contains("Copy the file into that directory")
                && e.contains("--env FILE"),
            "{what}: {e}"
        );
    }

    /// A file a notebook, a cell or a project names (a lock_file, an
    /// `--env` file) must be in its directory, symlinks followed: else
    /// noyau would read, say, ~/.git-credentials for it and show it. The
    /// user's own `--env` names files anywhere.
    #[test]
    fn a_file_a_notebook_names_must_be_in_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let secret = secret_outside(d);
        let _gone = scopeguard(&secret);
        let relative = format!("../{}", secret.file_name().unwrap().to_string_lossy());
        for f in [secret.display().to_string(), relative.clone()] {
            let meta = json!({"noyau": {"environment": {"kind": "python", "lock_file": f}}});
            outside(
                for_notebook(&pd(d), Some(&meta), None, d),
                "metadata lock_file",
            );
            std::fs::write(
                d.join("noyau.toml"),
                format!("[environment]\nlock_file = {f:?}\n"),
            )
            .unwrap();
            outside(for_notebook(&pd(d), None, None, d), "noyau.toml lock_file");
            std::fs::remove_file(d.join("noyau.toml")).unwrap();
            outside(
                for_cell(&pd(d), None, &format!("file {f}")),
                "%noyau env file",
            );
            outside(from_cell_env(&f, &pd(d)), "%%noyau on --env");
            outside(
                TargetSpec::Profile(&f, Some(d)).source(&pd(d)),
                "a project's profile environment",
            );
        }
        // A link in the directory to a file out of it is out of it.
        std::os::unix::fs::symlink(&secret, d.join("env.toml")).unwrap();
        outside(for_cell(&pd(d), None, "file env.toml"), "a link out");
        let meta = json!({"noyau": {"environment": {"kind": "python", "lock_file": "env.toml"}}});
        outside(
            for_notebook(&pd(d), Some(&meta), None, d),
            "a lock_file link out",
        );
        // Whether a file out of it exists is not told.
        outside(
            for_cell(&pd(d), None, "file ../none/x.toml"),
            "missing, outside",
        );
        let e = for_cell(&pd(d), None, "file none.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        // The user's own --env reads a file anywhere (here, and its
        // lock_file next to it).
        let theirs = tempfile::tempdir().unwrap();
        std::fs::write(theirs.path().join("r.lock"), "six==1.16.0\n").unwrap();
        std::fs::write(
            theirs.path().join("env.toml"),
            "requirements = [\"six\"]\nlock_file = \"r.lock\"\n",
        )
        .unwrap();
        let env = theirs.path().join("env.toml").display().to_string();
        let spec = for_notebook(&pd(d), None, Some(&env), d).unwrap().unwrap();
        assert_eq!(spec.lock.as_deref(), Some("six==1.16.0\n"));
    }

    /// A file a notebook names is read because it is in its directory; a
    /// hard link there to a file of the user's elsewhere (which another
    /// user can make where `fs.protected_hardlinks` is 0, to a file they
    /// cannot read) is in it too, so a file with other names is refused,
    /// saying so, and its text is not read.
    #[test]
    fn a_hard_linked_file_a_notebook_names_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let secret = secret_outside(d);
        let _gone = scopeguard(&secret);
        std::fs::hard_link(&secret, d.join("r.lock")).unwrap();
        std::fs::hard_link(&secret, d.join("env.toml")).unwrap();
        let meta = json!({"noyau": {"environment": {"kind": "python", "lock_file": "r.lock"}}});
        let refused = |r: Result<(), EnvError>, what: &str| {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("has 3 names (hard links)") && !e.contains("ghp_SECRET"),
                "{what}: {e}"
            );
        };
        refused(
            for_notebook(&pd(d), Some(&meta), None, d).map(drop),
            "lock_file",
        );
        refused(
            for_cell(&pd(d), None, "file env.toml").map(drop),
            "%noyau env file",
        );
        refused(
            from_cell_env("env.toml", &pd(d)).map(drop),
            "%%noyau on --env",
        );
        // One name: read.
        std::fs::remove_file(&secret).unwrap();
        std::fs::remove_file(d.join("env.toml")).unwrap();
        std::fs::write(d.join("r.lock"), "six==1.16.0\n").unwrap();
        let spec = for_notebook(&pd(d), Some(&meta), None, d).unwrap().unwrap();
        assert_eq!(spec.lock.as_deref(), Some("six==1.16.0\n"));
    }

    /// Removes a file left next to a temporary directory, at the end of a test.
    fn scopeguard(p: &Path) -> impl Drop + '_ {
        struct Rm<'a>(&'a Path);
        impl Drop for Rm<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(self.0);
            }
        }
        Rm(p)
    }

    /// A FIFO or a device where a file is named is refused at once, from
    /// a cell or from the user's own --env: never waited on (the kernel
    /// would hang) or read without end.
    #[test]
    fn a_fifo_or_a_device_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let fifo = d.join("env.toml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = for_cell(&pd(d), None, "file env.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        for f in [fifo.as_path(), Path::new("/dev/zero")] {
            let e = for_notebook(&pd(d), None, Some(&f.display().to_string()), d)
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a regular file"), "{f:?}: {e}");
        }
    }

    /// What a file a source names holds is never quoted in an error: not
    /// when it is not TOML or JSON (the parser's message quotes the line),
    /// nor when a lock line or a requirement from it is refused (its
    /// number, not its text). A cell's own words are still quoted.
    #[test]
    fn a_files_text_is_not_quoted_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let hidden = |r: Result<EnvSpec, EnvError>, want: &str| {
            let e = r.unwrap_err().to_string();
            assert!(!e.contains("ghp_SECRET") && e.contains(want), "{e}");
        };
        std::fs::write(d.join("creds.toml"), format!("{SECRET}\n")).unwrap();
        hidden(for_cell(&pd(d), None, "file creds.toml"), "line 1, column");
        let user = for_notebook(&pd(d), None, Some("creds.toml"), d).map(|s| s.unwrap());
        hidden(user, "line 1, column");
        std::fs::write(d.join("creds.json"), format!("{{\"a\": {SECRET}}}")).unwrap();
        hidden(for_cell(&pd(d), None, "file creds.json"), "line 1 column");
        // Parsed, but not a table, or a key of the wrong kind: named, not quoted.
        std::fs::write(d.join("list.json"), format!("[\"{SECRET}\"]")).unwrap();
        hidden(for_cell(&pd(d), None, "file list.json"), "not a list");
        std::fs::write(
            d.join("kind.toml"),
            format!("requirements = \"{SECRET}\"\n"),
        )
        .unwrap();
        hidden(
            for_cell(&pd(d), None, "file kind.toml"),
            "`requirements` is not a spec key, or",
        );
        std::fs::write(
            d.join("e.toml"),
            format!("requirements = [\"six\", \"{SECRET}/x.whl\"]\n"),
        )
        .unwrap();
        hidden(for_cell(&pd(d), None, "file e.toml"), "a direct reference");
        std::fs::write(
            d.join("creds.lock"),
            format!("six==1.16.0 \\\n    --hash=sha256:ab\n{SECRET}\n"),
        )
        .unwrap();
        let meta = json!({"noyau": {"environment": {"kind": "python", "lock_file": "creds.lock"}}});
        hidden(
            for_notebook(&pd(d), Some(&meta), None, d).map(|s| s.unwrap()),
            "lock line 3: a direct reference",
        );
        std::fs::write(
            d.join("opt.lock"),
            format!("six==1.16.0 --index-url={SECRET}\n"),
        )
        .unwrap();
        let meta = json!({"noyau": {"environment": {"kind": "python", "lock_file": "opt.lock"}}});
        hidden(
            for_notebook(&pd(d), Some(&meta), None, d).map(|s| s.unwrap()),
            "lock line 1 has an option that is not --hash=sha256:HEX",
        );
        let e = for_cell(&pd(d), None, "python=/home/attacker/python six")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"/home/attacker/python\""), "{e}");
    }

    /// A profile's `environment` that an untrusted project's noyau.toml
    /// set is held to a project's rules (code refused, requirements as
    /// wheels only); the same from the user's file is theirs.
    #[test]
    fn a_projects_profile_environment_is_the_projects() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let spec = |s: &str, project: Option<&Path>| {
            merge(&[TargetSpec::Profile(s, project).source(&pd(d))?], d)
        };
        let evil = r#"{"python": "/home/attacker/bin/python"}"#;
        let e = spec(evil, Some(d)).unwrap_err();
        assert!(matches!(e, EnvError::UntrustedCode(_)), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("the environment of a profile in")
                && e.contains("noyau.toml sets `python`")
                && e.contains("noyau trust"),
            "{e}"
        );
        assert!(spec(evil, None).is_ok());
        let six = r#"{"requirements": ["six"]}"#;
        assert!(spec(six, Some(d)).unwrap().unwrap().wheels_only);
        assert!(!spec(six, None).unwrap().unwrap().wheels_only);
    }

    /// A cell's `%%noyau on T environment=…` word is held to the rules of
    /// its `--env`: no sandbox key at all, even from a trusted directory.
    #[test]
    fn a_cells_environment_word_may_not_set_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let p = noyau_config::Profile {
            environment: Some(r#"{"isolation": "none"}"#.into()),
            environment_from: Some(d.to_path_buf()),
            environment_from_cell: true,
            ..Default::default()
        };
        let e = TargetSpec::profile(&p).unwrap().source(&pd(d)).unwrap_err();
        assert!(
            e.to_string()
                .contains("(or `environment=`) may not set isolation"),
            "{e}"
        );
    }

    /// Requirements by name are the notebook's to choose, but installed
    /// from wheels only unless they come from the user.
    #[test]
    fn untrusted_requirements_are_wheels_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let meta = json!({"noyau": {"environment": {"requirements": ["six==1.16.0"]}}});
        let spec = for_notebook(&pd(d), Some(&meta), None, d).unwrap().unwrap();
        assert!(spec.wheels_only);
        let spec = for_notebook(&pd(d), Some(&meta), Some(r#"{requirements = ["six"]}"#), d)
            .unwrap()
            .unwrap();
        assert!(!spec.wheels_only);
        assert!(for_cell(&pd(d), None, "six").unwrap().wheels_only);
        let spec = for_notebook(&pd(d), None, Some(r#"{requirements = ["six"]}"#), d)
            .unwrap()
            .unwrap();
        assert!(!spec.wheels_only);
    }

    #[test]
    fn cli_accepts_json_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = from_cli(r#"{"requirements": ["idna"]}"#, dir.path()).unwrap();
        assert_eq!(s.table["requirements"], json!(["idna"]));
        std::fs::write(
            dir.path().join("e.toml"),
            "[environment]\nprefix = \"venv\"\n",
        )
        .unwrap();
        let s = from_cli("e.toml", dir.path()).unwrap();
        let spec = merge(&[s], dir.path()).unwrap().unwrap();
        assert_eq!(spec.prefix, Some(dir.path().join("venv")));
        let e = from_cli("nope.toml", dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a readable file"), "{e}");
        assert!(for_notebook(&pd(dir.path()), None, None, dir.path())
            .unwrap()
            .is_none());
    }
}
