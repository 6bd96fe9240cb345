//! Idle allocations given back: one [`Clock`] for the kernel's own batch
//! job and for each target's, one set of [`Limits`] (`[idle]` in the
//! config files, `NOYAU_KERNEL_IDLE` / `NOYAU_TARGET_IDLE` seconds over
//! them), and the kernel whose job was released ([`Released`]).
//!
//! Activity is what a user does: a cell (from its request to its reply), a
//! request on a comm, a completion or inspection. What the proxy sends by
//! itself (the `noyau` comm's periodic state) and what frontends send when
//! they connect (`kernel_info`, `history`, `comm_info`) are not.
//!
//! A released kernel stays connected: the proxy answers `kernel_info`,
//! `history`, interrupts and shutdowns as it does while a job is queued,
//! and the comm keeps working. The next cell for the kernel submits a new
//! job (same profile, same path as the first start: queue note, busy…)
//! and first says that the variables were lost; a restart starts a new
//! proxy, which submits one too.

use noyau_vars::EnvVars;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use noyau_link::Lane;
use noyau_wire::RawMessage;
use serde_json::{json, Value};

use crate::agent::AgentSide;
use crate::answer::Cell;
use crate::queued::{human, kernel_info_content, Queued};
use crate::relay::Proxy;

/// How often the clocks are looked at (a limit is met within this).
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Since when an allocation has had no activity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    since: Instant,
    since_wall: SystemTime,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            since: Instant::now(),
            since_wall: SystemTime::now(),
        }
    }

    /// Something happened: idle from now.
    pub fn touch(&mut self) {
        *self = Clock::new();
    }

    pub fn idle_for(&self) -> Duration {
        self.since.elapsed()
    }

    pub fn since(&self) -> SystemTime {
        self.since_wall
    }

    /// True when an allocation idle this long is to be given back: a
    /// limit is set, nothing runs there, and the limit has passed.
    pub fn due(&self, limit: Option<Duration>, busy: bool) -> bool {
        limit.is_some_and(|l| !busy && self.idle_for() >= l)
    }
}

/// The idle limits in effect for this kernel (None: never released).
pub(crate) type Limits = noyau_config::IdleLimits;

/// `[idle]` of the config files in effect here, the environment over it;
/// the kernel's own job only on a batch scheduler.
pub(crate) fn limits(backend: &str) -> Limits {
    let files = std::env::current_dir()
        .map_err(|e| e.to_string())
        .and_then(|d| noyau_config::Config::load(&d).map_err(|e| e.to_string()));
    let mut l = match files {
        Ok(c) => c.idle,
        Err(e) => {
            // (the kernel's start read the same files: this is a change since)
            tracing::warn!("idle limits: {e}; using the defaults");
            Limits::default()
        }
    };
    let from_env = |var: &str, into: &mut Option<Duration>| {
        let Ok(v) = std::env::var(var) else { return };
        match parse_seconds(&v) {
            Some(limit) => *into = limit,
            None => tracing::warn!("{var}={v:?} is not a number of seconds or \"off\"; ignored"),
        }
    };
    from_env(EnvVars::NOYAU_KERNEL_IDLE, &mut l.kernel);
    from_env(EnvVars::NOYAU_TARGET_IDLE, &mut l.target);
    decide(l, backend)
}

/// Some(limit) for `off`, `0` or a number of seconds; None for anything else.
fn parse_seconds(v: &str) -> Option<Option<Duration>> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("off") {
        return Some(None);
    }
    let secs = v
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)?;
    Some((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
}

/// The local backend's kernel holds no allocation: never released.
fn decide(mut l: Limits, backend: &str) -> Limits {
    if backend == "local" {
        l.kernel = None;
    }
    l
}

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The kernel's job, given back.
pub(crate) struct Released {
    pub job: String,
    pub at: SystemTime,
    pub after: Duration,
}

impl Released {
    fn when(&self) -> String {
        DateTime::<Utc>::from(self.at)
            .format("%H:%M:%S UTC")
            .to_string()
    }
}

/// The kernel's idle clock, its limits, and its released job.
pub(crate) struct KernelIdle {
    pub limits: Limits,
    pub clock: Clock,
    pub released: Option<Released>,
    /// The last cell sent to the kernel: the release note goes there.
    last_cell: Bytes,
}

impl KernelIdle {
    pub fn new(limits: Limits) -> KernelIdle {
        KernelIdle {
            limits,
            clock: Clock::new(),
            released: None,
            last_cell: Bytes::new(),
        }
    }

    /// A frontend message: a user's action starts the clock again.
    pub fn on_frontend(&mut self, lane: Lane, msg: &RawMessage) {
        let Ok(h) = msg.peek_header() else { return };
        if is_activity(lane, &h.msg_type) {
            self.clock.touch();
        }
        if h.msg_type == "execute_request" {
            self.last_cell = msg.header.clone();
        }
    }

    /// Whether a clock is running that the periodic check must look at.
    pub fn watching(&self) -> bool {
        self.limits.kernel.is_some() && self.released.is_none()
    }

    /// The comm state's `idle`: null when release is off.
    pub fn state(&self, busy: bool) -> Value {
        let Some(limit) = self.limits.kernel else {
            return Value::Null;
        };
        let since = (!busy && self.released.is_none()).then(|| rfc3339(self.clock.since()));
        json!({
            "release_after_s": limit.as_secs(),
            "idle_since": since,
            "released_at": self.released.as_ref().map(|r| rfc3339(r.at)),
            "released_job": self.released.as_ref().map(|r| r.job.clone()),
        })
    }
}

/// What a user does, as opposed to what frontends send when they connect.
fn is_activity(lane: Lane, msg_type: &str) -> bool {
    lane == Lane::Shell
        && matches!(
            msg_type,
            "execute_request"
                | "comm_open"
                | "comm_msg"
                | "comm_close"
                | "complete_request"
                | "inspect_request"
                | "is_complete_request"
        )
}

/// What a request to a released kernel comes to.
pub(crate) enum WhileReleased {
    /// Answered here.
    Answered,
    /// A cell for the kernel: a new job was submitted, it goes on.
    Resubmitted,
    /// A shutdown (restart or not): answered; the proxy ends.
    Exit,
}

impl Proxy {
    /// True when the kernel runs something (a cell, its own or a target's,
    /// an environment switch) or its job has not started.
    fn kernel_busy(&self) -> bool {
        !self.agent.attached()
            || self.requests.running_header().is_some()
            || self.env.preparing()
            || self.targets.map.values().any(|t| !t.running.is_empty())
    }

    /// The periodic check: targets and the kernel idle past their limit
    /// give their jobs back.
    pub async fn release_idle(&mut self) {
        self.targets.release_idle(self.idle.limits.target);
        let busy = self.kernel_busy();
        if self.idle.watching() && self.idle.clock.due(self.idle.limits.kernel, busy) {
            self.release_kernel().await;
        }
    }

    /// The comm state's `idle`.
    pub fn idle_state(&self) -> Value {
        self.idle.state(self.kernel_busy())
    }

    /// Cancels the kernel's job, the proxy staying: the frontend is told,
    /// and the kernel shows idle.
    async fn release_kernel(&mut self) {
        let after = self.idle.clock.idle_for();
        let job = self.agent.job_label();
        tracing::info!(%job, idle = ?after, "the kernel is idle: releasing its job");
        // Nothing of the old agent reaches the notebook after this: its
        // link is closed and its end is not followed (no "kernel died").
        self.agent.release().await;
        // Its Dask cluster served the kernel's client, gone with it.
        let dask = self.magics.dask.is_up();
        if dask {
            self.release_dask("the kernel's job was released while idle")
                .await;
        }
        self.queued = Queued::new(None, &self.cfg.backend, &self.cfg.inner);
        self.comms.usage = None;
        self.comms.running_since = None;
        let r = Released {
            job,
            at: SystemTime::now(),
            after,
        };
        let text = format!(
            "noyau: the kernel was idle for {}: its {} job {} was released at {} to give the allocation back{}. Its variables are gone; the next cell starts a new job.\n",
            human(after.as_secs()),
            self.cfg.backend,
            r.job,
            r.when(),
            if dask { ", and its Dask cluster with it" } else { "" }
        );
        self.idle.released = Some(r);
        let parent = self.idle.last_cell.clone();
        self.out.stream(&parent, "stderr", &text).await;
        self.out.status(&Bytes::new(), "idle").await;
        self.push_state().await;
    }

    /// A request while the kernel's job is released.
    pub async fn while_released(&mut self, lane: Lane, msg: &RawMessage) -> WhileReleased {
        let Ok(h) = msg.peek_header() else {
            return WhileReleased::Answered;
        };
        let content = match (lane, h.msg_type.as_str()) {
            (Lane::Shell, "execute_request") => return self.resubmit(msg).await,
            (_, "kernel_info_request") => self.released_info(),
            (_, "history_request") => json!({"status": "ok", "history": []}),
            (_, "interrupt_request") => json!({"status": "ok"}),
            (_, "shutdown_request") => {
                let restart = msg.restart_requested();
                self.reply(
                    lane,
                    msg,
                    "shutdown_reply",
                    json!({"status": "ok", "restart": restart}),
                )
                .await;
                return WhileReleased::Exit;
            }
            (_, kind) if kind.ends_with("_request") => {
                let text = "the kernel's allocation was released while idle; run a cell to start a new job";
                json!({"status": "error", "ename": "AllocationReleased", "evalue": text, "traceback": [text]})
            }
            // (a widget's comm message: there is no kernel to take it)
            _ => return WhileReleased::Answered,
        };
        let kind = h.msg_type.replace("_request", "_reply");
        self.reply(lane, msg, &kind, content).await;
        WhileReleased::Answered
    }

    fn released_info(&self) -> Value {
        let language = noyau_wire::kernelspec::find(&self.cfg.inner)
            .map(|f| f.spec.language)
            .unwrap_or_else(|_| "python".into());
        let mut c = kernel_info_content(&language, "-");
        c["banner"] = json!(
            "noyau: this kernel's allocation was released while idle; the next cell starts a new job"
        );
        c
    }

    /// busy, the reply, idle: as a kernel answers.
    async fn reply(&mut self, lane: Lane, msg: &RawMessage, kind: &str, content: Value) {
        self.out.status(&msg.header, "busy").await;
        let r = self
            .out
            .message(msg.identities.clone(), kind, &msg.header, content);
        self.out.send(lane, r).await;
        self.out.status(&msg.header, "idle").await;
    }

    /// A cell after the release: a new job, submitted as the first was;
    /// the cell first says that the variables were lost.
    async fn resubmit(&mut self, msg: &RawMessage) -> WhileReleased {
        let Some(r) = self.idle.released.take() else {
            return WhileReleased::Resubmitted;
        };
        self.out.status(&msg.header, "busy").await;
        let agent = match AgentSide::start(&self.cfg).await {
            Ok(a) => a,
            Err(e) => {
                let text = format!("cannot submit a new job for the kernel: {e}");
                tracing::error!("{text}");
                self.idle.released = Some(r);
                let err = noyau_magic::MagicError::Target(text);
                self.out.finish(&Cell::of(msg), Err(err)).await;
                return WhileReleased::Answered;
            }
        };
        self.agent = agent;
        tracing::info!(old = %r.job, new = %self.agent.job_label(), "resubmitted the released kernel's job");
        self.queued = Queued::new(self.agent.job_state(), &self.cfg.backend, &self.cfg.inner);
        if self.comms.any_open() {
            self.comms.follow(self.agent.job_state());
        }
        self.out.exec_count = 0;
        self.idle.clock.touch();
        let text = format!(
            "noyau: the kernel's variables were lost: its {} job {} was released at {} after {} idle. This cell runs in a new kernel process, in a new job ({}).\n",
            self.cfg.backend,
            r.job,
            r.when(),
            human(r.after.as_secs()),
            self.agent.job_label()
        );
        self.out.stream(&msg.header, "stderr", &text).await;
        self.push_state().await;
        WhileReleased::Resubmitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_is_due_only_past_its_limit_and_when_nothing_runs() {
        let mut c = Clock::new();
        c.since -= Duration::from_secs(40);
        let limit = Some(Duration::from_secs(30));
        assert!(c.due(limit, false));
        assert!(!c.due(limit, true), "a running cell is activity");
        assert!(!c.due(None, false), "no limit: never");
        assert!(!c.due(Some(Duration::from_secs(60)), false));
        c.touch();
        assert!(!c.due(limit, false), "touched: idle from now");
    }

    #[test]
    fn the_local_backend_never_releases_the_kernel() {
        let l = Limits {
            kernel: Some(Duration::from_secs(30)),
            target: Some(Duration::from_secs(60)),
        };
        assert_eq!(decide(l, "local").kernel, None);
        assert_eq!(
            decide(l, "local").target,
            l.target,
            "its targets may be batch jobs"
        );
        assert_eq!(decide(l, "slurm"), l);
        assert_eq!(decide(l, "oar"), l);
    }

    #[test]
    fn environment_overrides_are_seconds_or_off() {
        assert_eq!(parse_seconds("30"), Some(Some(Duration::from_secs(30))));
        assert_eq!(parse_seconds("0.5"), Some(Some(Duration::from_millis(500))));
        assert_eq!(parse_seconds("off"), Some(None));
        assert_eq!(parse_seconds("0"), Some(None));
        assert_eq!(parse_seconds("1h"), None);
        assert_eq!(parse_seconds("-3"), None);
    }

    #[test]
    fn only_a_users_actions_are_activity() {
        for kind in ["execute_request", "comm_msg", "complete_request"] {
            assert!(is_activity(Lane::Shell, kind), "{kind}");
        }
        for kind in [
            "kernel_info_request",
            "history_request",
            "comm_info_request",
        ] {
            assert!(!is_activity(Lane::Shell, kind), "{kind}");
        }
        assert!(!is_activity(Lane::Control, "execute_request"));
    }

    #[test]
    fn the_comm_state_says_the_limit_since_when_and_the_release() {
        let off = KernelIdle::new(Limits {
            kernel: None,
            target: None,
        });
        assert_eq!(off.state(false), Value::Null);
        let mut k = KernelIdle::new(Limits {
            kernel: Some(Duration::from_secs(30)),
            target: None,
        });
        let s = k.state(false);
        assert_eq!(s["release_after_s"], 30);
        assert!(
            s["idle_since"].is_string() && s["released_at"].is_null(),
            "{s}"
        );
        assert!(k.state(true)["idle_since"].is_null(), "busy: not idle");
        k.released = Some(Released {
            job: "42".into(),
            at: SystemTime::now(),
            after: Duration::from_secs(31),
        });
        let s = k.state(false);
        assert!(
            s["released_at"].is_string() && s["idle_since"].is_null(),
            "{s}"
        );
        assert_eq!(s["released_job"], "42");
        assert!(!k.watching());
    }
}
