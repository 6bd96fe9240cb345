//! Per-session state that outlives any one connection.
//!
//! A session's outgoing lanes keep every message from the moment `send`
//! queues it until the peer acknowledges it, in one queue per lane: the front
//! part is sent-but-unacked (the retransmit buffer), the back part unsent. A
//! reconnect only moves the "next to send" cursor back to what the peer says
//! it has, so resuming costs nothing and messages cannot be reordered. The
//! receiving side only needs the last sequence number delivered per lane.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::codec::LaneSeqs;
use crate::{CloseReason, Lane, LinkConfig, LinkError};

/// Bookkeeping cost charged per message on top of its payload, so that a
/// flood of empty messages is bounded too.
const MSG_OVERHEAD: usize = 64;

/// Most bytes of non-control messages on the wire but not yet acked. Without
/// this cap the writer would fill the kernel's socket buffers (several MiB on
/// Linux), and a control message would queue behind all of it; with it, a
/// control message waits behind at most this much.
pub(crate) const WINDOW: usize = 1024 * 1024;

pub(crate) struct Shared {
    pub(crate) cfg: LinkConfig,
    pub(crate) out: Mutex<OutState>,
    pub(crate) recv: Mutex<RecvState>,
    /// Wakes the connection writer: new message, ack due, close requested.
    /// `notify_one` stores a permit, so a wake-up is never lost.
    pub(crate) wake_writer: Notify,
    /// Set when the peer said goodbye, so the writer answers with one.
    pub(crate) peer_goodbye: AtomicBool,
}

impl Shared {
    pub(crate) fn new(cfg: LinkConfig) -> Self {
        Shared {
            cfg,
            out: Mutex::new(OutState::default()),
            recv: Mutex::new(RecvState::default()),
            wake_writer: Notify::new(),
            peer_goodbye: AtomicBool::new(false),
        }
    }

    pub(crate) fn out(&self) -> std::sync::MutexGuard<'_, OutState> {
        // A panic while holding this lock would be a bug in this crate; the
        // state is still consistent enough to carry on, so ignore poisoning.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn recv(&self) -> std::sync::MutexGuard<'_, RecvState> {
        self.recv.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn enqueue(&self, lane: Lane, parts: Vec<Bytes>) -> Result<(), LinkError> {
        let payload: usize = parts.iter().map(|p| 4 + p.len()).sum();
        let max = self.cfg.max_frame;
        if payload + 32 > max {
            return Err(LinkError::MessageTooLarge { len: payload, max });
        }
        let cost = payload + MSG_OVERHEAD;
        {
            let mut out = self.out();
            if let Some(reason) = &out.closed {
                return Err(LinkError::Closed(reason.clone()));
            }
            if out.closing {
                return Err(LinkError::Closed(CloseReason::LocalClose));
            }
            // Control messages (interrupts, shutdown) are tiny and must get
            // through even when a flood of output has filled the buffer.
            if lane != Lane::Control && out.buffered + cost > self.cfg.buffer_limit {
                return Err(LinkError::BufferFull {
                    lane,
                    buffered: out.buffered,
                    limit: self.cfg.buffer_limit,
                });
            }
            out.push(lane, parts, cost);
        }
        self.wake_writer.notify_one();
        Ok(())
    }
}

#[derive(Default)]
pub(crate) struct OutState {
    lanes: [LaneOut; 4],
    /// Bytes held (unsent + unacked) over all lanes.
    pub(crate) buffered: usize,
    /// Bytes of non-control messages sent on this connection but not acked.
    inflight: usize,
    /// `close()` was called: no new messages; the writer says goodbye once
    /// everything queued is sent.
    pub(crate) closing: bool,
    /// The session is over; sends fail with this reason.
    pub(crate) closed: Option<CloseReason>,
}

#[derive(Default)]
struct LaneOut {
    /// Unacked messages in sequence order: seqs `acked+1 ..= next_seq-1`.
    msgs: VecDeque<OutMsg>,
    /// Sequence number the next queued message gets (first is 1; 0 means
    /// "nothing yet" in acks).
    last_seq: u64,
    /// Sequence number of the next message to put on the wire.
    next_send: u64,
}

struct OutMsg {
    seq: u64,
    parts: Vec<Bytes>,
    cost: usize,
}

impl OutState {
    fn push(&mut self, lane: Lane, parts: Vec<Bytes>, cost: usize) {
        let l = &mut self.lanes[lane as usize];
        l.last_seq += 1;
        if l.next_send == 0 {
            l.next_send = 1;
        }
        l.msgs.push_back(OutMsg {
            seq: l.last_seq,
            parts,
            cost,
        });
        self.buffered += cost;
    }

    /// True if some lane has a message not yet put on the current connection.
    pub(crate) fn has_unsent(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| l.next_send != 0 && l.next_send <= l.last_seq)
    }

    /// True if the writer may send something now (window permitting).
    pub(crate) fn has_sendable(&self) -> bool {
        self.lanes.iter().enumerate().any(|(i, l)| {
            l.next_send != 0 && l.next_send <= l.last_seq && (i == 0 || self.inflight < WINDOW)
        })
    }

    /// Moves up to `max_msgs` / about `max_bytes` of the highest-priority
    /// unsent messages into `batch`. Priority is re-decided per message, so a
    /// control message queued now goes out in the very next batch.
    pub(crate) fn next_batch(
        &mut self,
        batch: &mut Vec<(Lane, u64, Vec<Bytes>)>,
        max_msgs: usize,
        max_bytes: usize,
    ) {
        let mut bytes = 0;
        while batch.len() < max_msgs && bytes < max_bytes {
            let inflight = self.inflight;
            let Some(i) = self.lanes.iter().enumerate().position(|(i, l)| {
                l.next_send != 0 && l.next_send <= l.last_seq && (i == 0 || inflight < WINDOW)
            }) else {
                break;
            };
            let l = &mut self.lanes[i];
            let front = l.msgs.front().map_or(l.next_send, |m| m.seq);
            let m = &l.msgs[(l.next_send - front) as usize];
            bytes += m.cost;
            if i != 0 {
                self.inflight += m.cost;
            }
            batch.push((Lane::ALL[i], m.seq, m.parts.clone()));
            l.next_send += 1;
        }
    }

    /// Forgets messages the peer has received, per lane.
    pub(crate) fn ack(&mut self, acks: &LaneSeqs) -> Result<(), LinkError> {
        for (i, &n) in acks.iter().enumerate() {
            let l = &mut self.lanes[i];
            if n > l.last_seq {
                return Err(LinkError::Protocol(format!(
                    "peer acknowledges message {n} on lane {:?} but only {} were sent",
                    Lane::ALL[i],
                    l.last_seq
                )));
            }
            while l.msgs.front().is_some_and(|m| m.seq <= n) {
                if let Some(m) = l.msgs.pop_front() {
                    self.buffered -= m.cost;
                    if i != 0 && m.seq < l.next_send {
                        self.inflight = self.inflight.saturating_sub(m.cost);
                    }
                }
            }
            if l.next_send != 0 && l.next_send <= n {
                l.next_send = n + 1;
            }
        }
        Ok(())
    }

    /// After a reconnect: the peer has everything up to `peer_last`; resend
    /// the rest.
    pub(crate) fn rewind(&mut self, peer_last: &LaneSeqs) -> Result<(), LinkError> {
        self.ack(peer_last)?;
        // Everything unacked goes again on the new connection.
        self.inflight = 0;
        for (l, &n) in self.lanes.iter_mut().zip(peer_last) {
            if l.last_seq > 0 {
                l.next_send = n + 1;
            }
        }
        Ok(())
    }
}

#[derive(Default)]
pub(crate) struct RecvState {
    /// Last sequence number delivered to the user, per lane.
    pub(crate) last: LaneSeqs,
    /// Messages delivered since the last ack we sent.
    pub(crate) unacked: usize,
    /// Their payload bytes: acking by size too keeps the sender's window open.
    pub(crate) unacked_bytes: usize,
    /// When the oldest unacked delivery happened.
    pub(crate) unacked_since: Option<Instant>,
}

impl RecvState {
    /// Returns the ack to send and resets the counters.
    pub(crate) fn take_ack(&mut self) -> LaneSeqs {
        self.unacked = 0;
        self.unacked_bytes = 0;
        self.unacked_since = None;
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &'static str) -> Vec<Bytes> {
        vec![Bytes::from_static(s.as_bytes())]
    }

    #[test]
    fn priority_ack_and_rewind() {
        let mut o = OutState::default();
        o.push(Lane::Iopub, b("i1"), 10);
        o.push(Lane::Iopub, b("i2"), 10);
        o.push(Lane::Control, b("c1"), 10);
        let mut batch = Vec::new();
        o.next_batch(&mut batch, 2, usize::MAX);
        assert_eq!(batch[0].0, Lane::Control);
        assert_eq!((batch[1].0, batch[1].1), (Lane::Iopub, 1));
        batch.clear();
        o.next_batch(&mut batch, 10, usize::MAX);
        assert_eq!(batch.len(), 1);
        assert!(!o.has_unsent());
        o.ack(&[1, 0, 0, 1]).unwrap();
        assert_eq!(o.buffered, 10);
        // Connection lost: the peer only had iopub 1, so iopub 2 goes again.
        o.rewind(&[1, 0, 0, 1]).unwrap();
        batch.clear();
        o.next_batch(&mut batch, 10, usize::MAX);
        assert_eq!(batch.len(), 1);
        assert_eq!((batch[0].0, batch[0].1), (Lane::Iopub, 2));
        assert!(o.ack(&[9, 0, 0, 0]).is_err());
        assert_eq!(o.inflight, 10);
        o.ack(&[1, 0, 0, 2]).unwrap();
        assert_eq!((o.inflight, o.buffered), (0, 0));
    }

    #[test]
    fn window_holds_back_bulk_but_not_control() {
        let mut o = OutState::default();
        for _ in 0..3 {
            o.push(Lane::Iopub, b("x"), WINDOW / 2);
        }
        let mut batch = Vec::new();
        o.next_batch(&mut batch, 10, usize::MAX);
        assert_eq!(batch.len(), 2);
        assert!(!o.has_sendable());
        o.push(Lane::Control, b("c"), 10);
        assert!(o.has_sendable());
        batch.clear();
        o.next_batch(&mut batch, 10, usize::MAX);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].0, Lane::Control);
        o.ack(&[1, 0, 0, 1]).unwrap();
        assert!(o.has_sendable());
    }
}
