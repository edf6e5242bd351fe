//! A small pooled HTTP/1.1 client for the node's tokio threads: HTTP
//! services, hooks and webhooks POST through it.
//!
//! Why not a crate: hyper and reqwest are not in the tree, and what is
//! needed is narrow — `POST` to a known `http://` address, keep-alive
//! connections reused, a deadline per call, bounded answers. One [`Pool`]
//! per target keeps its idle connections (at most [`MAX_IDLE`]) and bounds
//! the connections in use ([`MAX_CONNS`]). Response heads and `chunked`
//! bodies are read with `edgegate_proto::http` (sans-IO, fuzzed). A call
//! whose reused connection turns out closed by the server before any
//! answer byte (an idle keep-alive timeout on its side) is sent once more
//! on a fresh connection, as browsers and hyper do.

use std::cell::RefCell;
use std::time::Duration;

use edgegate_proto::http::{self as h, Body, Chunked};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Idle connections kept per target.
pub const MAX_IDLE: usize = 64;
/// Connections in use at once per target; more calls wait (within their
/// deadline) for one.
pub const MAX_CONNS: usize = 256;
/// Largest response head.
const MAX_HEAD: usize = 16 * 1024;

/// Where a pool sends: `http://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or address.
    pub host: String,
    /// Port (80 by default).
    pub port: u16,
    /// Request path (`/` by default), with any query.
    pub path: String,
}

impl Target {
    /// Parses an `http://` URL; anything else is an error that says why.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?} is not an http:// URL (https is not supported)"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{url:?} has no host, or has credentials"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("{url:?}: port {p:?} is not a number"))?;
                (h, port)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '#');
        if host.is_empty() || host.chars().any(bad) || path.chars().any(bad) {
            return Err(format!("{url:?}: malformed host or path"));
        }
        Ok(Target {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Nobody listens there (connection refused, or the name does not resolve).
    Refused,
    /// No whole answer within the deadline.
    Timeout,
    /// The answer broke HTTP, or was larger than allowed.
    Bad(String),
}

/// An answer.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// The headers asked for, in the order asked.
    pub headers: Vec<Option<String>>,
    /// The body.
    pub body: Vec<u8>,
}

struct Conn {
    s: TcpStream,
    /// Bytes read past the previous answer (none from a polite server).
    buf: Vec<u8>,
}

/// Keep-alive connections to one target.
pub struct Pool {
    target: Target,
    idle: RefCell<Vec<Conn>>,
    permits: tokio::sync::Semaphore,
    max_body: usize,
}

/// A call's failure before any answer byte on a reused connection.
enum Fail {
    Stale,
    Err(CallError),
}

impl Pool {
    /// A pool for `target`; answers over `max_body` bytes are refused.
    pub fn new(target: Target, max_body: usize) -> Self {
        Pool {
            target,
            idle: RefCell::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(MAX_CONNS),
            max_body,
        }
    }

    /// POSTs `body` with `headers`, within `timeout` for everything
    /// (waiting for a connection included); returns the headers named in
    /// `wanted` (lower case) and the body.
    pub async fn post(
        &self,
        headers: &[(&str, &str)],
        body: &[u8],
        wanted: &[&str],
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let mut req = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Length: {}\r\n",
            self.target.path,
            self.target.host,
            self.target.port,
            body.len()
        );
        for (k, v) in headers {
            // Values come from checked ids and config; a line break would
            // still forge a header, so it is dropped, never sent.
            if !v.contains(['\r', '\n']) {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        let call = async {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| CallError::Refused)?;
            loop {
                let reused = self.idle.borrow_mut().pop();
                let (mut conn, was_reused) = match reused {
                    Some(c) => (c, true),
                    None => (self.connect().await?, false),
                };
                match self.exchange(&mut conn, &bytes, wanted, was_reused).await {
                    Ok((reply, keep)) => {
                        if keep && conn.buf.is_empty() {
                            let mut idle = self.idle.borrow_mut();
                            if idle.len() < MAX_IDLE {
                                idle.push(conn);
                            }
                        }
                        return Ok(reply);
                    }
                    Err(Fail::Stale) => continue,
                    Err(Fail::Err(e)) => return Err(e),
                }
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(CallError::Timeout))
    }

    async fn connect(&self) -> Result<Conn, CallError> {
        let s = TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|_| CallError::Refused)?;
        let _ = s.set_nodelay(true);
        Ok(Conn { s, buf: Vec::new() })
    }

    /// One request and its answer; `Ok(keep)` says whether the connection
    /// may be reused.
    async fn exchange(
        &self,
        c: &mut Conn,
        req: &[u8],
        wanted: &[&str],
        reused: bool,
    ) -> Result<(Reply, bool), Fail> {
        let io = |e: std::io::Error| Fail::Err(CallError::Bad(format!("i/o: {e}")));
        if let Err(e) = c.s.write_all(req).await {
            return Err(if reused { Fail::Stale } else { io(e) });
        }
        let head = loop {
            match h::parse_response(&c.buf, wanted) {
                Ok(Some(head)) => break head,
                Ok(None) if c.buf.len() >= MAX_HEAD => {
                    return Err(Fail::Err(CallError::Bad("response head too large".into())));
                }
                Ok(None) => {}
                Err(e) => return Err(Fail::Err(CallError::Bad(e.to_string()))),
            }
            let n = read_more(c, MAX_HEAD).await.map_err(io)?;
            if n == 0 {
                return Err(if reused && c.buf.is_empty() {
                    Fail::Stale
                } else {
                    Fail::Err(CallError::Bad("connection closed before the answer".into()))
                });
            }
        };
        c.buf.drain(..head.len);
        let too_large = || {
            Fail::Err(CallError::Bad(format!(
                "answer over {} bytes",
                self.max_body
            )))
        };
        let body = match head.body {
            Body::Length(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > self.max_body {
                    return Err(too_large());
                }
                while c.buf.len() < n {
                    if read_more(c, n).await.map_err(io)? == 0 {
                        return Err(Fail::Err(CallError::Bad("answer cut short".into())));
                    }
                }
                c.buf.drain(..n).collect()
            }
            Body::Chunked => {
                let mut dec = Chunked::new();
                let mut out = Vec::new();
                loop {
                    let used = dec
                        .feed(&c.buf, &mut out, self.max_body)
                        .map_err(|e| match e {
                            h::HttpError::TooLarge => too_large(),
                            e => Fail::Err(CallError::Bad(e.to_string())),
                        })?;
                    c.buf.drain(..used);
                    if dec.done() {
                        break out;
                    }
                    if read_more(c, 64 * 1024).await.map_err(io)? == 0 {
                        return Err(Fail::Err(CallError::Bad("answer cut short".into())));
                    }
                }
            }
            Body::UntilClose => loop {
                if c.buf.len() > self.max_body {
                    return Err(too_large());
                }
                if read_more(c, self.max_body + 1).await.map_err(io)? == 0 {
                    break std::mem::take(&mut c.buf);
                }
            },
        };
        let reply = Reply {
            status: head.status,
            headers: head.wanted,
            body,
        };
        Ok((reply, head.keep_alive))
    }
}

/// Reads into the connection's buffer (up to `cap` bytes held in all, at
/// least one more); the number read, 0 at the end.
async fn read_more(c: &mut Conn, cap: usize) -> std::io::Result<usize> {
    let room = cap.saturating_sub(c.buf.len()).clamp(1, 64 * 1024);
    let at = c.buf.len();
    c.buf.resize(at + room, 0);
    let r = c.s.read(&mut c.buf[at..]).await;
    let n = *r.as_ref().unwrap_or(&0);
    c.buf.truncate(at + n);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("http://127.0.0.1:8081/hook?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8081, "/hook?x=1")
        );
        let t = Target::parse("http://svc.internal").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("svc.internal", 80, "/")
        );
        let t = Target::parse("http://[::1]:9/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert!(Target::parse("https://a/").is_err());
        assert!(Target::parse("http://a:x/").is_err());
        assert!(Target::parse("http:///x").is_err());
        assert!(Target::parse("http://u:p@a/").is_err());
        assert!(Target::parse("http://a/b c").is_err());
    }
}
