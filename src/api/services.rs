//! HTTP services (`[services.<name>]`): a client's `req` to `svc:<name>`
//! and the hooks' questions, POSTed through one keep-alive pool per
//! service, answered to the asking shard as a backbone event
//! ([`Event::Reply`] for a `req`, [`Event::Answer`] for a hook).
//!
//! The request carries the payload as its body and the headers `Eg-From`
//! (the user), `Eg-Conn`, `Eg-Node`, `Eg-Enc` (`json` or `bin`), and for a
//! hook `Eg-Hook`. The answer: a response header `Eg-Error: <err name>`
//! becomes that `err`; otherwise a 2xx body is the reply (JSON text when
//! it is, or when `Eg-Enc: json`; opaque bytes with `Eg-Enc: bin` or when
//! it is not JSON), a 404 is `no_service`, a 5xx `internal`, another
//! status `bad_request`. No whole answer within the service's
//! `timeout_ms` is `timeout`, a refused connection `no_service`, an
//! answer that breaks HTTP or is over `limits.max_frame_bytes` `internal`.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use edgegate_proto::{ErrCode, Payload};

use super::ShardTx;
use crate::backbone::{Ack, Event, Request};
use crate::config::Config;
use crate::http::client::{CallError, Pool, Target};
use crate::metrics::ServicesStats;

/// One call for an HTTP service.
#[derive(Debug)]
pub struct ServiceCall {
    /// Index of the service (`[services]` in name order).
    pub service: usize,
    /// The asking user.
    pub user: String,
    /// The asking connection's name.
    pub conn: String,
    /// The payload is JSON text.
    pub json: bool,
    /// The body.
    pub body: Bytes,
    /// The call's deadline (zero: the service's `timeout_ms`).
    pub timeout: Duration,
    /// For a hook: its name (the answer is an [`Event::Answer`]).
    pub hook: Option<&'static str>,
    /// Who gets the answer.
    pub ack: Ack,
}

/// A shard's way to the HTTP services.
#[derive(Clone)]
pub struct Sender {
    pub(super) tx: tokio::sync::mpsc::Sender<ServiceCall>,
    pub(super) names: Arc<BTreeMap<String, usize>>,
    pub(super) stats: Arc<ServicesStats>,
}

impl Sender {
    /// The index of HTTP service `name`, if there is one.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.names.get(name).copied()
    }

    /// Sends `call`; when the queue is full, the answer is `rate_limited`,
    /// pushed to `now`.
    pub fn send(&self, call: ServiceCall, now: &mut Vec<Event>) {
        if let Err(e) = self.tx.try_send(call) {
            let call = match e {
                tokio::sync::mpsc::error::TrySendError::Full(c)
                | tokio::sync::mpsc::error::TrySendError::Closed(c) => c,
            };
            self.stats.service_calls[5].fetch_add(1, Relaxed);
            now.push(Request::outcome(
                call.hook.is_some(),
                call.ack,
                Err(ErrCode::RateLimited),
            ));
        }
    }
}

/// A service's pool and its own deadline.
pub struct Service {
    pool: Pool,
    /// `timeout_ms` of its table.
    pub timeout: Duration,
}

/// One pool per `[services.<name>]`, in name order.
pub fn pools(cfg: &Config, max_answer: usize) -> Vec<Rc<Service>> {
    cfg.services
        .values()
        .filter_map(|s| {
            let target = Target::parse(&s.url).ok()?;
            Some(Rc::new(Service {
                pool: Pool::new(target, max_answer),
                timeout: Duration::from_millis(s.timeout_ms),
            }))
        })
        .collect()
}

/// Serves calls until every shard is gone.
pub async fn run(
    pools: Vec<Rc<Service>>,
    mut rx: tokio::sync::mpsc::Receiver<ServiceCall>,
    shards: Rc<Vec<ShardTx>>,
    stats: Arc<ServicesStats>,
    node: String,
) {
    let node: Rc<str> = Rc::from(node);
    // Calls in flight, node-wide: a slow service must not let calls pile
    // up without bound (each waits up to its deadline).
    let inflight = std::sync::Arc::new(tokio::sync::Semaphore::new(super::SERVICE_CALLS));
    while let Some(c) = rx.recv().await {
        let Some(svc) = pools.get(c.service).cloned() else {
            continue;
        };
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            stats.service_calls[5].fetch_add(1, Relaxed);
            if let Some(s) = shards.get(c.ack.shard) {
                s.answer(Request::outcome(
                    c.hook.is_some(),
                    c.ack,
                    Err(ErrCode::RateLimited),
                ));
            }
            continue;
        };
        let (shards, stats, node) = (shards.clone(), stats.clone(), node.clone());
        tokio::task::spawn_local(async move {
            let _permit = permit;
            let r = call(&svc, &c, &node).await;
            let k = match &r {
                Ok(_) => 0,
                Err(ErrCode::Timeout) => 2,
                Err(ErrCode::NoService) => 3,
                Err(ErrCode::Internal) => 4,
                Err(_) => 1,
            };
            stats.service_calls[k].fetch_add(1, Relaxed);
            if let Some(s) = shards.get(c.ack.shard) {
                s.answer(Request::outcome(c.hook.is_some(), c.ack, r));
            }
        });
    }
}

async fn call(svc: &Service, c: &ServiceCall, node: &str) -> Result<Payload, ErrCode> {
    let enc = if c.json { "json" } else { "bin" };
    let ctype = if c.json {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let mut headers = vec![
        ("Content-Type", ctype),
        ("Eg-From", c.user.as_str()),
        ("Eg-Conn", c.conn.as_str()),
        ("Eg-Node", node),
        ("Eg-Enc", enc),
    ];
    if let Some(h) = c.hook {
        headers.push(("Eg-Hook", h));
    }
    let timeout = if c.timeout.is_zero() {
        svc.timeout
    } else {
        c.timeout
    };
    let r = svc
        .pool
        .post(&headers, &c.body, &["eg-error", "eg-enc"], timeout)
        .await;
    match r {
        Err(CallError::Timeout) => Err(ErrCode::Timeout),
        Err(CallError::Refused) => Err(ErrCode::NoService),
        Err(CallError::Bad(_)) => Err(ErrCode::Internal),
        Ok(reply) => {
            if let Some(Some(name)) = reply.headers.first() {
                return Err(ErrCode::from_name(name).unwrap_or(ErrCode::Internal));
            }
            match reply.status {
                200..=299 => Ok(payload_of(
                    reply.headers.get(1).and_then(Option::as_deref),
                    reply.body,
                )),
                404 => Err(ErrCode::NoService),
                500.. => Err(ErrCode::Internal),
                _ => Err(ErrCode::BadRequest),
            }
        }
    }
}

/// A service's answer as a payload: `Eg-Enc: bin` is opaque bytes; else
/// JSON text when it is JSON (whatever `Eg-Enc` claims: a JSON client must
/// get valid JSON), opaque bytes otherwise.
fn payload_of(enc: Option<&str>, body: Vec<u8>) -> Payload {
    if body.is_empty() {
        return Payload::None;
    }
    let body = Bytes::from(body);
    if enc == Some("bin") {
        return Payload::Binary(body);
    }
    match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        Ok(_) => Payload::Json(body),
        Err(_) => Payload::Binary(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_payloads() {
        assert_eq!(payload_of(None, Vec::new()), Payload::None);
        assert!(matches!(
            payload_of(None, b"{\"a\":1}".to_vec()),
            Payload::Json(_)
        ));
        assert!(matches!(
            payload_of(Some("json"), b"nope".to_vec()),
            Payload::Binary(_)
        ));
        assert!(matches!(
            payload_of(Some("bin"), b"{}".to_vec()),
            Payload::Binary(_)
        ));
    }
}
