//! The NATS control subjects (docs/protocol.md, "Backbone subjects"):
//! kicks that carry their close and count what they closed, each node's
//! info, the server API's cluster-wide calls, and lifecycle events.
//!
//! * `P.ctl.kick.<user>`: every node closes the user's connections. The
//!   body may be a JSON object `{"code"?, "reason"?, "retry_ms"?}` (an
//!   empty or non-object body is the protocol's plain kick, 4005); with a
//!   reply subject each node answers `{"node", "closed"}` (or
//!   `{"node", "error"}` for fields it refuses).
//! * `P.ctl.info`: with a reply subject, each node answers
//!   `{"node","version","uptime_s","connections","users"}`.
//! * A cluster-wide call ([`Cluster::gather`]) is a publish with a reply
//!   inbox, gathering every answer that comes within a deadline: nodes are
//!   not registered anywhere, so "every node that answers in time" is the
//!   cluster.
//! * `P.events.<event>`: lifecycle events (`user.online` / `user.offline`
//!   per node transition), beside `P.presence.<id>`.
//! * `P.ctl.sse.<node>`: a `POST /sse` that another node read for one of
//!   this node's SSE sessions (header `Eg-Session`, the body as posted); the
//!   answer is the HTTP status the owner gave it (`204`, `404`, `429`).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tracing::warn;

use super::{ShardTx, ToNats};
use crate::backbone::{Event, Kick};
use crate::events::UserCounts;
use crate::metrics::ShardMetrics;
use crate::sse::{Post, PostOutcome};

/// How long a node waits for its shards to report a kick's closes.
const SHARDS_ANSWER: Duration = Duration::from_secs(2);

/// What a node says about itself (`P.ctl.info`, the API's `info`).
pub fn node_info(
    node: &str,
    started: Instant,
    metrics: &[Arc<ShardMetrics>],
    users: usize,
) -> serde_json::Value {
    let connections: u64 = metrics
        .iter()
        .map(|m| m.sessions.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    serde_json::json!({
        "node": node,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": started.elapsed().as_secs(),
        "connections": connections,
        "users": users,
    })
}

/// The optional fields of a kick's body.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KickBody {
    code: Option<u16>,
    reason: Option<String>,
    retry_ms: Option<u64>,
}

/// The kick a `P.ctl.kick.<user>` body asks for.
fn kick_of(user: &str, body: &[u8]) -> Result<Kick, String> {
    let text = std::str::from_utf8(body).unwrap_or("").trim();
    if !text.starts_with('{') {
        // The protocol's plain kick: whatever the body, 4005.
        return Ok(Kick::default_for(user));
    }
    let b: KickBody = serde_json::from_str(text).map_err(|e| format!("kick body: {e}"))?;
    Kick::new(user, b.code, b.reason, b.retry_ms).map_err(str::to_owned)
}

/// The node's end of the control subjects.
pub(super) struct Control {
    pub client: async_nats::Client,
    pub prefix: Rc<str>,
    pub node: Rc<str>,
    pub shards: Rc<Vec<ShardTx>>,
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub users: Rc<RefCell<UserCounts>>,
    pub started: Instant,
}

impl Control {
    /// Subscribes to the kick and info subjects and serves them.
    pub fn spawn(self: Rc<Self>) {
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let subject = format!("{}.ctl.kick.*", me.prefix);
            let mut sub = match me.client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => return warn!(error = %e, subject, "backbone: cannot subscribe to kicks"),
            };
            let cut = format!("{}.ctl.kick.", me.prefix);
            while let Some(m) = sub.next().await {
                let Some(user) = m.subject.as_str().strip_prefix(&cut) else {
                    continue;
                };
                if !edgegate_proto::channel::valid_id(user) {
                    continue;
                }
                let me = me.clone();
                let user = user.to_owned();
                tokio::task::spawn_local(async move {
                    let answer = match kick_of(&user, &m.payload) {
                        Ok(k) => serde_json::json!({"node": &*me.node, "closed": me.kick(k).await}),
                        Err(e) => serde_json::json!({"node": &*me.node, "error": e}),
                    };
                    if let Some(reply) = m.reply {
                        let _ = me.client.publish(reply, answer.to_string().into()).await;
                    }
                });
            }
        });
        tokio::task::spawn_local(async move {
            let subject = format!("{}.ctl.info", self.prefix);
            let mut sub = match self.client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => return warn!(error = %e, subject, "backbone: cannot subscribe to info"),
            };
            while let Some(m) = sub.next().await {
                if let Some(reply) = m.reply {
                    let info = node_info(
                        &self.node,
                        self.started,
                        &self.metrics,
                        self.users.borrow().len(),
                    );
                    let _ = self.client.publish(reply, info.to_string().into()).await;
                }
            }
        });
    }

    /// Serves `P.ctl.sse.<this node>`: each POST goes to the shard its
    /// token names, and its outcome is the answer.
    pub fn serve_posts(self: Rc<Self>) {
        tokio::task::spawn_local(async move {
            let node = edgegate_proto::sse::node_token(&self.node).into_owned();
            let subject = format!("{}.ctl.sse.{node}", self.prefix);
            let mut sub = match self.client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    return warn!(error = %e, subject, "backbone: cannot subscribe to SSE posts");
                }
            };
            while let Some(m) = sub.next().await {
                let Some(reply) = m.reply else { continue };
                let session = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Eg-Session"))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                let me = self.clone();
                tokio::task::spawn_local(async move {
                    let outcome = me.post(session, m.payload).await;
                    let status = outcome.status().to_string();
                    let _ = me.client.publish(reply, status.into()).await;
                });
            }
        });
    }

    /// Hands a POST to the shard its session names; its outcome.
    async fn post(&self, session: String, body: Bytes) -> PostOutcome {
        let shard = edgegate_proto::sse::parse_session(&session).map(|id| id.shard);
        let Some(tx) = shard.and_then(|i| self.shards.get(i)) else {
            return PostOutcome::Unknown;
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.answer(Event::Post(Post {
            session,
            body,
            reply,
        }));
        match tokio::time::timeout(SHARDS_ANSWER, answer).await {
            Ok(Ok(o)) => o,
            _ => PostOutcome::Unavailable,
        }
    }

    /// Closes `kick.user`'s connections on every shard of this node; the
    /// number closed.
    async fn kick(&self, mut kick: Kick) -> usize {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        kick.closed = Some(tx);
        for s in self.shards.iter() {
            s.answer(Event::Kick(kick.clone()));
        }
        drop(kick);
        let mut closed = 0;
        // Each shard reports once and drops its sender; a shard that does
        // not answer in time is not waited for.
        let _ = tokio::time::timeout(SHARDS_ANSWER, async {
            while let Some(n) = rx.recv().await {
                closed += n;
            }
        })
        .await;
        closed
    }

    /// Publishes a lifecycle event on `P.events.<event>`.
    pub async fn publish_event(&self, ev: &serde_json::Value) {
        let name = ev["event"].as_str().unwrap_or("unknown");
        let subject = format!("{}.events.{name}", self.prefix);
        let _ = self.client.publish(subject, ev.to_string().into()).await;
    }
}

/// Sends a POST on to the node that owns its session (`subject` =
/// `P.ctl.sse.<node>`) and gives its answer to the waiting POST: no node
/// listening means the session is gone (404); no answer in time, 503.
pub(super) async fn forward_post(
    client: async_nats::Client,
    subject: String,
    post: Post,
    within: Duration,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Eg-Session", post.session.as_str());
    let r = tokio::time::timeout(
        within,
        client.request_with_headers(subject, headers, post.body),
    )
    .await;
    let outcome = match r {
        Ok(Ok(m)) => std::str::from_utf8(&m.payload)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map_or(PostOutcome::Unavailable, PostOutcome::from_status),
        Ok(Err(e)) if matches!(e.kind(), async_nats::RequestErrorKind::NoResponders) => {
            PostOutcome::Unknown
        }
        _ => PostOutcome::Unavailable,
    };
    let _ = post.reply.send(outcome);
}

/// Gathers every answer to `body` on `subject` that comes within `within`.
pub(super) async fn gather(
    client: &async_nats::Client,
    subject: String,
    body: Bytes,
    within: Duration,
) -> Vec<serde_json::Value> {
    let inbox = client.new_inbox();
    let mut sub = match client.subscribe(inbox.clone()).await {
        Ok(s) => s,
        Err(_) => return Vec::new(),
    };
    if client
        .publish_with_reply(subject, inbox, body)
        .await
        .is_err()
    {
        return Vec::new();
    }
    let _ = client.flush().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, async {
        while let Some(m) = sub.next().await {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
                out.push(v);
            }
        }
    })
    .await;
    out
}

/// The server API's way to the cluster (NATS only): calls every node.
#[derive(Clone)]
pub struct Cluster {
    pub(super) control: tokio::sync::mpsc::UnboundedSender<ToNats>,
}

impl Cluster {
    /// Publishes lifecycle events on `P.events.<event>` from any thread.
    pub fn publisher(&self) -> crate::events::Publisher {
        let tx = self.control.clone();
        std::sync::Arc::new(move |_, ev| {
            let _ = tx.send(ToNats::Event(ev.clone()));
        })
    }

    /// Publishes `body` on `P.<suffix>` (`ctl.info`, `ctl.kick.<user>`)
    /// and returns every node's answer that came within `within`.
    pub async fn gather(
        &self,
        suffix: String,
        body: Vec<u8>,
        within: Duration,
    ) -> Vec<serde_json::Value> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let cmd = ToNats::Gather {
            suffix,
            body: body.into(),
            within,
            reply,
        };
        if self.control.send(cmd).is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kick_bodies() {
        let k = kick_of("u", b"").unwrap();
        assert_eq!(
            (k.code, k.reason.as_str(), k.retry_ms),
            (4005, "kicked", None)
        );
        let k = kick_of("u", b"not json").unwrap();
        assert_eq!(k.code, 4005);
        let k = kick_of("u", br#"{"code":4001,"reason":"banned","retry_ms":5000}"#).unwrap();
        assert_eq!(
            (k.code, k.reason.as_str(), k.retry_ms),
            (4001, "banned", Some(5000))
        );
        assert!(kick_of("u", br#"{"code":1}"#).is_err());
        assert!(kick_of("u", br#"{"cod":4001}"#).is_err());
    }
}
