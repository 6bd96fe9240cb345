//! Cell-level delegation: `%%noyau on TARGET` runs one cell in another
//! kernel, in its own allocation, from the same notebook.
//!
//! A target is a named profile (noyau.toml's `[profiles.NAME]`). The first
//! cell sent to it starts an agent through the profile's backend, exactly as
//! the notebook's own kernel was started; the agent and its kernel stay for
//! the following cells (state persists) until `%noyau release`, an idle
//! timeout, or the notebook kernel's shutdown.
//!
//! The proxy strips the magic line and forwards the cell with its original
//! header, so every reply and output the target's kernel sends is parented
//! to the frontend's request and goes back to it unchanged; only the
//! `content` frame of that one request is rewritten. Each target's link is
//! read by a task of its own that feeds [`TargetEvent`]s to the proxy's loop.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use noyau_client::agent::{start_agent, AgentLaunch};
use noyau_link::envelope::{self, Event, Payload};
use noyau_link::{Incoming, Lane, LinkConfig, LinkEvent, LinkSender};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use noyau_client::magic::{parse, Magic, OnMagic};
pub use noyau_sched::fan_out;

/// What a target's task tells the proxy.
pub struct TargetEvent {
    pub name: String,
    /// Which of the targets ever named `name` it comes from: a released
    /// target still ending must not touch the one that replaced it.
    pub id: u64,
    pub what: What,
}

pub enum What {
    /// The agent dialled in.
    Attached(LinkSender),
    /// A message or event from the target's agent.
    Message(Lane, Payload),
    /// The agent is gone (released, cancelled, died, link lost).
    Ended(String),
    /// The job's state while the agent has not dialled in (also every 10 s).
    Queue(noyau_sched::JobState),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Queued,
    Starting,
    Ready,
    /// Released; its job is being ended. A new cell starts a new target.
    Releasing,
}

pub struct Target {
    pub name: String,
    pub id: u64,
    pub backend: String,
    pub state: State,
    pub job: String,
    pub node: Option<String>,
    pub last_used: Instant,
    /// Cells running there, by msg_id.
    pub running: BTreeMap<String, RunningCell>,
    sender: Option<LinkSender>,
    queued: VecDeque<(Lane, Vec<Bytes>)>,
    /// The queue note in the first cell waiting for this target.
    pub note: Option<crate::queued::Note>,
    pub submitted: Instant,
    release: Option<oneshot::Sender<()>>,
}

/// A cell running on a target, for its where-line and for error replies
/// should the target go away.
pub struct RunningCell {
    pub identities: Vec<Bytes>,
    pub header: Bytes,
    /// The where-line was shown (or is not wanted).
    pub announced: bool,
}

/// The idle time after which a target's allocation is given back.
pub fn idle_timeout() -> Duration {
    std::env::var("NOYAU_TARGET_IDLE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(30 * 60))
}

impl Target {
    /// Submits the target's agent and spawns the tasks that follow it.
    pub async fn start(
        name: &str,
        launch: AgentLaunch,
        events: mpsc::Sender<TargetEvent>,
    ) -> anyhow::Result<Target> {
        let backend = launch.backend.clone();
        let started = start_agent(launch, LinkConfig::default()).await?;
        let job = started.watch.job_id().unwrap_or("?").to_string();
        let (release_tx, release_rx) = oneshot::channel();
        let mut listener = started.listener;
        let mut watch = started.watch;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = name.to_string();
        tokio::spawn(async move {
            let send = |what| {
                events.send(TargetEvent {
                    name: n.clone(),
                    id,
                    what,
                })
            };
            // A dropped sender (the proxy is going away) releases too.
            let mut release_rx = release_rx;
            let mut state = watch.state();
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            let link = loop {
                tokio::select! {
                    l = listener.accept() => break l,
                    desc = watch.ended() => {
                        let _ = send(What::Ended(format!("its agent {desc} before connecting"))).await;
                        return;
                    }
                    _ = &mut release_rx => {
                        watch.cancel().await;
                        let _ = send(What::Ended("released".into())).await;
                        return;
                    }
                    changed = async { match state.as_mut() { Some(rx) => rx.changed().await.is_ok(), None => std::future::pending().await } } => {
                        if !changed {
                            state = None;
                        }
                    }
                    _ = tick.tick() => {}
                }
                if let Some(rx) = &state {
                    let st = rx.borrow().clone();
                    let _ = send(What::Queue(st)).await;
                }
            };
            let mut link = match link {
                Ok(l) => l,
                Err(e) => {
                    let _ = send(What::Ended(format!("its link failed: {e}"))).await;
                    return;
                }
            };
            let _ = send(What::Attached(link.sender())).await;
            let why = loop {
                tokio::select! {
                    m = link.recv() => match m {
                        Some(Incoming::Message(lane, frames)) => match envelope::open(frames) {
                            Ok(p) => { let _ = send(What::Message(lane, p)).await; }
                            Err(e) => tracing::warn!(target = %n, "dropped a malformed link message: {e}"),
                        },
                        Some(Incoming::Event(LinkEvent::Closed(r))) => break format!("its link closed ({r})"),
                        Some(Incoming::Event(e)) => tracing::info!(target = %n, "link: {e:?}"),
                        None => break "its link closed".to_string(),
                    },
                    desc = watch.ended() => break format!("its agent {desc}"),
                    _ = &mut release_rx => {
                        let _ = link.sender().send(Lane::Control, envelope::event(&Event::Shutdown));
                        watch.cancel().await;
                        break "released".to_string();
                    }
                }
            };
            let _ = send(What::Ended(why)).await;
        });
        Ok(Target {
            name: name.to_string(),
            id,
            backend,
            state: State::Queued,
            job,
            node: None,
            last_used: Instant::now(),
            running: BTreeMap::new(),
            sender: None,
            queued: VecDeque::new(),
            note: None,
            submitted: Instant::now(),
            release: Some(release_tx),
        })
    }

    pub fn attach(&mut self, sender: LinkSender) {
        for (lane, frames) in self.queued.drain(..) {
            if let Err(e) = sender.send(lane, frames) {
                tracing::warn!(target = %self.name, "cannot pass a message on: {e}");
            }
        }
        self.sender = Some(sender);
        self.state = State::Starting;
    }

    /// Sends (or keeps until the agent connects) a Jupyter message.
    pub fn send(&mut self, lane: Lane, frames: Vec<Bytes>) {
        let frames = envelope::jupyter(frames);
        match &self.sender {
            Some(s) => {
                if let Err(e) = s.send(lane, frames) {
                    tracing::warn!(target = %self.name, "cannot pass a message on: {e}");
                }
            }
            None => self.queued.push_back((lane, frames)),
        }
    }

    /// Ends the target's job (its task reports `Ended`).
    pub fn release(&mut self) {
        if let Some(r) = self.release.take() {
            let _ = r.send(());
            self.state = State::Releasing;
        }
    }

    pub fn describe_state(&self) -> &'static str {
        match self.state {
            State::Queued => "queued",
            State::Starting => "starting",
            State::Ready if self.running.is_empty() => "idle",
            State::Ready => "busy",
            State::Releasing => "releasing",
        }
    }

    /// The line telling where a cell ran.
    pub fn where_line(&self) -> String {
        format!(
            "[noyau] on target {} ({} job {}{})\n",
            self.name,
            self.backend,
            self.job,
            self.node
                .as_ref()
                .map(|n| format!(", node {n}"))
                .unwrap_or_default()
        )
    }
}

/// The cell's content with its code replaced by `body`.
pub fn with_code(content: &[u8], body: &str) -> Option<Bytes> {
    let mut c: Value = serde_json::from_slice(content).ok()?;
    c.as_object_mut()?
        .insert("code".into(), Value::String(body.to_string()));
    serde_json::to_vec(&c).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_code() {
        let c = br#"{"code":"%%noyau on a\n1","silent":false,"x-unknown":[1]}"#;
        let out: Value = serde_json::from_slice(&with_code(c, "1").unwrap()).unwrap();
        assert_eq!(out["code"], "1");
        assert_eq!(out["x-unknown"], serde_json::json!([1]));
    }
}
