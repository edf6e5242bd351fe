//! Transports: thin adapters that turn a socket into envelopes in and
//! framed bytes out.
//!
//! Each transport implements [`Wire`]; [`drive`] runs one connection over
//! any of them: it reads envelopes and hands them to the session, writes
//! whatever the shard queued for the connection (batched: several envelopes
//! per write), sends heartbeats, and carries out the close the session or
//! the shard asked for. Everything above this module is transport-agnostic.

pub mod quic;
pub mod sse;
pub mod tcp;
pub mod ws;

use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use edgegate_proto::ws::MAX_HEADER;
use edgegate_proto::{CloseCode, DecodeError, Envelope};
use tracing::debug;

use crate::conn::{Conn, ConnLimits, Out};
use crate::session::carries_retry;
use crate::session::{self, Input};
use crate::shard::Shard;

/// One write carries at most about this many bytes of envelopes.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Envelopes handled per turn before the task yields to its neighbours.
const TURN_BUDGET: usize = 64;
/// How long a closing connection may take to get its `bye` out.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// How long the server reads and discards after its FIN (docs/protocol.md §6).
pub const LINGER: Duration = Duration::from_secs(1);

/// Why a transport stopped.
#[derive(Debug)]
pub enum WireError {
    /// The peer closed or reset; nothing more can be said to it.
    Closed,
    /// A socket error.
    Io(std::io::Error),
    /// Bytes that do not decode (close 4000 with this reason).
    Protocol(String),
    /// An envelope over `max_frame` (close 4006).
    TooLarge,
}

impl From<DecodeError> for WireError {
    fn from(e: DecodeError) -> Self {
        WireError::Protocol(e.to_string())
    }
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => WireError::Closed,
            _ => WireError::Io(e),
        }
    }
}

/// A transport, as the driver sees it. All methods are poll-style and hold
/// no buffer between calls unless data is in flight.
pub trait Wire {
    /// Reads what the socket has; appends the envelopes decoded to `inbox`.
    /// Ready(Ok) means bytes arrived (maybe no whole envelope yet).
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        shard: &Shard,
        inbox: &mut Vec<Envelope>,
    ) -> Poll<Result<(), WireError>>;

    /// Ready once everything handed to [`Wire::send`] is written.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WireError>>;

    /// Hands one batch of framed envelopes to the transport (call only after
    /// `poll_flush` was ready).
    fn send(&mut self, batch: Vec<u8>) -> Result<(), WireError>;

    /// Hands what `conn` has queued (about [`BATCH_BYTES`] at most) to the
    /// transport and counts it (call only after `poll_flush` was ready).
    /// One batch through [`Wire::send`]; a compressing WebSocket frames
    /// routed messages on their own, to send their shared compressed bytes.
    fn send_queued(&mut self, shard: &Shard, conn: &Conn) -> Result<(), WireError>
    where
        Self: Sized,
    {
        send_batch(self, shard, conn)
    }

    /// Sends a transport-level ping. Returns false when the transport has
    /// none (TCP, QUIC): the caller queues a `ping` envelope instead.
    fn send_ping(&mut self) -> Result<bool, WireError>;

    /// Sends the final batch (ending with `bye`), then the transport's own
    /// close (WebSocket close frame, FIN), then lingers briefly.
    fn close(
        &mut self,
        last: Vec<u8>,
        code: CloseCode,
        reason: &str,
    ) -> impl std::future::Future<Output = ()>;

    /// The peer went away: finish whatever the transport owes it (a
    /// WebSocket close reply), briefly.
    fn finish(&mut self) -> impl std::future::Future<Output = ()>;
}

/// Bytes of a frame split across reads, carried to the next read. Empty,
/// with no allocation, whenever the connection is between frames: reads go
/// into the shard's scratch buffer, and only a frame's unfinished tail is
/// copied here. Boxed: every idle connection's task carries one, and 16
/// bytes less keep the WebSocket task in a smaller allocation class
/// (docs/architecture.md, "Memory per idle connection").
#[derive(Default)]
#[allow(clippy::box_collection)] // the point: 8 bytes while empty, not 24
pub struct RxCarry(Option<Box<Vec<u8>>>);

impl RxCarry {
    /// A carry that starts with `bytes` (read before the wire existed, such
    /// as what followed a WebSocket upgrade request).
    pub fn with(bytes: Vec<u8>) -> Self {
        RxCarry((!bytes.is_empty()).then(|| Box::new(bytes)))
    }

    /// Runs `parse` over the carried bytes followed by `fresh`, keeping what
    /// it did not consume. `parse` gets mutable bytes (WebSocket unmasks in
    /// place) and returns how many it used.
    pub fn feed(
        &mut self,
        fresh: &mut [u8],
        parse: impl FnOnce(&mut [u8]) -> Result<usize, WireError>,
    ) -> Result<(), WireError> {
        match self.0.take() {
            None => {
                let used = parse(fresh)?;
                if used < fresh.len() {
                    self.0 = Some(Box::new(fresh[used..].to_vec()));
                }
            }
            Some(mut buf) => {
                buf.extend_from_slice(fresh);
                let used = parse(&mut buf)?;
                if used < buf.len() {
                    buf.drain(..used);
                    self.0 = Some(buf);
                }
            }
        }
        Ok(())
    }
}

/// The shard's scratch buffer, borrowed for one read, and the bytes read.
pub type ScratchRead<'s> = (std::cell::RefMut<'s, Box<[u8]>>, usize);

/// Reads what `stream` has into the shard's scratch buffer (counting the
/// bytes); ready with the buffer and the length read. End of stream is
/// [`WireError::Closed`].
pub fn poll_read_scratch<'s, S: futures_lite::AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
    shard: &'s Shard,
) -> Poll<Result<ScratchRead<'s>, WireError>> {
    let mut scratch = shard.scratch.borrow_mut();
    let n = std::task::ready!(std::pin::Pin::new(stream).poll_read(cx, &mut scratch[..]))?;
    if n == 0 {
        return Poll::Ready(Err(WireError::Closed));
    }
    shard.metrics.bytes_in.fetch_add(n as u64, Relaxed);
    Poll::Ready(Ok((scratch, n)))
}

/// Bytes handed to a wire and not yet written. Empty, with no allocation,
/// while the connection is idle: the buffer is given back once written.
#[derive(Default)]
pub struct TxBuf {
    buf: Vec<u8>,
    pos: usize,
}

impl TxBuf {
    /// Queues a whole batch (moved in, not copied, when nothing is pending).
    pub fn push(&mut self, batch: Vec<u8>) {
        if self.buf.is_empty() {
            self.buf = batch;
            self.pos = 0;
        } else {
            self.buf.extend_from_slice(&batch);
        }
    }

    /// The pending bytes, to append frames to in place.
    pub fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Appends one frame written in place: `fill` appends the payload
    /// after room for the longest header (it gets the buffer and where the
    /// payload starts), `header` gives the header for the payload's length,
    /// written at the end of that room. When nothing was pending, sending
    /// starts past the room's unused front; otherwise the gap is closed.
    /// Saves copying every payload byte from a batch into the frame.
    /// Returns what `fill` returned and the payload's length (0: no frame).
    pub fn frame_in_place<R>(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>, usize) -> R,
        header: impl FnOnce(usize) -> ([u8; MAX_HEADER], usize),
    ) -> (R, usize) {
        let start = self.buf.len();
        let from = start + MAX_HEADER;
        self.buf.resize(from, 0);
        let r = fill(&mut self.buf, from);
        let len = self.buf.len() - from;
        if len == 0 {
            self.buf.truncate(start);
            if self.buf.is_empty() {
                *self = TxBuf::default();
            }
            return (r, 0);
        }
        let (h, used) = header(len);
        let at = from - used;
        self.buf[at..from].copy_from_slice(&h[..used]);
        if start == 0 {
            self.pos = at;
        } else {
            self.buf.copy_within(at.., start);
            self.buf.truncate(start + used + len);
        }
        (r, len)
    }

    /// Bytes not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Writes everything pending with `write`; ready when nothing is left.
    pub fn poll_write_all(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&mut Context<'_>, &[u8]) -> Poll<std::io::Result<usize>>,
    ) -> Poll<Result<(), WireError>> {
        while self.pos < self.buf.len() {
            let n = std::task::ready!(write(cx, &self.buf[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(WireError::Closed));
            }
            self.pos += n;
        }
        if !self.buf.is_empty() {
            *self = TxBuf::default();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes everything pending to `stream`, then flushes it (TLS holds
    /// records it could not write yet; a no-op on a plain socket).
    pub fn poll_flush_to<S: futures_lite::AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WireError>> {
        std::task::ready!(self.poll_write_all(cx, |cx, b| {
            std::pin::Pin::new(&mut *stream).poll_write(cx, b)
        }))?;
        std::task::ready!(std::pin::Pin::new(stream).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }
}

/// FIN (after TLS close_notify on a TLS stream), then read and discard for
/// a short linger, so that a reset caused by unread input cannot destroy
/// the `bye` just written (docs/protocol.md §6).
pub async fn fin_and_linger<S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin>(
    stream: &mut S,
) {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.close().await;
    let _ = glommio::timer::timeout(LINGER, async {
        let mut sink = [0u8; 512];
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// [`Wire::send_queued`] as one batch: what every wire does without
/// compression.
pub fn send_batch<W: Wire>(wire: &mut W, shard: &Shard, conn: &Conn) -> Result<(), WireError> {
    let mut batch = Vec::new();
    let n = conn.drain_into(&mut batch, BATCH_BYTES);
    count_out(shard, n, batch.len());
    wire.send(batch)
}

/// Counts `n` envelopes sent in `bytes` bytes, as one write.
pub fn count_out(shard: &Shard, n: usize, bytes: usize) {
    if n > 0 {
        shard.metrics.writes_out.fetch_add(1, Relaxed);
    }
    shard.metrics.messages_out.fetch_add(n as u64, Relaxed);
    shard.metrics.bytes_out.fetch_add(bytes as u64, Relaxed);
}

/// How a session ended.
enum End {
    /// We close with this code and reason.
    Close(CloseCode, String),
    /// The peer is gone.
    Gone,
}

/// Runs one connection until it ends, then releases it from the shard.
pub async fn drive<W: Wire>(shard: &Rc<Shard>, conn: &Rc<Conn>, wire: &mut W) {
    // The inbound rate buckets live in the task, not in `Conn`: only this
    // task reads them, and the shard-visible record stays small.
    let mut limits = ConnLimits::new(shard.now_ms());
    let end = poll_fn(|cx| turn(shard, conn, wire, &mut limits, cx)).await;
    // Boxed, like the upgrade: only a closing connection pays for the
    // close path's state; an idle one carries just the poll above.
    Box::pin(finish(shard, conn, wire, end)).await;
}

/// Ends a connection: `bye` and the transport's close, or a quiet finish.
async fn finish<W: Wire>(shard: &Rc<Shard>, conn: &Rc<Conn>, wire: &mut W, end: End) {
    conn.set_closing();
    match end {
        End::Close(code, reason) => {
            if code == CloseCode::SLOW_CONSUMER {
                let dropped = conn.clear_output();
                shard
                    .metrics
                    .drops_slow_consumer
                    .fetch_add(dropped as u64, Relaxed);
            }
            // A core service may have chosen the retry_ms (a disconnect).
            let chosen = conn
                .close_requested()
                .filter(|r| r.code == code)
                .and_then(|r| r.retry_ms);
            let retry =
                chosen.or_else(|| carries_retry(code).then(|| shard.cfg.jittered_retry_ms()));
            let bye = Envelope::bye(code, &reason, retry);
            let mut last = Vec::new();
            conn.drain_into(&mut last, usize::MAX);
            Out::Own(Box::new(bye)).write(conn.framing.get(), &mut last);
            shard.metrics.close(code);
            debug!(peer = %conn.peer, code = code.get(), reason = %reason, "closing");
            let _ = glommio::timer::timeout(CLOSE_FLUSH, async {
                wire.close(last, code, &reason).await;
                Ok(())
            })
            .await;
        }
        End::Gone => {
            let _ = glommio::timer::timeout(LINGER, async {
                wire.finish().await;
                Ok(())
            })
            .await;
        }
    }
}

/// One turn of a connection: write what is queued, read what arrived, hand
/// it to the session; repeat while there is progress and budget.
fn turn<W: Wire>(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    wire: &mut W,
    limits: &mut ConnLimits,
    cx: &mut Context<'_>,
) -> Poll<End> {
    conn.set_waker(cx.waker());
    // Per turn, not per connection: an idle connection holds no envelope buffer.
    let mut inbox: Vec<Envelope> = Vec::new();
    let inbox = &mut inbox;
    let mut budget = TURN_BUDGET;
    loop {
        if let Some(req) = conn.close_requested() {
            return Poll::Ready(End::Close(req.code, req.reason.to_string()));
        }
        let mut progress = false;

        match wire.poll_flush(cx) {
            Poll::Ready(Err(e)) => return Poll::Ready(end_of(e)),
            Poll::Ready(Ok(())) => {
                if conn.want_ping.replace(false) {
                    match wire.send_ping() {
                        Ok(true) => progress = true,
                        Ok(false) => conn.reply(Envelope::ping(None)),
                        Err(e) => return Poll::Ready(end_of(e)),
                    }
                }
                if conn.has_output() {
                    if let Err(e) = wire.send_queued(shard, conn) {
                        return Poll::Ready(end_of(e));
                    }
                    progress = true;
                }
            }
            Poll::Pending => {}
        }

        // The wires count every byte they read into the shard's own counter;
        // the difference across this poll is this connection's (one task
        // runs at a time on a shard), without changing the Wire trait.
        let bytes_before = shard.metrics.bytes_in.load(Relaxed);
        match wire.poll_recv(cx, shard, inbox) {
            Poll::Ready(Err(e)) => {
                // Envelopes decoded before the bad bytes still count.
                for env in inbox.drain(..) {
                    shard.input(conn, Input::Client(env));
                    if let Some(req) = conn.close_requested() {
                        return Poll::Ready(End::Close(req.code, req.reason.to_string()));
                    }
                }
                return Poll::Ready(end_of(e));
            }
            Poll::Ready(Ok(())) => {
                conn.last_rx_ms.set(shard.now_ms());
                shard
                    .metrics
                    .messages_in
                    .fetch_add(inbox.len() as u64, Relaxed);
                let bytes = shard.metrics.bytes_in.load(Relaxed) - bytes_before;
                let mut limited = Limited::check(shard, limits, bytes);
                // Taken, not drained: an idle connection keeps no envelope buffer.
                for env in std::mem::take(inbox) {
                    if limited.refuse(shard, limits) {
                        conn.reply(session::rate_limited(env.id));
                        if limited.strikes >= shard.cfg.rate_limited_close_after {
                            limited.store(limits);
                            return Poll::Ready(End::Close(
                                CloseCode::RATE_LIMITED,
                                "rate limited".into(),
                            ));
                        }
                        budget = budget.saturating_sub(1);
                        continue;
                    }
                    shard.input(conn, Input::Client(env));
                    if let Some(req) = conn.close_requested() {
                        return Poll::Ready(End::Close(req.code, req.reason.to_string()));
                    }
                    budget = budget.saturating_sub(1);
                }
                limited.store(limits);
                budget = budget.saturating_sub(1);
                progress = true;
            }
            Poll::Pending => {}
        }

        if !progress {
            return Poll::Pending;
        }
        if budget == 0 {
            // Let the shard's other connections run; come back at once.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
    }
}

/// The per-connection rate limits for one read's envelopes: the byte
/// bucket is charged once for the read (over it, every envelope of the
/// read is refused), the envelope bucket once per envelope.
struct Limited {
    over_bytes: bool,
    strikes: u32,
    active: bool,
}

impl Limited {
    fn check(shard: &Shard, l: &mut ConnLimits, bytes: u64) -> Limited {
        let cfg = &shard.cfg;
        if cfg.conn_msgs.unlimited() && cfg.conn_bytes.unlimited() {
            return Limited {
                over_bytes: false,
                strikes: 0,
                active: false,
            };
        }
        let now = shard.now_ms();
        // A client that let its buckets refill has slowed down: forgiven.
        if l.strikes > 0
            && l.msgs.is_full(&cfg.conn_msgs, now)
            && l.bytes.is_full(&cfg.conn_bytes, now)
        {
            l.strikes = 0;
        }
        let over_bytes = !l.bytes.try_take(&cfg.conn_bytes, bytes, now);
        Limited {
            over_bytes,
            strikes: l.strikes,
            active: true,
        }
    }

    /// True when the next envelope must be refused (and counts it).
    fn refuse(&mut self, shard: &Shard, l: &mut ConnLimits) -> bool {
        if !self.active {
            return false;
        }
        let over = self.over_bytes || !l.msgs.try_take(&shard.cfg.conn_msgs, 1, shard.now_ms());
        if over {
            self.strikes += 1;
            shard.metrics.rate_limited.fetch_add(1, Relaxed);
        }
        over
    }

    fn store(&self, l: &mut ConnLimits) {
        if self.active {
            l.strikes = self.strikes;
        }
    }
}

fn end_of(e: WireError) -> End {
    match e {
        WireError::Closed => End::Gone,
        WireError::Io(e) => {
            debug!(error = %e, "socket error");
            End::Gone
        }
        WireError::Protocol(reason) => End::Close(CloseCode::PROTOCOL_ERROR, reason),
        WireError::TooLarge => End::Close(CloseCode::FRAME_TOO_LARGE, "frame too large".into()),
    }
}

#[cfg(test)]
mod size_tests {
    use std::mem::size_of;

    /// Every idle connection's task carries its wire; these sizes keep the
    /// plain WebSocket task in mimalloc's 384-byte class
    /// (docs/architecture.md, "Memory per idle connection"). glommio's
    /// stream is 56 bytes only with the patched copy in `third_party/`
    /// (120 upstream): this also fails if the patch stops being used.
    #[test]
    fn an_idle_wire_stays_small() {
        assert_eq!(size_of::<super::RxCarry>(), 8);
        assert_eq!(size_of::<edgegate_proto::ws::Reader>(), 8);
        assert_eq!(size_of::<glommio::net::TcpStream>(), 56);
        let ws = size_of::<super::ws::WsWire<glommio::net::TcpStream>>();
        assert!(ws <= 120, "WsWire is {ws} bytes");
        // One task type carries a WebSocket or an SSE stream: no larger
        // than the WebSocket wire alone.
        let either = size_of::<super::sse::HttpWire<glommio::net::TcpStream>>();
        assert!(either <= 120, "HttpWire is {either} bytes");
    }

    /// Every socket also has glommio's readiness source behind an `Rc`: the
    /// patched copy keeps it in mimalloc's 224-byte class, apart from the
    /// short-lived 256-byte blocks of a connection's set-up (472 bytes
    /// upstream; `third_party/README.md`).
    #[test]
    fn a_sockets_readiness_source_stays_in_its_class() {
        let source = glommio::__edgegate_source_size();
        assert!(source <= 224, "glommio's source is {source} bytes");
    }

    /// A TLS stream holds rustls' connection, the socket and nothing inline
    /// for its buffers (they are boxed while in use): with the plain wire
    /// above, the WSS task stays in mimalloc's 1 536-byte class.
    #[test]
    fn an_idle_tls_stream_holds_no_buffer_inline() {
        type Tls = crate::tls::TlsStream<glommio::net::TcpStream>;
        let inner = size_of::<rustls::server::UnbufferedServerConnection>()
            + size_of::<glommio::net::TcpStream>();
        let tls = size_of::<Tls>();
        assert!(
            tls <= inner + 16,
            "TlsStream is {tls} bytes, its parts {inner}"
        );
    }
}

#[cfg(test)]
mod txbuf_tests {
    use super::TxBuf;
    use edgegate_proto::ws::{OP_TEXT, frame_header, write_frame};

    fn pending(t: &TxBuf) -> Vec<u8> {
        t.buf[t.pos..].to_vec()
    }

    /// A frame written in place is byte for byte the frame `write_frame`
    /// makes of the same payload, for each header length, whether or not
    /// something was pending before it.
    #[test]
    fn a_frame_in_place_is_the_frame_of_its_payload() {
        for len in [1usize, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut want = Vec::new();
            write_frame(OP_TEXT, &payload, &mut want);

            let mut t = TxBuf::default();
            let (r, n) = t.frame_in_place(
                |buf, from| {
                    assert_eq!(buf.len(), from);
                    buf.extend_from_slice(&payload);
                    7
                },
                |n| frame_header(OP_TEXT, n),
            );
            assert_eq!((r, n), (7, len));
            assert_eq!(pending(&t), want, "len {len}, nothing pending");

            let mut t = TxBuf::default();
            t.push(b"ping".to_vec());
            t.frame_in_place(
                |buf, _| buf.extend_from_slice(&payload),
                |n| frame_header(OP_TEXT, n),
            );
            let mut both = b"ping".to_vec();
            both.extend_from_slice(&want);
            assert_eq!(pending(&t), both, "len {len}, behind pending bytes");
        }
    }

    /// Nothing drained: no frame, and an idle buffer holds nothing.
    #[test]
    fn an_empty_payload_makes_no_frame() {
        let mut t = TxBuf::default();
        let ((), n) = t.frame_in_place(|_, _| (), |n| frame_header(OP_TEXT, n));
        assert_eq!(n, 0);
        assert_eq!(t.pending(), 0);
        assert_eq!(t.buf.capacity(), 0);
    }
}
