//! Kernel environments: what a notebook says its code needs, built once where
//! the kernel runs, recorded so that a later run gets the same thing, and
//! optionally isolated.
//!
//! The pieces, in the order a kernel start meets them:
//!
//! * [`spec`]: [`EnvSpec`], the declaration (`kind = "python" | "modules" |
//!   "prefix" | "guix" | "apptainer"`, plus `isolation`/`network`), its
//!   validation, and its normal form, whose hash is the cache key.
//! * [`sources`]: where a spec comes from, later wins key by key:
//!   `[environment]` in `noyau.toml` next to the notebook, then the
//!   notebook's `metadata.noyau.environment`, then `--env` (an inline
//!   TOML/JSON table, or a file). Relative paths are resolved against the
//!   source's directory before merging, so the merged spec is self-contained
//!   and can travel to a compute node. An interactive kernel's cell chooses
//!   one with `%noyau env …` (`sources::for_cell`).
//! * [`trust`]: what the notebook and the project may not declare unless
//!   the user trusts the project (code run while the environment is
//!   prepared, outside the sandbox).
//! * [`cache`]: a content-addressed directory (default
//!   `$XDG_CACHE_HOME/noyau/envs`, `NOYAU_ENV_CACHE` to move it to a shared
//!   filesystem). An entry is built in a temporary directory and renamed into
//!   place under an exclusive `flock`, so however many agents ask for the
//!   same spec at once it is built once; an entry without its completion
//!   record (a killed build) is removed and rebuilt.
//! * [`python`] (uv: resolve to a lock with hashes, sync it into a venv),
//!   [`modules`] (`module load` lines in a shell that then execs the kernel),
//!   [`prefix`] (an existing venv or conda env, recorded by its package
//!   list), [`guix`] and [`apptainer`] (command lines around the kernel):
//!   each turns a spec into a [`Realised`] environment and a record.
//! * [`isolate`]: `isolation = "container"` puts the kernel under bubblewrap.
//! * [`realise()`](realise::realise) ties them together; the agent calls it
//!   once before starting the kernel, then [`Realised::command`] wraps each
//!   kernel launch (the argv and environment given to
//!   `noyau_client::process::KernelProcess::launch`).
//!
//! Everything here is synchronous (it runs subprocesses and takes file
//! locks); async callers use `spawn_blocking`. Progress lines (uv's own
//! output included) go to a caller-supplied callback.

pub mod apptainer;
pub mod cache;
mod cmd;
pub mod data;
pub mod guix;
pub mod index;
pub mod isolate;
pub mod manage;
pub mod modules;
mod named;
pub mod prefix;
pub mod prepare;
pub mod python;
pub mod realise;
pub mod sources;
pub mod spec;
pub mod trust;

pub use cache::Cache;
pub use data::{DataFile, DataRef};
pub use prepare::{prepare, realise_job, Prepared};
pub use realise::{realise, Realised};
pub use spec::{BuildAt, EnvSpec, Isolation, Kind};

/// A failure to read, build or use an environment.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The spec itself is wrong: what, and how to fix it.
    #[error("environment spec: {0}")]
    Invalid(String),
    /// A build step failed; `output` is the tool's own message.
    #[error("{summary}\n{output}")]
    Build { summary: String, output: String },
    /// Something in a shared cache that another user could have planted.
    #[error(transparent)]
    Untrusted(#[from] cache::Untrusted),
    /// The project's noyau.toml could not be read, or is not trusted.
    #[error(transparent)]
    Config(#[from] noyau_config::ConfigError),
    /// A notebook's or a project's source names code that would run while
    /// the environment is prepared, or loosens the kernel's sandbox, and
    /// the project is not trusted.
    #[error(transparent)]
    UntrustedCode(Box<UntrustedCode>),
    /// A file a notebook, a cell or a project names that is not in its
    /// directory ([`named`]).
    #[error(
        "{what} names {}, which is not in the notebook's or project's directory ({}): a \
         notebook, a cell or a project may name only files in its own directory, since noyau reads them on this host, outside any sandbox, and \
         what it reads may be shown (a link to a file in it must be relative: noyau follows \
         no absolute link there). Copy the file into that directory; or, if the file is \
         yours and you meant it, give it yourself: `noyau run --env FILE`, or NOYAU_ENV in \
         your kernelspec", path.display(), dir.display()
    )]
    OutsideProject {
        /// The source and key (`%noyau env file`, `lock_file in …`).
        what: String,
        path: std::path::PathBuf,
        /// The project's directory, resolved.
        dir: std::path::PathBuf,
    },
    /// A local image a notebook, a cell or a project names that is not in
    /// its directory, nor readable by everyone ([`named::check_image`]).
    #[error(
        "{what} names {}, which is neither in the notebook's or project's directory ({}) nor \
         readable by everyone on this host (or does not exist): noyau hashes a local image and \
         shows and records its sha256, so an untrusted notebook may name only such an image. \
         If the image is meant to be shared, make it readable by others (`chmod o+r`, and its \
         directories `o+x`); if you trust this project, `noyau trust {}`; or give the image \
         yourself: `noyau run --env FILE`, or NOYAU_ENV in your kernelspec",
        path.display(), dir.display(), dir.display()
    )]
    PrivateImage {
        /// The source and key (`image in …`).
        what: String,
        path: std::path::PathBuf,
        /// The project's directory, resolved.
        dir: std::path::PathBuf,
    },
    /// A file a notebook, a cell or a project names, when its directory
    /// is `/`, the user's home or above it: every file of theirs is in it.
    #[error(
        "{what}: the notebook's or project's directory is {}, which holds all your files: a \
         notebook there may not name files for noyau to read. To use it, move the notebook \
         into a directory of its own (with the files it names); or, if the file is yours and \
         you meant it, give it yourself: `noyau run --env FILE`, or NOYAU_ENV in your \
         kernelspec", dir.display()
    )]
    ProjectTooBroad {
        /// The source and key (`%noyau env file`, `lock_file in …`).
        what: String,
        /// The directory, resolved.
        dir: std::path::PathBuf,
    },
    /// A data file whose bytes are not the ones declared; nothing was kept.
    #[error(
        "{url}: its sha256 is {}, not the expected {expected}; the file was not kept (check the \
         URL and the hash)", got.as_deref().unwrap_or("another (`sha256sum` it, if it is yours)")
    )]
    HashMismatch {
        url: String,
        expected: String,
        /// None for a local file ([`data`]).
        got: Option<String>,
    },
    /// A data file could not be fetched.
    #[error("cannot fetch {url}: {why}")]
    Fetch { url: String, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// What [`EnvError::UntrustedCode`] refused, and why.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} sets `{key}`: {why}. {risk}, and the notebook or project it comes from \
     is not trusted. \
     Read what it sets first. If you trust everyone who can write in {dir}, run \
     `noyau trust {dir}` (it adds `trusted_projects = [\"{dir}\"]` to {user_file}); or \
     copy the keys you have read and want into an environment of your own: a file or \
     table of yours given with `noyau run --env FILE_OR_TABLE`, or NOYAU_ENV in your \
     kernelspec (not the project's own file, which would be run as yours){}",
    noyau_config::spaced(note),
    dir = dir.display(),
    user_file = user_file_shown()
)]
pub struct UntrustedCode {
    /// The source (`[environment] in /p/noyau.toml`, `%noyau env …`).
    pub what: String,
    pub key: String,
    pub why: String,
    /// What it would do.
    pub risk: trust::Risk,
    /// Why the `trusted_projects` entries that name the directory do not
    /// trust it (`noyau_config::CodeTrust::note`), or empty.
    pub note: String,
    /// The project's directory, the one to trust.
    pub dir: std::path::PathBuf,
}

/// The user's config file (where `noyau trust` writes), or how it is found.
fn user_file_shown() -> String {
    noyau_config::user_file().map_or_else(
        || "your config file (~/.config/noyau/config.toml)".into(),
        |f| f.display().to_string(),
    )
}

impl EnvError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        EnvError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Where progress lines go.
pub type Progress<'a> = &'a mut dyn FnMut(&str);

/// This host's name, for records (where something was built or fetched).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// SHA-256 of bytes, in hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
