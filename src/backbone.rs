//! The backbone: how a message leaves this shard.
//!
//! The session code publishes through [`Backbone`] and cannot tell which
//! one it talks to. `embedded` (the default) joins the shards of this one
//! process with glommio's channel mesh: a publish is handed to every other
//! shard, each of which delivers it to its own subscribers. Shards share no
//! table: a remote shard with no subscriber for the channel drops it after
//! one hash lookup. The `nats` backbone (a dedicated thread running
//! async-nats) extends the same interface across nodes.

use std::sync::Arc;

use edgegate_proto::Envelope;
use glommio::channels::local_channel::{self, LocalSender};

/// What shards say to each other.
pub enum MeshMsg {
    /// A message published on another shard, for local subscribers of its channel.
    Publish(Arc<Envelope>),
}

/// Messages a shard may have waiting for one peer before publishers are
/// told the node is overloaded.
pub const MESH_OUTBOX: usize = 16 * 1024;

/// The embedded backbone's sending side on one shard: one bounded local
/// outbox per peer shard, each drained by a forwarding task into the mesh
/// (so a publisher never waits for another shard).
pub struct Embedded {
    outboxes: Vec<Option<LocalSender<MeshMsg>>>,
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
        Embedded { outboxes }
    }

    /// Hands `env` to every other shard. Returns the number of shards whose
    /// outbox was full (the message did not reach them).
    pub fn publish(&self, env: &Arc<Envelope>) -> usize {
        let mut full = 0;
        for tx in self.outboxes.iter().flatten() {
            if tx.try_send(MeshMsg::Publish(env.clone())).is_err() {
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
}

impl Backbone {
    /// Publishes `env` beyond this shard. Returns false when some of it
    /// could not be handed on (overload): the publisher is told.
    pub fn publish(&self, env: &Arc<Envelope>) -> bool {
        match self {
            Backbone::Embedded(e) => e.publish(env) == 0,
        }
    }

    /// True while the backbone can carry messages.
    pub fn is_up(&self) -> bool {
        match self {
            Backbone::Embedded(_) => true,
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
