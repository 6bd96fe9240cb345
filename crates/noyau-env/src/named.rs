//! Files a source names that noyau reads itself, on the submitting host and
//! outside any sandbox: an `--env FILE` (also `%noyau env file PATH`,
//! `%%noyau on … --env PATH`, a profile's `environment = "PATH"`) and a
//! `lock_file`.
//!
//! What noyau reads can reach the cell's error, the kernel's banner, the
//! log, and (a lock) the output notebook's metadata. So a file that a
//! notebook, a cell or a project names ([`Author::Project`]) must be in
//! that project's directory once symlinks are followed: a notebook from
//! anyone must not have noyau read `~/.git-credentials` for it. Every such
//! file is opened once and checked on what was opened (noyau-config's
//! readers: a regular file, never waited on, of bounded size), and what
//! it holds is never quoted when it cannot be parsed ([`toml_error`],
//! [`json_error`]): the file and the line, not the line's text.
//!
//! The user's own `--env FILE` and `NOYAU_ENV` may name a file anywhere.
//!
//! The file is opened beneath the project's directory, held open
//! (`openat2`'s `RESOLVE_BENEATH`: no `..` nor link on the way, however
//! swapped in, leads out of it, and no absolute link is followed;
//! noyau-trust's `Beneath` says what is done without `openat2`), that
//! directory being the one the notebook was read from (noyau-trust's
//! anchor: the directory itself swapped for a link is refused), and
//! judged on what was opened
//! ([`noyau_config::TrustedProjects::read_named`]); one with other names
//! (a hard link) is refused: it may be a file of the user's that another
//! user linked there.

use std::path::{Component, Path, PathBuf};

use noyau_config::CodeTrust;

use crate::sources::{Author, Site};
use crate::EnvError;

/// The text of the file at `path` (absolute) that `what` names for
/// `author`, None when there is none, and whether the code it names is
/// trusted, both judged on the file opened beneath the project's
/// directory ([`noyau_config::TrustedProjects::read_named`], `site` the
/// site's and user's entries). `user` reads a file of the user's own
/// source (the `--env` file's reader, or the lock's).
pub(crate) fn read(
    path: &Path,
    author: &Author,
    what: &str,
    limit: u64,
    user: fn(&Path, u64) -> Result<Option<String>, noyau_config::ConfigError>,
    site: &mut Site,
) -> Result<Option<(String, CodeTrust)>, EnvError> {
    let Author::Project(dir) = author else {
        return Ok(user(path, limit)?.map(|t| (t, CodeTrust::Trusted)));
    };
    let real_dir = project_dir(dir, what, &homes())?;
    // The directory judged is the one the notebook was read from; the
    // file is then opened beneath `dir` itself, which must still be it
    // (noyau-trust's anchor).
    dir.check_path(&real_dir)
        .map_err(|e| EnvError::from(noyau_config::ConfigError::Untrusted(e)))?;
    // Where it is said to be missing, or outside: never read.
    let missing = || inside_resolved(path, &real_dir, what).map(|_| None);
    let rel = match path.strip_prefix(dir) {
        Ok(rel) if rel.components().all(|c| matches!(c, Component::Normal(_))) => rel.to_path_buf(),
        // `..`, or a path to the directory through another name: as the
        // kernel resolves it (what is then opened is still opened beneath).
        _ => {
            match std::fs::canonicalize(path).map(|p| p.strip_prefix(&real_dir).map(PathBuf::from))
            {
                Ok(Ok(rel)) => rel,
                Ok(Err(_)) => return Err(outside(path, what, &real_dir)),
                Err(_) => return missing(),
            }
        }
    };
    match site.get()?.read_named(dir, &rel, limit) {
        Ok(Some(read)) => Ok(Some(read)),
        Ok(None) => missing(),
        Err(noyau_config::ConfigError::LinkOut { .. }) => Err(outside(path, what, &real_dir)),
        Err(e) => Err(e.into()),
    }
}

/// The one answer for every file outside `real_dir`, missing or not,
/// linked or not, and never where it leads: else a notebook could learn
/// whether a file of the user's exists, or where a link of theirs points.
fn outside(path: &Path, what: &str, real_dir: &Path) -> EnvError {
    EnvError::OutsideProject {
        what: what.into(),
        path: path.into(),
        dir: real_dir.into(),
    }
}

/// Refuses `path` (absolute), a local image `what` names for `author`
/// (noyau hashes it, and shows and records the sha256), unless the user
/// named it, `trusted` (the source's code is), it is readable by everyone
/// on this host ([`readable_by_all`]: a site's shared image, whose hash
/// anyone can take), or it is in the project's directory ([`inside`]).
/// A private file of the user's elsewhere is refused: its hash would be
/// shown to the notebook's author.
pub(crate) fn check_image(
    path: &Path,
    author: &Author,
    what: &str,
    trusted: bool,
) -> Result<(), EnvError> {
    let Author::Project(dir) = author else {
        return Ok(());
    };
    if trusted || readable_by_all(path) {
        return Ok(());
    }
    match inside(path, dir, what) {
        Ok(_) => Ok(()),
        Err(EnvError::OutsideProject { what, path, dir }) => {
            Err(EnvError::PrivateImage { what, path, dir })
        }
        Err(e) => Err(e),
    }
}

/// Whether `path` is a regular file that anyone on this host may read:
/// readable by others, in directories others may search.
fn readable_by_all(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    let mode = |p: &Path| std::fs::metadata(p).map(|m| (m.is_file(), m.permissions().mode()));
    matches!(mode(&real), Ok((true, m)) if m & 0o004 != 0)
        && real
            .ancestors()
            .skip(1)
            .all(|d| matches!(mode(d), Ok((false, m)) if m & 0o001 != 0))
}

/// `dir` resolved, unless it is `/`, one of `homes` or above one: a
/// project directory there holds every file of the user's, and a notebook
/// there (downloaded into `~`, a console started in `~`) may name none.
fn project_dir(dir: &Path, what: &str, homes: &[PathBuf]) -> Result<PathBuf, EnvError> {
    let real_dir = std::fs::canonicalize(dir)
        .map_err(|e| EnvError::io(format!("resolving {}", dir.display()), e))?;
    let under_dir = |h: &PathBuf| std::fs::canonicalize(h).is_ok_and(|h| h.starts_with(&real_dir));
    if real_dir == Path::new("/") || homes.iter().any(under_dir) {
        return Err(EnvError::ProjectTooBroad {
            what: what.into(),
            dir: real_dir,
        });
    }
    Ok(real_dir)
}

/// `path` resolved, if it is in `dir` (resolved too); None when it does
/// not exist but its directory is in `dir`; else a refusal.
fn inside(path: &Path, dir: &Path, what: &str) -> Result<Option<PathBuf>, EnvError> {
    inside_home(path, dir, what, &homes())
}

/// The user's home directories: `$HOME` and their passwd entry's (`$HOME`
/// may be unset, or not the one their files are in).
fn homes() -> Vec<PathBuf> {
    let passwd = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten();
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .into_iter()
        .chain(passwd.map(|u| u.dir))
        .collect()
}

/// [`inside`], `homes` the user's home directories ([`project_dir`]).
fn inside_home(
    path: &Path,
    dir: &Path,
    what: &str,
    homes: &[PathBuf],
) -> Result<Option<PathBuf>, EnvError> {
    inside_resolved(path, &project_dir(dir, what, homes)?, what)
}

/// [`inside`], `real_dir` the project's directory resolved
/// ([`project_dir`]).
fn inside_resolved(path: &Path, real_dir: &Path, what: &str) -> Result<Option<PathBuf>, EnvError> {
    let outside = || outside(path, what, real_dir);
    match std::fs::canonicalize(path) {
        Ok(real) if real.starts_with(real_dir) => Ok(Some(real)),
        Ok(_) => Err(outside()),
        // A missing file is said to be missing only where the project may
        // name one, and only if nothing is there: a dangling link in the
        // directory (git stores links) would else tell whether its target
        // (`/home/victim/.ssh/id_rsa`) exists.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
            let nothing = matches!(std::fs::symlink_metadata(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound);
            match parent {
                Some(p) if p.starts_with(real_dir) && nothing => Ok(None),
                _ => Err(outside()),
            }
        }
        Err(_) => Err(outside()),
    }
}

/// A TOML file that does not parse: where, and the parser's reason, but
/// not the offending text (toml's own message quotes the line).
pub(crate) fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> EnvError {
    let at = noyau_config::toml_error_at(e, text).map_or_else(String::new, |(line, col)| {
        format!(" at line {line}, column {col}")
    });
    EnvError::Invalid(format!(
        "{} is not valid TOML{at}: {}",
        path.display(),
        e.message().trim_end()
    ))
}

/// A JSON file that does not parse: where, and why when that is about
/// the syntax (serde_json's syntax errors quote nothing).
pub(crate) fn json_error(path: &Path, e: &serde_json::Error) -> EnvError {
    use serde_json::error::Category;
    let why = match e.classify() {
        Category::Syntax | Category::Eof => e.to_string(),
        _ => format!("at line {} column {}", e.line(), e.column()),
    };
    EnvError::Invalid(format!("{} is not valid JSON: {why}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notebook in `/`, in the home directory or above it may not name
    /// a file for noyau to read: every file of the user's is "in" it.
    #[test]
    fn a_notebook_in_the_home_directory_or_above_names_no_file() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("home/me");
        std::fs::create_dir_all(home.join("proj")).unwrap();
        std::fs::write(home.join(".netrc"), "machine x password p\n").unwrap();
        std::fs::write(home.join("proj/env.toml"), "").unwrap();
        // $HOME elsewhere (or unset): the passwd entry's home counts too.
        let homes = [d.path().join("elsewhere"), home.clone()];
        for dir in [home.clone(), d.path().join("home"), PathBuf::from("/")] {
            let e = inside_home(&home.join(".netrc"), &dir, "lock_file", &homes).unwrap_err();
            assert!(matches!(e, EnvError::ProjectTooBroad { .. }), "{e}");
            let e = e.to_string();
            assert!(
                e.contains("move the notebook into a directory of its own")
                    && e.contains("--env FILE"),
                "{e}"
            );
        }
        let proj = home.join("proj");
        let ok = inside_home(&proj.join("env.toml"), &proj, "lock_file", &homes).unwrap();
        assert!(ok.is_some());
    }

    /// Every file outside gets one answer: whether it exists, and where a
    /// link leads, is not told.
    #[test]
    fn every_file_outside_gets_one_answer() {
        let d = tempfile::tempdir().unwrap();
        let proj = d.path().join("proj");
        std::fs::create_dir(&proj).unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "x").unwrap();
        std::os::unix::fs::symlink(&secret, proj.join("link")).unwrap();
        let said = |p: &Path| {
            inside_home(p, &proj, "lock_file", &[])
                .unwrap_err()
                .to_string()
                .replace(&p.display().to_string(), "PATH")
        };
        // A link in the directory to a file outside, existing or not.
        std::os::unix::fs::symlink(d.path().join("missing"), proj.join("dangling")).unwrap();
        let existing = said(&secret);
        assert_eq!(existing, said(&d.path().join("missing")));
        assert_eq!(existing, said(&proj.join("link")));
        assert_eq!(existing, said(&proj.join("dangling")));
        // A file missing in the directory is said to be missing.
        assert!(inside_home(&proj.join("none"), &proj, "lock_file", &[])
            .unwrap()
            .is_none());
        assert!(!said(&proj.join("link")).contains(&secret.display().to_string()));
    }
}
