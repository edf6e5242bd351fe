//! Counters, one set per shard.
//!
//! Each shard writes only its own [`ShardMetrics`] (relaxed atomics on memory
//! no other shard writes, so the hot path takes no lock and shares no cache
//! line); the admin thread reads them all to render Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Transports, as labels.
pub const TRANSPORTS: [&str; 4] = ["ws", "tcp", "quic", "sse"];

/// Close codes counted (docs/protocol.md §5), in label order.
pub const CLOSE_CODES: [u16; 12] = [
    1000, 1001, 4000, 4001, 4002, 4003, 4004, 4005, 4006, 4007, 4008, 4009,
];

/// Recovery outcomes counted, in label order: recovered, then each
/// `recovered: false` reason.
pub const RECOVERY_OUTCOMES: [&str; 5] = [
    "recovered",
    "epoch_changed",
    "expired",
    "too_many",
    "unavailable",
];

/// Transport index into the per-transport arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket (also WSS).
    Ws = 0,
    /// Raw TCP (also TLS).
    Tcp = 1,
    /// QUIC.
    Quic = 2,
    /// SSE (an event stream and POSTs, on the WebSocket listener).
    Sse = 3,
}

impl Transport {
    /// The label value.
    pub fn name(self) -> &'static str {
        TRANSPORTS[self as usize]
    }
}

/// One shard's counters. Gauges are counters that also go down.
#[derive(Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// Open sockets per transport, from accept until released.
    pub connections: [AtomicU64; 4],
    /// Accepted sockets per transport.
    pub accepted: [AtomicU64; 4],
    /// Sockets refused because the node is at `limits.max_connections`.
    pub refused_max_conn: [AtomicU64; 4],
    /// Connections past `welcome`.
    pub sessions: AtomicU64,
    /// Envelopes received from clients.
    pub messages_in: AtomicU64,
    /// Envelopes sent to clients.
    pub messages_out: AtomicU64,
    /// Bytes received from clients (envelope bytes, after transport framing).
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// Batches of envelopes handed to client transports: `messages_out`
    /// over this is envelopes per write.
    pub writes_out: AtomicU64,
    /// WebSocket messages sent compressed (permessage-deflate): bytes before
    /// and after compression, `[uncompressed, compressed]`.
    pub deflate_out: [AtomicU64; 2],
    /// WebSocket messages received compressed: `[uncompressed, compressed]`.
    pub deflate_in: [AtomicU64; 2],
    /// Times the shard's compressor ran (a message fanned out to many
    /// subscribers of the shard counts once).
    pub deflate_runs: AtomicU64,
    /// `bye`/close codes sent, indexed like [`CLOSE_CODES`]; the last slot
    /// counts anything else.
    pub closes: [AtomicU64; CLOSE_CODES.len() + 1],
    /// Messages dropped because a connection's outbound queue was full.
    pub drops_slow_consumer: AtomicU64,
    /// Messages for other shards dropped because the shard mesh was full.
    pub drops_mesh_full: AtomicU64,
    /// WebSocket or TCP handshakes that failed or timed out.
    pub handshake_failures: AtomicU64,
    /// Sockets refused (4007) by the shard's accept budget.
    pub refused_accept_rate: AtomicU64,
    /// Sockets refused (4004) by the per-address connect rate.
    pub refused_ip_rate: AtomicU64,
    /// WebSocket upgrades refused for their `Origin` (HTTP 403).
    pub refused_origin: AtomicU64,
    /// Envelopes answered `err rate_limited` by the per-connection limits.
    pub rate_limited: AtomicU64,
    /// Tokens refused, by `auth::AuthError` (index = its order).
    pub auth_failures: [AtomicU64; crate::auth::AuthError::ALL.len()],
    /// Tokens accepted (at hello, upgrade or refresh).
    pub auth_ok: AtomicU64,
    /// Token refreshes accepted after welcome.
    pub auth_refreshes: AtomicU64,
    /// Bytes of history this shard holds (gauge).
    pub history_bytes: AtomicU64,
    /// Channel records in this shard's history (gauge).
    pub history_channels: AtomicU64,
    /// Messages this shard's history evicted for its byte budget
    /// (`history.shard_bytes`) before their count or age limit.
    pub history_evicted: AtomicU64,
    /// Publishes answered as duplicates (stored before, not delivered again).
    pub history_duplicates: AtomicU64,
    /// Recoveries (`sub`/`hello` with `since`) by outcome, indexed like
    /// [`RECOVERY_OUTCOMES`].
    pub recoveries: [AtomicU64; 5],
    /// Ephemeral messages dropped for subscribers that were behind.
    pub ephemeral_dropped: AtomicU64,
    /// `members` envelopes queued to connections.
    pub members_sent: AtomicU64,
    /// `members` envelopes dropped for connections that were behind.
    pub members_dropped: AtomicU64,
    /// `members` batches sent with only the count (more present users
    /// than `presence.diff_limit`).
    pub members_suppressed: AtomicU64,
    /// (room, user) pairs present in the rooms whose presence this shard
    /// keeps (gauge; with NATS, the node's own users, on shard 0).
    pub presence_entries: AtomicU64,
    /// Rooms whose presence this shard keeps (gauge).
    pub presence_rooms: AtomicU64,
    /// `presence` queries asked.
    pub presence_queries: AtomicU64,
    /// `history` pages asked.
    pub history_pages: AtomicU64,
    /// Hook questions by hook ([`HOOKS`]) and outcome ([`HOOK_OUTCOMES`]).
    pub hooks: [[AtomicU64; 6]; 3],
    /// `POST /sse` requests read on this shard, by answer ([`SSE_POSTS`]).
    pub sse_posts: [AtomicU64; 6],
    /// POSTs this shard sent on to their connection's owner: another
    /// shard, another node.
    pub sse_forwarded: [AtomicU64; 2],
}

/// `POST /sse` answers, in label order: taken (204), unknown session (404),
/// busy (429), owner unreachable (503), body too large (413), bad request (400).
pub const SSE_POSTS: [&str; 6] = [
    "taken",
    "unknown",
    "busy",
    "unavailable",
    "too_large",
    "bad_request",
];

/// Hooks, in label order (`[hooks]` keys).
pub const HOOKS: [&str; 3] = ["connect", "subscribe", "publish"];

/// Hook outcomes, in label order: asked (sent to the service), cached (a
/// subscribe allow remembered), then what the answer was.
pub const HOOK_OUTCOMES: [&str; 6] = [
    "asked",
    "cached",
    "allowed",
    "refused",
    "timed_out",
    "failed",
];

/// Latency buckets of the server API's histogram, in seconds.
pub const API_LATENCY_BUCKETS: [f64; 12] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// One server API method's counters.
#[derive(Default)]
pub struct ApiMethodStats {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Of those, answered with an error (4xx/5xx).
    pub errors: AtomicU64,
    /// Answers by latency: one count per bucket of [`API_LATENCY_BUCKETS`]
    /// (not cumulative), the last slot past them.
    pub latency: [AtomicU64; 13],
    /// Sum of latencies, microseconds.
    pub latency_us: AtomicU64,
}

impl ApiMethodStats {
    /// Counts one answer.
    pub fn record(&self, error: bool, took: std::time::Duration) {
        self.requests.fetch_add(1, Relaxed);
        if error {
            self.errors.fetch_add(1, Relaxed);
        }
        let s = took.as_secs_f64();
        let i = API_LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(API_LATENCY_BUCKETS.len());
        self.latency[i].fetch_add(1, Relaxed);
        self.latency_us
            .fetch_add(took.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }
}

/// Counters of the server API, HTTP services and webhooks, node-wide
/// (written by the API thread, read by the admin thread).
#[derive(Default)]
pub struct ServicesStats {
    /// Per API method, with its name (the API's method table).
    pub api: Vec<(&'static str, ApiMethodStats)>,
    /// Webhook events sent, retried, dropped (`events::webhooks::OUTCOMES`).
    pub webhook: [AtomicU64; 3],
    /// HTTP service calls by outcome ([`SERVICE_OUTCOMES`]).
    pub service_calls: [AtomicU64; 6],
}

/// Webhook event outcomes, in label order.
pub const WEBHOOK_OUTCOMES: [&str; 3] = ["sent", "retried", "dropped"];

/// HTTP service call outcomes, in label order.
pub const SERVICE_OUTCOMES: [&str; 6] = [
    "ok",
    "error",
    "timeout",
    "refused",
    "internal",
    "overloaded",
];

impl ShardMetrics {
    /// Counts one close with `code`.
    pub fn close(&self, code: edgegate_proto::CloseCode) {
        let i = CLOSE_CODES
            .iter()
            .position(|&c| c == code.get())
            .unwrap_or(CLOSE_CODES.len());
        self.closes[i].fetch_add(1, Relaxed);
    }

    /// Adds `n` to a counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Counters of a backbone that runs beside the shards (NATS), node-wide:
/// written by the backbone thread and the shards, read by the admin thread.
#[derive(Default)]
pub struct BackboneStats {
    /// Connected (a remote backbone; the embedded one has no such state).
    pub up: AtomicBool,
    /// Times the connection was lost.
    pub reconnects: AtomicU64,
    /// Subjects subscribed for local interest.
    pub subscriptions: AtomicU64,
    /// Client messages published.
    pub published: AtomicU64,
    /// Messages received for local subscribers.
    pub received: AtomicU64,
    /// Deliveries dropped because a shard was too far behind to take them.
    pub dropped: AtomicU64,
    /// Publishes and requests refused because the bridge to the backbone
    /// thread was full.
    pub bridge_full: AtomicU64,
    /// With JetStream history: false until the stream is created or
    /// checked (the node is not ready and refuses publishes meanwhile).
    /// Always true with history off.
    pub stream_ok: AtomicBool,
    /// Live gaps this node detected (a `Nats-Last-Sequence` it had not
    /// delivered) and filled from the stream before delivering.
    pub gaps_healed: AtomicU64,
    /// Messages fetched from the stream to fill gaps.
    pub healed_messages: AtomicU64,
    /// Gaps that could not be filled: the channel's local subscribers were
    /// closed with 4009.
    pub gaps_unhealed: AtomicU64,
    /// Replays read from the stream for `since` (each a recovery).
    pub replays: AtomicU64,
    /// JetStream publishes sent again (same `Nats-Msg-Id`) after a try
    /// that was not acknowledged.
    pub publish_retries: AtomicU64,
    /// Nodes alive as this node hears their presence heartbeats (itself
    /// included).
    pub presence_nodes: AtomicU64,
    /// This node's own present (room, user) pairs.
    pub presence_entries: AtomicU64,
    /// Rooms whose cluster-wide presence this node keeps a view of.
    pub presence_views: AtomicU64,
    /// Keys (rooms, and users online) whose lifecycle events this node
    /// keeps.
    pub presence_kept: AtomicU64,
    /// Presence syncs asked (views opened, gaps, reconnects).
    pub presence_syncs: AtomicU64,
    /// Presence deltas that skipped one (each followed by a sync).
    pub presence_gaps: AtomicU64,
    /// `members` batches with the count only (over `diff_limit`).
    pub members_suppressed: AtomicU64,
}

/// Node-wide facts about the keys and certificates the node uses, written
/// where they are loaded (start, SIGHUP, refreshes), read by the admin
/// thread.
#[derive(Default)]
pub struct CredentialStats {
    /// Unix time (seconds) at which the serving certificate (the leaf of
    /// `tls.cert_chain`) expires; 0 while no certificate is configured.
    pub tls_not_after: AtomicU64,
    /// The JWKS fetcher's counters (`auth.jwks_url`).
    pub jwks: std::sync::Arc<crate::jwks::JwksStats>,
}

/// Node-wide state the admin endpoint reports beside the shard counters.
pub struct NodeInfo<'a> {
    /// Shard counters, index = shard id.
    pub shards: &'a [std::sync::Arc<ShardMetrics>],
    /// The node's connection limit.
    pub max_connections: usize,
    /// True while draining.
    pub draining: bool,
    /// Backbone connected (always true for the embedded backbone).
    pub backbone_up: bool,
    /// Counters of a remote backbone (NATS), when that is the backbone.
    pub backbone: Option<&'a BackboneStats>,
    /// Certificates and keys.
    pub credentials: &'a CredentialStats,
    /// Counters of the server API, HTTP services and webhooks, when on.
    pub services: Option<&'a ServicesStats>,
}

/// Renders Prometheus text exposition format.
pub fn render(node: &NodeInfo<'_>) -> String {
    let mut s = String::with_capacity(4096);
    let get = |a: &AtomicU64| a.load(Relaxed);

    let mut family =
        |name: &str, kind: &str, help: &str, rows: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(s, "{name}{{{labels}}} {v}");
            }
        };
    let per_transport = |f: fn(&ShardMetrics) -> &[AtomicU64; 4]| {
        node.shards.iter().enumerate().flat_map(move |(i, m)| {
            TRANSPORTS.iter().enumerate().map(move |(t, name)| {
                (format!("shard=\"{i}\",transport=\"{name}\""), get(&f(m)[t]))
            })
        })
    };
    let per_shard = |f: fn(&ShardMetrics) -> &AtomicU64| {
        node.shards
            .iter()
            .enumerate()
            .map(move |(i, m)| (format!("shard=\"{i}\""), get(f(m))))
    };

    family(
        "edgegate_connections",
        "gauge",
        "Open client sockets.",
        &mut per_transport(|m| &m.connections),
    );
    family(
        "edgegate_connections_accepted_total",
        "counter",
        "Accepted client sockets.",
        &mut per_transport(|m| &m.accepted),
    );
    family(
        "edgegate_connections_refused_total",
        "counter",
        "Sockets refused with 4007 at the connection limit.",
        &mut node.shards.iter().enumerate().flat_map(|(i, m)| {
            TRANSPORTS.iter().enumerate().map(move |(t, name)| {
                (
                    format!("shard=\"{i}\",transport=\"{name}\",reason=\"max_connections\""),
                    get(&m.refused_max_conn[t]),
                )
            })
        }),
    );
    family(
        "edgegate_sessions",
        "gauge",
        "Connections past welcome.",
        &mut per_shard(|m| &m.sessions),
    );
    family(
        "edgegate_messages_in_total",
        "counter",
        "Envelopes received from clients.",
        &mut per_shard(|m| &m.messages_in),
    );
    family(
        "edgegate_messages_out_total",
        "counter",
        "Envelopes sent to clients.",
        &mut per_shard(|m| &m.messages_out),
    );
    family(
        "edgegate_bytes_in_total",
        "counter",
        "Envelope bytes received.",
        &mut per_shard(|m| &m.bytes_in),
    );
    family(
        "edgegate_bytes_out_total",
        "counter",
        "Envelope bytes sent.",
        &mut per_shard(|m| &m.bytes_out),
    );
    family(
        "edgegate_writes_out_total",
        "counter",
        "Batches of envelopes handed to client transports, one per connection per write turn (a WebSocket message, or several with permessage-deflate; an SSE event; a TCP or QUIC write): edgegate_messages_out_total over this is envelopes per write.",
        &mut per_shard(|m| &m.writes_out),
    );
    family(
        "edgegate_ws_deflate_bytes_total",
        "counter",
        "WebSocket messages sent (dir=out) or received (dir=in) compressed with permessage-deflate: their bytes uncompressed and compressed.",
        &mut node.shards.iter().enumerate().flat_map(|(i, m)| {
            [("out", &m.deflate_out), ("in", &m.deflate_in)]
                .into_iter()
                .flat_map(move |(dir, c)| {
                    [("uncompressed", get(&c[0])), ("compressed", get(&c[1]))]
                        .into_iter()
                        .map(move |(form, v)| {
                            (format!("shard=\"{i}\",dir=\"{dir}\",form=\"{form}\""), v)
                        })
                })
        }),
    );
    family(
        "edgegate_ws_deflate_compressions_total",
        "counter",
        "Times a shard's compressor ran (once per message per shard when shared, however many subscribers).",
        &mut per_shard(|m| &m.deflate_runs),
    );
    family(
        "edgegate_closes_total",
        "counter",
        "Connections closed by the server, by close code.",
        &mut node.shards.iter().enumerate().flat_map(|(i, m)| {
            CLOSE_CODES
                .iter()
                .map(|c| c.to_string())
                .chain(std::iter::once("other".to_string()))
                .enumerate()
                .map(move |(k, code)| (format!("shard=\"{i}\",code=\"{code}\""), get(&m.closes[k])))
        }),
    );
    family(
        "edgegate_drops_total",
        "counter",
        "Messages dropped, by reason.",
        &mut node.shards.iter().enumerate().flat_map(|(i, m)| {
            [
                ("slow_consumer", get(&m.drops_slow_consumer)),
                ("mesh_full", get(&m.drops_mesh_full)),
            ]
            .into_iter()
            .map(move |(r, v)| (format!("shard=\"{i}\",reason=\"{r}\""), v))
        }),
    );
    family(
        "edgegate_handshake_failures_total",
        "counter",
        "Failed or timed-out handshakes.",
        &mut per_shard(|m| &m.handshake_failures),
    );
    family(
        "edgegate_limit_hits_total",
        "counter",
        "Connections or envelopes refused by a limit, by limit.",
        &mut node.shards.iter().enumerate().flat_map(|(i, m)| {
            [
                ("max_connections", m.refused_max_conn.iter().map(get).sum()),
                ("accept_rate", get(&m.refused_accept_rate)),
                ("ip_connect_rate", get(&m.refused_ip_rate)),
                ("origin", get(&m.refused_origin)),
                ("conn_rate", get(&m.rate_limited)),
            ]
            .into_iter()
            .map(move |(r, v): (&str, u64)| (format!("shard=\"{i}\",limit=\"{r}\""), v))
        }),
    );
    family(
        "edgegate_auth_failures_total",
        "counter",
        "Tokens refused, by reason.",
        &mut node.shards.iter().enumerate().flat_map(|(i, m)| {
            crate::auth::AuthError::ALL.iter().map(move |e| {
                (
                    format!("shard=\"{i}\",reason=\"{}\"", e.label()),
                    get(&m.auth_failures[e.index()]),
                )
            })
        }),
    );
    family(
        "edgegate_auth_ok_total",
        "counter",
        "Tokens accepted (hello, upgrade or refresh).",
        &mut per_shard(|m| &m.auth_ok),
    );
    family(
        "edgegate_auth_refreshes_total",
        "counter",
        "Token refreshes accepted after welcome.",
        &mut per_shard(|m| &m.auth_refreshes),
    );
    family(
        "edgegate_history_bytes",
        "gauge",
        "Bytes of channel history held, per owner shard.",
        &mut per_shard(|m| &m.history_bytes),
    );
    family(
        "edgegate_history_channels",
        "gauge",
        "Channel records in history, per owner shard.",
        &mut per_shard(|m| &m.history_channels),
    );
    family(
        "edgegate_history_evicted_total",
        "counter",
        "Messages evicted from history by the shard's byte budget (history.shard_bytes) before their count or age limit: history covers less than configured.",
        &mut per_shard(|m| &m.history_evicted),
    );
    family(
        "edgegate_history_duplicates_total",
        "counter",
        "Publishes stored before (same user, instance and id): answered with the original seq, not delivered again.",
        &mut per_shard(|m| &m.history_duplicates),
    );
    family(
        "edgegate_recoveries_total",
        "counter",
        "Recoveries asked with since, by outcome (recovered, or the reason of recovered: false).",
        &mut node.shards.iter().enumerate().flat_map(|(i, m)| {
            RECOVERY_OUTCOMES.iter().enumerate().map(move |(k, o)| {
                (
                    format!("shard=\"{i}\",outcome=\"{o}\""),
                    get(&m.recoveries[k]),
                )
            })
        }),
    );
    family(
        "edgegate_ephemeral_dropped_total",
        "counter",
        "Ephemeral messages dropped for subscribers that were behind (their queue over half its bound).",
        &mut per_shard(|m| &m.ephemeral_dropped),
    );
    family(
        "edgegate_members_sent_total",
        "counter",
        "Presence members envelopes queued to connections.",
        &mut per_shard(|m| &m.members_sent),
    );
    family(
        "edgegate_members_dropped_total",
        "counter",
        "Presence members envelopes dropped for connections that were behind.",
        &mut per_shard(|m| &m.members_dropped),
    );
    family(
        "edgegate_members_suppressed_total",
        "counter",
        "Presence batches sent with the count only (more present users than presence.diff_limit).",
        &mut per_shard(|m| &m.members_suppressed),
    );
    family(
        "edgegate_presence_entries",
        "gauge",
        "Present (room, user) pairs whose presence this shard keeps.",
        &mut per_shard(|m| &m.presence_entries),
    );
    family(
        "edgegate_presence_rooms",
        "gauge",
        "Rooms whose presence this shard keeps.",
        &mut per_shard(|m| &m.presence_rooms),
    );
    family(
        "edgegate_presence_queries_total",
        "counter",
        "Presence queries asked by clients.",
        &mut per_shard(|m| &m.presence_queries),
    );
    family(
        "edgegate_history_pages_total",
        "counter",
        "History pages asked by clients.",
        &mut per_shard(|m| &m.history_pages),
    );
    family(
        "edgegate_hook_calls_total",
        "counter",
        "Hook questions by hook and outcome (asked: sent to the service; cached: a subscribe allow remembered; then allowed, refused, timed_out, failed).",
        &mut node.shards.iter().enumerate().flat_map(|(i, m)| {
            HOOKS.iter().enumerate().flat_map(move |(h, hook)| {
                HOOK_OUTCOMES.iter().enumerate().map(move |(k, o)| {
                    (
                        format!("shard=\"{i}\",hook=\"{hook}\",outcome=\"{o}\""),
                        get(&m.hooks[h][k]),
                    )
                })
            })
        }),
    );
    family(
        "edgegate_sse_posts_total",
        "counter",
        "POST /sse requests by answer (taken: 204; unknown: 404; busy: 429; unavailable: 503; too_large: 413; bad_request: 400), counted where read.",
        &mut node.shards.iter().enumerate().flat_map(|(i, m)| {
            SSE_POSTS.iter().enumerate().map(move |(k, o)| {
                (
                    format!("shard=\"{i}\",outcome=\"{o}\""),
                    get(&m.sse_posts[k]),
                )
            })
        }),
    );
    family(
        "edgegate_sse_posts_forwarded_total",
        "counter",
        "POST /sse bodies sent on to the shard or node that owns the session.",
        &mut node.shards.iter().enumerate().flat_map(|(i, m)| {
            ["shard", "node"].iter().enumerate().map(move |(k, to)| {
                (
                    format!("shard=\"{i}\",to=\"{to}\""),
                    get(&m.sse_forwarded[k]),
                )
            })
        }),
    );
    if let Some(sv) = node.services {
        render_services(&mut s, sv);
    }
    let _ = writeln!(
        s,
        "# HELP edgegate_max_connections Node connection limit.\n# TYPE edgegate_max_connections gauge\nedgegate_max_connections {}",
        node.max_connections
    );
    let _ = writeln!(
        s,
        "# HELP edgegate_draining 1 while draining.\n# TYPE edgegate_draining gauge\nedgegate_draining {}",
        u8::from(node.draining)
    );
    let _ = writeln!(
        s,
        "# HELP edgegate_backbone_up 1 while the backbone is connected.\n# TYPE edgegate_backbone_up gauge\nedgegate_backbone_up {}",
        u8::from(node.backbone_up)
    );
    let not_after = node.credentials.tls_not_after.load(Relaxed);
    if not_after > 0 {
        let _ = writeln!(
            s,
            "# HELP edgegate_tls_cert_expiry_timestamp_seconds Unix time at which the serving certificate (the leaf of tls.cert_chain) expires; follows SIGHUP reloads.\n# TYPE edgegate_tls_cert_expiry_timestamp_seconds gauge\nedgegate_tls_cert_expiry_timestamp_seconds {not_after}"
        );
    }
    let jwks = &node.credentials.jwks;
    if jwks.enabled.load(Relaxed) {
        let _ = writeln!(
            s,
            "# HELP edgegate_jwks_refreshes_total JWKS fetches (auth.jwks_url), by result: ok replaced the key set, failed kept the last good one.\n# TYPE edgegate_jwks_refreshes_total counter\nedgegate_jwks_refreshes_total{{result=\"ok\"}} {}\nedgegate_jwks_refreshes_total{{result=\"failed\"}} {}",
            jwks.refresh_ok.load(Relaxed),
            jwks.refresh_failed.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP edgegate_jwks_keys Keys in the current JWKS key set (usable with auth.algorithm).\n# TYPE edgegate_jwks_keys gauge\nedgegate_jwks_keys {}",
            jwks.keys.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP edgegate_jwks_last_success_timestamp_seconds Unix time of the last JWKS fetch that replaced the key set (0: none yet).\n# TYPE edgegate_jwks_last_success_timestamp_seconds gauge\nedgegate_jwks_last_success_timestamp_seconds {}",
            jwks.last_ok_unix.load(Relaxed)
        );
    }
    if let Some(n) = node.backbone {
        for (name, kind, help, v) in [
            (
                "edgegate_backbone_reconnects_total",
                "counter",
                "Times the NATS connection was lost (each followed by reconnect attempts with backoff).",
                &n.reconnects,
            ),
            (
                "edgegate_backbone_subscriptions",
                "gauge",
                "NATS subjects subscribed for local interest.",
                &n.subscriptions,
            ),
            (
                "edgegate_backbone_published_total",
                "counter",
                "Client messages published to NATS.",
                &n.published,
            ),
            (
                "edgegate_backbone_received_total",
                "counter",
                "Messages received from NATS for local subscribers.",
                &n.received,
            ),
            (
                "edgegate_backbone_dropped_total",
                "counter",
                "Deliveries from NATS dropped because a shard was too far behind.",
                &n.dropped,
            ),
            (
                "edgegate_backbone_bridge_full_total",
                "counter",
                "Publishes and requests refused (backbone_unavailable) because the bridge to the backbone thread was full.",
                &n.bridge_full,
            ),
            (
                "edgegate_backbone_gaps_healed_total",
                "counter",
                "Live gaps (a message this node missed) filled from the JetStream stream before delivery.",
                &n.gaps_healed,
            ),
            (
                "edgegate_backbone_healed_messages_total",
                "counter",
                "Messages fetched from the JetStream stream to fill live gaps.",
                &n.healed_messages,
            ),
            (
                "edgegate_backbone_gaps_unhealed_total",
                "counter",
                "Live gaps that could not be filled: the channel's subscribers on this node were closed with 4009.",
                &n.gaps_unhealed,
            ),
            (
                "edgegate_backbone_publish_retries_total",
                "counter",
                "JetStream publishes sent again with the same Nats-Msg-Id after a try the stream did not acknowledge (a NATS failover).",
                &n.publish_retries,
            ),
            (
                "edgegate_backbone_replays_total",
                "counter",
                "Replays for a client's since read from the JetStream stream.",
                &n.replays,
            ),
            (
                "edgegate_presence_nodes",
                "gauge",
                "Nodes alive as this node hears their presence heartbeats, itself included.",
                &n.presence_nodes,
            ),
            (
                "edgegate_presence_node_entries",
                "gauge",
                "This node's own present (room, user) pairs.",
                &n.presence_entries,
            ),
            (
                "edgegate_presence_views",
                "gauge",
                "Rooms whose cluster-wide presence this node keeps a view of (it has watchers there).",
                &n.presence_views,
            ),
            (
                "edgegate_presence_kept_keys",
                "gauge",
                "Rooms and users whose cluster-wide lifecycle events this node keeps (emits).",
                &n.presence_kept,
            ),
            (
                "edgegate_presence_syncs_total",
                "counter",
                "Presence syncs asked of the cluster (views opened, gaps found, reconnects).",
                &n.presence_syncs,
            ),
            (
                "edgegate_presence_gaps_total",
                "counter",
                "Presence deltas of another node that skipped one (each followed by a sync).",
                &n.presence_gaps,
            ),
            (
                "edgegate_presence_members_suppressed_total",
                "counter",
                "Cluster presence batches sent with the count only (more present than presence.diff_limit).",
                &n.members_suppressed,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        }
    }
    s
}

/// The server API's, HTTP services' and webhooks' families.
fn render_services(s: &mut String, sv: &ServicesStats) {
    let get = |a: &AtomicU64| a.load(Relaxed);
    let _ = writeln!(
        s,
        "# HELP edgegate_api_requests_total Server API requests answered, by method.\n# TYPE edgegate_api_requests_total counter"
    );
    for (m, st) in &sv.api {
        let _ = writeln!(
            s,
            "edgegate_api_requests_total{{method=\"{m}\"}} {}",
            get(&st.requests)
        );
    }
    let _ = writeln!(
        s,
        "# HELP edgegate_api_errors_total Server API requests answered with an error (4xx, 5xx), by method.\n# TYPE edgegate_api_errors_total counter"
    );
    for (m, st) in &sv.api {
        let _ = writeln!(
            s,
            "edgegate_api_errors_total{{method=\"{m}\"}} {}",
            get(&st.errors)
        );
    }
    let _ = writeln!(
        s,
        "# HELP edgegate_api_latency_seconds Server API answer latency, by method.\n# TYPE edgegate_api_latency_seconds histogram"
    );
    for (m, st) in &sv.api {
        let mut cum = 0;
        for (i, b) in API_LATENCY_BUCKETS.iter().enumerate() {
            cum += get(&st.latency[i]);
            let _ = writeln!(
                s,
                "edgegate_api_latency_seconds_bucket{{method=\"{m}\",le=\"{b}\"}} {cum}"
            );
        }
        cum += get(&st.latency[API_LATENCY_BUCKETS.len()]);
        let _ = writeln!(
            s,
            "edgegate_api_latency_seconds_bucket{{method=\"{m}\",le=\"+Inf\"}} {cum}"
        );
        let _ = writeln!(
            s,
            "edgegate_api_latency_seconds_sum{{method=\"{m}\"}} {}",
            get(&st.latency_us) as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "edgegate_api_latency_seconds_count{{method=\"{m}\"}} {cum}"
        );
    }
    let _ = writeln!(
        s,
        "# HELP edgegate_webhook_events_total Webhook events sent, sent again after a failed try, and dropped (queue full, or retried past webhooks.retry_for_ms).\n# TYPE edgegate_webhook_events_total counter"
    );
    for (i, o) in WEBHOOK_OUTCOMES.iter().enumerate() {
        let _ = writeln!(
            s,
            "edgegate_webhook_events_total{{outcome=\"{o}\"}} {}",
            get(&sv.webhook[i])
        );
    }
    let _ = writeln!(
        s,
        "# HELP edgegate_service_calls_total HTTP service calls (req and hooks), by outcome.\n# TYPE edgegate_service_calls_total counter"
    );
    for (i, o) in SERVICE_OUTCOMES.iter().enumerate() {
        let _ = writeln!(
            s,
            "edgegate_service_calls_total{{outcome=\"{o}\"}} {}",
            get(&sv.service_calls[i])
        );
    }
}
