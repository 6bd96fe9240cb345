//! Byte streams over a link, for the hub: the hub opens one stream per HTTP
//! connection it forwards, the agent connects each to the Jupyter server's
//! unix socket on the node. WebSocket traffic is just bytes after the HTTP
//! upgrade, so the tunnel needs no knowledge of HTTP.
//!
//! Every tunnel message travels on one lane ([`TUNNEL_LANE`]), so an `Open`
//! always arrives before its stream's data, and the link's per-lane ordering
//! keeps each stream's bytes in order. A message is two frames: a 9-byte
//! header (operation, stream id) and the payload.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use crate::{Lane, LinkError, LinkSender};

/// The lane all tunnel messages use (one lane keeps `Open` before `Data`).
pub const TUNNEL_LANE: Lane = Lane::Shell;
/// The lane of the agent's `Hello` and notices, ahead of bulk data.
pub const NOTICE_LANE: Lane = Lane::Control;

/// Bytes read from a stream per message.
const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Hub → agent: a new stream; connect it to the server.
    Open = 1,
    Data = 2,
    /// The sender will write no more on this stream (half close).
    Eof = 3,
    /// The stream failed or was abandoned: drop it.
    Reset = 4,
    /// Agent → hub: a JSON notice (hello, server ended…), stream id 0.
    Notice = 5,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Open,
            2 => Op::Data,
            3 => Op::Eof,
            4 => Op::Reset,
            5 => Op::Notice,
            _ => return None,
        })
    }
}

/// The frames of one tunnel message.
pub fn encode(op: Op, id: u64, payload: Bytes) -> Vec<Bytes> {
    let mut head = BytesMut::with_capacity(9);
    head.extend_from_slice(&[op as u8]);
    head.extend_from_slice(&id.to_be_bytes());
    vec![head.freeze(), payload]
}

/// Splits a tunnel message; `None` for anything malformed.
pub fn decode(frames: &[Bytes]) -> Option<(Op, u64, Bytes)> {
    let [head, payload] = frames else {
        return None;
    };
    if head.len() != 9 {
        return None;
    }
    let op = Op::from_u8(head[0])?;
    let id = u64::from_be_bytes(head[1..9].try_into().ok()?);
    Some((op, id, payload.clone()))
}

/// What the peer sent a stream: bytes, or the end of them.
enum Chunk {
    Data(Bytes),
    Eof,
    Reset,
}

/// The streams of one link. Cheap to share; one per link session.
pub struct Tunnel {
    sender: LinkSender,
    streams: Mutex<HashMap<u64, mpsc::UnboundedSender<Chunk>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("streams", &self.streams.lock().map(|s| s.len()).ok())
            .finish()
    }
}

impl Tunnel {
    pub fn new(sender: LinkSender) -> Arc<Self> {
        Arc::new(Tunnel {
            sender,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Sends a JSON notice (agent → hub).
    pub fn notice(&self, value: &serde_json::Value) -> Result<(), LinkError> {
        self.sender.send(
            NOTICE_LANE,
            encode(Op::Notice, 0, Bytes::from(value.to_string())),
        )
    }

    /// Opens a stream to the peer's server (hub side): what is written to
    /// the returned end reaches the server, what the server answers is read
    /// from it.
    pub fn open(self: &Arc<Self>) -> Result<DuplexStream, LinkError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (ours, theirs) = tokio::io::duplex(CHUNK);
        self.sender
            .send(TUNNEL_LANE, encode(Op::Open, id, Bytes::new()))?;
        self.attach(id, theirs);
        Ok(ours)
    }

    /// Takes one message from the link. Returns the id of a stream the peer
    /// opened (agent side: connect it, then [`Tunnel::attach`] or
    /// [`Tunnel::reset`]), or the JSON of a notice.
    pub fn deliver(&self, frames: &[Bytes]) -> Delivered {
        let Some((op, id, payload)) = decode(frames) else {
            return Delivered::Malformed;
        };
        let chunk = match op {
            Op::Open => return Delivered::Opened(id),
            Op::Notice => {
                return match serde_json::from_slice(&payload) {
                    Ok(v) => Delivered::Notice(v),
                    Err(_) => Delivered::Malformed,
                }
            }
            Op::Data => Chunk::Data(payload),
            Op::Eof => Chunk::Eof,
            Op::Reset => Chunk::Reset,
        };
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = streams.get(&id) {
            let _ = tx.send(chunk);
        }
        Delivered::Handled
    }

    /// Refuses a stream the peer opened (the server cannot be reached).
    pub fn reset(&self, id: u64) {
        let _ = self
            .sender
            .send(TUNNEL_LANE, encode(Op::Reset, id, Bytes::new()));
    }

    /// Number of open streams.
    pub fn open_streams(&self) -> usize {
        self.streams.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Pumps bytes between stream `id` and `io` until both directions end.
    pub fn attach<S>(self: &Arc<Self>, id: u64, io: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let me = self.clone();
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(io);
            let sender = me.sender.clone();
            let outbound = async {
                let mut buf = BytesMut::with_capacity(CHUNK);
                loop {
                    buf.reserve(CHUNK);
                    match r.read_buf(&mut buf).await {
                        Ok(0) => {
                            return sender
                                .send(TUNNEL_LANE, encode(Op::Eof, id, Bytes::new()))
                                .is_ok()
                        }
                        Ok(_) => {
                            let data = buf.split().freeze();
                            if sender
                                .send(TUNNEL_LANE, encode(Op::Data, id, data))
                                .is_err()
                            {
                                return false;
                            }
                        }
                        Err(_) => return false,
                    }
                }
            };
            let inbound = async {
                while let Some(chunk) = rx.recv().await {
                    match chunk {
                        Chunk::Data(d) => {
                            if w.write_all(&d).await.is_err() {
                                return false;
                            }
                        }
                        Chunk::Eof => {
                            let _ = w.shutdown().await;
                            return true;
                        }
                        Chunk::Reset => return false,
                    }
                }
                false
            };
            tokio::pin!(outbound, inbound);
            // Either direction failing ends the stream; a clean end of one
            // waits for the other.
            let ok = tokio::select! {
                ok = &mut outbound => ok && inbound.await,
                ok = &mut inbound => ok && outbound.await,
            };
            if !ok {
                me.reset(id);
            }
            me.streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }
}

/// What [`Tunnel::deliver`] found.
#[derive(Debug)]
pub enum Delivered {
    /// Data for a stream, passed on (or for a stream already gone).
    Handled,
    Opened(u64),
    Notice(serde_json::Value),
    Malformed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let f = encode(Op::Data, 42, Bytes::from_static(b"abc"));
        let (op, id, p) = decode(&f).unwrap();
        assert_eq!((op, id, &p[..]), (Op::Data, 42, &b"abc"[..]));
        assert!(decode(&[Bytes::from_static(b"\x09xxxxxxxx"), Bytes::new()]).is_none());
        assert!(decode(&[Bytes::from_static(b"\x02")]).is_none());
    }
}
