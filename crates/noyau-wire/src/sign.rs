//! HMAC-SHA256 message signatures, computed over the raw JSON frames.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::frames::{RawMessage, WireError};

type HmacSha256 = Hmac<Sha256>;

/// Signs and verifies with one connection's key. An empty key means the
/// connection is unsigned, as in the Jupyter spec.
#[derive(Clone)]
pub struct Signer {
    mac: Option<HmacSha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Signer")
            .field("signed", &self.mac.is_some())
            .finish()
    }
}

impl Signer {
    pub fn new(key: &[u8]) -> Self {
        let mac = if key.is_empty() {
            None
        } else {
            Some(HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length"))
        };
        Signer { mac }
    }

    fn mac_over(&self, parts: [&[u8]; 4]) -> Option<HmacSha256> {
        let mut mac = self.mac.clone()?;
        for p in parts {
            mac.update(p);
        }
        Some(mac)
    }

    /// The hex signature for these four frames ("" when unsigned).
    pub fn signature(&self, parts: [&[u8]; 4]) -> String {
        match self.mac_over(parts) {
            Some(mac) => hex::encode(mac.finalize().into_bytes()),
            None => String::new(),
        }
    }

    /// Checks the signature in constant time.
    pub fn verify(&self, msg: &RawMessage) -> Result<(), WireError> {
        let Some(mac) = self.mac_over(msg.signed_parts()) else {
            return Ok(());
        };
        let sig = hex::decode(&msg.signature).map_err(|_| WireError::MalformedSignature)?;
        mac.verify_slice(&sig).map_err(|_| WireError::BadSignature)
    }

    /// Replaces the signature with this key's, leaving every other frame as is.
    pub fn resign(&self, msg: &mut RawMessage) {
        msg.signature = self.signature(msg.signed_parts()).into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::DELIMITER;
    use bytes::Bytes;

    fn msg(signer: &Signer) -> RawMessage {
        let mut m = RawMessage::from_frames(
            [
                DELIMITER,
                b"",
                br#"{"msg_id":"1","msg_type":"x"}"#,
                b"{}",
                b"{}",
                b"{}",
            ]
            .iter()
            .map(|p| Bytes::copy_from_slice(p))
            .collect(),
        )
        .unwrap();
        signer.resign(&mut m);
        m
    }

    #[test]
    fn verify_and_resign() {
        let a = Signer::new(b"key-a");
        let b = Signer::new(b"key-b");
        let mut m = msg(&a);
        a.verify(&m).unwrap();
        assert!(matches!(b.verify(&m), Err(WireError::BadSignature)));
        b.resign(&mut m);
        b.verify(&m).unwrap();
    }

    #[test]
    fn tampering_is_detected() {
        let a = Signer::new(b"key-a");
        let mut m = msg(&a);
        m.content = Bytes::from_static(br#"{"code":"rm -rf /"}"#);
        assert!(matches!(a.verify(&m), Err(WireError::BadSignature)));
        m.signature = Bytes::from_static(b"not hex");
        assert!(matches!(a.verify(&m), Err(WireError::MalformedSignature)));
    }

    #[test]
    fn empty_key_is_unsigned() {
        let s = Signer::new(b"");
        let m = msg(&s);
        assert!(m.signature.is_empty());
        s.verify(&m).unwrap();
    }
}
