//! # edgegate: the edge tier of a chat system
//!
//! edgegate holds very many long-lived client connections (WebSocket and
//! raw TCP, each optionally over TLS; QUIC) close to users, keeps them alive
//! with heartbeats, and moves messages between them and the backbone where
//! the core services live. It keeps no durable state.
//!
//! ## Design
//!
//! * **Thread-per-core.** One glommio executor (io_uring) per CPU, pinned
//!   ([`server`]). Each [`shard::Shard`] binds its own SO_REUSEPORT
//!   listeners and owns the connections the kernel gives it, their
//!   subscriptions and their timers. Nothing on the message path takes a
//!   lock or touches memory another shard writes.
//! * **The flow of a message** follows the modules, in one direction:
//!   `listener` accepts and `admission` decides who may come in →
//!   `transport` turns a socket into envelopes (RFC 6455 framing and the
//!   TCP framing come from the sans-IO `edgegate-proto` crate) → [`session`]
//!   applies protocol v1 as a sans-IO state machine: an input in, actions
//!   out → the [`shard`] carries the actions out: its router fans a message
//!   out to local subscribers, and its [`backbone`] carries it to the other
//!   shards and, with NATS, nodes. Answers come back the same way:
//!   a backbone [`backbone::Event`] becomes a session input, and the
//!   session writes the protocol's answer.
//! * **One seam, two backbones.** [`backbone::Backbone`] is a trait with
//!   backbone-neutral events; `embedded` (shards of one process) and `nats`
//!   (a thread running async-nats, behind bounded queues) implement it.
//!   Nothing outside `src/backbone/` names NATS.
//! * **The protocol is sans-IO**, in the `edgegate-proto` crate: codecs and
//!   framing as pure functions, shared with the load-test harness and
//!   fuzzed; the session's rules are tested in plain unit tests
//!   (`src/session/tests.rs`).
//! * **Time is a wheel** ([`timer`]): one hashed wheel per shard holds one
//!   lazy check per connection; traffic never touches it; what a due check
//!   means is the session's to decide.
//! * **Memory is budgeted.** Idle connections hold no read buffer (reads go
//!   to a per-shard scratch buffer; glommio polls readiness first), no write
//!   buffer, and no queue allocation; outbound queues are bounded in bytes,
//!   and a connection that cannot keep up is closed (4003) rather than
//!   allowed to grow.
//!
//! Modules are `pub(crate)` except those the benchmarks (`benches/`) reach.
//! `scripts/modcycles.py` checks that no module imports another in a
//! circle. See `docs/architecture.md` for the whole picture.

#![warn(missing_docs)]

pub(crate) mod admin;
pub(crate) mod admission;
pub mod api;
pub(crate) mod auth;
pub mod backbone;
pub mod compress;
pub mod config;
pub mod config_ref;
pub mod conn;
pub mod events;
pub(crate) mod flush;
pub(crate) mod http;
pub mod jwks;
pub(crate) mod listener;
pub mod metrics;
pub mod node;
pub(crate) mod ratelimit;
pub(crate) mod sdnotify;
pub mod server;
pub mod session;
pub mod settings;
pub mod shard;
pub mod sse;
pub mod timer;
pub(crate) mod tls;
pub(crate) mod transport;
