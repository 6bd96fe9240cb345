//! What goes back to the frontend from the proxy itself: IOPub messages
//! and replies signed with the frontend's key ([`Answers`]), for the cells
//! noyau answers (magics, a queued kernel, a dead one) and the notes it
//! adds to cells the kernel runs.

use bytes::Bytes;
use noyau_link::Lane;
use noyau_magic::{MagicError, Output};
use noyau_wire::{build, RawMessage, Signer};
use serde_json::{json, Value};

use crate::frontend::{publish, send_router, Frontend};

/// A request the proxy answers, as the frontend sent it.
#[derive(Debug, Clone)]
pub(crate) struct Cell {
    pub identities: Vec<Bytes>,
    pub header: Bytes,
}

impl PartialEq for Cell {
    fn eq(&self, other: &Self) -> bool {
        self.header == other.header
    }
}

impl Cell {
    pub fn of(msg: &RawMessage) -> Cell {
        Cell {
            identities: msg.identities.clone(),
            header: msg.header.clone(),
        }
    }
}

/// An error reply the proxy sends for a request.
pub(crate) struct Failure<'a> {
    /// `execute_reply`, `kernel_info_reply`…
    pub reply_type: &'a str,
    pub ename: &'a str,
    pub evalue: &'a str,
    pub traceback: Value,
    pub execution_count: Value,
}

/// The frontend's sockets, and what signs for them.
pub(crate) struct Answers {
    pub fe: Frontend,
    pub signer: Signer,
    pub session: String,
    /// The notebook's last execution count, for cells noyau answers.
    pub exec_count: i64,
    /// Cells run on targets so far: each took the notebook's next count,
    /// so the notebook kernel's own counts are shifted by this many.
    pub delegated: i64,
}

/// Sets the `execution_count` of an execution's message (execute_input,
/// execute_result, execute_reply) to `count(n)`; the message must be
/// re-signed after. Returns the new count; None for other messages.
pub(crate) fn renumber(msg: &mut RawMessage, count: impl FnOnce(i64) -> i64) -> Option<i64> {
    let kind = msg.peek_header().ok()?.msg_type;
    if !matches!(
        kind.as_str(),
        "execute_input" | "execute_result" | "execute_reply"
    ) {
        return None;
    }
    let mut content: Value = serde_json::from_slice(&msg.content).ok()?;
    let n = count(content.get("execution_count")?.as_i64()?);
    content["execution_count"] = json!(n);
    msg.content = serde_json::to_vec(&content).ok()?.into();
    Some(n)
}

impl Answers {
    /// A message of the proxy's own, signed.
    pub fn message(
        &self,
        ids: Vec<Bytes>,
        kind: &str,
        parent: &Bytes,
        content: Value,
    ) -> RawMessage {
        build::message(&self.signer, ids, kind, &self.session, parent, content)
    }

    /// Greets a new IOPub subscriber with `iopub_welcome` (JEP 65); true
    /// when `sub` was a subscription.
    pub async fn welcome(&mut self, sub: zeromq::ZmqMessage) -> bool {
        let Some(frame) = sub.get(0) else {
            return false;
        };
        if frame.first() != Some(&1) {
            return false;
        }
        let topic = frame.slice(1..);
        let ids = if topic.is_empty() {
            vec![]
        } else {
            vec![topic.clone()]
        };
        let content = json!({"subscription": String::from_utf8_lossy(&topic)});
        let msg = self.message(ids, "iopub_welcome", &Bytes::new(), content);
        self.publish(msg).await;
        true
    }

    pub async fn publish(&mut self, msg: RawMessage) {
        publish(&mut self.fe, msg).await;
    }

    pub async fn send(&mut self, lane: Lane, msg: RawMessage) {
        send_router(&mut self.fe, lane, msg).await;
    }

    pub async fn iopub(&mut self, kind: &str, parent: &Bytes, content: Value) {
        let msg = build::iopub(&self.signer, kind, &self.session, parent, content);
        self.publish(msg).await;
    }

    pub async fn stream(&mut self, parent: &Bytes, name: &str, text: &str) {
        let msg = build::stream(&self.signer, &self.session, parent, name, text);
        self.publish(msg).await;
    }

    pub async fn status(&mut self, parent: &Bytes, state: &str) {
        let msg = build::status(&self.signer, &self.session, parent, state);
        self.publish(msg).await;
    }

    /// A magic's output in `cell`.
    pub async fn output(&mut self, cell: &Cell, out: Output) {
        self.iopub(out.msg_type, &cell.header, out.content).await;
    }

    /// Ends a cell noyau answered (its `busy` went out): the output, the
    /// reply, idle.
    pub async fn finish(&mut self, cell: &Cell, result: Result<String, MagicError>) {
        match result {
            Ok(text) => {
                self.stream(&cell.header, "stdout", &text).await;
                let reply = self.message(
                    cell.identities.clone(),
                    "execute_reply",
                    &cell.header,
                    json!({"status": "ok", "execution_count": self.exec_count, "user_expressions": {}, "payload": []}),
                );
                self.send(Lane::Shell, reply).await;
                self.status(&cell.header, "idle").await;
            }
            Err(e) => {
                let evalue = e.to_string();
                let failure = Failure {
                    reply_type: "execute_reply",
                    ename: e.ename(),
                    evalue: &evalue,
                    traceback: json!([format!("{}: {evalue}", e.ename())]),
                    execution_count: json!(self.exec_count),
                };
                self.fail(cell, failure).await;
            }
        }
    }

    /// Answers a cell at once, as a kernel would: busy, then [`Self::finish`].
    pub async fn answer(&mut self, cell: &Cell, result: Result<String, MagicError>) {
        self.status(&cell.header, "busy").await;
        self.finish(cell, result).await;
    }

    /// Answers a request the kernel never will: for an execution an IOPub
    /// `error`, then the error reply, then `idle`, as a kernel would.
    pub async fn fail(&mut self, cell: &Cell, f: Failure<'_>) {
        if f.reply_type == "execute_reply" {
            let content = json!({"ename": f.ename, "evalue": f.evalue, "traceback": f.traceback});
            self.iopub("error", &cell.header, content).await;
        }
        let reply = self.message(
            cell.identities.clone(),
            f.reply_type,
            &cell.header,
            json!({
                "status": "error", "ename": f.ename, "evalue": f.evalue, "traceback": f.traceback,
                "execution_count": f.execution_count,
            }),
        );
        self.send(Lane::Shell, reply).await;
        self.status(&cell.header, "idle").await;
    }
}
