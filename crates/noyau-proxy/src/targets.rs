//! Cell-level delegation: `%%noyau on TARGET` runs one cell in another
//! kernel, in its own allocation, from the same notebook. The proxy's
//! [`Targets`] component.
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
use noyau_client::agent::{start_agent, AgentLaunch, AgentWatch, StartError};
use noyau_link::envelope::{self, Event, Payload};
use noyau_link::{Incoming, Lane, LinkConfig, LinkEvent, LinkListener, LinkSender};
use noyau_magic::note::Note;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

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
    /// Its job as its scheduler's watcher sees it (none on the local
    /// backend), for the `noyau` comm.
    pub job_state: Option<tokio::sync::watch::Receiver<noyau_sched::JobState>>,
    /// Since when it has had no cell (the kernel's idle clock, [`crate::idle`]).
    pub idle: crate::idle::Clock,
    /// Cells running there, by msg_id.
    pub running: BTreeMap<String, RunningCell>,
    sender: Option<LinkSender>,
    queued: VecDeque<(Lane, Vec<Bytes>)>,
    /// The queue note in the first cell waiting for this target.
    pub note: Option<(Bytes, Note)>,
    pub submitted: Instant,
    release: Option<oneshot::Sender<()>>,
}

/// A cell running on a target, for its where-line and for error replies
/// should the target go away. It stays in the table until both its
/// execute_reply and its IOPub `idle` have come: the link sends shell ahead
/// of IOPub, so the reply may overtake the cell's execute_input, which
/// still needs the cell's count and where-line.
pub struct RunningCell {
    pub cell: crate::answer::Cell,
    /// The where-line was shown (or is not wanted).
    pub announced: bool,
    /// The notebook's execution count given to the cell.
    count: Option<i64>,
    /// Run silently: it takes no count.
    silent: bool,
    /// Its execute_reply has gone to the frontend.
    pub replied: bool,
    /// Its IOPub `idle` has come.
    idle: bool,
}

impl RunningCell {
    pub fn new(cell: crate::answer::Cell, announced: bool, silent: bool) -> RunningCell {
        RunningCell {
            cell,
            announced,
            count: None,
            silent,
            replied: false,
            idle: false,
        }
    }

    /// The notebook's count for the cell's message (None for a message
    /// that shows none): the first of the cell's messages that `counts`
    /// (its execute_input, or an execute_reply of a cell that ran) takes
    /// it from `next`, and every later message shows the same.
    pub fn count(&mut self, counts: bool, next: impl FnOnce() -> i64) -> Option<i64> {
        if self.count.is_none() && counts && !self.silent {
            self.count = Some(next());
        }
        self.count
    }

    /// Notes the cell's reply (`by_reply`) or its IOPub idle; true once
    /// both have come (the cell is over).
    fn ended(&mut self, by_reply: bool) -> bool {
        if by_reply {
            self.replied = true;
        } else {
            self.idle = true;
        }
        self.replied && self.idle
    }
}

impl Target {
    /// Submits the target's agent and spawns the task that follows it
    /// (its handle: that task ends the job once released).
    pub async fn start(
        name: &str,
        launch: AgentLaunch,
        events: mpsc::Sender<TargetEvent>,
    ) -> Result<(Target, JoinHandle<()>), StartError> {
        let backend = launch.backend.clone();
        let started = start_agent(launch, LinkConfig::default()).await?;
        let job = started.watch.job_id().unwrap_or("?").to_string();
        let (release_tx, release_rx) = oneshot::channel();
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tell = Tell {
            events,
            name: name.to_string(),
            id,
        };
        let job_state = started.watch.state();
        let task = tokio::spawn(follow(tell, started.listener, started.watch, release_rx));
        let target = Target {
            name: name.to_string(),
            id,
            backend,
            state: State::Queued,
            job,
            node: None,
            job_state,
            idle: crate::idle::Clock::new(),
            running: BTreeMap::new(),
            sender: None,
            queued: VecDeque::new(),
            note: None,
            submitted: Instant::now(),
            release: Some(release_tx),
        };
        Ok((target, task))
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
            State::Ready if !self.busy() => "idle",
            State::Ready => "busy",
            State::Releasing => "releasing",
        }
    }

    /// Notes cell `msg_id`'s reply (`by_reply`) or its IOPub idle: the
    /// cell leaves the table once both have come.
    pub fn cell_ended(&mut self, msg_id: &str, by_reply: bool) {
        if let Some(c) = self.running.get_mut(msg_id) {
            if c.ended(by_reply) {
                self.running.remove(msg_id);
            }
        }
    }

    /// Cell `msg_id`'s execute_input: the cells replied before it are
    /// over, even if an idle of theirs was lost (the kernel's IOPub comes
    /// in order).
    pub fn cell_started(&mut self, msg_id: &str) {
        self.running.retain(|id, c| id == msg_id || !c.replied);
    }

    /// A cell of the notebook waits for this target's reply.
    pub fn busy(&self) -> bool {
        self.running.values().any(|c| !c.replied)
    }

    /// The line telling where a cell ran.
    pub fn where_line(&self) -> String {
        noyau_magic::targets::where_line(&self.name, &self.backend, &self.job, self.node.as_deref())
    }

    pub fn row(&self) -> noyau_magic::targets::Row {
        noyau_magic::targets::Row {
            name: self.name.clone(),
            state: self.describe_state(),
            backend: self.backend.clone(),
            job: self.job.clone(),
            node: self.node.clone(),
            idle_secs: self.idle.idle_for().as_secs(),
        }
    }
}

/// How a target's task reports.
struct Tell {
    events: mpsc::Sender<TargetEvent>,
    name: String,
    id: u64,
}

impl Tell {
    async fn send(&self, what: What) {
        let ev = TargetEvent {
            name: self.name.clone(),
            id: self.id,
            what,
        };
        let _ = self.events.send(ev).await;
    }
}

/// A target's task: waits for its agent (reporting the job's state), then
/// reads its link until it ends or is released. A dropped release sender
/// (the proxy going away) releases too.
async fn follow(
    tell: Tell,
    mut listener: LinkListener,
    mut watch: AgentWatch,
    mut release: oneshot::Receiver<()>,
) {
    let mut state = watch.state();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let link = loop {
        tokio::select! {
            l = listener.accept() => break l,
            desc = watch.ended() => {
                return tell.send(What::Ended(format!("its agent {desc} before connecting"))).await;
            }
            _ = &mut release => {
                watch.cancel().await;
                return tell.send(What::Ended("released".into())).await;
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
            tell.send(What::Queue(st)).await;
        }
    };
    let mut link = match link {
        Ok(l) => l,
        Err(e) => {
            return tell
                .send(What::Ended(format!("its link failed: {e}")))
                .await
        }
    };
    tell.send(What::Attached(link.sender())).await;
    let why = loop {
        tokio::select! {
            m = link.recv() => match m {
                Some(Incoming::Message(lane, frames)) => match envelope::open(frames) {
                    Ok(p) => tell.send(What::Message(lane, p)).await,
                    Err(e) => tracing::warn!(target = %tell.name, "dropped a malformed link message: {e}"),
                },
                Some(Incoming::Event(LinkEvent::Closed(r))) => break format!("its link closed ({r})"),
                Some(Incoming::Event(e)) => tracing::info!(target = %tell.name, "link: {e:?}"),
                None => break "its link closed".to_string(),
            },
            desc = watch.ended() => break format!("its agent {desc}"),
            _ = &mut release => {
                let _ = link.sender().send(Lane::Control, envelope::event(&Event::Shutdown));
                watch.cancel().await;
                break "released".to_string();
            }
        }
    };
    tell.send(What::Ended(why)).await;
}

/// The cell's content with its code replaced by `body`.
pub fn with_code(content: &[u8], body: &str) -> Option<Bytes> {
    let mut c: Value = serde_json::from_slice(content).ok()?;
    c.as_object_mut()?
        .insert("code".into(), Value::String(body.to_string()));
    serde_json::to_vec(&c).ok().map(Bytes::from)
}

/// The targets of this notebook, by name, and where their tasks report.
pub(crate) struct Targets {
    pub map: BTreeMap<String, Target>,
    /// Targets released while idle, and when: the next cell that starts
    /// one again says that its variables were lost.
    pub idle_released: BTreeMap<String, std::time::SystemTime>,
    tx: mpsc::Sender<TargetEvent>,
    rx: mpsc::Receiver<TargetEvent>,
    /// The tasks of the targets started (a released one's too, gone from
    /// `map` while its job ends), that [`Targets::end_all`] waits for.
    tasks: Vec<JoinHandle<()>>,
}

impl Default for Targets {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(1024);
        Targets {
            map: BTreeMap::new(),
            idle_released: BTreeMap::new(),
            tx,
            rx,
            tasks: Vec::new(),
        }
    }
}

impl Targets {
    /// The next event of any target's task.
    pub async fn event(&mut self) -> Option<TargetEvent> {
        self.rx.recv().await
    }

    /// Starts target `name` from its profile, unless it runs.
    pub async fn start(
        &mut self,
        name: &str,
        (backend, profile): (String, noyau_config::Profile),
        inner: &str,
        noyau_exe: &std::path::Path,
        env: BTreeMap<String, String>,
    ) -> Result<(), noyau_magic::MagicError> {
        if self.map.contains_key(name) {
            return Ok(());
        }
        let err = |e: &dyn std::fmt::Display| {
            noyau_magic::MagicError::Target(format!("cannot start target {name:?}: {e}"))
        };
        let launch = AgentLaunch {
            backend,
            inner: profile.kernel.clone().unwrap_or_else(|| inner.to_string()),
            link_bind: None,
            link_advertise: None,
            noyau_exe: noyau_exe.to_path_buf(),
            job_name: format!("noyau-target-{name}"),
            cwd: None,
            env,
            profile,
        };
        let (t, task) = Target::start(name, launch, self.tx.clone())
            .await
            .map_err(|e| err(&e))?;
        tracing::info!(target = %name, job = %t.job, "target submitted");
        self.map.insert(name.to_string(), t);
        self.tasks.retain(|t| !t.is_finished());
        self.tasks.push(task);
        Ok(())
    }

    pub fn releasing(&self, name: &str) -> bool {
        self.map
            .get(name)
            .is_some_and(|t| t.state == State::Releasing)
    }

    /// Gives back the allocations of targets idle past `limit` (`[idle]
    /// target`, [`crate::idle::limits`]): their names and idle times. A
    /// busy target's clock is kept at now (idle from the end of its cells
    /// or of its queue wait).
    pub fn release_idle(
        &mut self,
        limit: Option<std::time::Duration>,
    ) -> Vec<(String, std::time::Duration)> {
        let mut released = Vec::new();
        for t in self.map.values_mut() {
            if t.state == State::Releasing {
                continue;
            }
            if t.busy() || matches!(t.state, State::Queued | State::Starting) {
                t.idle.touch();
            } else if t.idle.due(limit) {
                let after = t.idle.idle_for();
                tracing::info!(target = %t.name, "idle for {after:?}; releasing");
                t.release();
                self.idle_released
                    .insert(t.name.clone(), std::time::SystemTime::now());
                released.push((t.name.clone(), after));
            }
        }
        released
    }

    /// Ends every target's job (shutdown, or the proxy going away).
    pub fn release_all(&mut self) {
        for t in self.map.values_mut() {
            t.release();
        }
    }

    /// The proxy's end: ends every target's job and waits, at most
    /// `bound`, until each target's task has ended. A released target's
    /// job is cancelled by its task, which the runtime's end would drop,
    /// killing the cancel's command: the job would then be left to its
    /// agent, which ends only when it gives up redialling. The targets'
    /// events are no longer read: the channel is closed first, so that no
    /// task waits for room in it.
    pub async fn end_all(&mut self, bound: Duration) {
        self.release_all();
        self.rx.close();
        let tasks = std::mem::take(&mut self.tasks);
        let all = async {
            for task in tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(bound, all).await.is_err() {
            tracing::warn!(
                "a target's job was not ended within {} s; leaving it to its agent, which ends when it finds no proxy",
                bound.as_secs()
            );
        }
    }

    /// `%noyau targets`.
    pub fn table(&self) -> String {
        let rows: Vec<_> = self.map.values().map(Target::row).collect();
        noyau_magic::targets::table(&rows)
    }

    /// An interrupt goes to the targets running a cell (a queued one is
    /// cancelled); false when none is busy (it goes to the notebook's kernel).
    pub fn interrupt(&mut self, frames: &[Bytes]) -> bool {
        let mut any = false;
        for t in self.map.values_mut().filter(|t| t.busy()) {
            any = true;
            if t.state == State::Queued {
                // Interrupting a cell that waits for its job cancels the job.
                t.release();
            } else {
                t.send(Lane::Control, frames.to_vec());
            }
        }
        any
    }
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

    /// A cell as a target runs it, `silent` or not.
    fn cell(silent: bool) -> RunningCell {
        let msg = noyau_wire::RawMessage::from_frames(vec![
            Bytes::from_static(b"<IDS|MSG>"),
            Bytes::new(),
            Bytes::from_static(br#"{"msg_id":"a","msg_type":"execute_request"}"#),
            Bytes::from_static(b"{}"),
            Bytes::from_static(b"{}"),
            Bytes::from_static(b"{}"),
        ])
        .unwrap();
        RunningCell::new(crate::answer::Cell::of(&msg), false, silent)
    }

    #[test]
    fn a_reply_ahead_of_its_input_takes_the_count_once() {
        let mut c = cell(false);
        let mut taken = 0;
        let mut next = || {
            taken += 1;
            7
        };
        assert_eq!(c.count(false, &mut next), None, "a status");
        assert_eq!(c.count(true, &mut next), Some(7), "its reply");
        assert!(!c.ended(true), "the cell's IOPub is still to come");
        assert_eq!(c.count(true, &mut next), Some(7), "its execute_input");
        assert_eq!(c.count(false, &mut next), Some(7), "its execute_result");
        assert!(c.ended(false));
        assert_eq!(taken, 1);
    }

    #[test]
    fn a_silent_cell_takes_no_count() {
        let mut c = cell(true);
        assert_eq!(c.count(true, || panic!("a silent cell took a count")), None);
    }

    #[test]
    fn a_cell_is_over_after_its_reply_and_its_idle_in_either_order() {
        let mut c = cell(false);
        assert!(!c.ended(false), "idle before the reply: not over");
        assert!(c.ended(true));
        assert!(c.replied);
    }
}
