//! The link as a proxy or agent reads it from TLS: a stream of frames
//! (first input byte: handshake or session size cap), then the envelope of a
//! data frame's parts (input split at 0x1E).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use noyau_link::{envelope, fuzzing};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    fuzzing::decode_stream(rest, mode & 1 == 0);
    let parts: Vec<Bytes> = rest
        .split(|&b| b == 0x1e)
        .map(Bytes::copy_from_slice)
        .collect();
    let _ = envelope::open(parts);
});
