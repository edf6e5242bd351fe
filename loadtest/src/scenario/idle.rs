//! `idle`: many idle connections. The parent measures the gateway's baseline
//! RSS, spawns worker processes (this binary's hidden `worker` subcommand,
//! each well under the per-process open-files limit) that open their share of
//! the connections at their share of the rate, waits for the ramp, holds,
//! and measures again:
//!
//! RSS per connection = (RSS after hold − baseline RSS) / connected.
//!
//! With `--rooms R --members M` each connection also joins R rooms of M
//! members before it counts as connected, so the figure is what a chat
//! user costs: run it with and without rooms for the cost of a
//! subscription.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::cli::{Common, IdleArgs};
use crate::procfs::{self, CpuMeter};
use crate::report::{Report, opt};
use crate::scenario::gateway_pid;

/// Connections per worker process by default (the open-files limit here is 20 000).
pub const PER_WORKER: u64 = 5_000;

struct Worker {
    child: Child,
    stdin: ChildStdin,
    pid: u32,
}

pub(crate) fn worker_args(c: &Common) -> Vec<String> {
    let mut v = vec![
        "--transport".into(),
        c.transport.name().into(),
        "--encoding".into(),
        c.encoding().name().into(),
        "--target".into(),
        c.target(),
        "--threads".into(),
        c.threads_or(1).to_string(),
        "--connect-timeout-secs".into(),
        c.connect_timeout_secs.to_string(),
    ];
    if let Some(s) = &c.source_ips {
        v.push("--source-ips".into());
        v.push(s.clone());
    }
    if c.tls {
        v.push("--tls".into());
    }
    if let Some(ca) = &c.ca {
        v.push("--ca".into());
        v.push(ca.display().to_string());
    }
    v.push("--server-name".into());
    v.push(c.server_name.clone());
    v
}

pub(crate) fn cpu_sum(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| procfs::cpu_secs(*p)).sum()
}

/// Runs the scenario.
pub async fn run(a: IdleArgs) -> Result<Report> {
    let c = &a.common;
    let n = a.connections;
    let workers = a
        .workers
        .unwrap_or_else(|| n.div_ceil(PER_WORKER).max(1) as u32)
        .max(1);
    let per = n.div_ceil(u64::from(workers));
    if let Some(limit) = procfs::open_files_limit()
        && per + 64 > limit
    {
        bail!(
            "{per} connections per worker exceeds the open-files limit {limit}: use more --workers"
        );
    }
    let max_ramp = a
        .max_ramp_secs
        .unwrap_or(2.0 * n as f64 / a.rate.max(1.0) + 15.0);
    if a.rooms > 0 && (a.members == 0 || n * a.rooms < a.members) {
        bail!("--connections × --rooms must be at least --members (and --members at least 1)");
    }
    let room_count = (n * a.rooms).div_ceil(a.members.max(1)).max(1);
    let gw = gateway_pid(c.gateway_pid);
    if gw.is_none() {
        eprintln!("no gateway pid (pass --gateway-pid): RSS and CPU of the gateway not measured");
    }
    // Baseline before connecting.
    let mut chart = crate::series::Chart::new(Instant::now());
    let base_rss = gw.and_then(procfs::rss_kib);
    crate::scenario::sample_basic(&mut chart, gw, 0);
    let base_metrics = match &c.admin {
        Some(ad) => crate::admin::snapshot(ad).await,
        None => None,
    };

    let exe = std::env::current_exe().context("current_exe")?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Value)>();
    let mut ws: Vec<Worker> = Vec::new();
    let mut remaining = n;
    let t0 = Instant::now();
    let gw_ramp = CpuMeter::start(gw);
    let me_ramp = CpuMeter::start(None);
    for i in 0..workers {
        let share = per.min(remaining);
        remaining -= share;
        let rate = a.rate * share as f64 / n.max(1) as f64;
        let mut cmd = Command::new(&exe);
        cmd.arg("worker")
            .args(worker_args(c))
            .args(["--index", &i.to_string()])
            .args(["--connections", &share.to_string()])
            .args(["--rate", &rate.to_string()])
            .args(["--max-ramp-secs", &max_ramp.to_string()])
            .args(["--first", &(u64::from(i) * per).to_string()])
            .args(["--rooms", &a.rooms.to_string()])
            .args(["--room-count", &room_count.to_string()])
            .args([
                "--max-life-secs",
                &(max_ramp + c.connect_timeout_secs + a.settle_secs + a.hold_secs + 60.0)
                    .to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawn worker")?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().context("worker stdout")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let tx = tx.clone();
        let idx = i as usize;
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    let _ = tx.send((idx, v));
                }
            }
        });
        ws.push(Worker { child, stdin, pid });
    }
    drop(tx);
    let pids: Vec<u32> = ws.iter().map(|w| w.pid).collect();
    let pb = crate::peer::bar(c.quiet, n, "ramp");
    let mut progress: HashMap<usize, (u64, u64)> = HashMap::new();
    let mut ramped: HashMap<usize, Value> = HashMap::new();
    let mut alive_by: HashMap<usize, u64> = HashMap::new();
    let ramp_deadline = Duration::from_secs_f64(max_ramp + c.connect_timeout_secs + 10.0);
    while ramped.len() < ws.len() {
        let left = ramp_deadline.saturating_sub(t0.elapsed());
        let msg = match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => bail!("workers exited during the ramp"),
            Err(_) => bail!("ramp did not finish within {ramp_deadline:?}"),
        };
        let (i, v) = msg;
        let get = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        progress.insert(i, (get("connected"), get("failed")));
        if v["ev"] == "ramped" {
            ramped.insert(i, v.clone());
        }
        let (ok, bad) = progress
            .values()
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
        if v["ev"] == "progress" {
            let alive: u64 = alive_by.values().sum::<u64>()
                - alive_by.get(&i).copied().unwrap_or(0)
                + v["alive"].as_u64().unwrap_or(0);
            alive_by.insert(i, v["alive"].as_u64().unwrap_or(0));
            crate::scenario::sample_basic(&mut chart, gw, alive);
            if v["connect_n"].as_u64().unwrap_or(0) > 0 {
                for (k, name) in [
                    ("connect_p50_ms", "connect p50"),
                    ("connect_p99_ms", "connect p99"),
                ] {
                    if let Some(x) = v[k].as_f64() {
                        chart.push(crate::series::panel::LATENCY, &format!("{name} (w{i})"), x);
                    }
                }
            }
        }
        pb.set_position(ok + bad);
        pb.set_message(format!("ok {ok} failed {bad}"));
    }
    pb.finish_and_clear();
    let ramp_wall = t0.elapsed().as_secs_f64();
    let gw_ramp_cpu = gw_ramp.cpu_secs();
    let harness_ramp_cpu = me_ramp.cpu_secs().unwrap_or(0.0) + cpu_sum(&pids);
    let connected: u64 = ramped
        .values()
        .map(|v| v["connected"].as_u64().unwrap_or(0))
        .sum();
    let joined: u64 = ramped
        .values()
        .map(|v| v["joined"].as_u64().unwrap_or(0))
        .sum();
    let failed: u64 = ramped
        .values()
        .map(|v| v["failed"].as_u64().unwrap_or(0))
        .sum();
    let ramp_secs = ramped
        .values()
        .filter_map(|v| v["secs"].as_f64())
        .fold(0.0, f64::max);
    let mut errors: HashMap<String, u64> = HashMap::new();
    for v in ramped.values() {
        if let Some(m) = v["errors"].as_object() {
            for (k, x) in m {
                *errors.entry(k.clone()).or_default() += x.as_u64().unwrap_or(0);
            }
        }
    }

    crate::scenario::sample_basic(&mut chart, gw, connected);
    chart.mark("ramped");
    // Settle, then hold and measure.
    tokio::time::sleep(Duration::from_secs_f64(a.settle_secs)).await;
    let gw_hold = CpuMeter::start(gw);
    let me_hold = CpuMeter::start(None);
    let workers_cpu0 = cpu_sum(&pids);
    let pb = crate::peer::bar(c.quiet, a.hold_secs.ceil() as u64, "hold");
    let th = Instant::now();
    while th.elapsed().as_secs_f64() < a.hold_secs {
        let left = a.hold_secs - th.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64(left.clamp(0.0, 1.0))).await;
        pb.set_position(th.elapsed().as_secs());
        crate::scenario::sample_basic(&mut chart, gw, connected);
    }
    pb.finish_and_clear();
    let hold_wall = th.elapsed().as_secs_f64();
    let gw_hold_cpu = gw_hold.cpu_secs();
    let workers_hold_cpu = cpu_sum(&pids) - workers_cpu0;
    let me_hold_cpu = me_hold.cpu_secs().unwrap_or(0.0);
    let after_rss = gw.and_then(procfs::rss_kib);
    let after_metrics = match &c.admin {
        Some(ad) => crate::admin::snapshot(ad).await,
        None => None,
    };
    // Ask workers how many are still alive, then close.
    for w in &mut ws {
        let _ = w.stdin.write_all(b"status\n").await;
    }
    let mut statuses: HashMap<usize, Value> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while statuses.len() < ws.len() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some((i, v))) if v["ev"] == "status" => {
                statuses.insert(i, v);
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let worker_cpu_total = cpu_sum(&pids);
    let worker_rss: u64 = pids.iter().filter_map(|p| procfs::rss_kib(*p)).sum();
    for w in &mut ws {
        let _ = w.stdin.write_all(b"close\n").await;
    }
    for w in &mut ws {
        if tokio::time::timeout(Duration::from_secs(10), w.child.wait())
            .await
            .is_err()
        {
            let _ = w.child.start_kill();
        }
    }
    let alive: u64 = statuses
        .values()
        .map(|v| v["alive"].as_u64().unwrap_or(0))
        .sum();
    let dropped: u64 = statuses
        .values()
        .map(|v| v["dropped"].as_u64().unwrap_or(0))
        .sum();
    let mut drop_reasons: HashMap<String, u64> = HashMap::new();
    for v in statuses.values() {
        if let Some(m) = v["drop_reasons"].as_object() {
            for (k, x) in m {
                *drop_reasons.entry(k.clone()).or_default() += x.as_u64().unwrap_or(0);
            }
        }
    }

    let rss_delta = match (base_rss, after_rss) {
        (Some(b), Some(a)) => Some(a as f64 - b as f64),
        _ => None,
    };
    let per_conn_kib = rss_delta
        .filter(|_| connected > 0)
        .map(|d| d / connected as f64);
    let metrics_rss_per_conn = match (&base_metrics, &after_metrics) {
        (Some(b), Some(a)) => match (b.rss_bytes, a.rss_bytes) {
            (Some(x), Some(y)) if connected > 0 => Some((y - x) / 1024.0 / connected as f64),
            _ => None,
        },
        _ => None,
    };
    let pct = |cpu: Option<f64>, wall: f64| cpu.map(|c| 100.0 * c / wall);
    let gw_hold_pct = pct(gw_hold_cpu, hold_wall);
    let gw_ramp_pct = pct(gw_ramp_cpu, ramp_wall);
    let harness_hold_pct = 100.0 * (me_hold_cpu + workers_hold_cpu) / hold_wall;
    let harness_ramp_pct = 100.0 * harness_ramp_cpu / ramp_wall;
    let rate = if ramp_secs > 0.0 {
        connected as f64 / ramp_secs
    } else {
        0.0
    };

    let mut r = Report::new(
        "idle",
        json!({
            "connections": n, "rate": a.rate, "hold_secs": a.hold_secs, "workers": workers,
            "transport": c.transport_label(), "tls": c.tls || c.transport == crate::Transport::Quic, "encoding": c.encoding().name(),
            "target": c.target(), "source_ips": c.source_ips, "threads_per_worker": c.threads_or(1),
            "rooms_per_connection": a.rooms, "members": a.members, "rooms": if a.rooms > 0 { room_count } else { 0 },
        }),
    );
    r.set("connected", connected);
    r.set("failed", failed);
    r.set("subscriptions", joined);
    r.set("connect_errors", json!(errors));
    r.set("ramp_secs", ramp_secs);
    r.set("connect_rate", rate);
    r.set("alive_after_hold", alive);
    r.set("dropped_during_run", dropped);
    r.set("drop_reasons", json!(drop_reasons));
    r.set("gateway_pid", gw);
    r.set("gateway_rss_baseline_kib", base_rss);
    r.set("gateway_rss_after_kib", after_rss);
    r.set("gateway_rss_per_conn_kib", per_conn_kib);
    r.set(
        "gateway_rss_per_conn_kib_from_metrics",
        metrics_rss_per_conn,
    );
    r.set("gateway_cpu_ramp_pct", gw_ramp_pct);
    r.set("gateway_cpu_hold_pct", gw_hold_pct);
    r.set("harness_cpu_ramp_pct", harness_ramp_pct);
    r.set("harness_cpu_hold_pct", harness_hold_pct);
    r.set(
        "harness_cpu_total_secs",
        me_ramp.cpu_secs().unwrap_or(0.0) + worker_cpu_total,
    );
    r.set("harness_workers_rss_kib", worker_rss);
    r.set("metrics_before", json!(base_metrics));
    r.set("metrics_after", json!(after_metrics));

    r.row(
        "transport / encoding",
        format!("{} / {}", c.transport_label(), c.encoding().name()),
    );
    r.row("workers", format!("{workers} × ≤{per} connections"));
    if a.rooms > 0 {
        r.row(
            "rooms",
            format!(
                "{} per connection, {room_count} rooms of {}: {joined} subscriptions",
                a.rooms, a.members
            ),
        );
    }
    r.row(
        "connected / failed",
        format!("{connected} / {failed} of {n}  {errors:?}"),
    );
    r.row(
        "ramp",
        format!(
            "{ramp_secs:.2} s, {rate:.0} conn/s (offered {:.0}/s)",
            a.rate
        ),
    );
    r.row(
        "alive after hold",
        format!("{alive} (dropped {dropped} {drop_reasons:?})"),
    );
    r.row(
        "gateway RSS",
        format!(
            "{} KiB → {} KiB (Δ {})",
            base_rss.map_or("n/a".into(), |v| v.to_string()),
            after_rss.map_or("n/a".into(), |v| v.to_string()),
            opt(rss_delta, 0, " KiB")
        ),
    );
    r.row("gateway RSS per connection", opt(per_conn_kib, 2, " KiB"));
    if let Some(m) = after_metrics.as_ref().and_then(|m| m.sessions) {
        r.row("gateway sessions (metrics)", format!("{m:.0}"));
    }
    r.row(
        "gateway CPU ramp / hold",
        format!(
            "{} / {} of one core",
            opt(gw_ramp_pct, 1, " %"),
            opt(gw_hold_pct, 2, " %")
        ),
    );
    r.set_chart(chart);
    r.row(
        "harness CPU ramp / hold",
        format!("{harness_ramp_pct:.1} % / {harness_hold_pct:.2} % of one core (all workers + parent); workers RSS {worker_rss} KiB"),
    );
    Ok(r)
}
