//! The `idle` worker process: opens its share of connections at its share of
//! the rate, holds them, and talks to the parent in JSON lines.
//!
//! stdout (worker → parent), one JSON object per line, field `ev`:
//! `progress` {connected, failed, alive, connect_n, connect_p50_ms,
//! connect_p99_ms (connects completed since the last line)} every 250 ms
//! during the ramp; with `--rooms`, a connection counts as connected once
//! every room's `sub` is answered `ok` (`joined` counts the rooms);
//! `ramped` {connected, failed, alive, secs, errors}; `status` {alive,
//! dropped, drop_reasons} when asked; `done` {…} before exiting.
//! stdin (parent → worker), one word per line: `status`, `close`.
//! EOF on stdin closes too, and the worker exits by itself after `max_life_secs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use crate::cli::WorkerArgs;
use crate::pacer::Pacer;
use crate::peer;

#[derive(Default)]
struct State {
    connected: AtomicU64,
    joined: AtomicU64,
    failed: AtomicU64,
    alive: AtomicU64,
    dropped: AtomicU64,
    done: AtomicU64,
    errors: Mutex<HashMap<String, u64>>,
    drops: Mutex<HashMap<String, u64>>,
    /// Connect + handshake + welcome times since the last progress line (µs).
    connect_us: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

fn bump(m: &Mutex<HashMap<String, u64>>, k: String) {
    if let Ok(mut g) = m.lock() {
        *g.entry(k).or_default() += 1;
    }
}

fn snapshot(m: &Mutex<HashMap<String, u64>>) -> serde_json::Value {
    m.lock().map(|g| json!(*g)).unwrap_or(json!({}))
}

/// Runs a worker until told to close (or its life bound).
pub async fn run(a: WorkerArgs) -> Result<()> {
    let c = a.common.clone();
    let ips = match &c.source_ips {
        Some(s) => crate::ips::parse_range(s)?,
        None => Vec::new(),
    };
    let st = Arc::new(State::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let life = tokio::time::sleep(Duration::from_secs_f64(a.max_life_secs));
    tokio::pin!(life);
    let t0 = Instant::now();
    let mut pacer = Pacer::new(a.rate, Some(a.connections));
    let ramp_limit = Duration::from_secs_f64(a.max_ramp_secs);
    let mut last_progress = Instant::now();
    let mut last_done_at = Duration::ZERO;
    let mut prev_done = 0u64;
    // Ramp.
    loop {
        if !pacer.done() && t0.elapsed() < ramp_limit {
            let first = pacer.issued();
            for n in first..first + pacer.due(t0.elapsed()) {
                let global = u64::from(a.index) * a.connections + n;
                let src = (!ips.is_empty()).then(|| ips[(global % ips.len() as u64) as usize]);
                let cfg = peer::config(&c, format!("lt{}x{n}", a.index), src);
                let rooms: Vec<String> = (0..a.rooms)
                    .map(|r| {
                        let k = crate::scenario::room_of(a.first + n, r, a.rooms, a.room_count);
                        format!("room:idle-{k}")
                    })
                    .collect();
                let st = st.clone();
                let mut stop = stop_rx.clone();
                tokio::spawn(async move {
                    let t_conn = Instant::now();
                    let conn = tokio::select! {
                        r = edgegate_client::Connection::connect(&cfg) => r,
                        _ = stop.changed() => return,
                    };
                    let connect_us = (t_conn.elapsed().as_micros() as u64).max(1);
                    let conn = async {
                        let mut c = conn?;
                        peer::join_rooms(&mut c, &rooms, None, || {}, |_| {}).await?;
                        Ok(c)
                    }
                    .await;
                    st.done.fetch_add(1, Relaxed);
                    let mut conn = match conn {
                        Ok(c) => c,
                        Err(e) => {
                            st.failed.fetch_add(1, Relaxed);
                            bump(&st.errors, short(&e));
                            return;
                        }
                    };
                    st.connected.fetch_add(1, Relaxed);
                    st.joined.fetch_add(rooms.len() as u64, Relaxed);
                    st.alive.fetch_add(1, Relaxed);
                    if let Ok(mut g) = st.connect_us.lock() {
                        let h = g.get_or_insert_with(crate::track::new_histogram);
                        let _ = h.record(connect_us);
                    }
                    loop {
                        tokio::select! {
                            r = conn.recv() => if let Err(e) = r {
                                st.alive.fetch_sub(1, Relaxed);
                                st.dropped.fetch_add(1, Relaxed);
                                bump(&st.drops, short(&e));
                                return;
                            },
                            _ = stop.changed() => {
                                st.alive.fetch_sub(1, Relaxed);
                                return;
                            }
                        }
                    }
                });
            }
        }
        let finished = st.done.load(Relaxed);
        if finished > prev_done {
            prev_done = finished;
            last_done_at = t0.elapsed();
        }
        if last_progress.elapsed() >= Duration::from_millis(250) {
            last_progress = Instant::now();
            let (n, p50, p99) = match st.connect_us.lock().ok().and_then(|mut g| g.take()) {
                Some(h) => (
                    h.len(),
                    h.value_at_quantile(0.5) as f64 / 1000.0,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                ),
                None => (0, 0.0, 0.0),
            };
            emit(
                json!({"ev": "progress", "connected": st.connected.load(Relaxed),
                "failed": st.failed.load(Relaxed), "alive": st.alive.load(Relaxed),
                "connect_n": n, "connect_p50_ms": p50, "connect_p99_ms": p99}),
            );
        }
        let all_done = finished >= a.connections;
        if all_done || t0.elapsed() >= ramp_limit + Duration::from_secs_f64(c.connect_timeout_secs)
        {
            break;
        }
        tokio::time::sleep(pacer.tick().min(Duration::from_millis(20))).await;
    }
    emit(
        json!({"ev": "ramped", "connected": st.connected.load(Relaxed),
        "joined": st.joined.load(Relaxed),
        "failed": st.failed.load(Relaxed), "alive": st.alive.load(Relaxed),
        "secs": last_done_at.as_secs_f64(), "issued": pacer.issued(),
        "errors": snapshot(&st.errors)}),
    );
    // Hold: obey the parent.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            l = lines.next_line() => match l {
                Ok(Some(cmd)) => match cmd.trim() {
                    "status" => emit(json!({"ev": "status", "alive": st.alive.load(Relaxed),
                        "dropped": st.dropped.load(Relaxed), "drop_reasons": snapshot(&st.drops),
                        "cpu_secs": crate::procfs::self_cpu_secs(),
                        "rss_kib": crate::procfs::rss_kib(std::process::id())})),
                    "close" => break,
                    _ => {}
                },
                _ => break,
            },
            _ = &mut life => break,
        }
    }
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    emit(
        json!({"ev": "done", "connected": st.connected.load(Relaxed),
        "dropped": st.dropped.load(Relaxed), "cpu_secs": crate::procfs::self_cpu_secs()}),
    );
    Ok(())
}

/// A short error class for counting: the close code when there is one.
fn short(e: &edgegate_client::Error) -> String {
    match e {
        edgegate_client::Error::Closed { code, .. } => format!("close {code}"),
        other => other.to_string().chars().take(60).collect(),
    }
}
