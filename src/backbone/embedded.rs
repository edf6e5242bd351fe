//! The embedded backbone: the shards of this one process, joined by
//! glommio's channel mesh.
//!
//! Every channel has an *owner* shard (a hash of its name). A publish goes
//! to the owner, which hands it to every shard, itself included, in the
//! order it received it; each shard delivers to its own subscribers. So all
//! members of a room, on whatever shard, see one order (docs/protocol.md §6),
//! the publisher's own copy included, as they would through NATS. Shards
//! share no table: a shard with no subscriber drops the message after one
//! hash lookup.
//!
//! The owner also keeps the room's **presence** ([`PresenceStore`]): every
//! shard tells it when its first connection of a user subscribes to the
//! room and when its last one leaves, and which shards have connections
//! watching the room's presence; every `flush_ms` the owner sends those
//! shards one `members` batch per room that changed. Those control
//! messages must not be lost (a lost `-1` would keep a user present for
//! good): when a peer's outbox is full they wait in a backlog of their own,
//! in order, sent by a task that wakes when the backlog fills and retries
//! every [`BACKLOG_RETRY`] until it is empty (publish answers are control
//! messages too: a publisher that does not wait for them must neither make
//! them late nor pile them up). Whether a user is online at all
//! (a presence query on `user:<id>`) is asked of every shard: each knows
//! its own connections, and no shard keeps a table of everybody's.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use edgegate_proto::{Envelope, Type};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers};
use glommio::channels::local_channel::{self, LocalSender};

use super::history::{HistoryStore, Page, Recovery, Since, Stored};
use super::presence::{PresencePage, PresenceStore, RoomsPage, lifecycle_events, online_page};
use super::{
    Ack, Backbone, EPHEMERAL_META, Event, Probe, Publish, Refused, Request, Sink, embedded_service,
};
use crate::metrics::ShardMetrics;

/// What shards say to each other.
///
/// Sixteen bytes: every message but the deliveries carries its fields
/// boxed. The mesh's rings and the outboxes hold messages by value, and a
/// FIFO ring touches every slot it has as it turns, so what a slot weighs
/// is what every peer pair's channels come to cost in RSS once traffic has
/// gone round them (with 248-byte messages, 5 MB per direction).
pub enum MeshMsg {
    /// To the channel's owner: store and sequence this message, fan it out,
    /// and answer the publisher (`ack`) with where it was stored (the
    /// dedupe key).
    Route(Box<(Envelope, Ack, Option<String>)>),
    /// To the channel's owner: fan this ephemeral message out (never
    /// stored), and answer the publisher.
    Send(Box<(Envelope, Ack)>),
    /// From the channel's owner: deliver to local subscribers.
    Deliver(Arc<Envelope>),
    /// From the channel's owner: where a routed publish was stored.
    Stored(Box<(Ack, Result<Option<Stored>, Refused>)>),
    /// From the channel's owner: an ephemeral publish was handed on.
    Sent(Box<(Ack, Result<(), Refused>)>),
    /// To the channel's owner: the position of a channel (and, with
    /// `since`, the messages after it; with the flag, its present count).
    Recover(Box<(String, Option<Since>, bool, Ack)>),
    /// From the channel's owner: the answer to `Recover`.
    Recovered(Box<(Ack, Recovery)>),
    /// To a room's owner: the sender's count of a user in it moved.
    Present(Box<(String, String, i32)>),
    /// To a room's owner: a shard begins or stops watching its presence.
    Watch(Box<(String, usize, bool)>),
    /// From a room's owner: its presence changed, for the watchers here.
    Members(Arc<Envelope>),
    /// To a room's owner: who is present (`limit`, `after`).
    Query(Box<(String, usize, Option<String>, Ack)>),
    /// From a room's owner: the answer to `Query`.
    Queried(Box<(Ack, PresencePage)>),
    /// To every shard: does it hold a connection of this user? (the
    /// asker's query number, and the asker).
    Online(Box<(String, u64, usize)>),
    /// The answer to `Online`.
    OnlineIs(u64, bool),
    /// To every shard: its rooms with someone present (prefix, after,
    /// limit, the asker's query number, the asker).
    Rooms(Box<(String, Option<String>, usize, u64, usize)>),
    /// The answer to `Rooms`.
    RoomsAre(Box<(u64, Vec<(String, u64)>)>),
    /// To a channel's owner: a page of its history.
    PageOf(Box<(String, usize, Option<u64>, Ack)>),
    /// From a channel's owner: the answer to `PageOf`.
    Paged(Box<(Ack, Page)>),
}

/// The node's mesh, before the shards join it.
pub type Mesh = MeshBuilder<MeshMsg, Full>;

/// Capacity of each shard-to-shard channel.
pub const MESH_CHANNEL: usize = 4096;

/// How often a shard with a backlog of control messages tries the full
/// outbox again.
pub const BACKLOG_RETRY: std::time::Duration = std::time::Duration::from_micros(200);

/// Messages a shard may have waiting for one peer before publishers are
/// told the node is overloaded.
pub const MESH_OUTBOX: usize = 16 * 1024;

/// What an outbox did with a message.
enum Offer {
    /// Queued.
    Taken,
    /// `MESH_OUTBOX` messages wait already: given back.
    Full(MeshMsg),
    /// The peer is gone (shutdown).
    Gone,
}

/// Queues `m` on an outbox, within `MESH_OUTBOX`.
fn offer(tx: &LocalSender<MeshMsg>, m: MeshMsg) -> Offer {
    if tx.len() >= MESH_OUTBOX {
        return Offer::Full(m);
    }
    match tx.try_send(m) {
        Ok(()) => Offer::Taken,
        Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m))) => Offer::Full(m),
        Err(_) => Offer::Gone,
    }
}

/// The shard that sequences `ch` (stable across shards and restarts).
pub fn owner(ch: &str, shards: usize) -> usize {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: every shard computes the same owner.
    let mut h = std::hash::DefaultHasher::new();
    ch.hash(&mut h);
    (h.finish() % shards.max(1) as u64) as usize
}

/// The embedded backbone on one shard: one bounded local outbox per peer
/// shard, each drained by a forwarding task into the mesh (so a publisher
/// never waits for another shard), and the mesh's receiving side.
pub struct Embedded {
    outboxes: Vec<Option<LocalSender<MeshMsg>>>,
    me: usize,
    metrics: Arc<ShardMetrics>,
    receivers: RefCell<Option<Receivers<MeshMsg>>>,
    /// The history of the channels this shard owns (`None`: history off).
    history: Option<RefCell<HistoryStore>>,
    /// The presence of the rooms this shard owns (`None`: presence off),
    /// and how often it flushes.
    presence: Option<(RefCell<PresenceStore>, u64)>,
    /// Control messages (presence, answers) waiting for a full outbox, per
    /// peer.
    backlog: RefCell<Vec<VecDeque<MeshMsg>>>,
    /// Wakes the task that empties the backlogs (set by [`Backbone::start`]).
    backlog_wake: RefCell<Option<LocalSender<()>>>,
    /// Questions asked of every shard, in flight, by number.
    gathers: RefCell<HashMap<u64, Gather>>,
    next_query: Cell<u64>,
    /// Whether this shard holds a subscriber of a channel (the shard's
    /// router; set by [`Backbone::start`]).
    probe: RefCell<Option<Probe>>,
    /// Per-user connection changes and room events for core services
    /// (server API, webhooks), when something wants them.
    reports: crate::events::Reports,
    start: Instant,
}

impl Embedded {
    /// Joins the node's mesh as shard `me` of `shards` and starts the
    /// forwarding tasks.
    pub async fn join(
        mesh: Mesh,
        shards: usize,
        me: usize,
        metrics: Arc<ShardMetrics>,
        history: Option<HistoryStore>,
        presence: Option<crate::config::Presence>,
        reports: crate::events::Reports,
    ) -> Result<Rc<Self>, String> {
        let (senders, receivers) = mesh
            .join()
            .await
            .map_err(|_| format!("shard {me}: joining the shard mesh failed"))?;
        let senders = Rc::new(senders);
        let mut e = Embedded::detached(shards, me, metrics, |peer, rx| {
            let tx = senders.clone();
            glommio::spawn_local(async move {
                while let Some(m) = rx.recv().await {
                    if tx.send_to(peer, m).await.is_err() {
                        break;
                    }
                }
            })
            .detach();
        });
        e.receivers = RefCell::new(Some(receivers));
        e.history = history.map(RefCell::new);
        e.presence = presence.map(|p| (RefCell::new(PresenceStore::new(p.diff_limit)), p.flush_ms));
        e.reports = reports;
        Ok(Rc::new(e))
    }

    /// Builds the outboxes without a mesh; `spawn_forwarder(peer, receiver)`
    /// must start the task that moves messages from the outbox onward
    /// (benchmarks and tests pass a no-op for a one-shard node).
    pub fn detached(
        shards: usize,
        me: usize,
        metrics: Arc<ShardMetrics>,
        mut spawn_forwarder: impl FnMut(usize, local_channel::LocalReceiver<MeshMsg>),
    ) -> Self {
        // Unbounded channels, bounded here (`MESH_OUTBOX`): a bounded one
        // reserves its whole capacity, which the queue's ring then touches
        // as it turns; this one grows to the deepest backlog only.
        let outboxes = (0..shards)
            .map(|peer| {
                (peer != me).then(|| {
                    let (tx, rx) = local_channel::new_unbounded();
                    spawn_forwarder(peer, rx);
                    tx
                })
            })
            .collect();
        Embedded {
            outboxes,
            me,
            metrics,
            receivers: RefCell::new(None),
            history: None,
            presence: None,
            backlog: RefCell::new((0..shards).map(|_| VecDeque::new()).collect()),
            backlog_wake: RefCell::new(None),
            gathers: RefCell::new(HashMap::new()),
            next_query: Cell::new(0),
            probe: RefCell::new(None),
            reports: crate::events::Reports::default(),
            start: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Sends `m` to `peer`'s shard; false when its outbox is full.
    fn send(&self, peer: usize, m: MeshMsg) -> bool {
        match self.outboxes.get(peer).and_then(Option::as_ref) {
            Some(tx) => matches!(offer(tx, m), Offer::Taken),
            None => false,
        }
    }

    /// Sends a control message that must not be lost: behind any already
    /// waiting for `peer`, or into the backlog when the outbox is full.
    fn send_control(&self, peer: usize, m: MeshMsg) {
        let mut backlog = self.backlog.borrow_mut();
        let Some(q) = backlog.get_mut(peer) else {
            return;
        };
        if !q.is_empty() {
            q.push_back(m);
            return;
        }
        let Some(tx) = self.outboxes.get(peer).and_then(Option::as_ref) else {
            return;
        };
        // A closed channel is a peer gone (shutdown): nothing to keep.
        if let Offer::Full(m) = offer(tx, m) {
            q.push_back(m);
            drop(backlog);
            if let Some(w) = self.backlog_wake.borrow().as_ref() {
                // Full: a wake is pending already, and the task drains
                // until every backlog is empty.
                let _ = w.try_send(());
            }
        }
    }

    /// Sends what waits in the backlogs, in order, as far as the outboxes
    /// take it; true when nothing waits any more.
    fn drain_backlog(&self) -> bool {
        let mut backlog = self.backlog.borrow_mut();
        for (peer, q) in backlog.iter_mut().enumerate() {
            let Some(tx) = self.outboxes.get(peer).and_then(Option::as_ref) else {
                continue;
            };
            while let Some(m) = q.pop_front() {
                match offer(tx, m) {
                    Offer::Taken => {}
                    Offer::Full(m) => {
                        q.push_front(m);
                        break;
                    }
                    Offer::Gone => {
                        q.clear();
                        break;
                    }
                }
            }
        }
        backlog.iter().all(VecDeque::is_empty)
    }

    /// As a room's owner: a shard's count of `user` in `ch` moved.
    fn on_present(&self, ch: &str, user: &str, delta: i32) {
        if let Some((p, _)) = &self.presence {
            let mut p = p.borrow_mut();
            let t = p.change(ch, user, delta);
            // This shard alone owns the room: its transitions are the
            // node's, each event emitted once.
            if let Some(bus) = &self.reports.events {
                let node = &self.reports.node;
                for ev in lifecycle_events(node, ch, user, t, p.count(ch)) {
                    bus.emit(ev);
                }
            }
        }
    }

    /// As a room's owner: `shard` begins or stops watching `ch`.
    fn on_watch(&self, ch: &str, shard: usize, on: bool) {
        if let Some((p, _)) = &self.presence {
            p.borrow_mut().watch(ch, shard as u32, on);
        }
    }

    /// As a room's owner: sends the batches due to the shards watching.
    fn flush_presence(&self, sink: &Sink) {
        let Some((p, _)) = &self.presence else { return };
        let batches = p.borrow_mut().flush();
        for b in batches {
            if b.suppressed {
                self.metrics.members_suppressed.fetch_add(1, Relaxed);
            }
            let env = Arc::new(b.env);
            for shard in b.to {
                let shard = shard as usize;
                if shard == self.me {
                    sink(Event::Members(env.clone()));
                } else if !self.send(shard, MeshMsg::Members(env.clone())) {
                    // At most once: a batch the mesh cannot take is lost.
                    self.metrics.drops_mesh_full.fetch_add(1, Relaxed);
                }
            }
        }
        let p = p.borrow();
        self.metrics.presence_entries.store(p.entries(), Relaxed);
        self.metrics.presence_rooms.store(p.rooms() as u64, Relaxed);
    }

    /// As a room's owner: a page of its present users.
    fn query(&self, ch: &str, limit: usize, after: Option<&str>) -> PresencePage {
        match &self.presence {
            Some((p, _)) => p.borrow().query(ch, limit, after),
            None => PresencePage::default(),
        }
    }

    /// As a channel's owner: a page of its history.
    fn page(&self, ch: &str, limit: usize, before: Option<u64>) -> Page {
        match &self.history {
            Some(h) => {
                let p = h.borrow_mut().page(ch, limit, before, self.now_ms());
                self.gauge(&h.borrow());
                p
            }
            None => Page::unavailable(),
        }
    }

    /// This shard's answer to an online query: a subscriber of the user's
    /// own channel is a connection of the user.
    fn holds(&self, user_ch: &str) -> bool {
        self.probe.borrow().as_ref().is_some_and(|p| p(user_ch))
    }

    /// Asks every other shard `ask(q)` for gather `g`; answers at once
    /// when there is no other shard.
    fn gather(&self, g: Gather, ask: impl Fn(u64) -> MeshMsg, now: &mut Vec<Event>) {
        let peers = self.outboxes.iter().flatten().count();
        let q = self.next_query.get() + 1;
        self.next_query.set(q);
        if peers == 0 {
            return now.push(g.answer());
        }
        self.gathers
            .borrow_mut()
            .insert(q, Gather { left: peers, ..g });
        for peer in 0..self.outboxes.len() {
            if peer != self.me {
                self.send_control(peer, ask(q));
            }
        }
    }

    /// One shard's answer to gather `q`; the last one answers the caller.
    fn gathered(&self, q: u64, part: Part, now: &mut Vec<Event>) {
        let mut pending = self.gathers.borrow_mut();
        let Some(g) = pending.get_mut(&q) else { return };
        g.left -= 1;
        match (&mut g.what, part) {
            (Gathering::Online { found, .. }, Part::Online(f)) => *found |= f,
            (Gathering::Rooms { lists, .. }, Part::Rooms(l)) => lists.push(l),
            _ => {}
        }
        if g.left == 0
            && let Some(g) = pending.remove(&q)
        {
            now.push(g.answer());
        }
    }

    /// As the channel's owner: stores `env` (stamping its `seq`, unless
    /// `key` names a publish stored already), then sequences it.
    fn store(
        &self,
        env: Envelope,
        key: Option<&str>,
        now: &mut Vec<Event>,
    ) -> Result<Option<Stored>, Refused> {
        let (stored, env) = match (&self.history, env.ch.clone()) {
            (Some(h), Some(ch)) => {
                let (s, env) = h.borrow_mut().append(&ch, env, key, self.now_ms());
                self.gauge(&h.borrow());
                let Some(env) = env else {
                    self.metrics.history_duplicates.fetch_add(1, Relaxed);
                    return Ok(Some(s));
                };
                (Some(s), env)
            }
            _ => (None, Arc::new(env)),
        };
        if self.sequence(env, now) {
            Ok(stored)
        } else {
            Err(Refused::OVERLOADED)
        }
    }

    /// As the channel's owner: the position of `ch`, the replay, and
    /// (with `present`) its present count.
    fn recover(&self, ch: &str, since: Option<&Since>, present: bool) -> Recovery {
        let mut r = match &self.history {
            Some(h) => {
                let r = h.borrow_mut().recover(ch, since, self.now_ms());
                self.gauge(&h.borrow());
                r
            }
            None => Recovery::unavailable(since),
        };
        if present && let Some((p, _)) = &self.presence {
            r.present = Some(p.borrow().count(ch));
        }
        r
    }

    fn gauge(&self, h: &HistoryStore) {
        self.metrics.history_bytes.store(h.bytes() as u64, Relaxed);
        self.metrics
            .history_channels
            .store(h.channels() as u64, Relaxed);
        self.metrics.history_evicted.store(h.evicted(), Relaxed);
    }

    /// Handles one message from another shard; events for this shard go
    /// to `now`.
    fn on_mesh(&self, m: MeshMsg, now: &mut Vec<Event>) {
        match m {
            MeshMsg::Route(m) => {
                let (env, ack, key) = *m;
                let r = self.store(env, key.as_deref(), now);
                self.answer(ack.shard, MeshMsg::Stored(Box::new((ack, r))));
            }
            MeshMsg::Send(m) => {
                let (env, ack) = *m;
                self.sequence(Arc::new(env), now);
                self.answer(ack.shard, MeshMsg::Sent(Box::new((ack, Ok(())))));
            }
            MeshMsg::Deliver(env) => now.push(Event::Deliver(env)),
            MeshMsg::Stored(m) => {
                let (ack, r) = *m;
                now.push(Event::Published(ack, r))
            }
            MeshMsg::Sent(m) => {
                let (ack, r) = *m;
                now.push(Event::Sent(ack, r))
            }
            MeshMsg::Recover(m) => {
                let (ch, since, present, ack) = *m;
                let r = self.recover(&ch, since.as_ref(), present);
                self.answer(ack.shard, MeshMsg::Recovered(Box::new((ack, r))));
            }
            MeshMsg::Recovered(m) => {
                let (ack, r) = *m;
                now.push(Event::History(ack, r))
            }
            MeshMsg::Present(m) => self.on_present(&m.0, &m.1, m.2),
            MeshMsg::Watch(m) => self.on_watch(&m.0, m.1, m.2),
            MeshMsg::Members(env) => now.push(Event::Members(env)),
            MeshMsg::Query(m) => {
                let (ch, limit, after, ack) = *m;
                let page = self.query(&ch, limit, after.as_deref());
                self.answer(ack.shard, MeshMsg::Queried(Box::new((ack, page))));
            }
            MeshMsg::Queried(m) => {
                let (ack, page) = *m;
                now.push(Event::Presence(ack, Ok(page)))
            }
            MeshMsg::Online(m) => {
                let (user_ch, q, asker) = *m;
                let found = self.holds(&user_ch);
                self.answer(asker, MeshMsg::OnlineIs(q, found));
            }
            MeshMsg::OnlineIs(q, found) => self.gathered(q, Part::Online(found), now),
            MeshMsg::Rooms(m) => {
                let (prefix, after, limit, q, asker) = *m;
                let rooms = self.rooms_after(&prefix, after.as_deref(), limit);
                self.answer(asker, MeshMsg::RoomsAre(Box::new((q, rooms))));
            }
            MeshMsg::RoomsAre(m) => {
                let (q, rooms) = *m;
                self.gathered(q, Part::Rooms(rooms), now)
            }
            MeshMsg::PageOf(m) => {
                let (ch, limit, before, ack) = *m;
                let page = self.page(&ch, limit, before);
                self.answer(ack.shard, MeshMsg::Paged(Box::new((ack, page))));
            }
            MeshMsg::Paged(m) => {
                let (ack, page) = *m;
                now.push(Event::Page(ack, Ok(page)))
            }
        }
    }

    /// Sends an answer to the shard that asked (the asker waits for it: a
    /// full outbox delays it, never loses it).
    fn answer(&self, shard: usize, m: MeshMsg) {
        self.send_control(shard, m);
    }

    /// The owner of `ch`, or `None` when it is this shard.
    fn remote_owner(&self, ch: &str) -> Option<usize> {
        let o = owner(ch, self.outboxes.len());
        (o != self.me).then_some(o)
    }

    /// As the channel's owner: hands `env` to every other shard and
    /// delivers it here, in the order this shard sees it. False when some
    /// shard could not take it (its outbox is full).
    fn sequence(&self, env: Arc<Envelope>, now: &mut Vec<Event>) -> bool {
        let mut full = 0;
        for tx in self.outboxes.iter().flatten() {
            if !matches!(offer(tx, MeshMsg::Deliver(env.clone())), Offer::Taken) {
                full += 1;
            }
        }
        if full > 0 {
            self.metrics.drops_mesh_full.fetch_add(full, Relaxed);
        }
        now.push(Event::Deliver(env));
        full == 0
    }
}

/// A question every shard answers, in flight.
struct Gather {
    /// Shards yet to answer.
    left: usize,
    ack: Ack,
    what: Gathering,
}

/// What a gather collects.
enum Gathering {
    /// Whether any shard holds a connection of `user`.
    Online { user: String, found: bool },
    /// Every shard's rooms (this shard's first), for a page of `limit`.
    Rooms {
        lists: Vec<Vec<(String, u64)>>,
        limit: usize,
    },
}

/// One shard's part of a gather.
enum Part {
    Online(bool),
    Rooms(Vec<(String, u64)>),
}

impl Gather {
    fn new(ack: Ack, what: Gathering) -> Gather {
        Gather { left: 0, ack, what }
    }

    /// The answer, once every shard gave its part.
    fn answer(self) -> Event {
        match self.what {
            Gathering::Online { user, found } => {
                Event::Presence(self.ack, Ok(online_page(&user, found)))
            }
            Gathering::Rooms { lists, limit } => {
                Event::Channels(self.ack, Ok(RoomsPage::merge(lists, limit)))
            }
        }
    }
}

impl Embedded {
    /// As a shard that owns rooms: its rooms with someone present.
    fn rooms_after(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<(String, u64)> {
        match &self.presence {
            Some((p, _)) => p.borrow().rooms_after(prefix, after, limit),
            None => Vec::new(),
        }
    }
}

impl Backbone for Embedded {
    fn start(self: Rc<Self>, sink: Sink, probe: Probe) {
        *self.probe.borrow_mut() = Some(probe);
        let sink = Rc::new(sink);
        if let Some((_, flush_ms)) = &self.presence {
            // The owner's presence batches.
            let (me, sink, every) = (self.clone(), sink.clone(), *flush_ms);
            glommio::spawn_local(async move {
                loop {
                    glommio::timer::sleep(std::time::Duration::from_millis(every)).await;
                    me.flush_presence(&sink);
                }
            })
            .detach();
        }
        // Control messages that waited for a full outbox: sent as soon as
        // the forwarders make room, not on some later tick.
        let (wake, woken) = local_channel::new_bounded::<()>(1);
        let _ = wake.try_send(());
        *self.backlog_wake.borrow_mut() = Some(wake);
        let me = self.clone();
        glommio::spawn_local(async move {
            while woken.recv().await.is_some() {
                while !me.drain_backlog() {
                    glommio::timer::sleep(BACKLOG_RETRY).await;
                }
            }
        })
        .detach();
        let Some(mut receivers) = self.receivers.borrow_mut().take() else {
            return;
        };
        for (_, rx) in receivers.streams() {
            let (sink, me) = (sink.clone(), self.clone());
            glommio::spawn_local(async move {
                let mut now = Vec::new();
                while let Some(m) = rx.recv().await {
                    me.on_mesh(m, &mut now);
                    for ev in now.drain(..) {
                        sink(ev);
                    }
                }
            })
            .detach();
        }
    }

    fn publish(&self, msg: Publish<'_>, ack: Ack, now: &mut Vec<Event>) {
        let mut env = Envelope::new(Type::Msg);
        env.ch = Some(msg.ch.to_owned());
        env.id = msg.id;
        env.from = Some(msg.from.to_owned());
        env.payload = msg.payload;
        if msg.ephemeral {
            // The owner's fan-out, but not its store: no seq, no history.
            env.meta = Some(EPHEMERAL_META.to_owned());
            match self.remote_owner(msg.ch) {
                Some(peer) => {
                    if !self.send(peer, MeshMsg::Send(Box::new((env, ack)))) {
                        now.push(Event::Sent(ack, Err(Refused::OVERLOADED)));
                    }
                }
                None => {
                    // Some shards may miss it: ephemeral messages may be
                    // dropped (counted as mesh drops).
                    self.sequence(Arc::new(env), now);
                    now.push(Event::Sent(ack, Ok(())));
                }
            }
            return;
        }
        match self.remote_owner(msg.ch) {
            Some(peer) => {
                // The owner answers with MeshMsg::Stored once it stored it.
                if !self.send(peer, MeshMsg::Route(Box::new((env, ack, msg.key)))) {
                    now.push(Event::Published(ack, Err(Refused::OVERLOADED)));
                }
            }
            None => {
                let r = self.store(env, msg.key.as_deref(), now);
                now.push(Event::Published(ack, r));
            }
        }
    }

    fn history(
        &self,
        ch: &str,
        since: Option<Since>,
        present: bool,
        ack: Ack,
        now: &mut Vec<Event>,
    ) {
        match self.remote_owner(ch) {
            // The answer comes behind every delivery the owner sent before
            // it (the mesh keeps each pair of shards in order).
            Some(peer) => {
                let m = MeshMsg::Recover(Box::new((ch.to_owned(), since.clone(), present, ack)));
                if !self.send(peer, m) {
                    now.push(Event::History(ack, Recovery::unavailable(since.as_ref())));
                }
            }
            None => now.push(Event::History(
                ack,
                self.recover(ch, since.as_ref(), present),
            )),
        }
    }

    fn present(&self, ch: &str, user: &str, delta: i32) {
        match self.remote_owner(ch) {
            Some(peer) => self.send_control(
                peer,
                MeshMsg::Present(Box::new((ch.to_owned(), user.to_owned(), delta))),
            ),
            None => self.on_present(ch, user, delta),
        }
    }

    fn watch(&self, ch: &str, on: bool) {
        match self.remote_owner(ch) {
            Some(peer) => {
                self.send_control(peer, MeshMsg::Watch(Box::new((ch.to_owned(), self.me, on))))
            }
            None => self.on_watch(ch, self.me, on),
        }
    }

    fn presence_query(
        &self,
        ch: &str,
        limit: usize,
        after: Option<&str>,
        ack: Ack,
        now: &mut Vec<Event>,
    ) {
        if let Some(user) = ch.strip_prefix("user:") {
            // Online anywhere: every shard looks at its own connections.
            if self.holds(ch) {
                return now.push(Event::Presence(ack, Ok(online_page(user, true))));
            }
            let g = Gather::new(
                ack,
                Gathering::Online {
                    user: user.to_owned(),
                    found: false,
                },
            );
            let me = self.me;
            return self.gather(
                g,
                |q| MeshMsg::Online(Box::new((ch.to_owned(), q, me))),
                now,
            );
        }
        match self.remote_owner(ch) {
            Some(peer) => {
                let m = MeshMsg::Query(Box::new((
                    ch.to_owned(),
                    limit,
                    after.map(str::to_owned),
                    ack,
                )));
                if !self.send(peer, m) {
                    now.push(Event::Presence(ack, Err(Refused::OVERLOADED)));
                }
            }
            None => now.push(Event::Presence(ack, Ok(self.query(ch, limit, after)))),
        }
    }

    fn channels(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        ack: Ack,
        now: &mut Vec<Event>,
    ) {
        let mine = self.rooms_after(prefix, after, limit);
        let g = Gather::new(
            ack,
            Gathering::Rooms {
                lists: vec![mine],
                limit,
            },
        );
        let me = self.me;
        let (prefix, after) = (prefix.to_owned(), after.map(str::to_owned));
        self.gather(
            g,
            |q| MeshMsg::Rooms(Box::new((prefix.clone(), after.clone(), limit, q, me))),
            now,
        );
    }

    fn history_page(
        &self,
        ch: &str,
        limit: usize,
        before: Option<u64>,
        ack: Ack,
        now: &mut Vec<Event>,
    ) {
        match self.remote_owner(ch) {
            Some(peer) => {
                if !self.send(
                    peer,
                    MeshMsg::PageOf(Box::new((ch.to_owned(), limit, before, ack))),
                ) {
                    now.push(Event::Page(ack, Err(Refused::OVERLOADED)));
                }
            }
            None => now.push(Event::Page(ack, Ok(self.page(ch, limit, before)))),
        }
    }

    fn request(&self, req: Request<'_>, ack: Ack, now: &mut Vec<Event>) {
        let r = embedded_service(req.service, req.payload);
        now.push(Request::outcome(req.ask, ack, r));
    }

    fn interest(&self, _ch: &str, _on: bool, ack: Option<Ack>, now: &mut Vec<Event>) {
        // Every shard hears every channel's owner: live at once.
        if let Some(ack) = ack {
            now.push(Event::SubReady(ack));
        }
    }

    fn presence(&self, user: &str, delta: i32) {
        if let Some(tx) = &self.reports.users {
            let _ = tx.send((user.to_owned(), delta));
        }
    }

    fn is_up(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The mesh's rings hold messages by value: each slot of every peer
    /// pair's channels is this big once traffic has gone round them.
    #[test]
    fn mesh_messages_are_small() {
        assert_eq!(std::mem::size_of::<super::MeshMsg>(), 16);
    }

    /// Control messages (answers among them) that find the outbox full
    /// wait, and leave in order as soon as the forwarder makes room: not
    /// on a presence tick (none here: presence is off), which once a
    /// second sent at most one outbox of them.
    #[test]
    fn a_backlog_leaves_as_the_outbox_makes_room() {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(256 << 10)
            .spawn(|| async {
                let slot: Rc<RefCell<Option<local_channel::LocalReceiver<MeshMsg>>>> =
                    Rc::default();
                let s = slot.clone();
                let e = Rc::new(Embedded::detached(
                    2,
                    0,
                    Arc::new(ShardMetrics::default()),
                    move |_, rx| *s.borrow_mut() = Some(rx),
                ));
                e.clone().start(Box::new(|_| {}), Box::new(|_| false));
                let n = MESH_OUTBOX as u64 + 100;
                for q in 0..n {
                    e.send_control(1, MeshMsg::OnlineIs(q, true));
                }
                assert_eq!(e.backlog.borrow()[1].len(), 100, "the outbox is full");
                let Some(rx) = slot.borrow_mut().take() else {
                    panic!("no forwarder end")
                };
                // The forwarder takes them as the peer would.
                let got = glommio::timer::timeout(Duration::from_secs(5), async {
                    for want in 0..n {
                        match rx.recv().await {
                            Some(MeshMsg::OnlineIs(q, _)) => assert_eq!(q, want, "in order"),
                            _ => panic!("not the message sent"),
                        }
                    }
                    Ok::<(), glommio::GlommioError<()>>(())
                })
                .await;
                assert!(got.is_ok(), "the backlog did not follow the outbox");
                assert!(e.backlog.borrow()[1].is_empty());
            })
            .expect("executor");
        ex.join().expect("test executor");
    }
}
