//! Lifecycle events for core services (docs/api.md, "Events"): each a JSON
//! object `{"event","ts_ms","node", ...}`, published on NATS as
//! `P.events.<event>` and POSTed to `[webhooks] url` in signed batches.
//!
//! One call emits an event wherever it goes: [`Bus::emit`]. The bus is a
//! cheap, thread-safe handle (a bounded queue to the webhook sender, and
//! with NATS a function that publishes on the backbone thread), so any
//! thread that learns of a change — the backbone thread, a shard, the API
//! thread — emits it the same way. Nothing blocks: past the webhook
//! queue's bound an event is dropped and counted, never waited for.
//!
//! [`UserCounts`] turns connection counts into `user.online` /
//! `user.offline` transitions; the backbone keeps one per node (NATS) or
//! the API thread one for the node (embedded).

pub mod webhooks;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crate::metrics::ServicesStats;

/// `user.online`.
pub const USER_ONLINE: &str = "user.online";
/// `user.offline`.
pub const USER_OFFLINE: &str = "user.offline";
/// `room.occupied`: the first user present in a room.
pub const ROOM_OCCUPIED: &str = "room.occupied";
/// `room.vacated`: the last present user left the room.
pub const ROOM_VACATED: &str = "room.vacated";
/// `room.join`: a user became present in a room.
pub const ROOM_JOIN: &str = "room.join";
/// `room.leave`: a user is no longer present in a room.
pub const ROOM_LEAVE: &str = "room.leave";

/// An event: `{"event", "ts_ms", "node"}` plus `fields`.
pub fn event(name: &str, node: &str, fields: &[(&str, &str)]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("event".into(), name.into());
    m.insert("ts_ms".into(), crate::auth::unix_ms().into());
    m.insert("node".into(), node.into());
    for (k, v) in fields {
        m.insert((*k).into(), (*v).into());
    }
    serde_json::Value::Object(m)
}

/// Per-user connection changes (`(user, ±1)`) sent to whoever keeps the
/// node's [`UserCounts`].
pub type UserFeed = tokio::sync::mpsc::UnboundedSender<(String, i32)>;

/// What a shard of the embedded backbone reports to core services: its
/// connection changes per user (the node's counts and `user.*` events) and
/// the lifecycle events of the rooms it owns, with the node's name.
#[derive(Clone, Default)]
pub struct Reports {
    /// Per-user connection changes, when something wants them.
    pub users: Option<UserFeed>,
    /// The room events' way out, when something wants them.
    pub events: Option<Bus>,
    /// The node's name (each event's `node`).
    pub node: Arc<str>,
}

/// Publishes an event on the backbone (NATS: `P.events.<event>`).
pub type Publisher = Arc<dyn Fn(&str, &serde_json::Value) + Send + Sync>;

/// Where events go; clone it freely.
#[derive(Clone, Default)]
pub struct Bus {
    webhooks: Option<tokio::sync::mpsc::Sender<serde_json::Value>>,
    publisher: Option<Publisher>,
    stats: Option<Arc<ServicesStats>>,
}

impl Bus {
    /// A bus to the webhook sender's queue (if any) and the backbone's
    /// publisher (if any).
    pub fn new(
        webhooks: Option<tokio::sync::mpsc::Sender<serde_json::Value>>,
        publisher: Option<Publisher>,
        stats: Option<Arc<ServicesStats>>,
    ) -> Self {
        Bus {
            webhooks,
            publisher,
            stats,
        }
    }

    /// The same bus, also publishing on the backbone.
    pub fn with_publisher(&self, p: Publisher) -> Bus {
        Bus {
            publisher: Some(p),
            ..self.clone()
        }
    }

    /// The same bus without the backbone's publisher: for the backbone
    /// thread, which publishes its own events itself.
    pub fn webhooks_only(&self) -> Bus {
        Bus {
            publisher: None,
            ..self.clone()
        }
    }

    /// True when an event would go anywhere.
    pub fn wanted(&self) -> bool {
        self.webhooks.is_some() || self.publisher.is_some()
    }

    /// Emits `ev` (made by [`event`]) everywhere it goes.
    pub fn emit(&self, ev: serde_json::Value) {
        if let Some(p) = &self.publisher {
            let name = ev["event"].as_str().unwrap_or("unknown").to_owned();
            p(&name, &ev);
        }
        if let Some(tx) = &self.webhooks
            && tx.try_send(ev).is_err()
            && let Some(s) = &self.stats
        {
            // Full (the receiver is down and retries fill it): counted.
            s.webhook[webhooks::DROPPED].fetch_add(1, Relaxed);
        }
    }
}

/// Connections per user, and their 0→1 / 1→0 transitions.
#[derive(Debug, Default)]
pub struct UserCounts(HashMap<String, u32>);

impl UserCounts {
    /// Applies a change of `delta` connections for `user`: `Some(true)`
    /// when the user came online, `Some(false)` when they went offline.
    pub fn change(&mut self, user: &str, delta: i32) -> Option<bool> {
        let n = self.0.entry(user.to_owned()).or_insert(0);
        let before = *n;
        *n = n.saturating_add_signed(delta);
        let after = *n;
        if after == 0 {
            self.0.remove(user);
        }
        match (before, after) {
            (0, 1..) => Some(true),
            (1.., 0) => Some(false),
            _ => None,
        }
    }

    /// A user's connections.
    pub fn get(&self, user: &str) -> u32 {
        self.0.get(user).copied().unwrap_or(0)
    }

    /// Users with at least one connection.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no user is connected.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        let mut u = UserCounts::default();
        assert_eq!(u.change("a", 1), Some(true));
        assert_eq!(u.change("a", 1), None);
        assert_eq!(u.change("a", -1), None);
        assert_eq!(u.len(), 1);
        assert_eq!(u.change("a", -1), Some(false));
        assert!(u.is_empty());
        // A stray decrement never underflows or reports a transition.
        assert_eq!(u.change("b", -1), None);
        assert!(u.is_empty());
    }

    #[test]
    fn events_carry_their_fields() {
        let e = event(USER_ONLINE, "n1", &[("user", "alice")]);
        assert_eq!(e["event"], "user.online");
        assert_eq!(e["node"], "n1");
        assert_eq!(e["user"], "alice");
        assert!(e["ts_ms"].as_u64().is_some_and(|t| t > 0));
    }
}
