//! `fanout`: one room, K subscribers, P publishers (not subscribed).
//!
//! Every subscriber must receive every message once, in each publisher's
//! order: expected deliveries = K × sent.
//!
//! With `--rooms N --rooms-per-subscriber R`, many small rooms instead:
//! each subscriber joins R of the N rooms (every room gets M = K × R ÷ N
//! distinct members) and publisher p publishes to room p mod N, so every
//! member still sees each of its publishers' streams whole and in order:
//! expected deliveries = M × sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio::sync::watch;

use crate::cli::{Dialect, FanoutArgs, Receiver};
use crate::pacer::Pacer;
use crate::peer::{self, Counters};
use crate::report::Report;
use crate::scenario::{gateway_pid, status_line, wait_until};

/// The subscribers, as the chosen receiver opened them.
enum Subs {
    Lean(Vec<crate::lean::LeanSub>),
    Client(Vec<edgegate_client::Connection>),
    Nats(Vec<crate::nats::NatsConn>),
    Pusher(Vec<crate::pusher::PusherSub>),
}

/// The publishers.
enum Pubs {
    Client(Vec<edgegate_client::Connection>),
    Nats(Vec<crate::nats::NatsConn>),
    Pusher(Vec<crate::pusher::PusherPub>),
}

/// The fan-out's worker threads: `--threads`, else one per CPU this
/// process may run on (its affinity mask and cgroup quota included).
pub fn fanout_threads(c: &crate::cli::Common) -> usize {
    c.threads_or(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs the scenario.
pub async fn run(a: FanoutArgs) -> Result<Report> {
    let c = &a.common;
    let gw = gateway_pid(c.gateway_pid);
    let room = format!(
        "room:{}",
        a.room
            .clone()
            .unwrap_or_else(|| format!("lt-fanout-{}", fastrand::u32(..)))
    );
    let k = a.subscribers;
    let p = a.publishers.max(1);
    let (n_rooms, per_sub) = (a.rooms.max(1), a.rooms_per_subscriber.max(1));
    if n_rooms > 1 || per_sub > 1 {
        if a.dialect == Dialect::Edgegate && a.receiver != Receiver::Lean {
            anyhow::bail!("--rooms takes lean receivers");
        }
        if per_sub > n_rooms || !(k * per_sub).is_multiple_of(n_rooms) {
            anyhow::bail!(
                "--rooms N: subscribers × rooms-per-subscriber must be a multiple of N, \
                 and rooms-per-subscriber at most N"
            );
        }
    }
    // Members of each room: every one gets every message sent to it.
    let members = k * per_sub / n_rooms;
    let room_names: Vec<String> = if n_rooms == 1 {
        vec![room.clone()]
    } else {
        (0..n_rooms).map(|r| format!("{room}-{r}")).collect()
    };
    let rooms_of = {
        let names = room_names.clone();
        move |s: u64| -> Vec<String> {
            (0..per_sub)
                .map(|r| names[crate::scenario::room_of(s, r, per_sub, n_rooms) as usize].clone())
                .collect()
        }
    };
    // The subscriber's index is its user name's suffix (`lt-fs-<i>`).
    let index_of = |cfg: &edgegate_client::ClientConfig| -> u64 {
        cfg.user
            .rsplit('-')
            .next()
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let pb = peer::bar(c.quiet, k + p, "connect");
    let mut chart = crate::series::Chart::new(Instant::now());
    let chart_ns0 = peer::now_ns();
    crate::scenario::sample_basic(&mut chart, gw, 0);
    let t_setup = Instant::now();
    let subs_users: Vec<String> = (0..k).map(|i| format!("lt-fs-{i}")).collect();
    let nats = a.dialect == Dialect::Nats;
    let pusher = a.dialect == Dialect::Pusher;
    if (nats || pusher) && (a.deflate || c.transport != crate::Transport::Ws || c.tls) {
        anyhow::bail!("--dialect nats and pusher take plain ws, without --deflate");
    }
    let app = crate::pusher::App::parse(&a.pusher_app)?;
    let lean = nats || pusher || (a.receiver == Receiver::Lean && crate::lean::serves(c));
    if n_rooms > 1 && !lean {
        anyhow::bail!("--rooms takes lean receivers, which this transport has not");
    }
    if a.deflate && !(lean && c.transport == crate::Transport::Ws) {
        anyhow::bail!("--deflate takes lean receivers over plain ws");
    }
    let deflate = a.deflate;
    let r2 = room.clone();
    let subs = if pusher {
        let (rooms_of, app) = (rooms_of.clone(), app.clone());
        Subs::Pusher(
            peer::connect_paced(c, subs_users, a.connect_rate, &pb, move |cfg| {
                let app = app.clone();
                let chans: Vec<String> = rooms_of(index_of(&cfg))
                    .iter()
                    .map(|r| crate::pusher::channel(r))
                    .collect();
                async move {
                    crate::pusher::PusherSub::connect(&cfg, &app, &chans)
                        .await
                        .map_err(|e| format!("{e:#}"))
                }
            })
            .await?,
        )
    } else if nats {
        let rooms_of = rooms_of.clone();
        Subs::Nats(
            peer::connect_paced(c, subs_users, a.connect_rate, &pb, move |cfg| {
                let subjects: Vec<String> = rooms_of(index_of(&cfg))
                    .iter()
                    .map(|r| crate::nats::subject(r))
                    .collect();
                async move {
                    crate::nats::NatsConn::connect(&cfg, &subjects)
                        .await
                        .map_err(|e| format!("{e:#}"))
                }
            })
            .await?,
        )
    } else if lean {
        // One room is the case of rooms_of giving every subscriber `room`.
        let lean_subs = peer::connect_paced(c, subs_users, a.connect_rate, &pb, move |cfg| {
            let rooms = rooms_of(index_of(&cfg));
            async move {
                let mut l = crate::lean::LeanSub::connect(&cfg, deflate)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                for r in &rooms {
                    l.subscribe(r).await.map_err(|e| format!("{e:#}"))?;
                }
                Ok(l)
            }
        })
        .await?;
        Subs::Lean(lean_subs)
    } else {
        let conns = peer::connect_all(c, subs_users, a.connect_rate, &pb, move |conn| {
            peer::subscribe_and_wait(conn, r2.clone())
        })
        .await?;
        Subs::Client(conns)
    };
    let pub_users: Vec<String> = (0..p).map(|i| format!("lt-fp-{i}")).collect();
    let pubs = if pusher {
        let app = app.clone();
        Pubs::Pusher(
            peer::connect_paced(c, pub_users, a.connect_rate, &pb, move |cfg| {
                let app = app.clone();
                async move {
                    crate::pusher::PusherPub::connect(&cfg, &app)
                        .await
                        .map_err(|e| format!("{e:#}"))
                }
            })
            .await?,
        )
    } else if nats {
        Pubs::Nats(
            peer::connect_paced(c, pub_users, a.connect_rate, &pb, |cfg| async move {
                crate::nats::NatsConn::connect(&cfg, &[])
                    .await
                    .map_err(|e| format!("{e:#}"))
            })
            .await?,
        )
    } else {
        // SSE subscribers hear publishers on WebSocket: what is measured is
        // the delivery to them (a publisher over SSE would be one POST per
        // batch, its round trips the bound).
        let mut pc = c.clone();
        if pc.transport == crate::Transport::Sse {
            pc.transport = crate::Transport::Ws;
        }
        Pubs::Client(
            peer::connect_all(
                &pc,
                pub_users,
                a.connect_rate,
                &pb,
                |c| async move { Ok(c) },
            )
            .await?,
        )
    };
    pb.finish_and_clear();
    let setup_secs = t_setup.elapsed().as_secs_f64();
    crate::scenario::sample_basic(&mut chart, gw, k + p);
    chart.mark("connected");

    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let sub_tasks: Vec<_> = match subs {
        Subs::Lean(v) => v
            .into_iter()
            .map(|s| crate::lean::spawn(s, &counters, &stop_rx))
            .collect(),
        Subs::Client(v) => v
            .into_iter()
            .enumerate()
            .map(|(i, conn)| peer::spawn_receiver(conn, i as u64, &counters, &stop_rx))
            .collect(),
        Subs::Nats(v) => v
            .into_iter()
            .map(|s| crate::nats::spawn_subscriber(s, &counters, &stop_rx))
            .collect(),
        Subs::Pusher(v) => v
            .into_iter()
            .map(|s| crate::pusher::spawn_subscriber(s, &counters, &stop_rx))
            .collect(),
    };
    let mut senders = Vec::new();
    let mut pub_tasks = Vec::new();
    let mut start_pub = |(tx, task)| {
        senders.push(tx);
        pub_tasks.push(task);
    };
    match pubs {
        Pubs::Client(v) => {
            for (i, conn) in v.into_iter().enumerate() {
                let ch = room_names[i % room_names.len()].clone();
                start_pub(peer::spawn_publisher(
                    conn, i as u64, ch, a.size, &counters, &stop_rx,
                ));
            }
        }
        Pubs::Nats(v) => {
            for (i, conn) in v.into_iter().enumerate() {
                let s = crate::nats::subject(&room_names[i % room_names.len()]);
                start_pub(crate::nats::spawn_publisher(
                    conn, i as u64, s, a.size, &counters, &stop_rx,
                ));
            }
        }
        Pubs::Pusher(v) => {
            for (i, p) in v.into_iter().enumerate() {
                start_pub(crate::pusher::spawn_publisher(
                    p,
                    i as u64,
                    crate::pusher::channel(&room_names[i % room_names.len()]),
                    a.size,
                    &counters,
                    &stop_rx,
                ));
            }
        }
    }

    let meters = crate::scenario::Meters::start(c.admin.as_deref(), gw).await;
    let pb = peer::bar(c.quiet, (a.duration * 10.0) as u64, "publish");
    let mut pacer = Pacer::new(a.rate, Some((a.rate * a.duration).round() as u64));
    let t0 = Instant::now();
    let publish_ns0 = peer::now_ns();
    let limit = Duration::from_secs_f64(a.duration);
    let mut last_sample = Instant::now();
    let mut next = 0usize;
    let mut per: HashMap<usize, u32> = HashMap::new();
    while t0.elapsed() < limit && !pacer.done() {
        tokio::time::sleep(pacer.tick()).await;
        let due = pacer.due(t0.elapsed());
        per.clear();
        for _ in 0..due {
            *per.entry(next).or_default() += 1;
            next = (next + 1) % senders.len();
        }
        for (who, n) in &per {
            let _ = senders[*who].send(*n);
        }
        pb.set_position((t0.elapsed().as_secs_f64() * 10.0) as u64);
        pb.set_message(status_line(&counters));
        if last_sample.elapsed() >= Duration::from_millis(250) {
            last_sample = Instant::now();
            let open = (k + p).saturating_sub(counters.disconnects.load(Relaxed));
            crate::scenario::sample_basic(&mut chart, gw, open);
        }
    }
    drop(senders);
    let publish_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    // Drain: until every issued message was written and delivered K times, bounded.
    let issued = pacer.issued();
    let cnt = counters.clone();
    let drained = wait_until(Duration::from_secs_f64(a.drain_secs), move || {
        let s = cnt.sent.load(Relaxed);
        s >= issued && cnt.received.load(Relaxed) >= s * members
    })
    .await;
    let total_secs = t0.elapsed().as_secs_f64();
    let measured = meters.stop(c.admin.as_deref()).await;
    let open = (k + p).saturating_sub(counters.disconnects.load(Relaxed));
    crate::scenario::sample_basic(&mut chart, gw, open);
    chart.mark("drained");
    let _ = stop_tx.send(true);

    let mut g = crate::scenario::Gathered::default();
    g.join(sub_tasks).await?;
    g.join(pub_tasks).await?;
    g.latency_from(&counters.timeline);
    let (sent, received) = (g.sent, g.d.received);
    let expected = sent * members;
    let lost = expected.saturating_sub(g.d.unique);
    let mut r = Report::new(
        "fanout",
        json!({
            "subscribers": k, "publishers": p, "rate": a.rate, "duration": a.duration,
            "size": a.size, "transport": c.transport_label(), "tls": c.tls || c.transport == crate::Transport::Quic, "encoding": c.encoding().name(),
            "target": c.target(), "threads": fanout_threads(c), "room": room,
            "rooms": n_rooms, "rooms_per_subscriber": per_sub, "members": members,
            "receiver": if lean { "lean" } else { "client" }, "deflate": deflate,
            "dialect": if nats { "nats" } else if pusher { "pusher" } else { "edgegate" },
        }),
    );
    let deliv_rate = received as f64 / total_secs;
    r.set("setup_secs", setup_secs);
    r.set("publish_secs", publish_secs);
    r.set("drain_secs", drained.as_secs_f64());
    r.set("sent", sent);
    r.set("acked", counters.acked.load(Relaxed));
    r.set("expected_deliveries", expected);
    r.set("deliveries_per_sec", deliv_rate);

    r.row(
        "transport / encoding",
        if pusher {
            format!(
                "{} / Pusher protocol, publishes by its HTTP API",
                c.transport_label()
            )
        } else if nats {
            format!("{} / NATS text protocol (nats-server)", c.transport_label())
        } else {
            format!("{} / {}", c.transport_label(), c.encoding().name())
        },
    );
    r.row(
        "subscribers / publishers",
        format!(
            "{k} / {p} ({} receivers), setup {setup_secs:.2} s",
            if lean { "lean" } else { "client" }
        ),
    );
    if n_rooms > 1 {
        r.row(
            "rooms",
            format!("{n_rooms} of {members} members, {per_sub} per subscriber"),
        );
    }
    r.row(
        "offered / achieved",
        format!(
            "{:.0} msg/s / {:.0} msg/s over {publish_secs:.1} s",
            a.rate,
            sent as f64 / publish_secs
        ),
    );
    r.row(
        "deliveries",
        format!(
            "{received} of {expected} expected, {deliv_rate:.0}/s (incl. drain {:.2} s)",
            drained.as_secs_f64()
        ),
    );
    g.report(&mut r, lost);
    if a.warmup_secs > 0.0 {
        let from = publish_ns0 + (a.warmup_secs * 1e9) as u64;
        let steady = counters.timeline.since(from);
        let s = crate::track::summary(&steady);
        r.row(
            "latency after warm-up",
            format!(
                "p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={}, after {} s)",
                s["p50_ms"].as_f64().unwrap_or(0.0),
                s["p99_ms"].as_f64().unwrap_or(0.0),
                s["p999_ms"].as_f64().unwrap_or(0.0),
                s["max_ms"].as_f64().unwrap_or(0.0),
                steady.len(),
                a.warmup_secs
            ),
        );
        r.set("latency_steady", s);
    }
    measured.report(&mut r, gw);
    measured.report_per_delivery(&mut r, received, fanout_threads(c));
    counters.timeline.chart_into(&mut chart, chart_ns0, "");
    r.set_chart(chart);
    Ok(r)
}
