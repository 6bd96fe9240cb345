//! The Jupyter wire protocol, as far as a relay needs it.
//!
//! A Jupyter message travels as ZeroMQ multipart frames:
//! `[identities…] <IDS|MSG> signature header parent_header metadata content [buffers…]`.
//! noyau sits between a frontend (key A) and a real kernel (key B), so the
//! central operation is *verify with one key, re-sign with the other* while
//! leaving every other byte alone: [`frames::RawMessage`] splits the frames
//! without parsing the JSON parts, [`sign::Signer`] computes and checks the
//! HMAC over the four JSON frames exactly as they arrived. Only the header is
//! peeked at ([`frames::HeaderPeek`]) when a relay must route by message type;
//! unknown header keys, unknown message types, buffers and comm traffic pass
//! through untouched.
//!
//! [`connection`] reads and writes connection files, [`build`] makes the few
//! messages noyau itself originates (status, errors, welcome), and
//! [`kernelspec`] finds and writes kernelspecs on the Jupyter paths.

pub mod build;
pub mod connection;
pub mod frames;
pub mod kernelspec;
pub mod sign;

pub use connection::{Channel, ConnectionInfo};
pub use frames::{HeaderPeek, RawMessage, WireError, DELIMITER};
pub use sign::Signer;
