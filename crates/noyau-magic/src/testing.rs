//! A [`Host`] that records what the magics did, for the unit tests.

use serde_json::Value;

use crate::{Host, MagicError, Output, Peer};

/// A host that records what the magics did, for the flows' unit tests.
#[derive(Default)]
pub struct Recorder {
    pub sent: Vec<(String, Value)>,
    pub finished: Vec<(u32, Result<String, MagicError>)>,
    pub outputs: Vec<(u32, Output)>,
    pub running: Option<u32>,
}

impl Host for Recorder {
    type Cell = u32;
    fn output(&mut self, cell: &u32, out: Output) {
        self.outputs.push((*cell, out));
    }
    fn finish(&mut self, cell: &u32, result: Result<String, MagicError>) {
        self.finished.push((*cell, result));
    }
    fn request(&mut self, to: Peer<'_>, content: Value) -> Result<String, MagicError> {
        let id = format!("r{}", self.sent.len());
        let who = match to {
            Peer::Kernel => "kernel".to_string(),
            Peer::Target(t) => t.to_string(),
        };
        self.sent.push((who, content));
        Ok(id)
    }
    fn running_cell(&self) -> Option<u32> {
        self.running
    }
}
