//! A shard: one glommio executor pinned to one CPU, owning the connections
//! it accepted, their subscriptions and their timers.
//!
//! Nothing in a [`Shard`] is touched by another thread. Shards talk to each
//! other only through the backbone; node-wide facts (the connection count
//! against the limit, shutdown) live in [`Node`] as atomics read once per
//! accept or per tick, never per message.
//!
//! The shard is split by job, and this file only composes them and
//! carries out what the session decides:
//!
//! * [`conns::ConnTable`]: the connections, by slab slot and serial;
//! * [`subs::Router`]: channel → local subscribers, and fan-out over the
//!   connection table;
//! * [`liveness::Liveness`]: the timer wheel and the drain;
//! * the [`Backbone`] the shard publishes through;
//! * [`Shard::input`]: runs [`session::handle`] for one connection and
//!   carries out its [`Action`]s; [`Shard::on_event`] turns backbone events
//!   into deliveries and session inputs.
//!
//! Admission (who may connect) is the listener's (`admission.rs`).

pub mod api;
pub mod conns;
pub mod liveness;
pub mod posts;
pub mod subs;

use std::cell::{Cell, OnceCell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

use edgegate_proto::Envelope;
use tracing::{debug, info, warn};

use crate::backbone::{self, Ack, Backbone, Event};
use crate::compress::ShardDeflate;
use crate::conn::{Conn, Delivery};
use crate::metrics::{ShardMetrics, Transport};
use crate::node::{AdminReq, ConnInfo, ConnzPage, Node};
use crate::session::{self, Action, Ctx, Input};
use crate::settings::ShardConfig;
use crate::timer::{Check, Entry};
use conns::ConnTable;
use liveness::{Liveness, TICK_MS};

/// Ticks between two [`collect_freed`] calls: about a second.
const COLLECT_TICKS: u64 = 1000 / TICK_MS;

/// Hands the blocks this shard's thread freed, and other threads freed
/// for it, back to mimalloc, and lets it return the pages they emptied.
/// Messages cross shards in bursts (a history fill, a broadcast), each
/// allocated by one shard and freed by another; mimalloc keeps what a
/// thread frees for another on that thread's lists until the owner next
/// allocates from the same pages, so after a burst the pages stayed
/// resident. Collected once a second, the history's RSS stays within
/// 1.1× of its budget (`docs/benchmarks.md`, "Memory of the history").
/// A normal (not forced) collection visits the thread's pages once; the
/// fan-out benchmarks show no cost.
fn collect_freed() {
    #[cfg(not(feature = "system-alloc"))]
    // SAFETY: `mi_collect` works on the calling thread's own heap and
    // takes no pointers; it is safe to call at any time on any thread.
    unsafe {
        libmimalloc_sys::mi_collect(false)
    };
}
use subs::{Router, Watchers};

/// WebSocket upgrades and TLS handshakes in flight per shard.
pub const MAX_HANDSHAKES: u64 = 128;
/// Per-shard read scratch: one socket read at most this large.
pub const SCRATCH_BYTES: usize = 64 * 1024;

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
    pub conns: ConnTable,
    /// Local subscriptions.
    pub router: RefCell<Router>,
    /// Connections watching a room's presence.
    pub watchers: RefCell<Watchers>,
    /// Checks and drain.
    pub liveness: Liveness,
    /// Where messages go beyond this shard.
    pub backbone: Rc<dyn Backbone>,
    /// Read scratch shared by every connection: idle connections hold no
    /// read buffer (glommio reads readiness-first, so the buffer is only
    /// borrowed during a poll).
    pub scratch: RefCell<Box<[u8]>>,
    /// permessage-deflate, shared by the shard's WebSocket connections
    /// (`None` with `ws.compression = "off"`); made when the first
    /// connection that agreed to it needs it, so that a shard whose clients
    /// never compress holds no compressor (≈ 0.5 MiB of zlib state).
    deflate: Option<OnceCell<ShardDeflate>>,
    /// Upgrades and TLS handshakes in progress at once: a connect storm
    /// waits in the kernel's accept queue instead of piling up handshake
    /// buffers here.
    pub handshakes: Rc<glommio::sync::Semaphore>,
    /// Closed when the drain begins: accept loops wait on it beside accept,
    /// so listeners close at once.
    pub stop: Rc<glommio::sync::Semaphore>,
    /// Reused lists of session actions and backbone events (taken, not
    /// borrowed, so a nested call gets a fresh one).
    actions: Cell<Vec<Action>>,
    events: Cell<Vec<Event>>,
    /// The services thread's link (server API, HTTP services, hooks), when
    /// it runs.
    pub api: Option<api::ApiSide>,
    /// Bodies POSTed to this shard's SSE connections, not yet read.
    pub posts: posts::PostBox,
    start: Instant,
    clock: Cell<u64>,
}

impl Shard {
    /// The shard's permessage-deflate state, made on first use; `None`
    /// when compression is off. Call it only for a connection that agreed
    /// to compression.
    pub fn deflate(&self) -> Option<&ShardDeflate> {
        self.deflate
            .as_ref()
            .map(|c| c.get_or_init(ShardDeflate::default))
    }

    /// A shard with no connections.
    pub fn new(id: usize, cfg: ShardConfig, node: Arc<Node>, backbone: Rc<dyn Backbone>) -> Self {
        let metrics = node.metrics[id].clone();
        let deflate = cfg.ws_deflate.then(OnceCell::new);
        Shard {
            id,
            cfg,
            node,
            metrics,
            conns: ConnTable::default(),
            router: RefCell::new(Router::default()),
            watchers: RefCell::new(Watchers::default()),
            liveness: Liveness::default(),
            backbone,
            scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
            deflate,
            handshakes: Rc::new(glommio::sync::Semaphore::new(MAX_HANDSHAKES)),
            stop: Rc::new(glommio::sync::Semaphore::new(0)),
            actions: Cell::new(Vec::new()),
            events: Cell::new(Vec::new()),
            api: None,
            posts: posts::PostBox::default(),
            start: Instant::now(),
            clock: Cell::new(0),
        }
    }

    /// The shard with its end of the services thread.
    pub fn with_api(mut self, link: crate::api::ShardLink) -> Self {
        self.api = Some(api::ApiSide::new(link));
        self
    }

    /// Milliseconds since the shard started (coarse: refreshed per tick and
    /// per accept).
    pub fn now_ms(&self) -> u64 {
        self.clock.get()
    }

    /// Reads the clock anew.
    pub fn refresh_clock(&self) -> u64 {
        let now = self.start.elapsed().as_millis() as u64;
        self.clock.set(now);
        now
    }

    /// True once draining began.
    pub fn draining(&self) -> bool {
        self.liveness.draining()
    }

    /// `welcome.meta.conn`: node, shard and serial.
    pub fn conn_name(&self, conn: &Conn) -> String {
        session::conn_name(&self.cfg.node_id, self.id, conn.serial)
    }

    /// An SSE connection's session token (`welcome.meta.session`).
    pub fn sse_token(&self, conn: &Conn) -> Option<String> {
        let key = self.cfg.sse_key.as_ref()?;
        Some(key.token(&self.cfg.node_id, self.id, conn.key, conn.serial))
    }

    /// Registers a new connection and arms its hello timeout.
    pub fn register(&self, transport: Transport, peer: SocketAddr) -> Rc<Conn> {
        let now = self.refresh_clock();
        let conn = self.conns.insert(transport, peer, now);
        self.liveness
            .arm(conn.key, conn.serial, Check::Hello, now + self.cfg.hello_ms);
        if self.draining() {
            self.check(&conn, Check::Drain);
        }
        conn
    }

    /// Forgets a connection: its subscriptions, its slot, its session count.
    pub fn release(&self, conn: &Conn) {
        let (subs, user) = {
            let mut st = conn.session.borrow_mut();
            st.phase = crate::session::Phase::Closing;
            (std::mem::take(&mut st.subs), st.user.clone())
        };
        let mut events = self.events.take();
        for ch in &subs {
            self.unsubscribe(conn, user.as_ref(), ch, &mut events);
        }
        if let Some(user) = user {
            self.metrics.sessions.fetch_sub(1, Relaxed);
            self.backbone.presence(&user, -1);
        }
        self.posts.forget(conn.key, conn.serial);
        self.conns.remove(conn);
        self.dispatch(events);
    }

    /// True when a connection of `user` on this shard other than `conn`
    /// is subscribed to `ch` (its `user:` channel lists them all, so this
    /// looks at the user's own connections only, usually none).
    fn held_elsewhere(&self, user: &session::UserId, ch: &str, conn: u32) -> bool {
        let router = self.router.borrow();
        let mut found = false;
        self.conns.for_each_key(router.keys(user.channel()), |c| {
            if !found && c.key != conn {
                found = c.session.borrow().subs.iter().any(|s| **s == *ch);
            }
        });
        found
    }

    /// A room's presence is tracked (presence on, a `room:` channel).
    fn tracks_presence(&self, ch: &str) -> bool {
        self.cfg.presence && ch.starts_with("room:")
    }

    /// Takes `conn` off `ch`: the router (and the backbone's interest on
    /// the shard's last subscriber), the user's presence in the room on
    /// the shard's last connection of the user, and the room's watchers.
    fn unsubscribe(
        &self,
        conn: &Conn,
        user: Option<&session::UserId>,
        ch: &str,
        events: &mut Vec<Event>,
    ) {
        if self.router.borrow_mut().unsubscribe(ch, conn.key) {
            self.backbone.interest(ch, false, None, events);
        }
        if self.tracks_presence(ch) {
            if let Some(u) = user
                && !self.held_elsewhere(u, ch, conn.key)
            {
                self.backbone.present(ch, u, -1);
            }
            if self.watchers.borrow_mut().remove(ch, conn.key) {
                self.backbone.watch(ch, false);
            }
        }
    }

    /// The answer address of a backbone call for `conn`.
    fn ack(&self, conn: &Conn, id: Option<u64>) -> Ack {
        Ack {
            shard: self.id,
            key: conn.key,
            serial: conn.serial,
            id,
        }
    }

    /// Runs the session of `conn` on `input` and carries out what it decides.
    pub fn input(&self, conn: &Rc<Conn>, input: Input) {
        let mut out = self.actions.take();
        {
            let mut st = conn.session.borrow_mut();
            // SSE: the session token goes in `welcome` (made only while
            // one may be due: an HMAC per input would be waste).
            let token = (conn.transport == Transport::Sse && st.welcome_due())
                .then(|| self.sse_token(conn))
                .flatten();
            let cx = Ctx {
                cfg: &self.cfg,
                metrics: &self.metrics,
                shard: self.id,
                serial: conn.serial,
                transport: conn.transport,
                now_ms: self.now_ms(),
                unix_ms: crate::auth::unix_ms(),
                session: token.as_deref(),
            };
            session::handle(&mut st, &cx, input, &mut out);
        }
        let mut events = self.events.take();
        for a in out.drain(..) {
            self.act(conn, a, &mut events);
        }
        self.actions.set(out);
        self.dispatch(events);
    }

    /// Carries out one session action; backbone answers given at once are
    /// collected in `events`.
    fn act(&self, conn: &Rc<Conn>, a: Action, events: &mut Vec<Event>) {
        match a {
            Action::Reply(env) => conn.reply(env),
            Action::Subscribe { ch, ok, presence } => {
                // The router's table first (it tells nobody): the session
                // keeps the shard's copy of the name.
                let (first, name) = self.router.borrow_mut().subscribe(&ch, conn.key);
                if !session::Name::ptr_eq(&name, &ch) {
                    let mut st = conn.session.borrow_mut();
                    if let Some(s) = st
                        .subs
                        .iter_mut()
                        .rev()
                        .find(|s| session::Name::ptr_eq(s, &ch))
                    {
                        *s = name.clone();
                    }
                }
                let ch = name;
                if self.tracks_presence(&ch) {
                    if let Some(u) = conn.user()
                        && !self.held_elsewhere(&u, &ch, conn.key)
                    {
                        self.backbone.present(&ch, &u, 1);
                    }
                    // Before the position (and count) is asked: the
                    // backbone hears this shard watch first, so no batch
                    // falls between the count and the `members` after it.
                    if presence && self.watchers.borrow_mut().add(&ch, conn.key) {
                        self.backbone.watch(&ch, true);
                    }
                }
                if first {
                    let ack = ok.map(|id| self.ack(conn, id));
                    self.backbone.interest(&ch, true, ack, events);
                } else if let Some(id) = ok {
                    // Live already: this shard receives the channel.
                    events.push(Event::SubReady(self.ack(conn, id)));
                }
            }
            Action::Watch(ch) => self.watchers.borrow_mut().activate(&ch, conn.key),
            Action::Unsubscribe(ch) => {
                let user = conn.user();
                self.unsubscribe(conn, user.as_ref(), &ch, events);
            }
            Action::History {
                ch,
                since,
                id,
                presence,
            } => {
                self.backbone
                    .history(&ch, since, presence, self.ack(conn, id), events);
            }
            Action::PresenceQuery {
                ch,
                limit,
                after,
                id,
            } => {
                self.metrics.presence_queries.fetch_add(1, Relaxed);
                self.backbone.presence_query(
                    &ch,
                    limit,
                    after.as_deref(),
                    self.ack(conn, id),
                    events,
                );
            }
            Action::HistoryPage {
                ch,
                limit,
                before,
                id,
            } => {
                self.metrics.history_pages.fetch_add(1, Relaxed);
                self.backbone
                    .history_page(&ch, limit, before, self.ack(conn, id), events);
            }
            Action::Deliver(list) => {
                for env in list {
                    conn.push_replay(crate::conn::Out::Shared(Delivery::new(env)));
                }
            }
            Action::Publish(session::Pub {
                ch,
                from,
                id,
                payload,
                key,
                ephemeral,
            }) => {
                let name = self.conn_name(conn);
                let msg = backbone::Publish {
                    ch: &ch,
                    from: &from,
                    id,
                    conn: &name,
                    payload,
                    key,
                    ephemeral,
                };
                self.backbone.publish(msg, self.ack(conn, id), events);
            }
            Action::Request {
                service,
                user,
                id,
                payload,
            } => {
                let name = self.conn_name(conn);
                let req = backbone::Request {
                    service: &service,
                    user: &user,
                    conn: &name,
                    payload,
                    ask: false,
                    timeout_ms: None,
                };
                self.request(req, self.ack(conn, id), events);
            }
            Action::Ask {
                hook,
                ticket,
                user,
                body,
                ch,
            } => self.ask(conn, (hook, ticket, user), body, ch, events),
            Action::CacheAllow(ch) => self.cache_allow(conn, &ch),
            Action::Presence(user, delta) => self.backbone.presence(&user, delta),
            Action::Arm(check, at) => self.liveness.arm(conn.key, conn.serial, check, at),
            Action::Ping => {
                conn.pinged_ms.set(self.now_ms());
                conn.want_ping.set(true);
                conn.wake();
            }
            Action::Close(req) => conn.request_close(req),
        }
    }

    /// Handles the events a backbone call answered at once.
    fn dispatch(&self, mut events: Vec<Event>) {
        for ev in events.drain(..) {
            self.on_event(ev);
        }
        self.events.set(events);
    }

    /// An event from the backbone.
    pub fn on_event(&self, ev: Event) {
        let conn_for = |ack: &Ack| self.conns.get(ack.key, ack.serial, false);
        match ev {
            Event::Deliver(env) => self.deliver_local(env),
            Event::Published(ack, _)
            | Event::Sent(ack, _)
            | Event::Presence(ack, _)
            | Event::Page(ack, _)
            | Event::Channels(ack, _)
                if ack.is_api() =>
            {
                self.api_answer(ack, ev)
            }
            Event::Published(ack, r) => {
                if let Some(c) = conn_for(&ack) {
                    self.input(&c, Input::Published(ack.id, r));
                }
            }
            Event::Sent(ack, r) => {
                if let Some(c) = conn_for(&ack) {
                    self.input(&c, Input::Sent(ack.id, r));
                }
            }
            Event::Presence(ack, r) => {
                if let Some(c) = conn_for(&ack) {
                    self.input(&c, Input::Presence(ack.id, r));
                }
            }
            Event::Page(ack, r) => {
                if let Some(c) = conn_for(&ack) {
                    self.input(&c, Input::Page(ack.id, r));
                }
            }
            Event::Members(env) => self.deliver_members(env),
            // Only the server API asks for the rooms.
            Event::Channels(..) => {}
            Event::History(ack, r) => {
                if let Some(c) = conn_for(&ack) {
                    self.input(&c, Input::History(ack.id, r));
                }
            }
            Event::SubReady(ack) => {
                if let Some(c) = conn_for(&ack) {
                    self.input(&c, Input::SubReady(ack.id));
                }
            }
            Event::Reply(ack, r) => {
                if let Some(c) = conn_for(&ack) {
                    self.input(&c, Input::Reply(ack.id, r));
                }
            }
            Event::Answer(ack, r) => {
                if let Some(c) = conn_for(&ack) {
                    self.input(&c, Input::Answer(ack.id, r));
                }
            }
            // Every welcomed connection is subscribed to its user channel.
            Event::Kick(k) => self.kick(k),
            Event::Post(p) => self.take_post(p),
            Event::Gap(ch) => self.tell_subscribers(&ch, || Input::Gap),
        }
    }

    /// Hands `input()` to the session of every local subscriber of `ch`.
    fn tell_subscribers(&self, ch: &str, input: impl Fn() -> Input) {
        let keys = self.router.borrow().keys(ch).to_vec();
        let mut found = Vec::new();
        self.conns.for_each_key(&keys, |c| found.push(c.clone()));
        for c in found {
            self.input(&c, input());
        }
    }

    /// Delivers `env` to this shard's subscribers of its channel.
    pub fn deliver_local(&self, env: Arc<Envelope>) {
        let Some(ch) = env.ch.clone() else { return };
        let d = Delivery::new(env);
        self.router.borrow().deliver(
            &self.conns,
            &self.metrics,
            (self.cfg.outbound_queue_bytes, self.cfg.recovery_buffer),
            &ch,
            &d,
        );
    }

    /// Queues a room's `members` batch on this shard's connections that
    /// watch it (at most once: dropped for a connection that is behind).
    fn deliver_members(&self, env: Arc<Envelope>) {
        let Some(ch) = env.ch.as_deref() else { return };
        let keys = self.watchers.borrow().active(ch);
        if keys.is_empty() {
            return;
        }
        let d = Delivery::new(env.clone());
        let limit = self.cfg.outbound_queue_bytes;
        self.conns.for_each_key(&keys, |c| {
            if c.push_droppable(crate::conn::Out::Shared(d.clone()), limit) {
                self.metrics.members_sent.fetch_add(1, Relaxed);
            } else {
                self.metrics.members_dropped.fetch_add(1, Relaxed);
            }
        });
    }

    /// Hands a due check to its connection's session.
    fn check(&self, conn: &Rc<Conn>, check: Check) {
        let input = Input::Check {
            check,
            last_rx_ms: conn.last_rx_ms.get(),
            pinged_ms: conn.pinged_ms.get(),
        };
        self.input(conn, input);
    }

    fn on_check(&self, e: Entry) {
        // Gone, or the slot holds a newer connection: nothing to check.
        if let Some(conn) = self.conns.get(e.key, u64::from(e.conn), true) {
            self.check(&conn, e.check);
        }
    }

    /// Runs the wheel until the node shuts down and this shard has drained.
    /// `stop_accepting` is called once when the drain begins.
    pub async fn run_clock(self: &Rc<Self>, stop_accepting: impl FnOnce()) {
        let mut due = Vec::new();
        let mut stop_accepting = Some(stop_accepting);
        let mut drain_deadline = None;
        let mut ticks = 0u64;
        loop {
            glommio::timer::sleep(Duration::from_millis(TICK_MS)).await;
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(COLLECT_TICKS) {
                collect_freed();
            }
            let now = self.refresh_clock();
            self.liveness.advance(now, &mut due);
            for e in due.drain(..) {
                self.on_check(e);
            }
            self.serve_admin();
            if self.node.shutdown.load(SeqCst) && !self.draining() {
                self.stop.close();
                self.handshakes.close();
                if let Some(f) = stop_accepting.take() {
                    f();
                }
                let conns = self.conns.all();
                debug!(shard = self.id, conns = conns.len(), "drain begins");
                self.liveness.begin_drain(
                    conns.iter().map(|c| (c.key, c.serial)),
                    now,
                    self.cfg.drain_window_ms,
                );
                // Let the accept loops see the stop and drop their listeners
                // before /readyz reports the drain.
                glommio::timer::sleep(Duration::from_millis(1)).await;
                self.node.shards_stopped.fetch_add(1, SeqCst);
                drain_deadline = Some(now + self.cfg.drain_timeout_ms);
            }
            if let Some(deadline) = drain_deadline {
                let left = self.conns.len();
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
    fn connz(&self, skip: usize, take: usize) -> ConnzPage {
        let now = self.now_ms();
        let mut all = self.conns.all();
        all.sort_unstable_by_key(|c| c.serial);
        let total = all.len();
        let conns = all
            .into_iter()
            .skip(skip)
            .take(take)
            .map(|c| ConnInfo {
                conn: self.conn_name(&c),
                user: c.user().map(|u| u.to_string()),
                transport: c.transport.name(),
                shard: self.id,
                peer: c.peer.to_string(),
                age_ms: now.saturating_sub(c.started_ms),
                queue_bytes: c.queued_bytes(),
                subscriptions: c.subscriptions(),
            })
            .collect();
        ConnzPage { total, conns }
    }
}
