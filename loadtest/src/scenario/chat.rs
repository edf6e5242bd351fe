//! `chat`: the shape of a chat product's traffic (docs/protocol.md §8).
//! `--users` users, each in `--rooms-per-user` rooms of `--members` members
//! (users × rooms-per-user / members rooms; user u's r-th room is
//! `(u·R + r) mod rooms`, so no user is in a room twice), every room
//! subscribed with presence. Then, for `--duration`, each user publishes
//! `--rate` stored messages per second to one of its rooms and
//! `--typing` ephemeral messages per second (typing indicators), and
//! `--churn` users per second go away (their connection closes) and come
//! back `--away-secs` later, joining their rooms again.
//!
//! Phases, each measured on its own:
//! 1. **connect**: every user says `hello` (the gateway's RSS after it is the
//!    base of the next phase);
//! 2. **join**: every user subscribes to its rooms, paced over
//!    `--join-secs`: gateway RSS per (room, user), the presence entries the
//!    gateway reports, `members` envelopes per second and gateway CPU while
//!    a room fills (the batching's effect: one per room and watcher per
//!    `flush_ms`, not one per join per watcher);
//! 3. **traffic**: delivery latency p50/p99 of stored messages, gateway CPU
//!    per delivery (stored and ephemeral), members events per second.
//!
//! Users are spread over `--target a,b` (a NATS-joined cluster) round robin.
//! One process holds at most about 15 000 users (its open-files limit).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use edgegate_client::{ClientConfig, Connection, Envelope, Type};
use serde_json::json;
use tokio::sync::mpsc;

use crate::cli::ChatArgs;
use crate::pacer::Pacer;
use crate::payload::{self, Stamp};
use crate::peer::{self, now_ns};
use crate::procfs;
use crate::report::{Report, opt};
use crate::scenario::{gateway_pid, wait_until};
use crate::series::{Chart, Timeline, panel};

/// What the traffic phase tells one user to do.
enum Cmd {
    /// Publish a stored message to its room `r`.
    Publish(usize),
    /// Publish a typing indicator (ephemeral) to its room `r`.
    Typing(usize),
    /// Close the connection, and come back after this long.
    Away(Duration),
}

/// Counters every user task adds to.
#[derive(Default)]
struct Tally {
    /// Stored messages delivered (latency recorded).
    delivered: AtomicU64,
    /// Ephemeral messages delivered.
    ephemeral: AtomicU64,
    /// `members` envelopes received.
    members: AtomicU64,
    /// Names in their `join` and `leave` lists.
    member_names: AtomicU64,
    /// `members` with the count only.
    count_only: AtomicU64,
    /// Publishes sent (stored / ephemeral).
    sent: AtomicU64,
    typing_sent: AtomicU64,
    /// `err` answers.
    errors: AtomicU64,
    /// Subscriptions answered `ok` (joins done).
    joined: AtomicU64,
    /// Users gone away and back.
    churned: AtomicU64,
    /// Reconnects that failed.
    reconnect_failures: AtomicU64,
    /// Latency of stored messages.
    timeline: Timeline,
}

/// The rooms of user `u`.
fn rooms_of(u: usize, per_user: usize, rooms: usize) -> Vec<usize> {
    let (u, per, n) = (u as u64, per_user as u64, rooms as u64);
    (0..per)
        .map(|r| crate::scenario::room_of(u, r, per, n) as usize)
        .collect()
}

/// Subscribes `conn` to `rooms` (pipelined) and waits for every `ok`.
async fn join(
    conn: &mut Connection,
    rooms: &[String],
    presence: bool,
    tally: &Tally,
) -> edgegate_client::Result<()> {
    let meta = presence.then_some(r#"{"presence":true}"#);
    peer::join_rooms(
        conn,
        rooms,
        meta,
        || {
            tally.joined.fetch_add(1, Relaxed);
        },
        |e| observe(e, tally),
    )
    .await
}

/// Counts what a user receives besides answers.
fn observe(e: &Envelope, tally: &Tally) {
    match e.t {
        Type::Msg if e.seq.is_none() => {
            tally.ephemeral.fetch_add(1, Relaxed);
        }
        Type::Msg => {
            if let Some(st) = payload::decode(&e.payload) {
                let now = now_ns();
                tally
                    .timeline
                    .record(now, (now.saturating_sub(st.t) / 1000).max(1));
            }
            tally.delivered.fetch_add(1, Relaxed);
        }
        Type::Members => {
            tally.members.fetch_add(1, Relaxed);
            let meta: serde_json::Value = e
                .meta
                .as_deref()
                .and_then(|m| serde_json::from_str(m).ok())
                .unwrap_or_default();
            let names = ["join", "leave"]
                .iter()
                .filter_map(|k| meta.get(k).and_then(|v| v.as_array()).map(|a| a.len()))
                .sum::<usize>();
            if meta.get("join").is_none() {
                tally.count_only.fetch_add(1, Relaxed);
            }
            tally.member_names.fetch_add(names as u64, Relaxed);
        }
        Type::Err => {
            tally.errors.fetch_add(1, Relaxed);
        }
        _ => {}
    }
}

/// Who a user task is.
struct Who {
    cfg: ClientConfig,
    index: u64,
    rooms: Vec<String>,
    presence: bool,
    pad: usize,
}

/// One user's life in the traffic phase: publish on command, count what
/// arrives, go away and come back when told.
async fn user(
    mut conn: Connection,
    who: Who,
    tally: Arc<Tally>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let Who {
        cfg,
        index,
        rooms,
        presence,
        pad,
    } = who;
    let enc = conn.encoding();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            r = conn.recv() => match r {
                Ok(e) => observe(&e, &tally),
                Err(_) => return,
            },
            c = cmds.recv() => match c {
                None => return,
                Some(Cmd::Publish(r)) | Some(Cmd::Typing(r)) if r >= rooms.len() => {}
                Some(Cmd::Publish(r)) => {
                    seq += 1;
                    let mut e = Envelope::new(Type::Pub);
                    e.id = Some(conn.next_id());
                    e.ch = Some(rooms[r].clone());
                    e.payload = payload::encode(enc, Stamp { p: index, s: seq, t: now_ns() }, pad);
                    if conn.send(&e).await.is_err() {
                        return;
                    }
                    tally.sent.fetch_add(1, Relaxed);
                }
                Some(Cmd::Typing(r)) => {
                    let mut e = Envelope::new(Type::Pub);
                    e.id = Some(conn.next_id());
                    e.ch = Some(rooms[r].clone());
                    e.meta = Some(r#"{"ephemeral":true}"#.into());
                    e.payload = edgegate_client::Payload::Json(r#"{"typing":true}"#.into());
                    if conn.send(&e).await.is_err() {
                        return;
                    }
                    tally.typing_sent.fetch_add(1, Relaxed);
                }
                Some(Cmd::Away(d)) => {
                    drop(conn);
                    tokio::time::sleep(d).await;
                    // Commands meanwhile are for a user who is away.
                    while cmds.try_recv().is_ok() {}
                    let back = async {
                        let mut c = Connection::connect(&cfg).await?;
                        join(&mut c, &rooms, presence, &tally).await?;
                        Ok::<_, edgegate_client::Error>(c)
                    };
                    match back.await {
                        Ok(c) => {
                            conn = c;
                            tally.churned.fetch_add(1, Relaxed);
                        }
                        Err(_) => {
                            tally.reconnect_failures.fetch_add(1, Relaxed);
                            return;
                        }
                    }
                }
            },
        }
    }
}

/// The gateway's metric `name`, summed over its series.
async fn metric(admin: Option<&str>, name: &str) -> Option<f64> {
    let (status, body) = crate::admin::get(admin?, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    crate::admin::metric_sum(&body, name)
}

/// Runs the scenario.
pub async fn run(a: ChatArgs) -> Result<Report> {
    let c = &a.common;
    let (n, per_user, members) = (a.users, a.rooms_per_user.max(1), a.members.max(1));
    if n == 0 || per_user * n < members {
        bail!("--users × --rooms-per-user must be at least --members");
    }
    let rooms = (n * per_user).div_ceil(members);
    if per_user > rooms {
        bail!("--rooms-per-user ({per_user}) is more than there are rooms ({rooms})");
    }
    if let Some(limit) = procfs::open_files_limit()
        && n as u64 + 64 > limit
    {
        bail!("{n} users in one process exceed the open-files limit {limit}");
    }
    let gw = gateway_pid(c.gateway_pid);
    if gw.is_none() {
        eprintln!("no gateway pid (pass --gateway-pid): RSS and CPU of the gateway not measured");
    }
    let admin = c.admin.as_deref();
    let tag = format!("{:x}", fastrand::u32(..));
    let room_name = |k: usize| format!("room:chat{tag}-{k}");
    let mut chart = Chart::new(Instant::now());
    let chart_ns0 = now_ns();
    let rss = || gw.and_then(procfs::rss_kib);
    let rss0 = rss();

    // 1. connect
    let pb = peer::bar(c.quiet, n as u64, "connect");
    let users: Vec<String> = (0..n).map(|i| format!("chat{tag}u{i}")).collect();
    let cfgs: Vec<ClientConfig> = {
        let ips = match &c.source_ips {
            Some(s) => crate::ips::parse_range(s)?,
            None => Vec::new(),
        };
        users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let src = (!ips.is_empty()).then(|| ips[i % ips.len()]);
                let mut cfg = peer::config(c, u.clone(), src);
                if let Some(t) = c.target_for(i) {
                    cfg.addr = t;
                }
                cfg
            })
            .collect()
    };
    let t_connect = Instant::now();
    let conns = peer::connect_all(
        c,
        users.clone(),
        a.connect_rate,
        &pb,
        |c| async move { Ok(c) },
    )
    .await?;
    pb.finish_and_clear();
    let connect_secs = t_connect.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss();
    chart.mark("connected");
    crate::scenario::sample_basic(&mut chart, gw, n as u64);

    // 2. join, paced over --join-secs
    let tally = Arc::new(Tally {
        timeline: Timeline::new(1_000_000_000),
        ..Tally::default()
    });
    let members_before = metric(admin, "edgegate_members_sent_total").await;
    let cpu_join = procfs::CpuMeter::start(gw);
    let t_join = Instant::now();
    let join_rate = if a.join_secs > 0.0 {
        n as f64 / a.join_secs
    } else {
        f64::INFINITY
    };
    let mut pacer = Pacer::new(join_rate.min(1e9), Some(n as u64));
    let mut conns = conns.into_iter().enumerate();
    let presence = !a.no_presence;
    // Each user joins, then lives on (reading what comes: the members
    // batches of the rooms still filling up) until the traffic ends.
    let mut senders = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    let failures = Arc::new(AtomicU64::new(0));
    while !pacer.done() {
        for _ in 0..pacer.due(t_join.elapsed()) {
            let Some((u, mut conn)) = conns.next() else {
                break;
            };
            let rooms: Vec<String> = rooms_of(u, per_user, rooms)
                .into_iter()
                .map(room_name)
                .collect();
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            let who = Who {
                cfg: cfgs[u].clone(),
                index: u as u64,
                rooms,
                presence,
                pad: a.size,
            };
            let (tally, failures) = (tally.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                if join(&mut conn, &who.rooms, presence, &tally).await.is_err() {
                    failures.fetch_add(1, Relaxed);
                    return;
                }
                user(conn, who, tally, rx).await
            }));
        }
        tokio::time::sleep(pacer.tick()).await;
        crate::scenario::sample_basic(&mut chart, gw, n as u64);
    }
    let tl = tally.clone();
    let want_joins = (n * per_user) as u64;
    wait_until(Duration::from_secs(60), move || {
        tl.joined.load(Relaxed) >= want_joins
    })
    .await;
    let failures = failures.load(Relaxed);
    if failures > 0 || tally.joined.load(Relaxed) < want_joins {
        bail!("{failures} of {n} users could not join their rooms");
    }
    let join_secs = t_join.elapsed().as_secs_f64();
    // Let the last batches go out, then read the meters.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let join_cpu_pct = cpu_join.percent();
    let members_during_join = tally.members.load(Relaxed);
    let names_during_join = tally.member_names.load(Relaxed);
    let members_sent_join = match (
        members_before,
        metric(admin, "edgegate_members_sent_total").await,
    ) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };
    let rss_joined = rss();
    let entries = metric(admin, "edgegate_presence_entries").await;
    chart.mark("joined");

    // 3. traffic
    let (deliv0, eph0, mem0) = (
        tally.delivered.load(Relaxed),
        tally.ephemeral.load(Relaxed),
        tally.members.load(Relaxed),
    );
    let meters = crate::scenario::Meters::start(admin, gw).await;
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let mut msgs = Pacer::new(a.rate * n as f64, None);
    let mut typing = Pacer::new(a.typing * n as f64, None);
    let mut churn = Pacer::new(a.churn, None);
    let pb = peer::bar(c.quiet, a.duration.ceil() as u64, "traffic");
    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(a.duration);
    let away = Duration::from_secs_f64(a.away_secs);
    let mut last_sample = Instant::now();
    while t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let t = t0.elapsed();
        for _ in 0..msgs.due(t) {
            let u = rng.usize(0..senders.len());
            let _ = senders[u].send(Cmd::Publish(rng.usize(0..per_user)));
        }
        for _ in 0..typing.due(t) {
            let u = rng.usize(0..senders.len());
            let _ = senders[u].send(Cmd::Typing(rng.usize(0..per_user)));
        }
        for _ in 0..churn.due(t) {
            let u = rng.usize(0..senders.len());
            let _ = senders[u].send(Cmd::Away(away));
        }
        pb.set_position(t.as_secs());
        if last_sample.elapsed() >= Duration::from_millis(500) {
            last_sample = Instant::now();
            crate::scenario::sample_basic(&mut chart, gw, n as u64);
        }
    }
    pb.finish_and_clear();
    let traffic_secs = t0.elapsed().as_secs_f64();
    // Drain: every stored message delivered to its room's members, or no
    // delivery for half a second (a member away misses what was published
    // meanwhile: it joins again without a position); bounded.
    let want = tally.sent.load(Relaxed) * members as u64;
    let tl = tally.clone();
    let mut last = (0, Instant::now());
    let drained = wait_until(Duration::from_secs_f64(a.drain_secs), move || {
        let d = tl.delivered.load(Relaxed) - deliv0;
        if d != last.0 {
            last = (d, Instant::now());
        }
        d >= want || last.1.elapsed() >= Duration::from_millis(500)
    })
    .await;
    let measured = meters.stop(admin).await;
    drop(senders);
    for t in tasks {
        t.abort();
    }
    chart.mark("done");
    crate::scenario::sample_basic(&mut chart, gw, n as u64);

    let delivered = tally.delivered.load(Relaxed) - deliv0;
    let ephemeral = tally.ephemeral.load(Relaxed) - eph0;
    let members_traffic = tally.members.load(Relaxed) - mem0;
    let pairs = (n * per_user) as f64;
    let kib = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some(b as f64 - a as f64),
        _ => None,
    };
    let per_pair = kib(rss_connected, rss_joined).map(|d| d * 1024.0 / pairs);
    let per_conn = kib(rss0, rss_connected).map(|d| d / n as f64);

    let mut r = Report::new(
        "chat",
        json!({
            "users": n, "rooms_per_user": per_user, "members": members, "rooms": rooms,
            "rate": a.rate, "typing": a.typing, "churn": a.churn, "away_secs": a.away_secs,
            "duration": a.duration, "join_secs": a.join_secs, "presence": presence,
            "transport": c.transport_label(), "encoding": c.encoding().name(), "target": c.target(),
        }),
    );
    r.set("connect_secs", connect_secs);
    r.set("join_secs", join_secs);
    r.set(
        "rss_kib",
        json!({"start": rss0, "connected": rss_connected, "joined": rss_joined}),
    );
    r.set("rss_bytes_per_room_user", per_pair);
    r.set("rss_kib_per_connection", per_conn);
    r.set("presence_entries", entries);
    r.set("join_cpu_pct", join_cpu_pct);
    r.set("members_received_join", members_during_join);
    r.set("member_names_received_join", names_during_join);
    r.set("members_sent_join", members_sent_join);
    r.set("members_received_traffic", members_traffic);
    r.set("sent", tally.sent.load(Relaxed));
    r.set("typing_sent", tally.typing_sent.load(Relaxed));
    r.set("delivered", delivered);
    r.set("ephemeral_delivered", ephemeral);
    r.set("expected_deliveries", want);
    r.set("churned", tally.churned.load(Relaxed));
    r.set("reconnect_failures", tally.reconnect_failures.load(Relaxed));
    r.set("errors", tally.errors.load(Relaxed));
    let lat = crate::track::summary(&tally.timeline.total());
    r.set("latency", lat.clone());

    r.row(
        "users / rooms",
        format!(
            "{n} users × {per_user} rooms of {members} ({rooms} rooms, {} with presence)",
            if presence {
                "subscribed"
            } else {
                "not subscribed"
            }
        ),
    );
    r.row(
        "connect",
        format!(
            "{connect_secs:.2} s; gateway RSS per connection {}",
            opt(per_conn, 2, " KiB")
        ),
    );
    r.row(
        "join",
        format!(
            "{join_secs:.2} s; RSS per (room, user) {}; presence entries {}",
            opt(per_pair, 0, " B"),
            opt(entries, 0, "")
        ),
    );
    r.row(
        "members during join",
        format!(
            "{members_during_join} received ({:.0}/s, {names_during_join} names), {} sent by the gateway; gateway CPU {}",
            members_during_join as f64 / join_secs.max(0.001),
            opt(members_sent_join, 0, ""),
            opt(join_cpu_pct, 1, " % of one core")
        ),
    );
    r.row(
        "traffic",
        format!(
            "{} stored + {} typing published over {traffic_secs:.1} s; {} churned ({} failed)",
            tally.sent.load(Relaxed),
            tally.typing_sent.load(Relaxed),
            tally.churned.load(Relaxed),
            tally.reconnect_failures.load(Relaxed)
        ),
    );
    r.row(
        "deliveries",
        format!(
            "{delivered} stored of {want} expected ({:.0}/s), {ephemeral} ephemeral, drain {:.2} s",
            delivered as f64 / traffic_secs,
            drained.as_secs_f64()
        ),
    );
    r.row(
        "members during traffic",
        format!(
            "{members_traffic} ({:.1}/s)",
            members_traffic as f64 / traffic_secs
        ),
    );
    r.row("latency publish→deliver", crate::report::latency_line(&lat));
    measured.report(&mut r, gw);
    measured.report_per_delivery(&mut r, delivered + ephemeral, c.threads_or(1));
    tally.timeline.chart_into(&mut chart, chart_ns0, "");
    chart.push(panel::CONNECTIONS, "users", n as f64);
    r.set_chart(chart);
    Ok(r)
}
