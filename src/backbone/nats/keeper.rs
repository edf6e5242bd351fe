//! The cluster's lifecycle events (`user.online` / `user.offline`,
//! `room.occupied` / `room.vacated`, `room.join` / `room.leave`), each
//! emitted once for the cluster, not once per node (docs/architecture.md,
//! "Presence across nodes").
//!
//! Every key (`room:<id>`, and `user:<id>` for who is online) has one
//! **keeper**: the node that scores highest for it among the nodes alive
//! (rendezvous hashing over the presence heartbeats' view, so a node coming
//! or going moves only its own share of the keys). Every node sends its
//! changes of a key to the key's keeper (`P.pres.k.<keeper>`, one message
//! per keeper per batch of changes), and the keeper holds, per key, every
//! node's set and their union: a transition of the union is a cluster-wide
//! event. No per-key subscription and no sync is needed in the steady
//! state: a node's first change of a key starts its count at 1 (the key's
//! first user on that node), and a key the keeper does not hold, so that no
//! node has users in it, becomes occupied when such a change arrives.
//!
//! When the nodes alive change, every node sends each key it has users in
//! to its keeper as a whole set (a *claim*); a keeper that did not hold a
//! node's set takes it silently (it was there before, kept elsewhere), one
//! that did emits what differs. So in a stable cluster every transition is
//! emitted exactly once; while a node joins, dies or reconnects an event
//! may be late or, for the keys the dead node kept, missed.
//!
//! This type is the keeper's state and rules, without I/O; the NATS thread
//! ([`super::presence`]) moves the messages.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::backbone::presence::{PresenceStore, Transition, lifecycle_events};

/// A node's changes for the keepers, one message per keeper.
#[derive(Serialize, Deserialize, Debug, Default)]
pub(super) struct ToKeeper {
    /// Node.
    pub n: String,
    /// Its incarnation.
    pub i: u64,
    /// Its changes, per key.
    pub d: Vec<KeyChange>,
}

/// One node's change of one key.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct KeyChange {
    /// The key (`room:<id>`, `user:<id>`).
    pub c: String,
    /// The node's delta count for the key (as on `P.pres.d.*`).
    pub s: u64,
    /// Users that joined on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub j: Vec<String>,
    /// Users that left on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l: Vec<String>,
    /// A claim: the node's whole set (replaces `j` and `l`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub u: Option<Vec<String>>,
}

/// One node's set of one key.
#[derive(Debug, Default)]
struct Part {
    inc: u64,
    seq: u64,
    users: BTreeSet<String>,
}

/// What [`Kept::apply`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Applied {
    /// Taken (events, if any, pushed).
    Done,
    /// A change is missing: the node's whole set must be asked for.
    Gap,
}

/// The keys this node keeps the events of.
pub(super) struct Kept {
    /// Key → node → its set.
    keys: HashMap<String, HashMap<String, Part>>,
    /// The union of every node's sets (a user on two nodes counts once).
    union: PresenceStore,
}

impl Kept {
    /// An empty keeper.
    pub fn new() -> Self {
        Kept {
            keys: HashMap::new(),
            union: PresenceStore::new(0),
        }
    }

    /// Keys kept.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Applies `node`'s (incarnation `inc`) change of a key, pushing the
    /// cluster-wide transitions it makes as events onto `out`.
    pub fn apply(
        &mut self,
        node: &str,
        inc: u64,
        ch: KeyChange,
        out: &mut Vec<serde_json::Value>,
    ) -> Applied {
        if let Some(users) = ch.u {
            self.set(node, inc, &ch.c, ch.s, users, out);
            return Applied::Done;
        }
        let known = self.keys.get(&ch.c).and_then(|k| k.get(node));
        match known {
            // A fresh count: the node's set was empty before this change
            // (what a restarted node or a lost leave left is replaced; core
            // NATS loses messages under pressure but never repeats one).
            _ if ch.s == 1 => self.clear(node, &ch.c, out),
            Some(p) if p.inc == inc && ch.s == p.seq + 1 => {}
            Some(p) if p.inc == inc && ch.s <= p.seq => return Applied::Done,
            _ => return Applied::Gap,
        }
        let key = ch.c;
        let part = self
            .keys
            .entry(key.clone())
            .or_default()
            .entry(node.to_owned())
            .or_default();
        part.inc = inc;
        part.seq = ch.s;
        let mut moves = Vec::new();
        for u in ch.j {
            if part.users.insert(u.clone()) {
                moves.push((u, 1));
            }
        }
        for u in ch.l {
            if part.users.remove(&u) {
                moves.push((u, -1));
            }
        }
        for (u, d) in moves {
            self.change(true, node, &key, &u, d, out);
        }
        self.forget_if_empty(&key, node);
        Applied::Done
    }

    /// Replaces `node`'s set of `key` with `users` (a claim or the answer
    /// to a sync, at its count `seq`): silently when this keeper did not
    /// hold that node's set, otherwise emitting what differs.
    pub fn set(
        &mut self,
        node: &str,
        inc: u64,
        key: &str,
        seq: u64,
        users: Vec<String>,
        out: &mut Vec<serde_json::Value>,
    ) {
        let parts = self.keys.entry(key.to_owned()).or_default();
        let emits = parts.contains_key(node);
        let part = parts.entry(node.to_owned()).or_default();
        if emits && part.inc == inc && part.seq > seq {
            return; // a change after this set came first
        }
        let new: BTreeSet<String> = users.into_iter().collect();
        let gone: Vec<String> = part.users.difference(&new).cloned().collect();
        let came: Vec<String> = new.difference(&part.users).cloned().collect();
        part.users = new;
        part.inc = inc;
        part.seq = seq;
        for u in gone {
            self.change(emits, node, key, &u, -1, out);
        }
        for u in came {
            self.change(emits, node, key, &u, 1, out);
        }
        self.forget_if_empty(key, node);
    }

    /// `node` is gone (dead, or restarted): its users leave every key.
    pub fn drop_node(&mut self, node: &str, out: &mut Vec<serde_json::Value>) {
        let keys: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, parts)| parts.contains_key(node))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.clear(node, &key, out);
        }
    }

    /// `node`'s users of `key` leave.
    fn clear(&mut self, node: &str, key: &str, out: &mut Vec<serde_json::Value>) {
        let part = self.keys.get_mut(key).and_then(|p| p.remove(node));
        for u in part.map(|p| p.users).unwrap_or_default() {
            self.change(true, node, key, &u, -1, out);
        }
        if self.keys.get(key).is_some_and(HashMap::is_empty) {
            self.keys.remove(key);
        }
    }

    /// Gives up the keys for which `mine` is false (another node keeps
    /// them now), without events.
    pub fn retain(&mut self, mine: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self.keys.keys().filter(|k| !mine(k)).cloned().collect();
        for key in gone {
            if let Some(parts) = self.keys.remove(&key) {
                let users: BTreeSet<&String> = parts.values().flat_map(|p| &p.users).collect();
                for u in users {
                    for _ in 0..parts.values().filter(|p| p.users.contains(u)).count() {
                        self.union.change(&key, u, -1);
                    }
                }
            }
        }
    }

    /// A change of `user` in `key` on `node` reaches the union; a
    /// cluster-wide transition is an event (with `emits`) naming `node`,
    /// where the connection that made it is (or was).
    fn change(
        &mut self,
        emits: bool,
        node: &str,
        key: &str,
        user: &str,
        delta: i32,
        out: &mut Vec<serde_json::Value>,
    ) {
        let t = self.union.change(key, user, delta);
        if emits && t != Transition::None {
            out.extend(lifecycle_events(node, key, user, t, self.union.count(key)));
        }
    }

    fn forget_if_empty(&mut self, key: &str, node: &str) {
        if let Some(parts) = self.keys.get_mut(key) {
            // An empty set starts its count anew (at 1) with its next user.
            if parts.get(node).is_some_and(|p| p.users.is_empty()) {
                parts.remove(node);
            }
            if parts.is_empty() {
                self.keys.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(c: &str, s: u64, j: &[&str], l: &[&str]) -> KeyChange {
        KeyChange {
            c: c.into(),
            s,
            j: j.iter().map(|u| u.to_string()).collect(),
            l: l.iter().map(|u| u.to_string()).collect(),
            u: None,
        }
    }

    fn claim(c: &str, s: u64, u: &[&str]) -> KeyChange {
        KeyChange {
            c: c.into(),
            s,
            u: Some(u.iter().map(|u| u.to_string()).collect()),
            ..KeyChange::default()
        }
    }

    /// (event, user or ch) of what `f` emits.
    fn events(k: &mut Kept, f: impl FnOnce(&mut Kept, &mut Vec<serde_json::Value>)) -> Vec<String> {
        let mut out = Vec::new();
        f(k, &mut out);
        out.iter()
            .map(|e| {
                let who = e.get("user").or(e.get("ch")).and_then(|v| v.as_str());
                format!(
                    "{} {}",
                    e["event"].as_str().unwrap_or("?"),
                    who.unwrap_or("?")
                )
            })
            .collect()
    }

    #[test]
    fn a_user_on_two_nodes_joins_and_leaves_the_room_once() {
        let mut k = Kept::new();
        let e = events(&mut k, |k, o| {
            assert_eq!(
                k.apply("a", 1, ch("room:r", 1, &["u", "v"], &[]), o),
                Applied::Done
            );
        });
        assert_eq!(e, ["room.occupied room:r", "room.join u", "room.join v"]);
        let e = events(&mut k, |k, o| {
            k.apply("b", 7, ch("room:r", 1, &["u"], &[]), o);
        });
        assert!(e.is_empty(), "{e:?}");
        let e = events(&mut k, |k, o| {
            k.apply("a", 1, ch("room:r", 2, &[], &["u"]), o);
        });
        assert!(e.is_empty(), "still on b: {e:?}");
        let e = events(&mut k, |k, o| {
            k.apply("b", 7, ch("room:r", 2, &[], &["u"]), o);
            k.apply("a", 1, ch("room:r", 3, &[], &["v"]), o);
        });
        assert_eq!(e, ["room.leave u", "room.leave v", "room.vacated room:r"]);
        assert_eq!(k.len(), 0);
    }

    #[test]
    fn users_online_anywhere() {
        let mut k = Kept::new();
        let e = events(&mut k, |k, o| {
            k.apply("a", 1, ch("user:u", 1, &["u"], &[]), o);
            k.apply("b", 1, ch("user:u", 1, &["u"], &[]), o);
            k.apply("a", 1, ch("user:u", 2, &[], &["u"]), o);
        });
        assert_eq!(e, ["user.online u"]);
        let e = events(&mut k, |k, o| {
            k.apply("b", 1, ch("user:u", 2, &[], &["u"]), o);
        });
        assert_eq!(e, ["user.offline u"]);
    }

    #[test]
    fn repeats_are_ignored_and_gaps_reported() {
        let mut k = Kept::new();
        let mut o = Vec::new();
        k.apply("a", 1, ch("room:r", 1, &["u"], &[]), &mut o);
        k.apply("a", 1, ch("room:r", 2, &["v"], &[]), &mut o);
        o.clear();
        assert_eq!(
            k.apply("a", 1, ch("room:r", 2, &["v"], &[]), &mut o),
            Applied::Done
        );
        assert_eq!(
            k.apply("a", 1, ch("room:r", 4, &["w"], &[]), &mut o),
            Applied::Gap
        );
        // A change of a key it never held, past its first: a gap too.
        assert_eq!(
            k.apply("b", 1, ch("room:x", 4, &["v"], &[]), &mut o),
            Applied::Gap
        );
        assert!(o.is_empty(), "{o:?}");
    }

    #[test]
    fn a_claim_is_silent_for_sets_not_held_and_emits_what_differs_otherwise() {
        let mut k = Kept::new();
        let e = events(&mut k, |k, o| {
            // The keeper moved here: these were present before.
            k.apply("a", 1, claim("room:r", 5, &["u", "v"]), o);
            k.apply("b", 1, claim("room:r", 2, &["w"]), o);
        });
        assert!(e.is_empty(), "{e:?}");
        // From then on, changes are events; a claim that differs is one too.
        let e = events(&mut k, |k, o| {
            k.apply("a", 1, ch("room:r", 6, &[], &["u"]), o);
            k.apply("b", 1, claim("room:r", 4, &["w", "x"]), o);
        });
        assert_eq!(e, ["room.leave u", "room.join x"]);
        // A claim older than a change already taken is not applied.
        let e = events(&mut k, |k, o| {
            k.apply("a", 1, claim("room:r", 5, &["u", "v"]), o);
        });
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn a_dead_or_restarted_node_takes_its_users_along() {
        let mut k = Kept::new();
        let mut o = Vec::new();
        k.apply("a", 1, ch("room:r", 1, &["u"], &[]), &mut o);
        k.apply("b", 1, ch("room:r", 1, &["v"], &[]), &mut o);
        k.apply("b", 1, ch("room:s", 1, &["v"], &[]), &mut o);
        let e = events(&mut k, |k, o| k.drop_node("b", o));
        let mut e = e;
        e.sort();
        assert_eq!(e, ["room.leave v", "room.leave v", "room.vacated room:s"]);
        // a restarts with a new incarnation: its old set is replaced.
        let e = events(&mut k, |k, o| {
            k.apply("a", 2, ch("room:r", 1, &["w"], &[]), o);
        });
        assert_eq!(
            e,
            [
                "room.leave u",
                "room.vacated room:r",
                "room.occupied room:r",
                "room.join w"
            ]
        );
    }

    #[test]
    fn keys_given_up_leave_no_trace() {
        let mut k = Kept::new();
        let mut o = Vec::new();
        k.apply("a", 1, ch("room:r", 1, &["u"], &[]), &mut o);
        k.apply("b", 1, ch("room:r", 1, &["u"], &[]), &mut o);
        k.apply("a", 1, ch("room:s", 1, &["u"], &[]), &mut o);
        o.clear();
        k.retain(|key| key == "room:s");
        assert_eq!(k.len(), 1);
        assert!(o.is_empty());
        // Kept again later (from nothing): its first users are news.
        let e = events(&mut k, |k, o| {
            k.apply("b", 1, ch("room:r", 1, &["v"], &[]), o);
        });
        assert_eq!(e, ["room.occupied room:r", "room.join v"]);
    }
}
