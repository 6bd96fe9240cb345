//! `noyau run` as noyau-magic's [`Host`]: every `%noyau` line magic works
//! in a headless run as in an interactive kernel. A magic's outputs become
//! the cell's outputs in the notebook being written; its own requests go to
//! the notebook's kernel or a target's, and the runner hands their replies
//! back while the magic's cell waits. `%%noyau on TARGET` cells run in the
//! target's kernel, started on first use.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use noyau_client::remote::{KernelError, KernelEvent, KernelMessage, Lane, RemoteKernel};
use noyau_magic::{Command, Direction, Host, MagicError, OnMagic, Output, Peer};
use serde_json::{json, Value};

use crate::cells::{sleep_until, CellEnd, Doc, Kernels, On, RunTarget, Runner, Signals};
use crate::exit;

/// The run's fields a magic may use, borrowed for one call.
struct RunHost<'a> {
    doc: &'a mut Doc,
    kernels: &'a mut Kernels,
    own: &'a mut HashSet<String>,
    running: Option<usize>,
    /// Cells the magics ended, with how.
    ended: Vec<(usize, Result<(), MagicError>)>,
}

impl Host for RunHost<'_> {
    type Cell = usize;

    fn output(&mut self, cell: &usize, out: Output) {
        let d = &mut *self.doc;
        match d
            .builder
            .handle(&mut d.nb, *cell, out.msg_type, &out.content)
        {
            Ok(noyau_notebook::OutputEvent::Ignored) => {}
            Ok(_) => d.saver.output_changed(),
            Err(e) => tracing::warn!("a magic's output could not be recorded: {e}"),
        }
    }

    fn finish(&mut self, cell: &usize, result: Result<String, MagicError>) {
        let result = result.map(|text| {
            if !text.is_empty() {
                self.output(cell, Output::stream("stdout", &text));
            }
        });
        self.ended.push((*cell, result));
    }

    fn request(&mut self, to: Peer<'_>, content: Value) -> Result<String, MagicError> {
        let kernel = match to {
            Peer::Kernel => &mut self.kernels.main,
            Peer::Target(name) => {
                &mut self
                    .kernels
                    .targets
                    .get_mut(name)
                    .ok_or_else(|| MagicError::Target(format!("target {name:?} is gone")))?
                    .kernel
            }
        };
        let id = kernel
            .request(Lane::Shell, "execute_request", content)
            .map_err(|e| MagicError::Target(e.to_string()))?;
        self.own.insert(id.clone());
        Ok(id)
    }

    fn running_cell(&self) -> Option<usize> {
        self.running
    }
}

/// A [`RunHost`] over the runner's fields (a macro: the borrows are of
/// fields, so `self.magics` stays free).
macro_rules! host {
    ($r:ident, $running:expr) => {
        RunHost {
            doc: &mut $r.doc,
            kernels: &mut $r.kernels,
            own: &mut $r.ctx.own,
            running: $running,
            ended: Vec::new(),
        }
    };
}

impl Runner<'_> {
    /// A `%noyau …` cell: the command, then (for the magics that wait for
    /// a kernel or the Dask cluster) the cell's end.
    pub async fn run_magic(&mut self, cmd: Command, signals: &mut Signals, i: usize) -> CellEnd {
        let _ = self.doc.builder.start_cell(&mut self.doc.nb, i);
        let env = self.kernels.main.environment.clone();
        let result = match cmd {
            Command::Targets => Ok(self.target_table()),
            Command::Release(name) | Command::Cancel(name) => self.release_target(&name).await,
            Command::EnvShow => Ok(noyau_magic::env::show(env.as_ref())),
            Command::EnvLock => noyau_magic::env::lock(env.as_ref(), &self.ctx.project),
            Command::EnvHelp => Ok(noyau_magic::env::usage()),
            Command::EnvSwitch(_) => Err(MagicError::NotHere(
                "`%noyau env SPEC` restarts an interactive kernel; `noyau run` takes the environment from \
                 --env, metadata.noyau.environment or [environment] in noyau.toml, and records it in the \
                 output's metadata"
                    .into(),
            )),
            Command::Push { target, names } => {
                return self.transfer(Direction::Push, target, names, signals, i).await
            }
            Command::Pull { target, names } => {
                return self.transfer(Direction::Pull, target, names, signals, i).await
            }
            Command::DaskUp(words) => {
                let side = self.ctx.side.clone();
                let mut host = host!(self, Some(i));
                self.magics.dask.up(&mut host, i, &words, &side).await;
                let ended = host.ended;
                return self.wait_magic(ended, signals, i).await;
            }
            Command::Data(words) => crate::environment::data_cell(&self.ctx.prepared, &words),
            Command::DaskStatus => Ok(self.magics.dask.status().await),
            Command::DaskDown => {
                let mut host = host!(self, Some(i));
                Ok(self.magics.dask.down(&mut host).await)
            }
        };
        let mut host = host!(self, Some(i));
        host.finish(&i, result);
        let r = host.ended.pop().map_or(Ok(()), |(_, r)| r);
        self.magic_end(i, r)
    }

    /// Waits until the magic of cell `i` ended (`ended`: the cells ended so
    /// far), handing the replies of noyau's own requests and the Dask
    /// cluster's events to the magics meanwhile.
    async fn wait_magic(
        &mut self,
        mut ended: Vec<(usize, Result<(), MagicError>)>,
        signals: &mut Signals,
        i: usize,
    ) -> CellEnd {
        loop {
            if let Some(pos) = ended.iter().position(|(c, _)| *c == i) {
                let (_, r) = ended.swap_remove(pos);
                return self.magic_end(i, r);
            }
            let target = self.waited_target();
            let save_at = self.doc.saver.due();
            let got = tokio::select! {
                (name, code) = signals.recv() => {
                    if code == exit::WALLTIME {
                        let job = crate::detach::allocation().unwrap_or_else(|| "?".into());
                        return CellEnd::Walltime { job, seconds_left: None };
                    }
                    return CellEnd::Signal(name, code);
                }
                // What the magic wrote meanwhile (why the cluster's jobs
                // wait) is saved as a long cell's output is.
                _ = sleep_until(save_at) => {
                    self.doc.saver.on_due(&self.doc.nb);
                    continue;
                }
                ev = self.magics.dask.event() => {
                    let mut host = host!(self, Some(i));
                    self.magics.dask.on_event(&mut host, ev);
                    ended.append(&mut host.ended);
                    continue;
                }
                e = self.kernels.main.next_event() => e,
                m = next_of(&mut self.kernels.targets, target.as_deref()) => m.map(KernelEvent::Message),
            };
            match got {
                Ok(KernelEvent::Message(m)) => ended.append(&mut self.own_reply(&m, Some(i))),
                Ok(KernelEvent::Walltime(w)) => {
                    if let Some(end) = self.on_walltime(w) {
                        return end;
                    }
                }
                Err(e) => return self.died(e),
            }
        }
    }

    /// The target a transfer in flight waits on, if any.
    fn waited_target(&self) -> Option<String> {
        self.kernels
            .targets
            .keys()
            .find(|t| self.magics.transfers.waits_on(t))
            .cloned()
    }

    /// A message for one of the magics' own requests: its reply goes to
    /// the magic that waits for it. The cells that ended.
    pub fn own_reply(
        &mut self,
        m: &KernelMessage,
        running: Option<usize>,
    ) -> Vec<(usize, Result<(), MagicError>)> {
        let Some(parent) = m.parent_id.as_deref().filter(|p| self.ctx.own.contains(*p)) else {
            return Vec::new();
        };
        if m.lane != Lane::Shell {
            return Vec::new();
        }
        let parent = parent.to_string();
        self.ctx.own.remove(&parent);
        let mut host = host!(self, running);
        self.magics.on_reply(&mut host, &parent, &m.content);
        host.ended
    }

    /// One event of the Dask cluster while cell `running` runs.
    pub fn on_dask_event(&mut self, ev: noyau_magic::dask::ClusterEvent, running: Option<usize>) {
        let mut host = host!(self, running);
        self.magics.dask.on_event(&mut host, ev);
    }

    /// How a magic's cell ends.
    fn magic_end(&mut self, i: usize, r: Result<(), MagicError>) -> CellEnd {
        let _ = self.doc.builder.finish_cell(&mut self.doc.nb, i);
        match r {
            Ok(()) => CellEnd::Ok,
            Err(e) => self.doc.cell_error(i, e.ename(), e.to_string()),
        }
    }

    /// `%noyau push/pull`: the target must run (a push starts it).
    async fn transfer(
        &mut self,
        direction: Direction,
        target: String,
        names: Vec<String>,
        signals: &mut Signals,
        i: usize,
    ) -> CellEnd {
        if !self.kernels.targets.contains_key(&target) {
            if direction == Direction::Pull {
                let e = MagicError::Transfer(format!(
                    "no target named {target:?} is running; start it with a `%%noyau on {target}` cell"
                ));
                return self.magic_end(i, Err(e));
            }
            let on = OnMagic {
                target: target.clone(),
                ..Default::default()
            };
            if let Err(e) = self.start_target(&on).await {
                return self.magic_end(i, Err(MagicError::Transfer(e.to_string())));
            }
        }
        let mut host = host!(self, Some(i));
        if let Err(e) = self
            .magics
            .transfers
            .start(&mut host, i, direction, &target, names)
        {
            host.finish(&i, Err(e));
        }
        let ended = std::mem::take(&mut host.ended);
        self.wait_magic(ended, signals, i).await
    }

    /// `%noyau targets`.
    fn target_table(&self) -> String {
        let rows: Vec<noyau_magic::targets::Row> = self
            .kernels
            .targets
            .iter()
            .map(|(name, t)| noyau_magic::targets::Row {
                name: name.clone(),
                state: "idle",
                backend: t.kernel.backend.clone(),
                job: t.kernel.job_id().unwrap_or("-").to_string(),
                node: t.kernel.host.clone(),
                idle_secs: t.last_used.elapsed().as_secs(),
            })
            .collect();
        noyau_magic::targets::table(&rows)
    }

    /// `%noyau release|cancel NAME`: the target's job ends.
    async fn release_target(&mut self, name: &str) -> Result<String, MagicError> {
        let t = self
            .kernels
            .targets
            .remove(name)
            .ok_or_else(|| noyau_magic::targets::unknown(name))?;
        let text = noyau_magic::targets::releasing(
            name,
            &t.kernel.backend,
            t.kernel.job_id().unwrap_or("-"),
        );
        t.kernel.shutdown(Duration::from_secs(5)).await;
        Ok(text)
    }

    /// A `%%noyau on TARGET` cell: its body runs in the target's kernel
    /// (started on first use from the profile), its outputs in this cell.
    pub async fn run_on_target(
        &mut self,
        mut m: OnMagic,
        body: String,
        signals: &mut Signals,
        i: usize,
        may_raise: bool,
    ) -> CellEnd {
        let body = m.code_for(body);
        if !self.kernels.targets.contains_key(&m.target) {
            if let Err(e) = self.start_target(&m).await {
                let why = format!("cannot start target {:?}: {e}", m.target);
                return self.doc.cell_error(i, "NoyauTargetError", why);
            }
        }
        let end = self
            .run_cell(
                On::Target(m.target.clone()),
                signals,
                i,
                may_raise,
                Some(body),
            )
            .await;
        let Some(t) = self.kernels.targets.get_mut(&m.target) else {
            return end;
        };
        t.last_used = Instant::now();
        let where_ = json!({"target": m.target, "backend": t.kernel.backend, "job_id": t.kernel.job_id(), "host": t.kernel.host});
        let md = &mut self.doc.nb.cells[i].metadata;
        match md.get_mut("noyau").and_then(Value::as_object_mut) {
            Some(o) => {
                o.insert("target".into(), where_);
            }
            None => {
                md.insert("noyau".into(), json!({ "target": where_ }));
            }
        }
        end
    }

    async fn start_target(&mut self, m: &OnMagic) -> Result<(), MagicError> {
        let bad = |e: &dyn std::fmt::Display| MagicError::Target(e.to_string());
        // The overrides are the cell's `key=value` words: the notebook's,
        // judged by its directory (the profiles are the user's, read from
        // the working directory's configuration).
        let origin = noyau_config::OverridesFrom::Cell(&self.ctx.project);
        let (backend, profile) =
            noyau_config::resolve_from(None, Some(&m.target), &m.overrides, origin)
                .map_err(|e| bad(&e))?;
        let inner = profile
            .kernel
            .clone()
            .unwrap_or_else(|| self.ctx.kernel_name.clone());
        let mut launch = noyau_client::remote::local_launch(&inner, self.opts.cwd.clone());
        // A target's job finds its kernel as the run's own does (the managed
        // Python kernel when none is installed, this host's search path)
        // and keeps its history in memory too.
        // (off the async threads: it may make the managed kernel's venv)
        let (k, b) = (inner.clone(), backend.clone());
        launch.env = tokio::task::spawn_blocking(move || crate::kernelenv::job_env(&k, &b))
            .await
            .map_err(|e| bad(&e))?
            .map_err(|e| bad(&e))?;
        let spec = m
            .env
            .as_deref()
            .map(noyau_env::sources::TargetSpec::Cell)
            .or_else(|| noyau_env::sources::TargetSpec::profile(&profile));
        if let Some(spec) = spec {
            launch.env.extend(self.target_env(spec).await?);
        }
        launch.backend = backend;
        launch.job_name = format!("noyau-target-{}", m.target);
        launch.profile = profile;
        let timeout = Duration::from_secs_f64(self.opts.start_timeout.max(0.1));
        self.doc.progress.log(&format!(
            "noyau: starting target {} ({})\n",
            m.target, launch.backend
        ));
        let kernel = RemoteKernel::start_until(launch, timeout, std::future::pending())
            .await
            .map_err(|e| bad(&e))?;
        let t = RunTarget {
            kernel,
            last_used: Instant::now(),
        };
        self.kernels.targets.insert(m.target.clone(), t);
        Ok(())
    }

    /// A target's own environment (`%%noyau on T --env SPEC`, else its
    /// profile's), prepared here like the kernel's; the kernel's data files.
    /// Who gave `spec` decides what it may name (noyau-env's `trust`): a
    /// cell's is the notebook's, judged by its directory; a profile's is
    /// the working directory's noyau.toml's, judged by that directory,
    /// anchored to the process's own (an inode, not `getcwd`'s string,
    /// which may resolve elsewhere when used).
    async fn target_env(
        &self,
        spec: noyau_env::sources::TargetSpec<'_>,
    ) -> Result<BTreeMap<String, String>, MagicError> {
        let project = &self.ctx.project;
        let from = match spec {
            noyau_env::sources::TargetSpec::Cell(_) => spec.source(project),
            noyau_env::sources::TargetSpec::Profile(..) => {
                let cwd = noyau_trust::anchor::ProjectDir::cwd().map_err(env_error)?;
                spec.source(&cwd)
            }
        }
        .map_err(env_error)?;
        // The target's kernel runs the notebook's cells: its directory is
        // the notebook's, as the notebook's own kernel's is.
        let declared = noyau_env::sources::Declared {
            spec: noyau_env::sources::merge(&[from], project).map_err(env_error)?,
            data: Vec::new(),
        };
        let progress = &self.doc.progress;
        let mut p = noyau_client::prepare::prepare(&declared, |l| progress.environment(l))
            .await
            .map_err(env_error)?;
        p.data = self.ctx.prepared.data.clone();
        Ok(noyau_client::prepare::job_env(declared.spec.as_ref(), &p))
    }

    /// The end of the run: the Dask cluster and the targets end with it.
    pub async fn end_magics(&mut self) {
        let mut host = host!(self, None);
        self.magics.dask.release(&mut host, "the run ended").await;
        for (_, t) in std::mem::take(&mut self.kernels.targets) {
            t.kernel.shutdown(Duration::from_secs(5)).await;
        }
    }
}

/// The next message of target `name` (never without one).
async fn next_of(
    targets: &mut BTreeMap<String, RunTarget>,
    name: Option<&str>,
) -> Result<KernelMessage, KernelError> {
    match name.and_then(|n| targets.get_mut(n)) {
        Some(t) => t.kernel.next().await,
        None => std::future::pending().await,
    }
}

/// A target's environment that could not be prepared.
fn env_error(e: impl std::fmt::Display) -> MagicError {
    MagicError::Target(format!("its environment: {e}"))
}
