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
use crate::backbone::presence::{PresencePage, PresenceStore, RoomsPage, Transition, online_page};
use crate::backbone::{Event, Refused};
use crate::events::UserCounts;
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
    ) -> Rc<Self> {
        Rc::new(ClusterPresence {
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
        let restarted = {
            let mut peers = self.peers.borrow_mut();
            let p = peers.entry(b.n.clone()).or_insert(Peer {
                inc: b.i,
                seen: Instant::now(),
            });
            p.seen = Instant::now();
            let restarted = p.inc != b.i;
            p.inc = b.i;
            restarted
        };
        if restarted {
            // What the old incarnation held is gone with it.
            self.drop_node(&b.n);
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
    fn reap(&self) {
        let now = Instant::now();
        let since = self.up_since.get();
        let dead: Vec<String> = self
            .peers
            .borrow()
            .iter()
            .filter(|(_, p)| now.duration_since(p.seen.max(since)) >= self.ttl)
            .map(|(n, _)| n.clone())
            .collect();
        for n in dead {
            warn!(node = %n, "backbone: no presence heartbeat from a node for node_ttl_ms: its users leave");
            self.peers.borrow_mut().remove(&n);
            self.drop_node(&n);
        }
        self.state
            .presence_nodes
            .store(self.peers.borrow().len() as u64 + 1, Relaxed);
    }

    /// Removes every set of node `n` from the views.
    fn drop_node(&self, n: &str) {
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
        let (users, s) = match ch.strip_prefix("user:") {
            Some(u) => {
                let on = self.online.borrow().get(u) > 0;
                (if on { vec![u.to_owned()] } else { Vec::new() }, 0)
            }
            None => (
                self.local.borrow().users(ch),
                self.seqs.borrow().get(ch).copied().unwrap_or(0),
            ),
        };
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
    pub(super) async fn publish_changes(&self) {
        let out = std::mem::take(&mut *self.outgoing.borrow_mut());
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

    /// Re-syncs every view (after this node's NATS reconnect).
    fn resync_all(self: &Rc<Self>) {
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
