//! Running a build tool with its output streamed as progress lines and kept
//! for the error message.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::EnvError;

/// Runs `cmd`; every stdout/stderr line goes to `progress`. On failure the
/// error holds `summary` and the tool's own output.
pub fn run(
    cmd: &mut Command,
    summary: &str,
    progress: crate::Progress<'_>,
) -> Result<String, EnvError> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| EnvError::Build {
            summary: summary.to_string(),
            output: format!("cannot run {shown}: {e}"),
        })?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            s.push_str(&l);
            s.push('\n');
        }
        s
    });
    let mut err_text = String::new();
    for l in BufReader::new(stderr).lines().map_while(Result::ok) {
        progress(&l);
        err_text.push_str(&l);
        err_text.push('\n');
    }
    let out = out_thread.join().unwrap_or_default();
    let status = child
        .wait()
        .map_err(|e| EnvError::io(format!("waiting for {shown}"), e))?;
    if status.success() {
        Ok(out)
    } else {
        Err(EnvError::Build {
            summary: format!("{summary} ({shown} {status})"),
            output: format!("{err_text}{out}").trim_end().to_string(),
        })
    }
}

/// Finds `exe` on PATH.
pub fn which(exe: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os(noyau_vars::EnvVars::PATH)?;
    std::env::split_paths(&path)
        .map(|d| d.join(exe))
        .find(|p| p.is_file())
}
