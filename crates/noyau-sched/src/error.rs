//! The crate's one error type.

use std::path::PathBuf;

use crate::run::CommandError;

#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("unknown backend {:?}; available backends: {}", .0, crate::backends().join(", "))]
    UnknownBackend(String),
    #[error("invalid resource request: {0}")]
    Invalid(String),
    /// A profile key or value (a key another scheduler's, a bad time…).
    #[error("{0}")]
    Profile(#[from] crate::ProfileError),
    #[error("cannot submit the job: {0}")]
    Submit(CommandError),
    #[error("the submission ended without an answer (its task failed); see noyau's log")]
    NoAnswer,
    #[error("cannot submit the job: {command} printed no job id: {output:?}")]
    NoJobId {
        command: &'static str,
        output: String,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{what}'s answer is not understood: {why}")]
    Answer { what: &'static str, why: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Untrusted(#[from] noyau_trust::TrustError),
    #[error("cannot start the agent `{program}` locally: {source}")]
    LocalSpawn {
        program: String,
        source: std::io::Error,
    },
    #[error(
        "the local backend keeps no job list: its agents are child processes of their proxies"
    )]
    NotBatch,
    #[error("no batch scheduler here: {} is on PATH", either(.0))]
    NoneInstalled(Vec<String>),
    #[error(
        "the commands of {} are all on PATH: say --backend {}, or name the site's scheduler \
         once with `scheduler = \"…\"` in ~/.config/noyau/config.toml",
        .0.join(" and "),
        .0.join("|")
    )]
    SeveralInstalled(Vec<&'static str>),
    /// A job id not in its scheduler's form: refused before it reaches a
    /// command line (`scontrol update JobId=1,2` would update both).
    #[error("{id:?} is not a job id of {scheduler}: write {form}")]
    BadJobId {
        id: String,
        scheduler: &'static str,
        form: &'static str,
    },
    /// More walltime than noyau asks for at once ([`crate::MAX_EXTEND_SECS`]).
    #[error(
        "{} more is too much walltime to ask for at once (at most {} days): ask for less",
        crate::duration_text(*.0),
        crate::MAX_EXTEND_SECS / 86400
    )]
    TooLong(u64),
    /// A number of submission slots out of range (`concurrent_submissions`).
    #[error(
        "concurrent_submissions = {0}: it is how many scheduler commands that submit or cancel \
         jobs one user runs at once on a host; give a whole number from 1 to {max} (default {def})",
        max = crate::MAX_SLOTS,
        def = crate::DEFAULT_SLOTS
    )]
    BadSlots(i64),
    /// A call as another user (the hub's) while one of theirs still runs:
    /// one at a time per user (`throttle::Turns`).
    #[error(
        "a scheduler command run as {0} is still running; try again once it has ended \
         (it is killed at its timeout)"
    )]
    UserBusy(String),
    /// A cancel as another user of jobs whose cancel is already running.
    #[error("a cancel of job {} is already under way", .0.join(" "))]
    CancelUnderWay(Vec<String>),
    /// A submission as another user found no free permit of the hub's
    /// pool (`concurrent_submissions` in hub.toml) within its wait.
    #[error(
        "the scheduler is busy: every one of the hub's concurrent_submissions was taken for \
         {0:?}; try again in a moment"
    )]
    Busy(std::time::Duration),
    /// What this scheduler does not let a user do (e.g. extend a job).
    #[error("{0}")]
    Unsupported(String),
}

/// "A", "neither A nor B", "neither A nor B nor C" (the same words
/// whatever the number of schedulers registered).
fn either(items: &[String]) -> String {
    match items {
        [] => "no scheduler command".into(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("neither {first} nor {}", rest.join(" nor ")),
    }
}

#[cfg(test)]
mod tests {
    use super::either;

    #[test]
    fn either_names_every_command() {
        let s = |v: &[&str]| either(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(s(&[]), "no scheduler command");
        assert_eq!(s(&["squeue"]), "squeue");
        assert_eq!(s(&["squeue", "oarstat"]), "neither squeue nor oarstat");
        assert_eq!(
            s(&["squeue", "oarstat", "qconf"]),
            "neither squeue nor oarstat nor qconf"
        );
    }
}
