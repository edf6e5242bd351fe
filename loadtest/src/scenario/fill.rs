//! `fill`: what the gateway's history really costs against its budget
//! (`history.shard_bytes`, docs/architecture.md, "Memory of the history").
//!
//! `--connections` publishers write `--messages` stored messages to each of
//! `--rooms` rooms (room k by connection k mod connections, pipelined
//! `--window` deep), `--rounds` times, each round to rooms of new names, so
//! that every round after the budget is spent evicts what the one before
//! stored. After each round it reads the gateway's RSS and its history
//! gauges (bytes held, channel records, evictions). The figure is RSS above
//! the gateway's RSS before the first publish, against the budget of all
//! shards: a budget that bounds real memory keeps that ratio near 1.
//!
//! Every publish carries an id, so each stored message also leaves a
//! deduplication key for `history.dedupe_window_ms` (what a client library
//! does); `--no-ids` publishes without one (no key kept: a `ping` after each
//! window is the barrier).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use edgegate_client::{Connection, Envelope, Type};
use serde_json::json;

use crate::cli::FillArgs;
use crate::peer;
use crate::procfs;
use crate::report::Report;
use crate::scenario::gateway_pid;

/// The gateway's metric `name`, summed over its series.
async fn metric(admin: Option<&str>, name: &str) -> Option<f64> {
    let (status, body) = crate::admin::get(admin?, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    crate::admin::metric_sum(&body, name)
}

/// Publishes `msgs` (room names, in order) on `conn`, `window` at a time,
/// and waits for every answer. Returns the `err` answers.
async fn publish(
    conn: &mut Connection,
    msgs: Vec<String>,
    window: usize,
    ids: bool,
    payload: &str,
    sent: &AtomicU64,
) -> edgegate_client::Result<u64> {
    let mut errors = 0;
    for chunk in msgs.chunks(window.max(1)) {
        let mut batch = Vec::with_capacity(chunk.len() + 1);
        let mut want = Vec::with_capacity(chunk.len() + 1);
        for ch in chunk {
            let mut e = Envelope::new(Type::Pub);
            e.ch = Some(ch.clone());
            e.payload = edgegate_client::Payload::Json(payload.to_owned().into());
            if ids {
                let id = conn.next_id();
                e.id = Some(id);
                want.push(id);
            }
            batch.push(e);
        }
        if !ids {
            // The session answers in order: the ping's pong says every
            // publish before it was taken.
            let mut p = Envelope::new(Type::Ping);
            let id = conn.next_id();
            p.id = Some(id);
            want.push(id);
            batch.push(p);
        }
        conn.send_batch(&batch).await?;
        sent.fetch_add(chunk.len() as u64, Relaxed);
        let mut left = want.len();
        while left > 0 {
            let e = conn.recv().await?;
            if e.id.is_some_and(|id| want.contains(&id)) {
                match e.t {
                    Type::Ok | Type::Pong => left -= 1,
                    Type::Err => {
                        errors += 1;
                        left -= 1;
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(errors)
}

/// Runs the scenario.
pub async fn run(a: FillArgs) -> Result<Report> {
    let c = &a.common;
    let (n, rooms) = (a.connections.max(1), a.rooms.max(1));
    let gw = gateway_pid(c.gateway_pid);
    let Some(gw) = gw else {
        bail!("fill measures the gateway's RSS: pass --gateway-pid");
    };
    let admin = c.admin.as_deref();
    if admin.is_none() {
        bail!("fill reads the gateway's history gauges: pass --admin");
    }
    let tag = format!("{:x}", fastrand::u32(..));
    let payload = format!("{{\"t\":\"{}\"}}", "x".repeat(a.size));
    let users: Vec<String> = (0..n).map(|i| format!("fill{tag}p{i}")).collect();
    let pb = peer::bar(true, n as u64, "connect");
    let mut conns = peer::connect_all(c, users, 1000.0, &pb, |c| async move { Ok(c) }).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = procfs::rss_kib(gw).unwrap_or(0);
    let budget = Some(a.budget_mib * 1024.0 * 1024.0);
    let sent = Arc::new(AtomicU64::new(0));
    let mut rows = Vec::new();
    let t0 = Instant::now();
    for round in 1..=a.rounds {
        let t = Instant::now();
        let mut per_conn: Vec<Vec<String>> = vec![Vec::new(); n];
        for _ in 0..a.messages {
            for k in 0..rooms {
                per_conn[k % n].push(format!("room:fill{tag}r{round}-{k}"));
            }
        }
        let mut tasks = Vec::with_capacity(n);
        for (conn, msgs) in conns.drain(..).zip(per_conn) {
            let (sent, payload) = (sent.clone(), payload.clone());
            let (window, ids) = (a.window, !a.no_ids);
            tasks.push(tokio::spawn(async move {
                let mut conn = conn;
                let r = publish(&mut conn, msgs, window, ids, &payload, &sent).await;
                (conn, r)
            }));
        }
        let mut errors = 0;
        for t in tasks {
            let (conn, r) = t.await?;
            errors += r?;
            conns.push(conn);
        }
        // Let the owner shards store the last of them.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = procfs::rss_kib(gw).unwrap_or(0);
        let held = metric(admin, "edgegate_history_bytes").await;
        let records = metric(admin, "edgegate_history_channels").await;
        let evicted = metric(admin, "edgegate_history_evicted_total").await;
        let above = (rss.saturating_sub(rss0)) as f64 * 1024.0;
        let row = json!({
            "round": round,
            "secs": t.elapsed().as_secs_f64(),
            "errors": errors,
            "rss_kib": rss,
            "rss_above_start_bytes": above,
            "history_bytes": held,
            "history_channels": records,
            "evicted": evicted,
            "rss_over_budget": budget.map(|b| above / b),
            "rss_over_held": held.map(|h| above / h),
        });
        if !c.quiet {
            eprintln!("{row}");
        }
        rows.push(row);
    }
    let mut r = Report::new(
        "fill",
        json!({
            "connections": n, "rooms": rooms, "messages": a.messages, "rounds": a.rounds,
            "size": a.size, "ids": !a.no_ids, "window": a.window,
        }),
    );
    r.set("rss_start_kib", rss0);
    r.set("history_budget_bytes", budget);
    r.set("published", sent.load(Relaxed));
    r.set("secs", t0.elapsed().as_secs_f64());
    r.set("rounds", rows.clone());
    let mib = |b: f64| b / (1024.0 * 1024.0);
    r.row(
        "fill",
        format!(
            "{n} connections × {rooms} rooms × {} messages of {} B payload, {} rounds, {}",
            a.messages,
            payload.len(),
            a.rounds,
            if a.no_ids {
                "no ids"
            } else {
                "with ids (dedupe keys)"
            }
        ),
    );
    r.row(
        "gateway RSS at start",
        format!(
            "{:.1} MiB; history budget (all shards) {}",
            rss0 as f64 / 1024.0,
            budget.map_or("unknown".into(), |b| format!("{:.1} MiB", mib(b)))
        ),
    );
    for row in &rows {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        r.row(
            &format!("round {}", row["round"]),
            format!(
                "RSS +{:.1} MiB ({:.2}× budget, {:.2}× held); held {:.1} MiB in {:.0} records; {:.0} evicted; {:.1} s, {} errors",
                mib(f("rss_above_start_bytes")),
                f("rss_over_budget"),
                f("rss_over_held"),
                mib(f("history_bytes")),
                f("history_channels"),
                f("evicted"),
                f("secs"),
                row["errors"],
            ),
        );
    }
    Ok(r)
}
