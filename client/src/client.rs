//! The reconnecting client: a background task that keeps one session alive,
//! following [`ReconnectPolicy`] after every disconnect, re-subscribing its
//! channels, and reporting [`Event`]s.
//!
//! Chat features (docs/protocol.md §8): [`ClientHandle::subscribe_presence`]
//! watches a room's presence ([`Event::Present`], then [`Event::Members`]),
//! [`ClientHandle::query_presence`] and [`ClientHandle::history`] ask for a
//! page (the `reply` comes as [`Event::Message`]; [`PresencePage::parse`]
//! and [`HistoryPage::parse`] read it), and
//! [`ClientHandle::publish_ephemeral`] sends what is never stored.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use edgegate_proto::{Envelope, Payload, Type};
use tokio::sync::mpsc;

use crate::conn::{ClientConfig, Connection, Error, Position, StreamState, Welcome};
use crate::policy::{Action, CloseInfo, ReconnectPolicy, StopReason};

/// Token refresh hook: called with the close code (4001 or 4008) before the
/// next attempt; `Some(token)` replaces the token, `None` keeps the old one.
pub type TokenRefresh =
    Arc<dyn Fn(u16) -> Pin<Box<dyn Future<Output = Option<String>> + Send>> + Send + Sync>;

/// What happened, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A session reached `welcome`.
    Connected(Welcome),
    /// A session ended or a connect attempt failed.
    Disconnected {
        /// The close code, when the server sent `bye` or a close frame.
        code: Option<u16>,
        /// Human-readable cause.
        reason: String,
        /// `bye.meta.retry_ms`, when the server sent one.
        retry_ms: Option<u64>,
        /// When the client will try again; `None`: it will not (see [`Event::Stopped`]).
        retry_in: Option<Duration>,
    },
    /// A `sub` sent by the client (first time or re-subscription after a
    /// reconnect) was answered `ok`: messages published from now on arrive.
    Subscribed(String),
    /// The `ok` of a presence subscription: users present in the room.
    /// `members` follow it (at most once: after a reconnect this comes
    /// again, and the application queries again).
    Present {
        /// The room.
        ch: String,
        /// Users present.
        present: u64,
    },
    /// A room's presence changed (`members`, batched by the gateway).
    Members {
        /// The room.
        ch: String,
        /// Users present now.
        present: u64,
        /// Who came (`None` in rooms past the gateway's `diff_limit`).
        join: Option<Vec<String>>,
        /// Who left.
        leave: Option<Vec<String>>,
    },
    /// A `sub` was refused with `err` (code name or number); the channel is dropped from the set.
    SubscribeFailed {
        /// The channel.
        ch: String,
        /// The `err` code.
        code: String,
    },
    /// A subscription (or, for the user's own `user:<id>` channel, the
    /// session) came back without what was missed while disconnected: the
    /// application must resynchronise `ch` from its core service.
    Unrecovered {
        /// The channel.
        ch: String,
        /// `epoch_changed`, `expired`, `too_many` or `unavailable`.
        reason: String,
        /// With `expired`: the oldest `seq` the gateway still has.
        oldest: Option<u64>,
    },
    /// Any other envelope from the server (`msg`, `ok`, `err`, `reply`, `pong`).
    /// A `msg` whose `seq` was seen already (a replay overlapping what
    /// arrived before a reconnect) is dropped, not reported.
    Message(Envelope),
    /// The client stopped for good; no more events follow.
    Stopped(StopReason),
}

enum Command {
    /// A channel, and whether to watch its presence.
    Subscribe(String, bool),
    Unsubscribe(String),
    Send(Envelope),
    Close,
}

/// Handle to a reconnecting client. Cloneable parts live in [`ClientHandle`].
pub struct Client {
    handle: ClientHandle,
    events: mpsc::UnboundedReceiver<Event>,
    stats: Arc<ResumeStats>,
}

/// What resuming after reconnects did, counted.
#[derive(Debug, Default)]
pub struct ResumeStats {
    /// Messages dropped because their `seq` had been delivered already.
    pub redeliveries_dropped: std::sync::atomic::AtomicU64,
    /// Publishes sent again after a reconnect (no `ok` had come).
    pub publishes_resent: std::sync::atomic::AtomicU64,
}

/// Sends commands to the client task; cheap to clone.
#[derive(Clone)]
pub struct ClientHandle {
    cmd: mpsc::UnboundedSender<Command>,
    ids: Arc<std::sync::atomic::AtomicU64>,
}

/// Outbox bound: envelopes sent while disconnected are queued up to this many
/// and sent after the next `welcome` (the oldest are dropped beyond it).
pub const OUTBOX_LIMIT: usize = 1024;

/// Request ids the handle assigns start here, far from the connection's own
/// (`hello`, `sub` use small per-connection ids).
const HANDLE_ID_BASE: u64 = 1 << 40;

impl Client {
    /// Starts the client task on the current tokio runtime.
    pub fn start(config: ClientConfig) -> Client {
        Self::start_with(config, None)
    }

    /// Starts the client task with a token-refresh hook.
    pub fn start_with(config: ClientConfig, token_refresh: Option<TokenRefresh>) -> Client {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let policy = match config.seed {
            Some(s) => ReconnectPolicy::with_seed(config.backoff.clone(), s),
            None => ReconnectPolicy::new(config.backoff.clone()),
        };
        let mut config = config;
        // One instance per client: a publish resent after a reconnect keeps
        // its id and is stored once.
        config
            .instance
            .get_or_insert_with(|| format!("c{:016x}", fastrand::u64(..)));
        let stats = Arc::new(ResumeStats::default());
        let task = Task {
            config,
            policy,
            token_refresh,
            rooms: BTreeMap::new(),
            outbox: VecDeque::new(),
            unacked: BTreeMap::new(),
            positions: HashMap::new(),
            own: None,
            stats: stats.clone(),
            cmd: cmd_rx,
            events: ev_tx,
        };
        tokio::spawn(task.run());
        Client {
            handle: ClientHandle {
                cmd: cmd_tx,
                ids: Arc::new(std::sync::atomic::AtomicU64::new(HANDLE_ID_BASE)),
            },
            events: ev_rx,
            stats,
        }
    }

    /// Counters of what resuming did (redeliveries dropped, publishes resent).
    pub fn stats(&self) -> &ResumeStats {
        &self.stats
    }

    /// The next event; `None` after [`Event::Stopped`].
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// A handle for sending commands from elsewhere.
    pub fn handle(&self) -> ClientHandle {
        self.handle.clone()
    }

    /// See [`ClientHandle::subscribe`].
    pub fn subscribe(&self, ch: &str) {
        self.handle.subscribe(ch)
    }

    /// See [`ClientHandle::subscribe_presence`].
    pub fn subscribe_presence(&self, ch: &str) {
        self.handle.subscribe_presence(ch)
    }

    /// See [`ClientHandle::unsubscribe`].
    pub fn unsubscribe(&self, ch: &str) {
        self.handle.unsubscribe(ch)
    }

    /// See [`ClientHandle::publish`].
    pub fn publish(&self, ch: &str, payload: Payload) -> u64 {
        self.handle.publish(ch, payload)
    }

    /// See [`ClientHandle::close`].
    pub fn close(&self) {
        self.handle.close()
    }
}

impl ClientHandle {
    /// Adds `ch` to the client's channel set and subscribes now if connected;
    /// the set is re-subscribed after every reconnect. [`Event::Subscribed`] follows.
    pub fn subscribe(&self, ch: &str) {
        let _ = self.cmd.send(Command::Subscribe(ch.to_string(), false));
    }

    /// Like [`subscribe`](Self::subscribe), and watches the room's
    /// presence: [`Event::Present`] with its `ok`, [`Event::Members`] after.
    pub fn subscribe_presence(&self, ch: &str) {
        let _ = self.cmd.send(Command::Subscribe(ch.to_string(), true));
    }

    /// Publishes an ephemeral message (typing, read markers): delivered to
    /// the channel's current subscribers, never stored, no `seq`, and not
    /// sent again after a reconnect. Returns the `pub` id.
    pub fn publish_ephemeral(&self, ch: &str, payload: Payload) -> u64 {
        let mut e = Envelope::new(Type::Pub);
        e.ch = Some(ch.to_string());
        e.payload = payload;
        e.meta = Some(EPHEMERAL.to_string());
        self.send(e)
    }

    /// Asks who is present in a room (`limit` users after `after`), or
    /// whether a user is online (`user:<id>`); the `reply` with the returned
    /// id comes as [`Event::Message`] ([`PresencePage::parse`]).
    pub fn query_presence(&self, ch: &str, limit: Option<u32>, after: Option<&str>) -> u64 {
        let mut meta = serde_json::Map::new();
        if let Some(l) = limit {
            meta.insert("limit".into(), l.into());
        }
        if let Some(a) = after {
            meta.insert("after".into(), a.into());
        }
        self.send(query(Type::Presence, ch, meta))
    }

    /// Asks for the newest `limit` stored messages of `ch` before `before`;
    /// the `reply` comes as [`Event::Message`] ([`HistoryPage::parse`]).
    pub fn history(&self, ch: &str, limit: Option<u32>, before: Option<u64>) -> u64 {
        let mut meta = serde_json::Map::new();
        if let Some(l) = limit {
            meta.insert("limit".into(), l.into());
        }
        if let Some(b) = before {
            meta.insert("before".into(), b.into());
        }
        self.send(query(Type::History, ch, meta))
    }

    /// Removes `ch` from the set and unsubscribes if connected.
    pub fn unsubscribe(&self, ch: &str) {
        let _ = self.cmd.send(Command::Unsubscribe(ch.to_string()));
    }

    /// Publishes to `ch`; returns the `pub` id (echoed by `ok` and by the `msg` subscribers get).
    /// While disconnected the envelope waits in a bounded outbox.
    pub fn publish(&self, ch: &str, payload: Payload) -> u64 {
        let mut e = Envelope::new(Type::Pub);
        e.ch = Some(ch.to_string());
        e.payload = payload;
        self.send(e)
    }

    /// Sends an arbitrary envelope, assigning an id when it has none; returns the id.
    pub fn send(&self, mut env: Envelope) -> u64 {
        let id = match env.id {
            Some(id) => id,
            None => {
                let id = self.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                env.id = Some(id);
                id
            }
        };
        let _ = self.cmd.send(Command::Send(env));
        id
    }

    /// Closes the session and stops reconnecting; [`Event::Stopped`]`(Closed)` follows.
    pub fn close(&self) {
        let _ = self.cmd.send(Command::Close);
    }
}

/// `meta` of an ephemeral `pub` (and of the `msg` subscribers get).
const EPHEMERAL: &str = r#"{"ephemeral":true}"#;

fn query(t: Type, ch: &str, meta: serde_json::Map<String, serde_json::Value>) -> Envelope {
    let mut e = Envelope::new(t);
    e.ch = Some(ch.to_string());
    if !meta.is_empty() {
        e.meta = Some(serde_json::Value::Object(meta).to_string());
    }
    e
}

/// A presence query's answer (`reply.d`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct PresencePage {
    /// Users present in all.
    pub total: u64,
    /// User ids in byte order.
    pub users: Vec<String>,
    /// Pass as `after` for the next page; `None` on the last one.
    pub next: Option<String>,
}

impl PresencePage {
    /// Reads a `reply` to [`ClientHandle::query_presence`].
    pub fn parse(reply: &Envelope) -> Option<PresencePage> {
        serde_json::from_slice(reply.payload.bytes()).ok()
    }
}

/// One message of a history page.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct PageMessage {
    /// Its position.
    pub seq: u64,
    /// Its publisher.
    pub from: Option<String>,
    /// A JSON payload.
    pub d: Option<serde_json::Value>,
    /// Another payload, base64.
    pub db: Option<String>,
}

/// A history page (`reply.d`).
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct HistoryPage {
    /// The stream's epoch.
    pub epoch: String,
    /// Its latest `seq`.
    pub top: u64,
    /// Oldest first.
    pub messages: Vec<PageMessage>,
    /// Older ones are still kept.
    pub more: bool,
    /// `unavailable` without history.
    pub reason: Option<String>,
}

impl HistoryPage {
    /// Reads a `reply` to [`ClientHandle::history`].
    pub fn parse(reply: &Envelope) -> Option<HistoryPage> {
        serde_json::from_slice(reply.payload.bytes()).ok()
    }
}

struct Task {
    config: ClientConfig,
    policy: ReconnectPolicy,
    token_refresh: Option<TokenRefresh>,
    /// Channels, and whether each watches its presence.
    rooms: BTreeMap<String, bool>,
    outbox: VecDeque<Envelope>,
    /// Publishes sent and not yet answered, by id: resent (same id, same
    /// instance) after a reconnect.
    unacked: BTreeMap<u64, Envelope>,
    /// The last position seen per subscribed channel.
    positions: HashMap<String, Position>,
    /// The user's own channel (`user:<id>`), once known.
    own: Option<String>,
    stats: Arc<ResumeStats>,
    cmd: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
}

/// Queues an envelope for the next session, dropping the oldest beyond [`OUTBOX_LIMIT`].
fn push_bounded(outbox: &mut VecDeque<Envelope>, e: Envelope) {
    if outbox.len() >= OUTBOX_LIMIT {
        outbox.pop_front();
    }
    outbox.push_back(e);
}

/// Applies Subscribe / Unsubscribe to the channel set.
fn apply_set(rooms: &mut BTreeMap<String, bool>, c: Command) {
    match c {
        Command::Subscribe(ch, presence) => {
            *rooms.entry(ch).or_default() |= presence;
        }
        Command::Unsubscribe(ch) => {
            rooms.remove(&ch);
        }
        Command::Send(_) | Command::Close => {}
    }
}

enum SessionEnd {
    Lost(Error),
    Closed,
}

impl Task {
    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    /// Remembers a publish until its answer comes (bounded like the
    /// outbox); an ephemeral one is not worth sending again late.
    fn track_publish(&mut self, e: &Envelope) {
        if e.t == Type::Pub
            && e.meta.as_deref() != Some(EPHEMERAL)
            && let Some(id) = e.id
        {
            if self.unacked.len() >= OUTBOX_LIMIT {
                self.unacked.pop_first();
            }
            self.unacked.insert(id, e.clone());
        }
    }

    /// `welcome`: the user's own stream, recovered or not.
    fn on_welcome(&mut self, w: &Welcome) {
        let own = format!("user:{}", w.user);
        if let Some(st) = &w.stream {
            self.update(&own, st);
        }
        self.own = Some(own);
    }

    /// `ok` to a `sub`: the stream's position and the recovery's outcome
    /// (and, for a presence subscription, the room's count).
    fn on_sub_ok(&mut self, ch: &str, ok: &Envelope) {
        let meta: serde_json::Value = ok
            .meta
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok())
            .unwrap_or_default();
        let st = StreamState::parse(&meta, ok.seq);
        self.update(ch, &st);
        self.emit(Event::Subscribed(ch.to_string()));
        if let Some(present) = meta.get("present").and_then(|p| p.as_u64()) {
            self.emit(Event::Present {
                ch: ch.to_string(),
                present,
            });
        }
    }

    /// A `members` envelope, as an event.
    fn on_members(&self, env: &Envelope) {
        let meta: serde_json::Value = env
            .meta
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok())
            .unwrap_or_default();
        let list = |k: &str| {
            meta.get(k).and_then(|v| v.as_array()).map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str().map(str::to_string))
                    .collect()
            })
        };
        self.emit(Event::Members {
            ch: env.ch.clone().unwrap_or_default(),
            present: meta.get("present").and_then(|p| p.as_u64()).unwrap_or(0),
            join: list("join"),
            leave: list("leave"),
        });
    }

    /// Applies a position answer: recovered keeps the client's position
    /// (the replay follows); otherwise the application is told, and the
    /// position starts at the stream's top.
    fn update(&mut self, ch: &str, st: &StreamState) {
        // Only a client that had a position can have missed something.
        let had = self.positions.contains_key(ch);
        if st.epoch.is_empty() {
            if had && st.recovered == Some(false) {
                self.emit(Event::Unrecovered {
                    ch: ch.to_string(),
                    reason: st.reason.clone().unwrap_or_default(),
                    oldest: st.oldest,
                });
            }
            return; // no history behind this gateway
        }
        match st.recovered {
            Some(true) => {
                if let Some(p) = self.positions.get_mut(ch) {
                    p.epoch = Some(st.epoch.clone());
                }
            }
            recovered => {
                if had && recovered == Some(false) {
                    self.emit(Event::Unrecovered {
                        ch: ch.to_string(),
                        reason: st.reason.clone().unwrap_or_default(),
                        oldest: st.oldest,
                    });
                }
                self.positions.insert(
                    ch.to_string(),
                    Position {
                        epoch: Some(st.epoch.clone()),
                        seq: st.seq,
                    },
                );
            }
        }
    }

    /// True when `msg` was delivered before (its `seq` is not past the
    /// channel's position); otherwise advances the position.
    fn seen(&mut self, msg: &Envelope) -> bool {
        let (Some(ch), Some(seq)) = (msg.ch.as_deref(), msg.seq) else {
            return false;
        };
        match self.positions.get_mut(ch) {
            Some(p) if seq <= p.seq => true,
            Some(p) => {
                p.seq = seq;
                false
            }
            None => false,
        }
    }

    /// Applies a command while disconnected (Close is handled by the caller).
    fn apply_offline(&mut self, c: Command) {
        match c {
            Command::Send(e) => push_bounded(&mut self.outbox, e),
            other => apply_set(&mut self.rooms, other),
        }
    }

    async fn run(mut self) {
        loop {
            let info: CloseInfo;
            let reason: String;
            // Commands that arrive while connecting are applied to the
            // offline state; they do not restart the attempt.
            // The user's own stream: recover from its last position; with
            // none yet, nothing to recover (every welcome carries the
            // stream's position).
            self.config.since = self
                .own
                .as_ref()
                .and_then(|ch| self.positions.get(ch))
                .cloned();
            let attempt = {
                let connect = Connection::connect(&self.config);
                tokio::pin!(connect);
                loop {
                    tokio::select! {
                        r = &mut connect => break Some(r),
                        c = self.cmd.recv() => match c {
                            None | Some(Command::Close) => break None,
                            Some(c) => {
                                if let Command::Send(e) = c {
                                    push_bounded(&mut self.outbox, e);
                                } else {
                                    apply_set(&mut self.rooms, c);
                                }
                            }
                        }
                    }
                }
            };
            let Some(attempt) = attempt else {
                self.emit(Event::Stopped(StopReason::Closed));
                return;
            };
            match attempt {
                Ok(conn) => {
                    self.policy.on_connected();
                    self.on_welcome(conn.welcome());
                    self.emit(Event::Connected(conn.welcome().clone()));
                    match self.session(conn).await {
                        SessionEnd::Closed => {
                            self.emit(Event::Stopped(StopReason::Closed));
                            return;
                        }
                        SessionEnd::Lost(e) => {
                            info = e.close_info();
                            reason = e.to_string();
                        }
                    }
                }
                Err(e) => {
                    info = e.close_info();
                    reason = e.to_string();
                }
            }
            match self.policy.on_closed(info) {
                Action::Stop(r) => {
                    self.emit(Event::Disconnected {
                        code: info.code,
                        reason,
                        retry_ms: info.retry_ms,
                        retry_in: None,
                    });
                    self.emit(Event::Stopped(r));
                    return;
                }
                Action::Reconnect {
                    delay,
                    refresh_token,
                    ..
                } => {
                    self.emit(Event::Disconnected {
                        code: info.code,
                        reason,
                        retry_ms: info.retry_ms,
                        retry_in: Some(delay),
                    });
                    if refresh_token
                        && let Some(hook) = self.token_refresh.clone()
                        && let Some(t) = hook(info.code.unwrap_or_default()).await
                    {
                        self.config.token = Some(t);
                    }
                    let sleep = tokio::time::sleep(delay);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            c = self.cmd.recv() => match c {
                                None | Some(Command::Close) => {
                                    self.emit(Event::Stopped(StopReason::Closed));
                                    return;
                                }
                                Some(c) => { self.apply_offline(c); }
                            }
                        }
                    }
                }
            }
        }
    }

    async fn session(&mut self, mut conn: Connection) -> SessionEnd {
        // Channel for each pending `sub` id.
        let mut pending: HashMap<u64, String> = HashMap::new();
        let rooms: Vec<(String, bool)> = self.rooms.iter().map(|(c, p)| (c.clone(), *p)).collect();
        for (ch, presence) in rooms {
            match conn
                .subscribe_with(&ch, self.positions.get(&ch), presence)
                .await
            {
                Ok(id) => {
                    pending.insert(id, ch);
                }
                Err(e) => return SessionEnd::Lost(e),
            }
        }
        // Publishes with no answer yet: again, with the same ids (the
        // gateway answers a duplicate with the original seq).
        let resend: Vec<Envelope> = self.unacked.values().cloned().collect();
        for e in resend {
            self.stats.publishes_resent.fetch_add(1, Relaxed);
            if let Err(err) = conn.send(&e).await {
                return SessionEnd::Lost(err);
            }
        }
        while let Some(e) = self.outbox.pop_front() {
            self.track_publish(&e);
            if let Err(err) = conn.send(&e).await {
                self.outbox.push_front(e);
                return SessionEnd::Lost(err);
            }
        }
        // The server pings after hb_ms of silence, so hearing nothing for
        // 2 × hb + 10 s (the server's own default idle timeout) means the
        // path is dead even if the socket does not say so.
        let hb = conn.welcome().hb_ms;
        let idle = Duration::from_millis(hb.saturating_mul(2).saturating_add(10_000));
        loop {
            let deadline = conn.last_received() + idle;
            tokio::select! {
                _ = tokio::time::sleep_until(deadline), if hb > 0 => {
                    if conn.last_received() + idle <= tokio::time::Instant::now() {
                        return SessionEnd::Lost(Error::Timeout);
                    }
                }
                r = conn.recv() => match r {
                    Err(e) => return SessionEnd::Lost(e),
                    Ok(env) => {
                        let answer = matches!(env.t, Type::Ok | Type::Err);
                        if answer && let Some(id) = env.id {
                            self.unacked.remove(&id);
                        }
                        if let Some(ch) = env.id.filter(|_| answer).and_then(|id| pending.remove(&id)) {
                            if env.t == Type::Ok {
                                self.on_sub_ok(&ch, &env);
                            } else {
                                self.rooms.remove(&ch);
                                let code = env
                                    .err_code()
                                    .map(|c| c.name().to_string())
                                    .or(env.code.map(|c| c.to_string()))
                                    .unwrap_or_default();
                                self.emit(Event::SubscribeFailed { ch, code });
                            }
                        } else if env.t == Type::Msg && self.seen(&env) {
                            self.stats.redeliveries_dropped.fetch_add(1, Relaxed);
                        } else if env.t == Type::Members {
                            self.on_members(&env);
                        } else if env.t != Type::Ping {
                            self.emit(Event::Message(env));
                        }
                    }
                },
                c = self.cmd.recv() => {
                    let res = match c {
                        None | Some(Command::Close) => {
                            let _ = conn.close().await;
                            return SessionEnd::Closed;
                        }
                        Some(Command::Subscribe(ch, presence)) => {
                            let fresh = !self.rooms.contains_key(&ch);
                            if fresh {
                                self.rooms.insert(ch.clone(), presence);
                                conn.subscribe_with(&ch, None, presence).await.map(|id| { pending.insert(id, ch); })
                            } else {
                                self.emit(Event::Subscribed(ch));
                                Ok(())
                            }
                        }
                        Some(Command::Unsubscribe(ch)) => {
                            self.positions.remove(&ch);
                            if self.rooms.remove(&ch).is_some() {
                                conn.unsubscribe(&ch).await.map(|_| ())
                            } else {
                                Ok(())
                            }
                        }
                        Some(Command::Send(e)) => {
                            self.track_publish(&e);
                            conn.send(&e).await
                        }
                    };
                    if let Err(e) = res {
                        return SessionEnd::Lost(e);
                    }
                }
            }
        }
    }
}
