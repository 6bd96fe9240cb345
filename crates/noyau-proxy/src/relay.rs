//! The relay core: [`Proxy`] holds the frontend's side ([`Answers`]), the
//! agent's ([`AgentSide`]), the requests the kernel has not answered, and
//! the components that own the rest ([`Queued`], [`Env`], [`Targets`],
//! noyau-magic's [`Magics`]); its loop waits on all of them at once.
//! Frontend messages are checked, given to the components that may take
//! them (an environment switch holds cells; magics and target cells are
//! noyau's), and forwarded; agent messages are re-signed and relayed.

use bytes::Bytes;
use noyau_link::envelope::{self, Payload};
use noyau_link::{Incoming, Lane, Link, LinkEvent};
use noyau_magic::Magics;
use noyau_wire::{HeaderPeek, RawMessage};
use serde_json::json;
use tokio::signal::unix::Signal;
use zeromq::SocketRecv;

use crate::agent::{AgentSide, FromAgent};
use crate::answer::{Answers, Cell, Failure};
use crate::comm::{CommEvent, Comms};
use crate::env::Env;
use crate::idle::{KernelIdle, WhileReleased};
use crate::queued::{Queued, WhileQueued};
use crate::requests::{Own, Pending, Requests};
use crate::targets::Targets;
use crate::ProxyConfig;

pub(crate) struct Proxy {
    pub cfg: ProxyConfig,
    pub out: Answers,
    pub agent: AgentSide,
    pub requests: Requests,
    /// A shutdown_request is on its way: Some(restart).
    pub shutdown: Option<bool>,
    /// When this process started: requests dated before were meant for
    /// the previous proxy of this connection file.
    pub started: chrono::DateTime<chrono::Utc>,
    pub queued: Queued,
    pub env: Env,
    pub targets: Targets,
    pub magics: Magics<Cell>,
    /// The proxy's own requests in flight: their messages stop here.
    pub own: Own,
    /// The `noyau` comms open in frontends.
    pub comms: Comms,
    /// The kernel's idle clock and limits; its job when released.
    pub idle: KernelIdle,
}

/// True when the message's header date is before `t`.
fn sent_before(msg: &RawMessage, t: chrono::DateTime<chrono::Utc>) -> bool {
    #[derive(serde::Deserialize)]
    struct H {
        date: Option<String>,
    }
    serde_json::from_slice::<H>(&msg.header)
        .ok()
        .and_then(|h| h.date)
        .and_then(|d| chrono::DateTime::parse_from_rfc3339(&d).ok())
        .is_some_and(|d| d < t)
}

/// A reply's `execution_count`, read without building the whole content.
fn execution_count(msg: &RawMessage) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct C {
        execution_count: Option<i64>,
    }
    serde_json::from_slice::<C>(&msg.content)
        .ok()
        .and_then(|c| c.execution_count)
}

impl Proxy {
    pub fn new(
        cfg: ProxyConfig,
        out: Answers,
        mut agent: AgentSide,
        started: chrono::DateTime<chrono::Utc>,
    ) -> Proxy {
        let held = std::mem::take(&mut agent.env_held);
        let job_state = if cfg.backend == "local" {
            None
        } else {
            agent.job_state()
        };
        if job_state.is_some() {
            // The kernel is "alive" while its job waits: frontends must not
            // take a queued kernel for a dead one.
            out.fe.set_alive(true);
        }
        Proxy {
            queued: Queued::new(job_state, &cfg.backend, &cfg.inner),
            idle: KernelIdle::new(crate::idle::limits(&cfg.backend)),
            cfg,
            out,
            agent,
            requests: Requests::default(),
            shutdown: None,
            started,
            env: Env::with_held(held),
            targets: Targets::default(),
            magics: Magics::default(),
            own: Own::default(),
            comms: Comms::new(),
        }
    }

    /// Relays until the kernel is gone; the exit code. The signals are
    /// handled since the proxy began (`crate::run`).
    pub async fn relay(&mut self, mut sigterm: Signal, mut sigint: Signal) -> i32 {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
        let mut idle_tick = tokio::time::interval(crate::idle::CHECK_EVERY);
        // Not polled while no clock runs: no burst of missed ticks after.
        idle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let waiting = !self.agent.attached() && self.queued.follows();
            tokio::select! {
                biased;
                // Interrupts reach the kernel as interrupt_request messages; a
                // SIGINT sent to our process group (a terminal's Ctrl-C) must not end us.
                _ = sigint.recv() => tracing::info!("SIGINT ignored; interrupts go to the kernel by message"),
                _ = sigterm.recv() => {
                    tracing::info!("terminated; stopping the agent");
                    self.agent.stop().await;
                    return 143;
                }
                m = self.out.fe.incoming.recv() => {
                    let Some((lane, msg)) = m else { return 1 };
                    if let Some(code) = self.on_frontend_message(lane, msg).await {
                        return code;
                    }
                }
                () = self.queued.changed(), if waiting => self.on_job_state().await,
                _ = tick.tick(), if waiting => self.on_job_state().await,
                Some(ev) = self.targets.event() => {
                    // A target's job changed (not one of its messages): frontends see it.
                    let changed = !matches!(ev.what, crate::targets::What::Message(..));
                    self.on_target_event(ev).await;
                    if changed {
                        self.push_state().await;
                    }
                }
                // Only while a clock runs: an idle proxy's only timer otherwise.
                _ = idle_tick.tick(), if !self.targets.map.is_empty() || self.idle.watching() => self.release_idle().await,
                ev = self.magics.dask.event() => {
                    self.on_dask_event(ev).await;
                    self.push_state().await;
                }
                step = self.env.next_prepared(), if self.env.preparing() => self.on_prepared(step).await,
                ev = self.comms.next() => match ev {
                    CommEvent::JobChanged => self.push_state().await,
                    CommEvent::Done(d) => self.on_done(d).await,
                    CommEvent::Expired(id) => self.expire(&id).await,
                    CommEvent::AskExtend => if self.ask_extend() {
                        self.push_state().await;
                    },
                },
                sub = self.out.fe.iopub.recv() => {
                    if let Ok(sub) = sub {
                        self.welcome(sub).await;
                    }
                }
                // A released job's agent is not followed: its end is ours.
                from = self.agent.next(), if self.idle.released.is_none() => match from {
                    FromAgent::Dialled(Ok(link)) => self.attach(link).await,
                    FromAgent::Dialled(Err(e)) => tracing::warn!("link: {e}"),
                    FromAgent::Incoming(incoming) => {
                        if let Some(code) = self.on_agent_message(incoming).await {
                            return code;
                        }
                    }
                    FromAgent::Ended(desc) => {
                        self.report_death(&format!(
                            "The noyau agent running the kernel died: it {desc}; the kernel is gone. Restart the kernel to start a new one."
                        )).await;
                        return 1;
                    }
                },
            }
        }
    }

    async fn on_job_state(&mut self) {
        let job = self.agent.job_label();
        self.queued.on_job_state(&mut self.out, &job).await;
    }

    async fn attach(&mut self, link: Link) {
        self.queued.clear_note(&mut self.out).await;
        self.agent.attach(link);
        if self.comms.any_open() {
            self.ask_usage();
        }
    }

    async fn welcome(&mut self, sub: zeromq::ZmqMessage) {
        if self.out.welcome(sub).await {
            self.queued.subscribed();
        }
    }
}

impl Proxy {
    /// A checked frontend message; Some(exit code) when the proxy must end.
    pub async fn on_frontend_message(&mut self, lane: Lane, msg: RawMessage) -> Option<i32> {
        // The header is read once here; what follows takes its kind.
        let header = msg.peek_header().ok();
        let kind = header.as_ref().map_or("", |h| h.msg_type.as_str());
        let automatic = self.comms.automatic(kind, &msg);
        self.idle.on_frontend(lane, kind, &msg, automatic);
        let msg = self.env.hold(lane, msg)?;
        let msg = self.intercept(lane, kind, msg).await?;
        if self.idle.released.is_some() {
            match self.while_released(lane, &msg).await {
                WhileReleased::Answered => return None,
                WhileReleased::Exit => return Some(0),
                WhileReleased::Resubmitted => {}
            }
        }
        if !self.agent.attached() && self.queued.queued() {
            let job = self.agent.job_label();
            let fresh = !sent_before(&msg, self.started);
            match self
                .queued
                .on_request(lane, &msg, &mut self.out, &job, fresh)
                .await
            {
                WhileQueued::Pass => {}
                WhileQueued::Answered => return None,
                WhileQueued::Cancel { shutdown } => {
                    return Some(self.cancel_queued(shutdown).await)
                }
            }
        }
        if lane == Lane::Shell && kind == "execute_request" {
            self.env.show_held(&msg.header, &mut self.out).await;
            self.queued.show_held(&msg.header, &mut self.out).await;
        }
        self.forward_frontend_message(lane, header, msg);
        None
    }

    /// An interrupt or a shutdown while the job is queued cancels it. A
    /// shutdown is quiet: jupyter_client sends an interrupt right before
    /// each shutdown (and restart), so an interrupt followed by a shutdown
    /// within a second is that shutdown.
    async fn cancel_queued(&mut self, mut shutdown: bool) -> i32 {
        if !shutdown {
            shutdown = self.shutdown_follows().await;
        }
        self.agent.watch.cancel().await;
        if shutdown {
            let text = format!(
                "noyau: the kernel was shut down while its {} job {} was queued; the job is cancelled.",
                self.cfg.backend,
                self.agent.job_label()
            );
            tracing::info!("{text}");
            self.out
                .stream(&Bytes::new(), "stdout", &format!("{text}\n"))
                .await;
            return 0;
        }
        let text = format!(
            "The kernel's {} job {} was cancelled while queued (interrupt). Restart the kernel to submit a new one.",
            self.cfg.backend,
            self.agent.job_label()
        );
        self.report_death(&text).await;
        1
    }

    /// True when a shutdown_request comes within a second (answered as
    /// the queued kernel answers it); any other request is failed with the
    /// others when the kernel ends.
    async fn shutdown_follows(&mut self) -> bool {
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self.out.fe.incoming.recv(),
        )
        .await;
        let Ok(Some((lane, msg))) = next else {
            return false;
        };
        let is_shutdown = lane == Lane::Control
            && msg
                .peek_header()
                .is_ok_and(|h| h.msg_type == "shutdown_request");
        if is_shutdown {
            let job = self.agent.job_label();
            self.queued
                .on_request(lane, &msg, &mut self.out, &job, true)
                .await;
        } else if let (Lane::Shell, Ok(h)) = (lane, msg.peek_header()) {
            let p = Pending {
                cell: Cell::of(&msg),
                msg_type: h.msg_type,
            };
            self.requests.insert(h.msg_id, p);
        }
        is_shutdown
    }

    fn forward_frontend_message(
        &mut self,
        lane: Lane,
        header: Option<HeaderPeek>,
        msg: RawMessage,
    ) {
        if lane == Lane::Shell || lane == Lane::Control {
            let Some(h) = header else {
                return self.agent.send(lane, msg.into_frames());
            };
            tracing::debug!(?lane, msg_type = %h.msg_type, "from the frontend");
            if lane == Lane::Control
                && (h.msg_type == "shutdown_request" || h.msg_type == "interrupt_request")
                && sent_before(&msg, self.started)
            {
                // A frontend restarting a dead kernel queues these for the dead
                // process; its socket delivers them to us, the new one.
                tracing::info!(msg_type = %h.msg_type, "ignored a request sent before this kernel started (meant for the previous kernel process)");
                return;
            }
            if h.msg_type == "shutdown_request" {
                self.shutdown = Some(msg.restart_requested());
            }
            // Only requests get a reply that ends them; comm messages
            // (widgets send many) would stay in the table for ever.
            if lane == Lane::Shell && h.msg_type.ends_with("_request") {
                let p = Pending {
                    cell: Cell::of(&msg),
                    msg_type: h.msg_type,
                };
                self.requests.insert(h.msg_id, p);
            }
        }
        self.agent.send(lane, msg.into_frames());
    }

    /// One link message or event; Some(exit code) when the proxy must end.
    async fn on_agent_message(&mut self, incoming: Option<Incoming>) -> Option<i32> {
        match incoming {
            None => {
                self.report_death("The link to the noyau agent closed; the kernel is gone.")
                    .await;
                Some(1)
            }
            Some(Incoming::Event(LinkEvent::Closed(reason))) => {
                self.report_death(&format!(
                    "The link to the noyau agent was lost for good ({reason}); the kernel is gone."
                ))
                .await;
                Some(1)
            }
            Some(Incoming::Event(ev)) => {
                tracing::warn!("link: {ev:?}");
                None
            }
            Some(Incoming::Message(lane, frames)) => match envelope::open(frames) {
                Ok(Payload::Jupyter(frames)) => self.relay_to_frontend(lane, frames).await,
                Ok(Payload::Event(ev)) => self.on_event(ev).await,
                Err(e) => {
                    tracing::warn!("dropped a malformed link message: {e}");
                    None
                }
            },
        }
    }

    async fn relay_to_frontend(&mut self, lane: Lane, frames: Vec<Bytes>) -> Option<i32> {
        let mut msg = match RawMessage::from_frames(frames) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(?lane, "dropped a malformed message from the agent: {e}");
                return None;
            }
        };
        if self.out.delegated > 0 {
            let shift = self.out.delegated;
            crate::answer::renumber(&mut msg, |n| n + shift);
        }
        if lane == Lane::Shell {
            self.comms.merge_info(&mut msg);
        }
        self.out.signer.resign(&mut msg);
        if self.own_message(lane, &msg).await {
            return None;
        }
        if lane == Lane::Iopub {
            self.out.publish(msg).await;
            return None;
        }
        let mut shutdown_reply = false;
        if lane == Lane::Shell || lane == Lane::Control {
            if let Some(parent) = msg.parent_msg_id() {
                self.requests.answered(&parent);
            }
            if let Some(n) = execution_count(&msg) {
                // The end of a cell: idle from now.
                self.idle.clock.touch();
                self.out.exec_count = n;
            }
            shutdown_reply = self.shutdown.is_some()
                && msg
                    .peek_header()
                    .is_ok_and(|h| h.msg_type == "shutdown_reply");
        }
        self.out.send(lane, msg).await;
        if self.env.switching() {
            self.send_switch_when_idle().await;
        }
        if shutdown_reply {
            if self.shutdown == Some(true) {
                self.agent.hand_over().await;
            } else {
                self.agent.wait_end().await;
            }
            return Some(0);
        }
        None
    }

    /// Tells every waiting request, and IOPub, that the kernel is gone.
    pub async fn report_death(&mut self, text: &str) {
        tracing::error!("{text}");
        self.out.fe.set_alive(false);
        if !self.fail_open("KernelDied", text).await {
            self.out
                .stream(&Bytes::new(), "stderr", &format!("{text}\n"))
                .await;
        }
    }

    /// Fails every request still waiting for the kernel (and an
    /// environment change's cell and held cells) with `ename`; true when
    /// one was a cell (the text was shown there).
    pub async fn fail_open(&mut self, ename: &str, text: &str) -> bool {
        self.env.fail_with(&mut self.requests);
        let mut any_execute = false;
        for p in self.requests.drain() {
            any_execute |= p.msg_type == "execute_request";
            let reply_type = p
                .msg_type
                .strip_suffix("_request")
                .map(|t| format!("{t}_reply"))
                .unwrap_or_else(|| "error".into());
            let failure = Failure {
                reply_type: &reply_type,
                ename,
                evalue: text,
                traceback: json!([text]),
                execution_count: json!(null),
            };
            self.out.fail(&p.cell, failure).await;
        }
        any_execute
    }
}
