//! The proxy as noyau-magic's [`Host`]: a magic's outputs become IOPub
//! messages signed for the frontend, its own requests go to the notebook's
//! kernel over the agent's link (or to a target's), and their replies stop
//! here ([`Own`]) to be handed back to the magics. Also where a cell's
//! magic is recognised and each `%noyau` command dispatched.

use bytes::Bytes;
use noyau_link::Lane;
use noyau_magic::dask::KernelSide;
use noyau_magic::{Command, Direction, Host, Magic, MagicError, Output, Peer};
use noyau_wire::RawMessage;
use serde_json::Value;

use crate::agent::AgentSide;
use crate::answer::{Answers, Cell};
use crate::relay::Proxy;
use crate::requests::{is_idle, Own, Requests};
use crate::targets::Targets;

/// What a magic did, sent to the frontend once the magic returns.
enum Outgoing {
    Output(Output),
    Finish(Result<String, MagicError>),
}

/// The proxy's fields a magic may use, borrowed for one call.
pub(crate) struct ProxyHost<'a> {
    out: &'a Answers,
    agent: &'a mut AgentSide,
    targets: &'a mut Targets,
    own: &'a mut Own,
    requests: &'a Requests,
    outbox: Vec<(Cell, Outgoing)>,
}

/// A [`ProxyHost`] over `$p`'s fields (a macro: the borrows are of fields,
/// so `$p.magics` stays free).
macro_rules! host {
    ($p:ident) => {
        $crate::magic::ProxyHost::new(
            &$p.out,
            &mut $p.agent,
            &mut $p.targets,
            &mut $p.own,
            &$p.requests,
        )
    };
}
pub(crate) use host;

impl<'a> ProxyHost<'a> {
    pub fn new(
        out: &'a Answers,
        agent: &'a mut AgentSide,
        targets: &'a mut Targets,
        own: &'a mut Own,
        requests: &'a Requests,
    ) -> Self {
        ProxyHost {
            out,
            agent,
            targets,
            own,
            requests,
            outbox: Vec::new(),
        }
    }
}

impl Host for ProxyHost<'_> {
    type Cell = Cell;

    fn output(&mut self, cell: &Cell, out: Output) {
        self.outbox.push((cell.clone(), Outgoing::Output(out)));
    }

    fn finish(&mut self, cell: &Cell, result: Result<String, MagicError>) {
        self.outbox.push((cell.clone(), Outgoing::Finish(result)));
    }

    fn request(&mut self, to: Peer<'_>, content: Value) -> Result<String, MagicError> {
        let request = self
            .out
            .message(vec![], "execute_request", &Bytes::new(), content);
        let id = request.peek_header().map(|h| h.msg_id).unwrap_or_default();
        match to {
            Peer::Target(name) => {
                let t = self
                    .targets
                    .map
                    .get_mut(name)
                    .ok_or_else(|| MagicError::Target(format!("target {name:?} is gone")))?;
                t.send(Lane::Shell, request.into_frames());
            }
            Peer::Kernel => {
                let s = self.agent.sender().ok_or_else(|| {
                    MagicError::Target("the notebook's kernel has not started yet".into())
                })?;
                let frames = noyau_link::envelope::jupyter(request.into_frames());
                s.send(Lane::Shell, frames)
                    .map_err(|e| MagicError::Target(e.to_string()))?;
            }
        }
        self.own.insert(id.clone());
        Ok(id)
    }

    fn running_cell(&self) -> Option<Cell> {
        self.requests.running().cloned()
    }
}

/// What a magic did, once its host is done.
pub(crate) struct Outbox(Vec<(Cell, Outgoing)>);

impl ProxyHost<'_> {
    pub fn done(self) -> Outbox {
        Outbox(self.outbox)
    }
}

impl Proxy {
    /// Sends what a magic did to the frontend.
    pub async fn flush(&mut self, outbox: Outbox) {
        for (cell, what) in outbox.0 {
            match what {
                Outgoing::Output(o) => self.out.output(&cell, o).await,
                Outgoing::Finish(r) => self.out.finish(&cell, r).await,
            }
        }
    }
}

impl Proxy {
    /// Takes the messages that are noyau's business; gives back the others.
    pub async fn intercept(
        &mut self,
        lane: Lane,
        kind: &str,
        msg: RawMessage,
    ) -> Option<RawMessage> {
        match (lane, kind) {
            (Lane::Shell, "execute_request") => {
                // Only the code is read (borrowed unless it has escapes).
                #[derive(serde::Deserialize)]
                struct Code<'a> {
                    #[serde(borrow)]
                    code: Option<std::borrow::Cow<'a, str>>,
                }
                let content = serde_json::from_slice::<Code>(&msg.content).ok();
                let code = content
                    .as_ref()
                    .and_then(|c| c.code.as_deref())
                    .unwrap_or_default();
                match noyau_magic::parse(code) {
                    Ok(Magic::None) => return Some(msg),
                    Ok(Magic::On(m, body)) => self.run_on_target(m, body, msg).await,
                    Ok(Magic::Line(cmd)) => {
                        self.line_magic(cmd, Cell::of(&msg)).await;
                        // (a release, `dask down`…: frontends see the change)
                        self.push_state().await;
                    }
                    Err(usage) => self.out.answer(&Cell::of(&msg), Err(usage)).await,
                }
                None
            }
            // An interrupt goes where cells are running: to the targets busy
            // with one, else to the notebook's kernel.
            (Lane::Control, "interrupt_request") => {
                (!self.targets.interrupt(&msg.clone().into_frames())).then_some(msg)
            }
            (
                Lane::Shell,
                kind @ ("comm_open" | "comm_msg" | "comm_close" | "comm_info_request"),
            ) => self.on_comm(kind, msg).await,
            (_, "shutdown_request") => {
                self.targets.release_all();
                self.release_dask("the kernel was shut down").await;
                Some(msg)
            }
            _ => Some(msg),
        }
    }

    /// A `%noyau …` cell: busy, then what the command says.
    async fn line_magic(&mut self, cmd: Command, cell: Cell) {
        self.out.status(&cell.header, "busy").await;
        let cwd =
            || noyau_trust::anchor::ProjectDir::cwd().map_err(|e| MagicError::Env(e.to_string()));
        let result = match cmd {
            Command::Targets => Ok(self.targets.table()),
            Command::Release(name) | Command::Cancel(name) => self.release_target(&name),
            Command::EnvShow => Ok(noyau_magic::env::show(self.env.record.as_ref())),
            Command::EnvLock => {
                cwd().and_then(|d| noyau_magic::env::lock(self.env.record.as_ref(), &d))
            }
            Command::EnvHelp => Ok(noyau_magic::env::usage()),
            Command::EnvSwitch(spec) => {
                match self.env.switch(&spec, &cell, self.agent.attached()) {
                    Ok(()) => return self.send_switch_when_idle().await,
                    Err(e) => Err(e),
                }
            }
            Command::Push { target, names } => {
                return self.transfer(Direction::Push, &target, names, cell).await
            }
            Command::Pull { target, names } => {
                return self.transfer(Direction::Pull, &target, names, cell).await
            }
            Command::DaskUp(words) => return self.dask_up(cell, &words).await,
            Command::Data(words) => match self.env.add_data(&words, &cell, self.agent.attached()) {
                Ok(()) => return,
                Err(e) => Err(e),
            },
            Command::DaskStatus => Ok(self.magics.dask.status().await),
            Command::DaskDown => {
                let mut host = host!(self);
                let text = self.magics.dask.down(&mut host).await;
                let outbox = host.done();
                self.flush(outbox).await;
                Ok(text)
            }
        };
        self.out.finish(&cell, result).await;
    }

    pub(crate) fn release_target(&mut self, name: &str) -> Result<String, MagicError> {
        let t = self
            .targets
            .map
            .get_mut(name)
            .ok_or_else(|| noyau_magic::targets::unknown(name))?;
        t.release();
        Ok(noyau_magic::targets::releasing(name, &t.backend, &t.job))
    }

    /// `%noyau push/pull`: the target must run (a push starts it).
    async fn transfer(
        &mut self,
        direction: Direction,
        target: &str,
        names: Vec<String>,
        cell: Cell,
    ) {
        let ready = self.transfer_target(direction, target).await;
        let mut host = host!(self);
        let started = ready.and_then(|()| {
            self.magics
                .transfers
                .start(&mut host, cell.clone(), direction, target, names)
        });
        if let Err(e) = started {
            host.finish(&cell, Err(e));
        }
        let outbox = host.done();
        self.flush(outbox).await;
    }

    async fn transfer_target(
        &mut self,
        direction: Direction,
        target: &str,
    ) -> Result<(), MagicError> {
        if direction == Direction::Pull && self.targets.releasing(target) {
            return Err(MagicError::Transfer(format!(
                "target {target:?} is being released: its variables went with it"
            )));
        }
        self.forget_releasing(target).await;
        if direction == Direction::Pull && !self.targets.map.contains_key(target) {
            return Err(MagicError::Transfer(format!(
                "no target named {target:?} is running; start it with a `%%noyau on {target}` cell"
            )));
        }
        // Pushing is a fine first use of a target: start it.
        self.start_target(target, &[], None, None)
            .await
            .map_err(|e| MagicError::Transfer(e.to_string()))
    }

    /// Where the kernel runs, for `%noyau dask up` without `--target`; the
    /// cluster's jobs' environment (the target's profile's, else the
    /// kernel's), prepared here, its build lines in `cell`.
    async fn kernel_side(
        &mut self,
        words: &[String],
        cell: &Cell,
    ) -> Result<KernelSide, MagicError> {
        let profile = noyau_magic::dask::target_of(words)
            .and_then(|t| noyau_config::resolve(None, Some(&t), &[]).ok())
            .map(|(_, p)| p);
        let spec = profile
            .as_ref()
            .and_then(noyau_env::sources::TargetSpec::profile);
        let lines = crate::agent::Lines::Cell(&mut self.out, &cell.header);
        let env = crate::agent::job_env(spec, lines)
            .await
            .map_err(|e| MagicError::Dask(format!("the cluster's environment: {e}")))?;
        Ok(KernelSide {
            backend: self.cfg.backend.clone(),
            profile: self.cfg.resources.clone(),
            inner: self.cfg.inner.clone(),
            noyau_exe: self.cfg.noyau_exe.clone(),
            env,
        })
    }

    async fn dask_up(&mut self, cell: Cell, words: &[String]) {
        let side = match self.kernel_side(words, &cell).await {
            Ok(s) => s,
            Err(e) => return self.out.finish(&cell, Err(e)).await,
        };
        let mut host = host!(self);
        self.magics.dask.up(&mut host, cell, words, &side).await;
        let outbox = host.done();
        self.flush(outbox).await;
    }

    pub async fn on_dask_event(&mut self, ev: noyau_dask::ClusterEvent) {
        let mut host = host!(self);
        self.magics.dask.on_event(&mut host, ev);
        let outbox = host.done();
        self.flush(outbox).await;
    }

    /// Ends the kernel's Dask cluster (a shutdown, an environment switch).
    pub async fn release_dask(&mut self, why: &str) {
        let mut host = host!(self);
        self.magics.dask.release(&mut host, why).await;
        let outbox = host.done();
        self.flush(outbox).await;
    }

    /// A message for one of the proxy's own requests stops here (its reply
    /// goes to the magic that waits for it); true when it was one.
    pub async fn own_message(&mut self, lane: Lane, msg: &RawMessage) -> bool {
        // Most of the time there is none: no parent header to parse.
        if self.own.is_empty() {
            return false;
        }
        let Some(parent) = msg.parent_msg_id().filter(|p| self.own.contains(p)) else {
            return false;
        };
        if lane == Lane::Shell {
            self.own.seen(&parent, true);
            let reply: Value = serde_json::from_slice(&msg.content).unwrap_or_default();
            let mut host = host!(self);
            self.magics.on_reply(&mut host, &parent, &reply);
            let outbox = host.done();
            self.flush(outbox).await;
        } else if is_idle(msg) {
            self.own.seen(&parent, false);
        }
        true
    }
}
