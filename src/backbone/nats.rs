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
//! **History** (`history = "jetstream"`, [`super::jetstream`]): publishes
//! become JetStream publishes (`ok` with the `seq` the stream acknowledged;
//! a retried `Nats-Msg-Id` is answered with the original `seq`), and the node
//! subscribes to the stream's republished live subjects instead. One task
//! per subject keeps the stream position up to which it has delivered: a
//! live message whose `Nats-Last-Sequence` is past it means this node missed
//! messages (core NATS is at most once), and the task reads them from the
//! stream and delivers them first, so no subscriber sees a gap; what cannot
//! be read back closes the channel's subscribers with 4009. After a NATS
//! reconnect every task checks the stream for messages it missed at the
//! tail. Replays for `since` are read from the stream up to the task's
//! position, so they meet the live messages without a gap or a duplicate.
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
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::{HeaderMap, Subject};
use atomic_waker::AtomicWaker;
use bytes::Bytes;
use edgegate_proto::{Envelope, ErrCode, Payload, Type};
use futures_util::StreamExt;
use tracing::{info, warn};

use super::history::{Page, Position, Recovery, Since, Stored, Unrecovered};
use super::jetstream::{self, EnsureError, Js, StreamSpec};
use super::{Ack, Backbone, EPHEMERAL_META, Event, Probe, Publish, Refused, Request, Sink};
use crate::config::{Nats as NatsConfig, NatsHistory};
use crate::events::{Bus, USER_OFFLINE, USER_ONLINE, UserCounts};
use crate::metrics::BackboneStats as NatsState;
use crate::metrics::ShardMetrics;

/// Publishes and requests waiting for the backbone thread, node-wide.
pub const BRIDGE_COMMANDS: usize = 64 * 1024;
/// Deliveries waiting for one shard.
pub const BRIDGE_DELIVERIES: usize = 64 * 1024;
/// How long a new subscription waits for the server's round trip before it
/// is reported live anyway (the backbone is then down, and says so).
const ROUND_TRIP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a read of the stream (a replay, a new subscription's position)
/// is tried again while the stream cannot be read: a NATS failover delays
/// a recovery instead of answering it `recovered: false`.
const STREAM_RETRY_FOR: Duration = Duration::from_secs(10);

/// Shard → backbone.
#[derive(Debug)]
enum ToNats {
    /// Publish a client's message.
    Publish {
        /// Full subject.
        subject: String,
        /// What its `Eg-*` and `Nats-Msg-Id` headers say.
        headers: PubHeaders,
        /// Body.
        payload: Bytes,
        /// Answered with [`Event::Published`] ([`Event::Sent`] when
        /// ephemeral).
        ack: Ack,
        /// Ephemeral: a core NATS publish on the subject gateways listen
        /// to, never stored.
        ephemeral: bool,
    },
    /// A core-service request.
    Request {
        /// Full subject (`P.svc.<name>`).
        subject: String,
        /// `Eg-User`, `Eg-Conn`.
        headers: HeaderMap,
        /// Body.
        payload: Bytes,
        /// Answered with [`Event::Answer`] (a hook) or [`Event::Reply`].
        ask: bool,
        /// The service's time (`None`: `request_timeout_ms`).
        timeout: Option<Duration>,
        /// Who asked.
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
    /// The position of a channel (and the messages after `since`), from
    /// the stream; answered with [`Event::History`].
    History {
        /// Channel name.
        channel: String,
        /// The client's position.
        since: Option<Since>,
        /// Count the users present too (once the room's view is synced).
        present: bool,
        /// Who asked.
        ack: Ack,
    },
    /// A shard's count of a user in a room moved (its first connection of
    /// the user subscribed, or its last one left).
    Present {
        /// Channel.
        channel: String,
        /// User id.
        user: String,
        /// +1 or -1.
        delta: i32,
    },
    /// A shard begins or stops watching a room's presence.
    Watch {
        /// Channel.
        channel: String,
        /// The shard.
        shard: usize,
        /// Begins or stops.
        on: bool,
    },
    /// Who is present in a channel; answered with [`Event::Presence`].
    PresenceQuery {
        /// Channel.
        channel: String,
        /// Users per page.
        limit: usize,
        /// After this id.
        after: Option<String>,
        /// Who asked.
        ack: Ack,
    },
    /// The cluster's rooms with someone present; answered with
    /// [`Event::Channels`].
    Channels {
        /// Names start with this.
        prefix: String,
        /// After this name.
        after: Option<String>,
        /// Rooms per page.
        limit: usize,
        /// Who asked.
        ack: Ack,
    },
    /// A page of a channel's history; answered with [`Event::Page`].
    Page {
        /// Channel.
        channel: String,
        /// Messages per page.
        limit: usize,
        /// Below this seq.
        before: Option<u64>,
        /// Who asked.
        ack: Ack,
    },
    /// A user's connections on the node changed by `delta`.
    Presence {
        /// User id.
        user: String,
        /// +1 or -1.
        delta: i32,
    },
    /// The server API's cluster-wide call ([`Cluster::gather`]).
    Gather {
        /// The subject after the prefix.
        suffix: String,
        /// Body.
        body: Bytes,
        /// How long answers are gathered.
        within: Duration,
        /// Where they go.
        reply: tokio::sync::oneshot::Sender<Vec<serde_json::Value>>,
    },
    /// A lifecycle event to publish on `P.events.<event>`.
    Event(serde_json::Value),
    /// A `POST /sse` for a session of another node: a request on
    /// `P.ctl.sse.<node>`, whose answer is the POST's outcome.
    Post {
        /// The node, as `edgegate_proto::sse::node_token` writes it.
        node: String,
        /// The POST.
        post: crate::sse::Post,
    },
}

mod control;
mod keeper;
mod presence;

pub use control::{Cluster, node_info};
use presence::ClusterPresence;

/// One shard's end of the bridge: the NATS backbone as a shard sees it.
pub struct NatsBackbone {
    data: tokio::sync::mpsc::Sender<ToNats>,
    control: tokio::sync::mpsc::UnboundedSender<ToNats>,
    events: crossbeam_channel::Receiver<Event>,
    pending: Arc<AtomicUsize>,
    waker: Arc<AtomicWaker>,
    state: Arc<NatsState>,
    prefix: String,
    shard: usize,
    history: bool,
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
    fn start(self: Rc<Self>, sink: Sink, _probe: Probe) {
        // Events from the backbone thread: it wakes this task from its own
        // thread; the executor parks in io_uring meanwhile, no polling. One
        // queue for deliveries and answers, so an answer comes behind every
        // delivery sent before it (a recovery's position meets the live
        // messages in order).
        glommio::spawn_local(async move {
            std::future::poll_fn(|cx| {
                self.waker.register(cx.waker());
                loop {
                    let ev = match self.events.try_recv() {
                        Ok(ev) => ev,
                        Err(crossbeam_channel::TryRecvError::Empty) => {
                            return std::task::Poll::Pending;
                        }
                        Err(crossbeam_channel::TryRecvError::Disconnected) => {
                            return std::task::Poll::Ready(());
                        }
                    };
                    if matches!(ev, Event::Deliver(_) | Event::Members(_)) {
                        self.pending.fetch_sub(1, Relaxed);
                    }
                    sink(ev);
                }
            })
            .await;
        })
        .detach();
    }

    fn publish(&self, msg: Publish<'_>, ack: Ack, now: &mut Vec<Event>) {
        // Through NATS: the message comes back to local subscribers (the
        // publisher included) in NATS's order; `ok` once NATS accepted it
        // (with history: once the stream stored it). With history, a
        // publish made while NATS is away waits for it on the backbone
        // thread, tried again for a while (`publish` there): refused here,
        // it could be overtaken by the connection's next one.
        let ephemeral = msg.ephemeral;
        let refuse = |now: &mut Vec<Event>| {
            now.push(if ephemeral {
                Event::Sent(ack, Err(Refused::UNAVAILABLE))
            } else {
                Event::Published(ack, Err(Refused::UNAVAILABLE))
            })
        };
        let down = if self.history && !ephemeral {
            !self.state.stream_ok.load(Relaxed)
        } else {
            !self.is_up()
        };
        if down {
            return refuse(now);
        }
        let Some(mut subject) = self.subject(msg.ch) else {
            return refuse(now);
        };
        if ephemeral && self.history {
            // Not on the stream's subject (it would be stored): on the live
            // subject the gateways listen to, with no stream sequence.
            subject = jetstream::live_subject(&self.prefix, &subject);
        }
        let headers = PubHeaders {
            user: msg.from.to_owned(),
            id: msg.id,
            conn: msg.conn.to_owned(),
            json: msg.payload.is_json(),
            key: msg.key,
            ephemeral,
        };
        let cmd = ToNats::Publish {
            subject,
            headers,
            payload: msg.payload.into_bytes(),
            ack,
            ephemeral,
        };
        if !self.send_data(cmd) {
            refuse(now);
        }
    }

    fn request(&self, req: Request<'_>, ack: Ack, now: &mut Vec<Event>) {
        let ask = req.ask;
        if !self.is_up() {
            return now.push(Request::outcome(
                ask,
                ack,
                Err(ErrCode::BackboneUnavailable),
            ));
        }
        let mut headers = HeaderMap::new();
        headers.insert("Eg-User", req.user);
        headers.insert("Eg-Conn", req.conn);
        let cmd = ToNats::Request {
            subject: format!("{}.svc.{}", self.prefix, req.service),
            headers,
            payload: req.payload.into_bytes(),
            ask,
            timeout: req.timeout_ms.map(Duration::from_millis),
            ack,
        };
        if !self.send_data(cmd) {
            now.push(Request::outcome(
                ask,
                ack,
                Err(ErrCode::BackboneUnavailable),
            ));
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

    fn history(
        &self,
        ch: &str,
        since: Option<Since>,
        present: bool,
        ack: Ack,
        now: &mut Vec<Event>,
    ) {
        if !self.history && !present {
            // Core NATS keeps no history.
            return now.push(Event::History(ack, Recovery::unavailable(since.as_ref())));
        }
        let cmd = ToNats::History {
            channel: ch.to_owned(),
            since,
            present,
            ack,
        };
        if let Err(e) = self.control.send(cmd)
            && let ToNats::History { since, .. } = e.0
        {
            now.push(Event::History(ack, Recovery::unavailable(since.as_ref())));
        }
    }

    fn presence(&self, user: &str, delta: i32) {
        let _ = self.control.send(ToNats::Presence {
            user: user.to_owned(),
            delta,
        });
    }

    fn is_up(&self) -> bool {
        self.state.up.load(Relaxed) && self.state.stream_ok.load(Relaxed)
    }

    fn present(&self, ch: &str, user: &str, delta: i32) {
        let _ = self.control.send(ToNats::Present {
            channel: ch.to_owned(),
            user: user.to_owned(),
            delta,
        });
    }

    fn watch(&self, ch: &str, on: bool) {
        let _ = self.control.send(ToNats::Watch {
            channel: ch.to_owned(),
            shard: self.shard,
            on,
        });
    }

    fn presence_query(
        &self,
        ch: &str,
        limit: usize,
        after: Option<&str>,
        ack: Ack,
        now: &mut Vec<Event>,
    ) {
        if !self.is_up() {
            return now.push(Event::Presence(ack, Err(Refused::UNAVAILABLE)));
        }
        let cmd = ToNats::PresenceQuery {
            channel: ch.to_owned(),
            limit,
            after: after.map(str::to_owned),
            ack,
        };
        if !self.send_data(cmd) {
            now.push(Event::Presence(ack, Err(Refused::UNAVAILABLE)));
        }
    }

    fn channels(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        ack: Ack,
        now: &mut Vec<Event>,
    ) {
        let cmd = ToNats::Channels {
            prefix: prefix.to_owned(),
            after: after.map(str::to_owned),
            limit,
            ack,
        };
        if !self.is_up() || !self.send_data(cmd) {
            now.push(Event::Channels(ack, Err(Refused::UNAVAILABLE)));
        }
    }

    fn history_page(
        &self,
        ch: &str,
        limit: usize,
        before: Option<u64>,
        ack: Ack,
        now: &mut Vec<Event>,
    ) {
        if !self.history {
            return now.push(Event::Page(ack, Ok(Page::unavailable())));
        }
        let cmd = ToNats::Page {
            channel: ch.to_owned(),
            limit,
            before,
            ack,
        };
        if !self.send_data(cmd) {
            now.push(Event::Page(ack, Err(Refused::UNAVAILABLE)));
        }
    }

    fn forward_post(&self, node: &str, post: crate::sse::Post) {
        if !self.state.up.load(Relaxed) {
            let _ = post.reply.send(crate::sse::PostOutcome::Unavailable);
            return;
        }
        // A full bridge drops the command, and with it the reply: the
        // waiting POST then answers 503.
        self.send_data(ToNats::Post {
            node: node.to_owned(),
            post,
        });
    }
}

/// The shard side of the event path: the sender plus the waker to call.
pub(super) struct ShardTx {
    events: crossbeam_channel::Sender<Event>,
    /// Deliveries sent and not yet taken by the shard (the bound).
    pending: Arc<AtomicUsize>,
    waker: Arc<AtomicWaker>,
}

impl ShardTx {
    /// An answer to one of this shard's commands (never dropped: at most
    /// one per command, and commands are bounded).
    pub(super) fn answer(&self, ev: Event) {
        if self.events.send(ev).is_ok() {
            self.waker.wake();
        }
    }

    /// A message for the shard's subscribers; false when the shard is too
    /// far behind to take it.
    pub(super) fn deliver(&self, ev: Event) -> bool {
        if self.pending.load(Relaxed) >= BRIDGE_DELIVERIES {
            self.waker.wake();
            return false;
        }
        self.pending.fetch_add(1, Relaxed);
        if self.events.send(ev).is_err() {
            self.pending.fetch_sub(1, Relaxed);
        }
        self.waker.wake();
        true
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
/// the node-wide counters. With JetStream history, waits until the stream
/// is created or checked: a conflicting stream or a NATS without JetStream
/// is an error here (when NATS cannot be reached in time, the node starts
/// not ready and checks the stream once it is).
pub fn start(
    cfg: &NatsConfig,
    prefix: &str,
    node: &str,
    metrics: Vec<Arc<ShardMetrics>>,
    recovery_limit: usize,
    presence: &crate::config::Presence,
    bus: Bus,
) -> Result<(Vec<NatsBackbone>, Arc<NatsState>, Cluster), String> {
    let shards = metrics.len();
    let history = cfg.history == NatsHistory::Jetstream;
    let state = Arc::new(NatsState::default());
    state.stream_ok.store(!history, Relaxed);
    let (data_tx, data_rx) = tokio::sync::mpsc::channel(BRIDGE_COMMANDS);
    let (ctl_tx, ctl_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut links = Vec::with_capacity(shards);
    let mut txs = Vec::with_capacity(shards);
    for shard in 0..shards {
        let (etx, erx) = crossbeam_channel::unbounded();
        let waker = Arc::new(AtomicWaker::new());
        let pending = Arc::new(AtomicUsize::new(0));
        txs.push(ShardTx {
            events: etx,
            pending: pending.clone(),
            waker: waker.clone(),
        });
        links.push(NatsBackbone {
            data: data_tx.clone(),
            control: ctl_tx.clone(),
            events: erx,
            pending,
            waker,
            state: state.clone(),
            prefix: prefix.to_owned(),
            shard,
            history,
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("backbone: cannot start its runtime: {e}"))?;
    let cfg = cfg.clone();
    let wait = Duration::from_millis(cfg.connect_timeout_ms + 2 * cfg.request_timeout_ms);
    let cluster = Cluster {
        control: ctl_tx.clone(),
    };
    let setup = Setup {
        prefix: prefix.to_owned(),
        node: node.to_owned(),
        recovery_limit,
        presence: presence.clone(),
        metrics,
        bus,
    };
    let st = state.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("backbone".into())
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(cfg, setup, txs, data_rx, ctl_rx, st, ready_tx));
        })
        .map_err(|e| format!("backbone: cannot start its thread: {e}"))?;
    if history {
        match ready_rx.recv_timeout(wait) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => warn!(
                "backbone: NATS not reachable yet; the JetStream stream is checked once it is \
                 (the node is not ready until then)"
            ),
        }
    }
    Ok((links, state, cluster))
}

/// What the backbone thread needs beside its config.
struct Setup {
    prefix: String,
    node: String,
    recovery_limit: usize,
    presence: crate::config::Presence,
    /// The shards' counters (a node's `info`).
    metrics: Vec<Arc<ShardMetrics>>,
    /// Where lifecycle events go besides `P.events.*` (webhooks).
    bus: Bus,
}

async fn connect(
    cfg: &NatsConfig,
    node: &str,
    state: Arc<NatsState>,
    reconnected: tokio::sync::watch::Sender<u64>,
    down_since: Arc<std::sync::atomic::AtomicU64>,
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
            let reconnected = reconnected.clone();
            let down_since = down_since.clone();
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        if !state.up.swap(true, Relaxed) {
                            info!("backbone: connected to NATS");
                            // Subscriptions are restored; what was published
                            // meanwhile is looked for in the stream.
                            reconnected.send_modify(|n| *n += 1);
                        }
                    }
                    async_nats::Event::Disconnected => {
                        if state.up.swap(false, Relaxed) {
                            down_since.store(crate::auth::unix_ms(), Relaxed);
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
    /// With history: commands for the subject's task.
    cmds: Option<tokio::sync::mpsc::UnboundedSender<SubjectCmd>>,
}

type Table = Rc<RefCell<HashMap<String, Interest>>>;

/// What a subject's task is asked (history on).
enum SubjectCmd {
    /// A client's position and replay (and the present count to pass on).
    History(Option<Since>, Ack, Option<u64>),
    /// NATS came back: the stream's last seq now; deliver what this node
    /// missed up to it.
    Tail(u64),
    /// The stream was made anew (a new epoch): every position is void.
    Reset(u64),
}

/// The JetStream side of the backbone thread (history on).
struct History {
    js: Js,
    ctx: async_nats::jetstream::Context,
    epoch: RefCell<Arc<str>>,
    /// The most messages one replay, or one gap fill, reads.
    limit: usize,
    baseline: Baseline,
    /// How long a publish with a `Nats-Msg-Id` is tried again before it
    /// is refused (see [`publish`]).
    retry_for: Duration,
}

/// The stream's last seq for subscriptions that just went live, read once
/// for all of them: a connect burst makes one `STREAM.INFO`, not one per
/// subject (JetStream answers its API one request at a time).
#[derive(Default)]
struct Baseline {
    waiting: RefCell<Vec<tokio::sync::oneshot::Sender<Option<u64>>>>,
    reading: std::cell::Cell<bool>,
}

impl Baseline {
    /// The stream's last seq, read after this call began (a reader that
    /// started earlier serves only those who asked before it sent its
    /// request); `None` when it cannot be read.
    async fn position(h: &Rc<History>) -> Option<u64> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        h.baseline.waiting.borrow_mut().push(tx);
        if !h.baseline.reading.replace(true) {
            // A task of its own (not the caller's, which may be aborted):
            // reads until nobody waits, each read serving those who asked
            // before it was sent.
            let h = h.clone();
            tokio::task::spawn_local(async move {
                loop {
                    let batch = std::mem::take(&mut *h.baseline.waiting.borrow_mut());
                    if batch.is_empty() {
                        break;
                    }
                    let last = h.js.state(None).await.ok().map(|s| s.last_seq);
                    for tx in batch {
                        let _ = tx.send(last);
                    }
                }
                h.baseline.reading.set(false);
            });
        }
        rx.await.ok().flatten()
    }
}

/// What every subject task shares.
#[derive(Clone)]
struct Hub {
    client: async_nats::Client,
    table: Table,
    shards: Rc<Vec<ShardTx>>,
    state: Arc<NatsState>,
    prefix: Rc<str>,
    /// This node's id (`Eg-Node`).
    node: Rc<str>,
    history: Option<Rc<History>>,
    /// Counts NATS reconnects: a publish on the wire when the connection
    /// broke is never acknowledged, so it is sent again at the reconnect
    /// instead of after the acknowledgement's timeout.
    reconnects: tokio::sync::watch::Receiver<u64>,
}

impl Hub {
    /// Hands `env` to every shard interested in `channel` now. A shard too
    /// far behind loses it: counted, and with history its subscribers of the
    /// channel are told (4009) — never a silent gap.
    fn deliver(&self, channel: &str, env: Arc<Envelope>) {
        let t = self.table.borrow();
        let Some(e) = t.get(channel) else { return };
        for &s in &e.shards {
            if let Some(tx) = self.shards.get(s)
                && !tx.deliver(Event::Deliver(env.clone()))
            {
                self.state.dropped.fetch_add(1, Relaxed);
                // An ephemeral message may be lost; a stored one is a gap.
                if self.history.is_some() && !super::is_ephemeral(&env) {
                    tx.answer(Event::Gap(channel.to_owned()));
                }
            }
        }
    }

    /// Closes `channel`'s subscribers on every interested shard with 4009.
    fn gap(&self, channel: &str) {
        self.state.gaps_unhealed.fetch_add(1, Relaxed);
        let t = self.table.borrow();
        let Some(e) = t.get(channel) else { return };
        for &s in &e.shards {
            if let Some(tx) = self.shards.get(s) {
                tx.answer(Event::Gap(channel.to_owned()));
            }
        }
    }

    fn answer(&self, ack: Ack, ev: Event) {
        if let Some(s) = self.shards.get(ack.shard) {
            s.answer(ev);
        }
    }
}

async fn run(
    cfg: NatsConfig,
    setup: Setup,
    shards: Vec<ShardTx>,
    mut data: tokio::sync::mpsc::Receiver<ToNats>,
    mut control: tokio::sync::mpsc::UnboundedReceiver<ToNats>,
    state: Arc<NatsState>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let Setup {
        prefix,
        node,
        recovery_limit,
        presence: presence_cfg,
        metrics,
        bus,
    } = setup;
    let started = std::time::Instant::now();
    let (reconnected_tx, mut reconnected) = tokio::sync::watch::channel(0u64);
    let down_since = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let client = match connect(
        &cfg,
        &node,
        state.clone(),
        reconnected_tx,
        down_since.clone(),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            // Only a malformed setting gets here (connects are retried):
            // the node serves nobody's pubs, and says so.
            tracing::error!(error = %e, "backbone: not started");
            let _ = ready.send(Err(e));
            return;
        }
    };
    let timeout = Duration::from_millis(cfg.request_timeout_ms);
    let history = if cfg.history == NatsHistory::Jetstream {
        let js = Js::new(client.clone(), timeout, StreamSpec::new(&cfg, &prefix));
        match ensure_stream(&js, &cfg, &state).await {
            Ok(epoch) => {
                let _ = ready.send(Ok(()));
                let ctx = async_nats::jetstream::ContextBuilder::new()
                    .timeout(timeout)
                    .max_ack_inflight(BRIDGE_COMMANDS)
                    .backpressure_on_inflight(false)
                    .build(client.clone());
                Some(Rc::new(History {
                    js,
                    ctx,
                    epoch: RefCell::new(epoch),
                    limit: recovery_limit,
                    baseline: Baseline::default(),
                    retry_for: publish_retry_for(&cfg),
                }))
            }
            Err(e) => {
                tracing::error!(error = %e, "backbone: JetStream history cannot start; the node stays not ready");
                let _ = ready.send(Err(e));
                return;
            }
        }
    } else {
        None
    };
    let hub = Hub {
        client: client.clone(),
        table: Rc::new(RefCell::new(HashMap::new())),
        shards: Rc::new(shards),
        state: state.clone(),
        prefix: Rc::from(prefix.as_str()),
        node: Rc::from(node.as_str()),
        history,
        reconnects: reconnected.clone(),
    };
    // Users with connections on this node: `P.presence.<id>`, the
    // `user.*` events and this node's `info`.
    let users: Rc<RefCell<UserCounts>> = Rc::default();
    let ctl = Rc::new(control::Control {
        client: client.clone(),
        prefix: Rc::from(prefix.as_str()),
        node: Rc::from(node.as_str()),
        shards: hub.shards.clone(),
        metrics,
        users: users.clone(),
        started,
    });
    ctl.clone().spawn();
    ctl.clone().serve_posts();
    // With `[presence]`, the cluster-wide view of rooms (its own tasks).
    let presence = ClusterPresence::new(
        client.clone(),
        hub.prefix.clone(),
        hub.node.clone(),
        &presence_cfg,
        hub.shards.clone(),
        state.clone(),
        users.clone(),
        bus.clone(),
    );
    if presence_cfg.enabled {
        presence.start(reconnected.clone());
    }

    // History: after each reconnect, every subject looks for what it missed.
    if let Some(h) = hub.history.clone() {
        let hub = hub.clone();
        let (base, cap) = (cfg.reconnect_base_ms, cfg.reconnect_cap_ms);
        let max_age_ms = cfg.max_age_ms;
        reconnected.mark_unchanged();
        tokio::task::spawn_local(async move {
            while reconnected.changed().await.is_ok() {
                let mut attempt = 0;
                let st = loop {
                    match h.js.state(None).await {
                        Ok(st) => break st,
                        Err(e) => {
                            warn!(error = %e, "backbone: reading the stream after a reconnect failed; retrying");
                            tokio::time::sleep(backoff(base, cap, attempt)).await;
                            attempt += 1;
                        }
                    }
                };
                let epoch: Arc<str> = Arc::from(h.js.spec.epoch(&st.created));
                let mut reset = *h.epoch.borrow() != epoch;
                if reset {
                    warn!(epoch = %epoch, "backbone: the JetStream stream was made anew; every position is void (4009)");
                    *h.epoch.borrow_mut() = epoch;
                }
                // Away longer than the stream keeps messages: what this node
                // missed may be gone, and nothing says which.
                let down = down_since.swap(0, Relaxed);
                let away_ms = crate::auth::unix_ms().saturating_sub(down);
                if down > 0 && away_ms >= max_age_ms {
                    warn!(
                        away_ms,
                        "backbone: NATS was away longer than the stream's max_age; subscribers are told to recover (4009)"
                    );
                    reset = true;
                }
                for e in hub.table.borrow().values() {
                    if let Some(tx) = &e.cmds {
                        let _ = tx.send(if reset {
                            SubjectCmd::Reset(st.last_seq)
                        } else {
                            SubjectCmd::Tail(st.last_seq)
                        });
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
                    ephemeral: true,
                } => {
                    // Never stored: a core NATS publish, and its answer.
                    let ok = client
                        .publish_with_headers(Subject::from(subject), headers.map(&node), payload)
                        .await
                        .is_ok();
                    let r = if ok {
                        Ok(())
                    } else {
                        Err(Refused::UNAVAILABLE)
                    };
                    hub.answer(ack, Event::Sent(ack, r));
                }
                ToNats::Publish {
                    subject,
                    headers,
                    payload,
                    ack,
                    ephemeral: false,
                } => publish(&hub, subject, headers, payload, ack).await,
                ToNats::Request {
                    subject,
                    headers,
                    payload,
                    ask,
                    timeout: within,
                    ack,
                } => {
                    let client = client.clone();
                    let hub = hub.clone();
                    tokio::task::spawn_local(async move {
                        let r = tokio::time::timeout(
                            within.unwrap_or(timeout),
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
                        hub.answer(ack, Request::outcome(ask, ack, result));
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
                ToNats::History {
                    channel,
                    since,
                    present,
                    ack,
                } => {
                    // Interest changes before it in this batch come first.
                    for (channel, shard, on, ack) in interest.drain(..) {
                        change_interest(&hub, channel, shard, on, ack);
                    }
                    if present && presence_cfg.enabled {
                        // The count waits for the room's view to be synced.
                        let (hub, p) = (hub.clone(), presence.clone());
                        tokio::task::spawn_local(async move {
                            p.ready(&channel).await;
                            let n = p.count(&channel);
                            ask_history(&hub, &channel, since, Some(n), ack);
                        });
                    } else {
                        ask_history(&hub, &channel, since, None, ack);
                    }
                }
                ToNats::Present {
                    channel,
                    user,
                    delta,
                } => presence.on_local(&channel, &user, delta),
                ToNats::Watch { channel, shard, on } => presence.watch(&channel, shard, on),
                ToNats::PresenceQuery {
                    channel,
                    limit,
                    after,
                    ack,
                } => {
                    let (hub, p) = (hub.clone(), presence.clone());
                    tokio::task::spawn_local(async move {
                        let r = p.query(&channel, limit, after.as_deref()).await;
                        hub.answer(ack, Event::Presence(ack, r));
                    });
                }
                ToNats::Channels {
                    prefix,
                    after,
                    limit,
                    ack,
                } => {
                    let (hub, p) = (hub.clone(), presence.clone());
                    tokio::task::spawn_local(async move {
                        let r = p.channels(&prefix, after.as_deref(), limit).await;
                        hub.answer(ack, Event::Channels(ack, r));
                    });
                }
                ToNats::Page {
                    channel,
                    limit,
                    before,
                    ack,
                } => {
                    let hub = hub.clone();
                    tokio::task::spawn_local(async move {
                        let page = read_page(&hub, &channel, limit, before).await;
                        hub.answer(ack, Event::Page(ack, Ok(page)));
                    });
                }
                ToNats::Presence { user, delta } => {
                    let change = users.borrow_mut().change(&user, delta);
                    if let Some(online) = change {
                        let conns = users.borrow().get(&user);
                        let word = if online { "online" } else { "offline" };
                        let body = serde_json::json!({
                            "user": user, "state": word, "node": node, "conns": conns,
                        });
                        let _ = client
                            .publish(format!("{prefix}.presence.{user}"), body.to_string().into())
                            .await;
                        if presence_cfg.enabled {
                            // Once for the cluster, by the user's keeper.
                            presence.on_online(&user, online);
                        } else {
                            // No cluster view: the node's own transitions.
                            let name = if online { USER_ONLINE } else { USER_OFFLINE };
                            let ev = crate::events::event(name, &node, &[("user", &user)]);
                            ctl.publish_event(&ev).await;
                            bus.emit(ev);
                        }
                    }
                }
                ToNats::Gather {
                    suffix,
                    body,
                    within,
                    reply,
                } => {
                    let client = client.clone();
                    let subject = format!("{prefix}.{suffix}");
                    tokio::task::spawn_local(async move {
                        let _ = reply.send(control::gather(&client, subject, body, within).await);
                    });
                }
                ToNats::Event(ev) => ctl.publish_event(&ev).await,
                ToNats::Post { node, post } => {
                    let client = client.clone();
                    let subject = format!("{prefix}.ctl.sse.{node}");
                    tokio::task::spawn_local(control::forward_post(client, subject, post, timeout));
                }
            }
        }
        for (channel, shard, on, ack) in interest {
            change_interest(&hub, channel, shard, on, ack);
        }
        // One presence delta per room for the whole batch.
        presence.publish_changes().await;
    }
}

/// Hands a position (and replay) request to `channel`'s subject task, with
/// the room's present count when asked; without a task (history off, or
/// unsubscribed meanwhile) it is answered at once.
fn ask_history(hub: &Hub, channel: &str, since: Option<Since>, present: Option<u64>, ack: Ack) {
    let t = hub.table.borrow();
    match t.get(channel).and_then(|e| e.cmds.as_ref()) {
        Some(tx) => {
            let _ = tx.send(SubjectCmd::History(since, ack, present));
        }
        None => {
            let mut r = Recovery::unavailable(since.as_ref());
            r.present = present;
            hub.answer(ack, Event::History(ack, r));
        }
    }
}

/// A page of `channel`'s history from the stream (`reason: unavailable`
/// when it cannot be read).
async fn read_page(hub: &Hub, channel: &str, limit: usize, before: Option<u64>) -> Page {
    let Some(h) = &hub.history else {
        return Page::unavailable();
    };
    let Ok(parsed) = edgegate_proto::channel::parse(channel) else {
        return Page::unavailable();
    };
    let subject = parsed.subject(&hub.prefix);
    match h.js.page(&subject, limit, before).await {
        Ok((list, more, top)) => Page {
            epoch: h.epoch.borrow().clone(),
            top,
            messages: list
                .into_iter()
                .map(|m| stored_message(channel, m))
                .collect(),
            more,
            unavailable: false,
        },
        Err(e) => {
            warn!(channel, error = %e, "backbone: a history page cannot be read from the stream");
            Page::unavailable()
        }
    }
}

/// Creates or checks the stream, retrying while NATS or JetStream cannot
/// answer yet; a conflict is an error. Returns the stream's epoch.
async fn ensure_stream(js: &Js, cfg: &NatsConfig, state: &NatsState) -> Result<Arc<str>, String> {
    let mut attempt = 0;
    let mut no_responders = 0;
    loop {
        while !state.up.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match js.ensure().await {
            Ok(st) => {
                let epoch = js.spec.epoch(&st.created);
                info!(stream = %js.spec.name, epoch, last_seq = st.last_seq, "backbone: JetStream history ready");
                state.stream_ok.store(true, Relaxed);
                return Ok(Arc::from(epoch));
            }
            // "No responders" right after a connect may be a server still
            // starting JetStream: believe it the third time.
            Err(EnsureError::NoJetStream(_)) if no_responders < 2 => no_responders += 1,
            Err(EnsureError::NoJetStream(why) | EnsureError::Conflict(why)) => return Err(why),
            Err(EnsureError::Retry(why)) => {
                warn!(error = %why, "backbone: JetStream not ready; retrying");
            }
        }
        tokio::time::sleep(backoff(
            cfg.reconnect_base_ms,
            cfg.reconnect_cap_ms,
            attempt,
        ))
        .await;
        attempt += 1;
    }
}

/// A client's publish: to core NATS, or (history on) to the stream, whose
/// acknowledgement is the `ok` with its `seq`.
///
/// A stream publish that is not acknowledged (its NATS server died with it
/// on the wire, a leader election, a timeout) is sent again with the same
/// `Nats-Msg-Id` — the stream stores it once either way — for up to
/// `History::retry_for`, before the client is told `backbone_unavailable`.
/// With the session's one-publish-at-a-time order (`ordered_publishes`) a
/// NATS failover costs the client latency instead of an `err`, and no later
/// message of the connection is stored ahead of it. Publishes without an id
/// (no `Nats-Msg-Id`) are not sent twice: they could be stored twice; nor
/// are pipelined ones (`ordered_publishes = false`).
async fn publish(hub: &Hub, subject: String, headers: PubHeaders, payload: Bytes, ack: Ack) {
    let refused = Event::Published(ack, Err(Refused::UNAVAILABLE));
    let Some(h) = &hub.history else {
        let ok = hub
            .client
            .publish_with_headers(Subject::from(subject), headers.map(&hub.node), payload)
            .await
            .is_ok();
        if ok {
            hub.state.published.fetch_add(1, Relaxed);
            return hub.answer(ack, Event::Published(ack, Ok(None)));
        }
        return hub.answer(ack, refused);
    };
    let subject = Subject::from(subject);
    let map = headers.map(&hub.node);
    let again = (!h.retry_for.is_zero() && headers.key.is_some())
        .then(|| (subject.clone(), headers, payload.clone()));
    let up = hub.state.up.load(Relaxed);
    if !up && again.is_none() {
        return hub.answer(ack, refused);
    }
    // Sent here, in the order the commands came (while NATS is away, not
    // at all: the retries below wait for it); acknowledged in a task.
    let mut reconnects = hub.reconnects.clone();
    reconnects.mark_unchanged();
    let first = match up {
        true => Some(h.ctx.publish_with_headers(subject, map, payload).await),
        false => None,
    };
    let hub = hub.clone();
    tokio::task::spawn_local(async move {
        let mut r = match first {
            Some(Ok(stored)) => acked(stored, &mut reconnects).await,
            _ => None,
        };
        if let (None, Some((subject, headers, payload)), Some(h)) = (&r, again, &hub.history) {
            let mut retry = Retry::new(h.retry_for, Duration::from_millis(50));
            while r.is_none() && retry.wait().await {
                if !hub.state.up.load(Relaxed) {
                    continue;
                }
                hub.state.publish_retries.fetch_add(1, Relaxed);
                reconnects.mark_unchanged();
                r = match h
                    .ctx
                    .publish_with_headers(subject.clone(), headers.map(&hub.node), payload.clone())
                    .await
                {
                    Ok(stored) => acked(stored, &mut reconnects).await,
                    Err(_) => None,
                };
            }
        }
        let ev = match r {
            Some(a) => {
                hub.state.published.fetch_add(1, Relaxed);
                Event::Published(
                    ack,
                    Ok(Some(Stored {
                        seq: a.sequence,
                        epoch: hub
                            .history
                            .as_ref()
                            .map_or_else(|| Arc::from(""), |h| h.epoch.borrow().clone()),
                        duplicate: a.duplicate,
                    })),
                )
            }
            // Not stored (or not known to be): nothing is acked.
            None => refused,
        };
        hub.answer(ack, ev);
    });
}

/// Pauses between tries of an operation on the stream: doubling from the
/// first, at most 1 s, until a deadline.
struct Retry {
    until: tokio::time::Instant,
    pause: Duration,
}

impl Retry {
    fn new(within: Duration, first: Duration) -> Self {
        Retry {
            until: tokio::time::Instant::now() + within,
            pause: first,
        }
    }

    /// Waits before the next try; false (at once) when the time is up.
    async fn wait(&mut self) -> bool {
        if tokio::time::Instant::now() >= self.until {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(1));
        true
    }
}

/// The stream's acknowledgement of a publish; `None` when it failed, timed
/// out, or NATS reconnected meanwhile (it may have been lost with the old
/// connection: the caller sends it again, and the stream keeps it once).
async fn acked(
    stored: async_nats::jetstream::context::PublishAckFuture,
    reconnects: &mut tokio::sync::watch::Receiver<u64>,
) -> Option<async_nats::jetstream::publish::PublishAck> {
    tokio::select! {
        r = stored.into_future() => r.ok(),
        _ = reconnects.changed() => None,
    }
}

/// How long a stream publish is tried again: up to 10 s, and short enough
/// that the last try, with its own wait for the acknowledgement, ends well
/// inside the stream's duplicate window (a late first try is then still
/// recognised as the same message). Not at all when a connection's
/// publishes are pipelined (`ordered_publishes = false`): a resend would
/// be stored after the ones sent behind it (the chaos run measured it),
/// where a refusal lets the client resend in its order.
fn publish_retry_for(cfg: &NatsConfig) -> Duration {
    if !cfg.ordered_publishes {
        return Duration::ZERO;
    }
    let ms = (cfg.duplicate_window_ms / 2)
        .saturating_sub(cfg.request_timeout_ms)
        .min(10_000);
    Duration::from_millis(ms)
}

fn change_interest(hub: &Hub, channel: String, shard: usize, on: bool, ack: Option<Ack>) {
    let mut t = hub.table.borrow_mut();
    if on {
        let entry = t.entry(channel.clone()).or_insert_with(|| Interest {
            shards: Vec::new(),
            task: None,
            live: false,
            waiting: Vec::new(),
            cmds: None,
        });
        if !entry.shards.contains(&shard) {
            entry.shards.push(shard);
        }
        if let Some(a) = ack {
            if entry.live {
                hub.answer(a, Event::SubReady(a));
            } else {
                entry.waiting.push(a);
            }
        }
        if entry.task.is_none() {
            let Ok(parsed) = edgegate_proto::channel::parse(&channel) else {
                return;
            };
            hub.state.subscriptions.fetch_add(1, Relaxed);
            let task = match &hub.history {
                None => {
                    let subject = parsed.subject(&hub.prefix);
                    tokio::task::spawn_local(subscription(hub.clone(), channel, subject))
                }
                Some(_) => {
                    let stored = parsed.subject(&hub.prefix);
                    let live = jetstream::live_subject(&hub.prefix, &stored);
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    entry.cmds = Some(tx);
                    tokio::task::spawn_local(live_subscription(
                        hub.clone(),
                        channel,
                        live,
                        stored,
                        rx,
                    ))
                }
            };
            entry.task = Some(task);
        }
    } else if let Some(entry) = t.get_mut(&channel) {
        entry.shards.retain(|&s| s != shard);
        if entry.shards.is_empty() {
            if let Some(task) = entry.task.take() {
                // Dropping the subscriber inside unsubscribes.
                task.abort();
                hub.state.subscriptions.fetch_sub(1, Relaxed);
            }
            for a in entry.waiting.drain(..) {
                hub.answer(a, Event::SubReady(a));
            }
            t.remove(&channel);
        }
    }
}

/// Subscribes to `subject` and waits for the server to have it: a flush
/// only writes the SUB to the socket; a request nobody answers comes back
/// (as "no responders") only after the server has processed everything
/// before it, the SUB included, so no one is told the subscription is live
/// before it is.
async fn subscribe_live(hub: &Hub, subject: &str) -> Option<async_nats::Subscriber> {
    let sub = match hub.client.subscribe(subject.to_owned()).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, subject, "backbone: subscribe failed");
            return None;
        }
    };
    let probe = async_nats::Request::new().timeout(Some(ROUND_TRIP_TIMEOUT));
    let round_trip = format!("{}.sys.round_trip", hub.prefix);
    let _ = hub.client.send_request(round_trip, probe).await;
    Some(sub)
}

/// Tells those waiting for `channel`'s subscription that it is live.
fn went_live(hub: &Hub, channel: &str) {
    let waiting = {
        let mut t = hub.table.borrow_mut();
        match t.get_mut(channel) {
            Some(e) => {
                e.live = true;
                std::mem::take(&mut e.waiting)
            }
            None => Vec::new(),
        }
    };
    for a in waiting {
        hub.answer(a, Event::SubReady(a));
    }
}

/// Holds one subject's subscription (history off): delivers each message
/// to the shards interested at that moment.
async fn subscription(hub: Hub, channel: String, subject: String) {
    let Some(mut sub) = subscribe_live(&hub, &subject).await else {
        return;
    };
    went_live(&hub, &channel);
    while let Some(m) = sub.next().await {
        hub.state.received.fetch_add(1, Relaxed);
        let env = Arc::new(message(&channel, m.headers.as_ref(), m.payload));
        hub.deliver(&channel, env);
    }
}

/// One subject's live messages with history on (module docs): `pos` is the
/// stream position up to which every message of the subject has been
/// handed to the shards.
struct Live {
    hub: Hub,
    h: Rc<History>,
    channel: String,
    /// The subject in the stream (`P.room.x`).
    stored: String,
    pos: Option<u64>,
}

impl Live {
    /// Delivers one message read back from the stream.
    fn deliver_stored(&self, m: jetstream::Stored) {
        let env = stored_message(&self.channel, m);
        self.hub.deliver(&self.channel, env);
    }

    /// Delivers what the stream holds of the subject in `(pos, upto]` and
    /// moves `pos` to `upto`; what it cannot read closes the subscribers
    /// with 4009.
    async fn fill(&mut self, upto: u64) {
        // Without a position (the stream could not be read when the
        // subscription began, and nothing came since) there is nothing to
        // fill from: the first live message sets it. Moving it here would
        // drop live messages still on their way as if they were delivered.
        let Some(pos) = self.pos else { return };
        if upto <= pos {
            return;
        }
        match self.h.js.fill(&self.stored, pos, upto, self.h.limit).await {
            Ok(list) => {
                if !list.is_empty() {
                    self.hub.state.gaps_healed.fetch_add(1, Relaxed);
                    self.hub
                        .state
                        .healed_messages
                        .fetch_add(list.len() as u64, Relaxed);
                }
                for m in list {
                    self.deliver_stored(m);
                }
            }
            Err(why) => {
                warn!(channel = %self.channel, after = pos, upto, reason = why.reason(), "backbone: messages this node missed cannot be read back; closing the channel's subscribers with 4009");
                self.hub.gap(&self.channel);
            }
        }
        self.pos = Some(upto);
    }

    /// A live message from the stream's republish.
    async fn on_live(&mut self, m: async_nats::Message) {
        self.hub.state.received.fetch_add(1, Relaxed);
        let num = |name: &str| header(m.headers.as_ref(), name).and_then(|v| v.parse::<u64>().ok());
        let (seq, prev) = (num("Nats-Sequence"), num("Nats-Last-Sequence"));
        let mut env = message(&self.channel, m.headers.as_ref(), m.payload);
        if let (Some(seq), Some(prev)) = (seq, prev) {
            if self.pos.is_some_and(|p| seq <= p) {
                return; // delivered already (read back from the stream)
            }
            if self.pos.is_some_and(|p| prev > p) {
                // This node missed the subject's messages up to `prev`.
                self.fill(prev).await;
            }
            self.pos = Some(seq);
            env.seq = Some(seq);
        }
        self.hub.deliver(&self.channel, Arc::new(env));
    }

    /// A client's position: the stream up to `pos`, and the messages after
    /// its `since`, read from the stream (in a task of its own: live
    /// delivery goes on meanwhile, and the session merges by `seq`).
    async fn history(&mut self, since: Option<Since>, ack: Ack, present: Option<u64>) {
        let epoch = self.h.epoch.borrow().clone();
        if let Some(s) = &since
            && s.epoch.as_deref().is_none_or(|e| *e == *epoch)
        {
            // Catch up with the stream first: the client may have seen more
            // than this node delivered (it came from another node), and a
            // message stored just before this subscription went live must
            // be in its replay, not wait for its successor.
            if let Some(last) = Baseline::position(&self.h).await {
                self.fill(last).await;
            }
        }
        let Some(top) = self.pos else {
            let mut r = Recovery::unavailable(since.as_ref());
            r.present = present;
            return self.hub.answer(ack, Event::History(ack, r));
        };
        let at = epoch.clone();
        let answer = move |replay| Recovery {
            pos: Position {
                epoch: at.clone(),
                top,
            },
            replay,
            contiguous: false,
            present,
        };
        let s = match since {
            None => {
                return self
                    .hub
                    .answer(ack, Event::History(ack, answer(Ok(Vec::new()))));
            }
            Some(s) => s,
        };
        let quick = match s.epoch.as_deref() {
            Some(e) if *e != *epoch => Some(Err(Unrecovered::EpochChanged)),
            // A position ahead of the stream: not this stream.
            _ if s.seq > top => Some(Err(Unrecovered::EpochChanged)),
            _ if s.seq == top => Some(Ok(Vec::new())),
            _ => None,
        };
        if let Some(r) = quick {
            return self.hub.answer(ack, Event::History(ack, answer(r)));
        }
        let (hub, h, stored, channel) = (
            self.hub.clone(),
            self.h.clone(),
            self.stored.clone(),
            self.channel.clone(),
        );
        tokio::task::spawn_local(async move {
            hub.state.replays.fetch_add(1, Relaxed);
            // The stream out of reach (NATS away, a leader election): tried
            // again for a while (the live messages meanwhile wait in the
            // session's bounded hold).
            let mut retry = Retry::new(STREAM_RETRY_FOR, Duration::from_millis(100));
            let replay = loop {
                let r = h.js.range(&stored, s.seq, top, h.limit).await;
                if !matches!(r, Err(Unrecovered::Unavailable)) || !retry.wait().await {
                    break r;
                }
            };
            let replay = replay.map(|list| {
                list.into_iter()
                    .map(|m| stored_message(&channel, m))
                    .collect()
            });
            hub.answer(ack, Event::History(ack, answer(replay)));
        });
    }
}

/// Holds one subject's live subscription with history on.
async fn live_subscription(
    hub: Hub,
    channel: String,
    live: String,
    stored: String,
    mut cmds: tokio::sync::mpsc::UnboundedReceiver<SubjectCmd>,
) {
    let Some(h) = hub.history.clone() else { return };
    // The position is read before the subscription is live: every live
    // message is then past it (none is mistaken for one from before), and
    // one stored between the two is found missing by its successor's
    // Nats-Last-Sequence (or, for a `since`, read before the answer).
    let mut pos = Baseline::position(&h).await;
    let mut retry = Retry::new(STREAM_RETRY_FOR, Duration::from_millis(100));
    // NATS away: the subscription cannot go live before it is back anyway,
    // and without a position a recovery is `unavailable`.
    while pos.is_none() && retry.wait().await {
        pos = Baseline::position(&h).await;
    }
    if pos.is_none() {
        warn!(
            channel,
            "backbone: the stream's position is unknown; positions start at the next message"
        );
    }
    let Some(mut sub) = subscribe_live(&hub, &live).await else {
        return;
    };
    let mut s = Live {
        hub,
        h,
        channel,
        stored,
        pos,
    };
    went_live(&s.hub, &s.channel);
    loop {
        tokio::select! {
            m = sub.next() => match m {
                Some(m) => s.on_live(m).await,
                None => return,
            },
            c = cmds.recv() => match c {
                Some(SubjectCmd::History(since, ack, present)) => {
                    s.history(since, ack, present).await
                }
                Some(SubjectCmd::Tail(last)) => s.fill(last).await,
                Some(SubjectCmd::Reset(last)) => {
                    s.hub.gap(&s.channel);
                    s.pos = Some(last);
                }
                None => return,
            },
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
    if header(h, "Eg-Ephemeral") == Some("true") {
        env.meta = Some(EPHEMERAL_META.to_owned());
    }
    env
}

/// The `msg` envelope for a message read back from the stream.
fn stored_message(channel: &str, m: jetstream::Stored) -> Arc<Envelope> {
    let mut env = message(channel, Some(&m.headers), m.data);
    env.seq = Some(m.seq);
    Arc::new(env)
}

/// What the headers of a client publish say (docs/protocol.md, "Backbone
/// subjects"): made into a `HeaderMap` on the NATS thread, once per try (a
/// resend needs them again, and this is cheaper to keep than the map).
#[derive(Debug)]
struct PubHeaders {
    user: String,
    id: Option<u64>,
    conn: String,
    json: bool,
    /// `user:instance:id` (or `user:conn:id`): JetStream drops a retry of
    /// the same client message, and never confuses two devices.
    key: Option<String>,
    /// `Eg-Ephemeral: true`: never stored, no position.
    ephemeral: bool,
}

impl PubHeaders {
    fn map(&self, node: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Eg-From", self.user.as_str());
        if let Some(id) = self.id {
            h.insert("Eg-Id", id.to_string().as_str());
        }
        if let Some(key) = &self.key {
            h.insert(NATS_MESSAGE_ID, key.as_str());
        }
        h.insert("Eg-Node", node);
        h.insert("Eg-Conn", self.conn.as_str());
        h.insert("Eg-Enc", if self.json { "json" } else { "bin" });
        if self.ephemeral {
            h.insert("Eg-Ephemeral", "true");
        }
        h
    }
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
        let h = PubHeaders {
            user: "alice".into(),
            id: Some(7),
            conn: "n1-0-1".into(),
            json: true,
            key: Some("alice:tab1:7".into()),
            ephemeral: false,
        }
        .map("n1");
        let env = message("room:x", Some(&h), Bytes::from_static(b"1"));
        assert_eq!(env.from.as_deref(), Some("alice"));
        assert_eq!(env.id, Some(7));
        assert_eq!(env.ch.as_deref(), Some("room:x"));
        let svc = message("user:bob", None, Bytes::from_static(b"\"hi\""));
        assert_eq!(svc.from.as_deref(), Some("svc"));
        assert_eq!(header(Some(&h), "Nats-Msg-Id"), Some("alice:tab1:7"));
    }
}
