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

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tracing::{info, warn};

use crate::http::{Handler, Limits, Request, Response, constant_time_eq};
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let limits = Arc::new(Limits {
        max_conns: MAX_ADMIN_CONNS,
        request: HEAD_DEADLINE,
        idle: HEAD_DEADLINE,
        write: WRITE_DEADLINE,
        max_head: MAX_HEAD,
        max_body: 0,
        keep_alive: false,
    });
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let listener = match crate::http::tokio_listener(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(error = %e, "admin: cannot serve the listener");
                        return;
                    }
                };
                let handler: Handler = Rc::new(move |req| {
                    let node = node.clone();
                    Box::pin(async move { route(&node, &req).await })
                });
                crate::http::serve(listener, limits, handler, "admin").await;
            })
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

/// The answer to one request.
async fn route(node: &Node, req: &Request) -> Response {
    let authorized = match &node.admin_token {
        None => true,
        Some(want) => req
            .bearer
            .as_deref()
            .is_some_and(|got| constant_time_eq(got.as_bytes(), want.as_bytes())),
    };
    let protected = matches!(req.path.as_str(), "/connz" | "/drain");
    match (req.method.as_str(), req.path.as_str()) {
        _ if protected && !authorized => Response::text(401, "admin token required\n"),
        ("GET", "/connz") => match paging(&req.query) {
            Err(e) => Response::text(400, format!("{e}\n")),
            Ok((offset, limit)) => match connz(node, offset, limit).await {
                Ok(body) => Response {
                    status: 200,
                    ctype: "application/json",
                    body: body.into_bytes(),
                },
                Err(e) => Response::text(503, format!("{e}\n")),
            },
        },
        ("POST", "/drain") => {
            start_drain(node, "admin");
            Response::text(202, "draining\n")
        }
        ("GET", "/healthz") => Response::text(200, "ok\n"),
        ("GET", "/readyz") => {
            if node.ready() {
                Response::text(200, "ready\n")
            } else if node.shutdown.load(Relaxed) || node.shards_stopped.load(Relaxed) > 0 {
                Response::text(
                    503,
                    "draining
",
                )
            } else if !node.credentials.jwks.ready() {
                Response::text(
                    503,
                    "waiting for JWT keys (auth.jwks_url)
",
                )
            } else {
                Response::text(503, "starting\n")
            }
        }
        ("GET", "/metrics") => Response {
            status: 200,
            ctype: "text/plain; version=0.0.4",
            body: metrics::render(&NodeInfo {
                shards: &node.metrics,
                max_connections: node.max_connections,
                draining: node.shutdown.load(Relaxed),
                backbone_up: node.backbone_up(),
                backbone: node.backbone.as_deref(),
                credentials: &node.credentials,
                services: node.services.as_deref(),
            })
            .into_bytes(),
        },
        ("GET", _) => Response::text(404, "not found\n"),
        _ => Response::text(405, "method not allowed\n"),
    }
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
}
