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

use crate::backbone::{Backbone, MeshMsg};
use crate::config::{Config, RoomPolicy};
use crate::conn::{CloseReq, Conn, Delivery, Phase};
use crate::metrics::{ShardMetrics, Transport};
use crate::router::Router;
use crate::timer::{Check, Entry, Wheel};
use edgegate_proto::Envelope;

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
        }
    }

    /// A `retry_ms` jittered per connection in [base/2, 3·base/2), so a
    /// crowd told to come back does not come back at once.
    pub fn jittered_retry_ms(&self) -> u64 {
        let base = self.retry_ms.max(1);
        base / 2 + fastrand::u64(0..base)
    }
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
}

impl Node {
    /// True when every shard listens and none has begun to drain.
    pub fn ready(&self) -> bool {
        self.shards_ready.load(Relaxed) == self.metrics.len()
            && self.shards_stopped.load(Relaxed) == 0
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
    start: Instant,
    clock: Cell<u64>,
    serial: Cell<u64>,
    draining: Cell<bool>,
}

impl Shard {
    /// A shard with no connections.
    pub fn new(id: usize, cfg: ShardConfig, node: Arc<Node>, backbone: Backbone) -> Self {
        let metrics = node.metrics[id].clone();
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
        {
            let mut router = self.router.borrow_mut();
            for ch in &subs {
                router.unsubscribe(ch, conn.key);
            }
        }
        if conn.user.borrow().is_some() {
            self.metrics.sessions.fetch_sub(1, Relaxed);
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

    /// Subscribes `conn` to `ch` (idempotent).
    pub fn subscribe(&self, conn: &Conn, ch: Rc<str>) {
        let mut subs = conn.subs.borrow_mut();
        if subs.contains(&ch) {
            return;
        }
        self.router.borrow_mut().subscribe(&ch, conn.key);
        // Most connections hold one or two channels: grow one at a time.
        subs.reserve_exact(1);
        subs.push(ch);
    }

    /// Unsubscribes `conn` from `ch`; false if it was not subscribed.
    pub fn unsubscribe(&self, conn: &Conn, ch: &str) -> bool {
        let mut subs = conn.subs.borrow_mut();
        let Some(i) = subs.iter().position(|c| &**c == ch) else {
            return false;
        };
        subs.swap_remove(i);
        self.router.borrow_mut().unsubscribe(ch, conn.key);
        true
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
