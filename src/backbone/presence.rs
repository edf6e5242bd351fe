//! Presence: who is present in which room, per user (docs/protocol.md,
//! "Presence").
//!
//! A user is present in a room while at least one of their connections is
//! subscribed to it. The counting is done in two steps, so that nothing is
//! counted per connection twice:
//!
//! * each shard reports only its own transitions: the first of its
//!   connections of a user that subscribes to a room (`+1`), and the last
//!   one that leaves it (`-1`) — a second tab on the same shard sends
//!   nothing;
//! * a [`PresenceStore`] adds those up per (room, user): with the embedded
//!   backbone it lives on the room's owner shard (the one that already
//!   orders the room's messages), with NATS on every node that keeps a view
//!   of the room.
//!
//! The store also batches what changed for the room's `members`
//! subscribers: a room with watchers remembers, for each user whose count
//! moved since the last flush, whether they were present before; a flush
//! compares that with now, so someone who joined and left within one batch
//! is in neither list (the net change), and a room of more than
//! `diff_limit` present users gets only its count (the O(N²) trap of naive
//! join/leave fan-out: 5 000 users joining one room would otherwise send
//! each of them the names of all the others).
//!
//! Memory: a (room, user) pair is 8 bytes in a small room (the user's
//! id in the store's name table and the count, in a vector sorted by
//! name), each name being kept once however many rooms hold it; a room
//! past [`SMALL_ROOM`] users keeps a B-tree by name, so that a join stays
//! O(log n) in a room of thousands.
//!
//! Sans-IO: unit tests below.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::ops::Bound;

use hashbrown::HashTable;

use bytes::Bytes;
use edgegate_proto::{Envelope, Type};

/// Users listed per query page by default, and at most.
pub const QUERY_LIMIT_DEFAULT: usize = 100;
/// The most users one query page lists.
pub const QUERY_LIMIT_MAX: usize = 1000;

/// A page of a presence query (the `reply`'s `d`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PresencePage {
    /// Users present in all.
    pub total: u64,
    /// User ids, sorted ascending (byte order), after the query's `after`.
    pub users: Vec<String>,
    /// The last id returned, when more follow.
    pub next: Option<String>,
}

impl PresencePage {
    /// The `reply` payload: `{"total","users","next"?}`.
    pub fn to_json(&self) -> Bytes {
        let mut v = serde_json::json!({ "total": self.total, "users": self.users });
        if let Some(n) = &self.next {
            v["next"] = n.as_str().into();
        }
        Bytes::from(v.to_string())
    }
}

/// A page of rooms with someone present (the server API's `channels`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoomsPage {
    /// Rooms and their present users, by name.
    pub rooms: Vec<(String, u64)>,
    /// The last room listed, when more follow.
    pub next: Option<String>,
}

impl RoomsPage {
    /// The first `limit` of several lists of rooms (each sorted), merged by
    /// name; a room in several lists keeps its largest count (a caller
    /// that needs the cluster's count asks for it).
    pub fn merge(lists: Vec<Vec<(String, u64)>>, limit: usize) -> RoomsPage {
        let mut all: Vec<(String, u64)> = lists.into_iter().flatten().collect();
        all.sort_unstable();
        let mut rooms: Vec<(String, u64)> = Vec::new();
        for (name, n) in all {
            match rooms.last_mut() {
                Some(last) if last.0 == name => last.1 = last.1.max(n),
                _ => rooms.push((name, n)),
            }
        }
        let more = rooms.len() > limit;
        rooms.truncate(limit);
        RoomsPage {
            next: more.then(|| rooms.last().map(|r| r.0.clone())).flatten(),
            rooms,
        }
    }

    /// `{"channels":[{"ch","users"}],"next"?}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "channels": self.rooms.iter().map(|(ch, n)| serde_json::json!({"ch": ch, "users": n})).collect::<Vec<_>>(),
        });
        if let Some(n) = &self.next {
            v["next"] = n.as_str().into();
        }
        v
    }
}

/// What a change did to the room as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The user was not present and now is.
    Joined,
    /// The user was present and now is not.
    Left,
    /// Still present (another shard or node holds them), or still absent.
    None,
}

/// The lifecycle events (docs/api.md, "Events") of transition `t` of
/// `user` in `ch`, `count` users being present after it: `room.occupied`
/// before a room's first `room.join`, `room.vacated` after its last
/// `room.leave`; for `user:<id>` (someone online on any node) `user.online`
/// and `user.offline`.
pub fn lifecycle_events(
    node: &str,
    ch: &str,
    user: &str,
    t: Transition,
    count: u64,
) -> Vec<serde_json::Value> {
    use crate::events::{
        ROOM_JOIN, ROOM_LEAVE, ROOM_OCCUPIED, ROOM_VACATED, USER_OFFLINE, USER_ONLINE, event,
    };
    let user_kind = ch.starts_with("user:");
    match t {
        Transition::None => Vec::new(),
        Transition::Joined if user_kind => vec![event(USER_ONLINE, node, &[("user", user)])],
        Transition::Left if user_kind => vec![event(USER_OFFLINE, node, &[("user", user)])],
        Transition::Joined => {
            let join = event(ROOM_JOIN, node, &[("ch", ch), ("user", user)]);
            if count == 1 {
                vec![event(ROOM_OCCUPIED, node, &[("ch", ch)]), join]
            } else {
                vec![join]
            }
        }
        Transition::Left => {
            let leave = event(ROOM_LEAVE, node, &[("ch", ch), ("user", user)]);
            if count == 0 {
                vec![leave, event(ROOM_VACATED, node, &[("ch", ch)])]
            } else {
                vec![leave]
            }
        }
    }
}

/// Users a room holds in its sorted vector before it turns to a B-tree
/// (and below a quarter of which it turns back).
pub const SMALL_ROOM: usize = 64;

/// The store's user names, each kept once: a room holds ids.
///
/// The table holds only ids (4 bytes a slot), hashed by the name each
/// stands for: the name itself is kept once, in `by_id`. A user in 20
/// rooms is in the store of every shard that owns one of them, so this
/// is paid per user and owner shard.
#[derive(Default)]
struct Names {
    ids: HashTable<u32>,
    hasher: RandomState,
    /// By id: the name and how many rooms hold it (`None`: a free id).
    by_id: Vec<(Option<Box<str>>, u32)>,
    free: Vec<u32>,
}

/// The name of `id` in `by_id` ("" for a free id).
fn name_in(by_id: &[(Option<Box<str>>, u32)], id: u32) -> &str {
    by_id
        .get(id as usize)
        .and_then(|(n, _)| n.as_deref())
        .unwrap_or("")
}

impl Names {
    fn name(&self, id: u32) -> &str {
        name_in(&self.by_id, id)
    }

    fn id(&self, name: &str) -> Option<u32> {
        let h = self.hasher.hash_one(name);
        self.ids
            .find(h, |&id| name_in(&self.by_id, id) == name)
            .copied()
    }

    /// The id of `name` for one more room.
    fn acquire(&mut self, name: &str) -> u32 {
        if let Some(id) = self.id(name) {
            if let Some(e) = self.by_id.get_mut(id as usize) {
                e.1 += 1;
            }
            return id;
        }
        let boxed: Box<str> = Box::from(name);
        let id = match self.free.pop() {
            Some(id) => {
                self.by_id[id as usize] = (Some(boxed), 1);
                id
            }
            None => {
                self.by_id.push((Some(boxed), 1));
                (self.by_id.len() - 1) as u32
            }
        };
        let Names {
            ids, hasher, by_id, ..
        } = self;
        ids.insert_unique(hasher.hash_one(name), id, |&i| {
            hasher.hash_one(name_in(by_id, i))
        });
        id
    }

    /// One room fewer holds `id`; the last one frees the name.
    fn release(&mut self, id: u32) {
        let Some(e) = self.by_id.get_mut(id as usize) else {
            return;
        };
        e.1 = e.1.saturating_sub(1);
        if e.1 == 0
            && let Some(name) = e.0.take()
        {
            let h = self.hasher.hash_one(&*name);
            if let Ok(slot) = self.ids.find_entry(h, |&i| i == id) {
                slot.remove();
            }
            self.free.push(id);
        }
    }

    /// Names held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// The users present in one room and how many reporters hold each.
#[allow(clippy::box_collection)] // the point: 8 bytes for the rare large room
enum Members {
    /// (user id, count), sorted by the user's name. A boxed slice, not a
    /// vector: exact size, and 16 bytes in the room's slot, not 24.
    Small(Box<[(u32, u32)]>),
    /// A room past [`SMALL_ROOM`] users (boxed: the rare case keeps the
    /// enum, and every room's slot in the store's table, small).
    Large(Box<BTreeMap<Box<str>, u32>>),
}

impl Default for Members {
    fn default() -> Self {
        Members::Small(Box::default())
    }
}

impl Members {
    fn len(&self) -> usize {
        match self {
            Members::Small(v) => v.len(),
            Members::Large(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `Ok(index)` of `user` in a small room, or where it would go.
    fn find(v: &[(u32, u32)], names: &Names, user: &str) -> Result<usize, usize> {
        v.binary_search_by(|&(id, _)| names.name(id).cmp(user))
    }

    fn get(&self, names: &Names, user: &str) -> Option<u32> {
        match self {
            Members::Small(v) => Self::find(v, names, user).ok().map(|i| v[i].1),
            Members::Large(m) => m.get(user).copied(),
        }
    }

    /// Sets `user`'s count (0: removes them), keeping the name table's
    /// holds.
    fn set(&mut self, names: &mut Names, user: &str, n: u32) {
        match self {
            Members::Small(v) => match (Self::find(v, names, user), n) {
                (Ok(i), 0) => {
                    let mut w = std::mem::take(v).into_vec();
                    let (id, _) = w.remove(i);
                    names.release(id);
                    *v = w.into_boxed_slice();
                }
                (Ok(i), n) => v[i].1 = n,
                (Err(_), 0) => {}
                (Err(i), n) => {
                    // Exact size: a room of ten holds 80 bytes, not 128.
                    // Grown in place where the allocator's block has
                    // room (realloc), not copied to a fresh block.
                    let mut w = std::mem::take(v).into_vec();
                    w.reserve_exact(1);
                    w.insert(i, (names.acquire(user), n));
                    *v = w.into_boxed_slice();
                    if v.len() > SMALL_ROOM {
                        let m = v
                            .iter()
                            .map(|&(id, n)| (Box::from(names.name(id)), n))
                            .collect();
                        *self = Members::Large(Box::new(m));
                    }
                }
            },
            Members::Large(m) => {
                if n == 0 {
                    if m.remove(user).is_some()
                        && let Some(id) = names.id(user)
                    {
                        names.release(id);
                    }
                    if m.len() < SMALL_ROOM / 4 {
                        let mut v: Vec<(u32, u32)> = Vec::with_capacity(m.len());
                        v.extend(m.iter().filter_map(|(u, &n)| names.id(u).map(|id| (id, n))));
                        *self = Members::Small(v.into_boxed_slice());
                    }
                } else if let Some(c) = m.get_mut(user) {
                    *c = n;
                } else {
                    // The hold keeps the name (and its id) for a turn back
                    // to a small room.
                    names.acquire(user);
                    m.insert(Box::from(user), n);
                }
            }
        }
    }

    /// The names after `after` (all: `None`), in byte order.
    fn after<'a>(
        &'a self,
        names: &'a Names,
        after: Option<&str>,
    ) -> Box<dyn Iterator<Item = &'a str> + 'a> {
        match self {
            Members::Small(v) => {
                let from = after.map_or(0, |a| v.partition_point(|&(id, _)| names.name(id) <= a));
                Box::new(v[from..].iter().map(move |&(id, _)| names.name(id)))
            }
            Members::Large(m) => {
                let from = match after {
                    Some(a) => Bound::Excluded(a),
                    None => Bound::Unbounded,
                };
                Box::new(
                    m.range::<str, _>((from, Bound::Unbounded))
                        .map(|(u, _)| &**u),
                )
            }
        }
    }
}

/// One room's presence. Most rooms have no watcher: what watching needs
/// is boxed, so an unwatched room is its members and one pointer.
#[derive(Default)]
struct Room {
    /// Present users → how many reporters (shards, or nodes) hold them.
    users: Members,
    /// Watchers and the batch for them, while anyone watches.
    watch: Option<Box<Watch>>,
}

/// A watched room's watchers and batch.
#[derive(Default)]
struct Watch {
    /// Reporters that want `members` events for the room (shards with a
    /// watching connection), once per time they asked.
    watchers: Vec<u32>,
    /// Since the last flush: each user whose count moved, and whether they
    /// were present before.
    pending: HashMap<Box<str>, bool>,
}

/// The presence of many rooms, with batching for their watchers.
pub struct PresenceStore {
    rooms: HashMap<Box<str>, Room>,
    names: Names,
    /// Rooms with a pending batch, in the order they got one.
    dirty: Vec<Box<str>>,
    diff_limit: usize,
    /// (room, user) pairs present.
    entries: u64,
}

/// A batch of changes for one room's watchers.
#[derive(Debug)]
pub struct Flushed {
    /// The reporters (shards) with watchers.
    pub to: Vec<u32>,
    /// The `members` envelope.
    pub env: Envelope,
    /// The lists were left out (more present than `diff_limit`).
    pub suppressed: bool,
}

impl PresenceStore {
    /// An empty store; rooms with more present users than `diff_limit` get
    /// only their count in `members`.
    pub fn new(diff_limit: usize) -> Self {
        PresenceStore {
            rooms: HashMap::new(),
            names: Names::default(),
            dirty: Vec::new(),
            diff_limit,
            entries: 0,
        }
    }

    /// (room, user) pairs present.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Rooms with someone present or watching.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// A reporter's count of `user` in `room` moved by `delta` (+1: its
    /// first connection of the user subscribed; -1: its last one left).
    pub fn change(&mut self, room: &str, user: &str, delta: i32) -> Transition {
        if !self.rooms.contains_key(room) {
            if delta <= 0 {
                return Transition::None; // a leave of nobody
            }
            self.rooms.insert(Box::from(room), Room::default());
        }
        let Some(r) = self.rooms.get_mut(room) else {
            return Transition::None;
        };
        let before = r.users.get(&self.names, user).unwrap_or(0);
        let after = before.saturating_add_signed(delta);
        let t = match (before, after) {
            (0, 0) => return Transition::None,
            (0, _) => {
                self.entries += 1;
                Transition::Joined
            }
            (_, 0) => {
                self.entries -= 1;
                Transition::Left
            }
            _ => Transition::None,
        };
        r.users.set(&mut self.names, user, after);
        if t != Transition::None
            && let Some(w) = r.watch.as_mut()
        {
            if w.pending.is_empty() {
                self.dirty.push(Box::from(room));
            }
            w.pending
                .entry(Box::from(user))
                .or_insert(t == Transition::Left);
        }
        self.forget_if_empty(room);
        t
    }

    /// Reporter `who` begins (`on`) or stops wanting `members` for `room`.
    pub fn watch(&mut self, room: &str, who: u32, on: bool) {
        if on {
            let r = self.rooms.entry(Box::from(room)).or_default();
            r.watch.get_or_insert_with(Box::default).watchers.push(who);
        } else if let Some(r) = self.rooms.get_mut(room) {
            if let Some(w) = r.watch.as_mut()
                && let Some(i) = w.watchers.iter().position(|&x| x == who)
            {
                w.watchers.swap_remove(i);
                if w.watchers.is_empty() {
                    r.watch = None;
                }
            }
            self.forget_if_empty(room);
        }
    }

    fn forget_if_empty(&mut self, room: &str) {
        if self
            .rooms
            .get(room)
            .is_some_and(|r| r.users.is_empty() && r.watch.is_none())
        {
            self.rooms.remove(room);
        }
    }

    /// Users present in `room`.
    pub fn count(&self, room: &str) -> u64 {
        self.rooms.get(room).map_or(0, |r| r.users.len() as u64)
    }

    /// True when `user` is present in `room`.
    pub fn contains(&self, room: &str, user: &str) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|r| r.users.get(&self.names, user).is_some())
    }

    /// The users of `room` after `after` (sorted, at most `limit`).
    pub fn query(&self, room: &str, limit: usize, after: Option<&str>) -> PresencePage {
        let Some(r) = self.rooms.get(room) else {
            return PresencePage::default();
        };
        let mut it = r.users.after(&self.names, after);
        let users: Vec<String> = it.by_ref().take(limit).map(str::to_owned).collect();
        let next = match it.next() {
            Some(_) => users.last().cloned(),
            None => None,
        };
        PresencePage {
            total: r.users.len() as u64,
            users,
            next,
        }
    }

    /// The rooms with someone present whose names start with `prefix` and
    /// sort after `after`: the first `limit + 1`, sorted, with their counts
    /// (one more than asked, so a merge can tell that more follow).
    pub fn rooms_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .rooms
            .iter()
            .filter(|(name, r)| {
                // The NATS backbone also tracks `user:<id>` (who is online
                // on a node) in its store: only rooms are listed.
                !r.users.is_empty()
                    && name.starts_with("room:")
                    && name.starts_with(prefix)
                    && after.is_none_or(|a| &***name > a)
            })
            .map(|(name, r)| (name.to_string(), r.users.len() as u64))
            .collect();
        v.sort_unstable();
        v.truncate(limit.saturating_add(1));
        v
    }

    /// Every room with someone present.
    pub fn names(&self) -> Vec<String> {
        self.rooms
            .iter()
            .filter(|(_, r)| !r.users.is_empty())
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// Every user present in `room` (a node's answer to a peer's sync).
    pub fn users(&self, room: &str) -> Vec<String> {
        self.rooms
            .get(room)
            .map(|r| {
                r.users
                    .after(&self.names, None)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The batches due: one `members` envelope per room whose present set
    /// changed since the last flush (net), for the reporters watching it.
    pub fn flush(&mut self) -> Vec<Flushed> {
        let mut out = Vec::new();
        for room in std::mem::take(&mut self.dirty) {
            let Some(r) = self.rooms.get_mut(&*room) else {
                continue;
            };
            let Some(w) = r.watch.as_mut() else {
                continue; // no watcher left: nobody to tell
            };
            let pending = std::mem::take(&mut w.pending);
            let mut join = Vec::new();
            let mut leave = Vec::new();
            for (user, was) in pending {
                match (was, r.users.get(&self.names, &user).is_some()) {
                    (false, true) => join.push(user),
                    (true, false) => leave.push(user),
                    _ => {} // back where it was: no net change
                }
            }
            if join.is_empty() && leave.is_empty() {
                continue;
            }
            join.sort_unstable();
            leave.sort_unstable();
            let present = r.users.len();
            let suppressed = present > self.diff_limit;
            let mut meta = serde_json::json!({ "present": present });
            if !suppressed {
                meta["join"] = join.iter().map(|u| u.to_string()).collect();
                meta["leave"] = leave.iter().map(|u| u.to_string()).collect();
            }
            let mut env = Envelope::new(Type::Members);
            env.ch = Some(room.to_string());
            env.meta = Some(meta.to_string());
            let mut to: Vec<u32> = w.watchers.clone();
            to.sort_unstable();
            to.dedup();
            out.push(Flushed {
                to,
                env,
                suppressed,
            });
            self.forget_if_empty(&room);
        }
        out
    }

    /// Drops every count that `who`'s reports made, as if each of its users
    /// left (a node that died): the transitions that follow.
    pub fn drop_reporter_users<'a>(
        &mut self,
        room: &str,
        users: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(String, Transition)> {
        users
            .into_iter()
            .map(|u| (u.to_owned(), self.change(room, u, -1)))
            .collect()
    }
}

/// The payload of a presence query's `reply` for a `user:` channel: online
/// anywhere, or not.
pub fn online_page(user: &str, online: bool) -> PresencePage {
    PresencePage {
        total: u64::from(online),
        users: if online {
            vec![user.to_owned()]
        } else {
            Vec::new()
        },
        next: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every room in the store pays its slot (name and `Room`) in the
    /// table's buckets: 40 bytes, not the 56 of a vector-backed room.
    #[test]
    fn a_room_slot_is_small() {
        assert_eq!(std::mem::size_of::<Room>(), 24);
        assert_eq!(std::mem::size_of::<(Box<str>, Room)>(), 40);
    }

    fn meta(f: &Flushed) -> serde_json::Value {
        serde_json::from_str(f.env.meta.as_deref().unwrap_or("{}")).unwrap_or_default()
    }

    #[test]
    fn a_user_is_present_while_any_reporter_holds_them() {
        let mut s = PresenceStore::new(1000);
        assert_eq!(s.change("room:a", "alice", 1), Transition::Joined);
        assert_eq!(
            s.change("room:a", "alice", 1),
            Transition::None,
            "a second shard"
        );
        assert_eq!(s.count("room:a"), 1);
        assert_eq!(s.change("room:a", "alice", -1), Transition::None);
        assert!(s.contains("room:a", "alice"));
        assert_eq!(s.change("room:a", "alice", -1), Transition::Left);
        assert_eq!(s.count("room:a"), 0);
        assert_eq!(s.rooms(), 0, "an empty room is forgotten");
        assert_eq!(
            s.change("room:a", "bob", -1),
            Transition::None,
            "nobody to leave"
        );
        assert_eq!(s.entries(), 0);
    }

    #[test]
    fn batches_hold_net_changes_for_watched_rooms_only() {
        let mut s = PresenceStore::new(1000);
        s.change("room:quiet", "x", 1);
        s.watch("room:a", 3, true);
        s.change("room:a", "alice", 1);
        s.change("room:a", "bob", 1);
        s.change("room:a", "carol", 1);
        s.change("room:a", "carol", -1); // joined and left: in neither list
        let f = s.flush();
        assert_eq!(f.len(), 1, "the unwatched room has no batch");
        assert_eq!(f[0].to, vec![3]);
        assert_eq!(f[0].env.ch.as_deref(), Some("room:a"));
        assert_eq!(
            meta(&f[0]),
            serde_json::json!({"present": 2, "join": ["alice", "bob"], "leave": []})
        );
        assert!(s.flush().is_empty(), "nothing new");
        s.change("room:a", "alice", -1);
        s.change("room:a", "alice", 1); // left and came back: no net change
        assert!(s.flush().is_empty());
        s.change("room:a", "bob", -1);
        let f = s.flush();
        assert_eq!(
            meta(&f[0]),
            serde_json::json!({"present": 1, "join": [], "leave": ["bob"]})
        );
    }

    #[test]
    fn big_rooms_get_only_their_count() {
        let mut s = PresenceStore::new(2);
        s.watch("room:a", 0, true);
        for u in ["a", "b", "c"] {
            s.change("room:a", u, 1);
        }
        let f = s.flush();
        assert!(f[0].suppressed);
        assert_eq!(meta(&f[0]), serde_json::json!({"present": 3}));
    }

    #[test]
    fn watchers_are_counted_per_request() {
        let mut s = PresenceStore::new(10);
        s.watch("room:a", 1, true);
        s.watch("room:a", 1, true);
        s.watch("room:a", 1, false);
        s.change("room:a", "u", 1);
        assert_eq!(s.flush()[0].to, vec![1], "still watched once");
        s.watch("room:a", 1, false);
        s.change("room:a", "v", 1);
        assert!(s.flush().is_empty());
        s.change("room:a", "u", -1);
        s.change("room:a", "v", -1);
        assert_eq!(s.rooms(), 0);
    }

    #[test]
    fn rooms_are_listed_by_name_and_merged() {
        let mut a = PresenceStore::new(10);
        let mut b = PresenceStore::new(10);
        a.change("room:b", "u", 1);
        a.change("room:d", "u", 1);
        a.change("room:d", "v", 1);
        a.watch("room:e", 0, true); // watched, nobody present: not listed
        b.change("room:a", "u", 1);
        b.change("room:c", "u", 1);
        b.change("other:x", "u", 1);
        assert_eq!(
            a.rooms_after("room:", None, 10),
            vec![("room:b".into(), 1), ("room:d".into(), 2)]
        );
        let lists = vec![
            a.rooms_after("room:", None, 2),
            b.rooms_after("room:", None, 2),
        ];
        let p = RoomsPage::merge(lists, 2);
        assert_eq!(p.rooms, vec![("room:a".into(), 1), ("room:b".into(), 1)]);
        assert_eq!(p.next.as_deref(), Some("room:b"));
        let lists = vec![
            a.rooms_after("room:", p.next.as_deref(), 2),
            b.rooms_after("room:", p.next.as_deref(), 2),
        ];
        let p = RoomsPage::merge(lists, 2);
        assert_eq!(p.rooms, vec![("room:c".into(), 1), ("room:d".into(), 2)]);
        assert_eq!(p.next, None);
        assert_eq!(
            p.to_json(),
            serde_json::json!({"channels": [{"ch": "room:c", "users": 1}, {"ch": "room:d", "users": 2}]})
        );
    }

    #[test]
    fn queries_page_in_byte_order() {
        let mut s = PresenceStore::new(10);
        for u in ["carol", "Bob", "alice", "dave", "_x"] {
            s.change("room:a", u, 1);
        }
        let p = s.query("room:a", 2, None);
        assert_eq!(p.total, 5);
        assert_eq!(p.users, vec!["Bob", "_x"]);
        assert_eq!(p.next.as_deref(), Some("_x"));
        let p = s.query("room:a", 2, p.next.as_deref());
        assert_eq!(p.users, vec!["alice", "carol"]);
        let p = s.query("room:a", 2, p.next.as_deref());
        assert_eq!(p.users, vec!["dave"]);
        assert_eq!(p.next, None, "the last page says no more");
        let p = s.query("room:a", 10, Some("zzz"));
        assert!(p.users.is_empty() && p.next.is_none() && p.total == 5);
        assert_eq!(s.query("room:none", 10, None), PresencePage::default());
        assert_eq!(
            &s.query("room:a", 1, None).to_json()[..],
            br#"{"next":"Bob","total":5,"users":["Bob"]}"#
        );
    }

    #[test]
    fn a_room_turns_to_a_tree_and_back_and_names_are_kept_once() {
        let mut s = PresenceStore::new(usize::MAX);
        let n = SMALL_ROOM + 10;
        // Users in a scrambled order, in a big room and a small one.
        let users: Vec<String> = (0..n).map(|i| format!("u{:03}", (i * 31) % n)).collect();
        for u in &users {
            assert_eq!(s.change("room:big", u, 1), Transition::Joined);
            assert_eq!(
                s.change("room:big", u, 1),
                Transition::None,
                "a second reporter"
            );
        }
        for u in &users[..3] {
            s.change("room:small", u, 1);
        }
        assert!(matches!(s.rooms["room:big"].users, Members::Large(_)));
        assert!(matches!(s.rooms["room:small"].users, Members::Small(_)));
        assert_eq!(s.names.len(), n, "one name per user, not per room");
        let mut sorted = users.clone();
        sorted.sort();
        let all = s.query("room:big", QUERY_LIMIT_MAX, None);
        assert_eq!(all.users, sorted);
        let page = s.query("room:big", 5, Some(&sorted[9]));
        assert_eq!(page.users, sorted[10..15].to_vec());
        // Leaving: one reporter's hold first (still present), then the
        // other's, until the room is small again.
        for u in &users {
            assert_eq!(s.change("room:big", u, -1), Transition::None);
        }
        let keep = SMALL_ROOM / 4 - 1;
        for u in &sorted[keep..] {
            assert_eq!(s.change("room:big", u, -1), Transition::Left);
        }
        assert!(matches!(s.rooms["room:big"].users, Members::Small(_)));
        assert_eq!(
            s.query("room:big", QUERY_LIMIT_MAX, None).users,
            sorted[..keep].to_vec()
        );
        assert!(s.contains("room:big", &sorted[0]) && !s.contains("room:big", &sorted[keep]));
        assert_eq!(s.entries(), (keep + 3) as u64);
        // The names of users in no room are gone, their ids reused.
        let held: std::collections::HashSet<&String> =
            sorted[..keep].iter().chain(&users[..3]).collect();
        assert_eq!(s.names.len(), held.len());
        for u in sorted[..keep].iter() {
            s.change("room:big", u, -1);
        }
        for u in &users[..3] {
            s.change("room:small", u, -1);
        }
        assert_eq!((s.rooms(), s.entries(), s.names.len()), (0, 0, 0));
        s.change("room:c", "zed", 1);
        assert!(s.names.by_id.len() <= n, "a freed id is reused");
        assert_eq!(s.query("room:c", 10, None).users, vec!["zed"]);
    }
}
