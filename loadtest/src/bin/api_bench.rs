//! Benchmarks of the server API and hooks (docs/benchmarks.md, "Server API
//! and hooks"):
//!
//! * `api-bench publish`: `--conns` keep-alive HTTP/1.1 clients POST
//!   `/api/publish` back to back (no pipelining) for `--secs`, spread over
//!   `--rooms` rooms, each room with `--subs` TCP subscribers counting what
//!   reaches them; prints requests/s, API latency p50/p99 and deliveries.
//! * `api-bench hook-latency`: TCP clients publish at `--rate` in total,
//!   each to a room it is subscribed to, and time its own message's
//!   return, alternating between gateways in 2-second slices (`--target`
//!   may be given several times: say one without and one with a publish
//!   hook) so both see the same machine at the same moments; prints
//!   p50/p99 per target. `--hook-port` serves a publish hook that allows
//!   everything (a small HTTP/1.1 server, keep-alive) for the gateway that
//!   asks it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use edgegate_proto::{Envelope, Payload, Type, binary, frame};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Publish requests per second through the server API.
    Publish {
        /// The API listener.
        #[arg(long)]
        api: SocketAddr,
        /// An `[api] keys` entry.
        #[arg(long)]
        key: String,
        /// The gateway's TCP listener (subscribers).
        #[arg(long)]
        tcp: SocketAddr,
        /// Keep-alive API connections.
        #[arg(long, default_value_t = 32)]
        conns: usize,
        /// Rooms published to.
        #[arg(long, default_value_t = 16)]
        rooms: usize,
        /// Subscribers per room.
        #[arg(long, default_value_t = 1)]
        subs: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Payload bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// The latency a publish hook adds, gateways side by side.
    HookLatency {
        /// TCP listeners of the gateways, measured in turn.
        #[arg(long, required = true)]
        target: Vec<SocketAddr>,
        /// Publishes per second, all clients together.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Clients per gateway.
        #[arg(long, default_value_t = 20)]
        clients: usize,
        /// Seconds of measurement per gateway.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Serve an allow-everything publish hook on this port.
        #[arg(long)]
        hook_port: Option<u16>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Publish {
                api,
                key,
                tcp,
                conns,
                rooms,
                subs,
                secs,
                size,
            } => publish(api, key, tcp, conns, rooms, subs, secs, size).await,
            Cmd::HookLatency {
                target,
                rate,
                clients,
                secs,
                hook_port,
            } => hook_latency(target, rate, clients, secs, hook_port).await,
        }
    })
}

/// A TCP client of the gateway: preface, hello, then framed envelopes.
struct Tcp {
    s: TcpStream,
    buf: Vec<u8>,
    /// The last request id (ids are never reused: the gateway would
    /// answer a reused one as a duplicate and deliver nothing).
    id: u64,
}

impl Tcp {
    async fn connect(addr: SocketAddr, user: &str) -> Result<Tcp> {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(&frame::PREFACE).await?;
        let mut t = Tcp {
            s,
            buf: Vec::new(),
            id: 10,
        };
        let mut hello = Envelope::new(Type::Hello);
        hello.id = Some(1);
        hello.meta = Some(format!("{{\"user\":\"{user}\"}}"));
        t.send(&hello).await?;
        let w = t.recv().await?;
        if w.t != Type::Welcome {
            bail!("expected welcome, got {w:?}");
        }
        Ok(t)
    }

    async fn send(&mut self, env: &Envelope) -> Result<()> {
        let mut out = Vec::new();
        frame::encode_frame(env, &mut out);
        self.s.write_all(&out).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Envelope> {
        loop {
            if let Ok(Some(n)) = frame::peek_frame(&self.buf, u32::MAX) {
                let env = binary::decode(&self.buf[frame::LEN_BYTES..frame::LEN_BYTES + n])?;
                self.buf.drain(..frame::LEN_BYTES + n);
                return Ok(env);
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.s.read(&mut chunk).await?;
            if n == 0 {
                bail!("closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn sub(&mut self, ch: &str) -> Result<()> {
        let mut e = Envelope::new(Type::Sub);
        e.id = Some(2);
        e.ch = Some(ch.to_owned());
        self.send(&e).await?;
        loop {
            let r = self.recv().await?;
            if r.t == Type::Ok && r.id == Some(2) {
                return Ok(());
            }
            if r.t == Type::Err {
                bail!("sub {ch}: {r:?}");
            }
        }
    }
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    api: SocketAddr,
    key: String,
    tcp: SocketAddr,
    conns: usize,
    rooms: usize,
    subs: usize,
    secs: u64,
    size: usize,
) -> Result<()> {
    let run = Arc::new(AtomicBool::new(true));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subscribers = Vec::new();
    for r in 0..rooms {
        for s in 0..subs {
            let mut c = Tcp::connect(tcp, &format!("sub{r}x{s}")).await?;
            c.sub(&format!("room:bench{r}")).await?;
            let delivered = delivered.clone();
            subscribers.push(tokio::spawn(async move {
                while let Ok(e) = c.recv().await {
                    if e.t == Type::Msg {
                        delivered.fetch_add(1, Relaxed);
                    }
                }
            }));
        }
    }
    let data = format!("\"{}\"", "x".repeat(size.saturating_sub(2)));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..conns {
        let (run, key, data) = (run.clone(), key.clone(), data.clone());
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let (mut ok, mut errors) = (0u64, 0u64);
            let Ok(mut s) = TcpStream::connect(api).await else {
                return (hist, ok, errors + 1);
            };
            let _ = s.set_nodelay(true);
            let mut buf = Vec::with_capacity(4096);
            let mut i = w;
            while run.load(Relaxed) {
                let body = format!("{{\"ch\":\"room:bench{}\",\"data\":{data}}}", i % rooms);
                i += conns;
                let req = format!(
                    "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let t0 = Instant::now();
                if s.write_all(req.as_bytes()).await.is_err() {
                    errors += 1;
                    break;
                }
                // Read one response (Content-Length framed).
                let status = loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            buf.drain(..end + 4 + len);
                            break head.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0);
                        }
                    }
                    let mut chunk = [0u8; 8192];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break 0,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let _ = hist.record(t0.elapsed().as_micros() as u64);
                if status == 200 {
                    ok += 1;
                } else {
                    errors += 1;
                    if status == 0 {
                        break;
                    }
                }
            }
            (hist, ok, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    run.store(false, Relaxed);
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut ok, mut errors) = (0, 0);
    for w in workers {
        let (h, o, e) = w.await?;
        hist.add(h)?;
        ok += o;
        errors += e;
    }
    let took = started.elapsed().as_secs_f64();
    // Let the last deliveries land.
    let want = ok * subs as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    while delivered.load(Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "publish: {conns} keep-alive clients, {rooms} rooms x {subs} subscribers, {size} B, {secs} s: {:.0} requests/s ({ok} ok, {errors} errors), latency p50 {:.2} ms p99 {:.2} ms, delivered {} of {want}",
        ok as f64 / took,
        pct(&hist, 0.5),
        pct(&hist, 0.99),
        delivered.load(Relaxed)
    );
    for s in subscribers {
        s.abort();
    }
    Ok(())
}

/// A publish hook that allows everything: HTTP/1.1, keep-alive.
async fn serve_hook(port: u16) -> Result<()> {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .context("hook port")?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n{\"allow\":true}";
                loop {
                    if let Some(end) = buf.windows(4).position(|w: &[u8]| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            buf.drain(..end + 4 + len);
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                    let mut chunk = [0u8; 8192];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    Ok(())
}

async fn hook_latency(
    targets: Vec<SocketAddr>,
    rate: u64,
    clients: usize,
    secs: u64,
    hook_port: Option<u16>,
) -> Result<()> {
    if let Some(p) = hook_port {
        serve_hook(p).await?;
    }
    // One set of clients per target, each subscribed to its own room.
    let mut sets = Vec::new();
    for (t, addr) in targets.iter().enumerate() {
        let mut set = Vec::new();
        for c in 0..clients {
            let mut cl = Tcp::connect(*addr, &format!("h{t}c{c}")).await?;
            cl.sub(&format!("room:hook{t}c{c}")).await?;
            set.push(cl);
        }
        sets.push(set);
    }
    let mut hists: Vec<Histogram<u64>> = targets
        .iter()
        .map(|_| Histogram::new(3).expect("h"))
        .collect();
    // Alternate 2-second slices between targets.
    let slices = secs.div_ceil(2);
    let per_client = Duration::from_secs_f64(clients as f64 / rate as f64);
    for _ in 0..slices {
        for (t, set) in sets.iter_mut().enumerate() {
            let until = Instant::now() + Duration::from_secs(2);
            let mut tasks = Vec::new();
            for (c, mut cl) in std::mem::take(set).into_iter().enumerate() {
                tasks.push(tokio::spawn(async move {
                    let mut h = Histogram::<u64>::new(3).expect("h");
                    let ch = format!("room:hook{t}c{c}");
                    let mut tick = tokio::time::interval(per_client);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    // Stagger the clients over one period.
                    tokio::time::sleep(per_client.mul_f64(c as f64 / 20.0)).await;
                    while Instant::now() < until {
                        tick.tick().await;
                        cl.id += 1;
                        let id = cl.id;
                        let mut p = Envelope::new(Type::Pub);
                        p.id = Some(id);
                        p.ch = Some(ch.clone());
                        p.payload = Payload::Json(bytes::Bytes::from_static(b"\"ping\""));
                        let t0 = Instant::now();
                        if cl.send(&p).await.is_err() {
                            break;
                        }
                        // Our own message back (the ok comes too).
                        let back = tokio::time::timeout(Duration::from_secs(5), async {
                            loop {
                                match cl.recv().await {
                                    Ok(e) if e.t == Type::Msg && e.id == Some(id) => return true,
                                    Ok(_) => {}
                                    Err(_) => return false,
                                }
                            }
                        })
                        .await;
                        match back {
                            Ok(true) => {
                                let _ = h.record(t0.elapsed().as_micros() as u64);
                            }
                            _ => {
                                eprintln!("hook-latency: {ch}: message {id} did not come back");
                                return (cl, h);
                            }
                        }
                    }
                    (cl, h)
                }));
            }
            for task in tasks {
                let (cl, h) = task.await?;
                hists[t].add(h)?;
                set.push(cl);
            }
        }
    }
    for (t, h) in hists.iter().enumerate() {
        println!(
            "hook-latency: target {} ({}): {} publishes at {rate}/s, pub -> own msg p50 {:.3} ms p99 {:.3} ms",
            t,
            targets[t],
            h.len(),
            pct(h, 0.5),
            pct(h, 0.99)
        );
    }
    Ok(())
}
