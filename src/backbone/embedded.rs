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

use edgegate_proto::{Envelope, Type};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers};
use glommio::channels::local_channel::{self, LocalSender};

use super::{Ack, Backbone, Event, Publish, Refused, Request, Sink, embedded_service};
use crate::metrics::ShardMetrics;

/// What shards say to each other.
pub enum MeshMsg {
    /// To the channel's owner: sequence this message and fan it out.
    Route(Arc<Envelope>),
    /// From the channel's owner: deliver to local subscribers.
    Deliver(Arc<Envelope>),
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
}

impl Embedded {
    /// Joins the node's mesh as shard `me` of `shards` and starts the
    /// forwarding tasks.
    pub async fn join(
        mesh: Mesh,
        shards: usize,
        me: usize,
        metrics: Arc<ShardMetrics>,
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
                    match m {
                        MeshMsg::Route(env) => {
                            me.sequence(env, &mut now);
                        }
                        MeshMsg::Deliver(env) => now.push(Event::Deliver(env)),
                    }
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
        let env = Arc::new(env);
        let stored = match self.remote_owner(msg.ch) {
            Some(peer) => match self.outboxes.get(peer).and_then(Option::as_ref) {
                Some(tx) => tx.try_send(MeshMsg::Route(env)).is_ok(),
                None => false,
            },
            None => self.sequence(env, now),
        };
        now.push(Event::Published(
            ack,
            if stored {
                Ok(())
            } else {
                Err(Refused::OVERLOADED)
            },
        ));
    }

    fn request(&self, req: Request<'_>, ack: Ack, now: &mut Vec<Event>) {
        now.push(Event::Reply(
            ack,
            embedded_service(req.service, req.payload),
        ));
    }

    fn interest(&self, _ch: &str, _on: bool, ack: Option<Ack>, now: &mut Vec<Event>) {
        // Every shard hears every channel's owner: live at once.
        if let Some(ack) = ack {
            now.push(Event::SubReady(ack));
        }
    }

    fn presence(&self, _user: &str, _delta: i32) {}

    fn is_up(&self) -> bool {
        true
    }
}
