//! HMAC-SHA256 message signatures, computed over the raw JSON frames.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::frames::{RawMessage, WireError};

type HmacSha256 = Hmac<Sha256>;

/// Hex digits of an HMAC-SHA256 signature.
const SIG_HEX: usize = 64;

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

    /// The hex signature for these four frames (None when unsigned), into
    /// a buffer: `hex::encode` builds its string a char at a time, a cost
    /// on every relayed message.
    fn signature_hex(&self, parts: [&[u8]; 4]) -> Option<[u8; SIG_HEX]> {
        let mac = self.mac_over(parts)?;
        let mut out = [0u8; SIG_HEX];
        hex::encode_to_slice(mac.finalize().into_bytes(), &mut out)
            .expect("a SHA-256 MAC is 32 bytes");
        Some(out)
    }

    /// Checks the signature in constant time.
    pub fn verify(&self, msg: &RawMessage) -> Result<(), WireError> {
        let Some(mac) = self.mac_over(msg.signed_parts()) else {
            return Ok(());
        };
        let mut sig = [0u8; SIG_HEX / 2];
        match hex::decode_to_slice(&msg.signature, &mut sig) {
            Ok(()) => mac.verify_slice(&sig).map_err(|_| WireError::BadSignature),
            // Hex of another length is a wrong signature, anything else malformed.
            Err(hex::FromHexError::InvalidStringLength) if hex::decode(&msg.signature).is_ok() => {
                Err(WireError::BadSignature)
            }
            Err(_) => Err(WireError::MalformedSignature),
        }
    }

    /// Replaces the signature with this key's, leaving every other frame as is.
    pub fn resign(&self, msg: &mut RawMessage) {
        msg.signature = match self.signature_hex(msg.signed_parts()) {
            Some(hex) => bytes::Bytes::copy_from_slice(&hex),
            None => bytes::Bytes::new(),
        };
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
        m.signature = Bytes::from_static(b"abcd");
        assert!(matches!(a.verify(&m), Err(WireError::BadSignature)));
        m.signature = Bytes::from_static(b"abc");
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
