//! Sans-IO reconnect policy: the backoff schedule and what to do after a
//! connection ends, as pure functions and a small state machine.
//!
//! Nothing here touches a socket, a clock or a runtime, so every decision the
//! reconnecting [`Client`](crate::Client) takes can be unit-tested with a
//! seeded random number generator.
//!
//! The schedule is exponential backoff with *full jitter* (AWS architecture
//! blog, "Exponential Backoff And Jitter"): before reconnect attempt `n`
//! (counting from 0) the client sleeps a uniformly random time in
//! `[0, min(cap, base * 2^n)]`. A `bye` carrying `meta.retry_ms` (docs/protocol.md
//! §5: close codes 1001, 4004 and 4007 always carry it) raises that sleep to at
//! least `retry_ms`.

use std::time::Duration;

/// Close codes of docs/protocol.md §5 that this module reasons about.
pub mod close {
    /// Normal close.
    pub const NORMAL: u16 = 1000;
    /// Drain or restart: reconnect after `retry_ms`.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the protocol: reconnecting would fail the same way.
    pub const PROTOCOL_ERROR: u16 = 4000;
    /// Missing or bad credentials: get a new token.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The server heard nothing for its idle timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;
    /// The client did not read fast enough.
    pub const SLOW_CONSUMER: u16 = 4003;
    /// Too many operations: reconnect after `retry_ms`.
    pub const RATE_LIMITED: u16 = 4004;
    /// Kicked by a core service: never reconnect.
    pub const KICKED: u16 = 4005;
    /// The client sent a frame over `max_frame`: reconnecting would fail the same way.
    pub const FRAME_TOO_LARGE: u16 = 4006;
    /// The gateway is full: reconnect after `retry_ms`.
    pub const OVERLOADED: u16 = 4007;
    /// The token expired: refresh it and reconnect.
    pub const TOKEN_EXPIRED: u16 = 4008;
}

/// Backoff parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Bound of the first attempt's sleep (attempt 0 sleeps in `[0, base]`).
    pub base: Duration,
    /// Largest bound any sleep can have (before `retry_ms`, which may exceed it).
    pub cap: Duration,
    /// Consecutive failed attempts after which the client gives up;
    /// `None` retries forever. A successful `welcome` resets the count.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The upper bound of the sleep before attempt `attempt` (0-based):
    /// `min(cap, base * 2^attempt)`, computed without overflow.
    pub fn bound(&self, attempt: u32) -> Duration {
        edgegate_proto::backoff::bound(self.base, self.cap, attempt)
    }

    /// A full-jitter sample for attempt `attempt`: uniform in `[0, bound(attempt)]`.
    pub fn sample(&self, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        edgegate_proto::backoff::full_jitter(self.base, self.cap, attempt, |max| rng.u64(0..=max))
    }
}

/// What a close code means for a reconnecting client (docs/protocol.md §5 table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseClass {
    /// Never reconnect: 4005 kicked, 4000 protocol error, 4006 frame too large.
    Fatal,
    /// Refresh the token (the refresh hook), then reconnect with backoff: 4001, 4008.
    RefreshToken,
    /// Reconnect with backoff; `retry_ms`, when the `bye` carried one, is the minimum wait.
    Retry,
}

/// Classifies a close code. `None` (the connection broke without a `bye` or
/// close frame: reset, refused, EOF, timeout) is retried with backoff, as are
/// unknown codes.
pub fn classify(code: Option<u16>) -> CloseClass {
    match code {
        Some(close::KICKED | close::PROTOCOL_ERROR | close::FRAME_TOO_LARGE) => CloseClass::Fatal,
        Some(close::UNAUTHORIZED | close::TOKEN_EXPIRED) => CloseClass::RefreshToken,
        _ => CloseClass::Retry,
    }
}

/// Why a connection ended, as seen by the policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseInfo {
    /// The close code from `bye` (or the WebSocket close frame); `None` when
    /// the transport failed without one.
    pub code: Option<u16>,
    /// `bye`'s `meta.retry_ms`.
    pub retry_ms: Option<u64>,
}

/// The decision after a connection ended or a connect attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Sleep `delay`, call the token refresh hook first when `refresh_token`, then connect again.
    Reconnect {
        /// How long to wait before the next attempt.
        delay: Duration,
        /// Whether to call the token-refresh hook before connecting.
        refresh_token: bool,
        /// 0-based number of this reconnect attempt since the last `welcome`.
        attempt: u32,
    },
    /// Do not reconnect.
    Stop(StopReason),
}

/// Why the client stopped reconnecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A close code after which reconnecting is pointless or forbidden (4000, 4005, 4006).
    Fatal(u16),
    /// `max_attempts` consecutive attempts failed.
    GaveUp {
        /// The number of attempts made.
        attempts: u32,
    },
    /// The application closed the client.
    Closed,
}

/// The reconnect state machine: feed it connection outcomes, it answers with
/// [`Action`]s. Deterministic for a given seed.
#[derive(Clone, Debug)]
pub struct ReconnectPolicy {
    backoff: Backoff,
    rng: fastrand::Rng,
    attempt: u32,
}

impl ReconnectPolicy {
    /// A policy with a random seed.
    pub fn new(backoff: Backoff) -> Self {
        ReconnectPolicy {
            backoff,
            rng: fastrand::Rng::new(),
            attempt: 0,
        }
    }

    /// A policy with a fixed seed (tests, reproducible load runs).
    pub fn with_seed(backoff: Backoff, seed: u64) -> Self {
        ReconnectPolicy {
            backoff,
            rng: fastrand::Rng::with_seed(seed),
            attempt: 0,
        }
    }

    /// The backoff parameters.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Consecutive attempts since the last successful `welcome`.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// A session reached `welcome`: the schedule starts over.
    pub fn on_connected(&mut self) {
        self.attempt = 0;
    }

    /// A session ended, or a connect attempt failed, with `info`.
    pub fn on_closed(&mut self, info: CloseInfo) -> Action {
        let class = classify(info.code);
        if class == CloseClass::Fatal {
            // `classify` only answers Fatal for Some(code).
            return Action::Stop(StopReason::Fatal(info.code.unwrap_or_default()));
        }
        if let Some(max) = self.backoff.max_attempts
            && self.attempt >= max
        {
            return Action::Stop(StopReason::GaveUp {
                attempts: self.attempt,
            });
        }
        let attempt = self.attempt;
        let jittered = self.backoff.sample(attempt, &mut self.rng);
        let floor = Duration::from_millis(info.retry_ms.unwrap_or(0));
        self.attempt = self.attempt.saturating_add(1);
        Action::Reconnect {
            delay: jittered.max(floor),
            refresh_token: class == CloseClass::RefreshToken,
            attempt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn backoff() -> Backoff {
        Backoff {
            base: ms(100),
            cap: ms(5_000),
            max_attempts: None,
        }
    }

    #[test]
    fn bound_grows_then_caps() {
        let b = backoff();
        let bounds: Vec<u64> = (0..10).map(|a| b.bound(a).as_millis() as u64).collect();
        assert_eq!(
            bounds,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
        // No overflow for absurd attempts.
        assert_eq!(b.bound(63), ms(5_000));
        assert_eq!(b.bound(64), ms(5_000));
        assert_eq!(b.bound(u32::MAX), ms(5_000));
        let huge = Backoff {
            base: Duration::from_secs(u64::MAX / 4),
            cap: Duration::MAX,
            max_attempts: None,
        };
        let _ = huge.bound(200);
    }

    #[test]
    fn seeded_samples_are_within_bounds_and_reproducible() {
        let b = backoff();
        let mut p1 = ReconnectPolicy::with_seed(b.clone(), 42);
        let mut p2 = ReconnectPolicy::with_seed(b.clone(), 42);
        let mut delays = Vec::new();
        for attempt in 0..20 {
            let a1 = p1.on_closed(CloseInfo::default());
            let a2 = p2.on_closed(CloseInfo::default());
            assert_eq!(a1, a2, "same seed, same schedule");
            match a1 {
                Action::Reconnect {
                    delay,
                    refresh_token,
                    attempt: n,
                } => {
                    assert_eq!(n, attempt);
                    assert!(!refresh_token);
                    assert!(delay <= b.bound(attempt), "{delay:?} > bound");
                    delays.push(delay);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Full jitter: never above the cap, and not all identical.
        assert!(delays.iter().all(|d| *d <= ms(5_000)));
        assert!(delays.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn samples_grow_on_average_and_are_capped() {
        // Mean of many samples per attempt is ~bound/2: grows, then flat at cap/2.
        let b = backoff();
        let mut rng = fastrand::Rng::with_seed(7);
        let mean = |attempt: u32, rng: &mut fastrand::Rng| {
            let n = 4000;
            let sum: u128 = (0..n).map(|_| b.sample(attempt, rng).as_micros()).sum();
            (sum / n) as f64 / 1000.0
        };
        let m: Vec<f64> = (0..9).map(|a| mean(a, &mut rng)).collect();
        for a in 0..6 {
            assert!(m[a + 1] > m[a] * 1.5, "attempt {a}: {m:?}");
        }
        for (a, v) in m.iter().enumerate() {
            let half = b.bound(a as u32).as_millis() as f64 / 2.0;
            assert!((v - half).abs() < half * 0.1, "attempt {a}: {v} vs {half}");
        }
        // The largest samples come close to the cap but never exceed it.
        let max = (0..4000).map(|_| b.sample(30, &mut rng)).max().unwrap();
        assert!(max <= ms(5_000) && max > ms(4_900), "{max:?}");
    }

    #[test]
    fn zero_base_means_immediate() {
        let b = Backoff {
            base: Duration::ZERO,
            cap: ms(1000),
            max_attempts: None,
        };
        let mut rng = fastrand::Rng::with_seed(1);
        for a in 0..10 {
            assert_eq!(b.sample(a, &mut rng), Duration::ZERO);
        }
    }

    #[test]
    fn retry_ms_is_the_minimum_wait() {
        let mut p = ReconnectPolicy::with_seed(backoff(), 3);
        for code in [close::GOING_AWAY, close::RATE_LIMITED, close::OVERLOADED] {
            let a = p.on_closed(CloseInfo {
                code: Some(code),
                retry_ms: Some(7_000),
            });
            match a {
                Action::Reconnect { delay, .. } => {
                    // 7 s is above the 5 s cap: retry_ms wins anyway.
                    assert!(delay >= ms(7_000), "{code}: {delay:?}");
                }
                other => panic!("{code}: {other:?}"),
            }
        }
        // A small retry_ms only raises samples below it.
        let mut p = ReconnectPolicy::with_seed(backoff(), 3);
        for _ in 0..50 {
            p.on_connected();
            match p.on_closed(CloseInfo {
                code: Some(close::GOING_AWAY),
                retry_ms: Some(50),
            }) {
                Action::Reconnect { delay, .. } => {
                    assert!(delay >= ms(50) && delay <= ms(100), "{delay:?}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn never_reconnect_after_fatal_codes() {
        for code in [close::KICKED, close::PROTOCOL_ERROR, close::FRAME_TOO_LARGE] {
            let mut p = ReconnectPolicy::with_seed(backoff(), 9);
            let a = p.on_closed(CloseInfo {
                code: Some(code),
                retry_ms: Some(10),
            });
            assert_eq!(a, Action::Stop(StopReason::Fatal(code)));
            // Even a retry_ms does not change that, nor does it consume an attempt.
            assert_eq!(p.attempt(), 0);
        }
    }

    #[test]
    fn decision_per_close_code() {
        let table: &[(Option<u16>, CloseClass)] = &[
            (None, CloseClass::Retry),
            (Some(close::NORMAL), CloseClass::Retry),
            (Some(close::GOING_AWAY), CloseClass::Retry),
            (Some(close::PROTOCOL_ERROR), CloseClass::Fatal),
            (Some(close::UNAUTHORIZED), CloseClass::RefreshToken),
            (Some(close::HEARTBEAT_TIMEOUT), CloseClass::Retry),
            (Some(close::SLOW_CONSUMER), CloseClass::Retry),
            (Some(close::RATE_LIMITED), CloseClass::Retry),
            (Some(close::KICKED), CloseClass::Fatal),
            (Some(close::FRAME_TOO_LARGE), CloseClass::Fatal),
            (Some(close::OVERLOADED), CloseClass::Retry),
            (Some(close::TOKEN_EXPIRED), CloseClass::RefreshToken),
            (Some(1006), CloseClass::Retry),
            (Some(4999), CloseClass::Retry),
        ];
        for (code, class) in table {
            assert_eq!(classify(*code), *class, "{code:?}");
        }
        let mut p = ReconnectPolicy::with_seed(backoff(), 5);
        for code in [close::UNAUTHORIZED, close::TOKEN_EXPIRED] {
            match p.on_closed(CloseInfo {
                code: Some(code),
                retry_ms: None,
            }) {
                Action::Reconnect { refresh_token, .. } => assert!(refresh_token, "{code}"),
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn gives_up_after_max_attempts_and_welcome_resets() {
        let mut b = backoff();
        b.max_attempts = Some(3);
        let mut p = ReconnectPolicy::with_seed(b, 11);
        for i in 0..3 {
            assert!(
                matches!(p.on_closed(CloseInfo::default()), Action::Reconnect { attempt, .. } if attempt == i)
            );
        }
        assert_eq!(
            p.on_closed(CloseInfo::default()),
            Action::Stop(StopReason::GaveUp { attempts: 3 })
        );
        p.on_connected();
        assert!(matches!(
            p.on_closed(CloseInfo::default()),
            Action::Reconnect { attempt: 0, .. }
        ));
    }

    #[test]
    fn attempt_counter_drives_growth() {
        // Bounds used by successive decisions follow the schedule: with a
        // tiny cap check that delays after a reset are bounded by base again.
        let mut p = ReconnectPolicy::with_seed(backoff(), 13);
        for _ in 0..8 {
            let _ = p.on_closed(CloseInfo::default());
        }
        p.on_connected();
        for _ in 0..100 {
            p.on_connected();
            match p.on_closed(CloseInfo::default()) {
                Action::Reconnect { delay, attempt, .. } => {
                    assert_eq!(attempt, 0);
                    assert!(delay <= ms(100));
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
