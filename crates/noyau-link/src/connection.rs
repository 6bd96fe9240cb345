//! One TLS connection carrying a session: a reader and a writer running
//! side by side until the connection breaks or the session ends.
//!
//! The writer batches: it drains the highest-priority lane first, appends
//! frames to one buffer, and flushes only when nothing more is queued, so a
//! flood of small messages costs a few large TLS records instead of one
//! record and one syscall per message. Acks ride along with data when there is
//! some, otherwise they go out after 64 deliveries, a quarter window or 250 ms.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsStream;

use crate::codec::{self, Frame};
use crate::state::Shared;
use crate::{Incoming, Lane, LinkError};

/// Ack after this many deliveries...
const ACK_EVERY: usize = 64;
/// ...or this many bytes (a quarter of the sender's window)...
const ACK_BYTES: usize = crate::state::WINDOW / 4;
/// ...or after this long, whichever first. A kernel's traffic is requests
/// and replies, which carry the acks: this timer is for one-way trickles.
/// At 20 ms it fired between most cells of a notebook (an extra wake-up and
/// an eventfd write in the proxy and the agent per cell); held messages
/// stay bounded by the two limits above.
const ACK_DELAY: Duration = Duration::from_millis(250);
/// Writer batch limits: small enough that a control message queued behind a
/// batch waits for at most this much, big enough to fill TLS records.
const BATCH_MSGS: usize = 256;
const BATCH_BYTES: usize = 64 * 1024;
/// Parts at least this big are written straight from their buffer instead of
/// being copied into the batch buffer.
const BIG_PART: usize = 32 * 1024;
/// How long a closing side waits for the peer's goodbye.
const GOODBYE_WAIT: Duration = Duration::from_secs(5);
/// TCP keepalive: probes after this long without traffic, then at this
/// interval, this many unanswered before the connection is dropped...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 2;
/// ...and sent data unacknowledged for this long drops it too.
const UNACKED_TIMEOUT: Duration = Duration::from_secs(20);

/// Lets the kernel find a dead peer (host gone, network cut without a
/// reset) within about 20 s without waking this process: the probes and
/// the retransmission timer live in the kernel, so the link's own pings can
/// be rare. Best effort: a socket that refuses the options still works,
/// with only the idle timeout to end it.
pub(crate) fn keep_alive(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = sock
        .set_tcp_keepalive(&ka)
        .and_then(|()| sock.set_tcp_user_timeout(Some(UNACKED_TIMEOUT)))
    {
        tracing::debug!("link: TCP keepalive not set: {e}");
    }
}

/// An established TLS stream plus whatever was read past the last frame.
pub(crate) struct Conn {
    pub(crate) stream: TlsStream<TcpStream>,
    pub(crate) rbuf: BytesMut,
}

impl Conn {
    pub(crate) fn new(stream: TlsStream<TcpStream>) -> Self {
        Conn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// Handshake helper: writes one frame and flushes.
    pub(crate) async fn write_frame(&mut self, f: &Frame) -> Result<(), LinkError> {
        let mut b = BytesMut::new();
        codec::encode(f, &mut b);
        self.stream
            .write_all(&b)
            .await
            .map_err(|e| LinkError::io("writing handshake frame", e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| LinkError::io("writing handshake frame", e))
    }

    /// Handshake helper: reads exactly one frame.
    pub(crate) async fn read_frame(&mut self) -> Result<Frame, LinkError> {
        loop {
            if let Some(f) = codec::decode(&mut self.rbuf, codec::MAX_HANDSHAKE_FRAME)? {
                return Ok(f);
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| LinkError::io("reading handshake frame", e))?;
            if n == 0 {
                return Err(LinkError::Eof);
            }
        }
    }
}

/// How a connection ended.
pub(crate) enum End<R> {
    /// We said goodbye (after flushing) and the peer answered or went away.
    LocalClose,
    /// The peer said goodbye.
    PeerClosed,
    /// Broken: reconnect.
    Broken(LinkError),
    /// The proxy got a reconnect for this session while the old connection
    /// still looked alive (half-open TCP): switch to the new one.
    Replaced(R),
}

/// Runs the session over `conn` until it ends. `replacements` yields newer
/// connections for the same session (proxy side only).
pub(crate) async fn run<R>(
    shared: &Arc<Shared>,
    conn: Conn,
    tx: &mpsc::Sender<Incoming>,
    replacements: Option<&mut mpsc::Receiver<R>>,
) -> End<R> {
    let Conn { stream, rbuf } = conn;
    let (r, w) = tokio::io::split(stream);
    let reader = read_loop(shared, r, rbuf, tx);
    let writer = write_loop(shared, w);
    tokio::pin!(reader, writer);
    let mut goodbye_sent: Option<Instant> = None;
    let mut replacements = replacements;
    loop {
        let wait_goodbye = goodbye_sent.map(|t| t + GOODBYE_WAIT);
        tokio::select! {
            res = &mut reader => {
                return match res {
                    Ok(()) if goodbye_sent.is_some() => End::LocalClose,
                    Ok(()) => {
                        // Answer the goodbye so the peer can close cleanly.
                        shared.peer_goodbye.store(true, Ordering::SeqCst);
                        shared.wake_writer.notify_one();
                        let _ = tokio::time::timeout(GOODBYE_WAIT, &mut writer).await;
                        End::PeerClosed
                    }
                    // Once we said goodbye, the peer hanging up is the answer.
                    Err(_) if goodbye_sent.is_some() => End::LocalClose,
                    Err(e) => End::Broken(e),
                };
            }
            res = &mut writer, if goodbye_sent.is_none() => match res {
                Ok(()) => goodbye_sent = Some(Instant::now()),
                Err(e) => return End::Broken(e),
            },
            Some(new) = async {
                match replacements.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => return End::Replaced(new),
            _ = tokio::time::sleep_until(wait_goodbye.unwrap_or_else(Instant::now)), if wait_goodbye.is_some() => {
                return End::LocalClose;
            }
        }
    }
}

/// Reads frames until the peer says goodbye (`Ok`) or the connection fails.
async fn read_loop<S: AsyncRead>(
    shared: &Arc<Shared>,
    mut r: tokio::io::ReadHalf<S>,
    mut rbuf: BytesMut,
    tx: &mpsc::Sender<Incoming>,
) -> Result<(), LinkError> {
    let idle = shared.cfg.idle_timeout;
    // One timer, moved on only when it fires (a timeout per read would
    // register and remove a timer for every message).
    let mut last_read = Instant::now();
    let quiet = tokio::time::sleep_until(last_read + idle);
    tokio::pin!(quiet);
    loop {
        let mut delivered = false;
        while let Some(frame) = codec::decode(&mut rbuf, shared.cfg.max_frame)? {
            match frame {
                Frame::Data { lane, seq, parts } => {
                    let last = shared.recv().last[lane as usize];
                    if seq <= last {
                        // Resent after a reconnect but already delivered.
                        continue;
                    }
                    if seq != last + 1 {
                        return Err(LinkError::Protocol(format!(
                            "lane {lane:?}: expected message {}, got {seq}",
                            last + 1
                        )));
                    }
                    // If the connection dies while we wait here, this future
                    // is dropped before `last` moves, so the message will be
                    // resent rather than lost. A dropped Link just discards.
                    let size: usize = parts.iter().map(|p| p.len() + 4).sum();
                    let _ = tx.send(Incoming::Message(lane, parts)).await;
                    delivered = true;
                    let due = {
                        let mut rs = shared.recv();
                        rs.last[lane as usize] = seq;
                        rs.unacked += 1;
                        rs.unacked_bytes += size;
                        if rs.unacked_since.is_none() {
                            rs.unacked_since = Some(std::time::Instant::now());
                        }
                        rs.unacked == 1 || rs.unacked >= ACK_EVERY || rs.unacked_bytes >= ACK_BYTES
                    };
                    // Wake the writer on the first delivery (to arm the ack
                    // timer) and when the count threshold is reached.
                    if due {
                        shared.wake_writer.notify_one();
                    }
                }
                Frame::Ack { last_recv } => {
                    shared.out().ack(&last_recv)?;
                    // The window may have opened.
                    shared.wake_writer.notify_one();
                }
                Frame::Ping => {}
                Frame::Goodbye => return Ok(()),
                other => {
                    return Err(LinkError::Protocol(format!(
                        "unexpected {} frame on an established link",
                        frame_name(&other)
                    )))
                }
            }
        }
        // Time spent waiting for a slow consumer to take messages is not
        // the peer's silence.
        if delivered {
            last_read = Instant::now();
        }
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(32 * 1024);
        }
        let n = tokio::select! {
            n = r.read_buf(&mut rbuf) => n.map_err(|e| LinkError::io("reading from the link", e))?,
            () = &mut quiet => {
                if last_read.elapsed() >= idle {
                    return Err(LinkError::IdleTimeout(idle));
                }
                quiet.as_mut().reset(last_read + idle);
                continue;
            }
        };
        if n == 0 {
            return Err(LinkError::Eof);
        }
        last_read = Instant::now();
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "hello",
        Frame::Resume { .. } => "resume",
        Frame::Welcome { .. } => "welcome",
        Frame::Refused { .. } => "refused",
        Frame::Data { .. } => "data",
        Frame::Ack { .. } => "ack",
        Frame::Ping => "ping",
        Frame::Goodbye => "goodbye",
    }
}

/// Writes until it has said goodbye (`Ok`) or the connection fails.
async fn write_loop<S: AsyncWrite>(
    shared: &Arc<Shared>,
    mut w: tokio::io::WriteHalf<S>,
) -> Result<(), LinkError> {
    let io = |e| LinkError::io("writing to the link", e);
    let ping_every = shared.cfg.ping_interval;
    let mut buf = BytesMut::with_capacity(BATCH_BYTES + 1024);
    let mut batch: Vec<(Lane, u64, Vec<Bytes>)> = Vec::with_capacity(BATCH_MSGS);
    let mut last_write = Instant::now();
    // One timer for the whole loop, moved only when it must fire earlier (or
    // has fired): arming a timer earlier than the runtime's next wake-up
    // costs an eventfd write and an extra epoll round, which re-arming the
    // ack timer on every message cost each request through the hub.
    // Firing early is harmless: the loop recomputes what is due.
    let timer = tokio::time::sleep_until(last_write + ping_every);
    tokio::pin!(timer);
    loop {
        batch.clear();
        let (goodbye, more) = {
            let mut out = shared.out();
            out.next_batch(&mut batch, BATCH_MSGS, BATCH_BYTES);
            // Unsent messages held back by the window don't count: the
            // ack that opens it wakes us.
            let more = out.has_sendable();
            let goodbye =
                shared.peer_goodbye.load(Ordering::SeqCst) || (out.closing && !out.has_unsent());
            (goodbye, more)
        };
        let ack = {
            let mut rs = shared.recv();
            let due = rs.unacked > 0
                && (!batch.is_empty()
                    || goodbye
                    || rs.unacked >= ACK_EVERY
                    || rs.unacked_bytes >= ACK_BYTES
                    || rs.unacked_since.is_some_and(|t| t.elapsed() >= ACK_DELAY));
            due.then(|| rs.take_ack())
        };
        if let Some(last_recv) = ack {
            codec::encode(&Frame::Ack { last_recv }, &mut buf);
        }
        for (lane, seq, parts) in batch.drain(..) {
            codec::put_data_header(&mut buf, lane, seq, &parts);
            for p in &parts {
                codec::put_part_len(&mut buf, p);
                if p.len() >= BIG_PART {
                    w.write_all(&buf).await.map_err(io)?;
                    buf.clear();
                    w.write_all(p).await.map_err(io)?;
                } else {
                    buf.extend_from_slice(p);
                }
            }
        }
        if buf.is_empty() && !goodbye && last_write.elapsed() >= ping_every {
            codec::encode(&Frame::Ping, &mut buf);
        }
        if goodbye {
            codec::encode(&Frame::Goodbye, &mut buf);
        }
        if !buf.is_empty() {
            w.write_all(&buf).await.map_err(io)?;
            buf.clear();
            last_write = Instant::now();
        }
        if goodbye {
            w.flush().await.map_err(io)?;
            return Ok(());
        }
        if more {
            // More is queued: keep filling records, flush later.
            continue;
        }
        w.flush().await.map_err(io)?;
        let ack_at = shared
            .recv()
            .unacked_since
            .map(|t| Instant::from_std(t) + ACK_DELAY);
        let ping_at = last_write + ping_every;
        let wake_at = ack_at.map_or(ping_at, |a| a.min(ping_at));
        if wake_at < timer.deadline() || timer.is_elapsed() {
            timer.as_mut().reset(wake_at);
        }
        tokio::select! {
            _ = shared.wake_writer.notified() => {}
            _ = &mut timer => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel, not our pings, finds a dead peer: both ends of a link
    /// connection get the probes and the unacknowledged-data timeout.
    #[tokio::test]
    async fn link_sockets_get_keepalive_and_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialled = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        for s in [&dialled, &accepted] {
            let before = socket2::SockRef::from(s);
            assert!(!before.keepalive().unwrap());
            keep_alive(s);
            let sock = socket2::SockRef::from(s);
            assert!(sock.keepalive().unwrap());
            assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
            assert_eq!(sock.tcp_user_timeout().unwrap(), Some(UNACKED_TIMEOUT));
        }
    }
}
