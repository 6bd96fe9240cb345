//! A job's walltime on Slurm: who may raise it, and raising it.
//!
//! Any user may lower their job's time limit; only Slurm's operators may
//! raise it: root, the cluster's `SlurmUser`, and users whose `AdminLevel`
//! (set by the site with `sacctmgr`, kept in slurmdbd) is Operator or
//! Administrator. [`may_raise`] asks the controller which this user is
//! (root needs not ask): `scontrol show config` for the `SlurmUser` and
//! whether accounting is kept in slurmdbd, then (only then: without it no
//! user has an AdminLevel) `scontrol show assoc_mgr users=NAME
//! flags=users` (NAME: the uid's, not `$USER`), the controller's own copy
//! of the user's record, which is what it checks an update against.
//! `sacctmgr` would ask slurmdbd instead: one more daemon that must
//! answer, and a copy the controller may not have loaded yet.
//!
//! [`raise`] reads the job's limit and sets an absolute one: scontrol's
//! `TimeLimit=+N` wraps on an UNLIMITED job before Slurm 23.11.1. A job
//! without a limit is refused (nothing to raise). Read-then-set is done
//! under a per-job `flock` (`STATE/locks/slurm-extend-ID.lock`, see
//! [`hold`]; removed after the extend): two extends of one job at once
//! (the comm's button and `noyau extend`, two clicks) would otherwise both
//! read the same limit and one extension would be lost.
//!
//! (Slurm also lets a user raise the limit of their job while it waits,
//! up to the partition's MaxTime: not offered, a kernel's job is
//! extended when its walltime nears; `noyau extend` on a waiting job
//! gets it.)

use crate::batch::{is_job_number, Commands};
use crate::run::{uid_name, AsUser};
use crate::SchedError;

/// What `scontrol show config` says that matters here.
#[derive(Debug, PartialEq, Eq)]
struct Config {
    /// The uid the controller runs as (`SlurmUser = slurm(64030)`).
    slurm_uid: Option<u32>,
    /// `AccountingStorageType` is slurmdbd: users may have an AdminLevel.
    accounting: bool,
}

fn parse_config(text: &str) -> Config {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim())
        })
    };
    Config {
        slurm_uid: value("SlurmUser").and_then(uid_in_parens),
        accounting: value("AccountingStorageType").is_some_and(|t| t.ends_with("/slurmdbd")),
    }
}

/// `1001` in `NAME(1001)`.
fn uid_in_parens(s: &str) -> Option<u32> {
    s.strip_suffix(')')?.rsplit_once('(')?.1.parse().ok()
}

/// The AdminLevel of the user `uid` in `scontrol show assoc_mgr flags=users`
/// (`UserName=NAME(UID) DefAccount=… DefWckey=… AdminLevel=Operator`): the
/// `AdminLevel` key of the line whose `UserName` key is this uid's; none
/// when a key is there twice (which one the controller meant is unknown).
fn admin_level(text: &str, uid: u32) -> Option<&str> {
    text.lines().find_map(|l| {
        let pairs: Vec<(&str, &str)> = (l.split_whitespace())
            .filter_map(|f| f.split_once('='))
            .collect();
        let only = |key: &str| {
            let mut values = pairs.iter().filter(|(k, _)| *k == key).map(|(_, v)| *v);
            let first = values.next();
            values.next().is_none().then_some(first).flatten()
        };
        (uid_in_parens(only("UserName")?) == Some(uid)).then(|| only("AdminLevel"))?
    })
}

/// Whether this process's user is one of Slurm's operators, as the
/// controller says (an error: it could not be asked).
pub(super) async fn may_raise(cmds: &Commands) -> Result<bool, SchedError> {
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        return Ok(true);
    }
    let config = cmds
        .cmd("scontrol")
        .args(["show", "config"])
        .output()
        .await?;
    let config = parse_config(&config);
    if config.slurm_uid == Some(uid.as_raw()) {
        return Ok(true);
    }
    if !config.accounting {
        return Ok(false);
    }
    // The name of the uid, not $USER: the process's caller sets that.
    let Some(name) = uid_name(uid) else {
        return Err(SchedError::Invalid(format!("uid {uid} has no user name")));
    };
    let out = cmds
        .cmd("scontrol")
        .args([
            "show".to_string(),
            "assoc_mgr".into(),
            format!("users={name}"),
            "flags=users".into(),
        ])
        .output()
        .await?;
    Ok(matches!(
        admin_level(&out, uid.as_raw()),
        Some("Operator" | "Administrator")
    ))
}

/// A Slurm job id (`ID`, or `ID_TASK` for an array's task), before it goes
/// on a command line: scontrol takes `1,2` as two jobs.
fn check_id(id: &str) -> Result<(), SchedError> {
    let ok = match id.split_once('_') {
        Some((job, task)) => is_job_number(job) && is_job_number(task),
        None => is_job_number(id),
    };
    match ok {
        true => Ok(()),
        false => Err(SchedError::BadJobId {
            id: id.into(),
            scheduler: "Slurm",
            form: "its number, or NUMBER_TASK for an array's task (e.g. 4242 or 4242_3)",
        }),
    }
}

/// The largest time limit Slurm stores, in minutes: its limits are
/// uint32 minutes, and the two highest values mean INFINITE and NO_VAL.
const MAX_LIMIT_MIN: u64 = u32::MAX as u64 - 2;

/// The time limit of job `id` in minutes, from `squeue -h -o %l`: an error
/// saying why when it has none to raise (UNLIMITED, NOT_SET) or squeue
/// shows several (an array's tasks).
fn parse_limit(id: &str, out: &str) -> Result<u64, SchedError> {
    let mut lines: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.dedup();
    let none = |why: String| Err(SchedError::Unsupported(why));
    match lines.as_slice() {
        [] => none(format!(
            "job {id} is not in Slurm's queue: it has ended, or it is not a job id"
        )),
        [limit] => match crate::state::parse_duration(limit) {
            Some(secs) => Ok(secs.div_ceil(60)),
            None => none(format!(
                "this job has no time limit to raise (Slurm says {limit:?} for job {id})"
            )),
        },
        _ => none(format!(
            "Slurm shows several time limits for job {id} ({}): extend one of its tasks, ID_TASK",
            lines.join(", ")
        )),
    }
}

/// The limit to set: the current one plus what was asked, in minutes
/// (Slurm counts whole minutes: `secs` is rounded up).
fn new_limit(current_min: u64, secs: u64) -> Result<u64, SchedError> {
    let limit = current_min.checked_add(secs.div_ceil(60).max(1));
    limit
        .filter(|l| *l <= MAX_LIMIT_MIN)
        .ok_or(SchedError::TooLong(secs))
}

/// Reads the job's limit (`squeue -h -o %l -j ID`) and sets the sum
/// (`scontrol update JobId=ID TimeLimit=MINUTES`): an absolute limit, as
/// `TimeLimit=+N` is added by scontrol to a uint32 and wraps on an
/// UNLIMITED job before Slurm 23.11.1, shortening it. What was done, or
/// Slurm's refusal and what to do.
pub(super) async fn raise(
    cmds: &Commands,
    id: &str,
    secs: u64,
    u: Option<&AsUser>,
    keep: &[&str],
) -> Result<String, SchedError> {
    check_id(id)?;
    let _held = hold(id).await;
    let out = cmds
        .cmd("squeue")
        .args(["-h", "-o", "%l", "-j", id])
        .run_as(u, keep)
        .output()
        .await
        .map_err(|e| {
            let said = e.said().unwrap_or_else(|| e.to_string());
            SchedError::Unsupported(format!(
                "squeue cannot show job {id}'s time limit: {}",
                said.trim()
            ))
        })?;
    let current = parse_limit(id, &out)?;
    let limit = new_limit(current, secs)?;
    let args = [
        "update".to_string(),
        format!("JobId={id}"),
        format!("TimeLimit={limit}"),
    ];
    let shown = format!("scontrol {}", args.join(" "));
    match cmds
        .cmd("scontrol")
        .args(args)
        .run_as(u, keep)
        .output()
        .await
    {
        Ok(_) => Ok(format!(
            "Slurm raised the time limit of job {id} from {current} to {limit} min ({shown})"
        )),
        Err(e) => Err(SchedError::Unsupported(refusal(
            id,
            &shown,
            e.said().unwrap_or_else(|| e.to_string()).trim(),
        ))),
    }
}

/// How long an extend waits for another of the same job (a squeue and a
/// scontrol against a slow controller) before it goes on without the lock.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// The per-job lock of this user's extends of job `id` (a checked id: it
/// names a file); None, with a warning, where none can be had (the extend
/// goes on: a lost extension only if two race then, as before the lock).
async fn hold(id: &str) -> Option<ExtendLock> {
    let path = crate::paths::state_dir()
        .join("locks")
        .join(format!("slurm-extend-{id}.lock"));
    hold_at(path).await
}

/// The lock of an extend: its file is removed when the extend is done,
/// so that one per job ever extended does not pile up in STATE/locks (a
/// waiter that opened it before locks the one there now: see
/// `shared::take_lock`).
type ExtendLock = crate::paths::RemovedLock;

/// [`hold`] of the lock file `path`.
async fn hold_at(path: std::path::PathBuf) -> Option<ExtendLock> {
    match crate::shared::take_lock(path.clone(), LOCK_PATIENCE).await {
        Some(lock) => Some(ExtendLock::new(path, lock)),
        None => {
            tracing::warn!("no lock {}: the extend goes on without it", path.display());
            None
        }
    }
}

/// What to tell the user when `scontrol update` refused.
fn refusal(id: &str, shown: &str, said: &str) -> String {
    if said.contains("denied") {
        format!(
            "Slurm refused to raise the time limit of job {id} ({shown}: {said}): only its \
             operators may (root, its SlurmUser, users whose AdminLevel is Operator or \
             Administrator); ask the site to make you one, or resubmit with a longer `time`"
        )
    } else {
        format!("{shown} refused: {said}")
    }
}

/// Every parser of this file on `text` (see `crate::fuzzing`).
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz(text: &str) {
    let _ = parse_config(text);
    let _ = admin_level(text, 0);
    let _ = parse_limit("1", text);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines of `scontrol show config` on the test cluster (Slurm 22.05.8)
    /// and of a site with slurmdbd.
    #[test]
    fn the_slurm_user_and_the_accounting_from_the_config() {
        let test = "Configuration data as of 2026-12-06T15:20:01\n\
            AccountingStorageType   = accounting_storage/none\n\
            PrivateData             = none\n\
            SlurmUser               = root(0)\n\
            SLURM_VERSION           = 22.05.8\n";
        let want = Config {
            slurm_uid: Some(0),
            accounting: false,
        };
        assert_eq!(parse_config(test), want);
        let site = "AccountingStorageType   = accounting_storage/slurmdbd\n\
            SlurmUser               = slurm(64030)\n";
        let want = Config {
            slurm_uid: Some(64030),
            accounting: true,
        };
        assert_eq!(parse_config(site), want);
        assert_eq!(parse_config("garbage\n= =\n").slurm_uid, None);
    }

    /// scontrol's format (src/scontrol/info_assoc_mgr.c, 22.05:
    /// `UserName=%s(%u) DefAccount=%s DefWckey=%s AdminLevel=%s`), and its
    /// answer without slurmdbd, captured on the test cluster.
    #[test]
    fn the_admin_level_of_this_uid_only() {
        let text = "Current Association Manager state\n\nUser Records\n\n\
            UserName=alice(1001) DefAccount=physics DefWckey=(null) AdminLevel=Operator\n\
            UserName=bob(1002) DefAccount=physics DefWckey=(null) AdminLevel=None\n\
            UserName=carol(1003) DefAccount=chem DefWckey=(null) AdminLevel=Administrator\n";
        assert_eq!(admin_level(text, 1001), Some("Operator"));
        assert_eq!(admin_level(text, 1002), Some("None"));
        assert_eq!(admin_level(text, 1003), Some("Administrator"));
        assert_eq!(admin_level(text, 1004), None);
        let none = "Current Association Manager state\n\nNo users currently cached in Slurm.\n\n";
        assert_eq!(admin_level(none, 0), None);
    }

    /// The keys themselves, wherever they are on the line; a key given
    /// twice is not guessed at.
    #[test]
    fn the_admin_level_is_the_key_of_the_line() {
        let moved = "Id=3 UserName=alice(1001) AdminLevel=Operator DefAccount=physics\n";
        assert_eq!(admin_level(moved, 1001), Some("Operator"));
        let twice = "UserName=alice(1001) AdminLevel=Operator DefWckey=x AdminLevel=None\n";
        assert_eq!(admin_level(twice, 1001), None);
        let names = "UserName=alice(1001) UserName=bob(1002) AdminLevel=Operator\n";
        assert_eq!(admin_level(names, 1002), None);
        assert_eq!(
            admin_level("UserName=alice(1001) Admin=Operator\n", 1001),
            None
        );
    }

    #[test]
    fn only_slurm_job_ids_reach_scontrol() {
        for ok in ["12", "4242_3", "0"] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "1,2", "", "12_", "_3", "12_3_4", "12_[1-3]", "abc", "-1", "12 13", "+5",
        ] {
            let e = check_id(bad).unwrap_err().to_string();
            assert!(
                e.contains("is not a job id of Slurm") && e.contains("4242_3"),
                "{bad}: {e}"
            );
        }
    }

    /// `squeue -h -o %l` as Slurm 22.05 prints it.
    #[test]
    fn the_limit_to_raise_and_the_jobs_without_one() {
        assert_eq!(parse_limit("12", "10:00\n").unwrap(), 10);
        assert_eq!(parse_limit("12", "1-00:00:00\n").unwrap(), 1440);
        assert_eq!(parse_limit("12", "2:00:30\n").unwrap(), 121);
        assert_eq!(parse_limit("12", "10:00\n10:00\n").unwrap(), 10);
        for none in ["UNLIMITED\n", "NOT_SET\n", "INVALID\n"] {
            let e = parse_limit("12", none).unwrap_err().to_string();
            assert!(e.contains("this job has no time limit to raise"), "{e}");
        }
        let e = parse_limit("12", "\n").unwrap_err().to_string();
        assert!(e.contains("not in Slurm's queue"), "{e}");
        let e = parse_limit("12", "10:00\n20:00\n").unwrap_err().to_string();
        assert!(
            e.contains("several time limits") && e.contains("ID_TASK"),
            "{e}"
        );
    }

    /// An absolute limit, never past what Slurm stores (UNLIMITED and
    /// NO_VAL are the two highest uint32s).
    #[test]
    fn the_new_limit_is_the_sum_in_whole_minutes() {
        assert_eq!(new_limit(10, 300).unwrap(), 15);
        assert_eq!(new_limit(10, 1).unwrap(), 11);
        assert_eq!(new_limit(10, 61).unwrap(), 12);
        assert_eq!(new_limit(0, 0).unwrap(), 1);
        assert_eq!(new_limit(MAX_LIMIT_MIN - 5, 300).unwrap(), MAX_LIMIT_MIN);
        assert!(new_limit(MAX_LIMIT_MIN - 4, 300).is_err());
        assert!(new_limit(u64::MAX, 60).is_err());
        assert!(new_limit(0, u64::MAX).is_err());
    }

    /// The lock file goes with the extend; a second extend that waited
    /// on it meanwhile (it had opened the file) then holds the file at
    /// the path, so a third waits: without the check it would hold the
    /// removed file while the third made and locked a new one.
    #[tokio::test]
    async fn the_lock_file_goes_with_the_extend_and_still_keeps_others_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/slurm-extend-12.lock");
        let first = hold_at(path.clone()).await.expect("the first lock");
        assert!(path.exists());
        let p = path.clone();
        let second = tokio::spawn(async move { hold_at(p).await });
        let waited = tokio::time::timeout(std::time::Duration::from_millis(300), async {
            while !second.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        });
        assert!(waited.await.is_err(), "a lock held was given twice");
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(20), second)
            .await
            .expect("the second extend is not let in")
            .unwrap()
            .expect("the second lock");
        assert!(
            crate::paths::still_at(&path, second.file()),
            "the second holds a lock on a removed file"
        );
        let third = crate::shared::take_lock(path.clone(), std::time::Duration::from_millis(300));
        assert!(third.await.is_none(), "two extends held the lock at once");
        drop(second);
        assert!(!path.exists(), "the lock file outlived the extend");
    }

    #[test]
    fn a_refusal_says_what_slurm_said_and_what_to_do() {
        let m = refusal(
            "12",
            "scontrol update JobId=12 TimeLimit=70",
            "Access/permission denied for job 12",
        );
        assert!(m.contains("Access/permission denied for job 12"), "{m}");
        assert!(
            m.contains("make you one") && m.contains("longer `time`"),
            "{m}"
        );
        let m = refusal(
            "12",
            "scontrol update JobId=12 TimeLimit=70",
            "Invalid job id specified",
        );
        assert_eq!(
            m,
            "scontrol update JobId=12 TimeLimit=70 refused: Invalid job id specified"
        );
    }
}
