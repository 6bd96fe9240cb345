//! The proxy's side of cell-level delegation ([`crate::targets`]): which
//! cells go to a target, what noyau answers itself, and what a target's
//! agent sends back.

use bytes::Bytes;
use noyau_client::agent::AgentLaunch;
use noyau_link::envelope::{Event, Payload};
use noyau_link::Lane;
use noyau_wire::{build, RawMessage};
use serde_json::json;

use crate::frontend::{publish, send_router};
use crate::targets::{self, Magic, OnMagic, RunningCell, State, Target, TargetEvent, What};
use crate::transfer::{self, Direction, Stage, Transfer};
use crate::Proxy;

impl Proxy {
    /// Takes the messages that are noyau's business; gives back the others.
    pub(crate) async fn intercept(&mut self, lane: Lane, msg: RawMessage) -> Option<RawMessage> {
        let Ok(h) = msg.peek_header() else {
            return Some(msg);
        };
        match (lane, h.msg_type.as_str()) {
            (Lane::Shell, "execute_request") => {
                let code = serde_json::from_slice::<serde_json::Value>(&msg.content)
                    .ok()
                    .and_then(|c| c.get("code").and_then(|c| c.as_str()).map(str::to_string))
                    .unwrap_or_default();
                match targets::parse(&code) {
                    Ok(Magic::None) => Some(msg),
                    Ok(Magic::On(m, body)) => {
                        self.run_on_target(m, body, msg).await;
                        None
                    }
                    Ok(Magic::Line(words)) => {
                        self.line_magic(&words, &msg).await;
                        None
                    }
                    Err(usage) => {
                        self.answer(&msg, Err(("UsageError", usage))).await;
                        None
                    }
                }
            }
            // An interrupt goes where cells are running: to the targets busy
            // with one, else to the notebook's kernel.
            (Lane::Control, "interrupt_request") => {
                let busy: Vec<String> = self
                    .targets
                    .values()
                    .filter(|t| !t.running.is_empty())
                    .map(|t| t.name.clone())
                    .collect();
                if busy.is_empty() {
                    return Some(msg);
                }
                for name in busy {
                    let Some(t) = self.targets.get_mut(&name) else {
                        continue;
                    };
                    if t.state == State::Queued {
                        // Interrupting a cell that waits for its job cancels the job.
                        t.release();
                    } else {
                        t.send(Lane::Control, msg.clone().into_frames());
                    }
                }
                None
            }
            (_, "shutdown_request") => {
                self.release_targets();
                self.dask_release().await;
                Some(msg)
            }
            _ => Some(msg),
        }
    }

    async fn run_on_target(&mut self, mut m: OnMagic, body: String, mut msg: RawMessage) {
        let body = match m.tasks {
            Some(n) => {
                // The allocation must hold the tasks; only the first cell sizes it.
                if !m.overrides.iter().any(|o| o.starts_with("ntasks=")) {
                    m.overrides.push(format!("ntasks={n}"));
                }
                targets::fan_out(&body, n)
            }
            None => body,
        };
        self.forget_releasing(&m.target).await;
        if !self.targets.contains_key(&m.target) {
            if let Err(e) = self.start_target(&m, Some(&msg.header)).await {
                let text = format!("cannot start target {:?}: {e:#}", m.target);
                self.answer(&msg, Err(("NoyauTargetError", text))).await;
                return;
            }
        }
        let Some(content) = targets::with_code(&msg.content, &body) else {
            self.answer(
                &msg,
                Err(("NoyauTargetError", "malformed execute_request".into())),
            )
            .await;
            return;
        };
        msg.content = content;
        let Some(id) = msg.peek_header().ok().map(|h| h.msg_id) else {
            return;
        };
        let t = self.targets.get_mut(&m.target).expect("just started");
        t.running.insert(
            id,
            RunningCell {
                identities: msg.identities.clone(),
                header: msg.header.clone(),
                announced: m.quiet,
            },
        );
        t.last_used = std::time::Instant::now();
        if t.state == State::Queued && t.note.is_none() {
            t.note = Some(crate::queued::Note::new(msg.header.clone()));
        }
        t.send(Lane::Shell, msg.into_frames());
    }

    /// Starts target `m.target`, its environment prepared here first (its
    /// progress shown in the cell `parent`).
    async fn start_target(&mut self, m: &OnMagic, parent: Option<&Bytes>) -> anyhow::Result<()> {
        let (backend, profile) = noyau_config::resolve(None, Some(&m.target), &m.overrides)?;
        let env = self.job_env_for(&profile, m.env.as_deref(), parent).await?;
        let inner = profile
            .kernel
            .clone()
            .unwrap_or_else(|| self.cfg.inner.clone());
        let launch = AgentLaunch {
            backend,
            inner,
            link_bind: None,
            link_advertise: None,
            noyau_exe: self.cfg.noyau_exe.clone(),
            job_name: format!("noyau-target-{}", m.target),
            cwd: None,
            env,
            profile,
        };
        let t = Target::start(&m.target, launch, self.target_tx.clone()).await?;
        tracing::info!(target = %m.target, job = %t.job, "target submitted");
        self.targets.insert(m.target.clone(), t);
        Ok(())
    }

    async fn line_magic(&mut self, words: &[String], msg: &RawMessage) {
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let result = match words.as_slice() {
            ["targets"] => Ok(self.targets_table()),
            ["dask", rest @ ..] => {
                self.dask_magic(rest, msg.identities.clone(), msg.header.clone())
                    .await;
                return;
            }
            ["env"] | ["env", "show"] => Ok(self.env_show()),
            ["env", "lock"] => self.env_lock().map_err(|e| ("NoyauEnvError", e)),
            ["env", spec @ ..] => {
                self.env_switch(&spec.join(" "), msg).await;
                return;
            }
            ["push", name, vars @ ..] | ["pull", name, vars @ ..] => {
                let direction = if words[0] == "push" {
                    Direction::Push
                } else {
                    Direction::Pull
                };
                let vars: Vec<String> = vars.iter().map(|v| v.to_string()).collect();
                match self.start_transfer(direction, name, vars, msg).await {
                    Ok(()) => return,
                    Err(e) => Err(("NoyauTransferError", e)),
                }
            }
            ["release", name] | ["cancel", name] => match self.targets.get_mut(*name) {
                Some(t) => {
                    t.release();
                    Ok(format!(
                        "[noyau] releasing target {name} ({} job {})\n",
                        t.backend, t.job
                    ))
                }
                None => Err((
                    "NoyauTargetError",
                    format!("no target named {name:?} is running; `%noyau targets` lists them"),
                )),
            },
            _ => Err((
                "UsageError",
                "usage: %noyau env [show] | %noyau env lock | %noyau env SPEC (see %noyau env help) | %noyau targets | %noyau dask up|status|down | %noyau release TARGET | %noyau cancel TARGET | \
                 %noyau push TARGET NAME… | %noyau pull TARGET NAME…; \
                 %%noyau on TARGET [key=value …] [--quiet] runs a cell on a target"
                    .to_string(),
            )),
        };
        self.answer(msg, result).await;
    }

    fn targets_table(&self) -> String {
        if self.targets.is_empty() {
            return "[noyau] no targets; `%%noyau on NAME` starts one from [profiles.NAME] in noyau.toml\n".into();
        }
        let mut out = format!(
            "{:<14} {:<9} {:<8} {:<14} {:<14} {}\n",
            "TARGET", "STATE", "BACKEND", "JOB", "NODE", "IDLE"
        );
        for t in self.targets.values() {
            out.push_str(&format!(
                "{:<14} {:<9} {:<8} {:<14} {:<14} {}s\n",
                t.name,
                t.describe_state(),
                t.backend,
                t.job,
                t.node.as_deref().unwrap_or("-"),
                t.last_used.elapsed().as_secs()
            ));
        }
        out
    }

    /// Answers a cell as a kernel would: busy, the output, the reply, idle.
    pub(crate) async fn answer(
        &mut self,
        msg: &RawMessage,
        result: Result<String, (&str, String)>,
    ) {
        self.answer_to(msg.identities.clone(), &msg.header.clone(), result)
            .await;
    }

    pub(crate) async fn answer_to(
        &mut self,
        identities: Vec<Bytes>,
        parent: &Bytes,
        result: Result<String, (&str, String)>,
    ) {
        self.publish_status(parent, "busy").await;
        self.finish_answer(identities, parent, result).await;
    }

    /// The end of an answer whose `busy` went out earlier: the output, the
    /// reply, idle.
    pub(crate) async fn finish_answer(
        &mut self,
        identities: Vec<Bytes>,
        parent: &Bytes,
        result: Result<String, (&str, String)>,
    ) {
        match result {
            Ok(text) => {
                self.publish_stream(parent, "stdout", &text).await;
                let reply = build::message(
                    &self.signer,
                    identities,
                    "execute_reply",
                    &self.session,
                    parent,
                    json!({"status": "ok", "execution_count": self.exec_count, "user_expressions": {}, "payload": []}),
                );
                send_router(&mut self.fe, Lane::Shell, reply).await;
                self.publish_status(parent, "idle").await;
            }
            Err((ename, evalue)) => {
                let traceback = json!([format!("{ename}: {evalue}")]);
                let count = json!(self.exec_count);
                self.fail_request(
                    identities,
                    parent,
                    "execute_reply",
                    ename,
                    &evalue,
                    traceback,
                    count,
                )
                .await;
            }
        }
    }

    pub(crate) async fn on_target_event(&mut self, ev: TargetEvent) {
        let TargetEvent { name, id, what } = ev;
        if self.targets.get(&name).is_none_or(|t| t.id != id) {
            // From a released target that a new one of that name replaced.
            return;
        }
        match what {
            What::Attached(sender) => {
                if let Some(t) = self.targets.get_mut(&name) {
                    t.attach(sender);
                    // The cell's output is the target's from now on.
                    if let Some(note) = t.note.take().filter(|n| n.shown) {
                        let clear = build::iopub(
                            &self.signer,
                            "clear_output",
                            &self.session,
                            &note.parent,
                            json!({"wait": false}),
                        );
                        publish(&mut self.fe, clear).await;
                    }
                }
            }
            What::Queue(state) => {
                let Some(t) = self.targets.get_mut(&name) else {
                    return;
                };
                let label = format!("{} (target {name})", t.job);
                let Some(text) = crate::queued::describe(
                    &t.backend,
                    &label,
                    &state,
                    t.submitted.elapsed().as_secs(),
                ) else {
                    return;
                };
                let Some(note) = t.note.as_mut() else { return };
                if let Some((kind, content)) = note.update(&text) {
                    let msg =
                        build::iopub(&self.signer, kind, &self.session, &note.parent, content);
                    publish(&mut self.fe, msg).await;
                }
            }
            What::Message(lane, Payload::Jupyter(frames)) => {
                self.relay_from_target(&name, lane, frames).await;
            }
            What::Message(_, Payload::Event(ev)) => match ev {
                Event::AgentHello { host, .. } => {
                    if let Some(t) = self.targets.get_mut(&name) {
                        t.node = Some(host);
                    }
                }
                Event::KernelReady { .. } => {
                    if let Some(t) = self.targets.get_mut(&name) {
                        if t.state != State::Releasing {
                            t.state = State::Ready;
                        }
                    }
                }
                Event::KernelDied { description, .. } => {
                    self.end_target(&name, &format!("its kernel died: it {description}"))
                        .await;
                }
                Event::AgentError { message } => {
                    self.end_target(&name, &format!("it could not start: {message}"))
                        .await;
                }
                other => tracing::debug!(target = %name, "event {other:?}"),
            },
            What::Ended(why) => self.end_target(&name, &why).await,
        }
    }

    async fn relay_from_target(&mut self, name: &str, lane: Lane, frames: Vec<Bytes>) {
        let mut msg = match RawMessage::from_frames(frames) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(target = %name, "dropped a malformed message: {e}");
                return;
            }
        };
        self.signer.resign(&mut msg);
        let parent = msg.parent_msg_id().unwrap_or_default();
        let msg_type = msg.peek_header().map(|h| h.msg_type).unwrap_or_default();
        if self.internal.contains(&parent) {
            if lane == Lane::Shell && msg_type == "execute_reply" {
                self.internal.seen(&parent, true);
                self.advance_transfer(&parent, &msg.content).await;
            } else if transfer::is_idle(&msg) {
                self.internal.seen(&parent, false);
            }
            return;
        }
        let Some(t) = self.targets.get_mut(name) else {
            return;
        };
        if lane == Lane::Iopub {
            // The where-line goes right after the cell's execute_input.
            let announce =
                msg_type == "execute_input" && t.running.get(&parent).is_some_and(|c| !c.announced);
            let where_line = t.where_line();
            let parent_header = msg.parent_header.clone();
            publish(&mut self.fe, msg).await;
            if announce {
                if let Some(c) = self
                    .targets
                    .get_mut(name)
                    .and_then(|t| t.running.get_mut(&parent))
                {
                    c.announced = true;
                }
                self.publish_stream(&parent_header, "stderr", &where_line)
                    .await;
            }
            return;
        }
        if msg_type == "execute_reply" {
            t.running.remove(&parent);
            t.last_used = std::time::Instant::now();
        }
        send_router(&mut self.fe, lane, msg).await;
    }

    fn releasing(&self, name: &str) -> bool {
        self.targets
            .get(name)
            .is_some_and(|t| t.state == State::Releasing)
    }

    /// A target whose job is ending leaves the table, so that its next use
    /// starts a new one.
    async fn forget_releasing(&mut self, name: &str) {
        if self.releasing(name) {
            if let Some(old) = self.targets.remove(name) {
                self.fail_target(old, "released").await;
            }
        }
    }

    /// A target is gone: its running cells fail with the reason.
    async fn end_target(&mut self, name: &str, why: &str) {
        if let Some(t) = self.targets.remove(name) {
            self.fail_target(t, why).await;
        }
    }

    /// Ends a target taken out of the table: its running cells and
    /// transfers fail with the reason.
    async fn fail_target(&mut self, mut t: Target, why: &str) {
        t.release();
        let name = t.name.clone();
        tracing::info!(target = %name, "target ended: {why}");
        let text = format!("target {name} ended: {why}");
        let stuck: Vec<String> = self
            .transfers
            .iter()
            .filter(|(_, tr)| tr.target == name)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stuck {
            if let Some(tr) = self.transfers.remove(&id) {
                self.answer_to(
                    tr.identities,
                    &tr.header,
                    Err(("NoyauTransferError", text.clone())),
                )
                .await;
            }
        }
        for (_, cell) in std::mem::take(&mut t.running) {
            let count = json!(self.exec_count);
            self.fail_request(
                cell.identities,
                &cell.header,
                "execute_reply",
                "NoyauTargetError",
                &text,
                json!([text]),
                count,
            )
            .await;
        }
    }

    pub(crate) fn release_idle_targets(&mut self) {
        let limit = targets::idle_timeout();
        for t in self.targets.values_mut() {
            if t.state != State::Releasing && t.running.is_empty() && t.last_used.elapsed() >= limit
            {
                tracing::info!(target = %t.name, "idle for {}s; releasing", limit.as_secs());
                t.release();
            }
        }
    }

    /// Ends every target's job (shutdown, or the proxy going away).
    pub(crate) fn release_targets(&mut self) {
        for t in self.targets.values_mut() {
            t.release();
        }
    }
}

impl Proxy {
    /// Sends the source kernel the request that dumps `vars`.
    async fn start_transfer(
        &mut self,
        direction: Direction,
        target: &str,
        vars: Vec<String>,
        msg: &RawMessage,
    ) -> Result<(), String> {
        transfer::check_names(&vars)?;
        if direction == Direction::Pull && self.releasing(target) {
            return Err(format!(
                "target {target:?} is being released: its variables went with it"
            ));
        }
        self.forget_releasing(target).await;
        if !self.targets.contains_key(target) {
            if direction == Direction::Pull {
                return Err(format!(
                    "no target named {target:?} is running; start it with a `%%noyau on {target}` cell"
                ));
            }
            // Pushing is a fine first use of a target: start it.
            let on = OnMagic {
                target: target.to_string(),
                overrides: vec![],
                quiet: true,
                tasks: None,
                env: None,
            };
            self.start_target(&on, None)
                .await
                .map_err(|e| format!("cannot start target {target:?}: {e:#}"))?;
        }
        let (request, id) = self.own_request(transfer::dump_request(&vars));
        let from = match direction {
            Direction::Push => None,
            Direction::Pull => Some(target.to_string()),
        };
        self.send_internal(from.as_deref(), request)?;
        self.internal.insert(id.clone());
        self.transfers.insert(
            id,
            Transfer {
                direction,
                target: target.to_string(),
                names: vars,
                stage: Stage::Dump,
                identities: msg.identities.clone(),
                header: msg.header.clone(),
                bytes: 0,
            },
        );
        Ok(())
    }

    /// An execute_request of the proxy's own (no frontend behind it), and its msg_id.
    pub(crate) fn own_request(&self, content: serde_json::Value) -> (RawMessage, String) {
        let request = build::message(
            &self.signer,
            vec![],
            "execute_request",
            &self.session,
            &Bytes::new(),
            content,
        );
        let id = request.peek_header().map(|h| h.msg_id).unwrap_or_default();
        (request, id)
    }

    /// A request of the proxy's own, to a target or (None) the notebook's kernel.
    pub(crate) fn send_internal(
        &mut self,
        target: Option<&str>,
        request: RawMessage,
    ) -> Result<(), String> {
        match target {
            Some(name) => {
                let t = self
                    .targets
                    .get_mut(name)
                    .ok_or_else(|| format!("target {name:?} is gone"))?;
                t.send(Lane::Shell, request.into_frames());
                Ok(())
            }
            None => {
                let s = self
                    .sender()
                    .ok_or("the notebook's kernel has not started yet")?;
                s.send(
                    Lane::Shell,
                    noyau_link::envelope::jupyter(request.into_frames()),
                )
                .map_err(|e| e.to_string())
            }
        }
    }

    /// The reply to one of a transfer's requests.
    pub(crate) async fn advance_transfer(&mut self, id: &str, content: &Bytes) {
        let Some(mut tr) = self.transfers.remove(id) else {
            return;
        };
        let reply: serde_json::Value = serde_json::from_slice(content).unwrap_or_default();
        let failed = |reply: &serde_json::Value| {
            (reply["status"] != "ok").then(|| {
                format!(
                    "{}: {}",
                    reply["ename"].as_str().unwrap_or("error"),
                    reply["evalue"].as_str().unwrap_or("")
                )
            })
        };
        let outcome: Result<Option<String>, String> = match tr.stage {
            Stage::Dump => match failed(&reply).map_or_else(|| transfer::dumped(&reply), Err) {
                Err(e) => Err(e),
                Ok(b64) => {
                    tr.bytes = b64.len() * 3 / 4;
                    let (request, next) = self.own_request(transfer::load_request(&b64));
                    let to = match tr.direction {
                        Direction::Push => Some(tr.target.clone()),
                        Direction::Pull => None,
                    };
                    match self.send_internal(to.as_deref(), request) {
                        Ok(()) => {
                            tr.stage = Stage::Load;
                            self.internal.insert(next.clone());
                            self.transfers.insert(next, tr);
                            return;
                        }
                        Err(e) => Err(e),
                    }
                }
            },
            Stage::Load => match failed(&reply) {
                Some(e) => Err(e),
                None => Ok(Some(format!(
                    "[noyau] {} {} {} target {} ({} bytes)\n",
                    if tr.direction == Direction::Push {
                        "pushed"
                    } else {
                        "pulled"
                    },
                    tr.names.join(", "),
                    if tr.direction == Direction::Push {
                        "to"
                    } else {
                        "from"
                    },
                    tr.target,
                    tr.bytes
                ))),
            },
        };
        let result = match outcome {
            Ok(Some(text)) => Ok(text),
            Ok(None) => return,
            Err(e) => Err(("NoyauTransferError", e)),
        };
        self.answer_to(tr.identities, &tr.header, result).await;
    }
}
