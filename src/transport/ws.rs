//! WebSocket (RFC 6455), server side, built for idle-heavy loads.
//!
//! The upgrade is parsed with `httparse` and answered with tungstenite's
//! accept-key derivation; framing is this module's own small state machine
//! (the same read path as raw TCP: reads go into the shard's scratch buffer,
//! and only a frame split across reads, or a fragmented message, is copied
//! into a buffer of the connection's, freed as soon as it completes). An
//! idle WebSocket so holds no buffer at all, where tungstenite's stream
//! keeps a read buffer, a write buffer and two wakers per connection (about
//! 1 KB more per idle connection, measured: `docs/benchmarks.md`). The echo
//! endpoint runs the same code, so the Autobahn|Testsuite checks what
//! carries real traffic.

use std::task::{Context, Poll, ready};

use edgegate_proto::{Envelope, binary, frame, json};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

use super::{LINGER, RxCarry, TxBuf, Wire, WireError, poll_read_scratch};
use crate::config::TokenSource;
use crate::conn::Framing;
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

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// What the upgrade request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The edgegate protocol, in this framing.
    Session(Framing),
    /// The conformance echo endpoint.
    Echo,
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
    /// Bytes after the request head.
    pub rest: Vec<u8>,
    /// A token from `Authorization: Bearer` or `?token=`, where
    /// `auth.token_sources` accepts them; verified by the caller, so that
    /// a bad token is answered with `bye` 4001 like one sent in `hello`.
    pub token: Option<String>,
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
    if req.method != Some("GET") {
        return Err(UpgradeError::Refused(405, "WebSocket upgrades use GET"));
    }
    let (path, query) = req
        .path
        .unwrap_or("/")
        .split_once('?')
        .unwrap_or((req.path.unwrap_or("/"), ""));
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
    // with no subprotocol in the answer (PROTOCOL.md §6).
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
    response.push_str("\r\n");
    Ok(Some(Upgrade {
        route,
        response,
        rest: buf[head_len..].to_vec(),
        token,
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

/// Appends one unmasked, final frame.
pub fn write_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(payload.len() + 10);
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(n as u8);
    } else if n <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

fn write_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut p = Vec::with_capacity(2 + reason.len().min(123));
    p.extend_from_slice(&code.to_be_bytes());
    // A control frame's payload is at most 125 bytes; cut on a char boundary.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..end]);
    write_frame(OP_CLOSE, &p, out);
}

/// A breach of RFC 6455 by the peer: the close code the RFC asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// 1002 protocol error, 1007 invalid data, 1009 too big.
    pub code: u16,
    /// What was wrong.
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
    header_len: usize,
}

/// Parses a client frame header. `Ok(None)`: need more bytes.
fn parse_header(buf: &[u8], max: usize) -> Result<Option<Header>, Violation> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(violation(
            1002,
            "reserved bits set (no extension was negotiated)",
        ));
    }
    let opcode = b0 & 0x0F;
    let fin = b0 & 0x80 != 0;
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(violation(1002, "reserved opcode"));
    }
    if b1 & 0x80 == 0 {
        return Err(violation(1002, "client frames must be masked"));
    }
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (u64::from_be_bytes(a), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode >= OP_CLOSE && (!fin || len > 125) {
        return Err(violation(
            1002,
            "control frames must be final and at most 125 bytes",
        ));
    }
    if len > max as u64 {
        return Err(violation(1009, "message too big"));
    }
    let Some(m) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask: [m[0], m[1], m[2], m[3]],
        len: len as usize,
        header_len: at + 4,
    }))
}

fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// A complete message or control event from the peer.
enum Event<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Close(Option<(u16, &'a str)>),
}

/// Frame and message reassembly state: empty while idle.
#[derive(Default)]
struct Reader {
    /// A message being reassembled from fragments: opcode and data.
    frag: Option<(u8, Vec<u8>)>,
}

impl Reader {
    /// Consumes whole frames from `data`, calling `on` for each message or
    /// control event. Returns the bytes used.
    fn process(
        &mut self,
        data: &mut [u8],
        max: usize,
        on: &mut dyn FnMut(Event<'_>) -> Result<(), WireError>,
    ) -> Result<usize, ReadError> {
        let mut pos = 0;
        loop {
            let h = match parse_header(&data[pos..], max) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(pos),
                Err(v) => return Err(ReadError::Ws(v)),
            };
            let start = pos + h.header_len;
            if data.len() - start < h.len {
                return Ok(pos);
            }
            let payload = &mut data[start..start + h.len];
            unmask(payload, h.mask);
            pos = start + h.len;
            match h.opcode {
                OP_PING => on(Event::Ping(payload))?,
                OP_PONG => {}
                OP_CLOSE => {
                    let ev = match payload.len() {
                        0 => None,
                        1 => return Err(ReadError::Ws(violation(1002, "close payload of 1 byte"))),
                        _ => {
                            let code = u16::from_be_bytes([payload[0], payload[1]]);
                            if !valid_close_code(code) {
                                return Err(ReadError::Ws(violation(1002, "invalid close code")));
                            }
                            let Ok(reason) = std::str::from_utf8(&payload[2..]) else {
                                return Err(ReadError::Ws(violation(
                                    1007,
                                    "close reason is not UTF-8",
                                )));
                            };
                            Some((code, reason))
                        }
                    };
                    on(Event::Close(ev))?;
                    return Ok(pos);
                }
                OP_TEXT | OP_BINARY => {
                    if self.frag.is_some() {
                        return Err(ReadError::Ws(violation(
                            1002,
                            "new message inside a fragmented one",
                        )));
                    }
                    if h.fin {
                        Self::message(h.opcode, payload, on)?;
                    } else {
                        self.frag = Some((h.opcode, payload.to_vec()));
                    }
                }
                _ => {
                    // OP_CONT
                    let Some((_, buf)) = self.frag.as_mut() else {
                        return Err(ReadError::Ws(violation(
                            1002,
                            "continuation without a message",
                        )));
                    };
                    if buf.len() + payload.len() > max {
                        return Err(ReadError::Ws(violation(1009, "message too big")));
                    }
                    buf.extend_from_slice(payload);
                    if h.fin
                        && let Some((op, buf)) = self.frag.take()
                    {
                        Self::message(op, &buf, on)?;
                    }
                }
            }
        }
    }

    fn message(
        opcode: u8,
        payload: &[u8],
        on: &mut dyn FnMut(Event<'_>) -> Result<(), WireError>,
    ) -> Result<(), ReadError> {
        if opcode == OP_TEXT {
            if std::str::from_utf8(payload).is_err() {
                return Err(ReadError::Ws(violation(
                    1007,
                    "text message is not valid UTF-8",
                )));
            }
            on(Event::Text(payload))?;
        } else {
            on(Event::Binary(payload))?;
        }
        Ok(())
    }
}

enum ReadError {
    Ws(Violation),
    Wire(WireError),
}

impl From<WireError> for ReadError {
    fn from(e: WireError) -> Self {
        ReadError::Wire(e)
    }
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
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsWire<S> {
    /// Wraps an upgraded stream; `rest` are bytes read past the request.
    pub fn new(stream: S, route: Route, rest: Vec<u8>, max_frame: usize) -> Self {
        let (json, echo) = match route {
            Route::Session(f) => (f == Framing::WsJson, false),
            Route::Echo => (false, true),
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
        }
    }

    /// Runs `data` through the frame reader, answering control frames.
    fn consume(&mut self, data: &mut [u8], inbox: &mut Vec<Envelope>) -> Result<usize, WireError> {
        let (echo, max) = (self.echo, self.max_message);
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
                Event::Text(t) if echo => write_frame(OP_TEXT, t, tx),
                Event::Binary(b) if echo => write_frame(OP_BINARY, b, tx),
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
        match self.reader.process(data, max, &mut on) {
            Ok(n) => Ok(n),
            Err(ReadError::Wire(e)) => Err(e),
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
        let r = rx.feed(fresh, |d| self.consume(d, inbox));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn run(bytes: &[u8]) -> (Result<usize, u16>, Vec<String>) {
        let mut r = Reader::default();
        let mut data = bytes.to_vec();
        let mut seen = Vec::new();
        let res = r.process(&mut data, 1 << 20, &mut |ev| {
            seen.push(match ev {
                Event::Text(t) => format!("text:{}", String::from_utf8_lossy(t)),
                Event::Binary(b) => format!("bin:{}", b.len()),
                Event::Ping(p) => format!("ping:{}", p.len()),
                Event::Close(c) => format!("close:{:?}", c.map(|c| c.0)),
            });
            Ok(())
        });
        (
            res.map_err(|e| match e {
                ReadError::Ws(v) => v.code,
                ReadError::Wire(_) => 0,
            }),
            seen,
        )
    }

    #[test]
    fn reassembles_fragments_with_control_frames_between() {
        let mut b = masked(OP_TEXT, false, b"hel");
        b.extend(masked(OP_PING, true, b"p"));
        b.extend(masked(OP_CONT, true, b"lo"));
        let (r, seen) = run(&b);
        assert_eq!(r, Ok(b.len()));
        assert_eq!(seen, vec!["ping:1", "text:hello"]);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let b = masked(OP_BINARY, true, &[7u8; 300]);
        for cut in 0..b.len() {
            assert_eq!(run(&b[..cut]).0, Ok(0), "cut at {cut}");
        }
        assert_eq!(run(&b).1, vec!["bin:300"]);
    }

    #[test]
    fn violations_get_the_rfc_codes() {
        assert_eq!(run(&[0x81, 0x00]).0, Err(1002), "unmasked");
        assert_eq!(run(&masked(0x3, true, b"")).0, Err(1002), "reserved opcode");
        assert_eq!(
            run(&{
                let mut f = masked(OP_TEXT, true, b"x");
                f[0] |= 0x40;
                f
            })
            .0,
            Err(1002),
            "rsv"
        );
        assert_eq!(
            run(&masked(OP_PING, false, b"")).0,
            Err(1002),
            "fragmented control"
        );
        assert_eq!(
            run(&masked(OP_PING, true, &[0; 126])).0,
            Err(1002),
            "long control"
        );
        assert_eq!(
            run(&masked(OP_TEXT, true, &[0xff, 0xfe])).0,
            Err(1007),
            "bad utf-8"
        );
        assert_eq!(
            run(&masked(OP_CONT, true, b"x")).0,
            Err(1002),
            "stray continuation"
        );
        assert_eq!(
            run(&masked(OP_CLOSE, true, &[3])).0,
            Err(1002),
            "1-byte close"
        );
        assert_eq!(
            run(&masked(OP_CLOSE, true, &[0x03, 0xEC])).0,
            Err(1002),
            "close code 1004"
        );
        assert_eq!(
            run(&masked(OP_CLOSE, true, &[0x03, 0xE8, 0xff])).0,
            Err(1007),
            "close reason"
        );
        assert_eq!(
            run(&masked(OP_BINARY, true, &vec![0; (1 << 20) + 1])).0,
            Err(1009)
        );
        let mut two = masked(OP_TEXT, false, b"a");
        two.extend(masked(OP_TEXT, true, b"b"));
        assert_eq!(
            run(&two).0,
            Err(1002),
            "new message inside a fragmented one"
        );
    }

    #[test]
    fn close_stops_reading() {
        let mut b = masked(OP_CLOSE, true, &[0x03, 0xE8]);
        let first = b.len();
        b.extend(masked(OP_TEXT, true, b"late"));
        let (r, seen) = run(&b);
        assert_eq!(r, Ok(first));
        assert_eq!(seen, vec!["close:Some(1000)"]);
    }

    #[test]
    fn frames_are_written_with_the_right_length_form() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            write_frame(OP_BINARY, &vec![1; n], &mut out);
            let hdr = out.len() - n;
            assert_eq!(
                hdr,
                if n < 126 {
                    2
                } else if n < 65536 {
                    4
                } else {
                    10
                },
                "n={n}"
            );
            assert_eq!(out[0], 0x82);
        }
    }
}
