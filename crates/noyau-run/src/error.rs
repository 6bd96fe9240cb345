//! [`RunError`], the crate's one error type: why a run or a sweep could
//! not go on, and the exit code that says so ([`RunError::code`]). The
//! binary prints it; what is printed says what was wrong and what to do.

use std::path::PathBuf;

use crate::exit;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad input or usage; the text says what was wrong and what to do.
    #[error("{0}")]
    Input(String),
    /// A file or directory noyau needs could not be read, made or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file or directory another user could have put there (or made
    /// open to them) is refused; the source says which, and what to do.
    #[error("{what}: {source}")]
    Untrusted {
        what: String,
        source: noyau_trust::TrustError,
    },
    /// Another run holds the output.
    #[error("{} is being written by another noyau run{holder}; wait for it to end or name another output", output.display())]
    Busy { output: PathBuf, holder: String },
    /// Saving the notebook failed.
    #[error("{source} (check the directory exists and is writable)")]
    Save {
        source: noyau_notebook::NotebookError,
    },
    /// A command noyau runs failed.
    #[error("{command} failed ({status}):\n{stderr}")]
    Command {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// The managed Python kernel could not be made.
    #[error("cannot make the managed Python kernel: {0}")]
    ManagedKernel(Box<RunError>),
    /// The kernel could not be started.
    #[error(transparent)]
    Kernel(#[from] noyau_client::remote::KernelError),
    /// The scheduler refused or failed.
    #[error(transparent)]
    Sched(#[from] noyau_sched::SchedError),
}

impl RunError {
    /// The exit code of `noyau run` for this error.
    pub fn code(&self) -> i32 {
        match self {
            RunError::Input(_)
            | RunError::Io { .. }
            | RunError::Untrusted { .. }
            | RunError::Busy { .. }
            | RunError::Save { .. } => exit::BAD_INPUT,
            RunError::Command { .. }
            | RunError::ManagedKernel(_)
            | RunError::Kernel(_)
            | RunError::Sched(_) => exit::KERNEL_START,
        }
    }

    /// An [`RunError::Io`] maker for `map_err`.
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> RunError {
        let path = path.into();
        move |source| RunError::Io { what, path, source }
    }
}

/// A [`RunError::Untrusted`] maker for `map_err`.
pub(crate) fn untrusted(
    what: impl Into<String>,
) -> impl FnOnce(noyau_trust::TrustError) -> RunError {
    let what = what.into();
    move |source| RunError::Untrusted { what, source }
}

pub(crate) fn bad(message: impl Into<String>) -> RunError {
    RunError::Input(message.into())
}
