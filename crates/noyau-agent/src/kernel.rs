//! One real kernel under the agent: started from its kernelspec with ipc
//! sockets in the agent's private directory, checked ready before anything
//! is relayed to it, and read by one task per channel that verifies each
//! message with the kernel's key and passes it on unchanged.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::StreamExt;
use nix::sys::signal::Signal;
use noyau_client::process::{expand_argv, ExitDescription, KernelProcess};
use noyau_client::sockets::{to_zmq, KernelSockets};
use noyau_link::{envelope::Event, Lane};
use noyau_wire::kernelspec::FoundSpec;
use noyau_wire::{build, ConnectionInfo, RawMessage, Signer};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use zeromq::{DealerSendHalf, Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

use crate::outbox::Outbox;

/// How long a kernel may take from exec to answering kernel_info.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Messages the agent sent itself (readiness probes); their replies and
/// statuses are not the frontend's business.
type Probes = Arc<Mutex<ProbeSet>>;

/// The probes whose replies or statuses may still come. Once the last
/// probe's reply and its `idle` have passed, every earlier probe's have
/// too (the kernel answers in order and each channel is ordered), and the
/// set is emptied: from then on no message's parent header is read for it.
#[derive(Default)]
struct ProbeSet {
    ids: HashSet<String>,
    /// The last probe sent, and whether its reply and its idle were seen.
    last: Option<(String, bool, bool)>,
}

impl ProbeSet {
    fn sent(&mut self, id: &str) {
        self.ids.insert(id.to_string());
        self.last = Some((id.to_string(), false, false));
    }

    /// True for a reply or status answering one of our probes (it is
    /// noted: an `idle` ends the probe).
    fn take(&mut self, lane: Lane, msg: &RawMessage) -> bool {
        if self.ids.is_empty() {
            return false;
        }
        let Some(p) = msg.parent_msg_id().filter(|p| self.ids.contains(p)) else {
            return false;
        };
        let idle = lane == Lane::Iopub && memchr::memmem::find(&msg.content, b"\"idle\"").is_some();
        let last = self.last.as_mut().filter(|(id, ..)| *id == p);
        match last {
            Some((_, reply, done)) => {
                *reply |= lane == Lane::Shell;
                *done |= idle;
                if *reply && *done {
                    self.ids.clear();
                }
            }
            None if idle => {
                self.ids.remove(&p);
            }
            None => {}
        }
        true
    }
}

pub struct Kernel {
    process: KernelProcess,
    signer: Signer,
    session: String,
    shell: DealerSendHalf,
    control: DealerSendHalf,
    stdin: DealerSendHalf,
    readers: Vec<JoinHandle<()>>,
    ends: Ends,
    interrupt_by_message: bool,
    /// The kernel leads a session of its own inside a sandbox: SIGINT goes
    /// to that session's group, not to the one we made.
    own_session: bool,
    pub kernel_info: Value,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
        let _ = self.process.signal(Signal::SIGKILL);
    }
}

pub struct Launch<'a> {
    pub spec: &'a FoundSpec,
    pub dir: &'a std::path::Path,
    pub generation: u32,
    pub signer: &'a Signer,
    pub key: &'a str,
    pub session: &'a str,
    pub outbox: Arc<Outbox>,
    /// The environment the kernel runs in (noyau-env wraps its command).
    pub env: Option<&'a noyau_env::Realised>,
}

impl Kernel {
    pub async fn start(l: Launch<'_>) -> anyhow::Result<Kernel> {
        let mut info = ConnectionInfo::new_ipc(l.dir, Some(l.spec.name.clone()));
        // A fresh socket name per launch: a killed kernel leaves its files behind.
        info.ip = l
            .dir
            .join(format!("k{}", l.generation))
            .to_string_lossy()
            .into_owned();
        info.key = l.key.to_string();
        let cf = l.dir.join(format!("kernel-{}.json", l.generation));
        info.write(&cf)?;
        let argv = expand_argv(&l.spec.spec.argv, &cf, &l.spec.dir);
        let mut env: BTreeMap<String, String> = l.spec.spec.env.clone();
        let mut argv = argv;
        if let Some(r) = l.env {
            (argv, env) = r.command(&argv, &env, l.dir)?;
        }
        let mut process = KernelProcess::launch(&argv, &env, None)?;
        tracing::info!(pid = process.pid(), argv = ?argv, "kernel started");

        let sockets = tokio::select! {
            s = KernelSockets::connect(&info, READY_TIMEOUT) => s.context("connecting to the kernel")?,
            d = process.wait() => bail!("the kernel {d} before it opened its sockets (command: {})", argv.join(" ")),
        };
        let KernelSockets {
            mut shell,
            mut control,
            mut stdin,
            mut iopub,
        } = sockets;
        let monitors = vec![
            shell.monitor(),
            control.monitor(),
            stdin.monitor(),
            iopub.monitor(),
        ];
        let (mut shell_tx, mut shell_rx) = shell.split();
        let (control_tx, control_rx) = control.split();
        let (stdin_tx, stdin_rx) = stdin.split();

        let probes: Probes = Arc::default();
        let ready = wait_ready(
            &mut shell_tx,
            &mut shell_rx,
            &mut iopub,
            l.signer,
            l.session,
            &probes,
        );
        let kernel_info = tokio::select! {
            r = tokio::time::timeout(READY_TIMEOUT, ready) => r
                .map_err(|_| anyhow::anyhow!("the kernel did not answer kernel_info within {}s", READY_TIMEOUT.as_secs()))??,
            d = process.wait() => bail!("the kernel {d} while starting (command: {})", argv.join(" ")),
        };

        let activity = Arc::new(Activity::new());
        let reader = |lane: Lane, probes: Probes| Reader {
            lane,
            signer: l.signer.clone(),
            outbox: l.outbox.clone(),
            probes,
            activity: activity.clone(),
        };
        let readers = vec![
            tokio::spawn(reader(Lane::Shell, probes.clone()).run(shell_rx)),
            tokio::spawn(reader(Lane::Control, Probes::default()).run(control_rx)),
            tokio::spawn(reader(Lane::Stdin, Probes::default()).run(stdin_rx)),
            tokio::spawn(reader(Lane::Iopub, probes).run(iopub)),
        ];
        Ok(Kernel {
            process,
            signer: l.signer.clone(),
            session: l.session.to_string(),
            shell: shell_tx,
            control: control_tx,
            stdin: stdin_tx,
            readers,
            ends: Ends::new(monitors, activity),
            interrupt_by_message: l.spec.spec.interrupt_by_message(),
            own_session: l.env.is_some_and(noyau_env::Realised::own_session),
            kernel_info,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Re-signs a frontend message with the kernel's key and sends it.
    pub async fn send(&mut self, lane: Lane, mut msg: RawMessage) {
        self.signer.resign(&mut msg);
        let Some(z) = to_zmq(msg.into_frames()) else {
            return;
        };
        let socket = match lane {
            Lane::Shell => &mut self.shell,
            Lane::Control => &mut self.control,
            Lane::Stdin => &mut self.stdin,
            Lane::Iopub => return,
        };
        if let Err(e) = socket.send(z).await {
            tracing::warn!(?lane, "sending to the kernel failed: {e}");
        }
    }

    /// Interrupts the kernel the way its kernelspec asks: by forwarding the
    /// request, or by SIGINT to its process group and answering ourselves.
    pub async fn interrupt(&mut self, request: RawMessage, outbox: &Outbox) {
        if self.interrupt_by_message {
            self.send(Lane::Control, request).await;
            return;
        }
        let sent = if self.own_session {
            self.process.signal_inner_session(Signal::SIGINT)
        } else {
            self.process.signal(Signal::SIGINT)
        };
        let status = match sent {
            Ok(()) => json!({"status": "ok"}),
            Err(e) => json!({"status": "error", "ename": "InterruptError",
                "evalue": format!("could not signal the kernel: {e}"), "traceback": []}),
        };
        let reply = build::message(
            &self.signer,
            request.identities.clone(),
            "interrupt_reply",
            &self.session,
            &request.header,
            status,
        );
        outbox.jupyter(Lane::Control, reply.into_frames());
    }

    /// Waits for the kernel to end, then for its last messages: each
    /// channel has its own reader, and a reply still in a socket buffer when
    /// the process exits must reach the frontend before the news of the death.
    pub async fn wait(&mut self) -> ExitDescription {
        let d = self.process.wait().await;
        self.ends.drained().await;
        d
    }

    pub async fn kill(&mut self) -> ExitDescription {
        self.process.kill().await
    }

    pub fn ready_event(&self) -> Event {
        Event::KernelReady {
            pid: self.pid(),
            kernel_info: self.kernel_info.clone(),
        }
    }
}

/// Sends kernel_info requests until the kernel answers one and IOPub shows
/// we are subscribed (a status for one of our probes, or the kernel's
/// `iopub_welcome`). Until then a frontend's first outputs could be lost.
async fn wait_ready(
    shell_tx: &mut DealerSendHalf,
    shell_rx: &mut zeromq::DealerRecvHalf,
    iopub: &mut zeromq::SubSocket,
    signer: &Signer,
    session: &str,
    probes: &Probes,
) -> anyhow::Result<Value> {
    let mut reply: Option<Value> = None;
    let mut subscribed = false;
    let mut last_probe = String::new();
    while reply.is_none() || !subscribed {
        if reply.is_none() || !subscribed {
            let probe = build::message(
                signer,
                vec![],
                "kernel_info_request",
                session,
                &Bytes::new(),
                json!({}),
            );
            last_probe = probe.peek_header()?.msg_id;
            probes.lock().expect("probes").sent(&last_probe);
            let z = to_zmq(probe.into_frames()).expect("non-empty");
            shell_tx
                .send(z)
                .await
                .context("sending kernel_info_request")?;
        }
        let deadline = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                // A forged or malformed message is dropped, as later on: it
                // must not fail the kernel's start.
                m = shell_rx.recv() => {
                    let Some(m) = verified(m.context("kernel shell socket")?, signer, Lane::Shell) else {
                        continue;
                    };
                    let is_last = m.parent_msg_id().as_deref() == Some(last_probe.as_str());
                    probes.lock().expect("probes").take(Lane::Shell, &m);
                    if is_last {
                        let content: Value = serde_json::from_slice(&m.content)?;
                        reply = Some(content);
                    }
                }
                m = iopub.recv() => {
                    let Some(m) = verified(m.context("kernel iopub socket")?, signer, Lane::Iopub) else {
                        continue;
                    };
                    let ty = m.peek_header()?.msg_type;
                    let ours = probes.lock().expect("probes").take(Lane::Iopub, &m);
                    if ty == "iopub_welcome" || ours {
                        subscribed = true;
                    }
                }
                _ = &mut deadline => break,
            }
            if reply.is_some() && subscribed {
                break;
            }
        }
    }
    Ok(reply.expect("loop ends with a reply"))
}

fn verified(frames: ZmqMessage, signer: &Signer, lane: Lane) -> Option<RawMessage> {
    let msg = match RawMessage::from_frames(frames.into_vec()) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(?lane, "dropped a malformed message from the kernel: {e}");
            return None;
        }
    };
    if let Err(e) = signer.verify(&msg) {
        tracing::warn!(?lane, "dropped a message from the kernel: {e}");
        return None;
    }
    Some(msg)
}

/// Reads one of the kernel's channels: each message is checked with the
/// kernel's key and passed on unchanged, except what answers the agent's
/// own readiness probes and the kernel's IOPub welcome (the proxy greets its
/// own subscribers).
struct Reader {
    lane: Lane,
    signer: Signer,
    outbox: Arc<Outbox>,
    probes: Probes,
    activity: Arc<Activity>,
}

impl Reader {
    async fn run<S: SocketRecv>(self, mut rx: S) {
        while let Ok(frames) = rx.recv().await {
            self.activity.touch();
            let Some(msg) = verified(frames, &self.signer, self.lane) else {
                continue;
            };
            let agents_own = (self.lane == Lane::Iopub
                && memchr::memmem::find(&msg.header, b"\"iopub_welcome\"").is_some())
                || self.probes.lock().expect("probes").take(self.lane, &msg);
            if !agents_own {
                self.outbox.jupyter(self.lane, msg.into_frames());
            }
        }
    }
}

impl Kernel {
    /// SIGKILL to the kernel's process group, without waiting.
    pub fn kill_group(&self) -> std::io::Result<()> {
        self.process.signal(Signal::SIGKILL)
    }
}

/// When a reader last got a message from the kernel.
struct Activity {
    base: std::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: std::time::Instant::now(),
            last_ms: Default::default(),
        }
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since a reader last got a message (or since the start).
    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// The ends of the kernel's side of the agent's sockets: a monitor of each
/// socket, which reports the kernel's side closing (`Disconnected`) when
/// the socket's reader reads past the last message that came before: by
/// then that reader has passed each of them on.
///
/// The wait is one branch of the agent's main loop, dropped and built
/// again whenever another branch fires: what it saw is kept here (a
/// monitor is dropped in the poll that reads its end, the clock starts
/// once), never in the future.
struct Ends {
    monitors: Vec<mpsc::Receiver<SocketEvent>>,
    activity: Arc<Activity>,
    exited: Option<std::time::Instant>,
}

impl Ends {
    /// A socket the kernel's exit does not close (held by a process it
    /// left behind) never ends: given up once no reader got anything for
    /// this long since the exit.
    const STALE: Duration = Duration::from_secs(2);

    fn new(monitors: Vec<mpsc::Receiver<SocketEvent>>, activity: Arc<Activity>) -> Self {
        Ends {
            monitors,
            activity,
            exited: None,
        }
    }

    /// Waits until every socket has seen the kernel's side close.
    /// Cancel-safe.
    async fn drained(&mut self) {
        let exited = *self.exited.get_or_insert_with(std::time::Instant::now);
        loop {
            let quiet = self.activity.quiet_for().min(exited.elapsed());
            if quiet >= Self::STALE {
                tracing::warn!(
                    "a socket of the kernel's stayed open after its exit, with nothing on it for {} s; going on",
                    Self::STALE.as_secs()
                );
                self.monitors.clear();
                return;
            }
            let monitors = &mut self.monitors;
            tokio::select! {
                () = std::future::poll_fn(|cx| Self::poll_ended(monitors, cx)) => return,
                () = tokio::time::sleep(Self::STALE - quiet) => {}
            }
        }
    }

    /// Reads every monitor's waiting events, dropping each monitor whose
    /// socket ended (or whose socket is gone); ready once none is left.
    fn poll_ended(
        monitors: &mut Vec<mpsc::Receiver<SocketEvent>>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        monitors.retain_mut(|m| loop {
            match m.poll_next_unpin(cx) {
                Poll::Ready(Some(SocketEvent::Disconnected(_)) | None) => break false,
                Poll::Ready(Some(_)) => {}
                Poll::Pending => break true,
            }
        });
        if monitors.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// `spec` with `--HistoryManager.hist_file=FILE` added when it runs
/// ipykernel and does not set the history file itself, as nbclient adds it
/// to the kernels it starts (`:memory:` by default): kernels sharing one
/// `history.sqlite` on a shared filesystem lock each other out.
pub fn with_hist_file(mut spec: FoundSpec, file: Option<&str>) -> FoundSpec {
    let argv = &mut spec.spec.argv;
    let ipykernel = argv.iter().any(|a| a.contains("ipykernel"));
    let set = argv
        .iter()
        .any(|a| a.starts_with("--HistoryManager.hist_file"));
    if let (Some(file), true, false) = (file, ipykernel, set) {
        argv.push(format!("--HistoryManager.hist_file={file}"));
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's last messages still wait in the agent's socket when
    /// its exit is seen, and their reader is held up (by the probes' lock,
    /// which another thread holds a while): the wait for the kernel's end
    /// returns only once every one of them was passed on. (A wait for a
    /// quiet spell, as before, returned with none of them passed on.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_end_waits_for_every_message_sent_before_it() {
        const N: usize = 50;
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("ipc://{}", dir.path().join("shell").display());
        let mut kernel = zeromq::RouterSocket::new();
        kernel.bind(&endpoint).await.unwrap();
        let mut shell = zeromq::DealerSocket::new();
        let monitors = vec![shell.monitor()];
        shell.connect(&endpoint).await.unwrap();
        shell.send(ZmqMessage::from("hello")).await.unwrap();
        let id = kernel.recv().await.unwrap().get(0).unwrap().clone();
        let signer = Signer::new(b"key");
        for i in 0..N {
            let content = json!({ "i": i });
            let m = build::message(&signer, vec![], "stream", "s", &Bytes::new(), content);
            let mut z = to_zmq(m.into_frames()).unwrap();
            z.push_front(id.clone());
            kernel.send(z).await.unwrap();
        }
        drop(kernel); // the kernel exits
        let probes: Probes = Arc::default();
        let (locked_tx, locked) = std::sync::mpsc::channel();
        let held = probes.clone();
        let holder = std::thread::spawn(move || {
            let _held = held.lock().unwrap();
            locked_tx.send(()).unwrap();
            // the reader is held up (the fault), far longer than a quiet spell
            std::thread::sleep(Duration::from_millis(300));
        });
        locked.recv().unwrap();
        let outbox = Outbox::new(signer.clone(), "s".into(), usize::MAX);
        let activity = Arc::new(Activity::new());
        let reader = Reader {
            lane: Lane::Shell,
            signer,
            outbox: outbox.clone(),
            probes,
            activity: activity.clone(),
        };
        tokio::spawn(reader.run(shell.split().1));
        Ends::new(monitors, activity).drained().await;
        assert_eq!(outbox.waiting(), N);
        holder.join().unwrap();
    }

    /// The wait for the sockets' ends is dropped after it read one
    /// socket's end (another branch of the agent's loop fired) and built
    /// again: it still knows that socket ended, and returns as soon as the
    /// other one does. (Before, the end read by the dropped wait was lost,
    /// and the new one waited for it again until it gave up.)
    #[tokio::test]
    async fn an_end_read_by_a_dropped_wait_is_not_lost() {
        use futures::FutureExt;
        let (mut shell, shell_monitor) = mpsc::channel(4);
        let (mut iopub, iopub_monitor) = mpsc::channel(4);
        let mut ends = Ends::new(
            vec![shell_monitor, iopub_monitor],
            Arc::new(Activity::new()),
        );
        let end = || SocketEvent::Disconnected(zeromq::util::PeerIdentity::new());
        shell.try_send(end()).unwrap();
        assert!(ends.drained().now_or_never().is_none());
        iopub.try_send(end()).unwrap();
        assert!(ends.drained().now_or_never().is_some());
    }

    fn spec(argv: &[&str]) -> FoundSpec {
        let json = serde_json::json!({"argv": argv, "display_name": "k", "language": "python"});
        FoundSpec {
            name: "k".into(),
            dir: "/k".into(),
            spec: serde_json::from_value(json).unwrap(),
        }
    }

    #[test]
    fn hist_file_goes_to_ipykernel_only_and_never_twice() {
        let ipy = [
            "python",
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
        ];
        let argv = with_hist_file(spec(&ipy), Some(":memory:")).spec.argv;
        assert_eq!(argv.last().unwrap(), "--HistoryManager.hist_file=:memory:");
        assert_eq!(with_hist_file(spec(&ipy), None).spec.argv, ipy);
        let own = [
            "python",
            "-m",
            "ipykernel",
            "--HistoryManager.hist_file=/h.sqlite",
        ];
        assert_eq!(with_hist_file(spec(&own), Some(":memory:")).spec.argv, own);
        let ir = [
            "R",
            "--slave",
            "-e",
            "IRkernel::main()",
            "--args",
            "{connection_file}",
        ];
        assert_eq!(with_hist_file(spec(&ir), Some(":memory:")).spec.argv, ir);
    }
}

#[cfg(test)]
mod probe_tests {
    use super::*;

    fn reply_and_statuses(s: &Signer, probe: &RawMessage) -> [RawMessage; 3] {
        let parent = &probe.header;
        [
            build::message(s, vec![], "kernel_info_reply", "k", parent, json!({})),
            build::status(s, "k", parent, "busy"),
            build::status(s, "k", parent, "idle"),
        ]
    }

    /// Probe traffic is taken, others' is not, and once the last probe's
    /// reply and idle have passed no message is looked at any more.
    #[test]
    fn probes_are_forgotten_after_the_last_ones_reply_and_idle() {
        let s = Signer::new(b"k");
        let probe = |_| {
            build::message(
                &s,
                vec![],
                "kernel_info_request",
                "a",
                &Bytes::new(),
                json!({}),
            )
        };
        let (first, last) = (probe(1), probe(2));
        let mut set = ProbeSet::default();
        for p in [&first, &last] {
            set.sent(&p.peek_header().unwrap().msg_id);
        }
        let cell = build::message(&s, vec![], "execute_request", "f", &Bytes::new(), json!({}));
        let [_, _, cell_idle] = reply_and_statuses(&s, &cell);
        assert!(!set.take(Lane::Iopub, &cell_idle));
        let [r1, busy1, idle1] = reply_and_statuses(&s, &first);
        assert!(set.take(Lane::Shell, &r1) && set.take(Lane::Iopub, &busy1));
        assert!(set.take(Lane::Iopub, &idle1));
        let [r2, busy2, idle2] = reply_and_statuses(&s, &last);
        assert!(set.take(Lane::Iopub, &busy2) && set.take(Lane::Iopub, &idle2));
        assert!(
            !set.ids.is_empty(),
            "the last probe's reply has not passed yet"
        );
        assert!(set.take(Lane::Shell, &r2));
        assert!(set.ids.is_empty());
        assert!(!set.take(Lane::Iopub, &idle2));
    }
}
