//! The frame format on the wire, inside TLS.
//!
//! Every frame is `u32 length (big endian) | u8 kind | body`, where `length`
//! counts `kind` and `body`. A length prefix (rather than a delimiter) lets the
//! reader slice message parts out of its read buffer without copying, and lets
//! it refuse an oversized frame before buffering it. Decoding never trusts a
//! length from the network: every read is bounds-checked and a bad frame is an
//! error that closes the connection, never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Lane, LinkError};

/// Largest frame we accept or send by default (`LinkConfig::max_frame`).
/// Jupyter messages can carry big binary buffers, but a bound keeps a hostile
/// or broken peer from making us allocate without limit.
pub(crate) const MAX_FRAME: usize = 512 * 1024 * 1024;

/// Largest handshake frame (hello, resume, welcome, refused). Anyone can open
/// a TLS connection to the proxy: before the token is checked, a peer must not
/// make it reserve room for a 512 MiB frame.
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 64 * 1024;

/// Protocol version carried in `Hello` and `Resume`, so a mismatched peer gets
/// a clear refusal instead of garbage.
pub(crate) const VERSION: u8 = 1;

pub(crate) type SessionId = [u8; 16];
pub(crate) type Secret = [u8; 32];
/// Last received sequence number per lane, indexed by `Lane as usize`.
pub(crate) type LaneSeqs = [u64; 4];

const HELLO: u8 = 1;
const RESUME: u8 = 2;
const WELCOME: u8 = 3;
const REFUSED: u8 = 4;
const DATA: u8 = 5;
const ACK: u8 = 6;
const PING: u8 = 7;
const GOODBYE: u8 = 8;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// Agent → proxy, first frame of a new session.
    Hello {
        token: String,
    },
    /// Agent → proxy, first frame of a reconnect.
    Resume {
        session: SessionId,
        secret: Secret,
        last_recv: LaneSeqs,
    },
    /// Proxy → agent: accepted; here is the secret for the next reconnect and
    /// what the proxy has already received.
    Welcome {
        session: SessionId,
        secret: Secret,
        last_recv: LaneSeqs,
    },
    /// Proxy → agent: refused, with a reason for humans. The proxy then closes.
    Refused {
        reason: String,
    },
    Data {
        lane: Lane,
        seq: u64,
        parts: Vec<Bytes>,
    },
    /// Cumulative acknowledgement, per lane.
    Ack {
        last_recv: LaneSeqs,
    },
    Ping,
    Goodbye,
}

/// Size on the wire of a data frame carrying `parts`, length prefix included.
pub(crate) fn data_frame_len(parts: &[Bytes]) -> usize {
    4 + 1 + 1 + 8 + 4 + parts.iter().map(|p| 4 + p.len()).sum::<usize>()
}

/// Writes the header of a data frame; the caller then writes each part as
/// `u32 len | bytes` (see [`put_part_len`]) so big parts need not be copied.
pub(crate) fn put_data_header(out: &mut BytesMut, lane: Lane, seq: u64, parts: &[Bytes]) {
    let len = data_frame_len(parts) - 4;
    out.put_u32(len as u32);
    out.put_u8(DATA);
    out.put_u8(lane as u8);
    out.put_u64(seq);
    out.put_u32(parts.len() as u32);
}

pub(crate) fn put_part_len(out: &mut BytesMut, part: &Bytes) {
    out.put_u32(part.len() as u32);
}

/// Encodes a whole frame into `out`.
pub(crate) fn encode(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Data { lane, seq, parts } => {
            put_data_header(out, *lane, *seq, parts);
            for p in parts {
                put_part_len(out, p);
                out.extend_from_slice(p);
            }
        }
        Frame::Hello { token } => {
            put_head(out, HELLO, 1 + token.len());
            out.put_u8(VERSION);
            out.extend_from_slice(token.as_bytes());
        }
        Frame::Resume {
            session,
            secret,
            last_recv,
        } => {
            put_head(out, RESUME, 1 + 16 + 32 + 32);
            out.put_u8(VERSION);
            out.extend_from_slice(session);
            out.extend_from_slice(secret);
            put_seqs(out, last_recv);
        }
        Frame::Welcome {
            session,
            secret,
            last_recv,
        } => {
            put_head(out, WELCOME, 16 + 32 + 32);
            out.extend_from_slice(session);
            out.extend_from_slice(secret);
            put_seqs(out, last_recv);
        }
        Frame::Refused { reason } => {
            put_head(out, REFUSED, reason.len());
            out.extend_from_slice(reason.as_bytes());
        }
        Frame::Ack { last_recv } => {
            put_head(out, ACK, 32);
            put_seqs(out, last_recv);
        }
        Frame::Ping => put_head(out, PING, 0),
        Frame::Goodbye => put_head(out, GOODBYE, 0),
    }
}

fn put_head(out: &mut BytesMut, kind: u8, body_len: usize) {
    out.put_u32((1 + body_len) as u32);
    out.put_u8(kind);
}

fn put_seqs(out: &mut BytesMut, seqs: &LaneSeqs) {
    for s in seqs {
        out.put_u64(*s);
    }
}

/// Takes one complete frame off the front of `buf`, or returns `None` if more
/// bytes are needed (after reserving room for them). A frame longer than
/// `max` bytes is refused before anything is reserved for it.
pub(crate) fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, LinkError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(LinkError::FrameTooLarge { len, max });
    }
    if len == 0 {
        return Err(LinkError::Protocol("empty frame".into()));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut body = buf.split_to(len).freeze();
    let kind = body.get_u8();
    let frame = match kind {
        DATA => {
            let lane = take_u8(&mut body)?;
            let lane = Lane::from_u8(lane)
                .ok_or_else(|| LinkError::Protocol(format!("unknown lane {lane}")))?;
            let seq = take_u64(&mut body)?;
            let n = take_u32(&mut body)? as usize;
            // Each part needs at least its 4-byte length: reject absurd counts
            // before allocating for them.
            if n > body.remaining() / 4 {
                return Err(LinkError::Protocol(format!(
                    "data frame claims {n} parts in {} bytes",
                    body.remaining()
                )));
            }
            let mut parts = Vec::with_capacity(n);
            for _ in 0..n {
                let plen = take_u32(&mut body)? as usize;
                if plen > body.remaining() {
                    return Err(LinkError::Protocol(format!(
                        "part of {plen} bytes overruns its frame"
                    )));
                }
                parts.push(body.split_to(plen));
            }
            Frame::Data { lane, seq, parts }
        }
        HELLO => {
            check_version(take_u8(&mut body)?)?;
            Frame::Hello {
                token: take_string(body)?,
            }
        }
        RESUME => {
            check_version(take_u8(&mut body)?)?;
            Frame::Resume {
                session: take_array(&mut body)?,
                secret: take_array(&mut body)?,
                last_recv: take_seqs(&mut body)?,
            }
        }
        WELCOME => Frame::Welcome {
            session: take_array(&mut body)?,
            secret: take_array(&mut body)?,
            last_recv: take_seqs(&mut body)?,
        },
        REFUSED => Frame::Refused {
            reason: take_string(body)?,
        },
        ACK => Frame::Ack {
            last_recv: take_seqs(&mut body)?,
        },
        PING => Frame::Ping,
        GOODBYE => Frame::Goodbye,
        other => return Err(LinkError::Protocol(format!("unknown frame kind {other}"))),
    };
    Ok(Some(frame))
}

fn check_version(v: u8) -> Result<(), LinkError> {
    if v == VERSION {
        Ok(())
    } else {
        Err(LinkError::Protocol(format!(
            "peer speaks link protocol version {v}, we speak {VERSION}: use the same noyau version on both sides"
        )))
    }
}

fn short() -> LinkError {
    LinkError::Protocol("truncated frame".into())
}

fn take_u8(b: &mut Bytes) -> Result<u8, LinkError> {
    if b.remaining() < 1 {
        return Err(short());
    }
    Ok(b.get_u8())
}

fn take_u32(b: &mut Bytes) -> Result<u32, LinkError> {
    if b.remaining() < 4 {
        return Err(short());
    }
    Ok(b.get_u32())
}

fn take_u64(b: &mut Bytes) -> Result<u64, LinkError> {
    if b.remaining() < 8 {
        return Err(short());
    }
    Ok(b.get_u64())
}

fn take_array<const N: usize>(b: &mut Bytes) -> Result<[u8; N], LinkError> {
    if b.remaining() < N {
        return Err(short());
    }
    let mut a = [0u8; N];
    b.copy_to_slice(&mut a);
    Ok(a)
}

fn take_seqs(b: &mut Bytes) -> Result<LaneSeqs, LinkError> {
    let mut s = [0u64; 4];
    for x in &mut s {
        *x = take_u64(b)?;
    }
    Ok(s)
}

fn take_string(b: Bytes) -> Result<String, LinkError> {
    String::from_utf8(b.to_vec()).map_err(|_| LinkError::Protocol("text field is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame) {
        let mut buf = BytesMut::new();
        encode(&f, &mut buf);
        // Fed one byte at a time, the decoder must wait, then produce the frame.
        let all = buf.freeze();
        let mut rd = BytesMut::new();
        for (i, b) in all.iter().enumerate() {
            rd.put_u8(*b);
            let got = decode(&mut rd, MAX_FRAME).unwrap();
            if i + 1 < all.len() {
                assert!(got.is_none());
            } else {
                assert_eq!(got, Some(f));
                assert!(rd.is_empty());
                return;
            }
        }
    }

    #[test]
    fn frames_round_trip() {
        round_trip(Frame::Hello { token: "ab".into() });
        round_trip(Frame::Resume {
            session: [1; 16],
            secret: [2; 32],
            last_recv: [1, 2, 3, u64::MAX],
        });
        round_trip(Frame::Welcome {
            session: [3; 16],
            secret: [4; 32],
            last_recv: [0; 4],
        });
        round_trip(Frame::Refused {
            reason: "no".into(),
        });
        round_trip(Frame::Data {
            lane: Lane::Shell,
            seq: 7,
            parts: vec![
                Bytes::from_static(b"\0\xff"),
                Bytes::new(),
                Bytes::from_static(b"x"),
            ],
        });
        round_trip(Frame::Ack { last_recv: [5; 4] });
        round_trip(Frame::Ping);
        round_trip(Frame::Goodbye);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let cases: &[&[u8]] = &[
            &[0, 0, 0, 0],
            &[0, 0, 0, 1, 99],
            &[0, 0, 0, 2, DATA, 9],
            &[0, 0, 0, 11, DATA, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            &[
                0, 0, 0, 18, DATA, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9,
            ],
            &[0, 0, 0, 2, HELLO, 0],
            &[0, 0, 0, 3, ACK, 0, 0],
            &[0xff, 0xff, 0xff, 0xff],
        ];
        for c in cases {
            let mut b = BytesMut::from(*c);
            assert!(
                decode(&mut b, MAX_FRAME).is_err(),
                "{c:?} should be refused"
            );
        }
    }

    #[test]
    fn an_oversized_handshake_frame_is_refused_before_reserving() {
        // 1 MiB claimed by a peer that has not shown a token yet.
        let mut b = BytesMut::from(&[0u8, 0x10, 0, 0, HELLO][..]);
        let cap = b.capacity();
        assert!(matches!(
            decode(&mut b, MAX_HANDSHAKE_FRAME),
            Err(LinkError::FrameTooLarge { .. })
        ));
        assert_eq!(b.capacity(), cap);
    }
}
