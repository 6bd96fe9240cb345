//! [`DaskError`]: why a cluster could not be made.

/// Why a cluster could not be made (every job already submitted for it
/// was cancelled and its directory removed).
#[derive(Debug, thiserror::Error)]
pub enum DaskError {
    #[error("cannot make the cluster's directory {path}: {source}")]
    Dir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make the cluster's TLS material: {0}")]
    Certs(String),
    #[error(transparent)]
    Profile(#[from] noyau_sched::ProfileError),
    #[error(transparent)]
    Sched(#[from] noyau_sched::SchedError),
}
