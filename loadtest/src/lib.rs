//! # edgegate-loadtest
//!
//! The load-test harness for the edgegate gateway, built on
//! [`edgegate_client`] (and, for fan-out subscribers, on [`lean`]). The `loadtest` binary runs one scenario per call;
//! every scenario is bounded in connections, messages and time and stops by
//! itself, prints a summary table (with the harness's own CPU use next to the
//! results) and can write a JSON report.
//!
//! - `idle` — many idle connections over worker processes; gateway RSS per
//!   connection, connect rate, CPU while idle.
//! - `pubsub` — direct messages within random pairs; HDR latency histogram,
//!   loss, duplicates, order violations.
//! - `fanout` — one room, K subscribers, P publishers; deliveries per second,
//!   latency and CPU per delivery of gateway and harness. Its subscribers
//!   are [`lean`] by default: they own their sockets and count deliveries in
//!   place, so the harness costs a fraction of what the gateway spends per
//!   delivery (it warns when it saturates anyway).
//!
//! - `storm` — N reconnecting clients; the gateway is drained or killed and
//!   restarted; time until all are back, peak accept rate, reconnect
//!   failures.
//! - `soak` — idle connections plus pubsub traffic for a duration; RSS and
//!   latency sampled over time, drift reported.
//! - `chaos` — reconnecting clients in rooms and direct messages with
//!   publishers that retry until `ok`, while faults hit them on a schedule
//!   (connections cut mid-stream, subscribers that stop reading, gateway
//!   drain and kill): every acked message is accounted for at every
//!   subscriber — lost, duplicated, reordered, or covered by an explicit
//!   `recovered: false` — with recovery times per fault.
//! - `herd` — every client cut off at once while messages are published,
//!   then back at once: time until all have recovered everything, and the
//!   gateway's peak RSS.
//!
//! The client-side faults go through [`faultproxy`], a TCP proxy that can
//! reset a connection, stop reading from the gateway, or take the network
//! down.
//!
//! Every scenario can draw its time series (latency, connections, …) to an
//! SVG chart with `--svg FILE`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod faultproxy;
pub mod gateway;
pub mod ips;
pub mod lean;
pub mod nats;
pub mod pacer;
pub mod payload;
pub mod peer;
pub mod procfs;
pub mod pusher;
pub mod report;
pub mod scenario;
pub mod series;
pub mod storm_worker;
pub mod svg;
pub mod track;
pub mod worker;

pub use edgegate_client::{Encoding, Transport};
