//! A kernel's environment and data, prepared on this host (the submitting
//! one) before its job is submitted: noyau-env's `prepare`, run off the
//! async threads, its progress lines handed to the caller as they come (the
//! proxy shows them in the cell, `noyau run` on its progress), and the job
//! environment that carries the result to the agent.

use noyau_vars::EnvVars;
use std::collections::BTreeMap;

use noyau_env::sources::Declared;
use noyau_env::{EnvError, EnvSpec, Prepared};

/// Work running on the blocking pool, and the lines it reports as it goes.
pub struct WithLines<T> {
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<T>,
}

impl<T: Send + 'static> WithLines<T> {
    /// Starts `work` on the blocking pool.
    pub fn spawn(work: impl FnOnce(&mut dyn FnMut(&str)) -> T + Send + 'static) -> Self {
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel::<String>();
        let task = tokio::task::spawn_blocking(move || {
            work(&mut |l: &str| {
                let _ = tx.send(l.to_string());
            })
        });
        WithLines { lines, task }
    }

    /// Its result, once every line was read (`lines` ended).
    pub async fn result(mut self) -> T {
        self.join().await
    }

    /// The next line, else (every line read) the result. Cancel-safe, for
    /// a `select!` loop; not to be called again once it gave the result.
    pub async fn next(&mut self) -> Step<T> {
        match self.lines.recv().await {
            Some(line) => Step::Line(line),
            None => Step::Done(self.join().await),
        }
    }

    async fn join(&mut self) -> T {
        match (&mut self.task).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// What [`WithLines::next`] gives.
pub enum Step<T> {
    Line(String),
    Done(T),
}

/// Runs `work` on the blocking pool; each line it reports goes to `show`.
pub async fn with_lines<T: Send + 'static>(
    work: impl FnOnce(&mut dyn FnMut(&str)) -> T + Send + 'static,
    mut show: impl FnMut(&str),
) -> T {
    let mut w = WithLines::spawn(work);
    while let Some(line) = w.lines.recv().await {
        show(&line);
    }
    w.result().await
}

/// Starts building `declared`'s environment and fetching its data here,
/// into the default cache.
pub fn start(declared: &Declared) -> WithLines<Result<Prepared, EnvError>> {
    let d = declared.clone();
    WithLines::spawn(move |p| {
        let cache = noyau_env::Cache::at_default();
        // A long-lived proxy runs this: a bug here fails the cell, not the kernel.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            noyau_env::prepare(d.spec.as_ref(), &d.data, &cache, p)
        }))
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(EnvError::Build {
                summary: "preparing the environment stopped on a bug in noyau (please report it)"
                    .into(),
                output: why.into(),
            })
        })
    })
}

/// [`start`], each line given to `show`.
pub async fn prepare(
    declared: &Declared,
    mut show: impl FnMut(&str),
) -> Result<Prepared, EnvError> {
    let mut w = start(declared);
    while let Some(line) = w.lines.recv().await {
        show(&line);
    }
    w.result().await
}

/// The job's environment for `spec` and what was prepared for it.
pub fn job_env(spec: Option<&EnvSpec>, prepared: &Prepared) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    if let Some(s) = spec {
        env.insert(
            EnvVars::NOYAU_ENV_SPEC.to_string(),
            s.to_value().to_string(),
        );
    }
    if prepared.entry.is_some() || !prepared.data.is_empty() {
        env.insert(EnvVars::NOYAU_ENV_PREPARED.to_string(), prepared.to_json());
    }
    env
}
