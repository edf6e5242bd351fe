//! Gateway core benchmarks: the shard's timer wheel and local fan-out.
//!
//! - `wheel/schedule_10k`: 10 000 heartbeat checks spread over 30 s into a
//!   fresh 4096-slot, 50 ms wheel (the shard's shape).
//! - `wheel/advance_revolution_10k`: advancing that wheel tick by tick
//!   through 30 s, collecting every check (10 000 due).
//! - `wheel/steady_1tick`: one 50 ms tick of a shard holding 100 000
//!   connections whose checks are re-armed 25 s out as they fire (the
//!   idle-heartbeat steady state).
//! - `fanout/<n>`: one message through `Router::deliver` (via
//!   `Shard::deliver_local`) to n subscribers on one shard, then each
//!   subscriber's queue written out in its framing (what the connection
//!   task does): n = 1, 100, 10 000. Throughput = deliveries.
//!
//! Run: `cargo bench -p edgegate --bench gateway` (add
//! `-- --warm-up-time 1 --measurement-time 3` for a short run).

use std::hint::black_box;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use edgegate::backbone::embedded::Embedded;
use edgegate::config::Config;
use edgegate::conn::{Conn, Delivery, Out};
use edgegate::metrics::{ShardMetrics, Transport};
use edgegate::node::Node;
use edgegate::settings::ShardConfig;
use edgegate::shard::Shard;
use edgegate::timer::{Check, Wheel};
use edgegate_proto::{Envelope, Payload, Type};

const CHECKS: u32 = 10_000;

fn wheel(c: &mut Criterion) {
    let mut g = c.benchmark_group("wheel");
    g.throughput(Throughput::Elements(u64::from(CHECKS)));
    g.bench_function("schedule_10k", |b| {
        b.iter_batched(
            || Wheel::new(4096, 50),
            |mut w| {
                for k in 0..CHECKS {
                    // Spread over 30 s, like connections accepted over time.
                    w.schedule(k, k, Check::Heartbeat, u64::from(k) * 3);
                }
                w
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("advance_revolution_10k", |b| {
        b.iter_batched(
            || {
                let mut w = Wheel::new(4096, 50);
                for k in 0..CHECKS {
                    w.schedule(k, k, Check::Heartbeat, u64::from(k) * 3);
                }
                (w, Vec::with_capacity(CHECKS as usize))
            },
            |(mut w, mut due)| {
                let mut now = 0;
                while now <= u64::from(CHECKS) * 3 {
                    w.advance(now, &mut due);
                    now += 50;
                }
                assert_eq!(due.len(), CHECKS as usize);
                (w, due)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // Steady state: 100 000 idle connections, hb 25 s, tick 50 ms: ~200 checks per tick.
    let mut g = c.benchmark_group("wheel");
    let conns = 100_000u64;
    let period = 25_000u64;
    g.throughput(Throughput::Elements(conns * 50 / period));
    let mut w = Wheel::new(4096, 50);
    for k in 0..conns {
        w.schedule(k as u32, k as u32, Check::Heartbeat, k * period / conns);
    }
    let mut now = 0u64;
    let mut due = Vec::new();
    g.bench_function("steady_1tick_100k_conns", |b| {
        b.iter(|| {
            now += 50;
            due.clear();
            w.advance(now, &mut due);
            for e in &due {
                w.schedule(e.key, e.conn, e.check, now + period);
            }
            black_box(due.len())
        })
    });
    g.finish();
}

/// A one-shard node with the default config and no peers.
fn shard() -> Shard {
    let node = Arc::new(Node {
        backbone: None,
        services: None,
        open: AtomicUsize::new(0),
        max_connections: 1_000_000,
        refusing: AtomicUsize::new(0),
        max_refusing: 64,
        shutdown: AtomicBool::new(false),
        shards_ready: AtomicUsize::new(1),
        shards_done: AtomicUsize::new(0),
        shards_stopped: AtomicUsize::new(0),
        metrics: vec![Arc::new(ShardMetrics::default())],
        admin_token: None,
        credentials: Default::default(),
        admin_queues: vec![crossbeam_channel::bounded(4)],
        posts: vec![Default::default()],
    });
    let cfg = ShardConfig::from_config(&Config::default(), 1, "bench".into());
    let backbone = Embedded::detached(1, 0, node.metrics[0].clone(), |_, _| {});
    Shard::new(0, cfg, node, Rc::new(backbone))
}

/// A typical room message: 100-byte JSON payload.
fn message(ch: &str) -> Arc<Envelope> {
    let mut text = String::from(r#"{"text":""#);
    text.push_str(&"x".repeat(100 - 9 - 19));
    text.push_str(r#"","ts":1700000000}"#);
    Arc::new(Envelope {
        ch: Some(ch.into()),
        seq: Some(1),
        from: Some("alice".into()),
        payload: Payload::Json(Bytes::from(text)),
        ..Envelope::new(Type::Msg)
    })
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for n in [1usize, 100, 10_000] {
        let shard = shard();
        let ch = edgegate::session::Name::from("room:bench");
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("literal address");
        // Conns live in the shard's slab exactly as accepted ones do.
        let conns: Vec<Rc<Conn>> = (0..n)
            .map(|_| {
                let conn = shard.register(Transport::Ws, peer);
                shard.router.borrow_mut().subscribe(&ch, conn.key);
                conn
            })
            .collect();
        let env = message(&ch);
        let mut buf = Vec::with_capacity(4096);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("deliver+write", n), &n, |b, _| {
            b.iter(|| {
                shard.deliver_local(env.clone());
                let mut written = 0;
                for conn in &conns {
                    buf.clear();
                    written += conn.drain_into(&mut buf, 64 * 1024);
                }
                black_box(written)
            })
        });
        g.bench_with_input(BenchmarkId::new("deliver_only", n), &n, |b, _| {
            b.iter(|| {
                let d = Delivery::new(env.clone());
                let reached = shard.router.borrow().deliver(
                    &shard.conns,
                    &shard.metrics,
                    (shard.cfg.outbound_queue_bytes, shard.cfg.recovery_buffer),
                    &ch,
                    &d,
                );
                for conn in &conns {
                    conn.clear_output();
                }
                black_box(reached)
            })
        });
        if n != 1 {
            continue;
        }
        // One item written in WS JSON framing, for reference.
        let d = Delivery::new(env.clone());
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("write_one_shared", n), &n, |b, _| {
            b.iter(|| {
                buf.clear();
                Out::Shared(d.clone()).write(conns[0].framing.get(), &mut buf);
                black_box(buf.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, wheel, fanout);
criterion_main!(benches);
