//! WebSocket (RFC 6455), server side, built for idle-heavy loads.
//!
//! The upgrade is parsed with `httparse` and answered with tungstenite's
//! accept-key derivation; framing is this module's own small state machine
//! (the same read path as raw TCP: reads go into the shard's scratch buffer,
//! and only a frame split across reads, or a fragmented message, is copied
//! into a buffer of the connection's, freed as soon as it completes). An
//! idle WebSocket so holds no buffer at all, where tungstenite's stream
//! keeps a read buffer, a write buffer and two wakers per connection (about
//! 1 KB more per idle connection, measured: `docs/bench-notes.md`). The echo
//! endpoint runs the same code, so the Autobahn|Testsuite checks what
//! carries real traffic.
//!
//! permessage-deflate (RFC 7692) is accepted only with no context takeover
//! both ways, so it adds no per-connection state either: messages inflate
//! and compress with the shard's [`ShardDeflate`], and a routed message's
//! compressed bytes are made once per shard and framed on their own for
//! each subscriber ([`WsWire::send_queued`]).

use std::rc::Rc;
use std::task::{Context, Poll, ready};

use edgegate_proto::deflate;
use edgegate_proto::ws::{
    Event, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, ReadError, Reader, frame_header,
    write_close, write_frame, write_frame_deflated,
};
use edgegate_proto::{Envelope, binary, frame, json};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

use super::{BATCH_BYTES, LINGER, RxCarry, TxBuf, Wire, WireError, count_out, poll_read_scratch};
use crate::compress::{self, ShardDeflate};
use crate::config::TokenSource;
use crate::conn::{Conn, Framing, Out};
use crate::settings::ShardConfig;
use crate::shard::Shard;

/// Subprotocol for JSON envelopes.
pub const SUBPROTOCOL_JSON: &str = "edgegate.v1.json";
/// Subprotocol for binary envelopes.
pub const SUBPROTOCOL_BIN: &str = "edgegate.v1.bin";
/// Largest upgrade request accepted (request line and headers).
const MAX_REQUEST: usize = 8 * 1024;
/// Largest message the echo endpoint takes (Autobahn sends up to 16 MiB).
const ECHO_MAX: usize = 16 << 20;
/// Pending control replies (pongs) beyond this are skipped: RFC 6455 §5.5.3
/// allows answering only the latest ping, and a ping flood must not grow memory.
const MAX_PENDING_CONTROL: usize = 16 * 1024;

/// What the upgrade request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The edgegate protocol, in this framing.
    Session(Framing),
    /// The conformance echo endpoint.
    Echo,
    /// SSE (`ws.sse_path`): not an upgrade; [`super::sse`] serves it.
    Sse,
}

/// permessage-deflate on one connection, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflate {
    /// Not negotiated: RSV1 from the peer is a protocol error.
    Off,
    /// Negotiated, but the peer limited the server's window: its messages
    /// inflate, ours go uncompressed.
    Inbound,
    /// Both ways.
    Both,
}

/// Why an upgrade failed (the HTTP answer was already sent where useful).
#[derive(Debug)]
pub enum UpgradeError {
    /// Socket error or the peer went away.
    Io(std::io::Error),
    /// The request was refused with this status and reason.
    Refused(u16, &'static str),
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradeError::Io(e) => write!(f, "{e}"),
            UpgradeError::Refused(s, r) => write!(f, "HTTP {s}: {r}"),
        }
    }
}

/// The parsed upgrade request: route, chosen subprotocol, and any bytes the
/// client sent after the request (the start of its first frame).
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// Where the request goes.
    pub route: Route,
    /// The answer to send (101 Switching Protocols).
    pub response: String,
    /// Bytes after the request head; for [`Route::Sse`], every byte read
    /// (the head included), for [`super::sse`] to parse.
    pub rest: Vec<u8>,
    /// A token from `Authorization: Bearer` or `?token=`, where
    /// `auth.token_sources` accepts them; verified by the caller, so that
    /// a bad token is answered with `bye` 4001 like one sent in `hello`.
    pub token: Option<String>,
    /// permessage-deflate, as agreed in `response`.
    pub deflate: Deflate,
}

fn header<'a>(req: &'a httparse::Request<'_, '_>, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Parses an upgrade request head. `Ok(None)`: incomplete, read more.
pub fn parse_upgrade(buf: &[u8], cfg: &ShardConfig) -> Result<Option<Upgrade>, UpgradeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(UpgradeError::Refused(400, "malformed HTTP request")),
    };
    let (path, query) = req
        .path
        .unwrap_or("/")
        .split_once('?')
        .unwrap_or((req.path.unwrap_or("/"), ""));
    if cfg.sse_path.as_deref() == Some(path) {
        // Not an upgrade: GET, POST and OPTIONS of SSE (§10).
        return Ok(Some(Upgrade {
            route: Route::Sse,
            response: String::new(),
            rest: buf.to_vec(),
            token: None,
            deflate: Deflate::Off,
        }));
    }
    if req.method != Some("GET") {
        return Err(UpgradeError::Refused(405, "WebSocket upgrades use GET"));
    }
    let echo = cfg.echo_path.as_deref() == Some(path);
    if !echo && path != cfg.ws_path {
        return Err(UpgradeError::Refused(
            404,
            "no WebSocket endpoint at this path",
        ));
    }
    if !has_token(header(&req, "upgrade"), "websocket")
        || !has_token(header(&req, "connection"), "upgrade")
    {
        return Err(UpgradeError::Refused(
            400,
            "not a WebSocket upgrade request",
        ));
    }
    if header(&req, "sec-websocket-version").map(str::trim) != Some("13") {
        return Err(UpgradeError::Refused(426, "WebSocket version 13 required"));
    }
    let Some(key) = header(&req, "sec-websocket-key")
        .map(str::trim)
        .filter(|k| !k.is_empty())
    else {
        return Err(UpgradeError::Refused(400, "missing Sec-WebSocket-Key"));
    };
    // Browsers always send Origin on WebSocket upgrades; a client without
    // one is not a browser, and the allow-list (against cross-site use of
    // a user's browser) does not apply to it.
    if !cfg.allowed_origins.is_empty()
        && let Some(origin) = header(&req, "origin")
        && !cfg.allowed_origins.iter().any(|o| o == origin.trim())
    {
        return Err(UpgradeError::Refused(403, "origin not allowed"));
    }
    let token = if cfg.auth.is_none() {
        None
    } else {
        let from_header = header(&req, "authorization")
            .filter(|_| cfg.token_source(TokenSource::Header))
            .and_then(|v| {
                let v = v.trim();
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let from_query = query
            .split('&')
            .filter(|_| cfg.token_source(TokenSource::Query))
            .find_map(|p| p.strip_prefix("token="));
        from_header
            .or(from_query)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
    };
    // The first of our subprotocols the client offers; none offered: JSON,
    // with no subprotocol in the answer (docs/protocol.md §6).
    let offered = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| *p == SUBPROTOCOL_JSON || *p == SUBPROTOCOL_BIN);
    let route = if echo {
        Route::Echo
    } else if offered == Some(SUBPROTOCOL_BIN) {
        Route::Session(Framing::WsBinary)
    } else {
        Route::Session(Framing::WsJson)
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes())
    );
    if let (Some(p), false) = (offered, echo) {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(p);
        response.push_str("\r\n");
    }
    let agreed = if cfg.ws_deflate {
        deflate::negotiate(
            req.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
                .filter_map(|h| std::str::from_utf8(h.value).ok()),
        )
    } else {
        None
    };
    let deflate = match &agreed {
        None => Deflate::Off,
        Some(a) => {
            response.push_str("Sec-WebSocket-Extensions: ");
            response.push_str(&a.response);
            response.push_str("\r\n");
            if a.compress {
                Deflate::Both
            } else {
                Deflate::Inbound
            }
        }
    };
    response.push_str("\r\n");
    Ok(Some(Upgrade {
        route,
        response,
        rest: buf[head_len..].to_vec(),
        token,
        deflate,
    }))
}

/// Reads the upgrade request and answers it (through TLS on a WSS
/// listener). The caller bounds the time.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    cfg: &ShardConfig,
) -> Result<Upgrade, UpgradeError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(UpgradeError::Io)?;
        if n == 0 {
            return Err(UpgradeError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_upgrade(&buf, cfg) {
            Ok(Some(up)) if up.route == Route::Sse => return Ok(up),
            Ok(Some(up)) => {
                stream
                    .write_all(up.response.as_bytes())
                    .await
                    .map_err(UpgradeError::Io)?;
                stream.flush().await.map_err(UpgradeError::Io)?;
                return Ok(up);
            }
            Ok(None) if buf.len() < MAX_REQUEST => {}
            Ok(None) => return Err(refuse(stream, 431, "request head too large").await),
            Err(UpgradeError::Refused(status, why)) => {
                return Err(refuse(stream, status, why).await);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    why: &'static str,
) -> UpgradeError {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let extra = if status == 426 {
        "Sec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    let resp = format!(
        "HTTP/1.1 {status} {text}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{why}\n",
        why.len() + 1
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    // A TLS stream holds the answer until flushed.
    let _ = stream.flush().await;
    UpgradeError::Refused(status, why)
}

/// A WebSocket connection after the upgrade: sessions and the echo
/// endpoint, over a plain socket (`S` = glommio's `TcpStream`) or TLS
/// ([`crate::tls::TlsStream`]).
pub struct WsWire<S = TcpStream> {
    stream: S,
    /// A partial frame carried over between reads (empty when idle).
    rx: RxCarry,
    reader: Reader,
    /// Bytes not yet written.
    tx: TxBuf,
    json: bool,
    echo: bool,
    max_message: usize,
    /// The peer sent its close frame.
    peer_closed: bool,
    /// `rx` holds bytes that came with the upgrade request, not yet read.
    early: bool,
    deflate: Deflate,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsWire<S> {
    /// Wraps an upgraded stream; `rest` are bytes read past the request.
    pub fn new(stream: S, route: Route, rest: Vec<u8>, deflate: Deflate, max_frame: usize) -> Self {
        let (json, echo) = match route {
            Route::Session(f) => (f == Framing::WsJson, false),
            Route::Echo => (false, true),
            // Never a WebSocket (the listener hands it to `sse`).
            Route::Sse => (true, false),
        };
        WsWire {
            stream,
            early: !rest.is_empty(),
            rx: RxCarry::with(rest),
            reader: Reader::default(),
            tx: TxBuf::default(),
            json,
            echo,
            max_message: if echo { ECHO_MAX } else { max_frame },
            peer_closed: false,
            deflate,
        }
    }

    /// The shard's compression state, where this connection compresses
    /// what it sends.
    fn compressor<'s>(&self, shard: &'s Shard) -> Option<&'s ShardDeflate> {
        match self.deflate {
            Deflate::Both => shard.deflate(),
            Deflate::Off | Deflate::Inbound => None,
        }
    }

    /// Runs `data` through the frame reader, answering control frames.
    fn consume(
        &mut self,
        shard: &Shard,
        data: &mut [u8],
        inbox: &mut Vec<Envelope>,
    ) -> Result<usize, WireError> {
        let (echo, max) = (self.echo, self.max_message);
        // The echo endpoint compresses every reply it can (Autobahn 12.*, 13.*).
        let echo_z = self.compressor(shard).filter(|_| echo);
        let txb = &mut self.tx;
        let peer_closed = &mut self.peer_closed;
        let mut on = |ev: Event<'_>| -> Result<(), WireError> {
            let pending = txb.pending();
            let tx = txb.bytes_mut();
            match ev {
                Event::Ping(p) => {
                    if pending < MAX_PENDING_CONTROL {
                        write_frame(OP_PONG, p, tx);
                    }
                }
                Event::Close(c) => {
                    // Echo the peer's code (RFC 6455 §5.5.1), then we are done.
                    match c {
                        Some((code, _)) => write_close(code, "", tx),
                        None => write_frame(OP_CLOSE, &[], tx),
                    }
                    *peer_closed = true;
                }
                Event::Text(t) if echo => match echo_z {
                    Some(z) => z.write_message(OP_TEXT, t, tx, &shard.metrics),
                    None => write_frame(OP_TEXT, t, tx),
                },
                Event::Binary(b) if echo => match echo_z {
                    Some(z) => z.write_message(OP_BINARY, b, tx, &shard.metrics),
                    None => write_frame(OP_BINARY, b, tx),
                },
                Event::Text(t) => {
                    for env in json::decode_batch(t) {
                        inbox.push(env?);
                    }
                }
                Event::Binary(b) => {
                    for part in frame::split_ws_binary(b) {
                        inbox.push(binary::decode(part?)?);
                    }
                }
            }
            Ok(())
        };
        let mut inflater = match self.deflate {
            Deflate::Inbound | Deflate::Both => shard.deflate().map(|z| z.inflater.borrow_mut()),
            Deflate::Off => None,
        };
        let r = self
            .reader
            .process(data, max, inflater.as_deref_mut(), &mut on);
        if let Some(inf) = inflater.as_deref_mut() {
            compress::count_in(inf, &shard.metrics);
        }
        match r {
            Ok(n) => Ok(n),
            Err(ReadError::Callback(e)) => Err(e),
            Err(ReadError::Ws(v)) if self.echo => {
                write_close(v.code, v.reason, self.tx.bytes_mut());
                self.peer_closed = true;
                Err(WireError::Closed)
            }
            Err(ReadError::Ws(v)) if v.code == 1009 => Err(WireError::TooLarge),
            Err(ReadError::Ws(v)) => Err(WireError::Protocol(v.reason.into())),
        }
    }

    async fn flush_all(&mut self) -> Result<(), WireError> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire for WsWire<S> {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        shard: &Shard,
        inbox: &mut Vec<Envelope>,
    ) -> Poll<Result<(), WireError>> {
        if self.peer_closed {
            return Poll::Ready(Err(WireError::Closed));
        }
        // Bytes that came with the upgrade request go first.
        let mut fresh: &mut [u8] = &mut [];
        let mut scratch = None;
        if !std::mem::take(&mut self.early) {
            let (buf, n) = ready!(poll_read_scratch(&mut self.stream, cx, shard))?;
            fresh = &mut scratch.insert((buf, n)).0[..n];
        }
        let mut rx = std::mem::take(&mut self.rx);
        let r = rx.feed(fresh, |d| self.consume(shard, d, inbox));
        self.rx = rx;
        drop(scratch);
        r?;
        Poll::Ready(Ok(()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WireError>> {
        self.tx.poll_flush_to(&mut self.stream, cx)
    }

    fn send(&mut self, batch: Vec<u8>) -> Result<(), WireError> {
        if batch.is_empty() {
            return Ok(());
        }
        let opcode = if self.json { OP_TEXT } else { OP_BINARY };
        write_frame(opcode, &batch, self.tx.bytes_mut());
        Ok(())
    }

    /// With compression, a routed message big enough to gain, and queued
    /// for other connections too, goes as a frame of its own carrying the
    /// bytes compressed once for the shard
    /// ([`crate::conn::Delivery::deflated`]); the items between are batched
    /// as usual and compressed for this connection when big enough.
    fn send_queued(&mut self, shard: &Shard, conn: &Conn) -> Result<(), WireError> {
        let Some(z) = self.compressor(shard) else {
            // Straight into the write buffer, behind room for the header:
            // the batch is not copied a second time into a frame.
            let opcode = if self.json { OP_TEXT } else { OP_BINARY };
            let (n, len) = self.tx.frame_in_place(
                |buf, from| conn.drain_after(buf, from, BATCH_BYTES),
                |len| frame_header(opcode, len),
            );
            super::count_out(shard, n, len);
            return Ok(());
        };
        let (framing, m) = (conn.framing.get(), &*shard.metrics);
        let (min, shared) = (shard.cfg.ws_deflate_min, shard.cfg.ws_deflate_shared);
        let opcode = if self.json { OP_TEXT } else { OP_BINARY };
        let tx = self.tx.bytes_mut();
        let start = tx.len();
        let mut plain = Vec::new();
        let end_plain = |plain: &mut Vec<u8>, tx: &mut Vec<u8>| {
            if plain.len() >= min {
                z.write_message(opcode, plain, tx, m);
            } else if !plain.is_empty() {
                write_frame(opcode, plain, tx);
            }
            plain.clear();
        };
        let n = conn.drain_each(BATCH_BYTES, |item| {
            // Shared bytes pay when another subscriber uses them too (or they
            // exist already); a message for this connection alone, such as a
            // recovery's replay, compresses better batched with its neighbours.
            if let (true, Out::Shared(d)) = (shared, item)
                && (Rc::strong_count(d) > 1 || d.is_deflated(framing))
                && let Some(bytes) = d.deflated(framing, z, min, m)
            {
                end_plain(&mut plain, tx);
                write_frame_deflated(opcode, bytes, tx);
                compress::count_out(m, d.ws_len(framing), bytes.len());
                return bytes.len();
            }
            let before = plain.len();
            item.write(framing, &mut plain);
            plain.len() - before
        });
        end_plain(&mut plain, tx);
        count_out(shard, n, tx.len() - start);
        Ok(())
    }

    fn send_ping(&mut self) -> Result<bool, WireError> {
        write_frame(OP_PING, &[], self.tx.bytes_mut());
        Ok(true)
    }

    async fn close(&mut self, last: Vec<u8>, code: edgegate_proto::CloseCode, reason: &str) {
        let _ = self.send(last);
        if !self.peer_closed {
            write_close(code.get(), reason, self.tx.bytes_mut());
        }
        if self.flush_all().await.is_err() || self.peer_closed {
            return;
        }
        // Wait briefly for the client's close frame (or EOF), then FIN.
        let _ = glommio::timer::timeout(LINGER, async {
            let mut buf = [0u8; 512];
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(n) => {
                        // The client's close frame: the handshake is complete.
                        if buf[..n].first().is_some_and(|b| b & 0x0F == OP_CLOSE) {
                            return Ok(());
                        }
                    }
                }
            }
        })
        .await;
        // FIN (after TLS close_notify on a TLS stream).
        let _ = self.stream.close().await;
    }

    async fn finish(&mut self) {
        // Flush our close reply (if the peer closed), then FIN.
        let _ = self.flush_all().await;
        // FIN (after TLS close_notify on a TLS stream).
        let _ = self.stream.close().await;
    }
}

/// The conformance endpoint: echoes every data message back, unchanged.
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(shard: &Shard, mut wire: WsWire<S>) {
    let mut inbox = Vec::new();
    let r = std::future::poll_fn(|cx| {
        loop {
            let mut progress = false;
            match wire.poll_flush(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(e),
                Poll::Ready(Ok(())) => {}
                Poll::Pending => {}
            }
            match wire.poll_recv(cx, shard, &mut inbox) {
                Poll::Ready(Err(e)) => return Poll::Ready(e),
                Poll::Ready(Ok(())) => progress = true,
                Poll::Pending => {}
            }
            if !progress {
                return Poll::Pending;
            }
        }
    })
    .await;
    let _ = r;
    let _ = glommio::timer::timeout(LINGER, async {
        wire.finish().await;
        Ok(())
    })
    .await;
}
