//! Token buckets: pure arithmetic over a millisecond clock, no I/O.
//!
//! A [`Bucket`] holds only its level and the time it was last topped up
//! (16 bytes); the rate and burst live in a shared [`Rate`], so a bucket per
//! connection costs little. Levels are kept in thousandths of a token so
//! that slow rates (a few per second) refill smoothly at millisecond
//! resolution without floating point.
//!
//! Used for the per-connection envelope and byte limits, the per-address
//! connect limit and the per-shard accept budget ([`IpTable`] bounds the
//! per-address map).

use std::collections::HashMap;
use std::net::IpAddr;

/// Thousandths of a token per token.
const MILLI: u64 = 1000;

/// A rate: `per_s` tokens a second, at most `burst` saved up. `per_s = 0`
/// means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_s: u64,
    /// Bucket size.
    pub burst: u64,
}

impl Rate {
    /// A rate; a zero burst becomes the rate itself (at least 1).
    pub fn new(per_s: u64, burst: u64) -> Self {
        let burst = if burst == 0 { per_s.max(1) } else { burst };
        Rate { per_s, burst }
    }

    /// True when this rate limits nothing.
    pub fn unlimited(&self) -> bool {
        self.per_s == 0
    }

    /// Milliseconds until `n` tokens are available in a bucket holding
    /// `level_milli` thousandths (0 when they are).
    fn wait_ms(&self, level_milli: u64, n: u64) -> u64 {
        let need = n.saturating_mul(MILLI).saturating_sub(level_milli);
        // per_s tokens per 1000 ms = per_s milli-tokens per ms.
        need.div_ceil(self.per_s.max(1))
    }
}

/// One token bucket. Starts full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    level_milli: u64,
    last_ms: u64,
}

impl Bucket {
    /// A full bucket at time `now_ms`.
    pub fn full(rate: &Rate, now_ms: u64) -> Self {
        Bucket {
            level_milli: rate.burst.saturating_mul(MILLI),
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: &Rate, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        // Capped on every call, so a bucket made full for a larger rate
        // (or before the rate was known) holds at most this rate's burst.
        let cap = rate.burst.saturating_mul(MILLI);
        self.level_milli = self
            .level_milli
            .saturating_add(elapsed.saturating_mul(rate.per_s))
            .min(cap);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Takes `n` tokens if the bucket has them. An unlimited rate always
    /// succeeds.
    pub fn try_take(&mut self, rate: &Rate, n: u64, now_ms: u64) -> bool {
        if rate.unlimited() {
            return true;
        }
        self.refill(rate, now_ms);
        let want = n.saturating_mul(MILLI);
        if self.level_milli >= want {
            self.level_milli -= want;
            true
        } else {
            false
        }
    }

    /// True when the bucket has refilled to its burst (the client paused).
    pub fn is_full(&mut self, rate: &Rate, now_ms: u64) -> bool {
        if rate.unlimited() {
            return true;
        }
        self.refill(rate, now_ms);
        self.level_milli >= rate.burst.saturating_mul(MILLI)
    }

    /// Milliseconds until `n` tokens are available.
    pub fn wait_ms(&mut self, rate: &Rate, n: u64, now_ms: u64) -> u64 {
        if rate.unlimited() {
            return 0;
        }
        self.refill(rate, now_ms);
        rate.wait_ms(self.level_milli, n)
    }
}

/// Per source address connect buckets, bounded in size: when the table is
/// full, entries whose bucket has refilled (addresses that went quiet) are
/// dropped; if none has, the whole table is cleared, which forgives every
/// address at once rather than letting an attacker with many addresses grow
/// memory without bound.
#[derive(Debug)]
pub struct IpTable {
    rate: Rate,
    max: usize,
    map: HashMap<IpAddr, Bucket>,
}

impl IpTable {
    /// A table of at most `max` addresses.
    pub fn new(rate: Rate, max: usize) -> Self {
        IpTable {
            rate,
            max: max.max(1),
            map: HashMap::new(),
        }
    }

    /// Addresses tracked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }

    /// Counts one new connection from `ip`; false when over its rate.
    pub fn admit(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        if self.rate.unlimited() {
            return true;
        }
        if !self.map.contains_key(&ip) && self.map.len() >= self.max {
            let rate = self.rate;
            self.map.retain(|_, b| !b.is_full(&rate, now_ms));
            if self.map.len() >= self.max {
                self.map.clear();
            }
        }
        let rate = self.rate;
        self.map
            .entry(ip)
            .or_insert_with(|| Bucket::full(&rate, now_ms))
            .try_take(&rate, 1, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let r = Rate::new(10, 5);
        let mut b = Bucket::full(&r, 0);
        for _ in 0..5 {
            assert!(b.try_take(&r, 1, 0));
        }
        assert!(!b.try_take(&r, 1, 0));
        // 10/s: one token per 100 ms.
        assert!(!b.try_take(&r, 1, 99));
        assert!(b.try_take(&r, 1, 100));
        assert_eq!(b.wait_ms(&r, 1, 100), 100);
        // Never more than the burst, however long the pause.
        assert!(b.is_full(&r, 1_000_000));
        let mut n = 0;
        while b.try_take(&r, 1, 1_000_000) {
            n += 1;
        }
        assert_eq!(n, 5);
    }

    #[test]
    fn slow_rates_refill_smoothly() {
        let r = Rate::new(3, 1);
        let mut b = Bucket::full(&r, 0);
        assert!(b.try_take(&r, 1, 0));
        assert!(!b.try_take(&r, 1, 333));
        assert!(b.try_take(&r, 1, 334));
    }

    #[test]
    fn byte_costs_and_unlimited() {
        let r = Rate::new(1000, 1500);
        let mut b = Bucket::full(&r, 0);
        assert!(b.try_take(&r, 1500, 0));
        assert!(!b.try_take(&r, 1, 0));
        assert!(b.try_take(&r, 500, 500));
        let u = Rate::new(0, 0);
        let mut ub = Bucket::full(&u, 0);
        assert!(ub.try_take(&u, u64::MAX, 0));
        assert_eq!(ub.wait_ms(&u, 10, 0), 0);
    }

    #[test]
    fn ip_table_limits_each_address_and_stays_bounded() {
        let mut t = IpTable::new(Rate::new(1, 2), 3);
        let a: IpAddr = [10, 0, 0, 1].into();
        assert!(t.admit(a, 0) && t.admit(a, 0));
        assert!(!t.admit(a, 0));
        for i in 2..50u8 {
            assert!(t.admit([10, 0, 0, i].into(), 0));
            assert!(t.len() <= 3);
        }
        // Quiet addresses are dropped first when the table is full.
        let mut t = IpTable::new(Rate::new(1, 1), 2);
        let (x, y, z): (IpAddr, IpAddr, IpAddr) = (
            [1, 1, 1, 1].into(),
            [2, 2, 2, 2].into(),
            [3, 3, 3, 3].into(),
        );
        assert!(t.admit(x, 0));
        assert!(t.admit(y, 900));
        assert!(t.admit(z, 1000)); // x refilled at 1000: dropped, y kept
        assert_eq!(t.len(), 2);
        assert!(!t.admit(y, 1000));
    }
}
