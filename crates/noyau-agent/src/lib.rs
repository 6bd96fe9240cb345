//! `noyau agent`: the compute-node side of noyau.
//!
//! Started by a backend (a local child process, or inside a batch job), the
//! agent dials the proxy over the link ([`config`] says how it learns where
//! and with which secrets), starts the real kernel in a private runtime
//! directory ([`kernel`]) and relays between the two: the proxy has already
//! checked each frontend message against the frontend's key, the agent
//! re-signs it with the kernel's own key; each kernel message is checked with
//! the kernel's key and passed on for the proxy to re-sign ([`outbox`]).
//!
//! The agent owns the kernel's lifetime. It interrupts it (by signal or by
//! message, as the kernelspec says), restarts it on
//! `shutdown_request{restart: true}` without leaving the allocation, reports
//! its death, and outlives a proxy that detaches (a frontend restarting the
//! kernel replaces the proxy process) for a grace period, so the next proxy
//! finds the same allocation. It ends when the kernel is shut down, when it
//! is cancelled, or when no proxy comes back in time.

pub mod config;
pub mod kernel;
pub mod outbox;
pub mod usage;
pub mod walltime;
pub mod web;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use noyau_client::RuntimeDir;
use noyau_link::envelope::{self, Event, Payload, UsageSample};
use noyau_link::{CloseReason, Incoming, Lane, Link, LinkConfig, LinkError, LinkEvent};
use noyau_wire::kernelspec::{self, FoundSpec};
use noyau_wire::{RawMessage, Signer};
use tokio::signal::unix::{signal, SignalKind};

pub use config::AgentConfig;
use kernel::{Kernel, Launch};
use outbox::Outbox;

/// How long a kernel gets to exit after a shutdown request before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long after the kernel died of SIGTERM the agent waits for its own
/// SIGTERM before calling the death the kernel's own (Slurm signals the
/// step's processes one after the other, within milliseconds).
const JOB_SIGTERM_SKEW: Duration = Duration::from_secs(1);
/// How long an agent whose kernel is over waits to deliver its last messages.
const FINAL_FLUSH: Duration = Duration::from_secs(10);

struct Agent {
    cfg: AgentConfig,
    spec: Option<FoundSpec>,
    dir: RuntimeDir,
    key: String,
    signer: Signer,
    session: String,
    outbox: Arc<Outbox>,
    kernel: Option<Kernel>,
    /// The kernel's environment, realised once (restarts reuse it).
    env: Option<noyau_env::Realised>,
    /// An environment a cell asked for (`SwitchEnv`), being built while
    /// the current kernel keeps running.
    building: Option<tokio::task::JoinHandle<anyhow::Result<noyau_env::Realised>>>,
    generation: u32,
    /// Set when a shutdown_request went to the kernel: Some(restart).
    shutdown: Option<(bool, Instant)>,
    /// Requests that came while the kernel restarts, for the new one (the
    /// exiting kernel would drop them).
    held: Vec<(Lane, RawMessage)>,
    /// The token the proxy gave ahead for its successor (`NextToken`).
    next_token: Option<String>,
    /// Usage sampling, while the proxy asks for it (`SampleUsage`).
    usage: Option<Usage>,
}

/// Sampling the kernel's use every tick; the sampler follows the kernel
/// process (a restart makes a new one). A sample runs in a task of its own
/// (at most one at a time), so that a slow `nvidia-smi` or a large /proc
/// never holds the agent's loop.
struct Usage {
    tick: tokio::time::Interval,
    sampler: Option<(u32, usage::Sampler)>,
    /// The sample being taken: the sampler comes back with it.
    taking: Option<tokio::task::JoinHandle<Taken>>,
}

/// (boxed: a sampler with its sample is large; `UsageStep` stays small)
type Taken = Box<(u32, usage::Sampler, Option<UsageSample>)>;

impl Usage {
    fn every(interval: Duration) -> Usage {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Usage {
            tick,
            sampler: None,
            taking: None,
        }
    }
}

/// What sampling waits for next.
enum UsageStep {
    /// Time for a sample.
    Tick,
    /// The sample being taken is done.
    Taken(Result<Taken, tokio::task::JoinError>),
}

impl Usage {
    /// The sample being taken, else the next tick (cancel-safe, for the
    /// agent's `select!`).
    async fn next(&mut self) -> UsageStep {
        match self.taking.as_mut() {
            Some(t) => UsageStep::Taken(t.await),
            None => {
                self.tick.tick().await;
                UsageStep::Tick
            }
        }
    }
}

impl Drop for Usage {
    fn drop(&mut self) {
        if let Some(t) = &self.taking {
            t.abort();
        }
    }
}

enum SessionEnd {
    Detached(String),
    Finished(i32),
}

/// Runs the agent until its kernel is done; returns the process exit code.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<i32> {
    let dir = RuntimeDir::create("agent")?;
    let key = noyau_wire::connection::random_key();
    let signer = Signer::new(key.as_bytes());
    let session = uuid::Uuid::new_v4().to_string();
    let outbox = Outbox::new(signer.clone(), session.clone(), cfg.buffer_limit);
    let spec = kernelspec::find(&cfg.inner)
        .map(|s| kernel::with_hist_file(s, cfg.ipython_hist_file.as_deref()));
    let mut agent = Agent {
        spec: spec.as_ref().ok().cloned(),
        cfg,
        dir,
        key,
        signer,
        session,
        outbox,
        kernel: None,
        env: None,
        building: None,
        generation: 0,
        shutdown: None,
        held: Vec::new(),
        next_token: None,
        usage: None,
    };
    let spec_error = spec.err().map(|e| e.to_string());
    let mut token = agent.cfg.token.clone();
    let mut first = true;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // A batch job gets its scheduler's walltime signal before its walltime
    // (SIGUSR1; Grid Engine's SIGUSR2); its default action would end the
    // agent: it becomes a WalltimeNear event. OAR repeats the signal at each
    // of its checks until the end, so one event per announced end.
    let job = walltime::batch_job();
    let sig = job
        .as_ref()
        .map_or(nix::libc::SIGUSR1, |(s, _)| s.walltime_signal());
    let mut usr1 =
        signal(SignalKind::from_raw(sig)).context("installing the walltime signal's handler")?;
    let end = walltime::End::default();
    if let Some((scheduler, job)) = job {
        let cancel = scheduler.clone();
        tokio::spawn(walltime::watch(
            scheduler,
            job.clone(),
            agent.outbox.clone(),
            end.clone(),
        ));
        let outbox = agent.outbox.clone();
        tokio::spawn(async move {
            let mut told: Option<Option<tokio::time::Instant>> = None;
            while usr1.recv().await.is_some() {
                // (Grid Engine cancels with the same signal: then it is our SIGTERM)
                if cancel.signal_means_cancel() {
                    tracing::info!(job, "the walltime signal before the walltime: a cancel");
                    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
                    continue;
                }
                let at = end.at();
                let again = match (told, at) {
                    // an end more than a minute later: the walltime was extended
                    (Some(Some(before)), Some(now)) => {
                        let rearm = before.checked_add(Duration::from_secs(walltime::REARM_AFTER));
                        rearm.is_none_or(|rearm| now < rearm)
                    }
                    (Some(_), _) => true,
                    (None, _) => false,
                };
                if again {
                    tracing::debug!(
                        job,
                        "the walltime signal again for the same end: already told"
                    );
                    continue;
                }
                told = Some(at);
                let seconds_left = end.seconds_left();
                tracing::warn!(
                    job,
                    ?seconds_left,
                    "walltime signal: the job's walltime is near"
                );
                outbox.event(
                    Lane::Iopub,
                    &Event::WalltimeNear {
                        job: job.clone(),
                        seconds_left,
                    },
                );
            }
        });
    } else {
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                tracing::warn!("SIGUSR1 outside a batch job: ignored");
            }
        });
    }
    loop {
        let wait = if first {
            Duration::from_secs(30)
        } else {
            agent.cfg.reattach_grace
        };
        let link = tokio::select! {
            l = dial_until(&agent.cfg, &token, wait) => l,
            _ = sigterm.recv() => {
                agent.stop_kernel().await;
                return Ok(143);
            }
        };
        let mut link = match link {
            Ok(l) => l,
            Err(e) if first => return Err(e),
            Err(e) => {
                tracing::info!(
                    "no proxy came back within {}s ({e:#}); ending",
                    wait.as_secs()
                );
                agent.stop_kernel().await;
                return Ok(0);
            }
        };
        first = false;
        agent.outbox.attach(link.sender());
        agent.outbox.event(
            Lane::Control,
            &Event::AgentHello {
                pid: std::process::id(),
                host: hostname(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
        );
        if let Some(msg) = &spec_error {
            agent.outbox.event(
                Lane::Iopub,
                &Event::AgentError {
                    message: msg.clone(),
                },
            );
            link.close().await;
            return Ok(1);
        }
        match agent.ensure_kernel().await {
            Ok(()) => {}
            Err(e) => {
                agent.outbox.event(
                    Lane::Iopub,
                    &Event::AgentError {
                        message: format!("{e:#}"),
                    },
                );
                link.close().await;
                return Ok(1);
            }
        }
        match agent.session(&mut link, &mut sigterm).await {
            SessionEnd::Detached(t) => {
                agent.outbox.detach();
                link.close().await;
                token = t;
            }
            SessionEnd::Finished(code) => {
                // The kernel is over: its last word is worth a short wait,
                // not the whole reconnection window of a proxy that may be
                // gone (a frontend kills a proxy whose shutdown is slow),
                // which would hold the allocation for nothing. A proxy
                // still there learns the end from the job's state anyway.
                if tokio::time::timeout(FINAL_FLUSH, link.close())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "the proxy did not take the last messages within {} s; ending",
                        FINAL_FLUSH.as_secs()
                    );
                }
                return Ok(code);
            }
        }
    }
}

/// The kernel's environment, off the async threads: what the submitting
/// host prepared, checked and used offline, or built here when nothing was
/// (or `build = "node"`); its progress lines go to the proxy as they come.
/// Without a spec, the kernelspec's own environment (with the data files).
async fn realise_env(
    spec: Option<noyau_env::EnvSpec>,
    prepared: Option<noyau_env::Prepared>,
    outbox: &Arc<Outbox>,
) -> anyhow::Result<noyau_env::Realised> {
    let work = move |p: &mut dyn FnMut(&str)| {
        let cache = noyau_env::Cache::at_default();
        match noyau_env::realise_job(spec.as_ref(), prepared.as_ref(), &cache, p)? {
            Some(r) => Ok(r),
            None => noyau_env::Realised::plain(Vec::new()),
        }
    };
    noyau_client::prepare::with_lines(work, |line| {
        // A notebook's own words come back in these lines (its modules,
        // its image, a tool quoting them): cleaned once here, for this log
        // and every terminal or page the line is shown on.
        let line = noyau_text::for_terminal(line, noyau_text::Keep::Nothing);
        tracing::info!("environment: {line}");
        outbox.event(Lane::Iopub, &Event::EnvProgress { line });
    })
    .await
    .map_err(|e: noyau_env::EnvError| anyhow::anyhow!("the kernel's environment: {e}"))
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Dials until a proxy accepts us or `within` has passed.
async fn dial_until(cfg: &AgentConfig, token: &str, within: Duration) -> anyhow::Result<Link> {
    let deadline = Instant::now() + within;
    let link_cfg = LinkConfig {
        give_up_after: cfg.give_up_after,
        buffer_limit: cfg.buffer_limit,
        ..LinkConfig::default()
    };
    let mut delay = Duration::from_millis(50);
    loop {
        match noyau_link::dial(&cfg.link_addr, &cfg.pin, token, link_cfg).await {
            Ok(link) => return Ok(link),
            // Another certificate than the pinned one is not our proxy
            // (a mistake or a man in the middle): waiting will not fix it.
            Err(e @ (LinkError::PinMismatch { .. } | LinkError::BadPin(_))) => {
                return Err(e).with_context(|| format!("refusing the proxy at {}", cfg.link_addr))
            }
            Err(e) if Instant::now() + delay < deadline => {
                tracing::debug!("dialling the proxy at {}: {e}", cfg.link_addr);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot reach the proxy at {}", cfg.link_addr))
            }
        }
    }
}

impl Agent {
    async fn ensure_kernel(&mut self) -> anyhow::Result<()> {
        if let Some(k) = &self.kernel {
            // A proxy taking over (after a restart) learns the environment too.
            if let Some(r) = self.env.as_ref().filter(|r| !r.record.is_null()) {
                self.outbox.event(
                    Lane::Iopub,
                    &Event::EnvReady {
                        record: r.record.clone(),
                    },
                );
            }
            // During a restart the kernel is on its way out, and the new
            // one announces itself once started.
            if !self.restarting() {
                self.outbox.event(Lane::Iopub, &k.ready_event());
            }
            return Ok(());
        }
        if self.env.is_none() {
            let spec = self.cfg.env_spec.clone();
            let r = realise_env(spec, self.cfg.prepared.clone(), &self.outbox).await?;
            if self.cfg.env_spec.is_some() {
                self.outbox.event(
                    Lane::Iopub,
                    &Event::EnvReady {
                        record: r.record.clone(),
                    },
                );
            }
            self.env = Some(r);
        }
        let spec = self.spec.as_ref().expect("spec checked before");
        self.generation += 1;
        let k = Kernel::start(Launch {
            spec,
            dir: self.dir.path(),
            generation: self.generation,
            signer: &self.signer,
            key: &self.key,
            session: &self.session,
            outbox: self.outbox.clone(),
            env: self.env.as_ref(),
        })
        .await
        .with_context(|| format!("starting the {} kernel", spec.name))?;
        self.outbox.event(Lane::Iopub, &k.ready_event());
        self.kernel = Some(k);
        Ok(())
    }

    /// `SwitchEnv`: builds (or, prepared by the proxy's host, checks) the
    /// environment in the background; the current kernel runs on meanwhile
    /// ([`Agent::switch_built`] finishes). The kernel keeps its data files.
    fn switch_env(&mut self, spec: serde_json::Value, prepared: Option<serde_json::Value>) {
        if self.building.is_some() {
            self.outbox.event(
                Lane::Iopub,
                &Event::EnvFailed {
                    message: "another environment is being built for this kernel; wait for it"
                        .into(),
                },
            );
            return;
        }
        let parsed = noyau_env::EnvSpec::from_value(spec).and_then(|spec| {
            let prepared = match prepared {
                Some(p) => serde_json::from_value(p).map_err(|e| {
                    noyau_env::EnvError::Invalid(format!("the prepared environment: {e}"))
                })?,
                None => noyau_env::Prepared::default(),
            };
            Ok((spec, prepared))
        });
        let (spec, mut prepared) = match parsed {
            Ok(s) => s,
            Err(e) => {
                self.outbox.event(
                    Lane::Iopub,
                    &Event::EnvFailed {
                        message: e.to_string(),
                    },
                );
                return;
            }
        };
        if prepared.data.is_empty() {
            prepared.data = self
                .env
                .as_ref()
                .map(|r| r.data().to_vec())
                .unwrap_or_default();
        }
        let outbox = self.outbox.clone();
        self.building = Some(tokio::spawn(async move {
            realise_env(Some(spec), Some(prepared), &outbox).await
        }));
    }

    /// `AddData`: one more data file in the kernel's data directory.
    fn add_data(&mut self, file: serde_json::Value) {
        let added = serde_json::from_value::<noyau_env::DataFile>(file)
            .map_err(|e| format!("not a data file: {e}"))
            .and_then(|f| {
                let name = f.name.clone();
                let env = self.env.as_mut().ok_or("the kernel has not started")?;
                env.add_data(f, self.dir.path())
                    .map(|()| name)
                    .map_err(|e| e.to_string())
            });
        let ev = match added {
            Ok(name) => Event::DataAdded { name, error: None },
            Err(e) => Event::DataAdded {
                name: String::new(),
                error: Some(e),
            },
        };
        self.outbox.event(Lane::Iopub, &ev);
    }

    /// The environment of a `SwitchEnv` is built (or failed): on success the
    /// kernel is replaced by one started in it, as a restart would.
    async fn switch_built(&mut self, built: anyhow::Result<noyau_env::Realised>) {
        let r = match built {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("environment switch failed: {e:#}");
                self.outbox.event(
                    Lane::Iopub,
                    &Event::EnvFailed {
                        message: format!("{e:#}"),
                    },
                );
                return;
            }
        };
        self.outbox.event(
            Lane::Iopub,
            &Event::EnvReady {
                record: r.record.clone(),
            },
        );
        self.env = Some(r);
        self.stop_kernel().await;
        self.shutdown = None;
        tracing::info!("restarting the kernel in its new environment");
        if let Err(e) = self.ensure_kernel().await {
            self.outbox.event(
                Lane::Iopub,
                &Event::AgentError {
                    message: format!("{e:#}"),
                },
            );
        }
    }

    fn restarting(&self) -> bool {
        matches!(self.shutdown, Some((true, _)))
    }

    async fn stop_kernel(&mut self) {
        if let Some(mut k) = self.kernel.take() {
            k.kill().await;
        }
    }

    /// The scheduler is ending the job (SIGTERM): the kernel goes, and the
    /// proxy is told so, to report the scheduler's own reason.
    async fn end_with_job(&mut self) -> SessionEnd {
        self.stop_kernel().await;
        self.outbox.event(
            Lane::Iopub,
            &Event::KernelDied {
                description: "was stopped: its job was cancelled".into(),
                expected: false,
                job_ending: true,
            },
        );
        SessionEnd::Finished(143)
    }

    async fn session(
        &mut self,
        link: &mut Link,
        sigterm: &mut tokio::signal::unix::Signal,
    ) -> SessionEnd {
        loop {
            let kill_at = self.shutdown.map(|(_, at)| at + SHUTDOWN_GRACE);
            tokio::select! {
                incoming = link.recv() => match incoming {
                    Some(Incoming::Message(lane, frames)) => {
                        if let Some(end) = self.on_proxy_message(lane, frames).await {
                            return end;
                        }
                    }
                    // A new proxy at the same address does not know our
                    // session: the old one went away (a restart) before its
                    // Detach reached us. Dial the new one with the token given ahead.
                    Some(Incoming::Event(LinkEvent::Closed(CloseReason::ResumeRefused(why)))) if self.next_token.is_some() => {
                        tracing::warn!("the proxy refused to resume ({why}): a new proxy; presenting the token given ahead");
                        return SessionEnd::Detached(self.next_token.take().unwrap_or_default());
                    }
                    Some(Incoming::Event(LinkEvent::Closed(reason))) => {
                        tracing::warn!("the link to the proxy is closed ({reason}); stopping the kernel");
                        self.stop_kernel().await;
                        return SessionEnd::Finished(1);
                    }
                    Some(Incoming::Event(ev)) => tracing::info!("link: {ev:?}"),
                    None => {
                        self.stop_kernel().await;
                        return SessionEnd::Finished(1);
                    }
                },
                desc = async { match self.kernel.as_mut() { Some(k) => k.wait().await, None => std::future::pending().await } } => {
                    self.kernel = None;
                    match self.shutdown.take() {
                        Some((true, _)) => {
                            tracing::info!("kernel {desc} for a restart; starting a new one");
                            match self.ensure_kernel().await {
                                Ok(()) => {
                                    let k = self.kernel.as_mut().expect("just started");
                                    for (lane, msg) in std::mem::take(&mut self.held) {
                                        k.send(lane, msg).await;
                                    }
                                }
                                Err(e) => self.outbox.event(Lane::Iopub, &Event::AgentError { message: format!("{e:#}") }),
                            }
                        }
                        Some((false, _)) => {
                            self.outbox.event(Lane::Iopub, &Event::KernelDied { description: desc.text, expected: true, job_ending: false });
                            return SessionEnd::Finished(0);
                        }
                        None => {
                            tracing::warn!("kernel {desc}");
                            // The scheduler ending the job (cancel, preemption)
                            // signals every process of the step at once: the
                            // kernel's death can be seen before our own SIGTERM.
                            let job_ending = desc.signal == Some(nix::sys::signal::Signal::SIGTERM as i32)
                                && tokio::time::timeout(JOB_SIGTERM_SKEW, sigterm.recv()).await.is_ok();
                            if job_ending {
                                return self.end_with_job().await;
                            }
                            self.outbox.event(Lane::Iopub, &Event::KernelDied { description: desc.text, expected: false, job_ending: false });
                        }
                    }
                }
                built = async { match self.building.as_mut() { Some(h) => h.await, None => std::future::pending().await } } => {
                    self.building = None;
                    let built = built.unwrap_or_else(|e| Err(anyhow::anyhow!("the environment build panicked: {e}")));
                    self.switch_built(built).await;
                }
                _ = async { match kill_at { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {
                    tracing::warn!("the kernel did not exit within {}s of its shutdown request; killing it", SHUTDOWN_GRACE.as_secs());
                    if let Some(k) = self.kernel.as_mut() {
                        let _ = k.kill_group();
                    }
                    self.shutdown = self.shutdown.map(|(r, _)| (r, Instant::now() + Duration::from_secs(3600)));
                }
                _ = sigterm.recv() => {
                    tracing::info!("cancelled (SIGTERM); stopping the kernel");
                    return self.end_with_job().await;
                }
                step = async { match self.usage.as_mut() { Some(u) => u.next().await, None => std::future::pending().await } } => match step {
                    UsageStep::Tick => self.sample_usage(),
                    UsageStep::Taken(taken) => self.usage_taken(taken),
                },
            }
        }
    }

    /// Starts one usage sample of the running kernel, unless one is
    /// being taken.
    fn sample_usage(&mut self) {
        let (Some(u), Some(k)) = (self.usage.as_mut(), self.kernel.as_ref()) else {
            return;
        };
        if u.taking.is_some() {
            return;
        }
        let pid = k.pid();
        let kept = match u.sampler.take() {
            Some((p, s)) if p == pid => Some(s),
            _ => None,
        };
        u.taking = Some(tokio::spawn(async move {
            // (a new one probes the cgroup and PATH: here, off the loop)
            let mut sampler = match kept {
                Some(s) => s,
                None => usage::Sampler::new(pid).await,
            };
            let sample = sampler.sample().await;
            Box::new((pid, sampler, sample))
        }));
    }

    /// A sample was taken: to the proxy; the sampler is kept for the next.
    fn usage_taken(&mut self, taken: Result<Taken, tokio::task::JoinError>) {
        let Some(u) = self.usage.as_mut() else {
            return;
        };
        u.taking = None;
        let Ok(taken) = taken else {
            return;
        };
        let (pid, sampler, sample) = *taken;
        u.sampler = Some((pid, sampler));
        if let Some(sample) = sample {
            self.outbox.event(Lane::Control, &Event::Usage { sample });
        }
    }

    async fn on_proxy_message(
        &mut self,
        lane: Lane,
        frames: Vec<bytes::Bytes>,
    ) -> Option<SessionEnd> {
        let payload = match envelope::open(frames) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("dropped a malformed link message: {e}");
                return None;
            }
        };
        match payload {
            Payload::Jupyter(frames) => {
                let msg = match RawMessage::from_frames(frames) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("dropped a malformed message from the proxy: {e}");
                        return None;
                    }
                };
                if self.restarting() && self.kernel.is_some() {
                    self.held.push((lane, msg));
                    return None;
                }
                let Some(kernel) = self.kernel.as_mut() else {
                    tracing::warn!(
                        ?lane,
                        "no kernel is running; dropped a message from the proxy"
                    );
                    return None;
                };
                if lane == Lane::Control || lane == Lane::Shell {
                    let ty = msg.peek_header().map(|h| h.msg_type).unwrap_or_default();
                    if ty == "interrupt_request" && lane == Lane::Control {
                        kernel.interrupt(msg, &self.outbox).await;
                        return None;
                    }
                    // Older frontends send it on shell; either way the exit that
                    // follows is expected.
                    if ty == "shutdown_request" {
                        let restart = msg.restart_requested();
                        self.shutdown = Some((restart, Instant::now()));
                    }
                }
                kernel.send(lane, msg).await;
                None
            }
            Payload::Event(Event::NextToken { token }) => {
                self.next_token = Some(token);
                None
            }
            Payload::Event(Event::SampleUsage { interval_ms }) => {
                self.usage = (interval_ms > 0)
                    .then(|| Usage::every(Duration::from_millis(interval_ms.max(500))));
                None
            }
            Payload::Event(Event::Detach { token }) => {
                self.next_token = None;
                self.usage = None;
                self.outbox.event(Lane::Control, &Event::DetachAck);
                Some(SessionEnd::Detached(token))
            }
            Payload::Event(Event::SwitchEnv { spec, prepared }) => {
                self.switch_env(spec, prepared);
                None
            }
            Payload::Event(Event::AddData { file }) => {
                self.add_data(file);
                None
            }
            Payload::Event(Event::Shutdown) => {
                self.stop_kernel().await;
                Some(SessionEnd::Finished(0))
            }
            Payload::Event(ev) => {
                tracing::warn!("unexpected event from the proxy: {ev:?}");
                None
            }
        }
    }
}
