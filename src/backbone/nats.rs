//! The NATS backbone: one dedicated thread running a tokio current-thread
//! runtime and async-nats, bridged to the shards.
//!
//! Shards never block on it. A shard sends commands through two tokio
//! channels (a plain, non-blocking send from any thread): publishes and
//! requests through a **bounded** one — when it is full the client is
//! answered `err backbone_unavailable` at once, nothing queues without
//! bound — and interest and presence changes through an unbounded one,
//! whose length is bounded by the node's connections and subscriptions
//! (each connection adds at most one change per subscription, and the
//! accept budget paces connections). The shard receives [`Event`]s
//! through crossbeam channels of its own plus an [`AtomicWaker`]: the
//! backbone wakes the shard's receiving task, and a glommio executor wakes
//! on a foreign-thread wake without busy polling. Deliveries go through a
//! bounded channel (a shard that cannot keep up loses deliveries, counted,
//! rather than growing memory); answers, at most one per command, through
//! their own.
//!
//! **Interest.** The node subscribes to `P.user.<id>` / `P.room.<id>` only
//! while some shard has a connection interested in it: shards report their
//! first and last local interest, the backbone keeps which shards want which
//! subject and subscribes on the first, unsubscribes after the last. Commands
//! are taken in batches, so a burst of connects and disconnects costs one
//! SUB per subject that stays wanted, not one per connection. A message from
//! NATS is decoded once and handed (as one `Arc`) to each interested shard,
//! which encodes it once for all its subscribers.
//!
//! **Order.** A client's own publish comes back to it through NATS, like
//! everyone else's: all members of a room, on every node, see the order NATS
//! gives.
//!
//! **Failure.** Losing NATS never takes the node down: async-nats reconnects
//! with the exponential backoff and full jitter configured here and restores
//! every subscription; meanwhile `/readyz` says not ready, publishes are
//! answered `err backbone_unavailable` (nothing is queued silently), and
//! client connections stay up.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use atomic_waker::AtomicWaker;
use bytes::Bytes;
use edgegate_proto::{Envelope, ErrCode, Payload, Type};
use futures_util::StreamExt;
use tracing::{info, warn};

use super::{Ack, Backbone, Event, Publish, Refused, Request, Sink};
use crate::config::Nats as NatsConfig;
use crate::metrics::BackboneStats as NatsState;

/// Publishes and requests waiting for the backbone thread, node-wide.
pub const BRIDGE_COMMANDS: usize = 64 * 1024;
/// Deliveries waiting for one shard.
pub const BRIDGE_DELIVERIES: usize = 64 * 1024;
/// How long a new subscription waits for the server's round trip before it
/// is reported live anyway (the backbone is then down, and says so).
const ROUND_TRIP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Shard → backbone.
#[derive(Debug)]
enum ToNats {
    /// Publish a client's message.
    Publish {
        /// Full subject.
        subject: String,
        /// `Eg-*` and `Nats-Msg-Id` headers.
        headers: HeaderMap,
        /// Body.
        payload: Bytes,
        /// Answered with [`Event::Published`].
        ack: Ack,
    },
    /// A core-service request.
    Request {
        /// Full subject (`P.svc.<name>`).
        subject: String,
        /// `Eg-User`, `Eg-Conn`.
        headers: HeaderMap,
        /// Body.
        payload: Bytes,
        /// Answered with [`Event::Reply`].
        ack: Ack,
    },
    /// A shard's first (`on`) or last (`!on`) local interest in a channel.
    Interest {
        /// Channel name (`room:x`, `user:y`).
        channel: String,
        /// The shard.
        shard: usize,
        /// Interest begins or ends.
        on: bool,
        /// When the subscription is live, answer with [`Event::SubReady`].
        ack: Option<Ack>,
    },
    /// A user's connections on the node changed by `delta`.
    Presence {
        /// User id.
        user: String,
        /// +1 or -1.
        delta: i32,
    },
}

/// One shard's end of the bridge: the NATS backbone as a shard sees it.
pub struct NatsBackbone {
    data: tokio::sync::mpsc::Sender<ToNats>,
    control: tokio::sync::mpsc::UnboundedSender<ToNats>,
    deliveries: crossbeam_channel::Receiver<Event>,
    answers: crossbeam_channel::Receiver<Event>,
    waker: Arc<AtomicWaker>,
    state: Arc<NatsState>,
    prefix: String,
    node: String,
    shard: usize,
}

impl NatsBackbone {
    /// The subject of a channel: `room:x` → `P.room.x`.
    fn subject(&self, channel: &str) -> Option<String> {
        edgegate_proto::channel::parse(channel)
            .ok()
            .map(|c| c.subject(&self.prefix))
    }

    /// Sends a publish or request; false when the bridge is full or gone.
    fn send_data(&self, cmd: ToNats) -> bool {
        match self.data.try_send(cmd) {
            Ok(()) => true,
            Err(_) => {
                self.state.bridge_full.fetch_add(1, Relaxed);
                false
            }
        }
    }
}

impl Backbone for NatsBackbone {
    fn start(self: Rc<Self>, sink: Sink) {
        // Events from the backbone thread: it wakes this task from its own
        // thread; the executor parks in io_uring meanwhile, no polling.
        glommio::spawn_local(async move {
            std::future::poll_fn(|cx| {
                self.waker.register(cx.waker());
                loop {
                    // Answers first: they unblock clients waiting on an `ok`.
                    let ev = match self.answers.try_recv() {
                        Ok(ev) => ev,
                        Err(_) => match self.deliveries.try_recv() {
                            Ok(ev) => ev,
                            Err(crossbeam_channel::TryRecvError::Empty) => {
                                return std::task::Poll::Pending;
                            }
                            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                                return std::task::Poll::Ready(());
                            }
                        },
                    };
                    sink(ev);
                }
            })
            .await;
        })
        .detach();
    }

    fn publish(&self, msg: Publish<'_>, ack: Ack, now: &mut Vec<Event>) {
        // Through NATS: the message comes back to local subscribers (the
        // publisher included) in NATS's order; `ok` once NATS accepted it.
        if !self.is_up() {
            return now.push(Event::Published(ack, Err(Refused::UNAVAILABLE)));
        }
        let Some(subject) = self.subject(msg.ch) else {
            return now.push(Event::Published(ack, Err(Refused::UNAVAILABLE)));
        };
        let json = msg.payload.is_json();
        let headers = publish_headers(
            msg.from,
            msg.id,
            &self.node,
            msg.conn,
            json,
            msg.key.as_deref(),
        );
        let cmd = ToNats::Publish {
            subject,
            headers,
            payload: msg.payload.into_bytes(),
            ack,
        };
        if !self.send_data(cmd) {
            now.push(Event::Published(ack, Err(Refused::UNAVAILABLE)));
        }
    }

    fn request(&self, req: Request<'_>, ack: Ack, now: &mut Vec<Event>) {
        if !self.is_up() {
            return now.push(Event::Reply(ack, Err(ErrCode::BackboneUnavailable)));
        }
        let mut headers = HeaderMap::new();
        headers.insert("Eg-User", req.user);
        headers.insert("Eg-Conn", req.conn);
        let cmd = ToNats::Request {
            subject: format!("{}.svc.{}", self.prefix, req.service),
            headers,
            payload: req.payload.into_bytes(),
            ack,
        };
        if !self.send_data(cmd) {
            now.push(Event::Reply(ack, Err(ErrCode::BackboneUnavailable)));
        }
    }

    fn interest(&self, ch: &str, on: bool, ack: Option<Ack>, _now: &mut Vec<Event>) {
        let _ = self.control.send(ToNats::Interest {
            channel: ch.to_owned(),
            shard: self.shard,
            on,
            ack,
        });
    }

    fn history(&self, _ch: &str, since: Option<super::Since>, ack: Ack, now: &mut Vec<Event>) {
        // Core NATS keeps no history (JetStream history is a later step).
        now.push(Event::History(
            ack,
            super::Recovery::unavailable(since.as_ref()),
        ));
    }

    fn presence(&self, user: &str, delta: i32) {
        let _ = self.control.send(ToNats::Presence {
            user: user.to_owned(),
            delta,
        });
    }

    fn is_up(&self) -> bool {
        self.state.up.load(Relaxed)
    }
}

/// The shard side of the event path: senders plus the waker to call.
struct ShardTx {
    deliveries: crossbeam_channel::Sender<Event>,
    answers: crossbeam_channel::Sender<Event>,
    waker: Arc<AtomicWaker>,
}

impl ShardTx {
    /// An answer to one of this shard's commands (never dropped: at most
    /// one per command, and commands are bounded).
    fn answer(&self, ev: Event) {
        if self.answers.send(ev).is_ok() {
            self.waker.wake();
        }
    }

    /// A message for the shard's subscribers; false when the shard is too
    /// far behind to take it.
    fn deliver(&self, ev: Event) -> bool {
        match self.deliveries.try_send(ev) {
            Ok(()) => {
                self.waker.wake();
                true
            }
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                self.waker.wake();
                false
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => true,
        }
    }
}

/// The delay bound of reconnect attempt `n`: min(cap, base·2ⁿ); the wait is
/// uniform in [0, bound] (full jitter), so a fleet does not reconnect in step.
/// The schedule is `edgegate_proto::backoff`'s, shared with the client library.
pub fn backoff(base_ms: u64, cap_ms: u64, attempt: usize) -> Duration {
    let ms = Duration::from_millis;
    let attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
    edgegate_proto::backoff::full_jitter(ms(base_ms), ms(cap_ms), attempt, |max| {
        fastrand::u64(0..=max)
    })
}

/// Starts the backbone thread; returns each shard's end of the bridge and
/// the node-wide counters.
pub fn start(
    cfg: &NatsConfig,
    prefix: &str,
    node: &str,
    shards: usize,
) -> Result<(Vec<NatsBackbone>, Arc<NatsState>), String> {
    let state = Arc::new(NatsState::default());
    let (data_tx, data_rx) = tokio::sync::mpsc::channel(BRIDGE_COMMANDS);
    let (ctl_tx, ctl_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut links = Vec::with_capacity(shards);
    let mut txs = Vec::with_capacity(shards);
    for shard in 0..shards {
        let (dtx, drx) = crossbeam_channel::bounded(BRIDGE_DELIVERIES);
        let (atx, arx) = crossbeam_channel::unbounded();
        let waker = Arc::new(AtomicWaker::new());
        txs.push(ShardTx {
            deliveries: dtx,
            answers: atx,
            waker: waker.clone(),
        });
        links.push(NatsBackbone {
            data: data_tx.clone(),
            control: ctl_tx.clone(),
            deliveries: drx,
            answers: arx,
            waker,
            state: state.clone(),
            prefix: prefix.to_owned(),
            node: node.to_owned(),
            shard,
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("backbone: cannot start its runtime: {e}"))?;
    let cfg = cfg.clone();
    let prefix = prefix.to_owned();
    let node = node.to_owned();
    let st = state.clone();
    std::thread::Builder::new()
        .name("backbone".into())
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(cfg, prefix, node, txs, data_rx, ctl_rx, st));
        })
        .map_err(|e| format!("backbone: cannot start its thread: {e}"))?;
    Ok((links, state))
}

async fn connect(
    cfg: &NatsConfig,
    node: &str,
    state: Arc<NatsState>,
) -> Result<async_nats::Client, String> {
    let (base, cap) = (cfg.reconnect_base_ms, cfg.reconnect_cap_ms);
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("edgegate {node}"))
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms)))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempt| {
            // async-nats counts the first try of each round as attempt 1: that
            // one is not a reconnect (at start-up) or is logged as the loss.
            let d = backoff(base, cap, attempt.saturating_sub(1));
            if attempt > 1 {
                warn!(attempt, delay_ms = d.as_millis() as u64, "backbone: reconnecting to NATS (exponential backoff, full jitter)");
            }
            d
        })
        .event_callback(move |ev| {
            let state = state.clone();
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        if !state.up.swap(true, Relaxed) {
                            info!("backbone: connected to NATS");
                        }
                    }
                    async_nats::Event::Disconnected => {
                        if state.up.swap(false, Relaxed) {
                            state.reconnects.fetch_add(1, Relaxed);
                            warn!("backbone: lost NATS; clients stay connected, publishes get backbone_unavailable until it is back");
                        }
                    }
                    other => info!(event = %other, "backbone: NATS event"),
                }
            }
        });
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(f) = &cfg.creds_file {
        opts = opts
            .credentials_file(f)
            .await
            .map_err(|e| format!("backbone.nats.creds_file = {}: {e}", f.display()))?;
    }
    if cfg.tls {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &cfg.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    let urls: Vec<async_nats::ServerAddr> = cfg
        .urls
        .iter()
        .map(|u| {
            u.parse()
                .map_err(|e| format!("backbone.nats.urls: {u:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    opts.connect(urls.as_slice())
        .await
        .map_err(|e| format!("backbone: cannot connect to NATS: {e}"))
}

/// Which shards want a subject, and the task holding its subscription.
struct Interest {
    shards: Vec<usize>,
    task: Option<tokio::task::JoinHandle<()>>,
    live: bool,
    waiting: Vec<Ack>,
}

type Table = Rc<RefCell<HashMap<String, Interest>>>;

async fn run(
    cfg: NatsConfig,
    prefix: String,
    node: String,
    shards: Vec<ShardTx>,
    mut data: tokio::sync::mpsc::Receiver<ToNats>,
    mut control: tokio::sync::mpsc::UnboundedReceiver<ToNats>,
    state: Arc<NatsState>,
) {
    let client = match connect(&cfg, &node, state.clone()).await {
        Ok(c) => c,
        Err(e) => {
            // Only a malformed setting gets here (connects are retried):
            // the node serves nobody's pubs, and says so.
            tracing::error!(error = %e, "backbone: not started");
            return;
        }
    };
    let shards = Rc::new(shards);
    let table: Table = Rc::new(RefCell::new(HashMap::new()));
    let presence: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
    let timeout = Duration::from_millis(cfg.request_timeout_ms);

    // Control: kicks for any user.
    {
        let client = client.clone();
        let shards = shards.clone();
        let subject = format!("{prefix}.ctl.kick.*");
        let cut = format!("{prefix}.ctl.kick.");
        tokio::task::spawn_local(async move {
            let mut sub = match client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, subject, "backbone: cannot subscribe to kicks");
                    return;
                }
            };
            while let Some(m) = sub.next().await {
                if let Some(user) = m.subject.as_str().strip_prefix(&cut) {
                    for s in shards.iter() {
                        s.answer(Event::Kick(user.to_owned()));
                    }
                }
            }
        });
    }

    let mut batch = Vec::with_capacity(256);
    let mut more = Vec::with_capacity(256);
    loop {
        batch.clear();
        more.clear();
        // Control first: a subscription that became wanted is set up
        // before the publishes that arrived with it.
        let n = tokio::select! {
            biased;
            n = control.recv_many(&mut batch, 1024) => n,
            n = data.recv_many(&mut more, 1024) => n,
        };
        batch.append(&mut more);
        if n == 0 {
            return; // every shard is gone
        }
        // Coalesce interest changes of this batch per channel: a connect
        // and a disconnect in the same burst cancel out.
        let mut interest: Vec<(String, usize, bool, Option<Ack>)> = Vec::new();
        for cmd in batch.drain(..) {
            match cmd {
                ToNats::Publish {
                    subject,
                    headers,
                    payload,
                    ack,
                } => {
                    let ok = client
                        .publish_with_headers(Subject::from(subject), headers, payload)
                        .await
                        .is_ok();
                    if ok {
                        state.published.fetch_add(1, Relaxed);
                    }
                    if let Some(s) = shards.get(ack.shard) {
                        s.answer(Event::Published(
                            ack,
                            if ok {
                                Ok(None)
                            } else {
                                Err(Refused::UNAVAILABLE)
                            },
                        ));
                    }
                }
                ToNats::Request {
                    subject,
                    headers,
                    payload,
                    ack,
                } => {
                    let client = client.clone();
                    let shards = shards.clone();
                    tokio::task::spawn_local(async move {
                        let r = tokio::time::timeout(
                            timeout,
                            client.request_with_headers(Subject::from(subject), headers, payload),
                        )
                        .await;
                        use async_nats::RequestErrorKind as K;
                        let result = match r {
                            Err(_) => Err(ErrCode::Timeout),
                            Ok(Ok(m)) => Ok(payload_of(m.headers.as_ref(), m.payload)),
                            Ok(Err(e)) => Err(match e.kind() {
                                K::NoResponders => ErrCode::NoService,
                                K::TimedOut => ErrCode::Timeout,
                                _ => ErrCode::BackboneUnavailable,
                            }),
                        };
                        if let Some(s) = shards.get(ack.shard) {
                            s.answer(Event::Reply(ack, result));
                        }
                    });
                }
                ToNats::Interest {
                    channel,
                    shard,
                    on,
                    ack,
                } => {
                    interest.push((channel, shard, on, ack));
                }
                ToNats::Presence { user, delta } => {
                    let (before, after) = {
                        let mut p = presence.borrow_mut();
                        let n = p.entry(user.clone()).or_insert(0);
                        let before = *n;
                        *n = n.saturating_add_signed(delta);
                        let after = *n;
                        if after == 0 {
                            p.remove(&user);
                        }
                        (before, after)
                    };
                    let state_word = match (before, after) {
                        (0, 1..) => Some("online"),
                        (1.., 0) => Some("offline"),
                        _ => None,
                    };
                    if let Some(word) = state_word {
                        let body = serde_json::json!({
                            "user": user, "state": word, "node": node, "conns": after,
                        });
                        let _ = client
                            .publish(format!("{prefix}.presence.{user}"), body.to_string().into())
                            .await;
                    }
                }
            }
        }
        for (channel, shard, on, ack) in interest {
            change_interest(
                &client, &table, &shards, &prefix, &state, channel, shard, on, ack,
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn change_interest(
    client: &async_nats::Client,
    table: &Table,
    shards: &Rc<Vec<ShardTx>>,
    prefix: &str,
    state: &Arc<NatsState>,
    channel: String,
    shard: usize,
    on: bool,
    ack: Option<Ack>,
) {
    let mut t = table.borrow_mut();
    if on {
        let entry = t.entry(channel.clone()).or_insert_with(|| Interest {
            shards: Vec::new(),
            task: None,
            live: false,
            waiting: Vec::new(),
        });
        if !entry.shards.contains(&shard) {
            entry.shards.push(shard);
        }
        if let Some(a) = ack {
            if entry.live {
                if let Some(s) = shards.get(a.shard) {
                    s.answer(Event::SubReady(a));
                }
            } else {
                entry.waiting.push(a);
            }
        }
        if entry.task.is_none() {
            let Some(subject) = edgegate_proto::channel::parse(&channel)
                .ok()
                .map(|c| c.subject(prefix))
            else {
                return;
            };
            state.subscriptions.fetch_add(1, Relaxed);
            entry.task = Some(tokio::task::spawn_local(subscription(
                client.clone(),
                table.clone(),
                shards.clone(),
                state.clone(),
                channel,
                subject,
                format!("{prefix}.sys.round_trip"),
            )));
        }
    } else if let Some(entry) = t.get_mut(&channel) {
        entry.shards.retain(|&s| s != shard);
        if entry.shards.is_empty() {
            if let Some(task) = entry.task.take() {
                // Dropping the subscriber inside unsubscribes.
                task.abort();
                state.subscriptions.fetch_sub(1, Relaxed);
            }
            for a in entry.waiting.drain(..) {
                if let Some(s) = shards.get(a.shard) {
                    s.answer(Event::SubReady(a));
                }
            }
            t.remove(&channel);
        }
    }
}

/// Holds one subject's subscription: delivers each message to the shards
/// interested at that moment.
async fn subscription(
    client: async_nats::Client,
    table: Table,
    shards: Rc<Vec<ShardTx>>,
    state: Arc<NatsState>,
    channel: String,
    subject: String,
    round_trip: String,
) {
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, subject, "backbone: subscribe failed");
            return;
        }
    };
    // The SUB is on its way. A flush only writes it to the socket; a
    // request nobody answers comes back (as "no responders") only after the
    // server has processed everything before it, the SUB included, so no
    // one is told the subscription is live before it is.
    let probe = async_nats::Request::new().timeout(Some(ROUND_TRIP_TIMEOUT));
    let _ = client.send_request(round_trip, probe).await;
    let waiting = {
        let mut t = table.borrow_mut();
        match t.get_mut(&channel) {
            Some(e) => {
                e.live = true;
                std::mem::take(&mut e.waiting)
            }
            None => Vec::new(),
        }
    };
    for a in waiting {
        if let Some(s) = shards.get(a.shard) {
            s.answer(Event::SubReady(a));
        }
    }
    while let Some(m) = sub.next().await {
        state.received.fetch_add(1, Relaxed);
        let env = Arc::new(message(&channel, m.headers.as_ref(), m.payload));
        let t = table.borrow();
        if let Some(e) = t.get(&channel) {
            for &s in &e.shards {
                if let Some(tx) = shards.get(s)
                    && !tx.deliver(Event::Deliver(env.clone()))
                {
                    state.dropped.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

fn header<'a>(h: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// A payload from NATS: JSON when `Eg-Enc: json` (or, without `Eg-Enc`, when
/// the body is JSON text), otherwise opaque bytes.
fn payload_of(h: Option<&HeaderMap>, body: Bytes) -> Payload {
    if body.is_empty() {
        return Payload::None;
    }
    let is_json = || serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok();
    match header(h, "Eg-Enc") {
        Some("bin") => Payload::Binary(body),
        _ if is_json() => Payload::Json(body),
        _ => Payload::Binary(body),
    }
}

/// The `msg` envelope for a message from NATS on `channel`.
fn message(channel: &str, h: Option<&HeaderMap>, body: Bytes) -> Envelope {
    let mut env = Envelope::new(Type::Msg);
    env.ch = Some(channel.to_owned());
    env.from = Some(header(h, "Eg-From").unwrap_or("svc").to_owned());
    env.id = header(h, "Eg-Id").and_then(|v| v.parse().ok());
    env.payload = payload_of(h, body);
    env
}

/// Headers of a client publish (docs/protocol.md, "Backbone subjects").
fn publish_headers(
    user: &str,
    id: Option<u64>,
    node: &str,
    conn: &str,
    json: bool,
    key: Option<&str>,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Eg-From", user);
    if let Some(id) = id {
        h.insert("Eg-Id", id.to_string().as_str());
    }
    if let Some(key) = key {
        // `user:instance:id` (or `user:conn:id`): JetStream drops a retry
        // of the same client message, and never confuses two devices.
        h.insert("Nats-Msg-Id", key);
    }
    h.insert("Eg-Node", node);
    h.insert("Eg-Conn", conn);
    h.insert("Eg-Enc", if json { "json" } else { "bin" });
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_within_a_growing_capped_bound() {
        for attempt in 0..40 {
            let bound = (100u64 << attempt.min(30)).min(5_000);
            for _ in 0..50 {
                assert!(backoff(100, 5_000, attempt).as_millis() as u64 <= bound);
            }
        }
        // Jitter: not always the same value.
        let samples: std::collections::HashSet<u128> = (0..50)
            .map(|_| backoff(100, 5_000, 10).as_millis())
            .collect();
        assert!(samples.len() > 5);
    }

    #[test]
    fn payload_kind_follows_eg_enc_then_content() {
        let mut h = HeaderMap::new();
        h.insert("Eg-Enc", "bin");
        assert!(matches!(
            payload_of(Some(&h), Bytes::from_static(b"{}")),
            Payload::Binary(_)
        ));
        assert!(matches!(
            payload_of(None, Bytes::from_static(b"{\"a\":1}")),
            Payload::Json(_)
        ));
        assert!(matches!(
            payload_of(None, Bytes::from_static(b"\xff")),
            Payload::Binary(_)
        ));
        let mut j = HeaderMap::new();
        j.insert("Eg-Enc", "json");
        assert!(matches!(
            payload_of(Some(&j), Bytes::from_static(b"not json")),
            Payload::Binary(_)
        ));
    }

    #[test]
    fn messages_carry_sender_and_id_from_headers() {
        let h = publish_headers("alice", Some(7), "n1", "n1-0-1", true, Some("alice:tab1:7"));
        let env = message("room:x", Some(&h), Bytes::from_static(b"1"));
        assert_eq!(env.from.as_deref(), Some("alice"));
        assert_eq!(env.id, Some(7));
        assert_eq!(env.ch.as_deref(), Some("room:x"));
        let svc = message("user:bob", None, Bytes::from_static(b"\"hi\""));
        assert_eq!(svc.from.as_deref(), Some("svc"));
        assert_eq!(header(Some(&h), "Nats-Msg-Id"), Some("alice:tab1:7"));
    }
}
