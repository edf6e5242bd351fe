//! Listeners: one SO_REUSEPORT socket per transport per shard, so the
//! kernel spreads new connections over the shards.
//!
//! Accepting is where the node's connection limit is enforced: a socket
//! over the limit is told `bye` 4007 with a jittered `retry_ms` and closed,
//! and the number of sockets being refused at once is itself bounded, so a
//! flood cannot exhaust file descriptors.

use std::rc::Rc;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::time::Duration;

use edgegate_proto::Envelope;
use glommio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::conn::{Framing, Out};
use crate::metrics::Transport;
use crate::shard::Shard;
use crate::transport::tcp::TcpWire;
use crate::transport::ws::{self, Route, WsWire};
use crate::transport::{self, Wire};

/// Accepts connections on `listener` until the task is dropped.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, transport: Transport) {
    let mut errors = 0u32;
    loop {
        let stream = match listener.accept().await {
            Ok(s) => {
                errors = 0;
                s
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; log sparsely.
                errors += 1;
                if errors == 1 || errors % 1000 == 0 {
                    warn!(shard = shard.id, transport = transport.name(), error = %e, "accept failed");
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shard = shard.clone();
        glommio::spawn_local(async move { serve(shard, stream, transport).await }).detach();
    }
}

/// One accepted socket, from accept to release.
async fn serve(shard: Rc<Shard>, stream: TcpStream, transport: Transport) {
    let t = transport as usize;
    let m = &shard.metrics;
    m.accepted[t].fetch_add(1, Relaxed);
    m.connections[t].fetch_add(1, Relaxed);
    let _ = stream.set_nodelay(true);
    let node = &shard.node;
    let open = node.open.fetch_add(1, AcqRel) + 1;
    if open > node.max_connections {
        refuse(&shard, stream, transport).await;
    } else {
        match transport {
            Transport::Ws => serve_ws(&shard, stream).await,
            _ => serve_tcp(&shard, stream).await,
        }
    }
    node.open.fetch_sub(1, AcqRel);
    m.connections[t].fetch_sub(1, Relaxed);
}

async fn serve_tcp(shard: &Rc<Shard>, stream: TcpStream) {
    let peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    let conn = shard.register(Transport::Tcp, peer);
    let mut wire = TcpWire::new(stream, shard.cfg.max_frame);
    transport::drive(shard, &conn, &mut wire).await;
    shard.release(&conn);
}

async fn serve_ws(shard: &Rc<Shard>, stream: TcpStream) {
    let peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    // The hello timeout also bounds the upgrade: a socket that never sends
    // its HTTP request is closed, not kept.
    let hello = Duration::from_millis(shard.cfg.hello_ms);
    let accepted =
        glommio::timer::timeout(hello, async { Ok(ws::accept(stream, &shard.cfg).await) }).await;
    let (ws_stream, route) = match accepted {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "websocket handshake failed");
            shard.metrics.handshake_failures.fetch_add(1, Relaxed);
            return;
        }
        Err(_) => {
            debug!(%peer, "websocket handshake timed out");
            shard.metrics.handshake_failures.fetch_add(1, Relaxed);
            return;
        }
    };
    match route {
        Route::Echo => ws::echo(ws_stream).await,
        Route::Session(framing) => {
            let conn = shard.register(Transport::Ws, peer);
            conn.framing.set(framing);
            let mut wire = WsWire::new(ws_stream, framing, shard.cfg.max_frame);
            transport::drive(shard, &conn, &mut wire).await;
            shard.release(&conn);
        }
    }
}

/// Tells a socket over the connection limit to come back later (4007), or
/// just closes it when too many are being refused already.
async fn refuse(shard: &Rc<Shard>, stream: TcpStream, transport: Transport) {
    let node = &shard.node;
    shard.metrics.refused_max_conn[transport as usize].fetch_add(1, Relaxed);
    if node.refusing.fetch_add(1, AcqRel) >= node.max_refusing {
        node.refusing.fetch_sub(1, AcqRel);
        return; // dropping closes it: no descriptor held for a polite answer
    }
    let bye = Envelope::bye(
        4007u16,
        "overloaded: connection limit",
        Some(shard.cfg.jittered_retry_ms()),
    );
    shard.metrics.close(4007);
    let hello = Duration::from_millis(shard.cfg.hello_ms);
    let _ = glommio::timer::timeout(hello, async {
        match transport {
            Transport::Ws => {
                if let Ok((ws_stream, Route::Session(framing))) =
                    ws::accept(stream, &shard.cfg).await
                {
                    let mut last = Vec::new();
                    Out::Own(Box::new(bye)).write(framing, &mut last);
                    let mut wire = WsWire::new(ws_stream, framing, shard.cfg.max_frame);
                    wire.close(last, 4007, "overloaded").await;
                }
            }
            _ => {
                let mut last = Vec::new();
                Out::Own(Box::new(bye)).write(Framing::Stream, &mut last);
                let mut wire = TcpWire::new(stream, shard.cfg.max_frame);
                wire.close(last, 4007, "overloaded").await;
            }
        }
        Ok(())
    })
    .await;
    node.refusing.fetch_sub(1, AcqRel);
}
