//! The seam between the magics and what hosts them: [`Host`], through
//! which a magic writes into a cell ([`Output`]), ends it, and asks the
//! notebook's kernel or a target something of its own.
//!
//! The proxy kernel turns outputs into IOPub messages signed for its
//! frontend, and sends its own requests over the agent's link, their
//! replies stopping at the proxy. `noyau run` turns outputs into the
//! cell's outputs in the notebook it writes, and sends its requests to the
//! kernels it drives. The magics know neither sockets nor notebooks.

use serde_json::{json, Value};

use crate::MagicError;

/// One output of a cell, as an IOPub message carries it: `msg_type`
/// (`stream`, `display_data`, `update_display_data`, `clear_output`) and
/// its `content`.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub msg_type: &'static str,
    pub content: Value,
}

impl Output {
    /// Text on `stdout` or `stderr`.
    pub fn stream(name: &str, text: &str) -> Output {
        Output {
            msg_type: "stream",
            content: json!({"name": name, "text": text}),
        }
    }

    /// A plain-text display that later [`Output::update`]s replace.
    pub fn display(display_id: &str, text: &str) -> Output {
        Output {
            msg_type: "display_data",
            content: Self::display_content(display_id, text),
        }
    }

    /// The new text of the display `display_id`.
    pub fn update(display_id: &str, text: &str) -> Output {
        Output {
            msg_type: "update_display_data",
            content: Self::display_content(display_id, text),
        }
    }

    /// Clears the cell's outputs.
    pub fn clear() -> Output {
        Output {
            msg_type: "clear_output",
            content: json!({"wait": false}),
        }
    }

    fn display_content(display_id: &str, text: &str) -> Value {
        json!({
            "data": {"text/plain": text},
            "metadata": {},
            "transient": {"display_id": display_id},
        })
    }
}

/// Whom a request of noyau's own goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer<'a> {
    /// The notebook's kernel.
    Kernel,
    /// The kernel of the target named so (`%%noyau on NAME`).
    Target(&'a str),
}

/// What hosts the magics: the proxy kernel or `noyau run`.
pub trait Host {
    /// A cell as the host knows it (the proxy: the frontend's request; the
    /// runner: the cell's index).
    type Cell: Clone + PartialEq;

    /// Writes `out` into `cell`.
    fn output(&mut self, cell: &Self::Cell, out: Output);

    /// Ends a magic's cell: `Ok(text)` prints the text on stdout and ends
    /// it well; `Err` fails it with the error.
    fn finish(&mut self, cell: &Self::Cell, result: Result<String, MagicError>);

    /// Sends `content` as a silent `execute_request` of noyau's own to
    /// `to`; its msg_id. The reply comes back through the host's
    /// `on_reply` calls (see [`crate::Magics::on_reply`]), and nothing of
    /// it reaches a cell.
    fn request(&mut self, to: Peer<'_>, content: Value) -> Result<String, MagicError>;

    /// The cell the notebook's kernel runs now, if any (where a note about
    /// the Dask cluster's waiting jobs goes).
    fn running_cell(&self) -> Option<Self::Cell>;
}
