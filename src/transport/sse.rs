//! SSE (docs/protocol.md §10): for clients whose network refuses WebSocket.
//!
//! Requests on `[ws] sse_path` of the WebSocket listener (same port, same
//! TLS) come here from the upgrade path (`ws::accept` routes them by path):
//!
//! * `GET /sse?hello=<URL-encoded hello>` answers `200 text/event-stream`
//!   and becomes a connection like any other: [`SseWire`] is its `Wire`,
//!   driven by [`super::drive`] with the same session, limits, heartbeats
//!   and closes. Every batch the shard writes is one event, a `data:` line
//!   per envelope ([`edgegate_proto::sse::write_event`]); a server ping is
//!   a comment line; a close is the `bye` event, then the end of the
//!   stream (FIN: the body is delimited by the close).
//! * `POST /sse` with `Eg-Session` carries envelopes to a session. The
//!   connection that reads it finds the owner in the token: this shard
//!   ([`Shard::post_outcome`]), another shard (its [`crate::sse::PostLane`]),
//!   or another node (the backbone: `P.ctl.sse.<node>` on NATS). The owner
//!   puts the body in the connection's post box and wakes its task, whose
//!   [`SseWire::poll_recv`] hands the envelopes to the session as if read
//!   from the socket: rate limits, the idle timeout and `max_frame` count
//!   them like WebSocket messages. `204` once taken, `404` for an unknown
//!   or closed session (nothing is touched), `413` for a body over
//!   `max_frame`, `429` while the connection has too much posted and
//!   unread, `503` when the owner cannot be reached.
//! * `OPTIONS /sse`: a browser's CORS preflight for that POST (it carries
//!   a header of ours). Cross-origin answers carry
//!   `Access-Control-Allow-Origin`; `[ws] allowed_origins` applies to every
//!   request as to WebSocket upgrades (403).
//!
//! POSTs and preflights keep the connection alive (browsers reuse it), up
//! to the hello timeout between requests; a `GET` on such a connection
//! opens the stream there. While a request is being read the connection
//! holds a buffer; between requests it holds none (reads go into the
//! shard's scratch buffer), and an open stream never reads at all.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use edgegate_proto::http::{Body, Chunked, HttpError};
use edgegate_proto::sse::{self as proto_sse, Method, RequestError};
use edgegate_proto::{CloseCode, Envelope, json};
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{TxBuf, Wire, WireError, poll_read_scratch};
use crate::config::TokenSource;
use crate::conn::Conn;
use crate::metrics::Transport;
use crate::session::{CloseReq, Input};
use crate::shard::Shard;
use crate::sse::{Post, PostOutcome};

/// Largest request head accepted (request line and headers, the `hello`
/// in the query included), as for WebSocket upgrades.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a POST forwarded to another shard or node may wait for its
/// owner's answer.
const FORWARD_WAIT: Duration = Duration::from_secs(5);

/// An SSE event stream after `200 OK`: the socket and what is not yet
/// written. The client sends nothing on it; its envelopes come by POST,
/// through the shard's post box ([`crate::shard::posts`]).
pub struct SseWire<S> {
    stream: S,
    /// Bytes not yet written (empty, with no allocation, when idle).
    tx: TxBuf,
    /// The connection's slot and serial: where its posts wait.
    slot: u32,
    serial: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> SseWire<S> {
    /// The stream of connection (`slot`, `serial`), its response head sent.
    pub fn new(stream: S, slot: u32, serial: u64) -> Self {
        SseWire {
            stream,
            tx: TxBuf::default(),
            slot,
            serial,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire for SseWire<S> {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        shard: &Shard,
        inbox: &mut Vec<Envelope>,
    ) -> Poll<Result<(), WireError>> {
        // Posted bodies (the `hello` of the GET first): the driver counts
        // their bytes and envelopes against the connection's rate limits,
        // and their arrival as the client's activity.
        if let Some(body) = shard.posts.take(self.slot, self.serial) {
            shard.metrics.bytes_in.fetch_add(body.len() as u64, Relaxed);
            for env in json::decode_batch(&body) {
                inbox.push(env?);
            }
            return Poll::Ready(Ok(()));
        }
        // The stream carries nothing from the client: any byte on it is
        // a mistake (it would also keep the connection "active" for free).
        match poll_read_scratch(&mut self.stream, cx, shard) {
            Poll::Ready(Ok(_)) => Poll::Ready(Err(WireError::Protocol(
                "nothing may be sent on the SSE stream: POST envelopes with Eg-Session".into(),
            ))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WireError>> {
        self.tx.poll_flush_to(&mut self.stream, cx)
    }

    fn send(&mut self, batch: Vec<u8>) -> Result<(), WireError> {
        proto_sse::write_event(&batch, self.tx.bytes_mut());
        Ok(())
    }

    fn send_ping(&mut self) -> Result<bool, WireError> {
        // A comment line: it keeps proxies from timing the stream out; the
        // client's own pings (POSTed) keep the session alive.
        self.tx.bytes_mut().extend_from_slice(proto_sse::HEARTBEAT);
        Ok(true)
    }

    async fn close(&mut self, last: Vec<u8>, _code: CloseCode, _reason: &str) {
        let _ = self.send(last);
        if std::future::poll_fn(|cx| self.poll_flush(cx))
            .await
            .is_err()
        {
            return;
        }
        // The end of the stream: the body is delimited by the close.
        super::fin_and_linger(&mut self.stream).await;
    }

    async fn finish(&mut self) {
        let _ = self.stream.close().await;
    }
}

/// A request answered with an HTTP status (not a stream).
struct Answer {
    status: u16,
    /// The text body (a reason), if any.
    why: &'static str,
    /// `Retry-After` seconds.
    retry_s: Option<u64>,
    /// Close the connection after it.
    close: bool,
}

impl Answer {
    fn new(status: u16, why: &'static str) -> Answer {
        Answer {
            status,
            why,
            retry_s: None,
            close: false,
        }
    }

    fn closing(mut self) -> Answer {
        self.close = true;
        self
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The CORS headers for a request from `origin` (already allowed).
fn cors(origin: Option<&str>, out: &mut String) {
    if let Some(o) = origin {
        out.push_str("Access-Control-Allow-Origin: ");
        out.push_str(o);
        out.push_str("\r\nVary: Origin\r\n");
    }
}

async fn write_answer<S: AsyncWrite + Unpin>(
    stream: &mut S,
    a: &Answer,
    origin: Option<&str>,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", a.status, status_text(a.status));
    cors(origin, &mut head);
    if let Some(s) = a.retry_s {
        head.push_str(&format!("Retry-After: {s}\r\n"));
    }
    if a.status == 405 {
        head.push_str("Allow: GET, POST, OPTIONS\r\n");
    }
    if a.close {
        head.push_str("Connection: close\r\n");
    }
    if a.status == 204 {
        head.push_str("\r\n");
    } else {
        head.push_str(&format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{}\n",
            a.why.len() + 1,
            a.why
        ));
    }
    stream.write_all(head.as_bytes()).await?;
    // A TLS stream holds the answer until flushed.
    stream.flush().await
}

/// Reads what the socket has into `buf`, through the shard's scratch
/// buffer (so a connection waiting for its next request holds none);
/// 0 at end of stream. Not counted in `bytes_in`, which counts envelope
/// bytes: a POST's body is counted when its session takes it.
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    shard: &Shard,
    buf: &mut Vec<u8>,
) -> Result<usize, WireError> {
    std::future::poll_fn(|cx| match poll_read_scratch(stream, cx, shard) {
        Poll::Ready(Ok((scratch, n))) => {
            buf.extend_from_slice(&scratch[..n]);
            shard.metrics.bytes_in.fetch_sub(n as u64, Relaxed);
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(WireError::Closed)) => Poll::Ready(Ok(0)),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    })
    .await
}

/// How reading a request ended, when it did not give one.
enum Stop {
    /// The peer closed, or went silent between requests: nothing to say.
    Quiet,
    /// Answer this and close.
    Refuse(Answer),
}

/// Reads the next request head into `buf` (which may hold it already).
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    shard: &Shard,
    buf: &mut Vec<u8>,
) -> Result<proto_sse::Request, Stop> {
    loop {
        match proto_sse::parse_request(buf) {
            Ok(Some(req)) => return Ok(req),
            Ok(None) if buf.len() < MAX_HEAD => {}
            Ok(None) | Err(RequestError::Http(HttpError::TooManyHeaders)) => {
                return Err(Stop::Refuse(
                    Answer::new(431, "request head too large").closing(),
                ));
            }
            Err(RequestError::BadQuery) => {
                return Err(Stop::Refuse(
                    Answer::new(400, "malformed percent-encoding in the query").closing(),
                ));
            }
            Err(RequestError::Http(_)) => {
                return Err(Stop::Refuse(
                    Answer::new(400, "malformed HTTP request").closing(),
                ));
            }
        }
        match read_some(stream, shard, buf).await {
            Ok(0) | Err(_) => return Err(Stop::Quiet),
            Ok(_) => {}
        }
    }
}

/// Reads the body of `req` (its bytes start at `buf[req.len..]`); takes
/// the request's bytes off `buf`, leaving what follows it.
async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    shard: &Shard,
    buf: &mut Vec<u8>,
    req: &proto_sse::Request,
) -> Result<Vec<u8>, Stop> {
    let max = shard.cfg.max_frame;
    let too_large =
        || Stop::Refuse(Answer::new(413, "body over max_frame (welcome.meta.max_frame)").closing());
    buf.drain(..req.len);
    match req.body {
        Body::Length(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > max {
                return Err(too_large());
            }
            while buf.len() < n {
                match read_some(stream, shard, buf).await {
                    Ok(0) | Err(_) => return Err(Stop::Quiet),
                    Ok(_) => {}
                }
            }
            let rest = buf.split_off(n);
            Ok(std::mem::replace(buf, rest))
        }
        Body::Chunked => {
            let mut dec = Chunked::new();
            let mut body = Vec::new();
            loop {
                match dec.feed(buf, &mut body, max) {
                    Ok(used) => {
                        buf.drain(..used);
                    }
                    Err(HttpError::TooLarge) => return Err(too_large()),
                    Err(_) => {
                        return Err(Stop::Refuse(
                            Answer::new(400, "malformed chunked body").closing(),
                        ));
                    }
                }
                if dec.done() {
                    return Ok(body);
                }
                match read_some(stream, shard, buf).await {
                    Ok(0) | Err(_) => return Err(Stop::Quiet),
                    Ok(_) => {}
                }
            }
        }
        // Only responses are delimited by the close.
        Body::UntilClose => Err(Stop::Refuse(
            Answer::new(400, "a body needs Content-Length or chunked").closing(),
        )),
    }
}

/// True when a request from `origin` may come in (`[ws] allowed_origins`,
/// as for WebSocket upgrades: a request without `Origin` is not a
/// browser's, and the list does not apply to it).
fn origin_allowed(shard: &Shard, origin: Option<&str>) -> bool {
    let allowed = &shard.cfg.allowed_origins;
    allowed.is_empty() || origin.is_none_or(|o| allowed.iter().any(|a| a == o))
}

/// Serves requests on the SSE path, starting with the one whose head (and
/// maybe more) is in `buf`: POSTs and preflights, keeping the connection
/// alive between them, until one is a `GET`, whose stream it returns (a
/// registered connection and its wire), or the connection ends.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Rc<Shard>,
    mut stream: S,
    mut buf: Vec<u8>,
    peer: SocketAddr,
) -> Option<(Rc<Conn>, SseWire<S>)> {
    let idle = Duration::from_millis(shard.cfg.hello_ms);
    let m = &shard.metrics;
    loop {
        // Between requests, no buffer is kept.
        if buf.is_empty() {
            buf = Vec::new();
        }
        // A request's head and body within the hello timeout; a kept-alive
        // connection that sends nothing for that long is closed.
        let read = glommio::timer::timeout(idle, async {
            Ok(read_head(&mut stream, shard, &mut buf).await)
        })
        .await;
        let req = match read {
            Ok(Ok(req)) => req,
            Ok(Err(Stop::Quiet)) | Err(_) => return None,
            Ok(Err(Stop::Refuse(a))) => {
                let _ = write_answer(&mut stream, &a, None).await;
                return None;
            }
        };
        let allowed = origin_allowed(shard, req.origin.as_deref());
        let origin = req.origin.as_deref().filter(|_| allowed);
        let path_ok = shard.cfg.sse_path.as_deref() == Some(req.path.as_str());
        let refusal = if !path_ok {
            // A kept-alive connection asked for something else.
            Some(Answer::new(404, "only SSE is served on this connection").closing())
        } else if !allowed {
            m.refused_origin.fetch_add(1, Relaxed);
            Some(Answer::new(403, "origin not allowed").closing())
        } else {
            None
        };
        if let Some(a) = refusal {
            let _ = write_answer(&mut stream, &a, origin).await;
            return None;
        }
        let answer = match req.method {
            Method::Get => {
                buf.drain(..req.len);
                return open(shard, stream, req, buf, peer).await;
            }
            Method::Options => {
                buf.drain(..req.len);
                let mut head = String::from("HTTP/1.1 204 No Content\r\n");
                cors(origin, &mut head);
                head.push_str(
                    "Access-Control-Allow-Methods: GET, POST\r\n\
                     Access-Control-Allow-Headers: Eg-Session, Content-Type, Authorization\r\n\
                     Access-Control-Max-Age: 600\r\n\r\n",
                );
                if stream.write_all(head.as_bytes()).await.is_err() || stream.flush().await.is_err()
                {
                    return None;
                }
                if !req.keep_alive {
                    let _ = stream.close().await;
                    return None;
                }
                continue;
            }
            Method::Post => {
                let body = glommio::timer::timeout(idle, async {
                    Ok(read_body(&mut stream, shard, &mut buf, &req).await)
                })
                .await;
                match body {
                    Ok(Ok(body)) => post(shard, req.session.as_deref(), body).await,
                    Ok(Err(Stop::Quiet)) => return None,
                    Ok(Err(Stop::Refuse(a))) => {
                        count_post(shard, a.status);
                        a
                    }
                    Err(_) => {
                        count_post(shard, 408);
                        Answer::new(408, "the body did not arrive in time").closing()
                    }
                }
            }
            Method::Other => Answer::new(405, "SSE takes GET, POST and OPTIONS").closing(),
        };
        let answer = if req.keep_alive {
            answer
        } else {
            answer.closing()
        };
        if write_answer(&mut stream, &answer, origin).await.is_err() || answer.close {
            let _ = stream.close().await;
            return None;
        }
    }
}

/// Counts a POST's answer.
fn count_post(shard: &Shard, status: u16) {
    let i = match status {
        204 => 0,
        404 => 1,
        429 => 2,
        503 => 3,
        413 => 4,
        _ => 5,
    };
    shard.metrics.sse_posts[i].fetch_add(1, Relaxed);
}

/// Takes a POST's body to its session's owner and answers with what
/// became of it.
async fn post(shard: &Rc<Shard>, session: Option<&str>, body: Vec<u8>) -> Answer {
    let outcome = match session {
        None => {
            count_post(shard, 400);
            return Answer::new(400, "POST /sse needs the Eg-Session header");
        }
        Some(s) => route(shard, s, body).await,
    };
    count_post(shard, outcome.status());
    match outcome {
        PostOutcome::Taken => Answer::new(204, ""),
        PostOutcome::Unknown => Answer::new(404, "no such session (unknown or closed)"),
        PostOutcome::Busy => Answer {
            retry_s: Some(1),
            ..Answer::new(429, "too much posted and not yet read: retry")
        },
        PostOutcome::Unavailable => Answer {
            retry_s: Some(1),
            ..Answer::new(503, "the session's owner cannot be reached now: retry")
        },
    }
}

/// Where a POST goes: this shard, another shard of the node, or another
/// node (through the backbone); the owner's answer.
async fn route(shard: &Rc<Shard>, session: &str, body: Vec<u8>) -> PostOutcome {
    let Some(id) = proto_sse::parse_session(session) else {
        return PostOutcome::Unknown;
    };
    let to_node = id.node != proto_sse::node_token(&shard.cfg.node_id);
    if !to_node && id.shard == shard.id {
        return shard.post_outcome(session, body);
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let post = Post {
        session: session.to_owned(),
        body: body.into(),
        reply,
    };
    if to_node {
        shard.metrics.sse_forwarded[1].fetch_add(1, Relaxed);
        shard.backbone.forward_post(id.node, post);
    } else {
        let Some(lane) = shard.node.posts.get(id.shard) else {
            return PostOutcome::Unknown;
        };
        shard.metrics.sse_forwarded[0].fetch_add(1, Relaxed);
        lane.send(post);
    }
    match glommio::timer::timeout(FORWARD_WAIT, async { Ok(answer.await) }).await {
        Ok(Ok(o)) => o,
        Ok(Err(_)) | Err(_) => PostOutcome::Unavailable,
    }
}

/// A token from the request itself (`Authorization: Bearer`, `?token=`),
/// where `auth.token_sources` accepts it, as for WebSocket upgrades.
fn request_token(shard: &Shard, req: &proto_sse::Request) -> Option<String> {
    shard.cfg.auth.as_ref()?;
    let from_header = req
        .bearer
        .clone()
        .filter(|_| shard.cfg.token_source(TokenSource::Header));
    let from_query = req
        .query_token
        .clone()
        .filter(|_| shard.cfg.token_source(TokenSource::Query));
    from_header.or(from_query)
}

/// `GET /sse`: answers `200 text/event-stream`, registers the connection
/// and gives it its `hello`.
async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Rc<Shard>,
    mut stream: S,
    req: proto_sse::Request,
    rest: Vec<u8>,
    peer: SocketAddr,
) -> Option<(Rc<Conn>, SseWire<S>)> {
    let origin = req.origin.as_deref();
    let refusal = if req.hello.is_none() {
        Some(Answer::new(
            400,
            "GET /sse needs ?hello=<the URL-encoded hello envelope>",
        ))
    } else if req.body != Body::Length(0) || !rest.is_empty() {
        Some(Answer::new(
            400,
            "GET /sse takes no body, and nothing may follow it",
        ))
    } else if shard.cfg.sse_key.is_none() {
        Some(Answer::new(404, "SSE is off"))
    } else {
        None
    };
    if let Some(a) = refusal {
        let _ = write_answer(&mut stream, &a.closing(), origin).await;
        let _ = stream.close().await;
        return None;
    }
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
         Cache-Control: no-cache, no-store, no-transform\r\n\
         X-Accel-Buffering: no\r\nConnection: close\r\n",
    );
    cors(origin, &mut head);
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).await.is_err() || stream.flush().await.is_err() {
        return None;
    }
    let conn = shard.register(Transport::Sse, peer);
    let token = request_token(shard, &req);
    let hello = req.hello.unwrap_or_default();
    if hello.len() > shard.cfg.max_frame {
        conn.request_close(CloseReq::new(
            CloseCode::FRAME_TOO_LARGE,
            "hello over max_frame",
        ));
    } else {
        shard.posts.put_hello(conn.key, conn.serial, hello);
    }
    // A token in the request goes to the session, which verifies it now
    // and answers like one in hello (bye 4001 on failure, on the stream).
    if let Some(token) = token {
        shard.input(&conn, Input::UpgradeToken(token));
    }
    let wire = SseWire::new(stream, conn.key, conn.serial);
    Some((conn, wire))
}

/// Tells a socket on the SSE path that the node cannot take it now: a
/// `GET` gets the stream with only `bye` (`code`, `retry_ms`) on it, so an
/// SSE client sees the close code as a WebSocket one does; a `POST` or
/// preflight gets 503 with `Retry-After`.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &[u8],
    bye: &Envelope,
    retry_ms: u64,
) {
    let Ok(Some(req)) = proto_sse::parse_request(buf) else {
        return;
    };
    let origin = req.origin.as_deref();
    if req.method == Method::Get {
        let mut out = String::from(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
             Cache-Control: no-cache, no-store, no-transform\r\nConnection: close\r\n",
        );
        cors(origin, &mut out);
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        let mut env = Vec::new();
        json::encode(bye, &mut env);
        proto_sse::write_event(&env, &mut bytes);
        let _ = stream.write_all(&bytes).await;
        let _ = stream.flush().await;
    } else {
        let a = Answer {
            retry_s: Some(retry_ms.div_ceil(1000)),
            ..Answer::new(503, "the node is at its connection limit: retry").closing()
        };
        let _ = write_answer(stream, &a, origin).await;
    }
    let _ = stream.close().await;
}

/// The wire of a connection on the WebSocket listener: a WebSocket or,
/// on the SSE path, an event stream. One task type serves both, so the
/// listener keeps one accept loop and one handshake path.
pub enum HttpWire<S> {
    /// A WebSocket session.
    Ws(super::ws::WsWire<S>),
    /// An SSE event stream.
    Sse(SseWire<S>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire for HttpWire<S> {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        shard: &Shard,
        inbox: &mut Vec<Envelope>,
    ) -> Poll<Result<(), WireError>> {
        match self {
            HttpWire::Ws(w) => w.poll_recv(cx, shard, inbox),
            HttpWire::Sse(w) => w.poll_recv(cx, shard, inbox),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WireError>> {
        match self {
            HttpWire::Ws(w) => w.poll_flush(cx),
            HttpWire::Sse(w) => w.poll_flush(cx),
        }
    }

    fn send(&mut self, batch: Vec<u8>) -> Result<(), WireError> {
        match self {
            HttpWire::Ws(w) => w.send(batch),
            HttpWire::Sse(w) => w.send(batch),
        }
    }

    fn send_queued(&mut self, shard: &Shard, conn: &Conn) -> Result<(), WireError> {
        match self {
            HttpWire::Ws(w) => w.send_queued(shard, conn),
            HttpWire::Sse(w) => w.send_queued(shard, conn),
        }
    }

    fn send_ping(&mut self) -> Result<bool, WireError> {
        match self {
            HttpWire::Ws(w) => w.send_ping(),
            HttpWire::Sse(w) => w.send_ping(),
        }
    }

    async fn close(&mut self, last: Vec<u8>, code: CloseCode, reason: &str) {
        match self {
            HttpWire::Ws(w) => w.close(last, code, reason).await,
            HttpWire::Sse(w) => w.close(last, code, reason).await,
        }
    }

    async fn finish(&mut self) {
        match self {
            HttpWire::Ws(w) => w.finish().await,
            HttpWire::Sse(w) => w.finish().await,
        }
    }
}
