//! SSE (docs/protocol.md §10) for [`crate::Connection`]: the event stream
//! that `GET /sse?hello=` opens, and POSTs for what the client sends.
//!
//! * The `hello` goes in the query of the GET; the stream's events are read
//!   with [`edgegate_proto::sse::EventReader`] (each event a batch of JSON
//!   envelopes, one per line). A comment line is the server's heartbeat:
//!   it is answered with a `ping`, as a WebSocket ping is with a pong, so
//!   the gateway's idle timeout sees the client alive.
//! * Envelopes are POSTed with `Eg-Session` (the `welcome`'s
//!   `meta.session`), a batch per request, on one kept-alive connection
//!   opened on first use (again when the server closed it). A request
//!   interrupted half way (its future dropped) leaves that connection
//!   unusable, so the next POST opens a new one. `429` and `503` are tried
//!   again after `Retry-After`; `404` means the session is gone.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use edgegate_proto::http::{self, Body};
use edgegate_proto::sse::{EventReader, Item, percent_encode};
use edgegate_proto::{Envelope, Type, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::conn::{BoxIo, Error, Result, tcp_connect};

/// Largest event (or response head) read.
const MAX_EVENT: usize = 16 << 20;
/// Tries of one POST (the server busy, or a stale kept-alive connection).
const POST_TRIES: u32 = 5;

/// How to open a connection to the gateway: plain TCP or TLS.
pub(crate) struct Dial {
    pub target: SocketAddr,
    pub source: Option<IpAddr>,
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl Dial {
    pub async fn open(&self) -> Result<BoxIo> {
        let tcp = tcp_connect(self.target, self.source).await?;
        Ok(match &self.tls {
            Some((cfg, name)) => Box::new(
                tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await?,
            ),
            None => Box::new(tcp),
        })
    }
}

/// Reads a response head (and, where it says how long, its body) from
/// `io`: the status, whether the connection can take another request, and
/// `Retry-After`.
async fn read_response(io: &mut BoxIo, buf: &mut Vec<u8>) -> Result<(u16, bool, Option<u64>)> {
    let head = loop {
        match http::parse_response(buf, &["retry-after"]) {
            Ok(Some(h)) => break h,
            Ok(None) if buf.len() < 64 * 1024 => {}
            _ => return Err(Error::Decode("SSE: bad HTTP response".into())),
        }
        if io.read_buf(buf).await? == 0 {
            return Err(Error::Eof);
        }
    };
    buf.drain(..head.len);
    let reusable = match head.body {
        Body::Length(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            while buf.len() < n {
                if io.read_buf(buf).await? == 0 {
                    return Err(Error::Eof);
                }
            }
            buf.drain(..n);
            head.keep_alive
        }
        Body::Chunked | Body::UntilClose => false,
    };
    let retry = head.wanted[0].as_deref().and_then(|v| v.parse().ok());
    Ok((head.status, reusable, retry))
}

/// An SSE session's transport.
pub(crate) struct SseLink {
    /// The event stream (the GET's connection, after its response head).
    stream: BoxIo,
    rbuf: Vec<u8>,
    reader: EventReader,
    dial: Dial,
    /// `Host` and the SSE path.
    host: String,
    path: String,
    /// `welcome.meta.session`.
    session: Option<String>,
    /// The kept-alive POST connection, and whether it is between requests.
    post: Option<BoxIo>,
    post_clean: bool,
}

impl SseLink {
    /// `GET <path>?hello=<hello>`; ready once the server answered 200.
    pub async fn open(dial: Dial, host: String, path: String, hello: &Envelope) -> Result<SseLink> {
        let mut stream = dial.open().await?;
        let mut text = Vec::new();
        json::encode(hello, &mut text);
        let req = format!(
            "GET {path}?hello={} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n",
            percent_encode(&text)
        );
        stream.write_all(req.as_bytes()).await?;
        stream.flush().await?;
        let mut rbuf = Vec::with_capacity(4096);
        loop {
            match http::parse_response(&rbuf, &[]) {
                Ok(Some(h)) if h.status == 200 => {
                    rbuf.drain(..h.len);
                    break;
                }
                Ok(Some(h)) => {
                    return Err(Error::Decode(format!(
                        "SSE: GET answered HTTP {}",
                        h.status
                    )));
                }
                Ok(None) if rbuf.len() < 64 * 1024 => {}
                _ => return Err(Error::Decode("SSE: bad HTTP response".into())),
            }
            if stream.read_buf(&mut rbuf).await? == 0 {
                return Err(Error::Eof);
            }
        }
        Ok(SseLink {
            stream,
            rbuf,
            reader: EventReader::new(MAX_EVENT),
            dial,
            host,
            path,
            session: None,
            post: None,
            post_clean: false,
        })
    }

    /// Reads the stream (what is buffered first): envelopes go to `inbox`,
    /// and a `ping` to `outbox` per heartbeat comment. Returns the bytes
    /// taken, 0 at the end of the stream. Cancel-safe.
    pub async fn read(
        &mut self,
        inbox: &mut VecDeque<Envelope>,
        outbox: &mut Vec<Envelope>,
    ) -> Result<usize> {
        if self.rbuf.is_empty() {
            self.rbuf.reserve(4096);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Ok(0);
            }
        }
        let n = self.rbuf.len();
        let mut items = Vec::new();
        let r = self.reader.feed(&self.rbuf, &mut items);
        self.rbuf.clear();
        r.map_err(|_| Error::Decode("SSE: event too large".into()))?;
        for item in items {
            match item {
                Item::Comment => outbox.push(Envelope::ping(None)),
                Item::Event(data) => {
                    for env in json::decode_batch(&data) {
                        let env = env.map_err(|e| Error::Decode(e.to_string()))?;
                        if env.t == Type::Welcome && self.session.is_none() {
                            self.session = env
                                .meta
                                .as_deref()
                                .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                                .and_then(|v| v.get("session")?.as_str().map(str::to_owned));
                        }
                        inbox.push_back(env);
                    }
                }
            }
        }
        Ok(n)
    }

    /// POSTs `envs` as one body.
    pub async fn post(&mut self, envs: &[Envelope]) -> Result<()> {
        let Some(session) = self.session.clone() else {
            return Err(Error::Config(
                "SSE: nothing can be sent before welcome".into(),
            ));
        };
        let mut body = Vec::new();
        for e in envs {
            if !body.is_empty() {
                body.push(b'\n');
            }
            json::encode(e, &mut body);
        }
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nEg-Session: {session}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            self.path,
            self.host,
            body.len()
        );
        for _ in 0..POST_TRIES {
            let reused = self.post_clean && self.post.is_some();
            let mut io = match self.post.take().filter(|_| reused) {
                Some(io) => io,
                None => self.dial.open().await?,
            };
            self.post_clean = false;
            let mut buf = Vec::new();
            let answer = async {
                io.write_all(head.as_bytes()).await?;
                io.write_all(&body).await?;
                io.flush().await?;
                read_response(&mut io, &mut buf).await
            }
            .await;
            let (status, reusable, retry) = match answer {
                Ok(a) => a,
                // A kept-alive connection the server had closed: once more
                // on a new one (it answers before it closes, so nothing
                // was taken).
                Err(_) if reused => continue,
                Err(e) => return Err(e),
            };
            if reusable {
                self.post = Some(io);
                self.post_clean = true;
            }
            match status {
                204 => return Ok(()),
                429 | 503 => {
                    let s = retry.unwrap_or(1).clamp(1, 30);
                    tokio::time::sleep(Duration::from_secs(s)).await;
                }
                404 => return Err(Error::Eof),
                other => return Err(Error::Decode(format!("SSE: POST answered HTTP {other}"))),
            }
        }
        Err(Error::Decode("SSE: POST refused too often".into()))
    }

    /// Ends the stream from the client's side.
    pub async fn close(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}
