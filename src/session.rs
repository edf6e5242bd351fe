//! The session: protocol v1 above the transport.
//!
//! [`handle`] takes one decoded envelope from a connection and does what
//! PROTOCOL.md says: `hello` → `welcome`, `sub`/`unsub`/`pub`/`req`,
//! `ping`/`pong`, and every refusal with its `err` code. It never sees a
//! socket: the transport decoded the envelope and will encode whatever is
//! queued on the [`Conn`]. A protocol violation comes back as the
//! [`CloseReq`] the transport must carry out.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use edgegate_proto::channel::{self, Channel};
use edgegate_proto::{Envelope, ErrCode, Type};
use serde::Deserialize;

use crate::auth::{AuthError, Claims, Verifier};
use crate::backbone::{Backbone, ServiceAnswer, embedded_service};
use crate::config::{RoomPolicy, TokenSource};
use crate::conn::{CloseReq, Conn, Phase, UserId};
use crate::metrics::Transport;
use crate::nats::{ToNats, publish_headers};
use crate::shard::Shard;
use crate::timer::Check;

/// `hello.meta` (PROTOCOL.md §2).
#[derive(Deserialize, Default)]
struct HelloMeta {
    user: Option<String>,
    token: Option<String>,
}

/// Verifies `token` for `conn`, counting the outcome.
fn verify(shard: &Shard, v: &Verifier, token: &str) -> Result<Rc<Claims>, AuthError> {
    match v.verify(token, crate::auth::unix_ms()) {
        Ok(c) => {
            shard.metrics.auth_ok.fetch_add(1, Relaxed);
            Ok(Rc::new(c))
        }
        Err(e) => {
            shard.metrics.auth_failures[e.index()].fetch_add(1, Relaxed);
            Err(e)
        }
    }
}

/// `hello.meta.token`, where this connection may carry it there (TCP and
/// QUIC always; WebSocket when `auth.token_sources` has "hello").
fn hello_token(shard: &Shard, conn: &Conn, meta: &mut HelloMeta) -> Option<String> {
    let allowed = conn.transport != Transport::Ws || shard.cfg.token_source(TokenSource::Hello);
    meta.token.take().filter(|_| allowed)
}

/// Arms the 4008 check at the token's expiry (plus the leeway).
fn arm_expiry(shard: &Shard, conn: &Conn, claims: &Claims) {
    let leeway = shard.cfg.auth.as_ref().map_or(0, |v| v.leeway_ms());
    let left = claims
        .exp_unix_ms
        .saturating_add(leeway)
        .saturating_sub(crate::auth::unix_ms());
    shard.wheel.borrow_mut().schedule(
        conn.key,
        conn.serial as u32,
        Check::Expiry,
        shard.now_ms() + left,
    );
}

/// Token refresh (docs/protocol.md, "Token refresh"): a `hello` after
/// `welcome` carrying a fresh token for the same `sub` replaces the claims
/// and is answered `ok`; anything wrong is an `err` and the old token stays
/// in force until it expires.
fn refresh(shard: &Rc<Shard>, conn: &Rc<Conn>, user: &str, env: Envelope) -> Result<(), CloseReq> {
    let id = env.id;
    let Some(v) = shard.cfg.auth.as_deref() else {
        return err(conn, id, ErrCode::BadRequest, "already welcomed");
    };
    let mut meta: HelloMeta = match env.meta.as_deref() {
        Some(text) => match serde_json::from_str(text) {
            Ok(m) => m,
            Err(_) => {
                return err(
                    conn,
                    id,
                    ErrCode::BadRequest,
                    "hello.meta has fields of the wrong type",
                );
            }
        },
        None => HelloMeta::default(),
    };
    let Some(token) = hello_token(shard, conn, &mut meta) else {
        return err(conn, id, ErrCode::BadRequest, "already welcomed");
    };
    let claims = match verify(shard, v, &token) {
        Ok(c) => c,
        Err(e) => return err(conn, id, ErrCode::Unauthorized, e.reason()),
    };
    if &*claims.sub != user {
        return err(conn, id, ErrCode::Unauthorized, "token is for another user");
    }
    let old_exp = conn
        .claims
        .borrow()
        .as_ref()
        .map_or(u64::MAX, |c| c.exp_unix_ms);
    let shorter = claims.exp_unix_ms < old_exp;
    *conn.claims.borrow_mut() = Some(claims.clone());
    // The armed check finds the later exp and re-arms itself; only an
    // earlier exp needs a check of its own.
    if shorter {
        arm_expiry(shard, conn, &claims);
    }
    // Rooms the new token no longer grants are left.
    if shard.cfg.room_policy == RoomPolicy::Claims {
        let lost: Vec<Rc<str>> = conn
            .subs
            .borrow()
            .iter()
            .filter(
                |ch| matches!(channel::parse(ch), Ok(Channel::Room(r)) if !claims.allows_room(r)),
            )
            .cloned()
            .collect();
        for ch in lost {
            shard.unsubscribe(conn, &ch);
        }
    }
    shard.metrics.auth_refreshes.fetch_add(1, Relaxed);
    conn.reply(Envelope::ok(id));
    Ok(())
}

/// Handles one envelope from `conn`.
pub fn handle(shard: &Rc<Shard>, conn: &Rc<Conn>, env: Envelope) -> Result<(), CloseReq> {
    match conn.phase.get() {
        Phase::Closing => Ok(()),
        Phase::Hello => before_welcome(shard, conn, env),
        Phase::Active => active(shard, conn, env),
    }
}

fn before_welcome(shard: &Rc<Shard>, conn: &Rc<Conn>, env: Envelope) -> Result<(), CloseReq> {
    match env.t {
        Type::Hello => hello(shard, conn, env),
        Type::Ping => {
            conn.reply(Envelope::pong(env.id));
            Ok(())
        }
        Type::Pong => Ok(()),
        _ => Err(CloseReq::new(4000, "the first envelope must be hello")),
    }
}

fn hello(shard: &Rc<Shard>, conn: &Rc<Conn>, env: Envelope) -> Result<(), CloseReq> {
    let mut meta: HelloMeta = match env.meta.as_deref() {
        Some(text) => serde_json::from_str(text)
            .map_err(|_| CloseReq::new(4001, "hello.meta has fields of the wrong type"))?,
        None => HelloMeta::default(),
    };
    let user: Rc<str> = match shard.cfg.auth.as_deref() {
        // Auth mode "none": the client names itself (development only; the
        // gateway warns loudly at start).
        None => match meta.user {
            Some(u) if channel::valid_id(&u) => Rc::from(u),
            Some(_) => return Err(CloseReq::new(4001, "hello.meta.user is not a valid id")),
            None => return Err(CloseReq::new(4001, "hello.meta.user is required")),
        },
        // Mode "jwt": the token names the user; hello's token wins over one
        // from the upgrade request (already verified, in `conn.claims`).
        Some(v) => {
            let claims = match hello_token(shard, conn, &mut meta) {
                Some(token) => {
                    verify(shard, v, &token).map_err(|e| CloseReq::new(4001, e.reason()))?
                }
                None => match conn.claims.borrow().clone() {
                    Some(c) => c,
                    None => {
                        let e = AuthError::Missing;
                        shard.metrics.auth_failures[e.index()].fetch_add(1, Relaxed);
                        return Err(CloseReq::new(4001, e.reason()));
                    }
                },
            };
            if meta.user.as_deref().is_some_and(|u| u != &*claims.sub) {
                return Err(CloseReq::new(
                    4001,
                    "hello.meta.user differs from the token's sub",
                ));
            }
            arm_expiry(shard, conn, &claims);
            let user = Rc::from(&*claims.sub);
            *conn.claims.borrow_mut() = Some(claims);
            user
        }
    };
    let cfg = &shard.cfg;
    let conn_name = shard.conn_name(conn);
    let meta = serde_json::json!({
        "conn": conn_name,
        "user": &*user,
        "node": cfg.node_id,
        "shard": shard.id,
        "hb_ms": cfg.hb_ms,
        "max_frame": cfg.max_frame,
    });
    let mut welcome = Envelope::new(Type::Welcome);
    welcome.id = env.id;
    welcome.meta = Some(meta.to_string());
    let uid = UserId::new(&user);
    *conn.user.borrow_mut() = Some(uid.clone());
    conn.phase.set(Phase::Active);
    shard.metrics.sessions.fetch_add(1, Relaxed);
    // Auto-subscription to the user's own channel, live before welcome is sent.
    shard.subscribe(conn, uid.channel().clone(), None);
    shard.presence(&uid, 1);
    conn.reply(welcome);
    let now = shard.now_ms();
    shard.wheel.borrow_mut().schedule(
        conn.key,
        conn.serial as u32,
        Check::Heartbeat,
        now + cfg.hb_ms,
    );
    Ok(())
}

fn err(conn: &Conn, id: Option<u64>, code: ErrCode, reason: &str) -> Result<(), CloseReq> {
    conn.reply(Envelope::err(id, code, reason));
    Ok(())
}

/// May `conn` use room `room`? (`[rooms] policy`; "claims" needs token
/// claims, which auth mode "none" never has.)
fn room_allowed(shard: &Shard, conn: &Conn, room: &str) -> bool {
    match shard.cfg.room_policy {
        RoomPolicy::Open => true,
        RoomPolicy::Claims => conn
            .claims
            .borrow()
            .as_ref()
            .is_some_and(|c| c.allows_room(room)),
    }
}

fn active(shard: &Rc<Shard>, conn: &Rc<Conn>, mut env: Envelope) -> Result<(), CloseReq> {
    let Some(user) = conn.user() else {
        return Err(CloseReq::new(4000, "no user"));
    };
    let id = env.id;
    match env.t {
        Type::Ping => {
            conn.reply(Envelope::pong(id));
            Ok(())
        }
        Type::Pong => Ok(()),
        Type::Hello => refresh(shard, conn, &user, env),
        Type::Sub | Type::Unsub | Type::Pub | Type::Req => {
            let Some(ch_owned) = env.ch.take() else {
                return err(conn, id, ErrCode::BadRequest, "ch is required");
            };
            let ch = ch_owned.as_str();
            let parsed = match channel::parse(ch) {
                Ok(c) => c,
                Err(e) => return err(conn, id, ErrCode::BadChannel, &e.to_string()),
            };
            match env.t {
                Type::Sub => sub(shard, conn, &user, id, ch, parsed),
                Type::Unsub => {
                    if shard.unsubscribe(conn, ch) {
                        conn.reply(Envelope::ok(id));
                        Ok(())
                    } else {
                        err(conn, id, ErrCode::NotSubscribed, "not subscribed")
                    }
                }
                Type::Pub => publish(shard, conn, &user, parsed, ch, env),
                _ => request(shard, conn, &user, parsed, env),
            }
        }
        Type::Welcome | Type::Ok | Type::Err | Type::Msg | Type::Reply | Type::Bye => Err(
            CloseReq::new(4000, "server-only envelope type from a client"),
        ),
    }
}

fn sub(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    user: &str,
    id: Option<u64>,
    ch: &str,
    parsed: Channel<'_>,
) -> Result<(), CloseReq> {
    let allowed = match parsed {
        Channel::User(u) => u == user,
        Channel::Room(r) => room_allowed(shard, conn, r),
        Channel::Svc(_) => false,
    };
    if !allowed {
        return err(
            conn,
            id,
            ErrCode::Forbidden,
            "not allowed to subscribe to this channel",
        );
    }
    if conn.subs.borrow().len() >= shard.cfg.max_subscriptions
        && !conn.subs.borrow().iter().any(|c| &**c == ch)
    {
        return err(
            conn,
            id,
            ErrCode::TooLarge,
            "too many subscriptions on this connection",
        );
    }
    if shard.subscribe(conn, Rc::from(ch), Some(id)) {
        conn.reply(Envelope::ok(id));
    }
    Ok(())
}

fn publish(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    user: &str,
    parsed: Channel<'_>,
    ch: &str,
    env: Envelope,
) -> Result<(), CloseReq> {
    let id = env.id;
    match parsed {
        Channel::Svc(_) => return err(conn, id, ErrCode::BadRequest, "use req for svc: channels"),
        Channel::Room(r) if !room_allowed(shard, conn, r) => {
            return err(
                conn,
                id,
                ErrCode::Forbidden,
                "not allowed to publish to this room",
            );
        }
        _ => {}
    }
    if let Backbone::Nats(link) = &shard.backbone {
        // Through NATS: the message comes back to local subscribers (the
        // publisher included) in NATS's order; `ok` once NATS accepted it.
        if !link.state.up.load(Relaxed) {
            return err(
                conn,
                id,
                ErrCode::BackboneUnavailable,
                "backbone unavailable, retry later",
            );
        }
        let Some(subject) = link.subject(ch) else {
            return err(conn, id, ErrCode::BadChannel, "bad channel");
        };
        let json = env.payload.is_json();
        let payload = env.payload.into_bytes();
        let headers = publish_headers(user, id, &link.node, &shard.conn_name(conn), json);
        let ack = shard.ack(conn, id);
        if !link.send(ToNats::Publish {
            subject,
            headers,
            payload,
            ack,
        }) {
            return err(
                conn,
                id,
                ErrCode::BackboneUnavailable,
                "backbone unavailable",
            );
        }
        return Ok(());
    }
    let mut msg = Envelope::new(Type::Msg);
    msg.ch = Some(ch.to_owned());
    msg.id = id;
    msg.from = Some(user.to_string());
    msg.payload = env.payload;
    let msg = Arc::new(msg);
    if shard.publish(msg) {
        conn.reply(Envelope::ok(id));
    } else {
        conn.reply(Envelope::err(
            id,
            ErrCode::RateLimited,
            "node overloaded: message not delivered to every shard",
        ));
    }
    Ok(())
}

fn request(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    user: &str,
    parsed: Channel<'_>,
    env: Envelope,
) -> Result<(), CloseReq> {
    let Channel::Svc(name) = parsed else {
        return err(
            conn,
            env.id,
            ErrCode::BadChannel,
            "req needs a svc: channel",
        );
    };
    if let Backbone::Nats(link) = &shard.backbone {
        if !link.state.up.load(Relaxed) {
            return err(
                conn,
                env.id,
                ErrCode::BackboneUnavailable,
                "backbone unavailable, retry later",
            );
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Eg-User", user);
        headers.insert("Eg-Conn", shard.conn_name(conn).as_str());
        let payload = env.payload.into_bytes();
        let subject = format!("{}.svc.{name}", link.prefix);
        let ack = shard.ack(conn, env.id);
        if !link.send(ToNats::Request {
            subject,
            headers,
            payload,
            ack,
        }) {
            return err(
                conn,
                env.id,
                ErrCode::BackboneUnavailable,
                "backbone unavailable",
            );
        }
        return Ok(());
    }
    match embedded_service(name, &env) {
        ServiceAnswer::Reply(payload) => {
            let mut reply = Envelope::new(Type::Reply);
            reply.id = env.id;
            reply.payload = payload;
            conn.reply(reply);
            Ok(())
        }
        ServiceAnswer::NoService => err(conn, env.id, ErrCode::NoService, "no such service"),
    }
}
