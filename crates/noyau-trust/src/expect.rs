//! A call site's policy: what kind of thing it expects at a path, whose,
//! with which modes, and whether a symlink there is followed.

use std::fs::{FileType, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::{Problem, TrustError};

/// What must be at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Socket,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Dir => "a directory",
            Kind::File => "a regular file",
            Kind::Socket => "a socket",
        })
    }
}

/// Whose it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// This process's effective uid ([`crate::me`]).
    Me,
    /// One account, named in messages ("the site cache's owner").
    Uid(u32, &'static str),
    /// This process's uid, or one other account named in messages.
    MeOr(u32, &'static str),
    /// Anyone's (an admin's file that root or a service account may own).
    Any,
}

impl Owner {
    /// None when `uid` may own it, else whose it should have been, for
    /// [`Problem::NotOwned`].
    fn refuses(self, uid: u32) -> Option<String> {
        let me = crate::me();
        match self {
            Owner::Any => None,
            Owner::Me | Owner::MeOr(_, _) if uid == me => None,
            Owner::Uid(u, _) | Owner::MeOr(u, _) if uid == u => None,
            Owner::Me => Some(format!("you (uid {me})")),
            Owner::Uid(u, name) => Some(format!("{name} (uid {u})")),
            Owner::MeOr(u, name) => Some(format!("you (uid {me}) or {name} (uid {u})")),
        }
    }
}

/// Which permission bits are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Any,
    /// No write bit for group or others (a shared, read-only entry).
    NoOthersWrite,
    /// Nothing for group or others; the mode given is the one messages ask for
    /// (0o600 for a file, 0o700 for a directory).
    Private(u32),
    /// Exactly this (of the 0o777 bits).
    Exactly(u32),
    /// Anything, then set to this on what was opened, once its kind and
    /// owner are checked (directories noyau made and owns, whose mode an
    /// older noyau or the umask may have left open).
    Set(u32),
}

/// A call site's policy for one path. [`Expect::dir`] and [`Expect::file`]
/// start private (ours, nothing for group or others, a symlink refused);
/// the other methods change one rule.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub(crate) kind: Kind,
    owner: Owner,
    pub(crate) mode: Mode,
    pub(crate) follow: bool,
}

impl Expect {
    /// A directory of ours, 0700 or closer, not a symlink.
    pub fn dir() -> Self {
        Expect {
            kind: Kind::Dir,
            owner: Owner::Me,
            mode: Mode::Private(0o700),
            follow: false,
        }
    }

    /// A regular file of ours, 0600 or closer, not a symlink.
    pub fn file() -> Self {
        Expect {
            kind: Kind::File,
            owner: Owner::Me,
            mode: Mode::Private(0o600),
            follow: false,
        }
    }

    /// A unix socket of ours, any mode, not a symlink (one to replace: its
    /// mode is set when it is made again).
    pub fn socket() -> Self {
        Expect {
            kind: Kind::Socket,
            owner: Owner::Me,
            mode: Mode::Any,
            follow: false,
        }
    }

    pub fn owner(self, owner: Owner) -> Self {
        Expect { owner, ..self }
    }

    pub fn mode(self, mode: Mode) -> Self {
        Expect { mode, ..self }
    }

    /// A symlink at the path's last component is followed and what it
    /// leads to checked: only for paths an admin or the user configured,
    /// in directories no one else can write.
    pub fn follow_links(self) -> Self {
        Expect {
            follow: true,
            ..self
        }
    }

    /// Checks what is at `path` now (for a path that is only looked at;
    /// open it with [`Expect::open`] to use it).
    pub fn check(&self, path: &Path) -> Result<Metadata, TrustError> {
        let path = &crate::plain(path);
        if let Mode::Set(_) = self.mode {
            return Err(crate::misuse(
                "check",
                path,
                "Mode::Set needs an open file: use Expect::open",
            ));
        }
        let meta = if self.follow {
            std::fs::metadata(path)
        } else {
            std::fs::symlink_metadata(path)
        }
        .map_err(|e| TrustError::io("examine", path, e))?;
        self.check_meta(path, &meta)?;
        Ok(meta)
    }

    /// Checks `meta`, the metadata of `path` (taken without following a
    /// symlink, or of an open file).
    pub fn check_meta(&self, path: &Path, meta: &Metadata) -> Result<(), TrustError> {
        let refuse = |problem| Err(TrustError::refused(path, problem));
        let kind = meta.file_type();
        if kind.is_symlink() {
            return refuse(Problem::Symlink);
        }
        let right_kind = match self.kind {
            Kind::Dir => kind.is_dir(),
            Kind::File => kind.is_file(),
            Kind::Socket => kind.is_socket(),
        };
        if !right_kind {
            return refuse(Problem::WrongKind {
                found: describe(kind),
                want: self.kind,
            });
        }
        if let Some(want) = self.owner.refuses(meta.uid()) {
            return refuse(Problem::NotOwned {
                owner: meta.uid(),
                want,
            });
        }
        let mode = meta.mode() & 0o7777;
        match self.mode {
            Mode::NoOthersWrite if mode & 0o022 != 0 => refuse(Problem::OthersWrite { mode }),
            Mode::Private(want) if mode & 0o077 != 0 => refuse(Problem::TooOpen { mode, want }),
            Mode::Exactly(want) if mode & 0o777 != want => refuse(Problem::TooOpen { mode, want }),
            _ => Ok(()),
        }
    }
}

/// The kind of a file, as messages name it.
fn describe(kind: FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_file() {
        "a regular file"
    } else if kind.is_symlink() {
        "a symlink"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a device"
    }
}
