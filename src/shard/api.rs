//! The shard's side of the services thread (`crate::api`): serving the
//! server API's calls, taking service answers, asking hooks, and the
//! subscribe hook's remembered allows.
//!
//! One task per shard waits on the link's [`AtomicWaker`]: the services
//! thread wakes it from its own thread, and the glommio executor wakes
//! without polling, so an API call or a service's answer is served at
//! once, not on the next tick.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use edgegate_proto::{CloseCode, Payload};

use super::Shard;
use crate::api::services::ServiceCall;
use crate::api::{Call, ShardLink};
use crate::backbone::{self, Ack, Event, Kick, Page, PresencePage, Refused, RoomsPage, Stored};
use crate::conn::Conn;
use crate::session::hooks::Hook;
use crate::session::{CloseReq, Input, UserId};

/// Calls served per wake-up before other tasks get a turn.
const BATCH: usize = 256;
/// Remembered subscribe allows per shard; past it the expired ones go,
/// and if none has, all.
const CACHE_MAX: usize = 64 * 1024;

/// An API call waiting for the backbone's answer.
pub enum ApiReply {
    /// A publish.
    Publish(tokio::sync::oneshot::Sender<Result<Option<Stored>, Refused>>),
    /// A presence query.
    Presence(tokio::sync::oneshot::Sender<Result<PresencePage, Refused>>),
    /// A history page.
    Page(tokio::sync::oneshot::Sender<Result<Page, Refused>>),
    /// The rooms with someone present.
    Channels(tokio::sync::oneshot::Sender<Result<RoomsPage, Refused>>),
}

/// What the shard keeps for the services thread.
pub struct ApiSide {
    link: ShardLink,
    /// API calls waiting for the backbone, by ticket.
    pending: RefCell<slab::Slab<ApiReply>>,
    /// `user\nch` → until when (shard clock) the subscribe hook's allow holds.
    cache: RefCell<HashMap<Box<str>, u64>>,
}

impl ApiSide {
    /// The shard's end of the link.
    pub fn new(link: ShardLink) -> Self {
        ApiSide {
            link,
            pending: RefCell::new(slab::Slab::new()),
            cache: RefCell::new(HashMap::new()),
        }
    }
}

impl Shard {
    /// Starts the task that serves the services thread's calls and answers.
    pub fn serve_api(self: &Rc<Self>) {
        if self.api.is_none() {
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            std::future::poll_fn(|cx| {
                let Some(api) = me.api.as_ref() else {
                    return std::task::Poll::Ready(());
                };
                api.link.waker.register(cx.waker());
                let mut n = 0;
                while let Ok(ev) = api.link.events.try_recv() {
                    me.on_event(ev);
                }
                while n < BATCH {
                    match api.link.calls.try_recv() {
                        Ok(c) => me.api_call(c),
                        Err(_) => return std::task::Poll::Pending,
                    }
                    n += 1;
                }
                // More waiting: let other tasks run, then come back.
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            })
            .await;
        })
        .detach();
    }

    fn api_call(&self, c: Call) {
        match c {
            Call::Publish { msg, reply } => {
                let Some(ack) = self.api_ticket(ApiReply::Publish(reply)) else {
                    return;
                };
                let conn = format!("{}-api", self.cfg.node_id);
                let p = backbone::Publish {
                    ch: &msg.ch,
                    from: &msg.from,
                    id: None,
                    conn: &conn,
                    payload: msg.payload,
                    key: msg.key,
                    ephemeral: msg.ephemeral,
                };
                let mut events = self.events.take();
                self.backbone.publish(p, ack, &mut events);
                self.dispatch(events);
            }
            Call::Kick(k) => self.kick(k),
            Call::Presence {
                ch,
                limit,
                after,
                reply,
            } => {
                let Some(ack) = self.api_ticket(ApiReply::Presence(reply)) else {
                    return;
                };
                let mut events = self.events.take();
                self.backbone
                    .presence_query(&ch, limit, after.as_deref(), ack, &mut events);
                self.dispatch(events);
            }
            Call::History {
                ch,
                limit,
                before,
                reply,
            } => {
                let Some(ack) = self.api_ticket(ApiReply::Page(reply)) else {
                    return;
                };
                let mut events = self.events.take();
                self.backbone
                    .history_page(&ch, limit, before, ack, &mut events);
                self.dispatch(events);
            }
            Call::Channels {
                prefix,
                after,
                limit,
                reply,
            } => {
                let Some(ack) = self.api_ticket(ApiReply::Channels(reply)) else {
                    return;
                };
                let mut events = self.events.take();
                self.backbone
                    .channels(&prefix, after.as_deref(), limit, ack, &mut events);
                self.dispatch(events);
            }
        }
    }

    /// Keeps `reply` until the backbone answers; its answer address.
    fn api_ticket(&self, reply: ApiReply) -> Option<Ack> {
        let api = self.api.as_ref()?;
        let ticket = api.pending.borrow_mut().insert(reply);
        Some(Ack::api(self.id, ticket as u64))
    }

    /// The backbone's answer to an API call (`ack.is_api()`).
    pub(super) fn api_answer(&self, ack: Ack, ev: Event) {
        let Some(api) = self.api.as_ref() else { return };
        let Some(reply) = api.pending.borrow_mut().try_remove(ack.serial as usize) else {
            return;
        };
        let _ = match (reply, ev) {
            (ApiReply::Publish(tx), Event::Published(_, r)) => tx.send(r).map_err(drop),
            (ApiReply::Publish(tx), Event::Sent(_, r)) => tx.send(r.map(|()| None)).map_err(drop),
            (ApiReply::Presence(tx), Event::Presence(_, r)) => tx.send(r).map_err(drop),
            (ApiReply::Page(tx), Event::Page(_, r)) => tx.send(r).map_err(drop),
            (ApiReply::Channels(tx), Event::Channels(_, r)) => tx.send(r).map_err(drop),
            _ => Ok(()), // not the answer it waits for: dropped, the caller times out
        };
    }

    /// Closes `k.user`'s connections on this shard; reports how many.
    pub(super) fn kick(&self, k: Kick) {
        let req = CloseReq {
            code: CloseCode(k.code),
            reason: k.reason.clone().into(),
            retry_ms: k.retry_ms,
        };
        let keys = self
            .router
            .borrow()
            .keys(&format!("user:{}", k.user))
            .to_vec();
        let mut found: Vec<Rc<Conn>> = Vec::new();
        self.conns.for_each_key(&keys, |c| found.push(c.clone()));
        let mut closed = 0;
        for c in found {
            if !c.closing() && c.close_requested().is_none() {
                closed += 1;
            }
            self.input(&c, Input::Kick(req.clone()));
        }
        if let Some(tx) = &k.closed {
            let _ = tx.send(closed);
        }
    }

    /// Routes a client's `req`: to its HTTP service when there is one,
    /// else to the backbone.
    pub(super) fn request(&self, req: backbone::Request<'_>, ack: Ack, events: &mut Vec<Event>) {
        if let Some(svc) = self.api.as_ref().and_then(|a| a.link.services.as_ref())
            && let Some(i) = svc.find(req.service)
        {
            // Zero: the service's own `timeout_ms`.
            let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(0));
            let call = ServiceCall {
                service: i,
                user: req.user.to_owned(),
                conn: req.conn.to_owned(),
                json: req.payload.is_json(),
                body: req.payload.into_bytes(),
                timeout,
                hook: None,
                ack,
            };
            return svc.send(call, events);
        }
        self.backbone.request(req, ack, events);
    }

    /// Asks `hook`'s service (or answers from the subscribe cache).
    pub(super) fn ask(
        &self,
        conn: &Conn,
        (hook, ticket, user): (Hook, u64, UserId),
        body: Vec<u8>,
        ch: Option<crate::session::Name>,
        events: &mut Vec<Event>,
    ) {
        let ack = self.ack(conn, Some(ticket));
        let counters = &self.metrics.hooks[hook as usize];
        if let Some(ch) = &ch
            && self.cache_holds(&user, ch)
        {
            counters[1].fetch_add(1, Relaxed);
            let allow = Payload::Json(Bytes::from_static(b"{\"allow\":true}"));
            return events.push(Event::Answer(ack, Ok(allow)));
        }
        counters[0].fetch_add(1, Relaxed);
        let hooks = &self.cfg.hooks;
        let Some(service) = hooks.services[hook as usize].clone() else {
            return events.push(Event::Answer(ack, Err(edgegate_proto::ErrCode::NoService)));
        };
        let name = self.conn_name(conn);
        if let Some(svc) = self.api.as_ref().and_then(|a| a.link.services.as_ref())
            && let Some(i) = svc.find(&service)
        {
            let call = ServiceCall {
                service: i,
                user: user.to_string(),
                conn: name,
                json: true,
                body: Bytes::from(body),
                timeout: Duration::from_millis(hooks.timeout_ms),
                hook: Some(hook.name()),
                ack,
            };
            return svc.send(call, events);
        }
        let req = backbone::Request {
            service: &service,
            user: &user,
            conn: &name,
            payload: Payload::Json(Bytes::from(body)),
            ask: true,
            timeout_ms: Some(hooks.timeout_ms),
        };
        self.backbone.request(req, ack, events);
    }

    fn cache_key(user: &str, ch: &str) -> Box<str> {
        format!("{user}\n{ch}").into_boxed_str()
    }

    fn cache_holds(&self, user: &str, ch: &str) -> bool {
        let Some(api) = self.api.as_ref() else {
            return false;
        };
        if self.cfg.hooks.cache_ms == 0 {
            return false;
        }
        let now = self.now_ms();
        api.cache
            .borrow()
            .get(&Self::cache_key(user, ch))
            .is_some_and(|&until| now < until)
    }

    /// Remembers the subscribe hook's allow of `ch` for `conn`'s user.
    pub(super) fn cache_allow(&self, conn: &Conn, ch: &str) {
        let (Some(api), Some(user)) = (self.api.as_ref(), conn.user()) else {
            return;
        };
        if self.cfg.hooks.cache_ms == 0 {
            return;
        }
        let now = self.now_ms();
        let mut c = api.cache.borrow_mut();
        if c.len() >= CACHE_MAX {
            c.retain(|_, until| *until > now);
            if c.len() >= CACHE_MAX {
                c.clear();
            }
        }
        c.insert(Self::cache_key(&user, ch), now + self.cfg.hooks.cache_ms);
    }
}
