//! Configuration: one TOML file, environment overrides, validation.
//!
//! A gateway starts from exactly one document: the file given on the command
//! line, or [`DEFAULT_TOML`] (the commented `config/edgegate.toml`, embedded
//! in the binary) when none is given. The file does not layer on top of the
//! embedded default: a key it leaves out takes the built-in default of its
//! struct below, and every *listener* (`ws.listen`, `tcp.listen`,
//! `quic.listen`, `admin.listen`) defaults to off, so that an operator's file
//! opens exactly the ports it names and a test that builds a [`Config`] in
//! code binds nothing it did not ask for.
//!
//! Environment variables then override single keys:
//! `EDGEGATE_` + the dotted key upper-cased, with `.` written `__`:
//!
//! ```text
//! EDGEGATE_WS__LISTEN=0.0.0.0:8080       ws.listen
//! EDGEGATE_LIMITS__MAX_CONNECTIONS=5000  limits.max_connections
//! EDGEGATE_SHARDS__CPUS=0,1              shards.cpus (or TOML array text: [0, 1])
//! EDGEGATE_TCP__LISTEN=                  empty: back to the built-in default (off)
//! ```
//!
//! Names without `__` (`EDGEGATE_CONFIG`, `EDGEGATE_LOG`) are not keys and are
//! left to whoever reads them.
//!
//! Everything is checked before anything binds: a key that does not exist
//! (in the file or in a variable) is an error, not a silently ignored typo,
//! and every error names where the bad text came from and the dotted key:
//!
//! ```text
//! config error in /etc/edgegate.toml: key `limits.max_frame_bytes`: invalid type: string "x", expected usize
//! config error in environment variable EDGEGATE_WS__LISTEN: key `ws.listen`: invalid socket address syntax
//! config error in x.toml: unknown key `ws.lisen` (expected one of `echo_path`, `listen`, `path`, `tls`)
//! ```
//!
//! Nothing here panics on configuration input: the operator's text is
//! parsed, never trusted.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod services;
pub use services::{Api, Hooks, OnError, Service, Webhooks};

/// The embedded default configuration: `config/edgegate.toml`, a commented
/// file naming every section and key. [`Config::load`] uses it when no file
/// is given, and operators copy it as the starting point of their own.
pub const DEFAULT_TOML: &str = include_str!("../config/edgegate.toml");

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "EDGEGATE_";

/// Separator between key segments in an override variable's name; `.` is not
/// allowed in portable variable names, and a single `_` already occurs inside
/// keys such as `max_connections`.
const ENV_SEPARATOR: &str = "__";

/// Upper bound of `shards.count`: far above any machine this runs on, low
/// enough that a typo (`count = 80000`) fails here rather than as thousands of
/// executor threads.
const MAX_SHARDS: usize = 1024;

/// Smallest accepted `limits.max_frame_bytes`: a `hello` with a short token
/// must fit.
const MIN_FRAME_BYTES: usize = 64;

/// Largest accepted `limits.max_frame_bytes` (16 MiB): one frame is buffered
/// whole, so this bounds the memory a single peer can make a shard allocate.
const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Room the outbound queue needs beyond one largest frame, for the envelope
/// around it (headers, length prefixes, a WebSocket frame header).
const QUEUE_HEADROOM_BYTES: usize = 1024;

/// Smallest accepted heartbeat interval and hello timeout: below this the
/// timer wheel's granularity and ordinary network jitter close healthy
/// connections.
const MIN_TIMER_MS: u64 = 100;

/// The whole configuration, one struct per `[section]` of the TOML file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[shards]`: how many executor threads, and where they are pinned.
    pub shards: Shards,
    /// `[ws]`: the WebSocket listener.
    pub ws: Ws,
    /// `[tcp]`: the raw TCP listener.
    pub tcp: Tcp,
    /// `[quic]`: the QUIC listener.
    pub quic: Quic,
    /// `[tls]`: the certificate shared by every listener that uses TLS.
    pub tls: Tls,
    /// `[admin]`: the HTTP endpoint for health, metrics and drain.
    pub admin: Admin,
    /// `[heartbeat]`: pings and the timeouts that close silent connections.
    pub heartbeat: Heartbeat,
    /// `[limits]`: connection, frame and queue bounds.
    pub limits: Limits,
    /// `[auth]`: how `hello` authenticates a client.
    pub auth: Auth,
    /// `[rooms]`: who may use which `room:` channel.
    pub rooms: Rooms,
    /// `[backbone]`: where routed messages go beyond this process.
    pub backbone: Backbone,
    /// `[drain]`: how SIGTERM empties the gateway.
    pub drain: Drain,
    /// `[history]`: positions, history and recovery of `room:`/`user:`
    /// channels (docs/protocol.md, "Positions, history and recovery").
    pub history: History,
    /// `[presence]`: who is present in which room (docs/protocol.md,
    /// "Presence").
    pub presence: Presence,
    /// `[log]`: log verbosity and format.
    pub log: Log,
    /// `[api]`: the server API for core services.
    pub api: Api,
    /// `[services.<name>]`: core services reached over HTTP, by name.
    pub services: BTreeMap<String, Service>,
    /// `[hooks]`: services asked before a connect, subscribe or publish.
    pub hooks: Hooks,
    /// `[webhooks]`: lifecycle events POSTed to a URL.
    pub webhooks: Webhooks,
}

/// `[shards]`: one glommio executor per shard, each pinned to one CPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shards {
    /// Number of shards; 0 (the default) means one per CPU available to the
    /// process, or one per entry of `cpus` when that is set.
    pub count: usize,
    /// CPUs to pin the shards to, one each, in order; empty (the default)
    /// means CPUs `0..count`. When both are set, `count` must equal the
    /// number of entries, since a mismatch has no one obvious meaning.
    pub cpus: Vec<usize>,
}

/// `[ws]`: the WebSocket listener (protocol §1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ws {
    /// Address to listen on; unset (the built-in default) is off.
    pub listen: Option<SocketAddr>,
    /// Request path of the upgrade, `"/ws"` by default (the protocol's
    /// `GET /ws`).
    pub path: String,
    /// Path of a plain WebSocket echo endpoint that speaks no edgegate
    /// protocol, for conformance suites such as Autobahn; unset is off.
    pub echo_path: Option<String>,
    /// Terminate TLS on this listener with the `[tls]` certificate.
    pub tls: bool,
    /// `Origin` values allowed on upgrades (exact match, such as
    /// `"https://chat.example.com"`); a listed origin's browsers only. Empty
    /// (the default) = any. Requests without `Origin` (native clients, not
    /// browsers) are not affected.
    pub allowed_origins: Vec<String>,
    /// permessage-deflate (RFC 7692): `"negotiate"` (the default) accepts a
    /// client's offer, with no context takeover both ways, so compression
    /// costs no memory per connection; `"off"` never accepts one.
    pub compression: WsCompression,
    /// Messages shorter than this go uncompressed even where compression
    /// was negotiated: deflate cannot shrink a tiny message.
    pub compression_min_bytes: usize,
    /// `true` (the default): a message fanned out is compressed once per
    /// shard, and its subscribers get the same bytes. `false` compresses it
    /// for each connection instead, only to measure what sharing saves.
    pub compression_shared: bool,
    /// SSE on this listener (protocol §10): `GET <sse_path>?hello=…` opens
    /// an event stream, `POST <sse_path>` sends envelopes to it. On by
    /// default: the fallback for networks that refuse WebSocket.
    pub sse: bool,
    /// Request path of SSE, `"/sse"` by default (the protocol's `/sse`).
    pub sse_path: String,
}

/// Value of `ws.compression`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WsCompression {
    /// `"off"`: no permessage-deflate.
    Off,
    /// `"negotiate"`: permessage-deflate for clients that offer it.
    #[default]
    Negotiate,
}

impl Default for Ws {
    fn default() -> Self {
        Ws {
            listen: None,
            path: "/ws".to_owned(),
            echo_path: None,
            tls: false,
            allowed_origins: Vec::new(),
            compression: WsCompression::Negotiate,
            compression_min_bytes: 128,
            compression_shared: true,
            sse: true,
            sse_path: "/sse".to_owned(),
        }
    }
}

/// `[tcp]`: the raw TCP listener (`EG1\n` preface, length-prefixed frames).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tcp {
    /// Address to listen on; unset (the built-in default) is off.
    pub listen: Option<SocketAddr>,
    /// Terminate TLS on this listener with the `[tls]` certificate.
    pub tls: bool,
}

/// `[quic]`: the QUIC listener (ALPN `edgegate/1`). QUIC always uses TLS, so
/// turning it on requires `[tls]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quic {
    /// UDP address to listen on; unset (the default) is off.
    pub listen: Option<SocketAddr>,
}

/// `[tls]`: one certificate for every listener with TLS on. Files are read
/// when the listeners start, not here, so `check-config` works on a machine
/// without the keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM file with the certificate chain, leaf first.
    pub cert_chain: Option<PathBuf>,
    /// PEM file with the private key of the leaf certificate.
    pub key: Option<PathBuf>,
}

/// `[admin]`: the HTTP admin endpoint (health, metrics, connection lists,
/// drain).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Address to listen on; unset (the built-in default) is off.
    pub listen: Option<SocketAddr>,
    /// Bearer token the endpoints require; unset means none, which is only
    /// accepted on a loopback address because the endpoint can drain the
    /// node and lists users.
    pub token: Option<String>,
}

/// `[heartbeat]`: protocol §5.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Heartbeat {
    /// Silence after which the server pings, sent to clients as
    /// `welcome.meta.hb_ms`; 25 000 by default, below the 60 s idle timeout of
    /// common load balancers.
    pub interval_ms: u64,
    /// Silence after which a connection is closed with 4002; 0 (the default)
    /// means `2 × interval_ms + 10 000`. Read it through
    /// [`Config::idle_timeout_ms`], which resolves the 0.
    pub idle_timeout_ms: u64,
    /// Time a new connection has to send `hello` before it is closed with
    /// 4001; 10 000 by default.
    pub hello_timeout_ms: u64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval_ms: 25_000,
            idle_timeout_ms: 0,
            hello_timeout_ms: 10_000,
        }
    }
}

/// `[limits]`: what one node and one connection may cost.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most connections open at once, all shards together; 0 (the default)
    /// derives it from `RLIMIT_NOFILE` at start, with headroom, because
    /// running out of descriptors also breaks the process's own files and
    /// outbound connections.
    pub max_connections: usize,
    /// Largest envelope a connection accepts, in bytes (`welcome.meta.max_frame`);
    /// 65 536 by default.
    pub max_frame_bytes: usize,
    /// Bound of one connection's outbound queue, in bytes; past it the
    /// connection is a slow consumer (4003). 262 144 by default.
    pub outbound_queue_bytes: usize,
    /// Base of the jittered `retry_ms` sent with `bye` 4007, 1001 and 4004;
    /// 2 000 by default.
    pub retry_ms: u64,
    /// Envelopes one connection may send per second, on average (token
    /// bucket); beyond it they are answered `err rate_limited`. 0 = no limit.
    /// 10 000 by default.
    pub conn_msgs_per_s: u64,
    /// Burst of envelopes a connection may send at once; 20 000 by default.
    pub conn_msgs_burst: u64,
    /// Inbound bytes one connection may send per second, on average; 0 = no
    /// limit. 8 MiB by default.
    pub conn_bytes_per_s: u64,
    /// Burst of inbound bytes; at least `max_frame_bytes`. 16 MiB by default.
    pub conn_bytes_burst: u64,
    /// Envelopes refused in a row (without the connection's bucket filling
    /// up again in between) after which the connection is closed with 4004;
    /// 100 by default.
    pub rate_limited_close_after: u32,
    /// New connections the node admits per second, all shards together
    /// (each shard admits its share); beyond it sockets get `bye` 4007 with
    /// a `retry_ms` spread over the time the backlog needs. 0 = no limit.
    /// 2 000 by default.
    pub accept_per_s: u64,
    /// Burst of new connections admitted at once, node-wide; 2 000 by default.
    pub accept_burst: u64,
    /// New connections one source IP address may open per second, node-wide
    /// (bucket per shard and address); beyond it `bye` 4004. 0 (the default)
    /// = no limit: carrier-grade NAT puts many users behind one address.
    pub ip_connects_per_s: u64,
    /// Burst of new connections from one address; 0 = the per-second rate.
    pub ip_connects_burst: u64,
    /// Addresses each shard keeps a bucket for; when full, idle buckets are
    /// dropped first. 65 536 by default.
    pub ip_table_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 0,
            max_frame_bytes: 65_536,
            outbound_queue_bytes: 262_144,
            retry_ms: 2_000,
            conn_msgs_per_s: 10_000,
            conn_msgs_burst: 20_000,
            conn_bytes_per_s: 8 << 20,
            conn_bytes_burst: 16 << 20,
            rate_limited_close_after: 100,
            accept_per_s: 2_000,
            accept_burst: 2_000,
            ip_connects_per_s: 0,
            ip_connects_burst: 0,
            ip_table_size: 65_536,
        }
    }
}

/// `[auth]`: how `hello` authenticates a client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// `"none"` (the default) or `"jwt"`.
    pub mode: AuthMode,
    /// The one signature algorithm accepted (a token's own `alg` header
    /// never chooses; `none` is always refused): `"HS256"` (the default),
    /// `"RS256"`, `"ES256"` or `"EdDSA"`.
    pub algorithm: JwtAlgorithm,
    /// Shared secret for HS256.
    pub secret: Option<String>,
    /// PEM file with the public key for RS256, ES256 and EdDSA; read and
    /// parsed when the gateway starts.
    pub public_key: Option<PathBuf>,
    /// URL (`http://` or `https://`) of a JWKS (RFC 7517 key set) to take
    /// the RS256 / ES256 / EdDSA keys from instead of `public_key`; a
    /// token's `kid` picks the key. Fetched off the shards, refreshed on a
    /// schedule and when an unknown `kid` arrives; the last good set is kept
    /// when the endpoint fails (src/jwks.rs).
    pub jwks_url: Option<String>,
    /// PEM file of the CA(s) an `https` JWKS endpoint's certificate must
    /// chain to; unset = the system's roots.
    pub jwks_ca_file: Option<PathBuf>,
    /// How often the key set is fetched again, in milliseconds; 300 000 by
    /// default.
    pub jwks_refresh_ms: u64,
    /// The shortest time between two fetches, in milliseconds: bounds the
    /// refreshes an unknown `kid` (or a flood of them) and a failing
    /// endpoint cause; 10 000 by default.
    pub jwks_min_refresh_ms: u64,
    /// Time allowed for one fetch (connect, TLS, request and body), in
    /// milliseconds; 5 000 by default.
    pub jwks_timeout_ms: u64,
    /// Clock skew allowed on `exp` and `nbf`, in milliseconds; 5 000 by
    /// default.
    pub leeway_ms: u64,
    /// Required `aud`; unset = tokens must not be checked for audience.
    pub audience: Option<String>,
    /// Required `iss`; unset = any issuer.
    pub issuer: Option<String>,
    /// Where a WebSocket client may carry its token: any of `"hello"`
    /// (`hello.meta.token`), `"header"` (`Authorization: Bearer`) and
    /// `"query"` (`?token=`; visible in proxy logs). TCP and QUIC always use
    /// `hello`. All three by default.
    pub token_sources: Vec<TokenSource>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            mode: AuthMode::None,
            algorithm: JwtAlgorithm::HS256,
            secret: None,
            public_key: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh_ms: 300_000,
            jwks_min_refresh_ms: 10_000,
            jwks_timeout_ms: 5_000,
            leeway_ms: 5_000,
            audience: None,
            issuer: None,
            token_sources: vec![TokenSource::Hello, TokenSource::Header, TokenSource::Query],
        }
    }
}

/// Value of `auth.algorithm`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 and `auth.secret`.
    #[default]
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256 and the `auth.public_key` RSA key.
    RS256,
    /// ECDSA P-256 with SHA-256 and the `auth.public_key` EC key.
    ES256,
    /// Ed25519 with the `auth.public_key` key.
    EdDSA,
}

/// Value of the entries of `auth.token_sources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenSource {
    /// `hello.meta.token`.
    Hello,
    /// The upgrade request's `Authorization: Bearer` header (WebSocket).
    Header,
    /// The upgrade request's `token` query parameter (WebSocket).
    Query,
}

/// Value of `auth.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// `"none"`: every `hello` is accepted and its user id is taken as given;
    /// for development and tests.
    #[default]
    None,
    /// `"jwt"`: `hello` must carry a valid JSON Web Token.
    Jwt,
}

/// `[rooms]`: who may use `room:` channels (protocol §3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rooms {
    /// `"open"` (the default) or `"claims"`.
    pub policy: RoomPolicy,
}

/// Value of `rooms.policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomPolicy {
    /// `"open"`: any authenticated user may use any room.
    #[default]
    Open,
    /// `"claims"`: only the rooms the token's `rooms` claim allows; needs
    /// `auth.mode = "jwt"`, since without a token nobody could use a room.
    Claims,
}

/// `[backbone]`: where messages go beyond this process (protocol §4).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backbone {
    /// `"embedded"` (the default) or `"nats"`.
    pub kind: BackboneKind,
    /// First token `P` of every NATS subject, `"eg"` by default.
    pub subject_prefix: String,
    /// This node's name in `Eg-Node` headers and presence events; empty (the
    /// default) means the host name.
    pub node_id: String,
    /// The NATS connection, used when `kind = "nats"`.
    pub nats: Nats,
}

impl Default for Backbone {
    fn default() -> Self {
        Backbone {
            kind: BackboneKind::Embedded,
            subject_prefix: "eg".to_owned(),
            node_id: String::new(),
            nats: Nats::default(),
        }
    }
}

/// `[backbone.nats]`: how the node reaches NATS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Nats {
    /// Server URLs (several for a cluster; the client fails over among them
    /// and learns the others from the servers). `["nats://127.0.0.1:4222"]`.
    pub urls: Vec<String>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Authentication token.
    pub token: Option<String>,
    /// A `.creds` file (JWT + NKey seed).
    pub creds_file: Option<PathBuf>,
    /// Require TLS to NATS.
    pub tls: bool,
    /// PEM file of the CA that signs the NATS servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// How long a `req` waits for a core service; 5 000 ms by default.
    pub request_timeout_ms: u64,
    /// Reconnect backoff: first delay bound; 100 ms by default.
    pub reconnect_base_ms: u64,
    /// Reconnect backoff: largest delay bound; 5 000 ms by default.
    pub reconnect_cap_ms: u64,
    /// Connect timeout per attempt; 2 000 ms by default.
    pub connect_timeout_ms: u64,
    /// `"off"` (the default: core NATS, no positions) or `"jetstream"`:
    /// a JetStream stream keeps every `room:`/`user:` channel's history,
    /// so positions, recovery and publish deduplication work across nodes
    /// (docs/protocol.md §7, "With JetStream").
    pub history: NatsHistory,
    /// The stream's name, `"EG"` by default.
    pub stream: String,
    /// The stream's replicas (1–5; 3 on a three-node cluster), 1 by default.
    pub replicas: usize,
    /// Where the stream keeps messages, `"file"` (the default) or `"memory"`.
    pub storage: NatsStorage,
    /// Messages kept per channel (the stream's `max_msgs_per_subject`),
    /// 1 000 by default.
    pub max_msgs_per_subject: u64,
    /// Age after which a message leaves the stream, 600 000 ms by default.
    pub max_age_ms: u64,
    /// How long the stream remembers a `Nats-Msg-Id` (publish
    /// deduplication), 120 000 ms by default.
    pub duplicate_window_ms: u64,
    /// With history: a connection's publishes go to the stream one at a
    /// time, so they are stored in its order through NATS failovers (true,
    /// the default); false pipelines them (more publishes per connection
    /// per stream round trip, but one lost with a NATS connection can be
    /// stored after the next).
    pub ordered_publishes: bool,
}

/// Value of `backbone.nats.history`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsHistory {
    /// `"off"`: core NATS only; messages carry no `seq` and every recovery
    /// is `recovered: false`, `unavailable`.
    #[default]
    Off,
    /// `"jetstream"`: history in a JetStream stream.
    Jetstream,
}

/// Value of `backbone.nats.storage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsStorage {
    /// `"file"`: on disk (survives a NATS restart).
    #[default]
    File,
    /// `"memory"`: in memory (lost when every replica restarts).
    Memory,
}

impl NatsStorage {
    /// The name JetStream uses.
    pub fn name(self) -> &'static str {
        match self {
            NatsStorage::File => "file",
            NatsStorage::Memory => "memory",
        }
    }
}

impl Default for Nats {
    fn default() -> Self {
        Nats {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            user: None,
            password: None,
            token: None,
            creds_file: None,
            tls: false,
            ca_file: None,
            request_timeout_ms: 5_000,
            reconnect_base_ms: 100,
            reconnect_cap_ms: 5_000,
            connect_timeout_ms: 2_000,
            history: NatsHistory::Off,
            stream: "EG".to_owned(),
            replicas: 1,
            storage: NatsStorage::File,
            max_msgs_per_subject: 1_000,
            max_age_ms: 600_000,
            duplicate_window_ms: 120_000,
            ordered_publishes: true,
        }
    }
}

/// Value of `backbone.kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackboneKind {
    /// `"embedded"`: no external service; shards route among themselves and
    /// `svc:echo` is built in.
    #[default]
    Embedded,
    /// `"nats"`: a NATS backbone, through a dedicated thread.
    Nats,
}

/// `[drain]`: what SIGTERM does (protocol §6, `retry_ms`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Drain {
    /// Time over which `bye` 1001 is spread across the connections, so they
    /// do not all reconnect elsewhere in the same instant; 0 (the default)
    /// closes them all at once.
    pub window_ms: u64,
    /// Hard bound from SIGTERM to exit, 10 000 by default: a stuck peer must
    /// not hold a deploy.
    pub timeout_ms: u64,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            window_ms: 0,
            timeout_ms: 10_000,
        }
    }
}

/// `[history]`: every `room:` and `user:` channel's stream, kept by its
/// owner shard (embedded backbone) so that a client that reconnects can
/// recover what it missed, and publish retries are deduplicated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct History {
    /// On by default: recovery works out of the box. Off: messages carry no
    /// `seq`, and every recovery is `recovered: false`, `unavailable`.
    pub enabled: bool,
    /// Messages kept per channel, 1 000 by default.
    pub max_messages: usize,
    /// Age after which a message leaves history, 600 000 ms (10 minutes)
    /// by default: a reconnect after a network change or a deploy is
    /// covered, a client offline for hours resynchronises from its core
    /// service.
    pub max_age_ms: u64,
    /// History bytes per shard (messages and channel records), 64 MiB by
    /// default; past it the oldest messages of the shard leave first.
    pub shard_bytes: usize,
    /// The most messages one recovery replays, 1 000 by default; more missed
    /// is `recovered: false`, `too_many`.
    pub recovery_limit: usize,
    /// Live messages held for one connection while its recovery is in
    /// flight, 10 000 by default; more is `bye` 4009.
    pub recovery_buffer: usize,
    /// How long a publish id is remembered for deduplication, 120 000 ms
    /// (2 minutes) by default.
    pub dedupe_window_ms: u64,
}

impl Default for History {
    fn default() -> Self {
        History {
            enabled: true,
            max_messages: 1000,
            max_age_ms: 600_000,
            shard_bytes: 64 << 20,
            recovery_limit: 1000,
            recovery_buffer: 10_000,
            dedupe_window_ms: 120_000,
        }
    }
}

/// `[presence]`: who is present in which room, kept per user (a second
/// tab changes nothing), and the `members` events that tell a room's
/// presence subscribers who joined and left.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Presence {
    /// On by default. Off: `sub` with `meta.presence` is `err bad_request`,
    /// `presence` queries are answered `err bad_request`, and nothing is
    /// tracked (no memory per subscription).
    pub enabled: bool,
    /// Changes are sent at most this often per room and connection, as net
    /// changes (someone who joined and left within one batch is in neither
    /// list), 1 000 ms by default.
    pub flush_ms: u64,
    /// In a room with more present users than this, `members` carries only
    /// `present`, not who joined and left, 1 000 by default.
    pub diff_limit: usize,
    /// With the NATS backbone: the users of a node that stops sending its
    /// presence heartbeats (a third of this) leave after this long, 30 000
    /// ms by default.
    pub node_ttl_ms: u64,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            enabled: true,
            flush_ms: 1000,
            diff_limit: 1000,
            node_ttl_ms: 30_000,
        }
    }
}

/// `[log]`: what is logged and how.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// A `tracing` filter: a level (`"info"`, the default) or directives such
    /// as `"info,edgegate::backbone=debug"`. Parsed when logging starts.
    pub level: String,
    /// `"text"` (the default) or `"json"`.
    pub format: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".to_owned(),
            format: "text".to_owned(),
        }
    }
}

impl Config {
    /// Loads the file at `path` (or [`DEFAULT_TOML`] when `None`), applies the
    /// overrides among `env` (pairs of variable name and value; others are
    /// ignored), and validates the result.
    ///
    /// `env` is a parameter rather than read here so that tests and tools can
    /// pass a fixed environment; [`Config::from_env_and_file`] passes the
    /// process's.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (origin, text) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    origin: Origin::File(path.to_path_buf()),
                    key: None,
                    kind: Kind::Io(e),
                })?;
                (Origin::File(path.to_path_buf()), Cow::Owned(text))
            }
            None => (Origin::Embedded, Cow::Borrowed(DEFAULT_TOML)),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError {
            origin: origin.clone(),
            key: None,
            kind: Kind::Syntax(e.to_string()),
        })?;

        let schema = Schema::new(&origin)?;
        schema.check_table(&table, &origin)?;
        let env = apply_env(&mut table, &origin, &schema, env)?;
        let sources = Sources { file: origin, env };

        // serde_path_to_error records the key being deserialized when an
        // error occurs; toml's errors from a `Table` carry no position.
        let config: Config =
            serde_path_to_error::deserialize(table).map_err(|e| sources.deserialize_error(e))?;
        config.check(&sources)?;
        Ok(config)
    }

    /// [`Config::load`] with the process's environment.
    ///
    /// Variables whose name or value is not UTF-8 are skipped, unless they
    /// are overrides (`EDGEGATE_…__…`), which are then an error: an override
    /// that cannot be read must not be silently dropped.
    pub fn from_env_and_file(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            // Only names `load` would treat as overrides; `EDGEGATE_CONFIG`
            // may well hold a non-UTF-8 path and is not ours to judge.
            let bytes = name.as_encoded_bytes();
            let ours = bytes.starts_with(ENV_PREFIX.as_bytes())
                && bytes
                    .windows(ENV_SEPARATOR.len())
                    .any(|w| w == ENV_SEPARATOR.as_bytes());
            match (name.into_string(), value.into_string()) {
                (Ok(name), Ok(value)) => env.push((name, value)),
                (name, _) if ours => {
                    let name = match name {
                        Ok(name) => name,
                        Err(name) => name.to_string_lossy().into_owned(),
                    };
                    return Err(ConfigError {
                        origin: Origin::Env(name),
                        key: None,
                        kind: Kind::Invalid("name or value is not valid UTF-8".to_owned()),
                    });
                }
                _ => {}
            }
        }
        Config::load(path, env)
    }

    /// The idle timeout in milliseconds, with `heartbeat.idle_timeout_ms = 0`
    /// resolved to `2 × interval_ms + 10 000` (protocol §5).
    pub fn idle_timeout_ms(&self) -> u64 {
        match self.heartbeat.idle_timeout_ms {
            // Saturating: a huge interval must not wrap to a tiny timeout.
            0 => self
                .heartbeat
                .interval_ms
                .saturating_mul(2)
                .saturating_add(10_000),
            ms => ms,
        }
    }

    /// The effective configuration as TOML, for `edgegate check-config`.
    /// Unset optional keys are absent, which is how they are unset in a file,
    /// so the output loads back to the same configuration.
    pub fn to_toml(&self) -> String {
        // Cannot fail for these types (no maps with non-string keys, tables
        // after values); an error is still reported in the text, not panicked.
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# cannot render the configuration as TOML: {e}\n"))
    }

    /// Checks the rules [`Config::load`] applies, for a configuration built
    /// or changed in code; errors name the key, with `<program>` as origin.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check(&Sources {
            file: Origin::Program,
            env: BTreeMap::new(),
        })
    }

    /// The validation rules; the first one broken is reported, against the
    /// variable that set the key if one did, else against the file.
    fn check(&self, sources: &Sources) -> Result<(), ConfigError> {
        let fail = |key: &str, message: String| Err(sources.invalid(key, message));

        // [shards]
        if self.shards.count > MAX_SHARDS {
            return fail(
                "shards.count",
                format!("{} is more than {MAX_SHARDS}", self.shards.count),
            );
        }
        let cpus = &self.shards.cpus;
        if cpus.len() > MAX_SHARDS {
            return fail(
                "shards.cpus",
                format!("{} entries is more than {MAX_SHARDS}", cpus.len()),
            );
        }
        for (i, cpu) in cpus.iter().enumerate() {
            if cpus.iter().take(i).any(|other| other == cpu) {
                // Two shards on one CPU would compete for it, which is what
                // pinning exists to prevent.
                return fail("shards.cpus", format!("CPU {cpu} is listed twice"));
            }
        }
        if self.shards.count != 0 && !cpus.is_empty() && cpus.len() != self.shards.count {
            return fail(
                "shards.cpus",
                format!(
                    "{} entries, but shards.count is {}; set count = 0 to use one shard per listed CPU",
                    cpus.len(),
                    self.shards.count
                ),
            );
        }

        // [ws]
        check_http_path(&self.ws.path).or_else(|m| fail("ws.path", m))?;
        if let Some(echo) = &self.ws.echo_path {
            check_http_path(echo).or_else(|m| fail("ws.echo_path", m))?;
            if *echo == self.ws.path {
                return fail(
                    "ws.echo_path",
                    format!("{echo:?} is also ws.path; the two endpoints need distinct paths"),
                );
            }
        }
        check_http_path(&self.ws.sse_path).or_else(|m| fail("ws.sse_path", m))?;
        if self.ws.sse
            && (self.ws.sse_path == self.ws.path
                || self.ws.echo_path.as_ref() == Some(&self.ws.sse_path))
        {
            return fail(
                "ws.sse_path",
                format!(
                    "{:?} is also ws.path or ws.echo_path; each endpoint needs its own path",
                    self.ws.sse_path
                ),
            );
        }

        // Listeners.
        if self.ws.listen.is_none() && self.tcp.listen.is_none() && self.quic.listen.is_none() {
            return fail(
                "ws.listen",
                "no client listener is set: set at least one of ws.listen, tcp.listen, quic.listen"
                    .to_owned(),
            );
        }
        // glommio binds with SO_REUSEPORT, so two of our own TCP listeners on
        // one port would both bind and silently split the connections
        // between them instead of failing.
        let tcp_listeners = [
            ("ws.listen", self.ws.listen),
            ("tcp.listen", self.tcp.listen),
            ("admin.listen", self.admin.listen),
        ];
        for (i, (key, addr)) in tcp_listeners.iter().enumerate() {
            let Some(addr) = addr else { continue };
            for (other_key, other) in tcp_listeners.iter().take(i) {
                if other.is_some_and(|other| same_port(other, *addr)) {
                    return fail(
                        key,
                        format!(
                            "{addr} overlaps {other_key}; each TCP listener needs its own port"
                        ),
                    );
                }
            }
        }

        // [tls]
        match (&self.tls.cert_chain, &self.tls.key) {
            (Some(_), None) => {
                return fail(
                    "tls.key",
                    "unset while tls.cert_chain is set; set both or neither".to_owned(),
                );
            }
            (None, Some(_)) => {
                return fail(
                    "tls.cert_chain",
                    "unset while tls.key is set; set both or neither".to_owned(),
                );
            }
            _ => {}
        }
        let have_tls = self.tls.cert_chain.is_some() && self.tls.key.is_some();
        let tls_users = [
            ("ws.tls", self.ws.tls && self.ws.listen.is_some()),
            ("tcp.tls", self.tcp.tls && self.tcp.listen.is_some()),
            ("quic.listen", self.quic.listen.is_some()),
        ];
        for (key, needs) in tls_users {
            if needs && !have_tls {
                return fail(
                    key,
                    "needs TLS, but tls.cert_chain and tls.key are not set".to_owned(),
                );
            }
        }

        // [admin]
        if let Some(token) = &self.admin.token {
            if token.is_empty() {
                return fail(
                    "admin.token",
                    "is empty; remove the key for no token".to_owned(),
                );
            }
        } else if let Some(addr) = self.admin.listen
            && !addr.ip().is_loopback()
        {
            return fail(
                "admin.listen",
                format!("{addr} is not a loopback address, so admin.token must be set"),
            );
        }

        // [heartbeat]
        let hb = &self.heartbeat;
        if hb.interval_ms < MIN_TIMER_MS {
            return fail(
                "heartbeat.interval_ms",
                format!("{} is less than {MIN_TIMER_MS}", hb.interval_ms),
            );
        }
        if self.idle_timeout_ms() <= hb.interval_ms {
            return fail(
                "heartbeat.idle_timeout_ms",
                format!(
                    "{} must be more than heartbeat.interval_ms ({}), or a connection would be closed before it is pinged",
                    self.idle_timeout_ms(),
                    hb.interval_ms
                ),
            );
        }
        if hb.hello_timeout_ms < MIN_TIMER_MS {
            return fail(
                "heartbeat.hello_timeout_ms",
                format!("{} is less than {MIN_TIMER_MS}", hb.hello_timeout_ms),
            );
        }

        // [limits]
        let limits = &self.limits;
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&limits.max_frame_bytes) {
            return fail(
                "limits.max_frame_bytes",
                format!(
                    "{} is outside {MIN_FRAME_BYTES}..={MAX_FRAME_BYTES}",
                    limits.max_frame_bytes
                ),
            );
        }
        // Above the largest frame any configuration allows, nothing could
        // ever be compressed: a typo, not a choice.
        if self.ws.compression_min_bytes > MAX_FRAME_BYTES {
            return fail(
                "ws.compression_min_bytes",
                format!(
                    "{} is more than the largest frame ({MAX_FRAME_BYTES}); set ws.compression = \"off\" to turn compression off",
                    self.ws.compression_min_bytes
                ),
            );
        }
        // A queue smaller than one largest frame could never accept it, and
        // every such message would look like a slow consumer.
        let min_queue = limits.max_frame_bytes.saturating_add(QUEUE_HEADROOM_BYTES);
        if limits.outbound_queue_bytes < min_queue {
            return fail(
                "limits.outbound_queue_bytes",
                format!(
                    "{} is less than limits.max_frame_bytes + {QUEUE_HEADROOM_BYTES} ({min_queue})",
                    limits.outbound_queue_bytes
                ),
            );
        }
        if limits.retry_ms == 0 {
            // Zero tells every refused client to come back at once: the
            // reconnect storm the jitter exists to prevent.
            return fail("limits.retry_ms", "must be more than 0".to_owned());
        }

        if limits.conn_bytes_per_s > 0 && limits.conn_bytes_burst < limits.max_frame_bytes as u64 {
            // A burst below one frame could never let a largest frame in.
            return fail(
                "limits.conn_bytes_burst",
                format!(
                    "{} is less than limits.max_frame_bytes ({})",
                    limits.conn_bytes_burst, limits.max_frame_bytes
                ),
            );
        }
        for (key, rate, burst) in [
            (
                "limits.conn_msgs_burst",
                limits.conn_msgs_per_s,
                limits.conn_msgs_burst,
            ),
            (
                "limits.accept_burst",
                limits.accept_per_s,
                limits.accept_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                return fail(key, "must be more than 0 while its rate is set".to_owned());
            }
        }
        if limits.rate_limited_close_after == 0 {
            return fail(
                "limits.rate_limited_close_after",
                "must be more than 0".to_owned(),
            );
        }
        if limits.ip_connects_per_s > 0 && limits.ip_table_size == 0 {
            return fail(
                "limits.ip_table_size",
                "must be more than 0 while limits.ip_connects_per_s is set".to_owned(),
            );
        }

        // [auth]
        if self.auth.mode == AuthMode::Jwt {
            let auth = &self.auth;
            if auth.algorithm == JwtAlgorithm::HS256 {
                match &auth.secret {
                    None => {
                        return fail(
                            "auth.secret",
                            "unset, but auth.algorithm = \"HS256\" needs it".to_owned(),
                        );
                    }
                    // RFC 7518 §3.2: a key at least as long as the hash.
                    Some(s) if s.len() < 32 => {
                        return fail(
                            "auth.secret",
                            "is shorter than 32 bytes; HS256 needs at least 32".to_owned(),
                        );
                    }
                    Some(_) => {}
                }
            } else if auth.public_key.is_none() && auth.jwks_url.is_none() {
                return fail(
                    "auth.public_key",
                    format!(
                        "unset, but auth.algorithm = {:?} needs a PEM public key file (or auth.jwks_url)",
                        auth.algorithm
                    ),
                );
            }
            if let Some(url) = &auth.jwks_url {
                if auth.algorithm == JwtAlgorithm::HS256 {
                    return fail(
                        "auth.jwks_url",
                        "is set, but auth.algorithm = \"HS256\" takes auth.secret; a JWKS serves RS256, ES256 or EdDSA public keys".to_owned(),
                    );
                }
                if auth.public_key.is_some() {
                    return fail(
                        "auth.jwks_url",
                        "and auth.public_key are both set; keep one".to_owned(),
                    );
                }
                crate::jwks::check_url(url).or_else(|m| fail("auth.jwks_url", m))?;
                if auth.jwks_min_refresh_ms < MIN_TIMER_MS {
                    return fail(
                        "auth.jwks_min_refresh_ms",
                        format!("{} is less than {MIN_TIMER_MS}", auth.jwks_min_refresh_ms),
                    );
                }
                if auth.jwks_refresh_ms < auth.jwks_min_refresh_ms {
                    return fail(
                        "auth.jwks_refresh_ms",
                        format!(
                            "{} is less than auth.jwks_min_refresh_ms ({})",
                            auth.jwks_refresh_ms, auth.jwks_min_refresh_ms
                        ),
                    );
                }
                if auth.jwks_timeout_ms == 0 {
                    return fail("auth.jwks_timeout_ms", "must be more than 0".to_owned());
                }
            }
            if auth.token_sources.is_empty() {
                return fail(
                    "auth.token_sources",
                    "is empty: no client could present a token".to_owned(),
                );
            }
        }

        // [rooms]
        if self.rooms.policy == RoomPolicy::Claims && self.auth.mode != AuthMode::Jwt {
            return fail(
                "rooms.policy",
                "\"claims\" needs auth.mode = \"jwt\": without a token no room is allowed"
                    .to_owned(),
            );
        }

        // [backbone]
        let prefix = &self.backbone.subject_prefix;
        if prefix.is_empty()
            || prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>'))
        {
            return fail(
                "backbone.subject_prefix",
                format!(
                    "{prefix:?} is not a NATS subject token (non-empty; no spaces, '.', '*' or '>')"
                ),
            );
        }
        // The node id travels in NATS headers, where a line break would
        // forge or break the header block.
        if self
            .backbone
            .node_id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return fail(
                "backbone.node_id",
                format!(
                    "{:?} contains whitespace or control characters",
                    self.backbone.node_id
                ),
            );
        }

        // [backbone.nats]
        let nats = &self.backbone.nats;
        if self.backbone.kind == BackboneKind::Nats && nats.urls.is_empty() {
            return fail(
                "backbone.nats.urls",
                "kind = \"nats\" needs at least one URL".to_owned(),
            );
        }
        if nats.user.is_some() != nats.password.is_some() {
            return fail(
                "backbone.nats.password",
                "backbone.nats.user and backbone.nats.password go together".to_owned(),
            );
        }
        if nats.request_timeout_ms == 0 {
            return fail(
                "backbone.nats.request_timeout_ms",
                "must be more than 0".to_owned(),
            );
        }
        if nats.reconnect_base_ms == 0 || nats.reconnect_base_ms > nats.reconnect_cap_ms {
            return fail(
                "backbone.nats.reconnect_base_ms",
                format!(
                    "must be more than 0 and at most backbone.nats.reconnect_cap_ms ({})",
                    nats.reconnect_cap_ms
                ),
            );
        }

        if nats.history == NatsHistory::Jetstream {
            let valid_name = !nats.stream.is_empty()
                && nats.stream.len() <= 32
                && nats
                    .stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_name {
                return fail(
                    "backbone.nats.stream",
                    format!(
                        "{:?} is not a stream name (1 to 32 of A-Z a-z 0-9 _ -)",
                        nats.stream
                    ),
                );
            }
            if !(1..=5).contains(&nats.replicas) {
                return fail(
                    "backbone.nats.replicas",
                    format!("{} is not 1 to 5 (JetStream's range)", nats.replicas),
                );
            }
            for (key, zero) in [
                (
                    "backbone.nats.max_msgs_per_subject",
                    nats.max_msgs_per_subject == 0,
                ),
                ("backbone.nats.max_age_ms", nats.max_age_ms == 0),
                (
                    "backbone.nats.duplicate_window_ms",
                    nats.duplicate_window_ms == 0,
                ),
            ] {
                if zero {
                    return fail(
                        key,
                        "must be more than 0 (set backbone.nats.history = \"off\" to turn history off)"
                            .to_owned(),
                    );
                }
            }
            if nats.duplicate_window_ms > nats.max_age_ms {
                // JetStream refuses it: a key cannot outlive its message.
                return fail(
                    "backbone.nats.duplicate_window_ms",
                    format!(
                        "{} is more than backbone.nats.max_age_ms ({})",
                        nats.duplicate_window_ms, nats.max_age_ms
                    ),
                );
            }
        }

        // [drain]
        if self.drain.timeout_ms == 0 {
            return fail("drain.timeout_ms", "must be more than 0".to_owned());
        }
        if self.drain.window_ms > self.drain.timeout_ms {
            // The hard exit would cut the spread short and drop the rest of
            // the connections without a `bye`.
            return fail(
                "drain.window_ms",
                format!(
                    "{} is more than drain.timeout_ms ({})",
                    self.drain.window_ms, self.drain.timeout_ms
                ),
            );
        }

        // [history]
        let h = &self.history;
        for (key, zero) in [
            ("history.max_messages", h.max_messages == 0),
            ("history.max_age_ms", h.max_age_ms == 0),
            ("history.recovery_limit", h.recovery_limit == 0),
            ("history.recovery_buffer", h.recovery_buffer == 0),
            ("history.dedupe_window_ms", h.dedupe_window_ms == 0),
        ] {
            if zero {
                return fail(
                    key,
                    "must be more than 0 (set history.enabled = false to turn history off)"
                        .to_owned(),
                );
            }
        }
        if h.shard_bytes < 64 << 10 {
            return fail(
                "history.shard_bytes",
                format!("{} is less than 65536 (64 KiB)", h.shard_bytes),
            );
        }

        // [presence]
        let p = &self.presence;
        if p.flush_ms < MIN_TIMER_MS || p.flush_ms > 60_000 {
            return fail(
                "presence.flush_ms",
                format!("{} is outside 100..=60000", p.flush_ms),
            );
        }
        if p.diff_limit == 0 {
            return fail("presence.diff_limit", "must be more than 0".to_owned());
        }
        if p.node_ttl_ms < 3000 {
            return fail(
                "presence.node_ttl_ms",
                format!(
                    "{} is less than 3000 (nodes send a heartbeat every third of it)",
                    p.node_ttl_ms
                ),
            );
        }

        // [log]
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return fail(
                "log.format",
                format!("{:?} is neither \"text\" nor \"json\"", self.log.format),
            );
        }
        services::check(self, &fail)
    }
}

/// Checks an HTTP request path used for exact matching.
fn check_http_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} does not start with '/'"));
    }
    if path
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#'))
    {
        // Requests are matched on the path alone; these could never match.
        return Err(format!(
            "{path:?} contains whitespace, a control character, '?' or '#'"
        ));
    }
    Ok(())
}

/// Whether two TCP listen addresses would share a port; port 0 asks the
/// kernel for a fresh port each time, so it never collides.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Where a piece of configuration text came from; errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// [`DEFAULT_TOML`]; shown as `<embedded default>`.
    Embedded,
    /// A file given to [`Config::load`].
    File(PathBuf),
    /// An environment variable, by name.
    Env(String),
    /// A configuration built in code and checked with [`Config::validate`];
    /// shown as `<program>`.
    Program,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Embedded => f.write_str("<embedded default>"),
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Program => f.write_str("<program>"),
        }
    }
}

/// A configuration that cannot be used, with where it came from and which
/// key is at fault. Its `Display` is one line meant for the operator (a TOML
/// syntax error adds toml's excerpt of the offending line).
#[derive(Debug)]
pub struct ConfigError {
    origin: Origin,
    key: Option<String>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// The file could not be read.
    Io(std::io::Error),
    /// The file is not TOML; toml's message carries line and column.
    Syntax(String),
    /// The key does not exist; the text says what does.
    UnknownKey(String),
    /// The value of the key is wrong.
    Invalid(String),
}

impl ConfigError {
    /// The file, embedded default, or environment variable the error is in.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The dotted key at fault (`limits.max_frame_bytes`, `shards.cpus[1]`),
    /// when the error is about one key.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config error in {}: ", self.origin)?;
        match (&self.kind, &self.key) {
            (Kind::Io(e), _) => write!(f, "cannot read the file: {e}"),
            (Kind::Syntax(message), _) => f.write_str(message.trim_end()),
            (Kind::UnknownKey(hint), Some(key)) => write!(f, "unknown key `{key}` ({hint})"),
            (Kind::UnknownKey(hint), None) => write!(f, "unknown key ({hint})"),
            (Kind::Invalid(message), Some(key)) => write!(f, "key `{key}`: {message}"),
            (Kind::Invalid(message), None) => f.write_str(message),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Which origin each key of the merged table came from.
struct Sources {
    /// The document the table was read from.
    file: Origin,
    /// Dotted key → name of the variable that set (or removed) it.
    env: BTreeMap<String, String>,
}

impl Sources {
    /// The origin to blame for `key`: the variable that set it or a key
    /// inside or around it, else the file.
    fn origin_of(&self, key: &str) -> Origin {
        for (env_key, name) in &self.env {
            let related = env_key == key
                || key
                    .strip_prefix(env_key.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
                || env_key
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.starts_with('.'));
            if related {
                return Origin::Env(name.clone());
            }
        }
        self.file.clone()
    }

    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            origin: self.origin_of(key),
            key: Some(key.to_owned()),
            kind: Kind::Invalid(message),
        }
    }

    fn deserialize_error(&self, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        use serde_path_to_error::Segment;
        // Two spellings of the path: with list indexes for the operator
        // (`shards.cpus[1]`), and keys only to find who set it.
        let mut shown = String::new();
        let mut keys: Vec<&str> = Vec::new();
        for segment in e.path().iter() {
            match segment {
                Segment::Seq { index } => shown.push_str(&format!("[{index}]")),
                Segment::Map { key } | Segment::Enum { variant: key } => {
                    if !shown.is_empty() {
                        shown.push('.');
                    }
                    shown.push_str(key);
                    keys.push(key);
                }
                Segment::Unknown => {
                    if !shown.is_empty() {
                        shown.push('.');
                    }
                    shown.push('?');
                }
            }
        }
        let origin = self.origin_of(&keys.join("."));
        ConfigError {
            origin,
            key: (!shown.is_empty()).then_some(shown),
            kind: Kind::Invalid(e.inner().message().to_owned()),
        }
    }
}

/// The set of keys that exist, taken from the structs themselves (through
/// `serde_json`, which keeps unset `Option`s as `null` where TOML drops them),
/// so that it cannot drift from them.
struct Schema {
    root: serde_json::Map<String, serde_json::Value>,
}

/// What an override variable's text is parsed as, from the key's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    /// Strings, enums, and unset optional keys (all of which are strings in
    /// TOML today: addresses, paths, tokens): the text as is.
    Text,
    /// Lists: comma-separated items, or TOML array text.
    List,
    /// Integers and booleans: a TOML value.
    Scalar,
}

impl Schema {
    fn new(origin: &Origin) -> Result<Schema, ConfigError> {
        let internal = |what: &str| ConfigError {
            origin: origin.clone(),
            key: None,
            kind: Kind::Invalid(format!("internal error: cannot list the keys: {what}")),
        };
        match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(root)) => Ok(Schema { root }),
            Ok(_) => Err(internal("not a table")),
            Err(e) => Err(internal(&e.to_string())),
        }
    }

    /// Rejects any key of `table` (the parsed file) that does not exist.
    fn check_table(&self, table: &toml::Table, origin: &Origin) -> Result<(), ConfigError> {
        check_keys(table, &self.root, "", origin)
    }

    /// The keys of one operator-named table of `section` (`services.x`).
    fn named(section: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
        match services::named_template(section) {
            Some(serde_json::Value::Object(m)) => Some(m),
            _ => None,
        }
    }

    /// Finds the key named by `segments`; errors name the first segment that
    /// does not exist.
    fn leaf(&self, segments: &[String], origin: &Origin) -> Result<ValueKind, ConfigError> {
        let mut named;
        let mut level = &self.root;
        let mut path = String::new();
        for (i, segment) in segments.iter().enumerate() {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
            let last = i + 1 == segments.len();
            if i == 1
                && let Some(t) = Schema::named(&segments[0])
            {
                // `services.<name>`: any name, then the template's keys.
                if last {
                    return Err(ConfigError {
                        origin: origin.clone(),
                        key: Some(path),
                        kind: Kind::Invalid(
                            "is a section; override its keys one by one".to_owned(),
                        ),
                    });
                }
                named = t;
                level = &named;
                continue;
            }
            match level.get(segment.as_str()) {
                None => return Err(unknown_key(origin, path, level)),
                Some(serde_json::Value::Object(inner)) if !last => level = inner,
                Some(serde_json::Value::Object(_)) => {
                    return Err(ConfigError {
                        origin: origin.clone(),
                        key: Some(path),
                        kind: Kind::Invalid(
                            "is a section; override its keys one by one".to_owned(),
                        ),
                    });
                }
                Some(_) if !last => {
                    let full = segments.join(".");
                    return Err(ConfigError {
                        origin: origin.clone(),
                        key: Some(full),
                        kind: Kind::UnknownKey(format!("`{path}` is a value, not a section")),
                    });
                }
                Some(serde_json::Value::Array(_)) => return Ok(ValueKind::List),
                Some(serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => {
                    return Ok(ValueKind::Scalar);
                }
                Some(_) => return Ok(ValueKind::Text),
            }
        }
        // Only reached with no segments, which the caller never passes.
        Err(unknown_key(origin, String::new(), level))
    }
}

fn check_keys(
    table: &toml::Table,
    schema: &serde_json::Map<String, serde_json::Value>,
    prefix: &str,
    origin: &Origin,
) -> Result<(), ConfigError> {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if let (Some(template), toml::Value::Table(named)) = (Schema::named(&path), value) {
            // Operator-named tables: each checked against the template.
            for (name, inner) in named {
                if let toml::Value::Table(inner) = inner {
                    check_keys(inner, &template, &format!("{path}.{name}"), origin)?;
                }
            }
            continue;
        }
        match (schema.get(key), value) {
            (None, _) => return Err(unknown_key(origin, path, schema)),
            (Some(serde_json::Value::Object(inner)), toml::Value::Table(table)) => {
                check_keys(table, inner, &path, origin)?;
            }
            // A value of the wrong shape is left to deserialization, which
            // says what was expected.
            _ => {}
        }
    }
    Ok(())
}

fn unknown_key(
    origin: &Origin,
    path: String,
    level: &serde_json::Map<String, serde_json::Value>,
) -> ConfigError {
    let expected: Vec<String> = level.keys().map(|k| format!("`{k}`")).collect();
    ConfigError {
        origin: origin.clone(),
        key: Some(path),
        kind: Kind::UnknownKey(format!("expected one of {}", expected.join(", "))),
    }
}

/// Applies the `EDGEGATE_SECTION__KEY` variables among `env` to `table`, and
/// returns which variable set which key.
fn apply_env(
    table: &mut toml::Table,
    file: &Origin,
    schema: &Schema,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX) && name.contains(ENV_SEPARATOR))
        .collect();
    // The environment has no order; sorting makes the reported error (when
    // several variables are wrong) the same on every run.
    vars.sort();

    let mut applied: BTreeMap<String, String> = BTreeMap::new();
    for (name, text) in vars {
        let origin = Origin::Env(name.clone());
        let segments: Vec<String> = name
            .strip_prefix(ENV_PREFIX)
            .unwrap_or_default()
            .split(ENV_SEPARATOR)
            .map(str::to_ascii_lowercase)
            .collect();
        let kind = schema.leaf(&segments, &origin)?;
        let key = segments.join(".");
        if let Some(other) = applied.get(&key) {
            return Err(ConfigError {
                origin,
                key: Some(key),
                kind: Kind::Invalid(format!("also set by environment variable {other}")),
            });
        }

        let Some((leaf, sections)) = segments.split_last() else {
            continue;
        };
        // Walk down to the table that holds the key, creating sections the
        // file left out.
        let mut current = &mut *table;
        let mut path = String::new();
        for section in sections {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(section);
            let entry = current
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            current = match entry {
                toml::Value::Table(inner) => inner,
                // The file gave a value where a section belongs; that is the
                // file's error, and deserialization would report it too.
                other => {
                    return Err(ConfigError {
                        origin: file.clone(),
                        key: Some(path),
                        kind: Kind::Invalid(format!(
                            "invalid type: {}, expected a table",
                            other.type_str()
                        )),
                    });
                }
            };
        }
        if text.is_empty() {
            // Empty text: back to the built-in default (off, for listeners).
            current.remove(leaf.as_str());
        } else if kind == ValueKind::Scalar
            && parse_toml_value(&text).is_none()
            && text.trim().parse::<i128>().is_ok()
        {
            // Without this, the deserializer would call it a string.
            return Err(ConfigError {
                origin,
                key: Some(key),
                kind: Kind::Invalid(format!(
                    "{} is too large: integers end at {}",
                    text.trim(),
                    i64::MAX
                )),
            });
        } else {
            current.insert(leaf.clone(), env_value(&text, kind));
        }
        applied.insert(key, name);
    }
    Ok(applied)
}

/// Parses an override variable's text as the kind of value its key holds.
fn env_value(text: &str, kind: ValueKind) -> toml::Value {
    match kind {
        ValueKind::Text => match parse_toml_value(text) {
            // A quoted string, as a shell or an env file may pass it.
            Some(toml::Value::String(s)) => toml::Value::String(s),
            _ => toml::Value::String(text.to_owned()),
        },
        ValueKind::List => {
            if text.trim_start().starts_with('[') {
                parse_toml_value(text).unwrap_or_else(|| toml::Value::String(text.to_owned()))
            } else {
                toml::Value::Array(
                    text.split(',')
                        .map(|item| {
                            let item = item.trim();
                            parse_toml_value(item)
                                .unwrap_or_else(|| toml::Value::String(item.to_owned()))
                        })
                        .collect(),
                )
            }
        }
        // Text that is not a TOML value stays a string, so that the
        // deserializer reports it against the key ("invalid type: string").
        ValueKind::Scalar => {
            parse_toml_value(text).unwrap_or_else(|| toml::Value::String(text.to_owned()))
        }
    }
}

/// `text` as one TOML value, or `None` when it is not exactly one.
fn parse_toml_value(text: &str) -> Option<toml::Value> {
    let mut table: toml::Table = toml::from_str(&format!("v = {text}")).ok()?;
    // More than one key means the text smuggled in a line break and another
    // assignment; take it as a plain string instead.
    if table.len() != 1 {
        return None;
    }
    table.remove("v")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A TOML file in the temp directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(text: &str) -> TempFile {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "edgegate-config-test-{}-{n}.toml",
                std::process::id()
            ));
            std::fs::write(&path, text).expect("write temp config");
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The embedded default with `vars` applied.
    fn load_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(None, env(vars))
    }

    /// Loads `text` from a file with `vars` applied.
    fn load_text(text: &str, vars: &[(&str, &str)]) -> (Result<Config, ConfigError>, PathBuf) {
        let file = TempFile::new(text);
        (Config::load(Some(&file.0), env(vars)), file.0.clone())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// Asserts that the embedded default with `vars` fails on `key`, blamed
    /// on the variable that set `key` if one did.
    #[track_caller]
    fn rejects(vars: &[(&str, &str)], key: &str) -> ConfigError {
        let err = match load_env(vars) {
            Ok(config) => panic!("accepted {vars:?}: {config:?}"),
            Err(err) => err,
        };
        assert_eq!(err.key(), Some(key), "{err}");
        let var = format!("EDGEGATE_{}", key.to_uppercase().replace('.', "__"));
        let expected = if vars.iter().any(|(name, _)| *name == var) {
            Origin::Env(var)
        } else {
            Origin::Embedded
        };
        assert_eq!(err.origin(), &expected, "{err}");
        assert!(err.to_string().contains(&format!("key `{key}`")), "{err}");
        err
    }

    #[track_caller]
    fn accepts(vars: &[(&str, &str)]) -> Config {
        match load_env(vars) {
            Ok(config) => config,
            Err(err) => panic!("rejected {vars:?}: {err}"),
        }
    }

    const WITH_TLS: [(&str, &str); 2] = [
        (
            "EDGEGATE_TLS__CERT_CHAIN",
            "/etc/edgegate/tls/fullchain.pem",
        ),
        ("EDGEGATE_TLS__KEY", "/etc/edgegate/tls/privkey.pem"),
    ];

    // ---- [api], [services.<name>], [hooks], [webhooks] ----

    #[test]
    fn services_are_named_tables_with_checked_keys() {
        let (c, _) = load_text(
            "[ws]\nlisten = \"127.0.0.1:1\"\n[services.mod-1]\nurl = \"http://127.0.0.1:9/x\"\n[hooks]\npublish = \"mod-1\"\n",
            &[],
        );
        let c = c.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.services["mod-1"].url, "http://127.0.0.1:9/x");
        assert_eq!(c.services["mod-1"].timeout_ms, 5_000);
        let (e, _) = load_text(
            "[ws]\nlisten = \"127.0.0.1:1\"\n[services.a]\nurl = \"http://x/\"\nlisten = 1\n",
            &[],
        );
        let e = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("unknown key `services.a.listen`"), "{e}");
        let (e, _) = load_text(
            "[ws]\nlisten = \"127.0.0.1:1\"\n[services.a]\nurl = \"https://x/\"\n",
            &[],
        );
        assert_eq!(
            e.err().and_then(|e| e.key().map(str::to_owned)).as_deref(),
            Some("services.a.url")
        );
        let (e, _) = load_text(
            "[ws]\nlisten = \"127.0.0.1:1\"\n[services.\"a b\"]\nurl = \"http://x/\"\n",
            &[],
        );
        assert_eq!(
            e.err().and_then(|e| e.key().map(str::to_owned)).as_deref(),
            Some("services.a b")
        );
        // A variable names a service too (lower case).
        let c = accepts(&[("EDGEGATE_SERVICES__ECHO2__URL", "http://127.0.0.1:9/")]);
        assert_eq!(c.services["echo2"].url, "http://127.0.0.1:9/");
        let e = load_env(&[("EDGEGATE_SERVICES__ECHO2__URLL", "x")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown key"), "{e}");
        rejects(
            &[("EDGEGATE_SERVICES__ECHO2__URL", "ftp://x")],
            "services.echo2.url",
        );
        rejects(
            &[
                ("EDGEGATE_SERVICES__ECHO2__URL", "http://x/"),
                ("EDGEGATE_SERVICES__ECHO2__TIMEOUT_MS", "0"),
            ],
            "services.echo2.timeout_ms",
        );
    }

    #[test]
    fn api_and_hooks_rules() {
        rejects(&[("EDGEGATE_API__LISTEN", "127.0.0.1:9191")], "api.keys");
        rejects(
            &[
                ("EDGEGATE_API__LISTEN", "127.0.0.1:9191"),
                ("EDGEGATE_API__KEYS", "short"),
            ],
            "api.keys",
        );
        let c = accepts(&[
            ("EDGEGATE_API__LISTEN", "127.0.0.1:9191"),
            ("EDGEGATE_API__KEYS", "0123456789abcdef,fedcba9876543210"),
        ]);
        assert_eq!(c.api.keys.len(), 2);
        rejects(
            &[
                ("EDGEGATE_API__LISTEN", "127.0.0.1:9090"),
                ("EDGEGATE_API__KEYS", "0123456789abcdef"),
            ],
            "api.listen",
        );
        rejects(
            &[("EDGEGATE_API__MAX_BODY_BYTES", "10")],
            "api.max_body_bytes",
        );
        rejects(
            &[("EDGEGATE_API__CLUSTER_TIMEOUT_MS", "9000")],
            "api.cluster_timeout_ms",
        );
        // On the embedded backbone a hook must name an HTTP service.
        rejects(&[("EDGEGATE_HOOKS__PUBLISH", "nope")], "hooks.publish");
        rejects(&[("EDGEGATE_HOOKS__ON_ERROR", "maybe")], "hooks.on_error");
        rejects(
            &[
                ("EDGEGATE_SERVICES__A__URL", "http://x/"),
                ("EDGEGATE_HOOKS__CONNECT", "a"),
                ("EDGEGATE_HOOKS__TIMEOUT_MS", "10000"),
            ],
            "hooks.timeout_ms",
        );
        rejects(
            &[("EDGEGATE_WEBHOOKS__URL", "http://x/")],
            "webhooks.secret",
        );
        rejects(&[("EDGEGATE_WEBHOOKS__QUEUE", "0")], "webhooks.queue");
        let c = accepts(&[
            ("EDGEGATE_WEBHOOKS__URL", "http://x/"),
            ("EDGEGATE_WEBHOOKS__SECRET", "0123456789abcdef"),
        ]);
        assert_eq!(c.webhooks.batch, 100);
    }

    // ---- defaults ----

    #[test]
    fn embedded_default_loads() {
        let config = accepts(&[]);
        assert_eq!(config.ws.listen, Some(addr("127.0.0.1:8080")));
        assert_eq!(config.ws.path, "/ws");
        assert_eq!(config.ws.echo_path, None);
        assert_eq!(config.tcp.listen, Some(addr("127.0.0.1:7000")));
        assert_eq!(config.admin.listen, Some(addr("127.0.0.1:9090")));
        assert_eq!(config.quic.listen, None);
        assert_eq!(config.tls, Tls::default());
        assert_eq!(config.auth.mode, AuthMode::None);
        assert_eq!(config.rooms.policy, RoomPolicy::Open);
        assert_eq!(config.backbone.kind, BackboneKind::Embedded);
        assert_eq!(config.heartbeat.interval_ms, 25_000);
        assert_eq!(config.idle_timeout_ms(), 60_000);
    }

    /// The file and the structs' defaults must not drift apart: they differ
    /// only in the listeners the file turns on.
    #[test]
    fn embedded_default_matches_struct_defaults() {
        let mut expected = Config::default();
        expected.ws.listen = Some(addr("127.0.0.1:8080"));
        expected.tcp.listen = Some(addr("127.0.0.1:7000"));
        expected.admin.listen = Some(addr("127.0.0.1:9090"));
        assert_eq!(accepts(&[]), expected);
    }

    /// Every key of the structs appears in the embedded file, set or
    /// commented out.
    #[test]
    fn embedded_default_names_every_key() {
        let schema = Schema::new(&Origin::Program).expect("schema");
        for (section, keys) in &schema.root {
            if services::NAMED_SECTIONS.contains(&section.as_str()) {
                assert!(
                    DEFAULT_TOML.contains(&format!("# [{section}.")),
                    "an example of [{section}.<name>] missing"
                );
                continue;
            }
            assert!(
                DEFAULT_TOML.contains(&format!("[{section}]")),
                "section [{section}] missing"
            );
            let serde_json::Value::Object(keys) = keys else {
                panic!("{section} is not a section")
            };
            for (key, value) in keys {
                if value.is_object() {
                    // A nested table, such as [backbone.nats].
                    assert!(
                        DEFAULT_TOML.contains(&format!("[{section}.{key}]")),
                        "section [{section}.{key}] missing"
                    );
                    continue;
                }
                let set = DEFAULT_TOML.contains(&format!("\n{key} = "));
                let commented = DEFAULT_TOML.contains(&format!("\n# {key} = "));
                assert!(set || commented, "key {section}.{key} missing");
            }
        }
    }

    #[test]
    fn production_example_loads() {
        let text = include_str!("../config/production.example.toml");
        let (config, _) = load_text(text, &[]);
        let config = config.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.ws.listen, Some(addr("0.0.0.0:443")));
        assert!(config.ws.tls && config.tcp.tls);
        assert_eq!(config.auth.mode, AuthMode::Jwt);
        assert_eq!(config.rooms.policy, RoomPolicy::Claims);
        assert_eq!(config.backbone.kind, BackboneKind::Nats);
        assert_eq!(
            config.tls.cert_chain.as_deref(),
            Some(Path::new("/etc/edgegate/tls/fullchain.pem"))
        );
    }

    #[test]
    fn to_toml_round_trips() {
        let mut vars = WITH_TLS.to_vec();
        vars.extend([
            ("EDGEGATE_QUIC__LISTEN", "[::1]:4433"),
            ("EDGEGATE_SHARDS__CPUS", "3,1"),
            ("EDGEGATE_AUTH__MODE", "jwt"),
            ("EDGEGATE_AUTH__SECRET", "0123456789abcdef0123456789abcdef"),
            ("EDGEGATE_WS__ECHO_PATH", "/echo"),
        ]);
        let config = accepts(&vars);
        let text = config.to_toml();
        let (again, _) = load_text(&text, &[]);
        assert_eq!(again.unwrap_or_else(|e| panic!("{e}\n{text}")), config);
    }

    #[test]
    fn empty_file_takes_struct_defaults_and_needs_a_listener() {
        let (err, path) = load_text("", &[]);
        let err = err.expect_err("no listener");
        assert_eq!(err.origin(), &Origin::File(path));
        assert_eq!(err.key(), Some("ws.listen"));

        let (config, _) = load_text("", &[("EDGEGATE_TCP__LISTEN", "127.0.0.1:0")]);
        let config = config.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.ws.listen, None);
        assert_eq!(config.admin.listen, None);
        assert_eq!(config.ws.path, "/ws");
    }

    // ---- environment overrides ----

    #[test]
    fn env_overrides_an_address() {
        let config = accepts(&[("EDGEGATE_WS__LISTEN", "127.0.0.1:18080")]);
        assert_eq!(config.ws.listen, Some(addr("127.0.0.1:18080")));
        let config = accepts(&[("EDGEGATE_WS__LISTEN", "[::]:18080")]);
        assert_eq!(config.ws.listen, Some(addr("[::]:18080")));
        // Quoted, as an env file may pass it.
        let config = accepts(&[("EDGEGATE_WS__LISTEN", "\"127.0.0.1:18081\"")]);
        assert_eq!(config.ws.listen, Some(addr("127.0.0.1:18081")));
    }

    #[test]
    fn env_overrides_an_integer() {
        let config = accepts(&[
            ("EDGEGATE_LIMITS__MAX_CONNECTIONS", "5"),
            ("EDGEGATE_HEARTBEAT__INTERVAL_MS", "1_000"),
        ]);
        assert_eq!(config.limits.max_connections, 5);
        assert_eq!(config.heartbeat.interval_ms, 1_000);
        assert_eq!(config.idle_timeout_ms(), 12_000);
    }

    #[test]
    fn env_overrides_a_bool_and_paths() {
        let mut vars = WITH_TLS.to_vec();
        vars.push(("EDGEGATE_TCP__TLS", "true"));
        let config = accepts(&vars);
        assert!(config.tcp.tls);
        assert_eq!(
            config.tls.key.as_deref(),
            Some(Path::new("/etc/edgegate/tls/privkey.pem"))
        );
        let err = rejects(&[("EDGEGATE_TCP__TLS", "yes")], "tcp.tls");
        assert!(err.to_string().contains("expected a boolean"), "{err}");
    }

    #[test]
    fn env_overrides_a_list() {
        let config = accepts(&[("EDGEGATE_SHARDS__CPUS", "0,1")]);
        assert_eq!(config.shards.cpus, vec![0, 1]);
        let config = accepts(&[("EDGEGATE_SHARDS__CPUS", " 2 , 3 ")]);
        assert_eq!(config.shards.cpus, vec![2, 3]);
        let config = accepts(&[("EDGEGATE_SHARDS__CPUS", "[4, 5]")]);
        assert_eq!(config.shards.cpus, vec![4, 5]);
        let config = accepts(&[("EDGEGATE_SHARDS__CPUS", "7")]);
        assert_eq!(config.shards.cpus, vec![7]);
    }

    #[test]
    fn env_overrides_strings_and_enums() {
        let config = accepts(&[
            ("EDGEGATE_LOG__LEVEL", "info,edgegate=debug"),
            ("EDGEGATE_LOG__FORMAT", "\"json\""),
            ("EDGEGATE_ADMIN__TOKEN", "12345"),
            ("EDGEGATE_BACKBONE__KIND", "nats"),
            ("EDGEGATE_BACKBONE__NODE_ID", "true"),
        ]);
        assert_eq!(config.log.level, "info,edgegate=debug");
        assert_eq!(config.log.format, "json");
        // Digits are a string where the key is one.
        assert_eq!(config.admin.token.as_deref(), Some("12345"));
        assert_eq!(config.backbone.kind, BackboneKind::Nats);
        assert_eq!(config.backbone.node_id, "true");
    }

    #[test]
    fn empty_env_value_turns_an_option_off() {
        let config = accepts(&[("EDGEGATE_TCP__LISTEN", ""), ("EDGEGATE_ADMIN__LISTEN", "")]);
        assert_eq!(config.tcp.listen, None);
        assert_eq!(config.admin.listen, None);
        assert_eq!(config.ws.listen, Some(addr("127.0.0.1:8080")));
    }

    #[test]
    fn empty_env_value_restores_the_built_in_default() {
        let text = "[ws]\nlisten = \"127.0.0.1:0\"\n[heartbeat]\ninterval_ms = 30000\n";
        let (config, _) = load_text(text, &[("EDGEGATE_HEARTBEAT__INTERVAL_MS", "")]);
        let config = config.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.heartbeat.interval_ms, 25_000);
        let config = accepts(&[("EDGEGATE_SHARDS__CPUS", "")]);
        assert!(config.shards.cpus.is_empty());
    }

    #[test]
    fn env_creates_sections_the_file_lacks() {
        let (config, _) = load_text(
            "[tcp]\nlisten = \"127.0.0.1:0\"\n",
            &[("EDGEGATE_LIMITS__RETRY_MS", "500")],
        );
        assert_eq!(
            config.unwrap_or_else(|e| panic!("{e}")).limits.retry_ms,
            500
        );
    }

    #[test]
    fn env_ignores_other_variables() {
        let config = accepts(&[
            ("EDGEGATE_CONFIG", "/nowhere.toml"),
            ("EDGEGATE_LOG", "debug"),
            ("PATH", "/usr/bin"),
            ("edgegate_ws__listen", "nonsense"),
            ("XEDGEGATE_WS__LISTEN", "nonsense"),
        ]);
        assert_eq!(config, accepts(&[]));
    }

    #[test]
    fn env_names_are_case_insensitive_after_the_prefix_but_not_twice() {
        let config = accepts(&[("EDGEGATE_Ws__Listen", "127.0.0.1:1234")]);
        assert_eq!(config.ws.listen, Some(addr("127.0.0.1:1234")));
        let err = load_env(&[
            ("EDGEGATE_WS__LISTEN", "127.0.0.1:1"),
            ("EDGEGATE_ws__listen", "127.0.0.1:2"),
        ])
        .expect_err("two variables for one key");
        assert_eq!(err.key(), Some("ws.listen"));
        assert!(err.to_string().contains("also set by"), "{err}");
    }

    // ---- unknown keys ----

    #[test]
    fn unknown_key_in_file_is_named() {
        let (err, path) = load_text("[ws]\nlisen = \"127.0.0.1:1\"\n", &[]);
        let err = err.expect_err("unknown key");
        assert_eq!(err.origin(), &Origin::File(path.clone()));
        assert_eq!(err.key(), Some("ws.lisen"));
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "config error in {}: unknown key `ws.lisen` (expected one of ",
                path.display()
            )),
            "{text}"
        );
        assert!(
            text.contains("`listen`") && text.contains("`echo_path`"),
            "{text}"
        );
    }

    #[test]
    fn unknown_section_and_top_level_key_in_file() {
        let (err, _) = load_text("[wss]\nlisten = \"127.0.0.1:1\"\n", &[]);
        assert_eq!(err.expect_err("unknown section").key(), Some("wss"));
        let (err, _) = load_text("debug = true\n", &[]);
        let err = err.expect_err("unknown key");
        assert_eq!(err.key(), Some("debug"));
        assert!(err.to_string().contains("`heartbeat`"), "{err}");
        let (err, _) = load_text("[ws.extra]\nx = 1\n", &[]);
        assert_eq!(err.expect_err("unknown table").key(), Some("ws.extra"));
    }

    #[test]
    fn unknown_key_in_env_names_the_variable() {
        let err = load_env(&[("EDGEGATE_WS__LISEN", "127.0.0.1:1")]).expect_err("unknown");
        assert_eq!(err.origin(), &Origin::Env("EDGEGATE_WS__LISEN".into()));
        assert_eq!(err.key(), Some("ws.lisen"));
        assert!(
            err.to_string().starts_with(
                "config error in environment variable EDGEGATE_WS__LISEN: unknown key `ws.lisen` (expected one of "
            ),
            "{err}"
        );
        // Even when empty: a typo must not pass silently.
        let err = load_env(&[("EDGEGATE_WS__LISEN", "")]).expect_err("unknown");
        assert_eq!(err.key(), Some("ws.lisen"));
        let err = load_env(&[("EDGEGATE_NOPE__X", "1")]).expect_err("unknown section");
        assert_eq!(err.key(), Some("nope"));
        let err = load_env(&[("EDGEGATE_WS__LISTEN__PORT", "1")]).expect_err("below a value");
        assert_eq!(err.key(), Some("ws.listen.port"));
        let err = load_env(&[("EDGEGATE_WS__", "1")]).expect_err("empty segment");
        assert_eq!(err.origin(), &Origin::Env("EDGEGATE_WS__".into()));
    }

    // ---- bad values ----

    #[test]
    fn bad_value_in_file_names_key_and_file() {
        let (err, path) = load_text("[limits]\nmax_frame_bytes = \"x\"\n", &[]);
        let err = err.expect_err("bad value");
        assert_eq!(
            err.to_string(),
            format!(
                "config error in {}: key `limits.max_frame_bytes`: invalid type: string \"x\", expected usize",
                path.display()
            )
        );
        let (err, _) = load_text("[auth]\nmode = \"oauth\"\n", &[]);
        let err = err.expect_err("bad enum");
        assert_eq!(err.key(), Some("auth.mode"));
        assert!(err.to_string().contains("`jwt`"), "{err}");
        let (err, _) = load_text("ws = 5\n", &[]);
        assert_eq!(err.expect_err("section as value").key(), Some("ws"));
        let (err, _) = load_text("[shards]\ncount = -1\n", &[]);
        assert_eq!(err.expect_err("negative").key(), Some("shards.count"));
    }

    #[test]
    fn bad_value_in_env_names_key_and_variable() {
        let err = load_env(&[("EDGEGATE_WS__LISTEN", "nonsense")]).expect_err("bad addr");
        assert_eq!(
            err.to_string(),
            "config error in environment variable EDGEGATE_WS__LISTEN: key `ws.listen`: invalid socket address syntax"
        );
        let err = rejects(
            &[("EDGEGATE_LIMITS__MAX_FRAME_BYTES", "abc")],
            "limits.max_frame_bytes",
        );
        assert!(
            err.to_string().contains("invalid type: string \"abc\""),
            "{err}"
        );
        let err = load_env(&[("EDGEGATE_SHARDS__CPUS", "0,x")]).expect_err("bad item");
        assert_eq!(err.key(), Some("shards.cpus[1]"));
        assert_eq!(err.origin(), &Origin::Env("EDGEGATE_SHARDS__CPUS".into()));
        // Text that sneaks in a second assignment stays one (bad) string.
        rejects(
            &[("EDGEGATE_LIMITS__RETRY_MS", "5\nmax_connections = 1")],
            "limits.retry_ms",
        );
    }

    #[test]
    fn a_file_value_where_env_needs_a_section_blames_the_file() {
        let (err, path) = load_text("ws = 5\n", &[("EDGEGATE_WS__PATH", "/x")]);
        let err = err.expect_err("section as value");
        assert_eq!(err.origin(), &Origin::File(path));
        assert_eq!(err.key(), Some("ws"));
    }

    #[test]
    fn syntax_error_and_missing_file_name_the_file() {
        let (err, path) = load_text("[ws\n", &[]);
        let err = err.expect_err("syntax");
        assert!(
            err.to_string().starts_with(&format!(
                "config error in {}: TOML parse error",
                path.display()
            )),
            "{err}"
        );
        let missing = std::env::temp_dir().join("edgegate-config-test-missing.toml");
        let err = Config::from_env_and_file(Some(&missing)).expect_err("missing");
        assert_eq!(err.origin(), &Origin::File(missing));
        assert!(std::error::Error::source(&err).is_some());
    }

    // ---- validation ----

    #[test]
    fn heartbeat_interval_has_a_floor() {
        rejects(
            &[("EDGEGATE_HEARTBEAT__INTERVAL_MS", "99")],
            "heartbeat.interval_ms",
        );
        accepts(&[("EDGEGATE_HEARTBEAT__INTERVAL_MS", "100")]);
    }

    #[test]
    fn idle_timeout_exceeds_interval() {
        rejects(
            &[("EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS", "25000")],
            "heartbeat.idle_timeout_ms",
        );
        let config = accepts(&[("EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS", "25001")]);
        assert_eq!(config.idle_timeout_ms(), 25_001);
        // The resolved default never overflows.
        let config = accepts(&[("EDGEGATE_HEARTBEAT__INTERVAL_MS", &i64::MAX.to_string())])
            .idle_timeout_ms();
        assert_eq!(config, u64::MAX);
        // Past TOML's integers, the error says so rather than "string".
        let err = rejects(
            &[("EDGEGATE_HEARTBEAT__INTERVAL_MS", &u64::MAX.to_string())],
            "heartbeat.interval_ms",
        );
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn hello_timeout_has_a_floor() {
        rejects(
            &[("EDGEGATE_HEARTBEAT__HELLO_TIMEOUT_MS", "0")],
            "heartbeat.hello_timeout_ms",
        );
        accepts(&[("EDGEGATE_HEARTBEAT__HELLO_TIMEOUT_MS", "100")]);
    }

    #[test]
    fn max_frame_bytes_is_bounded() {
        rejects(
            &[("EDGEGATE_LIMITS__MAX_FRAME_BYTES", "63")],
            "limits.max_frame_bytes",
        );
        accepts(&[("EDGEGATE_LIMITS__MAX_FRAME_BYTES", "64")]);
        let big = (16 * 1024 * 1024).to_string();
        let queue = (16 * 1024 * 1024 + 1024).to_string();
        accepts(&[
            ("EDGEGATE_LIMITS__MAX_FRAME_BYTES", &big),
            ("EDGEGATE_LIMITS__OUTBOUND_QUEUE_BYTES", &queue),
        ]);
        let too_big = (16 * 1024 * 1024 + 1).to_string();
        rejects(
            &[
                ("EDGEGATE_LIMITS__MAX_FRAME_BYTES", &too_big),
                ("EDGEGATE_LIMITS__OUTBOUND_QUEUE_BYTES", "999999999"),
            ],
            "limits.max_frame_bytes",
        );
    }

    #[test]
    fn ws_compression_keys_are_checked() {
        let c = accepts(&[]);
        assert_eq!(c.ws.compression, WsCompression::Negotiate);
        assert_eq!(
            (c.ws.compression_min_bytes, c.ws.compression_shared),
            (128, true)
        );
        let c = accepts(&[
            ("EDGEGATE_WS__COMPRESSION", "off"),
            ("EDGEGATE_WS__COMPRESSION_MIN_BYTES", "0"),
            ("EDGEGATE_WS__COMPRESSION_SHARED", "false"),
        ]);
        assert_eq!(c.ws.compression, WsCompression::Off);
        assert_eq!(
            (c.ws.compression_min_bytes, c.ws.compression_shared),
            (0, false)
        );
        let err = rejects(&[("EDGEGATE_WS__COMPRESSION", "gzip")], "ws.compression");
        assert!(err.to_string().contains("negotiate"), "{err}");
        rejects(
            &[("EDGEGATE_WS__COMPRESSION_MIN_BYTES", "16777217")],
            "ws.compression_min_bytes",
        );
        rejects(
            &[("EDGEGATE_WS__COMPRESSION_MIN_BYTES", "-1")],
            "ws.compression_min_bytes",
        );
    }

    #[test]
    fn outbound_queue_holds_a_largest_frame() {
        rejects(
            &[("EDGEGATE_LIMITS__OUTBOUND_QUEUE_BYTES", "66559")],
            "limits.outbound_queue_bytes",
        );
        accepts(&[("EDGEGATE_LIMITS__OUTBOUND_QUEUE_BYTES", "66560")]);
    }

    #[test]
    fn retry_ms_is_positive() {
        rejects(&[("EDGEGATE_LIMITS__RETRY_MS", "0")], "limits.retry_ms");
    }

    #[test]
    fn shard_count_is_bounded() {
        rejects(&[("EDGEGATE_SHARDS__COUNT", "1025")], "shards.count");
        accepts(&[("EDGEGATE_SHARDS__COUNT", "1024")]);
    }

    #[test]
    fn shard_cpus_are_unique_and_match_count() {
        let err = rejects(&[("EDGEGATE_SHARDS__CPUS", "0,1,0")], "shards.cpus");
        assert!(err.to_string().contains("CPU 0 is listed twice"), "{err}");
        rejects(
            &[
                ("EDGEGATE_SHARDS__COUNT", "2"),
                ("EDGEGATE_SHARDS__CPUS", "0,1,2"),
            ],
            "shards.cpus",
        );
        accepts(&[
            ("EDGEGATE_SHARDS__COUNT", "2"),
            ("EDGEGATE_SHARDS__CPUS", "4,6"),
        ]);
    }

    #[test]
    fn ws_paths_start_with_a_slash_and_differ() {
        rejects(&[("EDGEGATE_WS__PATH", "ws")], "ws.path");
        rejects(&[("EDGEGATE_WS__PATH", "/ws?x=1")], "ws.path");
        rejects(&[("EDGEGATE_WS__ECHO_PATH", "echo")], "ws.echo_path");
        rejects(&[("EDGEGATE_WS__ECHO_PATH", "/ws")], "ws.echo_path");
        let config = accepts(&[("EDGEGATE_WS__ECHO_PATH", "/echo")]);
        assert_eq!(config.ws.echo_path.as_deref(), Some("/echo"));
    }

    #[test]
    fn a_client_listener_is_required() {
        let err = load_env(&[("EDGEGATE_WS__LISTEN", ""), ("EDGEGATE_TCP__LISTEN", "")])
            .expect_err("no listener");
        assert_eq!(err.key(), Some("ws.listen"));
        assert_eq!(err.origin(), &Origin::Env("EDGEGATE_WS__LISTEN".into()));
        let mut vars = WITH_TLS.to_vec();
        vars.extend([
            ("EDGEGATE_WS__LISTEN", ""),
            ("EDGEGATE_TCP__LISTEN", ""),
            ("EDGEGATE_QUIC__LISTEN", "127.0.0.1:4433"),
        ]);
        accepts(&vars);
    }

    #[test]
    fn tcp_listeners_need_distinct_ports() {
        rejects(&[("EDGEGATE_TCP__LISTEN", "127.0.0.1:8080")], "tcp.listen");
        rejects(
            &[("EDGEGATE_ADMIN__LISTEN", "127.0.0.1:7000")],
            "admin.listen",
        );
        rejects(&[("EDGEGATE_WS__LISTEN", "0.0.0.0:7000")], "tcp.listen");
        // Ephemeral ports never collide; tests bind them freely.
        accepts(&[
            ("EDGEGATE_WS__LISTEN", "127.0.0.1:0"),
            ("EDGEGATE_TCP__LISTEN", "127.0.0.1:0"),
            ("EDGEGATE_ADMIN__LISTEN", "127.0.0.1:0"),
        ]);
        // QUIC is UDP and may share the WebSocket port.
        let mut vars = WITH_TLS.to_vec();
        vars.push(("EDGEGATE_QUIC__LISTEN", "127.0.0.1:8080"));
        accepts(&vars);
    }

    #[test]
    fn tls_users_need_a_certificate() {
        rejects(&[("EDGEGATE_WS__TLS", "true")], "ws.tls");
        rejects(&[("EDGEGATE_TCP__TLS", "true")], "tcp.tls");
        rejects(
            &[("EDGEGATE_QUIC__LISTEN", "127.0.0.1:4433")],
            "quic.listen",
        );
        // A TLS flag on a listener that is off asks for nothing.
        accepts(&[("EDGEGATE_WS__TLS", "true"), ("EDGEGATE_WS__LISTEN", "")]);
        let mut vars = WITH_TLS.to_vec();
        vars.push(("EDGEGATE_WS__TLS", "true"));
        assert!(accepts(&vars).ws.tls);
    }

    #[test]
    fn tls_files_come_in_pairs() {
        rejects(&[WITH_TLS[0]], "tls.key");
        rejects(&[WITH_TLS[1]], "tls.cert_chain");
    }

    #[test]
    fn public_admin_needs_a_token() {
        rejects(
            &[("EDGEGATE_ADMIN__LISTEN", "0.0.0.0:9090")],
            "admin.listen",
        );
        accepts(&[
            ("EDGEGATE_ADMIN__LISTEN", "0.0.0.0:9090"),
            ("EDGEGATE_ADMIN__TOKEN", "s3cret"),
        ]);
        accepts(&[("EDGEGATE_ADMIN__LISTEN", "[::1]:9090")]);
        let (err, _) = load_text(
            "[tcp]\nlisten = \"127.0.0.1:0\"\n[admin]\ntoken = \"\"\n",
            &[],
        );
        assert_eq!(err.expect_err("empty token").key(), Some("admin.token"));
    }

    #[test]
    fn jwt_needs_its_key_and_a_token_source() {
        let jwt = ("EDGEGATE_AUTH__MODE", "jwt");
        rejects(&[jwt], "auth.secret");
        rejects(&[jwt, ("EDGEGATE_AUTH__SECRET", "short")], "auth.secret");
        rejects(
            &[jwt, ("EDGEGATE_AUTH__ALGORITHM", "ES256")],
            "auth.public_key",
        );
        rejects(
            &[
                jwt,
                ("EDGEGATE_AUTH__ALGORITHM", "EdDSA"),
                ("EDGEGATE_AUTH__PUBLIC_KEY", "/k.pem"),
                ("EDGEGATE_AUTH__TOKEN_SOURCES", "[]"),
            ],
            "auth.token_sources",
        );
        let c = accepts(&[
            jwt,
            ("EDGEGATE_AUTH__ALGORITHM", "RS256"),
            ("EDGEGATE_AUTH__PUBLIC_KEY", "/k.pem"),
            ("EDGEGATE_AUTH__TOKEN_SOURCES", "hello,header"),
        ]);
        assert_eq!(c.auth.algorithm, JwtAlgorithm::RS256);
        assert_eq!(
            c.auth.token_sources,
            vec![TokenSource::Hello, TokenSource::Header]
        );
        rejects(&[("EDGEGATE_AUTH__ALGORITHM", "none")], "auth.algorithm");
    }

    #[test]
    fn rate_limits_are_consistent() {
        rejects(
            &[("EDGEGATE_LIMITS__CONN_BYTES_BURST", "100")],
            "limits.conn_bytes_burst",
        );
        rejects(
            &[("EDGEGATE_LIMITS__ACCEPT_BURST", "0")],
            "limits.accept_burst",
        );
        rejects(
            &[("EDGEGATE_LIMITS__RATE_LIMITED_CLOSE_AFTER", "0")],
            "limits.rate_limited_close_after",
        );
        accepts(&[
            ("EDGEGATE_LIMITS__ACCEPT_PER_S", "0"),
            ("EDGEGATE_LIMITS__ACCEPT_BURST", "0"),
        ]);
    }

    #[test]
    fn claims_policy_needs_jwt() {
        rejects(&[("EDGEGATE_ROOMS__POLICY", "claims")], "rooms.policy");
        accepts(&[
            ("EDGEGATE_ROOMS__POLICY", "claims"),
            ("EDGEGATE_AUTH__MODE", "jwt"),
            ("EDGEGATE_AUTH__SECRET", "0123456789abcdef0123456789abcdef"),
        ]);
    }

    #[test]
    fn subject_prefix_is_a_nats_token() {
        for bad in ["a.b", "a b", "*", ">", "a\tb"] {
            rejects(
                &[("EDGEGATE_BACKBONE__SUBJECT_PREFIX", bad)],
                "backbone.subject_prefix",
            );
        }
        let (err, _) = load_text(
            "[tcp]\nlisten = \"127.0.0.1:0\"\n[backbone]\nsubject_prefix = \"\"\n",
            &[],
        );
        assert_eq!(
            err.expect_err("empty prefix").key(),
            Some("backbone.subject_prefix")
        );
        let config = accepts(&[("EDGEGATE_BACKBONE__SUBJECT_PREFIX", "chat-prod_1")]);
        assert_eq!(config.backbone.subject_prefix, "chat-prod_1");
    }

    #[test]
    fn jetstream_history_settings_are_checked() {
        let js = ("EDGEGATE_BACKBONE__NATS__HISTORY", "jetstream");
        let config = accepts(&[js]);
        assert_eq!(config.backbone.nats.history, NatsHistory::Jetstream);
        assert_eq!(config.backbone.nats.stream, "EG");
        rejects(
            &[js, ("EDGEGATE_BACKBONE__NATS__STREAM", "a.b")],
            "backbone.nats.stream",
        );
        rejects(
            &[js, ("EDGEGATE_BACKBONE__NATS__REPLICAS", "0")],
            "backbone.nats.replicas",
        );
        rejects(
            &[js, ("EDGEGATE_BACKBONE__NATS__REPLICAS", "6")],
            "backbone.nats.replicas",
        );
        rejects(
            &[js, ("EDGEGATE_BACKBONE__NATS__MAX_MSGS_PER_SUBJECT", "0")],
            "backbone.nats.max_msgs_per_subject",
        );
        rejects(
            &[
                js,
                ("EDGEGATE_BACKBONE__NATS__DUPLICATE_WINDOW_MS", "700000"),
            ],
            "backbone.nats.duplicate_window_ms",
        );
        rejects(
            &[("EDGEGATE_BACKBONE__NATS__STORAGE", "tape")],
            "backbone.nats.storage",
        );
        rejects(
            &[("EDGEGATE_BACKBONE__NATS__HISTORY", "redis")],
            "backbone.nats.history",
        );
        let config = accepts(&[
            js,
            ("EDGEGATE_BACKBONE__NATS__STORAGE", "memory"),
            ("EDGEGATE_BACKBONE__NATS__REPLICAS", "3"),
        ]);
        assert_eq!(config.backbone.nats.storage, NatsStorage::Memory);
        assert_eq!(config.backbone.nats.replicas, 3);
    }

    #[test]
    fn node_id_fits_in_a_header() {
        rejects(
            &[("EDGEGATE_BACKBONE__NODE_ID", "edge 1")],
            "backbone.node_id",
        );
        rejects(
            &[("EDGEGATE_BACKBONE__NODE_ID", "edge\r\n1")],
            "backbone.node_id",
        );
        accepts(&[("EDGEGATE_BACKBONE__NODE_ID", "edge-fra-1")]);
    }

    #[test]
    fn drain_window_fits_in_timeout() {
        rejects(&[("EDGEGATE_DRAIN__WINDOW_MS", "10001")], "drain.window_ms");
        rejects(&[("EDGEGATE_DRAIN__TIMEOUT_MS", "0")], "drain.timeout_ms");
        rejects(
            &[("EDGEGATE_HISTORY__MAX_MESSAGES", "0")],
            "history.max_messages",
        );
        rejects(
            &[("EDGEGATE_HISTORY__SHARD_BYTES", "1000")],
            "history.shard_bytes",
        );
        rejects(
            &[("EDGEGATE_HISTORY__DEDUPE_WINDOW_MS", "0")],
            "history.dedupe_window_ms",
        );
        rejects(&[("EDGEGATE_HISTORY__ENABLED", "maybe")], "history.enabled");
        accepts(&[("EDGEGATE_DRAIN__WINDOW_MS", "10000")]);
    }

    #[test]
    fn presence_settings_are_checked() {
        rejects(
            &[("EDGEGATE_PRESENCE__FLUSH_MS", "50")],
            "presence.flush_ms",
        );
        rejects(
            &[("EDGEGATE_PRESENCE__FLUSH_MS", "60001")],
            "presence.flush_ms",
        );
        rejects(
            &[("EDGEGATE_PRESENCE__DIFF_LIMIT", "0")],
            "presence.diff_limit",
        );
        rejects(
            &[("EDGEGATE_PRESENCE__NODE_TTL_MS", "2999")],
            "presence.node_ttl_ms",
        );
        rejects(&[("EDGEGATE_PRESENCE__ENABLED", "yes")], "presence.enabled");
        rejects(
            &[("EDGEGATE_PRESENCE__DIFF_LIMIT", "-1")],
            "presence.diff_limit",
        );
        accepts(&[
            ("EDGEGATE_PRESENCE__FLUSH_MS", "100"),
            ("EDGEGATE_PRESENCE__NODE_TTL_MS", "3000"),
            ("EDGEGATE_PRESENCE__ENABLED", "false"),
        ]);
    }

    #[test]
    fn log_format_is_text_or_json() {
        rejects(&[("EDGEGATE_LOG__FORMAT", "yaml")], "log.format");
    }

    #[test]
    fn validation_errors_in_files_name_the_file() {
        let (err, path) = load_text(
            "[tcp]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"xml\"\n",
            &[],
        );
        let err = err.expect_err("bad format");
        assert_eq!(
            err.to_string(),
            format!(
                "config error in {}: key `log.format`: \"xml\" is neither \"text\" nor \"json\"",
                path.display()
            )
        );
    }

    #[test]
    fn validate_checks_configs_built_in_code() {
        let err = Config::default().validate().expect_err("no listener");
        assert_eq!(err.origin(), &Origin::Program);
        let mut config = Config::default();
        config.tcp.listen = Some(addr("127.0.0.1:0"));
        assert!(config.validate().is_ok());
    }
}
