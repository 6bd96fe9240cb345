//! `%noyau push TARGET a b` and `%noyau pull TARGET c`: moving Python
//! variables between the notebook's kernel and a target's.
//!
//! The kernels serialise the values themselves (pickle, base64 for the
//! JSON trip): the host asks the source kernel for the bytes through a
//! silent `execute_request` whose `user_expressions` evaluates to them, then
//! sends the destination kernel a silent request that loads them into its
//! globals. Both are requests of noyau's own ([`Host::request`]); the
//! user's cell ends once the destination has replied. Other languages use
//! a shared filesystem (docs/architecture.md, "Targets").

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::{Host, MagicError, Peer};

/// Which way the variables go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Notebook kernel → target.
    Push,
    /// Target → notebook kernel.
    Pull,
}

/// Where a transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for the source kernel's reply carrying the bytes.
    Dump,
    /// Waiting for the destination kernel to load them.
    Load,
}

/// A transfer in flight, keyed by the msg_id of its current request.
struct Flight<C> {
    direction: Direction,
    target: String,
    names: Vec<String>,
    stage: Stage,
    /// The user's `%noyau push/pull` cell, ended at the end.
    cell: C,
    bytes: usize,
}

/// The transfers in flight.
pub struct Transfers<C> {
    flights: HashMap<String, Flight<C>>,
}

impl<C> Default for Transfers<C> {
    fn default() -> Self {
        Transfers {
            flights: HashMap::new(),
        }
    }
}

impl<C: Clone + PartialEq> Transfers<C> {
    /// Sends the source kernel the request that dumps `names` (checked
    /// Python names, [`crate::Command::parse`]). The host has made sure the
    /// target runs.
    pub fn start<H: Host<Cell = C>>(
        &mut self,
        host: &mut H,
        cell: C,
        direction: Direction,
        target: &str,
        names: Vec<String>,
    ) -> Result<(), MagicError> {
        let from = match direction {
            Direction::Push => Peer::Kernel,
            Direction::Pull => Peer::Target(target),
        };
        let id = host.request(from, dump_request(&names))?;
        self.flights.insert(
            id,
            Flight {
                direction,
                target: target.to_string(),
                names,
                stage: Stage::Dump,
                cell,
                bytes: 0,
            },
        );
        Ok(())
    }

    /// The reply to request `id`, if it is one of a transfer's: the next
    /// request goes, or the cell ends. False when `id` is not a transfer's.
    pub fn on_reply<H: Host<Cell = C>>(&mut self, host: &mut H, id: &str, reply: &Value) -> bool {
        let Some(mut f) = self.flights.remove(id) else {
            return false;
        };
        let outcome = match f.stage {
            Stage::Dump => match failed(reply).map_or_else(|| dumped(reply), Err) {
                Err(e) => Err(e),
                Ok(b64) => {
                    f.bytes = b64.len() * 3 / 4;
                    let to = match f.direction {
                        Direction::Push => Peer::Target(&f.target),
                        Direction::Pull => Peer::Kernel,
                    };
                    match host.request(to, load_request(&b64)) {
                        Ok(next) => {
                            f.stage = Stage::Load;
                            self.flights.insert(next, f);
                            return true;
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
            Stage::Load => match failed(reply) {
                Some(e) => Err(e),
                None => Ok(done(&f)),
            },
        };
        host.finish(&f.cell, outcome.map_err(MagicError::Transfer));
        true
    }

    /// Target `name` is gone: its transfers fail with `why`.
    pub fn target_ended<H: Host<Cell = C>>(&mut self, host: &mut H, name: &str, why: &str) {
        let stuck: Vec<String> = self
            .flights
            .iter()
            .filter(|(_, f)| f.target == name)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stuck {
            if let Some(f) = self.flights.remove(&id) {
                let text = format!("target {name} ended: {why}");
                host.finish(&f.cell, Err(MagicError::Transfer(text)));
            }
        }
    }

    /// True while a transfer waits for a reply from `peer`'s kernel.
    pub fn waits_on(&self, target: &str) -> bool {
        self.flights.values().any(|f| {
            f.target == target
                && matches!(
                    (f.direction, f.stage),
                    (Direction::Push, Stage::Load) | (Direction::Pull, Stage::Dump)
                )
        })
    }
}

/// What the user's cell says at the end.
fn done<C>(f: &Flight<C>) -> String {
    let (verb, prep) = match f.direction {
        Direction::Push => ("pushed", "to"),
        Direction::Pull => ("pulled", "from"),
    };
    format!(
        "[noyau] {verb} {} {prep} target {} ({} bytes)\n",
        f.names.join(", "),
        f.target,
        f.bytes
    )
}

/// The kernel's error in a reply, if it failed.
fn failed(reply: &Value) -> Option<String> {
    (reply["status"] != "ok").then(|| {
        format!(
            "{}: {}",
            reply["ename"].as_str().unwrap_or("error"),
            reply["evalue"].as_str().unwrap_or("")
        )
    })
}

/// The `user_expressions` entry that makes a kernel hand over `names`.
pub fn dump_request(names: &[String]) -> Value {
    let dict = names
        .iter()
        .map(|n| format!("{n:?}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    json!({
        "code": "",
        "silent": true,
        "store_history": false,
        "allow_stdin": false,
        "stop_on_error": false,
        "user_expressions": {
            "noyau_transfer": format!(
                "__import__('base64').b64encode(__import__('pickle').dumps({{{dict}}})).decode('ascii')"
            ),
        },
    })
}

/// The base64 text from a dump reply, or the kernel's error.
pub fn dumped(reply: &Value) -> Result<String, String> {
    let expr = &reply["user_expressions"]["noyau_transfer"];
    if expr["status"] != "ok" {
        return Err(format!(
            "{}: {}",
            expr["ename"].as_str().unwrap_or("error"),
            expr["evalue"]
                .as_str()
                .unwrap_or("the variables could not be serialised")
        ));
    }
    let repr = expr["data"]["text/plain"].as_str().unwrap_or_default();
    // The repr of an ASCII str: quotes around base64, nothing to unescape.
    let b64 = repr.trim_matches(|c| c == '\'' || c == '"');
    if b64.is_empty()
        || !b64
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
    {
        return Err("the kernel's answer was not base64".into());
    }
    Ok(b64.to_string())
}

/// The request that loads the bytes into the destination's globals.
pub fn load_request(b64: &str) -> Value {
    json!({
        "code": format!(
            "globals().update(__import__('pickle').loads(__import__('base64').b64decode('{b64}')))"
        ),
        "silent": true,
        "store_history": false,
        "allow_stdin": false,
        "stop_on_error": false,
        "user_expressions": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Recorder;

    #[test]
    fn dump_and_load_requests() {
        let r = dump_request(&["x".into(), "y".into()]);
        let e = r["user_expressions"]["noyau_transfer"].as_str().unwrap();
        assert!(e.contains(r#"{"x": x, "y": y}"#), "{e}");
        let reply = json!({"user_expressions": {"noyau_transfer": {
            "status": "ok", "data": {"text/plain": "'gASVCQAAAAAAAAB9lC4='"}}}});
        assert_eq!(dumped(&reply).unwrap(), "gASVCQAAAAAAAAB9lC4=");
        let bad = json!({"user_expressions": {"noyau_transfer": {
            "status": "error", "ename": "NameError", "evalue": "name 'x' is not defined"}}});
        assert!(dumped(&bad).unwrap_err().contains("NameError"));
        assert!(load_request("QUJD")["code"]
            .as_str()
            .unwrap()
            .contains("'QUJD'"));
    }

    #[test]
    fn a_push_dumps_loads_and_ends_its_cell() {
        let mut h = Recorder::default();
        let mut t = Transfers::default();
        t.start(&mut h, 7, Direction::Push, "side", vec!["x".into()])
            .unwrap();
        assert_eq!(h.sent[0].0, "kernel");
        let reply = json!({"status": "ok", "user_expressions": {"noyau_transfer": {
            "status": "ok", "data": {"text/plain": "'QUJD'"}}}});
        assert!(t.on_reply(&mut h, "r0", &reply));
        assert_eq!(h.sent[1].0, "side");
        assert!(t.waits_on("side"));
        assert!(t.on_reply(&mut h, "r1", &json!({"status": "ok"})));
        assert_eq!(
            h.finished,
            vec![(7, Ok("[noyau] pushed x to target side (3 bytes)\n".into()))]
        );
        assert!(!t.on_reply(&mut h, "r9", &json!({})));
    }

    #[test]
    fn a_target_ending_fails_its_transfers() {
        let mut h = Recorder::default();
        let mut t = Transfers::default();
        t.start(&mut h, 1, Direction::Pull, "side", vec!["x".into()])
            .unwrap();
        t.target_ended(&mut h, "side", "released");
        assert_eq!(
            h.finished,
            vec![(
                1,
                Err(MagicError::Transfer("target side ended: released".into()))
            )]
        );
    }
}
