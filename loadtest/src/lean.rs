//! Lean subscribers: the receive side of a fan-out without the client
//! library's work per message, so that the harness measures the gateway.
//!
//! The client library ([`edgegate_client::Connection`]) turns every delivery
//! into an owned [`edgegate_client::Envelope`] (a WebSocket message, strings
//! and payload copied, a queue) and the old receiver then took a shared lock
//! per message for the time series. At 200 000 deliveries/s that cost the
//! harness 3.6–4.2 µs per delivery, more than the gateway spent making it,
//! and at 2 M/s its subscribers fell so far behind that the gateway closed
//! them all as slow consumers (docs/bench-notes.md).
//!
//! A lean subscriber owns its socket and reads it in 64 KiB gulps. Whole
//! frames are found with tungstenite's frame header parser (WebSocket) or
//! [`edgegate_proto::frame::peek_frame`] (raw TCP); in each frame only what
//! the accounting needs is read in place: for JSON the `"t":"msg"` prefix
//! and the stamp after `"d":` (our encoder writes both where the fast
//! path looks; anything else goes through the full decoder), for binary a
//! borrowed [`edgegate_proto::binary::view`]. All deliveries of one read share
//! one clock reading (they left the kernel in the same call), one update of
//! the shared counters and one lock of the time series.
//!
//! The handshake, `hello` and `sub` are done here too (the library's socket
//! cannot be taken over with tungstenite's buffer), with tungstenite's key
//! helpers and httparse. Plain WebSocket (JSON or binary, optionally with
//! permessage-deflate), raw TCP and SSE (the stream read line by line: a
//! `data:` line is one envelope, a comment the server's heartbeat, answered
//! by POSTing a `pong`; the `sub` is POSTed too, each POST on a connection
//! of its own). WebSocket and raw TCP also over TLS (rustls, through
//! tokio-rustls: a 64 KiB read decrypts whatever records have arrived), so
//! that WSS is measured at full speed too; QUIC and SSE over TLS use the
//! client library.
//! [`crate::nats`] speaks NATS over the same WebSocket code.

use std::io::Cursor;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context as TaskContext, Poll};

use anyhow::{Context, Result, anyhow, bail};
use edgegate_proto::{Envelope, Type, binary, frame, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::{Frame, FrameHeader};

use crate::cli::Common;
use crate::payload;
use crate::peer::{Counters, PeerStats, now_ns};
use crate::track::SeqTrack;
use crate::{Encoding, Transport};
use edgegate_client::ClientConfig;

/// Bytes read per call (and the buffer's starting size).
const READ_CHUNK: usize = 64 * 1024;
/// Largest frame accepted (the buffer grows up to this).
const MAX_FRAME: usize = 16 << 20;

/// True when [`LeanSub`] can serve this transport (WebSocket or raw TCP,
/// plain or over TLS; QUIC; SSE in plain text).
pub fn serves(c: &Common) -> bool {
    takes(c.transport, c.tls)
}

fn takes(transport: Transport, tls: bool) -> bool {
    match transport {
        Transport::Ws | Transport::Tcp | Transport::Quic => true,
        Transport::Sse => !tls,
        _ => false,
    }
}

/// A lean subscriber's socket: plain, or TLS over it, or a QUIC session
/// stream.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Quic(Box<edgegate_client::QuicIo>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Quic(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Quic(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Quic(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Quic(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Stream {
    /// Writes all of `data` and flushes it (TLS records leave at once).
    async fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write_all(data).await?;
        self.flush().await
    }
}

/// A TCP connection to `target` from the configured source address, with
/// TLS over it when the config asks.
async fn tcp_stream(cfg: &ClientConfig, target: SocketAddr) -> Result<Stream> {
    let src = cfg.source_addr;
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    let stream = sock
        .connect(target)
        .await
        .with_context(|| format!("connect {target}"))?;
    stream.set_nodelay(true)?;
    Ok(if cfg.tls {
        let (tls, name) = edgegate_client::tls_client(cfg).map_err(|e| anyhow!("{e}"))?;
        let s = tokio_rustls::TlsConnector::from(tls)
            .connect(name, stream)
            .await
            .with_context(|| format!("TLS handshake with {target}"))?;
        Stream::Tls(Box::new(s))
    } else {
        Stream::Plain(stream)
    })
}

/// What an SSE subscriber needs beside its stream: where to POST.
struct SseSide {
    target: SocketAddr,
    src: Option<std::net::IpAddr>,
    /// `Host` and the SSE path.
    host: String,
    path: String,
    /// The stream is open (its GET, with the `hello`, was answered).
    open: bool,
    /// `welcome.meta.session`.
    session: Option<String>,
}

/// One subscriber connection read without the client library.
pub struct LeanSub {
    pub(crate) stream: Stream,
    ws: bool,
    enc: Encoding,
    /// permessage-deflate agreed (no context takeover either way).
    deflate: bool,
    pub(crate) buf: Vec<u8>,
    /// `buf[start..end]` holds bytes not yet parsed.
    pub(crate) start: usize,
    pub(crate) end: usize,
    next_id: u64,
    /// Envelopes decoded during setup behind the one it waited for.
    pending: std::collections::VecDeque<Envelope>,
    /// SSE: the stream is read line by line, and envelopes are POSTed.
    sse: Option<Box<SseSide>>,
}

impl LeanSub {
    /// Connects as `cfg` says (plain WebSocket on `/ws` or raw TCP; address,
    /// source, user, encoding), says `hello` and waits for `welcome`, all
    /// within `cfg.connect_timeout`.
    /// With `deflate`, permessage-deflate is asked for (no context takeover
    /// either way) and a gateway that does not agree is an error.
    pub async fn connect(cfg: &ClientConfig, deflate: bool) -> Result<Self> {
        let t = cfg.connect_timeout;
        let addr = cfg.addr.as_str();
        tokio::time::timeout(t, Self::connect_inner(cfg, deflate))
            .await
            .map_err(|_| anyhow!("{addr}: connect + hello timed out after {t:?}"))?
    }

    async fn connect_inner(cfg: &ClientConfig, deflate: bool) -> Result<Self> {
        let path = if cfg.transport == Transport::Sse {
            "/sse"
        } else {
            "/ws"
        };
        let mut s = Self::open(cfg, deflate, Some(cfg.encoding.subprotocol()), path).await?;
        let mut hello = Envelope::new(Type::Hello);
        hello.id = Some(s.id());
        hello.meta = Some(
            serde_json::json!({"user": cfg.user, "client": "edgegate-loadtest-lean"}).to_string(),
        );
        s.send(&hello).await?;
        match s.recv_setup().await? {
            e if e.t == Type::Welcome => {
                if let Some(side) = s.sse.as_mut() {
                    side.session = e
                        .meta
                        .as_deref()
                        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                        .and_then(|v| v.get("session")?.as_str().map(str::to_owned));
                }
                Ok(s)
            }
            e => bail!(
                "{}: expected welcome, got {:?} {:?}",
                cfg.addr,
                e.t,
                e.reason
            ),
        }
    }

    /// Opens the TCP connection and, for WebSocket, upgrades it (asking for
    /// `subprotocol`, on `default_path` unless the address names one).
    pub(crate) async fn open(
        cfg: &ClientConfig,
        deflate: bool,
        subprotocol: Option<&str>,
        default_path: &str,
    ) -> Result<Self> {
        let src = cfg.source_addr;
        let rest = ["ws://", "http://"]
            .iter()
            .find_map(|p| cfg.addr.strip_prefix(p))
            .unwrap_or(&cfg.addr);
        let (addr, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, default_path),
        };
        if !takes(cfg.transport, cfg.tls) {
            bail!("the lean reader takes ws and tcp (plain or TLS), quic and plain sse only");
        }
        let target: SocketAddr = match addr.parse() {
            Ok(a) => a,
            Err(_) => tokio::net::lookup_host(addr)
                .await?
                .next()
                .ok_or_else(|| anyhow!("{addr}: no address"))?,
        };
        let stream = if cfg.transport == Transport::Quic {
            let io = edgegate_client::quic_stream(cfg, target)
                .await
                .map_err(|e| anyhow!("QUIC connection to {target}: {e}"))?;
            Stream::Quic(Box::new(io))
        } else {
            tcp_stream(cfg, target).await?
        };
        let sse = cfg.transport == Transport::Sse;
        let mut s = LeanSub {
            stream,
            // SSE lines are JSON envelopes, read as a WebSocket text message's.
            ws: cfg.transport == Transport::Ws || sse,
            enc: match cfg.transport {
                Transport::Ws => cfg.encoding,
                Transport::Sse => Encoding::Json,
                _ => Encoding::Binary,
            },
            deflate: false,
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            next_id: 1,
            pending: Default::default(),
            sse: sse.then(|| {
                Box::new(SseSide {
                    target,
                    src,
                    host: addr.to_owned(),
                    path: path.to_owned(),
                    open: false,
                    session: None,
                })
            }),
        };
        if s.sse.is_some() {
            // The stream opens with the first envelope sent (the hello).
        } else if s.ws {
            s.upgrade(addr, path, deflate, subprotocol).await?;
        } else if cfg.transport == Transport::Tcp {
            s.stream.put(&frame::PREFACE).await?;
        }
        Ok(s)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    /// The HTTP/1.1 upgrade, checked as RFC 6455 §4.1 asks.
    async fn upgrade(
        &mut self,
        addr: &str,
        path: &str,
        deflate: bool,
        subprotocol: Option<&str>,
    ) -> Result<()> {
        let key = tungstenite::handshake::client::generate_key();
        let ext = if deflate {
            "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; server_no_context_takeover\r\n"
        } else {
            ""
        };
        let proto = subprotocol
            .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{proto}{ext}\r\n"
        );
        let (status, headers, n) = self.exchange(&req).await?;
        if status != 101 {
            bail!("{addr}: upgrade answered {status}");
        }
        let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let got = headers
            .iter()
            .find(|(name, _)| name == "sec-websocket-accept")
            .map(|(_, v)| v.as_slice());
        if got != Some(want.as_bytes()) {
            bail!("{addr}: bad Sec-WebSocket-Accept");
        }
        self.deflate = headers.iter().any(|(name, v)| {
            name == "sec-websocket-extensions"
                && memchr::memmem::find(v, b"permessage-deflate").is_some()
        });
        if deflate && !self.deflate {
            bail!("{addr}: permessage-deflate asked for, not agreed");
        }
        self.start = n;
        Ok(())
    }

    /// Reads more bytes after `end` (compacting and growing the buffer as
    /// needed); 0 at end of stream.
    pub(crate) async fn fill(&mut self) -> Result<usize> {
        if self.start > 0 && self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.buf.len() - self.end < READ_CHUNK / 4 {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            } else if self.buf.len() < MAX_FRAME {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            } else {
                bail!("frame over {MAX_FRAME} bytes");
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Sends `data` as one masked binary WebSocket frame.
    pub(crate) async fn send_frame(&mut self, data: Vec<u8>) -> Result<()> {
        self.send_masked(Frame::message(data, OpCode::Data(Data::Binary), true))
            .await
    }

    /// Sends `data` as one masked text WebSocket frame.
    pub(crate) async fn send_text(&mut self, data: Vec<u8>) -> Result<()> {
        self.send_masked(Frame::message(data, OpCode::Data(Data::Text), true))
            .await
    }

    /// Masks `f` (a client's frames must be) and writes it.
    async fn send_masked(&mut self, mut f: Frame) -> Result<()> {
        f.header_mut().mask = Some(fastrand::u32(..).to_ne_bytes());
        let mut out = Vec::new();
        f.format(&mut out)?;
        self.stream.put(&out).await?;
        Ok(())
    }

    /// SSE: the first envelope (the `hello`) opens the stream with
    /// `GET <path>?hello=`; later ones are POSTed.
    async fn send_sse(&mut self, env: &Envelope) -> Result<()> {
        let mut text = Vec::new();
        json::encode(env, &mut text);
        let Some(side) = self.sse.as_mut() else {
            bail!("not an SSE subscriber");
        };
        if side.open {
            return post(side, &text).await;
        }
        side.open = true;
        let req = format!(
            "GET {}?hello={} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            side.path,
            edgegate_proto::sse::percent_encode(&text),
            side.host
        );
        let (status, _, n) = self.exchange(&req).await?;
        if status != 200 {
            bail!("GET /sse answered {status}");
        }
        self.start = n;
        Ok(())
    }

    /// Writes the request `req` and reads its response head: the status,
    /// the headers (names in lower case) and the head's length.
    async fn exchange(&mut self, req: &str) -> Result<(u16, Vec<(String, Vec<u8>)>, usize)> {
        self.stream.put(req.as_bytes()).await?;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf[..self.end])? {
                httparse::Status::Complete(n) => {
                    let hs = resp
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                        .collect();
                    return Ok((resp.code.unwrap_or(0), hs, n));
                }
                httparse::Status::Partial => {
                    if self.fill().await? == 0 {
                        bail!("closed before the response head");
                    }
                }
            }
        }
    }

    /// Sends one envelope (a masked text or binary frame, a TCP frame, or
    /// for SSE the stream's GET or a POST).
    async fn send(&mut self, env: &Envelope) -> Result<()> {
        if self.sse.is_some() {
            return self.send_sse(env).await;
        }
        let mut body = Vec::new();
        if !self.ws {
            frame::encode_frame(env, &mut body);
            self.stream.put(&body).await?;
            return Ok(());
        }
        let op = match self.enc {
            Encoding::Json => {
                json::encode(env, &mut body);
                Data::Text
            }
            Encoding::Binary => {
                frame::encode_ws_binary(env, &mut body);
                Data::Binary
            }
        };
        self.send_masked(Frame::message(body, OpCode::Data(op), true))
            .await
    }

    /// SSE: the next whole line that matters — a `data:` line (one
    /// envelope, as a text message's) or a comment (the heartbeat, as a
    /// ping); blank lines and other fields are passed over.
    fn next_sse_line(&mut self) -> Option<Next> {
        loop {
            let avail = &self.buf[self.start..self.end];
            let nl = memchr::memchr(b'\n', avail)?;
            let line = self.start..self.start + nl;
            self.start += nl + 1;
            let text = &self.buf[line.clone()];
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if let Some(env) = text.strip_prefix(b"data:") {
                let skip = 5 + usize::from(env.first() == Some(&b' '));
                return Some(Next {
                    op: Some(OpCode::Data(Data::Text)),
                    body: line.start + skip..line.start + text.len(),
                    deflated: false,
                });
            }
            if text.first() == Some(&b':') {
                return Some(Next {
                    op: Some(OpCode::Control(Control::Ping)),
                    body: line.start..line.start,
                    deflated: false,
                });
            }
        }
    }

    /// The next whole frame in the buffer: (opcode or `None` for a raw TCP
    /// frame, payload range); advances past it.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Next>> {
        if self.sse.is_some() {
            return Ok(self.next_sse_line());
        }
        let avail = &self.buf[self.start..self.end];
        if self.ws {
            let mut cur = Cursor::new(avail);
            let Some((h, len)) = FrameHeader::parse(&mut cur)? else {
                return Ok(None);
            };
            let hl = cur.position() as usize;
            let len = usize::try_from(len).ok().filter(|&l| l <= MAX_FRAME);
            let len = len.ok_or_else(|| anyhow!("frame over {MAX_FRAME} bytes"))?;
            if avail.len() < hl + len {
                return Ok(None);
            }
            if !h.is_final || (h.rsv1 && !self.deflate) || h.mask.is_some() {
                bail!(
                    "frame the lean reader does not take: fin={} rsv1={}",
                    h.is_final,
                    h.rsv1
                );
            }
            let r = self.start + hl..self.start + hl + len;
            self.start = r.end;
            Ok(Some(Next {
                op: Some(h.opcode),
                body: r,
                deflated: h.rsv1,
            }))
        } else {
            let n = match frame::peek_frame(avail, MAX_FRAME as u32) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(None),
                Err(e) => bail!("bad frame: {e:?}"),
            };
            let r = self.start + frame::LEN_BYTES..self.start + frame::LEN_BYTES + n;
            self.start = r.end;
            Ok(Some(Next {
                op: None,
                body: r,
                deflated: false,
            }))
        }
    }

    /// Setup-time receive: the next envelope, fully decoded (pings answered).
    async fn recv_setup(&mut self) -> Result<Envelope> {
        loop {
            while let Some(e) = self.pending.pop_front() {
                match e.t {
                    Type::Ping => self.send(&Envelope::pong(e.id)).await?,
                    Type::Bye => bail!("bye {:?} {:?}", e.code, e.reason),
                    _ => return Ok(e),
                }
            }
            match self.next_frame()? {
                Some(Next {
                    op: Some(OpCode::Control(c)),
                    body,
                    ..
                }) => match c {
                    Control::Ping => {
                        let body = self.buf[body].to_vec();
                        self.pong(&body).await?;
                    }
                    Control::Close => bail!("closed: {}", close_text(&self.buf[body])),
                    _ => {}
                },
                Some(n) => {
                    let (ws, enc) = (self.ws, self.enc);
                    let envs =
                        with_body(&self.buf[n.body], n.deflated, |m| decode_all(ws, enc, m))??;
                    self.pending.extend(envs);
                }
                None => {
                    if self.fill().await? == 0 {
                        bail!("closed by the gateway during setup");
                    }
                }
            }
        }
    }

    pub(crate) async fn pong(&mut self, body: &[u8]) -> Result<()> {
        if self.sse.is_some() {
            // The server's heartbeat comment: any POST counts as activity.
            return self.send(&Envelope::pong(None)).await;
        }
        self.send_masked(Frame::pong(body.to_vec())).await
    }

    /// Subscribes to `ch` and waits for its `ok`.
    pub async fn subscribe(&mut self, ch: &str) -> Result<()> {
        let id = self.id();
        let mut e = Envelope::new(Type::Sub);
        e.id = Some(id);
        e.ch = Some(ch.to_string());
        self.send(&e).await?;
        loop {
            let e = self.recv_setup().await?;
            match (e.id == Some(id), e.t) {
                (true, Type::Ok) => return Ok(()),
                (true, Type::Err) => bail!("sub {ch} refused: {:?} {:?}", e.code, e.reason),
                _ => {}
            }
        }
    }
}

/// POSTs `body` for an SSE subscriber's session, on a connection of its
/// own (`Connection: close`): 204 expected.
async fn post(side: &SseSide, body: &[u8]) -> Result<()> {
    let Some(session) = side.session.as_deref() else {
        bail!("SSE: no session before welcome");
    };
    let sock = if side.target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = side.src {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let mut stream = sock.connect(side.target).await?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nEg-Session: {session}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        side.path,
        side.host,
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    if !answer.starts_with(b"HTTP/1.1 204") {
        bail!(
            "POST /sse answered {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        );
    }
    Ok(())
}

/// One whole frame found in the buffer.
pub(crate) struct Next {
    /// WebSocket opcode; `None` for a raw TCP frame.
    pub(crate) op: Option<OpCode>,
    /// Where its payload lies in the buffer.
    pub(crate) body: std::ops::Range<usize>,
    /// RSV1: a compressed message (permessage-deflate).
    pub(crate) deflated: bool,
}

thread_local! {
    /// One inflater per harness thread, as the gateway has one per shard
    /// (no context takeover: nothing is kept between messages).
    static INFLATER: std::cell::RefCell<Inflated> = Default::default();
}

/// The inflater and what it inflated lately. A fanned-out message is
/// compressed once per gateway shard, so its subscribers receive the same
/// bytes: a message seen before (the same compressed bytes, compared in
/// full) is not inflated again, as the gateway does not compress it again.
#[derive(Default)]
struct Inflated {
    inflater: edgegate_proto::deflate::Inflater,
    /// Hash of the compressed bytes → (compressed, inflated).
    seen: std::collections::HashMap<u64, (Vec<u8>, Vec<u8>)>,
    keys: std::hash::RandomState,
}

/// Messages remembered per thread (a few in flight per publisher).
const SEEN_MAX: usize = 256;

/// Runs `f` on a frame's message: `body` itself, or inflated.
fn with_body<R>(body: &[u8], deflated: bool, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    use std::hash::BuildHasher;
    if !deflated {
        return Ok(f(body));
    }
    INFLATER.with_borrow_mut(|z| {
        let h = z.keys.hash_one(body);
        if let Some((c, m)) = z.seen.get(&h)
            && c == body
        {
            return Ok(f(m));
        }
        let m = match z.inflater.inflate(body, MAX_FRAME) {
            Ok(m) => m.to_vec(),
            Err(v) => bail!("bad compressed message: {} {}", v.code, v.reason),
        };
        let r = f(&m);
        if z.seen.len() >= SEEN_MAX {
            z.seen.clear();
        }
        z.seen.insert(h, (body.to_vec(), m));
        Ok(r)
    })
}

pub(crate) fn close_text(body: &[u8]) -> String {
    match body {
        [a, b, rest @ ..] => format!(
            "{} {}",
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(rest)
        ),
        _ => "1005".into(),
    }
}

/// Every envelope of one frame, fully decoded.
fn decode_all(ws: bool, enc: Encoding, body: &[u8]) -> Result<Vec<Envelope>> {
    let r: std::result::Result<Vec<Envelope>, _> = if !ws {
        binary::decode(body).map(|e| vec![e])
    } else if enc == Encoding::Json {
        json::decode_batch(body).collect()
    } else {
        frame::split_ws_binary(body)
            .map(|p| p.and_then(binary::decode))
            .collect()
    };
    r.map_err(|e| anyhow!("undecodable envelope: {e:?}"))
}

/// The JSON payload's key.
const PAYLOAD_KEY: &[u8] = br#""d":"#;

/// What one read's deliveries add up to, before they are published to the
/// shared counters in one step.
#[derive(Default)]
pub(crate) struct Batch {
    n: u64,
    /// Send times of the stamps read (ns), converted to latency at the end of the read.
    sent_at: Vec<u64>,
    /// Pings to answer, bye seen.
    pings: Vec<Option<u64>>,
    bye: Option<String>,
}

impl Batch {
    /// Publishes one read's deliveries: latency into the shared time
    /// series (which also keeps the run's distribution), the counters.
    pub(crate) fn publish(
        &mut self,
        books: &mut Books,
        counters: &Counters,
        lat_us: &mut Vec<u64>,
    ) {
        if self.n == 0 {
            return;
        }
        let now = now_ns();
        lat_us.clear();
        lat_us.extend(
            self.sent_at
                .drain(..)
                .map(|t| (now.saturating_sub(t) / 1000).max(1)),
        );
        counters.timeline.record_all(now, lat_us);
        counters.received.fetch_add(self.n, Relaxed);
        books.stats.deliveries.received += self.n;
        self.n = 0;
    }
}

/// Per-subscriber accounting.
pub(crate) struct Books {
    /// Sequence tracking per publisher index (indices are small and dense).
    tracks: Vec<SeqTrack>,
    pub(crate) stats: PeerStats,
    /// Finds `"d":` (a key: inside a JSON string the quote would be escaped).
    payload_key: memchr::memmem::Finder<'static>,
}

impl Books {
    pub(crate) fn new() -> Books {
        Books {
            tracks: Vec::new(),
            stats: PeerStats::default(),
            payload_key: memchr::memmem::Finder::new(PAYLOAD_KEY),
        }
    }

    /// The final figures, sequence tracks absorbed.
    pub(crate) fn finish(mut self) -> PeerStats {
        for t in &self.tracks {
            self.stats.deliveries.absorb(t);
        }
        self.stats
    }

    pub(crate) fn stamp(&mut self, b: &mut Batch, st: Option<payload::Stamp>) {
        b.n += 1;
        let Some(st) = st.filter(|s| s.p < 1 << 16) else {
            self.stats.deliveries.malformed += 1;
            return;
        };
        let p = st.p as usize;
        if self.tracks.len() <= p {
            self.tracks.resize_with(p + 1, SeqTrack::default);
        }
        self.tracks[p].record(st.s);
        b.sent_at.push(st.t);
    }

    /// Every envelope of one message (a TCP frame, a WebSocket message).
    fn frame(&mut self, b: &mut Batch, ws: bool, enc: Encoding, body: &[u8]) {
        if !ws {
            self.envelope(b, ws, enc, body);
        } else if enc == Encoding::Json {
            let mut from = 0;
            for nl in memchr::memchr_iter(b'\n', body).chain([body.len()]) {
                if nl > from {
                    self.envelope(b, ws, enc, &body[from..nl]);
                }
                from = nl + 1;
            }
        } else {
            for part in frame::split_ws_binary(body) {
                match part {
                    Ok(p) => self.envelope(b, ws, enc, p),
                    Err(_) => self.stats.deliveries.malformed += 1,
                }
            }
        }
    }

    /// One envelope of the wire form: the fast path for `msg`, the full
    /// decoder for the rest.
    fn envelope(&mut self, b: &mut Batch, ws: bool, enc: Encoding, e: &[u8]) {
        const JSON_MSG: &[u8] = br#"{"t":"msg","#;
        if ws && enc == Encoding::Json {
            // The payload follows the short fields (ch, seq, from); a `"d"`
            // key inside `meta` would come first and fail the stamp, and
            // then the full decoder decides.
            if let Some(rest) = e.strip_prefix(JSON_MSG)
                && let Some(i) = self.payload_key.find(rest)
                && let Some(st) = payload::decode_json(&rest[i + PAYLOAD_KEY.len()..])
            {
                return self.stamp(b, Some(st));
            }
            match json::decode(e) {
                Ok(env) => self.other(b, env),
                Err(_) => self.stats.deliveries.malformed += 1,
            }
            return;
        }
        match binary::view(e) {
            Ok(v) if v.t == Type::Msg => {
                let st = if v.bits & binary::BIT_JSON != 0 {
                    payload::decode_json(v.payload)
                } else {
                    payload::decode_binary(v.payload)
                };
                self.stamp(b, st)
            }
            Ok(_) => match binary::decode(e) {
                Ok(env) => self.other(b, env),
                Err(_) => self.stats.deliveries.malformed += 1,
            },
            Err(_) => self.stats.deliveries.malformed += 1,
        }
    }

    fn other(&mut self, b: &mut Batch, env: Envelope) {
        match env.t {
            Type::Msg => {
                let st = payload::decode(&env.payload);
                self.stamp(b, st)
            }
            Type::Ping => b.pings.push(env.id),
            Type::Bye => {
                b.bye = Some(format!(
                    "closed by server: {} ({})",
                    env.code.unwrap_or(0),
                    env.reason.unwrap_or_default()
                ))
            }
            Type::Err => {
                let code = env
                    .code
                    .and_then(edgegate_proto::ErrCode::from_number)
                    .map(|c| c.name().to_string())
                    .unwrap_or_else(|| format!("{:?}", env.code));
                *self.stats.errs.entry(code).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// Starts the receive loop of `sub` (records deliveries until `stop` flips).
pub fn spawn(
    sub: LeanSub,
    counters: &Arc<Counters>,
    stop: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<PeerStats> {
    tokio::spawn(run(sub, counters.clone(), stop.clone()))
}

async fn run(
    mut s: LeanSub,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> PeerStats {
    let mut books = Books::new();
    let mut batch = Batch::default();
    let mut lat_us: Vec<u64> = Vec::new();
    let (ws, enc) = (s.ws, s.enc);
    for env in std::mem::take(&mut s.pending) {
        books.other(&mut batch, env);
    }
    let end = loop {
        // Whatever is buffered first (setup may have read ahead).
        let parsed = loop {
            match s.next_frame() {
                Ok(Some(n)) => match n.op {
                    None | Some(OpCode::Data(Data::Text | Data::Binary)) => {
                        let r = with_body(&s.buf[n.body], n.deflated, |m| {
                            books.frame(&mut batch, ws, enc, m)
                        });
                        if let Err(e) = r {
                            break Err(e);
                        }
                    }
                    Some(OpCode::Control(Control::Ping)) => {
                        let body = s.buf[n.body].to_vec();
                        if let Err(e) = s.pong(&body).await {
                            break Err(e);
                        }
                    }
                    Some(OpCode::Control(Control::Close)) => {
                        break Err(anyhow!("closed by server: {}", close_text(&s.buf[n.body])));
                    }
                    Some(_) => {}
                },
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        batch.publish(&mut books, &counters, &mut lat_us);
        let mut answered = Ok(());
        for id in std::mem::take(&mut batch.pings) {
            answered = s.send(&Envelope::pong(id)).await;
            if answered.is_err() {
                break;
            }
        }
        if let Err(e) = answered {
            break Err(e);
        }
        if let Some(bye) = batch.bye.take() {
            break Err(anyhow!(bye));
        }
        if let Err(e) = parsed {
            break Err(e);
        }
        tokio::select! {
            r = s.fill() => match r {
                Ok(0) => break Err(anyhow!("connection closed by the gateway")),
                Ok(_) => {}
                Err(e) => break Err(e),
            },
            _ = stop.changed() => break Ok(()),
        }
    };
    if let Err(e) = end {
        counters.disconnects.fetch_add(1, Relaxed);
        books.stats.lost = Some(e.to_string());
    }
    books.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::Stamp;

    fn books() -> Books {
        Books::new()
    }

    /// A `msg` as the gateway's encoders write it, carrying `st`.
    fn msg(enc: Encoding, st: Stamp) -> Vec<u8> {
        let mut e = Envelope::new(Type::Msg);
        e.ch = Some("room:a".into());
        e.seq = Some(st.s);
        e.from = Some("u".into());
        e.payload = payload::encode(enc, st, 3);
        let mut out = Vec::new();
        match enc {
            Encoding::Json => json::encode(&e, &mut out),
            Encoding::Binary => binary::encode(&e, &mut out),
        }
        out
    }

    #[test]
    fn reads_stamps_in_place_in_both_encodings() {
        for enc in [Encoding::Json, Encoding::Binary] {
            let (mut b, mut batch) = (books(), Batch::default());
            for s in [1, 2, 2, 4, 3] {
                let st = Stamp {
                    p: 1,
                    s,
                    t: 1000 * s,
                };
                b.envelope(&mut batch, true, enc, &msg(enc, st));
            }
            assert_eq!(batch.n, 5, "{enc:?}");
            assert_eq!(batch.sent_at, [1000, 2000, 2000, 4000, 3000], "{enc:?}");
            let t = &b.tracks[1];
            assert_eq!((t.unique, t.dups(), t.reordered()), (4, 1, 1), "{enc:?}");
            assert_eq!(b.stats.deliveries.malformed, 0);
        }
    }

    #[test]
    fn other_envelopes_take_the_full_decoder() {
        let (mut b, mut batch) = (books(), Batch::default());
        let mut ping = Envelope::new(Type::Ping);
        ping.id = Some(7);
        let mut bye = Envelope::new(Type::Bye);
        bye.code = Some(4003);
        bye.reason = Some("slow consumer".into());
        let mut err = Envelope::new(Type::Err);
        err.code = Some(edgegate_proto::ErrCode::RateLimited.number());
        for e in [&ping, &bye, &err] {
            let mut out = Vec::new();
            json::encode(e, &mut out);
            b.envelope(&mut batch, true, Encoding::Json, &out);
        }
        // A msg whose fields are in another order still counts.
        let odd = br#"{"t":"msg","d":{"s":1,"t":5,"p":0},"ch":"room:a"}"#;
        b.envelope(&mut batch, true, Encoding::Json, odd);
        b.envelope(&mut batch, true, Encoding::Json, b"{not json");
        assert_eq!(batch.pings, [Some(7)]);
        assert_eq!(
            batch.bye.as_deref(),
            Some("closed by server: 4003 (slow consumer)")
        );
        assert_eq!(b.stats.errs.get("rate_limited"), Some(&1));
        assert_eq!((batch.n, batch.sent_at.as_slice()), (1, &[5][..]));
        assert_eq!(b.stats.deliveries.malformed, 1);
    }

    #[test]
    fn compressed_messages_inflate_once_and_read_the_same() {
        let mut z = edgegate_proto::deflate::Deflater::new(edgegate_proto::deflate::LEVEL);
        let (a, b) = (vec![b'a'; 500], vec![b'b'; 500]);
        let (mut za, mut zb) = (Vec::new(), Vec::new());
        assert!(z.compress(&[&a], &mut za) && z.compress(&[&b], &mut zb));
        for _ in 0..3 {
            assert_eq!(with_body(&za, true, <[u8]>::to_vec).expect("a"), a);
            assert_eq!(with_body(&zb, true, <[u8]>::to_vec).expect("b"), b);
        }
        assert_eq!(INFLATER.with_borrow(|z| z.seen.len()), 2);
        assert_eq!(
            with_body(b"plain", false, <[u8]>::to_vec).expect("plain"),
            b"plain"
        );
        assert!(
            with_body(&[0xff, 0xff, 0xff], true, |_| ()).is_err(),
            "not deflate data"
        );
    }
}
