//! SSE sessions on the node (docs/protocol.md §10): the key that makes a
//! session token unguessable, and a `POST /sse` on its way to the shard
//! (and node) that owns the connection.
//!
//! **Tokens.** `welcome.meta.session` is `<node>.<shard>.<slot>.<serial>.<mac>`
//! ([`edgegate_proto::sse`] splits and joins the text). The MAC is
//! HMAC-SHA256 over the rest, under a 256-bit key drawn from the operating
//! system's generator when the node starts: 256 bits nobody can predict
//! without the key, so a token cannot be made from a connection's name
//! (`welcome.meta.conn`, which others may see). Nothing is stored per
//! connection: the owner checks the MAC again when a POST arrives (in
//! constant time, with ring). Serials are never reused, so a token names
//! one connection for ever, and a restarted node has a new key: its old
//! tokens answer 404.
//!
//! **Posts.** The shard that reads a POST finds the owner in the token: its
//! own connection, another shard's (a [`PostLane`] per shard: a bounded
//! crossbeam queue and an `AtomicWaker`, served at once by a task on that
//! shard), or, with the NATS backbone, another node's (`P.ctl.sse.<node>`).
//! The owner answers through a oneshot with a [`PostOutcome`], which
//! becomes the HTTP status.

use std::sync::Arc;

use atomic_waker::AtomicWaker;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use edgegate_proto::sse::{self, SessionId};

/// Posts waiting for one shard; more are answered 503.
pub const LANE_POSTS: usize = 4096;

/// The node's key for session tokens.
pub struct SessionKey(ring::hmac::Key);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// A fresh key from the operating system's generator.
    pub fn random() -> Result<SessionKey, String> {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .map_err(|_| "cannot draw the SSE session key from the system's generator")?;
        Ok(SessionKey(key))
    }

    /// The token of connection (`slot`, `serial`) on `shard` of `node`.
    pub fn token(&self, node: &str, shard: usize, slot: u32, serial: u64) -> String {
        let mut t = sse::session_prefix(node, shard, slot, serial);
        let tag = ring::hmac::sign(&self.0, t.as_bytes());
        t.push('.');
        B64URL.encode_string(tag.as_ref(), &mut t);
        t
    }

    /// True when `id`'s MAC is this key's for its parts (compared in
    /// constant time).
    pub fn verify(&self, id: &SessionId<'_>) -> bool {
        let Ok(tag) = B64URL.decode(id.mac) else {
            return false;
        };
        ring::hmac::verify(&self.0, id.signed.as_bytes(), &tag).is_ok()
    }
}

/// What became of a POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostOutcome {
    /// The connection took the body (its answers come on the stream): 204.
    Taken,
    /// No such session, or it is closed: 404.
    Unknown,
    /// The connection has too much posted and not yet read: 429.
    Busy,
    /// The owner could not be reached (its queue full, the backbone down,
    /// no answer in time): 503.
    Unavailable,
}

impl PostOutcome {
    /// The HTTP status.
    pub fn status(self) -> u16 {
        match self {
            PostOutcome::Taken => 204,
            PostOutcome::Unknown => 404,
            PostOutcome::Busy => 429,
            PostOutcome::Unavailable => 503,
        }
    }

    /// The outcome an HTTP status stands for (a forwarded POST's answer).
    pub fn from_status(status: u16) -> PostOutcome {
        match status {
            204 => PostOutcome::Taken,
            404 => PostOutcome::Unknown,
            429 => PostOutcome::Busy,
            _ => PostOutcome::Unavailable,
        }
    }
}

/// A POST's body on its way to the connection's owner.
#[derive(Debug)]
pub struct Post {
    /// The `Eg-Session` token, as received.
    pub session: String,
    /// The body: JSON envelopes separated by `\n` (not decoded yet: the
    /// connection decodes them, so a bad one closes it with 4000 as on
    /// WebSocket).
    pub body: bytes::Bytes,
    /// Where the outcome goes.
    pub reply: tokio::sync::oneshot::Sender<PostOutcome>,
}

/// One shard's queue of posts from other shards.
pub struct PostLane {
    tx: crossbeam_channel::Sender<Post>,
    /// The shard's end (only the shard reads it).
    pub rx: crossbeam_channel::Receiver<Post>,
    /// Wakes the shard's task that serves the lane.
    pub waker: Arc<AtomicWaker>,
}

impl Default for PostLane {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(LANE_POSTS);
        PostLane {
            tx,
            rx,
            waker: Arc::new(AtomicWaker::new()),
        }
    }
}

impl PostLane {
    /// Queues `post` for the shard; a full queue answers it `Unavailable`.
    pub fn send(&self, post: Post) {
        match self.tx.try_send(post) {
            Ok(()) => self.waker.wake(),
            Err(e) => {
                let post = e.into_inner();
                let _ = post.reply.send(PostOutcome::Unavailable);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_their_key_and_parts() {
        let k = SessionKey::random().unwrap();
        let t = k.token("edge-1", 1, 7, 99);
        let id = sse::parse_session(&t).unwrap();
        assert_eq!(
            (id.node, id.shard, id.slot, id.serial),
            ("edge-1", 1, 7, 99)
        );
        assert!(k.verify(&id));
        // 256 bits of tag, base64url.
        assert_eq!(id.mac.len(), 43);
        // Another key, another part, a changed tag: refused.
        let other = SessionKey::random().unwrap();
        assert!(!other.verify(&id));
        let forged = t.replace(".7.", ".8.");
        assert!(!k.verify(&sse::parse_session(&forged).unwrap()));
        let mut bad = t.clone();
        bad.pop();
        bad.push(if t.ends_with('A') { 'B' } else { 'A' });
        assert!(!k.verify(&sse::parse_session(&bad).unwrap()));
        let short = format!("{}.AAAA", id.signed);
        assert!(!k.verify(&sse::parse_session(&short).unwrap()));
        // Two connections' tokens share nothing predictable.
        assert_ne!(k.token("edge-1", 1, 7, 100)[16..], t[16..]);
    }

    #[test]
    fn outcomes_are_statuses() {
        for o in [
            PostOutcome::Taken,
            PostOutcome::Unknown,
            PostOutcome::Busy,
            PostOutcome::Unavailable,
        ] {
            assert_eq!(PostOutcome::from_status(o.status()), o);
        }
    }

    #[test]
    fn a_full_lane_answers_unavailable() {
        let lane = PostLane::default();
        let mut answers = Vec::new();
        for _ in 0..=LANE_POSTS {
            let (tx, rx) = tokio::sync::oneshot::channel();
            lane.send(Post {
                session: String::new(),
                body: bytes::Bytes::new(),
                reply: tx,
            });
            answers.push(rx);
        }
        let mut last = answers.pop().unwrap();
        assert_eq!(last.try_recv(), Ok(PostOutcome::Unavailable));
        assert_eq!(lane.rx.len(), LANE_POSTS);
    }
}
