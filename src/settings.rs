//! The settings a shard needs, resolved once at start from the
//! [`Config`]: what the session, the transports and the listeners read on
//! their paths, in plain fields (no lookups, no `Option` chains per use).

use std::sync::Arc;

use crate::auth::Verifier;
use crate::config::{Config, RoomPolicy, TokenSource};
use crate::ratelimit::Rate;

/// The settings a shard needs, resolved once at start.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// This node's id (`welcome.meta.node`).
    pub node_id: String,
    /// Number of shards on the node.
    pub shards: usize,
    /// Heartbeat interval.
    pub hb_ms: u64,
    /// Idle timeout.
    pub idle_ms: u64,
    /// Hello timeout (also bounds the WebSocket handshake).
    pub hello_ms: u64,
    /// Largest envelope accepted.
    pub max_frame: usize,
    /// Outbound queue bound per connection.
    pub outbound_queue_bytes: usize,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    /// Live messages held per recovery in flight (`history.recovery_buffer`).
    pub recovery_buffer: usize,
    /// `welcome` waits until the user's own channel is live on the backbone
    /// (NATS: its subscription takes a round trip), so a direct message
    /// sent after the `welcome` reaches the connection.
    pub welcome_after_live: bool,
    /// A connection's publishes go to the backbone one at a time, each
    /// after the answer to the one before (`[backbone.nats] history =
    /// "jetstream"` with `ordered_publishes`): a publish lost with a NATS connection is then never
    /// overtaken by the next one, and when one is refused the ones behind
    /// it are refused too, so a client that sends them again keeps its
    /// order (docs/protocol.md §4).
    pub ordered_publishes: bool,
    /// Streams have positions (history kept: `[history] enabled` on the
    /// embedded backbone, JetStream on NATS): `welcome` waits for the
    /// position of the user's own stream, and history pages are read.
    pub positions: bool,
    /// `[presence] enabled`.
    pub presence: bool,
    /// `[presence]`, for the backbone's presence stores.
    pub presence_cfg: crate::config::Presence,
    /// `[history]`, for the owner shards' stores.
    pub history: crate::config::History,
    /// This process's random epoch prefix: every stream's epoch changes
    /// with a restart (history is in memory).
    pub epoch_prefix: String,
    /// Base of jittered `retry_ms`.
    pub retry_ms: u64,
    /// Room policy.
    pub room_policy: RoomPolicy,
    /// WebSocket path.
    pub ws_path: String,
    /// WebSocket echo path (conformance testing), if on.
    pub echo_path: Option<String>,
    /// SSE path (`ws.sse_path`), when `ws.sse` is on.
    pub sse_path: Option<String>,
    /// The key of SSE session tokens: drawn by the server at start (like
    /// `auth`); `None` serves no SSE.
    pub sse_key: Option<Arc<crate::sse::SessionKey>>,
    /// permessage-deflate is accepted (`ws.compression = "negotiate"`).
    pub ws_deflate: bool,
    /// `ws.compression_min_bytes`.
    pub ws_deflate_min: usize,
    /// `ws.compression_shared`.
    pub ws_deflate_shared: bool,
    /// Spread closes over this window on drain.
    pub drain_window_ms: u64,
    /// Hard bound for a drain.
    pub drain_timeout_ms: u64,
    /// Token verification (`auth.mode = "jwt"`); `None` in mode "none".
    /// Built by the server at start (it reads the key file), not here.
    pub auth: Option<Arc<Verifier>>,
    /// Accepted token carriers for WebSocket: hello, header, query.
    pub token_sources: [bool; 3],
    /// `ws.allowed_origins`; empty = any.
    pub allowed_origins: Vec<String>,
    /// Per-connection envelope rate.
    pub conn_msgs: Rate,
    /// Per-connection inbound byte rate.
    pub conn_bytes: Rate,
    /// Refusals in a row before 4004.
    pub rate_limited_close_after: u32,
    /// This shard's share of the node's accept budget.
    pub accept: Rate,
    /// This shard's share of the per-address connect rate.
    pub ip_connects: Rate,
    /// Addresses tracked per shard.
    pub ip_table_size: usize,
    /// TLS on the WebSocket listener (`ws.tls`); set by the server at start
    /// (it reads the certificate), `None` = plain.
    pub tls_ws: Option<crate::tls::TlsAcceptorHandle>,
    /// TLS on the raw TCP listener (`tcp.tls`), like `tls_ws`.
    pub tls_tcp: Option<crate::tls::TlsAcceptorHandle>,
    /// `[hooks]`: which are asked, and what a failure means.
    pub hooks: HookSettings,
}

/// `[hooks]` as the session and the shard read it.
#[derive(Debug, Clone, Default)]
pub struct HookSettings {
    /// The service each hook asks (connect, subscribe, publish), if any.
    pub services: [Option<Arc<str>>; 3],
    /// `on_error = "allow"`.
    pub allow_on_error: bool,
    /// `timeout_ms`.
    pub timeout_ms: u64,
    /// `subscribe_cache_ms`.
    pub cache_ms: u64,
}

impl HookSettings {
    /// From `[hooks]`.
    pub fn from_config(h: &crate::config::Hooks) -> Self {
        let name = |s: &Option<String>| s.as_deref().map(Arc::from);
        HookSettings {
            services: [name(&h.connect), name(&h.subscribe), name(&h.publish)],
            allow_on_error: h.on_error == crate::config::OnError::Allow,
            timeout_ms: h.timeout_ms,
            cache_ms: h.subscribe_cache_ms,
        }
    }
}

impl ShardConfig {
    /// Resolves the shard settings from the config.
    pub fn from_config(cfg: &Config, shards: usize, node_id: String) -> Self {
        ShardConfig {
            node_id,
            shards,
            hb_ms: cfg.heartbeat.interval_ms,
            idle_ms: cfg.idle_timeout_ms(),
            hello_ms: cfg.heartbeat.hello_timeout_ms,
            max_frame: cfg.limits.max_frame_bytes,
            outbound_queue_bytes: cfg.limits.outbound_queue_bytes,
            max_subscriptions: 1024,
            recovery_buffer: cfg.history.recovery_buffer,
            welcome_after_live: cfg.backbone.kind == crate::config::BackboneKind::Nats,
            ordered_publishes: cfg.backbone.kind == crate::config::BackboneKind::Nats
                && cfg.backbone.nats.history == crate::config::NatsHistory::Jetstream
                && cfg.backbone.nats.ordered_publishes,
            positions: match cfg.backbone.kind {
                crate::config::BackboneKind::Nats => {
                    cfg.backbone.nats.history == crate::config::NatsHistory::Jetstream
                }
                _ => cfg.history.enabled,
            },
            presence: cfg.presence.enabled,
            presence_cfg: cfg.presence.clone(),
            history: cfg.history.clone(),
            epoch_prefix: format!("{:016x}", fastrand::u64(..)),
            retry_ms: cfg.limits.retry_ms,
            room_policy: cfg.rooms.policy,
            ws_path: cfg.ws.path.clone(),
            echo_path: cfg.ws.echo_path.clone(),
            sse_path: cfg.ws.sse.then(|| cfg.ws.sse_path.clone()),
            sse_key: None,
            ws_deflate: cfg.ws.compression == crate::config::WsCompression::Negotiate,
            ws_deflate_min: cfg.ws.compression_min_bytes,
            ws_deflate_shared: cfg.ws.compression_shared,
            drain_window_ms: cfg.drain.window_ms,
            drain_timeout_ms: cfg.drain.timeout_ms,
            auth: None,
            token_sources: [TokenSource::Hello, TokenSource::Header, TokenSource::Query]
                .map(|t| cfg.auth.token_sources.contains(&t)),
            allowed_origins: cfg.ws.allowed_origins.clone(),
            conn_msgs: Rate::new(cfg.limits.conn_msgs_per_s, cfg.limits.conn_msgs_burst),
            conn_bytes: Rate::new(cfg.limits.conn_bytes_per_s, cfg.limits.conn_bytes_burst),
            rate_limited_close_after: cfg.limits.rate_limited_close_after,
            // Node-wide budgets split evenly: SO_REUSEPORT spreads new
            // connections evenly over the shards.
            accept: share(cfg.limits.accept_per_s, cfg.limits.accept_burst, shards),
            ip_connects: share(
                cfg.limits.ip_connects_per_s,
                cfg.limits.ip_connects_burst,
                shards,
            ),
            ip_table_size: cfg.limits.ip_table_size,
            tls_ws: None,
            tls_tcp: None,
            hooks: HookSettings::from_config(&cfg.hooks),
        }
    }

    /// True when WebSocket clients may carry their token in `source`.
    pub fn token_source(&self, source: TokenSource) -> bool {
        self.token_sources[source as usize]
    }

    /// A `retry_ms` jittered per connection in [base/2, 3·base/2), so a
    /// crowd told to come back does not come back at once.
    pub fn jittered_retry_ms(&self) -> u64 {
        let base = self.retry_ms.max(1);
        base / 2 + fastrand::u64(0..base)
    }
}

/// One shard's share of a node-wide rate (rounded up: never 0 when set).
fn share(per_s: u64, burst: u64, shards: usize) -> Rate {
    let n = shards.max(1) as u64;
    if per_s == 0 {
        return Rate::new(0, 0);
    }
    let burst = if burst == 0 { per_s } else { burst };
    Rate::new(per_s.div_ceil(n), burst.div_ceil(n))
}
