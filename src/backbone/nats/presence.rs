//! Cluster-wide presence over core NATS (docs/architecture.md, "Presence
//! across nodes"): who is present in a room on any node, `members` for the
//! room's watchers everywhere, and the users of a node that died leaving
//! within `[presence] node_ttl_ms`.
//!
//! **Each node is the only writer of its own entries**, as in Phoenix's
//! tracker: a node's presence in a room is the set of its users subscribed
//! to it, and nobody else ever changes that set, so replicas never conflict
//! and need no merge beyond "node N's set is now S". What travels:
//!
//! * `P.pres.d.<kind>.<id>` — a node's changes in one room, batched
//!   (`{"n": node, "i": incarnation, "s": seq, "j": [users], "l": [users]}`),
//!   published whether or not anyone listens (no subscriber: NATS drops it
//!   at once). `s` counts that node's deltas for that room from 1, anew each
//!   time its set becomes non-empty, so a receiver sees a lost delta as a
//!   jump and a fresh start as `s = 1`.
//! * `P.pres.s.<kind>.<id>` — a sync request (reply inbox): every node
//!   answers with its whole set for the room (`"u"`) and its current `s`.
//!   Asked when a node begins to keep a room's view, when it finds a gap,
//!   after a NATS reconnect, and for a one-off query of a room it does not
//!   keep (for `user:<id>`: every node says whether it holds that user).
//! * `P.pres.hb` — every node's heartbeat every `node_ttl_ms / 3`; a node
//!   not heard from for `node_ttl_ms` (while this node was connected) is
//!   dead and its sets are dropped, which the watchers see as leaves. A
//!   heartbeat with `"r": true` says "I reconnected: what you hold of mine
//!   may be stale", and its receivers sync again.
//!
//! A node keeps **views** only of rooms it has watchers for (interest-based,
//! like its subscriptions): each view is every node's set, and their union
//! (with a count of nodes per user) in a [`PresenceStore`], which batches
//! the net changes for `members` every `flush_ms`. Memory is therefore the
//! node's own presence plus the views its watchers asked for.
//!
//! Why not a JetStream key-value bucket, the other engine at hand: a node's
//! death would still have to be detected by heartbeats (a per-key TTL
//! would need every key refreshed, one write per present user per room per
//! period), every join and leave would be a replicated stream write (on the
//! box measured, JetStream's own work is what saturates first), and presence
//! would need JetStream where everything else works on plain NATS. Core
//! NATS with owned sets, sequence numbers and sync on doubt gives the same
//! view with one message per batch of changes.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgegate_proto::Envelope;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::ShardTx;
use super::keeper::{Applied, Kept, KeyChange, ToKeeper};
use crate::backbone::presence::{PresencePage, PresenceStore, RoomsPage, Transition, online_page};
use crate::backbone::{Event, Refused};
use crate::events::{Bus, UserCounts};
use crate::metrics::BackboneStats;

/// How long a sync waits for the nodes it knows to answer.
const SYNC_WAIT: Duration = Duration::from_millis(400);

/// A node's changes in one room.
#[derive(Serialize, Deserialize, Debug, Default)]
struct Delta {
    /// Node.
    n: String,
    /// Its incarnation (process start).
    i: u64,
    /// Its delta count for the room.
    s: u64,
    /// Users that joined on it.
    #[serde(default)]
    j: Vec<String>,
    /// Users that left on it.
    #[serde(default)]
    l: Vec<String>,
}

/// A node's whole set for a room (the answer to a sync).
#[derive(Serialize, Deserialize, Debug, Default)]
struct Snapshot {
    n: String,
    i: u64,
    s: u64,
    #[serde(default)]
    u: Vec<String>,
}

/// A question for every node's rooms (the server API's `channels`).
#[derive(Serialize, Deserialize, Debug, Default)]
struct RoomsAsk {
    prefix: String,
    after: Option<String>,
    limit: usize,
}

/// A node's answer to [`RoomsAsk`].
#[derive(Serialize, Deserialize, Debug, Default)]
struct RoomsAre {
    n: String,
    r: Vec<(String, u64)>,
}

/// A heartbeat.
#[derive(Serialize, Deserialize, Debug, Default)]
struct Beat {
    n: String,
    i: u64,
    /// "I reconnected: sync what you hold of mine."
    #[serde(default)]
    r: bool,
}

/// What one node contributes to a view.
#[derive(Debug, Default)]
struct Contrib {
    inc: u64,
    seq: u64,
    users: BTreeSet<String>,
}

/// A room this node keeps a view of.
struct View {
    /// Node → its set (this node's own included, as `me`).
    contribs: HashMap<String, Contrib>,
    /// The first sync is done (counts may be given).
    ready: bool,
    waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// Watch requests from shards (the view lives while any). They reach
    /// the store (which batches `members` for them) once the view is
    /// ready: what the first sync finds was there before, not a join.
    watchers: Vec<u32>,
    /// The task holding the delta subscription.
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Users that joined and left on this node since the last delta.
type Changes = (Vec<String>, Vec<String>);

/// Another node as heard.
struct Peer {
    inc: u64,
    seen: Instant,
}

/// Cluster-wide presence, on the NATS thread.
pub(super) struct ClusterPresence {
    client: async_nats::Client,
    prefix: Rc<str>,
    me: Rc<str>,
    inc: u64,
    ttl: Duration,
    flush: Duration,
    shards: Rc<Vec<ShardTx>>,
    state: Arc<BackboneStats>,
    /// This node's own presence: (room, user) → shards holding it.
    local: RefCell<PresenceStore>,
    /// This node's delta count per room (while its set there is not empty).
    seqs: RefCell<HashMap<String, u64>>,
    /// Changes not yet published: room → (joined, left).
    outgoing: RefCell<HashMap<String, Changes>>,
    /// Users connected to this node (online anywhere), shared with the
    /// node's `info` and `user.*` events.
    online: Rc<RefCell<UserCounts>>,
    views: RefCell<HashMap<String, View>>,
    /// The union of the views: (room, user) → nodes holding it.
    cluster: RefCell<PresenceStore>,
    peers: RefCell<HashMap<String, Peer>>,
    /// Since when this node is connected (a peer is dead only if not heard
    /// from for `ttl` while this node could hear it).
    up_since: Cell<Instant>,
    /// The keys this node keeps the lifecycle events of (see `keeper`).
    kept: RefCell<Kept>,
    /// Lifecycle events to publish (`P.events.<event>`) and POST, in order.
    events: tokio::sync::mpsc::UnboundedSender<serde_json::Value>,
    events_rx: RefCell<Option<tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>>>,
    bus: Bus,
}

impl ClusterPresence {
    /// Cluster presence for node `me` (`[presence]` settings).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        client: async_nats::Client,
        prefix: Rc<str>,
        me: Rc<str>,
        cfg: &crate::config::Presence,
        shards: Rc<Vec<ShardTx>>,
        state: Arc<BackboneStats>,
        online: Rc<RefCell<UserCounts>>,
        bus: Bus,
    ) -> Rc<Self> {
        let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
        Rc::new(ClusterPresence {
            kept: RefCell::new(Kept::new()),
            events,
            events_rx: RefCell::new(Some(events_rx)),
            bus,
            client,
            prefix,
            me,
            inc: crate::auth::unix_ms(),
            ttl: Duration::from_millis(cfg.node_ttl_ms),
            flush: Duration::from_millis(cfg.flush_ms),
            shards,
            state,
            local: RefCell::new(PresenceStore::new(usize::MAX)),
            seqs: RefCell::new(HashMap::new()),
            outgoing: RefCell::new(HashMap::new()),
            online,
            views: RefCell::new(HashMap::new()),
            cluster: RefCell::new(PresenceStore::new(cfg.diff_limit)),
            peers: RefCell::new(HashMap::new()),
            up_since: Cell::new(Instant::now()),
        })
    }

    /// `P.pres.<rest>`.
    fn subject(&self, rest: &str) -> String {
        format!("{}.pres.{rest}", self.prefix)
    }

    /// `kind.id` of a channel (`room:x` → `room.x`).
    fn key(ch: &str) -> Option<String> {
        let (kind, id) = ch.split_once(':')?;
        Some(format!("{kind}.{id}"))
    }

    /// Starts the heartbeat, the sync responder, the flush and the reaper.
    pub(super) fn start(self: &Rc<Self>, mut reconnected: tokio::sync::watch::Receiver<u64>) {
        // Lifecycle events out, in the order they happened.
        if let Some(mut rx) = self.events_rx.borrow_mut().take() {
            let (client, prefix, bus) =
                (self.client.clone(), self.prefix.clone(), self.bus.clone());
            tokio::task::spawn_local(async move {
                while let Some(ev) = rx.recv().await {
                    let name = ev["event"].as_str().unwrap_or("unknown");
                    let subject = format!("{prefix}.events.{name}");
                    let _ = client.publish(subject, ev.to_string().into()).await;
                    bus.emit(ev);
                }
            });
        }
        // Other nodes' changes of the keys this node keeps.
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let subject = me.subject(&format!("k.{}", me.me));
            let Ok(mut sub) = me.client.subscribe(subject).await else {
                return warn!("backbone: cannot subscribe to presence changes for this keeper");
            };
            while let Some(m) = sub.next().await {
                if let Ok(k) = serde_json::from_slice::<ToKeeper>(&m.payload) {
                    me.to_keeper(k);
                }
            }
        });
        // Heartbeats in, and peers' reconnects.
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let Ok(mut sub) = me.client.subscribe(me.subject("hb")).await else {
                return warn!("backbone: cannot subscribe to presence heartbeats");
            };
            while let Some(m) = sub.next().await {
                if let Ok(b) = serde_json::from_slice::<Beat>(&m.payload) {
                    me.on_beat(b);
                }
            }
        });
        // Sync requests: every node answers with its own set.
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let Ok(mut sub) = me.client.subscribe(me.subject("s.>")).await else {
                return warn!("backbone: cannot subscribe to presence syncs");
            };
            let cut = me.subject("s.");
            while let Some(m) = sub.next().await {
                let (Some(reply), Some(key)) = (m.reply, m.subject.as_str().strip_prefix(&cut))
                else {
                    continue;
                };
                let Some((kind, id)) = key.split_once('.') else {
                    continue;
                };
                let body = me.snapshot(&format!("{kind}:{id}"));
                let _ = me.client.publish(reply, body).await;
            }
        });
        // Room listings: every node answers with its own rooms.
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let Ok(mut sub) = me.client.subscribe(me.subject("rooms")).await else {
                return warn!("backbone: cannot subscribe to presence room listings");
            };
            while let Some(m) = sub.next().await {
                let (Some(reply), Ok(ask)) =
                    (m.reply, serde_json::from_slice::<RoomsAsk>(&m.payload))
                else {
                    continue;
                };
                let limit = ask.limit.min(super::super::presence::QUERY_LIMIT_MAX);
                let r = me
                    .local
                    .borrow()
                    .rooms_after(&ask.prefix, ask.after.as_deref(), limit);
                let body = RoomsAre {
                    n: me.me.to_string(),
                    r,
                };
                if let Ok(b) = serde_json::to_vec(&body) {
                    let _ = me.client.publish(reply, b.into()).await;
                }
            }
        });
        // Heartbeats out, the reaper, and (after a reconnect) resyncs.
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(me.ttl / 3);
            reconnected.mark_unchanged();
            loop {
                let again = tokio::select! {
                    _ = tick.tick() => false,
                    r = reconnected.changed() => {
                        if r.is_err() { return; }
                        true
                    }
                };
                if again {
                    me.up_since.set(Instant::now());
                    me.resync_all();
                }
                me.beat(again).await;
                me.reap();
            }
        });
        // Batches for the watchers.
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(me.flush);
            loop {
                tick.tick().await;
                me.flush_members();
            }
        });
    }

    async fn beat(&self, reconnected: bool) {
        let b = Beat {
            n: self.me.to_string(),
            i: self.inc,
            r: reconnected,
        };
        if let Ok(body) = serde_json::to_vec(&b) {
            let _ = self.client.publish(self.subject("hb"), body.into()).await;
        }
    }

    fn on_beat(self: &Rc<Self>, b: Beat) {
        if *b.n == *self.me {
            return;
        }
        let (new, restarted) = {
            let mut peers = self.peers.borrow_mut();
            let new = !peers.contains_key(&b.n);
            let p = peers.entry(b.n.clone()).or_insert(Peer {
                inc: b.i,
                seen: Instant::now(),
            });
            p.seen = Instant::now();
            let restarted = p.inc != b.i;
            p.inc = b.i;
            (new, restarted)
        };
        if restarted {
            // What the old incarnation held is gone with it.
            self.drop_node(&b.n);
        }
        if new {
            // Answer at once, so that it knows this node (and the keepers
            // it computes agree with ours) without waiting for our beat.
            let me = self.clone();
            tokio::task::spawn_local(async move { me.beat(false).await });
        }
        if new || restarted || b.r {
            self.members_changed();
        }
        if b.r || restarted {
            let rooms: Vec<String> = self
                .views
                .borrow()
                .iter()
                .filter(|(_, v)| v.contribs.contains_key(&b.n))
                .map(|(r, _)| r.clone())
                .collect();
            for room in rooms {
                self.sync(room);
            }
        }
    }

    /// Drops the peers not heard from for `ttl` while this node was up.
    fn reap(self: &Rc<Self>) {
        let now = Instant::now();
        let since = self.up_since.get();
        let dead: Vec<String> = self
            .peers
            .borrow()
            .iter()
            .filter(|(_, p)| now.duration_since(p.seen.max(since)) >= self.ttl)
            .map(|(n, _)| n.clone())
            .collect();
        let changed = !dead.is_empty();
        for n in dead {
            warn!(node = %n, "backbone: no presence heartbeat from a node for node_ttl_ms: its users leave");
            self.peers.borrow_mut().remove(&n);
            self.drop_node(&n);
        }
        if changed {
            self.members_changed();
        }
        self.state
            .presence_nodes
            .store(self.peers.borrow().len() as u64 + 1, Relaxed);
    }

    /// Removes every set of node `n` from the views and the kept keys.
    fn drop_node(&self, n: &str) {
        let mut out = Vec::new();
        self.kept.borrow_mut().drop_node(n, &mut out);
        self.emit(out);
        let mut views = self.views.borrow_mut();
        let mut cluster = self.cluster.borrow_mut();
        for (room, v) in views.iter_mut() {
            if let Some(c) = v.contribs.remove(n) {
                for u in &c.users {
                    cluster.change(room, u, -1);
                }
            }
        }
    }

    /// This node's answer to a sync of `ch`.
    fn snapshot(&self, ch: &str) -> Bytes {
        // `user:<id>` is in the local store too (see `on_online`).
        let (users, s) = (
            self.local.borrow().users(ch),
            self.seqs.borrow().get(ch).copied().unwrap_or(0),
        );
        let snap = Snapshot {
            n: self.me.to_string(),
            i: self.inc,
            s,
            u: users,
        };
        serde_json::to_vec(&snap)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    /// `user` came online on this node (their first connection) or went
    /// offline (their last): tracked as presence in `user:<id>`, so the
    /// user's keeper emits `user.online` / `user.offline` once for the
    /// cluster.
    pub(super) fn on_online(&self, user: &str, online: bool) {
        self.on_local(&format!("user:{user}"), user, if online { 1 } else { -1 });
    }

    /// A shard's count of `user` in room `ch` moved by `delta`.
    pub(super) fn on_local(&self, ch: &str, user: &str, delta: i32) {
        let t = self.local.borrow_mut().change(ch, user, delta);
        if t == Transition::None {
            return;
        }
        let joined = t == Transition::Joined;
        {
            let mut out = self.outgoing.borrow_mut();
            let (j, l) = out.entry(ch.to_owned()).or_default();
            // A change that undoes one not yet published cancels it.
            let (undo, add) = if joined { (l, j) } else { (j, l) };
            match undo.iter().position(|u| u == user) {
                Some(i) => {
                    undo.swap_remove(i);
                }
                None => add.push(user.to_owned()),
            }
        }
        // This node's own part of its view changes at once (a count asked
        // next must see it).
        let mut views = self.views.borrow_mut();
        if let Some(v) = views.get_mut(ch) {
            let c = v.contribs.entry(self.me.to_string()).or_default();
            let changed = if joined {
                c.users.insert(user.to_owned())
            } else {
                c.users.remove(user)
            };
            if changed {
                self.cluster
                    .borrow_mut()
                    .change(ch, user, if joined { 1 } else { -1 });
            }
        }
        let local = self.local.borrow();
        self.state.presence_entries.store(local.entries(), Relaxed);
    }

    /// Publishes the changes of this batch of commands, one delta per room.
    pub(super) async fn publish_changes(self: &Rc<Self>) {
        let out = std::mem::take(&mut *self.outgoing.borrow_mut());
        let mut keepers: HashMap<Option<String>, Vec<KeyChange>> = HashMap::new();
        for (room, (j, l)) in out {
            if j.is_empty() && l.is_empty() {
                continue;
            }
            let Some(key) = Self::key(&room) else {
                continue;
            };
            let s = {
                let mut seqs = self.seqs.borrow_mut();
                let s = seqs.entry(room.clone()).or_insert(0);
                *s += 1;
                let s = *s;
                if self.local.borrow().count(&room) == 0 {
                    // Empty: the next delta starts a new count at 1.
                    seqs.remove(&room);
                }
                s
            };
            keepers
                .entry(self.keeper(&room))
                .or_default()
                .push(KeyChange {
                    c: room.clone(),
                    s,
                    j: j.clone(),
                    l: l.clone(),
                    u: None,
                });
            if room.starts_with("user:") {
                continue; // nobody watches who is online: no delta
            }
            let d = Delta {
                n: self.me.to_string(),
                i: self.inc,
                s,
                j,
                l,
            };
            if let Ok(body) = serde_json::to_vec(&d) {
                let _ = self
                    .client
                    .publish(self.subject(&format!("d.{key}")), body.into())
                    .await;
            }
        }
        self.send_to_keepers(keepers).await;
    }

    /// Sends each keeper its changes (this node's own taken at once).
    async fn send_to_keepers(self: &Rc<Self>, keepers: HashMap<Option<String>, Vec<KeyChange>>) {
        for (keeper, d) in keepers {
            let k = ToKeeper {
                n: self.me.to_string(),
                i: self.inc,
                d,
            };
            match keeper {
                None => self.to_keeper(k),
                Some(node) => {
                    if let Ok(body) = serde_json::to_vec(&k) {
                        let subject = self.subject(&format!("k.{node}"));
                        let _ = self.client.publish(subject, body.into()).await;
                    }
                }
            }
        }
    }

    /// A node's changes of keys this node keeps; those of keys another
    /// node keeps by this node's view of the cluster are not taken (their
    /// sender claims them to that node once it sees the cluster as this
    /// node does).
    fn to_keeper(self: &Rc<Self>, k: ToKeeper) {
        let mut out = Vec::new();
        let mut gaps = Vec::new();
        {
            let mut kept = self.kept.borrow_mut();
            for ch in k.d {
                if self.keeper(&ch.c).is_some() {
                    continue;
                }
                let key = ch.c.clone();
                if kept.apply(&k.n, k.i, ch, &mut out) == Applied::Gap {
                    gaps.push(key);
                }
            }
            self.state.presence_kept.store(kept.len() as u64, Relaxed);
        }
        self.emit(out);
        for key in gaps {
            self.state.presence_gaps.fetch_add(1, Relaxed);
            let me = self.clone();
            tokio::task::spawn_local(async move {
                let snaps = me.gather(&key).await;
                let mut out = Vec::new();
                {
                    let mut kept = me.kept.borrow_mut();
                    for s in snaps {
                        kept.set(&s.n, s.i, &key, s.s, s.u, &mut out);
                    }
                }
                me.emit(out);
            });
        }
    }

    fn emit(&self, events: Vec<serde_json::Value>) {
        for ev in events {
            let _ = self.events.send(ev);
        }
    }

    /// The node that keeps the events of `ch` (`None`: this one): the
    /// highest-scoring node this node knows alive for it (rendezvous
    /// hashing: a node coming or going moves only its own share).
    fn keeper(&self, ch: &str) -> Option<String> {
        let score = |n: &str| {
            // FNV-1a: the same on every node and every build.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in n.bytes().chain([0]).chain(ch.bytes()) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            h
        };
        let peers = self.peers.borrow();
        let mine = (score(&self.me), &*self.me);
        peers
            .keys()
            .map(|n| (score(n), n.as_str()))
            .filter(|p| *p > mine)
            .max()
            .map(|(_, n)| n.to_owned())
    }

    /// The nodes alive changed (or one reconnected), so keepers move or
    /// may hold stale sets: this node gives up the keys another node keeps
    /// now, and claims every key it has users in to its keeper with its
    /// whole set.
    fn members_changed(self: &Rc<Self>) {
        self.kept
            .borrow_mut()
            .retain(|key| self.keeper(key).is_none());
        let mut keepers: HashMap<Option<String>, Vec<KeyChange>> = HashMap::new();
        {
            let local = self.local.borrow();
            let seqs = self.seqs.borrow();
            for key in local.names() {
                let users = local.users(&key);
                let s = seqs.get(&key).copied().unwrap_or(0);
                keepers
                    .entry(self.keeper(&key))
                    .or_default()
                    .push(KeyChange {
                        c: key,
                        s,
                        u: Some(users),
                        ..KeyChange::default()
                    });
            }
        }
        let me = self.clone();
        tokio::task::spawn_local(async move { me.send_to_keepers(keepers).await });
    }

    /// A shard begins (`on`) or stops watching room `ch`.
    pub(super) fn watch(self: &Rc<Self>, ch: &str, shard: usize, on: bool) {
        let shard = shard as u32;
        if on {
            let new = {
                let mut views = self.views.borrow_mut();
                match views.get_mut(ch) {
                    Some(v) => {
                        v.watchers.push(shard);
                        if v.ready {
                            self.cluster.borrow_mut().watch(ch, shard, true);
                        }
                        false
                    }
                    None => {
                        views.insert(
                            ch.to_owned(),
                            View {
                                contribs: HashMap::new(),
                                ready: false,
                                waiters: Vec::new(),
                                watchers: vec![shard],
                                task: None,
                            },
                        );
                        true
                    }
                }
            };
            if new {
                self.open_view(ch);
            }
        } else {
            let closed = {
                let mut views = self.views.borrow_mut();
                let close = views.get_mut(ch).is_some_and(|v| {
                    if let Some(i) = v.watchers.iter().position(|&w| w == shard) {
                        v.watchers.swap_remove(i);
                        if v.ready {
                            self.cluster.borrow_mut().watch(ch, shard, false);
                        }
                    }
                    v.watchers.is_empty()
                });
                if close { views.remove(ch) } else { None }
            };
            if let Some(v) = closed {
                if let Some(t) = v.task {
                    t.abort();
                }
                let mut cluster = self.cluster.borrow_mut();
                for c in v.contribs.values() {
                    for u in &c.users {
                        cluster.change(ch, u, -1);
                    }
                }
            }
        }
        self.state
            .presence_views
            .store(self.views.borrow().len() as u64, Relaxed);
    }

    /// Starts keeping a view of `ch`: this node's own set at once, the
    /// others' deltas from now on, and their sets by a sync.
    fn open_view(self: &Rc<Self>, ch: &str) {
        let mine: Vec<String> = self.local.borrow().users(ch);
        {
            let mut views = self.views.borrow_mut();
            let Some(v) = views.get_mut(ch) else { return };
            let c = v.contribs.entry(self.me.to_string()).or_default();
            let mut cluster = self.cluster.borrow_mut();
            for u in mine {
                if c.users.insert(u.clone()) {
                    cluster.change(ch, &u, 1);
                }
            }
        }
        let Some(key) = Self::key(ch) else { return };
        let me = self.clone();
        let room = ch.to_owned();
        let task = tokio::task::spawn_local(async move {
            let Ok(mut sub) = me.client.subscribe(me.subject(&format!("d.{key}"))).await else {
                warn!(room, "backbone: cannot subscribe to presence deltas");
                return me.set_ready(&room);
            };
            // The SUB is in place before the sync asks: a change after the
            // snapshots comes as a delta.
            let _ = me.client.flush().await;
            me.sync(room.clone());
            while let Some(m) = sub.next().await {
                if let Ok(d) = serde_json::from_slice::<Delta>(&m.payload) {
                    me.on_delta(&room, d);
                }
            }
        });
        if let Some(v) = self.views.borrow_mut().get_mut(ch) {
            v.task = Some(task);
        }
    }

    fn set_ready(&self, room: &str) {
        if let Some(v) = self.views.borrow_mut().get_mut(room)
            && !v.ready
        {
            v.ready = true;
            let mut cluster = self.cluster.borrow_mut();
            for &w in &v.watchers {
                cluster.watch(room, w, true);
            }
            for w in v.waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Waits until the view of `ch` had its first sync (at once without a
    /// view).
    pub(super) async fn ready(&self, ch: &str) {
        let rx = {
            let mut views = self.views.borrow_mut();
            match views.get_mut(ch) {
                Some(v) if !v.ready => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    v.waiters.push(tx);
                    rx
                }
                _ => return,
            }
        };
        let _ = tokio::time::timeout(SYNC_WAIT * 3, rx).await;
    }

    /// Users present in `ch` cluster-wide (its view).
    pub(super) fn count(&self, ch: &str) -> u64 {
        self.cluster.borrow().count(ch)
    }

    /// One node's delta for a room this node keeps a view of.
    fn on_delta(self: &Rc<Self>, room: &str, d: Delta) {
        if *d.n == *self.me {
            return; // applied when it was made
        }
        self.peers
            .borrow_mut()
            .entry(d.n.clone())
            .or_insert(Peer {
                inc: d.i,
                seen: Instant::now(),
            })
            .seen = Instant::now();
        let gap = {
            let mut views = self.views.borrow_mut();
            let Some(v) = views.get_mut(room) else { return };
            let mut cluster = self.cluster.borrow_mut();
            let fresh = d.s == 1;
            let c = v.contribs.entry(d.n.clone()).or_default();
            let in_order = c.inc == d.i && d.s == c.seq + 1;
            let stale = c.inc == d.i && d.s <= c.seq && !fresh;
            if stale {
                return;
            }
            if fresh && !in_order {
                // A new count: the node's set was empty before this delta.
                for u in std::mem::take(&mut c.users) {
                    cluster.change(room, &u, -1);
                }
            }
            if in_order || fresh {
                c.inc = d.i;
                c.seq = d.s;
                for u in d.j {
                    if c.users.insert(u.clone()) {
                        cluster.change(room, &u, 1);
                    }
                }
                for u in d.l {
                    if c.users.remove(&u) {
                        cluster.change(room, &u, -1);
                    }
                }
                false
            } else {
                true
            }
        };
        if gap {
            self.state.presence_gaps.fetch_add(1, Relaxed);
            debug!(room, node = %d.n, "backbone: presence delta gap; syncing");
            self.sync(room.to_owned());
        }
    }

    /// Asks every node for its set of `room` (in a task), and replaces
    /// each answering node's part of the view with its answer, unless a
    /// newer delta already moved it on.
    fn sync(self: &Rc<Self>, room: String) {
        let me = self.clone();
        self.state.presence_syncs.fetch_add(1, Relaxed);
        tokio::task::spawn_local(async move {
            let snaps = me.gather(&room).await;
            {
                let mut views = me.views.borrow_mut();
                if let Some(v) = views.get_mut(&room) {
                    let mut cluster = me.cluster.borrow_mut();
                    for s in snaps {
                        if *s.n == *me.me {
                            continue;
                        }
                        let c = v.contribs.entry(s.n.clone()).or_default();
                        if c.inc == s.i && c.seq > s.s {
                            continue; // a delta after the snapshot came first
                        }
                        let new: BTreeSet<String> = s.u.into_iter().collect();
                        for u in c.users.difference(&new) {
                            cluster.change(&room, u, -1);
                        }
                        for u in new.difference(&c.users) {
                            cluster.change(&room, u, 1);
                        }
                        c.users = new;
                        c.inc = s.i;
                        c.seq = s.s;
                    }
                }
            }
            me.set_ready(&room);
        });
    }

    /// Sends a sync request for `ch` and collects the answers of the other
    /// nodes this node knows (or what came within [`SYNC_WAIT`]).
    async fn gather(&self, ch: &str) -> Vec<Snapshot> {
        let Some(key) = Self::key(ch) else {
            return Vec::new();
        };
        let mut out: Vec<Snapshot> = Vec::new();
        for a in self
            .ask_all(&self.subject(&format!("s.{key}")), Bytes::new())
            .await
        {
            if let Ok(s) = serde_json::from_slice::<Snapshot>(&a)
                && *s.n != *self.me
                && !out.iter().any(|o| o.n == s.n)
            {
                out.push(s);
            }
        }
        out
    }

    /// Re-syncs every view and claims every key again (after this node's
    /// NATS reconnect: what it sent meanwhile may be lost).
    fn resync_all(self: &Rc<Self>) {
        self.members_changed();
        let rooms: Vec<String> = self.views.borrow().keys().cloned().collect();
        for room in rooms {
            self.sync(room);
        }
    }

    /// Sends the batches due to the watching shards.
    fn flush_members(&self) {
        let batches = self.cluster.borrow_mut().flush();
        for b in batches {
            if b.suppressed {
                self.state.members_suppressed.fetch_add(1, Relaxed);
            }
            let env: Arc<Envelope> = Arc::new(b.env);
            for shard in b.to {
                if let Some(tx) = self.shards.get(shard as usize)
                    && !tx.deliver(Event::Members(env.clone()))
                {
                    self.state.dropped.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// The cluster's rooms with someone present: every node's names, then
    /// each listed room's count asked as a presence query (a user on two
    /// nodes counts once).
    pub(super) async fn channels(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RoomsPage, Refused> {
        let ask = RoomsAsk {
            prefix: prefix.to_owned(),
            after: after.map(str::to_owned),
            limit,
        };
        let mut lists = vec![self.local.borrow().rooms_after(prefix, after, limit)];
        let body = serde_json::to_vec(&ask).map_err(|_| Refused::UNAVAILABLE)?;
        for a in self.ask_all(&self.subject("rooms"), body.into()).await {
            if let Ok(r) = serde_json::from_slice::<RoomsAre>(&a)
                && *r.n != *self.me
            {
                lists.push(r.r);
            }
        }
        let mut page = RoomsPage::merge(lists, limit);
        let counts = futures_util::future::join_all(
            page.rooms
                .iter()
                .map(|(ch, _)| async move { self.query(ch, 1, None).await.map(|p| p.total) }),
        )
        .await;
        for ((_, n), c) in page.rooms.iter_mut().zip(counts) {
            *n = c?;
        }
        Ok(page)
    }

    /// Publishes `body` on `subject` with a reply inbox and collects the
    /// answers of the nodes this node knows (or what came within
    /// [`SYNC_WAIT`]).
    async fn ask_all(&self, subject: &str, body: Bytes) -> Vec<Bytes> {
        // Itself answers too; knowing no peer yet (heartbeats not seen), wait
        // the whole time rather than take its own answer for the cluster's.
        let expect = match self.peers.borrow().len() {
            0 => usize::MAX,
            n => n + 1,
        };
        let inbox = self.client.new_inbox();
        let Ok(mut sub) = self.client.subscribe(inbox.clone()).await else {
            return Vec::new();
        };
        if self
            .client
            .publish_with_reply(subject.to_owned(), inbox, body)
            .await
            .is_err()
        {
            return Vec::new();
        }
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + SYNC_WAIT;
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
            out.push(m.payload);
            if out.len() >= expect {
                break;
            }
        }
        out
    }

    /// Who is present in `ch`: from the view when this node keeps one,
    /// otherwise asked of every node.
    pub(super) async fn query(
        &self,
        ch: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<PresencePage, Refused> {
        if let Some(user) = ch.strip_prefix("user:") {
            if self.online.borrow().get(user) > 0 {
                return Ok(online_page(user, true));
            }
            let found = self.gather(ch).await.iter().any(|s| !s.u.is_empty());
            return Ok(online_page(user, found));
        }
        let viewed = self.views.borrow().get(ch).is_some_and(|v| v.ready);
        if viewed {
            return Ok(self.cluster.borrow().query(ch, limit, after));
        }
        let mut once = PresenceStore::new(usize::MAX);
        for u in self.local.borrow().users(ch) {
            once.change(ch, &u, 1);
        }
        for s in self.gather(ch).await {
            for u in s.u {
                once.change(ch, &u, 1);
            }
        }
        Ok(once.query(ch, limit, after))
    }
}
