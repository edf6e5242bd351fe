//! The admin endpoint: `/healthz`, `/readyz`, `/metrics`, `GET /connz` and
//! `POST /drain` on their own listener, served by one thread of its own
//! (never on a shard, so a busy shard cannot hide its own metrics and a
//! scrape cannot slow a shard down).
//!
//! The thread runs a tokio current-thread runtime with one small task per
//! admin connection, so an idle, slow or malicious client never delays
//! another request (a load balancer's health check must not time out
//! because a scraper stalled): each connection has a deadline for its
//! request head and for its answer, and the number of admin connections
//! open at once is bounded. Requests are parsed with `httparse`.
//!
//! `/connz` and `/drain` need `Authorization: Bearer <admin.token>` when a
//! token is set (they list users and can empty the node); the probes and
//! `/metrics` stay open for load balancers and scrapers.
//!
//! Connections are shard-owned, so `/connz` does not read them: it sends an
//! [`AdminReq`] down each shard's queue ([`Node::admin_queues`]) and awaits
//! the snapshot the shard answers with on its next tick.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::metrics::{self, NodeInfo};
use crate::node::{AdminReq, Node};

/// Most connections one `/connz` page lists.
pub const CONNZ_MAX_LIMIT: usize = 1000;
/// How long `/connz` waits for a shard's answer (a shard answers on its
/// tick, every 50 ms, unless it is stuck).
const SHARD_ANSWER: Duration = Duration::from_secs(2);
/// Admin connections served at once; more are closed at accept.
pub const MAX_ADMIN_CONNS: usize = 1024;
/// A client must send its whole request head within this.
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// And read the answer within this.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// Serves admin requests on `listener` until the process exits.
pub fn spawn(listener: std::net::TcpListener, node: Arc<Node>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(error = %e, "admin: cannot serve the listener");
                        return;
                    }
                };
                accept_loop(listener, node).await;
            })
        })
        .map(|_| ())
}

async fn accept_loop(listener: tokio::net::TcpListener, node: Arc<Node>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_ADMIN_CONNS {
            open.fetch_sub(1, Ordering::AcqRel);
            debug!(%peer, "admin: too many connections, closing");
            continue; // dropping closes it
        }
        let node = node.clone();
        let open = open.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, &node).await {
                debug!(%peer, error = %e, "admin request failed");
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
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
async fn connz(node: &Node, offset: usize, limit: usize) -> Result<String, String> {
    let mut skip = offset;
    let mut take = limit;
    let mut total = 0;
    let mut conns = Vec::new();
    for (i, (tx, _)) in node.admin_queues.iter().enumerate() {
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.try_send(AdminReq::Connz { skip, take, reply })
            .map_err(|_| format!("shard {i} is busy with admin requests"))?;
        let page = tokio::time::timeout(SHARD_ANSWER, answer)
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| format!("shard {i} did not answer"))?;
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

/// Reads one request head within [`HEAD_DEADLINE`], answers it, closes.
async fn serve(mut s: tokio::net::TcpStream, node: &Node) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let head = tokio::time::timeout(HEAD_DEADLINE, async {
        loop {
            let n = s.read(&mut buf[len..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            len += n;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[..len]) {
                Ok(httparse::Status::Complete(_)) => return Ok(Some(request_of(&req))),
                Ok(httparse::Status::Partial) if len < buf.len() => continue,
                // Too long, too many headers or malformed: one answer for all.
                _ => return Ok(None),
            }
        }
    })
    .await;
    let (status, ctype, body) = match head {
        Err(_) => return Ok(()), // the deadline passed: nothing to answer
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => (
            "400 Bad Request",
            "text/plain",
            "malformed or oversized request\n".to_string(),
        ),
        Ok(Ok(Some(req))) => route(node, &req).await,
    };
    // One write: a client that reads once must see the whole answer.
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    match tokio::time::timeout(WRITE_DEADLINE, async {
        s.write_all(resp.as_bytes()).await?;
        s.shutdown().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

/// What the router needs of a request.
struct Request {
    method: String,
    path: String,
    query: String,
    bearer: Option<String>,
}

fn request_of(req: &httparse::Request<'_, '_>) -> Request {
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let bearer = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("authorization"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .find_map(|v| v.trim().strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        bearer,
    }
}

/// The answer to one request: status line, content type, body.
async fn route(node: &Node, req: &Request) -> (&'static str, &'static str, String) {
    let authorized = match &node.admin_token {
        None => true,
        Some(want) => req
            .bearer
            .as_deref()
            .is_some_and(|got| constant_time_eq(got.as_bytes(), want.as_bytes())),
    };
    let protected = matches!(req.path.as_str(), "/connz" | "/drain");
    match (req.method.as_str(), req.path.as_str()) {
        _ if protected && !authorized => (
            "401 Unauthorized",
            "text/plain",
            "admin token required\n".to_string(),
        ),
        ("GET", "/connz") => match paging(&req.query) {
            Err(e) => ("400 Bad Request", "text/plain", format!("{e}\n")),
            Ok((offset, limit)) => match connz(node, offset, limit).await {
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
            } else if !node.credentials.jwks.ready() {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "waiting for JWT keys (auth.jwks_url)\n".to_string(),
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
                backbone: node.backbone.as_deref(),
                credentials: &node.credentials,
            }),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    }
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
