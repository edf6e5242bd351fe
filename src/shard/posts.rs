//! The shard's side of `POST /sse` (docs/protocol.md §10): the post box of
//! its SSE connections, the check of a POST's session token, and the task
//! that serves the posts other shards send on ([`crate::sse::PostLane`]).
//!
//! A posted body waits in the box, keyed by the connection's slot (and
//! checked against its serial), until the connection's task takes it
//! (`transport::sse::SseWire::poll_recv`) — at once, since the owner wakes
//! the task when it puts a body in. The box holds entries only while a
//! body waits: an idle SSE connection costs it nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use edgegate_proto::sse as proto_sse;

use super::Shard;
use crate::metrics::Transport;
use crate::sse::{Post, PostOutcome};

/// Bodies a connection may have waiting, in units of `max_frame`; a POST
/// past it is answered 429.
pub const BACKLOG_FRAMES: usize = 4;
/// Posts served per wake-up before other tasks get a turn.
const BATCH: usize = 256;

/// Bodies posted to this shard's SSE connections and not yet taken.
#[derive(Default)]
pub struct PostBox {
    /// Slot → (serial, bytes: bodies joined by `\n`).
    waiting: RefCell<HashMap<u32, (u64, Vec<u8>)>>,
}

impl PostBox {
    /// Puts `body` for connection (`slot`, `serial`) behind what waits
    /// already; false when that would make more than `max` bytes.
    fn put(&self, slot: u32, serial: u64, body: &[u8], max: usize) -> bool {
        let mut w = self.waiting.borrow_mut();
        match w.get_mut(&slot) {
            Some((s, bytes)) if *s == serial => {
                if bytes.len() + 1 + body.len() > max {
                    return false;
                }
                // Envelopes are separated by newlines (an empty body still
                // counts as the client's activity).
                bytes.push(b'\n');
                bytes.extend_from_slice(body);
            }
            _ => {
                w.insert(slot, (serial, body.to_vec()));
            }
        }
        true
    }

    /// The `hello` of a new stream (from `GET /sse?hello=`): the first
    /// thing its connection reads.
    pub fn put_hello(&self, slot: u32, serial: u64, hello: Vec<u8>) {
        self.waiting.borrow_mut().insert(slot, (serial, hello));
    }

    /// Takes what waits for connection (`slot`, `serial`).
    pub fn take(&self, slot: u32, serial: u64) -> Option<Vec<u8>> {
        let mut w = self.waiting.borrow_mut();
        match w.get(&slot) {
            Some((s, _)) if *s == serial => w.remove(&slot).map(|(_, b)| b),
            _ => None,
        }
    }

    /// Drops what waits for a connection that is gone.
    pub fn forget(&self, slot: u32, serial: u64) {
        let _ = self.take(slot, serial);
        let mut w = self.waiting.borrow_mut();
        if w.is_empty() && w.capacity() > 64 {
            // A burst of posts does not keep its table for good.
            *w = HashMap::new();
        }
    }
}

impl Shard {
    /// What becomes of a POST for `session` on this shard: its body goes
    /// in the connection's post box (and the connection's task is woken)
    /// when the token is this shard's, its MAC holds and the connection is
    /// an open SSE stream; nothing is touched otherwise.
    pub fn post_outcome(&self, session: &str, body: Vec<u8>) -> PostOutcome {
        let Some(id) = proto_sse::parse_session(session) else {
            return PostOutcome::Unknown;
        };
        let Some(key) = self.cfg.sse_key.as_ref() else {
            return PostOutcome::Unknown;
        };
        if id.shard != self.id
            || id.node != proto_sse::node_token(&self.cfg.node_id)
            || !key.verify(&id)
        {
            return PostOutcome::Unknown;
        }
        let Some(conn) = self.conns.get(id.slot, id.serial, false) else {
            return PostOutcome::Unknown;
        };
        if conn.transport != Transport::Sse || conn.closing() || conn.close_requested().is_some() {
            return PostOutcome::Unknown;
        }
        let max = BACKLOG_FRAMES * self.cfg.max_frame;
        if !self.posts.put(id.slot, id.serial, &body, max) {
            return PostOutcome::Busy;
        }
        conn.wake();
        PostOutcome::Taken
    }

    /// A POST another shard (or, through the backbone, node) sent on.
    pub fn take_post(&self, post: Post) {
        let outcome = self.post_outcome(&post.session, post.body.to_vec());
        let _ = post.reply.send(outcome);
    }

    /// Starts the task that serves the posts other shards send this one.
    pub fn serve_posts(self: &Rc<Self>) {
        let me = self.clone();
        glommio::spawn_local(async move {
            std::future::poll_fn(|cx| {
                let Some(lane) = me.node.posts.get(me.id) else {
                    return std::task::Poll::Ready(());
                };
                lane.waker.register(cx.waker());
                for _ in 0..BATCH {
                    match lane.rx.try_recv() {
                        Ok(p) => me.take_post(p),
                        Err(_) => return std::task::Poll::Pending,
                    }
                }
                // More waiting: let other tasks run, then come back.
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            })
            .await;
        })
        .detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_box_keeps_bodies_per_connection_within_its_bound() {
        let b = PostBox::default();
        assert!(b.put(3, 30, b"a", 8));
        assert!(b.put(3, 30, b"bc", 8));
        // Over the bound: refused, what waits is kept.
        assert!(!b.put(3, 30, b"defgh", 8));
        // A newer connection in the slot replaces an old one's leftovers.
        assert_eq!(b.take(3, 31), None);
        assert_eq!(b.take(3, 30).as_deref(), Some(&b"a\nbc"[..]));
        assert_eq!(b.take(3, 30), None);
        b.put_hello(4, 40, b"{}".to_vec());
        assert!(b.put(4, 40, b"", 8));
        assert_eq!(b.take(4, 40).as_deref(), Some(&b"{}\n"[..]));
        assert!(b.put(5, 50, b"x", 8));
        b.forget(5, 49);
        b.forget(5, 50);
        assert_eq!(b.take(5, 50), None);
        assert!(b.waiting.borrow().is_empty());
    }
}
