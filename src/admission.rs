//! Admission: whether a new socket may come in, decided by the listener
//! before the socket costs more than its descriptor.
//!
//! In order: the node's connection limit (it protects descriptors), then
//! the per-source-address connect rate, then the shard's accept budget
//! (they pace a storm). A refused socket is told why in a [`Refusal`] and
//! when to come back: the accept budget spreads a refused crowd over the
//! time it needs to get in, so a herd comes back about as fast as it can
//! be let in, not all at once.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;

use edgegate_proto::CloseCode;

use crate::metrics::ShardMetrics;
use crate::ratelimit::{Bucket, IpTable};
use crate::settings::ShardConfig;

/// Why a socket is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node holds `limits.max_connections` connections.
    ConnectionLimit,
    /// This source address connects faster than `limits.ip_connects_per_s`.
    IpRate,
    /// The shard's share of `limits.accept_per_s` is spent.
    AcceptRate,
}

impl Refusal {
    /// The close code the socket gets.
    pub fn code(self) -> CloseCode {
        match self {
            Refusal::ConnectionLimit | Refusal::AcceptRate => CloseCode::OVERLOADED,
            Refusal::IpRate => CloseCode::RATE_LIMITED,
        }
    }

    /// The reason in its `bye`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ConnectionLimit => "overloaded: connection limit",
            Refusal::IpRate => "rate limited: too many new connections from this address",
            Refusal::AcceptRate => "overloaded: accept rate",
        }
    }
}

/// One shard's admission state, shared by its accept loops.
pub struct Admission {
    accept_bucket: RefCell<Bucket>,
    ip_table: RefCell<IpTable>,
    /// Accept-budget refusals: (start of the current 1 s window, refusals
    /// in it, refusals in the previous one); sizes the retry spread.
    herd: Cell<(u64, u64, u64)>,
}

impl Admission {
    /// Full budgets at time 0.
    pub fn new(cfg: &ShardConfig) -> Self {
        Admission {
            accept_bucket: RefCell::new(Bucket::full(&cfg.accept, 0)),
            ip_table: RefCell::new(IpTable::new(cfg.ip_connects, cfg.ip_table_size)),
            herd: Cell::new((0, 0, 0)),
        }
    }

    /// Admits a socket from `ip` at `now` (shard clock ms), past the
    /// connection limit already checked: per-address rate first, then the
    /// accept budget.
    pub fn admit(
        &self,
        cfg: &ShardConfig,
        metrics: &ShardMetrics,
        ip: IpAddr,
        now: u64,
    ) -> Result<(), Refusal> {
        if !self.ip_table.borrow_mut().admit(ip, now) {
            ShardMetrics::add(&metrics.refused_ip_rate, 1);
            return Err(Refusal::IpRate);
        }
        if !self
            .accept_bucket
            .borrow_mut()
            .try_take(&cfg.accept, 1, now)
        {
            let (start, cur, prev) = self.herd.get();
            self.herd.set(if now.saturating_sub(start) >= 1000 {
                // A window with no refusals in between resets the estimate.
                let prev = if now - start >= 2000 { 0 } else { cur };
                (now, 1, prev)
            } else {
                (start, cur + 1, prev)
            });
            ShardMetrics::add(&metrics.refused_accept_rate, 1);
            return Err(Refusal::AcceptRate);
        }
        Ok(())
    }

    /// `retry_ms` for a socket refused with `r`: for the accept budget,
    /// jittered over the time this shard needs to admit the crowd it is
    /// refusing (at least `limits.retry_ms`); otherwise jittered around
    /// `limits.retry_ms`.
    pub fn retry_ms(&self, cfg: &ShardConfig, r: Refusal) -> u64 {
        if r != Refusal::AcceptRate {
            return cfg.jittered_retry_ms();
        }
        let (_, cur, prev) = self.herd.get();
        let crowd = cur.max(prev);
        let per_s = cfg.accept.per_s.max(1);
        let spread = cfg.retry_ms.max(crowd.saturating_mul(1000) / per_s);
        cfg.retry_ms / 2 + fastrand::u64(0..spread.max(1))
    }
}
