//! Protocol v1 without sockets: every rule of docs/protocol.md §6, every `err`
//! code and every close code the session decides, driven through
//! [`handle`] with plain values.

use edgegate_proto::{CloseCode, Envelope, ErrCode, Payload, Type, json};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

use super::*;
use crate::auth::Verifier;
use crate::backbone::{Position, Recovery, Since, Stored, Unrecovered};
use crate::config::{Auth, Config, RoomPolicy, TokenSource};

const SECRET: &str = "0123456789abcdef0123456789abcdef";
/// Unix ms "now" of every test (tokens expire relative to it).
const UNIX: u64 = 1_800_000_000_000;

/// One session and the world around it.
struct T {
    cfg: ShardConfig,
    metrics: ShardMetrics,
    st: SessionState,
    transport: Transport,
    now: u64,
    unix: u64,
    /// The SSE session token the shard would pass.
    session: Option<String>,
}

impl T {
    /// Auth mode "none", open rooms.
    fn open() -> T {
        let mut cfg = ShardConfig::from_config(&Config::default(), 2, "n1".into());
        // The shape without positions: `welcome` at once. The tests of
        // §8.1 (`positioned`) turn them on.
        cfg.positions = false;
        T {
            cfg,
            metrics: ShardMetrics::default(),
            st: SessionState::default(),
            transport: Transport::Tcp,
            now: 1_000,
            unix: UNIX,
            session: None,
        }
    }

    /// Auth mode "jwt" (HS256, leeway 1 s) with `policy`.
    fn jwt(policy: RoomPolicy) -> T {
        let mut t = T::open();
        let auth = Auth {
            secret: Some(SECRET.into()),
            leeway_ms: 1_000,
            ..Auth::default()
        };
        let v = Verifier::from_config(&auth).unwrap_or_else(|e| panic!("{e}"));
        t.cfg.auth = Some(std::sync::Arc::new(v));
        t.cfg.room_policy = policy;
        t
    }

    fn run(&mut self, input: Input) -> Vec<Action> {
        let cx = Ctx {
            cfg: &self.cfg,
            metrics: &self.metrics,
            shard: 1,
            serial: 7,
            transport: self.transport,
            now_ms: self.now,
            unix_ms: self.unix,
            session: self.session.as_deref(),
        };
        let mut out = Vec::new();
        handle(&mut self.st, &cx, input, &mut out);
        out
    }

    /// A client envelope, written as JSON.
    fn client(&mut self, text: &str) -> Vec<Action> {
        let env = json::decode(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
        self.run(Input::Client(env))
    }

    /// `hello` as `user` (auth none) and the welcome.
    fn welcomed(user: &str) -> T {
        let mut t = T::open();
        let out = t.client(&format!(
            r#"{{"t":"hello","id":1,"meta":{{"user":"{user}"}}}}"#
        ));
        assert!(welcome(&out).is_some(), "{out:?}");
        t
    }

    fn check(&mut self, check: Check, last_rx_ms: u64, pinged_ms: u64) -> Vec<Action> {
        self.run(Input::Check {
            check,
            last_rx_ms,
            pinged_ms,
        })
    }
}

fn token(sub: &str, exp_s: u64, rooms: &[&str]) -> String {
    let claims = serde_json::json!({"sub": sub, "exp": exp_s, "rooms": rooms});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn replies(out: &[Action]) -> Vec<&Envelope> {
    out.iter()
        .filter_map(|a| match a {
            Action::Reply(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// The only reply, which must be there.
fn reply(out: &[Action]) -> &Envelope {
    let r = replies(out);
    assert_eq!(r.len(), 1, "{out:?}");
    r[0]
}

fn welcome(out: &[Action]) -> Option<serde_json::Value> {
    replies(out)
        .into_iter()
        .find(|e| e.t == Type::Welcome)
        .map(|e| serde_json::from_str(e.meta.as_deref().unwrap_or("{}")).unwrap_or_default())
}

fn closed(out: &[Action]) -> Option<CloseReq> {
    out.iter().find_map(|a| match a {
        Action::Close(c) => Some(c.clone()),
        _ => None,
    })
}

fn assert_close(out: &[Action], code: CloseCode) -> CloseReq {
    let c = closed(out).unwrap_or_else(|| panic!("expected close {code:?}, got {out:?}"));
    assert_eq!(c.code, code, "{c:?}");
    c
}

fn assert_err(out: &[Action], id: u64, code: ErrCode) {
    let e = reply(out);
    assert_eq!(e.t, Type::Err, "{e:?}");
    assert_eq!(e.id, Some(id));
    assert_eq!(e.err_code(), Some(code), "{e:?}");
    assert!(closed(out).is_none(), "an err does not close: {out:?}");
}

fn assert_ok(out: &[Action], id: u64) {
    let e = reply(out);
    assert_eq!(e.t, Type::Ok, "{e:?}");
    assert_eq!(e.id, Some(id));
}

// ---------------------------------------------------------------- before welcome

#[test]
fn first_envelope_must_be_hello() {
    for t in ["sub", "unsub", "pub", "req"] {
        let mut s = T::open();
        let out = s.client(&format!(r#"{{"t":"{t}","id":1,"ch":"room:a"}}"#));
        assert_close(&out, CloseCode::PROTOCOL_ERROR);
        assert!(replies(&out).is_empty());
        assert_eq!(s.st.phase, Phase::Hello);
    }
}

#[test]
fn ping_and_pong_are_tolerated_before_hello() {
    let mut s = T::open();
    let out = s.client(r#"{"t":"ping","id":5}"#);
    let p = reply(&out);
    assert_eq!((p.t, p.id), (Type::Pong, Some(5)));
    assert!(s.client(r#"{"t":"pong"}"#).is_empty());
    assert_eq!(s.st.phase, Phase::Hello);
}

#[test]
fn server_sends_no_ping_before_welcome() {
    let mut s = T::open();
    let out = s.check(Check::Heartbeat, 0, 0);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn hello_timeout_closes_4001_only_before_welcome() {
    let mut s = T::open();
    assert_close(&s.check(Check::Hello, 0, 0), CloseCode::UNAUTHORIZED);
    let mut w = T::welcomed("alice");
    assert!(w.check(Check::Hello, 0, 0).is_empty());
}

#[test]
fn welcome_carries_hello_id_and_its_meta() {
    let mut s = T::open();
    let out = s.client(r#"{"t":"hello","id":42,"meta":{"user":"alice"}}"#);
    let w = replies(&out)
        .into_iter()
        .find(|e| e.t == Type::Welcome)
        .cloned()
        .unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(w.id, Some(42));
    let meta: serde_json::Value =
        serde_json::from_str(w.meta.as_deref().unwrap_or("")).unwrap_or_default();
    assert_eq!(meta["user"], "alice");
    assert_eq!(meta["node"], "n1");
    assert_eq!(meta["shard"], 1, "welcome.meta.shard is the owning shard");
    assert_eq!(meta["conn"], "n1-1-7");
    assert_eq!(meta["hb_ms"], s.cfg.hb_ms);
    assert_eq!(meta["max_frame"], s.cfg.max_frame);
    assert_eq!(s.st.phase, Phase::Active);
    assert_eq!(s.metrics.sessions.load(Relaxed), 1);
}

#[test]
fn welcome_subscribes_the_own_channel_first_and_arms_the_heartbeat() {
    let mut s = T::open();
    let out = s.client(r#"{"t":"hello","id":1,"meta":{"user":"bob"}}"#);
    let sub = out
        .iter()
        .position(|a| matches!(a, Action::Subscribe { ch, ok: None, .. } if &**ch == "user:bob"));
    let wel = out
        .iter()
        .position(|a| matches!(a, Action::Reply(e) if e.t == Type::Welcome));
    assert!(
        sub.is_some() && sub < wel,
        "own channel live before welcome: {out:?}"
    );
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Presence(u, 1) if &**u == "bob"))
    );
    let hb = s.cfg.hb_ms;
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Arm(Check::Heartbeat, at) if *at == 1_000 + hb))
    );
    assert_eq!(s.st.subs.len(), 1);
}

#[test]
fn hello_without_a_valid_user_is_4001() {
    for meta in [r#"{}"#, r#"{"user":"bad id!"}"#, r#"{"user":7}"#] {
        let mut s = T::open();
        let out = s.client(&format!(r#"{{"t":"hello","id":1,"meta":{meta}}}"#));
        assert_close(&out, CloseCode::UNAUTHORIZED);
        assert_eq!(s.st.phase, Phase::Hello);
    }
}

// ---------------------------------------------------------------- jwt: hello, upgrade token, refresh, expiry

#[test]
fn jwt_hello_takes_the_user_from_the_token_and_arms_its_expiry() {
    let mut s = T::jwt(RoomPolicy::Open);
    let tok = token("carol", UNIX / 1000 + 60, &[]);
    let out = s.client(&format!(
        r#"{{"t":"hello","id":1,"meta":{{"token":"{tok}"}}}}"#
    ));
    assert_eq!(welcome(&out).unwrap_or_default()["user"], "carol");
    // exp + leeway, on the shard clock.
    let at = 1_000 + 60_000 + 1_000;
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Arm(Check::Expiry, t) if *t == at)),
        "{out:?}"
    );
    assert_eq!(s.metrics.auth_ok.load(Relaxed), 1);
}

#[test]
fn jwt_hello_refusals_are_4001() {
    let good = token("carol", UNIX / 1000 + 60, &[]);
    let expired = token("carol", UNIX / 1000 - 60, &[]);
    for meta in [
        String::from("{}"),                                  // no token at all
        r#"{"token":"not.a.jwt"}"#.to_string(),              // malformed
        format!(r#"{{"token":"{expired}"}}"#),               // expired
        format!(r#"{{"token":"{good}","user":"mallory"}}"#), // user differs from sub
        r#"{"token":5}"#.to_string(),                        // wrong type
    ] {
        let mut s = T::jwt(RoomPolicy::Open);
        let out = s.client(&format!(r#"{{"t":"hello","id":1,"meta":{meta}}}"#));
        assert_close(&out, CloseCode::UNAUTHORIZED);
        assert!(welcome(&out).is_none(), "{meta}");
    }
}

#[test]
fn websocket_hello_token_only_where_token_sources_allow() {
    let tok = token("carol", UNIX / 1000 + 60, &[]);
    let mut s = T::jwt(RoomPolicy::Open);
    s.transport = Transport::Ws;
    s.cfg.token_sources[TokenSource::Hello as usize] = false;
    let out = s.client(&format!(
        r#"{{"t":"hello","id":1,"meta":{{"token":"{tok}"}}}}"#
    ));
    assert_close(&out, CloseCode::UNAUTHORIZED);
}

#[test]
fn upgrade_token_is_verified_and_then_hello_needs_none() {
    let mut s = T::jwt(RoomPolicy::Open);
    s.transport = Transport::Ws;
    let out = s.run(Input::UpgradeToken(token("dave", UNIX / 1000 + 60, &[])));
    assert!(out.is_empty(), "{out:?}");
    let out = s.client(r#"{"t":"hello","id":1}"#);
    assert_eq!(welcome(&out).unwrap_or_default()["user"], "dave");

    let mut bad = T::jwt(RoomPolicy::Open);
    let out = bad.run(Input::UpgradeToken("garbage".into()));
    assert_close(&out, CloseCode::UNAUTHORIZED);
}

#[test]
fn sse_welcome_carries_the_session_token_and_hello_may_hold_the_jwt() {
    // SSE: the token comes in hello= (docs/protocol.md §10), whatever
    // `auth.token_sources` says of WebSocket's carriers.
    let tok = token("fay", UNIX / 1000 + 60, &[]);
    let mut s = T::jwt(RoomPolicy::Open);
    s.transport = Transport::Sse;
    s.cfg.token_sources[TokenSource::Hello as usize] = false;
    s.session = Some("n1.1.0.7.mac".into());
    let out = s.client(&format!(
        r#"{{"t":"hello","id":1,"meta":{{"token":"{tok}"}}}}"#
    ));
    let w = welcome(&out).unwrap_or_default();
    assert_eq!(w["user"], "fay");
    assert_eq!(w["session"], "n1.1.0.7.mac");
    // Other transports' welcomes have none.
    let mut s = T::open();
    let out = s.client(r#"{"t":"hello","id":1,"meta":{"user":"gus"}}"#);
    assert!(welcome(&out).unwrap_or_default().get("session").is_none());
    // With history, the welcome is written when the position comes: the
    // shard makes the token while `welcome_due` says one may be due.
    let mut s = T::open();
    s.cfg.positions = true;
    s.transport = Transport::Sse;
    assert!(s.st.welcome_due());
    s.client(r#"{"t":"hello","id":1,"meta":{"user":"hal"}}"#);
    assert!(s.st.welcome_due(), "still waiting for the position");
    s.run(Input::SubReady(Some(1)));
    s.session = Some("n1.1.0.7.mac".into());
    let out = s.run(Input::History(Some(1), position("e1", 2, Ok(vec![]))));
    assert_eq!(welcome(&out).unwrap_or_default()["session"], "n1.1.0.7.mac");
    assert!(!s.st.welcome_due());
}

fn jwt_welcomed(policy: RoomPolicy, rooms: &[&str], exp_s: u64) -> T {
    let mut s = T::jwt(policy);
    let tok = token("erin", exp_s, rooms);
    let out = s.client(&format!(
        r#"{{"t":"hello","id":1,"meta":{{"token":"{tok}"}}}}"#
    ));
    assert!(welcome(&out).is_some(), "{out:?}");
    s
}

#[test]
fn refresh_replaces_the_claims_and_is_answered_ok() {
    let mut s = jwt_welcomed(RoomPolicy::Open, &[], UNIX / 1000 + 60);
    let tok = token("erin", UNIX / 1000 + 30, &[]);
    let out = s.client(&format!(
        r#"{{"t":"hello","id":9,"meta":{{"token":"{tok}"}}}}"#
    ));
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Arm(Check::Expiry, _))),
        "shorter exp re-arms: {out:?}"
    );
    assert_ok(&out, 9);
    assert_eq!(s.metrics.auth_refreshes.load(Relaxed), 1);
    // A longer one needs no check of its own.
    let tok = token("erin", UNIX / 1000 + 600, &[]);
    let out = s.client(&format!(
        r#"{{"t":"hello","id":10,"meta":{{"token":"{tok}"}}}}"#
    ));
    assert!(!out.iter().any(|a| matches!(a, Action::Arm(..))), "{out:?}");
    assert_ok(&out, 10);
}

#[test]
fn refresh_refusals_are_errs_and_keep_the_session() {
    let mut s = jwt_welcomed(RoomPolicy::Open, &[], UNIX / 1000 + 60);
    let other = token("frank", UNIX / 1000 + 60, &[]);
    let out = s.client(&format!(
        r#"{{"t":"hello","id":2,"meta":{{"token":"{other}"}}}}"#
    ));
    assert_err(&out, 2, ErrCode::Unauthorized);
    let out = s.client(r#"{"t":"hello","id":3,"meta":{"token":"x.y.z"}}"#);
    assert_err(&out, 3, ErrCode::Unauthorized);
    let out = s.client(r#"{"t":"hello","id":4}"#);
    assert_err(&out, 4, ErrCode::BadRequest);
    let out = s.client(r#"{"t":"hello","id":5,"meta":{"token":1}}"#);
    assert_err(&out, 5, ErrCode::BadRequest);
    assert_eq!(s.st.phase, Phase::Active);
}

#[test]
fn a_second_hello_without_auth_is_bad_request() {
    let mut s = T::welcomed("alice");
    assert_err(
        &s.client(r#"{"t":"hello","id":2,"meta":{"user":"alice"}}"#),
        2,
        ErrCode::BadRequest,
    );
}

#[test]
fn refresh_leaves_rooms_the_new_token_no_longer_grants() {
    let mut s = jwt_welcomed(RoomPolicy::Claims, &["a", "b"], UNIX / 1000 + 60);
    assert!(matches!(
        s.client(r#"{"t":"sub","id":2,"ch":"room:a"}"#)[..],
        [Action::Subscribe { .. }]
    ));
    assert!(matches!(
        s.client(r#"{"t":"sub","id":3,"ch":"room:b"}"#)[..],
        [Action::Subscribe { .. }]
    ));
    let tok = token("erin", UNIX / 1000 + 60, &["b"]);
    let out = s.client(&format!(
        r#"{{"t":"hello","id":4,"meta":{{"token":"{tok}"}}}}"#
    ));
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Unsubscribe(ch) if &**ch == "room:a")),
        "{out:?}"
    );
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Unsubscribe(ch) if &**ch == "room:b"))
    );
    assert!(s.st.subs.iter().all(|c| &**c != "room:a"));
}

#[test]
fn token_expiry_closes_4008_unless_refreshed() {
    let mut s = jwt_welcomed(RoomPolicy::Open, &[], UNIX / 1000 + 60);
    // Not yet (the leeway counts): re-armed for what is left.
    s.unix = UNIX + 60_500;
    let out = s.check(Check::Expiry, 0, 0);
    assert!(
        matches!(out[..], [Action::Arm(Check::Expiry, at)] if at == s.now + 500),
        "{out:?}"
    );
    s.unix = UNIX + 61_000;
    assert_close(&s.check(Check::Expiry, 0, 0), CloseCode::TOKEN_EXPIRED);
}

// ---------------------------------------------------------------- heartbeats and drain

#[test]
fn heartbeat_pings_once_per_silent_interval_then_closes_4002() {
    let mut s = T::welcomed("alice");
    let (hb, idle) = (s.cfg.hb_ms, s.cfg.idle_ms);
    // Heard from recently: no ping, next check one interval after it.
    s.now = 10_000;
    let out = s.check(Check::Heartbeat, 9_000, 0);
    assert!(
        matches!(out[..], [Action::Arm(Check::Heartbeat, at)] if at == 9_000 + hb),
        "{out:?}"
    );
    // Silent for an interval: one ping.
    s.now = 9_000 + hb;
    let out = s.check(Check::Heartbeat, 9_000, 0);
    assert!(matches!(out[0], Action::Ping), "{out:?}");
    // Pinged already in this interval: no second ping.
    s.now = 9_000 + hb + 100;
    let out = s.check(Check::Heartbeat, 9_000, 9_000 + hb);
    assert!(!out.iter().any(|a| matches!(a, Action::Ping)), "{out:?}");
    // Silent for the idle timeout: closed.
    s.now = 9_000 + idle;
    assert_close(
        &s.check(Check::Heartbeat, 9_000, 9_000 + hb),
        CloseCode::HEARTBEAT_TIMEOUT,
    );
}

#[test]
fn drain_closes_1001_which_carries_retry() {
    let mut s = T::welcomed("alice");
    let c = assert_close(&s.check(Check::Drain, 0, 0), CloseCode::GOING_AWAY);
    assert!(carries_retry(c.code));
    assert!(carries_retry(CloseCode::RATE_LIMITED) && carries_retry(CloseCode::OVERLOADED));
    assert!(!carries_retry(CloseCode::PROTOCOL_ERROR) && !carries_retry(CloseCode::KICKED));
}

#[test]
fn kick_closes_4005() {
    let mut s = T::welcomed("alice");
    assert_close(
        &s.run(Input::Kick(CloseReq::new(CloseCode::KICKED, "kicked"))),
        CloseCode::KICKED,
    );
}

#[test]
fn a_closing_session_does_nothing() {
    let mut s = T::welcomed("alice");
    s.st.phase = Phase::Closing;
    assert!(s.client(r#"{"t":"ping","id":1}"#).is_empty());
    assert!(
        s.run(Input::Kick(CloseReq::new(CloseCode::KICKED, "kicked")))
            .is_empty()
    );
}

// ---------------------------------------------------------------- after welcome

#[test]
fn pong_answering_a_ping_carries_its_id() {
    let mut s = T::welcomed("alice");
    let out = s.client(r#"{"t":"ping","id":77}"#);
    let p = reply(&out);
    assert_eq!((p.t, p.id), (Type::Pong, Some(77)));
    assert!(s.client(r#"{"t":"pong","id":3}"#).is_empty());
}

#[test]
fn sub_ok_only_once_the_subscription_is_live() {
    let mut s = T::welcomed("alice");
    let out = s.client(r#"{"t":"sub","id":5,"ch":"room:lobby"}"#);
    assert!(replies(&out).is_empty(), "no ok before live: {out:?}");
    assert!(
        matches!(&out[..], [Action::Subscribe { ch, ok: Some(Some(5)), .. }] if &**ch == "room:lobby")
    );
    // Live: now the position, which the ok carries.
    let out = s.run(Input::SubReady(Some(5)));
    assert!(replies(&out).is_empty(), "{out:?}");
    assert!(
        matches!(&out[..], [Action::History { ch, since: None, id: Some(5), .. }] if &**ch == "room:lobby"),
        "{out:?}"
    );
    let out = s.run(Input::History(Some(5), position("e-1", 3, Ok(vec![]))));
    assert_ok(&out, 5);
    let ok = reply(&out);
    assert_eq!(ok.seq, Some(3), "ok carries the stream's top");
    assert_eq!(ok.meta.as_deref(), Some(r#"{"epoch":"e-1"}"#));
    // Again: idempotent, ok at once.
    assert_ok(&s.client(r#"{"t":"sub","id":6,"ch":"room:lobby"}"#), 6);
    assert_eq!(s.st.subs.len(), 2);
}

#[test]
fn sub_refusals() {
    let mut s = T::welcomed("alice");
    assert_err(
        &s.client(r#"{"t":"sub","id":1,"ch":"user:bob"}"#),
        1,
        ErrCode::Forbidden,
    );
    assert_err(
        &s.client(r#"{"t":"sub","id":2,"ch":"svc:echo"}"#),
        2,
        ErrCode::Forbidden,
    );
    assert_err(
        &s.client(r#"{"t":"sub","id":3,"ch":"foo:x"}"#),
        3,
        ErrCode::BadChannel,
    );
    assert_err(
        &s.client(r#"{"t":"sub","id":4,"ch":"room:bad id"}"#),
        4,
        ErrCode::BadChannel,
    );
    assert_err(&s.client(r#"{"t":"sub","id":5}"#), 5, ErrCode::BadRequest);
    assert_eq!(s.st.subs.len(), 1);
}

#[test]
fn claims_policy_forbids_rooms_outside_the_token() {
    let mut s = jwt_welcomed(RoomPolicy::Claims, &["team-*"], UNIX / 1000 + 60);
    assert!(matches!(
        s.client(r#"{"t":"sub","id":1,"ch":"room:team-7"}"#)[..],
        [Action::Subscribe { .. }]
    ));
    assert_err(
        &s.client(r#"{"t":"sub","id":2,"ch":"room:other"}"#),
        2,
        ErrCode::Forbidden,
    );
    assert_err(
        &s.client(r#"{"t":"pub","id":3,"ch":"room:other","d":1}"#),
        3,
        ErrCode::Forbidden,
    );
    assert!(matches!(
        s.client(r#"{"t":"pub","id":4,"ch":"room:team-1","d":1}"#)[..],
        [Action::Publish(..)]
    ));
}

#[test]
fn too_many_subscriptions_is_too_large() {
    let mut s = T::welcomed("alice");
    s.cfg.max_subscriptions = 2;
    assert!(matches!(
        s.client(r#"{"t":"sub","id":1,"ch":"room:a"}"#)[..],
        [Action::Subscribe { .. }]
    ));
    assert_err(
        &s.client(r#"{"t":"sub","id":2,"ch":"room:b"}"#),
        2,
        ErrCode::TooLarge,
    );
    // One already held is not a new one.
    assert_ok(&s.client(r#"{"t":"sub","id":3,"ch":"room:a"}"#), 3);
}

#[test]
fn unsub_of_a_channel_not_subscribed_is_not_subscribed() {
    let mut s = T::welcomed("alice");
    s.client(r#"{"t":"sub","id":1,"ch":"room:a"}"#);
    let out = s.client(r#"{"t":"unsub","id":2,"ch":"room:a"}"#);
    assert!(matches!(&out[0], Action::Unsubscribe(ch) if &**ch == "room:a"));
    assert_ok(&out[1..], 2);
    assert_err(
        &s.client(r#"{"t":"unsub","id":3,"ch":"room:a"}"#),
        3,
        ErrCode::NotSubscribed,
    );
    assert_err(
        &s.client(r#"{"t":"unsub","id":4,"ch":"bogus"}"#),
        4,
        ErrCode::BadChannel,
    );
}

#[test]
fn pub_goes_to_the_backbone_and_its_answer_becomes_ok_or_err() {
    let mut s = T::welcomed("alice");
    let out = s.client(r#"{"t":"pub","id":8,"ch":"room:lobby","d":{"text":"hi"}}"#);
    match &out[..] {
        [
            Action::Publish(Pub {
                ch,
                from,
                id,
                payload,
                key,
                ephemeral: false,
            }),
        ] => {
            assert_eq!(
                key.as_deref(),
                Some("alice:n1-1-7:8"),
                "scoped to the connection"
            );
            assert_eq!(
                (ch.as_str(), &**from, *id),
                ("room:lobby", "alice", Some(8))
            );
            assert!(matches!(payload, Payload::Json(b) if &b[..] == br#"{"text":"hi"}"#));
        }
        _ => panic!("{out:?}"),
    }
    assert!(replies(&out).is_empty(), "ok waits for the backbone");
    assert_ok(&s.run(Input::Published(Some(8), Ok(None))), 8);
    let out = s.run(Input::Published(
        Some(8),
        Ok(Some(Stored {
            seq: 4,
            epoch: "e".into(),
            duplicate: false,
        })),
    ));
    assert_eq!(reply(&out).seq, Some(4));
    assert_eq!(reply(&out).meta, None);
    let out = s.run(Input::Published(
        Some(8),
        Ok(Some(Stored {
            seq: 4,
            epoch: "e".into(),
            duplicate: true,
        })),
    ));
    assert_eq!(
        (reply(&out).seq, reply(&out).meta.as_deref()),
        (Some(4), Some(r#"{"duplicate":true}"#))
    );
    assert_err(
        &s.run(Input::Published(Some(9), Err(Refused::UNAVAILABLE))),
        9,
        ErrCode::BackboneUnavailable,
    );
    assert_err(
        &s.run(Input::Published(Some(10), Err(Refused::OVERLOADED))),
        10,
        ErrCode::RateLimited,
    );
    // A direct message to another user is allowed.
    assert!(matches!(
        s.client(r#"{"t":"pub","id":11,"ch":"user:bob","d":1}"#)[..],
        [Action::Publish(..)]
    ));
}

/// The ids of the publishes in `out`.
fn published_ids(out: &[Action]) -> Vec<Option<u64>> {
    out.iter()
        .filter_map(|a| match a {
            Action::Publish(p) => Some(p.id),
            _ => None,
        })
        .collect()
}

#[test]
fn ordered_publishes_go_one_at_a_time_and_a_refusal_refuses_those_behind_it() {
    let mut s = T::welcomed("alice");
    s.cfg.ordered_publishes = true;
    let pub_ =
        |s: &mut T, id: u64| s.client(&format!(r#"{{"t":"pub","id":{id},"ch":"room:a","d":1}}"#));
    assert_eq!(
        published_ids(&pub_(&mut s, 1)),
        [Some(1)],
        "the first goes at once"
    );
    assert!(
        s.st.extra.is_none(),
        "one in flight, none waiting: nothing allocated"
    );
    for id in 2..=4 {
        let out = pub_(&mut s, id);
        assert!(out.is_empty(), "{id} waits behind 1: {out:?}");
    }
    assert!(
        s.st.extra.as_ref().is_some_and(|x| x.waiting.is_some()),
        "three wait"
    );
    // 1 stored: its ok, then 2 goes.
    let stored = |seq| {
        Ok(Some(Stored {
            seq,
            epoch: "e".into(),
            duplicate: false,
        }))
    };
    let out = s.run(Input::Published(Some(1), stored(10)));
    assert_eq!(
        replies(&out)
            .iter()
            .map(|e| (e.t, e.id))
            .collect::<Vec<_>>(),
        [(Type::Ok, Some(1))]
    );
    assert_eq!(published_ids(&out), [Some(2)]);
    // 2 refused: 3 and 4 are refused with it, in order, and never sent.
    let out = s.run(Input::Published(Some(2), Err(Refused::UNAVAILABLE)));
    assert!(published_ids(&out).is_empty(), "{out:?}");
    assert_eq!(
        replies(&out)
            .iter()
            .map(|e| (e.t, e.id, e.err_code()))
            .collect::<Vec<_>>(),
        [2, 3, 4].map(|id| (Type::Err, Some(id), Some(ErrCode::BackboneUnavailable)))
    );
    assert!(s.st.extra.is_none(), "nothing waits: no Extra kept");
    // What an idle client that names its instance keeps (Extra for life):
    // the publish queue costs it one pointer.
    assert_eq!(std::mem::size_of::<Extra>(), 56);
    // ...and every connection nothing: the in-flight flag sits in padding.
    assert_eq!(std::mem::size_of::<SessionState>(), 56);
    // The client sends them again: the first goes at once, the rest wait.
    assert_eq!(published_ids(&pub_(&mut s, 2)), [Some(2)]);
    assert!(pub_(&mut s, 3).is_empty());
    let out = s.run(Input::Published(Some(2), stored(11)));
    assert_eq!(published_ids(&out), [Some(3)]);
    assert_ok(&s.run(Input::Published(Some(3), stored(12))), 3);
    assert!(s.st.extra.is_none());
    // A bounded queue: one with the backbone, MAX_QUEUED_PUBLISHES behind it
    // (their size within outbound_queue_bytes)...
    assert_eq!(published_ids(&pub_(&mut s, 100)), [Some(100)]);
    for id in 0..MAX_QUEUED_PUBLISHES as u64 {
        assert!(pub_(&mut s, 101 + id).is_empty());
    }
    assert_err(&pub_(&mut s, 9999), 9999, ErrCode::RateLimited);
    // ...and once it drains, room again.
    let out = s.run(Input::Published(Some(100), stored(13)));
    assert_eq!(published_ids(&out), [Some(101)]);
    assert!(pub_(&mut s, 10_000).is_empty());
    // The bytes bound: a small outbound_queue_bytes fits two of these.
    let mut s = T::welcomed("carol");
    s.cfg.ordered_publishes = true;
    let big = |s: &mut T, id: u64| {
        let d = "x".repeat(400);
        s.client(&format!(
            r#"{{"t":"pub","id":{id},"ch":"room:a","d":"{d}"}}"#
        ))
    };
    s.cfg.outbound_queue_bytes = 1_200;
    assert_eq!(published_ids(&big(&mut s, 1)), [Some(1)]);
    assert!(big(&mut s, 2).is_empty());
    assert!(big(&mut s, 3).is_empty());
    assert_err(&big(&mut s, 4), 4, ErrCode::RateLimited);
    // Without the setting (embedded, NATS without history) nothing waits.
    let mut s = T::welcomed("bob");
    assert_eq!(published_ids(&pub_(&mut s, 1)), [Some(1)]);
    assert_eq!(published_ids(&pub_(&mut s, 2)), [Some(2)]);
}

#[test]
fn binary_payload_from_a_json_client_is_kept_binary() {
    let mut s = T::welcomed("alice");
    let out = s.client(r#"{"t":"pub","id":1,"ch":"room:a","db":"AAEC"}"#);
    assert!(
        matches!(&out[..], [Action::Publish(Pub { payload: Payload::Binary(b), .. })] if b[..] == [0, 1, 2]),
        "{out:?}"
    );
}

#[test]
fn pub_refusals() {
    let mut s = T::welcomed("alice");
    assert_err(
        &s.client(r#"{"t":"pub","id":1,"ch":"svc:echo","d":1}"#),
        1,
        ErrCode::BadRequest,
    );
    assert_err(
        &s.client(r#"{"t":"pub","id":2,"ch":"foo:x","d":1}"#),
        2,
        ErrCode::BadChannel,
    );
    assert_err(
        &s.client(r#"{"t":"pub","id":3,"d":1}"#),
        3,
        ErrCode::BadRequest,
    );
}

#[test]
fn req_goes_to_a_service_and_its_answer_becomes_reply_or_err() {
    let mut s = T::welcomed("alice");
    let out = s.client(r#"{"t":"req","id":4,"ch":"svc:echo","d":"x"}"#);
    assert!(
        matches!(&out[..], [Action::Request { service, id: Some(4), .. }] if service == "echo"),
        "{out:?}"
    );
    let out = s.run(Input::Reply(Some(4), Ok(Payload::Json("\"x\"".into()))));
    let r = reply(&out);
    assert_eq!((r.t, r.id), (Type::Reply, Some(4)));
    for (id, code) in [
        (5, ErrCode::NoService),
        (6, ErrCode::Timeout),
        (7, ErrCode::BackboneUnavailable),
        (8, ErrCode::Internal),
    ] {
        assert_err(&s.run(Input::Reply(Some(id), Err(code))), id, code);
    }
    assert_err(
        &s.client(r#"{"t":"req","id":9,"ch":"room:a","d":1}"#),
        9,
        ErrCode::BadChannel,
    );
}

#[test]
fn server_only_types_from_a_client_close_4000() {
    for t in ["welcome", "ok", "err", "msg", "reply", "bye"] {
        let mut s = T::welcomed("alice");
        let out = s.client(&format!(r#"{{"t":"{t}","id":1}}"#));
        assert_close(&out, CloseCode::PROTOCOL_ERROR);
    }
}

#[test]
fn rate_limited_answer_names_its_code() {
    let e = rate_limited(Some(3));
    assert_eq!(
        (e.t, e.id, e.err_code()),
        (Type::Err, Some(3), Some(ErrCode::RateLimited))
    );
}

#[test]
fn every_err_code_is_produced_by_some_input() {
    // One input per code, gathered: a code added to the protocol without a
    // way for the session to produce it fails here.
    let mut seen = std::collections::HashSet::new();
    let mut note = |out: Vec<Action>| {
        for e in replies(&out) {
            if let Some(c) = e.err_code() {
                seen.insert(c.number());
            }
        }
    };
    let mut s = T::welcomed("alice");
    note(s.client(r#"{"t":"pub","id":1}"#)); // bad_request
    note(s.client(r#"{"t":"sub","id":1,"ch":"room:x"}"#));
    note(s.client(r#"{"t":"sub","id":1,"ch":"user:bob"}"#)); // forbidden
    note(s.client(r#"{"t":"sub","id":1,"ch":"nope:x"}"#)); // bad_channel
    note(s.run(Input::Reply(Some(1), Err(ErrCode::NoService)))); // no_service
    note(s.run(Input::Reply(Some(1), Err(ErrCode::Timeout)))); // timeout
    note(s.run(Input::Published(Some(1), Err(Refused::OVERLOADED)))); // rate_limited
    s.cfg.max_subscriptions = 1;
    note(s.client(r#"{"t":"sub","id":1,"ch":"room:y"}"#)); // too_large
    note(s.client(r#"{"t":"unsub","id":1,"ch":"room:z"}"#)); // not_subscribed
    note(s.run(Input::Published(Some(1), Err(Refused::UNAVAILABLE)))); // backbone_unavailable
    note(s.run(Input::Reply(Some(1), Err(ErrCode::Internal)))); // internal
    let mut j = jwt_welcomed(RoomPolicy::Open, &[], UNIX / 1000 + 60);
    note(j.client(r#"{"t":"hello","id":1,"meta":{"token":"x"}}"#)); // unauthorized
    let all: std::collections::HashSet<u32> = ErrCode::ALL.iter().map(|c| c.number()).collect();
    let missing: Vec<_> = all.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "err codes no input produced: {missing:?}"
    );
}

// ---------------------------------------------------------------- positions and recovery (§7)

fn position(
    epoch: &str,
    top: u64,
    replay: Result<Vec<std::sync::Arc<Envelope>>, Unrecovered>,
) -> Recovery {
    Recovery {
        pos: Position {
            epoch: std::sync::Arc::from(epoch),
            top,
        },
        replay,
        contiguous: true,
        present: None,
    }
}

fn m(seq: u64) -> std::sync::Arc<Envelope> {
    let mut e = Envelope::new(Type::Msg);
    e.ch = Some("room:r".into());
    e.seq = Some(seq);
    std::sync::Arc::new(e)
}

fn delivered(out: &[Action]) -> Vec<u64> {
    out.iter()
        .filter_map(|a| match a {
            Action::Deliver(l) => Some(l.iter().filter_map(|e| e.seq).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn recovery_replays_then_live_each_seq_once_in_order() {
    let mut s = T::welcomed("alice");
    let out =
        s.client(r#"{"t":"sub","id":2,"ch":"room:r","meta":{"since":{"seq":3,"epoch":"e-1"}}}"#);
    assert!(matches!(&out[..], [Action::Subscribe { .. }]), "{out:?}");
    let out = s.run(Input::SubReady(Some(2)));
    assert!(
        matches!(
            &out[..],
            [Action::History {
                since: Some(Since { seq: 3, .. }),
                ..
            }]
        ),
        "{out:?}"
    );
    // Live messages arrive while the replay is fetched: 5 and 6 are also
    // in the replay (duplicates), 7 and 8 are new.
    for seq in [5, 6, 7, 8] {
        assert_eq!(s.st.hold(&m(seq), 100), Ok(true));
    }
    let out = s.run(Input::History(
        Some(2),
        position("e-1", 6, Ok(vec![m(4), m(5), m(6)])),
    ));
    let ok = reply(&out);
    assert_eq!((ok.t, ok.seq), (Type::Ok, Some(6)));
    assert_eq!(
        ok.meta.as_deref(),
        Some(r#"{"epoch":"e-1","recovered":true}"#)
    );
    assert_eq!(delivered(&out), vec![4, 5, 6, 7, 8]);
    assert!(
        matches!(out[0], Action::Reply(_)),
        "ok first, then the replay"
    );
    // Live from now on: nothing held any more.
    assert_eq!(s.st.hold(&m(9), 100), Ok(false));
    assert_eq!(s.metrics.recoveries[0].load(Relaxed), 1);
}

#[test]
fn recovery_refusals_say_why_and_replay_nothing() {
    for (why, meta) in [
        (
            Unrecovered::EpochChanged,
            r#"{"epoch":"e-2","recovered":false,"reason":"epoch_changed"}"#,
        ),
        (
            Unrecovered::Expired { oldest: 40 },
            r#"{"epoch":"e-2","oldest":40,"reason":"expired","recovered":false}"#,
        ),
        (
            Unrecovered::TooMany,
            r#"{"epoch":"e-2","reason":"too_many","recovered":false}"#,
        ),
    ] {
        let mut s = T::welcomed("alice");
        s.client(r#"{"t":"sub","id":2,"ch":"room:r","meta":{"since":{"seq":3}}}"#);
        s.run(Input::SubReady(Some(2)));
        assert_eq!(s.st.hold(&m(51), 100), Ok(true));
        let out = s.run(Input::History(Some(2), position("e-2", 50, Err(why))));
        let ok = reply(&out);
        let got: serde_json::Value =
            serde_json::from_str(ok.meta.as_deref().unwrap_or("")).unwrap_or_default();
        let want: serde_json::Value = serde_json::from_str(meta).unwrap_or_default();
        assert_eq!(got, want);
        assert_eq!(
            delivered(&out),
            vec![51],
            "live messages after top still come"
        );
        assert_eq!(recoveries_counted(&s), 1);
    }
}

#[test]
fn asking_for_the_position_only_is_not_counted_as_a_failed_recovery() {
    let mut s = T::welcomed("alice");
    s.client(r#"{"t":"sub","id":2,"ch":"room:r","meta":{"since":{"seq":0,"epoch":""}}}"#);
    s.run(Input::SubReady(Some(2)));
    let out = s.run(Input::History(
        Some(2),
        position("e-2", 50, Err(Unrecovered::EpochChanged)),
    ));
    let ok = reply(&out);
    assert_eq!((ok.t, ok.seq), (Type::Ok, Some(50)));
    assert!(ok.meta.as_deref().unwrap_or("").contains("epoch_changed"));
    assert_eq!(recoveries_counted(&s), 0);
}

/// Recoveries counted in the metrics, every outcome.
fn recoveries_counted(s: &T) -> u64 {
    s.metrics.recoveries.iter().map(|c| c.load(Relaxed)).sum()
}

#[test]
fn history_off_is_recovered_false_unavailable() {
    let mut s = T::welcomed("alice");
    s.client(r#"{"t":"sub","id":2,"ch":"room:r","meta":{"since":{"seq":3}}}"#);
    s.run(Input::SubReady(Some(2)));
    let out = s.run(Input::History(
        Some(2),
        Recovery::unavailable(Some(&Since {
            seq: 3,
            epoch: None,
        })),
    ));
    let ok = reply(&out);
    assert_eq!(ok.seq, None, "no stream, no top");
    assert_eq!(
        ok.meta.as_deref(),
        Some(r#"{"reason":"unavailable","recovered":false}"#)
    );
}

#[test]
fn a_gap_between_replay_and_live_closes_4009() {
    let mut s = T::welcomed("alice");
    s.client(r#"{"t":"sub","id":2,"ch":"room:r"}"#);
    s.run(Input::SubReady(Some(2)));
    assert_eq!(s.st.hold(&m(9), 100), Ok(true));
    let out = s.run(Input::History(Some(2), position("e", 6, Ok(vec![]))));
    assert_close(&out, CloseCode::INSUFFICIENT_STATE);
    assert_eq!(
        merge(6, vec![], vec![m(5), m(7), m(8)], true).map(|l| l.len()),
        Ok(2)
    );
}

#[test]
fn stream_wide_seqs_merge_without_a_contiguity_check() {
    // JetStream: seqs of one channel skip (other channels share the
    // stream); the backbone fills gaps, the merge only drops what the
    // replay holds.
    assert_eq!(
        merge(6, vec![m(4), m(6)], vec![m(5), m(6), m(9), m(12)], false)
            .map(|l| l.iter().filter_map(|e| e.seq).collect::<Vec<_>>()),
        Ok(vec![4, 6, 9, 12])
    );
    let mut s = T::welcomed("alice");
    s.client(r#"{"t":"sub","id":2,"ch":"room:r"}"#);
    s.run(Input::SubReady(Some(2)));
    assert_eq!(s.st.hold(&m(9), 100), Ok(true));
    let mut r = position("e", 6, Ok(vec![]));
    r.contiguous = false;
    let out = s.run(Input::History(Some(2), r));
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Deliver(l) if l.len() == 1)),
        "{out:?}"
    );
}

#[test]
fn a_gap_the_backbone_cannot_fill_closes_4009() {
    let mut s = T::welcomed("alice");
    s.client(r#"{"t":"sub","id":2,"ch":"room:r"}"#);
    let out = s.run(Input::Gap);
    assert_close(&out, CloseCode::INSUFFICIENT_STATE);
}

#[test]
fn a_full_hold_is_reported() {
    let mut s = T::welcomed("alice");
    s.client(r#"{"t":"sub","id":2,"ch":"room:r"}"#);
    assert_eq!(s.st.hold(&m(1), 2), Ok(true));
    assert_eq!(s.st.hold(&m(2), 2), Ok(true));
    assert_eq!(s.st.hold(&m(3), 2), Err(HoldFull));
}

#[test]
fn unsub_during_recovery_forgets_it() {
    let mut s = T::welcomed("alice");
    s.client(r#"{"t":"sub","id":2,"ch":"room:r"}"#);
    s.client(r#"{"t":"unsub","id":3,"ch":"room:r"}"#);
    assert_eq!(s.st.hold(&m(1), 10), Ok(false));
    assert!(
        s.run(Input::History(Some(2), position("e", 1, Ok(vec![]))))
            .is_empty()
    );
}

#[test]
fn bad_since_is_bad_request() {
    let mut s = T::welcomed("alice");
    assert_err(
        &s.client(r#"{"t":"sub","id":2,"ch":"room:r","meta":{"since":{"seq":"x"}}}"#),
        2,
        ErrCode::BadRequest,
    );
}

#[test]
fn instance_scopes_publish_ids_and_must_be_valid() {
    let mut s = T::open();
    let out = s.client(r#"{"t":"hello","id":1,"meta":{"user":"alice","instance":"tab-1"}}"#);
    assert!(welcome(&out).is_some());
    let out = s.client(r#"{"t":"pub","id":9,"ch":"room:a","d":1}"#);
    assert!(
        matches!(&out[..], [Action::Publish(Pub { key: Some(k), .. })] if k == "alice:tab-1:9"),
        "{out:?}"
    );
    for bad in ["has space", "", &"x".repeat(65)] {
        let mut s = T::open();
        let out = s.client(&format!(
            r#"{{"t":"hello","id":1,"meta":{{"user":"alice","instance":"{bad}"}}}}"#
        ));
        assert_close(&out, CloseCode::PROTOCOL_ERROR);
    }
}

#[test]
fn hello_since_recovers_the_own_stream_before_welcome() {
    let mut s = T::open();
    let out =
        s.client(r#"{"t":"hello","id":1,"meta":{"user":"bob","since":{"seq":2,"epoch":"e-9"}}}"#);
    assert!(
        welcome(&out).is_none(),
        "welcome waits for the stream: {out:?}"
    );
    assert!(
        matches!(&out[..], [.., Action::Subscribe { ch, ok: Some(Some(1)), .. }] if &**ch == "user:bob"),
        "{out:?}"
    );
    let out = s.run(Input::SubReady(Some(1)));
    assert!(
        matches!(&out[..], [Action::History { since: Some(_), .. }]),
        "{out:?}"
    );
    let out = s.run(Input::History(
        Some(1),
        position("e-9", 4, Ok(vec![m(3), m(4)])),
    ));
    let w = welcome(&out).unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(
        w["stream"],
        serde_json::json!({"epoch": "e-9", "seq": 4, "recovered": true})
    );
    assert_eq!(
        delivered(&out),
        vec![3, 4],
        "missed direct messages follow welcome"
    );
}

#[test]
fn welcome_waits_for_the_own_channel_where_the_backbone_needs_a_round_trip() {
    let mut s = T::open();
    s.cfg.welcome_after_live = true;
    let out = s.client(r#"{"t":"hello","id":1,"meta":{"user":"alice"}}"#);
    assert!(
        out.iter().any(
            |a| matches!(a, Action::Subscribe { ch, ok: Some(Some(1)), .. } if &**ch == "user:alice")
        ),
        "{out:?}"
    );
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Reply(e) if e.t == Type::Welcome)),
        "no welcome before the channel is live: {out:?}"
    );
    // A direct message arriving meanwhile is held, and follows the welcome.
    let mut dm = Envelope::new(Type::Msg);
    dm.ch = Some("user:alice".into());
    assert_eq!(s.st.hold(&std::sync::Arc::new(dm), 100), Ok(true));
    let out = s.run(Input::SubReady(Some(1)));
    let kinds: Vec<&str> = out
        .iter()
        .map(|a| match a {
            Action::Reply(e) if e.t == Type::Welcome => "welcome",
            Action::Deliver(l) if l.len() == 1 => "held",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["welcome", "held"]);
    assert!(s.st.extra.is_none(), "an idle session keeps no Extra");
}

// ---------------------------------------------------------------- chat features (§8)

/// The reply's `d`, parsed.
fn reply_d(out: &[Action]) -> serde_json::Value {
    let r = reply(out);
    assert_eq!(r.t, Type::Reply, "{out:?}");
    assert!(r.payload.is_json(), "{r:?}");
    serde_json::from_slice(r.payload.bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn meta_of(e: &Envelope) -> serde_json::Value {
    serde_json::from_str(e.meta.as_deref().unwrap_or("{}")).unwrap_or_default()
}

#[test]
fn every_welcome_carries_the_own_streams_position_without_a_recovery() {
    // History on: the welcome waits for the position of user:alice.
    let mut s = T::open();
    s.cfg.positions = true;
    let out = s.client(r#"{"t":"hello","id":1,"meta":{"user":"alice"}}"#);
    assert!(welcome(&out).is_none(), "waits for the position: {out:?}");
    let out = s.run(Input::SubReady(Some(1)));
    assert!(
        matches!(&out[..], [Action::History { ch, since: None, id: Some(1), presence: false }] if &**ch == "user:alice"),
        "{out:?}"
    );
    let out = s.run(Input::History(Some(1), position("e1", 7, Ok(vec![]))));
    let w = welcome(&out).unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(w["stream"], serde_json::json!({"epoch": "e1", "seq": 7}));
    let counted: u64 = s.metrics.recoveries.iter().map(|c| c.load(Relaxed)).sum();
    assert_eq!(counted, 0, "a hello without since is no recovery");
    assert!(s.st.extra.is_none(), "an idle session keeps no Extra");
    // History off: known at once.
    let mut s = T::open();
    let out = s.client(r#"{"t":"hello","id":1,"meta":{"user":"alice"}}"#);
    assert_eq!(
        welcome(&out).unwrap_or_default()["stream"],
        serde_json::json!({"epoch": "", "seq": 0})
    );
    // With since: the outcome too, counted.
    let mut s = T::open();
    s.cfg.positions = true;
    s.client(r#"{"t":"hello","id":1,"meta":{"user":"alice","since":{"seq":3,"epoch":"old"}}}"#);
    let out = s.run(Input::SubReady(Some(1)));
    assert!(matches!(&out[..], [Action::History { since: Some(_), .. }]));
    let out = s.run(Input::History(
        Some(1),
        position("e1", 7, Err(Unrecovered::EpochChanged)),
    ));
    assert_eq!(
        welcome(&out).unwrap_or_default()["stream"],
        serde_json::json!({"epoch": "e1", "seq": 7, "recovered": false, "reason": "epoch_changed"})
    );
    assert_eq!(s.metrics.recoveries[1].load(Relaxed), 1);
}

#[test]
fn ephemeral_pubs_are_never_stored_nor_queued_behind_the_stream() {
    let mut s = T::welcomed("alice");
    s.cfg.ordered_publishes = true;
    let out = s.client(r#"{"t":"pub","id":1,"ch":"room:a","d":1}"#);
    assert!(matches!(&out[..], [Action::Publish(p)] if !p.ephemeral && p.key.is_some()));
    // The stored one is with the backbone: an ephemeral one does not wait.
    let out = s.client(
        r#"{"t":"pub","id":2,"ch":"room:a","d":{"typing":true},"meta":{"ephemeral":true}}"#,
    );
    assert!(
        matches!(&out[..], [Action::Publish(p)] if p.ephemeral && p.key.is_none() && p.id == Some(2)),
        "{out:?}"
    );
    let out = s.run(Input::Sent(Some(2), Ok(())));
    let ok = reply(&out);
    assert_eq!((ok.t, ok.id, ok.seq), (Type::Ok, Some(2), None));
    // Its answer leaves the stored one's turn alone.
    let out = s.client(r#"{"t":"pub","id":3,"ch":"room:a","d":1}"#);
    assert!(out.is_empty(), "queued behind id 1: {out:?}");
    let out = s.run(Input::Sent(Some(4), Err(Refused::UNAVAILABLE)));
    assert_err(&out, 4, ErrCode::BackboneUnavailable);
    // Bad input.
    let out = s.client(r#"{"t":"pub","id":5,"ch":"room:a","d":1,"meta":{"ephemeral":"yes"}}"#);
    assert_err(&out, 5, ErrCode::BadRequest);
    let out = s.client(r#"{"t":"pub","id":6,"ch":"svc:echo","d":1,"meta":{"ephemeral":true}}"#);
    assert_err(&out, 6, ErrCode::BadRequest);
    let out = s.client(r#"{"t":"pub","id":7,"ch":"room:a","d":1,"meta":{"ephemeral":false}}"#);
    assert!(matches!(&out[..], [] | [Action::Publish(_)]), "{out:?}");
}

#[test]
fn a_presence_sub_gets_the_count_in_its_ok_then_members() {
    let mut s = T::welcomed("alice");
    let out = s.client(r#"{"t":"sub","id":5,"ch":"room:a","meta":{"presence":true}}"#);
    assert!(
        matches!(&out[..], [Action::Subscribe { ch, ok: Some(Some(5)), presence: true }] if &**ch == "room:a"),
        "{out:?}"
    );
    let out = s.run(Input::SubReady(Some(5)));
    assert!(
        matches!(&out[..], [Action::History { presence: true, .. }]),
        "{out:?}"
    );
    let mut r = position("e", 2, Ok(vec![]));
    r.present = Some(3);
    let out = s.run(Input::History(Some(5), r));
    let ok = replies(&out)[0].clone();
    assert_eq!(
        meta_of(&ok),
        serde_json::json!({"epoch": "e", "present": 3})
    );
    assert!(
        matches!(out.last(), Some(Action::Watch(ch)) if &**ch == "room:a"),
        "members only after the ok: {out:?}"
    );
    // A plain sub asks no count.
    let out = s.client(r#"{"t":"sub","id":6,"ch":"room:b"}"#);
    assert!(matches!(
        &out[..],
        [Action::Subscribe {
            presence: false,
            ..
        }]
    ));
    // Refusals.
    let out = s.client(r#"{"t":"sub","id":7,"ch":"user:alice","meta":{"presence":true}}"#);
    assert_err(&out, 7, ErrCode::BadRequest);
    let out = s.client(r#"{"t":"sub","id":8,"ch":"room:c","meta":{"presence":1}}"#);
    assert_err(&out, 8, ErrCode::BadRequest);
    s.cfg.presence = false;
    let out = s.client(r#"{"t":"sub","id":9,"ch":"room:d","meta":{"presence":true}}"#);
    assert_err(&out, 9, ErrCode::BadRequest);
    assert!(
        !s.st.subs.iter().any(|c| &**c == "room:d"),
        "nothing changed"
    );
}

#[test]
fn presence_queries_are_checked_then_asked() {
    let mut s = T::welcomed("alice");
    let out = s.client(r#"{"t":"presence","id":1,"ch":"room:a"}"#);
    assert!(
        matches!(&out[..], [Action::PresenceQuery { ch, limit: 100, after: None, id: Some(1) }] if ch == "room:a"),
        "{out:?}"
    );
    let out =
        s.client(r#"{"t":"presence","id":2,"ch":"room:a","meta":{"limit":1000,"after":"bob"}}"#);
    assert!(
        matches!(&out[..], [Action::PresenceQuery { limit: 1000, after: Some(a), .. }] if a == "bob"),
        "{out:?}"
    );
    let out = s.client(r#"{"t":"presence","id":3,"ch":"user:zed"}"#);
    assert!(
        matches!(&out[..], [Action::PresenceQuery { .. }]),
        "anyone's user channel"
    );
    for (i, meta) in [
        r#"{"limit":0}"#,
        r#"{"limit":-1}"#,
        r#"{"limit":1001}"#,
        r#"{"limit":1.5}"#,
        r#"{"limit":"5"}"#,
        r#"{"after":5}"#,
        r#"{"after":null}"#,
    ]
    .iter()
    .enumerate()
    {
        let id = 10 + i as u64;
        let out = s.client(&format!(
            r#"{{"t":"presence","id":{id},"ch":"room:a","meta":{meta}}}"#
        ));
        assert_err(&out, id, ErrCode::BadRequest);
    }
    let out = s.client(r#"{"t":"presence","id":20,"ch":"svc:echo"}"#);
    assert_err(&out, 20, ErrCode::BadChannel);
    let out = s.client(r#"{"t":"presence","id":21,"ch":"foo:x"}"#);
    assert_err(&out, 21, ErrCode::BadChannel);
    let out = s.client(r#"{"t":"presence","id":22}"#);
    assert_err(&out, 22, ErrCode::BadRequest);
    // The answer.
    let page = PresencePage {
        total: 3,
        users: vec!["a".into(), "b".into()],
        next: Some("b".into()),
    };
    let out = s.run(Input::Presence(Some(1), Ok(page)));
    assert_eq!(
        reply_d(&out),
        serde_json::json!({"total": 3, "users": ["a", "b"], "next": "b"})
    );
    let out = s.run(Input::Presence(Some(2), Err(Refused::UNAVAILABLE)));
    assert_err(&out, 2, ErrCode::BackboneUnavailable);
    // Rooms the token does not grant.
    let mut j = jwt_welcomed(RoomPolicy::Claims, &["a"], UNIX / 1000 + 60);
    let out = j.client(r#"{"t":"presence","id":1,"ch":"room:b"}"#);
    assert_err(&out, 1, ErrCode::Forbidden);
    let out = j.client(r#"{"t":"presence","id":2,"ch":"room:a"}"#);
    assert!(matches!(&out[..], [Action::PresenceQuery { .. }]));
    s.cfg.presence = false;
    let out = s.client(r#"{"t":"presence","id":30,"ch":"room:a"}"#);
    assert_err(&out, 30, ErrCode::BadRequest);
}

#[test]
fn history_pages_are_checked_then_asked() {
    let mut s = T::welcomed("alice");
    s.cfg.positions = true;
    let out = s.client(r#"{"t":"history","id":1,"ch":"room:a"}"#);
    assert!(
        matches!(&out[..], [Action::HistoryPage { ch, limit: 50, before: None, id: Some(1) }] if ch == "room:a"),
        "{out:?}"
    );
    let out =
        s.client(r#"{"t":"history","id":2,"ch":"user:alice","meta":{"limit":200,"before":9}}"#);
    assert!(matches!(
        &out[..],
        [Action::HistoryPage {
            limit: 200,
            before: Some(9),
            ..
        }]
    ));
    for (i, meta) in [
        r#"{"limit":0}"#,
        r#"{"limit":-3}"#,
        r#"{"limit":201}"#,
        r#"{"limit":2.5}"#,
        r#"{"limit":true}"#,
        r#"{"before":-1}"#,
        r#"{"before":"5"}"#,
        r#"{"before":1.5}"#,
        r#"{"before":18446744073709551616}"#,
    ]
    .iter()
    .enumerate()
    {
        let id = 10 + i as u64;
        let out = s.client(&format!(
            r#"{{"t":"history","id":{id},"ch":"room:a","meta":{meta}}}"#
        ));
        assert_err(&out, id, ErrCode::BadRequest);
    }
    let out = s.client(r#"{"t":"history","id":20,"ch":"user:bob"}"#);
    assert_err(&out, 20, ErrCode::Forbidden);
    let out = s.client(r#"{"t":"history","id":21,"ch":"svc:echo"}"#);
    assert_err(&out, 21, ErrCode::BadChannel);
    // The answer: JSON payloads raw, others as db, oldest first.
    let m = |seq: u64, payload: Payload| {
        let mut e = Envelope::new(Type::Msg);
        e.ch = Some("room:a".into());
        e.seq = Some(seq);
        e.from = Some("bob".into());
        e.payload = payload;
        std::sync::Arc::new(e)
    };
    let page = Page {
        epoch: std::sync::Arc::from("e"),
        top: 9,
        messages: vec![
            m(
                4,
                Payload::Json(bytes::Bytes::from_static(br#"{"t":"hi"}"#)),
            ),
            m(5, Payload::Binary(bytes::Bytes::from_static(b"\x00\xff"))),
        ],
        more: true,
        unavailable: false,
    };
    let out = s.run(Input::Page(Some(1), Ok(page)));
    assert_eq!(
        reply_d(&out),
        serde_json::json!({"epoch": "e", "top": 9, "more": true, "messages": [
            {"seq": 4, "from": "bob", "d": {"t": "hi"}},
            {"seq": 5, "from": "bob", "db": "AP8="},
        ]})
    );
    // History off: the reply says so, nothing is asked.
    s.cfg.positions = false;
    let out = s.client(r#"{"t":"history","id":30,"ch":"room:a"}"#);
    assert_eq!(
        reply_d(&out),
        serde_json::json!({"epoch": "", "top": 0, "messages": [], "more": false, "reason": "unavailable"})
    );
}

#[test]
fn members_from_a_client_is_a_protocol_error() {
    let mut s = T::welcomed("alice");
    let out = s.client(r#"{"t":"members","ch":"room:a","meta":{"present":1}}"#);
    assert_close(&out, CloseCode::PROTOCOL_ERROR);
}

// ---- hooks (docs/api.md, "Hooks") ----

fn with_hooks(t: &mut T, connect: bool, subscribe: bool, publish: bool, allow_on_error: bool) {
    let name = |on: bool| on.then(|| std::sync::Arc::from("svc1"));
    t.cfg.hooks = crate::settings::HookSettings {
        services: [name(connect), name(subscribe), name(publish)],
        allow_on_error,
        timeout_ms: 500,
        cache_ms: 0,
    };
}

/// The ask in `out`: (hook, ticket, body as JSON).
fn asked(out: &[Action]) -> (hooks::Hook, u64, serde_json::Value) {
    out.iter()
        .find_map(|a| match a {
            Action::Ask {
                hook, ticket, body, ..
            } => Some((
                *hook,
                *ticket,
                serde_json::from_slice(body).unwrap_or_default(),
            )),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no ask in {out:?}"))
}

fn answer(s: &str) -> Result<Payload, ErrCode> {
    Ok(Payload::Json(bytes::Bytes::from(s.to_owned())))
}

fn published(out: &[Action]) -> Vec<&Pub> {
    out.iter()
        .filter_map(|a| match a {
            Action::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

#[test]
fn no_hook_configured_asks_nothing_and_waits_for_nothing() {
    let mut s = T::welcomed("alice");
    let out = s.client(r#"{"t":"sub","id":2,"ch":"room:a"}"#);
    assert!(out.iter().all(|a| !matches!(a, Action::Ask { .. })));
    assert!(out.iter().any(|a| matches!(a, Action::Subscribe { .. })));
    let out = s.client(r#"{"t":"pub","id":3,"ch":"room:a","d":1}"#);
    assert_eq!(published(&out).len(), 1);
    // SessionState is what an idle connection pays: unchanged by hooks
    // (56 bytes: the user id and the subscription list hold thin names).
    assert_eq!(std::mem::size_of::<SessionState>(), 56);
}

#[test]
fn connect_hook_holds_the_welcome() {
    for (answer_text, want) in [
        (r#"{"allow":true}"#, None),
        (
            r#"{"allow":false,"code":4005,"reason":"banned"}"#,
            Some(CloseCode::KICKED),
        ),
        (r#"{"allow":false}"#, Some(CloseCode::UNAUTHORIZED)),
    ] {
        let mut s = T::open();
        with_hooks(&mut s, true, false, false, false);
        let out = s.client(
            r#"{"t":"hello","id":1,"meta":{"user":"bob","client":"web/1","instance":"tab1"}}"#,
        );
        assert!(welcome(&out).is_none(), "waits for the hook: {out:?}");
        let (hook, _, body) = asked(&out);
        assert_eq!(hook, hooks::Hook::Connect);
        assert_eq!(body["user"], "bob");
        assert_eq!(body["client"], "web/1");
        assert_eq!(body["instance"], "tab1");
        assert_eq!(body["conn"], "n1-1-7");
        // Anything but ping before welcome is still a protocol error.
        let again = s.client(r#"{"t":"hello","id":2,"meta":{"user":"bob"}}"#);
        assert_close(&again, CloseCode::PROTOCOL_ERROR);
        let mut s2 = T::open();
        with_hooks(&mut s2, true, false, false, false);
        let out = s2.client(r#"{"t":"hello","id":1,"meta":{"user":"bob"}}"#);
        let (_, ticket2, _) = asked(&out);
        let out = s2.run(Input::Answer(Some(ticket2), answer(answer_text)));
        match want {
            None => assert!(welcome(&out).is_some(), "{out:?}"),
            Some(code) => {
                let c = assert_close(&out, code);
                if code == CloseCode::KICKED {
                    assert_eq!(c.reason, "banned");
                }
            }
        }
    }
}

#[test]
fn connect_hook_failure_follows_on_error() {
    for allow in [false, true] {
        let mut s = T::open();
        with_hooks(&mut s, true, false, false, allow);
        let out = s.client(r#"{"t":"hello","id":1,"meta":{"user":"bob"}}"#);
        let (_, t, _) = asked(&out);
        let out = s.run(Input::Answer(Some(t), Err(ErrCode::Timeout)));
        if allow {
            assert!(welcome(&out).is_some(), "{out:?}");
        } else {
            assert_close(&out, CloseCode::OVERLOADED);
        }
    }
    assert!(
        carries_retry(CloseCode::OVERLOADED),
        "4007 carries retry_ms"
    );
}

#[test]
fn subscribe_hook_allows_refuses_and_fails() {
    let mut s = T::welcomed("alice");
    with_hooks(&mut s, false, true, false, false);
    let out = s.client(r#"{"t":"sub","id":2,"ch":"room:a"}"#);
    let (hook, t, body) = asked(&out);
    assert_eq!(
        (hook, body["ch"].as_str()),
        (hooks::Hook::Subscribe, Some("room:a"))
    );
    assert!(!out.iter().any(|a| matches!(a, Action::Subscribe { .. })));
    let out = s.run(Input::Answer(Some(t), answer(r#"{"allow":true}"#)));
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::CacheAllow(c) if &**c == "room:a"))
    );
    assert!(out.iter().any(|a| matches!(a, Action::Subscribe { .. })));
    // user: channels are not asked.
    let out = s.client(r#"{"t":"sub","id":3,"ch":"user:alice"}"#);
    assert!(!out.iter().any(|a| matches!(a, Action::Ask { .. })));
    let out = s.client(r#"{"t":"sub","id":4,"ch":"room:b"}"#);
    let (_, t, _) = asked(&out);
    let out = s.run(Input::Answer(
        Some(t),
        answer(r#"{"allow":false,"reason":"not a member"}"#),
    ));
    assert_err(&out, 4, ErrCode::Forbidden);
    assert_eq!(reply(&out).reason.as_deref(), Some("not a member"));
    let out = s.client(r#"{"t":"sub","id":5,"ch":"room:c"}"#);
    let (_, t, _) = asked(&out);
    let out = s.run(Input::Answer(Some(t), Err(ErrCode::Timeout)));
    assert_err(&out, 5, ErrCode::Timeout);
    assert_eq!(s.metrics.hooks[1][2].load(Relaxed), 1, "allowed");
    assert_eq!(s.metrics.hooks[1][3].load(Relaxed), 1, "refused");
    assert_eq!(s.metrics.hooks[1][4].load(Relaxed), 1, "timed out");
    // Nothing waits any more: no hook state kept.
    assert!(s.st.hooks().is_none());
}

#[test]
fn publish_hook_replaces_the_payload_and_keeps_the_order() {
    let mut s = T::welcomed("alice");
    with_hooks(&mut s, false, false, true, false);
    let t1 = asked(&s.client(r#"{"t":"pub","id":1,"ch":"room:a","d":"one"}"#));
    assert_eq!(t1.2["d"], "one");
    assert_eq!(t1.2["ephemeral"], false);
    let t2 = asked(&s.client(r#"{"t":"pub","id":2,"ch":"room:a","db":"AAE="}"#));
    assert_eq!(t2.2["db"], "AAE=");
    let t3 = asked(&s.client(r#"{"t":"pub","id":3,"ch":"room:a","d":"three"}"#));
    // The second's answer first: it waits behind the first.
    let out = s.run(Input::Answer(Some(t2.1), answer(r#"{"allow":true}"#)));
    assert!(published(&out).is_empty(), "{out:?}");
    let out = s.run(Input::Answer(
        Some(t3.1),
        answer(r#"{"allow":false,"reason":"spam"}"#),
    ));
    assert!(
        published(&out).is_empty() && replies(&out).is_empty(),
        "{out:?}"
    );
    let out = s.run(Input::Answer(
        Some(t1.1),
        answer(r#"{"allow":true,"d":{"clean":true}}"#),
    ));
    let p = published(&out);
    assert_eq!(
        p.iter().map(|p| p.id).collect::<Vec<_>>(),
        [Some(1), Some(2)]
    );
    assert_eq!(
        p[0].payload,
        Payload::Json(bytes::Bytes::from_static(b"{\"clean\":true}"))
    );
    assert_err(&out, 3, ErrCode::Forbidden);
    // on_error = allow: a failure publishes the original.
    let mut s = T::welcomed("bob");
    with_hooks(&mut s, false, false, true, true);
    let t = asked(&s.client(r#"{"t":"pub","id":1,"ch":"room:a","d":1}"#));
    let out = s.run(Input::Answer(Some(t.1), Err(ErrCode::NoService)));
    assert_eq!(published(&out).len(), 1);
}

#[test]
fn pending_asks_are_bounded() {
    let mut s = T::welcomed("alice");
    with_hooks(&mut s, false, false, true, false);
    for i in 0..hooks::MAX_ASKS {
        let out = s.client(&format!(r#"{{"t":"pub","id":{i},"ch":"room:a","d":1}}"#));
        asked(&out);
    }
    let out = s.client(r#"{"t":"pub","id":999,"ch":"room:a","d":1}"#);
    assert_err(&out, 999, ErrCode::RateLimited);
}

// ---- channel tokens (docs/api.md, "Channel tokens") ----

fn channel_token(sub: &str, ch: &str, exp_s: u64) -> String {
    let claims = serde_json::json!({"sub": sub, "ch": ch, "exp": exp_s});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn channel_tokens_grant_a_room_whatever_the_policy() {
    let mut s = T::jwt(RoomPolicy::Claims);
    let out = s.client(&format!(
        r#"{{"t":"hello","id":1,"meta":{{"token":"{}"}}}}"#,
        token("alice", UNIX / 1000 + 600, &[])
    ));
    assert!(welcome(&out).is_some(), "{out:?}");
    with_hooks(&mut s, false, true, false, false);
    // Without a token: the policy refuses.
    assert_err(
        &s.client(r#"{"t":"sub","id":2,"ch":"room:g1"}"#),
        2,
        ErrCode::Forbidden,
    );
    assert_err(
        &s.client(r#"{"t":"pub","id":3,"ch":"room:g1","d":1}"#),
        3,
        ErrCode::Forbidden,
    );
    let cases = [
        (
            channel_token("alice", "room:g1", UNIX / 1000 - 60),
            "channel token refused: token expired",
        ),
        (
            channel_token("bob", "room:g1", UNIX / 1000 + 60),
            "channel token is for another user",
        ),
        (
            channel_token("alice", "room:g2", UNIX / 1000 + 60),
            "channel token is for another channel",
        ),
        (
            token("alice", UNIX / 1000 + 60, &[]),
            "channel token refused: token is malformed",
        ),
        (
            "garbage".to_owned(),
            "channel token refused: token is malformed",
        ),
    ];
    for (tok, why) in cases {
        let out = s.client(&format!(
            r#"{{"t":"sub","id":4,"ch":"room:g1","meta":{{"token":"{tok}"}}}}"#
        ));
        assert_err(&out, 4, ErrCode::Forbidden);
        assert_eq!(reply(&out).reason.as_deref(), Some(why));
    }
    let tok = channel_token("alice", "room:g1", UNIX / 1000 + 60);
    let out = s.client(&format!(
        r#"{{"t":"sub","id":5,"ch":"room:g1","meta":{{"token":"{tok}"}}}}"#
    ));
    assert!(
        out.iter().any(|a| matches!(a, Action::Subscribe { .. })),
        "no hook asked: {out:?}"
    );
    assert!(!out.iter().any(|a| matches!(a, Action::Ask { .. })));
    // The grant covers publishing, while subscribed.
    assert_eq!(
        published(&s.client(r#"{"t":"pub","id":6,"ch":"room:g1","d":1}"#)).len(),
        1
    );
    s.client(r#"{"t":"unsub","id":7,"ch":"room:g1"}"#);
    assert_err(
        &s.client(r#"{"t":"pub","id":8,"ch":"room:g1","d":1}"#),
        8,
        ErrCode::Forbidden,
    );
    // user: channels take no channel token.
    let tok = channel_token("alice", "user:alice", UNIX / 1000 + 60);
    let out = s.client(&format!(
        r#"{{"t":"sub","id":9,"ch":"user:alice","meta":{{"token":"{tok}"}}}}"#
    ));
    assert_err(&out, 9, ErrCode::Forbidden);
}

#[test]
fn channel_tokens_need_jwt() {
    let mut s = T::welcomed("alice");
    let out = s.client(r#"{"t":"sub","id":2,"ch":"room:g1","meta":{"token":"x"}}"#);
    assert_err(&out, 2, ErrCode::Forbidden);
}
