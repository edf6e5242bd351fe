//! Property tests: round trips for arbitrary valid envelopes in both codecs,
//! and "never panics" for every decoder on arbitrary or mutated input.

use bytes::Bytes;
use edgegate_proto::{Envelope, Payload, Type, binary, channel, frame, json, leb128};
use proptest::prelude::*;
use serde_json::Value;

/// Arbitrary JSON values (finite numbers, arbitrary Unicode strings).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON text of a value, compact or pretty (inner whitespace is kept raw).
fn json_text(v: impl Strategy<Value = Value>) -> impl Strategy<Value = String> {
    (v, any::<bool>()).prop_map(|(v, pretty)| {
        if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            serde_json::to_string(&v).unwrap()
        }
    })
}

fn json_object_text() -> impl Strategy<Value = String> {
    json_text(
        prop::collection::btree_map(any::<String>(), json_value(), 0..5)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
    )
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        Just(Payload::None),
        json_text(json_value()).prop_map(|t| Payload::Json(Bytes::from(t))),
        prop::collection::vec(any::<u8>(), 1..200).prop_map(|b| Payload::Binary(Bytes::from(b))),
    ]
}

/// Envelopes valid for both codecs: no normalisation applies (a reason only
/// with a code and never empty, binary payloads non-empty, meta an object,
/// JSON payloads valid JSON text without surrounding whitespace).
fn envelope() -> impl Strategy<Value = Envelope> {
    (
        prop::sample::select(Type::ALL.to_vec()),
        any::<Option<u64>>(),
        any::<Option<String>>(),
        any::<Option<u64>>(),
        any::<Option<String>>(),
        prop::option::of((any::<u32>(), prop::option::of(".+"))),
        prop::option::of(json_object_text()),
        payload(),
    )
        .prop_map(|(t, id, ch, seq, from, code, meta, payload)| Envelope {
            t,
            id,
            ch,
            seq,
            from,
            code: code.as_ref().map(|c| c.0),
            reason: code.and_then(|c| c.1),
            meta,
            payload,
        })
}

/// What JSON mode makes of an envelope: raw newlines in `meta` and `d` become
/// spaces.
fn json_normal(e: &Envelope) -> Envelope {
    let mut e = e.clone();
    e.meta = e.meta.map(|m| m.replace('\n', " "));
    if let Payload::Json(d) = &e.payload {
        let d: Vec<u8> = d
            .iter()
            .map(|&b| if b == b'\n' { b' ' } else { b })
            .collect();
        e.payload = Payload::Json(Bytes::from(d));
    }
    e
}

fn bin(e: &Envelope) -> Vec<u8> {
    let mut out = Vec::new();
    binary::encode(e, &mut out);
    out
}

fn js(e: &Envelope) -> Vec<u8> {
    let mut out = Vec::new();
    json::encode(e, &mut out);
    out
}

/// `buf` with a few bytes overwritten, inserted or removed.
fn mutated(buf: Vec<u8>, edits: Vec<(usize, u8, u8)>) -> Vec<u8> {
    let mut buf = buf;
    for (pos, val, op) in edits {
        let i = if buf.is_empty() {
            0
        } else {
            pos % (buf.len() + 1)
        };
        match op % 3 {
            0 if i < buf.len() => buf[i] = val,
            1 => buf.insert(i, val),
            _ if i < buf.len() => {
                buf.remove(i);
            }
            _ => buf.push(val),
        }
    }
    buf
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6)
}

proptest! {
    #[test]
    fn binary_round_trip(e in envelope()) {
        let b = bin(&e);
        prop_assert_eq!(b.len(), binary::encoded_len(&e));
        prop_assert_eq!(binary::decode(&b), Ok(e));
    }

    #[test]
    fn json_round_trip(e in envelope()) {
        let t = js(&e);
        prop_assert!(std::str::from_utf8(&t).is_ok());
        prop_assert!(!t.contains(&b'\n'), "a JSON envelope never holds a raw newline");
        // serde_json agrees that it is one valid object
        let v: Value = serde_json::from_slice(&t).unwrap();
        prop_assert!(v.is_object());
        prop_assert_eq!(json::decode(&t), Ok(json_normal(&e)));
    }

    #[test]
    fn cross_codec(e in envelope()) {
        let via_bin = binary::decode(&bin(&e)).unwrap();
        let via_json = json::decode(&js(&via_bin)).unwrap();
        prop_assert_eq!(binary::decode(&bin(&via_json)), Ok(json_normal(&e)));
    }

    #[test]
    fn json_batch_round_trip(es in prop::collection::vec(envelope(), 0..5)) {
        let mut msg = Vec::new();
        for e in &es {
            json::encode(e, &mut msg);
            msg.push(b'\n');
        }
        let got: Vec<_> = json::decode_batch(&msg).collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(got, es.iter().map(json_normal).collect::<Vec<_>>());
    }

    #[test]
    fn ws_binary_round_trip(es in prop::collection::vec(envelope(), 0..5)) {
        let mut msg = Vec::new();
        for e in &es {
            frame::encode_ws_binary(e, &mut msg);
        }
        let got: Vec<_> = frame::split_ws_binary(&msg)
            .map(|r| binary::decode(r.unwrap()).unwrap())
            .collect();
        prop_assert_eq!(got, es);
    }

    #[test]
    fn tcp_frames_round_trip(es in prop::collection::vec(envelope(), 1..4), cut in any::<usize>()) {
        let mut stream = Vec::new();
        for e in &es {
            frame::encode_frame(e, &mut stream);
        }
        // any strict prefix of the first frame is "need more"
        let first = frame::peek_frame(&stream, u32::MAX).unwrap().unwrap();
        let cut = cut % (frame::LEN_BYTES + first);
        prop_assert_eq!(frame::peek_frame(&stream[..cut], u32::MAX), Ok(None));
        // a max below the body is refused from the 4 length bytes alone
        if first > 0 {
            prop_assert!(frame::peek_frame(&stream[..frame::LEN_BYTES], first as u32 - 1).is_err());
        }
        let mut got = Vec::new();
        let mut buf = &stream[..];
        while let Some(n) = frame::peek_frame(buf, u32::MAX).unwrap() {
            got.push(binary::decode(&buf[frame::LEN_BYTES..frame::LEN_BYTES + n]).unwrap());
            buf = &buf[frame::LEN_BYTES + n..];
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, es);
    }

    #[test]
    fn binary_json_payload_trimmed(v in json_value(), pre in "[ \t\r\n]{0,3}", post in "[ \t\r\n]{0,3}") {
        let text = serde_json::to_string(&v).unwrap();
        let mut b = vec![Type::Pub.code(), binary::BIT_JSON];
        b.extend_from_slice(pre.as_bytes());
        b.extend_from_slice(text.as_bytes());
        b.extend_from_slice(post.as_bytes());
        let e = binary::decode(&b).unwrap();
        prop_assert_eq!(e.payload, Payload::Json(Bytes::from(text)));
    }

    #[test]
    fn leb128_round_trip(v in any::<u64>(), tail in prop::collection::vec(any::<u8>(), 0..4)) {
        let mut b = Vec::new();
        leb128::write_u64(v, &mut b);
        prop_assert_eq!(b.len(), leb128::len_u64(v));
        let n = b.len();
        b.extend(tail);
        prop_assert_eq!(leb128::read_u64(&b), Ok((v, n)));
    }

    #[test]
    fn leb128_never_panics(b in prop::collection::vec(any::<u8>(), 0..16)) {
        if let Ok((_, n)) = leb128::read_u64(&b) {
            prop_assert!((1..=10).contains(&n) && n <= b.len());
        }
    }

    #[test]
    fn binary_decode_never_panics(b in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(e) = binary::decode(&b) {
            // whatever decodes re-encodes to something that decodes the same
            prop_assert_eq!(binary::decode(&bin(&e)), Ok(e.clone()));
            let _ = js(&e);
        }
    }

    #[test]
    fn binary_decode_mutated(e in envelope(), ed in edits()) {
        let b = mutated(bin(&e), ed);
        if let Ok(e) = binary::decode(&b) {
            prop_assert_eq!(binary::decode(&bin(&e)), Ok(e.clone()));
            prop_assert_eq!(json::decode(&js(&e)).map(|x| bin(&x)), Ok(bin(&json_normal(&e))));
        }
    }

    #[test]
    fn json_decode_never_panics(b in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = json::decode(&b);
    }

    #[test]
    fn json_decode_never_panics_on_text(s in r#"[{}\[\]":,tdb0-9a-z\\ \n-]{0,64}"#) {
        let _ = json::decode(s.as_bytes());
        let _ = json::decode_batch(s.as_bytes()).count();
    }

    #[test]
    fn json_decode_mutated(e in envelope(), ed in edits()) {
        let t = mutated(js(&e), ed);
        if let Ok(e) = json::decode(&t) {
            // anything accepted re-encodes to valid JSON that decodes the same
            let again = js(&e);
            // (IgnoredAny, not Value: RFC 8259 sets no range on numbers, and
            // Value refuses e.g. -8e318, which a payload may hold)
            prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&again).is_ok());
            // (in normal form: the encoder writes raw newlines in `meta` and
            // `d` as spaces, so that a batch splits exactly)
            prop_assert_eq!(json::decode(&again), Ok(json_normal(&e)));
        }
    }

    #[test]
    fn decode_batch_never_panics(b in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = json::decode_batch(&b).count();
    }

    #[test]
    fn split_ws_binary_never_panics(b in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut total = 0;
        let mut errors = 0;
        for item in frame::split_ws_binary(&b) {
            match item {
                Ok(env) => {
                    total += env.len();
                    let _ = binary::decode(env);
                }
                Err(_) => errors += 1,
            }
        }
        prop_assert!(errors <= 1);
        prop_assert!(total <= b.len());
    }

    #[test]
    fn peek_frame_never_panics(b in prop::collection::vec(any::<u8>(), 0..64), max in any::<u32>()) {
        match frame::peek_frame(&b, max) {
            Ok(Some(n)) => prop_assert!(frame::LEN_BYTES + n <= b.len() && n as u64 <= u64::from(max)),
            Ok(None) => {}
            Err(frame::FrameError::TooLarge { len, max: m }) => {
                prop_assert!(len > m && b.len() >= frame::LEN_BYTES);
            }
        }
    }

    #[test]
    fn channel_rules(prefix in "(user|room|svc|foo|)", id in "[A-Za-z0-9_.:é -]{0,130}") {
        let name = format!("{prefix}:{id}");
        let id_ok = !id.is_empty()
            && id.len() <= 128
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let known = matches!(prefix.as_str(), "user" | "room" | "svc");
        prop_assert_eq!(channel::valid_id(&id), id_ok);
        match channel::parse(&name) {
            Ok(c) => {
                prop_assert!(known && id_ok);
                prop_assert_eq!(c.id(), id.as_str());
                prop_assert_eq!(c.to_string(), name);
            }
            Err(_) => prop_assert!(!(known && id_ok)),
        }
    }
}
