//! The run's input and output: where the output goes ([`Output`]), the
//! input notebook read once (nbformat 3 and 4.0–4.4 made current), the
//! parameters injected and papermill's metadata laid out.

use std::io::Read;
use std::path::{Path, PathBuf};

use noyau_notebook::{InjectOptions, Notebook, StreamMode};
use noyau_trust::anchor::ProjectDir;
use serde_json::Value;

use crate::error::{bad, RunError};
use crate::options::RunOptions;
use crate::papermill as pm;

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

impl Output {
    pub fn shown(&self) -> String {
        match self {
            Output::Stdout => "-".into(),
            Output::File(p) => p.display().to_string(),
        }
    }
}

/// `OUTPUT`, or the default: `name.out.ipynb` beside the input, stdout for stdin.
pub fn output_for(input: &str, output: Option<&str>) -> Output {
    match output {
        Some("-") => Output::Stdout,
        Some(p) => Output::File(p.into()),
        None if input == "-" => Output::Stdout,
        None => {
            let p = Path::new(input);
            let stem = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let stem = stem.strip_suffix(".ipynb").unwrap_or(&stem).to_string();
            Output::File(p.with_file_name(format!("{stem}.out.ipynb")))
        }
    }
}

/// Reads and parses the input (upgrading nbformat 3 and 4.0–4.4), with
/// its project: the directory it was read from, anchored (the working
/// directory for stdin), which every later use of the project judges.
pub fn read_input(input: &str) -> Result<(Notebook, ProjectDir), RunError> {
    let (bytes, project) = read_bytes(input)?;
    Ok((parse_input(input, &bytes)?, project))
}

/// The input's bytes as read now (stdin for `-`), and its project
/// ([`read_input`]).
pub fn read_bytes(input: &str) -> Result<(Vec<u8>, ProjectDir), RunError> {
    let mut bytes = Vec::new();
    let res = if input == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .and_then(|_| ProjectDir::cwd())
    } else {
        noyau_trust::anchor::read_notebook(Path::new(input)).map(|(b, dir)| {
            bytes = b;
            dir
        })
    };
    let project = res.map_err(RunError::io("cannot read", input))?;
    Ok((bytes, project))
}

/// The notebook in `bytes`, read from `input` (named in errors).
pub fn parse_input(input: &str, bytes: &[u8]) -> Result<Notebook, RunError> {
    let what = if input == "-" { "stdin" } else { input };
    let b = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut v: Value = serde_json::from_slice(b).map_err(|e| {
        bad(format!(
            "{what} is not a notebook: invalid JSON ({e}); pass a Jupyter .ipynb file"
        ))
    })?;
    if crate::upgrade::is_v3(&v) {
        v = crate::upgrade::v3_to_v4(v)
            .map_err(|e| bad(format!("{what}: malformed nbformat 3 notebook: {e}")))?;
    }
    let mut nb = Notebook::from_value(v).map_err(|e| bad(format!("{what}: {e}")))?;
    nb.upgrade_minor();
    Ok(nb)
}

/// Keeps `bytes`, the notebook as read at submission, in `path`: a 0600
/// file of the user's in a private directory, which the job runs. The
/// notebook's own path may sit in a directory others can write (a team's
/// project): one of them could replace it by a rename while the job
/// waits in the queue, and have their cells run as the user.
pub fn keep_copy(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    noyau_trust::replace(path, bytes, 0o600).map_err(|e| {
        bad(format!(
            "cannot keep the notebook's copy for the job in {}: {e}",
            path.display()
        ))
    })
}

/// A new name `STATE/SUB/STEM-PID-NANOS` followed by each of `suffixes`
/// (`.json`) for what a job takes from its submitter (a sweep's plan, a
/// notebook's copy), its directory made private (0700, the user's).
pub fn private_names<const N: usize>(
    sub: &str,
    stem: &str,
    suffixes: [&str; N],
) -> Result<[PathBuf; N], RunError> {
    let dir = noyau_sched::state_dir().join(sub);
    noyau_sched::private_dir(&dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = format!("{stem}-{}-{nanos}", std::process::id());
    Ok(suffixes.map(|s| dir.join(format!("{name}{s}"))))
}

/// The notebook this run executes, with its project: the submitter's
/// private copy when there is one (a sweep's task, a detached run), read
/// only if still a 0600 file of the user's (not a link, nor a FIFO), its
/// project the input's directory, anchored here and refused unless it is
/// the one the notebook was read from at submission; else the input.
fn read_run_input(opts: &RunOptions) -> Result<(Notebook, ProjectDir), RunError> {
    let Some(copy) = &opts.input_copy else {
        return read_input(&opts.input);
    };
    let dir = notebook_dir(&opts.input);
    let project = ProjectDir::open(&dir).map_err(RunError::io(
        "cannot open the notebook's directory",
        dir.clone(),
    ))?;
    check_submitted_dir(&project, opts.input_dir)?;
    let mut bytes = Vec::new();
    noyau_trust::Expect::file()
        .open(copy)
        .map_err(|e| {
            bad(format!(
                "the notebook's copy kept at submission: {e}; submit the run again"
            ))
        })?
        .read_to_end(&mut bytes)
        .map_err(RunError::io("cannot read", copy.clone()))?;
    Ok((parse_input(&opts.input, &bytes)?, project))
}

/// The notebook's directory as the submitter read it, which a queued
/// sweep task or detached run checks it still is when it starts: moved,
/// or swapped for a link to a trusted project of the user's, it would
/// lend that trust to the notebook's cells. Its inode and owner, written
/// `INO:UID`: not its device, which on another node is whatever that host
/// numbered its network mount (NFS's anonymous devices differ from node to
/// node, the server's inode numbers do not); the owner, so that a
/// directory someone else made, with the inode number they ground out of
/// a filesystem to match one of the user's, is not taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmittedDir {
    ino: u64,
    uid: u32,
}

impl SubmittedDir {
    /// What `project`'s held directory is now.
    pub fn of(project: &ProjectDir) -> Result<Self, RunError> {
        let st = nix::sys::stat::fstat(project.fd()).map_err(|e| {
            RunError::io(
                "cannot read the notebook's directory",
                project.to_path_buf(),
            )(e.into())
        })?;
        Ok(SubmittedDir {
            ino: st.st_ino,
            uid: st.st_uid,
        })
    }

    /// `INO:UID`, as written.
    pub fn parse(s: &str) -> Option<Self> {
        let (ino, uid) = s.split_once(':')?;
        Some(SubmittedDir {
            ino: ino.parse().ok()?,
            uid: uid.parse().ok()?,
        })
    }
}

impl std::fmt::Display for SubmittedDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.ino, self.uid)
    }
}

/// Refuses `project` unless it is the directory the notebook was read
/// from at submission ([`SubmittedDir`]).
fn check_submitted_dir(
    project: &ProjectDir,
    submitted: Option<SubmittedDir>,
) -> Result<(), RunError> {
    match submitted {
        Some(id) if id == SubmittedDir::of(project)? => Ok(()),
        Some(_) => Err(bad(format!(
            "the notebook's directory {} is not the one the run was submitted from (it was moved \
             or replaced while the job waited); its cells are not run as that directory's: \
             submit the run again",
            project.display()
        ))),
        None => Err(bad(
            "the job does not say which directory its notebook was read from (an older noyau \
             submitted it): submit the run again",
        )),
    }
}

/// What tells that a file was rewritten (an editor's atomic save makes a new
/// inode; an in-place one changes the time or size). None for stdin.
pub fn file_stamp(input: &str) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    if input == "-" {
        return None;
    }
    let m = std::fs::metadata(input).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

pub fn stream_mode(s: &str) -> Result<StreamMode, RunError> {
    match s {
        "coalesce" => Ok(StreamMode::Coalesce),
        "separate" => Ok(StreamMode::Separate),
        "nbclient" => Ok(StreamMode::Nbclient),
        other => Err(bad(format!(
            "--stream-mode {other:?}: use coalesce, separate or nbclient"
        ))),
    }
}

/// The output, refused when it is the input (noyau never writes its input).
pub fn output_of(opts: &RunOptions) -> Result<Output, RunError> {
    let output = output_for(&opts.input, opts.output.as_deref());
    if let Output::File(p) = &output {
        if opts.input != "-" && same_file(Path::new(&opts.input), p) {
            return Err(bad(format!(
                "the output {} is the input notebook; noyau never modifies its input: name another OUTPUT",
                p.display()
            )));
        }
    }
    Ok(output)
}

/// The input with the parameters injected and papermill's metadata, and
/// its project ([`read_input`]).
pub fn prepare(opts: &RunOptions, output: &Output) -> Result<(Notebook, ProjectDir), RunError> {
    let params = opts.parameters()?;
    let (mut nb, project) = read_run_input(opts)?;
    pm::on_load(&mut nb);
    if !params.is_empty() {
        let injected = noyau_notebook::inject(
            &mut nb,
            &params,
            &InjectOptions {
                kernel_name: opts.kernel.as_deref(),
                language: opts.language.as_deref(),
                hide_source: opts.report_mode,
                ..Default::default()
            },
        )
        .map_err(|e| bad(format!("{e}")))?;
        if let Some(w) = injected.warning {
            eprintln!("noyau: warning: {w}; the parameters go in a new cell at the top");
        }
    }
    pm::prepare(&mut nb, &opts.input, &output.shown(), opts.report_mode);
    Ok((nb, project))
}

/// The notebook's directory (where its noyau.toml is), the current one
/// for stdin, as a path: what a job anchors again for the copy it runs
/// ([`read_run_input`]).
pub fn notebook_dir(input: &str) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| ".".into());
    if input == "-" {
        return cwd;
    }
    std::path::absolute(Path::new(input))
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or(cwd)
}

/// The job name schedulers show: what runs, never a secret
/// (`noyau-run-analysis` for analysis.ipynb).
pub fn job_name(input: &str) -> String {
    let stem = Path::new(input)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem.strip_suffix(".ipynb").unwrap_or(&stem);
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if clean.is_empty() || input == "-" {
        "noyau-run-stdin".into()
    } else {
        format!("noyau-run-{clean}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job runs its copy of the notebook with the notebook's directory
    /// anchored again by its path: refused when that path now leads to
    /// another directory (the notebook's renamed away and a link to a
    /// trusted project of the user's put in its place while the job
    /// waited), or when the job does not say which directory it was.
    #[test]
    fn a_job_refuses_a_notebook_directory_swapped_while_it_waited() {
        let d = tempfile::tempdir().unwrap();
        let (proj, trusted) = (d.path().join("proj"), d.path().join("trusted"));
        std::fs::create_dir(&proj).unwrap();
        std::fs::create_dir(&trusted).unwrap();
        let nb = r#"{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}"#;
        std::fs::write(proj.join("nb.ipynb"), nb).unwrap();
        let copy = d.path().join("copy.ipynb");
        keep_copy(&copy, nb.as_bytes()).unwrap();
        let (_, submitted) = read_bytes(proj.join("nb.ipynb").to_str().unwrap()).unwrap();
        let mut opts = RunOptions {
            input: proj.join("nb.ipynb").display().to_string(),
            input_copy: Some(copy),
            input_dir: Some(SubmittedDir::of(&submitted).unwrap()),
            ..Default::default()
        };
        let (_, project) = read_run_input(&opts).unwrap();
        assert_eq!(project.identity(), submitted.identity());
        // written and read back as the job's environment or plan has it
        let id = SubmittedDir::of(&submitted).unwrap();
        assert_eq!(SubmittedDir::parse(&id.to_string()), Some(id));
        // another owner's directory with the same inode number is not it
        opts.input_dir = Some(SubmittedDir {
            uid: id.uid + 1,
            ..id
        });
        assert!(read_run_input(&opts).is_err());
        opts.input_dir = Some(id);
        std::fs::rename(&proj, d.path().join("proj.x")).unwrap();
        std::os::unix::fs::symlink(&trusted, &proj).unwrap();
        let e = read_run_input(&opts).unwrap_err().to_string();
        assert!(e.contains("not the one the run was submitted from"), "{e}");
        opts.input_dir = None;
        let e = read_run_input(&opts).unwrap_err().to_string();
        assert!(e.contains("submit the run again"), "{e}");
    }
}
