//! The few messages noyau originates itself (IOPub status and errors, the
//! IOPub welcome, replies on behalf of a dead kernel), built and signed.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::frames::{RawMessage, DELIMITER};
use crate::sign::Signer;

/// The protocol version noyau speaks when it must answer by itself.
pub const PROTOCOL_VERSION: &str = "5.4";

/// Builds a signed message with the given identities (topic for IOPub).
pub fn message(
    signer: &Signer,
    identities: Vec<Bytes>,
    msg_type: &str,
    session: &str,
    parent_header: &Bytes,
    content: Value,
) -> RawMessage {
    let header = json!({
        "msg_id": uuid::Uuid::new_v4().to_string(),
        "msg_type": msg_type,
        "session": session,
        "username": "noyau",
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "version": PROTOCOL_VERSION,
    });
    let parent = if parent_header.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        parent_header.clone()
    };
    let mut msg = RawMessage {
        identities,
        signature: Bytes::new(),
        header: serde_json::to_vec(&header).expect("json").into(),
        parent_header: parent,
        metadata: Bytes::from_static(b"{}"),
        content: serde_json::to_vec(&content).expect("json").into(),
        buffers: vec![],
    };
    signer.resign(&mut msg);
    msg
}

/// An IOPub message; the topic follows ipykernel's `kernel.<id>.<type>`.
pub fn iopub(
    signer: &Signer,
    msg_type: &str,
    session: &str,
    parent_header: &Bytes,
    content: Value,
) -> RawMessage {
    let topic = Bytes::from(format!("kernel.noyau.{msg_type}"));
    message(
        signer,
        vec![topic],
        msg_type,
        session,
        parent_header,
        content,
    )
}

/// An IOPub `stream` message (`name` is "stdout" or "stderr").
pub fn stream(
    signer: &Signer,
    session: &str,
    parent: &Bytes,
    name: &str,
    text: &str,
) -> RawMessage {
    iopub(
        signer,
        "stream",
        session,
        parent,
        json!({"name": name, "text": text}),
    )
}

/// An IOPub `status` message (`state` is "busy" or "idle").
pub fn status(signer: &Signer, session: &str, parent: &Bytes, state: &str) -> RawMessage {
    iopub(
        signer,
        "status",
        session,
        parent,
        json!({"execution_state": state}),
    )
}

/// True when frames look like a complete message (used by tests).
pub fn is_message(frames: &[Bytes]) -> bool {
    frames.iter().any(|f| f.as_ref() == DELIMITER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_messages_verify() {
        let s = Signer::new(b"k");
        let parent = Bytes::from_static(br#"{"msg_id":"p"}"#);
        let m = iopub(
            &s,
            "status",
            "sess",
            &parent,
            json!({"execution_state": "idle"}),
        );
        s.verify(&m).unwrap();
        assert_eq!(m.parent_msg_id().as_deref(), Some("p"));
        assert_eq!(m.peek_header().unwrap().msg_type, "status");
        assert!(is_message(&m.into_frames()));
    }
}
