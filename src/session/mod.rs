//! The session: protocol v1 as a sans-IO state machine.
//!
//! In the manner of quinn-proto's `Connection`, a session never sees a
//! socket, a clock or a backbone. [`handle`] takes the session's state, the
//! shard's policy, the time and one [`Input`] — an envelope from the client,
//! a backbone's answer, a timer check, a token from the upgrade request —
//! and appends the [`Action`]s that follow: a reply to queue, a
//! subscription to make, a message to publish, a check to arm, a close.
//! The shard carries the actions out and feeds the outcomes back as
//! inputs. So every protocol answer (`welcome`, `ok`, `err`, `reply`,
//! `pong`, and every close code the protocol decides) is written here and
//! nowhere else, whichever transport and backbone the connection has, and
//! protocol v1 is tested below with plain function calls.
//!
//! Message fan-out does not pass through here: a delivery is the router's
//! (one encoding per shard, queued on every subscriber), and a session only
//! decides who may subscribe.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use edgegate_proto::channel::{self, Channel};
use edgegate_proto::{CloseCode, Envelope, ErrCode, Payload, Type};
use serde::Deserialize;

use crate::auth::{AuthError, Claims};
use crate::backbone::presence::{QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX};
use crate::backbone::{Page, PresencePage, Recovery, Refused, Since, Stored, Unrecovered};
use crate::config::{RoomPolicy, TokenSource};
use crate::metrics::{ShardMetrics, Transport};
use crate::settings::ShardConfig;
use crate::timer::Check;

/// A user id, kept as its channel name `user:<id>`: the id and the channel
/// every connection is subscribed to share one allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserId(Name);

impl UserId {
    const PREFIX: &'static str = "user:";

    /// The id `id` (already validated as a channel id).
    pub fn new(id: &str) -> Self {
        UserId(Name::from(format!("{}{id}", Self::PREFIX)))
    }

    /// The user's own channel, `user:<id>`.
    pub fn channel(&self) -> &Name {
        &self.0
    }
}

impl std::ops::Deref for UserId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0[Self::PREFIX.len()..]
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// Why and how the server closes a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReq {
    /// The close code (docs/protocol.md §5).
    pub code: CloseCode,
    /// A short reason for the client and the logs.
    pub reason: Cow<'static, str>,
    /// The `bye`'s `meta.retry_ms` when a core service chose it (a
    /// disconnect, a connect hook); otherwise the transport jitters one
    /// for the codes that carry it.
    pub retry_ms: Option<u64>,
}

impl CloseReq {
    /// A close request.
    pub const fn new(code: CloseCode, reason: &'static str) -> Self {
        CloseReq {
            code,
            reason: Cow::Borrowed(reason),
            retry_ms: None,
        }
    }
}

/// Codes whose `bye` must carry `meta.retry_ms` (docs/protocol.md §6).
pub fn carries_retry(code: CloseCode) -> bool {
    matches!(
        code,
        CloseCode::GOING_AWAY | CloseCode::RATE_LIMITED | CloseCode::OVERLOADED
    )
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for `hello`.
    Hello,
    /// Past `welcome`.
    Active,
    /// Closing: nothing more is queued.
    Closing,
}

/// What a session remembers between inputs.
#[derive(Debug)]
pub struct SessionState {
    /// Where the connection is in its life.
    pub phase: Phase,
    /// The authenticated user, once welcomed.
    pub user: Option<UserId>,
    /// The verified token's claims (`auth.mode = "jwt"`), replaced on
    /// refresh; set before `hello` when the upgrade request carried one.
    pub claims: Option<Rc<Claims>>,
    /// Channels subscribed (the shard's router holds the reverse table).
    pub subs: Vec<Name>,
    /// What few sessions need (an instance, recoveries in flight): boxed,
    /// so an idle connection pays one pointer for it.
    pub extra: Option<Box<Extra>>,
    /// With `ordered_publishes`: a publish is with the backbone (those
    /// behind it wait in [`Extra::waiting`]). In the struct's padding.
    pub publishing: bool,
}

/// The rarely used part of a session's state.
#[derive(Debug, Default)]
pub struct Extra {
    /// `hello.meta.instance`: scopes publish ids across reconnects.
    pub instance: Option<Rc<str>>,
    /// Subscriptions whose position (and replay) is being fetched.
    pub recovering: Vec<Recovering>,
    /// With `ordered_publishes`: the publishes waiting for the one with
    /// the backbone (boxed: an idle client that names its instance keeps
    /// an `Extra`, and pays one pointer for this).
    pub waiting: Option<Box<Publishing>>,
    /// Hook questions in flight and channel-token grants ([`hooks`]):
    /// boxed, so a client that only names its instance pays one pointer.
    pub hooks: Option<Box<hooks::HookState>>,
}

/// Publishes waiting for the one with the backbone, in order.
#[derive(Debug, Default)]
pub struct Publishing {
    /// The publishes.
    pub queued: VecDeque<Pub>,
    /// Their size ([`Pub::size`]), bounded by `outbound_queue_bytes`.
    pub bytes: usize,
}

impl Extra {
    /// Holds nothing: an idle connection keeps no `Extra`.
    fn is_empty(&self) -> bool {
        self.instance.is_none()
            && self.recovering.is_empty()
            && self.waiting.is_none()
            && self.hooks.is_none()
    }
}

/// Publishes a connection may have waiting behind the one with the
/// backbone (`ordered_publishes`); one more, or one that would take their
/// size past `outbound_queue_bytes`, is refused `rate_limited`. A NATS
/// failover holds them for about a reconnect.
pub const MAX_QUEUED_PUBLISHES: usize = 1024;

/// A subscription waiting for its position: live messages of `ch` are
/// held here meanwhile, and merged with the replay by `seq` when it comes.
#[derive(Debug)]
pub struct Recovering {
    /// The channel.
    pub ch: Name,
    /// The `sub`'s id (or `hello`'s, for the user's own stream).
    pub id: Option<u64>,
    /// The client's position, when it asked to recover.
    pub since: Option<Since>,
    /// Live messages that arrived meanwhile, in order.
    pub held: Vec<Arc<Envelope>>,
    /// This is the user's own stream, and the `welcome` waits for it (it
    /// is written when the answer comes: nothing is kept meanwhile).
    pub welcome: bool,
    /// The `sub` asked for presence (`meta.presence`): its `ok` carries
    /// `meta.present`, and `members` follow it.
    pub presence: bool,
}

impl Default for SessionState {
    fn default() -> Self {
        SessionState {
            phase: Phase::Hello,
            user: None,
            claims: None,
            subs: Vec::new(),
            extra: None,
            publishing: false,
        }
    }
}

/// A recovery's hold of live messages is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldFull;

/// A live message skipped a `seq` that no replay can fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap;

impl SessionState {
    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// True while a `welcome` may still be written: before it (`hello` not
    /// yet answered), or while it waits for the user stream's position.
    pub fn welcome_due(&self) -> bool {
        self.phase == Phase::Hello
            || self
                .extra
                .as_ref()
                .is_some_and(|x| x.recovering.iter().any(|r| r.welcome))
    }

    /// True while a recovery (or the position) of `ch` is being fetched.
    pub fn is_recovering(&self, ch: &str) -> bool {
        self.extra
            .as_ref()
            .is_some_and(|x| x.recovering.iter().any(|r| &*r.ch == ch))
    }

    /// Hook questions and grants, if any.
    pub fn hooks(&self) -> Option<&hooks::HookState> {
        self.extra.as_ref().and_then(|x| x.hooks.as_deref())
    }

    fn hooks_mut(&mut self) -> &mut hooks::HookState {
        self.extra().hooks.get_or_insert_with(Box::default)
    }

    /// Holds `env` if a recovery of its channel is in flight: `Ok(true)`
    /// held, `Ok(false)` not recovering that channel, `Err` the hold is
    /// full (`max` messages): the connection must close with 4009.
    pub fn hold(&mut self, env: &Arc<Envelope>, max: usize) -> Result<bool, HoldFull> {
        let Some(x) = self.extra.as_mut() else {
            return Ok(false);
        };
        let Some(ch) = env.ch.as_deref() else {
            return Ok(false);
        };
        match x.recovering.iter_mut().find(|r| &*r.ch == ch) {
            Some(r) if r.held.len() >= max => Err(HoldFull),
            Some(r) => {
                r.held.push(env.clone());
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// The world as the session sees it for one input.
pub struct Ctx<'a> {
    /// The shard's settings (auth, room policy, limits, heartbeats).
    pub cfg: &'a ShardConfig,
    /// The shard's counters (auth outcomes, sessions).
    pub metrics: &'a ShardMetrics,
    /// The shard's index (`welcome.meta.shard`).
    pub shard: usize,
    /// The connection's serial (in `welcome.meta.conn`).
    pub serial: u64,
    /// The connection's transport (token carriers differ).
    pub transport: Transport,
    /// The shard's clock, ms (the timer wheel's time).
    pub now_ms: u64,
    /// Wall-clock time, Unix ms (token expiry).
    pub unix_ms: u64,
    /// SSE: the connection's session token, for `welcome.meta.session`
    /// (docs/protocol.md §10); made by the shard only while a `welcome`
    /// may be due ([`SessionState::welcome_due`]).
    pub session: Option<&'a str>,
}

impl Ctx<'_> {
    /// `welcome.meta.conn`: node, shard and serial.
    pub fn conn_name(&self) -> String {
        conn_name(&self.cfg.node_id, self.shard, self.serial)
    }
}

/// A connection's name: node, shard and serial.
pub fn conn_name(node: &str, shard: usize, serial: u64) -> String {
    format!("{node}-{shard}-{serial}")
}

/// What happens to a session.
#[derive(Debug)]
pub enum Input {
    /// An envelope from the client.
    Client(Envelope),
    /// A token from the WebSocket upgrade request (header or query).
    UpgradeToken(String),
    /// A subscription asked for with [`Action::Subscribe`] is live.
    SubReady(Option<u64>),
    /// The backbone's answer to an [`Action::Publish`].
    Published(Option<u64>, Result<Option<Stored>, Refused>),
    /// The backbone's answer to an ephemeral [`Action::Publish`]: handed to
    /// the channel's subscribers (`ok` without `seq`), or refused.
    Sent(Option<u64>, Result<(), Refused>),
    /// The backbone's answer to an [`Action::History`]: the position of a
    /// subscription's stream and, if asked, what was missed.
    History(Option<u64>, Recovery),
    /// The backbone's answer to an [`Action::Request`].
    Reply(Option<u64>, Result<Payload, ErrCode>),
    /// The backbone's answer to an [`Action::PresenceQuery`].
    Presence(Option<u64>, Result<PresencePage, Refused>),
    /// The backbone's answer to an [`Action::HistoryPage`].
    Page(Option<u64>, Result<Page, Refused>),
    /// A check from the shard's timer wheel came due, with the
    /// connection's last activity (shard clock ms) and last server ping.
    Check {
        /// Which check.
        check: Check,
        /// When anything was last received.
        last_rx_ms: u64,
        /// When the server last pinged (0: never).
        pinged_ms: u64,
    },
    /// A core service asked to close this connection's user with this `bye`.
    Kick(CloseReq),
    /// A hook's answer to the [`Action::Ask`] with this ticket.
    Answer(Option<u64>, Result<Payload, ErrCode>),
    /// The backbone lost messages of a subscribed channel that it cannot
    /// recover: the client must reconnect and recover (4009).
    Gap,
}

/// What the shard must do.
#[derive(Debug)]
pub enum Action {
    /// Queue this envelope for the client.
    Reply(Envelope),
    /// Subscribe to `ch` (already in the session's list). With `ok`,
    /// answer [`Input::SubReady`] with that id once the subscription is live.
    Subscribe {
        /// Channel.
        ch: Name,
        /// The `sub`'s id, when the client waits for an `ok`.
        ok: Option<Option<u64>>,
        /// The client will watch the room's presence: its shard must hear
        /// the room's `members` from now on (the connection gets them once
        /// [`Action::Watch`] says its `ok` went out).
        presence: bool,
    },
    /// The `ok` of a `sub` with presence went out: queue the room's
    /// `members` for this connection from now on.
    Watch(Name),
    /// Unsubscribe from `ch` (already out of the session's list).
    Unsubscribe(Name),
    /// Ask the backbone for the position of `ch` (and, with `since`, the
    /// messages after it; with `presence`, how many users are present);
    /// answer [`Input::History`] with `id`.
    History {
        /// Channel.
        ch: Name,
        /// The client's position.
        since: Option<Since>,
        /// The id to answer with.
        id: Option<u64>,
        /// Count the users present too.
        presence: bool,
    },
    /// Ask who is present in `ch`; answer [`Input::Presence`].
    PresenceQuery {
        /// Channel (`room:` or `user:`), checked.
        ch: String,
        /// Users per page.
        limit: usize,
        /// List the users after this id.
        after: Option<String>,
        /// The client's id.
        id: Option<u64>,
    },
    /// Ask for a page of `ch`'s history; answer [`Input::Page`].
    HistoryPage {
        /// Channel, checked.
        ch: String,
        /// Messages per page.
        limit: usize,
        /// Only messages with a `seq` below this.
        before: Option<u64>,
        /// The client's id.
        id: Option<u64>,
    },
    /// Queue these messages for the client, in order (a replay, then the
    /// live messages held during it).
    Deliver(Vec<Arc<Envelope>>),
    /// Publish; answer [`Input::Published`].
    Publish(Pub),
    /// Send a request to service `service`; answer [`Input::Reply`].
    Request {
        /// Service name (after `svc:`).
        service: String,
        /// Requester.
        user: UserId,
        /// The client's id.
        id: Option<u64>,
        /// The payload.
        payload: Payload,
    },
    /// The user's connection count on this shard changed (presence).
    Presence(UserId, i32),
    /// Run `check` at `at_ms` (shard clock).
    Arm(Check, u64),
    /// Ping the client now (the transport's ping, or a `ping` envelope).
    Ping,
    /// Close the connection with this `bye`.
    Close(CloseReq),
    /// Ask a hook's service; answer [`Input::Answer`] with `ticket`.
    Ask {
        /// Which hook.
        hook: hooks::Hook,
        /// The answer's ticket.
        ticket: u64,
        /// The asking user.
        user: UserId,
        /// The JSON body.
        body: Vec<u8>,
        /// For the subscribe hook: the channel (a remembered allow answers
        /// at once).
        ch: Option<Name>,
    },
    /// The subscribe hook allowed this user `ch`: remember it for
    /// `[hooks] subscribe_cache_ms`.
    CacheAllow(Name),
}

/// A client's message to publish.
#[derive(Debug)]
pub struct Pub {
    /// Channel, checked.
    pub ch: String,
    /// Publisher.
    pub from: UserId,
    /// The client's id.
    pub id: Option<u64>,
    /// The payload.
    pub payload: Payload,
    /// Deduplication key (`user:instance:id`, `user:conn:id`).
    pub key: Option<String>,
    /// `meta.ephemeral`: never stored (no `seq`, no key).
    pub ephemeral: bool,
}

impl Pub {
    /// What it holds while it waits, roughly.
    pub fn size(&self) -> usize {
        std::mem::size_of::<Pub>() + self.ch.len() + self.payload.bytes().len()
    }
}

/// `hello.meta` (docs/protocol.md §2, §7).
#[derive(Deserialize, Default)]
struct HelloMeta {
    user: Option<String>,
    token: Option<String>,
    instance: Option<String>,
    since: Option<SinceMeta>,
    /// Passed to the connect hook as it came.
    client: Option<serde_json::Value>,
}

/// `meta.since` of `sub` and `hello`.
#[derive(Deserialize, Debug, Clone)]
struct SinceMeta {
    seq: u64,
    epoch: Option<String>,
}

impl From<SinceMeta> for Since {
    fn from(m: SinceMeta) -> Since {
        Since {
            seq: m.seq,
            epoch: m.epoch,
        }
    }
}

/// `sub.meta`.
#[derive(Deserialize, Default)]
struct SubMeta {
    since: Option<SinceMeta>,
    presence: Option<bool>,
    /// A channel token (docs/api.md, "Channel tokens").
    token: Option<String>,
}

/// `pub.meta`.
#[derive(Deserialize, Default)]
struct PubMeta {
    ephemeral: Option<bool>,
}

/// History pages: messages per page by default, and at most.
pub const PAGE_LIMIT_DEFAULT: usize = 50;
/// The most messages one history page holds.
pub const PAGE_LIMIT_MAX: usize = 200;

/// `hello.meta.instance`: like an id, at most 64 bytes.
fn valid_instance(s: &str) -> bool {
    s.len() <= 64 && channel::valid_id(s)
}

/// Handles one input, appending what must be done to `out`.
pub fn handle(st: &mut SessionState, cx: &Ctx<'_>, input: Input, out: &mut Vec<Action>) {
    if st.phase == Phase::Closing {
        return;
    }
    match input {
        Input::Client(env) => match st.phase {
            Phase::Hello => before_welcome(st, cx, env, out),
            _ => active(st, cx, env, out),
        },
        Input::UpgradeToken(token) => {
            // Auth "none": a token means nothing.
            if let Some(v) = cx.cfg.auth.as_deref() {
                match verify(cx, v, &token) {
                    Ok(c) => st.claims = Some(c),
                    Err(e) => close(out, CloseCode::UNAUTHORIZED, e.reason()),
                }
            }
        }
        Input::SubReady(id) => {
            // Live: now fetch the position (and replay), which is the `ok`.
            let pending = st.extra.as_ref().and_then(|x| {
                x.recovering
                    .iter()
                    .find(|r| r.id == id)
                    .map(|r| (r.ch.clone(), r.since.clone(), r.welcome))
            });
            match pending {
                // The user's own channel is live and there is no position
                // to learn: the welcome waited only for it.
                Some((_, None, true)) if !cx.cfg.positions => welcome_live(st, cx, id, out),
                Some((ch, since, _)) => {
                    let presence = st
                        .extra
                        .as_ref()
                        .is_some_and(|x| x.recovering.iter().any(|r| r.id == id && r.presence));
                    out.push(Action::History {
                        ch,
                        since,
                        id,
                        presence,
                    })
                }
                None => out.push(Action::Reply(Envelope::ok(id))),
            }
        }
        Input::History(id, r) => recovered(st, cx, id, r, out),
        Input::Presence(id, r) => out.push(Action::Reply(match r {
            Ok(page) => reply(id, page.to_json()),
            Err(refused) => Envelope::err(id, refused.code, refused.reason),
        })),
        Input::Page(id, r) => out.push(Action::Reply(match r {
            Ok(page) => reply(id, page_json(&page)),
            Err(refused) => Envelope::err(id, refused.code, refused.reason),
        })),
        Input::Published(id, r) => published(st, cx, id, r, out),
        // Ephemeral: never queued behind the stream (`publish`), so only
        // its answer.
        Input::Sent(id, r) => out.push(Action::Reply(match r {
            Ok(()) => Envelope::ok(id),
            Err(refused) => Envelope::err(id, refused.code, refused.reason),
        })),
        Input::Reply(id, r) => out.push(Action::Reply(match r {
            Ok(payload) => {
                let mut reply = Envelope::new(Type::Reply);
                reply.id = id;
                reply.payload = payload;
                reply
            }
            Err(ErrCode::NoService) => Envelope::err(id, ErrCode::NoService, "no such service"),
            Err(code) => Envelope::err(id, code, code.name()),
        })),
        Input::Check {
            check,
            last_rx_ms,
            pinged_ms,
        } => on_check(st, cx, check, last_rx_ms, pinged_ms, out),
        Input::Kick(req) => out.push(Action::Close(req)),
        Input::Answer(ticket, r) => hooks::answered(st, cx, ticket, r, out),
        Input::Gap => close(
            out,
            CloseCode::INSUFFICIENT_STATE,
            "messages lost on a subscribed channel: reconnect and recover",
        ),
    }
}

/// A `reply` to `id` carrying JSON text.
fn reply(id: Option<u64>, json: bytes::Bytes) -> Envelope {
    let mut r = Envelope::new(Type::Reply);
    r.id = id;
    r.payload = Payload::Json(json);
    r
}

/// A history page as the `reply`'s `d`: `{"epoch","top","messages":[{"seq",
/// "from","d"|"db"}],"more"}` (and `"reason":"unavailable"` without
/// history). Payloads are copied as they are stored: JSON text raw, other
/// bytes as base64 (`db`), as in a `msg`.
pub fn page_json(p: &Page) -> bytes::Bytes {
    use base64::Engine;
    let mut out = Vec::with_capacity(
        64 + p
            .messages
            .iter()
            .map(|m| 48 + m.payload.bytes().len() * 4 / 3)
            .sum::<usize>(),
    );
    let text = |s: &str| serde_json::Value::from(s).to_string();
    out.extend_from_slice(b"{\"epoch\":");
    out.extend_from_slice(text(&p.epoch).as_bytes());
    out.extend_from_slice(format!(",\"top\":{},\"messages\":[", p.top).as_bytes());
    for (i, m) in p.messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{{\"seq\":{}", m.seq.unwrap_or(0)).as_bytes());
        if let Some(from) = &m.from {
            out.extend_from_slice(b",\"from\":");
            out.extend_from_slice(text(from).as_bytes());
        }
        match &m.payload {
            Payload::None => {}
            Payload::Json(b) => {
                out.extend_from_slice(b",\"d\":");
                out.extend_from_slice(b);
            }
            Payload::Binary(b) => {
                out.extend_from_slice(b",\"db\":\"");
                out.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(b)
                        .as_bytes(),
                );
                out.push(b'"');
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(format!("],\"more\":{}", p.more).as_bytes());
    if p.unavailable {
        out.extend_from_slice(b",\"reason\":\"unavailable\"");
    }
    out.push(b'}');
    bytes::Bytes::from(out)
}

/// The answer to an envelope refused by the connection's rate limits.
pub fn rate_limited(id: Option<u64>) -> Envelope {
    Envelope::err(id, ErrCode::RateLimited, "rate limited: slow down")
}

fn close(out: &mut Vec<Action>, code: CloseCode, reason: &'static str) {
    out.push(Action::Close(CloseReq::new(code, reason)));
}

/// A close with a reason made at run time (a hook's).
fn close_with(out: &mut Vec<Action>, code: CloseCode, reason: String) {
    out.push(Action::Close(CloseReq {
        code,
        reason: Cow::Owned(reason),
        retry_ms: None,
    }));
}

fn err(out: &mut Vec<Action>, id: Option<u64>, code: ErrCode, reason: &str) {
    out.push(Action::Reply(Envelope::err(id, code, reason)));
}

/// Verifies `token`, counting the outcome.
fn verify(cx: &Ctx<'_>, v: &crate::auth::Verifier, token: &str) -> Result<Rc<Claims>, AuthError> {
    match v.verify(token, cx.unix_ms) {
        Ok(c) => {
            cx.metrics.auth_ok.fetch_add(1, Relaxed);
            Ok(Rc::new(c))
        }
        Err(e) => {
            cx.metrics.auth_failures[e.index()].fetch_add(1, Relaxed);
            Err(e)
        }
    }
}

/// `hello.meta.token`, where this connection may carry it there (TCP and
/// QUIC always; WebSocket when `auth.token_sources` has "hello").
fn hello_token(cx: &Ctx<'_>, meta: &mut HelloMeta) -> Option<String> {
    let allowed = cx.transport != Transport::Ws || cx.cfg.token_source(TokenSource::Hello);
    meta.token.take().filter(|_| allowed)
}

/// The shard-clock moment of the 4008 check: the token's expiry plus the leeway.
fn expiry_at(cx: &Ctx<'_>, claims: &Claims) -> u64 {
    let leeway = cx.cfg.auth.as_ref().map_or(0, |v| v.leeway_ms());
    let left = claims
        .exp_unix_ms
        .saturating_add(leeway)
        .saturating_sub(cx.unix_ms);
    cx.now_ms + left
}

fn before_welcome(st: &mut SessionState, cx: &Ctx<'_>, env: Envelope, out: &mut Vec<Action>) {
    let asking = st.hooks().is_some_and(|h| !h.asks.is_empty());
    match env.t {
        Type::Hello if asking => close(out, CloseCode::PROTOCOL_ERROR, "hello sent twice"),
        Type::Hello => hello(st, cx, env, out),
        Type::Ping => out.push(Action::Reply(Envelope::pong(env.id))),
        Type::Pong => {}
        _ => close(
            out,
            CloseCode::PROTOCOL_ERROR,
            "the first envelope must be hello",
        ),
    }
}

fn hello(st: &mut SessionState, cx: &Ctx<'_>, env: Envelope, out: &mut Vec<Action>) {
    let mut meta: HelloMeta = match env.meta.as_deref() {
        Some(text) => match serde_json::from_str(text) {
            Ok(m) => m,
            Err(_) => {
                return close(
                    out,
                    CloseCode::UNAUTHORIZED,
                    "hello.meta has fields of the wrong type",
                );
            }
        },
        None => HelloMeta::default(),
    };
    let user: UserId = match cx.cfg.auth.as_deref() {
        // Auth mode "none": the client names itself (development only; the
        // gateway warns loudly at start).
        None => match meta.user {
            Some(u) if channel::valid_id(&u) => UserId::new(&u),
            Some(_) => {
                return close(
                    out,
                    CloseCode::UNAUTHORIZED,
                    "hello.meta.user is not a valid id",
                );
            }
            None => return close(out, CloseCode::UNAUTHORIZED, "hello.meta.user is required"),
        },
        // Mode "jwt": the token names the user; hello's token wins over one
        // from the upgrade request (already verified, in `st.claims`).
        Some(v) => {
            let claims = match hello_token(cx, &mut meta) {
                Some(token) => match verify(cx, v, &token) {
                    Ok(c) => c,
                    Err(e) => return close(out, CloseCode::UNAUTHORIZED, e.reason()),
                },
                None => match st.claims.clone() {
                    Some(c) => c,
                    None => {
                        let e = AuthError::Missing;
                        cx.metrics.auth_failures[e.index()].fetch_add(1, Relaxed);
                        return close(out, CloseCode::UNAUTHORIZED, e.reason());
                    }
                },
            };
            if meta.user.as_deref().is_some_and(|u| u != &*claims.sub) {
                return close(
                    out,
                    CloseCode::UNAUTHORIZED,
                    "hello.meta.user differs from the token's sub",
                );
            }
            out.push(Action::Arm(Check::Expiry, expiry_at(cx, &claims)));
            let user = UserId::new(&claims.sub);
            st.claims = Some(claims);
            user
        }
    };
    let instance = match meta.instance {
        Some(i) if valid_instance(&i) => Some(Rc::<str>::from(i)),
        Some(_) => {
            return close(
                out,
                CloseCode::PROTOCOL_ERROR,
                "hello.meta.instance must match [A-Za-z0-9_-]{1,64}",
            );
        }
        None => None,
    };
    let since = meta.since.map(Since::from);
    let h = hooks::HelloState {
        id: env.id,
        user,
        instance,
        since,
    };
    if hooks::asked(cx, hooks::Hook::Connect) {
        let mut body = serde_json::json!({"user": &*h.user, "conn": cx.conn_name()});
        if let Some(c) = meta.client {
            body["client"] = c;
        }
        if let Some(i) = &h.instance {
            body["instance"] = (**i).into();
        }
        let user = h.user.clone();
        hooks::ask(
            st,
            hooks::Hook::Connect,
            user,
            body,
            hooks::Pending::Hello(Box::new(h)),
            out,
        );
        return;
    }
    welcome(st, cx, h, out);
}

/// Welcomes a checked `hello` (after the connect hook, if any).
fn welcome(st: &mut SessionState, cx: &Ctx<'_>, h: hooks::HelloState, out: &mut Vec<Action>) {
    let hooks::HelloState {
        id,
        user,
        instance,
        since,
    } = h;
    let cfg = cx.cfg;
    st.phase = Phase::Active;
    st.user = Some(user.clone());
    cx.metrics.sessions.fetch_add(1, Relaxed);
    // Auto-subscription to the user's own channel, made before welcome is queued.
    let own = user.channel().clone();
    // Most connections hold one or two channels: grow one at a time (a
    // plain push would reserve four).
    st.subs.reserve_exact(1);
    st.subs.push(own.clone());
    if instance.is_some() {
        st.extra().instance = instance;
    }
    out.push(Action::Presence(user, 1));
    out.push(Action::Arm(Check::Heartbeat, cx.now_ms + cfg.hb_ms));
    // `welcome` waits for the user's own stream when it must carry its
    // position (history on), the outcome of a recovery (`since`: the missed
    // direct messages follow it), or the subscription going live on a
    // remote backbone (a direct message sent after it then arrives).
    if since.is_some() || cfg.positions || cfg.welcome_after_live {
        st.extra().recovering.push(Recovering {
            ch: own.clone(),
            id,
            since,
            held: Vec::new(),
            welcome: true,
            presence: false,
        });
        out.push(Action::Subscribe {
            ch: own,
            ok: Some(id),
            presence: false,
        });
    } else {
        out.push(Action::Subscribe {
            ch: own,
            ok: None,
            presence: false,
        });
        // No history: the position is known without asking (§8.1).
        out.push(Action::Reply(welcome_envelope(st, cx, id, no_stream())));
    }
}

/// `welcome.meta.stream` where no history is kept.
fn no_stream() -> serde_json::Value {
    serde_json::json!({"epoch": "", "seq": 0})
}

/// The `welcome` answering `hello` `id`, with `stream` as `meta.stream`.
/// Written when it is sent, not kept while it waits.
fn welcome_envelope(
    st: &SessionState,
    cx: &Ctx<'_>,
    id: Option<u64>,
    stream: serde_json::Value,
) -> Envelope {
    let cfg = cx.cfg;
    let user = st.user.as_deref().unwrap_or_default();
    let mut meta = serde_json::json!({
        "conn": cx.conn_name(),
        "user": user,
        "node": cfg.node_id,
        "shard": cx.shard,
        "hb_ms": cfg.hb_ms,
        "max_frame": cfg.max_frame,
    });
    meta["stream"] = stream;
    if let Some(token) = cx.session {
        meta["session"] = token.into();
    }
    let mut welcome = Envelope::new(Type::Welcome);
    welcome.id = id;
    welcome.meta = Some(meta.to_string());
    welcome
}

/// The user's own channel is live (no `since`, no history): the `welcome`
/// that waited for it, then whatever arrived meanwhile.
fn welcome_live(st: &mut SessionState, cx: &Ctx<'_>, id: Option<u64>, out: &mut Vec<Action>) {
    let Some(x) = st.extra.as_mut() else { return };
    let Some(i) = x.recovering.iter().position(|r| r.id == id && r.welcome) else {
        return;
    };
    let p = x.recovering.swap_remove(i);
    if x.is_empty() {
        // An idle connection keeps no `Extra`.
        st.extra = None;
    }
    out.push(Action::Reply(welcome_envelope(st, cx, id, no_stream())));
    if !p.held.is_empty() {
        out.push(Action::Deliver(p.held));
    }
}

/// A checked `pub`: to the backbone, or (`ordered_publishes`) behind the
/// one that is with it. Ephemeral messages are never stored, so they wait
/// for nothing.
fn publish(st: &mut SessionState, cx: &Ctx<'_>, p: Pub, out: &mut Vec<Action>) {
    if !cx.cfg.ordered_publishes || p.ephemeral {
        return out.push(Action::Publish(p));
    }
    if !st.publishing {
        st.publishing = true;
        return out.push(Action::Publish(p));
    }
    let w = st.extra().waiting.get_or_insert_with(Box::default);
    if w.queued.len() < MAX_QUEUED_PUBLISHES && w.bytes + p.size() <= cx.cfg.outbound_queue_bytes {
        w.bytes += p.size();
        w.queued.push_back(p);
    } else {
        err(
            out,
            p.id,
            ErrCode::RateLimited,
            "too many publishes waiting for the stream",
        );
    }
}

/// The backbone's answer to a publish: `ok` (with the stored `seq`) or
/// `err`; then, with `ordered_publishes`, the next one goes — or, if this
/// one was refused, every one waiting behind it is refused too: sent
/// after a refused one, it would be stored before the client's retry of
/// that one, out of the client's order.
fn published(
    st: &mut SessionState,
    cx: &Ctx<'_>,
    id: Option<u64>,
    r: Result<Option<Stored>, Refused>,
    out: &mut Vec<Action>,
) {
    let refused = r.as_ref().err().copied();
    out.push(Action::Reply(match r {
        Ok(None) => Envelope::ok(id),
        Ok(Some(stored)) => {
            let mut ok = Envelope::ok(id);
            ok.seq = Some(stored.seq);
            if stored.duplicate {
                ok.meta = Some(r#"{"duplicate":true}"#.to_owned());
            }
            ok
        }
        Err(refused) => Envelope::err(id, refused.code, refused.reason),
    }));
    if !cx.cfg.ordered_publishes {
        return;
    }
    st.publishing = false;
    let Some(x) = st.extra.as_mut() else { return };
    let Some(mut w) = x.waiting.take() else {
        return;
    };
    match refused {
        Some(refused) => {
            for p in w.queued.drain(..) {
                out.push(Action::Reply(Envelope::err(
                    p.id,
                    refused.code,
                    refused.reason,
                )));
            }
        }
        None => {
            if let Some(p) = w.queued.pop_front() {
                w.bytes -= p.size();
                out.push(Action::Publish(p));
                st.publishing = true;
                if !w.queued.is_empty() {
                    x.waiting = Some(w);
                }
            }
        }
    }
    if x.is_empty() {
        st.extra = None;
    }
}

/// The position (and replay) of a subscription arrived: answer `ok` (or
/// `welcome`), then the replay, then the live messages held meanwhile —
/// each `seq` once, in order.
fn recovered(
    st: &mut SessionState,
    cx: &Ctx<'_>,
    id: Option<u64>,
    r: Recovery,
    out: &mut Vec<Action>,
) {
    let Some(x) = st.extra.as_mut() else { return };
    let Some(i) = x.recovering.iter().position(|p| p.id == id) else {
        return; // unsubscribed meanwhile
    };
    let p = x.recovering.swap_remove(i);
    if x.is_empty() {
        // An idle connection keeps no `Extra`.
        st.extra = None;
    }
    let has_history = !r.pos.epoch.is_empty();
    let mut meta = serde_json::Map::new();
    if has_history {
        meta.insert("epoch".into(), (*r.pos.epoch).into());
    }
    let mut replay = Vec::new();
    // A client with no position yet asks with an empty epoch, for the
    // position only: its `recovered: false` is not a failed recovery.
    let count = |k: usize| {
        if p.since
            .as_ref()
            .is_none_or(|s| s.epoch.as_deref() != Some(""))
        {
            cx.metrics.recoveries[k].fetch_add(1, Relaxed);
        }
    };
    if p.since.is_some() {
        match r.replay {
            Ok(list) => {
                meta.insert("recovered".into(), true.into());
                count(0);
                replay = list;
            }
            Err(why) => {
                meta.insert("recovered".into(), false.into());
                meta.insert("reason".into(), why.reason().into());
                if let Unrecovered::Expired { oldest } = why {
                    meta.insert("oldest".into(), oldest.into());
                }
                let k = match why {
                    Unrecovered::EpochChanged => 1,
                    Unrecovered::Expired { .. } => 2,
                    Unrecovered::TooMany => 3,
                    Unrecovered::Unavailable => 4,
                };
                count(k);
            }
        }
    }
    match p.welcome {
        true => {
            // welcome.meta.stream = {epoch, seq, recovered?, reason?,
            // oldest?}: in every welcome, the outcome only for a `since`.
            if !has_history {
                meta.insert("epoch".into(), "".into());
            }
            meta.insert("seq".into(), r.pos.top.into());
            let stream = serde_json::Value::Object(meta);
            out.push(Action::Reply(welcome_envelope(st, cx, id, stream)));
        }
        false => {
            let mut ok = Envelope::ok(id);
            if has_history {
                ok.seq = Some(r.pos.top);
            }
            if p.presence {
                meta.insert("present".into(), r.present.unwrap_or(0).into());
            }
            if !meta.is_empty() {
                ok.meta = Some(serde_json::Value::Object(meta).to_string());
            }
            out.push(Action::Reply(ok));
            if p.presence {
                out.push(Action::Watch(p.ch.clone()));
            }
        }
    }
    match merge(r.pos.top, replay, p.held, r.contiguous) {
        Ok(list) if list.is_empty() => {}
        Ok(list) => out.push(Action::Deliver(list)),
        Err(Gap) => close(
            out,
            CloseCode::INSUFFICIENT_STATE,
            "gap between the replay and live messages",
        ),
    }
}

/// The replay (every message after the client's position up to `top`, in
/// order) followed by the live messages held meanwhile that come after
/// `top`: a held message at or below `top` is in the replay already (or
/// came before the client's `ok`), so it is dropped. With `contiguous`
/// seqs, a held message that skips one is a gap nobody can fill here
/// (`Err`); otherwise the backbone vouches that none is skipped. Messages
/// without a `seq` (a backbone without history) all pass, in order.
pub fn merge(
    top: u64,
    mut replay: Vec<Arc<Envelope>>,
    held: Vec<Arc<Envelope>>,
    contiguous: bool,
) -> Result<Vec<Arc<Envelope>>, Gap> {
    let mut last = top;
    for env in held {
        match env.seq {
            None => replay.push(env),
            Some(s) if s <= last => {} // a duplicate
            Some(s) if !contiguous || s == last + 1 => {
                last = s;
                replay.push(env);
            }
            Some(_) => return Err(Gap),
        }
    }
    Ok(replay)
}

/// Token refresh (docs/protocol.md, "Token refresh"): a `hello` after
/// `welcome` carrying a fresh token for the same `sub` replaces the claims
/// and is answered `ok`; anything wrong is an `err` and the old token stays
/// in force until it expires.
fn refresh(
    st: &mut SessionState,
    cx: &Ctx<'_>,
    user: &UserId,
    env: Envelope,
    out: &mut Vec<Action>,
) {
    let id = env.id;
    let Some(v) = cx.cfg.auth.as_deref() else {
        return err(out, id, ErrCode::BadRequest, "already welcomed");
    };
    let mut meta: HelloMeta = match env.meta.as_deref() {
        Some(text) => match serde_json::from_str(text) {
            Ok(m) => m,
            Err(_) => {
                return err(
                    out,
                    id,
                    ErrCode::BadRequest,
                    "hello.meta has fields of the wrong type",
                );
            }
        },
        None => HelloMeta::default(),
    };
    let Some(token) = hello_token(cx, &mut meta) else {
        return err(out, id, ErrCode::BadRequest, "already welcomed");
    };
    let claims = match verify(cx, v, &token) {
        Ok(c) => c,
        Err(e) => return err(out, id, ErrCode::Unauthorized, e.reason()),
    };
    if *claims.sub != **user {
        return err(out, id, ErrCode::Unauthorized, "token is for another user");
    }
    let old_exp = st.claims.as_ref().map_or(u64::MAX, |c| c.exp_unix_ms);
    // The armed check finds the later exp and re-arms itself; only an
    // earlier exp needs a check of its own.
    if claims.exp_unix_ms < old_exp {
        out.push(Action::Arm(Check::Expiry, expiry_at(cx, &claims)));
    }
    // Rooms the new token no longer grants are left.
    if cx.cfg.room_policy == RoomPolicy::Claims {
        let grants: Vec<Name> = st.hooks().map(|h| h.grants.clone()).unwrap_or_default();
        st.subs.retain(|ch| {
            let granted = grants.contains(ch);
            let lost = !granted
                && matches!(channel::parse(ch), Ok(Channel::Room(r)) if !claims.allows_room(r));
            if lost {
                out.push(Action::Unsubscribe(ch.clone()));
            }
            !lost
        });
    }
    st.claims = Some(claims);
    cx.metrics.auth_refreshes.fetch_add(1, Relaxed);
    out.push(Action::Reply(Envelope::ok(id)));
}

/// May this session use room `room`? (`[rooms] policy`; "claims" needs
/// token claims, which auth mode "none" never has.)
fn room_allowed(st: &SessionState, cx: &Ctx<'_>, room: &str) -> bool {
    match cx.cfg.room_policy {
        RoomPolicy::Open => true,
        RoomPolicy::Claims => st.claims.as_ref().is_some_and(|c| c.allows_room(room)),
    }
}

fn active(st: &mut SessionState, cx: &Ctx<'_>, mut env: Envelope, out: &mut Vec<Action>) {
    let Some(user) = st.user.clone() else {
        return close(out, CloseCode::PROTOCOL_ERROR, "no user");
    };
    let id = env.id;
    match env.t {
        Type::Ping => out.push(Action::Reply(Envelope::pong(id))),
        Type::Pong => {}
        Type::Hello => refresh(st, cx, &user, env, out),
        Type::Sub | Type::Unsub | Type::Pub | Type::Req | Type::Presence | Type::History => {
            let Some(ch) = env.ch.take() else {
                return err(out, id, ErrCode::BadRequest, "ch is required");
            };
            let parsed = match channel::parse(&ch) {
                Ok(c) => c,
                Err(e) => return err(out, id, ErrCode::BadChannel, &e.to_string()),
            };
            match env.t {
                Type::Sub => sub(st, cx, &user, (id, env.meta.as_deref()), &ch, parsed, out),
                Type::Presence => presence_query(st, cx, id, env.meta.as_deref(), &ch, parsed, out),
                Type::History => {
                    history_page(st, cx, &user, id, env.meta.as_deref(), &ch, parsed, out)
                }
                Type::Unsub => match st.subs.iter().position(|c| **c == *ch) {
                    Some(i) => {
                        let ch = st.subs.swap_remove(i);
                        if let Some(x) = st.extra.as_mut() {
                            x.recovering.retain(|r| r.ch != ch);
                            if let Some(h) = x.hooks.as_mut() {
                                h.grants.retain(|g| *g != ch);
                                if h.is_empty() {
                                    x.hooks = None;
                                }
                            }
                            if x.is_empty() {
                                st.extra = None;
                            }
                        }
                        out.push(Action::Unsubscribe(ch));
                        out.push(Action::Reply(Envelope::ok(id)));
                    }
                    None => err(out, id, ErrCode::NotSubscribed, "not subscribed"),
                },
                Type::Pub => match parsed {
                    Channel::Svc(_) => {
                        err(out, id, ErrCode::BadRequest, "use req for svc: channels")
                    }
                    Channel::Room(r) if !room_allowed(st, cx, r) && !granted(st, &ch) => err(
                        out,
                        id,
                        ErrCode::Forbidden,
                        "not allowed to publish to this room",
                    ),
                    _ => {
                        let ephemeral =
                            match env.meta.as_deref().map(serde_json::from_str::<PubMeta>) {
                                None => false,
                                Some(Ok(m)) => m.ephemeral.unwrap_or(false),
                                Some(Err(_)) => {
                                    return err(
                                        out,
                                        id,
                                        ErrCode::BadRequest,
                                        "pub.meta.ephemeral must be a boolean",
                                    );
                                }
                            };
                        // Publish ids are scoped to the client instance
                        // (kept across reconnects) or else the connection;
                        // an ephemeral message is never stored, so it has
                        // no key.
                        let key = id.filter(|_| !ephemeral).map(|id| {
                            let instance = st.extra.as_ref().and_then(|x| x.instance.clone());
                            match instance {
                                Some(i) => format!("{}:{i}:{id}", &*user),
                                None => format!("{}:{}:{id}", &*user, cx.conn_name()),
                            }
                        });
                        let p = Pub {
                            ch,
                            from: user,
                            id,
                            payload: env.payload,
                            key,
                            ephemeral,
                        };
                        if hooks::asked(cx, hooks::Hook::Publish) {
                            let mut body = serde_json::Map::new();
                            body.insert("user".into(), (*p.from).into());
                            body.insert("conn".into(), cx.conn_name().into());
                            body.insert("ch".into(), p.ch.as_str().into());
                            body.insert("ephemeral".into(), p.ephemeral.into());
                            hooks::payload_field(&mut body, &p.payload);
                            let user = p.from.clone();
                            let what = hooks::Pending::Pub(p, None);
                            hooks::ask(st, hooks::Hook::Publish, user, body.into(), what, out);
                            return;
                        }
                        publish(st, cx, p, out)
                    }
                },
                _ => match parsed {
                    Channel::Svc(name) => out.push(Action::Request {
                        service: name.to_owned(),
                        user,
                        id,
                        payload: env.payload,
                    }),
                    _ => err(out, id, ErrCode::BadChannel, "req needs a svc: channel"),
                },
            }
        }
        Type::Welcome
        | Type::Ok
        | Type::Err
        | Type::Msg
        | Type::Reply
        | Type::Bye
        | Type::Members => close(
            out,
            CloseCode::PROTOCOL_ERROR,
            "server-only envelope type from a client",
        ),
    }
}

fn sub(
    st: &mut SessionState,
    cx: &Ctx<'_>,
    user: &str,
    (id, meta): (Option<u64>, Option<&str>),
    ch: &str,
    parsed: Channel<'_>,
    out: &mut Vec<Action>,
) {
    let (since, presence, token) = match meta.map(serde_json::from_str::<SubMeta>) {
        None => (None, false, None),
        Some(Ok(m)) => (
            m.since.map(Since::from),
            m.presence.unwrap_or(false),
            m.token,
        ),
        Some(Err(_)) => {
            return err(
                out,
                id,
                ErrCode::BadRequest,
                "sub.meta must be {\"since\"?: {\"seq\": number, \"epoch\"?: string}, \"presence\"?: boolean, \"token\"?: string}",
            );
        }
    };
    if presence && !matches!(parsed, Channel::Room(_)) {
        return err(
            out,
            id,
            ErrCode::BadRequest,
            "meta.presence is for room: channels",
        );
    }
    if presence && !cx.cfg.presence {
        return err(
            out,
            id,
            ErrCode::BadRequest,
            "presence is off on this gateway",
        );
    }
    let ch_rc = Name::from(ch);
    if let Some(token) = token {
        // A channel token decides alone: no room policy, no hook.
        if let Err(reason) = channel_token(cx, user, ch, parsed, &token) {
            return err(out, id, ErrCode::Forbidden, &reason);
        }
        let h = st.hooks_mut();
        if !h.grants.contains(&ch_rc) {
            h.grants.push(ch_rc.clone());
        }
        return subscribe(st, cx, (id, ch_rc, since, presence), out);
    }
    let allowed = match parsed {
        Channel::User(u) => u == user,
        Channel::Room(r) => room_allowed(st, cx, r) || granted(st, ch),
        Channel::Svc(_) => false,
    };
    if !allowed {
        return err(
            out,
            id,
            ErrCode::Forbidden,
            "not allowed to subscribe to this channel",
        );
    }
    let ask = matches!(parsed, Channel::Room(_))
        && hooks::asked(cx, hooks::Hook::Subscribe)
        && !st.subs.iter().any(|c| **c == *ch)
        && !granted(st, ch);
    if ask {
        if full(st, cx, id, out) {
            return;
        }
        let body = serde_json::json!({"user": user, "conn": cx.conn_name(), "ch": ch});
        let what = hooks::Pending::Sub {
            id,
            ch: ch_rc,
            since,
            presence,
        };
        hooks::ask(
            st,
            hooks::Hook::Subscribe,
            UserId::new(user),
            body,
            what,
            out,
        );
        return;
    }
    subscribe(st, cx, (id, ch_rc, since, presence), out);
}

/// True (and the `err` queued) when the connection holds as many
/// subscriptions as it may.
fn full(st: &SessionState, cx: &Ctx<'_>, id: Option<u64>, out: &mut Vec<Action>) -> bool {
    let full = st.subs.len() >= cx.cfg.max_subscriptions;
    if full {
        err(
            out,
            id,
            ErrCode::TooLarge,
            "too many subscriptions on this connection",
        );
    }
    full
}

/// True when a channel token granted `ch` to this connection.
fn granted(st: &SessionState, ch: &str) -> bool {
    st.hooks()
        .is_some_and(|h| h.grants.iter().any(|g| **g == *ch))
}

/// Checks a channel token for `user` on `ch`; the refusal's reason.
fn channel_token(
    cx: &Ctx<'_>,
    user: &str,
    ch: &str,
    parsed: Channel<'_>,
    token: &str,
) -> Result<(), String> {
    if !matches!(parsed, Channel::Room(_)) {
        return Err("channel tokens are for room: channels".into());
    }
    let Some(v) = cx.cfg.auth.as_deref() else {
        return Err("channel tokens need auth.mode = \"jwt\"".into());
    };
    let c = v
        .verify_channel(token, cx.unix_ms)
        .map_err(|e| format!("channel token refused: {}", e.reason()))?;
    if c.sub != user {
        return Err("channel token is for another user".into());
    }
    if c.ch != ch {
        return Err("channel token is for another channel".into());
    }
    Ok(())
}

/// Subscribes to an allowed channel (idempotent; bounded per connection):
/// the `sub`'s id, the channel, its `since` and whether it watches presence.
fn subscribe(
    st: &mut SessionState,
    cx: &Ctx<'_>,
    (id, ch, since, presence): (Option<u64>, Name, Option<Since>, bool),
    out: &mut Vec<Action>,
) {
    if st.subs.contains(&ch) {
        // Already subscribed (and live): idempotent.
        return out.push(Action::Reply(Envelope::ok(id)));
    }
    if full(st, cx, id, out) {
        return;
    }
    // Most connections hold one or two channels: grow one at a time.
    st.subs.reserve_exact(1);
    st.subs.push(ch.clone());
    st.extra().recovering.push(Recovering {
        ch: ch.clone(),
        id,
        since,
        held: Vec::new(),
        welcome: false,
        presence,
    });
    out.push(Action::Subscribe {
        ch,
        ok: Some(id),
        presence,
    });
}

/// A `limit` from a query's `meta`: an integer in `1..=max`, `default`
/// when absent.
fn query_limit(v: Option<&serde_json::Value>, default: usize, max: usize) -> Result<usize, String> {
    match v {
        None => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=max as u64).contains(&n) => Ok(n as usize),
            _ => Err(format!("meta.limit must be an integer from 1 to {max}")),
        },
    }
}

/// A query's `meta` as an object (absent: empty).
fn query_meta(meta: Option<&str>) -> serde_json::Map<String, serde_json::Value> {
    meta.and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or_default()
}

/// `presence` (docs/protocol.md, "Presence"): who is in a room, or whether
/// a user is online; allowed as a subscription to the room would be (none
/// is needed), and for any user's `user:` channel.
fn presence_query(
    st: &SessionState,
    cx: &Ctx<'_>,
    id: Option<u64>,
    meta: Option<&str>,
    ch: &str,
    parsed: Channel<'_>,
    out: &mut Vec<Action>,
) {
    match parsed {
        Channel::Svc(_) => {
            return err(
                out,
                id,
                ErrCode::BadChannel,
                "presence needs a room: or user: channel",
            );
        }
        Channel::Room(r) if !room_allowed(st, cx, r) => {
            return err(out, id, ErrCode::Forbidden, "not allowed to use this room");
        }
        _ => {}
    }
    if !cx.cfg.presence {
        return err(
            out,
            id,
            ErrCode::BadRequest,
            "presence is off on this gateway",
        );
    }
    let meta = query_meta(meta);
    let limit = match query_limit(meta.get("limit"), QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX) {
        Ok(n) => n,
        Err(why) => return err(out, id, ErrCode::BadRequest, &why),
    };
    let after = match meta.get("after") {
        None => None,
        Some(serde_json::Value::String(a)) => Some(a.clone()),
        Some(_) => return err(out, id, ErrCode::BadRequest, "meta.after must be a string"),
    };
    out.push(Action::PresenceQuery {
        ch: ch.to_owned(),
        limit,
        after,
        id,
    });
}

/// `history` (docs/protocol.md, "History pages"): a page of a channel's
/// stored messages; allowed as a subscription would be (none is needed).
#[allow(clippy::too_many_arguments)]
fn history_page(
    st: &SessionState,
    cx: &Ctx<'_>,
    user: &str,
    id: Option<u64>,
    meta: Option<&str>,
    ch: &str,
    parsed: Channel<'_>,
    out: &mut Vec<Action>,
) {
    let allowed = match parsed {
        Channel::Svc(_) => {
            return err(
                out,
                id,
                ErrCode::BadChannel,
                "history needs a room: or user: channel",
            );
        }
        Channel::User(u) => u == user,
        Channel::Room(r) => room_allowed(st, cx, r),
    };
    if !allowed {
        return err(
            out,
            id,
            ErrCode::Forbidden,
            "not allowed to read this channel's history",
        );
    }
    let meta = query_meta(meta);
    let limit = match query_limit(meta.get("limit"), PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX) {
        Ok(n) => n,
        Err(why) => return err(out, id, ErrCode::BadRequest, &why),
    };
    let before = match meta.get("before") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(b) => Some(b),
            None => {
                return err(
                    out,
                    id,
                    ErrCode::BadRequest,
                    "meta.before must be an integer seq (u64)",
                );
            }
        },
    };
    if !cx.cfg.positions {
        // History is off: nothing to read, and the reply says so.
        return out.push(Action::Reply(reply(id, page_json(&Page::unavailable()))));
    }
    out.push(Action::HistoryPage {
        ch: ch.to_owned(),
        limit,
        before,
        id,
    });
}

/// A timer check: what it means is decided here; the wheel only keeps time.
fn on_check(
    st: &SessionState,
    cx: &Ctx<'_>,
    check: Check,
    last_rx_ms: u64,
    pinged_ms: u64,
    out: &mut Vec<Action>,
) {
    let now = cx.now_ms;
    let cfg = cx.cfg;
    match check {
        Check::Hello => {
            if st.phase == Phase::Hello {
                close(out, CloseCode::UNAUTHORIZED, "hello timeout");
            }
        }
        Check::Drain => close(out, CloseCode::GOING_AWAY, "going away"),
        Check::Expiry => {
            // Lazy, like the heartbeat: a refreshed token moved `exp`, so
            // look again rather than trust the deadline armed.
            let Some(claims) = st.claims.as_ref() else {
                return;
            };
            let leeway = cfg.auth.as_ref().map_or(0, |v| v.leeway_ms());
            let deadline = claims.exp_unix_ms.saturating_add(leeway);
            if cx.unix_ms >= deadline {
                close(out, CloseCode::TOKEN_EXPIRED, "token expired");
            } else {
                out.push(Action::Arm(Check::Expiry, now + (deadline - cx.unix_ms)));
            }
        }
        Check::Heartbeat => {
            if st.phase != Phase::Active {
                return;
            }
            let silent = now.saturating_sub(last_rx_ms);
            if silent >= cfg.idle_ms {
                return close(out, CloseCode::HEARTBEAT_TIMEOUT, "heartbeat timeout");
            }
            let next = if silent >= cfg.hb_ms {
                // One ping per silent heartbeat interval.
                if pinged_ms <= last_rx_ms || now - pinged_ms >= cfg.hb_ms {
                    out.push(Action::Ping);
                }
                (last_rx_ms + cfg.idle_ms).min(now + cfg.hb_ms)
            } else {
                last_rx_ms + cfg.hb_ms
            };
            out.push(Action::Arm(Check::Heartbeat, next));
        }
    }
}

pub mod hooks;
mod name;
pub use name::Name;

#[cfg(test)]
mod tests;
