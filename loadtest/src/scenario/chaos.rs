//! `chaos`: N reconnecting clients ([`edgegate_client::Client`], which
//! resumes: positions, `since`, resent publishes, seen `seq`s dropped) in R
//! rooms plus direct messages, publishers that retry until `ok`, and faults
//! on a schedule:
//!
//! - `cut` — a random connected client's connection is reset both ways
//!   (RST, mid-stream) by the [`FaultProxy`];
//! - `slow` — a few clients stop reading (the proxy stops reading from the
//!   gateway) until the gateway closes them as slow consumers (4003);
//! - `drain` / `kill` — the gateway, started by the harness, gets SIGTERM
//!   or SIGKILL and is started again;
//! - `nats-kill` — the NATS server a gateway is connected to (found in the
//!   servers' `/connz`) gets SIGKILL (`--nats-kill-cmd`) and is started
//!   again `--nats-down-secs` later; the gateway is back when its
//!   `edgegate_backbone_up` is 1.
//!
//! With `--gateway2-env` the harness runs two gateway nodes (the production
//! topology: `scripts/chaos-cluster.sh` puts them on a three-node JetStream
//! cluster): the proxy spreads clients over both, a client reconnects to
//! either, and the restart faults take turns between them. With
//! `--persistent-history` (JetStream) no `epoch_changed` is expected after
//! a restart: every `recovered: false` is a failure.
//!
//! Accounting is exact, per message and subscriber: every publish the
//! gateway acknowledged (`ok` with `seq`) is expected at every member of its
//! room (the publisher included) or at the recipient of the direct message.
//! At the end each missing delivery is either **covered** — that subscriber
//! was told `recovered: false` for that channel after the message was sent
//! (an [`Event::Unrecovered`]), the honest answer after a restart of an
//! embedded gateway — or **lost**. Duplicates and reorders are what the
//! application saw after the client library's own dropping of redeliveries
//! (which is counted too). Each disconnect is attributed to the fault that
//! caused it (the close code, or what the harness did to that client), and
//! its recovery time runs from the disconnect until every room of that
//! client is subscribed again (answered `ok`, the replay follows).
//!
//! After a restart of an embedded gateway (history is in memory) every
//! subscription and every user stream must report `epoch_changed`; one
//! that comes back without it claimed a recovery it could not have made.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use edgegate_client::{Backoff, Client, Envelope, Event, Type};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};

use crate::cli::{ChaosArgs, Fault};
use crate::faultproxy::{FaultProxy, MAX_CLIENTS, client_ip};
use crate::gateway::{Gateway, wait_ready};
use crate::pacer::Pacer;
use crate::payload::{self, Stamp};
use crate::procfs;
use crate::report::{Report, latency_line, opt};
use crate::series::{Chart, panel};
use crate::track::{new_histogram, summary};

/// A channel: rooms are `0..R`, the user stream of client `i` is `R + i`.
type Ch = u32;

/// Why a session ended, as attributed by the harness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Cause {
    Fault(Fault),
    /// Not caused by the harness (reported with its close code).
    Other,
}

impl Cause {
    fn name(self) -> &'static str {
        match self {
            Cause::Fault(f) => f.name(),
            Cause::Other => "other",
        }
    }
    fn code(self) -> u8 {
        match self {
            Cause::Fault(Fault::Cut) => 1,
            Cause::Fault(Fault::Slow) => 2,
            Cause::Fault(Fault::Drain) => 3,
            Cause::Fault(Fault::Kill) => 4,
            Cause::Fault(Fault::NatsKill) => 5,
            Cause::Other => 0,
        }
    }
    fn from_code(c: u8) -> Option<Cause> {
        match c {
            1 => Some(Cause::Fault(Fault::Cut)),
            2 => Some(Cause::Fault(Fault::Slow)),
            3 => Some(Cause::Fault(Fault::Drain)),
            4 => Some(Cause::Fault(Fault::Kill)),
            5 => Some(Cause::Fault(Fault::NatsKill)),
            _ => None,
        }
    }
}

/// Channel names of one run (a fresh tag per run, so that a long-running
/// gateway's history of an earlier run cannot leak into this one).
struct Names {
    rooms: usize,
    room_prefix: String,
    user_prefix: String,
}

impl Names {
    fn room(&self, r: usize) -> String {
        format!("{}{r}", self.room_prefix)
    }
    fn user(&self, i: usize) -> String {
        format!("{}{i}", &self.user_prefix["user:".len()..])
    }
    fn ch(&self, ch: Ch) -> String {
        let c = ch as usize;
        if c < self.rooms {
            self.room(c)
        } else {
            format!("{}{}", self.user_prefix, c - self.rooms)
        }
    }
    fn parse(&self, s: &str) -> Option<Ch> {
        if let Some(r) = s.strip_prefix(&self.room_prefix) {
            return r.parse::<u32>().ok().filter(|r| (*r as usize) < self.rooms);
        }
        let i = s.strip_prefix(&self.user_prefix)?.parse::<u32>().ok()?;
        Some(self.rooms as u32 + i)
    }
}

/// What the main loop asks a client to publish.
enum Cmd {
    Publish(Ch),
}

/// What the main loop sees of each client while it runs.
#[derive(Default)]
struct Live {
    connected: AtomicBool,
    /// Rooms subscribed in the current session.
    subscribed: AtomicU32,
    /// A fault the harness injected on this client: cause code << 56 | deadline (ms).
    pending: AtomicU64,
    /// When its last `msg` arrived, ms since the run's start.
    last_rx_ms: AtomicU32,
    /// When its oldest unanswered publish was sent (ms since the start, 0: none).
    oldest_unanswered_ms: AtomicU32,
}

/// Totals every client adds to, for progress and the settle logic.
#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    acked: AtomicU64,
    gave_up: AtomicU64,
    received: AtomicU64,
    /// Set while the gateway is being restarted: the fault's cause code.
    restarting: AtomicU8,
}

/// One entry of a client's life, in order.
#[derive(Clone, Debug)]
enum LifeKind {
    Connected,
    Disconnected(Cause, Option<u16>),
    Subscribed(Ch),
    Unrecovered(Ch, String),
}

/// A message a client published and got `ok` for.
struct Ack {
    key: u64,
    ch: Ch,
    /// When it was first sent, ms since the run's start.
    sent_ms: u32,
    /// It was refused (`err`) at least once and sent again.
    retried: bool,
}

/// What one client saw, handed back at the end.
struct Tally {
    rooms: Vec<Ch>,
    received: HashSet<u64>,
    dups: u64,
    reorders: u64,
    /// The messages that arrived after a later one of the same publisher
    /// on the same channel: (publisher, the late one's number, the highest
    /// number seen before it).
    reordered: Vec<(u64, u64, u64)>,
    acks: Vec<Ack>,
    unacked: u64,
    dup_acks: u64,
    errs: BTreeMap<String, u64>,
    gave_up: u64,
    sub_failed: u64,
    life: Vec<(u32, LifeKind)>,
    latency: Histogram<u64>,
    redeliveries_dropped: u64,
    publishes_resent: u64,
    stopped: Option<String>,
    /// When the last `msg` arrived, ms since the run's start.
    last_rx_ms: u32,
    /// The same per channel.
    last_rx_by_ch: HashMap<Ch, u32>,
}

/// The message key: publisher and its sequence.
fn key(p: u64, s: u64) -> u64 {
    (p << 32) | (s & 0xffff_ffff)
}

struct Pending {
    key: u64,
    ch: Ch,
    sent_ms: u32,
    env: Envelope,
    attempts: u32,
}

/// Ids of the harness's publishes: its own, above any the client library
/// gives (so that the order of ids is the order of publishing).
const PUB_ID_BASE: u64 = 1 << 40;
/// Publishes that got `err` are sent again (same id) after this long, this many times.
const RETRY_DELAY: Duration = Duration::from_millis(200);
const RETRY_LIMIT: u32 = 50;

struct ClientCtx {
    idx: usize,
    names: Arc<Names>,
    live: Arc<Vec<Live>>,
    totals: Arc<Totals>,
    t0: Instant,
    encoding: crate::Encoding,
    size: usize,
}

impl ClientCtx {
    fn ms(&self) -> u32 {
        self.t0.elapsed().as_millis() as u32
    }
}

async fn run_client(
    ctx: ClientCtx,
    client: Client,
    rooms: Vec<Ch>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) -> Tally {
    let mut client = client;
    let handle = client.handle();
    let me = &ctx.live[ctx.idx];
    let mut t = Tally {
        rooms: rooms.clone(),
        received: HashSet::new(),
        dups: 0,
        reorders: 0,
        reordered: Vec::new(),
        acks: Vec::new(),
        unacked: 0,
        dup_acks: 0,
        errs: BTreeMap::new(),
        gave_up: 0,
        sub_failed: 0,
        life: Vec::new(),
        latency: new_histogram(),
        redeliveries_dropped: 0,
        publishes_resent: 0,
        stopped: None,
        last_rx_ms: 0,
        last_rx_by_ch: HashMap::new(),
    };
    let mut last: HashMap<(Ch, u64), u64> = HashMap::new();
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    // The outbox: publishes refused (`err`) and those published after them,
    // by id, sent again together and in order once the retry delay is
    // over — a client's messages keep their order across a refusal.
    let mut outbox: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut seq = 0u64;
    let mut closing = false;
    let mut connected = false;
    loop {
        tokio::select! {
            c = cmds.recv(), if !closing => match c {
                Some(Cmd::Publish(ch)) => {
                    seq += 1;
                    let st = Stamp { p: ctx.idx as u64, s: seq, t: crate::peer::now_ns() };
                    let mut env = Envelope::new(Type::Pub);
                    env.ch = Some(ctx.names.ch(ch));
                    env.payload = payload::encode(ctx.encoding, st, ctx.size);
                    let id = PUB_ID_BASE + seq;
                    env.id = Some(id);
                    let p = Pending { key: key(st.p, st.s), ch, sent_ms: ctx.ms(), env, attempts: 1 };
                    if outbox.is_empty() {
                        handle.send(p.env.clone());
                        pending.insert(id, p);
                    } else {
                        outbox.insert(id, p);
                    }
                    let oldest = pending.values().map(|p| p.sent_ms).min().unwrap_or(0);
                    me.oldest_unanswered_ms.store(oldest.max(1), Relaxed);
                    ctx.totals.sent.fetch_add(1, Relaxed);
                }
                None => {
                    closing = true;
                    client.close();
                }
            },
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                retry_at = None;
                for (id, p) in std::mem::take(&mut outbox) {
                    handle.send(p.env.clone());
                    pending.insert(id, p);
                }
            }
            ev = client.next_event() => {
                let Some(ev) = ev else { break };
                let now = ctx.ms();
                match ev {
                    Event::Connected(_) => {
                        connected = true;
                        me.subscribed.store(0, Relaxed);
                        me.connected.store(true, Relaxed);
                        t.life.push((now, LifeKind::Connected));
                    }
                    Event::Disconnected { code, .. } => {
                        if !connected {
                            continue; // a failed attempt, not a session that ended
                        }
                        connected = false;
                        me.connected.store(false, Relaxed);
                        me.subscribed.store(0, Relaxed);
                        let injected = me.pending.swap(0, Relaxed);
                        let cause = match code {
                            Some(4003) => Cause::Fault(Fault::Slow),
                            Some(1001) => Cause::Fault(Fault::Drain),
                            _ => Cause::from_code(ctx.totals.restarting.load(Relaxed))
                                .or_else(|| {
                                    ((injected & 0xff_ffff_ffff_ffff) as u32 >= now)
                                        .then(|| Cause::from_code((injected >> 56) as u8))
                                        .flatten()
                                })
                                .unwrap_or(Cause::Other),
                        };
                        t.life.push((now, LifeKind::Disconnected(cause, code)));
                    }
                    Event::Subscribed(ch) => {
                        if let Some(c) = ctx.names.parse(&ch) {
                            me.subscribed.fetch_add(1, Relaxed);
                            t.life.push((now, LifeKind::Subscribed(c)));
                        }
                    }
                    Event::SubscribeFailed { .. } => t.sub_failed += 1,
                    // No presence subscriptions here.
                    Event::Present { .. } | Event::Members { .. } => {}
                    Event::Unrecovered { ch, reason, .. } => {
                        if let Some(c) = ctx.names.parse(&ch) {
                            t.life.push((now, LifeKind::Unrecovered(c, reason)));
                        }
                    }
                    Event::Message(env) => match env.t {
                        Type::Msg => {
                            let (Some(ch), Some(st)) = (
                                env.ch.as_deref().and_then(|c| ctx.names.parse(c)),
                                payload::decode(&env.payload),
                            ) else {
                                continue;
                            };
                            ctx.totals.received.fetch_add(1, Relaxed);
                            t.last_rx_ms = now;
                            me.last_rx_ms.store(now, Relaxed);
                            t.last_rx_by_ch.insert(ch, now);
                            let _ = t.latency.record(crate::peer::now_ns().saturating_sub(st.t) / 1000);
                            if !t.received.insert(key(st.p, st.s)) {
                                t.dups += 1;
                            }
                            let l = last.entry((ch, st.p)).or_default();
                            if st.s < *l {
                                t.reorders += 1;
                                t.reordered.push((st.p, st.s, *l));
                            } else {
                                *l = st.s;
                            }
                        }
                        Type::Ok => {
                            if let Some(p) = env.id.and_then(|id| pending.remove(&id)) {
                                if env.meta.as_deref().is_some_and(|m| m.contains("\"duplicate\":true")) {
                                    t.dup_acks += 1;
                                }
                                ctx.totals.acked.fetch_add(1, Relaxed);
                                let oldest = pending.values().map(|p| p.sent_ms.max(1)).min().unwrap_or(0);
                                me.oldest_unanswered_ms.store(oldest, Relaxed);
                                t.acks.push(Ack { key: p.key, ch: p.ch, sent_ms: p.sent_ms, retried: p.attempts > 1 });
                            }
                        }
                        Type::Err => {
                            if let Some(id) = env.id && let Some(mut p) = pending.remove(&id) {
                                let code = env.err_code().map(|c| c.name().to_string())
                                    .or(env.code.map(|c| c.to_string())).unwrap_or_default();
                                *t.errs.entry(code).or_default() += 1;
                                if p.attempts >= RETRY_LIMIT {
                                    t.gave_up += 1;
                                    ctx.totals.gave_up.fetch_add(1, Relaxed);
                                } else {
                                    p.attempts += 1;
                                    outbox.insert(id, p);
                                    retry_at.get_or_insert_with(|| tokio::time::Instant::now() + RETRY_DELAY);
                                }
                            }
                        }
                        _ => {}
                    },
                    Event::Stopped(r) => {
                        t.stopped = (!closing).then(|| format!("{r:?}"));
                        break;
                    }
                }
            }
        }
    }
    me.connected.store(false, Relaxed);
    t.unacked = (pending.len() + outbox.len()) as u64;
    t.redeliveries_dropped = client.stats().redeliveries_dropped.load(Relaxed);
    t.publishes_resent = client.stats().publishes_resent.load(Relaxed);
    t
}

/// A restart the harness did.
#[derive(Clone, Debug, Default)]
struct Restart {
    fault: Option<Fault>,
    signal_ms: u32,
    exit_ms: Option<u32>,
    ready_ms: Option<u32>,
    /// The new gateway's pid.
    pid: Option<u32>,
    error: Option<String>,
    /// Which gateway (0: the first, 1: `--gateway2-env`).
    gateway: usize,
}

impl Restart {
    /// A restart of `gateway` by `fault`, beginning now.
    fn begin(fault: Fault, gateway: usize, t0: Instant) -> Restart {
        Restart {
            fault: Some(fault),
            signal_ms: t0.elapsed().as_millis() as u32,
            gateway,
            ..Restart::default()
        }
    }
}

/// Runs `cmd` (`sh -c`) with `{n}` replaced by `n`.
async fn shell(cmd: &str, n: usize) -> Result<()> {
    let cmd = cmd.replace("{n}", &n.to_string());
    let st = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .stdin(std::process::Stdio::null())
        .status()
        .await?;
    if !st.success() {
        bail!("`{cmd}` exited with {st}");
    }
    Ok(())
}

/// The 1-based NATS node (of the `--nats-mon` list) that gateway node
/// `node_id` is connected to, read from each node's `/connz`.
async fn nats_node_of(mons: &[String], node_id: &str) -> Option<usize> {
    let name = format!("edgegate {node_id}");
    for (i, m) in mons.iter().enumerate() {
        let Ok((200, body)) = crate::admin::get(m, "/connz?limit=4096").await else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&body) else {
            continue;
        };
        let conns = v["connections"].as_array().cloned().unwrap_or_default();
        if conns
            .iter()
            .any(|c| c["name"].as_str() == Some(name.as_str()))
        {
            return Some(i + 1);
        }
    }
    None
}

/// SIGKILLs the NATS node gateway `gw_node` is connected to, starts it
/// again after `down`, and waits until the gateway is back on NATS
/// (`edgegate_backbone_up 1` on its admin endpoint): `ready_ms`.
#[allow(clippy::too_many_arguments)]
async fn nats_kill(
    a: ChaosArgs,
    gateway: usize,
    gw_node: String,
    admin: Option<String>,
    limit: Duration,
    t0: Instant,
    totals: Arc<Totals>,
) -> Restart {
    let ms = || t0.elapsed().as_millis() as u32;
    let mut r = Restart::begin(Fault::NatsKill, gateway, t0);
    let (Some(kill), Some(start)) = (&a.nats_kill_cmd, &a.nats_restart_cmd) else {
        r.error = Some("nats-kill needs --nats-kill-cmd and --nats-restart-cmd".into());
        return r;
    };
    let Some(n) = nats_node_of(&a.nats_mon, &gw_node).await else {
        r.error = Some(format!(
            "no NATS node of {:?} has a connection named \"edgegate {gw_node}\"",
            a.nats_mon
        ));
        return r;
    };
    totals
        .restarting
        .store(Cause::Fault(Fault::NatsKill).code(), Relaxed);
    if let Err(e) = shell(kill, n).await {
        r.error = Some(format!("{e:#}"));
        totals.restarting.store(0, Relaxed);
        return r;
    }
    r.exit_ms = Some(ms());
    tokio::time::sleep(Duration::from_secs_f64(a.nats_down_secs)).await;
    if let Err(e) = shell(start, n).await {
        r.error = Some(format!("{e:#}"));
        totals.restarting.store(0, Relaxed);
        return r;
    }
    // Back on NATS: the gateway says so.
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let up = match &admin {
            Some(ad) => crate::admin::get(ad, "/metrics")
                .await
                .is_ok_and(|(_, b)| b.lines().any(|l| l == "edgegate_backbone_up 1")),
            None => true,
        };
        if up {
            r.ready_ms = Some(ms());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if r.ready_ms.is_none() {
        r.error = Some(format!(
            "gateway {gw_node} not back on NATS within {limit:?}"
        ));
    }
    totals.restarting.store(0, Relaxed);
    r
}

/// Signals the gateway, waits for it to exit, starts it again, waits until ready.
#[allow(clippy::too_many_arguments)]
async fn restart(
    gw: Arc<Mutex<Gateway>>,
    gateway: usize,
    fault: Fault,
    target: String,
    admin: Option<String>,
    limit: Duration,
    t0: Instant,
    totals: Arc<Totals>,
) -> Restart {
    let ms = || t0.elapsed().as_millis() as u32;
    let mut r = Restart::begin(fault, gateway, t0);
    let mut g = gw.lock().await;
    totals.restarting.store(Cause::Fault(fault).code(), Relaxed);
    let sig = if fault == Fault::Kill { "KILL" } else { "TERM" };
    if let Err(e) = g.signal(sig) {
        r.error = Some(format!("{e:#}"));
        totals.restarting.store(0, Relaxed);
        return r;
    }
    if g.wait_exit(limit).await.is_none() {
        r.error = Some(format!(
            "the gateway did not exit within {limit:?} of SIG{sig}"
        ));
        totals.restarting.store(0, Relaxed);
        return r;
    }
    r.exit_ms = Some(ms());
    match g.start() {
        Ok(_) => {
            r.pid = g.pid();
            if wait_ready(&target, admin.as_deref(), limit).await.is_some() {
                r.ready_ms = Some(ms());
            } else {
                r.error = Some(format!(
                    "restarted gateway not ready within {limit:?} (log: {})",
                    g.log_path().display()
                ));
            }
        }
        Err(e) => r.error = Some(format!("{e:#}")),
    }
    totals.restarting.store(0, Relaxed);
    r
}

/// Warns (once per client) about a client that is connected but has heard
/// nothing, or had a publish unanswered, for longer than any pause lasts:
/// a connection that is stuck, for a post-mortem while it still is.
fn warn_stuck(
    live: &[Live],
    stuck: &mut [bool],
    done_to: &[Vec<(u32, Fault)>],
    now: u64,
    traffic: bool,
) {
    const STUCK_MS: u64 = 12_000;
    for (k, l) in live.iter().enumerate() {
        let quiet = now.saturating_sub(l.last_rx_ms.load(Relaxed) as u64);
        let o = l.oldest_unanswered_ms.load(Relaxed) as u64;
        let unanswered = if o > 0 { now.saturating_sub(o) } else { 0 };
        // Silence only means something while messages flow.
        let silent = traffic && quiet > STUCK_MS;
        if (silent || unanswered > STUCK_MS) && l.connected.load(Relaxed) && !stuck[k] {
            stuck[k] = true;
            eprintln!(
                "chaos: client {k} ({}) connected, silent for {quiet} ms, a publish unanswered for {unanswered} ms (harness did {:?})",
                client_ip(k),
                done_to[k]
            );
        }
    }
}

/// Per-fault figures.
#[derive(Default)]
struct PerFault {
    injected: u64,
    sessions_ended: u64,
    recoveries: Vec<u32>,
    unrecovered: BTreeMap<String, u64>,
    lost: u64,
    covered: u64,
    close_codes: BTreeMap<String, u64>,
}

/// Runs the scenario.
pub async fn run(a: ChaosArgs) -> Result<Report> {
    let c = &a.common;
    if c.transport == crate::Transport::Quic {
        bail!("chaos injects its faults through a TCP proxy: --transport ws or tcp");
    }
    if a.clients < 2 || a.clients > MAX_CLIENTS {
        bail!("--clients must be within 2..={MAX_CLIENTS}");
    }
    if a.rooms == 0 || a.rooms_per_client == 0 || a.rooms_per_client > a.rooms {
        bail!("need 1 <= --rooms-per-client <= --rooms");
    }
    crate::scenario::check_proxied_files(a.clients)?;
    let restarts_wanted: Vec<Fault> = a
        .faults
        .iter()
        .copied()
        .filter(|f| matches!(f, Fault::Drain | Fault::Kill | Fault::NatsKill))
        .collect();
    let limit = Duration::from_secs_f64(a.gateway.exit_timeout_secs);
    let target = c.target();
    // The gateway nodes: (process, client address, admin address, node id).
    let mut nodes = vec![(
        a.gateway.gateway_env.clone(),
        target.clone(),
        c.admin.clone(),
        a.gateway.gateway_log.clone(),
    )];
    if !a.gateway2_env.is_empty() {
        let Some(t2) = a.target2.clone() else {
            bail!("--gateway2-env needs --target2 (the second gateway's client address)");
        };
        let mut env = a.gateway.gateway_env.clone();
        env.extend(a.gateway2_env.iter().cloned());
        let log = a
            .gateway
            .gateway_log
            .as_ref()
            .map(|p| p.with_extension("2.log"));
        nodes.push((env, t2, a.admin2.clone(), log));
    }
    let mut gws = Vec::new();
    let mut node_ids = Vec::new();
    for (env, t, ad, log) in &nodes {
        let mut gw = Gateway::new(a.gateway.gateway_cmd.clone(), env, log.clone(), None)?;
        if gw.can_start() {
            gw.start_ready(t, ad.as_deref(), limit).await?;
        } else if !restarts_wanted.is_empty() {
            bail!(
                "the drain, kill and nats-kill faults need --gateway-cmd (the harness starts the gateways)"
            );
        }
        let id = env
            .iter()
            .rev()
            .find_map(|kv| kv.strip_prefix("EDGEGATE_BACKBONE__NODE_ID="))
            .unwrap_or_default()
            .to_owned();
        node_ids.push(id);
        gws.push(Arc::new(Mutex::new(gw)));
    }
    let mut gw_pid = match gws.first() {
        Some(g) => g.lock().await.pid(),
        None => None,
    }
    .or_else(|| crate::scenario::gateway_pid(c.gateway_pid));
    let targets: Vec<String> = nodes.iter().map(|n| n.1.clone()).collect();
    let proxy = FaultProxy::start_many(&targets, Some(a.proxy_rcvbuf)).await?;
    let tag = format!("{:06x}", fastrand::u32(..) & 0xff_ffff);
    let names = Arc::new(Names {
        rooms: a.rooms,
        room_prefix: format!("room:chaos-{tag}-"),
        user_prefix: format!("user:lc{tag}x"),
    });
    let t0 = Instant::now();
    let mut chart = Chart::new(t0);
    let rss0 = gw_pid.and_then(procfs::rss_kib);
    let live: Arc<Vec<Live>> = Arc::new((0..a.clients).map(|_| Live::default()).collect());
    let totals = Arc::new(Totals::default());
    let mut rng = fastrand::Rng::with_seed(a.seed);

    // Rooms per client, members per room.
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); a.rooms];
    let client_rooms: Vec<Vec<Ch>> = (0..a.clients)
        .map(|i| {
            (0..a.rooms_per_client)
                .map(|j| ((i * a.rooms_per_client + j) % a.rooms) as Ch)
                .collect()
        })
        .collect();
    for (i, rs) in client_rooms.iter().enumerate() {
        for r in rs {
            members[*r as usize].push(i as u32);
        }
    }

    // Clients, started at --connect-rate.
    let pb = crate::peer::bar(c.quiet, a.clients as u64, "connect");
    let mut senders = Vec::with_capacity(a.clients);
    let mut tasks = Vec::with_capacity(a.clients);
    let gap = Duration::from_secs_f64(1.0 / a.connect_rate.max(1.0));
    for (i, rooms) in client_rooms.iter().enumerate() {
        let mut cfg = crate::peer::config(c, names.user(i), Some(client_ip(i)));
        cfg.addr = proxy.addr().to_string();
        cfg.backoff = Backoff {
            base: Duration::from_millis(a.backoff_base_ms),
            cap: Duration::from_millis(a.backoff_cap_ms),
            max_attempts: None,
        };
        cfg.seed = Some(a.seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        let client = Client::start(cfg);
        for r in rooms {
            client.subscribe(&names.room(*r as usize));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        let ctx = ClientCtx {
            idx: i,
            names: names.clone(),
            live: live.clone(),
            totals: totals.clone(),
            t0,
            encoding: c.encoding(),
            size: a.size,
        };
        tasks.push(tokio::spawn(run_client(ctx, client, rooms.clone(), rx)));
        pb.inc(1);
        tokio::time::sleep(gap).await;
    }
    let all_in = |live: &[Live]| {
        live.iter().all(|l| {
            l.connected.load(Relaxed) && l.subscribed.load(Relaxed) as usize >= a.rooms_per_client
        })
    };
    let ready = crate::scenario::wait_until(Duration::from_secs(60), || all_in(&live)).await;
    pb.finish_and_clear();
    if !all_in(&live) {
        let n = live.iter().filter(|l| l.connected.load(Relaxed)).count();
        bail!(
            "setup: only {n} of {} clients connected and subscribed after {ready:?}",
            a.clients
        );
    }
    let setup_secs = t0.elapsed().as_secs_f64();
    chart.mark("all subscribed");

    // Traffic and faults.
    let gw_cpu = procfs::CpuMeter::start(gw_pid);
    let me_cpu = procfs::CpuMeter::start(None);
    let pb = crate::peer::bar(c.quiet, a.duration.ceil() as u64, "chaos");
    let mut room_pacer = Pacer::new(a.rate, None);
    let mut dm_pacer = Pacer::new(a.dm_rate, None);
    let mut injected: BTreeMap<Fault, u64> = BTreeMap::new();
    // What the harness did to each client, (ms, fault), for post-mortems.
    let mut done_to: Vec<Vec<(u32, Fault)>> = vec![Vec::new(); a.clients];
    let mut stuck = vec![false; a.clients];
    let has = |f: Fault| a.faults.contains(&f);
    let tp = Instant::now();
    let dur = Duration::from_secs_f64(a.duration);
    let mut next_cut = Duration::from_secs_f64(1.0 / a.cut_rate.max(1e-3));
    let slow_every = Duration::from_secs_f64(a.slow_every_secs.max(0.1));
    let mut next_slow = slow_every;
    let restart_every = Duration::from_secs_f64(a.restart_every_secs.max(1.0));
    let mut next_restart = restart_every;
    let mut restart_task: Option<tokio::task::JoinHandle<Restart>> = None;
    let mut restarts: Vec<Restart> = Vec::new();
    let mut restart_i = 0usize;
    let mut last_sample = (Instant::now(), 0u64);
    // The end of the last pause: the settle waits for it.
    let mut paused_until = Instant::now();
    let now_ms = |t0: Instant| t0.elapsed().as_millis() as u64;
    // A connected client with no fault pending.
    let pick = |rng: &mut fastrand::Rng, live: &[Live]| -> Option<usize> {
        for _ in 0..64 {
            let k = rng.usize(..live.len());
            let l = &live[k];
            if l.connected.load(Relaxed) && l.pending.load(Relaxed) == 0 {
                return Some(k);
            }
        }
        None
    };
    while tp.elapsed() < dur {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let el = tp.elapsed();
        for _ in 0..room_pacer.due(el) {
            let i = rng.usize(..a.clients);
            let r = client_rooms[i][rng.usize(..a.rooms_per_client)];
            let _ = senders[i].send(Cmd::Publish(r));
        }
        for _ in 0..dm_pacer.due(el) {
            let i = rng.usize(..a.clients);
            let mut j = rng.usize(..a.clients - 1);
            if j >= i {
                j += 1;
            }
            let _ = senders[i].send(Cmd::Publish((a.rooms + j) as Ch));
        }
        if has(Fault::Cut) {
            while el >= next_cut {
                next_cut += Duration::from_secs_f64(1.0 / a.cut_rate.max(1e-3));
                if let Some(k) = pick(&mut rng, &live) {
                    let deadline = now_ms(t0) + 5_000;
                    live[k].pending.store(
                        ((Cause::Fault(Fault::Cut).code() as u64) << 56) | deadline,
                        Relaxed,
                    );
                    if proxy.cut(client_ip(k)) {
                        *injected.entry(Fault::Cut).or_default() += 1;
                        done_to[k].push((now_ms(t0) as u32, Fault::Cut));
                    } else {
                        live[k].pending.store(0, Relaxed);
                    }
                }
            }
        }
        if has(Fault::Slow) && el >= next_slow {
            next_slow += slow_every;
            let d = Duration::from_secs_f64(a.slow_secs);
            paused_until = Instant::now() + d;
            for _ in 0..a.slow_clients {
                if let Some(k) = pick(&mut rng, &live) {
                    let deadline = now_ms(t0) + d.as_millis() as u64 + 10_000;
                    live[k].pending.store(
                        ((Cause::Fault(Fault::Slow).code() as u64) << 56) | deadline,
                        Relaxed,
                    );
                    if proxy.pause(client_ip(k), d) {
                        *injected.entry(Fault::Slow).or_default() += 1;
                        done_to[k].push((now_ms(t0) as u32, Fault::Slow));
                        for _ in 0..a.slow_burst {
                            let mut from = rng.usize(..a.clients - 1);
                            if from >= k {
                                from += 1;
                            }
                            let _ = senders[from].send(Cmd::Publish((a.rooms + k) as Ch));
                        }
                    }
                }
            }
        }
        if !restarts_wanted.is_empty() && el >= next_restart && restart_task.is_none() {
            next_restart += restart_every;
            let f = restarts_wanted[restart_i % restarts_wanted.len()];
            // Faults take turns between the gateways.
            let g = restart_i % gws.len();
            restart_i += 1;
            *injected.entry(f).or_default() += 1;
            chart.mark(&match f {
                Fault::Kill => format!("SIGKILL gw{g}"),
                Fault::NatsKill => format!("NATS of gw{g} killed"),
                _ => format!("SIGTERM gw{g}"),
            });
            restart_task = Some(if f == Fault::NatsKill {
                tokio::spawn(nats_kill(
                    a.clone(),
                    g,
                    node_ids[g].clone(),
                    nodes[g].2.clone(),
                    limit,
                    t0,
                    totals.clone(),
                ))
            } else {
                tokio::spawn(restart(
                    gws[g].clone(),
                    g,
                    f,
                    nodes[g].1.clone(),
                    nodes[g].2.clone(),
                    limit,
                    t0,
                    totals.clone(),
                ))
            });
        }
        if restart_task.as_ref().is_some_and(|t| t.is_finished())
            && let Some(t) = restart_task.take()
        {
            let r = t.await?;
            if r.gateway == 0 {
                gw_pid = r.pid.or(gw_pid);
            }
            if let Some(ms) = r.ready_ms {
                chart.push_at(panel::CONNECTIONS, "gateway ready", ms as f64 / 1000.0, 0.0);
            }
            restarts.push(r);
        }
        if last_sample.0.elapsed() >= Duration::from_secs(1) {
            let rec = totals.received.load(Relaxed);
            let secs = last_sample.0.elapsed().as_secs_f64();
            chart.push(
                "deliveries / s",
                "received",
                (rec - last_sample.1) as f64 / secs,
            );
            last_sample = (Instant::now(), rec);
            warn_stuck(&live, &mut stuck, &done_to, now_ms(t0), true);
            let up = live.iter().filter(|l| l.connected.load(Relaxed)).count();
            chart.push(panel::CONNECTIONS, "clients connected", up as f64);
            if let Some(r) = gw_pid.and_then(procfs::rss_kib) {
                chart.push(panel::RSS, "gateway RSS", r as f64 / 1024.0);
            }
            pb.set_position(tp.elapsed().as_secs());
            pb.set_message(format!(
                "sent {} acked {} recv {} up {up}",
                totals.sent.load(Relaxed),
                totals.acked.load(Relaxed),
                rec
            ));
        }
    }
    let traffic_secs = tp.elapsed().as_secs_f64();
    let received_in_traffic = totals.received.load(Relaxed);
    pb.finish_and_clear();
    if let Some(t) = restart_task.take() {
        let x = t.await?;
        if x.gateway == 0 {
            gw_pid = x.pid.or(gw_pid);
        }
        restarts.push(x);
    }
    // Over a restart the CPU meter's process is gone: no figure.
    let gw_pct = gw_cpu.percent().filter(|_| {
        restarts
            .iter()
            .all(|r| r.gateway != 0 || r.fault == Some(Fault::NatsKill))
    });
    let me_pct = me_cpu.percent();

    // Settle: the last pause over, everyone back, every publish answered,
    // deliveries quiet for a second.
    let t_settle = Instant::now();
    tokio::time::sleep_until(tokio::time::Instant::from_std(paused_until)).await;
    let mut quiet = (Instant::now(), totals.received.load(Relaxed));
    while t_settle.elapsed() < Duration::from_secs_f64(a.settle_secs) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rec = totals.received.load(Relaxed);
        if rec != quiet.1 {
            quiet = (Instant::now(), rec);
        }
        let answered =
            totals.acked.load(Relaxed) + totals.gave_up.load(Relaxed) >= totals.sent.load(Relaxed);
        if all_in(&live) && answered && quiet.0.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    let settle_secs = t_settle.elapsed().as_secs_f64();
    let rss_end = gw_pid.and_then(procfs::rss_kib);
    let admin_after = match &c.admin {
        Some(ad) => crate::admin::get(ad, "/metrics").await.ok().map(|(_, b)| b),
        None => None,
    };
    drop(senders);
    let mut tallies = Vec::with_capacity(tasks.len());
    for t in tasks {
        tallies.push(t.await?);
    }
    for gw in &gws {
        let mut g = gw.lock().await;
        if g.started_here {
            let _ = g.signal("TERM");
            let _ = g.wait_exit(limit).await;
        }
    }

    // Accounting.
    let mut per: BTreeMap<Cause, PerFault> = BTreeMap::new();
    for (f, n) in &injected {
        per.entry(Cause::Fault(*f)).or_default().injected = *n;
    }
    let mut latency = new_histogram();
    let mut all_recoveries: Vec<u32> = Vec::new();
    let mut unrecovered_total: BTreeMap<String, u64> = BTreeMap::new();
    for t in &tallies {
        let _ = latency.add(&t.latency);
        let mut open: Option<(u32, Cause)> = None; // the disconnect a recovery is counted from
        let mut subs: HashSet<Ch> = HashSet::new();
        let mut last_cause = Cause::Other;
        for (ms, k) in &t.life {
            match k {
                LifeKind::Disconnected(cause, code) => {
                    let pf = per.entry(*cause).or_default();
                    pf.sessions_ended += 1;
                    *pf.close_codes
                        .entry(code.map_or("none".into(), |c| c.to_string()))
                        .or_default() += 1;
                    last_cause = *cause;
                    if open.is_none() {
                        open = Some((*ms, *cause));
                    }
                    subs.clear();
                }
                LifeKind::Connected => subs.clear(),
                LifeKind::Subscribed(ch) => {
                    subs.insert(*ch);
                    if let Some((t_d, cause)) = open
                        && t.rooms.iter().all(|r| subs.contains(r))
                    {
                        per.entry(cause).or_default().recoveries.push(ms - t_d);
                        all_recoveries.push(ms - t_d);
                        open = None;
                    }
                }
                LifeKind::Unrecovered(_, reason) => {
                    *per.entry(last_cause)
                        .or_default()
                        .unrecovered
                        .entry(reason.clone())
                        .or_default() += 1;
                    *unrecovered_total.entry(reason.clone()).or_default() += 1;
                }
            }
        }
    }
    // Every acked message at every member.
    let (mut expected, mut delivered, mut lost, mut covered) = (0u64, 0u64, 0u64, 0u64);
    let mut lost_examples: Vec<String> = Vec::new();
    for (pi, t) in tallies.iter().enumerate() {
        for ack in &t.acks {
            let to: &[u32] = if (ack.ch as usize) < a.rooms {
                &members[ack.ch as usize]
            } else {
                &[ack.ch - a.rooms as u32][..]
            };
            for &j in to {
                expected += 1;
                let rt = &tallies[j as usize];
                if rt.received.contains(&ack.key) {
                    delivered += 1;
                    continue;
                }
                let told = rt.life.iter().any(|(ms, k)| {
                    *ms >= ack.sent_ms && matches!(k, LifeKind::Unrecovered(c, _) if *c == ack.ch)
                });
                // The fault nearest in time to the message, at that subscriber.
                let cause = rt
                    .life
                    .iter()
                    .filter_map(|(ms, k)| match k {
                        LifeKind::Disconnected(c, _) => Some((ms.abs_diff(ack.sent_ms), *c)),
                        _ => None,
                    })
                    .min()
                    .map_or(Cause::Other, |x| x.1);
                let pf = per.entry(cause).or_default();
                if told {
                    covered += 1;
                    pf.covered += 1;
                } else {
                    lost += 1;
                    pf.lost += 1;
                    if lost_examples.len() < 5 {
                        // What that subscriber's client went through, for the post-mortem.
                        let tail: Vec<String> = rt
                            .life
                            .iter()
                            .rev()
                            .take(6)
                            .map(|(ms, k)| format!("{ms} ms {k:?}"))
                            .collect();
                        lost_examples.push(format!(
                            "{} from client {pi} (sent at {} ms) never reached client {j} (its last events: {tail:?}; last delivery at {} ms, on this channel at {:?} ms; the harness did {:?})",
                            names.ch(ack.ch),
                            ack.sent_ms,
                            rt.last_rx_ms,
                            rt.last_rx_by_ch.get(&ack.ch),
                            done_to[j as usize]
                        ));
                    }
                }
            }
        }
    }
    let sum = |f: &dyn Fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let acked = sum(&|t| t.acks.len() as u64);
    let dups = sum(&|t| t.dups);
    // A publish refused and sent again is stored after the ones its
    // publisher sent meanwhile (or, when the refused one was the later of
    // two, before the earlier one still on its way): the stream's order,
    // which every member sees, differs from the publisher's there, by the
    // publisher's doing. Every other reorder is the system's.
    let retried: HashSet<u64> = tallies
        .iter()
        .flat_map(|t| t.acks.iter().filter(|a| a.retried).map(|a| a.key))
        .collect();
    let after_retry = tallies
        .iter()
        .flat_map(|t| t.reordered.iter())
        .filter(|&&(p, late, high)| {
            (late..=high.min(late + 1_000)).any(|s| retried.contains(&key(p, s)))
        })
        .count() as u64;
    let reorders = sum(&|t| t.reorders) - after_retry;
    let dup_acks = sum(&|t| t.dup_acks);
    let unacked = sum(&|t| t.unacked);
    let gave_up = sum(&|t| t.gave_up);
    let sub_failed = sum(&|t| t.sub_failed);
    let redeliveries_dropped = sum(&|t| t.redeliveries_dropped);
    let publishes_resent = sum(&|t| t.publishes_resent);
    let stopped: Vec<&String> = tallies.iter().filter_map(|t| t.stopped.as_ref()).collect();
    let mut errs: BTreeMap<String, u64> = BTreeMap::new();
    for t in &tallies {
        for (k, v) in &t.errs {
            *errs.entry(k.clone()).or_default() += v;
        }
    }

    // After each restart: every channel must come back with epoch_changed.
    let (mut checked, mut epoch_changed, mut claimed, mut never_back) = (0u64, 0u64, 0u64, 0u64);
    // (History outlives a gateway with JetStream: nothing to check; every
    // `recovered: false` is in `unrecovered`.)
    let gateway_restarts = restarts
        .iter()
        .filter(|r| !a.persistent_history && r.fault != Some(Fault::NatsKill));
    for r in gateway_restarts {
        let Some(exit) = r.exit_ms else { continue };
        for (i, t) in tallies.iter().enumerate() {
            let own = (a.rooms + i) as Ch;
            for ch in t.rooms.iter().copied().chain([own]) {
                checked += 1;
                let after = t.life.iter().filter(|(ms, _)| *ms >= exit);
                let mut told = None;
                let mut back = false;
                for (_, k) in after {
                    match k {
                        LifeKind::Unrecovered(c, reason) if *c == ch => {
                            told.get_or_insert(reason.clone());
                        }
                        LifeKind::Subscribed(c) if *c == ch => back = true,
                        LifeKind::Connected if ch == own => back = true,
                        _ => {}
                    }
                    if back {
                        break;
                    }
                }
                match (back, told.as_deref()) {
                    (false, _) => never_back += 1,
                    (true, Some("epoch_changed")) => epoch_changed += 1,
                    (true, Some(_)) => {}
                    (true, None) => claimed += 1,
                }
            }
        }
    }

    let pct = |v: &mut Vec<u32>, q: f64| -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        Some(v[i] as f64)
    };
    let mut r = Report::new(
        "chaos",
        json!({
            "clients": a.clients, "rooms": a.rooms, "rooms_per_client": a.rooms_per_client,
            "rate": a.rate, "dm_rate": a.dm_rate, "duration": a.duration, "size": a.size,
            "faults": a.faults.iter().map(|f| f.name()).collect::<Vec<_>>(),
            "cut_rate": a.cut_rate, "slow_every_secs": a.slow_every_secs,
            "slow_clients": a.slow_clients, "slow_secs": a.slow_secs, "slow_burst": a.slow_burst,
            "restart_every_secs": a.restart_every_secs, "proxy_rcvbuf": a.proxy_rcvbuf,
            "backoff_base_ms": a.backoff_base_ms, "backoff_cap_ms": a.backoff_cap_ms,
            "transport": c.transport_label(), "encoding": c.encoding().name(),
            "target": targets, "seed": a.seed, "threads": c.threads_or(1),
            "persistent_history": a.persistent_history,
        }),
    );
    let lat = summary(&latency);
    let deliveries_per_sec = received_in_traffic as f64 / traffic_secs.max(1e-3);
    let (proxied, cuts, refused) = proxy.counts();
    let mut faults_json = serde_json::Map::new();
    let mut fault_rows = Vec::new();
    for (cause, pf) in per.iter_mut() {
        let (p50, p99) = (pct(&mut pf.recoveries, 0.5), pct(&mut pf.recoveries, 0.99));
        faults_json.insert(
            cause.name().into(),
            json!({
                "injected": pf.injected, "sessions_ended": pf.sessions_ended,
                "close_codes": pf.close_codes, "recoveries": pf.recoveries.len(),
                "recovery_p50_ms": p50, "recovery_p99_ms": p99,
                "unrecovered": pf.unrecovered, "lost": pf.lost, "covered_by_unrecovered": pf.covered,
            }),
        );
        fault_rows.push((
            format!("fault {}", cause.name()),
            format!(
                "injected {}, sessions ended {} (close codes {:?}), recovered {} in p50 {} / p99 {}; recovered:false {:?}; lost {}, undelivered but reported recovered:false {}",
                pf.injected,
                pf.sessions_ended,
                pf.close_codes,
                pf.recoveries.len(),
                opt(p50, 0, " ms"),
                opt(p99, 0, " ms"),
                pf.unrecovered,
                pf.lost,
                pf.covered
            ),
        ));
    }
    let (rec_p50, rec_p99) = (
        pct(&mut all_recoveries, 0.5),
        pct(&mut all_recoveries, 0.99),
    );
    let restarts_json: Vec<Value> = restarts
        .iter()
        .map(|r| {
            json!({
                "fault": r.fault.map(Fault::name), "gateway": r.gateway, "signal_ms": r.signal_ms,
                "exit_ms": r.exit_ms, "ready_ms": r.ready_ms, "error": r.error,
            })
        })
        .collect();
    r.set("setup_secs", setup_secs);
    r.set("traffic_secs", traffic_secs);
    r.set("settle_secs", settle_secs);
    r.set("publishes_sent", totals.sent.load(Relaxed));
    r.set("publishes_acked", acked);
    r.set("publishes_acked_as_duplicate", dup_acks);
    r.set("publishes_unanswered", unacked);
    r.set("publishes_given_up", gave_up);
    r.set("publishes_resent_by_client", publishes_resent);
    r.set("err_replies", json!(errs));
    r.set("deliveries_expected", expected);
    r.set("deliveries_received", delivered);
    r.set("deliveries_per_sec", deliveries_per_sec);
    r.set("lost", lost);
    r.set("lost_examples", json!(lost_examples));
    r.set("undelivered_reported_unrecovered", covered);
    r.set("duplicates_seen_by_app", dups);
    r.set("redeliveries_dropped_by_client", redeliveries_dropped);
    r.set("reorders", reorders);
    r.set("reorders_of_retried_publishes", after_retry);
    r.set("unrecovered", json!(unrecovered_total));
    r.set("recovery_p50_ms", rec_p50);
    r.set("recovery_p99_ms", rec_p99);
    r.set("recoveries", all_recoveries.len());
    r.set("faults", Value::Object(faults_json));
    r.set("restarts", json!(restarts_json));
    r.set(
        "restart_check",
        json!({"channels_checked": checked, "epoch_changed": epoch_changed,
               "claimed_recovery": claimed, "not_back": never_back}),
    );
    r.set("subscribe_failures", sub_failed);
    r.set("clients_stopped", stopped.len());
    r.set("latency", lat.clone());
    r.set(
        "proxy",
        json!({"links": proxied, "cut": cuts, "refused_no_gateway": refused}),
    );
    r.set("gateway_pid", gw_pid);
    r.set("gateway_cpu_pct", gw_pct);
    r.set("harness_cpu_pct", me_pct);
    r.set("gateway_rss_before_kib", rss0);
    r.set("gateway_rss_end_kib", rss_end);
    if let Some(body) = &admin_after {
        r.set("gateway_metrics_text_end", body.as_str());
        let m = |n: &str| crate::admin::metric_sum(body, n);
        r.set(
            "gateway_metrics_end",
            json!({
                "history_bytes": m("edgegate_history_bytes"),
                "history_channels": m("edgegate_history_channels"),
                "recoveries_total": m("edgegate_recoveries_total"),
                "history_duplicates_total": m("edgegate_history_duplicates_total"),
                "closes_4003": crate::admin::metric_sum_with(body, "edgegate_closes_total", "code=\"4003\""),
                "closes_4009": crate::admin::metric_sum_with(body, "edgegate_closes_total", "code=\"4009\""),
            }),
        );
    }

    r.row(
        "transport / encoding",
        format!("{} / {}", c.transport_label(), c.encoding().name()),
    );
    r.row(
        "clients / rooms",
        format!(
            "{} clients, {} rooms × {} members, setup {setup_secs:.1} s",
            a.clients,
            a.rooms,
            a.clients * a.rooms_per_client / a.rooms
        ),
    );
    r.row(
        "traffic",
        format!(
            "{traffic_secs:.1} s: {:.0} room + {:.0} direct publishes/s offered; {deliveries_per_sec:.0} deliveries/s; settled in {settle_secs:.1} s",
            a.rate, a.dm_rate
        ),
    );
    r.row(
        "publishes",
        format!(
            "sent {}, acked {acked} ({dup_acks} answered duplicate), resent by the client after a reconnect {publishes_resent}, unanswered {unacked}, given up {gave_up}, err {errs:?}",
            totals.sent.load(Relaxed)
        ),
    );
    r.row(
        "deliveries",
        format!("expected {expected}, received {delivered}"),
    );
    r.row(
        "LOST (acked, never received, not reported)",
        format!("{lost} {:?}", lost_examples.first()),
    );
    r.row("undelivered, reported recovered:false", covered.to_string());
    r.row(
        "duplicates seen by the app / reorders",
        format!(
            "{dups} / {reorders} (and {after_retry} publishes refused and sent again, so stored after later ones of their publisher)"
        ),
    );
    r.row(
        "redeliveries dropped by the client",
        redeliveries_dropped.to_string(),
    );
    r.row(
        "recovered:false by reason",
        format!("{unrecovered_total:?}"),
    );
    r.row(
        "recovery time (all faults)",
        format!(
            "p50 {} / p99 {} over {} recoveries",
            opt(rec_p50, 0, " ms"),
            opt(rec_p99, 0, " ms"),
            all_recoveries.len()
        ),
    );
    for (l, v) in fault_rows {
        r.row(&l, v);
    }
    if !restarts.is_empty() {
        r.row(
            "after each restart",
            format!(
                "{checked} channel positions checked: {epoch_changed} epoch_changed, {claimed} claimed recovery, {never_back} not back"
            ),
        );
        for x in &restarts {
            r.row(
                &format!("{} gw{}", x.fault.map_or("", Fault::name), x.gateway),
                format!(
                    "signal at {:.1} s, exited {}, ready {}{}",
                    x.signal_ms as f64 / 1000.0,
                    opt(x.exit_ms.map(|m| m as f64 / 1000.0), 2, " s"),
                    opt(x.ready_ms.map(|m| m as f64 / 1000.0), 2, " s"),
                    x.error
                        .as_ref()
                        .map_or(String::new(), |e| format!(" — {e}"))
                ),
            );
        }
    }
    r.row(
        "subscribe failures / clients stopped",
        format!("{sub_failed} / {}", stopped.len()),
    );
    r.row("latency publish→deliver", latency_line(&lat));
    r.row(
        "proxy",
        format!("{proxied} links carried, {cuts} cut, {refused} refused while no gateway answered"),
    );
    if let Some(body) = &admin_after {
        let closes = |code: &str| {
            crate::admin::metric_sum_with(
                body,
                "edgegate_closes_total",
                &format!("code=\"{code}\""),
            )
            .unwrap_or(0.0)
        };
        let recov = |o: &str| {
            crate::admin::metric_sum_with(body, "edgegate_recoveries_total", &format!("=\"{o}\""))
                .unwrap_or(0.0)
        };
        r.row(
            "gateway /metrics at the end",
            format!(
                "closes 4003 {}, 4009 {}; recoveries: recovered {}, epoch_changed {}, expired {}, too_many {}; history {} B in {} channels (since its last start)",
                closes("4003"),
                closes("4009"),
                recov("recovered"),
                recov("epoch_changed"),
                recov("expired"),
                recov("too_many"),
                crate::admin::metric_sum(body, "edgegate_history_bytes").unwrap_or(0.0),
                crate::admin::metric_sum(body, "edgegate_history_channels").unwrap_or(0.0),
            ),
        );
    }
    r.row("gateway CPU", opt(gw_pct, 1, " % of one core"));
    r.row("harness CPU", opt(me_pct, 1, " % of one core"));
    r.row(
        "gateway RSS",
        format!(
            "{} → {} KiB",
            rss0.map_or("n/a".into(), |v| v.to_string()),
            rss_end.map_or("n/a".into(), |v| v.to_string())
        ),
    );
    r.set_chart(chart);
    Ok(r)
}
