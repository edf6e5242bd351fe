//! # edgegate-client
//!
//! An async (tokio) client for the edgegate protocol, version 1
//! (`docs/protocol.md`), over WebSocket (subprotocols `edgegate.v1.json` /
//! `edgegate.v1.bin`), raw TCP (`EG1\n` preface, u32 big-endian framing),
//! both optionally over TLS (rustls, ring; [`ClientConfig::tls`] with a CA
//! file), QUIC (quinn, ALPN `edgegate/1`, one bidirectional stream framed
//! as TCP without the preface), and SSE (`GET /sse?hello=` for the event
//! stream, envelopes POSTed with the session's token; JSON only).
//! Envelope codecs and framing come from the sans-IO `edgegate-proto` crate.
//!
//! Three layers:
//!
//! - [`policy`] — sans-IO: the reconnect schedule (exponential backoff with
//!   full jitter, seedable) and the decision per close code. Pure, unit-tested.
//! - [`Connection`] — one session: connect (optionally from a chosen source
//!   address), `hello` → `welcome`, send and receive envelopes. `recv` is
//!   cancel-safe and answers `ping` envelopes.
//! - [`Client`] — a reconnecting wrapper: a background task that follows the
//!   policy, honours `bye.meta.retry_ms`, never reconnects after 4000, 4005 or
//!   4006, calls a token-refresh hook after 4001/4008, re-subscribes its
//!   channels after each reconnect, and reports [`Event`]s.
//!
//! **Resume** (`docs/protocol.md` §7): [`Client`] keeps the position
//! (epoch, last `seq`) of every subscription and of the user's own
//! `user:<id>` stream; after a reconnect it re-subscribes with `meta.since`
//! and says `hello.meta.since`, so what was published meanwhile follows,
//! once, in order. It sends `hello.meta.instance` (random per `Client`
//! unless [`ClientConfig::instance`] is set) and resends every publish that
//! got no `ok` with the same id, which the gateway stores once. A `msg`
//! whose `seq` it has delivered already is dropped ([`ResumeStats`]). When
//! the gateway cannot recover a channel (a restarted embedded gateway,
//! history expired) the application gets [`Event::Unrecovered`] with the
//! reason and must resynchronise that channel from its core service:
//!
//! ```no_run
//! # async fn demo(mut client: edgegate_client::Client) {
//! use edgegate_client::Event;
//! while let Some(ev) = client.next_event().await {
//!     match ev {
//!         Event::Unrecovered { ch, reason, .. } => {
//!             eprintln!("{ch}: missed messages are gone ({reason}); reload it");
//!         }
//!         Event::Message(m) => println!("{:?} seq {:?}", m.ch, m.seq),
//!         _ => {}
//!     }
//! }
//! # }
//! ```
//!
//! Transports sit behind a private enum inside [`Connection`]: WebSocket, or
//! u32-framed envelopes over a boxed byte stream (TCP, TLS over TCP, or the
//! QUIC session stream). QUIC connections share one quinn endpoint (UDP
//! socket) per runtime and source address.
//!
//! ```no_run
//! # async fn demo() {
//! use edgegate_client::{Client, ClientConfig, Event, Transport};
//! use edgegate_proto::Payload;
//!
//! let cfg = ClientConfig::new("127.0.0.1:8080", Transport::Ws, "alice");
//! let mut client = Client::start(cfg);
//! client.subscribe("room:lobby");
//! while let Some(ev) = client.next_event().await {
//!     match ev {
//!         Event::Subscribed(_) => {
//!             client.publish("room:lobby", Payload::Json(r#"{"text":"hi"}"#.into()));
//!         }
//!         Event::Message(env) => println!("{env:?}"),
//!         Event::Stopped(_) => break,
//!         _ => {}
//!     }
//! }
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod conn;
pub mod policy;
mod sse;

pub use client::{
    Client, ClientHandle, Event, HistoryPage, OUTBOX_LIMIT, PageMessage, PresencePage, ResumeStats,
    TokenRefresh,
};
pub use conn::{
    ClientConfig, Connection, Encoding, Error, Position, QuicIo, Result, StreamState, Transport,
    Welcome, quic_stream, tls_client,
};
pub use edgegate_proto::{Envelope, Payload, Type};
pub use policy::{Action, Backoff, CloseClass, CloseInfo, ReconnectPolicy, StopReason};
/// The TLS library's types that [`tls_client`] returns.
pub use rustls;
