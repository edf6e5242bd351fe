//! The state a connection shares with the rest of its shard.
//!
//! A connection's task owns its socket. Everything else on the shard (the
//! router delivering messages, the timer wheel, drain) reaches the
//! connection through this small [`Conn`] record: it queues outbound
//! envelopes, asks for a ping or a close, and wakes the task. Nothing here
//! is shared with another thread.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

use bytes::Bytes;
use edgegate_proto::{Envelope, Payload, binary, frame, json, leb128};

use crate::compress::ShardDeflate;
use crate::metrics::{ShardMetrics, Transport};
use crate::ratelimit::{Bucket, Rate};
use crate::session::{CloseReq, SessionState, UserId};

/// A connection's inbound token buckets. They start full; the rates are the
/// shard's ([`crate::settings::ShardConfig`]), not stored here.
#[derive(Debug)]
pub struct ConnLimits {
    /// Envelopes.
    pub msgs: Bucket,
    /// Bytes.
    pub bytes: Bucket,
    /// Envelopes refused since the buckets were last full: past
    /// `limits.rate_limited_close_after`, the connection is closed (4004).
    pub strikes: u32,
}

impl ConnLimits {
    /// Full buckets at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        // Full whatever the rate: `Bucket::full` with the largest burst is
        // capped at the real burst on the first refill.
        let any = Rate::new(u64::MAX / 1000, u64::MAX / 1000);
        ConnLimits {
            msgs: Bucket::full(&any, now_ms),
            bytes: Bucket::full(&any, now_ms),
            strikes: 0,
        }
    }
}

/// How envelopes are written to this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// WebSocket text messages: JSON envelopes separated by `\n`.
    WsJson,
    /// WebSocket binary messages: LEB128 length + binary envelope, repeated.
    WsBinary,
    /// TCP and QUIC streams: u32 big-endian length + binary envelope.
    Stream,
}

/// A message for many connections, encoded at most once per encoding on
/// this shard however many subscribers it reaches.
pub struct Delivery {
    env: Arc<Envelope>,
    /// [`approx_len`] of `env`, counted once per shard rather than at each
    /// subscriber's queue, twice (push and drain).
    approx: usize,
    json: OnceCell<Bytes>,
    bin: OnceCell<Bytes>,
    /// permessage-deflate payloads of the message alone, per WebSocket
    /// encoding (`None`: too short, or it did not shrink).
    json_z: OnceCell<Option<Bytes>>,
    bin_z: OnceCell<Option<Bytes>>,
}

impl Delivery {
    /// Wraps an envelope (shared with other shards through the `Arc`).
    pub fn new(env: Arc<Envelope>) -> Rc<Self> {
        Rc::new(Delivery {
            approx: approx_len(&env),
            env,
            json: OnceCell::new(),
            bin: OnceCell::new(),
            json_z: OnceCell::new(),
            bin_z: OnceCell::new(),
        })
    }

    /// The message as one compressed WebSocket message in `framing`,
    /// compressed on first use: once per shard and encoding, however many
    /// subscribers it goes to. `None` for a message under `min` bytes, one
    /// that did not shrink, and non-WebSocket framing.
    pub fn deflated(
        &self,
        framing: Framing,
        z: &ShardDeflate,
        min: usize,
        m: &ShardMetrics,
    ) -> Option<&[u8]> {
        let (cell, len) = match framing {
            Framing::WsJson => (&self.json_z, self.json().len()),
            Framing::WsBinary => (&self.bin_z, self.bin().len()),
            Framing::Stream => return None,
        };
        if len < min {
            return None;
        }
        cell.get_or_init(|| {
            let z = match framing {
                Framing::WsJson => z.compress(&[self.json()], m),
                _ => {
                    // A binary WebSocket message is a batch: LEB128 length, envelope.
                    let mut prefix = Vec::with_capacity(10);
                    leb128::write_u64(len as u64, &mut prefix);
                    z.compress(&[&prefix, self.bin()], m)
                }
            };
            z.map(Bytes::from)
        })
        .as_deref()
    }

    /// True when the message was compressed for `framing` already (its
    /// compressed bytes cost nothing more to send).
    pub fn is_deflated(&self, framing: Framing) -> bool {
        match framing {
            Framing::WsJson => self.json_z.get().is_some(),
            Framing::WsBinary => self.bin_z.get().is_some(),
            Framing::Stream => false,
        }
    }

    /// Bytes of the message alone as one WebSocket message in `framing`.
    pub fn ws_len(&self, framing: Framing) -> usize {
        match framing {
            Framing::WsJson => self.json().len(),
            _ => {
                let n = self.bin().len();
                // The LEB128 prefix: 7 bits a byte.
                (u64::BITS - (n as u64 | 1).leading_zeros()).div_ceil(7) as usize + n
            }
        }
    }

    fn json(&self) -> &[u8] {
        self.json.get_or_init(|| {
            let mut v = Vec::with_capacity(self.approx_len() + 32);
            json::encode(&self.env, &mut v);
            Bytes::from(v)
        })
    }

    fn bin(&self) -> &[u8] {
        self.bin.get_or_init(|| {
            let mut v = Vec::with_capacity(self.approx_len());
            binary::encode(&self.env, &mut v);
            Bytes::from(v)
        })
    }

    fn approx_len(&self) -> usize {
        self.approx
    }

    /// The message.
    pub fn env(&self) -> &Arc<Envelope> {
        &self.env
    }

    /// An ephemeral message or a `members` batch: dropped for a subscriber
    /// that is behind rather than closing it ([`Conn::push_droppable`]).
    pub fn droppable(&self) -> bool {
        self.env.t == edgegate_proto::Type::Members || crate::backbone::is_ephemeral(&self.env)
    }
}

/// A cheap upper-bound-ish size estimate, for queue accounting before any
/// encoding has happened.
fn approx_len(env: &Envelope) -> usize {
    let payload = match &env.payload {
        Payload::None => 0,
        Payload::Json(b) => b.len(),
        // base64 in JSON mode
        Payload::Binary(b) => b.len() * 4 / 3 + 4,
    };
    32 + payload
        + env.ch.as_ref().map_or(0, String::len)
        + env.from.as_ref().map_or(0, String::len)
        + env.reason.as_ref().map_or(0, String::len)
        + env.meta.as_ref().map_or(0, String::len)
}

/// Bytes reserved beyond a batch's estimate, for a batch of one short reply.
const RESERVE_SLACK: usize = 64;

/// One queued outbound item.
pub enum Out {
    /// A routed message, shared by all its local recipients.
    Shared(Rc<Delivery>),
    /// A reply for this connection only (`ok`, `err`, `pong`, ...).
    Own(Box<Envelope>),
}

impl Out {
    fn approx_len(&self) -> usize {
        match self {
            Out::Shared(d) => d.approx_len(),
            Out::Own(e) => approx_len(e),
        }
    }

    /// Appends this item to `buf` in `framing`.
    pub fn write(&self, framing: Framing, buf: &mut Vec<u8>) {
        self.write_after(framing, buf, 0)
    }

    /// Appends this item to `buf` in `framing`, as part of a message that
    /// starts at `buf[from..]` (a JSON batch separates envelopes by
    /// newlines).
    pub fn write_after(&self, framing: Framing, buf: &mut Vec<u8>, from: usize) {
        match framing {
            Framing::WsJson => {
                if buf.len() > from {
                    buf.push(b'\n');
                }
                match self {
                    Out::Shared(d) => buf.extend_from_slice(d.json()),
                    Out::Own(e) => json::encode(e, buf),
                }
            }
            Framing::WsBinary => match self {
                Out::Shared(d) => {
                    let b = d.bin();
                    leb128::write_u64(b.len() as u64, buf);
                    buf.extend_from_slice(b);
                }
                Out::Own(e) => frame::encode_ws_binary(e, buf),
            },
            Framing::Stream => match self {
                Out::Shared(d) => frame::write_frame(d.bin(), buf),
                Out::Own(e) => frame::encode_frame(e, buf),
            },
        }
    }
}

/// A peer's address as the logs and the admin listing show it: IP and
/// port in 20 bytes, where a `SocketAddr` takes 32 (sized for an IPv6
/// flow label and scope id nobody reads here). Every connection keeps one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    ip: IpAddr,
    port: u16,
}

impl Peer {
    /// The socket address (IPv6 flow label and scope id zero).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

impl From<SocketAddr> for Peer {
    fn from(a: SocketAddr) -> Peer {
        Peer {
            ip: a.ip(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr().fmt(f)
    }
}

/// The part of a connection the shard can reach.
pub struct Conn {
    /// Node-unique serial number (per shard counter, shard id in the name).
    pub serial: u64,
    /// Slot in the shard's slab.
    pub key: u32,
    /// The transport it came in on.
    pub transport: Transport,
    /// Peer address, for logs and the admin listing.
    pub peer: Peer,
    /// Connection start, shard clock ms.
    pub started_ms: u64,
    /// Outbound encoding, fixed by the transport and subprotocol.
    pub framing: Cell<Framing>,
    /// The session's state (phase, user, claims, subscriptions): read and
    /// changed by [`crate::session::handle`] only, through the shard.
    pub session: RefCell<SessionState>,
    /// Last time anything was received, shard clock ms.
    pub last_rx_ms: Cell<u64>,
    /// When the server last pinged, shard clock ms (0: not since last rx).
    pub pinged_ms: Cell<u64>,
    /// The heartbeat wants a ping written.
    pub want_ping: Cell<bool>,
    /// A close asked for and not yet carried out (boxed: rare, and 24
    /// bytes inline in every idle connection otherwise).
    close: Cell<Option<Box<CloseReq>>>,
    out: RefCell<VecDeque<Out>>,
    out_bytes: Cell<usize>,
    /// Bytes of `out_bytes` queued by [`Conn::push_replay`] and not yet
    /// written: live messages are bounded on top of them, so a recovery's
    /// replay does not make its own subscriber look slow. Approximate
    /// (FIFO is assumed); exact once the queue is empty.
    grace: Cell<u32>,
    waker: Cell<Option<Waker>>,
}

impl Conn {
    /// A new connection record.
    pub fn new(serial: u64, key: u32, transport: Transport, peer: SocketAddr, now_ms: u64) -> Self {
        Conn {
            serial,
            key,
            transport,
            peer: peer.into(),
            started_ms: now_ms,
            framing: Cell::new(match transport {
                // SSE batches like a WebSocket text message; its wire
                // writes each envelope as a `data:` line.
                Transport::Ws | Transport::Sse => Framing::WsJson,
                _ => Framing::Stream,
            }),
            session: RefCell::new(SessionState::default()),
            last_rx_ms: Cell::new(now_ms),
            pinged_ms: Cell::new(0),
            want_ping: Cell::new(false),
            close: Cell::new(None),
            out: RefCell::new(VecDeque::new()),
            out_bytes: Cell::new(0),
            grace: Cell::new(0),
            waker: Cell::new(None),
        }
    }

    /// Remembers the task's waker, so others can wake it.
    pub fn set_waker(&self, w: &Waker) {
        match self.waker.take() {
            Some(old) if old.will_wake(w) => self.waker.set(Some(old)),
            _ => self.waker.set(Some(w.clone())),
        }
    }

    /// Wakes the connection's task after the shard's next poll of its
    /// ring, so that what that poll brings leaves in the same send
    /// ([`crate::flush`]).
    pub fn wake(&self) {
        if let Some(w) = self.waker.take() {
            crate::flush::wake(&w);
            self.waker.set(Some(w));
        }
    }

    /// Queues `item` unless the queue would exceed `limit` bytes. Returns
    /// false when it did not fit: the caller closes the connection as a
    /// slow consumer (the item is dropped). A message of a channel whose
    /// recovery is in flight is held by the session instead (at most
    /// `held_max`; past it the connection closes with 4009).
    pub fn push(&self, item: Out, limit: usize, held_max: usize) -> bool {
        {
            let mut st = self.session.borrow_mut();
            // Closing, or a close decided and not yet carried out: nothing
            // more is queued. A message queued after a 4009 was decided
            // would reach the client before its `bye` and move its position
            // past the gap it is told to recover.
            if st.phase == crate::session::Phase::Closing || self.close_requested().is_some() {
                return true;
            }
            if let Out::Shared(d) = &item {
                match st.hold(d.env(), held_max) {
                    Ok(true) => return true,
                    Ok(false) => {}
                    Err(crate::session::HoldFull) => {
                        drop(st);
                        self.request_close(CloseReq::new(
                            edgegate_proto::CloseCode::INSUFFICIENT_STATE,
                            "too many live messages during recovery",
                        ));
                        return true;
                    }
                }
            }
        }
        let n = item.approx_len();
        let live = self.live_bytes();
        if live + n > limit && live > 0 {
            return false;
        }
        self.push_unbounded(item);
        true
    }

    /// Bytes queued beyond a replay's grace (what the live bound counts).
    fn live_bytes(&self) -> usize {
        self.out_bytes
            .get()
            .saturating_sub(self.grace.get() as usize)
    }

    /// Queues a message that may be dropped (an ephemeral message, a
    /// `members` batch): not for a connection that is behind (its live
    /// queue over half of `limit`), nor while a recovery of its channel is
    /// in flight (it would come before the `ok`). Returns false when it was
    /// dropped; it never makes the connection a slow consumer.
    pub fn push_droppable(&self, item: Out, limit: usize) -> bool {
        {
            let st = self.session.borrow();
            if st.phase == crate::session::Phase::Closing || self.close_requested().is_some() {
                return true;
            }
            if let Out::Shared(d) = &item
                && d.env().ch.as_deref().is_some_and(|ch| st.is_recovering(ch))
            {
                return false;
            }
        }
        if self.live_bytes() + item.approx_len() > limit / 2 {
            return false;
        }
        self.push_unbounded(item);
        true
    }

    /// Queues a reply envelope; replies are small and never refused (a
    /// client that floods requests is stopped by rate limits, not here).
    pub fn reply(&self, env: Envelope) {
        self.push_unbounded(Out::Own(Box::new(env)));
    }

    /// Queues `item` whatever the queue holds (replies; a client that
    /// floods requests is stopped by rate limits, and its replies count
    /// against the live bound of [`Conn::push`]).
    pub fn push_unbounded(&self, item: Out) {
        self.out_bytes.set(self.out_bytes.get() + item.approx_len());
        let mut q = self.out.borrow_mut();
        let was_empty = q.is_empty();
        q.push_back(item);
        drop(q);
        if was_empty {
            self.wake();
        }
    }

    /// Queues a message of a recovery's replay whatever the queue holds
    /// (bounded by `history.recovery_limit`, not by the queue); live
    /// messages are bounded on top of it, so that a subscriber catching
    /// up is not taken for a slow consumer.
    pub fn push_replay(&self, item: Out) {
        let n = u32::try_from(item.approx_len()).unwrap_or(u32::MAX);
        self.grace.set(self.grace.get().saturating_add(n));
        self.push_unbounded(item);
    }

    /// True when output is waiting.
    pub fn has_output(&self) -> bool {
        !self.out.borrow().is_empty()
    }

    /// Bytes waiting in the queue (estimated).
    pub fn queued_bytes(&self) -> usize {
        self.out_bytes.get()
    }

    /// Moves queued items into `buf` in this connection's framing, up to about
    /// `max` bytes (at least one item). Returns the number of envelopes.
    pub fn drain_into(&self, buf: &mut Vec<u8>, max: usize) -> usize {
        self.drain_after(buf, 0, max)
    }

    /// [`Conn::drain_into`], for a message that starts at `buf[from..]`
    /// (written in place after a frame header's room).
    pub fn drain_after(&self, buf: &mut Vec<u8>, from: usize, max: usize) -> usize {
        let framing = self.framing.get();
        // Room for the batch at once: grown envelope by envelope, a batch of
        // a few KiB was copied whole on each of its half-dozen regrowths.
        // The estimate leaves out most of the JSON's keys and quotes, so
        // half again is reserved (the buffer is given back once written).
        let est = self.out_bytes.get().min(max);
        buf.reserve(est + est / 2 + RESERVE_SLACK);
        self.drain_each(max, |item| {
            let before = buf.len();
            item.write_after(framing, buf, from);
            buf.len() - before
        })
    }

    /// Takes queued items, in order, while about `max` bytes have not been
    /// written (at least one); `write` writes one and says how many bytes it
    /// wrote. Returns how many it took.
    pub fn drain_each(&self, max: usize, mut write: impl FnMut(&Out) -> usize) -> usize {
        let mut q = self.out.borrow_mut();
        let (mut n, mut written) = (0, 0);
        while let Some(len) = q.front().map(Out::approx_len) {
            if n > 0 && written + len > max {
                break;
            }
            let Some(item) = q.pop_front() else { break };
            self.out_bytes.set(self.out_bytes.get().saturating_sub(len));
            self.grace.set(
                self.grace
                    .get()
                    .saturating_sub(u32::try_from(len).unwrap_or(u32::MAX)),
            );
            written += write(&item);
            n += 1;
        }
        if q.is_empty() {
            self.out_bytes.set(0);
            self.grace.set(0);
            // Idle connections hold no queue memory.
            *q = VecDeque::new();
        }
        n
    }

    /// Drops everything queued (slow consumer: the `bye` must not wait behind it).
    pub fn clear_output(&self) -> usize {
        let mut q = self.out.borrow_mut();
        let n = q.len();
        *q = VecDeque::new();
        self.out_bytes.set(0);
        self.grace.set(0);
        n
    }

    /// Asks the task to close with `req`. The first request wins.
    pub fn request_close(&self, req: CloseReq) {
        if self.closing() {
            return;
        }
        if self.close_requested().is_none() {
            self.close.set(Some(Box::new(req)));
            self.wake();
        }
    }

    /// A pending close request, if any.
    pub fn close_requested(&self) -> Option<CloseReq> {
        let req = self.close.take();
        let copy = req.as_deref().cloned();
        self.close.set(req);
        copy
    }

    /// The user id, if welcomed.
    pub fn user(&self) -> Option<UserId> {
        self.session.borrow().user.clone()
    }

    /// True once the connection is closing: nothing more is queued.
    pub fn closing(&self) -> bool {
        self.session.borrow().phase == crate::session::Phase::Closing
    }

    /// Marks the connection as closing.
    pub fn set_closing(&self) {
        self.session.borrow_mut().phase = crate::session::Phase::Closing;
    }

    /// Channels subscribed.
    pub fn subscriptions(&self) -> usize {
        self.session.borrow().subs.len()
    }
}

#[cfg(test)]
mod size_tests {
    /// An idle connection's record is on the memory budget
    /// (docs/architecture.md): with the `Rc` counts it must stay within
    /// mimalloc's 224-byte size class.
    #[test]
    fn conn_fits_its_budget() {
        let n = std::mem::size_of::<super::Conn>();
        assert!(n + 16 <= 224, "Conn is {n} bytes");
        assert_eq!(std::mem::size_of::<super::Peer>(), 20);
    }

    /// A JSON batch written after a frame header's room separates its
    /// envelopes by newlines, and does not start with one.
    #[test]
    fn a_batch_in_place_starts_at_its_first_envelope() {
        use super::{Framing, Out};
        let mut buf = vec![0u8; 10];
        let ping = Out::Own(Box::new(edgegate_proto::Envelope::ping(None)));
        ping.write_after(Framing::WsJson, &mut buf, 10);
        assert_eq!(buf[10], b'{');
        let one = buf.len() - 10;
        ping.write_after(Framing::WsJson, &mut buf, 10);
        assert_eq!(buf[10 + one], b'\n');
        let mut plain = Vec::new();
        ping.write(Framing::WsJson, &mut plain);
        ping.write(Framing::WsJson, &mut plain);
        assert_eq!(&buf[10..], &plain[..]);
    }

    #[test]
    fn peer_shows_as_the_socket_address() {
        for a in ["127.0.0.1:4242", "[::1]:443", "[2001:db8::7]:65535"] {
            let sa: std::net::SocketAddr = a.parse().unwrap_or_else(|_| unreachable!());
            let p = super::Peer::from(sa);
            assert_eq!(p.to_string(), a);
            assert_eq!(p.addr(), sa);
        }
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    fn msg(pad: usize) -> Out {
        let mut e = Envelope::new(edgegate_proto::Type::Msg);
        e.ch = Some("room:a".into());
        e.payload = Payload::Json(Bytes::from(format!("\"{}\"", "x".repeat(pad))));
        Out::Own(Box::new(e))
    }

    fn conn() -> Conn {
        let peer = "127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!());
        Conn::new(1, 0, Transport::Ws, peer, 0)
    }

    #[test]
    fn live_messages_are_bounded_on_top_of_a_replay() {
        let limit = 4096;
        // Without a replay: a live queue past the limit is a slow consumer.
        let c = conn();
        let mut accepted = 0;
        while c.push(msg(1000), limit, 100) {
            accepted += 1;
            assert!(accepted < 100, "the bound never hit");
        }
        assert!(
            (3..=5).contains(&accepted),
            "{accepted} live messages in 4 KiB"
        );
        // A replay ten times the limit is queued whatever the limit...
        let c = conn();
        for _ in 0..40 {
            c.push_replay(msg(1000));
        }
        assert!(c.queued_bytes() > 10 * limit);
        // ...and the live messages behind it get the same room as before.
        let mut live = 0;
        while c.push(msg(1000), limit, 100) {
            live += 1;
            assert!(live < 100, "the bound never hit");
        }
        assert_eq!(live, accepted);
        // Replies still count against the live bound.
        let c = conn();
        for _ in 0..10 {
            c.push_unbounded(msg(1000));
        }
        assert!(!c.push(msg(1000), limit, 100));
        // Draining releases the replay's grace; an empty queue starts afresh.
        let c = conn();
        for _ in 0..40 {
            c.push_replay(msg(1000));
        }
        let mut buf = Vec::new();
        c.drain_into(&mut buf, usize::MAX);
        assert_eq!(c.queued_bytes(), 0);
        let mut again = 0;
        while c.push(msg(1000), limit, 100) {
            again += 1;
            assert!(again < 100, "the bound never hit");
        }
        assert_eq!(again, accepted);
    }
}
