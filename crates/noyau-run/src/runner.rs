//! A whole run, in order: the input read and parameterised, the output's
//! first save, the kernel started, the cells run ([`crate::cells`]), the
//! Dask cluster and the targets ended, the output's last save (rescued to
//! the state directory when it fails), the kernel shut down.

use std::path::{Path, PathBuf};

use noyau_magic::dask::KernelSide;
use noyau_magic::Magic;
use noyau_notebook::Notebook;

use crate::cells::{Context, Doc, Kernels, Runner, Signals};
use crate::detach::detach;
use crate::error::{bad, RunError};
use crate::exit;
use crate::input::{file_stamp, output_of, prepare, stream_mode, Output};
use crate::kernel::{
    backend_and_profile, kernel_name, launch, prepared_env, record, start, Started,
};
use crate::options::RunOptions;
use crate::papermill as pm;
use crate::progress::Progress;
use crate::save::Saver;

/// Runs the whole thing; returns the exit code.
pub async fn run(opts: RunOptions) -> Result<i32, RunError> {
    let (backend, profile) = backend_and_profile(
        opts.backend.as_deref(),
        opts.profile.as_deref(),
        &opts.options,
    )?;
    if opts.detach {
        return detach(&opts, &backend, profile).await;
    }
    let mode = stream_mode(&opts.stream_mode)?;
    let output = output_of(&opts)?;
    // The run uses the input as read now; an edit saved meanwhile (a user
    // in JupyterLab) is left alone and reported at the end.
    let input_stamp = file_stamp(&opts.input);
    let (mut nb, project) = prepare(&opts, &output)?;
    let out_path = match &output {
        Output::File(p) => Some(p.clone()),
        Output::Stdout => None,
    };
    let mut saver = Saver::new(out_path)?;
    if opts.prepare_only {
        finish_output(&mut saver, &nb, &output)?;
        return Ok(exit::OK);
    }
    let name = kernel_name(&opts, &nb);
    let mut env = crate::kernelenv::job_env(&name, &backend)?;
    let run_start = chrono::Utc::now();
    pm::notebook_start(&mut nb, &pm::iso(run_start));
    // The first save checks the output is writable before any work.
    saver
        .save(&nb)
        .map_err(|e| bad(format!("cannot write the output {}: {e}", output.shown())))?;
    let progress = Progress::new(!opts.no_progress, nb.cells.len());
    let (prepared, job_env) = prepared_env(&opts, &nb, &project, &progress).await?;
    env.extend(job_env);
    let launch = launch(&opts, &name, &backend, &env, &profile)?;
    let mut signals = Signals::new()?;
    let (kernel, node) = match start(launch, &opts, &mut signals).await? {
        Started::Kernel(k, node) => (*k, node),
        Started::Signal(sig, code) => {
            eprintln!("noyau: {sig} while the kernel was starting; stopping");
            pm::add_stop_marker(&mut nb, sig, None);
            finish_output(&mut saver, &nb, &output)?;
            return Ok(code);
        }
    };
    record(&mut nb, &kernel, node, &name, &prepared);
    let side = KernelSide {
        backend,
        profile,
        inner: name.clone(),
        noyau_exe: std::env::current_exe().unwrap_or_else(|_| "noyau".into()),
        env,
    };
    let ctx = Context {
        kernel_name: name,
        side,
        own: Default::default(),
        prepared,
        project,
    };
    let doc = Doc::new(nb, saver, mode, progress);
    let code = run_kernel(doc, kernel, ctx, &opts, &mut signals, run_start, &output).await?;
    if input_stamp.is_some() && file_stamp(&opts.input) != input_stamp {
        eprintln!(
            "noyau: warning: {} changed on disk during the run; the run used the version read \
             at its start (the output has those cells) and left your changes in place",
            opts.input
        );
    }
    Ok(code)
}

/// The cells in the started kernel, then the end of everything the run
/// started, and the output's last save.
async fn run_kernel(
    doc: Doc,
    main: noyau_client::remote::RemoteKernel,
    ctx: Context,
    opts: &RunOptions,
    signals: &mut Signals,
    run_start: chrono::DateTime<chrono::Utc>,
    output: &Output,
) -> Result<i32, RunError> {
    // Cells with magics run on kernels of their own or wait for noyau:
    // sending cells ahead is for one kernel only.
    let delegating = doc
        .nb
        .cells
        .iter()
        .any(|c| c.is_code() && !matches!(noyau_magic::parse(&c.source), Ok(Magic::None)));
    let mut runner = Runner {
        doc,
        kernels: Kernels {
            main,
            targets: Default::default(),
        },
        opts,
        ahead: None,
        early: Default::default(),
        delegating,
        walltime: None,
        magics: Default::default(),
        ctx,
        counts: Default::default(),
        widgets: Default::default(),
    };
    let (code, kernel_alive) = runner.run_cells(signals, run_start).await;
    runner.doc.progress.finish();
    runner.end_magics().await;
    runner.doc.status.finish();
    let Runner {
        mut doc, kernels, ..
    } = runner;
    let out = finish_output(&mut doc.saver, &doc.nb, output);
    if kernel_alive {
        kernels
            .main
            .shutdown(std::time::Duration::from_secs(5))
            .await;
    } else {
        kernels.main.kill().await;
    }
    out?;
    Ok(code)
}

fn finish_output(saver: &mut Saver, nb: &Notebook, output: &Output) -> Result<(), RunError> {
    match output {
        Output::Stdout => {
            use std::io::Write;
            let mut o = std::io::stdout().lock();
            o.write_all(nb.to_json_string().as_bytes())
                .and_then(|()| o.flush())
                .map_err(RunError::io("cannot write the notebook to", "stdout"))
        }
        Output::File(p) => saver.save(nb).map_err(|e| {
            bad(match rescue(nb, p) {
                Ok(r) => format!(
                    "cannot write the output: {e}; the whole notebook was rescued to {} \
                     (the output file keeps its last complete save)",
                    r.display()
                ),
                Err(r) => format!("cannot write the output: {e}; nor rescue it: {r}"),
            })
        }),
    }
}

/// The last save failed (a full disk, a directory gone): the notebook goes
/// to `$XDG_STATE_HOME/noyau/unsaved/` rather than being lost.
fn rescue(nb: &Notebook, output: &Path) -> Result<PathBuf, RunError> {
    rescue_in(&noyau_sched::state_dir().join("unsaved"), nb, output)
}

/// [`rescue`] into `dir`, made private (the notebook may hold what the
/// user's outputs showed: nobody else may list or read it).
fn rescue_in(dir: &Path, nb: &Notebook, output: &Path) -> Result<PathBuf, RunError> {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "notebook".into());
    let path = dir.join(format!(
        "{stem}-{}-{}.ipynb",
        chrono::Local::now().format("%Y%m%d-%H%M%S"),
        std::process::id()
    ));
    noyau_sched::private_dir(dir)?;
    noyau_notebook::write_atomic(&path, nb.to_json_string().as_bytes())
        .map_err(RunError::io("cannot write", &path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_rescued_notebook_goes_to_a_private_dir() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("state/unsaved");
        let nb = noyau_notebook::Notebook::from_json_str(
            r#"{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}"#,
        )
        .unwrap();
        let p = super::rescue_in(&dir, &nb, std::path::Path::new("out.ipynb")).unwrap();
        assert!(p.starts_with(&dir));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
