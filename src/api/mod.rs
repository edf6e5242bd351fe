//! The core services' side of the node (docs/api.md): the server API,
//! HTTP services and hooks, and lifecycle events with webhooks, all on one
//! thread of its own running a tokio current-thread runtime (`services`),
//! beside the admin thread and never on a shard.
//!
//! * [`server`]: `POST /api/<method>` on `[api] listen`, on the HTTP/1.1
//!   server the admin endpoint uses too (`crate::http`: keep-alive,
//!   deadlines, a connection cap, a body limit).
//! * [`services`]: a client's `req` to an HTTP service and every hook's
//!   question, through a pooled HTTP/1.1 client, answered to the shard as
//!   a backbone event.
//! * `crate::events::webhooks`: the webhook sender; and on the embedded
//!   backbone the node's per-user connection counts, which make
//!   `user.online` / `user.offline` and the users of `info`.
//!
//! **Reaching the shards.** The API never touches a shard's state: it sends
//! each shard a [`Call`] through a bounded crossbeam queue and wakes the
//! shard's receiving task through an [`AtomicWaker`] — a glommio executor
//! wakes on a foreign-thread wake without polling, so a call is served at
//! once, not on the next tick. A full queue is a 429. The shard answers
//! through a oneshot. Service answers come back the same way, as backbone
//! [`Event`]s on an unbounded queue (at most one per call, and calls are
//! bounded).

pub mod server;
pub mod services;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use atomic_waker::AtomicWaker;
use edgegate_proto::Payload;
use tracing::warn;

use crate::backbone::nats::Cluster;
use crate::backbone::{Event, Kick, Refused, Stored};
use crate::config::Config;
use crate::events::{Bus, USER_OFFLINE, USER_ONLINE, UserCounts};
use crate::metrics::{ApiMethodStats, ServicesStats, ShardMetrics};

/// Calls waiting for one shard; more are answered 429.
pub const SHARD_CALLS: usize = 4096;
/// Service calls waiting for the services thread, and in flight there,
/// node-wide; more are answered `err rate_limited` at once.
pub const SERVICE_CALLS: usize = 16 * 1024;

/// A server API call one shard carries out.
#[derive(Debug)]
pub enum Call {
    /// Publish as a client's `pub` would be published.
    Publish {
        /// What to publish.
        msg: ApiPublish,
        /// Where the backbone's answer goes.
        reply: tokio::sync::oneshot::Sender<Result<Option<Stored>, Refused>>,
    },
    /// Close a user's connections on this shard.
    Kick(Kick),
    /// Who is present in a channel (§8.3's query).
    Presence {
        /// Channel (`room:` or `user:`), checked.
        ch: String,
        /// Users per page.
        limit: usize,
        /// After this id.
        after: Option<String>,
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<Result<crate::backbone::PresencePage, Refused>>,
    },
    /// A page of a channel's history (§8.4).
    History {
        /// Channel (`room:` or `user:`), checked.
        ch: String,
        /// Messages per page.
        limit: usize,
        /// Below this seq.
        before: Option<u64>,
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<Result<crate::backbone::Page, Refused>>,
    },
    /// The rooms with someone present.
    Channels {
        /// Names start with this.
        prefix: String,
        /// After this name.
        after: Option<String>,
        /// Rooms per page.
        limit: usize,
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<Result<crate::backbone::RoomsPage, Refused>>,
    },
}

/// A publish from the API.
#[derive(Debug)]
pub struct ApiPublish {
    /// Channel (`room:x`, `user:y`), checked.
    pub ch: String,
    /// The publisher (`svc` by default).
    pub from: String,
    /// The payload.
    pub payload: Payload,
    /// Deduplication key (`!api:<idempotency_key>`: no client's key looks
    /// like it).
    pub key: Option<String>,
    /// Delivered to the current subscribers, never stored (no `seq`).
    pub ephemeral: bool,
}

/// One shard's end of the services thread.
pub struct ShardLink {
    /// API calls for this shard.
    pub calls: crossbeam_channel::Receiver<Call>,
    /// Service answers for this shard's connections.
    pub events: crossbeam_channel::Receiver<Event>,
    /// Wakes the shard's receiving task.
    pub waker: Arc<AtomicWaker>,
    /// Where HTTP service calls go (`None`: no `[services]`).
    pub services: Option<services::Sender>,
}

/// The services thread's end of one shard.
#[derive(Clone)]
pub struct ShardTx {
    calls: crossbeam_channel::Sender<Call>,
    events: crossbeam_channel::Sender<Event>,
    waker: Arc<AtomicWaker>,
}

impl ShardTx {
    /// Queues a call; false when the shard's queue is full.
    pub fn call(&self, c: Call) -> bool {
        let ok = self.calls.try_send(c).is_ok();
        self.waker.wake();
        ok
    }

    /// An answer for one of the shard's connections.
    pub fn answer(&self, ev: Event) {
        if self.events.send(ev).is_ok() {
            self.waker.wake();
        }
    }
}

/// What starting the services thread needs that exists before it.
pub struct Prepared {
    /// Counters (the admin endpoint renders them).
    pub stats: Arc<ServicesStats>,
    /// Lifecycle events, to webhooks (the backbone's publisher is added by
    /// the caller with NATS).
    pub bus: Bus,
    webhooks: Option<tokio::sync::mpsc::Receiver<serde_json::Value>>,
}

/// True when the node needs the services thread at all.
pub fn wanted(cfg: &Config) -> bool {
    cfg.api.listen.is_some() || !cfg.services.is_empty() || cfg.webhooks.url.is_some()
}

/// Makes the counters and the webhook queue.
pub fn prepare(cfg: &Config) -> Prepared {
    let stats = Arc::new(ServicesStats {
        api: server::METHODS
            .iter()
            .map(|m| (*m, ApiMethodStats::default()))
            .collect(),
        ..ServicesStats::default()
    });
    let (tx, rx) = match cfg.webhooks.url {
        Some(_) => {
            let (tx, rx) = tokio::sync::mpsc::channel(cfg.webhooks.queue);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    Prepared {
        bus: Bus::new(tx, None, Some(stats.clone())),
        stats,
        webhooks: rx,
    }
}

/// The services thread's inputs from the node.
pub struct Start {
    /// The node's name.
    pub node: String,
    /// Every shard's counters.
    pub metrics: Vec<Arc<ShardMetrics>>,
    /// `[api] listen`, bound.
    pub listener: Option<std::net::TcpListener>,
    /// With NATS: the cluster-wide calls.
    pub cluster: Option<Cluster>,
    /// With the embedded backbone: connection changes per user (the node's
    /// `user.*` events and users).
    pub users: Option<tokio::sync::mpsc::UnboundedReceiver<(String, i32)>>,
}

/// Starts the services thread; returns each shard's link.
pub fn start(cfg: &Config, p: Prepared, s: Start) -> std::io::Result<Vec<ShardLink>> {
    let n = s.metrics.len();
    let (svc_tx, svc_rx) = if cfg.services.is_empty() {
        (None, None)
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel(SERVICE_CALLS);
        (Some(tx), Some(rx))
    };
    let names: Arc<BTreeMap<String, usize>> = Arc::new(
        cfg.services
            .keys()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect(),
    );
    let mut links = Vec::with_capacity(n);
    let mut txs = Vec::with_capacity(n);
    for _ in 0..n {
        let (ctx, crx) = crossbeam_channel::bounded(SHARD_CALLS);
        let (etx, erx) = crossbeam_channel::unbounded();
        let waker = Arc::new(AtomicWaker::new());
        txs.push(ShardTx {
            calls: ctx,
            events: etx,
            waker: waker.clone(),
        });
        links.push(ShardLink {
            calls: crx,
            events: erx,
            waker,
            services: svc_tx.clone().map(|tx| services::Sender {
                tx,
                names: names.clone(),
                stats: p.stats.clone(),
            }),
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("services".into())
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(cfg, p, s, txs, svc_rx));
        })?;
    Ok(links)
}

async fn run(
    cfg: Config,
    p: Prepared,
    s: Start,
    txs: Vec<ShardTx>,
    svc_rx: Option<tokio::sync::mpsc::Receiver<services::ServiceCall>>,
) {
    let shards = Rc::new(txs);
    if let Some(rx) = p.webhooks {
        tokio::task::spawn_local(crate::events::webhooks::run(
            cfg.webhooks.clone(),
            rx,
            p.stats.clone(),
        ));
    }
    let users: Rc<RefCell<UserCounts>> = Rc::default();
    if let Some(mut rx) = s.users {
        let (users, bus, node) = (users.clone(), p.bus.clone(), s.node.clone());
        tokio::task::spawn_local(async move {
            while let Some((user, delta)) = rx.recv().await {
                let change = users.borrow_mut().change(&user, delta);
                if let Some(online) = change {
                    let name = if online { USER_ONLINE } else { USER_OFFLINE };
                    bus.emit(crate::events::event(name, &node, &[("user", &user)]));
                }
            }
        });
    }
    if let Some(rx) = svc_rx {
        let pools = services::pools(&cfg, cfg.limits.max_frame_bytes);
        tokio::task::spawn_local(services::run(
            pools,
            rx,
            shards.clone(),
            p.stats.clone(),
            s.node.clone(),
        ));
    }
    if let Some(l) = s.listener {
        match crate::http::tokio_listener(l) {
            Ok(l) => {
                let srv = Rc::new(server::Server::new(
                    &cfg, shards, p.stats, s.cluster, users, s.metrics, s.node,
                ));
                server::serve(srv, l, &cfg).await;
            }
            Err(e) => warn!(error = %e, "api: cannot serve the listener"),
        }
    }
    // Keep serving the other tasks for the life of the process.
    std::future::pending::<()>().await;
}
