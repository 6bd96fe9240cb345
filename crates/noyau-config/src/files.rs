//! Reading a config file as someone who shares the machine could have left
//! it: opened once (never blocking: a FIFO is refused, not waited on),
//! checked on what was opened (noyau-trust's [`Expect`]), and read only up
//! to [`MAX_SIZE`].
//!
//! The site's and the user's files must be regular files that the user or
//! root owns and that no one else can write; a symlink there is followed
//! (an admin's or a dotfile manager's link, in directories only they
//! write). A project's `noyau.toml` lies in a directory that may be shared
//! (a team's project, a scratch space): its profiles say what a job runs,
//! so one that another user could have written is refused, naming the two
//! ways out: fix the file, or trust its directory in the user's own
//! config (`trusted_projects`), as git's `safe.directory` does for a
//! repository. In a trusted directory the file may be anyone's (and a
//! symlink there is followed, beneath the directory only), but it is
//! still a regular file of bounded size, with one name (a hard link
//! another user made to a file of the user's is refused). A project's
//! files are opened beneath its directory held open
//! ([`crate::TrustedProjects`]); this module says what is expected of
//! them and what a refusal says.
//!
//! The directory itself is not checked: the file is opened once and its
//! owner and mode checked on the open descriptor, and another user who can
//! write the directory (a world-writable one without the sticky bit) can
//! remove or rename the user's file but cannot put there a file the user
//! owns (save a hard link, refused); what they could put is theirs, and
//! refused.

use std::io::Read;
use std::path::Path;

use noyau_trust::{Expect, Mode, Owner, Problem, TrustError};

use crate::ConfigError;

/// The most a config file may hold: far more than any real one.
pub const MAX_SIZE: u64 = 1 << 20;

/// The most a lock file a project names may hold (a pinned environment
/// with every wheel's hash can pass 1 MiB).
pub const MAX_LOCK_SIZE: u64 = 64 << 20;

/// Who may have written a file noyau reads for its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The system's or the user's file, at a path the admin or the user set.
    Site,
    /// A project's `noyau.toml`, in a directory that may be shared.
    Project { trusted: bool },
    /// A file the user named themselves (`--env FILE`): anyone's, where
    /// they said, but a regular file (a FIFO would hang the reader, a
    /// device fill its memory) of bounded size.
    Named,
}

impl Origin {
    pub(crate) fn expect(self) -> Expect {
        let ours = Expect::file()
            .owner(Owner::MeOr(0, "root"))
            .mode(Mode::NoOthersWrite);
        match self {
            Origin::Site => ours.follow_links(),
            Origin::Project { trusted: false } => ours,
            Origin::Project { trusted: true } | Origin::Named => Expect::file()
                .owner(Owner::Any)
                .mode(Mode::Any)
                .follow_links(),
        }
    }
}

/// The directory a file is in (`.` for a bare name).
pub(crate) fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The text of the site's, the user's or a named config file at `path`
/// (at most `limit` bytes), None when there is none. (A project's files
/// are read beneath its directory: [`crate::TrustedProjects`]'s `read_in`.)
pub(crate) fn read(path: &Path, origin: Origin, limit: u64) -> Result<Option<String>, ConfigError> {
    let file = match origin.expect().open(path) {
        Ok(f) => f,
        Err(e) if e.is_not_found() => {
            // A link to nothing (into a filesystem not mounted here) is no
            // file, but say so: its owner meant one to be read.
            if path.is_symlink() {
                tracing::warn!("{} is a link to nothing: not read", path.display());
            }
            return Ok(None);
        }
        Err(e) => return Err(refusal(e, origin, dir_of(path), None)),
    };
    read_text(path, file, limit).map(Some)
}

/// `e`, the refusal of a file of `origin` read in `dir` (a project's
/// directory: the one to trust, or the one a link led out of), as the
/// error that says what to do about it.
pub(crate) fn refusal(
    e: TrustError,
    origin: Origin,
    dir: &Path,
    user_file: Option<&Path>,
) -> ConfigError {
    match e {
        TrustError::Refused {
            path,
            problem: Problem::Outside,
        } => ConfigError::LinkOut {
            dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.into()),
            path,
        },
        // Not a file's fault: no setting or trust makes it right.
        TrustError::Refused {
            path,
            problem: Problem::Moved,
        } => ConfigError::Untrusted(TrustError::Refused {
            path,
            problem: Problem::Moved,
        }),
        TrustError::Refused { path, problem } => match origin {
            Origin::Site => ConfigError::Untrusted(TrustError::Refused { path, problem }),
            Origin::Named => ConfigError::NotAFile { path, problem },
            Origin::Project { .. } => ConfigError::UntrustedProject {
                fix: project_fix(&path, &problem, dir, user_file),
                path,
                problem,
            },
        },
        TrustError::Io { path, source, .. } => ConfigError::Read { path, source },
    }
}

/// The text of `file`, opened and checked from `path`, if it holds at
/// most `limit` bytes.
pub(crate) fn read_text(
    path: &Path,
    file: std::fs::File,
    limit: u64,
) -> Result<String, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.into(),
        source,
    };
    let size = file.metadata().map_err(read_err)?.len();
    let mut text = String::new();
    // (`take`: the file may grow after it was examined.)
    file.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if size > limit || text.len() as u64 > limit {
        return Err(ConfigError::TooBig {
            path: path.into(),
            size: size.max(text.len() as u64),
            limit,
        });
    }
    Ok(text)
}

/// What to do about a project file refused for `problem`: fix it, or trust
/// its project's directory `dir` (not when it is not a file at all: no
/// setting makes a FIFO a config file).
fn project_fix(path: &Path, problem: &Problem, dir: &Path, user_file: Option<&Path>) -> String {
    let p = path.display();
    let fix = match problem {
        Problem::WrongKind { .. } => {
            return format!("another user may have put it there: remove it (`rm {p}`)")
        }
        Problem::Symlink => format!(
            "replace the link with a copy of the file it leads to (`cp --remove-destination \
             \"$(readlink -f {p})\" {p}`)"
        ),
        Problem::OthersWrite { .. } => {
            format!("if it is yours, make it writable by you only (`chmod go-w {p}`)")
        }
        _ => "another user may have written it: read it, and copy what you want of it into a \
              file of yours in a directory of yours (or ask its owner to remove it)"
            .to_string(),
    };
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.into());
    let user = user_file.map_or_else(
        || "your own config file (~/.config/noyau/config.toml)".into(),
        |u| u.display().to_string(),
    );
    format!(
        "noyau reads a project's files (its noyau.toml and the lock_file it names) only if each \
         is a regular file that you or root own and only its owner can write. Either {fix}; \
         or, if you trust everyone who can write in {d}, add `trusted_projects = [\"{d}\"]` \
         to {user}",
        d = dir.display()
    )
}
