//! Exponential backoff with full jitter, the one schedule every reconnecting
//! piece of edgegate uses (the client library, and the gateway's own
//! reconnects to NATS): before attempt `n` (counting from 0) sleep a
//! uniformly random time in `[0, min(cap, base · 2ⁿ)]`, so a fleet that
//! lost its server at once does not come back at once (AWS architecture
//! blog, "Exponential Backoff And Jitter").

use std::time::Duration;

/// The upper bound of the sleep before attempt `attempt` (0-based):
/// `min(cap, base · 2^attempt)`, computed without overflow.
pub fn bound(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let (base, cap) = (base.as_nanos(), cap.as_nanos());
    let bound = if attempt >= 64 {
        cap
    } else {
        base.checked_shl(attempt)
            .filter(|b| *b >> attempt == base)
            .map_or(cap, |b| b.min(cap))
    };
    Duration::from_nanos(u64::try_from(bound).unwrap_or(u64::MAX))
}

/// A full-jitter sleep for attempt `attempt`: uniform in `[0, bound]`.
/// `uniform(max)` must return a uniformly random number in `[0, max]`
/// (the caller's random source: seeded in tests, the thread's otherwise).
pub fn full_jitter(
    base: Duration,
    cap: Duration,
    attempt: u32,
    uniform: impl FnOnce(u64) -> u64,
) -> Duration {
    let max = bound(base, cap, attempt).as_nanos() as u64;
    Duration::from_nanos(uniform(max).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bound_doubles_up_to_the_cap_without_overflow() {
        assert_eq!(bound(100 * MS, 5_000 * MS, 0), 100 * MS);
        assert_eq!(bound(100 * MS, 5_000 * MS, 3), 800 * MS);
        assert_eq!(bound(100 * MS, 5_000 * MS, 6), 5_000 * MS);
        assert_eq!(bound(100 * MS, 5_000 * MS, 200), 5_000 * MS);
        assert_eq!(
            bound(Duration::MAX / 2, Duration::MAX, 63),
            Duration::from_nanos(u64::MAX)
        );
    }

    #[test]
    fn jitter_stays_within_the_bound_whatever_the_source_says() {
        assert_eq!(full_jitter(100 * MS, 5_000 * MS, 1, |_| 0), Duration::ZERO);
        assert_eq!(full_jitter(100 * MS, 5_000 * MS, 1, |m| m), 200 * MS);
        assert_eq!(full_jitter(100 * MS, 5_000 * MS, 1, |_| u64::MAX), 200 * MS);
    }
}
