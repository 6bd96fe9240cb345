//! `trusted_projects`: which project directories are trusted, and for
//! what. An entry grants one of two things, depending on whose file holds
//! it:
//!
//! * reading: the project's `noyau.toml` (and the lock file it names) is
//!   read whoever wrote it, as git's `safe.directory`. Any entry grants it,
//!   the site's or the user's.
//! * code: what the project's `noyau.toml` and notebooks declare may name
//!   code that runs outside the sandbox (a profile's `prologue`, `env`,
//!   scheduler options; an environment's `python`, `module_use`,
//!   requirement URLs…). Only the user's own file grants it (the one
//!   `noyau trust DIR` writes): a site entry such as `/scratch/*` would
//!   run, for every user, what anyone who can make a directory there
//!   writes. An exact entry trusts that directory whoever owns it (the
//!   user looked and chose); an entry `DIR/*` trusts a directory under
//!   DIR only if no one but the user (or root) can have written it or put
//!   it there ([`secure_dir`]).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use noyau_trust::{Expect, Mode, Owner};

/// Whose config file an entry is in, which decides what it grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grantor {
    /// The system's file: reading only.
    Site,
    /// The user's own file: reading and code.
    User,
}

/// One `trusted_projects` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The directory as written, without a trailing `/*`.
    dir: PathBuf,
    /// Written `DIR/*`: every directory under DIR (and DIR itself).
    wildcard: bool,
    from: Grantor,
}

impl Entry {
    /// Whether the entry names `real`, a resolved directory. The entry is
    /// resolved too: it may go through a link.
    fn names(&self, real: &Path) -> bool {
        let dir = resolved(&self.dir);
        if self.wildcard {
            real.starts_with(dir)
        } else {
            real == dir
        }
    }

    fn shown(&self) -> String {
        let star = if self.wildcard { "/*" } else { "" };
        format!("{}{star}", self.dir.display())
    }
}

/// The `trusted_projects` entries of the site's and the user's files,
/// each knowing whose file it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProjects(Vec<Entry>);

/// Whether a project's directory is trusted to name code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeTrust {
    Trusted,
    /// Not trusted; `note` says why the entries that name the directory do
    /// not trust it (a site's entry, a wildcard over a directory others
    /// could have written), for the refusal. Empty when none names it.
    Untrusted {
        note: String,
    },
}

impl CodeTrust {
    pub fn is_trusted(&self) -> bool {
        matches!(self, CodeTrust::Trusted)
    }

    /// The note, as a sentence to append to a refusal (empty when none).
    pub fn note(&self) -> &str {
        match self {
            CodeTrust::Trusted => "",
            CodeTrust::Untrusted { note } => note,
        }
    }
}

impl TrustedProjects {
    /// Adds a file's list, `from` whose file it is; a relative entry is
    /// refused (against which directory would it be?).
    pub(crate) fn extend(&mut self, entries: Vec<String>, from: Grantor) -> Result<(), String> {
        for e in entries {
            if !Path::new(&e).is_absolute() {
                return Err(format!(
                    "trusted_projects: {e:?} is not an absolute path; write the directory in \
                     full, e.g. \"/scratch/team/project\""
                ));
            }
            let (dir, wildcard) = match e.strip_suffix("/*") {
                Some(under) => (under, true),
                None => (e.as_str(), false),
            };
            self.0.push(Entry {
                dir: dir.into(),
                wildcard,
                from,
            });
        }
        Ok(())
    }

    /// Whether the project files in `dir` are read whoever wrote them:
    /// any entry that names it. Both sides are compared as the filesystem
    /// resolves them (the working directory is already resolved; a
    /// notebook's path or an entry may go through a link).
    pub fn reads(&self, dir: &Path) -> bool {
        let real = resolved(dir);
        self.0.iter().any(|e| e.names(&real))
    }

    /// Whether what the project in `dir` declares may name code: an exact
    /// entry of the user's, or a wildcard of the user's over a directory
    /// only the user or root can have made ([`secure_dir`]).
    pub fn code(&self, dir: &Path) -> CodeTrust {
        let real = resolved(dir);
        let mut notes = Vec::new();
        for e in self.0.iter().filter(|e| e.names(&real)) {
            match (e.from, e.wildcard) {
                (Grantor::User, false) => return CodeTrust::Trusted,
                (Grantor::User, true) => match secure_dir(dir) {
                    Ok(()) => return CodeTrust::Trusted,
                    Err(why) => notes.push(format!(
                        "Your trusted_projects entry \"{}\" does not trust its code: {why}; a \
                         wildcard trusts only directories that you or root own and that no one \
                         else could have written or put there.",
                        e.shown()
                    )),
                },
                (Grantor::Site, _) => notes.push(format!(
                    "The site's trusted_projects entry \"{}\" lets noyau read its noyau.toml, \
                     not run what it names: only your own config file can trust that.",
                    e.shown()
                )),
            }
        }
        CodeTrust::Untrusted {
            note: notes.join(" "),
        }
    }
}

/// `p` as the filesystem resolves it (as given when it cannot be).
fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.into())
}

/// Why no one but the user (or root) can be said to have written `dir`,
/// or put it where it is, if that is not so. `dir` is resolved and what
/// was resolved is examined without following links: the directory must
/// be the user's or root's and not writable by group or others; and so
/// must each directory above it (one another user could write could have
/// the project swapped for theirs between this check and noyau's reads),
/// except a sticky one (`/tmp`, `/scratch`: only an entry's owner may
/// rename it there). A link met on the way to `dir` as given must be the
/// user's or root's, in such a directory, or another user could point it
/// elsewhere after the check.
pub(crate) fn secure_dir(dir: &Path) -> Result<(), String> {
    let real = std::fs::canonicalize(dir)
        .map_err(|e| format!("{} cannot be resolved ({e})", dir.display()))?;
    Expect::dir()
        .owner(Owner::MeOr(0, "root"))
        .mode(Mode::NoOthersWrite)
        .check(&real)
        .map_err(|e| match e.problem() {
            Some(p) => format!("{} {p}", real.display()),
            None => e.to_string(),
        })?;
    if let Some(parent) = real.parent() {
        secure_chain(parent)?;
    }
    links_on_the_way(dir)
}

/// `from` (resolved) and each directory above it: see [`secure_dir`].
fn secure_chain(from: &Path) -> Result<(), String> {
    for above in from.ancestors() {
        let meta = std::fs::symlink_metadata(above)
            .map_err(|e| format!("cannot examine {} ({e})", above.display()))?;
        let (uid, mode) = (meta.uid(), meta.permissions().mode());
        if !meta.is_dir() {
            return Err(format!("{} is no longer a directory", above.display()));
        }
        if uid != noyau_trust::me() && uid != 0 {
            return Err(format!(
                "{} above it belongs to uid {uid}, who could replace what is in it",
                above.display()
            ));
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(format!(
                "{} above it is writable by its group or others (mode {:04o}), who could \
                 replace what is in it",
                above.display(),
                mode & 0o7777
            ));
        }
    }
    Ok(())
}

/// Each link on the way to `dir` as given (`/home` to `/gpfs/home`): the
/// user's or root's, in a directory that passes [`secure_chain`].
fn links_on_the_way(dir: &Path) -> Result<(), String> {
    let abs = std::path::absolute(dir).map_err(|e| format!("{} ({e})", dir.display()))?;
    for p in abs.ancestors() {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            continue;
        };
        if !meta.file_type().is_symlink() {
            continue;
        }
        let uid = meta.uid();
        if uid != noyau_trust::me() && uid != 0 {
            return Err(format!(
                "it is reached through the link {}, which belongs to uid {uid}, who could point \
                 it elsewhere",
                p.display()
            ));
        }
        if let Some(parent) = p.parent() {
            secure_chain(&resolved(parent))
                .map_err(|why| format!("it is reached through the link {}: {why}", p.display()))?;
        }
    }
    Ok(())
}
