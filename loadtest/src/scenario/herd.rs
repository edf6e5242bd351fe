//! `herd`: N reconnecting clients in the same rooms are cut off at once
//! (the [`FaultProxy`] goes down: every link reset, new connections held),
//! `--missed` messages are published to every room meanwhile by a publisher
//! connected directly, then the network comes back and every client
//! reconnects and recovers at the same moment (`sub` with `since`: the
//! replay of everything it missed).
//!
//! Reported: the time from the network's return until every client has
//! received every missed message (and until the first / half / 99 % had),
//! `recovered: false` answers (there should be none), the gateway's RSS
//! before, after the messages were stored, at its peak during the recovery
//! (sampled every `--sample-ms`) and at the end, and the history store's
//! own accounting (`edgegate_history_bytes`) per stored message.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgegate_client::{Backoff, Client, Connection, Envelope, Event, Type};
use serde_json::json;

use crate::cli::HerdArgs;
use crate::faultproxy::{FaultProxy, MAX_CLIENTS, client_ip};
use crate::payload::{self, Stamp};
use crate::procfs;
use crate::report::{Report, opt};
use crate::series::{Chart, panel};

/// Messages per second the publisher sends (under `limits.conn_msgs_per_s`'s default).
const PUBLISH_RATE: f64 = 8000.0;

#[derive(Default)]
struct Live {
    connected: AtomicBool,
    subscribed: AtomicU32,
    /// Messages received since the cut.
    got: AtomicU64,
    /// When `got` reached the target, ms since the network came back (+1, 0 = not yet).
    done_ms: AtomicU64,
    unrecovered: AtomicU64,
}

struct Shared {
    live: Vec<Live>,
    /// Messages every client must receive after the cut.
    target: AtomicU64,
    /// Counting starts (set once every client is disconnected).
    counting: AtomicBool,
    /// The network came back here (ms since t0, +1; 0 = not yet).
    up_ms: AtomicU64,
    t0: Instant,
}

async fn run_client(i: usize, mut client: Client, sh: Arc<Shared>) -> (u64, u64) {
    let me = &sh.live[i];
    let mut connected = false;
    while let Some(ev) = client.next_event().await {
        match ev {
            Event::Connected(_) => {
                connected = true;
                me.subscribed.store(0, Relaxed);
                me.connected.store(true, Relaxed);
            }
            Event::Disconnected { .. } if connected => {
                connected = false;
                me.connected.store(false, Relaxed);
            }
            Event::Subscribed(_) => {
                me.subscribed.fetch_add(1, Relaxed);
            }
            Event::Unrecovered { .. } => {
                me.unrecovered.fetch_add(1, Relaxed);
            }
            Event::Message(env) if env.t == Type::Msg && sh.counting.load(Relaxed) => {
                let n = me.got.fetch_add(1, Relaxed) + 1;
                if n == sh.target.load(Relaxed) {
                    let up = sh.up_ms.load(Relaxed);
                    let now = sh.t0.elapsed().as_millis() as u64 + 1;
                    me.done_ms.store(now.saturating_sub(up) + 1, Relaxed);
                }
            }
            Event::Stopped(_) => break,
            _ => {}
        }
    }
    let s = client.stats();
    (
        s.redeliveries_dropped.load(Relaxed),
        s.publishes_resent.load(Relaxed),
    )
}

/// Runs the scenario.
pub async fn run(a: HerdArgs) -> Result<Report> {
    let c = &a.common;
    if c.transport == crate::Transport::Quic {
        bail!("herd cuts the network through a TCP proxy: --transport ws or tcp");
    }
    if a.clients == 0 || a.clients > MAX_CLIENTS || a.rooms == 0 {
        bail!("--clients must be within 1..={MAX_CLIENTS} and --rooms at least 1");
    }
    crate::scenario::check_proxied_files(a.clients)?;
    let gw = crate::scenario::gateway_pid(c.gateway_pid);
    let target = c.target();
    let proxy = FaultProxy::start(&target, None).await?;
    let tag = format!("{:06x}", fastrand::u32(..) & 0xff_ffff);
    let rooms: Vec<String> = (0..a.rooms)
        .map(|r| format!("room:herd-{tag}-{r}"))
        .collect();
    let t0 = Instant::now();
    let mut chart = Chart::new(t0);
    let sh = Arc::new(Shared {
        live: (0..a.clients).map(|_| Live::default()).collect(),
        target: AtomicU64::new(a.missed * a.rooms as u64),
        counting: AtomicBool::new(false),
        up_ms: AtomicU64::new(0),
        t0,
    });
    let rss_start = gw.and_then(procfs::rss_kib);

    let pb = crate::peer::bar(c.quiet, a.clients as u64, "connect");
    let gap = Duration::from_secs_f64(1.0 / a.connect_rate.max(1.0));
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..a.clients {
        let mut cfg = crate::peer::config(c, format!("lh{tag}x{i}"), Some(client_ip(i)));
        cfg.addr = proxy.addr().to_string();
        cfg.backoff = Backoff {
            base: Duration::from_millis(a.backoff_base_ms),
            cap: Duration::from_millis(a.backoff_base_ms.max(1) * 4),
            max_attempts: None,
        };
        cfg.connect_timeout = Duration::from_secs_f64(a.recover_secs.max(10.0));
        let client = Client::start(cfg);
        for r in &rooms {
            client.subscribe(r);
        }
        handles.push(client.handle());
        tasks.push(tokio::spawn(run_client(i, client, sh.clone())));
        pb.inc(1);
        tokio::time::sleep(gap).await;
    }
    let all_in = |sh: &Shared| {
        sh.live
            .iter()
            .all(|l| l.connected.load(Relaxed) && l.subscribed.load(Relaxed) as usize >= a.rooms)
    };
    crate::scenario::wait_until(Duration::from_secs(60), || all_in(&sh)).await;
    pb.finish_and_clear();
    if !all_in(&sh) {
        bail!("setup: not every client connected and subscribed within 60 s");
    }
    let setup_secs = t0.elapsed().as_secs_f64();

    // The network goes down; the publisher (direct) fills the rooms.
    let metrics =
        |b: &Option<String>, n: &str| b.as_deref().and_then(|b| crate::admin::metric_sum(b, n));
    let body = |ad: Option<String>| async move {
        match ad {
            Some(ad) => crate::admin::get(&ad, "/metrics").await.ok().map(|x| x.1),
            None => None,
        }
    };
    let m_before = body(c.admin.clone()).await;
    proxy.set_down(true);
    chart.mark("network down");
    crate::scenario::wait_until(Duration::from_secs(20), || {
        sh.live.iter().all(|l| !l.connected.load(Relaxed))
    })
    .await;
    let still = sh.live.iter().filter(|l| l.connected.load(Relaxed)).count();
    if still > 0 {
        bail!("{still} clients still connected 20 s after the network went down");
    }
    sh.counting.store(true, Relaxed);
    let rss_before = gw.and_then(procfs::rss_kib);
    let mut pcfg = crate::peer::config(c, format!("lh{tag}pub"), None);
    pcfg.addr = target.clone();
    let mut publisher = Connection::connect(&pcfg)
        .await
        .with_context(|| format!("publisher: connect to {target}"))?;
    let t_pub = Instant::now();
    let mut oks = 0u64;
    let mut s = 0u64;
    let want = a.missed * a.rooms as u64;
    let batch = 100u64;
    while oks < want {
        if s < want && s - oks < 4 * batch {
            let mut envs = Vec::new();
            for _ in 0..batch.min(want - s) {
                s += 1;
                let mut e = Envelope::new(Type::Pub);
                e.id = Some(s);
                e.ch = Some(rooms[(s % a.rooms as u64) as usize].clone());
                e.payload = payload::encode(
                    c.encoding(),
                    Stamp {
                        p: 0,
                        s,
                        t: crate::peer::now_ns(),
                    },
                    a.size,
                );
                envs.push(e);
            }
            publisher.send_batch(&envs).await?;
            // Below the gateway's default per-connection rate (10 000/s).
            let due = Duration::from_secs_f64(s as f64 / PUBLISH_RATE);
            if let Some(wait) = due.checked_sub(t_pub.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let e = tokio::time::timeout(Duration::from_secs(10), publisher.recv())
            .await
            .context("publisher: no answer within 10 s")??;
        match e.t {
            Type::Ok => oks += 1,
            Type::Err => bail!("publisher: err {:?} {:?}", e.code, e.payload),
            _ => {}
        }
    }
    let publish_secs = t_pub.elapsed().as_secs_f64();
    let _ = publisher.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_stored = gw.and_then(procfs::rss_kib);
    let m_stored = body(c.admin.clone()).await;

    // Back, all at once.
    let up = Instant::now();
    sh.up_ms.store(t0.elapsed().as_millis() as u64 + 1, Relaxed);
    proxy.set_down(false);
    chart.mark("network up");
    let mut peak = rss_stored.unwrap_or(0);
    let sample = Duration::from_millis(a.sample_ms.max(5));
    let limit = Duration::from_secs_f64(a.recover_secs);
    let done = |sh: &Shared| sh.live.iter().all(|l| l.done_ms.load(Relaxed) > 0);
    while !done(&sh) && up.elapsed() < limit {
        tokio::time::sleep(sample).await;
        if let Some(r) = gw.and_then(procfs::rss_kib) {
            peak = peak.max(r);
            chart.push(panel::RSS, "gateway RSS", r as f64 / 1024.0);
        }
        let n = sh
            .live
            .iter()
            .filter(|l| l.done_ms.load(Relaxed) > 0)
            .count();
        chart.push("recovered clients", "done", n as f64);
        let connected = sh.live.iter().filter(|l| l.connected.load(Relaxed)).count();
        chart.push(panel::CONNECTIONS, "clients connected", connected as f64);
    }
    let all_secs = up.elapsed().as_secs_f64();
    let complete = done(&sh);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = gw.and_then(procfs::rss_kib);
    let m_after = body(c.admin.clone()).await;
    for h in &handles {
        h.close();
    }
    let (mut dropped, mut resent) = (0, 0);
    for t in tasks {
        let (d, r) = t.await?;
        dropped += d;
        resent += r;
    }

    let mut times: Vec<u64> = sh
        .live
        .iter()
        .filter_map(|l| l.done_ms.load(Relaxed).checked_sub(1))
        .collect();
    times.sort_unstable();
    let q = |f: f64| -> Option<f64> {
        (!times.is_empty()).then(|| {
            times[((times.len() as f64 * f).ceil() as usize).clamp(1, times.len()) - 1] as f64
                / 1000.0
        })
    };
    let got: u64 = sh.live.iter().map(|l| l.got.load(Relaxed)).sum();
    let over = sh
        .live
        .iter()
        .filter(|l| l.got.load(Relaxed) > want)
        .count();
    let unrecovered: u64 = sh.live.iter().map(|l| l.unrecovered.load(Relaxed)).sum();
    let hb = |m: &Option<String>| metrics(m, "edgegate_history_bytes");
    let per_msg = match (hb(&m_before), hb(&m_stored)) {
        (Some(x), Some(y)) if want > 0 => Some((y - x) / want as f64),
        _ => None,
    };
    let rss_per_msg = match (rss_before, rss_stored) {
        (Some(x), Some(y)) if want > 0 => Some((y as f64 - x as f64) * 1024.0 / want as f64),
        _ => None,
    };

    let mut r = Report::new(
        "herd",
        json!({
            "clients": a.clients, "rooms": a.rooms, "missed": a.missed, "size": a.size,
            "backoff_base_ms": a.backoff_base_ms, "transport": c.transport_label(),
            "encoding": c.encoding().name(), "target": target, "threads": c.threads_or(1),
        }),
    );
    r.set("setup_secs", setup_secs);
    r.set("publish_secs", publish_secs);
    r.set("complete", complete);
    r.set("all_recovered_secs", complete.then_some(all_secs));
    r.set("first_recovered_secs", q(0.0));
    r.set("p50_recovered_secs", q(0.5));
    r.set("p99_recovered_secs", q(0.99));
    r.set("deliveries_expected", want * a.clients as u64);
    r.set("deliveries_received", got);
    r.set("clients_with_more_than_expected", over);
    r.set("unrecovered", unrecovered);
    r.set("redeliveries_dropped_by_client", dropped);
    r.set("gateway_rss_start_kib", rss_start);
    r.set("gateway_rss_before_publish_kib", rss_before);
    r.set("gateway_rss_stored_kib", rss_stored);
    r.set("gateway_rss_peak_kib", peak);
    r.set("gateway_rss_after_kib", rss_after);
    r.set("rss_bytes_per_stored_message", rss_per_msg);
    r.set("history_bytes_per_message", per_msg);
    r.set(
        "history_metrics",
        json!({
            "bytes_before": hb(&m_before), "bytes_stored": hb(&m_stored), "bytes_after": hb(&m_after),
            "channels_stored": metrics(&m_stored, "edgegate_history_channels"),
        }),
    );
    let _ = resent;
    r.row(
        "transport / encoding",
        format!("{} / {}", c.transport_label(), c.encoding().name()),
    );
    r.row(
        "herd",
        format!(
            "{} clients × {} room(s), {} missed messages each ({} deliveries to recover), setup {setup_secs:.1} s",
            a.clients,
            a.rooms,
            want,
            want * a.clients as u64
        ),
    );
    r.row(
        "published while cut off",
        format!("{want} messages in {publish_secs:.2} s"),
    );
    r.row(
        "ALL RECOVERED",
        if complete {
            format!("{all_secs:.2} s after the network came back")
        } else {
            format!("NO: not within {:.0} s", a.recover_secs)
        },
    );
    r.row(
        "clients done: first / p50 / p99",
        format!(
            "{} / {} / {}",
            opt(q(0.0), 2, " s"),
            opt(q(0.5), 2, " s"),
            opt(q(0.99), 2, " s")
        ),
    );
    r.row(
        "deliveries",
        format!(
            "expected {}, received {got} ({over} clients got more than expected); recovered:false {unrecovered}; redeliveries dropped by the client {dropped}",
            want * a.clients as u64
        ),
    );
    r.row(
        "gateway RSS",
        format!(
            "{} before publish → {} stored → peak {} → {} after (KiB)",
            opt(rss_before.map(|v| v as f64), 0, ""),
            opt(rss_stored.map(|v| v as f64), 0, ""),
            peak,
            opt(rss_after.map(|v| v as f64), 0, "")
        ),
    );
    r.row(
        "history per message",
        format!(
            "{} (edgegate_history_bytes), {} (RSS delta)",
            opt(per_msg, 0, " B"),
            opt(rss_per_msg, 0, " B")
        ),
    );
    r.set_chart(chart);
    Ok(r)
}
