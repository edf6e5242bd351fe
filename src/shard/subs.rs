//! Subscriptions: which of this shard's connections are interested in which
//! channel, and fan-out to them over the connection table.
//!
//! Every connection is subscribed to its own `user:<id>` channel, so direct
//! messages and room messages take the same path. The table is per shard:
//! no other thread reads it, so it needs no lock. A message is encoded at
//! most once per encoding per shard ([`Delivery`]), whatever the number of
//! subscribers.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::rc::Rc;

use crate::session::Name;

use edgegate_proto::CloseCode;

use super::conns::ConnTable;
use crate::conn::{Delivery, Out};
use crate::metrics::ShardMetrics;
use crate::session::CloseReq;

/// Channel name → slab keys of subscribed connections.
#[derive(Default)]
pub struct Router {
    subs: HashMap<Name, Keys>,
}

/// Subscribers of one channel. Most channels on a shard are `user:`
/// channels with one connection: that case needs no allocation.
enum Keys {
    One(u32),
    Many(Vec<u32>),
}

impl Keys {
    fn as_slice(&self) -> &[u32] {
        match self {
            Keys::One(k) => std::slice::from_ref(k),
            Keys::Many(v) => v,
        }
    }
}

impl Router {
    /// Subscribes connection `key` to `ch`. Returns `true` when this is the
    /// shard's first interest in `ch` (the backbone may need to know), and
    /// the shard's copy of the name: a connection keeps that one, so that
    /// the members of a room on a shard share one allocation of its name
    /// rather than one each.
    pub fn subscribe(&mut self, ch: &Name, key: u32) -> (bool, Name) {
        match self.subs.entry(ch.clone()) {
            Entry::Occupied(mut e) => {
                let keys = e.get_mut();
                match keys {
                    Keys::One(k) if *k != key => *keys = Keys::Many(vec![*k, key]),
                    Keys::Many(v) if !v.contains(&key) => v.push(key),
                    _ => {}
                }
                (false, e.key().clone())
            }
            Entry::Vacant(e) => {
                e.insert(Keys::One(key));
                (true, ch.clone())
            }
        }
    }

    /// Removes connection `key` from `ch`. Returns `true` when that was the
    /// shard's last interest in `ch`.
    pub fn unsubscribe(&mut self, ch: &str, key: u32) -> bool {
        let Some(keys) = self.subs.get_mut(ch) else {
            return false;
        };
        let empty = match keys {
            Keys::One(k) => *k == key,
            Keys::Many(v) => {
                v.retain(|&k| k != key);
                match v[..] {
                    [] => true,
                    [last] => {
                        *keys = Keys::One(last);
                        false
                    }
                    _ => false,
                }
            }
        };
        if empty {
            self.subs.remove(ch);
        }
        empty
    }

    /// Number of local subscribers of `ch`.
    pub fn subscribers(&self, ch: &str) -> usize {
        self.subs.get(ch).map_or(0, |k| k.as_slice().len())
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> usize {
        self.subs.len()
    }

    /// Slab keys of the local subscribers of `ch`.
    pub fn keys(&self, ch: &str) -> &[u32] {
        self.subs.get(ch).map_or(&[], Keys::as_slice)
    }

    /// Queues `d` on every local subscriber of `ch`, each queue bounded by
    /// `limit` bytes (and each recovery's hold by `held_max` messages). A subscriber whose queue is full is closed as a slow
    /// consumer; the others are not held back by it. Returns the number of
    /// connections reached.
    pub fn deliver(
        &self,
        conns: &ConnTable,
        metrics: &ShardMetrics,
        (limit, held_max): (usize, usize),
        ch: &str,
        d: &Rc<Delivery>,
    ) -> usize {
        let mut n = 0;
        if d.droppable() {
            // Ephemeral: dropped for a subscriber that is behind, never a
            // reason to close it.
            conns.for_each_key(self.keys(ch), |conn| {
                if conn.push_droppable(Out::Shared(d.clone()), limit) {
                    n += 1;
                } else {
                    metrics
                        .ephemeral_dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
            return n;
        }
        conns.for_each_key(self.keys(ch), |conn| {
            if conn.push(Out::Shared(d.clone()), limit, held_max) {
                n += 1;
            } else {
                metrics
                    .drops_slow_consumer
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                conn.request_close(CloseReq::new(CloseCode::SLOW_CONSUMER, "slow consumer"));
            }
        });
        n
    }
}

/// The connections that watch a room's presence (`sub` with
/// `meta.presence`), per channel. A connection is listed from its `sub`
/// (so the shard hears the room's `members` before the `ok`'s count is
/// taken) and gets `members` once its `ok` went out (`active`).
#[derive(Default)]
pub struct Watchers {
    rooms: HashMap<Name, Vec<(u32, bool)>>,
}

impl Watchers {
    /// Lists connection `key` for `ch`, not yet active. Returns `true`
    /// when it is the shard's first watcher of `ch`.
    pub fn add(&mut self, ch: &Name, key: u32) -> bool {
        match self.rooms.get_mut(ch.as_str()) {
            Some(v) => {
                if !v.iter().any(|&(k, _)| k == key) {
                    v.push((key, false));
                }
                false
            }
            None => {
                self.rooms.insert(ch.clone(), vec![(key, false)]);
                true
            }
        }
    }

    /// Connection `key` gets `ch`'s `members` from now on.
    pub fn activate(&mut self, ch: &str, key: u32) {
        if let Some(w) = self
            .rooms
            .get_mut(ch)
            .and_then(|v| v.iter_mut().find(|(k, _)| *k == key))
        {
            w.1 = true;
        }
    }

    /// Removes connection `key` from `ch`. Returns `true` when that was the
    /// shard's last watcher of `ch`.
    pub fn remove(&mut self, ch: &str, key: u32) -> bool {
        let Some(v) = self.rooms.get_mut(ch) else {
            return false;
        };
        let before = v.len();
        v.retain(|&(k, _)| k != key);
        if v.len() == before {
            return false;
        }
        if v.is_empty() {
            self.rooms.remove(ch);
            return true;
        }
        false
    }

    /// The active watchers of `ch`.
    pub fn active(&self, ch: &str) -> Vec<u32> {
        self.rooms
            .get(ch)
            .map(|v| v.iter().filter(|w| w.1).map(|w| w.0).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_interest_are_reported() {
        let mut r = Router::default();
        let ch: Name = Name::from("room:a");
        assert!(r.subscribe(&ch, 1).0);
        let (first, name) = r.subscribe(&Name::from("room:a"), 2);
        assert!(!first);
        assert!(Name::ptr_eq(&name, &ch), "one name per shard");
        assert!(!r.subscribe(&ch, 2).0, "idempotent");
        assert_eq!(r.subscribers("room:a"), 2);
        assert!(!r.unsubscribe("room:a", 1));
        assert!(r.unsubscribe("room:a", 2));
        assert_eq!(r.channels(), 0);
        assert!(!r.unsubscribe("room:a", 2));
    }

    #[test]
    fn watchers_get_members_once_active() {
        let mut w = Watchers::default();
        let ch: Name = Name::from("room:a");
        assert!(w.add(&ch, 1));
        assert!(!w.add(&ch, 2));
        assert!(!w.add(&ch, 2), "idempotent");
        assert!(w.active("room:a").is_empty(), "no ok sent yet");
        w.activate("room:a", 2);
        assert_eq!(w.active("room:a"), vec![2]);
        assert!(!w.remove("room:a", 2));
        assert!(!w.remove("room:a", 7), "not a watcher");
        assert!(w.remove("room:a", 1), "the last one");
        assert!(w.active("room:a").is_empty());
    }
}
