//! The shell requests the notebook's kernel has not answered yet, in the
//! order they were sent: the running cell is the oldest execution, and
//! when the kernel dies each gets an error reply.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use noyau_wire::RawMessage;
use serde_json::Value;

use crate::answer::Cell;

/// A shell request the kernel has not answered yet.
pub(crate) struct Pending {
    pub cell: Cell,
    pub msg_type: String,
}

#[derive(Default)]
pub(crate) struct Requests {
    pending: HashMap<String, Pending>,
    order: VecDeque<String>,
}

impl Requests {
    pub fn insert(&mut self, msg_id: String, p: Pending) {
        self.order.push_back(msg_id.clone());
        self.pending.insert(msg_id, p);
    }

    /// A reply to `parent` came: it is answered (replies come in order).
    pub fn answered(&mut self, parent: &str) {
        self.pending.remove(parent);
        while self
            .order
            .front()
            .is_some_and(|id| !self.pending.contains_key(id))
        {
            self.order.pop_front();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The oldest execution waiting: the cell the kernel runs.
    pub fn running(&self) -> Option<&Cell> {
        self.order
            .iter()
            .filter_map(|id| self.pending.get(id))
            .find(|p| p.msg_type == "execute_request")
            .map(|p| &p.cell)
    }

    /// The running cell's header (where notes about the kernel go).
    pub fn running_header(&self) -> Option<Bytes> {
        self.running().map(|c| c.header.clone())
    }

    /// Every request still waiting, oldest first (the kernel is gone).
    pub fn drain(&mut self) -> Vec<Pending> {
        let order: Vec<String> = self.order.drain(..).collect();
        order
            .into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .collect()
    }

    /// Cells noyau held for the kernel (an environment switch), failed
    /// with the others if it dies.
    pub fn push_held(&mut self, cell: Cell) {
        let id = format!("noyau-held-{}", self.order.len());
        self.insert(
            id,
            Pending {
                cell,
                msg_type: "execute_request".into(),
            },
        );
    }
}

/// msg_ids of the proxy's own requests. An id is forgotten once both its
/// reply (shell) and its final `idle` (IOPub) have passed: they travel on
/// different channels, and either may come first.
#[derive(Default)]
pub(crate) struct Own {
    ids: std::collections::HashMap<String, (bool, bool)>,
}

impl Own {
    pub fn insert(&mut self, id: String) {
        self.ids.insert(id, (false, false));
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Notes the reply (`reply`) or the idle status of `id`.
    pub fn seen(&mut self, id: &str, reply: bool) {
        if let Some(e) = self.ids.get_mut(id) {
            if reply {
                e.0 = true;
            } else {
                e.1 = true;
            }
            if e.0 && e.1 {
                self.ids.remove(id);
            }
        }
    }
}

/// True for an IOPub `status: idle` (the last message of a request).
pub(crate) fn is_idle(msg: &RawMessage) -> bool {
    msg.peek_header().is_ok_and(|h| h.msg_type == "status")
        && serde_json::from_slice::<Value>(&msg.content)
            .is_ok_and(|c| c["execution_state"] == "idle")
}
