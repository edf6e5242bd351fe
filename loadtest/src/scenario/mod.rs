//! The scenarios.

pub mod chaos;
pub mod chat;
pub mod fanout;
pub mod fill;
pub mod herd;
pub mod idle;
pub mod pubsub;
pub mod soak;
pub mod storm;

use std::time::{Duration, Instant};

use crate::peer::Counters;

/// The room of member `m`'s `r`-th membership when every member holds
/// `per` of `rooms` rooms: (m × per + r) mod rooms. The memberships
/// m × per + r enumerate 0 .. members × per once each, so every room gets
/// the same number of distinct members when `rooms` divides that (and
/// `per` ≤ `rooms`). The chat, idle and fan-out scenarios all use it.
pub fn room_of(m: u64, r: u64, per: u64, rooms: u64) -> u64 {
    (m * per + r) % rooms.max(1)
}

/// Resolves the gateway pid: the flag, else the only process named `edgegate`.
pub fn gateway_pid(flag: Option<u32>) -> Option<u32> {
    if flag.is_some() {
        return flag;
    }
    let pids = crate::procfs::pids_named("edgegate");
    match pids.as_slice() {
        [one] => Some(*one),
        [] => None,
        many => {
            eprintln!("several processes named edgegate ({many:?}); pass --gateway-pid");
            None
        }
    }
}

/// Fails when `clients` going through the fault proxy (a client socket,
/// the proxy's two) would pass this process's open-files limit.
pub fn check_proxied_files(clients: usize) -> anyhow::Result<()> {
    let need = 3 * clients as u64 + 64;
    match crate::procfs::open_files_limit() {
        Some(limit) if need > limit => anyhow::bail!(
            "{clients} clients need about {need} open files here (client, proxy and upstream sockets), over the limit {limit}"
        ),
        _ => Ok(()),
    }
}

/// Waits until `done()` or `limit` elapsed, polling every 20 ms; returns the time waited.
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !done() && t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

/// A one-line live status for progress bars.
pub fn status_line(c: &Counters) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    format!(
        "sent {} recv {} ok {} err {} lost-conns {}",
        c.sent.load(Relaxed),
        c.received.load(Relaxed),
        c.acked.load(Relaxed),
        c.errors.load(Relaxed),
        c.disconnects.load(Relaxed)
    )
}

/// Appends the harness's open-connection count and the gateway's RSS at now.
pub fn sample_basic(chart: &mut crate::series::Chart, gw: Option<u32>, open: u64) {
    use crate::series::panel;
    chart.push(panel::CONNECTIONS, "open (harness)", open as f64);
    if let Some(r) = gw.and_then(crate::procfs::rss_kib) {
        chart.push(panel::RSS, "gateway RSS", r as f64 / 1024.0);
    }
}

/// The gateway's admin snapshot and both CPU meters, taken around a
/// scenario's traffic phase (every traffic scenario measures the same way).
pub struct Meters {
    before: Option<crate::admin::Snapshot>,
    gw: crate::procfs::CpuMeter,
    me: crate::procfs::CpuMeter,
    t0: std::time::Instant,
}

/// What [`Meters`] measured.
pub struct Measured {
    /// Admin snapshot before the traffic.
    pub before: Option<crate::admin::Snapshot>,
    /// Admin snapshot after it.
    pub after: Option<crate::admin::Snapshot>,
    /// Gateway CPU, % of one core, over the phase, user and system apart
    /// (on loopback, the system part also carries the receivers' TCP input
    /// of the gateway's sends, work a real network puts on the clients'
    /// hosts).
    pub gw_split_pct: Option<(f64, f64)>,
    /// Harness CPU, likewise (on loopback, the system part also carries
    /// the kernel's work for the gateway's sockets: the ACKs this side's
    /// reads send are processed on this side's CPU).
    pub me_split_pct: Option<(f64, f64)>,
    /// Length of the phase, seconds.
    pub secs: f64,
}

async fn snapshot(admin: Option<&str>) -> Option<crate::admin::Snapshot> {
    match admin {
        Some(ad) => crate::admin::snapshot(ad).await,
        None => None,
    }
}

impl Meters {
    /// Takes the first snapshot and starts the CPU meters.
    pub async fn start(admin: Option<&str>, gw: Option<u32>) -> Meters {
        let before = snapshot(admin).await;
        Meters {
            before,
            gw: crate::procfs::CpuMeter::start(gw),
            me: crate::procfs::CpuMeter::start(None),
            t0: std::time::Instant::now(),
        }
    }

    /// Reads the meters, then takes the second snapshot.
    pub async fn stop(self, admin: Option<&str>) -> Measured {
        Measured {
            before: self.before,
            gw_split_pct: self.gw.split_percent(),
            me_split_pct: self.me.split_percent(),
            after: snapshot(admin).await,
            secs: self.t0.elapsed().as_secs_f64(),
        }
    }
}

impl Measured {
    /// Gateway CPU, % of one core, over the phase.
    pub fn gw_pct(&self) -> Option<f64> {
        self.gw_split_pct.map(|(u, s)| u + s)
    }

    /// Harness CPU, % of one core, over the phase.
    pub fn me_pct(&self) -> Option<f64> {
        self.me_split_pct.map(|(u, s)| u + s)
    }

    /// Envelopes the gateway sent per batch handed to a transport over the
    /// phase (`edgegate_messages_out_total` over `edgegate_writes_out_total`).
    pub fn envelopes_per_write(&self) -> Option<f64> {
        let (b, a) = (self.before.as_ref()?, self.after.as_ref()?);
        let writes = a.writes_out? - b.writes_out?;
        let envelopes = a.messages_out? - b.messages_out?;
        (writes > 0.0).then(|| envelopes / writes)
    }

    /// The keys and rows about CPU and metrics, last in every traffic report.
    pub fn report(&self, r: &mut crate::report::Report, gw: Option<u32>) {
        use crate::report::opt;
        r.set("gateway_pid", gw);
        r.set("gateway_cpu_pct", self.gw_pct());
        r.set("harness_cpu_pct", self.me_pct());
        r.set("metrics_before", serde_json::json!(self.before));
        r.set("metrics_after", serde_json::json!(self.after));
        let per_write = self.envelopes_per_write();
        r.set("gateway_envelopes_per_write", per_write);
        r.row("gateway CPU", opt(self.gw_pct(), 1, " % of one core"));
        r.row(
            "envelopes per write",
            opt(per_write, 2, " (gateway, over the phase)"),
        );
        r.row("harness CPU", opt(self.me_pct(), 1, " % of one core"));
    }

    /// CPU per delivery of the gateway and of the harness (µs), and a
    /// warning when the harness ran near the limit of its `threads`: then
    /// latency and loss describe the harness as much as the gateway.
    pub fn report_per_delivery(
        &self,
        r: &mut crate::report::Report,
        deliveries: u64,
        threads: usize,
    ) {
        use crate::report::opt;
        let per = |pct: Option<f64>| {
            pct.filter(|_| deliveries > 0)
                .map(|p| p / 100.0 * self.secs * 1e6 / deliveries as f64)
        };
        let (gw, me) = (per(self.gw_pct()), per(self.me_pct()));
        let gw_user = per(self.gw_split_pct.map(|p| p.0));
        let gw_sys = per(self.gw_split_pct.map(|p| p.1));
        let me_user = per(self.me_split_pct.map(|p| p.0));
        let me_sys = per(self.me_split_pct.map(|p| p.1));
        r.set("gateway_cpu_us_per_delivery", gw);
        r.set("gateway_cpu_user_us_per_delivery", gw_user);
        r.set("gateway_cpu_sys_us_per_delivery", gw_sys);
        r.set("harness_cpu_us_per_delivery", me);
        r.set("harness_cpu_user_us_per_delivery", me_user);
        r.set("harness_cpu_sys_us_per_delivery", me_sys);
        r.row(
            "CPU per delivery",
            format!(
                "gateway {} (user {}, system {}) / harness {} (user {}, system {})",
                opt(gw, 3, " µs"),
                opt(gw_user, 3, ""),
                opt(gw_sys, 3, ""),
                opt(me, 3, " µs"),
                opt(me_user, 3, ""),
                opt(me_sys, 3, "")
            ),
        );
        let limit = 90.0 * threads.max(1) as f64;
        let saturated = self.me_pct().is_some_and(|p| p >= limit);
        r.set("harness_saturated", saturated);
        if saturated {
            let msg = format!(
                "the harness used {:.0} % of one core with {threads} thread(s): it may be the bottleneck (raise --threads, run it on more cores, or lower the rate)",
                self.me_pct().unwrap_or(0.0)
            );
            eprintln!("warning: {msg}");
            r.row("WARNING", msg);
        }
    }
}

/// What a scenario's peer tasks saw, merged.
#[derive(Default)]
pub struct Gathered {
    /// Deliveries, latency, duplicates, reorders.
    pub d: crate::track::Deliveries,
    /// Publishes written.
    pub sent: u64,
    /// Why connections ended early.
    pub lost_conns: Vec<String>,
    /// `err` replies by code.
    pub errs: std::collections::HashMap<String, u64>,
}

impl Gathered {
    /// Awaits `tasks` and merges what they saw into this.
    pub async fn join(
        &mut self,
        tasks: impl IntoIterator<Item = tokio::task::JoinHandle<crate::peer::PeerStats>>,
    ) -> anyhow::Result<()> {
        for t in tasks {
            let s = t.await?;
            self.d.merge(&s.deliveries);
            self.sent += s.sent;
            if let Some(l) = s.lost {
                self.lost_conns.push(l);
            }
            for (k, v) in s.errs {
                *self.errs.entry(k).or_default() += v;
            }
        }
        Ok(())
    }

    /// Takes the run's latency distribution from `t`, where the receivers
    /// record it (their own [`crate::peer::PeerStats`] carry none).
    pub fn latency_from(&mut self, t: &crate::series::Timeline) {
        let _ = self.d.latency.add(t.total());
    }

    /// The delivery keys and rows every traffic report has: `lost` is
    /// what the scenario expected and did not see.
    pub fn report(&self, r: &mut crate::report::Report, lost: u64) -> serde_json::Value {
        let lat = crate::track::summary(&self.d.latency);
        r.set("err_replies", serde_json::json!(self.errs));
        r.set("received", self.d.received);
        r.set("unique", self.d.unique);
        r.set("lost", lost);
        r.set("duplicates", self.d.dups);
        r.set("order_violations", self.d.reordered);
        r.set("malformed", self.d.malformed);
        r.set("latency", lat.clone());
        r.set("disconnects", self.lost_conns.len());
        let mut reasons = std::collections::BTreeMap::<&str, u64>::new();
        for l in &self.lost_conns {
            *reasons.entry(l.as_str()).or_default() += 1;
        }
        r.set("disconnect_reasons", serde_json::json!(reasons));
        r.row(
            "lost / dup / reordered",
            format!("{lost} / {} / {}", self.d.dups, self.d.reordered),
        );
        r.row("latency publish→deliver", crate::report::latency_line(&lat));
        r.row(
            "disconnects",
            format!("{} {:?}", self.lost_conns.len(), self.lost_conns.first()),
        );
        lat
    }
}
