//! Everything the kernel says goes through the outbox on its way to the link.
//!
//! Normally a message goes straight into the link, whose own buffer carries
//! it across short outages. When the link is detached (between two proxies)
//! or its buffer is full (a long outage), messages wait here, in order. This
//! queue is bounded too, but only for bulk output: past the bound, `stream`
//! and display messages are dropped and counted, and a notice saying how many
//! were lost takes their place in the output. Statuses, replies and errors
//! are never dropped, so a frontend always learns that a cell finished.
//! A ticker retries the queue, so it drains even when the kernel is quiet;
//! it runs only while something waits here, and an idle agent's ticker
//! sleeps until then (at 50 ms it had been 20 of the idle agent's 54
//! wake-ups a second, measured by bench/idle).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use noyau_link::{envelope, Lane, LinkError, LinkSender};
use noyau_wire::{build, RawMessage, Signer};
use tokio::sync::Notify;

/// How often the ticker retries a non-empty queue.
const RETRY_EVERY: Duration = Duration::from_millis(50);

pub struct Outbox {
    inner: Mutex<Inner>,
    /// Wakes the ticker: something was queued, or the outbox is gone.
    queued: Arc<Notify>,
    /// Bound for bulk output waiting here (the link holds as much again).
    limit: usize,
    signer: Signer,
    session: String,
}

enum Entry {
    Message {
        lane: Lane,
        frames: Vec<Bytes>,
    },
    /// Stands for `count` dropped outputs; becomes a stream message on send.
    Lost {
        count: u64,
        parent: Bytes,
    },
}

struct Inner {
    link: Option<LinkSender>,
    queue: VecDeque<Entry>,
    queued_bytes: usize,
}

fn size(frames: &[Bytes]) -> usize {
    frames.iter().map(|f| f.len() + 8).sum()
}

/// True for output a user can be told was lost: streams and displays.
fn droppable(lane: Lane, frames: &[Bytes]) -> bool {
    if lane != Lane::Iopub {
        return false;
    }
    // Envelope tag first, then the Jupyter frames.
    match RawMessage::from_frames(frames[1..].to_vec()).and_then(|m| m.peek_header()) {
        Ok(h) => matches!(
            h.msg_type.as_str(),
            "stream" | "display_data" | "update_display_data"
        ),
        Err(_) => false,
    }
}

fn parent_of(frames: &[Bytes]) -> Bytes {
    RawMessage::from_frames(frames[1..].to_vec())
        .map(|m| m.parent_header)
        .unwrap_or_default()
}

impl Outbox {
    pub fn new(signer: Signer, session: String, limit: usize) -> Arc<Self> {
        let queued = Arc::new(Notify::new());
        let outbox = Arc::new(Outbox {
            limit,
            inner: Mutex::new(Inner {
                link: None,
                queue: VecDeque::new(),
                queued_bytes: 0,
            }),
            queued: queued.clone(),
            signer,
            session,
        });
        let weak = Arc::downgrade(&outbox);
        tokio::spawn(async move {
            loop {
                queued.notified().await;
                loop {
                    tokio::time::sleep(RETRY_EVERY).await;
                    let Some(outbox) = weak.upgrade() else { return };
                    let mut inner = outbox.lock();
                    outbox.drain(&mut inner);
                    if inner.queue.is_empty() {
                        break;
                    }
                }
                if weak.strong_count() == 0 {
                    return;
                }
            }
        });
        outbox
    }

    /// Attaches a new link and hands it what waited meanwhile.
    pub fn attach(&self, link: LinkSender) {
        self.lock().link = Some(link);
        self.flush();
    }

    pub fn detach(&self) {
        self.lock().link = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a Jupyter message (raw frames, already verified) on a lane.
    pub fn jupyter(&self, lane: Lane, frames: Vec<Bytes>) {
        self.push(lane, envelope::jupyter(frames));
    }

    /// Sends an event (small; never dropped).
    pub fn event(&self, lane: Lane, ev: &envelope::Event) {
        self.push(lane, envelope::event(ev));
    }

    fn push(&self, lane: Lane, frames: Vec<Bytes>) {
        let mut inner = self.lock();
        if inner.queue.is_empty() {
            match send(&inner, lane, frames) {
                Ok(()) => {}
                Err(frames) => self.enqueue(&mut inner, lane, frames),
            }
        } else {
            self.enqueue(&mut inner, lane, frames);
            self.drain(&mut inner);
        }
    }

    fn enqueue(&self, inner: &mut Inner, lane: Lane, frames: Vec<Bytes>) {
        let n = size(&frames);
        if inner.queued_bytes + n > self.limit && droppable(lane, &frames) {
            match inner.queue.back_mut() {
                Some(Entry::Lost { count, .. }) => *count += 1,
                _ => inner.queue.push_back(Entry::Lost {
                    count: 1,
                    parent: parent_of(&frames),
                }),
            }
            return;
        }
        inner.queued_bytes += n;
        inner.queue.push_back(Entry::Message { lane, frames });
        // A stored permit: the ticker wakes even if it is between rounds.
        self.queued.notify_one();
    }

    /// How many messages wait for a link.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().queue.len()
    }

    /// Moves what it can from the queue into the link.
    pub fn flush(&self) {
        let mut inner = self.lock();
        self.drain(&mut inner);
    }

    fn drain(&self, inner: &mut Inner) {
        while let Some(entry) = inner.queue.pop_front() {
            match entry {
                Entry::Message { lane, frames } => {
                    let n = size(&frames);
                    match send(inner, lane, frames) {
                        Ok(()) => inner.queued_bytes -= n,
                        Err(frames) => {
                            inner.queue.push_front(Entry::Message { lane, frames });
                            return;
                        }
                    }
                }
                Entry::Lost { count, parent } => {
                    let notice = self.lost_notice(count, &parent);
                    if send(inner, Lane::Iopub, notice).is_err() {
                        inner.queue.push_front(Entry::Lost { count, parent });
                        return;
                    }
                    tracing::warn!(lost = count, "output lost: the link's buffer was full");
                }
            }
        }
    }

    fn lost_notice(&self, lost: u64, parent: &Bytes) -> Vec<Bytes> {
        let text = format!(
            "[noyau] {lost} output message(s) from the kernel were lost: the link to the frontend \
             was down long enough for its buffer to fill up. Raise NOYAU_LINK_BUFFER_MB, or write \
             large outputs to files.\n"
        );
        let msg = build::stream(&self.signer, &self.session, parent, "stderr", &text);
        envelope::jupyter(msg.into_frames())
    }
}

impl Drop for Outbox {
    /// Ends the ticker.
    fn drop(&mut self) {
        self.queued.notify_one();
    }
}

/// Gives the frames to the link, or back when it cannot take them now.
fn send(inner: &Inner, lane: Lane, frames: Vec<Bytes>) -> Result<(), Vec<Bytes>> {
    let Some(link) = &inner.link else {
        return Err(frames);
    };
    // The link takes ownership; keep a cheap copy (Bytes are refcounted) to
    // hand back if it refuses.
    match link.send(lane, frames.clone()) {
        Ok(()) => Ok(()),
        Err(LinkError::BufferFull { .. }) => Err(frames),
        Err(e) => {
            tracing::debug!("link send failed: {e}");
            Err(frames)
        }
    }
}
