//! # edgegate-proto: the edgegate client protocol, sans I/O
//!
//! This crate is the whole client protocol of edgegate (docs/protocol.md,
//! version 1) as pure functions over byte buffers: no sockets, no async, no
//! clocks. The server's transports, the load-test harness and the tests all
//! use it, so there is exactly one implementation of every byte on the wire.
//! The style follows `quinn-proto` and `rustls`: parse, don't validate;
//! nothing a peer sends can make it panic (property tests and fuzz targets
//! check that); every error is a value that can be sent back as a `reason`.
//!
//! ## Layers
//!
//! ```text
//!  Envelope  (envelope)        one message: t, id, ch, seq, from, code+reason, meta, payload
//!     │  json::encode/decode      JSON mode: one object per envelope
//!     │  binary::encode/decode    binary mode: type code, field bits, LEB128 fields, payload
//!     ▼
//!  framing   (frame)           TCP/QUIC: u32-BE length + body, "EG1\n" preface on TCP
//!                              WebSocket text: envelopes separated by '\n' (json::decode_batch)
//!                              WebSocket binary: LEB128 length + envelope, repeated
//!                              SSE (sse): a batch as one event, a `data:` line per envelope
//!  names     (channel)         user:<id>, room:<id>, svc:<name>; ids [A-Za-z0-9_-]{1,128}
//!  numbers   (codes)           close codes (bye) and err codes (name in JSON, number in binary)
//! ```
//!
//! ## Design choices
//!
//! * **One envelope type for both codecs.** [`Envelope`] has every field of
//!   docs/protocol.md §2 as an `Option`; which fields a type needs is checked by
//!   the session, not the codec. A message received in one mode can be
//!   re-encoded in the other without loss, because [`Payload`] keeps the one
//!   bit that matters: whether the payload is JSON text (`d`, binary bit
//!   0x40) or opaque bytes (`db`).
//! * **Payloads and `meta` stay raw.** The gateway never looks inside a
//!   payload, so it is kept as [`bytes::Bytes`] holding the original text
//!   (no `serde_json::Value` tree). Decoders *do* check that a payload marked
//!   JSON is valid JSON text and that `meta` is a JSON object, so encoders can
//!   copy them without escaping and JSON-mode receivers always get valid
//!   JSON.
//! * **Encoders append to a caller's `Vec<u8>`.** A shard keeps one scratch
//!   buffer and batches several envelopes into one write; TCP frames are
//!   written in place (length reserved, then patched), WebSocket binary
//!   batches use [`binary::encoded_len`] to write the LEB128 prefix first.
//! * **Framing is peeked, not consumed.** [`frame::peek_frame`] looks at a
//!   read buffer and says "need more", "frame of N bytes", or "too large"
//!   — the last as soon as the 4 length bytes are in, before any of the body
//!   is read, so a peer cannot make the server buffer an oversized frame.
//! * **Errors are values.** [`DecodeError`]'s messages are short, quote at
//!   most a little of the input, and are safe to send to the peer.
//!
//! ## Example
//!
//! ```
//! use edgegate_proto::{binary, json, frame, Envelope, Payload, Type};
//!
//! let env = json::decode(br#"{"t":"pub","id":7,"ch":"room:lobby","d":{"text":"hi"}}"#)?;
//! assert_eq!(env.t, Type::Pub);
//! assert!(matches!(env.payload, Payload::Json(_)));
//!
//! // Re-encode for a TCP client and read it back.
//! let mut wire = Vec::new();
//! frame::encode_frame(&env, &mut wire);
//! let n = frame::peek_frame(&wire, 1 << 20).expect("not too large").expect("whole");
//! let back = binary::decode(&wire[frame::LEN_BYTES..frame::LEN_BYTES + n])?;
//! assert_eq!(back, env);
//! # Ok::<(), edgegate_proto::DecodeError>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod backoff;
pub mod binary;
pub mod channel;
pub mod codes;
pub mod deflate;
pub mod envelope;
mod error;
pub mod frame;
pub mod http;
pub mod json;
pub mod leb128;
pub mod sse;
pub mod ws;

pub use codes::{CloseCode, ErrCode};
pub use envelope::{Envelope, Payload, Type};
pub use error::DecodeError;
