//! Byte streams over a link, for the hub: the hub opens one stream per HTTP
//! connection it forwards, the agent connects each to the Jupyter server's
//! unix socket on the node. WebSocket traffic is just bytes after the HTTP
//! upgrade, so the tunnel needs no knowledge of HTTP.
//!
//! Every tunnel message travels on one lane ([`TUNNEL_LANE`]), so an `Open`
//! always arrives before its stream's data, and the link's per-lane ordering
//! keeps each stream's bytes in order. A message is two frames: a 9-byte
//! header (operation, stream id) and the payload.
//!
//! Flow control: the link reads every stream's bytes off one connection, so
//! a stream whose reader stalls (a browser tab that stops reading a kernel's
//! WebSocket) would queue without bound in the receiver. Each stream
//! therefore has a window of [`WINDOW`] bytes: the sender waits for credit
//! before sending more, and the receiver grants credit (`Credit`) as its
//! local reader consumes. The hub opens every stream with a `credit`
//! payload, and its agent must say `"credit": true` in its hello (the hub
//! refuses one that does not): the agent runs in the user's job, so the
//! window must not be the agent's to turn off.
//!
//! The receiving side holds a hostile peer to its limits: data beyond a
//! stream's window, or more than [`MAX_QUEUED`] bytes waiting on all
//! streams together, is a [`Delivered::Violation`], after which the caller
//! closes the link; so is an empty `Data` message (an honest sender never
//! sends one, and it would cost the receiver memory while counting as no
//! bytes). What a stream receives is copied into one buffer per stream
//! rather than queued as messages, so its memory is the bytes it counts:
//! no cost per message, and no slice keeping the link's read buffer it was
//! cut from alive (a 1-byte message would otherwise pin 32 KiB or more).
//! At most [`MAX_STREAMS`] streams are open at once; and
//! a link that carries a tunnel needs frames of at most [`MAX_FRAME`]
//! bytes (every message holds at most 64 KiB of a stream), which the hub
//! sets as its links' `LinkConfig::max_frame`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{Notify, Semaphore};

use crate::{Lane, LinkError, LinkSender};

/// The lane all tunnel messages use (one lane keeps `Open` before `Data`).
pub const TUNNEL_LANE: Lane = Lane::Shell;
/// The lane of the agent's `Hello` and notices, ahead of bulk data.
pub const NOTICE_LANE: Lane = Lane::Control;

/// Bytes read from a stream per message.
const CHUNK: usize = 64 * 1024;
/// Bytes a stream may have in flight (sent and not yet consumed).
pub const WINDOW: usize = 1024 * 1024;
/// Buffer room each of a stream's two receive buffers keeps once written
/// out (at rest, 256 KiB a stream, 32 MiB for a tunnel's 128 streams).
const KEEP: usize = 2 * CHUNK;
/// Credit is granted back once this much has been consumed.
const GRANT: usize = WINDOW / 4;
/// The `Open` payload that asks for flow control.
const CREDIT: &[u8] = b"credit";
/// Streams open at once on one tunnel: a browser keeps a few HTTP
/// connections and one WebSocket per open notebook, kernel or terminal.
pub const MAX_STREAMS: usize = 128;
/// Bytes received on all streams of a tunnel and not yet consumed: beyond
/// this the peer is flooding (each stream's window is 1 MiB, and it takes
/// this many stalled readers at once to reach it honestly).
pub const MAX_QUEUED: u64 = 32 * 1024 * 1024;
/// The largest link frame a tunnel needs: a message holds at most
/// [`CHUNK`] bytes of a stream (a frame of 65,571 bytes with its headers),
/// or a notice of at most [`MAX_NOTICE`] bytes. A peer that may send
/// bigger frames could make a receiver that falls behind hold its link's
/// backlog (1024 messages) of them.
pub const MAX_FRAME: usize = CHUNK + 16 * 1024;
/// The largest notice: a small JSON object (the agent's hello, with its
/// token and host name, is the biggest, a few hundred bytes). A bigger
/// one is malformed, and not parsed.
pub const MAX_NOTICE: usize = 4 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Hub → agent: a new stream; connect it to the server.
    Open = 1,
    Data = 2,
    /// The sender will write no more on this stream (half close).
    Eof = 3,
    /// The stream failed or was abandoned: drop it.
    Reset = 4,
    /// Agent → hub: a JSON notice (hello, server ended…), stream id 0.
    Notice = 5,
    /// The receiver consumed this many bytes (8-byte big-endian payload):
    /// the sender may send that much more.
    Credit = 6,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Open,
            2 => Op::Data,
            3 => Op::Eof,
            4 => Op::Reset,
            5 => Op::Notice,
            6 => Op::Credit,
            _ => return None,
        })
    }
}

/// The frames of one tunnel message.
pub fn encode(op: Op, id: u64, payload: Bytes) -> Vec<Bytes> {
    let mut head = BytesMut::with_capacity(9);
    head.extend_from_slice(&[op as u8]);
    head.extend_from_slice(&id.to_be_bytes());
    vec![head.freeze(), payload]
}

/// Splits a tunnel message; `None` for anything malformed.
pub fn decode(frames: &[Bytes]) -> Option<(Op, u64, Bytes)> {
    let [head, payload] = frames else {
        return None;
    };
    if head.len() != 9 {
        return None;
    }
    let op = Op::from_u8(head[0])?;
    let id = u64::from_be_bytes(head[1..9].try_into().ok()?);
    Some((op, id, payload.clone()))
}

/// How the peer ended a stream.
#[derive(Clone, Copy)]
enum End {
    Eof,
    Reset,
}

/// What the peer sent a stream and its reader has not consumed yet: the
/// bytes in one buffer (their count is all they cost), then their end.
/// Its bytes (`data` and `writing`) are counted in the tunnel's total
/// while it is `counted` (the stream is among the tunnel's), and change
/// only through these methods, which keep that total.
struct Inbox {
    data: BytesMut,
    /// Bytes the reader took and is still writing out (still not credited).
    writing: usize,
    end: Option<End>,
    /// The tunnel's bytes waiting on all of its streams.
    total: Arc<AtomicU64>,
    counted: bool,
}

impl Inbox {
    fn queued(&self) -> usize {
        self.data.len() + self.writing
    }

    /// Takes `bytes` from the peer: the tunnel's total after them. Only a
    /// stream among the tunnel's takes any (looked up under the lock its
    /// removal holds), and it is counted.
    fn add(&mut self, bytes: &[u8]) -> u64 {
        debug_assert!(self.counted, "bytes for a stream that left the tunnel");
        self.data.extend_from_slice(bytes);
        let n = bytes.len() as u64;
        self.total.fetch_add(n, Ordering::Relaxed) + n
    }

    /// Drops `n` bytes from the count (consumed, or thrown away).
    fn uncount(&self, n: usize) {
        if self.counted {
            self.total.fetch_sub(n as u64, Ordering::Relaxed);
        }
    }

    /// The reader takes what waits into `buf` (emptied first: what it
    /// held was written) to write it out, still counted; and the end.
    fn take(&mut self, buf: &mut BytesMut) -> Option<End> {
        buf.clear();
        std::mem::swap(&mut self.data, buf);
        self.writing = buf.len();
        self.end
    }

    /// The reader wrote out what it took.
    fn written(&mut self) {
        self.uncount(self.writing);
        self.writing = 0;
    }

    /// The stream leaves the tunnel: its bytes no longer count.
    fn leave(&mut self) {
        self.uncount(self.queued());
        self.counted = false;
    }
}

/// A stream's inbox, and the wake-up of its reader.
struct Shared {
    inbox: Mutex<Inbox>,
    ready: Notify,
}

impl Shared {
    fn new(total: Arc<AtomicU64>) -> Shared {
        let inbox = Inbox {
            data: BytesMut::new(),
            writing: 0,
            end: None,
            total,
            counted: true,
        };
        Shared {
            inbox: Mutex::new(inbox),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the stream at once: what waits is dropped.
    fn reset(&self) {
        let mut inbox = self.lock();
        inbox.uncount(inbox.data.len());
        inbox.data = BytesMut::new();
        inbox.end = Some(End::Reset);
        drop(inbox);
        self.ready.notify_one();
    }
}

/// The receiving end of one stream, as `deliver` reaches it.
struct Stream {
    shared: Arc<Shared>,
    /// Credit for sending on this stream, when it uses flow control.
    window: Option<Arc<Semaphore>>,
}

/// The streams of one link. Cheap to share; one per link session.
pub struct Tunnel {
    sender: LinkSender,
    streams: Mutex<HashMap<u64, Stream>>,
    /// Bytes received on all streams and not yet consumed, kept by the
    /// streams' inboxes as they change (summing them on each message would
    /// take every stream's lock).
    queued: Arc<AtomicU64>,
    next_id: AtomicU64,
    /// Every stream was reset (the link is closing): open no more.
    closed: AtomicBool,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("streams", &self.streams.lock().map(|s| s.len()).ok())
            .finish()
    }
}

impl Tunnel {
    pub fn new(sender: LinkSender) -> Arc<Self> {
        Arc::new(Tunnel {
            sender,
            streams: Mutex::new(HashMap::new()),
            queued: Arc::default(),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        })
    }

    /// Sends a JSON notice (agent → hub).
    pub fn notice(&self, value: &serde_json::Value) -> Result<(), LinkError> {
        self.sender.send(
            NOTICE_LANE,
            encode(Op::Notice, 0, Bytes::from(value.to_string())),
        )
    }

    /// Opens a stream to the peer's server (hub side), with flow control:
    /// what is written to the returned end reaches the server, what the
    /// server answers is read from it.
    pub fn open(self: &Arc<Self>) -> Result<DuplexStream, LinkError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (shared, window) = {
            // Counted and taken in one step, so that concurrent opens do
            // not pass MAX_STREAMS together.
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            if self.closed.load(Ordering::Relaxed) {
                return Err(LinkError::Closed(crate::CloseReason::LocalClose));
            }
            if streams.len() >= MAX_STREAMS {
                return Err(LinkError::TooManyStreams(streams.len()));
            }
            self.register(&mut streams, id, true)
        };
        let open = encode(Op::Open, id, Bytes::from_static(CREDIT));
        if let Err(e) = self.sender.send(TUNNEL_LANE, open) {
            self.forget(id);
            return Err(e);
        }
        let (ours, theirs) = tokio::io::duplex(CHUNK);
        self.pump(id, theirs, shared, window);
        Ok(ours)
    }

    /// Makes stream `id` reachable by `deliver`.
    fn register(
        &self,
        streams: &mut HashMap<u64, Stream>,
        id: u64,
        credit: bool,
    ) -> (Arc<Shared>, Option<Arc<Semaphore>>) {
        let shared = Arc::new(Shared::new(self.queued.clone()));
        let window = credit.then(|| Arc::new(Semaphore::new(WINDOW)));
        let stream = Stream {
            shared: shared.clone(),
            window: window.clone(),
        };
        streams.insert(id, stream);
        (shared, window)
    }

    fn forget(&self, id: u64) {
        let gone = (self.streams.lock().unwrap_or_else(|e| e.into_inner())).remove(&id);
        if let Some(s) = gone {
            s.shared.lock().leave();
        }
    }

    /// Takes one message from the link. Returns a stream the peer opened
    /// (agent side: connect it, then [`Tunnel::attach`] with its `credit`,
    /// or [`Tunnel::reset`]), or the JSON of a notice.
    pub fn deliver(&self, frames: &[Bytes]) -> Delivered {
        let Some((op, id, payload)) = decode(frames) else {
            return Delivered::Malformed;
        };
        let end = match op {
            Op::Open => {
                return Delivered::Opened {
                    id,
                    credit: payload == CREDIT,
                }
            }
            Op::Credit => {
                let n = <[u8; 8]>::try_from(&payload[..]).map(u64::from_be_bytes);
                let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
                match (n, streams.get(&id).and_then(|s| s.window.as_ref())) {
                    // An honest peer never grants more than was sent: a
                    // window never holds more than WINDOW, whatever it says.
                    (Ok(n), Some(w)) => {
                        let room = WINDOW.saturating_sub(w.available_permits());
                        w.add_permits(usize::try_from(n).unwrap_or(WINDOW).min(room))
                    }
                    (Err(_), _) => return Delivered::Malformed,
                    _ => {}
                }
                return Delivered::Handled;
            }
            Op::Notice if payload.len() > MAX_NOTICE => return Delivered::Malformed,
            Op::Notice => {
                return match serde_json::from_slice(&payload) {
                    Ok(v) => Delivered::Notice(v),
                    Err(_) => Delivered::Malformed,
                }
            }
            Op::Data if payload.is_empty() => {
                self.reset_all();
                return Delivered::Violation(format!("an empty data message on stream {id}"));
            }
            Op::Data => None,
            Op::Eof => Some(End::Eof),
            Op::Reset => Some(End::Reset),
        };
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = streams.get(&id) else {
            return Delivered::Handled;
        };
        let mut inbox = s.shared.lock();
        match (inbox.end, end) {
            // After its end a stream takes nothing but one reset (its
            // writer may fail after the end of its data, and our sender
            // may be waiting for its credit): the rest is dropped.
            (Some(End::Reset), _) | (Some(End::Eof), None | Some(End::Eof)) => {
                return Delivered::Handled
            }
            (_, Some(end)) => {
                inbox.end = Some(end);
                if let (End::Reset, Some(w)) = (end, &s.window) {
                    // The sender may be waiting for credit that will never come.
                    w.close();
                }
            }
            (None, None) => {
                let total = inbox.add(&payload);
                let queued = inbox.queued() as u64;
                drop(inbox);
                if let Some(why) = over_limits(s, id, queued, total) {
                    drop(streams);
                    self.reset_all();
                    return Delivered::Violation(why);
                }
                s.shared.ready.notify_one();
                return Delivered::Handled;
            }
        }
        drop(inbox);
        s.shared.ready.notify_one();
        Delivered::Handled
    }

    /// Refuses a stream the peer opened (the server cannot be reached).
    pub fn reset(&self, id: u64) {
        let _ = self
            .sender
            .send(TUNNEL_LANE, encode(Op::Reset, id, Bytes::new()));
    }

    /// Ends every stream at once (the link is being closed): their readers
    /// see a reset, their writers' waits for credit end, and what was
    /// queued for them is dropped with them. The tunnel opens no more.
    pub fn reset_all(&self) {
        let streams = {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            self.closed.store(true, Ordering::Relaxed);
            std::mem::take(&mut *streams)
        };
        for (id, s) in streams {
            s.shared.reset();
            s.shared.lock().leave();
            if let Some(w) = &s.window {
                w.close();
            }
            self.reset(id);
        }
    }

    /// Number of open streams.
    pub fn open_streams(&self) -> usize {
        self.streams.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Bytes received on all streams and not yet consumed by their readers.
    pub fn queued_bytes(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Pumps bytes between stream `id` and `io` until both directions end;
    /// `credit`: the stream uses flow control (as its `Open` said).
    pub fn attach<S>(self: &Arc<Self>, id: u64, io: S, credit: bool)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (shared, window) = self.register(
            &mut self.streams.lock().unwrap_or_else(|e| e.into_inner()),
            id,
            credit,
        );
        self.pump(id, io, shared, window);
    }

    /// Runs stream `id`'s two directions between the link and `io`.
    fn pump<S>(
        self: &Arc<Self>,
        id: u64,
        io: S,
        shared: Arc<Shared>,
        window: Option<Arc<Semaphore>>,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let credit = window.is_some();
        let me = self.clone();
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(io);
            let sender = me.sender.clone();
            let outbound = async {
                let mut buf = BytesMut::with_capacity(CHUNK);
                loop {
                    buf.reserve(CHUNK);
                    // At most CHUNK per message, which the window always covers.
                    match r.read_buf(&mut (&mut buf).limit(CHUNK)).await {
                        Ok(0) => {
                            return sender
                                .send(TUNNEL_LANE, encode(Op::Eof, id, Bytes::new()))
                                .is_ok()
                        }
                        Ok(n) => {
                            if let Some(w) = &window {
                                // n <= CHUNK < WINDOW, so the cast and the wait are bounded.
                                match w.acquire_many(n as u32).await {
                                    Ok(p) => p.forget(),
                                    Err(_) => return false,
                                }
                            }
                            let data = buf.split().freeze();
                            if sender
                                .send(TUNNEL_LANE, encode(Op::Data, id, data))
                                .is_err()
                            {
                                return false;
                            }
                        }
                        Err(_) => return false,
                    }
                }
            };
            let inbound = async {
                let mut consumed = 0usize;
                // The two buffers swap: the inbox fills one while this
                // writes the other, and neither is allocated anew per
                // message (a fresh one per message took a third more
                // time on bulk transfers).
                let mut data = BytesMut::new();
                loop {
                    let end = shared.lock().take(&mut data);
                    if data.is_empty() && end.is_none() {
                        shared.ready.notified().await;
                        continue;
                    }
                    if !data.is_empty() {
                        if w.write_all(&data).await.is_err() {
                            return false;
                        }
                        shared.lock().written();
                        consumed += data.len();
                        if data.capacity() > KEEP {
                            // (a stalled reader's backlog is not kept)
                            data = BytesMut::new();
                        }
                        if credit && consumed >= GRANT {
                            let grant = Bytes::copy_from_slice(&(consumed as u64).to_be_bytes());
                            consumed = 0;
                            if sender
                                .send(TUNNEL_LANE, encode(Op::Credit, id, grant))
                                .is_err()
                            {
                                return false;
                            }
                        }
                    }
                    match end {
                        // The data taken with the end was all there was.
                        Some(End::Eof) => {
                            let _ = w.shutdown().await;
                            return true;
                        }
                        Some(End::Reset) => return false,
                        None => {}
                    }
                }
            };
            tokio::pin!(outbound, inbound);
            // Either direction failing ends the stream; a clean end of one
            // waits for the other.
            let ok = tokio::select! {
                ok = &mut outbound => ok && inbound.await,
                ok = &mut inbound => ok && outbound.await,
            };
            if !ok {
                me.reset(id);
            }
            me.forget(id);
        });
    }
}

/// What [`Tunnel::deliver`] found.
#[derive(Debug)]
pub enum Delivered {
    /// Data for a stream, passed on (or for a stream already gone).
    Handled,
    /// The peer opened stream `id`, with flow control when `credit`.
    Opened {
        id: u64,
        credit: bool,
    },
    Notice(serde_json::Value),
    Malformed,
    /// The peer broke the tunnel's limits (said why): every stream was
    /// reset, and the caller should close the link.
    Violation(String),
}

/// Why stream `id` (`s`, now holding `queued` bytes, its tunnel's streams
/// `total`) breaks the tunnel's limits, if it does. The sender may have
/// WINDOW bytes sent and not credited, and what waits here was sent and
/// not consumed, hence not credited: an honest peer never passes WINDOW.
/// A stream without flow control (agent side, opened by a hub that did
/// not ask for it) is the hub's to fill.
fn over_limits(s: &Stream, id: u64, queued: u64, total: u64) -> Option<String> {
    s.window.as_ref()?;
    if queued > WINDOW as u64 {
        return Some(format!(
            "stream {id} has {queued} bytes waiting, over its {WINDOW}-byte window"
        ));
    }
    (total > MAX_QUEUED)
        .then(|| format!("its streams have more than {MAX_QUEUED} bytes waiting together"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let f = encode(Op::Data, 42, Bytes::from_static(b"abc"));
        let (op, id, p) = decode(&f).unwrap();
        assert_eq!((op, id, &p[..]), (Op::Data, 42, &b"abc"[..]));
        assert!(decode(&[Bytes::from_static(b"\x09xxxxxxxx"), Bytes::new()]).is_none());
        assert!(decode(&[Bytes::from_static(b"\x02")]).is_none());
    }
}
