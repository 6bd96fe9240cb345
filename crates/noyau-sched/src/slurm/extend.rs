//! A job's walltime on Slurm: who may raise it, and raising it.
//!
//! Any user may lower their job's time limit; only Slurm's operators may
//! raise it: root, the cluster's `SlurmUser`, and users whose `AdminLevel`
//! (set by the site with `sacctmgr`, kept in slurmdbd) is Operator or
//! Administrator. [`may_raise`] asks the controller which this user is:
//! `scontrol show config` for the `SlurmUser` and whether accounting is
//! kept in slurmdbd, then (only then: without it no user has an
//! AdminLevel) `scontrol show assoc_mgr users=NAME flags=users`, the
//! controller's own copy of the user's record, which is what it checks
//! an update against. `sacctmgr` would ask slurmdbd instead: one more
//! daemon that must answer, and a copy the controller may not have
//! loaded yet.
//!
//! (Slurm also lets a user raise the limit of their job while it waits,
//! up to the partition's MaxTime: not offered, a kernel's job is
//! extended when its walltime nears; `noyau extend` on a waiting job
//! gets it.)

use crate::batch::Commands;
use crate::run::{user_name, AsUser};
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
/// (`UserName=NAME(UID) DefAccount=… DefWckey=… AdminLevel=Operator`).
fn admin_level(text: &str, uid: u32) -> Option<&str> {
    text.lines().find_map(|l| {
        let mut fields = l.split_whitespace();
        let name = fields.next()?.strip_prefix("UserName=")?;
        if uid_in_parens(name) != Some(uid) {
            return None;
        }
        fields.find_map(|f| f.strip_prefix("AdminLevel="))
    })
}

/// Whether this process's user is one of Slurm's operators, as the
/// controller says (an error: it could not be asked).
pub(super) async fn may_raise(cmds: &Commands) -> Result<bool, SchedError> {
    let uid = nix::unistd::getuid().as_raw();
    let config = cmds
        .cmd("scontrol")
        .args(["show", "config"])
        .output()
        .await?;
    let config = parse_config(&config);
    if uid == 0 || config.slurm_uid == Some(uid) {
        return Ok(true);
    }
    if !config.accounting {
        return Ok(false);
    }
    let out = cmds
        .cmd("scontrol")
        .args([
            "show".to_string(),
            "assoc_mgr".into(),
            format!("users={}", user_name()?),
            "flags=users".into(),
        ])
        .output()
        .await?;
    Ok(matches!(
        admin_level(&out, uid),
        Some("Operator" | "Administrator")
    ))
}

/// `scontrol update JobId=ID TimeLimit=+MINUTES` (scontrol reads the
/// current limit and asks for the sum; Slurm counts whole minutes, so
/// `secs` is rounded up): what was done, or Slurm's refusal and what to do.
pub(super) async fn raise(
    cmds: &Commands,
    id: &str,
    secs: u64,
    u: Option<&AsUser>,
    keep: &[&str],
) -> Result<String, SchedError> {
    let minutes = secs.div_ceil(60).max(1);
    let args = [
        "update".to_string(),
        format!("JobId={id}"),
        format!("TimeLimit=+{minutes}"),
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
            "Slurm raised the time limit of job {id} by {minutes} min ({shown})"
        )),
        Err(e) => Err(SchedError::Unsupported(refusal(
            id,
            &shown,
            e.said().unwrap_or_else(|| e.to_string()).trim(),
        ))),
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

    #[test]
    fn a_refusal_says_what_slurm_said_and_what_to_do() {
        let m = refusal(
            "12",
            "scontrol update JobId=12 TimeLimit=+10",
            "Access/permission denied for job 12",
        );
        assert!(m.contains("Access/permission denied for job 12"), "{m}");
        assert!(
            m.contains("make you one") && m.contains("longer `time`"),
            "{m}"
        );
        let m = refusal(
            "12",
            "scontrol update JobId=12 TimeLimit=+10",
            "Invalid job id specified",
        );
        assert_eq!(
            m,
            "scontrol update JobId=12 TimeLimit=+10 refused: Invalid job id specified"
        );
    }
}
