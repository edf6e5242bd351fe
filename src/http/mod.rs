//! HTTP/1.1 on the node's tokio threads: the server the admin endpoint and
//! the server API share, and the pooled client ([`client`]) that HTTP
//! services, hooks and webhooks use.
//!
//! The server runs one small task per connection on the thread's
//! `LocalSet`, so an idle, slow or malicious client never delays another
//! request: each connection has a deadline for a request head and body
//! once it begins, one for the answer, one for the silence between two
//! requests of a kept-alive connection, and the connections open at once
//! are bounded (more are closed at accept). Heads are parsed with
//! `edgegate_proto::http` (httparse underneath; fuzzed), bodies are
//! bounded by `Content-Length` against the caller's limit (413 past it;
//! a chunked request body is answered 411, Content-Length required).

pub mod client;

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use edgegate_proto::http::{self as h, Body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

/// How a server bounds its connections.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more are closed at accept.
    pub max_conns: usize,
    /// A request, head and body, must arrive within this once it begins
    /// (and the first one within this of the connect).
    pub request: Duration,
    /// A kept-alive connection may stay silent this long between requests.
    pub idle: Duration,
    /// The answer must be taken within this.
    pub write: Duration,
    /// Largest request head.
    pub max_head: usize,
    /// Largest request body (413 past it).
    pub max_body: usize,
    /// Serve several requests per connection (HTTP/1.1 keep-alive); off,
    /// every answer closes the connection.
    pub keep_alive: bool,
}

/// One request, read whole.
#[derive(Debug)]
pub struct Request {
    /// The method.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// `Authorization: Bearer` token.
    pub bearer: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// One answer.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub ctype: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A plain-text answer.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            ctype: "text/plain",
            body: body.into().into_bytes(),
        }
    }

    /// A JSON answer.
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        let mut b = body.to_string().into_bytes();
        b.push(b'\n');
        Response {
            status,
            ctype: "application/json",
            body: b,
        }
    }
}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// What answers requests: called once per request on the server's thread.
pub type Handler = Rc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response>>>>;

/// Serves `listener` until the thread ends; call it inside a `LocalSet`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    limits: Arc<Limits>,
    handler: Handler,
    name: &'static str,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "{name}: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= limits.max_conns {
            open.fetch_sub(1, Ordering::AcqRel);
            debug!(%peer, "{name}: too many connections, closing");
            continue; // dropping closes it
        }
        let _ = stream.set_nodelay(true);
        let (open, limits, handler) = (open.clone(), limits.clone(), handler.clone());
        tokio::task::spawn_local(async move {
            if let Err(e) = connection(stream, &limits, &handler).await {
                debug!(%peer, error = %e, "{name}: connection ended");
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// What reading one request came to.
enum Read {
    /// A whole request.
    Request(Request, bool),
    /// Refused before the handler: answer this and close.
    Refuse(Response),
    /// The peer closed, or went silent past a deadline: close quietly.
    End,
}

/// Serves one connection: requests in turn until one asks to close, the
/// peer closes, or a deadline passes.
async fn connection(
    mut s: tokio::net::TcpStream,
    limits: &Limits,
    handler: &Handler,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        let read = read_request(&mut s, &mut buf, limits, first).await?;
        first = false;
        let (resp, keep) = match read {
            Read::Request(req, keep) => (handler(req).await, keep && limits.keep_alive),
            Read::Refuse(resp) => (resp, false),
            Read::End => return Ok(()),
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}\r\n",
            resp.status,
            reason(resp.status),
            resp.ctype,
            resp.body.len(),
            if keep { "" } else { "Connection: close\r\n" },
        )
        .into_bytes();
        // One write: a client that reads once must see the whole answer.
        out.extend_from_slice(&resp.body);
        let written = tokio::time::timeout(limits.write, async {
            s.write_all(&out).await?;
            if !keep {
                s.shutdown().await?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await;
        match written {
            Ok(Ok(())) if keep => {}
            Ok(r) => return r,
            Err(_) => return Ok(()), // the client does not read: give up on it
        }
    }
}

/// Reads the next request into `buf` (which may hold bytes of it already,
/// pipelined behind the previous one).
async fn read_request(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    limits: &Limits,
    first: bool,
) -> std::io::Result<Read> {
    // Between requests: wait for the first byte (idle deadline), unless
    // pipelined bytes are here already.
    if buf.is_empty() && !first {
        let mut one = [0u8; 4096];
        match tokio::time::timeout(limits.idle, s.read(&mut one)).await {
            Err(_) => return Ok(Read::End),
            Ok(Ok(0)) => return Ok(Read::End),
            Ok(Ok(n)) => buf.extend_from_slice(&one[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
    let deadline = tokio::time::Instant::now() + limits.request;
    let head = loop {
        match h::parse_request(buf) {
            Ok(Some(head)) => break head,
            Ok(None) if buf.len() >= limits.max_head => {
                return Ok(Read::Refuse(Response::text(
                    431,
                    "request head too large\n",
                )));
            }
            Ok(None) => {}
            Err(e) => return Ok(Read::Refuse(Response::text(400, format!("{e}\n")))),
        }
        if !fill(s, buf, deadline, limits.max_head).await? {
            return Ok(Read::End);
        }
    };
    if head.len > limits.max_head {
        return Ok(Read::Refuse(Response::text(
            431,
            "request head too large\n",
        )));
    }
    let len = match head.body {
        Body::Length(n) => n,
        Body::Chunked => {
            return Ok(Read::Refuse(Response::text(
                411,
                "Content-Length required (no chunked bodies)\n",
            )));
        }
        Body::UntilClose => 0,
    };
    if len > limits.max_body as u64 {
        return Ok(Read::Refuse(Response::json(
            413,
            &serde_json::json!({"error": {"code": "too_large", "reason": format!("body over {} bytes", limits.max_body)}}),
        )));
    }
    let want = head.len + len as usize;
    while buf.len() < want {
        if !fill(s, buf, deadline, want).await? {
            return Ok(Read::End);
        }
    }
    let body = buf[head.len..want].to_vec();
    buf.drain(..want);
    let req = Request {
        method: head.method,
        path: head.path,
        query: head.query,
        bearer: head.bearer,
        body,
    };
    Ok(Read::Request(req, head.keep_alive))
}

/// Reads more into `buf` (up to `cap` bytes in all) before `deadline`;
/// false when the peer closed or the deadline passed.
async fn fill(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
    cap: usize,
) -> std::io::Result<bool> {
    let room = cap.saturating_sub(buf.len()).clamp(1, 64 * 1024);
    let at = buf.len();
    buf.resize(at + room, 0);
    let r = tokio::time::timeout_at(deadline, s.read(&mut buf[at..])).await;
    let n = match r {
        Err(_) => 0,
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            buf.truncate(at);
            return Err(e);
        }
    };
    buf.truncate(at + n);
    Ok(n > 0)
}

/// Binds nothing: turns a std listener into the thread's tokio listener.
pub fn tokio_listener(l: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// Compares secrets without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
