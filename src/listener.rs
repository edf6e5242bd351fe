//! Listeners: one SO_REUSEPORT socket per transport per shard, so the
//! kernel spreads new connections over the shards.
//!
//! Accepting is where the node's connection limit is enforced: a socket
//! over the limit is told `bye` 4007 with a jittered `retry_ms` and closed,
//! and the number of sockets being refused at once is itself bounded, so a
//! flood cannot exhaust file descriptors.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::time::{Duration, Instant};

use edgegate_proto::Envelope;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::StaticPermit;
use tracing::{debug, warn};

use crate::admission::{Admission, Refusal};
use crate::conn::{Conn, Framing, Out};
use crate::metrics::Transport;
use crate::session::Input;
use crate::shard::Shard;
use crate::tls::{TlsAcceptorHandle, TlsStream};
use crate::transport::quic::QuicWire;
use crate::transport::sse::{self, HttpWire};
use crate::transport::tcp::TcpWire;
use crate::transport::ws::{self, Route, WsWire};
use crate::transport::{self, Wire};

/// Accepts connections on `listener` until the task is dropped.
pub async fn accept_loop(
    shard: Rc<Shard>,
    admission: Rc<Admission>,
    listener: TcpListener,
    transport: Transport,
) {
    let mut errors = 0u32;
    loop {
        // WebSocket and TLS: take a handshake permit before accepting, so
        // that at most MAX_HANDSHAKES upgrades and TLS handshakes are in
        // flight on this shard.
        let tls = tls_of(&shard, transport);
        let permit = if transport == Transport::Ws || tls.is_some() {
            match shard.handshakes.acquire_static_permit(1).await {
                Ok(p) => Some(p),
                Err(_) => return, // closed: draining
            }
        } else {
            None
        };
        let stop = shard.stop.clone();
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            let _ = stop.acquire(1).await; // fails (returns) once the drain begins
            None
        })
        .await;
        let Some(accepted) = accepted else {
            return; // draining: the listener closes as this task ends
        };
        let stream = match accepted {
            Ok(s) => {
                errors = 0;
                s
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; log sparsely.
                errors += 1;
                if errors == 1 || errors.is_multiple_of(1000) {
                    warn!(shard = shard.id, transport = transport.name(), error = %e, "accept failed");
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let slot = Slot::take(&shard, transport);
        let _ = stream.set_nodelay(true);
        // The connection limit first (it protects descriptors), then the
        // per-address and accept-rate budgets (they pace a storm).
        let refusal = if !slot.admitted {
            shard.metrics.refused_max_conn[transport as usize].fetch_add(1, Relaxed);
            Some(Refusal::ConnectionLimit)
        } else {
            match stream.peer_addr() {
                Ok(peer) => admit(&shard, &admission, peer.ip()),
                Err(_) => None, // gone already; serving it ends at once
            }
        };
        // One task per connection, its future specific to the transport, so
        // an idle TCP connection does not carry WebSocket state. The socket
        // goes in boxed: an async fn keeps its arguments' space for its whole
        // life, and a 120-byte stream moved into the wire would otherwise be
        // paid twice by every idle connection.
        let stream = Box::new(stream);
        let task = match (refusal, transport, tls) {
            (None, Transport::Ws, None) => glommio::spawn_local(serve_ws(slot, stream, permit)),
            (None, Transport::Ws, Some(tls)) => {
                glommio::spawn_local(serve_wss(slot, stream, permit, tls))
            }
            (None, _, None) => glommio::spawn_local(serve_tcp(slot, stream)),
            (None, _, Some(tls)) => glommio::spawn_local(serve_tcp_tls(slot, stream, permit, tls)),
            (Some(r), _, tls) => {
                let retry = admission.retry_ms(&shard.cfg, r);
                glommio::spawn_local(refuse(slot, *stream, permit, tls, r, retry))
            }
        };
        task.detach();
    }
}

/// The per-address and accept-rate budgets for a socket from `ip`.
fn admit(shard: &Shard, admission: &Admission, ip: std::net::IpAddr) -> Option<Refusal> {
    let now = shard.refresh_clock();
    admission.admit(&shard.cfg, &shard.metrics, ip, now).err()
}

/// A connection's place in the node's count, from accept until its socket
/// is released (dropping the slot releases it).
struct Slot {
    shard: Rc<Shard>,
    /// The listener's transport, until the request says otherwise (SSE
    /// comes in on the WebSocket listener).
    transport: std::cell::Cell<Transport>,
    admitted: bool,
}

impl Slot {
    fn take(shard: &Rc<Shard>, transport: Transport) -> Self {
        let t = transport as usize;
        shard.metrics.accepted[t].fetch_add(1, Relaxed);
        shard.metrics.connections[t].fetch_add(1, Relaxed);
        let open = shard.node.open.fetch_add(1, AcqRel) + 1;
        Slot {
            shard: shard.clone(),
            transport: std::cell::Cell::new(transport),
            admitted: open <= shard.node.max_connections,
        }
    }

    /// The socket turned out to be `transport`'s (an SSE request on the
    /// WebSocket listener): its open socket counts there from now on, and
    /// it is counted as accepted there too.
    fn retag(&self, transport: Transport) {
        let m = &self.shard.metrics;
        let old = self.transport.replace(transport);
        m.connections[old as usize].fetch_sub(1, Relaxed);
        m.connections[transport as usize].fetch_add(1, Relaxed);
        m.accepted[transport as usize].fetch_add(1, Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shard.node.open.fetch_sub(1, AcqRel);
        self.shard.metrics.connections[self.transport.get() as usize].fetch_sub(1, Relaxed);
    }
}

async fn serve_tcp(slot: Slot, stream: Box<TcpStream>) {
    let shard = &slot.shard;
    // Set up outside the async state: only the wire and the connection
    // stay in the task while it is idle.
    let setup = || {
        let stream = *stream;
        let peer = stream.peer_addr().ok()?;
        let conn = shard.register(Transport::Tcp, peer);
        Some((conn, TcpWire::new(stream, shard.cfg.max_frame)))
    };
    let Some((conn, mut wire)) = setup() else {
        return;
    };
    transport::drive(shard, &conn, &mut wire).await;
    shard.release(&conn);
}

/// The TLS settings of `transport`'s listener on this shard, if it speaks TLS.
fn tls_of(shard: &Shard, transport: Transport) -> Option<TlsAcceptorHandle> {
    match transport {
        Transport::Ws => shard.cfg.tls_ws.clone(),
        Transport::Tcp => shard.cfg.tls_tcp.clone(),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// The TLS handshake, bounded by `budget` (part of the hello timeout).
/// Failures and timeouts count as handshake failures.
async fn tls_handshake(
    shard: &Shard,
    tls: &TlsAcceptorHandle,
    stream: TcpStream,
    peer: SocketAddr,
    budget: Duration,
) -> Option<TlsStream<TcpStream>> {
    // Boxed: rustls' handshake state is large and short-lived.
    let hs = Box::pin(glommio::timer::timeout(budget, async {
        Ok(tls.accept(stream).await)
    }))
    .await;
    match hs {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            shard.metrics.handshake_failures.fetch_add(1, Relaxed);
            None
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            shard.metrics.handshake_failures.fetch_add(1, Relaxed);
            None
        }
    }
}

/// What is left of the hello timeout since `start`.
fn left(shard: &Shard, start: Instant) -> Duration {
    Duration::from_millis(shard.cfg.hello_ms).saturating_sub(start.elapsed())
}

async fn serve_tcp_tls(
    slot: Slot,
    stream: Box<TcpStream>,
    permit: Option<StaticPermit>,
    tls: TlsAcceptorHandle,
) {
    let shard = &slot.shard;
    // The handshake in a boxed future that hands back the wire itself (as
    // serve_wss does): were the TLS stream a local here, moved into the
    // wire afterwards, the task would keep room for both — about 1.2 KB
    // more per idle connection, measured.
    let Some((conn, mut wire)) = Box::pin(async move {
        let stream = *stream;
        let peer = stream.peer_addr().ok()?;
        let hello = Duration::from_millis(shard.cfg.hello_ms);
        let tls_stream = tls_handshake(shard, &tls, stream, peer, hello).await;
        drop(permit);
        let tls_stream = tls_stream?;
        let conn = shard.register(Transport::Tcp, peer);
        Some((conn, TcpWire::new(tls_stream, shard.cfg.max_frame)))
    })
    .await
    else {
        return;
    };
    transport::drive(shard, &conn, &mut wire).await;
    shard.release(&conn);
}

async fn serve_wss(
    slot: Slot,
    stream: Box<TcpStream>,
    permit: Option<StaticPermit>,
    tls: TlsAcceptorHandle,
) {
    let shard = &slot.shard;
    let at = &slot;
    // Handshake and upgrade in one boxed future: their state is large and
    // short-lived (see serve_ws).
    let Some((conn, mut wire)) = Box::pin(async move {
        let start = Instant::now();
        let stream = *stream;
        let peer = stream.peer_addr().ok()?;
        let tls_stream = tls_handshake(shard, &tls, stream, peer, left(shard, start)).await?;
        // The upgrade reads through TLS, in what is left of the hello timeout.
        upgrade(at, tls_stream, peer, left(shard, start), permit).await
    })
    .await
    else {
        return;
    };
    transport::drive(shard, &conn, &mut wire).await;
    shard.release(&conn);
}

async fn serve_ws(slot: Slot, stream: Box<TcpStream>, permit: Option<StaticPermit>) {
    let shard = &slot.shard;
    let at = &slot;
    // The upgrade runs in its own boxed future: its state is large and
    // short-lived, and inline it would stay in the connection's task for the
    // connection's whole life.
    let Some((conn, mut wire)) = Box::pin(async move {
        let stream = *stream;
        let peer = stream.peer_addr().ok()?;
        let hello = Duration::from_millis(shard.cfg.hello_ms);
        upgrade(at, stream, peer, hello, permit).await
    })
    .await
    else {
        return;
    };
    transport::drive(shard, &conn, &mut wire).await;
    shard.release(&conn);
}

/// The WebSocket upgrade, bounded by the hello timeout (a socket that never
/// sends its HTTP request is closed, not kept); the handshake `permit` is
/// given back once the request head is read. Serves the echo endpoint
/// itself, and SSE's POSTs ([`sse::serve`]); for a session (a WebSocket or
/// an SSE stream) returns the registered connection and its wire.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    slot: &Slot,
    mut stream: S,
    peer: SocketAddr,
    hello: Duration,
    permit: Option<StaticPermit>,
) -> Option<(Rc<Conn>, HttpWire<S>)> {
    let shard = &slot.shard;
    let accepted = glommio::timer::timeout(hello, async {
        Ok(ws::accept(&mut stream, &shard.cfg).await)
    })
    .await;
    drop(permit);
    let up = match accepted {
        Ok(Ok(up)) => up,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "websocket upgrade failed");
            if matches!(e, ws::UpgradeError::Refused(403, _)) {
                shard.metrics.refused_origin.fetch_add(1, Relaxed);
            }
            shard.metrics.handshake_failures.fetch_add(1, Relaxed);
            return None;
        }
        Err(_) => {
            debug!(%peer, "websocket upgrade timed out");
            shard.metrics.handshake_failures.fetch_add(1, Relaxed);
            return None;
        }
    };
    if up.route == Route::Sse {
        slot.retag(Transport::Sse);
        let (conn, wire) = sse::serve(shard, stream, up.rest, peer).await?;
        return Some((conn, HttpWire::Sse(wire)));
    }
    let wire = WsWire::new(stream, up.route, up.rest, up.deflate, shard.cfg.max_frame);
    match up.route {
        Route::Echo | Route::Sse => {
            ws::echo(shard, wire).await;
            None
        }
        Route::Session(framing) => {
            let conn = shard.register(Transport::Ws, peer);
            conn.framing.set(framing);
            // A token in the upgrade request goes to the session, which
            // verifies it now and answers like one in hello (bye 4001 on
            // failure, after the upgrade, so the client sees the reason).
            if let Some(token) = up.token {
                shard.input(&conn, Input::UpgradeToken(token));
            }
            Some((conn, HttpWire::Ws(wire)))
        }
    }
}

/// Tells a socket it may not come in now (`code` 4007 over a limit or the
/// accept budget, 4004 over its address's rate) and when to come back, or
/// just closes it when too many are being refused already.
async fn refuse(
    slot: Slot,
    stream: TcpStream,
    _permit: Option<StaticPermit>,
    tls: Option<TlsAcceptorHandle>,
    refusal: Refusal,
    retry_ms: u64,
) {
    let (shard, transport) = (&slot.shard, slot.transport.get());
    let node = &shard.node;
    if node.refusing.fetch_add(1, AcqRel) >= node.max_refusing {
        node.refusing.fetch_sub(1, AcqRel);
        return; // dropping closes it: no descriptor held for a polite answer
    }
    let (code, reason) = (refusal.code(), refusal.reason());
    let bye = Envelope::bye(code, reason, Some(retry_ms));
    shard.metrics.close(code);
    let start = Instant::now();
    match tls {
        None => {
            say_bye(
                shard,
                transport,
                stream,
                (bye, retry_ms),
                code,
                reason,
                left(shard, start),
            )
            .await
        }
        Some(tls) => {
            // On a TLS port the answer goes through TLS too.
            if let Ok(peer) = stream.peer_addr()
                && let Some(s) = tls_handshake(shard, &tls, stream, peer, left(shard, start)).await
            {
                say_bye(
                    shard,
                    transport,
                    s,
                    (bye, retry_ms),
                    code,
                    reason,
                    left(shard, start),
                )
                .await;
            }
        }
    }
    node.refusing.fetch_sub(1, AcqRel);
}

/// Sends `bye` (with its `retry_ms`) on a refused socket, in the
/// transport's framing, within `budget`.
async fn say_bye<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Shard,
    transport: Transport,
    stream: S,
    (bye, retry_ms): (Envelope, u64),
    code: edgegate_proto::CloseCode,
    reason: &'static str,
    budget: Duration,
) {
    let _ = glommio::timer::timeout(budget, async {
        match transport {
            Transport::Ws => {
                let mut stream = stream;
                if let Ok(up) = ws::accept(&mut stream, &shard.cfg).await {
                    let framing = match up.route {
                        Route::Session(f) => f,
                        Route::Echo => Framing::WsJson,
                        Route::Sse => {
                            sse::refuse(&mut stream, &up.rest, &bye, retry_ms).await;
                            return Ok(());
                        }
                    };
                    let mut last = Vec::new();
                    Out::Own(Box::new(bye)).write(framing, &mut last);
                    let mut wire =
                        WsWire::new(stream, up.route, up.rest, up.deflate, shard.cfg.max_frame);
                    wire.close(last, code, reason).await;
                }
            }
            _ => {
                let mut last = Vec::new();
                Out::Own(Box::new(bye)).write(Framing::Stream, &mut last);
                let mut wire = TcpWire::new(stream, shard.cfg.max_frame);
                wire.close(last, code, reason).await;
            }
        }
        Ok(())
    })
    .await;
}

/// Accepts QUIC connections on this shard's endpoint until the drain
/// begins. Each connection attempt takes a handshake permit (like a
/// WebSocket upgrade) and a slot in the node's count; over a limit, the
/// client still completes its handshake and opens its stream, so that it
/// gets `bye` 4007 with `retry_ms` and a CONNECTION_CLOSE with code 4007.
pub async fn quic_accept_loop(
    shard: Rc<Shard>,
    admission: Rc<Admission>,
    endpoint: quinn::Endpoint,
) {
    loop {
        let permit = match shard.handshakes.acquire_static_permit(1).await {
            Ok(p) => p,
            Err(_) => return, // closed: draining
        };
        let stop = shard.stop.clone();
        let incoming = futures_lite::future::or(async { endpoint.accept().await }, async {
            let _ = stop.acquire(1).await; // fails (returns) once the drain begins
            None
        })
        .await;
        let Some(incoming) = incoming else {
            return; // draining, or the endpoint closed
        };
        let slot = Slot::take(&shard, Transport::Quic);
        let refusal = if !slot.admitted {
            shard.metrics.refused_max_conn[Transport::Quic as usize].fetch_add(1, Relaxed);
            Some(Refusal::ConnectionLimit)
        } else {
            admit(&shard, &admission, incoming.remote_address().ip())
        };
        let refusal = refusal.map(|r| (r, admission.retry_ms(&shard.cfg, r)));
        glommio::spawn_local(serve_quic(slot, Box::new(incoming), permit, refusal)).detach();
    }
}

async fn serve_quic(
    slot: Slot,
    incoming: Box<quinn::Incoming>,
    permit: StaticPermit,
    refusal: Option<(Refusal, u64)>,
) {
    let shard = &slot.shard;
    // The handshake and the refusal's close run in a boxed future, and the
    // incoming connection comes boxed (384 bytes): an async fn keeps its
    // arguments and the state of every await for the connection's life, and
    // inline they made this task 2 KB (the 2.5 KB allocation class), where
    // an idle connection needs only the wire and the drive.
    let Some(mut wire) = Box::pin(async move {
        let incoming = *incoming;
        let node = &shard.node;
        if refusal.is_some() && node.refusing.fetch_add(1, AcqRel) >= node.max_refusing {
            // Too many polite answers in flight already: refuse at the QUIC level.
            node.refusing.fetch_sub(1, AcqRel);
            incoming.refuse();
            return None;
        }
        let hello = Duration::from_millis(shard.cfg.hello_ms);
        let accepted = QuicWire::accept(incoming, hello, shard.cfg.max_frame).await;
        drop(permit);
        let mut wire = match accepted {
            Ok(w) => Some(w),
            Err(e) => {
                debug!(error = %e, "QUIC handshake failed");
                shard.metrics.handshake_failures.fetch_add(1, Relaxed);
                None
            }
        };
        if let Some((refusal, retry)) = refusal {
            if let Some(wire) = wire.as_mut() {
                let (code, reason) = (refusal.code(), refusal.reason());
                let bye = Envelope::bye(code, reason, Some(retry));
                shard.metrics.close(code);
                let mut last = Vec::new();
                Out::Own(Box::new(bye)).write(Framing::Stream, &mut last);
                let _ = glommio::timer::timeout(hello, async {
                    wire.close(last, code, reason).await;
                    Ok(())
                })
                .await;
            }
            node.refusing.fetch_sub(1, AcqRel);
            return None;
        }
        wire
    })
    .await
    else {
        return;
    };
    let conn = shard.register(Transport::Quic, wire.peer());
    transport::drive(shard, &conn, &mut wire).await;
    shard.release(&conn);
}

#[cfg(test)]
mod size_tests {
    /// The size of the future an async fn of three arguments returns.
    fn future_size<A, B, C, F: std::future::Future>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle WebSocket (and SSE stream) is one task whose future is
    /// `serve_ws`'s: with glommio's 40-byte task header it stays in
    /// mimalloc's 384-byte class (docs/architecture.md, "Memory per idle
    /// connection"); the SSE path adds nothing to it.
    #[test]
    fn an_idle_connections_task_stays_in_its_class() {
        let ws = future_size(super::serve_ws);
        assert!(ws + 40 <= 384, "serve_ws's future is {ws} bytes");
    }
}
