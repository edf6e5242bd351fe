//! Node-wide facts shared by every shard and the admin thread, and the
//! requests the admin thread sends the shards.
//!
//! Everything here is atomics or channels, touched per accept or per tick,
//! never per message: the shards share nothing on the message path.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use serde::Serialize;

use crate::metrics::{BackboneStats, CredentialStats, ServicesStats, ShardMetrics};

/// Facts shared by all shards of the node (atomics, touched per accept or
/// per tick only).
pub struct Node {
    /// Open client sockets on the node, against `max_connections`.
    pub open: AtomicUsize,
    /// The connection limit.
    pub max_connections: usize,
    /// Sockets being refused right now (each holds a file descriptor while
    /// it is told 4007); bounded so refusals cannot exhaust descriptors.
    pub refusing: AtomicUsize,
    /// Most sockets refused at once.
    pub max_refusing: usize,
    /// Set by the signal thread: stop accepting and drain.
    pub shutdown: AtomicBool,
    /// Shards whose listeners are bound.
    pub shards_ready: AtomicUsize,
    /// Shards that finished.
    pub shards_done: AtomicUsize,
    /// Shards that closed their listeners (draining).
    pub shards_stopped: AtomicUsize,
    /// Every shard's counters, index = shard id.
    pub metrics: Vec<Arc<ShardMetrics>>,
    /// `admin.token`: required by `/connz` and `/drain` when set.
    pub admin_token: Option<String>,
    /// The remote backbone's counters, when `backbone.kind = "nats"`.
    pub backbone: Option<Arc<BackboneStats>>,
    /// Facts about the certificate and keys in use (for `/metrics`).
    pub credentials: Arc<CredentialStats>,
    /// The server API's, HTTP services' and webhooks' counters, when the
    /// services thread runs.
    pub services: Option<Arc<ServicesStats>>,
    /// Requests from the admin thread, one queue per shard (index = shard
    /// id), polled on the shard's tick: the admin thread never touches
    /// shard-owned state.
    pub admin_queues: Vec<(
        crossbeam_channel::Sender<AdminReq>,
        crossbeam_channel::Receiver<AdminReq>,
    )>,
    /// `POST /sse` bodies for each shard's connections that another shard
    /// read (index = shard id), served at once by a task on the shard.
    pub posts: Vec<crate::sse::PostLane>,
}

impl Node {
    /// True when every shard listens, none has begun to drain, the
    /// backbone (NATS) is connected, and JWT keys from a JWKS have arrived
    /// (when `auth.jwks_url` is set).
    pub fn ready(&self) -> bool {
        self.shards_ready.load(Relaxed) == self.metrics.len()
            && self.shards_stopped.load(Relaxed) == 0
            && self.backbone_up()
            && self.credentials.jwks.ready()
    }

    /// The backbone is connected (the embedded one always is).
    pub fn backbone_up(&self) -> bool {
        self.backbone
            .as_ref()
            .is_none_or(|s| s.up.load(Relaxed) && s.stream_ok.load(Relaxed))
    }

    /// True once every shard has closed its listeners.
    pub fn draining(&self) -> bool {
        self.shards_stopped.load(Relaxed) == self.metrics.len()
    }
}

/// A request from the admin thread to one shard.
pub enum AdminReq {
    /// List the shard's connections in serial order: `take` after `skip`.
    Connz {
        /// Connections to skip.
        skip: usize,
        /// Connections to list.
        take: usize,
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<ConnzPage>,
    },
}

/// One shard's answer to [`AdminReq::Connz`].
pub struct ConnzPage {
    /// Connections on the shard.
    pub total: usize,
    /// The requested slice.
    pub conns: Vec<ConnInfo>,
}

/// One connection in `/connz`.
#[derive(Serialize)]
pub struct ConnInfo {
    /// `welcome.meta.conn`.
    pub conn: String,
    /// User id, once welcomed.
    pub user: Option<String>,
    /// `ws`, `tcp`, `quic` or `sse`.
    pub transport: &'static str,
    /// Owning shard.
    pub shard: usize,
    /// Peer address.
    pub peer: String,
    /// Milliseconds since accept.
    pub age_ms: u64,
    /// Outbound queue, bytes (estimated).
    pub queue_bytes: usize,
    /// Channels subscribed.
    pub subscriptions: usize,
}
