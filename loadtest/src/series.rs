//! Time series collected during a run (connections, latency, RSS, accept
//! rate over time), for the JSON report and the `--svg` chart.

use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Panel names shared by the scenarios (one chart panel each).
pub mod panel {
    /// Latency over time, milliseconds.
    pub const LATENCY: &str = "latency (ms)";
    /// Open connections over time.
    pub const CONNECTIONS: &str = "connections";
    /// Accepts per second seen by the gateway.
    pub const ACCEPTS: &str = "gateway accepts / s";
    /// Gateway resident memory, MiB.
    pub const RSS: &str = "gateway RSS (MiB)";
}

/// One named curve: (seconds since the run's start, value).
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// The panel it is drawn in.
    pub panel: String,
    /// Legend label.
    pub name: String,
    /// Points in time order.
    pub points: Vec<(f64, f64)>,
}

/// A set of series over one time axis, plus vertical event markers.
#[derive(Clone, Debug)]
pub struct Chart {
    t0: Instant,
    /// The curves, in first-push order.
    pub series: Vec<Series>,
    /// Marked instants (seconds, label), e.g. "SIGTERM".
    pub events: Vec<(f64, String)>,
}

impl Default for Chart {
    fn default() -> Self {
        Chart::new(Instant::now())
    }
}

impl Chart {
    /// An empty chart whose time 0 is `t0`.
    pub fn new(t0: Instant) -> Chart {
        Chart {
            t0,
            series: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Seconds since time 0.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// The instant of time 0.
    pub fn start(&self) -> Instant {
        self.t0
    }

    /// Appends `(now, v)` to series `name` of `panel`.
    pub fn push(&mut self, panel: &str, name: &str, v: f64) {
        let t = self.now();
        self.push_at(panel, name, t, v);
    }

    /// Appends `(t, v)` to series `name` of `panel` (created on first use).
    pub fn push_at(&mut self, panel: &str, name: &str, t: f64, v: f64) {
        if !v.is_finite() {
            return;
        }
        match self
            .series
            .iter_mut()
            .find(|s| s.panel == panel && s.name == name)
        {
            Some(s) => s.points.push((t, v)),
            None => self.series.push(Series {
                panel: panel.into(),
                name: name.into(),
                points: vec![(t, v)],
            }),
        }
    }

    /// Marks an event at now.
    pub fn mark(&mut self, label: &str) {
        let t = self.now();
        self.events.push((t, label.into()));
    }

    /// The points of a series, if any.
    pub fn get(&self, panel: &str, name: &str) -> Option<&[(f64, f64)]> {
        self.series
            .iter()
            .find(|s| s.panel == panel && s.name == name)
            .map(|s| s.points.as_slice())
    }

    /// JSON form: `{events: [[t, label]], series: [{panel, name, points: [[t, v]]}]}`.
    pub fn to_json(&self) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "events": self.events.iter().map(|(t, l)| json!([round(*t), l])).collect::<Vec<_>>(),
            "series": self.series.iter().map(|s| json!({
                "panel": s.panel, "name": s.name,
                "points": s.points.iter().map(|(t, v)| json!([round(*t), round(*v)])).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Latency recorded into fixed time buckets, shared by many tasks, so a
/// run can be charted as p50/p99/max per interval (2 significant digits per
/// bucket keep each histogram small), and the run's whole distribution
/// (3 significant digits).
///
/// Every receiver records here, one lock per read: one histogram shared by
/// all stays in the cache, where one per subscriber (hundreds of them,
/// between 64 KiB read buffers) cost a cache miss per delivery.
#[derive(Debug)]
pub struct Timeline {
    bucket_ns: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    buckets: Vec<(u64, Histogram<u64>)>,
    total: Histogram<u64>,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline::new(500_000_000)
    }
}

impl Timeline {
    /// Buckets of `bucket_ns` nanoseconds of [`crate::peer::now_ns`] time.
    pub fn new(bucket_ns: u64) -> Timeline {
        Timeline {
            bucket_ns: bucket_ns.max(1),
            inner: Mutex::new(Inner {
                buckets: Vec::new(),
                total: crate::track::new_histogram(),
            }),
        }
    }

    /// Records a latency of `us` microseconds observed at `now_ns`.
    pub fn record(&self, now_ns: u64, us: u64) {
        self.record_all(now_ns, &[us]);
    }

    /// Records latencies (µs) all observed at `now_ns`, such as one read's
    /// deliveries, under one lock.
    pub fn record_all(&self, now_ns: u64, us: &[u64]) {
        let b = now_ns / self.bucket_ns;
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        let Inner { buckets, total } = &mut *g;
        let i = match buckets.iter().rposition(|(k, _)| *k == b) {
            Some(i) => i,
            None => {
                let Ok(h) = Histogram::new_with_bounds(1, 600_000_000, 2) else {
                    return;
                };
                buckets.push((b, h));
                buckets.sort_by_key(|(k, _)| *k);
                buckets.iter().rposition(|(k, _)| *k == b).unwrap_or(0)
            }
        };
        for &v in us {
            let v = v.max(1);
            let _ = buckets[i].1.record(v);
            let _ = total.record(v);
        }
    }

    /// Every latency recorded, at full precision.
    pub fn total(&self) -> Histogram<u64> {
        match self.inner.lock() {
            Ok(g) => g.total.clone(),
            Err(_) => crate::track::new_histogram(),
        }
    }

    /// The latencies observed from `from_ns` on (whole buckets: those that
    /// begin at or after it), at the buckets' precision (2 digits).
    pub fn since(&self, from_ns: u64) -> Histogram<u64> {
        let mut h = crate::track::new_histogram();
        if let Ok(g) = self.inner.lock() {
            for (b, x) in &g.buckets {
                if b.saturating_mul(self.bucket_ns) >= from_ns {
                    let _ = h.add(x);
                }
            }
        }
        h
    }

    /// Per bucket: (bucket end in `now_ns` nanoseconds, count, p50, p99, max in ms).
    pub fn rows(&self) -> Vec<(u64, u64, f64, f64, f64)> {
        let Ok(g) = self.inner.lock() else {
            return Vec::new();
        };
        g.buckets
            .iter()
            .map(|(k, h)| {
                let ms = |v: u64| v as f64 / 1000.0;
                (
                    (k + 1) * self.bucket_ns,
                    h.len(),
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.max()),
                )
            })
            .collect()
    }

    /// Adds p50/p99/max per bucket to `chart`'s latency panel; `start_ns`
    /// is the `now_ns` of the chart's time 0.
    pub fn chart_into(&self, chart: &mut Chart, start_ns: u64, prefix: &str) {
        for (end, _n, p50, p99, max) in self.rows() {
            let t = end.saturating_sub(start_ns) as f64 / 1e9;
            chart.push_at(panel::LATENCY, &format!("{prefix}p50"), t, p50);
            chart.push_at(panel::LATENCY, &format!("{prefix}p99"), t, p99);
            chart.push_at(panel::LATENCY, &format!("{prefix}max"), t, max);
        }
    }
}

/// Least-squares slope of `points` (value per second); `None` with fewer than 2 points.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 2.0 * i as f64)).collect();
        assert!((slope(&pts).unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(slope(&pts[..1]), None);
    }

    #[test]
    fn timeline_buckets() {
        let t = Timeline::new(1_000_000_000);
        t.record(500_000_000, 1000);
        t.record(1_500_000_000, 2000);
        t.record(600_000_000, 3000);
        let rows = t.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].0, 1_000_000_000);
        assert_eq!(rows[0].1, 2);
        assert!((rows[1].2 - 2.0).abs() < 0.05);
        let all = t.total();
        assert_eq!(all.len(), 3);
        assert_eq!(all.max(), all.highest_equivalent(3000));
    }

    #[test]
    fn chart_groups_series() {
        let mut c = Chart::default();
        c.push_at(panel::CONNECTIONS, "alive", 0.0, 1.0);
        c.push_at(panel::CONNECTIONS, "alive", 1.0, 2.0);
        c.push_at(panel::LATENCY, "p50", 1.0, f64::NAN);
        assert_eq!(c.series.len(), 1);
        assert_eq!(c.get(panel::CONNECTIONS, "alive").unwrap().len(), 2);
        let j = c.to_json();
        assert_eq!(j["series"][0]["points"][1][1], 2.0);
    }
}
