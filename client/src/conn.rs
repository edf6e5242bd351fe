//! One session over one transport: connect, `hello`/`welcome`, send and
//! receive envelopes.
//!
//! [`Connection`] hides the transport behind a private `Link` enum:
//! WebSocket, a u32-framed byte stream (raw TCP, TCP+TLS, or the QUIC
//! session stream), or SSE (an event stream and POSTs, `crate::sse`). Both run over a boxed byte stream, plain or TLS
//! (rustls, ring provider). Everything above the link — batching, `ping`
//! answers, `bye` handling — is transport-agnostic.
//!
//! [`Connection::recv`] is cancel-safe, so a caller may race it against a timer
//! or a command channel in `tokio::select!` and send from the branch body.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use edgegate_proto::{Envelope, Payload, Type, binary, frame, json};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{
    self, Message,
    client::IntoClientRequest,
    http::HeaderValue,
    protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode as WsCloseCode},
};

use crate::policy::{Backoff, CloseInfo};
use crate::sse::{Dial, SseLink};

/// The transport a client connects over (docs/protocol.md §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// WebSocket on `GET /ws` (plain, or wss with [`ClientConfig::tls`]).
    Ws,
    /// Raw TCP (plain, or TLS with [`ClientConfig::tls`]): `EG1\n` preface,
    /// then u32 big-endian length-prefixed binary envelopes.
    Tcp,
    /// QUIC (always TLS 1.3, ALPN `edgegate/1`): one bidirectional stream
    /// framed as TCP, without the preface.
    Quic,
    /// SSE on the WebSocket listener (`GET /sse` and POSTs; plain, or TLS
    /// with [`ClientConfig::tls`]): JSON envelopes only.
    Sse,
}

impl Transport {
    /// `"ws"` / `"tcp"` / `"quic"`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
            Transport::Sse => "sse",
        }
    }

    /// Whether envelopes travel u32-framed and always binary (TCP, QUIC).
    pub fn is_framed(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Quic)
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ws" => Ok(Transport::Ws),
            "tcp" => Ok(Transport::Tcp),
            "quic" => Ok(Transport::Quic),
            "sse" => Ok(Transport::Sse),
            other => Err(format!("unknown transport {other:?} (ws, tcp, quic, sse)")),
        }
    }
}

/// The envelope encoding. TCP always carries binary envelopes; on WebSocket
/// this picks the subprotocol (`edgegate.v1.json` or `edgegate.v1.bin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// JSON envelopes in WS text messages.
    Json,
    /// Binary envelopes (WS binary messages, LEB128-length batched; always on TCP).
    Binary,
}

impl Encoding {
    /// `"json"` / `"bin"`.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Binary => "bin",
        }
    }

    /// The WebSocket subprotocol for this encoding.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => "edgegate.v1.json",
            Encoding::Binary => "edgegate.v1.bin",
        }
    }
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Encoding::Json),
            "bin" | "binary" => Ok(Encoding::Binary),
            other => Err(format!("unknown encoding {other:?} (json, bin)")),
        }
    }
}

/// How to reach and authenticate to a gateway.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port`, or for WebSocket also `ws://host:port/path` (path defaults to `/ws`).
    pub addr: String,
    /// WebSocket, TCP or QUIC.
    pub transport: Transport,
    /// TLS over the TCP connection (wss:// for WebSocket, TLS for raw TCP).
    /// QUIC is always encrypted and ignores this.
    pub tls: bool,
    /// PEM file of the CA certificate(s) to trust for TLS and QUIC; required
    /// by both (this client does not load the system's roots).
    pub ca_file: Option<PathBuf>,
    /// The name to verify the server's certificate against (SNI), default `localhost`.
    pub server_name: String,
    /// JSON or binary envelopes (TCP and QUIC are always binary).
    pub encoding: Encoding,
    /// `hello.meta.user` (required by auth mode `none`).
    pub user: String,
    /// `hello.meta.token`.
    pub token: Option<String>,
    /// Local address to bind before connecting (port 0). Spreading
    /// connections over `127.0.0.0/8` lifts the ~28 k ephemeral-port limit per
    /// source address in load tests.
    pub source_addr: Option<IpAddr>,
    /// Reconnect schedule used by [`Client`](crate::Client).
    pub backoff: Backoff,
    /// Seed for the reconnect jitter; `None` seeds randomly.
    pub seed: Option<u64>,
    /// Limit on connect + handshake + `hello`/`welcome`.
    pub connect_timeout: Duration,
    /// `hello.meta.client`.
    pub client_name: Option<String>,
    /// `hello.meta.instance`: scopes publish ids across this client's
    /// reconnects, so a resent publish is stored once. [`Client`](crate::Client)
    /// picks a random one when this is `None`.
    pub instance: Option<String>,
    /// `hello.meta.since`: the position of the user's own stream to
    /// recover after `welcome` ([`Client`](crate::Client) keeps it).
    pub since: Option<Position>,
}

/// A position in a channel's stream (docs/protocol.md §7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The stream's epoch (`None`: the current one).
    pub epoch: Option<String>,
    /// The last `seq` seen.
    pub seq: u64,
}

impl Position {
    /// `{"seq": S, "epoch": E}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("seq".into(), self.seq.into());
        if let Some(e) = &self.epoch {
            m.insert("epoch".into(), e.clone().into());
        }
        serde_json::Value::Object(m)
    }
}

/// The outcome of a recovery, from `ok.meta` or `welcome.meta.stream`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamState {
    /// The stream's epoch ("" where the gateway keeps no history).
    pub epoch: String,
    /// The stream's top `seq` when answered.
    pub seq: u64,
    /// `Some(true)`: everything after the position follows; `Some(false)`:
    /// nothing was replayed (see `reason`); `None`: no recovery was asked.
    pub recovered: Option<bool>,
    /// Why not recovered: `epoch_changed`, `expired`, `too_many`, `unavailable`.
    pub reason: Option<String>,
    /// With `expired`: the oldest `seq` still kept.
    pub oldest: Option<u64>,
}

impl StreamState {
    /// Reads `meta` (an `ok.meta` or `welcome.meta.stream` object) and `seq`.
    pub fn parse(meta: &serde_json::Value, seq: Option<u64>) -> StreamState {
        let s = |k: &str| meta.get(k).and_then(|x| x.as_str()).map(str::to_string);
        StreamState {
            epoch: s("epoch").unwrap_or_default(),
            seq: seq
                .or_else(|| meta.get("seq").and_then(|x| x.as_u64()))
                .unwrap_or(0),
            recovered: meta.get("recovered").and_then(|x| x.as_bool()),
            reason: s("reason"),
            oldest: meta.get("oldest").and_then(|x| x.as_u64()),
        }
    }
}

impl ClientConfig {
    /// A config with defaults: JSON, no TLS, no token, no source address, default backoff, 10 s connect timeout.
    pub fn new(addr: impl Into<String>, transport: Transport, user: impl Into<String>) -> Self {
        ClientConfig {
            addr: addr.into(),
            transport,
            tls: false,
            ca_file: None,
            server_name: "localhost".into(),
            encoding: if transport.is_framed() {
                Encoding::Binary
            } else {
                Encoding::Json
            },
            user: user.into(),
            token: None,
            source_addr: None,
            backoff: Backoff::default(),
            seed: None,
            connect_timeout: Duration::from_secs(10),
            client_name: Some(concat!("edgegate-client/", env!("CARGO_PKG_VERSION")).into()),
            instance: None,
            since: None,
        }
    }
}

/// What the gateway said in `welcome.meta`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Welcome {
    /// Connection id (`<node>-<shard>-<n>`).
    pub conn: String,
    /// The authenticated user id.
    pub user: String,
    /// Node name.
    pub node: String,
    /// Shard owning the connection.
    pub shard: u32,
    /// Server heartbeat interval.
    pub hb_ms: u64,
    /// Largest envelope the server accepts from this connection, in bytes.
    pub max_frame: u32,
    /// `welcome.meta.stream`: the position of the user's own stream (in
    /// every `welcome`), and the outcome of `hello.meta.since` when asked.
    pub stream: Option<StreamState>,
}

impl Welcome {
    fn parse(meta: Option<&str>) -> Welcome {
        let v: serde_json::Value = meta
            .and_then(|m| serde_json::from_str(m).ok())
            .unwrap_or_default();
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        Welcome {
            conn: s("conn"),
            user: s("user"),
            node: s("node"),
            shard: n("shard") as u32,
            hb_ms: n("hb_ms"),
            max_frame: u32::try_from(n("max_frame")).unwrap_or(u32::MAX),
            stream: v.get("stream").map(|st| StreamState::parse(st, None)),
        }
    }
}

/// Why an operation on a [`Connection`] failed.
#[derive(Debug)]
pub enum Error {
    /// The server ended the session with `bye` or a close frame.
    Closed {
        /// Close code (docs/protocol.md §5).
        code: u16,
        /// `bye.reason` / close frame reason.
        reason: String,
        /// `bye.meta.retry_ms`.
        retry_ms: Option<u64>,
    },
    /// The stream ended without `bye`.
    Eof,
    /// Socket error.
    Io(io::Error),
    /// WebSocket protocol or handshake error.
    Ws(tungstenite::Error),
    /// TLS set-up or QUIC connection error.
    Tls(String),
    /// The peer sent bytes that do not decode.
    Decode(String),
    /// Connect, handshake or `welcome` took longer than `connect_timeout`.
    Timeout,
    /// Bad configuration (address, user).
    Config(String),
}

impl Error {
    /// The policy's view of this error: close code and `retry_ms` when the
    /// server sent them, nothing for transport failures.
    pub fn close_info(&self) -> CloseInfo {
        match self {
            Error::Closed { code, retry_ms, .. } => CloseInfo {
                code: Some(*code),
                retry_ms: *retry_ms,
            },
            _ => CloseInfo::default(),
        }
    }

    /// The close code, if the server sent one.
    pub fn code(&self) -> Option<u16> {
        match self {
            Error::Closed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Closed {
                code,
                reason,
                retry_ms,
            } => {
                write!(f, "closed by server: {code}")?;
                if !reason.is_empty() {
                    write!(f, " ({reason})")?;
                }
                if let Some(r) = retry_ms {
                    write!(f, ", retry in {r} ms")?;
                }
                Ok(())
            }
            Error::Eof => f.write_str("connection closed without bye"),
            Error::Io(e) => write!(f, "i/o: {e}"),
            Error::Ws(e) => write!(f, "websocket: {e}"),
            Error::Tls(e) => write!(f, "tls/quic: {e}"),
            Error::Decode(e) => write!(f, "undecodable input: {e}"),
            Error::Timeout => f.write_str("timed out"),
            Error::Config(e) => write!(f, "config: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Io(e) => Error::Io(e),
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => Error::Eof,
            other => Error::Ws(other),
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Read-buffer and WebSocket buffer size: small, so that thousands of idle
/// client connections in one load-test process stay cheap.
const READ_CHUNK: usize = 4096;

/// A byte stream: plain TCP, TLS over TCP, or a QUIC bidirectional stream.
pub(crate) trait IoStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> IoStream for T {}
pub(crate) type BoxIo = Box<dyn IoStream>;

enum Link {
    Ws(Box<WebSocketStream<BoxIo>>),
    /// u32-framed binary envelopes: TCP (plain or TLS) and QUIC.
    Tcp(TcpLink),
    /// SSE: the event stream, and POSTs.
    Sse(Box<SseLink>),
}

struct TcpLink {
    stream: BoxIo,
    rbuf: Vec<u8>,
    /// Bytes not yet written; writes drain it, so a cancelled write loses nothing.
    wbuf: Vec<u8>,
}

/// One session with a gateway. Not reconnecting; see [`Client`](crate::Client).
pub struct Connection {
    link: Link,
    encoding: Encoding,
    welcome: Welcome,
    next_id: u64,
    inbox: VecDeque<Envelope>,
    /// Envelopes to send at the next opportunity (`pong` answers on WS).
    outbox: Vec<Envelope>,
    closed: Option<(u16, String, Option<u64>)>,
    scratch: Vec<u8>,
    last_rx: tokio::time::Instant,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("welcome", &self.welcome)
            .field("encoding", &self.encoding)
            .finish_non_exhaustive()
    }
}

/// Splits `ws://host:port/path`, `wss://…`, `http(s)://…` or `host:port`
/// into (`host:port`, path); the path defaults to `default`.
fn split_addr(addr: &str, default: &str) -> (String, String) {
    let rest = ["ws://", "WS://", "wss://", "WSS://", "http://", "https://"]
        .iter()
        .find_map(|p| addr.strip_prefix(p))
        .unwrap_or(addr);
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), default.to_string()),
    }
}

async fn resolve(hostport: &str) -> Result<SocketAddr> {
    if let Ok(sa) = hostport.parse::<SocketAddr>() {
        return Ok(sa);
    }
    tokio::net::lookup_host(hostport)
        .await?
        .next()
        .ok_or_else(|| Error::Config(format!("{hostport}: no address")))
}

pub(crate) async fn tcp_connect(target: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Connection {
    /// Connects, sends `hello` and waits for `welcome`, all within
    /// `config.connect_timeout`. A `bye` before `welcome` (4001, 4007, …) is
    /// returned as [`Error::Closed`].
    pub async fn connect(config: &ClientConfig) -> Result<Connection> {
        match tokio::time::timeout(config.connect_timeout, Self::connect_inner(config)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout),
        }
    }

    async fn connect_inner(config: &ClientConfig) -> Result<Connection> {
        let sse = config.transport == Transport::Sse;
        let (hostport, path) = split_addr(&config.addr, if sse { "/sse" } else { "/ws" });
        let target = resolve(&hostport).await?;
        let mut meta = serde_json::Map::new();
        meta.insert("user".into(), config.user.clone().into());
        if let Some(t) = &config.token {
            meta.insert("token".into(), t.clone().into());
        }
        if let Some(c) = &config.client_name {
            meta.insert("client".into(), c.clone().into());
        }
        if let Some(i) = &config.instance {
            meta.insert("instance".into(), i.clone().into());
        }
        if let Some(p) = &config.since {
            meta.insert("since".into(), p.to_json());
        }
        let mut hello = Envelope::new(Type::Hello);
        hello.id = Some(1);
        hello.meta = Some(serde_json::Value::Object(meta).to_string());
        let dial = Dial {
            target,
            source: config.source_addr,
            tls: match config.tls {
                true => Some((
                    tls_config(config.ca_file.as_ref(), false)?,
                    server_name(config)?,
                )),
                false => None,
            },
        };
        let (link, encoding) = match config.transport {
            Transport::Ws => {
                let stream = dial.open().await?;
                let url = format!("ws://{hostport}{path}");
                let mut req = url
                    .as_str()
                    .into_client_request()
                    .map_err(|e| Error::Config(format!("{url}: {e}")))?;
                req.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    HeaderValue::from_static(config.encoding.subprotocol()),
                );
                let ws_config = WebSocketConfig::default()
                    .read_buffer_size(READ_CHUNK)
                    .write_buffer_size(0);
                let (ws, _resp) =
                    tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config))
                        .await?;
                (Link::Ws(Box::new(ws)), config.encoding)
            }
            Transport::Tcp | Transport::Quic => {
                let stream: BoxIo = if config.transport == Transport::Quic {
                    Box::new(quic_connect(config, target).await?)
                } else {
                    dial.open().await?
                };
                let mut link = TcpLink {
                    stream,
                    rbuf: Vec::new(),
                    wbuf: Vec::new(),
                };
                if config.transport == Transport::Tcp {
                    link.wbuf.extend_from_slice(&frame::PREFACE);
                }
                (Link::Tcp(link), Encoding::Binary)
            }
            // The hello goes in the GET that opens the stream.
            Transport::Sse => {
                let link = SseLink::open(dial, hostport, path, &hello).await?;
                (Link::Sse(Box::new(link)), Encoding::Json)
            }
        };
        let mut conn = Connection {
            link,
            encoding,
            welcome: Welcome::default(),
            next_id: 2,
            inbox: VecDeque::new(),
            outbox: Vec::new(),
            closed: None,
            scratch: Vec::new(),
            last_rx: tokio::time::Instant::now(),
        };
        if !sse {
            conn.send(&hello).await?;
        }
        loop {
            let env = conn.recv().await?;
            match env.t {
                Type::Welcome => {
                    conn.welcome = Welcome::parse(env.meta.as_deref());
                    return Ok(conn);
                }
                Type::Ping | Type::Pong => continue,
                other => {
                    return Err(Error::Decode(format!(
                        "expected welcome, got {}",
                        other.name()
                    )));
                }
            }
        }
    }

    /// What the gateway said in `welcome`.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// When the last bytes (any frame, WebSocket pings included) arrived.
    pub fn last_received(&self) -> tokio::time::Instant {
        self.last_rx
    }

    /// The encoding in use.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// A fresh request id (monotonic per connection, starting at 1).
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends `sub` for `ch`; the answer (`ok`/`err` with the returned id) comes through [`recv`](Self::recv).
    pub async fn subscribe(&mut self, ch: &str) -> Result<u64> {
        self.subscribe_since(ch, None).await
    }

    /// Sends `sub` for `ch` with `meta.since` when `since` is given: the
    /// `ok` says whether what was missed follows (docs/protocol.md §7).
    pub async fn subscribe_since(&mut self, ch: &str, since: Option<&Position>) -> Result<u64> {
        self.subscribe_with(ch, since, false).await
    }

    /// Sends `sub` for `ch`, with `meta.since` when `since` is given and
    /// `meta.presence` when `presence`: the `ok` then carries the room's
    /// present count and `members` envelopes follow (docs/protocol.md §8).
    pub async fn subscribe_with(
        &mut self,
        ch: &str,
        since: Option<&Position>,
        presence: bool,
    ) -> Result<u64> {
        let id = self.next_id();
        let mut e = Envelope::new(Type::Sub);
        e.id = Some(id);
        e.ch = Some(ch.to_string());
        let mut meta = serde_json::Map::new();
        if let Some(p) = since {
            meta.insert("since".into(), p.to_json());
        }
        if presence {
            meta.insert("presence".into(), true.into());
        }
        if !meta.is_empty() {
            e.meta = Some(serde_json::Value::Object(meta).to_string());
        }
        self.send(&e).await?;
        Ok(id)
    }

    /// Sends `unsub` for `ch`.
    pub async fn unsubscribe(&mut self, ch: &str) -> Result<u64> {
        let id = self.next_id();
        let mut e = Envelope::new(Type::Unsub);
        e.id = Some(id);
        e.ch = Some(ch.to_string());
        self.send(&e).await?;
        Ok(id)
    }

    /// Sends `pub` to `ch`; returns its id.
    pub async fn publish(&mut self, ch: &str, payload: Payload) -> Result<u64> {
        let id = self.next_id();
        let mut e = Envelope::new(Type::Pub);
        e.id = Some(id);
        e.ch = Some(ch.to_string());
        e.payload = payload;
        self.send(&e).await?;
        Ok(id)
    }

    /// Sends `req` to `svc:<name>`; the `reply` carries the returned id.
    pub async fn request(&mut self, ch: &str, payload: Payload) -> Result<u64> {
        let id = self.next_id();
        let mut e = Envelope::new(Type::Req);
        e.id = Some(id);
        e.ch = Some(ch.to_string());
        e.payload = payload;
        self.send(&e).await?;
        Ok(id)
    }

    /// Sends one envelope.
    pub async fn send(&mut self, env: &Envelope) -> Result<()> {
        self.send_batch(std::slice::from_ref(env)).await
    }

    /// Sends several envelopes as one WebSocket message / one write.
    pub async fn send_batch(&mut self, envs: &[Envelope]) -> Result<()> {
        if let Some((code, reason, retry_ms)) = &self.closed {
            return Err(Error::Closed {
                code: *code,
                reason: reason.clone(),
                retry_ms: *retry_ms,
            });
        }
        if envs.is_empty() {
            return Ok(());
        }
        match &mut self.link {
            Link::Ws(ws) => {
                let msg = ws_message(self.encoding, envs, &mut self.scratch);
                ws.send(msg).await?;
            }
            Link::Tcp(t) => {
                for e in envs {
                    frame::encode_frame(e, &mut t.wbuf);
                }
                t.flush().await?;
            }
            Link::Sse(s) => s.post(envs).await?,
        }
        Ok(())
    }

    /// Receives the next envelope. Answers `ping` envelopes itself (and still
    /// returns them); WebSocket pings are answered by tungstenite. A `bye` is
    /// returned as [`Error::Closed`], as is every later call.
    ///
    /// Cancel-safe: dropping the future loses no data.
    pub async fn recv(&mut self) -> Result<Envelope> {
        loop {
            if let Some(env) = self.inbox.pop_front() {
                match env.t {
                    Type::Ping => {
                        self.outbox.push(Envelope::pong(env.id));
                    }
                    Type::Bye => {
                        let retry_ms = env.meta.as_deref().and_then(|m| {
                            serde_json::from_str::<serde_json::Value>(m)
                                .ok()?
                                .get("retry_ms")?
                                .as_u64()
                        });
                        let code = env.code.and_then(|c| u16::try_from(c).ok()).unwrap_or(0);
                        self.closed =
                            Some((code, env.reason.clone().unwrap_or_default(), retry_ms));
                        self.inbox.clear();
                    }
                    _ => {}
                }
                if env.t != Type::Bye {
                    return Ok(env);
                }
            }
            if let Some((code, reason, retry_ms)) = &self.closed {
                return Err(Error::Closed {
                    code: *code,
                    reason: reason.clone(),
                    retry_ms: *retry_ms,
                });
            }
            if !self.outbox.is_empty() {
                let out = std::mem::take(&mut self.outbox);
                match &mut self.link {
                    Link::Ws(ws) => {
                        let msg = ws_message(self.encoding, &out, &mut self.scratch);
                        ws.send(msg).await?;
                    }
                    Link::Tcp(t) => {
                        for e in &out {
                            frame::encode_frame(e, &mut t.wbuf);
                        }
                    }
                    Link::Sse(s) => s.post(&out).await?,
                }
            }
            match &mut self.link {
                Link::Ws(ws) => match ws
                    .next()
                    .await
                    .inspect(|_| self.last_rx = tokio::time::Instant::now())
                {
                    None => return Err(Error::Eof),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Message::Text(t))) => {
                        for r in json::decode_batch(t.as_bytes()) {
                            self.inbox
                                .push_back(r.map_err(|e| Error::Decode(e.to_string()))?);
                        }
                    }
                    Some(Ok(Message::Binary(b))) => {
                        if self.encoding == Encoding::Json {
                            for r in json::decode_batch(&b) {
                                self.inbox
                                    .push_back(r.map_err(|e| Error::Decode(e.to_string()))?);
                            }
                        } else {
                            for part in frame::split_ws_binary(&b) {
                                let part = part.map_err(|e| Error::Decode(e.to_string()))?;
                                self.inbox.push_back(
                                    binary::decode(part)
                                        .map_err(|e| Error::Decode(e.to_string()))?,
                                );
                            }
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame
                            .map(|f: CloseFrame| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new()));
                        self.closed = Some((code, reason, None));
                    }
                    Some(Ok(_)) => {} // ping/pong/frame: handled by tungstenite
                },
                Link::Tcp(t) => {
                    if !t.wbuf.is_empty() {
                        t.flush().await?;
                    }
                    // Parse whole frames already buffered.
                    let mut used = 0;
                    loop {
                        match frame::peek_frame(&t.rbuf[used..], u32::MAX) {
                            Ok(Some(n)) => {
                                let body =
                                    &t.rbuf[used + frame::LEN_BYTES..used + frame::LEN_BYTES + n];
                                self.inbox.push_back(
                                    binary::decode(body)
                                        .map_err(|e| Error::Decode(e.to_string()))?,
                                );
                                used += frame::LEN_BYTES + n;
                            }
                            Ok(None) => break,
                            Err(e) => return Err(Error::Decode(format!("{e:?}"))),
                        }
                    }
                    if used > 0 {
                        t.rbuf.drain(..used);
                        continue;
                    }
                    // Cancel-safe: read_buf either appends bytes or nothing.
                    if t.rbuf.capacity() - t.rbuf.len() < READ_CHUNK {
                        t.rbuf.reserve(READ_CHUNK);
                    }
                    let n = t.stream.read_buf(&mut t.rbuf).await?;
                    if n == 0 {
                        return Err(Error::Eof);
                    }
                    self.last_rx = tokio::time::Instant::now();
                }
                Link::Sse(s) => {
                    // Envelopes, and a ping per heartbeat comment (sent
                    // at the top of the loop).
                    if s.read(&mut self.inbox, &mut self.outbox).await? == 0 {
                        return Err(Error::Eof);
                    }
                    self.last_rx = tokio::time::Instant::now();
                }
            }
        }
    }

    /// Closes the session from the client side (WS close 1000 / TCP FIN /
    /// QUIC stream FIN, then the QUIC connection closes when dropped).
    pub async fn close(mut self) -> Result<()> {
        match &mut self.link {
            Link::Ws(ws) => {
                // The inherent close (with a close frame), not `SinkExt::close`,
                // which `Box<WebSocketStream>` also has once futures-sink's
                // `alloc` feature is on (feature unification in a workspace build).
                let frame = CloseFrame {
                    code: WsCloseCode::Normal,
                    reason: "".into(),
                };
                let _ = WebSocketStream::close(&mut **ws, Some(frame)).await;
            }
            Link::Tcp(t) => {
                let _ = t.flush().await;
                let _ = t.stream.shutdown().await;
            }
            Link::Sse(s) => s.close().await,
        }
        Ok(())
    }
}

impl TcpLink {
    /// Writes all of `wbuf`; each step is cancel-safe (written bytes are drained).
    async fn flush(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            let n = self.stream.write(&self.wbuf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.wbuf.drain(..n);
        }
        Ok(())
    }
}

/// The QUIC ALPN (docs/protocol.md §1).
pub const QUIC_ALPN: &[u8] = b"edgegate/1";

/// rustls client configs, one per (CA file, QUIC?): thousands of connections
/// share one (and its session cache) instead of re-reading the CA each time.
#[allow(clippy::type_complexity)]
static TLS_CONFIGS: Mutex<Vec<((Option<PathBuf>, bool), Arc<rustls::ClientConfig>)>> =
    Mutex::new(Vec::new());

fn tls_config(ca_file: Option<&PathBuf>, quic: bool) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let key = (ca_file.cloned(), quic);
    let mut cache = TLS_CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(c.clone());
    }
    let Some(path) = ca_file else {
        return Err(Error::Config(
            "TLS and QUIC need a CA file (ClientConfig::ca_file)".into(),
        ));
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    for c in certs {
        let c = c.map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        roots
            .add(c)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Config(format!(
            "{}: no certificate found",
            path.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if quic {
        &[&rustls::version::TLS13]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if quic {
        cfg.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    }
    let cfg = Arc::new(cfg);
    cache.push((key, cfg.clone()));
    Ok(cfg)
}

/// The rustls client config and server name a TLS connection of `config`
/// uses (its CA file, its server name): for callers that open their own
/// TLS streams, such as the load-test harness's lean receivers.
pub fn tls_client(
    config: &ClientConfig,
) -> Result<(
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
)> {
    Ok((
        tls_config(config.ca_file.as_ref(), false)?,
        server_name(config)?,
    ))
}

fn server_name(config: &ClientConfig) -> Result<rustls::pki_types::ServerName<'static>> {
    rustls::pki_types::ServerName::try_from(config.server_name.clone())
        .map_err(|e| Error::Config(format!("server name {:?}: {e}", config.server_name)))
}

/// QUIC endpoints, one per (runtime, source address, address family): one
/// UDP socket and driver task carries every connection from that source.
#[allow(clippy::type_complexity)]
static ENDPOINTS: Mutex<Vec<((tokio::runtime::Id, Option<IpAddr>, bool), quinn::Endpoint)>> =
    Mutex::new(Vec::new());

fn endpoint(source: Option<IpAddr>, v6: bool) -> Result<quinn::Endpoint> {
    let key = (tokio::runtime::Handle::current().id(), source, v6);
    let mut eps = ENDPOINTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, ep)) = eps.iter().find(|(k, _)| *k == key) {
        return Ok(ep.clone());
    }
    let bind = match (source, v6) {
        (Some(ip), _) => SocketAddr::new(ip, 0),
        (None, false) => SocketAddr::from(([0, 0, 0, 0], 0)),
        (None, true) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    };
    let ep = quinn::Endpoint::client(bind)?;
    eps.push((key, ep.clone()));
    Ok(ep)
}

fn quic_client_config(config: &ClientConfig) -> Result<quinn::ClientConfig> {
    let tls = tls_config(config.ca_file.as_ref(), true)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut transport = quinn::TransportConfig::default();
    // Small windows keep thousands of client connections in one process
    // cheap; the server's keep-alive and idle timeout govern liveness.
    transport
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(None)
        .stream_receive_window((256u32 << 10).into())
        .receive_window((512u32 << 10).into())
        .send_window(256 << 10);
    let mut qc = quinn::ClientConfig::new(Arc::new(crypto));
    qc.transport_config(Arc::new(transport));
    Ok(qc)
}

async fn quic_connect(config: &ClientConfig, target: SocketAddr) -> Result<QuicIo> {
    let ep = endpoint(config.source_addr, target.is_ipv6())?;
    let conn = ep
        .connect_with(quic_client_config(config)?, target, &config.server_name)
        .map_err(|e| Error::Tls(e.to_string()))?
        .await
        .map_err(|e| Error::Tls(e.to_string()))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(QuicIo { send, recv, conn })
}

/// A QUIC connection to the gateway at `target` and its session stream,
/// as one byte stream carrying the raw-TCP framing (no preface): for
/// callers that frame envelopes themselves, such as the load-test
/// harness's lean receivers.
pub async fn quic_stream(config: &ClientConfig, target: SocketAddr) -> Result<QuicIo> {
    quic_connect(config, target).await
}

/// The QUIC session stream as one byte stream (closes the connection when
/// dropped).
pub struct QuicIo {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    conn: quinn::Connection,
}

impl Drop for QuicIo {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"");
    }
}

impl AsyncRead for QuicIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

fn ws_message(encoding: Encoding, envs: &[Envelope], scratch: &mut Vec<u8>) -> Message {
    scratch.clear();
    match encoding {
        Encoding::Json => {
            for (i, e) in envs.iter().enumerate() {
                if i > 0 {
                    scratch.push(b'\n');
                }
                json::encode(e, scratch);
            }
            // The JSON writer only produces UTF-8; fall back to lossy rather than panic.
            let text = match std::str::from_utf8(scratch) {
                Ok(s) => s.to_owned(),
                Err(_) => String::from_utf8_lossy(scratch).into_owned(),
            };
            Message::text(text)
        }
        Encoding::Binary => {
            for e in envs {
                frame::encode_ws_binary(e, scratch);
            }
            Message::Binary(Bytes::copy_from_slice(scratch))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_splitting() {
        assert_eq!(
            split_addr("127.0.0.1:80", "/ws"),
            ("127.0.0.1:80".into(), "/ws".into())
        );
        assert_eq!(
            split_addr("ws://h:1/x/y", "/ws"),
            ("h:1".into(), "/x/y".into())
        );
        assert_eq!(split_addr("ws://h:1", "/ws"), ("h:1".into(), "/ws".into()));
        assert_eq!(
            split_addr("wss://h:1/x", "/ws"),
            ("h:1".into(), "/x".into())
        );
        assert_eq!(
            split_addr("http://h:1", "/sse"),
            ("h:1".into(), "/sse".into())
        );
    }

    #[test]
    fn welcome_meta_parsing() {
        let w = Welcome::parse(Some(
            r#"{"conn":"n-0-1","user":"u","node":"n","shard":1,"hb_ms":25000,"max_frame":65536}"#,
        ));
        assert_eq!(w.conn, "n-0-1");
        assert_eq!(w.shard, 1);
        assert_eq!(w.hb_ms, 25000);
        assert_eq!(w.max_frame, 65536);
        assert_eq!(Welcome::parse(None), Welcome::default());
        assert_eq!(Welcome::parse(Some("not json")), Welcome::default());
    }

    #[test]
    fn parse_transport_and_encoding() {
        assert_eq!("ws".parse::<Transport>().unwrap(), Transport::Ws);
        assert_eq!("tcp".parse::<Transport>().unwrap(), Transport::Tcp);
        assert_eq!("quic".parse::<Transport>().unwrap(), Transport::Quic);
        assert_eq!("sse".parse::<Transport>().unwrap(), Transport::Sse);
        assert!("udp".parse::<Transport>().is_err());
        assert_eq!("bin".parse::<Encoding>().unwrap(), Encoding::Binary);
        assert_eq!("json".parse::<Encoding>().unwrap(), Encoding::Json);
    }

    #[test]
    fn ws_batches_join_with_newline() {
        let mut s = Vec::new();
        let m = ws_message(
            Encoding::Json,
            &[Envelope::ping(Some(1)), Envelope::ping(Some(2))],
            &mut s,
        );
        match m {
            Message::Text(t) => {
                let envs: Vec<_> = json::decode_batch(t.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                assert_eq!(envs.len(), 2);
                assert_eq!(envs[1].id, Some(2));
            }
            other => panic!("{other:?}"),
        }
    }
}
