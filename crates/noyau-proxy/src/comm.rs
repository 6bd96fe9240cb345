//! The `noyau` comm (docs/comm.md, the contract): the proxy answers it
//! itself, while the job waits as while it runs, and the inner kernel
//! never sees it. The [`Comms`] component holds the open comms, the last
//! usage sample and the requests whose answer is on its way; the state it
//! sends is built from the proxy's other components ([`state`]), and the
//! frontend's requests are carried out through their seams ([`actions`]).

mod actions;
mod state;

pub(crate) use state::rfc3339;

use noyau_vars::EnvVars;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use noyau_link::envelope::{self, Event, UsageSample};
use noyau_link::Lane;
use noyau_sched::JobState;
use noyau_wire::RawMessage;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::relay::Proxy;

/// The comm's target name.
pub(crate) const TARGET: &str = "noyau";
/// How often usage is sampled (and a `state` sent) while a comm is open.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);
/// A comm not heard from this long is closed (its frontend went away
/// without `comm_close`: a tab closed, a browser crashed). The extension
/// pings every 30 s; five periods leave room for a background tab's
/// throttled timers (once a minute in Chromium).
const EXPIRE_AFTER: Duration = Duration::from_secs(150);
/// A scheduler that could not say whether this user may extend the job is
/// asked again this long after, while a comm is open.
const EXTEND_RETRY: Duration = Duration::from_secs(60);
/// At most this many noyau comms per kernel: a new one beyond expires the
/// one heard from least recently.
const MAX_OPEN: usize = 8;

pub(crate) enum CommEvent {
    /// The job's state changed, or what the kernel may do for it
    /// ([`Comms::can_extend`]): a new state for every comm.
    JobChanged,
    Done(Done),
    /// A comm's frontend went silent for too long.
    Expired(String),
    /// Time to ask the scheduler again whether this user may extend
    /// ([`EXTEND_RETRY`] after it could not say).
    AskExtend,
}

/// One open noyau comm.
struct Open {
    /// The `comm_open`'s header: the parent of the states sent unasked.
    header: Bytes,
    /// When its frontend last sent anything on it.
    heard: Instant,
}

/// A request carried out away from the relay loop (a scheduler command, a
/// file read): what to send when it is done.
pub(crate) struct Done {
    /// The request's header: the parent of what follows.
    pub parent: Bytes,
    pub comm_id: String,
    pub id: Value,
    /// `log` messages' texts, sent before the reply.
    pub logs: Vec<String>,
    pub ok: bool,
    pub message: String,
}

pub(crate) struct Comms {
    /// Open comms by id.
    open: BTreeMap<String, Open>,
    /// How long a silent comm stays open ([`EXPIRE_AFTER`]).
    expire_after: Duration,
    /// The agent's last sample.
    pub usage: Option<UsageSample>,
    /// `comm_info_request`s forwarded to the kernel (msg_id → the target
    /// asked for): their replies get the noyau comms too.
    info: HashMap<String, Option<String>>,
    /// The job's state, followed while a comm is open (taken from the
    /// agent's watcher when the first comm opens).
    job: Option<watch::Receiver<JobState>>,
    /// When the job was first seen running (the scheduler does not say).
    pub running_since: Option<String>,
    /// Whether the scheduler lets this user extend the job (`can.extend`):
    /// false until it answered, asked away from the relay loop when the
    /// first comm opens (the answer is kept by noyau-sched).
    pub can_extend: bool,
    /// Its answer on the way (None: it could not be asked).
    extend_rx: Option<oneshot::Receiver<Option<bool>>>,
    /// When it last could not be asked: asked again [`EXTEND_RETRY`] after.
    extend_failed: Option<Instant>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
}

impl Comms {
    pub fn new() -> Comms {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Comms {
            open: BTreeMap::new(),
            expire_after: expire_after(),
            usage: None,
            info: HashMap::new(),
            job: None,
            running_since: None,
            can_extend: false,
            extend_rx: None,
            extend_failed: None,
            done_tx,
            done_rx,
        }
    }

    /// Follows another job (the kernel's job was resubmitted).
    pub fn follow(&mut self, job: Option<watch::Receiver<JobState>>) {
        self.job = job;
    }

    pub fn any_open(&self) -> bool {
        !self.open.is_empty()
    }

    /// True for what a frontend sends on the `noyau` comm by itself, with
    /// no user behind it: the comm's opening and closing (a notebook tab
    /// opened or closed) and its `ping`s and `refresh`es. Not activity:
    /// a tab left open must not keep an idle job.
    pub fn automatic(&self, kind: &str, msg: &RawMessage) -> bool {
        // Widgets' comm messages pass here: with no noyau comm open only an
        // opening can be one, and their `data` is read only for ours.
        let opening = kind == "comm_open";
        if !kind.starts_with("comm_") || (!opening && !self.any_open()) {
            return false;
        }
        let Ok(c) = serde_json::from_slice::<CommIds>(&msg.content) else {
            return false;
        };
        match kind {
            "comm_open" => c.target_name.as_deref() == Some(TARGET),
            "comm_close" => self.open.contains_key(&c.comm_id),
            "comm_msg" if self.open.contains_key(&c.comm_id) => {
                serde_json::from_slice::<CommData>(&msg.content)
                    .is_ok_and(|d| matches!(d.data["action"].as_str(), Some("ping" | "refresh")))
            }
            _ => false,
        }
    }

    /// The next thing to tell the frontends: the job's state changed
    /// (followed while a comm is open), or a request finished away from the loop.
    pub async fn next(&mut self) -> CommEvent {
        let follow = self.any_open();
        // Only the instant here (next runs once per relayed message): the
        // comm's id is looked up when it expires.
        let expires = (self.open.values().map(|o| o.heard).min()).map(|h| h + self.expire_after);
        let mut retry = self.extend_retry_at();
        loop {
            tokio::select! {
                Some(d) = self.done_rx.recv() => return CommEvent::Done(d),
                () = tokio::time::sleep_until(expires.unwrap_or_else(Instant::now)), if expires.is_some() => {
                    return CommEvent::Expired(self.most_silent().map(|s| s.0).unwrap_or_default());
                }
                () = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {
                    return CommEvent::AskExtend;
                }
                can = async { match self.extend_rx.as_mut() { Some(rx) => rx.await.ok().flatten(), None => std::future::pending().await } }, if self.extend_rx.is_some() => {
                    self.extend_rx = None;
                    if self.extend_answered(can, Instant::now()) {
                        return CommEvent::JobChanged;
                    }
                    // A scheduler that could not say is asked again from
                    // here, not only once another event restarts `next`.
                    retry = self.extend_retry_at();
                }
                changed = async { match self.job.as_mut() { Some(rx) => rx.changed().await.is_ok(), None => std::future::pending().await } }, if follow => {
                    if changed {
                        return CommEvent::JobChanged;
                    }
                    // The watcher is gone: nothing more to follow.
                    self.job = None;
                }
            }
        }
    }

    /// The scheduler's answer to [`Proxy::ask_extend`] (None: it could not
    /// say, asked again later): whether `can_extend` changed.
    fn extend_answered(&mut self, can: Option<bool>, now: Instant) -> bool {
        let Some(can) = can else {
            self.extend_failed = Some(now);
            return false;
        };
        tracing::info!(offered = can, "walltime extension asked of the scheduler");
        self.extend_failed = None;
        std::mem::replace(&mut self.can_extend, can) != can
    }

    /// When to ask the scheduler again whether this user may extend: it
    /// could not say, no answer is on its way, and a comm is open.
    fn extend_retry_at(&self) -> Option<Instant> {
        match (self.any_open(), &self.extend_rx, self.extend_failed) {
            (true, None, Some(failed)) => Some(failed + EXTEND_RETRY),
            _ => None,
        }
    }

    /// The comm heard from least recently, and when.
    fn most_silent(&self) -> Option<(String, Instant)> {
        (self.open.iter())
            .min_by_key(|(_, o)| o.heard)
            .map(|(id, o)| (id.clone(), o.heard))
    }

    /// Its frontend spoke on comm `id` (false: no such noyau comm).
    fn heard(&mut self, id: &str) -> bool {
        self.open
            .get_mut(id)
            .map(|o| o.heard = Instant::now())
            .is_some()
    }

    /// The `comms` of a `comm_info_reply` to a forwarded request, with the
    /// noyau comms added (the message must be re-signed after).
    pub fn merge_info(&mut self, msg: &mut RawMessage) {
        if self.info.is_empty() {
            return;
        }
        let Some(parent) = msg.parent_msg_id() else {
            return;
        };
        let Some(target) = self.info.remove(&parent) else {
            return;
        };
        let Ok(mut content) = serde_json::from_slice::<Value>(&msg.content) else {
            return;
        };
        // The kernel's reply is the notebook's code's to shape: anything but
        // an object is passed on as it came (indexing it would panic).
        let Some(fields) = content.as_object_mut() else {
            return;
        };
        let comms = fields.entry("comms").or_insert_with(|| json!({}));
        if !comms.is_object() {
            *comms = json!({});
        }
        if let Some(comms) = comms.as_object_mut() {
            comms.extend(self.listed(target.as_deref()));
        }
        if let Ok(bytes) = serde_json::to_vec(&content) {
            msg.content = bytes.into();
        }
    }

    /// The noyau comms as `comm_info_reply` lists them, if `target` asks for them.
    fn listed(&self, target: Option<&str>) -> serde_json::Map<String, Value> {
        if target.is_some_and(|t| t != TARGET) {
            return serde_json::Map::new();
        }
        (self.open.keys())
            .map(|id| (id.clone(), json!({"target_name": TARGET})))
            .collect()
    }
}

/// Which comm a frontend's comm message is for (its `data` is skipped:
/// widgets' messages, often large, pass through here).
#[derive(serde::Deserialize)]
struct CommIds {
    comm_id: String,
    target_name: Option<String>,
}

/// A noyau comm message's request.
#[derive(serde::Deserialize)]
struct CommData {
    #[serde(default)]
    data: Value,
}

impl Proxy {
    /// A comm message (`kind`) from the frontend: taken (None) when it is
    /// the noyau comm's, else given back for the kernel.
    pub async fn on_comm(&mut self, kind: &str, msg: RawMessage) -> Option<RawMessage> {
        if kind == "comm_info_request" {
            return self.comm_info(msg).await;
        }
        // With no noyau comm open, only an opening one can be ours.
        if kind != "comm_open" && !self.comms.any_open() {
            return Some(msg);
        }
        let Ok(c) = serde_json::from_slice::<CommIds>(&msg.content) else {
            return Some(msg);
        };
        match kind {
            "comm_open" if c.target_name.as_deref() == Some(TARGET) => {
                self.comm_open(&msg, c.comm_id).await;
            }
            "comm_msg" if self.comms.heard(&c.comm_id) => {
                self.out.status(&msg.header, "busy").await;
                let data = serde_json::from_slice::<CommData>(&msg.content)
                    .map(|d| d.data)
                    .unwrap_or_default();
                self.comm_request(msg.header.clone(), c.comm_id, data).await;
            }
            "comm_close" if self.comms.open.contains_key(&c.comm_id) => {
                self.out.status(&msg.header, "busy").await;
                self.comms.open.remove(&c.comm_id);
                tracing::info!(comm = %c.comm_id, "noyau comm closed");
                self.comms_left().await;
                self.comm_idle(&msg.header).await;
            }
            _ => return Some(msg),
        }
        None
    }

    async fn comm_open(&mut self, msg: &RawMessage, comm_id: String) {
        self.out.status(&msg.header, "busy").await;
        tracing::info!(comm = %comm_id, "noyau comm opened");
        let first = !self.comms.any_open();
        while self.comms.open.len() >= MAX_OPEN {
            let Some((oldest, _)) = self.comms.most_silent() else {
                break;
            };
            tracing::info!(comm = %oldest, "more than {MAX_OPEN} noyau comms: the most silent one is closed");
            self.expire(&oldest).await;
        }
        let open = Open {
            header: msg.header.clone(),
            heard: Instant::now(),
        };
        self.comms.open.insert(comm_id.clone(), open);
        if first {
            self.comms.job = self.agent.job_state();
            self.ask_usage();
            self.ask_extend();
        }
        let state = self.comm_state().await;
        self.comm_send(&msg.header, &comm_id, state).await;
        self.comm_idle(&msg.header).await;
    }

    /// Closes comm `id`, whose frontend went silent: a `comm_close` tells
    /// it (data `reason: expired`: a frontend still there opens a new one).
    pub async fn expire(&mut self, id: &str) {
        let Some(o) = self.comms.open.remove(id) else {
            return;
        };
        tracing::info!(comm = %id, "noyau comm not heard from for {:?}: closed", self.comms.expire_after);
        let content = json!({"comm_id": id, "data": {"reason": "expired"}});
        self.out.iopub("comm_close", &o.header, content).await;
        self.comms_left().await;
    }

    /// A comm went: with none left, usage is no longer sampled.
    async fn comms_left(&mut self) {
        if !self.comms.any_open() {
            self.ask_usage();
        }
    }

    /// Answered here while the kernel cannot (queued, starting); else
    /// forwarded, and its reply gets the noyau comms ([`Comms::merge_info`]).
    async fn comm_info(&mut self, msg: RawMessage) -> Option<RawMessage> {
        let target = serde_json::from_slice::<Value>(&msg.content)
            .ok()
            .and_then(|c| c["target_name"].as_str().map(str::to_string));
        if self.agent.attached() {
            let id = msg.peek_header().ok()?.msg_id;
            self.comms.info.insert(id, target);
            return Some(msg);
        }
        self.out.status(&msg.header, "busy").await;
        let content = json!({"status": "ok", "comms": self.comms.listed(target.as_deref())});
        let reply = self.out.message(
            msg.identities.clone(),
            "comm_info_reply",
            &msg.header,
            content,
        );
        self.out.send(Lane::Shell, reply).await;
        self.comm_idle(&msg.header).await;
        None
    }

    /// Idle after a comm request; a queued kernel then says again what it
    /// is doing (busy while a cell waits).
    async fn comm_idle(&mut self, parent: &Bytes) {
        self.out.status(parent, "idle").await;
        if !self.agent.attached() && self.queued.queued() {
            self.queued.own_status(&mut self.out).await;
        } else if let Some(cell) = self.requests.running_header() {
            // A cell still runs: the frontend and the server's culler must
            // not take that idle for the kernel's.
            self.out.status(&cell, "busy").await;
        }
    }

    /// Whether this user may extend the job ([`Comms::can_extend`]): known
    /// at once where the scheduler needs not ask (OAR) or already did,
    /// else asked away from the loop; asked again [`EXTEND_RETRY`] after
    /// the scheduler could not say ([`CommEvent::AskExtend`]). True when
    /// the answer came at once and changed `can.extend`.
    pub fn ask_extend(&mut self) -> bool {
        if self.cfg.backend == "local" || self.comms.extend_rx.is_some() {
            return false;
        }
        let Ok(sched) = noyau_sched::Scheduler::named(&self.cfg.backend) else {
            return false;
        };
        let mut ask = Box::pin(async move {
            match sched.users_extend().await {
                Ok(can) => Some(can),
                Err(why) => {
                    tracing::info!("cannot tell whether the scheduler lets this user extend the job (asked again in {EXTEND_RETRY:?}): {why}");
                    None
                }
            }
        });
        let mut now = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(can) = std::future::Future::poll(ask.as_mut(), &mut now) {
            return self.comms.extend_answered(can, Instant::now());
        }
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(ask.await);
        });
        self.comms.extend_rx = Some(rx);
        false
    }

    /// Tells the agent to sample usage while a comm is open, or to stop.
    pub fn ask_usage(&mut self) {
        let interval_ms = match self.comms.any_open() {
            true => INTERVAL.as_millis() as u64,
            false => 0,
        };
        if let Some(s) = self.agent.sender() {
            let ev = Event::SampleUsage { interval_ms };
            if let Err(e) = s.send(Lane::Control, envelope::event(&ev)) {
                tracing::warn!("link: {e}");
            }
        }
    }

    /// A `comm_msg` on the noyau comm, from the kernel, parented to `parent`.
    async fn comm_send(&mut self, parent: &Bytes, comm_id: &str, data: Value) {
        let content = json!({"comm_id": comm_id, "data": data});
        self.out.iopub("comm_msg", parent, content).await;
    }

    /// Sends the state to every open comm (something changed, or a sample came).
    pub async fn push_state(&mut self) {
        self.push_state_for(None).await;
    }

    /// The same; the comm of a request (`answering`: its id and the
    /// request's header) gets it as part of that request's answer.
    async fn push_state_for(&mut self, answering: Option<(&str, &Bytes)>) {
        if !self.comms.any_open() {
            return;
        }
        let state = self.comm_state().await;
        let open: Vec<(String, Bytes)> = (self.comms.open.iter())
            .map(|(id, o)| match answering {
                Some((a, parent)) if a == id => (id.clone(), parent.clone()),
                _ => (id.clone(), o.header.clone()),
            })
            .collect();
        for (id, parent) in open {
            self.comm_send(&parent, &id, state.clone()).await;
        }
    }

    /// A request finished away from the loop: its log, the state, the reply, idle.
    pub async fn on_done(&mut self, mut d: Done) {
        for text in std::mem::take(&mut d.logs) {
            let log = json!({"type": "log", "request": d.id, "text": text});
            self.comm_send(&d.parent, &d.comm_id, log).await;
        }
        if d.ok {
            self.push_state_for(Some((&d.comm_id, &d.parent))).await;
        }
        self.comm_reply(d).await;
    }

    /// A request's reply, then idle.
    async fn comm_reply(&mut self, d: Done) {
        let reply = json!({"type": "reply", "request": d.id, "ok": d.ok, "message": d.message});
        self.comm_send(&d.parent, &d.comm_id, reply).await;
        self.comm_idle(&d.parent).await;
    }
}

/// [`EXPIRE_AFTER`], or [`EnvVars::NOYAU_COMM_EXPIRE`]'s seconds when it is a positive number.
fn expire_after() -> Duration {
    match noyau_vars::seconds(EnvVars::NOYAU_COMM_EXPIRE) {
        None => EXPIRE_AFTER,
        Some(Ok(d)) if !d.is_zero() => d,
        Some(_) => {
            tracing::warn!(
                "{} is not a positive number of seconds: noyau comms expire after {EXPIRE_AFTER:?}",
                EnvVars::NOYAU_COMM_EXPIRE
            );
            EXPIRE_AFTER
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_to(parent: &str, content: &str) -> RawMessage {
        RawMessage {
            identities: vec![],
            signature: Bytes::new(),
            header: Bytes::from_static(b"{}"),
            parent_header: Bytes::from(format!(r#"{{"msg_id":"{parent}"}}"#)),
            metadata: Bytes::from_static(b"{}"),
            content: Bytes::from(content.to_string()),
            buffers: vec![],
        }
    }

    /// A scheduler that could not say is asked again a minute later while
    /// a comm is open; its answer ends the retries.
    #[test]
    fn a_failed_extend_probe_is_asked_again_while_a_comm_is_open() {
        let mut comms = Comms::new();
        let t0 = Instant::now();
        assert!(!comms.extend_answered(None, t0));
        assert_eq!(comms.extend_retry_at(), None, "no comm open");
        let open = Open {
            header: Bytes::new(),
            heard: t0,
        };
        comms.open.insert("c".into(), open);
        assert_eq!(comms.extend_retry_at(), Some(t0 + EXTEND_RETRY));
        let (_tx, rx) = oneshot::channel();
        comms.extend_rx = Some(rx);
        assert_eq!(comms.extend_retry_at(), None, "an answer on its way");
        comms.extend_rx = None;
        assert!(comms.extend_answered(Some(true), t0 + EXTEND_RETRY));
        assert!(comms.can_extend);
        assert_eq!(comms.extend_retry_at(), None, "answered");
        assert!(!comms.extend_answered(Some(true), t0 + EXTEND_RETRY));
    }

    /// The retry is armed by the answer that could not say, even when no
    /// other event comes while `next` waits.
    #[tokio::test(start_paused = true)]
    async fn next_asks_again_after_a_failed_probe_answered_while_it_waits() {
        let mut comms = Comms::new();
        comms.expire_after = EXTEND_RETRY * 10;
        let open = Open {
            header: Bytes::new(),
            heard: Instant::now(),
        };
        comms.open.insert("c".into(), open);
        let (tx, rx) = oneshot::channel();
        comms.extend_rx = Some(rx);
        tx.send(None).unwrap();
        let next = tokio::time::timeout(EXTEND_RETRY * 2, comms.next()).await;
        assert!(matches!(next, Ok(CommEvent::AskExtend)), "no retry armed");
    }

    #[test]
    fn only_the_noyau_comms_opening_closing_pings_and_refreshes_are_automatic() {
        let mut comms = Comms::new();
        let on = |content: &str| reply_to("p", content);
        let open = on(r#"{"comm_id":"c","target_name":"noyau","data":{}}"#);
        assert!(comms.automatic("comm_open", &open));
        let widget_open = on(r#"{"comm_id":"w","target_name":"jupyter.widget","data":{}}"#);
        assert!(!comms.automatic("comm_open", &widget_open));
        let heard = Instant::now();
        comms.open.insert(
            "c".into(),
            Open {
                header: Bytes::new(),
                heard,
            },
        );
        for (action, automatic) in [
            ("ping", true),
            ("refresh", true),
            ("release", false),
            ("log", false),
        ] {
            let m = on(&format!(
                r#"{{"comm_id":"c","data":{{"id":"r","action":"{action}"}}}}"#
            ));
            assert_eq!(comms.automatic("comm_msg", &m), automatic, "{action}");
        }
        let widget = on(r#"{"comm_id":"w","data":{"action":"ping"}}"#);
        assert!(
            !comms.automatic("comm_msg", &widget),
            "another comm's message"
        );
        assert!(comms.automatic("comm_close", &on(r#"{"comm_id":"c","data":{}}"#)));
        assert!(!comms.automatic("execute_request", &on(r#"{"code":""}"#)));
    }

    #[test]
    fn a_kernels_comm_info_reply_of_any_shape_is_merged_or_left_alone() {
        let mut c = Comms::new();
        let open = Open {
            header: Bytes::from_static(b"{}"),
            heard: Instant::now(),
        };
        c.open.insert("n1".into(), open);
        // What notebook code may make its kernel answer: never a panic.
        for odd in ["[1, 2]", "\"x\"", "3", "null", "{\"comms\": [1]}"] {
            c.info.insert("p".into(), None);
            let mut m = reply_to("p", odd);
            c.merge_info(&mut m);
            if odd.starts_with('{') {
                let v: Value = serde_json::from_slice(&m.content).unwrap();
                assert_eq!(v["comms"]["n1"]["target_name"], "noyau", "{v}");
            } else {
                assert_eq!(&m.content[..], odd.as_bytes());
            }
        }
        c.info.insert("p".into(), None);
        let mut m = reply_to("p", r#"{"status":"ok","comms":{"k1":{"target_name":"w"}}}"#);
        c.merge_info(&mut m);
        let v: Value = serde_json::from_slice(&m.content).unwrap();
        assert_eq!(v["comms"]["k1"]["target_name"], "w");
        assert_eq!(v["comms"]["n1"]["target_name"], "noyau");
    }
}
