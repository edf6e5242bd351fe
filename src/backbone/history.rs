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
//! Publish deduplication: a publish that names a key (`user:instance:id`)
//! already stored on the channel within the window is not stored again;
//! its answer is the original `seq`, marked duplicate.
//!
//! Sans-IO: time comes in as arguments; unit tests below.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use edgegate_proto::Envelope;

use crate::config::History as HistoryConfig;

/// Bytes a channel record costs beyond its messages (map entry, ring, name).
const CHANNEL_OVERHEAD: usize = 160;
/// Bytes a stored message costs beyond its payload and names: the shared
/// envelope (`Arc` header and struct), its slot in the ring, and the
/// allocator's rounding of its three heap blocks. Measured against the
/// gateway's RSS (docs/benchmarks.md), so that `history.shard_bytes`
/// bounds real memory, not a fraction of it.
const MESSAGE_OVERHEAD: usize = std::mem::size_of::<Envelope>() + 16 + 16 + 3 * 16;
/// Bytes a dedupe entry costs beyond its key: the `Rc<str>` header, the map
/// entry and the expiry queue's slot.
const DEDUPE_OVERHEAD: usize = 16 + 40 + 24 + 16;

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
}

struct Channel {
    generation: u64,
    epoch: Arc<str>,
    top: u64,
    ring: VecDeque<Entry>,
    /// Publish keys stored within the window: key → (seq, stored at).
    dedupe: HashMap<Rc<str>, (u64, u64)>,
    dedupe_order: VecDeque<(u64, Rc<str>)>,
}

/// What the shard-wide FIFO remembers, in storing order.
enum Item {
    /// A message of a channel (its generation and seq).
    Message(Rc<str>, u64, u64),
    /// A channel record was made (its generation).
    Record(Rc<str>, u64),
}

/// One shard's history of the channels it owns.
pub struct HistoryStore {
    cfg: HistoryConfig,
    prefix: Rc<str>,
    channels: HashMap<Rc<str>, Channel>,
    fifo: VecDeque<Item>,
    bytes: usize,
    generation: u64,
}

/// A message's size for the byte budget.
fn size_of(env: &Envelope) -> usize {
    MESSAGE_OVERHEAD
        + env.payload.bytes().len()
        + env.ch.as_ref().map_or(0, String::len)
        + env.from.as_ref().map_or(0, String::len)
}

impl HistoryStore {
    /// An empty store; `prefix` is this process's random epoch prefix.
    pub fn new(cfg: HistoryConfig, prefix: &str) -> Self {
        HistoryStore {
            cfg,
            prefix: Rc::from(prefix),
            channels: HashMap::new(),
            fifo: VecDeque::new(),
            bytes: 0,
            generation: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Channel records held.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    fn channel(&mut self, ch: &str) -> &mut Channel {
        if !self.channels.contains_key(ch) {
            self.generation += 1;
            let name: Rc<str> = Rc::from(ch);
            let epoch: Arc<str> = Arc::from(format!("{}-{}", self.prefix, self.generation));
            self.channels.insert(
                name.clone(),
                Channel {
                    generation: self.generation,
                    epoch,
                    top: 0,
                    ring: VecDeque::new(),
                    dedupe: HashMap::new(),
                    dedupe_order: VecDeque::new(),
                },
            );
            self.bytes += CHANNEL_OVERHEAD + ch.len();
            self.fifo.push_back(Item::Record(name, self.generation));
        }
        // Just inserted or already there.
        match self.channels.get_mut(ch) {
            Some(c) => c,
            None => unreachable!("the channel record was just made"),
        }
    }

    /// Drops what is older than the age bound from `ch`'s ring and dedupe keys.
    fn trim(&mut self, ch: &str, now_ms: u64) {
        let (max_age, window) = (self.cfg.max_age_ms, self.cfg.dedupe_window_ms);
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
            }
        }
        while c
            .dedupe_order
            .front()
            .is_some_and(|(at, _)| now_ms.saturating_sub(*at) >= window)
        {
            if let Some((at, key)) = c.dedupe_order.pop_front()
                && c.dedupe.get(&key).is_some_and(|(_, t)| *t == at)
            {
                c.dedupe.remove(&key);
                self.bytes -= key.len() + DEDUPE_OVERHEAD;
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
        if let Some(k) = key
            && let Some(&(seq, _)) = c.dedupe.get(k)
        {
            let dup = Stored {
                seq,
                epoch: c.epoch.clone(),
                duplicate: true,
            };
            return (dup, None);
        }
        c.top += 1;
        let seq = c.top;
        let epoch = c.epoch.clone();
        env.seq = Some(seq);
        let bytes = size_of(&env);
        let generation = c.generation;
        let env = Arc::new(env);
        c.ring.push_back(Entry {
            seq,
            at_ms: now_ms,
            bytes,
            env: env.clone(),
        });
        let mut freed = 0;
        while c.ring.len() > max_messages {
            if let Some(e) = c.ring.pop_front() {
                freed += e.bytes;
            }
        }
        let mut added = bytes;
        if let Some(k) = key {
            let k: Rc<str> = Rc::from(k);
            added += k.len() + DEDUPE_OVERHEAD;
            c.dedupe.insert(k.clone(), (seq, now_ms));
            c.dedupe_order.push_back((now_ms, k));
        }
        self.bytes = self.bytes + added - freed;
        let name = match self.channels.get_key_value(ch) {
            Some((n, _)) => n.clone(),
            None => Rc::from(ch),
        };
        self.fifo.push_back(Item::Message(name, generation, seq));
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
        while self.bytes > self.cfg.shard_bytes && rounds > 0 {
            rounds -= 1;
            let Some(item) = self.fifo.pop_front() else {
                break;
            };
            match item {
                Item::Message(ch, generation, seq) => {
                    if let Some(c) = self.channels.get_mut(&ch)
                        && c.generation == generation
                        && c.ring.front().is_some_and(|e| e.seq <= seq)
                    {
                        while c.ring.front().is_some_and(|e| e.seq <= seq) {
                            if let Some(e) = c.ring.pop_front() {
                                self.bytes -= e.bytes;
                            }
                        }
                    }
                }
                Item::Record(ch, generation) => {
                    let live = self
                        .channels
                        .get(&ch)
                        .filter(|c| c.generation == generation);
                    match live {
                        // An empty record goes: the channel comes back with a
                        // new generation (a new epoch) if it is used again.
                        Some(c) if c.ring.is_empty() => {
                            let dedupe: usize =
                                c.dedupe.keys().map(|k| k.len() + DEDUPE_OVERHEAD).sum();
                            self.bytes -= CHANNEL_OVERHEAD + ch.len() + dedupe;
                            self.channels.remove(&ch);
                        }
                        // Still holding messages: its turn comes again later.
                        Some(_) => self.fifo.push_back(Item::Record(ch, generation)),
                        None => {}
                    }
                }
            }
        }
    }

    /// The position of `ch`, and with `since` the messages after it.
    pub fn recover(&mut self, ch: &str, since: Option<&Since>, now_ms: u64) -> Recovery {
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
        }
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
}
