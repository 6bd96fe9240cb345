//! The one place noyau decides whether a path on a shared machine can be
//! trusted: another user may have planted a symlink, a FIFO, a file or a
//! directory of their own where noyau expects its own, or made one of
//! noyau's open to them.
//!
//! Each call site states its policy as an [`Expect`] (what kind of thing,
//! whose, which modes, whether a symlink at the last component is followed)
//! and uses it to check a path, to open a file and check what was opened
//! (never the path twice), or to make a private directory. A refusal is a
//! [`TrustError`] naming the path, what was wrong ([`Problem`]) and what to
//! do about it.

pub mod anchor;
mod beneath;
mod error;
mod expect;
mod open;
mod replace;

pub use beneath::{is_link, Beneath, WalkError};
pub use error::{Problem, TrustError};
pub use expect::{Expect, Kind, Mode, Owner};
pub use open::create_private;
pub use replace::{replace, replace_at};

/// What the tests of noyau's crates share about who runs them.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    /// True when running as root (giving a file to another user, `nobody`,
    /// needs it, as scripts/test runs); under CI, not being root fails the
    /// test rather than letting it pass without running.
    pub fn root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root under CI"
        );
        false
    }
}

/// The effective uid: the owner of what this process creates, so the one
/// its own files must have.
pub fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// `path` without a trailing separator (or `.` components): `link/`
/// resolves `link`, so neither `lstat` nor `O_NOFOLLOW` would see a
/// symlink there.
fn plain(path: &std::path::Path) -> std::path::PathBuf {
    path.components().collect()
}

/// A call that cannot do what its `Expect` says (a bug of the caller's).
fn misuse(action: &'static str, path: &std::path::Path, why: &str) -> TrustError {
    let e = std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("noyau bug: {why}"),
    );
    TrustError::io(action, path, e)
}

#[cfg(test)]
mod tests;
