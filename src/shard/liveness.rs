//! Liveness: the shard's timer wheel and its drain.
//!
//! The wheel only keeps time: one lazy check per connection (hello,
//! heartbeat, token expiry, drain). What a due check means is the
//! session's to decide ([`crate::session::Input::Check`]); this module
//! arms checks, hands due ones out, and spreads a drain's closes over its
//! window.

use std::cell::{Cell, RefCell};

use crate::timer::{Check, Entry, Wheel};

/// Wheel resolution: timeouts fire at most this late.
pub const TICK_MS: u64 = 50;

/// The shard's checks and drain state.
pub struct Liveness {
    wheel: RefCell<Wheel>,
    draining: Cell<bool>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            wheel: RefCell::new(Wheel::new(4096, TICK_MS)),
            draining: Cell::new(false),
        }
    }
}

impl Liveness {
    /// Arms `check` for connection (`key`, `serial`) at `at_ms`.
    pub fn arm(&self, key: u32, serial: u64, check: Check, at_ms: u64) {
        self.wheel
            .borrow_mut()
            .schedule(key, serial as u32, check, at_ms);
    }

    /// Moves the checks due by `now_ms` into `due`.
    pub fn advance(&self, now_ms: u64, due: &mut Vec<Entry>) {
        self.wheel.borrow_mut().advance(now_ms, due);
    }

    /// True once the drain began.
    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Begins the drain: each of `conns` (slot, serial) gets a drain check
    /// at a random moment in the window, so clients come back in a
    /// trickle, not a wave.
    pub fn begin_drain(&self, conns: impl Iterator<Item = (u32, u64)>, now: u64, window_ms: u64) {
        self.draining.set(true);
        let mut wheel = self.wheel.borrow_mut();
        for (key, serial) in conns {
            let at = if window_ms == 0 {
                now
            } else {
                now + fastrand::u64(0..window_ms)
            };
            wheel.schedule(key, serial as u32, Check::Drain, at);
        }
    }
}
