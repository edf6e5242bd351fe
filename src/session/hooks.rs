//! Hooks and channel tokens (docs/api.md): the session asks a core service
//! before it accepts a `hello`, a `sub` or a `pub`, and holds the envelope
//! until the answer comes back as [`Input::Answer`].
//!
//! A question is an [`Action::Ask`] with a ticket; the pending envelope
//! waits in the boxed [`Extra`] (an idle connection of a node without
//! hooks holds nothing more), at most [`MAX_ASKS`] per connection. The
//! answer — `{"allow": bool, "reason"?, "code"?, "d"?/"db"?}` from the
//! service, or the service's failure — decides: allow, refuse (`err
//! forbidden`, or for `hello` the `bye` the service chose), or fail
//! (`[hooks] on_error`: `err timeout`, for `hello` `bye` 4007; or let it
//! through). Publishes leave in the order the client sent them, whatever
//! order their answers come in.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use base64::Engine as _;
use bytes::Bytes;
use edgegate_proto::{CloseCode, ErrCode, Payload};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Action, Ctx, Pub, SessionState, UserId, close_with, err};
use crate::backbone::Since;

/// Hook questions a connection may have waiting; more are refused
/// `err rate_limited`.
pub const MAX_ASKS: usize = 64;

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Before `welcome`.
    Connect = 0,
    /// Before a `room:` subscription.
    Subscribe = 1,
    /// Before a client's publish.
    Publish = 2,
}

impl Hook {
    /// Its name (`[hooks]` key, `Eg-Hook` header, metric label).
    pub fn name(self) -> &'static str {
        crate::metrics::HOOKS[self as usize]
    }
}

/// A `hello` that waits for the connect hook: what `welcome` needs.
#[derive(Debug)]
pub struct HelloState {
    /// `hello`'s id.
    pub id: Option<u64>,
    /// The user.
    pub user: UserId,
    /// `hello.meta.instance`.
    pub instance: Option<Rc<str>>,
    /// `hello.meta.since`.
    pub since: Option<Since>,
}

/// What waits for a hook.
#[derive(Debug)]
pub enum Pending {
    /// A `hello`.
    Hello(Box<HelloState>),
    /// A `sub`.
    Sub {
        /// Its id.
        id: Option<u64>,
        /// The channel.
        ch: super::Name,
        /// `meta.since`.
        since: Option<Since>,
        /// `meta.presence`.
        presence: bool,
    },
    /// A `pub`, and its answer once it came (publishes leave in order).
    Pub(Pub, Option<Verdict>),
}

/// A connection's hook questions and channel-token grants.
#[derive(Debug, Default)]
pub struct HookState {
    /// Questions in flight, in the order asked.
    pub asks: VecDeque<Asked>,
    /// The last question's ticket.
    pub next_ask: u64,
    /// `room:` channels a channel token granted, while subscribed.
    pub grants: Vec<super::Name>,
}

impl HookState {
    /// Holds nothing.
    pub fn is_empty(&self) -> bool {
        self.asks.is_empty() && self.grants.is_empty()
    }
}

/// One question in flight.
#[derive(Debug)]
pub struct Asked {
    /// Its ticket (the answer's `Ack` id).
    pub ticket: u64,
    /// What waits for it.
    pub what: Pending,
}

/// What an answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on; for a publish, maybe with another payload.
    Allow(Option<Payload>),
    /// Refused, with the service's reason (and, for `hello`, its code).
    Refuse(String, Option<u16>),
    /// No usable answer: timed out (true) or failed.
    Fail(bool),
}

/// The answer a service gives.
#[derive(Deserialize)]
struct HookAnswer {
    allow: bool,
    reason: Option<String>,
    code: Option<u16>,
    d: Option<Box<RawValue>>,
    db: Option<String>,
}

/// What the service's answer (or failure) says.
pub fn verdict(r: Result<Payload, ErrCode>) -> Verdict {
    let body = match r {
        Ok(p) => p,
        Err(ErrCode::Timeout) => return Verdict::Fail(true),
        Err(_) => return Verdict::Fail(false),
    };
    let Ok(a) = serde_json::from_slice::<HookAnswer>(body.bytes()) else {
        return Verdict::Fail(false);
    };
    if !a.allow {
        let reason = a.reason.unwrap_or_else(|| "refused".into());
        // At most what a close frame carries, without control characters.
        let mut reason: String = reason.chars().filter(|c| !c.is_control()).collect();
        while reason.len() > 123 {
            reason.pop();
        }
        return Verdict::Refuse(reason, a.code);
    }
    let d = match (a.d, a.db) {
        (Some(d), _) => Some(Payload::Json(Bytes::from(d.get().to_owned()))),
        (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b.as_bytes()) {
            Ok(v) => Some(Payload::Binary(Bytes::from(v))),
            Err(_) => return Verdict::Fail(false),
        },
        (None, None) => None,
    };
    Verdict::Allow(d)
}

/// The service `hook` asks, if configured.
pub fn asked(cx: &Ctx<'_>, hook: Hook) -> bool {
    cx.cfg.hooks.services[hook as usize].is_some()
}

/// Asks `hook` about `what` with `body`; false (and an `err` queued) when
/// the connection has too many questions waiting.
pub fn ask(
    st: &mut SessionState,
    hook: Hook,
    user: UserId,
    body: serde_json::Value,
    what: Pending,
    out: &mut Vec<Action>,
) -> bool {
    let x = st.hooks_mut();
    if x.asks.len() >= MAX_ASKS {
        let id = match &what {
            Pending::Sub { id, .. } => *id,
            Pending::Pub(p, _) => p.id,
            Pending::Hello(h) => h.id,
        };
        err(
            out,
            id,
            ErrCode::RateLimited,
            "too many hook questions waiting",
        );
        return false;
    }
    x.next_ask += 1;
    let ticket = x.next_ask;
    let ch = match &what {
        Pending::Sub { ch, .. } => Some(ch.clone()),
        _ => None,
    };
    x.asks.push_back(Asked { ticket, what });
    out.push(Action::Ask {
        hook,
        ticket,
        user,
        body: body.to_string().into_bytes(),
        ch,
    });
    true
}

/// The `d`/`db` of a payload, for a hook's body.
pub fn payload_field(m: &mut serde_json::Map<String, serde_json::Value>, p: &Payload) {
    match p {
        Payload::None => {}
        Payload::Json(b) => {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(b) {
                m.insert("d".into(), v);
            }
        }
        Payload::Binary(b) => {
            m.insert(
                "db".into(),
                base64::engine::general_purpose::STANDARD.encode(b).into(),
            );
        }
    }
}

fn count(cx: &Ctx<'_>, hook: Hook, v: &Verdict) {
    let k = match v {
        Verdict::Allow(_) => 2,
        Verdict::Refuse(..) => 3,
        Verdict::Fail(true) => 4,
        Verdict::Fail(false) => 5,
    };
    cx.metrics.hooks[hook as usize][k].fetch_add(1, Relaxed);
}

/// A hook's answer for `ticket` came.
pub fn answered(
    st: &mut SessionState,
    cx: &Ctx<'_>,
    ticket: Option<u64>,
    r: Result<Payload, ErrCode>,
    out: &mut Vec<Action>,
) {
    let Some(x) = st.extra.as_mut().and_then(|x| x.hooks.as_mut()) else {
        return;
    };
    let Some(i) = x.asks.iter().position(|a| Some(a.ticket) == ticket) else {
        return; // unsubscribed or closing meanwhile
    };
    let v = verdict(r);
    let allow_on_error = cx.cfg.hooks.allow_on_error;
    let hook = match &x.asks[i].what {
        Pending::Hello(_) => Hook::Connect,
        Pending::Sub { .. } => Hook::Subscribe,
        Pending::Pub(..) => Hook::Publish,
    };
    count(cx, hook, &v);
    if let Pending::Pub(_, slot) = &mut x.asks[i].what {
        *slot = Some(v);
        release_publishes(st, cx, out);
    } else if let Some(a) = x.asks.remove(i) {
        match a.what {
            Pending::Hello(h) => match v {
                Verdict::Allow(_) => super::welcome(st, cx, *h, out),
                Verdict::Fail(_) if allow_on_error => super::welcome(st, cx, *h, out),
                Verdict::Refuse(reason, code) => {
                    let code = match code {
                        Some(4005) => CloseCode::KICKED,
                        _ => CloseCode::UNAUTHORIZED,
                    };
                    close_with(out, code, reason);
                }
                Verdict::Fail(timed_out) => close_with(
                    out,
                    CloseCode::OVERLOADED,
                    if timed_out {
                        "connect hook did not answer in time".into()
                    } else {
                        "connect hook failed".into()
                    },
                ),
            },
            Pending::Sub {
                id,
                ch,
                since,
                presence,
            } => match v {
                Verdict::Allow(_) => {
                    out.push(Action::CacheAllow(ch.clone()));
                    super::subscribe(st, cx, (id, ch, since, presence), out);
                }
                Verdict::Fail(_) if allow_on_error => {
                    super::subscribe(st, cx, (id, ch, since, presence), out)
                }
                Verdict::Refuse(reason, _) => err(out, id, ErrCode::Forbidden, &reason),
                Verdict::Fail(t) => err(out, id, ErrCode::Timeout, fail_reason(Hook::Subscribe, t)),
            },
            Pending::Pub(..) => {}
        }
    }
    tidy(st);
}

/// Drops what holds nothing: an idle connection keeps no state for hooks.
fn tidy(st: &mut SessionState) {
    if let Some(x) = st.extra.as_mut() {
        if x.hooks.as_ref().is_some_and(|h| h.is_empty()) {
            x.hooks = None;
        }
        if x.is_empty() {
            st.extra = None;
        }
    }
}

fn fail_reason(hook: Hook, timed_out: bool) -> &'static str {
    match (hook, timed_out) {
        (Hook::Subscribe, true) => "subscribe hook did not answer in time",
        (Hook::Subscribe, false) => "subscribe hook failed",
        (_, true) => "publish hook did not answer in time",
        (_, false) => "publish hook failed",
    }
}

/// Publishes whose answers came, in the client's order: the first
/// publish still waiting holds back the ones behind it.
fn release_publishes(st: &mut SessionState, cx: &Ctx<'_>, out: &mut Vec<Action>) {
    loop {
        let Some(x) = st.extra.as_mut().and_then(|x| x.hooks.as_mut()) else {
            return;
        };
        let Some(i) = x
            .asks
            .iter()
            .position(|a| matches!(a.what, Pending::Pub(..)))
        else {
            return;
        };
        if !matches!(x.asks[i].what, Pending::Pub(_, Some(_))) {
            return;
        }
        let Some(Asked {
            what: Pending::Pub(mut p, Some(v)),
            ..
        }) = x.asks.remove(i)
        else {
            return;
        };
        match v {
            Verdict::Allow(d) => {
                if let Some(d) = d {
                    p.payload = d;
                }
                super::publish(st, cx, p, out);
            }
            Verdict::Fail(_) if cx.cfg.hooks.allow_on_error => super::publish(st, cx, p, out),
            Verdict::Refuse(reason, _) => err(out, p.id, ErrCode::Forbidden, &reason),
            Verdict::Fail(t) => err(out, p.id, ErrCode::Timeout, fail_reason(Hook::Publish, t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Result<Payload, ErrCode> {
        Ok(Payload::Json(Bytes::from(s.to_owned())))
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(json(r#"{"allow":true}"#)), Verdict::Allow(None));
        assert_eq!(
            verdict(json(r#"{"allow":true,"d":{"x":1}}"#)),
            Verdict::Allow(Some(Payload::Json(Bytes::from_static(b"{\"x\":1}"))))
        );
        assert_eq!(
            verdict(json(r#"{"allow":false,"reason":"no","code":4005}"#)),
            Verdict::Refuse("no".into(), Some(4005))
        );
        assert_eq!(
            verdict(json(r#"{"allow":false}"#)),
            Verdict::Refuse("refused".into(), None)
        );
        assert_eq!(verdict(json("{}")), Verdict::Fail(false));
        assert_eq!(verdict(json("nope")), Verdict::Fail(false));
        assert_eq!(verdict(Err(ErrCode::Timeout)), Verdict::Fail(true));
        assert_eq!(verdict(Err(ErrCode::NoService)), Verdict::Fail(false));
        let long = format!(r#"{{"allow":false,"reason":"{}"}}"#, "x".repeat(500));
        assert!(matches!(verdict(json(&long)), Verdict::Refuse(r, _) if r.len() == 123));
    }
}
