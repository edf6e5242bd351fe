//! The envelope: the one message shape both codecs carry (docs/protocol.md §2).

use bytes::Bytes;

use crate::codes::{CloseCode, ErrCode};

/// The message type: JSON `t`, binary type code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Type {
    /// `hello` (1), client → server: `id`, `meta: {token?, user?, client?}`; must come first.
    Hello = 1,
    /// `sub` (2), client → server: `id`, `ch`, `meta: {since?}`.
    Sub = 2,
    /// `unsub` (3), client → server: `id`, `ch`.
    Unsub = 3,
    /// `pub` (4), client → server: `id`, `ch`, `d`.
    Pub = 4,
    /// `req` (5), client → server: `id`, `ch` (`svc:<name>`), `d`.
    Req = 5,
    /// `ping` (6), either way: `id?`. The [`Default`] type.
    #[default]
    Ping = 6,
    /// `pong` (7), either way: `id?` (the `ping`'s).
    Pong = 7,
    /// `presence` (8), client → server: `id`, `ch`, `meta: {limit?, after?}`;
    /// answered with `reply` (who is present in a room, or whether a user
    /// is online).
    Presence = 8,
    /// `history` (9), client → server: `id`, `ch`, `meta: {limit?, before?}`;
    /// answered with `reply` (a page of a channel's stored messages).
    History = 9,
    /// `welcome` (64), server → client: `id` (hello's), `meta: {conn, user, node, shard, hb_ms, max_frame}`.
    Welcome = 64,
    /// `ok` (65), server → client: `id`, `seq?`.
    Ok = 65,
    /// `err` (66), server → client: `id?`, `code`, `reason?`.
    Err = 66,
    /// `msg` (67), server → client: `ch`, `seq?`, `from`, `d`/`db`, `id?`.
    Msg = 67,
    /// `reply` (68), server → client: `id`, `d`.
    Reply = 68,
    /// `bye` (69), server → client: `code`, `reason?`, `meta: {retry_ms?}`.
    Bye = 69,
    /// `members` (70), server → client: `ch`, `meta: {present, join?, leave?}`
    /// (a room's presence changes, batched).
    Members = 70,
}

impl Type {
    /// Every type, in code order.
    pub const ALL: [Type; 16] = [
        Type::Hello,
        Type::Sub,
        Type::Unsub,
        Type::Pub,
        Type::Req,
        Type::Ping,
        Type::Pong,
        Type::Presence,
        Type::History,
        Type::Welcome,
        Type::Ok,
        Type::Err,
        Type::Msg,
        Type::Reply,
        Type::Bye,
        Type::Members,
    ];

    /// The binary type code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The type with that binary code, if any.
    pub fn from_code(c: u8) -> Option<Type> {
        Some(match c {
            1 => Type::Hello,
            2 => Type::Sub,
            3 => Type::Unsub,
            4 => Type::Pub,
            5 => Type::Req,
            6 => Type::Ping,
            7 => Type::Pong,
            8 => Type::Presence,
            9 => Type::History,
            64 => Type::Welcome,
            65 => Type::Ok,
            66 => Type::Err,
            67 => Type::Msg,
            68 => Type::Reply,
            69 => Type::Bye,
            70 => Type::Members,
            _ => return None,
        })
    }

    /// The JSON name (`t`): `"hello"`, `"sub"`, ….
    pub const fn name(self) -> &'static str {
        match self {
            Type::Hello => "hello",
            Type::Sub => "sub",
            Type::Unsub => "unsub",
            Type::Pub => "pub",
            Type::Req => "req",
            Type::Ping => "ping",
            Type::Pong => "pong",
            Type::Presence => "presence",
            Type::History => "history",
            Type::Welcome => "welcome",
            Type::Ok => "ok",
            Type::Err => "err",
            Type::Msg => "msg",
            Type::Reply => "reply",
            Type::Bye => "bye",
            Type::Members => "members",
        }
    }

    /// The type with that JSON name, if any (case-sensitive).
    pub fn from_name(s: &str) -> Option<Type> {
        Some(match s {
            "hello" => Type::Hello,
            "sub" => Type::Sub,
            "unsub" => Type::Unsub,
            "pub" => Type::Pub,
            "req" => Type::Req,
            "ping" => Type::Ping,
            "pong" => Type::Pong,
            "presence" => Type::Presence,
            "history" => Type::History,
            "welcome" => Type::Welcome,
            "ok" => Type::Ok,
            "err" => Type::Err,
            "msg" => Type::Msg,
            "reply" => Type::Reply,
            "bye" => Type::Bye,
            "members" => Type::Members,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Type {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An envelope's payload, opaque to the gateway.
///
/// The distinction between the two kinds is what binary bit 0x40 carries and
/// what decides `d` versus `db` for a JSON-mode receiver.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Payload {
    /// No payload.
    #[default]
    None,
    /// Valid JSON text (binary bit 0x40 set); JSON mode `d`, written raw.
    ///
    /// Encoders trust this to be valid JSON text; decoders check it.
    Json(Bytes),
    /// Opaque bytes (bit 0x40 clear); JSON mode `db` (standard base64 with
    /// padding).
    Binary(Bytes),
}

impl Payload {
    /// The payload bytes (empty for [`Payload::None`]).
    pub fn bytes(&self) -> &[u8] {
        match self {
            Payload::None => &[],
            Payload::Json(b) | Payload::Binary(b) => b,
        }
    }

    /// The payload bytes, owned (empty for [`Payload::None`]); no copy.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Payload::None => Bytes::new(),
            Payload::Json(b) | Payload::Binary(b) => b,
        }
    }

    /// True for [`Payload::None`].
    pub fn is_none(&self) -> bool {
        matches!(self, Payload::None)
    }

    /// True for [`Payload::Json`].
    pub fn is_json(&self) -> bool {
        matches!(self, Payload::Json(_))
    }
}

/// One protocol message, independent of its encoding.
///
/// Every field but `t` is optional; which ones a type uses is listed on
/// [`Type`]. The codecs do not check that a type has the fields it needs
/// (that is the session's business); they check only that what is present is
/// well formed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Envelope {
    /// The message type.
    pub t: Type,
    /// Request id chosen by the client; echoed by `ok`, `err`, `reply`, `welcome`, `pong`.
    pub id: Option<u64>,
    /// Channel (`user:<id>`, `room:<id>`, `svc:<name>`).
    pub ch: Option<String>,
    /// Server sequence of a message within its channel.
    pub seq: Option<u64>,
    /// Publisher's user id.
    pub from: Option<String>,
    /// `err`: the [`ErrCode`] number; `bye`: the close code. Binary bit 0x10
    /// (code + reason).
    pub code: Option<u32>,
    /// Human-readable reason, meaningful only with `code`. Binary writes `""`
    /// when `None`, and an empty reason decodes as `None`.
    pub reason: Option<String>,
    /// JSON object text (validated to be an object on decode; trusted on encode).
    pub meta: Option<String>,
    /// The payload.
    pub payload: Payload,
}

impl Envelope {
    /// An envelope of type `t` with no fields.
    pub fn new(t: Type) -> Self {
        Envelope {
            t,
            ..Envelope::default()
        }
    }

    /// `ok` answering request `id`.
    pub fn ok(id: Option<u64>) -> Self {
        Envelope {
            id,
            ..Envelope::new(Type::Ok)
        }
    }

    /// `err` answering request `id` (an empty `reason` is left out).
    pub fn err(id: Option<u64>, code: ErrCode, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Envelope {
            id,
            code: Some(code.number()),
            reason: (!reason.is_empty()).then_some(reason),
            ..Envelope::new(Type::Err)
        }
    }

    /// `bye` with a close code (a [`CloseCode`] or a `u16`), a reason (left out
    /// when empty) and, when given, `meta: {"retry_ms": N}`.
    pub fn bye(code: impl Into<CloseCode>, reason: &str, retry_ms: Option<u64>) -> Self {
        Envelope {
            code: Some(u32::from(code.into().0)),
            reason: (!reason.is_empty()).then(|| reason.to_owned()),
            meta: retry_ms.map(|ms| format!("{{\"retry_ms\":{ms}}}")),
            ..Envelope::new(Type::Bye)
        }
    }

    /// `pong`, carrying the `ping`'s `id` if it had one.
    pub fn pong(id: Option<u64>) -> Self {
        Envelope {
            id,
            ..Envelope::new(Type::Pong)
        }
    }

    /// `ping`, with an optional `id`.
    pub fn ping(id: Option<u64>) -> Self {
        Envelope {
            id,
            ..Envelope::new(Type::Ping)
        }
    }

    /// The `code` as an [`ErrCode`], when this is an `err` with a known code.
    pub fn err_code(&self) -> Option<ErrCode> {
        match (self.t, self.code) {
            (Type::Err, Some(c)) => ErrCode::from_number(c),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_table() {
        let table = [
            (Type::Hello, 1, "hello"),
            (Type::Sub, 2, "sub"),
            (Type::Unsub, 3, "unsub"),
            (Type::Pub, 4, "pub"),
            (Type::Req, 5, "req"),
            (Type::Ping, 6, "ping"),
            (Type::Pong, 7, "pong"),
            (Type::Presence, 8, "presence"),
            (Type::History, 9, "history"),
            (Type::Welcome, 64, "welcome"),
            (Type::Ok, 65, "ok"),
            (Type::Err, 66, "err"),
            (Type::Msg, 67, "msg"),
            (Type::Reply, 68, "reply"),
            (Type::Bye, 69, "bye"),
            (Type::Members, 70, "members"),
        ];
        assert_eq!(Type::ALL.len(), table.len());
        for (t, code, name) in table {
            assert_eq!(t.code(), code);
            assert_eq!(t.name(), name);
            assert_eq!(t.to_string(), name);
            assert_eq!(Type::from_code(code), Some(t));
            assert_eq!(Type::from_name(name), Some(t));
        }
        let defined: Vec<u8> = table.iter().map(|x| x.1).collect();
        for c in 0..=255u8 {
            assert_eq!(Type::from_code(c).is_some(), defined.contains(&c), "{c}");
        }
        assert_eq!(Type::from_name("Hello"), None);
        assert_eq!(Type::from_name(""), None);
        assert_eq!(Type::default(), Type::Ping);
    }

    #[test]
    fn builders() {
        assert_eq!(Envelope::default(), Envelope::new(Type::Ping));
        let ok = Envelope::ok(Some(3));
        assert_eq!((ok.t, ok.id), (Type::Ok, Some(3)));
        let e = Envelope::err(Some(4), ErrCode::BadChannel, "nope");
        assert_eq!(e.t, Type::Err);
        assert_eq!(e.code, Some(4));
        assert_eq!(e.reason.as_deref(), Some("nope"));
        assert_eq!(e.err_code(), Some(ErrCode::BadChannel));
        assert_eq!(Envelope::err(None, ErrCode::Internal, "").reason, None);
        let b = Envelope::bye(CloseCode::GOING_AWAY, "drain", Some(1500));
        assert_eq!(b.t, Type::Bye);
        assert_eq!(b.code, Some(1001));
        assert_eq!(b.reason.as_deref(), Some("drain"));
        assert_eq!(b.meta.as_deref(), Some(r#"{"retry_ms":1500}"#));
        assert_eq!(b.err_code(), None);
        let b = Envelope::bye(4000u16, "", None);
        assert_eq!((b.code, b.reason, b.meta), (Some(4000), None, None));
        assert_eq!(Envelope::pong(Some(9)).t, Type::Pong);
        assert_eq!(Envelope::pong(Some(9)).id, Some(9));
        assert_eq!(Envelope::ping(None), Envelope::new(Type::Ping));
    }

    #[test]
    fn payload_helpers() {
        assert!(Payload::None.is_none());
        assert_eq!(Payload::None.bytes(), b"");
        let j = Payload::Json(Bytes::from_static(b"1"));
        assert!(j.is_json() && !j.is_none());
        assert_eq!(j.bytes(), b"1");
        let b = Payload::Binary(Bytes::from_static(b"\x00"));
        assert!(!b.is_json());
        assert_eq!(b.bytes(), b"\x00");
    }
}
