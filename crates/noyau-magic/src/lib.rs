//! The `%noyau` magics, hosted alike by the proxy kernel (interactive
//! notebooks) and by `noyau run` (headless runs, detached runs, sweep
//! points), so a notebook means the same wherever it runs.
//!
//! How the pieces fit:
//!
//! * [`parse`]: what a cell is to noyau ([`Magic`]): `%%noyau on TARGET`
//!   (the cell runs on a target), a `%noyau …` line ([`Command`], parsed
//!   once, one variant per magic), or none.
//! * [`Host`] is the seam: a magic writes into a cell through it
//!   ([`Output`], an IOPub-like output), ends the cell, and sends silent
//!   requests of noyau's own to the notebook's kernel or a target
//!   ([`Peer`]), whose replies the host hands back (`on_reply`). The proxy
//!   turns outputs into IOPub messages signed for its frontend; the runner
//!   into the cell's outputs in the notebook it writes.
//! * [`Magics`] holds what outlives a cell: the transfers in flight
//!   ([`transfer`]: push/pull) and the Dask cluster ([`dask`], whose task
//!   lives in noyau-dask and is driven by the job watcher's events).
//! * Stateless helpers both hosts use: [`env`] (`env show|lock`),
//!   [`targets`] (the `%noyau targets` table, the where-line), [`note`]
//!   (why a job waits, as a display updated in place).
//!
//! What stays with each host: the targets themselves (the proxy relays a
//! target's messages to its frontend; the runner drives the target's
//! kernel) and restarting the kernel in another environment (the proxy's
//! `%noyau env SPEC`).

mod command;
pub mod dask;
pub mod env;
mod error;
mod host;
pub mod note;
mod parse;
pub mod targets;
#[cfg(test)]
mod testing;
pub mod transfer;

pub use command::{Command, USAGE};
pub use error::MagicError;
pub use host::{Host, Output, Peer};
pub use parse::{parse, Magic, OnMagic};
pub use transfer::Direction;

use serde_json::Value;

/// What the magics keep between cells.
pub struct Magics<C> {
    pub transfers: transfer::Transfers<C>,
    pub dask: dask::Dask<C>,
}

impl<C> Default for Magics<C> {
    fn default() -> Self {
        Magics {
            transfers: Default::default(),
            dask: Default::default(),
        }
    }
}

impl<C: Clone + PartialEq> Magics<C> {
    /// The reply to a request of noyau's own; false when no magic waits
    /// for it.
    pub fn on_reply<H: Host<Cell = C>>(&mut self, host: &mut H, id: &str, reply: &Value) -> bool {
        self.transfers.on_reply(host, id, reply) || self.dask.on_reply(host, id, reply)
    }
}
