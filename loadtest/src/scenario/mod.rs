//! The scenarios.

pub mod fanout;
pub mod idle;
pub mod pubsub;
pub mod soak;
pub mod storm;

use std::time::{Duration, Instant};

use crate::peer::Counters;

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
