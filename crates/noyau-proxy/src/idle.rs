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
use chrono::{DateTime, Utc};
use noyau_link::Lane;
use noyau_wire::RawMessage;
use serde_json::{json, Value};

use crate::agent::AgentSide;
use crate::answer::Cell;
use crate::comm::rfc3339;
use crate::queued::{human, kernel_info_content, Queued};
use crate::relay::Proxy;

/// What a request that needs the released kernel is told.
const RELEASED: &str =
    "the kernel's allocation was released while idle; run a cell to start a new job";

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
    /// limit is set and has passed (a busy allocation's clock is kept at
    /// now by the periodic check).
    pub fn due(&self, limit: Option<Duration>) -> bool {
        limit.is_some_and(|l| self.idle_for() >= l)
    }
}

/// The idle limits in effect for this kernel (None: never released).
pub(crate) type Limits = noyau_config::IdleLimits;

/// `[idle]` of the config files in effect here, the environment over it;
/// the kernel's own job only on a batch scheduler.
pub(crate) fn limits(backend: &str) -> Limits {
    let files = noyau_trust::anchor::ProjectDir::cwd()
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
        match parse_limit(&v) {
            Some(limit) => *into = limit,
            None => tracing::warn!("{var}={v:?} is not a number of seconds or \"off\"; ignored"),
        }
    };
    from_env(EnvVars::NOYAU_KERNEL_IDLE, &mut l.kernel);
    from_env(EnvVars::NOYAU_TARGET_IDLE, &mut l.target);
    decide(l, backend)
}

/// An override's limit: none for `off` or `0`, else its seconds (read as
/// every NOYAU_* variable of seconds is); None when it is neither.
fn parse_limit(v: &str) -> Option<Option<Duration>> {
    if v.trim().eq_ignore_ascii_case("off") {
        return Some(None);
    }
    noyau_vars::parse_seconds(v).map(|d| (!d.is_zero()).then_some(d))
}

/// The local backend's kernel holds no allocation: never released.
fn decide(mut l: Limits, backend: &str) -> Limits {
    if backend == "local" {
        l.kernel = None;
    }
    l
}

/// The kernel's job, given back.
pub(crate) struct Released {
    pub job: String,
    pub at: SystemTime,
    pub after: Duration,
}

/// `t` as the notes say it.
pub(crate) fn clock_time(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).format("%H:%M:%S UTC").to_string()
}

impl Released {
    fn when(&self) -> String {
        clock_time(self.at)
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

    /// A frontend message: a user's action starts the clock again;
    /// `automatic` is the `noyau` comm's own traffic (its opening, pings
    /// and refreshes), which a frontend sends with no user behind it.
    pub fn on_frontend(&mut self, lane: Lane, kind: &str, msg: &RawMessage, automatic: bool) {
        let execute = kind == "execute_request";
        // (only an execution's content is read: a silent one is not a user's)
        if !automatic && is_activity(lane, kind) && !(execute && is_silent(msg)) {
            self.clock.touch();
        }
        if execute {
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

/// A `silent` execution: a frontend's or an extension's own code (a
/// variable inspector's), not a user's cell.
fn is_silent(msg: &RawMessage) -> bool {
    #[derive(serde::Deserialize)]
    struct Silent {
        #[serde(default)]
        silent: bool,
    }
    serde_json::from_slice::<Silent>(&msg.content).is_ok_and(|c| c.silent)
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
    /// an environment or data change, a `dask up` waiting for its jobs, a
    /// request of the proxy's own such as a push or pull) or its job has
    /// not started.
    fn kernel_busy(&self) -> bool {
        !self.agent.attached()
            || self.requests.running_header().is_some()
            || self.env.changing()
            || self.magics.dask.starting()
            || !self.own.is_empty()
            || self.targets.map.values().any(|t| !t.running.is_empty())
    }

    /// The periodic check: targets and the kernel idle past their limit
    /// give their jobs back. While the kernel is busy its clock is kept at
    /// now: idle time counts from the end of a busy time (a cell, a queue
    /// wait), never from before it.
    pub async fn release_idle(&mut self) {
        for (name, after) in self.targets.release_idle(self.idle.limits.target) {
            let text = format!(
                "noyau: target {name} was idle for {}: its job was released at {} to give the allocation back. Its variables are gone; the next `%%noyau on {name}` cell starts a new job.\n",
                human(after.as_secs()),
                clock_time(SystemTime::now())
            );
            let parent = self.idle.last_cell.clone();
            self.out.stream(&parent, "stderr", &text).await;
        }
        if !self.idle.watching() {
            return;
        }
        if self.kernel_busy() {
            self.idle.clock.touch();
        } else if self.idle.clock.due(self.idle.limits.kernel) {
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
        // Nothing waiting for the old kernel is left without an answer.
        self.fail_open("AllocationReleased", RELEASED).await;
        self.own = Default::default();
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
            (Lane::Shell, "execute_request") if !is_silent(msg) => return self.resubmit(msg).await,
            (_, "is_complete_request") => json!({"status": "unknown"}),
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
                json!({"status": "error", "ename": "AllocationReleased", "evalue": RELEASED, "traceback": [RELEASED]})
            }
            // (a widget's comm message: there is no kernel to take it)
            _ => return WhileReleased::Answered,
        };
        let kind = h.msg_type.replace("_request", "_reply");
        self.reply(lane, msg, &kind, content).await;
        WhileReleased::Answered
    }

    /// What the released job had from `%noyau env` and `%noyau data`
    /// (the new job has none of it), forgotten once said.
    fn changes_lost(&mut self) -> String {
        let done = std::mem::take(&mut self.env.done);
        if done.is_empty() {
            return String::new();
        }
        let what: Vec<&str> = done.into_iter().collect();
        format!(
            " The new job starts with the profile's environment and none of what {} did in the old one: run those cells again.",
            what.join(" and ")
        )
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
        // The new kernel counts from 1: so do the notebook's numbers.
        (self.out.exec_count, self.out.delegated) = (0, 0);
        self.idle.clock.touch();
        let lost = self.changes_lost();
        let text = format!(
            "noyau: the kernel's variables were lost: its {} job {} was released at {} after {} idle. This cell runs in a new kernel process, in a new job ({}).{}\n",
            self.cfg.backend,
            r.job,
            r.when(),
            human(r.after.as_secs()),
            self.agent.job_label(),
            lost
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
    fn a_clock_is_due_only_past_its_limit() {
        let mut c = Clock::new();
        c.since -= Duration::from_secs(40);
        let limit = Some(Duration::from_secs(30));
        assert!(c.due(limit));
        assert!(!c.due(None), "no limit: never");
        assert!(!c.due(Some(Duration::from_secs(60))));
        c.touch();
        assert!(!c.due(limit), "touched (as while busy): idle from now");
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
    fn environment_overrides_are_seconds_or_off_and_never_panic() {
        let cases: [(&str, Option<Option<Duration>>); 8] = [
            ("30", Some(Some(Duration::from_secs(30)))),
            ("0.5", Some(Some(Duration::from_millis(500)))),
            ("off", Some(None)),
            ("0", Some(None)),
            ("1h", None),
            ("-3", None),
            ("1e20", None),
            ("inf", None),
        ];
        for (v, want) in cases {
            assert_eq!(parse_limit(v), want, "{v}");
        }
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

    fn request(kind: &str, content: &str) -> RawMessage {
        RawMessage {
            identities: vec![],
            signature: Bytes::new(),
            header: Bytes::from(format!(r#"{{"msg_id":"m","msg_type":"{kind}"}}"#)),
            parent_header: Bytes::from_static(b"{}"),
            metadata: Bytes::from_static(b"{}"),
            content: Bytes::from(content.to_string()),
            buffers: vec![],
        }
    }

    #[test]
    fn silent_executions_and_automatic_comm_traffic_leave_the_clock() {
        let mut k = KernelIdle::new(Limits {
            kernel: Some(Duration::from_secs(30)),
            target: None,
        });
        let old = Instant::now() - Duration::from_secs(40);
        k.clock.since = old;
        let silent = request("execute_request", r#"{"code":"1","silent":true}"#);
        k.on_frontend(Lane::Shell, "execute_request", &silent, false);
        assert_eq!(k.clock.since, old, "a silent execution is not a user's");
        let ping = request("comm_msg", r#"{"comm_id":"c","data":{"action":"ping"}}"#);
        k.on_frontend(Lane::Shell, "comm_msg", &ping, true);
        assert_eq!(k.clock.since, old, "the noyau comm's automatic traffic");
        let widget = request("comm_msg", r#"{"comm_id":"w","data":{"method":"update"}}"#);
        k.on_frontend(Lane::Shell, "comm_msg", &widget, false);
        assert!(k.clock.since > old, "a widget's message is activity");
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
