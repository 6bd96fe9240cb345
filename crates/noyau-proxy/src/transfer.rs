//! `%noyau push TARGET a b` and `%noyau pull TARGET c`: moving Python
//! variables between the notebook's kernel and a target's.
//!
//! The kernels serialise the values themselves (pickle, base64 for the
//! JSON trip): the proxy asks the source kernel for the bytes through a
//! silent `execute_request` whose `user_expressions` evaluates to them, then
//! sends the destination kernel a silent request that loads them into its
//! globals. Both requests are the proxy's own (no frontend identity); their
//! replies and statuses stop at the proxy, which answers the user's cell
//! once the destination has replied. Other languages use a shared
//! filesystem (docs/architecture.md, "Targets").

use bytes::Bytes;
use serde_json::{json, Value};

/// The proxy's own requests in flight. An id is forgotten once both its
/// reply (shell) and its final `idle` (IOPub) have passed: they travel on
/// different channels, and either may come first.
#[derive(Default)]
pub struct Internal {
    ids: std::collections::HashMap<String, (bool, bool)>,
}

impl Internal {
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
pub enum Stage {
    /// Waiting for the source kernel's reply carrying the bytes.
    Dump,
    /// Waiting for the destination kernel to load them.
    Load,
}

/// A transfer in flight, keyed by the msg_id of its current request.
pub struct Transfer {
    pub direction: Direction,
    pub target: String,
    pub names: Vec<String>,
    pub stage: Stage,
    /// The user's `%noyau push/pull` request, answered at the end.
    pub identities: Vec<Bytes>,
    pub header: Bytes,
    pub bytes: usize,
}

/// Names must be Python identifiers: they are pasted into code.
pub fn check_names(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err("name at least one variable".into());
    }
    for n in names {
        let mut chars = n.chars();
        let ok = chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
            && chars.all(|c| c == '_' || c.is_alphanumeric());
        if !ok {
            return Err(format!("{n:?} is not a Python variable name"));
        }
    }
    Ok(())
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

/// True for an IOPub `status: idle` (the last message of a request).
pub fn is_idle(msg: &noyau_wire::RawMessage) -> bool {
    msg.peek_header().is_ok_and(|h| h.msg_type == "status")
        && serde_json::from_slice::<Value>(&msg.content)
            .is_ok_and(|c| c["execution_state"] == "idle")
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

    #[test]
    fn names_are_checked() {
        assert!(check_names(&["a".into(), "_b2".into()]).is_ok());
        assert!(check_names(&["a; import os".into()]).is_err());
        assert!(check_names(&[]).is_err());
    }

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
}
