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

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use edgegate_proto::{Envelope, Type};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers};
use glommio::channels::local_channel::{self, LocalSender};

use super::history::{HistoryStore, Recovery, Since, Stored};
use super::{Ack, Backbone, Event, Publish, Refused, Request, Sink, embedded_service};
use crate::metrics::ShardMetrics;

/// What shards say to each other.
pub enum MeshMsg {
    /// To the channel's owner: store and sequence this message, fan it out,
    /// and answer the publisher (`ack`) with where it was stored.
    Route(Envelope, Ack, Option<String>),
    /// From the channel's owner: deliver to local subscribers.
    Deliver(Arc<Envelope>),
    /// From the channel's owner: where a routed publish was stored.
    Stored(Ack, Result<Option<Stored>, Refused>),
    /// To the channel's owner: the position of a channel (and, with
    /// `since`, the messages after it).
    Recover(String, Option<Since>, Ack),
    /// From the channel's owner: the answer to `Recover`.
    Recovered(Ack, Recovery),
}

/// The node's mesh, before the shards join it.
pub type Mesh = MeshBuilder<MeshMsg, Full>;

/// Capacity of each shard-to-shard channel.
pub const MESH_CHANNEL: usize = 4096;

/// Messages a shard may have waiting for one peer before publishers are
/// told the node is overloaded.
pub const MESH_OUTBOX: usize = 16 * 1024;

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
    /// Per-user connection changes for the node's counts (server API,
    /// webhooks), when something wants them.
    users: Option<crate::events::UserFeed>,
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
        users: Option<crate::events::UserFeed>,
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
        e.users = users;
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
        let outboxes = (0..shards)
            .map(|peer| {
                (peer != me).then(|| {
                    let (tx, rx) = local_channel::new_bounded(MESH_OUTBOX);
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
            users: None,
            start: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Sends `m` to `peer`'s shard; false when its outbox is full.
    fn send(&self, peer: usize, m: MeshMsg) -> bool {
        match self.outboxes.get(peer).and_then(Option::as_ref) {
            Some(tx) => tx.try_send(m).is_ok(),
            None => false,
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

    /// As the channel's owner: the position of `ch`, and the replay.
    fn recover(&self, ch: &str, since: Option<&Since>) -> Recovery {
        match &self.history {
            Some(h) => {
                let r = h.borrow_mut().recover(ch, since, self.now_ms());
                self.gauge(&h.borrow());
                r
            }
            None => Recovery::unavailable(since),
        }
    }

    fn gauge(&self, h: &HistoryStore) {
        self.metrics.history_bytes.store(h.bytes() as u64, Relaxed);
        self.metrics
            .history_channels
            .store(h.channels() as u64, Relaxed);
    }

    /// Handles one message from another shard; events for this shard go
    /// to `now`.
    fn on_mesh(&self, m: MeshMsg, now: &mut Vec<Event>) {
        match m {
            MeshMsg::Route(env, ack, key) => {
                let r = self.store(env, key.as_deref(), now);
                if !self.send(ack.shard, MeshMsg::Stored(ack, r)) {
                    self.metrics.drops_mesh_full.fetch_add(1, Relaxed);
                }
            }
            MeshMsg::Deliver(env) => now.push(Event::Deliver(env)),
            MeshMsg::Stored(ack, r) => now.push(Event::Published(ack, r)),
            MeshMsg::Recover(ch, since, ack) => {
                let r = self.recover(&ch, since.as_ref());
                if !self.send(ack.shard, MeshMsg::Recovered(ack, r)) {
                    self.metrics.drops_mesh_full.fetch_add(1, Relaxed);
                }
            }
            MeshMsg::Recovered(ack, r) => now.push(Event::History(ack, r)),
        }
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
            if tx.try_send(MeshMsg::Deliver(env.clone())).is_err() {
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

impl Backbone for Embedded {
    fn start(self: Rc<Self>, sink: Sink) {
        let Some(mut receivers) = self.receivers.borrow_mut().take() else {
            return;
        };
        let sink = Rc::new(sink);
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
        match self.remote_owner(msg.ch) {
            Some(peer) => {
                // The owner answers with MeshMsg::Stored once it stored it.
                if !self.send(peer, MeshMsg::Route(env, ack, msg.key)) {
                    now.push(Event::Published(ack, Err(Refused::OVERLOADED)));
                }
            }
            None => {
                let r = self.store(env, msg.key.as_deref(), now);
                now.push(Event::Published(ack, r));
            }
        }
    }

    fn history(&self, ch: &str, since: Option<Since>, ack: Ack, now: &mut Vec<Event>) {
        match self.remote_owner(ch) {
            // The answer comes behind every delivery the owner sent before
            // it (the mesh keeps each pair of shards in order).
            Some(peer) => {
                if !self.send(peer, MeshMsg::Recover(ch.to_owned(), since.clone(), ack)) {
                    now.push(Event::History(ack, Recovery::unavailable(since.as_ref())));
                }
            }
            None => now.push(Event::History(ack, self.recover(ch, since.as_ref()))),
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
        if let Some(tx) = &self.users {
            let _ = tx.send((user.to_owned(), delta));
        }
    }

    fn is_up(&self) -> bool {
        true
    }
}
