//! Jupyter multipart frames as a relay receives them: split at the
//! delimiter, verified, re-signed, peeked at. Input: frames separated by the
//! byte 0x1E (ASCII record separator).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use noyau_wire::{RawMessage, Signer};

fuzz_target!(|data: &[u8]| {
    let frames: Vec<Bytes> = data
        .split(|&b| b == 0x1e)
        .map(Bytes::copy_from_slice)
        .collect();
    let Ok(mut msg) = RawMessage::from_frames(frames) else {
        return;
    };
    let a = Signer::new(b"key-a");
    let _ = a.verify(&msg);
    let _ = msg.peek_header();
    let _ = msg.restart_requested();
    let _ = msg.parent_msg_id();
    // Re-signing changes only the signature, and the result verifies.
    let b = Signer::new(b"key-b");
    b.resign(&mut msg);
    b.verify(&msg).expect("a message we signed verifies");
    let again = RawMessage::from_frames(msg.clone().into_frames()).expect("our frames split");
    assert_eq!(again, msg);
});
