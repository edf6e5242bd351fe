//! Open-loop rate pacing: how many operations are due at a given elapsed time.
//!
//! The pacer never waits for replies (open loop), so a slow gateway shows up
//! as latency, not as a lower offered rate; a late tick catches up in a burst.

use std::time::Duration;

/// Counts operations due at `rate` per second, up to an optional total.
#[derive(Clone, Debug)]
pub struct Pacer {
    rate: f64,
    issued: u64,
    limit: Option<u64>,
}

impl Pacer {
    /// `rate` operations per second, at most `limit` in all.
    pub fn new(rate: f64, limit: Option<u64>) -> Pacer {
        Pacer {
            rate: rate.max(0.0),
            issued: 0,
            limit,
        }
    }

    /// How many to issue now, `elapsed` after the start; counts them as issued.
    pub fn due(&mut self, elapsed: Duration) -> u64 {
        let mut target = (elapsed.as_secs_f64() * self.rate).floor() as u64;
        if let Some(l) = self.limit {
            target = target.min(l);
        }
        let n = target.saturating_sub(self.issued);
        self.issued += n;
        n
    }

    /// Issued so far.
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// All of `limit` issued.
    pub fn done(&self) -> bool {
        self.limit.is_some_and(|l| self.issued >= l)
    }

    /// A tick period suited to the rate: 1/rate, clamped to [1 ms, 100 ms].
    pub fn tick(&self) -> Duration {
        let p = if self.rate > 0.0 {
            1.0 / self.rate
        } else {
            0.1
        };
        Duration::from_secs_f64(p.clamp(0.001, 0.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_and_catches_up() {
        let mut p = Pacer::new(1000.0, Some(2500));
        assert_eq!(p.due(Duration::from_millis(0)), 0);
        assert_eq!(p.due(Duration::from_millis(10)), 10);
        assert_eq!(p.due(Duration::from_millis(10)), 0);
        assert_eq!(p.due(Duration::from_millis(1000)), 990);
        assert_eq!(p.due(Duration::from_secs(10)), 1500);
        assert!(p.done());
        assert_eq!(p.issued(), 2500);
        assert_eq!(p.tick(), Duration::from_millis(1));
        assert_eq!(Pacer::new(2.0, None).tick(), Duration::from_millis(100));
    }
}
