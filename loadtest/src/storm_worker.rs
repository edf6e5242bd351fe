//! The `storm` worker process: starts its share of reconnecting
//! [`edgegate_client::Client`]s at its share of the rate and reports what
//! they go through.
//!
//! stdout (worker → parent), one JSON object per line, field `ev`:
//! `p` every `report_ms`: cumulative `alive`, `connects` (welcomes),
//! `ends` (sessions that ended), `fails` (connect attempts that failed),
//! `stopped` (clients that gave up), and for the reconnects completed in
//! the interval `dt_n`, `dt_p50`, `dt_p99`, `dt_max` (ms from the
//! session's end to the next welcome); `done` after `close`: failure
//! reasons, session-end reasons, downtime summary, CPU.
//! stdin (parent → worker): `close` (or EOF). The worker exits by itself
//! after `max_life_secs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use edgegate_client::{Backoff, Client, Event};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use crate::cli::StormWorkerArgs;
use crate::pacer::Pacer;
use crate::peer;

#[derive(Default)]
struct State {
    alive: AtomicU64,
    connects: AtomicU64,
    ends: AtomicU64,
    fails: AtomicU64,
    stopped: AtomicU64,
    fail_reasons: Mutex<HashMap<String, u64>>,
    end_reasons: Mutex<HashMap<String, u64>>,
    /// Downtime of reconnects completed since the last progress line (µs).
    interval: Mutex<Option<Histogram<u64>>>,
    /// Every reconnect's downtime (µs).
    total: Mutex<Option<Histogram<u64>>>,
}

fn bump(m: &Mutex<HashMap<String, u64>>, k: String) {
    if let Ok(mut g) = m.lock() {
        *g.entry(k).or_default() += 1;
    }
}

fn record(h: &Mutex<Option<Histogram<u64>>>, us: u64) {
    if let Ok(mut g) = h.lock() {
        let h = g.get_or_insert_with(crate::track::new_histogram);
        let _ = h.record(us.max(1));
    }
}

fn reason(code: Option<u16>, text: &str) -> String {
    match code {
        Some(c) => format!("close {c}"),
        None => {
            // "connect 127.0.0.1:27000: Connection refused (os error 111)" → keep the cause.
            let t = text.rsplit(": ").next().unwrap_or(text);
            t.chars().take(48).collect()
        }
    }
}

/// Runs a storm worker until told to close (or its life bound).
pub async fn run(a: StormWorkerArgs) -> Result<()> {
    let c = a.common.clone();
    let ips = match &c.source_ips {
        Some(s) => crate::ips::parse_range(s)?,
        None => Vec::new(),
    };
    let st = Arc::new(State::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let life = tokio::time::sleep(Duration::from_secs_f64(a.max_life_secs));
    tokio::pin!(life);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let t0 = Instant::now();
    let mut pacer = Pacer::new(a.rate, Some(a.clients));
    let mut tick = tokio::time::interval(Duration::from_millis(a.report_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = pace.tick(), if !pacer.done() => {
                let first = pacer.issued();
                for n in first..first + pacer.due(t0.elapsed()) {
                    let global = u64::from(a.index) * a.clients + n;
                    let src = (!ips.is_empty()).then(|| ips[(global % ips.len() as u64) as usize]);
                    let mut cfg = peer::config(&c, format!("ls{}x{n}", a.index), src);
                    cfg.backoff = Backoff {
                        base: Duration::from_millis(a.backoff_base_ms),
                        cap: Duration::from_millis(a.backoff_cap_ms),
                        max_attempts: a.max_attempts,
                    };
                    cfg.seed = Some(global.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED);
                    tokio::spawn(client_task(Client::start(cfg), st.clone(), stop_rx.clone()));
                }
            }
            _ = tick.tick() => {
                let (n, p50, p99, max) = match st.interval.lock().ok().and_then(|mut g| g.take()) {
                    Some(h) => (h.len(), h.value_at_quantile(0.5) as f64 / 1000.0,
                                h.value_at_quantile(0.99) as f64 / 1000.0, h.max() as f64 / 1000.0),
                    None => (0, 0.0, 0.0, 0.0),
                };
                println!("{}", json!({"ev": "p", "alive": st.alive.load(Relaxed),
                    "connects": st.connects.load(Relaxed), "ends": st.ends.load(Relaxed),
                    "fails": st.fails.load(Relaxed), "stopped": st.stopped.load(Relaxed),
                    "issued": pacer.issued(),
                    "dt_n": n, "dt_p50": p50, "dt_p99": p99, "dt_max": max}));
            }
            l = lines.next_line() => match l {
                Ok(Some(cmd)) if cmd.trim() != "close" => {}
                _ => break,
            },
            _ = &mut life => break,
        }
    }
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = st
        .total
        .lock()
        .ok()
        .and_then(|g| g.as_ref().map(crate::track::summary));
    let snap = |m: &Mutex<HashMap<String, u64>>| m.lock().map(|g| json!(*g)).unwrap_or(json!({}));
    println!(
        "{}",
        json!({"ev": "done", "alive": st.alive.load(Relaxed), "connects": st.connects.load(Relaxed),
        "ends": st.ends.load(Relaxed), "fails": st.fails.load(Relaxed), "stopped": st.stopped.load(Relaxed),
        "fail_reasons": snap(&st.fail_reasons), "end_reasons": snap(&st.end_reasons),
        "downtime": total, "cpu_secs": crate::procfs::self_cpu_secs(),
        "rss_kib": crate::procfs::rss_kib(std::process::id())})
    );
    Ok(())
}

/// Follows one client's events until stop.
async fn client_task(mut client: Client, st: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut up = false;
    let mut down_since: Option<Instant> = None;
    loop {
        let ev = tokio::select! {
            e = client.next_event() => e,
            _ = stop.changed() => {
                client.close();
                if up { st.alive.fetch_sub(1, Relaxed); }
                return;
            }
        };
        match ev {
            Some(Event::Connected(_)) => {
                if let Some(t) = down_since.take() {
                    let us = t.elapsed().as_micros() as u64;
                    record(&st.interval, us);
                    record(&st.total, us);
                }
                up = true;
                st.alive.fetch_add(1, Relaxed);
                st.connects.fetch_add(1, Relaxed);
            }
            Some(Event::Disconnected {
                code, reason: r, ..
            }) => {
                if up {
                    up = false;
                    down_since = Some(Instant::now());
                    st.alive.fetch_sub(1, Relaxed);
                    st.ends.fetch_add(1, Relaxed);
                    bump(&st.end_reasons, reason(code, &r));
                } else {
                    st.fails.fetch_add(1, Relaxed);
                    bump(&st.fail_reasons, reason(code, &r));
                }
            }
            Some(Event::Stopped(why)) => {
                if up {
                    st.alive.fetch_sub(1, Relaxed);
                }
                st.stopped.fetch_add(1, Relaxed);
                bump(&st.fail_reasons, format!("stopped {why:?}"));
                return;
            }
            Some(_) => {}
            None => {
                if up {
                    st.alive.fetch_sub(1, Relaxed);
                }
                return;
            }
        }
    }
}
