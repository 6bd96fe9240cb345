//! What was wrong with a path, and what to do about it.

use std::path::{Path, PathBuf};

use crate::Kind;

/// Why a path is not trusted. Its text completes a sentence whose subject
/// is the path ("/tmp/x is a symlink"), so callers with errors of their own
/// can use it as theirs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("is a symlink")]
    Symlink,
    #[error("is {found}, not {want}")]
    WrongKind { found: &'static str, want: Kind },
    /// `want` says whose it should be, e.g. "you (uid 1000)".
    #[error("belongs to uid {owner}, not to {want}")]
    NotOwned { owner: u32, want: String },
    #[error("is writable by its group or others (mode {mode:04o})")]
    OthersWrite { mode: u32 },
    #[error("has mode {mode:04o}; it must be {want:04o} (only its owner may use it)")]
    TooOpen { mode: u32, want: u32 },
    /// A file about to be rewritten, or read for a notebook, that has
    /// other names.
    #[error("has {links} names (hard links)")]
    HardLinked { links: u64 },
    /// A path opened beneath a directory that leads out of it (`..`, an
    /// absolute path, a link to elsewhere, a mount; with `openat2` any
    /// absolute link, without it one leading out), or, without `openat2`,
    /// that could not be reached inside it in a way the walk can tell from
    /// outside (EACCES, ENOTDIR, a relative link to nothing).
    #[error("leads out of its directory, or cannot be reached inside it")]
    Outside,
    /// The notebook's directory, resolved again from its path, is not the
    /// directory the notebook was read from ([`crate::anchor`]).
    #[error("is no longer the directory the notebook was read from (it changed or was remounted while noyau used it)")]
    Moved,
}

impl Problem {
    /// What the user can do about it.
    fn fix(&self, path: &Path) -> String {
        let p = path.display();
        match self {
            Problem::Symlink | Problem::WrongKind { .. } => {
                format!("another user may have put it there: remove it (`rm {p}`)")
            }
            Problem::NotOwned { want, .. } => {
                format!("it is used only if owned by {want}: remove it, or have it chowned")
            }
            Problem::OthersWrite { .. } => format!("`chmod go-w {p}`, or remove it"),
            Problem::TooOpen { want, .. } => format!("`chmod {want:o} {p}`, or remove it"),
            Problem::HardLinked { .. } => format!(
                "another user may have linked it to a file of yours elsewhere, which noyau \
                 would write or show: remove it (`rm {p}`), or, if it is yours, make it a \
                 copy (`cp {p} {p}.new && mv {p}.new {p}`)"
            ),
            Problem::Outside => "noyau reads only a file reached inside the directory, on \
                                 its filesystem: put the file itself there (a link to a file \
                                 in it must be relative: `ln -sr`), and check that it can be \
                                 read"
                .into(),
            Problem::Moved => "if it was moved or replaced by a link, someone who can write \
                               its parent directory may have done it: keep the notebook in a \
                               directory whose parents only you (or root) can write, and run \
                               it again"
                .into(),
        }
    }
}

/// A path refused, or one that could not be examined.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{} {problem}: {}", path.display(), problem.fix(path))]
    Refused { path: PathBuf, problem: Problem },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TrustError {
    pub(crate) fn refused(path: &Path, problem: Problem) -> Self {
        TrustError::Refused {
            path: path.into(),
            problem,
        }
    }

    /// `action` (a verb: "read", "list") on `path` failed with `source`:
    /// for callers that go on with what noyau-trust opened or made.
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        TrustError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// What was wrong, when the path was refused (not an I/O error).
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            TrustError::Refused { problem, .. } => Some(problem),
            TrustError::Io { .. } => None,
        }
    }

    /// Nothing is at the path.
    pub fn is_not_found(&self) -> bool {
        matches!(self, TrustError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// For callers whose errors are `io::Error`s: the I/O error's kind is kept
/// (NotFound stays NotFound), a refusal is PermissionDenied; the text is
/// this error's (the path and what to do).
impl From<TrustError> for std::io::Error {
    fn from(e: TrustError) -> Self {
        let kind = match &e {
            TrustError::Io { source, .. } => source.kind(),
            TrustError::Refused { .. } => std::io::ErrorKind::PermissionDenied,
        };
        std::io::Error::new(kind, e)
    }
}
