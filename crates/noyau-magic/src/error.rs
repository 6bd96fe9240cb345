//! [`MagicError`], the crate's one error type: what a magic's cell fails
//! with. Each kind is a Python exception name the cell's error shows
//! (`UsageError`, `NoyauTargetError`…), so a notebook reads the same
//! error from the proxy kernel and from `noyau run`.

/// Why a `%noyau` cell failed; the text is the error's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MagicError {
    /// The magic's line is malformed.
    #[error("{0}")]
    Usage(String),
    /// A target cannot be started, reached or found.
    #[error("{0}")]
    Target(String),
    /// `%noyau push/pull` failed.
    #[error("{0}")]
    Transfer(String),
    /// A Dask cluster could not be made, or ended.
    #[error("{0}")]
    Dask(String),
    /// The kernel's environment cannot be shown, locked or chosen.
    #[error("{0}")]
    Env(String),
    /// A `%noyau data` file is not what the run prepared.
    #[error("{0}")]
    Data(String),
    /// A magic this host does not do (`%noyau env SPEC` in `noyau run`).
    #[error("{0}")]
    NotHere(String),
}

impl MagicError {
    /// The exception name a cell shows.
    pub fn ename(&self) -> &'static str {
        match self {
            MagicError::Usage(_) => "UsageError",
            MagicError::Target(_) => "NoyauTargetError",
            MagicError::Transfer(_) => "NoyauTransferError",
            MagicError::Dask(_) => "NoyauDaskError",
            MagicError::Env(_) => "NoyauEnvError",
            MagicError::Data(_) => "NoyauDataError",
            MagicError::NotHere(_) => "NoyauMagicError",
        }
    }
}
