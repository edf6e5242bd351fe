//! A shard: one glommio executor pinned to one CPU, owning the connections
//! it accepted, their subscriptions and their timers.
//!
//! Nothing in a [`Shard`] is touched by another thread. Shards talk to each
//! other only through the backbone's mesh; node-wide facts (the connection
//! count against the limit, shutdown) live in [`Node`] as atomics read once
//! per accept or per tick, never per message.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};

use slab::Slab;
use tracing::{debug, info, warn};

use crate::admin::AdminReq;
use crate::auth::Verifier;
use crate::backbone::{Backbone, MeshMsg};
use crate::config::{Config, RoomPolicy, TokenSource};
use crate::conn::{CloseReq, Conn, Delivery, Phase};
use crate::metrics::{ShardMetrics, Transport};
use crate::nats::{Ack, FromNats, ToNats};
use crate::ratelimit::{Bucket, IpTable, Rate};
use crate::router::Router;
use crate::timer::{Check, Entry, Wheel};
use edgegate_proto::Envelope;
use edgegate_proto::ErrCode;

/// Wheel resolution: timeouts fire at most this late.
pub const TICK_MS: u64 = 50;
/// WebSocket upgrades in flight per shard.
pub const MAX_HANDSHAKES: u64 = 128;
/// Per-shard read scratch: one socket read at most this large.
pub const SCRATCH_BYTES: usize = 64 * 1024;

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
    /// Base of jittered `retry_ms`.
    pub retry_ms: u64,
    /// Room policy.
    pub room_policy: RoomPolicy,
    /// WebSocket path.
    pub ws_path: String,
    /// WebSocket echo path (conformance testing), if on.
    pub echo_path: Option<String>,
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
            retry_ms: cfg.limits.retry_ms,
            room_policy: cfg.rooms.policy,
            ws_path: cfg.ws.path.clone(),
            echo_path: cfg.ws.echo_path.clone(),
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
    /// Requests from the admin thread, one queue per shard (index = shard
    /// id), polled on the shard's tick: the admin thread never touches
    /// shard-owned state.
    /// NATS backbone state, when `backbone.kind = "nats"`.
    pub nats: Option<Arc<crate::nats::NatsState>>,
    pub admin_queues: Vec<(
        crossbeam_channel::Sender<AdminReq>,
        crossbeam_channel::Receiver<AdminReq>,
    )>,
}

impl Node {
    /// True when every shard listens, none has begun to drain, and the
    /// backbone (NATS) is connected.
    pub fn ready(&self) -> bool {
        self.shards_ready.load(Relaxed) == self.metrics.len()
            && self.shards_stopped.load(Relaxed) == 0
            && self.backbone_up()
    }

    /// The backbone is connected (the embedded one always is).
    pub fn backbone_up(&self) -> bool {
        self.nats.as_ref().is_none_or(|s| s.up.load(Relaxed))
    }

    /// True once every shard has closed its listeners.
    pub fn draining(&self) -> bool {
        self.shards_stopped.load(Relaxed) == self.metrics.len()
    }
}

/// One shard's state. Lives in an `Rc` on its executor.
pub struct Shard {
    /// Shard index.
    pub id: usize,
    /// Settings.
    pub cfg: ShardConfig,
    /// Node-wide facts.
    pub node: Arc<Node>,
    /// This shard's counters.
    pub metrics: Arc<ShardMetrics>,
    /// Connections owned by this shard.
    pub conns: RefCell<Slab<Rc<Conn>>>,
    /// Heartbeat, idle and hello checks.
    pub wheel: RefCell<Wheel>,
    /// Local subscriptions.
    pub router: RefCell<Router>,
    /// Where messages go beyond this shard.
    pub backbone: Backbone,
    /// Read scratch shared by every connection: idle connections hold no
    /// read buffer (glommio reads readiness-first, so the buffer is only
    /// borrowed during a poll).
    pub scratch: RefCell<Box<[u8]>>,
    /// Upgrades (WebSocket handshakes) in progress at once: a connect storm
    /// waits in the kernel's accept queue instead of piling up handshake
    /// buffers here.
    pub handshakes: Rc<glommio::sync::Semaphore>,
    /// Closed when the drain begins: accept loops wait on it beside accept,
    /// so listeners close at once.
    pub stop: Rc<glommio::sync::Semaphore>,
    /// This shard's accept budget (`limits.accept_per_s`).
    accept_bucket: RefCell<Bucket>,
    /// Per source address connect buckets (`limits.ip_connects_per_s`).
    ip_table: RefCell<IpTable>,
    /// Accept-budget refusals: (start of the current 1 s window, refusals
    /// in it, refusals in the previous one); sizes the retry spread.
    herd: Cell<(u64, u64, u64)>,
    start: Instant,
    clock: Cell<u64>,
    serial: Cell<u64>,
    draining: Cell<bool>,
}

impl Shard {
    /// A shard with no connections.
    pub fn new(id: usize, cfg: ShardConfig, node: Arc<Node>, backbone: Backbone) -> Self {
        let metrics = node.metrics[id].clone();
        let accept_bucket = Bucket::full(&cfg.accept, 0);
        let ip_table = IpTable::new(cfg.ip_connects, cfg.ip_table_size);
        Shard {
            id,
            cfg,
            node,
            metrics,
            conns: RefCell::new(Slab::new()),
            wheel: RefCell::new(Wheel::new(4096, TICK_MS)),
            router: RefCell::new(Router::default()),
            backbone,
            scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
            handshakes: Rc::new(glommio::sync::Semaphore::new(MAX_HANDSHAKES)),
            stop: Rc::new(glommio::sync::Semaphore::new(0)),
            accept_bucket: RefCell::new(accept_bucket),
            ip_table: RefCell::new(ip_table),
            herd: Cell::new((0, 0, 0)),
            start: Instant::now(),
            clock: Cell::new(0),
            serial: Cell::new(0),
            draining: Cell::new(false),
        }
    }

    /// Milliseconds since the shard started (coarse: refreshed per tick and
    /// per read).
    pub fn now_ms(&self) -> u64 {
        self.clock.get()
    }

    fn refresh_clock(&self) -> u64 {
        let now = self.start.elapsed().as_millis() as u64;
        self.clock.set(now);
        now
    }

    /// True once draining began.
    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// `welcome.meta.conn`: node, shard and serial.
    pub fn conn_name(&self, conn: &Conn) -> String {
        format!("{}-{}-{}", self.cfg.node_id, self.id, conn.serial)
    }

    /// Admission of a new socket from `ip` (per-address rate first, then
    /// the shard's accept budget): `Err` holds the close code and reason
    /// it must be refused with.
    pub fn admit(&self, ip: std::net::IpAddr) -> Result<(), (u16, &'static str)> {
        let now = self.refresh_clock();
        if !self.ip_table.borrow_mut().admit(ip, now) {
            ShardMetrics::add(&self.metrics.refused_ip_rate, 1);
            return Err((
                4004,
                "rate limited: too many new connections from this address",
            ));
        }
        if !self
            .accept_bucket
            .borrow_mut()
            .try_take(&self.cfg.accept, 1, now)
        {
            let (start, cur, prev) = self.herd.get();
            self.herd.set(if now.saturating_sub(start) >= 1000 {
                // A window with no refusals in between resets the estimate.
                let prev = if now - start >= 2000 { 0 } else { cur };
                (now, 1, prev)
            } else {
                (start, cur + 1, prev)
            });
            ShardMetrics::add(&self.metrics.refused_accept_rate, 1);
            return Err((4007, "overloaded: accept rate"));
        }
        Ok(())
    }

    /// `retry_ms` for a socket refused by the accept budget: jittered over
    /// the time this shard needs to admit the crowd it is refusing (at
    /// least `limits.retry_ms`), so a herd comes back about as fast as it
    /// can be let in, not all at once.
    pub fn herd_retry_ms(&self) -> u64 {
        let (_, cur, prev) = self.herd.get();
        let crowd = cur.max(prev);
        let per_s = self.cfg.accept.per_s.max(1);
        let spread = self.cfg.retry_ms.max(crowd.saturating_mul(1000) / per_s);
        self.cfg.retry_ms / 2 + fastrand::u64(0..spread.max(1))
    }

    /// Registers a new connection and arms its hello timeout.
    pub fn register(&self, transport: Transport, peer: std::net::SocketAddr) -> Rc<Conn> {
        let now = self.refresh_clock();
        let serial = self.serial.get() + 1;
        self.serial.set(serial);
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let key = entry.key() as u32;
        let conn = Rc::new(Conn::new(serial, key, transport, peer, now));
        entry.insert(conn.clone());
        drop(conns);
        self.wheel
            .borrow_mut()
            .schedule(key, serial as u32, Check::Hello, now + self.cfg.hello_ms);
        if self.draining.get() {
            conn.request_close(CloseReq::new(1001, "draining"));
        }
        conn
    }

    /// Forgets a connection: its subscriptions, its slot, its session count.
    pub fn release(&self, conn: &Conn) {
        let subs = std::mem::take(&mut *conn.subs.borrow_mut());
        for ch in &subs {
            let last = self.router.borrow_mut().unsubscribe(ch, conn.key);
            if last {
                self.interest(ch, false, None);
            }
        }
        if let Some(user) = conn.user() {
            self.metrics.sessions.fetch_sub(1, Relaxed);
            self.presence(&user, -1);
        }
        conn.phase.set(Phase::Closing);
        let mut conns = self.conns.borrow_mut();
        if conns
            .get(conn.key as usize)
            .is_some_and(|c| c.serial == conn.serial)
        {
            conns.remove(conn.key as usize);
        }
    }

    /// Subscribes `conn` to `ch` (idempotent). With `ok_for = Some(id)`,
    /// returns true when `ok` may be sent now; false when the subscription
    /// only becomes live once the backbone has subscribed, which then
    /// answers the `ok` itself ([`FromNats::SubAck`]).
    pub fn subscribe(&self, conn: &Conn, ch: Rc<str>, ok_for: Option<Option<u64>>) -> bool {
        let mut subs = conn.subs.borrow_mut();
        if subs.contains(&ch) {
            return true;
        }
        let first = self.router.borrow_mut().subscribe(&ch, conn.key);
        // Most connections hold one or two channels: grow one at a time.
        subs.reserve_exact(1);
        subs.push(ch.clone());
        drop(subs);
        if first {
            let ack = ok_for.map(|id| self.ack(conn, id));
            if self.interest(&ch, true, ack) {
                return ack.is_none();
            }
        }
        true
    }

    /// Unsubscribes `conn` from `ch`; false if it was not subscribed.
    pub fn unsubscribe(&self, conn: &Conn, ch: &str) -> bool {
        let mut subs = conn.subs.borrow_mut();
        let Some(i) = subs.iter().position(|c| &**c == ch) else {
            return false;
        };
        subs.swap_remove(i);
        drop(subs);
        if self.router.borrow_mut().unsubscribe(ch, conn.key) {
            self.interest(ch, false, None);
        }
        true
    }

    /// The answer address of a backbone command for `conn`.
    pub fn ack(&self, conn: &Conn, id: Option<u64>) -> Ack {
        Ack {
            shard: self.id,
            key: conn.key,
            serial: conn.serial,
            id,
        }
    }

    /// Tells the backbone about this shard's first or last interest in a
    /// channel. True when the backbone tracks interest (NATS).
    fn interest(&self, ch: &str, on: bool, ack: Option<Ack>) -> bool {
        match &self.backbone {
            Backbone::Embedded(_) => false,
            Backbone::Nats(link) => {
                link.send(ToNats::Interest {
                    channel: ch.to_owned(),
                    shard: self.id,
                    on,
                    ack,
                });
                true
            }
        }
    }

    /// A user's connection count on this node changed (presence events).
    pub fn presence(&self, user: &str, delta: i32) {
        if let Backbone::Nats(link) = &self.backbone {
            link.send(ToNats::Presence {
                user: user.to_owned(),
                delta,
            });
        }
    }

    /// The connection an [`Ack`] names, if it is still there.
    fn conn_for(&self, ack: &Ack) -> Option<Rc<Conn>> {
        let conns = self.conns.borrow();
        conns
            .get(ack.key as usize)
            .filter(|c| c.serial == ack.serial)
            .cloned()
    }

    /// An event from the NATS backbone.
    pub fn on_backbone(&self, ev: FromNats) {
        match ev {
            FromNats::Deliver(env) => self.deliver_local(env),
            FromNats::PubAck(ack, ok) => {
                if let Some(c) = self.conn_for(&ack) {
                    c.reply(if ok {
                        Envelope::ok(ack.id)
                    } else {
                        Envelope::err(ack.id, ErrCode::BackboneUnavailable, "backbone unavailable")
                    });
                }
            }
            FromNats::SubAck(ack) => {
                if let Some(c) = self.conn_for(&ack) {
                    c.reply(Envelope::ok(ack.id));
                }
            }
            FromNats::Reply(ack, result) => {
                if let Some(c) = self.conn_for(&ack) {
                    c.reply(match result {
                        Ok(payload) => {
                            let mut r = Envelope::new(edgegate_proto::Type::Reply);
                            r.id = ack.id;
                            r.payload = payload;
                            r
                        }
                        Err(code) => Envelope::err(ack.id, code, code.name()),
                    });
                }
            }
            FromNats::Kick(user) => {
                let ch = format!("user:{user}");
                let conns = self.conns.borrow();
                for (_, c) in conns.iter() {
                    if c.subs.borrow().iter().any(|s| **s == *ch) {
                        c.request_close(CloseReq::new(4005, "kicked"));
                    }
                }
            }
        }
    }

    /// A message from another shard.
    pub fn on_mesh(&self, msg: MeshMsg) {
        match msg {
            MeshMsg::Route(env) => {
                self.fan_out(env);
            }
            MeshMsg::Deliver(env) => self.deliver_local(env),
        }
    }

    /// Delivers `env` to this shard's subscribers of its channel.
    pub fn deliver_local(&self, env: Arc<Envelope>) {
        let Some(ch) = env.ch.clone() else { return };
        let d = Delivery::new(env);
        self.router.borrow().deliver(self, &ch, &d);
    }

    /// As the channel's owner: delivers `env` here and hands it to every
    /// other shard, in the order this shard sees it. False when some shard
    /// could not take it (overload).
    pub fn fan_out(&self, env: Arc<Envelope>) -> bool {
        let full = match &self.backbone {
            Backbone::Embedded(e) => e.fan_out(&env),
            Backbone::Nats(_) => 0,
        };
        if full > 0 {
            self.metrics.drops_mesh_full.fetch_add(full as u64, Relaxed);
        }
        self.deliver_local(env);
        full == 0
    }

    /// Publishes `env` on its channel, node-wide: through the channel's owner
    /// shard, so that every subscriber sees one order. False on overload.
    pub fn publish(&self, env: Arc<Envelope>) -> bool {
        match &self.backbone {
            Backbone::Embedded(e) => {
                let owner = env.ch.as_deref().and_then(|ch| e.remote_owner(ch));
                match owner {
                    Some(peer) => e.route(peer, env),
                    None => self.fan_out(env),
                }
            }
            // Publishing through NATS is the session's (its ok waits for the backbone).
            Backbone::Nats(_) => false,
        }
    }

    fn on_check(&self, e: Entry) {
        let conn = {
            let conns = self.conns.borrow();
            match conns.get(e.key as usize) {
                Some(c) if c.serial as u32 == e.conn => c.clone(),
                _ => return, // gone; the slot may hold a newer connection
            }
        };
        let now = self.now_ms();
        match e.check {
            Check::Hello => {
                if conn.phase.get() == Phase::Hello {
                    conn.request_close(CloseReq::new(4001, "hello timeout"));
                }
            }
            Check::Drain => conn.request_close(CloseReq::new(1001, "going away")),
            Check::Expiry => {
                // Lazy, like the heartbeat: a refreshed token moved `exp`,
                // so look again rather than trust the deadline we were given.
                let Some(claims) = conn.claims.borrow().clone() else {
                    return;
                };
                let leeway = self.cfg.auth.as_ref().map_or(0, |v| v.leeway_ms());
                let deadline = claims.exp_unix_ms.saturating_add(leeway);
                let unix = crate::auth::unix_ms();
                if unix >= deadline {
                    conn.request_close(CloseReq::new(4008, "token expired"));
                } else {
                    self.wheel.borrow_mut().schedule(
                        e.key,
                        e.conn,
                        Check::Expiry,
                        now + (deadline - unix),
                    );
                }
            }
            Check::Heartbeat => {
                if conn.phase.get() != Phase::Active {
                    return;
                }
                let last = conn.last_rx_ms.get();
                let silent = now.saturating_sub(last);
                if silent >= self.cfg.idle_ms {
                    conn.request_close(CloseReq::new(4002, "heartbeat timeout"));
                    return;
                }
                let next = if silent >= self.cfg.hb_ms {
                    if conn.pinged_ms.get() <= last || now - conn.pinged_ms.get() >= self.cfg.hb_ms
                    {
                        conn.pinged_ms.set(now);
                        conn.want_ping.set(true);
                        conn.wake();
                    }
                    (last + self.cfg.idle_ms).min(now + self.cfg.hb_ms)
                } else {
                    last + self.cfg.hb_ms
                };
                self.wheel
                    .borrow_mut()
                    .schedule(e.key, e.conn, Check::Heartbeat, next);
            }
        }
    }

    /// Runs the wheel until the node shuts down and this shard has drained.
    /// `stop_accepting` is called once when the drain begins.
    pub async fn run_clock(self: &Rc<Self>, stop_accepting: impl FnOnce()) {
        let mut due = Vec::new();
        let mut stop_accepting = Some(stop_accepting);
        let mut drain_deadline = None;
        loop {
            glommio::timer::sleep(Duration::from_millis(TICK_MS)).await;
            let now = self.refresh_clock();
            self.wheel.borrow_mut().advance(now, &mut due);
            for e in due.drain(..) {
                self.on_check(e);
            }
            self.serve_admin();
            if self.node.shutdown.load(SeqCst) && !self.draining.get() {
                self.draining.set(true);
                self.stop.close();
                self.handshakes.close();
                if let Some(f) = stop_accepting.take() {
                    f();
                }
                // Let the accept loops see the stop and drop their listeners
                // before /readyz reports the drain.
                glommio::timer::sleep(Duration::from_millis(1)).await;
                self.node.shards_stopped.fetch_add(1, SeqCst);
                drain_deadline = Some(now + self.cfg.drain_timeout_ms);
                self.begin_drain(now);
            }
            if let Some(deadline) = drain_deadline {
                let left = self.conns.borrow().len();
                if left == 0 {
                    info!(shard = self.id, "drained");
                    return;
                }
                if now >= deadline {
                    warn!(shard = self.id, left, "drain timeout: closing the rest");
                    return;
                }
            }
        }
    }

    /// Answers the admin thread's requests, if any (once per tick: off the
    /// message path, and a slow admin client cannot make a shard wait).
    fn serve_admin(&self) {
        let Some((_, rx)) = self.node.admin_queues.get(self.id) else {
            return;
        };
        while let Ok(req) = rx.try_recv() {
            match req {
                AdminReq::Connz { skip, take, reply } => {
                    let _ = reply.send(self.connz(skip, take));
                }
            }
        }
    }

    /// This shard's connections in serial order, `take` of them after the
    /// first `skip`.
    fn connz(&self, skip: usize, take: usize) -> crate::admin::ConnzPage {
        let now = self.now_ms();
        let conns = self.conns.borrow();
        let mut all: Vec<&Rc<Conn>> = conns.iter().map(|(_, c)| c).collect();
        all.sort_unstable_by_key(|c| c.serial);
        let total = all.len();
        let conns = all
            .into_iter()
            .skip(skip)
            .take(take)
            .map(|c| crate::admin::ConnInfo {
                conn: self.conn_name(c),
                user: c.user().map(|u| u.to_string()),
                transport: c.transport.name(),
                shard: self.id,
                peer: c.peer.to_string(),
                age_ms: now.saturating_sub(c.started_ms),
                queue_bytes: c.queued_bytes(),
                subscriptions: c.subs.borrow().len(),
            })
            .collect();
        crate::admin::ConnzPage { total, conns }
    }

    /// Spreads `bye` 1001 over the drain window: each connection gets a
    /// random moment in it, so clients come back in a trickle, not a wave.
    fn begin_drain(&self, now: u64) {
        let window = self.cfg.drain_window_ms;
        let conns: Vec<(u32, u64)> = self
            .conns
            .borrow()
            .iter()
            .map(|(k, c)| (k as u32, c.serial))
            .collect();
        debug!(shard = self.id, conns = conns.len(), window, "drain begins");
        let mut wheel = self.wheel.borrow_mut();
        for (key, serial) in conns {
            let at = if window == 0 {
                now
            } else {
                now + fastrand::u64(0..window)
            };
            wheel.schedule(key, serial as u32, Check::Drain, at);
        }
    }
}
