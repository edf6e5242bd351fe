//! The embedded backbone's history: each `room:`/`user:` channel's stream,
//! kept by the channel's owner shard (docs/protocol.md, "Positions, history
//! and recovery").
//!
//! The owner already puts a channel's messages in one order; here it stamps
//! each one with the next `seq` (contiguous: 1, 2, 3, …), keeps the recent
//! ones in a ring per channel, and answers positions and recoveries. Bounds:
//! messages per channel, age, and the shard's byte budget — one FIFO of
//! everything stored, in the order it was stored, so the shard's oldest
//! messages leave first when the budget is spent, in O(1) per message.
//! A channel's record that is evicted (or lost with the process) comes back
//! with a new generation, so its **epoch** changes: a client never mistakes
//! a new stream for the old one. Epoch = the process's random prefix and
//! the channel's generation.
//!
//! **A channel nobody wrote to has no record.** Every `welcome` carries the
//! position of the user's own stream and every `sub` the room's, so a
//! record per asked channel would cost every idle connection a record at
//! its owner. Instead, a channel without a record is at the store's *base*
//! epoch, position 0, and its first record takes that same epoch — unless
//! the channel had a record before that was evicted: then positions taken
//! from the old record must not be mistaken for the new one, so the new
//! record gets an epoch of its own generation. Evicted names are remembered
//! in a fixed-size Bloom filter (a false positive only gives a new epoch
//! where the base one would have done: an honest `epoch_changed`); when it
//! fills up, the base epoch moves on and the filter starts empty.
//!
//! Publish deduplication: a publish that names a key (`user:instance:id`)
//! already stored on the channel within the window is not stored again;
//! its answer is the original `seq`, marked duplicate. A key is kept with
//! its message (it leaves when the message does) and counts only within
//! the window; the keys are one shard-wide table, not one per channel: most
//! channels of a chat get a message now and then, and a table per channel
//! would cost each of them more than its message.
//!
//! **The budget counts what the memory holds.** Every heap block is
//! charged at the allocator's size for it ([`block`]), and the tables
//! (channel records, keys, the FIFO, the rings) at their capacity, not
//! their length, so that `history.shard_bytes` bounds the history's real
//! memory (docs/architecture.md, "Memory of the history"; measured with
//! the harness's `fill` scenario, docs/benchmarks.md).
//!
//! Sans-IO: time comes in as arguments; unit tests below.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use edgegate_proto::Envelope;

use crate::config::History as HistoryConfig;

/// The header of an `Rc`/`Arc` allocation (two counts).
const RC_HEADER: usize = 16;

/// The bytes the allocator hands out for a request of `n`: mimalloc's size
/// classes, 8-byte steps up to 64, then four classes per doubling. (With
/// the system allocator the figure is close: glibc rounds to 16 and adds
/// 8.)
pub fn block(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    if n <= 64 {
        return n.div_ceil(8) * 8;
    }
    // Four classes between 2^k and 2^(k+1): steps of 2^(k-2).
    let k = usize::BITS - 1 - n.leading_zeros();
    let step = 1usize << (k - 2);
    n.div_ceil(step) * step
}

/// The bytes of a hash table that can hold `cap` entries of `slot` bytes
/// (hashbrown: a power of two of buckets, 7/8 of them usable, one control
/// byte each plus a group's worth).
fn table(cap: usize, slot: usize) -> usize {
    if cap == 0 {
        return 0;
    }
    let buckets = if cap < 8 {
        (cap + 1).next_power_of_two()
    } else {
        (cap * 8 / 7).next_power_of_two()
    };
    block(buckets * slot + buckets + 16)
}

/// The bytes of a ring (`VecDeque`) of `cap` elements of `T`.
fn ring<T>(cap: usize) -> usize {
    block(cap * std::mem::size_of::<T>())
}

/// A position in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The stream's epoch (empty where the backbone keeps no history).
    pub epoch: Arc<str>,
    /// The latest `seq` (0: empty).
    pub top: u64,
}

/// A client's `since`: every message after `seq`, in `epoch` (`None`: the
/// current one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// The last `seq` the client has.
    pub seq: u64,
    /// The epoch it had it in.
    pub epoch: Option<String>,
}

/// Why a recovery cannot be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecovered {
    /// The stream is not the one the client knew.
    EpochChanged,
    /// Some missed messages are no longer kept; `oldest` is the oldest kept
    /// (top + 1 when none is).
    Expired {
        /// Oldest `seq` still kept.
        oldest: u64,
    },
    /// More missed messages than the recovery limit.
    TooMany,
    /// History is off or cannot be reached.
    Unavailable,
}

impl Recovery {
    /// The answer where no history is kept: position unknown, nothing
    /// recoverable.
    pub fn unavailable(since: Option<&Since>) -> Recovery {
        Recovery {
            pos: Position {
                epoch: Arc::from(""),
                top: 0,
            },
            replay: match since {
                Some(_) => Err(Unrecovered::Unavailable),
                None => Ok(Vec::new()),
            },
            contiguous: true,
            present: None,
        }
    }
}

impl Unrecovered {
    /// The `reason` word of docs/protocol.md.
    pub fn reason(self) -> &'static str {
        match self {
            Unrecovered::EpochChanged => "epoch_changed",
            Unrecovered::Expired { .. } => "expired",
            Unrecovered::TooMany => "too_many",
            Unrecovered::Unavailable => "unavailable",
        }
    }
}

/// The answer to a position or recovery request.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Where the stream is now.
    pub pos: Position,
    /// With `since`: the missed messages in order, or why not. Without: an
    /// empty replay.
    pub replay: Result<Vec<Arc<Envelope>>, Unrecovered>,
    /// The stream's `seq`s are contiguous (1, 2, 3, … : the embedded
    /// store), so a live message that skips one is a gap the session sees.
    /// JetStream's are stream-wide: its backbone fills gaps before it
    /// delivers (or reports them), and the session only drops what the
    /// replay already holds.
    pub contiguous: bool,
    /// Users present in the channel, when the request asked (a `sub` with
    /// `meta.presence`); counted after this shard's own change.
    pub present: Option<u64>,
}

/// Where a publish was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its `seq`.
    pub seq: u64,
    /// The epoch of its channel's stream (the server API answers it).
    pub epoch: Arc<str>,
    /// It was a retry of one stored before (not stored or delivered again).
    pub duplicate: bool,
}

struct Entry {
    seq: u64,
    at_ms: u64,
    bytes: usize,
    env: Arc<Envelope>,
    /// The publish key it was stored under.
    key: Option<Rc<str>>,
}

struct Channel {
    generation: u64,
    epoch: Arc<str>,
    top: u64,
    ring: VecDeque<Entry>,
}

/// A publish key stored within the window: where its message went.
struct Key {
    /// The channel (its record's name) and the record's generation: a
    /// retry to another channel, or to a record made since, is not this
    /// publish.
    ch: Rc<str>,
    generation: u64,
    seq: u64,
    at_ms: u64,
}

/// What the shard-wide FIFO remembers, in storing order: a message of a
/// channel (its record's generation and its seq), or, with seq 0 (no
/// message has it), that a channel record was made. A struct rather than an
/// enum of the two: 32 bytes, not 40, in a queue of one per message.
struct Item {
    ch: Rc<str>,
    generation: u64,
    seq: u64,
}

impl Item {
    fn record(ch: Rc<str>, generation: u64) -> Item {
        Item {
            ch,
            generation,
            seq: 0,
        }
    }
}

/// One shard's history of the channels it owns.
pub struct HistoryStore {
    cfg: HistoryConfig,
    prefix: Rc<str>,
    channels: HashMap<Rc<str>, Channel>,
    /// The publish keys of the messages held, shard-wide.
    keys: HashMap<Rc<str>, Key>,
    fifo: VecDeque<Item>,
    /// The heap blocks held (names, epochs, messages, rings, keys), at the
    /// allocator's sizes; the tables are added by [`HistoryStore::bytes`].
    bytes: usize,
    generation: u64,
    /// Messages evicted for the byte budget (not for count or age).
    evicted: u64,
    /// The epoch of channels with no record, and of the first record of a
    /// channel not evicted since it moved on.
    base: Arc<str>,
    /// Names of evicted records since `base` moved on.
    gone: Evicted,
    /// Times `base` moved on.
    rounds: u64,
}

/// A Bloom filter of evicted channel names: 2²⁰ bits (128 KiB, made on the
/// first eviction), three probes; after 2¹⁷ names (about 3 % false
/// positives) the store's base epoch moves on and it starts empty.
#[derive(Default)]
struct Evicted {
    bits: Vec<u64>,
    names: usize,
}

impl Evicted {
    const BITS: usize = 1 << 20;
    const CAPACITY: usize = Self::BITS / 8;

    fn probes(name: &str) -> [usize; 3] {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        name.hash(&mut h);
        let x = h.finish();
        // Three probes from one hash (Kirsch–Mitzenmacher).
        let (a, b) = (x as u32 as usize, (x >> 32) as usize | 1);
        [0, 1, 2].map(|i| a.wrapping_add(i * b) % Self::BITS)
    }

    fn contains(&self, name: &str) -> bool {
        !self.bits.is_empty()
            && Self::probes(name)
                .iter()
                .all(|&p| self.bits[p / 64] & (1 << (p % 64)) != 0)
    }

    /// Remembers `name`; false when the filter is full (the caller moves
    /// the base epoch on and starts a new one).
    fn insert(&mut self, name: &str) -> bool {
        if self.names >= Self::CAPACITY {
            return false;
        }
        if self.bits.is_empty() {
            self.bits = vec![0; Self::BITS / 64];
        }
        for p in Self::probes(name) {
            self.bits[p / 64] |= 1 << (p % 64);
        }
        self.names += 1;
        true
    }
}

/// A page of a channel's history (docs/protocol.md, "History pages").
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// The stream's epoch (empty: no history).
    pub epoch: Arc<str>,
    /// Its latest `seq`.
    pub top: u64,
    /// The messages, oldest first.
    pub messages: Vec<Arc<Envelope>>,
    /// Older messages are still kept.
    pub more: bool,
    /// History is off or cannot be read: the `reply` says `unavailable`.
    pub unavailable: bool,
}

impl Page {
    /// The answer where no history is kept.
    pub fn unavailable() -> Page {
        Page {
            epoch: Arc::from(""),
            unavailable: true,
            ..Page::default()
        }
    }
}

/// Removes the publish key of `e` (a message of a record of `generation`
/// leaving history), unless the key was stored again since.
fn forget_key(keys: &mut HashMap<Rc<str>, Key>, e: Entry, generation: u64) {
    if let Some(k) = e.key
        && keys
            .get(&k)
            .is_some_and(|x| x.seq == e.seq && x.generation == generation)
    {
        keys.remove(&k);
    }
}

/// A stored message's heap blocks: the shared envelope and its strings.
fn size_of(env: &Envelope) -> usize {
    let s = |o: &Option<String>| o.as_ref().map_or(0, |s| block(s.len()));
    block(RC_HEADER + std::mem::size_of::<Envelope>())
        + block(env.payload.bytes().len())
        + s(&env.ch)
        + s(&env.from)
        + s(&env.meta)
        + s(&env.reason)
}

/// A record's own heap blocks: its name, and its epoch when it is not the
/// shared base.
fn record_size(name: &str, epoch: Option<&str>) -> usize {
    block(RC_HEADER + name.len()) + epoch.map_or(0, |e| block(RC_HEADER + e.len()))
}

impl HistoryStore {
    /// An empty store; `prefix` is this process's random epoch prefix.
    pub fn new(cfg: HistoryConfig, prefix: &str) -> Self {
        HistoryStore {
            cfg,
            prefix: Rc::from(prefix),
            channels: HashMap::new(),
            keys: HashMap::new(),
            fifo: VecDeque::new(),
            bytes: 0,
            generation: 0,
            evicted: 0,
            base: Arc::from(format!("{prefix}-b0")),
            gone: Evicted::default(),
            rounds: 0,
        }
    }

    /// The epoch a channel with no record is at: the base, unless its
    /// record was evicted (then `None`: it needs a record of its own).
    fn absent_epoch(&self, ch: &str) -> Option<Arc<str>> {
        (!self.gone.contains(ch)).then(|| self.base.clone())
    }

    /// Whether `epoch` is a record's own (`<prefix>-<generation>`), not a
    /// base epoch (`<prefix>-b<round>`) shared by many records.
    fn own_epoch(&self, epoch: &str) -> bool {
        !epoch
            .get(self.prefix.len() + 1..)
            .is_some_and(|rest| rest.starts_with('b'))
    }

    /// Remembers that `ch`'s record was evicted.
    fn evict_name(&mut self, ch: &str) {
        if !self.gone.insert(ch) {
            // Full: every name evicted so far gets a new epoch anyway once
            // the base moves on, so the filter can start empty.
            self.rounds += 1;
            self.base = Arc::from(format!("{}-b{}", self.prefix, self.rounds));
            self.gone = Evicted::default();
            self.gone.insert(ch);
        }
    }

    /// Bytes held: the heap blocks and the tables that index them.
    pub fn bytes(&self) -> usize {
        self.bytes + self.tables()
    }

    /// The tables at their capacity (they grow, and do not shrink).
    fn tables(&self) -> usize {
        use std::mem::size_of;
        table(self.channels.capacity(), size_of::<(Rc<str>, Channel)>())
            + table(self.keys.capacity(), size_of::<(Rc<str>, Key)>())
            + ring::<Item>(self.fifo.capacity())
    }

    /// Channel records held.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    /// Messages evicted so far for the byte budget, before their count or
    /// age limit: the history holds less than its configuration promises.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn channel(&mut self, ch: &str) -> &mut Channel {
        if !self.channels.contains_key(ch) {
            self.generation += 1;
            let name: Rc<str> = Rc::from(ch);
            let (epoch, own) = match self.absent_epoch(ch) {
                Some(base) => (base, false),
                None => (
                    Arc::from(format!("{}-{}", self.prefix, self.generation)),
                    true,
                ),
            };
            self.bytes += record_size(ch, own.then_some(&*epoch));
            self.channels.insert(
                name.clone(),
                Channel {
                    generation: self.generation,
                    epoch,
                    top: 0,
                    ring: VecDeque::new(),
                },
            );
            self.fifo.push_back(Item::record(name, self.generation));
        }
        // Just inserted or already there.
        match self.channels.get_mut(ch) {
            Some(c) => c,
            None => unreachable!("the channel record was just made"),
        }
    }

    /// Drops what is older than the age bound from `ch`'s ring.
    fn trim(&mut self, ch: &str, now_ms: u64) {
        let max_age = self.cfg.max_age_ms;
        let Some(c) = self.channels.get_mut(ch) else {
            return;
        };
        while c
            .ring
            .front()
            .is_some_and(|e| now_ms.saturating_sub(e.at_ms) >= max_age)
        {
            if let Some(e) = c.ring.pop_front() {
                self.bytes -= e.bytes;
                forget_key(&mut self.keys, e, c.generation);
            }
        }
    }

    /// Drops up to `n` items at the front of the FIFO that nothing needs
    /// any more (messages already gone by count or age, records evicted),
    /// so that it stays about as long as what it orders.
    fn pop_stale(&mut self, n: usize) {
        for _ in 0..n {
            let Some(i) = self.fifo.front() else {
                return;
            };
            // A message already gone, or any item of a record evicted.
            let stale = self.channels.get(&i.ch).is_none_or(|c| {
                c.generation != i.generation
                    || (i.seq != 0 && c.ring.front().is_none_or(|e| e.seq > i.seq))
            });
            match (stale, i.seq) {
                (true, _) => {
                    self.fifo.pop_front();
                }
                // A live record holding messages: its turn comes again
                // later (as in the budget's loop), so that it does not keep
                // what is behind it. An empty one is the next to go when
                // the budget is spent: it stays first.
                (false, 0) if self.channels.get(&i.ch).is_some_and(|c| !c.ring.is_empty()) => {
                    if let Some(r) = self.fifo.pop_front() {
                        self.fifo.push_back(r);
                    }
                }
                (false, _) => return,
            }
        }
    }

    /// Stores `env` on its channel `ch` at `now_ms`, stamping its `seq`,
    /// and returns it shared (the same allocation goes to every
    /// subscriber); with `key`, a retry of a publish stored within the
    /// window is not stored again (`duplicate`, and no message).
    pub fn append(
        &mut self,
        ch: &str,
        mut env: Envelope,
        key: Option<&str>,
        now_ms: u64,
    ) -> (Stored, Option<Arc<Envelope>>) {
        self.trim(ch, now_ms);
        let max_messages = self.cfg.max_messages;
        let c = self.channel(ch);
        let generation = c.generation;
        let window = self.cfg.dedupe_window_ms;
        if let Some(k) = key
            && let Some(seq) = self
                .keys
                .get(k)
                .filter(|k| *k.ch == *ch && k.generation == generation)
                .filter(|k| now_ms.saturating_sub(k.at_ms) < window)
                .map(|k| k.seq)
        {
            let dup = Stored {
                seq,
                epoch: self.channel(ch).epoch.clone(),
                duplicate: true,
            };
            return (dup, None);
        }
        // The record exists (made above): the fields are borrowed apart so
        // that the keys can be updated while its ring is.
        let Some(c) = self.channels.get_mut(ch) else {
            unreachable!("the channel record was just made")
        };
        c.top += 1;
        let seq = c.top;
        let epoch = c.epoch.clone();
        env.seq = Some(seq);
        let key: Option<Rc<str>> = key.map(Rc::from);
        let bytes = size_of(&env) + key.as_ref().map_or(0, |k| block(RC_HEADER + k.len()));
        let env = Arc::new(env);
        let cap = c.ring.capacity();
        if cap == 0 {
            // Most rooms of a chat hold a few messages: no room for four
            // before the first.
            c.ring.reserve_exact(1);
        }
        c.ring.push_back(Entry {
            seq,
            at_ms: now_ms,
            bytes,
            env: env.clone(),
            key: key.clone(),
        });
        let mut freed = ring::<Entry>(cap);
        let added = bytes + ring::<Entry>(c.ring.capacity());
        while c.ring.len() > max_messages {
            if let Some(e) = c.ring.pop_front() {
                freed += e.bytes;
                forget_key(&mut self.keys, e, generation);
            }
        }
        let name = match self.channels.get_key_value(ch) {
            Some((n, _)) => n.clone(),
            None => Rc::from(ch),
        };
        if let Some(k) = key {
            self.keys.insert(
                k,
                Key {
                    ch: name.clone(),
                    generation,
                    seq,
                    at_ms: now_ms,
                },
            );
        }
        self.bytes = self.bytes + added - freed;
        self.pop_stale(3);
        self.fifo.push_back(Item {
            ch: name,
            generation,
            seq,
        });
        self.enforce_budget();
        let stored = Stored {
            seq,
            epoch,
            duplicate: false,
        };
        (stored, Some(env))
    }

    /// Frees the shard's oldest items until the byte budget holds.
    fn enforce_budget(&mut self) {
        let mut rounds = self.fifo.len();
        while self.bytes() > self.cfg.shard_bytes && rounds > 0 {
            rounds -= 1;
            let Some(item) = self.fifo.pop_front() else {
                break;
            };
            let Item {
                ch,
                generation,
                seq,
            } = item;
            match seq {
                1.. => {
                    if let Some(c) = self.channels.get_mut(&ch)
                        && c.generation == generation
                        && c.ring.front().is_some_and(|e| e.seq <= seq)
                    {
                        while c.ring.front().is_some_and(|e| e.seq <= seq) {
                            if let Some(e) = c.ring.pop_front() {
                                self.bytes -= e.bytes;
                                self.evicted += 1;
                                forget_key(&mut self.keys, e, generation);
                            }
                        }
                    }
                }
                0 => {
                    let live = self
                        .channels
                        .get(&ch)
                        .filter(|c| c.generation == generation);
                    match live {
                        // An empty record goes: the channel comes back with a
                        // new generation (a new epoch) if it is used again.
                        Some(c) if c.ring.is_empty() => {
                            let own = self.own_epoch(&c.epoch).then_some(&*c.epoch);
                            self.bytes -= record_size(&ch, own) + ring::<Entry>(c.ring.capacity());
                            self.channels.remove(&ch);
                            self.evict_name(&ch);
                        }
                        // Still holding messages: its turn comes again later.
                        Some(_) => self.fifo.push_back(Item::record(ch, generation)),
                        None => {}
                    }
                }
            }
        }
        self.shrink();
    }

    /// Gives back the tables' room when three quarters of it is unused (a
    /// table grows by doubling, and the budget then frees entries to pay
    /// for it: without this, a table could hold the budget all by itself).
    fn shrink(&mut self) {
        fn sparse(len: usize, cap: usize) -> bool {
            cap > 64 && len * 4 < cap
        }
        if sparse(self.channels.len(), self.channels.capacity()) {
            self.channels.shrink_to(self.channels.len() * 2);
        }
        if sparse(self.keys.len(), self.keys.capacity()) {
            self.keys.shrink_to(self.keys.len() * 2);
        }
        if sparse(self.fifo.len(), self.fifo.capacity()) {
            self.fifo.shrink_to(self.fifo.len() * 2);
        }
    }

    /// The position of `ch`, and with `since` the messages after it.
    pub fn recover(&mut self, ch: &str, since: Option<&Since>, now_ms: u64) -> Recovery {
        if !self.channels.contains_key(ch)
            && let Some(epoch) = self.absent_epoch(ch)
        {
            // Nothing was ever stored here since the base epoch began.
            let replay = match since {
                Some(s) if s.epoch.as_deref().is_some_and(|e| *e != *epoch) => {
                    Err(Unrecovered::EpochChanged)
                }
                Some(s) if s.seq > 0 => Err(Unrecovered::EpochChanged),
                _ => Ok(Vec::new()),
            };
            return Recovery {
                pos: Position { epoch, top: 0 },
                replay,
                contiguous: true,
                present: None,
            };
        }
        self.trim(ch, now_ms);
        let limit = self.cfg.recovery_limit;
        let c = self.channel(ch);
        let pos = Position {
            epoch: c.epoch.clone(),
            top: c.top,
        };
        let replay = match since {
            None => Ok(Vec::new()),
            Some(s) if s.epoch.as_deref().is_some_and(|e| e != &*c.epoch) => {
                Err(Unrecovered::EpochChanged)
            }
            // A position ahead of the stream: not this stream.
            Some(s) if s.seq > c.top => Err(Unrecovered::EpochChanged),
            Some(s) if s.seq == c.top => Ok(Vec::new()),
            Some(s) => {
                let oldest = c.ring.front().map_or(c.top + 1, |e| e.seq);
                if s.seq + 1 < oldest {
                    Err(Unrecovered::Expired { oldest })
                } else if (c.top - s.seq) as usize > limit {
                    Err(Unrecovered::TooMany)
                } else {
                    Ok(c.ring
                        .iter()
                        .filter(|e| e.seq > s.seq)
                        .map(|e| e.env.clone())
                        .collect())
                }
            }
        };
        self.enforce_budget();
        Recovery {
            pos,
            replay,
            contiguous: true,
            present: None,
        }
    }
}

impl HistoryStore {
    /// The newest `limit` messages of `ch` with `seq < before` (all when
    /// `None`), oldest first, and whether older ones are kept.
    pub fn page(&mut self, ch: &str, limit: usize, before: Option<u64>, now_ms: u64) -> Page {
        if !self.channels.contains_key(ch)
            && let Some(epoch) = self.absent_epoch(ch)
        {
            return Page {
                epoch,
                ..Page::default()
            };
        }
        self.trim(ch, now_ms);
        let before = before.unwrap_or(u64::MAX);
        let c = self.channel(ch);
        // The ring is in seq order: the messages before `before` are a prefix.
        let end = c.ring.partition_point(|e| e.seq < before);
        let start = end.saturating_sub(limit);
        let page = Page {
            epoch: c.epoch.clone(),
            top: c.top,
            messages: c.ring.range(start..end).map(|e| e.env.clone()).collect(),
            more: start > 0,
            unavailable: false,
        };
        self.enforce_budget();
        page
    }
}

#[cfg(test)]
mod tests {
    use edgegate_proto::{Payload, Type};

    use super::*;

    fn cfg() -> HistoryConfig {
        HistoryConfig {
            max_messages: 5,
            max_age_ms: 10_000,
            recovery_limit: 3,
            ..HistoryConfig::default()
        }
    }

    fn msg(text: &str) -> Envelope {
        let mut e = Envelope::new(Type::Msg);
        e.ch = Some("room:a".into());
        e.payload = Payload::Json(bytes::Bytes::copy_from_slice(text.as_bytes()));
        e
    }

    fn seqs(r: &Recovery) -> Vec<u64> {
        match &r.replay {
            Ok(v) => v.iter().filter_map(|e| e.seq).collect(),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn seq_is_contiguous_and_replay_is_exact() {
        let mut h = HistoryStore::new(cfg(), "p");
        for i in 1..=4 {
            let (stored, e) = h.append("room:a", msg("1"), None, 0);
            assert_eq!(stored.seq, i);
            assert_eq!(e.and_then(|e| e.seq), Some(i));
        }
        let r = h.recover("room:a", None, 0);
        assert_eq!(r.pos.top, 4);
        let epoch = r.pos.epoch.to_string();
        let since = Since {
            seq: 2,
            epoch: Some(epoch.clone()),
        };
        assert_eq!(seqs(&h.recover("room:a", Some(&since), 0)), vec![3, 4]);
        let at_top = Since {
            seq: 4,
            epoch: None,
        };
        assert!(seqs(&h.recover("room:a", Some(&at_top), 0)).is_empty());
    }

    #[test]
    fn refusals_are_typed() {
        let mut h = HistoryStore::new(cfg(), "p");
        for _ in 0..8 {
            h.append("room:a", msg("1"), None, 0);
        }
        // Ring of 5: seq 4..=8 kept.
        let r = h.recover(
            "room:a",
            Some(&Since {
                seq: 1,
                epoch: None,
            }),
            0,
        );
        assert_eq!(r.replay.err(), Some(Unrecovered::Expired { oldest: 4 }));
        let r = h.recover(
            "room:a",
            Some(&Since {
                seq: 4,
                epoch: None,
            }),
            0,
        );
        assert_eq!(
            r.replay.err(),
            Some(Unrecovered::TooMany),
            "4 missed, limit 3"
        );
        let r = h.recover(
            "room:a",
            Some(&Since {
                seq: 5,
                epoch: Some("other".into()),
            }),
            0,
        );
        assert_eq!(r.replay.err(), Some(Unrecovered::EpochChanged));
        let r = h.recover(
            "room:a",
            Some(&Since {
                seq: 99,
                epoch: None,
            }),
            0,
        );
        assert_eq!(
            r.replay.err(),
            Some(Unrecovered::EpochChanged),
            "ahead of the stream"
        );
    }

    #[test]
    fn age_expires_messages_but_keeps_the_epoch() {
        let mut h = HistoryStore::new(cfg(), "p");
        h.append("room:a", msg("1"), None, 0);
        h.append("room:a", msg("1"), None, 5_000);
        let e0 = h.recover("room:a", None, 5_000).pos.epoch;
        let r = h.recover(
            "room:a",
            Some(&Since {
                seq: 0,
                epoch: None,
            }),
            12_000,
        );
        assert_eq!(r.replay.err(), Some(Unrecovered::Expired { oldest: 2 }));
        assert_eq!(r.pos.epoch, e0);
        let r = h.recover(
            "room:a",
            Some(&Since {
                seq: 1,
                epoch: None,
            }),
            12_000,
        );
        assert_eq!(seqs(&r), vec![2]);
        assert_eq!(h.evicted(), 0, "age and count limits are not evictions");
    }

    #[test]
    fn duplicates_get_the_original_seq_within_the_window() {
        let mut h = HistoryStore::new(cfg(), "p");
        let (a, _) = h.append("room:a", msg("1"), Some("u:i:1"), 0);
        let (b, none) = h.append("room:a", msg("1"), Some("u:i:1"), 1_000);
        assert!(none.is_none(), "a duplicate is not delivered again");
        assert_eq!(
            b,
            Stored {
                seq: a.seq,
                epoch: a.epoch.clone(),
                duplicate: true
            }
        );
        let (c, _) = h.append("room:a", msg("1"), Some("u:j:1"), 1_000);
        assert_eq!(
            c,
            Stored {
                seq: 2,
                epoch: c.epoch.clone(),
                duplicate: false
            },
            "another instance"
        );
        // Past the window the key is forgotten.
        let (d, _) = h.append("room:a", msg("1"), Some("u:i:1"), 200_000);
        assert!(!d.duplicate);
    }

    #[test]
    fn byte_budget_frees_the_oldest_first_and_evicted_channels_change_epoch() {
        let mut h = HistoryStore::new(
            HistoryConfig {
                shard_bytes: 64 << 10,
                max_messages: 10_000,
                ..cfg()
            },
            "p",
        );
        let big = "x".repeat(1000);
        let e_old = h.recover("room:old", None, 0).pos.epoch;
        h.append("room:old", msg(&big), None, 0);
        for _ in 0..200 {
            h.append("room:new", msg(&big), None, 1);
        }
        assert!(h.bytes() <= 64 << 10, "{}", h.bytes());
        // room:old lost its message, then its record: a new epoch.
        let r = h.recover(
            "room:old",
            Some(&Since {
                seq: 0,
                epoch: Some(e_old.to_string()),
            }),
            2,
        );
        assert_eq!(r.replay.err(), Some(Unrecovered::EpochChanged));
        // room:new keeps its newest messages and its epoch.
        let top = h.recover("room:new", None, 2).pos.top;
        assert_eq!(top, 200);
        let r = h.recover(
            "room:new",
            Some(&Since {
                seq: 197,
                epoch: None,
            }),
            2,
        );
        assert_eq!(seqs(&r), vec![198, 199, 200]);
        // At most 64 of the 201 messages of 1 KB fit: the rest was evicted.
        assert!((137..=201).contains(&h.evicted()), "{}", h.evicted());
    }

    #[test]
    fn asking_a_position_makes_no_record_and_the_first_record_keeps_its_epoch() {
        let mut h = HistoryStore::new(cfg(), "p");
        let r = h.recover("user:alice", None, 0);
        assert_eq!(
            (r.pos.top, h.channels()),
            (0, 0),
            "no record for a question"
        );
        let since = Since {
            seq: 0,
            epoch: Some(r.pos.epoch.to_string()),
        };
        assert!(seqs(&h.recover("user:alice", Some(&since), 0)).is_empty());
        assert_eq!(h.channels(), 0);
        h.append("user:alice", msg("1"), None, 0);
        h.append("user:alice", msg("2"), None, 0);
        let r = h.recover("user:alice", Some(&since), 0);
        assert_eq!(
            seqs(&r),
            vec![1, 2],
            "the position from before the record holds"
        );
        assert_eq!(
            r.pos.epoch.to_string(),
            since.epoch.clone().unwrap_or_default()
        );
        let ahead = Since {
            seq: 3,
            epoch: None,
        };
        assert_eq!(
            h.recover("user:bob", Some(&ahead), 0).replay.err(),
            Some(Unrecovered::EpochChanged)
        );
    }

    #[test]
    fn an_evicted_channel_comes_back_with_an_epoch_of_its_own() {
        let mut h = HistoryStore::new(
            HistoryConfig {
                shard_bytes: 64 << 10,
                max_messages: 10_000,
                ..cfg()
            },
            "p",
        );
        let base = h.recover("room:old", None, 0).pos.epoch;
        h.append("room:old", msg("1"), None, 0);
        let big = "x".repeat(1000);
        for _ in 0..200 {
            h.append("room:new", msg(&big), None, 1);
        }
        // room:old was evicted: positions from its record, or from before
        // it, no longer recover; it has a record and an epoch of its own.
        let r = h.recover("room:old", None, 2);
        assert_ne!(r.pos.epoch, base);
        assert_eq!(r.pos.top, 0);
        let from_before = Since {
            seq: 0,
            epoch: Some(base.to_string()),
        };
        assert_eq!(
            h.recover("room:old", Some(&from_before), 2).replay.err(),
            Some(Unrecovered::EpochChanged)
        );
        // A channel never used is still at the base.
        assert_eq!(h.recover("room:other", None, 2).pos.epoch, base);
    }

    #[test]
    fn a_full_filter_moves_the_base_on() {
        let mut h = HistoryStore::new(cfg(), "p");
        let base = h.recover("room:x", None, 0).pos.epoch;
        for i in 0..Evicted::CAPACITY {
            h.evict_name(&format!("room:{i}"));
        }
        assert_eq!(h.recover("room:x", None, 0).pos.epoch, base);
        h.evict_name("room:one-more");
        assert_ne!(h.recover("room:x", None, 0).pos.epoch, base);
        assert!(!h.gone.contains("room:0"));
        assert!(h.gone.contains("room:one-more"));
    }

    #[test]
    fn pages_are_the_newest_before_a_seq_oldest_first() {
        let mut h = HistoryStore::new(
            HistoryConfig {
                max_messages: 8,
                ..cfg()
            },
            "p",
        );
        let empty = h.page("room:a", 3, None, 0);
        assert!(empty.messages.is_empty() && !empty.more && empty.top == 0);
        for i in 0..10 {
            h.append("room:a", msg(&i.to_string()), None, 0);
        }
        // 10 stored, 8 kept: seqs 3..=10.
        let seqs = |p: &Page| p.messages.iter().filter_map(|e| e.seq).collect::<Vec<_>>();
        let p = h.page("room:a", 3, None, 0);
        assert_eq!((seqs(&p), p.more, p.top), (vec![8, 9, 10], true, 10));
        let p = h.page("room:a", 3, Some(8), 0);
        assert_eq!((seqs(&p), p.more), (vec![5, 6, 7], true));
        let p = h.page("room:a", 3, Some(5), 0);
        assert_eq!((seqs(&p), p.more), (vec![3, 4], false));
        let p = h.page("room:a", 50, Some(3), 0);
        assert_eq!((seqs(&p), p.more), (vec![], false));
        let p = h.page("room:a", 50, None, 0);
        assert_eq!((seqs(&p).len(), p.more), (8, false));
        // Age: everything gone, the position stays.
        let p = h.page("room:a", 3, None, 20_000);
        assert_eq!((seqs(&p), p.more, p.top), (vec![], false, 10));
    }

    #[test]
    fn a_new_process_has_new_epochs() {
        let mut a = HistoryStore::new(cfg(), "run1");
        let mut b = HistoryStore::new(cfg(), "run2");
        assert_ne!(
            a.recover("room:a", None, 0).pos.epoch,
            b.recover("room:a", None, 0).pos.epoch
        );
    }

    #[test]
    fn blocks_are_the_allocators_classes() {
        let classes: Vec<usize> = [1, 8, 9, 64, 65, 80, 81, 128, 129, 200, 256, 257, 1000]
            .iter()
            .map(|&n| block(n))
            .collect();
        assert_eq!(
            classes,
            vec![8, 8, 16, 64, 80, 80, 96, 128, 160, 224, 256, 320, 1024]
        );
        assert_eq!(block(0), 0);
        // A table of 100 entries has 128 buckets; of 7, 8.
        assert_eq!(table(100, 10), block(128 * 11 + 16));
        assert_eq!(table(7, 10), block(8 * 11 + 16));
    }

    #[test]
    fn the_budget_holds_with_the_tables_counted() {
        // Many small channels, each message with a key: the shape whose
        // tables cost more than the messages.
        let budget = 256 << 10;
        let mut h = HistoryStore::new(
            HistoryConfig {
                shard_bytes: budget,
                ..cfg()
            },
            "p",
        );
        for i in 0..20_000u64 {
            let key = format!("u:c:{i}");
            h.append(&format!("room:{i}"), msg("1"), Some(&key), i);
            assert!(
                h.bytes() <= budget,
                "{} > {budget} after {i}: blocks {}, channels {}/{}, keys {}/{}, fifo {}/{}",
                h.bytes(),
                h.bytes,
                h.channels.len(),
                h.channels.capacity(),
                h.keys.len(),
                h.keys.capacity(),
                h.fifo.len(),
                h.fifo.capacity()
            );
        }
        assert!(h.evicted() > 10_000, "{}", h.evicted());
        // The tables are counted: what the heap blocks alone hold is less.
        assert!(h.tables() > 0 && h.bytes > 0);
        assert_eq!(h.bytes(), h.bytes + h.tables());
        // Keys leave with their messages.
        let kept: usize = h.channels.values().map(|c| c.ring.len()).sum();
        assert_eq!(h.keys.len(), kept);
    }

    #[test]
    fn the_fifo_stays_as_long_as_what_it_orders() {
        // The count bound keeps the bytes far under the budget, so the
        // budget never evicts: the FIFO must not keep an item per message
        // ever stored.
        let mut h = HistoryStore::new(cfg(), "p");
        for i in 0..100_000u64 {
            h.append("room:a", msg("1"), Some(&format!("u:c:{i}")), i / 100);
        }
        assert!(h.fifo.len() <= 16, "{}", h.fifo.len());
        assert_eq!(h.keys.len(), 5, "a key per message kept");
        // A retry of a message still kept (within the window) is known;
        // one whose message left is stored again.
        let (d, none) = h.append("room:a", msg("1"), Some("u:c:99999"), 1_000);
        assert!(d.duplicate && none.is_none());
        let (d, _) = h.append("room:a", msg("1"), Some("u:c:1"), 1_000);
        assert!(!d.duplicate);
    }

    #[test]
    fn a_key_on_another_channel_or_record_is_not_a_duplicate() {
        let mut h = HistoryStore::new(cfg(), "p");
        let (a, _) = h.append("room:a", msg("1"), Some("u:i:1"), 0);
        let (b, e) = h.append("room:b", msg("1"), Some("u:i:1"), 0);
        assert!(!a.duplicate && !b.duplicate && e.is_some());
        // The key now points at room:b's message; room:a's retry is not
        // mistaken for it.
        let (b2, _) = h.append("room:b", msg("1"), Some("u:i:1"), 0);
        assert!(b2.duplicate);
        assert_eq!(b2.seq, b.seq);
    }
}
