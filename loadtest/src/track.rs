//! Delivery accounting: latency histograms and per-publisher sequence tracking
//! (loss, duplicates, order violations).

use hdrhistogram::Histogram;

/// A latency histogram in microseconds, 1 µs .. 10 min, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that Histogram accepts.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable_hist())
}

fn unreachable_hist() -> Histogram<u64> {
    Histogram::new(3).unwrap_or_else(|_| std::process::abort())
}

/// Percentiles of a latency histogram, in milliseconds.
pub fn summary(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |v: u64| v as f64 / 1000.0;
    serde_json::json!({
        "count": h.len(),
        "min_ms": ms(h.min()),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
    })
}

/// Which sequence numbers of one publisher a receiver has seen.
///
/// Sequences start at 1 and are dense, so a bitset is enough.
#[derive(Clone, Debug, Default)]
pub struct SeqTrack {
    bits: Vec<u64>,
    max: u64,
    /// Distinct sequences received.
    pub unique: u64,
    /// Sequences received more than once.
    pub dups: u64,
    /// Sequences received after a higher one from the same publisher.
    pub reordered: u64,
}

impl SeqTrack {
    /// Records `seq` (≥ 1).
    pub fn record(&mut self, seq: u64) {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        if self.bits[w] & (1 << b) != 0 {
            self.dups += 1;
            return;
        }
        self.bits[w] |= 1 << b;
        self.unique += 1;
        if seq < self.max {
            self.reordered += 1;
        }
        self.max = self.max.max(seq);
    }
}

/// Totals over many [`SeqTrack`]s and a latency histogram.
#[derive(Clone, Debug)]
pub struct Deliveries {
    /// Latency publish → deliver.
    pub latency: Histogram<u64>,
    /// Messages received (including duplicates).
    pub received: u64,
    /// Distinct messages received.
    pub unique: u64,
    /// Duplicates.
    pub dups: u64,
    /// Order violations.
    pub reordered: u64,
    /// Payloads that did not parse.
    pub malformed: u64,
}

impl Default for Deliveries {
    fn default() -> Self {
        Deliveries {
            latency: new_histogram(),
            received: 0,
            unique: 0,
            dups: 0,
            reordered: 0,
            malformed: 0,
        }
    }
}

impl Deliveries {
    /// Adds another receiver's totals.
    pub fn merge(&mut self, o: &Deliveries) {
        let _ = self.latency.add(&o.latency);
        self.received += o.received;
        self.unique += o.unique;
        self.dups += o.dups;
        self.reordered += o.reordered;
        self.malformed += o.malformed;
    }

    /// Adds a finished [`SeqTrack`].
    pub fn absorb(&mut self, t: &SeqTrack) {
        self.unique += t.unique;
        self.dups += t.dups;
        self.reordered += t.reordered;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracking() {
        let mut t = SeqTrack::default();
        for s in [1, 2, 3, 5, 4, 4, 200, 6] {
            t.record(s);
        }
        assert_eq!(t.unique, 7);
        assert_eq!(t.dups, 1);
        assert_eq!(t.reordered, 2); // 4 after 5, 6 after 200
    }

    #[test]
    fn histogram_summary() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let s = summary(&h);
        let p50 = s["p50_ms"].as_f64().unwrap();
        assert!((p50 - 500.0).abs() < 1.0, "{p50}");
        assert_eq!(s["count"], 1000);
    }
}
