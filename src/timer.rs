//! A hashed timer wheel: one per shard, driving heartbeats, idle and hello
//! timeouts for every connection the shard owns.
//!
//! An idle connection costs one 12-byte entry here and no timer object. The
//! wheel is lazy: an entry is a *check* at a deadline, not a promise that the
//! deadline still matters. When it fires, the shard looks at the connection's
//! last activity and either acts (ping, close) or schedules the next check.
//! So traffic never touches the wheel; only the checks do.

/// What a check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The connection must have said `hello` by now.
    Hello,
    /// Heartbeat: ping after silence, close after the idle timeout.
    Heartbeat,
    /// Drain: close this connection now (spread over the drain window).
    Drain,
    /// Token expiry: close with 4008 unless a refresh moved `exp` on.
    Expiry,
}

/// One scheduled check. `key` is the connection's slot in the shard's slab
/// and `conn` its serial number, so a check for a connection that has since
/// gone (and whose slot was reused) is recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Slab slot of the connection.
    pub key: u32,
    /// Low 32 bits of the connection's serial number.
    pub conn: u32,
    /// What to check.
    pub check: Check,
    deadline: u64,
}

/// The wheel. Time is in ticks of [`Wheel::tick_ms`]; a deadline further
/// out than one revolution stays in its slot and is skipped until its
/// revolution comes round (deadlines are compared in full, so no round
/// counter is needed).
pub struct Wheel {
    slots: Vec<Vec<Entry>>,
    tick_ms: u64,
    /// The next tick to process.
    next_tick: u64,
    len: usize,
}

impl Wheel {
    /// A wheel with `slots` slots (rounded up to a power of two) of `tick_ms`
    /// each, starting at time 0.
    pub fn new(slots: usize, tick_ms: u64) -> Self {
        let n = slots.max(1).next_power_of_two();
        Wheel {
            slots: (0..n).map(|_| Vec::new()).collect(),
            tick_ms: tick_ms.max(1),
            next_tick: 0,
            len: 0,
        }
    }

    /// Milliseconds per tick.
    pub fn tick_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Number of scheduled checks.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `check` for connection (`key`, `conn`) at `at_ms`. A deadline
    /// in the past fires on the next [`Wheel::advance`].
    pub fn schedule(&mut self, key: u32, conn: u32, check: Check, at_ms: u64) {
        // Round up, so a check never fires before its deadline.
        let tick = at_ms.div_ceil(self.tick_ms).max(self.next_tick);
        let mask = self.slots.len() as u64 - 1;
        self.slots[(tick & mask) as usize].push(Entry {
            key,
            conn,
            check,
            deadline: tick,
        });
        self.len += 1;
    }

    /// Moves time forward to `now_ms`, appending every check that is due to
    /// `due`. Work is proportional to the ticks passed and the entries in
    /// their slots, not to the number of connections.
    pub fn advance(&mut self, now_ms: u64, due: &mut Vec<Entry>) {
        let now_tick = now_ms / self.tick_ms;
        let mask = self.slots.len() as u64 - 1;
        // After a long stall, one revolution visits every slot once.
        let last = now_tick.min(self.next_tick + mask);
        while self.next_tick <= last {
            let slot = &mut self.slots[(self.next_tick & mask) as usize];
            let before = slot.len();
            slot.retain(|e| {
                if e.deadline <= now_tick {
                    due.push(*e);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
            // A slot that was once crowded (a connect burst) gives its memory back.
            if slot.is_empty() && slot.capacity() > 64 {
                *slot = Vec::new();
            }
            self.next_tick += 1;
        }
        self.next_tick = self.next_tick.max(now_tick + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fire(w: &mut Wheel, now: u64) -> Vec<u32> {
        let mut due = Vec::new();
        w.advance(now, &mut due);
        due.iter().map(|e| e.key).collect()
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = Wheel::new(8, 10);
        w.schedule(1, 1, Check::Heartbeat, 35);
        assert!(fire(&mut w, 30).is_empty());
        assert_eq!(fire(&mut w, 40), vec![1]);
        assert!(w.is_empty());
    }

    #[test]
    fn deadline_beyond_one_revolution_waits_for_its_round() {
        let mut w = Wheel::new(4, 10); // one revolution = 40 ms
        w.schedule(7, 7, Check::Hello, 125);
        for t in (0..120).step_by(10) {
            assert!(fire(&mut w, t).is_empty(), "fired early at {t}");
        }
        assert_eq!(fire(&mut w, 130), vec![7]);
    }

    #[test]
    fn past_deadline_fires_on_next_advance() {
        let mut w = Wheel::new(8, 10);
        assert!(fire(&mut w, 100).is_empty());
        w.schedule(3, 3, Check::Drain, 50);
        assert_eq!(fire(&mut w, 110), vec![3]);
    }

    #[test]
    fn long_stall_visits_every_slot() {
        let mut w = Wheel::new(8, 10);
        for k in 0..50u32 {
            w.schedule(k, k, Check::Heartbeat, u64::from(k) * 7);
        }
        let mut got = fire(&mut w, 10_000);
        got.sort_unstable();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        assert_eq!(w.len(), 0);
    }
}
