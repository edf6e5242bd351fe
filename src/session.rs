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

use crate::backbone::{ServiceAnswer, embedded_service};
use crate::config::RoomPolicy;
use crate::conn::{CloseReq, Conn, Phase};
use crate::shard::Shard;
use crate::timer::Check;

/// `hello.meta` (PROTOCOL.md §2).
#[derive(Deserialize, Default)]
struct HelloMeta {
    user: Option<String>,
    #[allow(dead_code)] // read by the jwt auth mode
    token: Option<String>,
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
    let meta: HelloMeta = match env.meta.as_deref() {
        Some(text) => serde_json::from_str(text)
            .map_err(|_| CloseReq::new(4001, "hello.meta has fields of the wrong type"))?,
        None => HelloMeta::default(),
    };
    // Auth mode "none": the client names itself (development only; the
    // gateway warns loudly at start).
    let user = match meta.user {
        Some(u) if channel::valid_id(&u) => u,
        Some(_) => return Err(CloseReq::new(4001, "hello.meta.user is not a valid id")),
        None => return Err(CloseReq::new(4001, "hello.meta.user is required")),
    };
    let user: Rc<str> = Rc::from(user);
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
    *conn.user.borrow_mut() = Some(user.clone());
    conn.phase.set(Phase::Active);
    shard.metrics.sessions.fetch_add(1, Relaxed);
    // Auto-subscription to the user's own channel, live before welcome is sent.
    let own: Rc<str> = Rc::from(format!("user:{user}"));
    shard.subscribe(conn, own);
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

/// May `user` use room `id`? (`[rooms] policy`; "claims" needs token claims,
/// which auth mode "none" never has.)
fn room_allowed(shard: &Shard, _user: &str, _room: &str) -> bool {
    match shard.cfg.room_policy {
        RoomPolicy::Open => true,
        RoomPolicy::Claims => false,
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
        Type::Hello => err(conn, id, ErrCode::BadRequest, "already welcomed"),
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
                _ => request(conn, parsed, env),
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
        Channel::Room(r) => room_allowed(shard, user, r),
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
    shard.subscribe(conn, Rc::from(ch));
    conn.reply(Envelope::ok(id));
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
        Channel::Room(r) if !room_allowed(shard, user, r) => {
            return err(
                conn,
                id,
                ErrCode::Forbidden,
                "not allowed to publish to this room",
            );
        }
        _ => {}
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

fn request(conn: &Rc<Conn>, parsed: Channel<'_>, env: Envelope) -> Result<(), CloseReq> {
    let Channel::Svc(name) = parsed else {
        return err(
            conn,
            env.id,
            ErrCode::BadChannel,
            "req needs a svc: channel",
        );
    };
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
