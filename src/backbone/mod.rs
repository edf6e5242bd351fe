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
pub mod presence;

pub use history::{Page, Position, Recovery, Since, Stored, Unrecovered};
pub use presence::{PresencePage, RoomsPage};

use std::rc::Rc;
use std::sync::Arc;

use edgegate_proto::{Envelope, ErrCode, Payload};

/// `meta` of an ephemeral `msg` (docs/protocol.md, "Ephemeral messages").
pub const EPHEMERAL_META: &str = r#"{"ephemeral":true}"#;

/// True for an ephemeral `msg`: never stored, no `seq`, droppable.
pub fn is_ephemeral(env: &Envelope) -> bool {
    env.meta.as_deref() == Some(EPHEMERAL_META)
}

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

impl Ack {
    /// The `key` of an answer meant for the server API, not a connection:
    /// `serial` then names the API call waiting on the shard.
    pub const API: u32 = u32::MAX;

    /// The answer address of API call `ticket` on `shard`.
    pub fn api(shard: usize, ticket: u64) -> Ack {
        Ack {
            shard,
            key: Ack::API,
            serial: ticket,
            id: None,
        }
    }

    /// True when the answer goes to the server API.
    pub fn is_api(&self) -> bool {
        self.key == Ack::API
    }
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
    /// Ephemeral (`pub` with `meta.ephemeral`): delivered to the current
    /// subscribers only, never stored, no `seq`, no deduplication.
    pub ephemeral: bool,
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
    /// A hook's question (answered [`Event::Answer`]) rather than a
    /// client's `req` (answered [`Event::Reply`]).
    pub ask: bool,
    /// How long the service may take (`None`: the backbone's own timeout).
    pub timeout_ms: Option<u64>,
}

impl Request<'_> {
    /// The event that carries this request's outcome.
    pub fn outcome(ask: bool, ack: Ack, r: Result<Payload, ErrCode>) -> Event {
        if ask {
            Event::Answer(ack, r)
        } else {
            Event::Reply(ack, r)
        }
    }
}

/// A core service's order to close a user's connections (`disconnect`,
/// `P.ctl.kick.<id>`).
#[derive(Debug, Clone)]
pub struct Kick {
    /// The user.
    pub user: String,
    /// The `bye` code (4005 by default).
    pub code: u16,
    /// The `bye` reason.
    pub reason: String,
    /// The `bye`'s `meta.retry_ms`, if the service chose one.
    pub retry_ms: Option<u64>,
    /// Where each shard reports how many connections it closed.
    pub closed: Option<tokio::sync::mpsc::UnboundedSender<usize>>,
}

impl Kick {
    /// A kick with a core service's choices, checked: `code` 1000, 1001 or
    /// 4000–4999 (4005 by default), `reason` at most 123 bytes of text
    /// (what a WebSocket close frame can carry), `retry_ms` at most a day.
    pub fn new(
        user: &str,
        code: Option<u16>,
        reason: Option<String>,
        retry_ms: Option<u64>,
    ) -> Result<Kick, &'static str> {
        let mut k = Kick::default_for(user);
        if let Some(c) = code {
            if !(c == 1000 || c == 1001 || (4000..=4999).contains(&c)) {
                return Err("code must be 1000, 1001 or 4000-4999");
            }
            k.code = c;
        }
        if let Some(r) = reason {
            if r.len() > 123 || r.chars().any(char::is_control) {
                return Err("reason must be at most 123 bytes, without control characters");
            }
            k.reason = r;
        }
        if let Some(ms) = retry_ms {
            if ms > 86_400_000 {
                return Err("retry_ms must be at most 86400000");
            }
            k.retry_ms = Some(ms);
        }
        Ok(k)
    }

    /// The protocol's kick: 4005, "kicked".
    pub fn default_for(user: &str) -> Kick {
        Kick {
            user: user.to_owned(),
            code: edgegate_proto::CloseCode::KICKED.get(),
            reason: "kicked".to_owned(),
            retry_ms: None,
            closed: None,
        }
    }
}

/// What a backbone tells a shard.
#[derive(Debug)]
pub enum Event {
    /// A message for this shard's subscribers of its channel.
    Deliver(Arc<Envelope>),
    /// The outcome of a [`Backbone::publish`]: where it was stored (`None`
    /// where the backbone keeps no history).
    Published(Ack, Result<Option<Stored>, Refused>),
    /// The outcome of an ephemeral [`Backbone::publish`]: handed on to the
    /// channel's subscribers, or refused.
    Sent(Ack, Result<(), Refused>),
    /// The answer to a [`Backbone::history`] request.
    History(Ack, Recovery),
    /// A subscription asked for with [`Backbone::interest`] is live.
    SubReady(Ack),
    /// The outcome of a [`Backbone::request`].
    Reply(Ack, Result<Payload, ErrCode>),
    /// The outcome of a hook's question ([`Request::ask`]).
    Answer(Ack, Result<Payload, ErrCode>),
    /// Close this user's connections.
    Kick(Kick),
    /// Messages of this channel were lost and cannot be recovered: close
    /// its local subscribers with 4009, so they reconnect and recover.
    Gap(String),
    /// A room's presence changed (a `members` envelope), for this shard's
    /// connections that watch its channel.
    Members(Arc<Envelope>),
    /// The answer to a [`Backbone::presence_query`].
    Presence(Ack, Result<PresencePage, Refused>),
    /// The answer to a [`Backbone::history_page`].
    Page(Ack, Result<Page, Refused>),
    /// The answer to a [`Backbone::channels`].
    Channels(Ack, Result<RoomsPage, Refused>),
    /// A `POST /sse` for one of this shard's connections, from another
    /// node (docs/protocol.md §10).
    Post(crate::sse::Post),
}

/// Where asynchronous events go: the shard's event handler.
pub type Sink = Box<dyn Fn(Event)>;

/// Whether the shard holds a subscriber of a channel (its router): a
/// backbone's question to its own shard, answered at once.
pub type Probe = Box<dyn Fn(&str) -> bool>;

/// A shard's view of the backbone. Every method returns at once; none
/// blocks or waits on another shard or thread.
pub trait Backbone {
    /// Starts the backbone's own tasks on this shard (mesh receivers, the
    /// bridge from the backbone thread); later events go to `sink`, and
    /// `probe` says whether the shard has a subscriber of a channel.
    fn start(self: Rc<Self>, sink: Sink, probe: Probe);

    /// Publishes a client's message; answers [`Event::Published`] for `ack`
    /// ([`Event::Sent`] for an ephemeral one).
    fn publish(&self, msg: Publish<'_>, ack: Ack, now: &mut Vec<Event>);

    /// Sends a request to a core service; answers [`Event::Reply`].
    fn request(&self, req: Request<'_>, ack: Ack, now: &mut Vec<Event>);

    /// This shard's first (`on`) or last (`!on`) local interest in `ch`.
    /// With `ack`, [`Event::SubReady`] says when messages published from
    /// now on reach this shard.
    fn interest(&self, ch: &str, on: bool, ack: Option<Ack>, now: &mut Vec<Event>);

    /// The position of `ch`'s stream and, with `since`, the messages after
    /// it (or why they cannot be had); with `present`, also how many users
    /// are present in it; answers [`Event::History`]. Asked once the
    /// subscription is live, so nothing falls between the answer and the
    /// live messages.
    fn history(
        &self,
        ch: &str,
        since: Option<Since>,
        present: bool,
        ack: Ack,
        now: &mut Vec<Event>,
    );

    /// A user's connection count on this shard changed by `delta`.
    fn presence(&self, user: &str, delta: i32);

    /// `user`'s presence in room `ch` on this shard began (`+1`: the first
    /// of its connections here subscribed) or ended (`-1`).
    fn present(&self, ch: &str, user: &str, delta: i32);

    /// This shard's first (`on`) or last (`!on`) connection that watches
    /// `ch`'s presence: [`Event::Members`] for it come to this shard.
    fn watch(&self, ch: &str, on: bool);

    /// Who is present in `ch` (a room: the users after `after`, at most
    /// `limit`; a `user:` channel: whether that user is online anywhere);
    /// answers [`Event::Presence`].
    fn presence_query(
        &self,
        ch: &str,
        limit: usize,
        after: Option<&str>,
        ack: Ack,
        now: &mut Vec<Event>,
    );

    /// The rooms with at least one present user (names starting with
    /// `prefix`, after `after`, at most `limit`), with their counts, across
    /// the node (NATS: the cluster); answers [`Event::Channels`].
    fn channels(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        ack: Ack,
        now: &mut Vec<Event>,
    );

    /// The newest `limit` stored messages of `ch` before `before`; answers
    /// [`Event::Page`].
    fn history_page(
        &self,
        ch: &str,
        limit: usize,
        before: Option<u64>,
        ack: Ack,
        now: &mut Vec<Event>,
    );

    /// True while the backbone can carry messages.
    fn is_up(&self) -> bool;

    /// Sends a `POST /sse` on to `node` (as `edgegate_proto::sse::node_token`
    /// writes it), which owns its session; the outcome goes to
    /// `post.reply`. A backbone with no other node answers `Unknown`.
    fn forward_post(&self, node: &str, post: crate::sse::Post) {
        let _ = node;
        let _ = post.reply.send(crate::sse::PostOutcome::Unknown);
    }
}

/// The embedded backbone's built-in services.
pub fn embedded_service(name: &str, payload: Payload) -> Result<Payload, ErrCode> {
    match name {
        "echo" => Ok(payload),
        _ => Err(ErrCode::NoService),
    }
}
