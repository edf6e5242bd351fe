//! The backbone: how a message leaves this shard, behind one seam.
//!
//! The session and the shard talk to a [`Backbone`] and cannot tell which
//! one it is. Two implement it:
//!
//! * [`embedded::Embedded`] (the default): the shards of this one process,
//!   joined by glommio's channel mesh. Every channel has an *owner* shard
//!   (a hash of its name) that puts its messages in one order and hands
//!   them to every shard, itself included.
//! * [`nats::NatsBackbone`]: a dedicated thread running async-nats, bridged
//!   to the shards by bounded queues; nothing outside this folder names
//!   `async_nats`.
//!
//! A call either answers at once (the embedded backbone mostly does: it
//! pushes [`Event`]s into the caller's `now` list) or later, through the
//! event sink the shard gives [`Backbone::start`]. Either way the answer is
//! the same [`Event`], addressed to a connection by its [`Ack`], and the
//! session turns it into the protocol's answer: there is one place that
//! writes `ok` and `err`, whatever the backbone.

pub mod embedded;
pub mod history;
pub mod jetstream;
pub mod nats;

pub use history::{Position, Recovery, Since, Stored, Unrecovered};

use std::rc::Rc;
use std::sync::Arc;

use edgegate_proto::{Envelope, ErrCode, Payload};

/// Who gets the answer to a backbone call: a connection on a shard, and
/// the client's request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Shard index.
    pub shard: usize,
    /// Slab key of the connection.
    pub key: u32,
    /// Serial of the connection (a reused slot is not mistaken for it).
    pub serial: u64,
    /// The client's `id`.
    pub id: Option<u64>,
}

/// A refusal from the backbone: the `err` code and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The `err` code the client gets.
    pub code: ErrCode,
    /// A short reason.
    pub reason: &'static str,
}

impl Refused {
    /// The backbone cannot take messages now (NATS down, bridge full).
    pub const UNAVAILABLE: Refused = Refused {
        code: ErrCode::BackboneUnavailable,
        reason: "backbone unavailable, retry later",
    };
    /// Another shard could not take the message (its mesh outbox is full).
    pub const OVERLOADED: Refused = Refused {
        code: ErrCode::RateLimited,
        reason: "node overloaded: message not delivered to every shard",
    };
}

/// A client's message, to publish on its channel.
#[derive(Debug)]
pub struct Publish<'a> {
    /// Channel (`room:x`, `user:y`), already checked by the session.
    pub ch: &'a str,
    /// The publisher's user id.
    pub from: &'a str,
    /// The client's request id.
    pub id: Option<u64>,
    /// The publishing connection's name (`welcome.meta.conn`).
    pub conn: &'a str,
    /// The payload.
    pub payload: Payload,
    /// Deduplication key (`user:instance:id`, or `user:conn:id` without an
    /// instance): a publish whose key the stream stored within the window
    /// is answered with the original `seq` and not delivered again.
    pub key: Option<String>,
}

/// A client's request to a core service (`req` on `svc:<name>`).
#[derive(Debug)]
pub struct Request<'a> {
    /// The service name (after `svc:`).
    pub service: &'a str,
    /// The requesting user.
    pub user: &'a str,
    /// The requesting connection's name.
    pub conn: &'a str,
    /// The payload.
    pub payload: Payload,
}

/// What a backbone tells a shard.
#[derive(Debug)]
pub enum Event {
    /// A message for this shard's subscribers of its channel.
    Deliver(Arc<Envelope>),
    /// The outcome of a [`Backbone::publish`]: where it was stored (`None`
    /// where the backbone keeps no history).
    Published(Ack, Result<Option<Stored>, Refused>),
    /// The answer to a [`Backbone::history`] request.
    History(Ack, Recovery),
    /// A subscription asked for with [`Backbone::interest`] is live.
    SubReady(Ack),
    /// The outcome of a [`Backbone::request`].
    Reply(Ack, Result<Payload, ErrCode>),
    /// Close this user's connections (4005).
    Kick(String),
    /// Messages of this channel were lost and cannot be recovered: close
    /// its local subscribers with 4009, so they reconnect and recover.
    Gap(String),
}

/// Where asynchronous events go: the shard's event handler.
pub type Sink = Box<dyn Fn(Event)>;

/// A shard's view of the backbone. Every method returns at once; none
/// blocks or waits on another shard or thread.
pub trait Backbone {
    /// Starts the backbone's own tasks on this shard (mesh receivers, the
    /// bridge from the backbone thread); later events go to `sink`.
    fn start(self: Rc<Self>, sink: Sink);

    /// Publishes a client's message; answers [`Event::Published`] for `ack`.
    fn publish(&self, msg: Publish<'_>, ack: Ack, now: &mut Vec<Event>);

    /// Sends a request to a core service; answers [`Event::Reply`].
    fn request(&self, req: Request<'_>, ack: Ack, now: &mut Vec<Event>);

    /// This shard's first (`on`) or last (`!on`) local interest in `ch`.
    /// With `ack`, [`Event::SubReady`] says when messages published from
    /// now on reach this shard.
    fn interest(&self, ch: &str, on: bool, ack: Option<Ack>, now: &mut Vec<Event>);

    /// The position of `ch`'s stream and, with `since`, the messages after
    /// it (or why they cannot be had); answers [`Event::History`]. Asked
    /// once the subscription is live, so nothing falls between the answer
    /// and the live messages.
    fn history(&self, ch: &str, since: Option<Since>, ack: Ack, now: &mut Vec<Event>);

    /// A user's connection count on this shard changed by `delta`.
    fn presence(&self, user: &str, delta: i32);

    /// True while the backbone can carry messages.
    fn is_up(&self) -> bool;
}

/// The embedded backbone's built-in services.
pub fn embedded_service(name: &str, payload: Payload) -> Result<Payload, ErrCode> {
    match name {
        "echo" => Ok(payload),
        _ => Err(ErrCode::NoService),
    }
}
