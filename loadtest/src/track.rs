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
/// Sequences start at 1 and are dense. In order — nearly always — only
/// `floor` moves, so recording touches nothing outside this struct (the
/// harness keeps one per subscriber and publisher: a bitset that grew with
/// every message cost a cache miss per delivery). The bitset is written
/// only for sequences that arrive above a gap.
#[derive(Clone, Debug, Default)]
pub struct SeqTrack {
    /// Every sequence in 1..=floor has been seen.
    floor: u64,
    max: u64,
    /// Distinct sequences received.
    pub unique: u64,
    /// What arrived above a gap, duplicates and reorders: none while the
    /// stream is in order, so the struct stays 32 bytes (two per line).
    odd: Option<Box<Odd>>,
}

#[derive(Clone, Debug, Default)]
struct Odd {
    /// Seen sequences above `floor` (absolute bit positions; bits at or
    /// below `floor` may be stale and are never read).
    bits: Vec<u64>,
    dups: u64,
    reordered: u64,
}

impl SeqTrack {
    /// Records `seq` (≥ 1).
    pub fn record(&mut self, seq: u64) {
        if seq == self.floor + 1 && self.max == self.floor {
            self.floor = seq;
            self.max = seq;
            self.unique += 1;
            return;
        }
        let odd = self.odd.get_or_insert_with(Box::default);
        if (seq != 0 && seq <= self.floor) || odd.seen(seq) {
            odd.dups += 1;
            return;
        }
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if odd.bits.len() <= w {
            odd.bits.resize(w + 1, 0);
        }
        odd.bits[w] |= 1 << b;
        self.unique += 1;
        if seq < self.max {
            odd.reordered += 1;
        }
        self.max = self.max.max(seq);
        while odd.seen(self.floor + 1) {
            self.floor += 1;
        }
    }

    /// Sequences received more than once.
    pub fn dups(&self) -> u64 {
        self.odd.as_ref().map_or(0, |o| o.dups)
    }

    /// Sequences received after a higher one from the same publisher.
    pub fn reordered(&self) -> u64 {
        self.odd.as_ref().map_or(0, |o| o.reordered)
    }
}

impl Odd {
    fn seen(&self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        self.bits.get(w).is_some_and(|x| x & (1 << b) != 0)
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
        self.dups += t.dups();
        self.reordered += t.reordered();
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
        assert_eq!(t.dups(), 1);
        assert_eq!(t.reordered(), 2); // 4 after 5, 6 after 200
    }

    #[test]
    fn seq_tracking_in_order_then_gaps_then_in_order_again() {
        let mut t = SeqTrack::default();
        for s in 1..=1000 {
            t.record(s);
        }
        assert!(t.odd.is_none(), "in order writes no bitset");
        assert_eq!(std::mem::size_of::<SeqTrack>(), 32);
        // A gap (1001 late), duplicates below and above the floor.
        for s in [1002, 1003, 1003, 5, 1001, 1002, 1004, 1005, 1000] {
            t.record(s);
        }
        assert_eq!((t.unique, t.dups(), t.reordered()), (1005, 4, 1));
        assert_eq!(t.floor, 1005, "the floor closes the gap");
        for s in 1006..=1100 {
            t.record(s);
        }
        assert_eq!((t.unique, t.dups(), t.reordered()), (1100, 4, 1));
        // A sequence never sent stays lost: the floor stops below it.
        let mut g = SeqTrack::default();
        for s in [1, 2, 4, 5, 6] {
            g.record(s);
        }
        assert_eq!(
            (g.unique, g.dups(), g.reordered(), g.floor, g.max),
            (5, 0, 0, 2, 6)
        );
        g.record(4);
        assert_eq!(g.dups(), 1);
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
