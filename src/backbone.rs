//! The backbone: how a message leaves this shard.
//!
//! The session code publishes through [`Backbone`] and cannot tell which
//! one it talks to. `embedded` (the default) joins the shards of this one
//! process with glommio's channel mesh.
//!
//! Every channel has an *owner* shard (a hash of its name). A publish goes
//! to the owner, which hands it to every shard, itself included, in the
//! order it received it; each shard delivers to its own subscribers. So all
//! members of a room, on whatever shard, see one order (PROTOCOL.md §6),
//! the publisher's own copy included, as they would through NATS. Shards
//! share no table: a shard with no subscriber drops the message after one
//! hash lookup. The `nats` backbone (a dedicated thread running async-nats)
//! extends the same interface across nodes.

use std::sync::Arc;

use edgegate_proto::Envelope;
use glommio::channels::local_channel::{self, LocalSender};

/// What shards say to each other.
pub enum MeshMsg {
    /// To the channel's owner: sequence this message and fan it out.
    Route(Arc<Envelope>),
    /// From the channel's owner: deliver to local subscribers.
    Deliver(Arc<Envelope>),
}

/// The shard that sequences `ch` (stable across shards and restarts).
pub fn owner(ch: &str, shards: usize) -> usize {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: every shard computes the same owner.
    let mut h = std::hash::DefaultHasher::new();
    ch.hash(&mut h);
    (h.finish() % shards.max(1) as u64) as usize
}

/// Messages a shard may have waiting for one peer before publishers are
/// told the node is overloaded.
pub const MESH_OUTBOX: usize = 16 * 1024;

/// The embedded backbone's sending side on one shard: one bounded local
/// outbox per peer shard, each drained by a forwarding task into the mesh
/// (so a publisher never waits for another shard).
pub struct Embedded {
    outboxes: Vec<Option<LocalSender<MeshMsg>>>,
    me: usize,
}

impl Embedded {
    /// Builds the outboxes; `spawn_forwarder(peer, receiver)` must start the
    /// task that moves messages from the outbox into the mesh.
    pub fn new(
        shards: usize,
        me: usize,
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
        Embedded { outboxes, me }
    }

    /// The owner of `ch`, or `None` when it is this shard.
    pub fn remote_owner(&self, ch: &str) -> Option<usize> {
        let o = owner(ch, self.outboxes.len());
        (o != self.me).then_some(o)
    }

    /// Sends `env` to `peer` to be sequenced there. False if its outbox is full.
    pub fn route(&self, peer: usize, env: Arc<Envelope>) -> bool {
        match self.outboxes.get(peer).and_then(Option::as_ref) {
            Some(tx) => tx.try_send(MeshMsg::Route(env)).is_ok(),
            None => false,
        }
    }

    /// Hands `env` to every other shard for delivery. Returns the number of
    /// shards whose outbox was full (the message did not reach them).
    pub fn fan_out(&self, env: &Arc<Envelope>) -> usize {
        let mut full = 0;
        for tx in self.outboxes.iter().flatten() {
            if tx.try_send(MeshMsg::Deliver(env.clone())).is_err() {
                full += 1;
            }
        }
        full
    }
}

/// The backbone a shard publishes through.
pub enum Backbone {
    /// In-process: the shards of this node only.
    Embedded(Embedded),
    /// NATS, through the backbone thread (`crate::nats`).
    Nats(crate::nats::ShardLink),
}

impl Backbone {
    /// True while the backbone can carry messages.
    pub fn is_up(&self) -> bool {
        match self {
            Backbone::Embedded(_) => true,
            Backbone::Nats(link) => link.state.up.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// A request to a core service, answered on this shard.
pub enum ServiceAnswer {
    /// The reply payload.
    Reply(edgegate_proto::Payload),
    /// No such service.
    NoService,
}

/// Answers `req` for the embedded backbone's built-in services.
pub fn embedded_service(name: &str, env: &Envelope) -> ServiceAnswer {
    match name {
        "echo" => ServiceAnswer::Reply(env.payload.clone()),
        _ => ServiceAnswer::NoService,
    }
}
