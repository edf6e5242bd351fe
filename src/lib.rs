//! # edgegate: the edge tier of a chat system
//!
//! edgegate holds very many long-lived client connections (WebSocket and
//! raw TCP, each optionally over TLS: [`tls`]; QUIC) close to users, keeps
//! them alive with heartbeats, and moves messages between them and the
//! backbone where the core services live. It keeps no durable state.
//!
//! ## Design
//!
//! * **Thread-per-core.** One glommio executor (io_uring) per CPU, pinned
//!   ([`server`]). Each [`shard::Shard`] binds its own SO_REUSEPORT
//!   listeners and owns the connections the kernel gives it, their
//!   subscriptions and their timers. Nothing on the message path takes a
//!   lock or touches memory another shard writes.
//! * **The flow of a message** follows the modules: [`listener`] accepts
//!   and enforces the connection limit → [`transport`] turns a socket into
//!   envelopes (WebSocket via tungstenite, TCP framing) → [`session`] applies
//!   protocol v1 → [`router`] fans out to this shard's subscribers →
//!   [`backbone`] carries it to the other shards (and, with NATS, nodes).
//! * **The protocol is sans-IO**, in the `edgegate-proto` crate: codecs and
//!   framing as pure functions, shared with the load-test harness and
//!   fuzzed.
//! * **Time is a wheel** ([`timer`]): one hashed wheel per shard holds one
//!   lazy check per connection; traffic never touches it.
//! * **Memory is budgeted.** Idle connections hold no read buffer (reads go
//!   to a per-shard scratch buffer; glommio polls readiness first), no write
//!   buffer, and no queue allocation; outbound queues are bounded in bytes,
//!   and a connection that cannot keep up is closed (4003) rather than
//!   allowed to grow.
//!
//! See `docs/architecture.md` for the whole picture.

pub(crate) mod admin;
pub(crate) mod admission;
pub(crate) mod auth;
pub mod backbone;
pub mod config;
pub mod conn;
pub(crate) mod listener;
pub mod metrics;
pub mod node;
pub(crate) mod ratelimit;
pub(crate) mod sdnotify;
pub mod server;
pub mod session;
pub mod settings;
pub mod shard;
pub mod timer;
pub(crate) mod tls;
pub(crate) mod transport;
