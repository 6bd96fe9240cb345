//! The job's environment in a 0600 file, for the schedulers that cannot
//! carry it safely: OAR passes no environment to a job, and Grid Engine
//! shows a job's environment to every user (`qstat -j`). The file holds
//! the job's variables (the link's address, pin and token among them) and
//! the submitter's `NOYAU_*` settings, which Slurm's default export would
//! carry; it lives in a 0700 directory under noyau's state directory (which
//! compute nodes see), and the job script sources it and deletes it. As
//! another user (the hub), the files must be that user's: the whole
//! submission then runs as the user (`noyau hub-submit`).

use noyau_vars::EnvVars;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::Rng;

use crate::batch::{Batch, Commands, Submission};
use crate::paths::{private_dir, state_dir, write_private};
use crate::quote::sh_quote;
use crate::run::AsUser;
use crate::scheduler::submit_through;
use crate::{JobSpec, SchedError};

/// Where a scheduler's job files go: `STATE/NAME` (0700).
pub(crate) fn job_dir(scheduler: &str) -> PathBuf {
    state_dir().join(scheduler)
}

/// The files of one submission, all named `STEM.EXT` in the job directory.
pub(crate) struct JobFiles {
    dir: PathBuf,
    stem: String,
    /// Every file written so far.
    pub written: Vec<PathBuf>,
}

impl JobFiles {
    /// A new submission's files (the job directory and the job's log
    /// directory made 0700): a stem of their own, as two proxies may submit
    /// the same name at once.
    pub(crate) fn new(scheduler: &str, spec: &JobSpec) -> Result<JobFiles, SchedError> {
        let dir = job_dir(scheduler);
        private_dir(&spec.logs())?;
        private_dir(&dir)?;
        let stem = format!(
            "{}-{}-{:08x}",
            spec.name,
            std::process::id(),
            rand::rng().random::<u32>()
        );
        Ok(JobFiles {
            dir,
            stem,
            written: Vec::new(),
        })
    }

    /// `STEM.EXT`.
    pub(crate) fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.stem))
    }

    /// Writes `STEM.EXT` with `mode`; its path.
    pub(crate) fn write(
        &mut self,
        ext: &str,
        text: &str,
        mode: u32,
    ) -> Result<PathBuf, SchedError> {
        let path = self.path(ext);
        self.written.push(path.clone());
        write_private(&path, text, mode)?;
        Ok(path)
    }

    /// Writes the environment file `STEM.env` (0600): this process's
    /// `NOYAU_*` settings, then the job's own variables (which win).
    pub(crate) fn write_env(&mut self, spec: &JobSpec) -> Result<PathBuf, SchedError> {
        let mut env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with(EnvVars::NOYAU_PREFIX))
            .collect();
        env.extend(spec.env.clone());
        self.write("env", &env_text(&env), 0o600)
    }

    /// Removes every file written (a submission that failed).
    pub(crate) fn remove(&self) {
        for f in &self.written {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The environment file's text: one `export K='V'` per variable.
pub(crate) fn env_text(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(k, v)| format!("export {k}={}\n", sh_quote(v)))
        .collect()
}

/// The script's lines that read the environment file (`why` says why it is
/// a file). A single job deletes it (and `rm_too`, quoted for sh); an
/// array's tasks all read it, so its submitter deletes it once the array is
/// over.
pub(crate) fn sourcing(env_file: &Path, why: &str, array: bool, rm_too: &str) -> String {
    let f = sh_quote(&env_file.display().to_string());
    let mut s = format!("# the job's environment (secrets included) is in a 0600 file: {why}\n");
    if array {
        s.push_str(&format!(". {f}\n"));
    } else {
        s.push_str(&format!(". {f} && rm -f {f}{rm_too}\n"));
    }
    s
}

/// A submission as another user: its files must be the user's, so the
/// whole submission runs as the user (`noyau hub-submit`), with `imp`'s
/// command paths `cmds`; one job only.
pub(crate) async fn submit_as(
    u: &AsUser,
    imp: &dyn Batch,
    cmds: &Commands,
    spec: &JobSpec,
) -> Result<Submission, SchedError> {
    if spec.array.is_some() {
        return Err(SchedError::Invalid(
            "job arrays are not submitted as another user".into(),
        ));
    }
    let id = submit_through(u, imp, cmds, spec).await?;
    Ok(Submission {
        id,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_sourced_and_deleted_by_a_single_job_only() {
        let f = Path::new("/s/x y.env");
        let one = sourcing(f, "why", false, " \"$0\"");
        assert!(
            one.ends_with(". '/s/x y.env' && rm -f '/s/x y.env' \"$0\"\n"),
            "{one}"
        );
        assert!(
            one.starts_with("# the job's environment (secrets included) is in a 0600 file: why\n")
        );
        assert!(sourcing(f, "why", true, "").ends_with("\n. '/s/x y.env'\n"));
        let env: BTreeMap<String, String> = [("A".into(), "it's".into())].into();
        assert_eq!(env_text(&env), "export A='it'\\''s'\n");
    }
}
