//! The server API (docs/api.md; its OpenAPI 3 document is
//! `docs/api.openapi.json`, served at `GET /api/openapi.json`):
//! `POST /api/<method>` with a JSON body and `Authorization: Bearer <key>`.
//!
//! Keys are compared in constant time on their SHA-256 digests (a key's
//! length leaks nothing either). A method's body is one struct with
//! `deny_unknown_fields`: a field the document does not name is a 400, as
//! is one of the wrong type. A refusal is
//! `{"error":{"code":"<err name>","reason":"..."}}` with its status:
//! 400 `bad_request`/`bad_channel`, 401 `unauthorized`, 404 `not_found`,
//! 405 `bad_request` (not a POST), 411 (a chunked body), 413 `too_large`,
//! 429 `rate_limited` (a shard's queue is full, or the node is
//! overloaded), 503 `backbone_unavailable`, 504 `timeout`, 500 `internal`.
//!
//! A `publish` goes to one shard (the channel's owner on the embedded
//! backbone, so the message takes no extra hop; any shard with NATS) and
//! through that shard's `Backbone::publish`, exactly as a client's `pub`:
//! it gets its `seq`, is stored, deduplicated by its `idempotency_key`, and
//! its answer is the stream's. `disconnect` and `info` act on every shard
//! (embedded) or, with NATS, on every node that answers within
//! `[api] cluster_timeout_ms` (docs/protocol.md, "Control subjects").

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use edgegate_proto::channel::{self, Channel};
use edgegate_proto::{ErrCode, Payload};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ApiPublish, Call, ShardTx};
use crate::backbone::nats::{Cluster, node_info};
use crate::backbone::{Kick, Refused, Stored};
use crate::config::Config;
use crate::events::UserCounts;
use crate::http::{Handler, Limits, Request, Response, constant_time_eq};
use crate::metrics::{ServicesStats, ShardMetrics};

/// The methods served, in the order of their counters. The OpenAPI
/// document names exactly these (a test checks it).
pub const METHODS: [&str; 7] = [
    "publish",
    "broadcast",
    "disconnect",
    "info",
    "presence",
    "history",
    "channels",
];

/// Rooms a `channels` page lists by default, and at most.
pub const CHANNELS_LIMIT_DEFAULT: usize = 100;

/// Most channels one `broadcast` takes.
pub const MAX_BROADCAST: usize = 1000;

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("../../docs/api.openapi.json");

/// The API's state on the services thread.
pub struct Server {
    keys: Vec<ring::digest::Digest>,
    shards: Rc<Vec<ShardTx>>,
    stats: Arc<ServicesStats>,
    embedded: bool,
    next: Cell<usize>,
    timeout: Duration,
    cluster_timeout: Duration,
    cluster: Option<Cluster>,
    users: Rc<RefCell<UserCounts>>,
    metrics: Vec<Arc<ShardMetrics>>,
    node: String,
    started: Instant,
    /// `[presence] enabled`.
    presence: bool,
}

/// A refusal.
fn fail(status: u16, code: &str, reason: impl Into<String>) -> Response {
    Response::json(
        status,
        &serde_json::json!({"error": {"code": code, "reason": reason.into()}}),
    )
}

/// A backbone's refusal of a publish, as an API error object and status.
fn refused(r: Refused) -> (u16, serde_json::Value) {
    let status = match r.code {
        ErrCode::RateLimited => 429,
        ErrCode::BackboneUnavailable => 503,
        ErrCode::Timeout => 504,
        ErrCode::Forbidden => 403,
        ErrCode::BadRequest | ErrCode::BadChannel | ErrCode::TooLarge => 400,
        _ => 500,
    };
    (
        status,
        serde_json::json!({"error": {"code": r.code.name(), "reason": r.reason}}),
    )
}

/// `data` (any JSON) or `b64data` (base64 bytes): exactly one.
fn payload(data: Option<Box<RawValue>>, b64: Option<String>) -> Result<Payload, Response> {
    match (data, b64) {
        (Some(d), None) => Ok(Payload::Json(Bytes::from(d.get().to_owned()))),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.as_bytes())
            .map(|v| Payload::Binary(Bytes::from(v)))
            .map_err(|_| fail(400, "bad_request", "b64data is not base64")),
        (Some(_), Some(_)) => Err(fail(400, "bad_request", "give data or b64data, not both")),
        (None, None) => Err(fail(400, "bad_request", "data or b64data is required")),
    }
}

/// A channel one may publish to from the API: `room:` or `user:`.
fn publish_channel(ch: &str) -> Result<(), String> {
    match channel::parse(ch) {
        Ok(Channel::Room(_) | Channel::User(_)) => Ok(()),
        Ok(Channel::Svc(_)) => Err("svc: channels take requests, not publishes".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn id_ok(s: &str) -> bool {
    s.len() <= channel::MAX_ID_LEN && channel::valid_id(s)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishReq {
    ch: String,
    data: Option<Box<RawValue>>,
    b64data: Option<String>,
    from: Option<String>,
    idempotency_key: Option<String>,
    ephemeral: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastReq {
    channels: Vec<String>,
    data: Option<Box<RawValue>>,
    b64data: Option<String>,
    from: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectReq {
    user: String,
    code: Option<u16>,
    reason: Option<String>,
    retry_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InfoReq {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceReq {
    ch: String,
    limit: Option<u64>,
    after: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryReq {
    ch: String,
    limit: Option<u64>,
    before: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsReq {
    prefix: Option<String>,
    limit: Option<u64>,
    after: Option<String>,
}

/// A `room:` or `user:` channel, for the queries.
fn query_channel(ch: &str) -> Result<(), Response> {
    match channel::parse(ch) {
        Ok(Channel::Room(_) | Channel::User(_)) => Ok(()),
        Ok(Channel::Svc(_)) => Err(fail(
            400,
            "bad_channel",
            "a room: or user: channel is needed",
        )),
        Err(e) => Err(fail(400, "bad_channel", e.to_string())),
    }
}

/// A page's `limit`: 1 to `max`, `default` when absent.
fn limit_of(v: Option<u64>, default: usize, max: usize) -> Result<usize, Response> {
    match v {
        None => Ok(default),
        Some(n) if (1..=max as u64).contains(&n) => Ok(n as usize),
        Some(_) => Err(fail(
            400,
            "bad_request",
            format!("limit must be an integer from 1 to {max}"),
        )),
    }
}

fn body<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, Response> {
    serde_json::from_slice(b).map_err(|e| fail(400, "bad_request", format!("body: {e}")))
}

impl Server {
    /// The API's state from `[api]`.
    pub fn new(
        cfg: &Config,
        shards: Rc<Vec<ShardTx>>,
        stats: Arc<ServicesStats>,
        cluster: Option<Cluster>,
        users: Rc<RefCell<UserCounts>>,
        metrics: Vec<Arc<ShardMetrics>>,
        node: String,
    ) -> Self {
        Server {
            keys: cfg
                .api
                .keys
                .iter()
                .map(|k| ring::digest::digest(&ring::digest::SHA256, k.as_bytes()))
                .collect(),
            shards,
            stats,
            embedded: cluster.is_none(),
            next: Cell::new(0),
            timeout: Duration::from_millis(cfg.api.timeout_ms),
            cluster_timeout: Duration::from_millis(cfg.api.cluster_timeout_ms),
            cluster,
            users,
            metrics,
            node,
            started: Instant::now(),
            presence: cfg.presence.enabled,
        }
    }

    fn authorized(&self, bearer: Option<&str>) -> bool {
        let Some(got) = bearer else { return false };
        let got = ring::digest::digest(&ring::digest::SHA256, got.as_bytes());
        // Every key is compared, whichever matches.
        self.keys.iter().fold(false, |ok, k| {
            ok | constant_time_eq(k.as_ref(), got.as_ref())
        })
    }

    /// Answers one request.
    pub async fn handle(self: Rc<Self>, req: Request) -> Response {
        let t0 = Instant::now();
        if req.method == "GET" && req.path == "/api/openapi.json" {
            return Response {
                status: 200,
                ctype: "application/json",
                body: OPENAPI.as_bytes().to_vec(),
            };
        }
        let Some(i) = req
            .path
            .strip_prefix("/api/")
            .and_then(|m| METHODS.iter().position(|x| *x == m))
        else {
            return fail(404, "not_found", "no such method (POST /api/<method>)");
        };
        let resp = if req.method != "POST" {
            fail(405, "bad_request", "methods are called with POST")
        } else if !self.authorized(req.bearer.as_deref()) {
            fail(
                401,
                "unauthorized",
                "Authorization: Bearer <one of [api] keys> required",
            )
        } else {
            let r = match METHODS[i] {
                "publish" => self.publish(&req.body).await,
                "broadcast" => self.broadcast(&req.body).await,
                "disconnect" => self.disconnect(&req.body).await,
                "presence" => self.presence(&req.body).await,
                "history" => self.history(&req.body).await,
                "channels" => self.channels(&req.body).await,
                _ => self.info(&req.body).await,
            };
            r.unwrap_or_else(|e| e)
        };
        if let Some((_, st)) = self.stats.api.get(i) {
            st.record(resp.status >= 400, t0.elapsed());
        }
        resp
    }

    /// The shard a publish to `ch` goes to.
    fn shard_for(&self, ch: &str) -> usize {
        let n = self.shards.len().max(1);
        if self.embedded {
            crate::backbone::embedded::owner(ch, n)
        } else {
            let i = self.next.get();
            self.next.set(i.wrapping_add(1));
            i % n
        }
    }

    /// Publishes one message; its `{"seq","epoch"}` or an error object.
    async fn publish_one(
        &self,
        msg: ApiPublish,
    ) -> Result<serde_json::Value, (u16, serde_json::Value)> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let shard = self.shard_for(&msg.ch);
        let busy = || {
            (
                429,
                serde_json::json!({"error": {"code": "rate_limited", "reason": "the node is busy: retry"}}),
            )
        };
        if !self
            .shards
            .get(shard)
            .is_some_and(|s| s.call(Call::Publish { msg, reply }))
        {
            return Err(busy());
        }
        match tokio::time::timeout(self.timeout, answer).await {
            Err(_) => Err((
                504,
                serde_json::json!({"error": {"code": "timeout", "reason": "no answer from the backbone in time"}}),
            )),
            Ok(Err(_)) => Err(busy()),
            Ok(Ok(Err(r))) => Err(refused(r)),
            Ok(Ok(Ok(stored))) => Ok(stored_json(stored)),
        }
    }

    async fn publish(&self, b: &[u8]) -> Result<Response, Response> {
        let r: PublishReq = body(b)?;
        publish_channel(&r.ch).map_err(|e| fail(400, "bad_channel", e))?;
        let from = from_of(r.from)?;
        let payload = payload(r.data, r.b64data)?;
        let ephemeral = r.ephemeral.unwrap_or(false);
        if ephemeral && r.idempotency_key.is_some() {
            return Err(fail(
                400,
                "bad_request",
                "an ephemeral message is never stored, so it takes no idempotency_key",
            ));
        }
        let key = match r.idempotency_key {
            Some(k)
                if k.is_empty()
                    || k.len() > 128
                    || !k
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"_-.:".contains(&c)) =>
            {
                return Err(fail(
                    400,
                    "bad_request",
                    "idempotency_key must be 1-128 of [A-Za-z0-9_.:-]",
                ));
            }
            Some(k) => Some(format!("!api:{k}")),
            None => None,
        };
        let msg = ApiPublish {
            ch: r.ch,
            from,
            payload,
            key,
            ephemeral,
        };
        match self.publish_one(msg).await {
            Ok(v) => Ok(Response::json(200, &v)),
            Err((status, v)) => Ok(Response::json(status, &v)),
        }
    }

    async fn broadcast(&self, b: &[u8]) -> Result<Response, Response> {
        let r: BroadcastReq = body(b)?;
        if r.channels.is_empty() || r.channels.len() > MAX_BROADCAST {
            return Err(fail(
                400,
                "bad_request",
                format!("channels must hold 1 to {MAX_BROADCAST} channels"),
            ));
        }
        let from = from_of(r.from)?;
        let payload = payload(r.data, r.b64data)?;
        let calls = r.channels.into_iter().map(|ch| {
            let payload = payload.clone();
            let from = from.clone();
            async move {
                if let Err(e) = publish_channel(&ch) {
                    return serde_json::json!({"error": {"code": "bad_channel", "reason": e}});
                }
                let msg = ApiPublish {
                    ch,
                    from,
                    payload,
                    key: None,
                    ephemeral: false,
                };
                match self.publish_one(msg).await {
                    Ok(v) => v,
                    Err((_, e)) => e,
                }
            }
        });
        let results = futures_util::future::join_all(calls).await;
        Ok(Response::json(
            200,
            &serde_json::json!({ "results": results }),
        ))
    }

    async fn disconnect(&self, b: &[u8]) -> Result<Response, Response> {
        let r: DisconnectReq = body(b)?;
        if !id_ok(&r.user) {
            return Err(fail(
                400,
                "bad_request",
                "user must match [A-Za-z0-9_-]{1,128}",
            ));
        }
        let kick = Kick::new(&r.user, r.code, r.reason, r.retry_ms)
            .map_err(|e| fail(400, "bad_request", e))?;
        if let Some(c) = &self.cluster {
            let body = serde_json::json!({"code": kick.code, "reason": kick.reason, "retry_ms": kick.retry_ms});
            let answers = c
                .gather(
                    format!("ctl.kick.{}", r.user),
                    body.to_string().into_bytes(),
                    self.cluster_timeout,
                )
                .await;
            let closed: u64 = answers.iter().filter_map(|a| a["closed"].as_u64()).sum();
            return Ok(Response::json(
                200,
                &serde_json::json!({"closed": closed, "nodes": answers}),
            ));
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut kick = kick;
        kick.closed = Some(tx);
        for s in self.shards.iter() {
            if !s.call(Call::Kick(kick.clone())) {
                return Err(fail(429, "rate_limited", "the node is busy: retry"));
            }
        }
        drop(kick);
        let mut closed = 0;
        let waited = tokio::time::timeout(self.timeout, async {
            while let Some(n) = rx.recv().await {
                closed += n;
            }
        })
        .await;
        if waited.is_err() {
            return Err(fail(504, "timeout", "a shard did not answer in time"));
        }
        Ok(Response::json(
            200,
            &serde_json::json!({"closed": closed, "nodes": [{"node": self.node, "closed": closed}]}),
        ))
    }

    /// Sends one shard a call made with `make(reply)` and waits for its
    /// answer (a shard: presence and pages are the backbone's to answer
    /// from wherever; the channel's owner on the embedded backbone).
    async fn ask<T>(
        &self,
        ch: &str,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, Refused>>) -> Call,
    ) -> Result<T, Response> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let shard = self.shard_for(ch);
        if !self.shards.get(shard).is_some_and(|s| s.call(make(reply))) {
            return Err(fail(429, "rate_limited", "the node is busy: retry"));
        }
        match tokio::time::timeout(self.timeout, answer).await {
            Err(_) => Err(fail(504, "timeout", "no answer from the backbone in time")),
            Ok(Err(_)) => Err(fail(429, "rate_limited", "the node is busy: retry")),
            Ok(Ok(Err(r))) => {
                let (status, v) = refused(r);
                Err(Response::json(status, &v))
            }
            Ok(Ok(Ok(v))) => Ok(v),
        }
    }

    async fn presence(&self, b: &[u8]) -> Result<Response, Response> {
        use crate::backbone::presence::{QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX};
        let r: PresenceReq = body(b)?;
        query_channel(&r.ch)?;
        if !self.presence {
            return Err(fail(400, "bad_request", "presence is off on this gateway"));
        }
        let limit = limit_of(r.limit, QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX)?;
        let ch = r.ch.clone();
        let page = self
            .ask(&ch, |reply| Call::Presence {
                ch: r.ch,
                limit,
                after: r.after,
                reply,
            })
            .await?;
        Ok(Response {
            status: 200,
            ctype: "application/json",
            body: page.to_json().to_vec(),
        })
    }

    async fn history(&self, b: &[u8]) -> Result<Response, Response> {
        use crate::session::{PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX};
        let r: HistoryReq = body(b)?;
        query_channel(&r.ch)?;
        let limit = limit_of(r.limit, PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX)?;
        let ch = r.ch.clone();
        let page = self
            .ask(&ch, |reply| Call::History {
                ch: r.ch,
                limit,
                before: r.before,
                reply,
            })
            .await?;
        Ok(Response {
            status: 200,
            ctype: "application/json",
            body: crate::session::page_json(&page).to_vec(),
        })
    }

    async fn channels(&self, b: &[u8]) -> Result<Response, Response> {
        use crate::backbone::presence::QUERY_LIMIT_MAX;
        let r: ChannelsReq = body(if b.is_empty() { b"{}" } else { b })?;
        if !self.presence {
            return Err(fail(400, "bad_request", "presence is off on this gateway"));
        }
        let limit = limit_of(r.limit, CHANNELS_LIMIT_DEFAULT, QUERY_LIMIT_MAX)?;
        let prefix = r.prefix.unwrap_or_else(|| "room:".to_owned());
        if !prefix.starts_with("room:") && !"room:".starts_with(prefix.as_str()) {
            return Err(fail(
                400,
                "bad_channel",
                "channels lists room: channels: the prefix starts with room:",
            ));
        }
        let page = self
            .ask(&prefix, |reply| Call::Channels {
                prefix: prefix.clone(),
                after: r.after,
                limit,
                reply,
            })
            .await?;
        Ok(Response::json(200, &page.to_json()))
    }

    async fn info(&self, b: &[u8]) -> Result<Response, Response> {
        let _: InfoReq = body(if b.is_empty() { b"{}" } else { b })?;
        let mut nodes = match &self.cluster {
            Some(c) => {
                c.gather("ctl.info".into(), Vec::new(), self.cluster_timeout)
                    .await
            }
            None => vec![node_info(
                &self.node,
                self.started,
                &self.metrics,
                self.users.borrow().len(),
            )],
        };
        nodes.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        Ok(Response::json(200, &serde_json::json!({ "nodes": nodes })))
    }
}

fn from_of(from: Option<String>) -> Result<String, Response> {
    match from {
        None => Ok("svc".to_owned()),
        Some(f) if id_ok(&f) => Ok(f),
        Some(_) => Err(fail(
            400,
            "bad_request",
            "from must match [A-Za-z0-9_-]{1,128}",
        )),
    }
}

fn stored_json(s: Option<Stored>) -> serde_json::Value {
    match s {
        None => serde_json::json!({}),
        Some(s) if s.duplicate => {
            serde_json::json!({"seq": s.seq, "epoch": &*s.epoch, "duplicate": true})
        }
        Some(s) => serde_json::json!({"seq": s.seq, "epoch": &*s.epoch}),
    }
}

/// Serves the API on `listener` for the life of the thread.
pub async fn serve(srv: Rc<Server>, listener: tokio::net::TcpListener, cfg: &Config) {
    let deadline = Duration::from_millis(cfg.api.timeout_ms);
    let limits = Arc::new(Limits {
        max_conns: cfg.api.max_connections,
        request: deadline,
        idle: Duration::from_millis(cfg.api.idle_timeout_ms),
        write: deadline,
        max_head: 16 * 1024,
        max_body: cfg.api.max_body_bytes,
        keep_alive: true,
    });
    let handler: Handler = Rc::new(move |req| Box::pin(srv.clone().handle(req)));
    crate::http::serve(listener, limits, handler, "api").await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document names exactly the methods served, each a POST whose
    /// body's properties are the fields its struct takes.
    #[test]
    fn openapi_document_matches_the_method_table() {
        let doc: serde_json::Value =
            serde_json::from_str(OPENAPI).expect("docs/api.openapi.json is JSON");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented: Vec<&str> = paths
            .keys()
            .filter_map(|p| p.strip_prefix("/api/"))
            .filter(|m| *m != "openapi.json")
            .collect();
        documented.sort_unstable();
        let mut served = METHODS.to_vec();
        served.sort_unstable();
        assert_eq!(documented, served);
        for m in METHODS {
            let op = &paths[&format!("/api/{m}")]["post"];
            assert!(op.is_object(), "{m}: no post");
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            let schema = match schema["$ref"].as_str() {
                Some(r) => &doc["components"]["schemas"][r.rsplit('/').next().unwrap_or("")],
                None => schema,
            };
            assert_eq!(
                schema["additionalProperties"], false,
                "{m}: unknown fields are refused"
            );
        }
    }

    #[test]
    fn payload_rules() {
        assert!(payload(None, None).is_err());
        assert!(payload(None, Some("!!".into())).is_err());
        assert_eq!(
            payload(None, Some("aGk=".into())).ok(),
            Some(Payload::Binary(Bytes::from_static(b"hi")))
        );
        let raw = RawValue::from_string("{\"a\":1}".into()).ok();
        assert_eq!(
            payload(raw, None).ok(),
            Some(Payload::Json(Bytes::from_static(b"{\"a\":1}")))
        );
        assert!(publish_channel("room:a").is_ok());
        assert!(publish_channel("svc:a").is_err());
        assert!(publish_channel("room:a b").is_err());
    }
}
