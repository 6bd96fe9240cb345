//! Splitting multipart frames into the parts of a Jupyter message, without
//! parsing (and so without changing) any of them.

use bytes::Bytes;
use serde::Deserialize;

/// The frame separating routing identities from the message proper.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message has no <IDS|MSG> delimiter frame")]
    NoDelimiter,
    #[error("message has {0} frames after the delimiter; a Jupyter message needs at least 5 (signature, header, parent_header, metadata, content)")]
    TooFewFrames(usize),
    #[error("signature does not match the message (wrong key, or the message was altered)")]
    BadSignature,
    #[error("message is signed but the signature is not hex")]
    MalformedSignature,
    #[error("header is not a JSON object with msg_id and msg_type: {0}")]
    BadHeader(String),
}

/// A Jupyter message as raw frames: identities, signature, the four JSON
/// frames byte for byte, and binary buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub identities: Vec<Bytes>,
    pub signature: Bytes,
    pub header: Bytes,
    pub parent_header: Bytes,
    pub metadata: Bytes,
    pub content: Bytes,
    pub buffers: Vec<Bytes>,
}

/// The header keys a relay routes on; every other key stays in the raw bytes.
#[derive(Debug, Clone, Deserialize)]
pub struct HeaderPeek {
    pub msg_id: String,
    pub msg_type: String,
    #[serde(default)]
    pub session: String,
}

impl RawMessage {
    /// Splits frames at the delimiter. Fails on anything that is not a
    /// Jupyter message, so a relay can drop it with a reason.
    pub fn from_frames(mut frames: Vec<Bytes>) -> Result<Self, WireError> {
        let delim = frames
            .iter()
            .position(|f| f.as_ref() == DELIMITER)
            .ok_or(WireError::NoDelimiter)?;
        let after = frames.len() - delim - 1;
        if after < 5 {
            return Err(WireError::TooFewFrames(after));
        }
        let mut rest = frames.split_off(delim + 1);
        frames.pop(); // the delimiter
        let buffers = rest.split_off(5);
        let mut it = rest.into_iter();
        let mut next = || it.next().unwrap_or_default();
        Ok(RawMessage {
            identities: frames,
            signature: next(),
            header: next(),
            parent_header: next(),
            metadata: next(),
            content: next(),
            buffers,
        })
    }

    /// The frames to put on a socket, identities first. One slot spare:
    /// the link's envelope puts its tag in front without reallocating.
    pub fn into_frames(self) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(self.identities.len() + 7 + self.buffers.len());
        out.extend(self.identities);
        out.push(Bytes::from_static(DELIMITER));
        out.push(self.signature);
        out.push(self.header);
        out.push(self.parent_header);
        out.push(self.metadata);
        out.push(self.content);
        out.extend(self.buffers);
        out
    }

    /// The four frames covered by the HMAC, in signing order.
    pub fn signed_parts(&self) -> [&[u8]; 4] {
        [
            &self.header,
            &self.parent_header,
            &self.metadata,
            &self.content,
        ]
    }

    pub fn peek_header(&self) -> Result<HeaderPeek, WireError> {
        serde_json::from_slice(&self.header).map_err(|e| WireError::BadHeader(e.to_string()))
    }

    /// For a `shutdown_request`: whether it asks for a restart.
    pub fn restart_requested(&self) -> bool {
        #[derive(Deserialize)]
        struct C {
            #[serde(default)]
            restart: bool,
        }
        serde_json::from_slice::<C>(&self.content).is_ok_and(|c| c.restart)
    }

    /// The `msg_id` of the parent header, if there is one.
    pub fn parent_msg_id(&self) -> Option<String> {
        #[derive(Deserialize)]
        struct P {
            msg_id: Option<String>,
        }
        serde_json::from_slice::<P>(&self.parent_header)
            .ok()
            .and_then(|p| p.msg_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
    }

    #[test]
    fn round_trip_keeps_every_byte() {
        let input = frames(&[
            b"id1",
            b"id2",
            DELIMITER,
            b"sig",
            br#"{"msg_id":"1","msg_type":"future_type","x-unknown":{"a":1}}"#,
            b"{}",
            b"{}",
            br#"{"weird": [1, 2]}"#,
            b"\x00\x01binary",
        ]);
        let msg = RawMessage::from_frames(input.clone()).unwrap();
        assert_eq!(msg.identities.len(), 2);
        assert_eq!(msg.buffers, vec![Bytes::from_static(b"\x00\x01binary")]);
        assert_eq!(msg.peek_header().unwrap().msg_type, "future_type");
        assert_eq!(msg.into_frames(), input);
    }

    #[test]
    fn rejects_non_messages() {
        assert!(matches!(
            RawMessage::from_frames(frames(&[b"a", b"b"])),
            Err(WireError::NoDelimiter)
        ));
        assert!(matches!(
            RawMessage::from_frames(frames(&[DELIMITER, b"s", b"{}"])),
            Err(WireError::TooFewFrames(2))
        ));
    }
}
