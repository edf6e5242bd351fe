//! The admin endpoint: `/healthz`, `/readyz`, `/metrics`, `GET /connz` and
//! `POST /drain` on their own listener, served by one plain thread (never
//! on a shard, so a busy shard cannot hide its own metrics and a scrape
//! cannot slow a shard down).
//!
//! `/connz` and `/drain` need `Authorization: Bearer <admin.token>` when a
//! token is set (they list users and can empty the node); the probes and
//! `/metrics` stay open for load balancers and scrapers.
//!
//! Connections are shard-owned, so `/connz` does not read them: it sends an
//! [`AdminReq`] down each shard's queue ([`crate::shard::Node::admin_queues`])
//! and waits for the snapshot the shard answers with on its next tick.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Serialize;
use tracing::{debug, info, warn};

use crate::metrics::{self, NodeInfo};
use crate::shard::Node;

/// Most connections one `/connz` page lists.
pub const CONNZ_MAX_LIMIT: usize = 1000;
/// How long `/connz` waits for a shard's answer (a shard answers on its
/// tick, every 50 ms, unless it is stuck).
const SHARD_ANSWER: Duration = Duration::from_secs(2);

/// A request from the admin thread to one shard.
pub enum AdminReq {
    /// List the shard's connections in serial order: `take` after `skip`.
    Connz {
        /// Connections to skip.
        skip: usize,
        /// Connections to list.
        take: usize,
        /// Where the answer goes.
        reply: crossbeam_channel::Sender<ConnzPage>,
    },
}

/// One shard's answer to [`AdminReq::Connz`].
pub struct ConnzPage {
    /// Connections on the shard.
    pub total: usize,
    /// The requested slice.
    pub conns: Vec<ConnInfo>,
}

/// One connection in `/connz`.
#[derive(Serialize)]
pub struct ConnInfo {
    /// `welcome.meta.conn`.
    pub conn: String,
    /// User id, once welcomed.
    pub user: Option<String>,
    /// `ws`, `tcp` or `quic`.
    pub transport: &'static str,
    /// Owning shard.
    pub shard: usize,
    /// Peer address.
    pub peer: String,
    /// Milliseconds since accept.
    pub age_ms: u64,
    /// Outbound queue, bytes (estimated).
    pub queue_bytes: usize,
    /// Channels subscribed.
    pub subscriptions: usize,
}

/// Serves admin requests on `listener` until the process exits.
pub fn spawn(listener: TcpListener, node: Arc<Node>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = serve(s, &node) {
                            debug!(error = %e, "admin request failed");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
        .map(|_| ())
}

/// Starts the node's drain (the same as SIGTERM): listeners close,
/// `/readyz` turns 503, connections get `bye` 1001 over `drain.window_ms`,
/// the process exits when they are gone.
pub fn start_drain(node: &Node, why: &str) {
    if !node
        .shutdown
        .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        info!(by = why, "draining connections");
        crate::sdnotify::notify("STOPPING=1\nSTATUS=draining");
    }
}

/// Parses `offset` and `limit` from a query string (defaults 0 and 100).
fn paging(query: &str) -> Result<(usize, usize), &'static str> {
    let (mut offset, mut limit) = (0usize, 100usize);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let n = v
            .parse::<usize>()
            .map_err(|_| "offset and limit are integers");
        match k {
            "offset" => offset = n?,
            "limit" => limit = n?,
            _ => {}
        }
    }
    Ok((offset, limit.min(CONNZ_MAX_LIMIT)))
}

/// `/connz`: asks the shards in turn, so that one page spans shards in
/// (shard, serial) order.
fn connz(node: &Node, offset: usize, limit: usize) -> Result<String, String> {
    let mut skip = offset;
    let mut take = limit;
    let mut total = 0;
    let mut conns = Vec::new();
    for (i, (tx, _)) in node.admin_queues.iter().enumerate() {
        let (reply, answer) = crossbeam_channel::bounded(1);
        tx.try_send(AdminReq::Connz { skip, take, reply })
            .map_err(|_| format!("shard {i} is busy with admin requests"))?;
        let page = answer
            .recv_timeout(SHARD_ANSWER)
            .map_err(|_| format!("shard {i} did not answer"))?;
        total += page.total;
        skip = skip.saturating_sub(page.total);
        take -= page.conns.len().min(take);
        conns.extend(page.conns);
    }
    let body = serde_json::json!({
        "total": total,
        "offset": offset,
        "limit": limit,
        "conns": conns,
    });
    Ok(body.to_string() + "\n")
}

fn serve(mut s: TcpStream, node: &Node) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    // Read the request head (bounded); only the request line matters.
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let authorized = match &node.admin_token {
        None => true,
        Some(want) => head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
            .filter_map(|(_, v)| v.trim().strip_prefix("Bearer "))
            .any(|got| constant_time_eq(got.trim().as_bytes(), want.as_bytes())),
    };
    let protected = matches!(path, "/connz" | "/drain");
    let (status, ctype, body) = match (method, path) {
        _ if protected && !authorized => (
            "401 Unauthorized",
            "text/plain",
            "admin token required\n".to_string(),
        ),
        ("GET", "/connz") => match paging(query) {
            Err(e) => ("400 Bad Request", "text/plain", format!("{e}\n")),
            Ok((offset, limit)) => match connz(node, offset, limit) {
                Ok(body) => ("200 OK", "application/json", body),
                Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
            },
        },
        ("POST", "/drain") => {
            start_drain(node, "admin");
            ("202 Accepted", "text/plain", "draining\n".to_string())
        }
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => {
            if node.ready() {
                ("200 OK", "text/plain", "ready\n".to_string())
            } else if node.shutdown.load(Relaxed) || node.shards_stopped.load(Relaxed) > 0 {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "draining\n".to_string(),
                )
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "starting\n".to_string(),
                )
            }
        }
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics::render(&NodeInfo {
                shards: &node.metrics,
                max_connections: node.max_connections,
                draining: node.shutdown.load(Relaxed),
                backbone_up: node.backbone_up(),
                nats: node.nats.as_deref(),
            }),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    // One write: `write!` on a socket is several sends, and a client that
    // reads once would see only "HTTP/1.1 ".
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes())?;
    s.flush()
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_defaults_and_bounds() {
        assert_eq!(paging(""), Ok((0, 100)));
        assert_eq!(paging("offset=5&limit=7"), Ok((5, 7)));
        assert_eq!(paging("limit=999999"), Ok((0, CONNZ_MAX_LIMIT)));
        assert!(paging("offset=x").is_err());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
