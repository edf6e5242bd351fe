//! `soak`: a mix for a duration — `--idle` idle sessions held throughout
//! plus `--pairs` pubsub pairs exchanging direct messages at `--rate` —
//! with the gateway's RSS and CPU, the open connections and the
//! publish→deliver latency sampled every `--sample-secs`.
//!
//! Drift: the RSS slope over the run after a warm-up (the first 20 % of
//! the samples), RSS first vs last sample, and latency p50/p99 of the first
//! third of the samples vs the last third.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use tokio::sync::watch;

use crate::cli::SoakArgs;
use crate::pacer::Pacer;
use crate::peer::{self, Counters};
use crate::procfs;
use crate::report::{Report, latency_line, opt};
use crate::scenario::{gateway_pid, status_line, wait_until};
use crate::series::{Chart, Timeline, panel, slope};
use crate::track::summary;

/// Runs the scenario.
pub async fn run(a: SoakArgs) -> Result<Report> {
    let c = &a.common;
    let total = a.idle + 2 * a.pairs;
    if let Some(limit) = procfs::open_files_limit()
        && total + 64 > limit
    {
        bail!("{total} connections in one process exceed the open-files limit {limit}");
    }
    let gw = gateway_pid(c.gateway_pid);
    if gw.is_none() {
        eprintln!("no gateway pid (pass --gateway-pid): RSS and CPU of the gateway not measured");
    }
    let mut chart = Chart::new(Instant::now());
    let chart_ns0 = peer::now_ns();
    let rss0 = gw.and_then(procfs::rss_kib);
    if let Some(r) = rss0 {
        chart.push(panel::RSS, "gateway RSS", r as f64 / 1024.0);
    }

    // Idle sessions first, then the pairs.
    let pb = peer::bar(c.quiet, total, "connect");
    let t_setup = Instant::now();
    let idle_users: Vec<String> = (0..a.idle).map(|i| format!("lt-soak-idle-{i}")).collect();
    let idle =
        peer::connect_all(c, idle_users, a.connect_rate, &pb, |c| async move { Ok(c) }).await?;
    let pair_users: Vec<String> = (0..2 * a.pairs).map(|i| format!("lt-soak-{i}")).collect();
    let pairs =
        peer::connect_all(c, pair_users, a.connect_rate, &pb, |c| async move { Ok(c) }).await?;
    pb.finish_and_clear();
    let setup_secs = t_setup.elapsed().as_secs_f64();
    chart.mark("connected");

    let bucket_ns = (a.sample_secs.max(0.1) * 1e9) as u64;
    let counters = Arc::new(Counters {
        timeline: Timeline::new(bucket_ns),
        ..Counters::default()
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut idle_tasks = Vec::new();
    for (i, conn) in idle.into_iter().enumerate() {
        idle_tasks.push(peer::spawn_receiver(
            conn,
            1_000_000 + i as u64,
            &counters,
            &stop_rx,
        ));
    }
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for (i, conn) in pairs.into_iter().enumerate() {
        let (tx, task) = peer::spawn_publisher(
            conn,
            i as u64,
            format!("user:lt-soak-{}", i ^ 1),
            a.size,
            &counters,
            &stop_rx,
        );
        senders.push(tx);
        tasks.push(task);
    }

    let meters = crate::scenario::Meters::start(c.admin.as_deref(), gw).await;
    let pb = peer::bar(c.quiet, a.duration.ceil() as u64, "soak");
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let mut pacer = Pacer::new(a.rate, Some((a.rate * a.duration).round() as u64));
    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(a.duration);
    let mut per: HashMap<usize, u32> = HashMap::new();
    let sample = Duration::from_secs_f64(a.sample_secs.max(0.1));
    let mut next_sample = sample;
    let mut last_cpu = (gw.and_then(procfs::cpu_secs), Instant::now());
    // (t, rss KiB) samples during the traffic.
    let mut rss_samples: Vec<(f64, f64)> = Vec::new();
    let mut sample_now = |chart: &mut Chart, rss_samples: &mut Vec<(f64, f64)>| {
        let t = chart.now();
        if let Some(r) = gw.and_then(procfs::rss_kib) {
            chart.push_at(panel::RSS, "gateway RSS", t, r as f64 / 1024.0);
            rss_samples.push((t, r as f64));
        }
        // CPU over the interval since the last sample (ticks are 10 ms: skip short ones).
        if last_cpu.1.elapsed() >= Duration::from_millis(500) {
            let cpu = gw.and_then(procfs::cpu_secs);
            if let (Some(now), (Some(prev), at)) = (cpu, last_cpu) {
                let pct = 100.0 * (now - prev) / at.elapsed().as_secs_f64();
                chart.push_at("CPU (% of one core)", "gateway", t, pct);
            }
            last_cpu = (cpu, Instant::now());
        }
        let lost = counters.disconnects.load(Relaxed);
        chart.push_at(
            panel::CONNECTIONS,
            "open (harness)",
            t,
            total.saturating_sub(lost) as f64,
        );
    };
    sample_now(&mut chart, &mut rss_samples);
    while t0.elapsed() < limit && !pacer.done() {
        tokio::time::sleep(pacer.tick().min(Duration::from_millis(50))).await;
        let due = pacer.due(t0.elapsed());
        per.clear();
        for _ in 0..due {
            let pair = rng.u64(0..a.pairs.max(1)) as usize;
            let who = pair * 2 + usize::from(rng.bool());
            *per.entry(who).or_default() += 1;
        }
        for (who, k) in &per {
            if let Some(s) = senders.get(*who) {
                let _ = s.send(*k);
            }
        }
        if t0.elapsed() >= next_sample {
            next_sample += sample;
            sample_now(&mut chart, &mut rss_samples);
            if let Some(ad) = &c.admin
                && let Some(m) = crate::admin::snapshot(ad).await
                && let Some(open) = m.connections
            {
                chart.push(panel::CONNECTIONS, "gateway connections (/metrics)", open);
            }
        }
        pb.set_position(t0.elapsed().as_secs());
        pb.set_message(status_line(&counters));
    }
    drop(senders);
    let publish_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let issued = pacer.issued();
    let cnt = counters.clone();
    let drained = wait_until(Duration::from_secs_f64(a.drain_secs), move || {
        let s = cnt.sent.load(Relaxed);
        s >= issued && cnt.received.load(Relaxed) >= s
    })
    .await;
    sample_now(&mut chart, &mut rss_samples);
    let total_secs = t0.elapsed().as_secs_f64();
    let delivered_per_sec = d_rate(&counters, total_secs);
    let measured = meters.stop(c.admin.as_deref()).await;
    let _ = stop_tx.send(true);

    let mut g = crate::scenario::Gathered::default();
    g.join(tasks).await?;
    g.latency_from(&counters.timeline);
    let (d, sent, mut lost_conns) = (g.d, g.sent, g.lost_conns);
    let mut idle_lost = 0;
    for t in idle_tasks {
        let s = t.await?;
        if let Some(l) = s.lost {
            idle_lost += 1;
            lost_conns.push(l);
        }
    }
    let loss = sent.saturating_sub(d.unique);
    let lat = summary(&d.latency);
    counters.timeline.chart_into(&mut chart, chart_ns0, "");

    // Drift.
    let warm = rss_samples.len() / 5;
    let rss_slope = slope(&rss_samples[warm..]).map(|s| s * 60.0); // KiB per minute
    let half = rss_samples.len() / 2;
    let rss_slope_2nd = slope(&rss_samples[half..]).map(|s| s * 60.0);
    let rss_first = rss_samples.first().map(|p| p.1);
    let rss_last = rss_samples.last().map(|p| p.1);
    let rows: Vec<_> = counters
        .timeline
        .rows()
        .into_iter()
        .filter(|r| r.1 > 0)
        .collect();
    let third = (rows.len() / 3).max(1);
    let mean = |xs: &[f64]| (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64);
    let (first, last) = if rows.len() >= 3 {
        (&rows[..third], &rows[rows.len() - third..])
    } else {
        (&rows[..], &rows[..])
    };
    let p50_first = mean(&first.iter().map(|r| r.2).collect::<Vec<_>>());
    let p50_last = mean(&last.iter().map(|r| r.2).collect::<Vec<_>>());
    let p99_first = mean(&first.iter().map(|r| r.3).collect::<Vec<_>>());
    let p99_last = mean(&last.iter().map(|r| r.3).collect::<Vec<_>>());
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };

    let mut r = Report::new(
        "soak",
        json!({
            "idle": a.idle, "pairs": a.pairs, "connections": total, "rate": a.rate,
            "duration": a.duration, "sample_secs": a.sample_secs, "size": a.size,
            "transport": c.transport_label(), "tls": c.tls || c.transport == crate::Transport::Quic, "encoding": c.encoding().name(),
            "target": c.target(), "threads": c.threads_or(1),
        }),
    );
    r.set("setup_secs", setup_secs);
    r.set("publish_secs", publish_secs);
    r.set("drain_secs", drained.as_secs_f64());
    r.set("sent", sent);
    r.set("received", d.received);
    r.set("unique", d.unique);
    r.set("lost", loss);
    r.set("duplicates", d.dups);
    r.set("order_violations", d.reordered);
    r.set("latency", lat.clone());
    r.set("delivered_per_sec", delivered_per_sec);
    r.set("disconnects", lost_conns.len());
    r.set("idle_disconnects", idle_lost);
    r.set("gateway_rss_before_connect_kib", rss0);
    r.set("gateway_rss_first_kib", rss_first);
    r.set("gateway_rss_last_kib", rss_last);
    r.set("gateway_rss_slope_kib_per_min", rss_slope);
    r.set("gateway_rss_slope_second_half_kib_per_min", rss_slope_2nd);
    r.set("latency_p50_first_third_ms", p50_first);
    r.set("latency_p50_last_third_ms", p50_last);
    r.set("latency_p99_first_third_ms", p99_first);
    r.set("latency_p99_last_third_ms", p99_last);

    r.row(
        "transport / encoding",
        format!("{} / {}", c.transport_label(), c.encoding().name()),
    );
    r.row(
        "connections",
        format!(
            "{total} ({} idle + {} pairs), setup {setup_secs:.2} s",
            a.idle, a.pairs
        ),
    );
    r.row(
        "traffic",
        format!(
            "{:.0} msg/s offered, {:.0} achieved over {publish_secs:.1} s; sent {sent} received {}",
            a.rate,
            sent as f64 / publish_secs,
            d.received
        ),
    );
    r.row(
        "lost / dup / reordered",
        format!("{loss} / {} / {}", d.dups, d.reordered),
    );
    r.row("latency (whole run)", latency_line(&lat));
    r.row(
        "latency drift",
        format!(
            "p50 {} → {} ms ({}×), p99 {} → {} ms ({}×): mean of the first vs last third of {}-s buckets",
            opt(p50_first, 3, ""),
            opt(p50_last, 3, ""),
            opt(ratio(p50_first, p50_last), 2, ""),
            opt(p99_first, 3, ""),
            opt(p99_last, 3, ""),
            opt(ratio(p99_first, p99_last), 2, ""),
            a.sample_secs
        ),
    );
    r.row(
        "gateway RSS drift",
        format!(
            "{} KiB before connecting; {} → {} KiB during traffic; slope {} after warm-up, {} over the second half",
            rss0.map_or("n/a".into(), |v| v.to_string()),
            opt(rss_first, 0, ""),
            opt(rss_last, 0, ""),
            opt(rss_slope, 1, " KiB/min"),
            opt(rss_slope_2nd, 1, " KiB/min")
        ),
    );
    r.row(
        "disconnects",
        format!(
            "{} ({idle_lost} idle) {:?}",
            lost_conns.len(),
            lost_conns.first()
        ),
    );
    measured.report(&mut r, gw);
    r.set_chart(chart);
    Ok(r)
}

fn d_rate(c: &Counters, secs: f64) -> f64 {
    c.received.load(Relaxed) as f64 / secs.max(1e-3)
}
