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

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use noyau_trust::anchor::{identity_of, Identity, ProjectDir};
use noyau_trust::{Beneath, Expect, Mode, Owner, Problem, TrustError, WalkError};

use crate::files::{self, Origin};
use crate::ConfigError;

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
    /// `anchor`: the identity the project's directory was anchored to
    /// (noyau-trust's anchor), which an exact entry must have too.
    fn names(&self, real: &Path, anchor: Identity) -> bool {
        let dir = resolved(&self.dir);
        if self.wildcard {
            real.starts_with(dir)
        } else {
            real == dir && identity_of(&self.dir).is_ok_and(|e| e == anchor)
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
    pub fn reads(&self, dir: &ProjectDir) -> bool {
        let Ok((real, anchor)) = resolved_anchored(dir) else {
            return false;
        };
        self.0.iter().any(|e| e.names(&real, anchor))
    }

    /// Whether what the project in `dir` declares may name code: an exact
    /// entry of the user's, or a wildcard of the user's over a directory
    /// only the user or root can have made ([`secure_dir`]), whose
    /// noyau.toml only they can have written ([`secure_file`]).
    pub fn code(&self, dir: &ProjectDir) -> CodeTrust {
        self.code_if(dir, false, &mut |_| Ok(()))
    }

    /// [`read_in`](Self::read_in) for a file the project in `dir` names
    /// (`rel` beneath it: a lock file, a settings file), a refusal naming
    /// the user's config file.
    pub fn read_named(
        &self,
        dir: &ProjectDir,
        rel: &Path,
        limit: u64,
    ) -> Result<Option<(String, CodeTrust)>, ConfigError> {
        self.read_in(dir, rel, limit, true, crate::user_file().as_deref())
    }

    /// The text of `rel`, a file of the project in `dir` that noyau reads
    /// (a lock file, a settings file a notebook, cell or profile names, its
    /// noyau.toml: `named` says which), None when there is none, and
    /// whether its code is trusted, both judged on what was opened: the
    /// file is opened beneath `dir` (held open; no `..` nor link leads out
    /// of it: [`noyau_trust::Problem::Outside`]), checked on the descriptor
    /// as any project file, and under a wildcard its code is trusted only
    /// if that descriptor is the file reached from `dir`'s through no link,
    /// in closed directories, a file only the user or root could have
    /// written ([`Self::code_opened`]). A project's file is read because it
    /// is in the project's directory, so one with other names (a hard link
    /// another user made, where `fs.protected_hardlinks` is 0, to a file of
    /// the user's they cannot read, whose text a parse error could quote)
    /// is refused, its noyau.toml too. `user_file` is named in a refusal.
    pub(crate) fn read_in(
        &self,
        dir: &ProjectDir,
        rel: &Path,
        limit: u64,
        named: bool,
        user_file: Option<&Path>,
    ) -> Result<Option<(String, CodeTrust)>, ConfigError> {
        self.read_in_with(dir, rel, limit, named, user_file, &mut || {})
    }

    /// [`read_in`](Self::read_in), `between` run after each read, before
    /// the name is looked up again (for tests: a save by rename then). A
    /// file replaced while it was read (an editor or `git pull` saving by
    /// rename) is read again, [`READS`] times in all, before giving up.
    pub(crate) fn read_in_with(
        &self,
        dir: &ProjectDir,
        rel: &Path,
        limit: u64,
        named: bool,
        user_file: Option<&Path>,
        between: &mut dyn FnMut(),
    ) -> Result<Option<(String, CodeTrust)>, ConfigError> {
        let origin = Origin::Project {
            trusted: self.reads(dir),
        };
        // A named file may be reached through links in the directory (it
        // is opened beneath it, wherever they lead); noyau.toml as
        // noyau-config always read it.
        let expect = if named {
            origin.expect().follow_links()
        } else {
            origin.expect()
        };
        let beneath = match Beneath::project(dir) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(files::refusal(e, origin, dir, user_file)),
        };
        let mut reads = 0;
        loop {
            reads += 1;
            match self.read_once(dir, &beneath, &expect, rel, limit, between) {
                Ok(Read::Replaced) if reads < READS => {}
                Ok(Read::Replaced) => {
                    return Err(ConfigError::Read {
                        path: dir.join(rel),
                        source: std::io::Error::other(format!(
                            "it was replaced or removed while it was read, {READS} times \
                             (if it is being edited, run again once it is saved)"
                        )),
                    })
                }
                Ok(Read::Missing) => return Ok(None),
                Ok(Read::Text(text, trust)) => return Ok(Some((text, trust))),
                Err(Refused::Trust(e)) => return Err(files::refusal(e, origin, dir, user_file)),
                Err(Refused::Config(e)) => return Err(e),
            }
        }
    }

    /// One read of `rel` beneath `dir` for [`read_in_with`](Self::read_in_with).
    fn read_once(
        &self,
        project: &ProjectDir,
        dir: &Beneath,
        expect: &noyau_trust::Expect,
        rel: &Path,
        limit: u64,
        between: &mut dyn FnMut(),
    ) -> Result<Read, Refused> {
        let file = match dir.open_file(expect, rel) {
            Ok(f) => f,
            Err(e) if e.is_not_found() => return Ok(Read::Missing),
            Err(e) => return Err(Refused::Trust(e)),
        };
        let path = dir.path().join(rel);
        let meta = file.metadata().map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        if meta.nlink() > 1 {
            return Err(Refused::Trust(TrustError::Refused {
                path,
                problem: Problem::HardLinked {
                    links: meta.nlink(),
                },
            }));
        }
        let trust = self.code_opened(project, dir, rel, &meta);
        let text = files::read_text(&path, file, limit)?;
        between();
        // The one-name check above could be raced: a name another user
        // linked to a file of the user's and removed before the fstat.
        // The file read must still be at its name, with that one name.
        let again = nix::sys::stat::fstatat(dir.fd(), rel, nix::fcntl::AtFlags::empty());
        match again {
            Ok(st) if (st.st_dev, st.st_ino) == (meta.dev(), meta.ino()) && st.st_nlink == 1 => {
                Ok(Read::Text(text, trust))
            }
            Ok(st) if (st.st_dev, st.st_ino) == (meta.dev(), meta.ino()) => {
                // (nlink_t is u32 on some targets.)
                #[allow(clippy::unnecessary_cast)]
                let links = st.st_nlink as u64;
                Err(Refused::Trust(TrustError::Refused {
                    path,
                    problem: Problem::HardLinked { links },
                }))
            }
            // Replaced by another file, or removed (a save by rename
            // leaves the name to the new file).
            _ => Ok(Read::Replaced),
        }
    }

    /// [`code`](Self::code), for the code in `rel` too, a file of the
    /// project's opened beneath `dir` whose descriptor's metadata is
    /// `opened`: under a wildcard, `dir` must be the directory
    /// [`secure_dir`] judged (the same inode), and `opened` the file
    /// reached from it through closed directories and no link
    /// ([`secure_below`]), the user's or root's, closed to group and
    /// others, with one name.
    fn code_opened(
        &self,
        project: &ProjectDir,
        dir: &Beneath,
        rel: &Path,
        opened: &Metadata,
    ) -> CodeTrust {
        let shown = dir.path().join(rel);
        self.code_if(
            project,
            rel == Path::new(crate::PROJECT_FILE),
            &mut |judged| {
                let held = nix::sys::stat::fstat(dir.fd())
                    .map_err(|e| format!("cannot examine {} ({e})", dir.path().display()))?;
                if (held.st_dev, held.st_ino) != (judged.dev(), judged.ino()) {
                    return Err(format!(
                        "{} was replaced while it was read",
                        dir.path().display()
                    ));
                }
                let found = secure_below(dir, rel)?;
                if (found.st_dev, found.st_ino) != (opened.dev(), opened.ino()) {
                    return Err(format!(
                        "{} was replaced while it was read",
                        shown.display()
                    ));
                }
                secure_expect()
                    .check_meta(&shown, opened)
                    .map_err(|e| refused(&shown, e))?;
                if opened.nlink() > 1 {
                    return Err(format!(
                        "{} has {} names (hard links)",
                        shown.display(),
                        opened.nlink()
                    ));
                }
                Ok(())
            },
        )
    }

    /// [`code`](Self::code), where a wildcard's trust also needs
    /// `file_ok` of the project directory's metadata as [`secure_dir`]
    /// judged it (what it says: why not); `read_toml`: the project's
    /// noyau.toml is the file `file_ok` judges.
    fn code_if(
        &self,
        dir: &ProjectDir,
        read_toml: bool,
        file_ok: &mut dyn FnMut(&Metadata) -> Result<(), String>,
    ) -> CodeTrust {
        let (real, anchor) = match resolved_anchored(dir) {
            Ok(r) => r,
            Err(note) => return CodeTrust::Untrusted { note },
        };
        let mut notes = Vec::new();
        let mut secure = || {
            let judged = secure_dir(dir)?;
            if anchor != (judged.dev(), judged.ino()) {
                return Err(moved(dir));
            }
            if !read_toml {
                secure_file(&dir.join(crate::PROJECT_FILE))?;
            }
            file_ok(&judged)
        };
        for e in self.0.iter().filter(|e| e.names(&real, anchor)) {
            match (e.from, e.wildcard) {
                (Grantor::User, false) => return CodeTrust::Trusted,
                (Grantor::User, true) => match secure().and_then(|()| one_filesystem(&e.dir, dir)) {
                    Ok(()) => return CodeTrust::Trusted,
                    Err(why) => notes.push(format!(
                        "Your trusted_projects entry \"{}\" does not trust its code: {why}; a \
                         wildcard trusts only directories, and the noyau.toml, lock file and \
                         settings files in them, that you or root own and that no one else could have written or \
                         put there (no link followed). Or trust this one directory by an exact \
                         entry, if you trust everyone who can write in it: `noyau trust {}`.",
                        e.shown(),
                        real.display()
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

/// Why `dir`, under a wildcard entry's `top`, could be a mount's, if it
/// could: every directory from `top` down to `dir` (resolved) must be on
/// `top`'s filesystem. Where `/etc/fuse.conf` allows `user_allow_other`,
/// another user can mount a FUSE on a directory of theirs, and it says
/// what it likes of its files (owner, mode, links), or hangs the reader.
fn one_filesystem(top: &Path, dir: &Path) -> Result<(), String> {
    let (top, real) = (resolved(top), resolved(dir));
    let dev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|e| format!("cannot examine {} ({e})", p.display()))
    };
    let want = dev(&top)?;
    for d in real.ancestors().take_while(|a| a.starts_with(&top)) {
        if dev(d)? != want {
            return Err(format!(
                "{} is on another filesystem than {} (a mount, whose files say what its \
                 mounter likes)",
                d.display(),
                top.display()
            ));
        }
    }
    Ok(())
}

/// `dir` resolved ([`resolved`]) and the identity it was anchored to
/// (noyau-trust's anchor), which what it resolved to must have: else the
/// directory changed while noyau used it (why not, as a note).
fn resolved_anchored(dir: &ProjectDir) -> Result<(PathBuf, Identity), String> {
    let real = resolved(dir);
    let anchor = dir.identity();
    match identity_of(&real) {
        Ok(id) if id == anchor => Ok((real, anchor)),
        _ => Err(moved(dir)),
    }
}

/// How many times a project's file replaced while it was read is read.
const READS: usize = 3;

/// What one read of a project's file found.
enum Read {
    Text(String, CodeTrust),
    Missing,
    /// Its name no longer led to the file read, after the read.
    Replaced,
}

/// Why one read of a project's file failed: refused (to be told as the
/// project's file is), or it could not be read.
enum Refused {
    Trust(TrustError),
    Config(ConfigError),
}

impl From<ConfigError> for Refused {
    fn from(e: ConfigError) -> Self {
        Refused::Config(e)
    }
}

/// Why a project's directory is not trusted when it is no longer the one
/// its notebook was read from.
fn moved(dir: &Path) -> String {
    format!(
        "the notebook's directory {} changed while noyau used it (moved, replaced by a \
         link, or remounted): no entry trusts it",
        dir.display()
    )
}

/// `p` as the filesystem resolves it (as given when it cannot be).
fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.into())
}

/// Why no one but the user (or root) can be said to have written `dir`,
/// or put it where it is, if that is not so. `dir` is resolved here, one
/// component at a time, each examined without following it: every
/// directory passed through must be the user's or root's and not writable
/// by group or others, unless sticky (`/tmp`, `/scratch`: there only an
/// entry's owner may rename it), and every link followed the user's or
/// root's; `dir` itself must be the user's or root's and not writable by
/// others at all. Else another user could have made it, or swap it (or a
/// link on the way) for theirs between this check and noyau's reads.
pub(crate) fn secure_dir(dir: &Path) -> Result<Metadata, String> {
    let abs = std::path::absolute(dir).map_err(|e| format!("{} ({e})", dir.display()))?;
    let mut todo: Vec<std::ffi::OsString> = Vec::new();
    push_front(&mut todo, &abs);
    let mut real = PathBuf::from("/");
    passable(&real)?;
    let mut links = 0;
    while let Some(name) = todo.pop() {
        match name.to_str() {
            Some("/") => real = PathBuf::from("/"),
            Some(".") => {}
            Some("..") => {
                real.pop();
            }
            _ => {
                let next = real.join(&name);
                let meta = std::fs::symlink_metadata(&next)
                    .map_err(|e| format!("cannot examine {} ({e})", next.display()))?;
                if meta.file_type().is_symlink() {
                    links += 1;
                    if links > 40 {
                        return Err(format!("{} leads through too many links", dir.display()));
                    }
                    ours(&next, meta.uid(), "could point it elsewhere")?;
                    let target = std::fs::read_link(&next)
                        .map_err(|e| format!("cannot read the link {} ({e})", next.display()))?;
                    push_front(&mut todo, &target);
                    continue;
                }
                real = next;
                if !todo.is_empty() {
                    passable(&real)?;
                }
            }
        }
    }
    Expect::dir()
        .owner(Owner::MeOr(0, "root"))
        .mode(Mode::NoOthersWrite)
        .check(&real)
        .map_err(|e| refused(&real, e))
}

/// Why `rel`, beneath `dir` (judged by [`secure_dir`]), could have been
/// put there by someone other than the user or root, if it could: each
/// directory down to it is opened from the one above without following a
/// link and judged on what was opened ([`passable`]; its own directory not
/// writable by others at all: [`Beneath::walk`]), and what is at `rel`
/// there is no link. Its metadata, to compare with what was opened by
/// `rel`.
fn secure_below(dir: &Beneath, rel: &Path) -> Result<nix::sys::stat::FileStat, String> {
    // The file's own directory may not be writable by others even if
    // sticky: a sticky directory's others may add names to it.
    let dev = nix::sys::stat::fstat(dir.fd())
        .map_err(|e| format!("cannot examine {} ({e})", dir.path().display()))?
        .st_dev;
    let other_fs = |d: &Path| format!("{} is on another filesystem (a mount)", d.display());
    let closed = |d: &Path, meta: &nix::sys::stat::FileStat, its_own: bool| {
        if meta.st_dev != dev {
            return Err(other_fs(d));
        }
        closed_dir(d, meta.st_uid, meta.st_mode, its_own)
    };
    let meta = dir.walk(rel, closed).map_err(|e| match e {
        WalkError::NotPlain => format!("{} leaves its directory on the way", rel.display()),
        WalkError::Dir { at, errno } => format!(
            "{} is not a directory reached through no link ({errno})",
            at.display()
        ),
        WalkError::Last { at, errno } => format!("cannot examine {} ({errno})", at.display()),
        WalkError::Refused(why) => why,
    })?;
    if noyau_trust::is_link(&meta) {
        return Err(problem_text(&dir.path().join(rel), &Problem::Symlink));
    }
    if meta.st_dev != dev {
        return Err(other_fs(&dir.path().join(rel)));
    }
    Ok(meta)
}

/// A directory of `uid` and `mode` at `d`, below a project's, on the way
/// to a file whose code a wildcard trusts: [`passable`]'s rule, and not
/// writable by others even if sticky when it is the file's own (`own`).
fn closed_dir(d: &Path, uid: u32, mode: u32, own: bool) -> Result<(), String> {
    if own && mode & 0o022 != 0 {
        return Err(problem_text(
            d,
            &noyau_trust::Problem::OthersWrite {
                mode: mode & 0o7777,
            },
        ));
    }
    passable_mode(d, uid, mode)
}

/// Why `file`, a project's file under a wildcard entry, could have been
/// written by someone other than the user or root, if it could: it must
/// be theirs, not writable by group or others, and not a link (the
/// directory it is in was checked by [`secure_dir`]). No file: nothing to
/// check.
fn secure_file(file: &Path) -> Result<(), String> {
    if std::fs::symlink_metadata(file).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return Ok(());
    }
    secure_expect()
        .check(file)
        .map(drop)
        .map_err(|e| refused(file, e))
}

/// A file whose code a wildcard trusts: the user's or root's, closed to
/// group and others, not a link.
fn secure_expect() -> Expect {
    Expect::file()
        .owner(Owner::MeOr(0, "root"))
        .mode(Mode::NoOthersWrite)
}

/// `e`, a refusal of `p`, as a reason ([`problem_text`]).
fn refused(p: &Path, e: noyau_trust::TrustError) -> String {
    match e.problem() {
        Some(problem) => problem_text(p, problem),
        None => e.to_string(),
    }
}

/// `problem` of `p` as a reason; a directory or file writable by its
/// group alone gets the way out of a private group's umask (002).
fn problem_text(p: &Path, problem: &noyau_trust::Problem) -> String {
    match problem {
        noyau_trust::Problem::OthersWrite { mode } => {
            format!("{} {problem}{}", p.display(), group_hint(p, *mode))
        }
        _ => format!("{} {problem}", p.display()),
    }
}

/// For `p` of `mode`, writable by its group and not by others: what to do
/// if that group is the user's own (a umask of 002, as Debian's
/// USERGROUPS_ENAB gives every user), which a wildcard cannot know.
fn group_hint(p: &Path, mode: u32) -> String {
    if mode & 0o020 == 0 || mode & 0o002 != 0 {
        return String::new();
    }
    format!(
        " (if that group is you alone, as with a umask of 002, make it writable by you only: \
         `chmod g-w {}`)",
        p.display()
    )
}

/// Puts `path`'s components before those still `todo` (a stack: the
/// next one last).
fn push_front(todo: &mut Vec<std::ffi::OsString>, path: &Path) {
    todo.extend(
        path.components()
            .rev()
            .map(|c| c.as_os_str().to_os_string()),
    );
}

/// A directory passed through on the way: see [`secure_dir`].
fn passable(d: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(d)
        .map_err(|e| format!("cannot examine {} ({e})", d.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", d.display()));
    }
    passable_mode(d, meta.uid(), meta.mode())
}

/// [`passable`], for the directory `d` of `uid` and `mode`.
fn passable_mode(d: &Path, uid: u32, mode: u32) -> Result<(), String> {
    ours(d, uid, "could replace what is in it")?;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(format!(
            "{} on the way to it is writable by its group or others (mode {:04o}), who could \
             replace what is in it{}",
            d.display(),
            mode & 0o7777,
            group_hint(d, mode)
        ));
    }
    Ok(())
}

/// `uid`, the owner of `p`, is the user or root; else who could do `what`.
fn ours(p: &Path, uid: u32, what: &str) -> Result<(), String> {
    if uid == noyau_trust::me() || uid == 0 {
        return Ok(());
    }
    Err(format!(
        "{} on the way to it belongs to uid {uid}, who {what}",
        p.display()
    ))
}
