//! Everything the kernel says goes through the outbox on its way to the link.
//!
//! The outbox outlives links: between a proxy's detach and the next proxy's
//! arrival it keeps what the kernel sends (bounded), and when the link's own
//! buffer is full it counts what had to be dropped and tells the user so in
//! the output stream, instead of losing it silently.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use noyau_link::{envelope, Lane, LinkError, LinkSender};
use noyau_wire::{build, Signer};
use serde_json::json;

/// Bound for what is kept while no link is attached.
const DETACHED_LIMIT: usize = 64 << 20;

pub struct Outbox {
    inner: Mutex<Inner>,
    signer: Signer,
    session: String,
}

struct Inner {
    link: Option<LinkSender>,
    backlog: VecDeque<(Lane, Vec<Bytes>)>,
    backlog_bytes: usize,
    lost: u64,
}

fn size(frames: &[Bytes]) -> usize {
    frames.iter().map(|f| f.len() + 8).sum()
}

impl Outbox {
    pub fn new(signer: Signer, session: String) -> Self {
        Outbox {
            inner: Mutex::new(Inner {
                link: None,
                backlog: VecDeque::new(),
                backlog_bytes: 0,
                lost: 0,
            }),
            signer,
            session,
        }
    }

    /// Attaches a new link and hands it what was kept meanwhile.
    pub fn attach(&self, link: LinkSender) {
        let mut inner = self.inner.lock().expect("outbox lock");
        let backlog = std::mem::take(&mut inner.backlog);
        inner.backlog_bytes = 0;
        for (lane, frames) in backlog {
            if link.send(lane, frames).is_err() {
                inner.lost += 1;
            }
        }
        inner.link = Some(link);
    }

    pub fn detach(&self) {
        self.inner.lock().expect("outbox lock").link = None;
    }

    /// Sends a Jupyter message (raw frames, already verified) on a lane.
    pub fn jupyter(&self, lane: Lane, frames: Vec<Bytes>, parent_header: &Bytes) {
        self.push(lane, envelope::jupyter(frames), Some(parent_header));
    }

    /// Sends an event; events are small and never dropped for space.
    pub fn event(&self, lane: Lane, ev: &envelope::Event) {
        self.push(lane, envelope::event(ev), None);
    }

    fn push(&self, lane: Lane, frames: Vec<Bytes>, parent: Option<&Bytes>) {
        let mut inner = self.inner.lock().expect("outbox lock");
        if inner.lost > 0 {
            if let Some(parent) = parent {
                let notice = self.lost_notice(inner.lost, parent);
                if try_send(&mut inner, Lane::Iopub, notice) {
                    inner.lost = 0;
                }
            }
        }
        if !try_send(&mut inner, lane, frames) {
            inner.lost += 1;
        }
    }

    fn lost_notice(&self, lost: u64, parent: &Bytes) -> Vec<Bytes> {
        let text = format!(
            "[noyau] {lost} output message(s) from the kernel were lost: the link to the frontend \
             was down long enough for its buffer to fill up. Raise NOYAU_LINK_BUFFER_MB, or write \
             large outputs to files.\n"
        );
        let msg = build::iopub(
            &self.signer,
            "stream",
            &self.session,
            parent,
            json!({"name": "stderr", "text": text}),
        );
        tracing::warn!(lost, "output lost: link buffer full");
        envelope::jupyter(msg.into_frames())
    }
}

/// True when the message was taken (by the link or the backlog).
fn try_send(inner: &mut Inner, lane: Lane, frames: Vec<Bytes>) -> bool {
    match &inner.link {
        Some(link) => match link.send(lane, frames) {
            Ok(()) => true,
            Err(LinkError::BufferFull { .. }) => false,
            Err(e) => {
                tracing::warn!("link send failed: {e}");
                false
            }
        },
        None => {
            let n = size(&frames);
            if inner.backlog_bytes + n > DETACHED_LIMIT && lane != Lane::Control {
                return false;
            }
            inner.backlog_bytes += n;
            inner.backlog.push_back((lane, frames));
            true
        }
    }
}
