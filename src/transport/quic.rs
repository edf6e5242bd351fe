//! QUIC: quinn 0.11 on the shards themselves, through a glommio-backed
//! [`quinn::Runtime`], and the session stream as a [`Wire`].
//!
//! Each shard binds its own `quinn::Endpoint` on `[quic] listen` with
//! `SO_REUSEPORT`, so the kernel spreads clients over the shards by the
//! hash of their 4-tuple. A client must offer ALPN `edgegate/1` (any other
//! fails the TLS handshake with `no_application_protocol`); the first
//! bidirectional stream it opens is the session stream, framed as TCP
//! without the preface (u32 big-endian length + binary envelope).
//!
//! # The runtime and thread confinement
//!
//! quinn's runtime traits demand `Send + Sync`, while glommio's timers and
//! sockets are thread-local (`Rc` inside). The types here claim `Send` and
//! `Sync` so that quinn accepts them, and every method checks that it runs
//! on the thread that made the object ([`Owner::check`]); nothing of a
//! shard's endpoint ever leaves its shard (quinn only moves these handles
//! into tasks it spawns through the runtime, which are glommio local tasks
//! on the same executor).
//!
//! - tasks: `glommio::spawn_local`;
//! - timers: `glommio::timer::Timer`;
//! - the UDP socket: `quinn::udp::UdpSocketState` does the send/recv (GSO
//!   and GRO kept); a duplicate descriptor of the same socket, wrapped as a
//!   glommio `UdpSocket`, gives read readiness (a 1-byte `MSG_PEEK` through
//!   io_uring, which completes when a datagram waits and consumes nothing).
//!   UDP sends almost never block; when one does, the sender retries after
//!   a 1 ms glommio timer.
//!
//! # Addresses that change
//!
//! A client whose address changes (NAT rebinding, Wi-Fi to mobile) usually
//! hashes to another shard, which has no state for its connection IDs: the
//! packet is dropped or answered with a stateless reset. All shards derive
//! reset tokens from one node-wide key, so the client accepts that reset and
//! reconnects at once; otherwise its connection times out and it
//! reconnects. On the old shard the connection hears nothing more and is
//! closed by the idle timeout (QUIC's and the gateway's, which are the
//! same), releasing everything.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use edgegate_proto::Envelope;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, UdpPoller, VarInt};

use super::{BATCH_BYTES, LINGER, RxCarry, TxBuf, Wire, WireError};
use crate::shard::Shard;
use crate::tls::CertStore;

/// The ALPN a client must offer (docs/protocol.md §1).
pub const ALPN: &[u8] = b"edgegate/1";

/// How long a sender waits before retrying a UDP send that would block.
const SEND_RETRY: Duration = Duration::from_millis(1);

// ---- thread confinement -----------------------------------------------------

thread_local! {
    static MARK: u8 = const { 0 };
}

/// The thread an object was made on, checked on every use.
#[derive(Debug, Clone, Copy)]
struct Owner(usize);

impl Owner {
    fn here() -> Owner {
        Owner(MARK.with(|m| m as *const u8 as usize))
    }

    /// Panics when called on another thread than the owner's: glommio
    /// objects must never leave their shard.
    fn check(&self) {
        assert_eq!(
            Owner::here().0,
            self.0,
            "a QUIC runtime object left its shard's thread"
        );
    }
}

// ---- runtime ----------------------------------------------------------------

/// A `quinn::Runtime` on the current glommio shard.
#[derive(Debug)]
pub struct ShardRuntime {
    owner: Owner,
}

impl ShardRuntime {
    /// A runtime for the shard this is called on.
    pub fn here() -> Self {
        ShardRuntime {
            owner: Owner::here(),
        }
    }
}

impl Runtime for ShardRuntime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        self.owner.check();
        Box::pin(ShardTimer {
            owner: self.owner,
            timer: glommio::timer::Timer::new(i.saturating_duration_since(Instant::now())),
        })
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.owner.check();
        glommio::spawn_local(future).detach();
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        self.owner.check();
        Ok(Arc::new(ShardUdp::new(t)?))
    }
}

/// A glommio timer, as quinn wants one.
struct ShardTimer {
    owner: Owner,
    timer: glommio::timer::Timer,
}

// SAFETY: the timer is only touched through `reset` and `poll`, which check
// that they run on the owner's thread; quinn keeps timers inside tasks that
// this runtime spawned on the same glommio executor, so it is also dropped
// there.
unsafe impl Send for ShardTimer {}

impl fmt::Debug for ShardTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShardTimer")
    }
}

impl AsyncTimer for ShardTimer {
    fn reset(mut self: Pin<&mut Self>, i: Instant) {
        self.owner.check();
        self.timer
            .reset(i.saturating_duration_since(Instant::now()));
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        self.owner.check();
        Pin::new(&mut self.timer).poll(cx).map(|_| ())
    }
}

/// The endpoint's UDP socket.
struct ShardUdp {
    owner: Owner,
    io: std::net::UdpSocket,
    state: UdpSocketState,
    /// The same socket (a duplicate descriptor), for read readiness only.
    watch: Rc<glommio::net::UdpSocket>,
    /// The pending readiness wait, if any (only the endpoint driver reads).
    readable: RefCell<Option<Pin<Box<dyn Future<Output = ()>>>>>,
    /// The last send would have blocked (the kernel's buffer was full).
    blocked: Cell<bool>,
}

// SAFETY: `watch` and `readable` are thread-local glommio state; every
// method that touches them checks the owner's thread first, and quinn
// keeps the socket inside its endpoint, whose driver and connections are
// tasks on this shard's executor.
unsafe impl Send for ShardUdp {}
// SAFETY: as above; shared access never happens from another thread.
unsafe impl Sync for ShardUdp {}

impl fmt::Debug for ShardUdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardUdp").field("io", &self.io).finish()
    }
}

impl ShardUdp {
    fn new(io: std::net::UdpSocket) -> io::Result<Self> {
        let owner = Owner::here();
        // Sets the socket non-blocking, GRO/GSO, ECN and packet info.
        let state = UdpSocketState::new((&io).into())?;
        let dup = io.as_fd().try_clone_to_owned()?;
        // SAFETY: `dup` is a descriptor we own (just duplicated); ownership
        // passes to the glommio socket, which closes it.
        let watch = unsafe { glommio::net::UdpSocket::from_raw_fd(dup.into_raw_fd()) };
        Ok(ShardUdp {
            owner,
            io,
            state,
            watch: Rc::new(watch),
            readable: RefCell::new(None),
            blocked: Cell::new(false),
        })
    }
}

impl AsyncUdpSocket for ShardUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.owner.check();
        Box::pin(ShardPoller {
            owner: self.owner,
            socket: self,
            wait: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.owner.check();
        let r = self.state.send((&self.io).into(), transmit);
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.blocked.set(true);
        }
        r
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.owner.check();
        // Bounded: a readiness that keeps firing without data (an error
        // queued on the socket) must not spin this task.
        for _ in 0..4 {
            match self.state.recv((&self.io).into(), bufs, meta) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let mut slot = self.readable.borrow_mut();
            let wait = slot.get_or_insert_with(|| {
                let watch = self.watch.clone();
                Box::pin(async move {
                    let mut one = [0u8; 1];
                    let _ = watch.peek_from(&mut one).await;
                })
            });
            ready!(wait.as_mut().poll(cx));
            *slot = None;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// Write readiness. quinn asks before every send: ready at once unless the
/// last send would have blocked; then ready again after a short timer (UDP
/// sockets rarely fill, and glommio offers no write-readiness wait).
struct ShardPoller {
    owner: Owner,
    socket: Arc<ShardUdp>,
    wait: Option<glommio::timer::Timer>,
}

// SAFETY: as for `ShardTimer`: checked on every poll, kept in tasks of this
// shard.
unsafe impl Send for ShardPoller {}
// SAFETY: as above.
unsafe impl Sync for ShardPoller {}

impl fmt::Debug for ShardPoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShardPoller")
    }
}

impl UdpPoller for ShardPoller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.owner.check();
        if !self.socket.blocked.get() {
            return Poll::Ready(Ok(()));
        }
        let timer = self
            .wait
            .get_or_insert_with(|| glommio::timer::Timer::new(SEND_RETRY));
        ready!(Pin::new(timer).poll(cx));
        self.wait = None;
        self.socket.blocked.set(false);
        Poll::Ready(Ok(()))
    }
}

// ---- configuration ------------------------------------------------------------

/// What every shard needs to run its QUIC endpoint: built once at start,
/// cloned into the shards (all of it is `Send + Sync`, and immutable).
#[derive(Clone)]
pub struct QuicSetup {
    /// The UDP address of `[quic] listen`.
    pub addr: SocketAddr,
    endpoint: quinn::EndpointConfig,
    server: quinn::ServerConfig,
}

impl fmt::Debug for QuicSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicSetup")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl QuicSetup {
    /// The QUIC configuration over the node's certificate `store` (so a
    /// reload reaches new QUIC handshakes too): TLS 1.3 only, ALPN
    /// `edgegate/1`, one bidirectional stream per connection, keep-alive at
    /// the heartbeat interval and the idle timeout of the gateway.
    pub fn new(
        addr: SocketAddr,
        store: &Arc<CertStore>,
        hb_ms: u64,
        idle_ms: u64,
        max_frame: usize,
    ) -> Result<QuicSetup, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("quic.listen = {addr}: TLS set-up failed: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(store.resolver());
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.send_tls13_tickets = 0;
        tls.max_early_data_size = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| format!("quic.listen = {addr}: TLS set-up failed: {e}"))?;

        let mut transport = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(Duration::from_millis(idle_ms))
            .map_err(|_| format!("heartbeat idle timeout {idle_ms} ms is too long for QUIC"))?;
        // Flow-control windows bound what one client can make us buffer:
        // inbound, a few frames; outbound, a few batches (past that the
        // connection's own queue fills and it is closed as a slow consumer).
        let window = u32::try_from(max_frame.saturating_mul(2).max(64 << 10)).unwrap_or(u32::MAX);
        let send_window = (4 * BATCH_BYTES) as u64;
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(1))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .datagram_receive_buffer_size(None)
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(Duration::from_millis(hb_ms)))
            .stream_receive_window(VarInt::from_u32(window))
            .receive_window(VarInt::from_u32(window))
            .send_window(send_window);
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server
            .transport_config(Arc::new(transport))
            .max_incoming(1024)
            .incoming_buffer_size(64 << 10)
            .incoming_buffer_size_total(8 << 20);

        // One stateless-reset key for the whole node: a shard that gets a
        // packet of another shard's connection (the client's address
        // changed) answers with a reset the client accepts.
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .map_err(|_| "QUIC: cannot generate the stateless-reset key".to_string())?;
        let endpoint = quinn::EndpointConfig::new(Arc::new(key));
        Ok(QuicSetup {
            addr,
            endpoint,
            server,
        })
    }

    /// Binds this shard's endpoint (`SO_REUSEPORT`, like every listener).
    /// Call on the shard's thread.
    pub fn bind(&self) -> io::Result<quinn::Endpoint> {
        // glommio binds with SO_REUSEPORT; quinn gets its own duplicate
        // descriptor, the glommio socket closes its own when dropped.
        let g = glommio::net::UdpSocket::bind(self.addr)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: `g` is alive for this borrow; the duplicate is owned.
        let fd =
            unsafe { std::os::fd::BorrowedFd::borrow_raw(g.as_raw_fd()) }.try_clone_to_owned()?;
        let socket = std::net::UdpSocket::from(fd);
        let runtime = Arc::new(ShardRuntime::here());
        let udp = runtime.wrap_udp_socket(socket)?;
        drop(g);
        quinn::Endpoint::new_with_abstract_socket(
            self.endpoint.clone(),
            Some(self.server.clone()),
            udp,
            runtime,
        )
    }
}

/// Start-up for `[quic] listen = addr`: refuses to start when another
/// process already has the UDP port (with `SO_REUSEPORT` it would silently
/// take part of the clients) and builds the [`QuicSetup`] over the node's
/// certificate `store` (the one SIGHUP reloads). Errors name the key to fix.
pub fn setup(
    addr: SocketAddr,
    store: Option<&Arc<CertStore>>,
    shard: &crate::settings::ShardConfig,
) -> Result<QuicSetup, String> {
    // UDP has no TIME_WAIT: a plain bind (no SO_REUSEPORT) fails exactly
    // when some socket holds the port.
    if addr.port() != 0 {
        std::net::UdpSocket::bind(addr).map_err(|e| {
            format!(
                "quic.listen = {addr}: the UDP port is taken ({e}); is another process (a stale edgegate?) serving it?"
            )
        })?;
    }
    let store =
        store.ok_or_else(|| "quic.listen needs TLS: set tls.cert_chain and tls.key".to_string())?;
    QuicSetup::new(addr, store, shard.hb_ms, shard.idle_ms, shard.max_frame)
}

// ---- the session stream ---------------------------------------------------------

/// A QUIC connection's session stream, as a [`Wire`].
pub struct QuicWire {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// A partial frame carried over between reads (empty when idle).
    rx: RxCarry,
    /// Bytes not yet handed to quinn.
    tx: TxBuf,
    max_frame: u32,
}

/// Why a QUIC handshake did not give a session.
#[derive(Debug)]
pub enum HandshakeError {
    /// The TLS/QUIC handshake failed (wrong ALPN, bad packets, timeout).
    Connect(quinn::ConnectionError),
    /// The client never opened its session stream in time.
    NoStream,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Connect(e) => write!(f, "QUIC handshake failed: {e}"),
            HandshakeError::NoStream => f.write_str("no session stream opened"),
        }
    }
}

impl QuicWire {
    /// Completes the handshake of `incoming` and waits for the client's
    /// first bidirectional stream; bounded by `within` as a whole.
    pub async fn accept(
        incoming: quinn::Incoming,
        within: Duration,
        max_frame: usize,
    ) -> Result<QuicWire, HandshakeError> {
        let connecting = incoming.accept().map_err(HandshakeError::Connect)?;
        let r = glommio::timer::timeout(within, async {
            let conn = match connecting.await {
                Ok(c) => c,
                Err(e) => return Ok(Err(HandshakeError::Connect(e))),
            };
            match conn.accept_bi().await {
                Ok((send, recv)) => Ok(Ok(QuicWire::new(conn, send, recv, max_frame))),
                Err(e) => {
                    conn.close(VarInt::from_u32(4000), b"no session stream");
                    Ok(Err(HandshakeError::Connect(e)))
                }
            }
        })
        .await;
        match r {
            Ok(r) => r,
            Err(_) => Err(HandshakeError::NoStream),
        }
    }

    fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        max_frame: usize,
    ) -> Self {
        QuicWire {
            conn,
            send,
            recv,
            rx: RxCarry::default(),
            tx: TxBuf::default(),
            max_frame: u32::try_from(max_frame).unwrap_or(u32::MAX),
        }
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Consumes whole frames from `data` (TCP's framing, no preface).
    fn parse(max_frame: u32, data: &[u8], inbox: &mut Vec<Envelope>) -> Result<usize, WireError> {
        super::tcp::parse_frames(max_frame, data, inbox)
    }

    async fn flush_all(&mut self) -> Result<(), WireError> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }
}

impl Wire for QuicWire {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        shard: &Shard,
        inbox: &mut Vec<Envelope>,
    ) -> Poll<Result<(), WireError>> {
        let mut scratch = shard.scratch.borrow_mut();
        let n = match ready!(self.recv.poll_read(cx, &mut scratch[..])) {
            Ok(0) => return Poll::Ready(Err(WireError::Closed)),
            Ok(n) => n,
            // Reset, connection lost (timeout, CONNECTION_CLOSE), stopped.
            Err(_) => return Poll::Ready(Err(WireError::Closed)),
        };
        shard
            .metrics
            .bytes_in
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        let max = self.max_frame;
        self.rx
            .feed(&mut scratch[..n], |d| Self::parse(max, d, inbox))?;
        Poll::Ready(Ok(()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WireError>> {
        let send = &mut self.send;
        // Any write error (reset, stopped, connection lost) ends the session.
        ready!(self.tx.poll_write_all(cx, |cx, b| {
            Pin::new(&mut *send)
                .poll_write(cx, b)
                .map_err(|_| std::io::ErrorKind::BrokenPipe.into())
        }))?;
        Poll::Ready(Ok(()))
    }

    fn send(&mut self, batch: Vec<u8>) -> Result<(), WireError> {
        self.tx.push(batch);
        Ok(())
    }

    fn send_ping(&mut self) -> Result<bool, WireError> {
        Ok(false)
    }

    async fn close(&mut self, last: Vec<u8>, code: edgegate_proto::CloseCode, reason: &str) {
        let _ = self.send(last);
        if self.flush_all().await.is_ok() && self.send.finish().is_ok() {
            // CONNECTION_CLOSE abandons unsent stream data: wait (briefly)
            // until the peer has acknowledged the `bye`.
            let stopped = self.send.stopped();
            let _ = glommio::timer::timeout(LINGER, async {
                let _ = stopped.await;
                Ok(())
            })
            .await;
        }
        self.conn
            .close(VarInt::from_u32(u32::from(code.get())), reason.as_bytes());
    }

    async fn finish(&mut self) {
        // The peer ended its stream or the connection: end ours too.
        let _ = self.send.finish();
        self.conn.close(VarInt::from_u32(1000), b"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frames_across_any_split() {
        let envs = vec![Envelope::ping(Some(1)), Envelope::pong(Some(2))];
        let mut bytes = Vec::new();
        for e in &envs {
            edgegate_proto::frame::encode_frame(e, &mut bytes);
        }
        for split in 0..bytes.len() {
            let mut inbox = Vec::new();
            let used = QuicWire::parse(1024, &bytes[..split], &mut inbox).unwrap();
            let mut rest = bytes[used..split].to_vec();
            rest.extend_from_slice(&bytes[split..]);
            let used2 = QuicWire::parse(1024, &rest, &mut inbox).unwrap();
            assert_eq!(used2, rest.len());
            assert_eq!(inbox, envs, "split at {split}");
        }
    }

    #[test]
    fn refuses_big_frames() {
        let mut inbox = Vec::new();
        let big = 5000u32.to_be_bytes();
        assert!(matches!(
            QuicWire::parse(1024, &big, &mut inbox),
            Err(WireError::TooLarge)
        ));
    }

    #[test]
    fn owner_is_per_thread() {
        let here = Owner::here();
        here.check();
        let other = std::thread::spawn(Owner::here).join().unwrap();
        assert_ne!(here.0, other.0);
    }
}
