//! `pubsub`: direct messages (`user:<id>` channels) within random pairs.
//!
//! 2 × pairs sessions; users `2k` and `2k+1` form pair k. For each message the
//! pacer picks a random pair and a random direction, so every session both
//! publishes and receives. Each publisher's messages all reach one receiver,
//! so its sequence numbers must arrive dense and in order: the receiver
//! counts duplicates and order violations, and loss = sent − distinct received.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio::sync::watch;

use crate::cli::PubsubArgs;
use crate::pacer::Pacer;
use crate::peer::{self, Counters};
use crate::report::Report;
use crate::scenario::{gateway_pid, status_line, wait_until};

/// Runs the scenario.
pub async fn run(a: PubsubArgs) -> Result<Report> {
    let c = &a.common;
    let n = a.pairs * 2;
    let gw = gateway_pid(c.gateway_pid);
    let users: Vec<String> = (0..n).map(|i| format!("lt-ps-{i}")).collect();
    let mut chart = crate::series::Chart::new(Instant::now());
    let chart_ns0 = peer::now_ns();
    crate::scenario::sample_basic(&mut chart, gw, 0);
    let pb = peer::bar(c.quiet, n, "connect");
    let t_setup = Instant::now();
    let conns = peer::connect_all(c, users, a.connect_rate, &pb, |c| async move { Ok(c) }).await?;
    pb.finish_and_clear();
    let setup_secs = t_setup.elapsed().as_secs_f64();
    crate::scenario::sample_basic(&mut chart, gw, n);
    chart.mark("connected");

    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut senders = Vec::with_capacity(n as usize);
    let mut tasks = Vec::with_capacity(n as usize);
    for (i, conn) in conns.into_iter().enumerate() {
        let (tx, task) = peer::spawn_publisher(
            conn,
            i as u64,
            format!("user:lt-ps-{}", i ^ 1),
            a.size,
            &counters,
            &stop_rx,
        );
        senders.push(tx);
        tasks.push(task);
    }

    let meters = crate::scenario::Meters::start(c.admin.as_deref(), gw).await;
    let pb = peer::bar(c.quiet, (a.duration * 10.0) as u64, "publish");
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let mut pacer = Pacer::new(a.rate, Some((a.rate * a.duration).round() as u64));
    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(a.duration);
    let mut last_sample = Instant::now();
    let mut per: HashMap<usize, u32> = HashMap::new();
    while t0.elapsed() < limit && !pacer.done() {
        tokio::time::sleep(pacer.tick()).await;
        let due = pacer.due(t0.elapsed());
        per.clear();
        for _ in 0..due {
            let pair = rng.u64(0..a.pairs) as usize;
            let who = pair * 2 + usize::from(rng.bool());
            *per.entry(who).or_default() += 1;
        }
        for (who, k) in &per {
            let _ = senders[*who].send(*k);
        }
        pb.set_position((t0.elapsed().as_secs_f64() * 10.0) as u64);
        pb.set_message(status_line(&counters));
        if last_sample.elapsed() >= Duration::from_millis(250) {
            last_sample = Instant::now();
            let open = (n).saturating_sub(counters.disconnects.load(Relaxed));
            crate::scenario::sample_basic(&mut chart, gw, open);
        }
    }
    drop(senders);
    let publish_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    // Drain: until every issued message was written, answered and delivered, bounded.
    let issued = pacer.issued();
    let cnt = counters.clone();
    let drained = wait_until(Duration::from_secs_f64(a.drain_secs), move || {
        let s = cnt.sent.load(Relaxed);
        s >= issued
            && cnt.received.load(Relaxed) >= s
            && cnt.acked.load(Relaxed) + cnt.errors.load(Relaxed) >= s
    })
    .await;
    let total_secs = t0.elapsed().as_secs_f64();
    let measured = meters.stop(c.admin.as_deref()).await;
    let open = (n).saturating_sub(counters.disconnects.load(Relaxed));
    crate::scenario::sample_basic(&mut chart, gw, open);
    chart.mark("drained");
    let _ = stop_tx.send(true);

    let mut g = crate::scenario::Gathered::default();
    g.join(tasks).await?;
    g.latency_from(&counters.timeline);
    let (sent, received) = (g.sent, g.d.received);
    let loss = sent.saturating_sub(g.d.unique);
    let mut r = Report::new(
        "pubsub",
        json!({
            "pairs": a.pairs, "connections": n, "rate": a.rate, "duration": a.duration,
            "size": a.size, "transport": c.transport_label(), "tls": c.tls || c.transport == crate::Transport::Quic, "encoding": c.encoding().name(),
            "target": c.target(), "threads": c.threads_or(1),
        }),
    );
    r.set("setup_secs", setup_secs);
    r.set("publish_secs", publish_secs);
    r.set("drain_secs", drained.as_secs_f64());
    r.set("sent", sent);
    r.set("acked", counters.acked.load(Relaxed));
    r.set("achieved_rate", sent as f64 / publish_secs);
    r.set("delivered_per_sec", received as f64 / total_secs);

    r.row(
        "transport / encoding",
        format!("{} / {}", c.transport_label(), c.encoding().name()),
    );
    r.row(
        "connections",
        format!("{n} ({} pairs), setup {setup_secs:.2} s", a.pairs),
    );
    r.row(
        "offered / achieved",
        format!(
            "{:.0} msg/s / {:.0} msg/s over {publish_secs:.1} s",
            a.rate,
            sent as f64 / publish_secs
        ),
    );
    r.row(
        "sent / received",
        format!("{sent} / {received} (unique {})", g.d.unique),
    );
    g.report(&mut r, loss);
    measured.report(&mut r, gw);
    counters.timeline.chart_into(&mut chart, chart_ns0, "");
    r.set_chart(chart);
    Ok(r)
}
