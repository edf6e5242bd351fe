//! Shared machinery of the message scenarios: opening many sessions at a
//! paced rate, and the per-connection task that publishes on command and
//! accounts for deliveries.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use edgegate_client::{ClientConfig, Connection, Envelope, Type};
use tokio::sync::{mpsc, watch};

use crate::cli::Common;
use crate::payload::{self, Stamp};
use crate::track::{Deliveries, SeqTrack};

static START: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the harness's start instant (shared by every task in the process).
pub fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A session config for `user` with the shared options.
pub fn config(c: &Common, user: String, source: Option<std::net::IpAddr>) -> ClientConfig {
    let mut cfg = ClientConfig::new(c.target(), c.transport, user);
    cfg.encoding = c.encoding();
    cfg.tls = c.tls;
    cfg.ca_file = c.ca.clone();
    cfg.server_name = c.server_name.clone();
    cfg.source_addr = source;
    cfg.connect_timeout = Duration::from_secs_f64(c.connect_timeout_secs);
    cfg.client_name = Some("edgegate-loadtest".into());
    cfg
}

/// Counters shared by every peer task, read by the progress display and the drain logic.
#[derive(Debug, Default)]
pub struct Counters {
    /// Publishes written.
    pub sent: AtomicU64,
    /// `ok` answers to publishes.
    pub acked: AtomicU64,
    /// `err` answers.
    pub errors: AtomicU64,
    /// `msg` deliveries (including duplicates).
    pub received: AtomicU64,
    /// Sessions that ended during the run.
    pub disconnects: AtomicU64,
    /// Latency per time bucket, for the charts.
    pub timeline: crate::series::Timeline,
}

/// Opens one session per user at `rate` per second; `setup` runs on each
/// fresh connection (e.g. subscribe and wait for ok). Fails if any fails.
pub async fn connect_all<F, Fut>(
    common: &Common,
    users: Vec<String>,
    rate: f64,
    progress: &indicatif::ProgressBar,
    setup: F,
) -> Result<Vec<Connection>>
where
    F: Fn(Connection) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = edgegate_client::Result<Connection>> + Send,
{
    connect_paced(common, users, rate, progress, move |cfg| {
        let setup = setup.clone();
        async move {
            match Connection::connect(&cfg).await {
                Ok(c) => setup(c).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
}

/// Runs `open` once per user at `rate` per second, each with the session
/// config of that user (source address and target chosen round robin);
/// returns what they opened in user order, or fails if any failed.
pub async fn connect_paced<T, F, Fut>(
    common: &Common,
    users: Vec<String>,
    rate: f64,
    progress: &indicatif::ProgressBar,
    open: F,
) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(ClientConfig) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, String>> + Send + 'static,
{
    let ips = match &common.source_ips {
        Some(s) => crate::ips::parse_range(s)?,
        None => Vec::new(),
    };
    let n = users.len();
    let mut set = tokio::task::JoinSet::new();
    let mut pacer = crate::pacer::Pacer::new(rate, Some(n as u64));
    let t0 = Instant::now();
    let mut users = users.into_iter().enumerate();
    while !pacer.done() {
        let due = pacer.due(t0.elapsed());
        for _ in 0..due {
            let Some((i, u)) = users.next() else { break };
            let src = (!ips.is_empty()).then(|| ips[i % ips.len()]);
            let mut cfg = config(common, u, src);
            // Several gateways (--target a,b): connection i goes to the
            // i-th in turn, so pair members sit on different nodes.
            if let Some(t) = common.target_for(i) {
                cfg.addr = t;
            }
            let fut = open(cfg);
            set.spawn(async move { (i, fut.await) });
        }
        tokio::time::sleep(pacer.tick()).await;
    }
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut failures: HashMap<String, u64> = HashMap::new();
    while let Some(r) = set.join_next().await {
        progress.inc(1);
        match r {
            Ok((i, Ok(c))) => out[i] = Some(c),
            Ok((_, Err(e))) => *failures.entry(e).or_default() += 1,
            Err(e) => *failures.entry(e.to_string()).or_default() += 1,
        }
    }
    if !failures.is_empty() {
        let total: u64 = failures.values().sum();
        bail!("{total} of {n} connections failed: {failures:?}");
    }
    Ok(out.into_iter().flatten().collect())
}

/// Subscribes `conn` to `rooms` in one pipelined batch (with `meta`, such
/// as `{"presence":true}`) and waits for every `ok`: `on_ok` is called for
/// each, `other` sees every other envelope read meanwhile; a refusal is an
/// error.
pub async fn join_rooms(
    conn: &mut Connection,
    rooms: &[String],
    meta: Option<&str>,
    mut on_ok: impl FnMut(),
    mut other: impl FnMut(&Envelope),
) -> edgegate_client::Result<()> {
    if rooms.is_empty() {
        return Ok(());
    }
    let first = conn.next_id();
    for _ in 1..rooms.len() {
        conn.next_id();
    }
    let ids = first..first + rooms.len() as u64;
    let subs: Vec<Envelope> = rooms
        .iter()
        .zip(ids.clone())
        .map(|(r, id)| {
            let mut e = Envelope::new(Type::Sub);
            e.id = Some(id);
            e.ch = Some(r.clone());
            e.meta = meta.map(str::to_owned);
            e
        })
        .collect();
    conn.send_batch(&subs).await?;
    let mut left = rooms.len();
    while left > 0 {
        let e = conn.recv().await?;
        let ours = e.id.is_some_and(|id| ids.contains(&id));
        match e.t {
            Type::Ok if ours => {
                left -= 1;
                on_ok();
            }
            Type::Err if ours => {
                return Err(edgegate_client::Error::Decode(format!(
                    "sub refused: {:?} {:?}",
                    e.code, e.reason
                )));
            }
            _ => other(&e),
        }
    }
    Ok(())
}

/// Subscribes `conn` to `ch` and waits for the `ok` (messages published after it arrive).
pub async fn subscribe_and_wait(
    mut conn: Connection,
    ch: String,
) -> edgegate_client::Result<Connection> {
    let id = conn.subscribe(&ch).await?;
    loop {
        let e = conn.recv().await?;
        if e.id == Some(id) && e.t == Type::Ok {
            return Ok(conn);
        }
        if e.id == Some(id) && e.t == Type::Err {
            return Err(edgegate_client::Error::Decode(format!(
                "sub {ch} refused: {:?} {:?}",
                e.code, e.reason
            )));
        }
    }
}

/// What one peer task saw.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Deliveries and latency.
    pub deliveries: Deliveries,
    /// Publishes written.
    pub sent: u64,
    /// Why the session ended early, if it did.
    pub lost: Option<String>,
    /// `err` codes received.
    pub errs: HashMap<String, u64>,
}

/// Role of a peer task.
pub struct PeerRole {
    /// This peer's publisher index (stamped into payloads).
    pub index: u64,
    /// Where its publishes go; `None`: receive only.
    pub publish_to: Option<String>,
    /// Commands: publish this many messages now. Closed = publishing over.
    pub commands: Option<mpsc::UnboundedReceiver<u32>>,
    /// Padding bytes per payload.
    pub pad: usize,
}

/// Starts a receive-only peer (records deliveries until `stop` flips).
pub fn spawn_receiver(
    conn: Connection,
    index: u64,
    counters: &Arc<Counters>,
    stop: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<PeerStats> {
    let role = PeerRole {
        index,
        publish_to: None,
        commands: None,
        pad: 0,
    };
    tokio::spawn(run_peer(conn, role, counters.clone(), stop.clone()))
}

/// A publisher's command sender (each command: publish that many) and its
/// task.
pub type Publisher = (
    mpsc::UnboundedSender<u32>,
    tokio::task::JoinHandle<PeerStats>,
);

/// Starts a peer that publishes to `publish_to` on command (and records
/// deliveries); returns the command sender and the task.
pub fn spawn_publisher(
    conn: Connection,
    index: u64,
    publish_to: String,
    pad: usize,
    counters: &Arc<Counters>,
    stop: &watch::Receiver<bool>,
) -> Publisher {
    let (tx, rx) = mpsc::unbounded_channel();
    let role = PeerRole {
        index,
        publish_to: Some(publish_to),
        commands: Some(rx),
        pad,
    };
    (
        tx,
        tokio::spawn(run_peer(conn, role, counters.clone(), stop.clone())),
    )
}

/// Runs one connection until `stop` flips: publishes on command, records deliveries.
pub async fn run_peer(
    mut conn: Connection,
    role: PeerRole,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> PeerStats {
    let enc = conn.encoding();
    let mut stats = PeerStats::default();
    let mut tracks: HashMap<u64, SeqTrack> = HashMap::new();
    let mut commands = role.commands;
    let mut seq = 0u64;
    let mut batch: Vec<Envelope> = Vec::new();
    loop {
        tokio::select! {
            r = conn.recv() => match r {
                Ok(env) => match env.t {
                    Type::Msg => {
                        let now = now_ns();
                        counters.received.fetch_add(1, Relaxed);
                        stats.deliveries.received += 1;
                        match payload::decode(&env.payload) {
                            Some(st) => {
                                let us = (now.saturating_sub(st.t) / 1000).max(1);
                                counters.timeline.record(now, us);
                                tracks.entry(st.p).or_default().record(st.s);
                            }
                            None => stats.deliveries.malformed += 1,
                        }
                    }
                    Type::Ok => { counters.acked.fetch_add(1, Relaxed); }
                    Type::Err => {
                        counters.errors.fetch_add(1, Relaxed);
                        let code = env.err_code().map(|c| c.name().to_string())
                            .unwrap_or_else(|| format!("{:?}", env.code));
                        *stats.errs.entry(code).or_default() += 1;
                    }
                    _ => {}
                },
                Err(e) => {
                    counters.disconnects.fetch_add(1, Relaxed);
                    stats.lost = Some(e.to_string());
                    break;
                }
            },
            c = async { match commands.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                match (c, role.publish_to.as_deref()) {
                    (Some(k), Some(ch)) => {
                        batch.clear();
                        for _ in 0..k {
                            seq += 1;
                            let mut e = Envelope::new(Type::Pub);
                            e.id = Some(seq);
                            e.ch = Some(ch.to_string());
                            e.payload = payload::encode(enc, Stamp { p: role.index, s: seq, t: now_ns() }, role.pad);
                            batch.push(e);
                        }
                        if let Err(e) = conn.send_batch(&batch).await {
                            counters.disconnects.fetch_add(1, Relaxed);
                            stats.lost = Some(e.to_string());
                            break;
                        }
                        stats.sent += u64::from(k);
                        counters.sent.fetch_add(u64::from(k), Relaxed);
                    }
                    _ => { commands = None; }
                }
            },
            _ = stop.changed() => break,
        }
    }
    for t in tracks.values() {
        stats.deliveries.absorb(t);
    }
    drop(conn);
    stats
}

/// A progress bar on stderr (hidden with `quiet` or when stderr is not a terminal).
pub fn bar(quiet: bool, len: u64, msg: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
    ) {
        pb.set_style(style);
    }
    pb.set_prefix(msg.to_string());
    pb
}
