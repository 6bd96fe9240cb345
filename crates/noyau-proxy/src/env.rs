//! The kernel's environment from the notebook's side: `%noyau env show`
//! and `%noyau env lock` answer from the record the agent sent
//! (`EnvReady`); `%noyau env SPEC` chooses another environment from a cell.
//!
//! Choosing one is a restart in slow motion. The spec is read here, in the
//! notebook's directory (noyau-env's `sources::for_cell`), and goes to the
//! agent as `SwitchEnv` once the cells sent before it have finished. The
//! agent builds it where the kernel runs, its progress lines shown in the
//! cell, while the old kernel stays; cells sent after the magic are held
//! here, so none of them runs in the old kernel by mistake. On `EnvReady`
//! and the next `KernelReady` (the agent replaced the kernel) the cell ends
//! and the held cells go to the new kernel; on `EnvFailed` the cell shows
//! the tool's message and the held cells go to the old kernel, untouched.

use std::collections::VecDeque;

use bytes::Bytes;
use noyau_link::envelope::{self, Event};
use noyau_link::Lane;
use noyau_wire::RawMessage;

use crate::Proxy;

/// A `%noyau env SPEC` cell in progress.
pub(crate) struct EnvSwitch {
    identities: Vec<Bytes>,
    header: Bytes,
    spec: serde_json::Value,
    /// `SwitchEnv` went to the agent (it waits for earlier cells to end).
    sent: bool,
    /// `EnvReady` came: the next `KernelReady` is the new kernel's.
    built: bool,
    /// Execute requests sent after the magic, for the kernel that wins.
    held: VecDeque<RawMessage>,
}

impl EnvSwitch {
    pub(crate) fn header(&self) -> &Bytes {
        &self.header
    }
}

/// `%noyau env help`.
fn usage() -> String {
    format!(
        "usage: {}\n\
         A python spec is resolved and installed with uv into the shared cache (built once); \
         the kernel is then restarted in the new environment (variables are lost). \
         isolation/network/scratch/ro_bind from noyau.toml stay unless given here.\n\
         examples:\n  %noyau env six==1.16.0\n  %noyau env python 3.11 numpy==2.1.3 isolation=container\n  \
         %noyau env modules gcc/12 cuda/12.4\n  %noyau env prefix /path/to/venv\n  \
         %noyau env file other/noyau.toml\n  %noyau env system\n",
        noyau_env::sources::MAGIC_USAGE
    )
}

impl Proxy {
    /// `%noyau env SPEC`: starts choosing the kernel's environment.
    pub(crate) async fn env_switch(&mut self, args: &str, msg: &RawMessage) {
        if args == "help" {
            self.answer(msg, Ok(usage())).await;
            return;
        }
        // (A second `%noyau env` cell is held until this one ends.)
        if self.link.is_none() {
            let why = "the kernel has not started yet (its job is queued or its first environment \
                       is being built); run this cell again when it has";
            self.answer(msg, Err(("NoyauEnvError", why.into()))).await;
            return;
        }
        let spec = std::env::current_dir()
            .map_err(|e| format!("the kernel's working directory: {e}"))
            .and_then(|cwd| {
                noyau_env::sources::for_cell(&cwd, crate::kernel_env_var().as_deref(), args)
                    .map_err(|e| e.to_string())
            });
        let spec = match spec {
            Ok(s) => s,
            Err(e) => {
                self.answer(msg, Err(("NoyauEnvError", e))).await;
                return;
            }
        };
        tracing::info!(spec = %spec.to_value(), "a cell chose the kernel's environment");
        self.publish_status(&msg.header, "busy").await;
        self.switch = Some(EnvSwitch {
            identities: msg.identities.clone(),
            header: msg.header.clone(),
            spec: spec.to_value(),
            sent: false,
            built: false,
            held: VecDeque::new(),
        });
        self.send_switch_when_idle().await;
    }

    /// Sends the pending `SwitchEnv` once no earlier request waits for the
    /// kernel: the new kernel replaces the old one only between cells.
    pub(crate) async fn send_switch_when_idle(&mut self) {
        if !self.pending.is_empty() {
            return;
        }
        let Some(sw) = self.switch.as_mut().filter(|s| !s.sent) else {
            return;
        };
        sw.sent = true;
        let ev = Event::SwitchEnv {
            spec: sw.spec.clone(),
            prepared: None,
        };
        let parent = sw.header.clone();
        let sent = match self.sender() {
            Some(s) => s
                .send(Lane::Shell, envelope::event(&ev))
                .map_err(|e| e.to_string()),
            None => Err("the link to the agent is down".into()),
        };
        match sent {
            Ok(()) => {
                self.publish_stream(
                    &parent,
                    "stderr",
                    "noyau: environment: preparing it where the kernel runs; the kernel restarts in it when it is ready\n",
                )
                .await
            }
            Err(e) => self.end_switch(Err(format!("cannot reach the agent: {e}"))).await,
        }
    }

    /// Holds an execute request while a switch is in progress; gives back
    /// the others.
    pub(crate) fn hold_during_switch(&mut self, lane: Lane, msg: RawMessage) -> Option<RawMessage> {
        let Some(sw) = self.switch.as_mut() else {
            return Some(msg);
        };
        if lane == Lane::Shell
            && msg
                .peek_header()
                .is_ok_and(|h| h.msg_type == "execute_request")
        {
            sw.held.push_back(msg);
            return None;
        }
        Some(msg)
    }

    /// `EnvReady` during a switch: the old kernel is about to go.
    pub(crate) async fn switch_built(&mut self) {
        if let Some(sw) = self.switch.as_mut().filter(|s| s.sent) {
            sw.built = true;
            // The cluster's settings lived in the old kernel.
            self.dask_release().await;
        }
    }

    /// `KernelReady`: ends a switch whose kernel this is.
    pub(crate) async fn switch_kernel_ready(&mut self) {
        if !self.switch.as_ref().is_some_and(|s| s.built) {
            return;
        }
        let rec = self.env_record.clone().unwrap_or_default();
        let mut what = vec![rec["kind"].as_str().unwrap_or("?").to_string()];
        if let Some(v) = rec["python"].as_str().filter(|v| !v.is_empty()) {
            what.push(format!("Python {v}"));
        }
        if let Some(h) = rec["lock_sha256"].as_str() {
            what.push(format!("lock sha256 {}…", &h[..h.len().min(12)]));
        }
        self.end_switch(Ok(format!(
            "[noyau] the kernel restarted in its new environment ({}); variables from before are gone. \
             `%noyau env show` tells what it is, `%noyau env lock` writes noyau.lock.\n",
            what.join(", ")
        )))
        .await;
    }

    /// `EnvFailed`: the build failed; the old kernel runs on.
    pub(crate) async fn switch_failed(&mut self, message: String) {
        if self.switch.is_none() {
            tracing::warn!("environment build failed: {message}");
            return;
        }
        self.end_switch(Err(format!(
            "{message}\nThe kernel was not restarted: it runs on in its previous environment."
        )))
        .await;
    }

    /// Answers the switch's cell, then lets the held cells go.
    async fn end_switch(&mut self, result: Result<String, String>) {
        let Some(sw) = self.switch.take() else { return };
        let result = result.map_err(|e| ("NoyauEnvError", e));
        self.finish_answer(sw.identities, &sw.header, result).await;
        for msg in sw.held {
            // Through the usual path: a held `%noyau env` starts the next switch.
            // Boxed: a held `%noyau env` cell can end a switch in turn.
            if let Some(code) = Box::pin(self.on_frontend_message(Lane::Shell, msg)).await {
                tracing::warn!("a held request asked the proxy to end ({code}); ignored");
            }
        }
    }

    /// The kernel is gone during a switch: its cell and the held ones are
    /// among the requests that fail (`report_death`).
    pub(crate) fn switch_into_pending(&mut self) {
        let Some(sw) = self.switch.take() else { return };
        let cells = std::iter::once((sw.identities, sw.header)).chain(
            sw.held
                .into_iter()
                .map(|m| (m.identities.clone(), m.header.clone())),
        );
        for (identities, header) in cells {
            let id = format!("noyau-env-switch-{}", self.order.len());
            self.order.push_back(id.clone());
            self.pending.insert(
                id,
                crate::Pending {
                    identities,
                    header,
                    msg_type: "execute_request".into(),
                },
            );
        }
    }
}

impl Proxy {
    /// `%noyau env show`: the environment the kernel runs in.
    pub(crate) fn env_show(&self) -> String {
        let Some(record) = &self.env_record else {
            return "[noyau] the kernel runs in its kernelspec's own environment \
                    (no [environment] in ./noyau.toml, no NOYAU_ENV, no `%noyau env SPEC` cell)\n"
                .into();
        };
        let mut shown = record.clone();
        if let Some(o) = shown.as_object_mut() {
            // The full lock and freeze are long; `%noyau env lock` writes them.
            for k in ["lock", "freeze"] {
                if let Some(v) = o.get(k).and_then(|v| v.as_str()) {
                    let n = v.lines().count();
                    o.insert(k.into(), serde_json::Value::String(format!("({n} lines)")));
                }
            }
        }
        format!(
            "{}\n",
            serde_json::to_string_pretty(&shown).unwrap_or_default()
        )
    }

    /// `%noyau env lock`: writes the resolved lock to ./noyau.lock.
    pub(crate) fn env_lock(&self) -> Result<String, String> {
        let lock = self
            .env_record
            .as_ref()
            .and_then(|r| r.get("lock"))
            .and_then(|l| l.as_str())
            .ok_or(
                "this kernel's environment has no lock (no [environment], or a kind without one)",
            )?;
        let path = std::env::current_dir()
            .map_err(|e| e.to_string())?
            .join("noyau.lock");
        let tmp = path.with_extension("lock.tmp");
        std::fs::write(&tmp, lock)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(format!(
            "[noyau] wrote {} ({} lines); `lock_file = \"noyau.lock\"` under [environment] in noyau.toml reproduces it\n",
            path.display(),
            lock.lines().count()
        ))
    }
}

impl Proxy {
    /// The environment of a target's (or a Dask cluster's) jobs, prepared
    /// here before they are submitted: `cell_env` (`%%noyau on T --env`),
    /// else the profile's `environment`, else the notebook kernel's own
    /// (`noyau.toml`, `NOYAU_ENV`); the kernel's data files in every case.
    /// Build lines go to the cell `parent` as they come. (The proxy's loop
    /// waits meanwhile; output of other cells is held in their links.)
    pub(crate) async fn job_env_for(
        &mut self,
        profile: &noyau_config::Profile,
        cell_env: Option<&str>,
        parent: Option<&Bytes>,
    ) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        use anyhow::Context;
        let cwd = std::env::current_dir().context("the kernel's working directory")?;
        let spec = match cell_env.or(profile.environment.as_deref()) {
            Some(e) => noyau_env::sources::merge(&[noyau_env::sources::from_cli(e, &cwd)?], &cwd)?,
            None => noyau_env::sources::for_notebook(
                &cwd,
                None,
                crate::kernel_env_var().as_deref(),
                &cwd,
            )?,
        };
        let declared = noyau_env::sources::Declared {
            spec,
            data: noyau_env::data::declared(&cwd, None, &[])?,
        };
        let mut w = noyau_client::prepare::start(&declared);
        while let Some(line) = w.lines.recv().await {
            tracing::info!("environment: {line}");
            if let Some(p) = parent {
                self.publish_stream(p, "stderr", &format!("noyau: environment: {line}\n"))
                    .await;
            }
        }
        let prepared = w.result().await.context("the target's environment")?;
        Ok(noyau_client::prepare::job_env(
            declared.spec.as_ref(),
            &prepared,
        ))
    }
}
