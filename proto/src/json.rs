//! The JSON envelope codec (docs/protocol.md §2, JSON mode).
//!
//! One envelope is one JSON object: `{"t":"pub","id":7,"ch":"room:lobby","d":{"text":"hi"}}`.
//! A WebSocket text message may carry several, separated by `\n`
//! ([`decode_batch`]).
//!
//! * [`encode`] is a hand-written writer: fields in a fixed order (`t`, `id`,
//!   `ch`, `seq`, `from`, `code`, `reason`, `meta`, then `d` or `db`),
//!   strings escaped per RFC 8259, `meta` and `d` copied raw.
//! * [`decode`] parses with serde_json, borrowing `d` and `meta` as raw
//!   text. Unknown fields are ignored; duplicate known fields are an error.
//!   `null` for an optional field is the same as leaving it out, except for
//!   `d`, where `null` is the JSON payload `null`.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::envelope::{Envelope, Payload, Type};
use crate::{DecodeError, ErrCode};

/// Appends one envelope to `out` as a JSON object, without a newline.
///
/// `code` is written as the [`ErrCode`] name for `err` when the number is a
/// known one, otherwise as a number. [`Payload::Json`] becomes `"d":<text>`
/// (raw), [`Payload::Binary`] `"db":"<base64>"`. `meta` and JSON payloads are
/// trusted to be valid JSON (decoders check them, so whatever came out of a
/// decoder is). Raw newlines in `meta` and `d` (whitespace, e.g. from a
/// pretty-printed payload a binary client sent) are written as spaces, so the
/// output never contains `\n` and [`decode_batch`] splits it exactly.
pub fn encode(env: &Envelope, out: &mut Vec<u8>) {
    out.reserve(32 + env.payload.bytes().len() + env.meta.as_ref().map_or(0, String::len));
    out.extend_from_slice(b"{\"t\":\"");
    out.extend_from_slice(env.t.name().as_bytes());
    out.push(b'"');
    if let Some(id) = env.id {
        out.extend_from_slice(b",\"id\":");
        write_u64(id, out);
    }
    if let Some(ch) = &env.ch {
        out.extend_from_slice(b",\"ch\":");
        write_str(ch, out);
    }
    if let Some(seq) = env.seq {
        out.extend_from_slice(b",\"seq\":");
        write_u64(seq, out);
    }
    if let Some(from) = &env.from {
        out.extend_from_slice(b",\"from\":");
        write_str(from, out);
    }
    if let Some(code) = env.code {
        out.extend_from_slice(b",\"code\":");
        match ErrCode::from_number(code).filter(|_| env.t == Type::Err) {
            Some(c) => {
                out.push(b'"');
                out.extend_from_slice(c.name().as_bytes());
                out.push(b'"');
            }
            None => write_u64(u64::from(code), out),
        }
    }
    if let Some(reason) = &env.reason {
        out.extend_from_slice(b",\"reason\":");
        write_str(reason, out);
    }
    if let Some(meta) = &env.meta {
        out.extend_from_slice(b",\"meta\":");
        write_raw(meta.as_bytes(), out);
    }
    match &env.payload {
        Payload::None => {}
        Payload::Json(d) => {
            out.extend_from_slice(b",\"d\":");
            write_raw(d, out);
        }
        Payload::Binary(b) => {
            out.extend_from_slice(b",\"db\":\"");
            let start = out.len();
            let n = base64::encoded_len(b.len(), true).unwrap_or(0);
            out.resize(start + n, 0);
            let written = B64.encode_slice(b, &mut out[start..]).unwrap_or(0);
            out.truncate(start + written);
            out.push(b'"');
        }
    }
    out.push(b'}');
}

/// Appends raw JSON text, with every `\n` written as a space.
///
/// In valid JSON text a raw newline can only be whitespace (inside strings it
/// must be escaped), so the replacement keeps the value and guarantees that
/// an encoded envelope never contains `\n`, the batch separator.
fn write_raw(text: &[u8], out: &mut Vec<u8>) {
    if !text.contains(&b'\n') {
        out.extend_from_slice(text);
        return;
    }
    out.extend(text.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
}

/// Appends `v` in decimal.
fn write_u64(v: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends `s` as a JSON string literal: `"` and `\` escaped, control
/// characters as `\n`, `\r`, `\t`, `\b`, `\f` or `\u00XX`; everything else
/// (UTF-8 included) copied as is.
fn write_str(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The wire shape of a JSON envelope; every field optional so that the
/// errors are ours, not serde's "missing field".
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    t: Option<Cow<'a, str>>,
    id: Option<u64>,
    ch: Option<String>,
    seq: Option<u64>,
    from: Option<String>,
    #[serde(borrow)]
    code: Option<&'a RawValue>,
    reason: Option<String>,
    #[serde(borrow)]
    meta: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    d: Option<&'a RawValue>,
    #[serde(borrow)]
    db: Option<Cow<'a, str>>,
}

/// `d` present (even as `null`) is `Some`.
fn present<'de, D: Deserializer<'de>>(de: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(de).map(Some)
}

/// True when raw JSON text (as serde_json hands it out: no surrounding
/// whitespace) is an object.
fn is_object(raw: &str) -> bool {
    raw.trim_start().starts_with('{')
}

/// Decodes one envelope from the JSON text `text` (one object; surrounding
/// whitespace allowed).
///
/// # Errors
/// Not UTF-8, not JSON, not an object, a known field of the wrong type (e.g.
/// an `id` that is negative, fractional or over `u64`), a missing or unknown
/// `t`, `meta` not an object, both `d` and `db`, `db` not base64, `code` an
/// unknown name or over `u32`.
pub fn decode(text: &[u8]) -> Result<Envelope, DecodeError> {
    let text = std::str::from_utf8(text).map_err(|_| DecodeError::BadUtf8("envelope"))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let w = Wire::deserialize(&mut de).map_err(|e| DecodeError::json(&e))?;
    de.end().map_err(|_| DecodeError::TrailingBytes)?;

    let t = match w.t {
        None => return Err(DecodeError::MissingType),
        Some(name) => Type::from_name(&name).ok_or_else(|| DecodeError::unknown_type(&name))?,
    };
    let code = match w.code {
        None => None,
        Some(raw) => Some(decode_code(raw.get())?),
    };
    let meta = match w.meta {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) if is_object(raw.get()) => Some(raw.get().to_owned()),
        Some(_) => return Err(DecodeError::BadMeta),
    };
    let payload = match (w.d, w.db) {
        (Some(_), Some(_)) => return Err(DecodeError::DAndDb),
        (Some(d), None) => Payload::Json(Bytes::copy_from_slice(d.get().as_bytes())),
        (None, Some(db)) => Payload::Binary(
            B64.decode(db.as_bytes())
                .map_err(|_| DecodeError::BadBase64)?
                .into(),
        ),
        (None, None) => Payload::None,
    };
    Ok(Envelope {
        t,
        id: w.id,
        ch: w.ch,
        seq: w.seq,
        from: w.from,
        code,
        reason: w.reason,
        meta,
        payload,
    })
}

/// `code`: an [`ErrCode`] name (string) or an unsigned number up to `u32::MAX`.
fn decode_code(raw: &str) -> Result<u32, DecodeError> {
    if raw.starts_with('"') {
        let name: Cow<'_, str> = serde_json::from_str(raw).map_err(|e| DecodeError::json(&e))?;
        return ErrCode::from_name(&name)
            .map(ErrCode::number)
            .ok_or_else(|| DecodeError::unknown_err_code(&name));
    }
    match serde_json::from_str::<u64>(raw) {
        Ok(n) => u32::try_from(n).map_err(|_| DecodeError::OutOfRange("code")),
        Err(_) => Err(DecodeError::BadCode),
    }
}

/// Splits a WebSocket text message into its envelopes (separated by `\n`)
/// and decodes each. Empty and whitespace-only lines are skipped; a `\r`
/// before the `\n` is whitespace and so allowed.
///
/// Each item is decoded independently: one bad line yields an `Err` and the
/// iterator goes on (the session decides whether to stop).
pub fn decode_batch(msg: &[u8]) -> impl Iterator<Item = Result<Envelope, DecodeError>> + '_ {
    msg.split(|&b| b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(env: &Envelope) -> String {
        let mut out = Vec::new();
        encode(env, &mut out);
        String::from_utf8(out).expect("encoder writes UTF-8")
    }

    fn dec(s: &str) -> Result<Envelope, DecodeError> {
        decode(s.as_bytes())
    }

    fn full() -> Envelope {
        Envelope {
            t: Type::Msg,
            id: Some(7),
            ch: Some("room:lobby".into()),
            seq: Some(42),
            from: Some("alice".into()),
            code: Some(3),
            reason: Some("why".into()),
            meta: Some(r#"{"a":1}"#.into()),
            payload: Payload::Json(Bytes::from_static(br#"{"text":"hi"}"#)),
        }
    }

    #[test]
    fn protocol_example() {
        let e = dec(r#"{"t":"pub","id":7,"ch":"room:lobby","d":{"text":"hi"}}"#).expect("ok");
        assert_eq!(e.t, Type::Pub);
        assert_eq!(e.id, Some(7));
        assert_eq!(e.ch.as_deref(), Some("room:lobby"));
        assert_eq!(
            e.payload,
            Payload::Json(Bytes::from_static(br#"{"text":"hi"}"#))
        );
        assert_eq!(
            enc(&e),
            r#"{"t":"pub","id":7,"ch":"room:lobby","d":{"text":"hi"}}"#
        );
    }

    #[test]
    fn every_field_round_trips() {
        let e = full();
        let s = enc(&e);
        assert_eq!(
            s,
            r#"{"t":"msg","id":7,"ch":"room:lobby","seq":42,"from":"alice","code":3,"reason":"why","meta":{"a":1},"d":{"text":"hi"}}"#
        );
        assert_eq!(dec(&s), Ok(e));
        for t in Type::ALL {
            let e = Envelope::new(t);
            let s = enc(&e);
            assert_eq!(s, format!(r#"{{"t":"{}"}}"#, t.name()));
            assert_eq!(dec(&s), Ok(e));
        }
    }

    #[test]
    fn max_numbers() {
        let e = Envelope {
            id: Some(u64::MAX),
            seq: Some(0),
            code: Some(u32::MAX),
            ..Envelope::new(Type::Bye)
        };
        let s = enc(&e);
        assert_eq!(
            s,
            r#"{"t":"bye","id":18446744073709551615,"seq":0,"code":4294967295}"#
        );
        assert_eq!(dec(&s), Ok(e));
        assert!(matches!(
            dec(r#"{"t":"ok","id":18446744073709551616}"#),
            Err(DecodeError::BadJson(_))
        ));
        assert!(matches!(
            dec(r#"{"t":"ok","id":-1}"#),
            Err(DecodeError::BadJson(_))
        ));
        assert!(matches!(
            dec(r#"{"t":"ok","id":1.5}"#),
            Err(DecodeError::BadJson(_))
        ));
        assert!(matches!(
            dec(r#"{"t":"ok","seq":"1"}"#),
            Err(DecodeError::BadJson(_))
        ));
        assert_eq!(
            dec(r#"{"t":"bye","code":4294967296}"#),
            Err(DecodeError::OutOfRange("code"))
        );
    }

    #[test]
    fn err_code_names() {
        for c in ErrCode::ALL {
            let e = Envelope::err(Some(1), c, "r");
            let s = enc(&e);
            assert!(s.contains(&format!(r#""code":"{}""#, c.name())), "{s}");
            let back = dec(&s).expect("decodes");
            assert_eq!(back.code, Some(c.number()));
            assert_eq!(back.err_code(), Some(c));
            // the number is accepted too
            let n = dec(&format!(r#"{{"t":"err","code":{}}}"#, c.number())).expect("number");
            assert_eq!(n.err_code(), Some(c));
        }
        // unknown number on err: written as a number
        let e = Envelope {
            code: Some(99),
            ..Envelope::new(Type::Err)
        };
        assert_eq!(enc(&e), r#"{"t":"err","code":99}"#);
        assert_eq!(dec(&enc(&e)), Ok(e));
        // bye: always a number, even when it collides with an err number
        let b = Envelope {
            code: Some(4),
            ..Envelope::new(Type::Bye)
        };
        assert_eq!(enc(&b), r#"{"t":"bye","code":4}"#);
        let b = Envelope::bye(crate::CloseCode::KICKED, "k", None);
        assert_eq!(enc(&b), r#"{"t":"bye","code":4005,"reason":"k"}"#);
        assert_eq!(
            dec(r#"{"t":"err","code":"nope"}"#),
            Err(DecodeError::UnknownErrCode("nope".into()))
        );
        assert_eq!(dec(r#"{"t":"err","code":true}"#), Err(DecodeError::BadCode));
        // null is the same as absent
        assert_eq!(dec(r#"{"t":"err","code":null}"#).unwrap().code, None);
        assert_eq!(dec(r#"{"t":"err","code":-4}"#), Err(DecodeError::BadCode));
        assert_eq!(dec(r#"{"t":"err","code":{}}"#), Err(DecodeError::BadCode));
    }

    #[test]
    fn db_base64() {
        let e = Envelope {
            payload: Payload::Binary(Bytes::from_static(b"\x00\xff\x10hi")),
            ..Envelope::new(Type::Msg)
        };
        let s = enc(&e);
        assert_eq!(s, r#"{"t":"msg","db":"AP8QaGk="}"#);
        assert_eq!(dec(&s), Ok(e));
        for (raw, want) in [
            ("", &b""[..]),
            ("YQ==", b"a"),
            ("YWI=", b"ab"),
            ("YWJj", b"abc"),
        ] {
            let e = dec(&format!(r#"{{"t":"pub","db":"{raw}"}}"#)).expect("ok");
            assert_eq!(e.payload, Payload::Binary(Bytes::copy_from_slice(want)));
            assert_eq!(enc(&e), format!(r#"{{"t":"pub","db":"{raw}"}}"#));
        }
        // no padding, URL-safe alphabet, junk: refused
        for bad in ["YQ", "-_8=", "!!!!", "YQ==YQ=="] {
            assert_eq!(
                dec(&format!(r#"{{"t":"pub","db":"{bad}"}}"#)),
                Err(DecodeError::BadBase64),
                "{bad}"
            );
        }
        assert!(matches!(
            dec(r#"{"t":"pub","db":5}"#),
            Err(DecodeError::BadJson(_))
        ));
        assert_eq!(
            dec(r#"{"t":"pub","d":1,"db":"YQ=="}"#),
            Err(DecodeError::DAndDb)
        );
    }

    #[test]
    fn d_any_json_kept_raw() {
        for d in [
            "null",
            "0",
            "-1.5e3",
            "\"s\"",
            "[1,{\"a\":[]}]",
            "true",
            "{}",
            "{ \"a\" : 1 }",
        ] {
            let e = dec(&format!(r#"{{"t":"pub","d":{d}}}"#)).expect(d);
            assert_eq!(
                e.payload,
                Payload::Json(Bytes::copy_from_slice(d.as_bytes())),
                "{d}"
            );
        }
        // leading/trailing whitespace around the value is not part of it
        let e = dec("{\"t\":\"pub\",\"d\":  [1] \n}").expect("ok");
        assert_eq!(e.payload, Payload::Json(Bytes::from_static(b"[1]")));
        assert_eq!(dec(r#"{"t":"pub"}"#).expect("ok").payload, Payload::None);
    }

    #[test]
    fn meta_validation() {
        let e = dec(r#"{"t":"hello","id":1,"meta":{"token":"x","n":[1]}}"#).expect("ok");
        assert_eq!(e.meta.as_deref(), Some(r#"{"token":"x","n":[1]}"#));
        assert_eq!(dec(r#"{"t":"hello","meta":null}"#).expect("ok").meta, None);
        for bad in ["1", "\"{}\"", "[]", "true"] {
            assert_eq!(
                dec(&format!(r#"{{"t":"hello","meta":{bad}}}"#)),
                Err(DecodeError::BadMeta),
                "{bad}"
            );
        }
    }

    #[test]
    fn type_errors() {
        assert_eq!(dec(r#"{"id":1}"#), Err(DecodeError::MissingType));
        assert_eq!(dec(r#"{"t":null}"#), Err(DecodeError::MissingType));
        assert_eq!(
            dec(r#"{"t":"nope"}"#),
            Err(DecodeError::UnknownType("nope".into()))
        );
        assert_eq!(
            dec(r#"{"t":"Pub"}"#),
            Err(DecodeError::UnknownType("Pub".into()))
        );
        assert!(matches!(dec(r#"{"t":4}"#), Err(DecodeError::BadJson(_))));
        // escaped type name is still recognised
        assert_eq!(dec(r#"{"t":"p\u0075b"}"#).expect("ok").t, Type::Pub);
    }

    #[test]
    fn malformed() {
        for bad in [
            "",
            " ",
            "{",
            "[]",
            "1",
            "\"t\"",
            "null",
            r#"{"t":"pub",}"#,
            "{'t':'pub'}",
        ] {
            assert!(matches!(dec(bad), Err(DecodeError::BadJson(_))), "{bad:?}");
        }
        assert_eq!(dec(r#"{"t":"pub"} x"#), Err(DecodeError::TrailingBytes));
        assert_eq!(
            dec(r#"{"t":"pub"}{"t":"pub"}"#),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(
            decode(b"{\"t\":\"pub\",\"ch\":\"\xff\"}"),
            Err(DecodeError::BadUtf8("envelope"))
        );
        // duplicate known field
        assert!(matches!(
            dec(r#"{"t":"pub","t":"sub"}"#),
            Err(DecodeError::BadJson(_))
        ));
        // deep nesting in skipped or raw values does not overflow the stack
        // (serde_json skips them iteratively, without a depth limit)
        let deep = format!(
            r#"{{"t":"pub","x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(dec(&deep).is_ok());
        let deep = format!(
            r#"{{"t":"pub","d":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(dec(&deep).unwrap().payload.is_json());
        let deep = format!(r#"{{"t":"pub","d":{}}}"#, "[".repeat(100_000));
        assert!(dec(&deep).is_err());
    }

    #[test]
    fn unknown_fields_ignored_and_whitespace() {
        let e = dec(" \t{ \"x\" : {\"y\":[1,2]}, \"t\" : \"ping\" , \"id\" : 3 }\r\n").expect("ok");
        assert_eq!(e, Envelope::ping(Some(3)));
        let e = dec(r#"{"t":"ok","id":null,"ch":null}"#).expect("ok");
        assert_eq!(e, Envelope::ok(None));
    }

    #[test]
    fn string_escaping() {
        let nasty = "q\"b\\s/n\nr\rt\tb\u{8}f\u{c}z\u{0}u\u{1f}é€😀\u{7f}\u{2028}";
        let e = Envelope {
            ch: Some(nasty.into()),
            from: Some(nasty.into()),
            reason: Some(nasty.into()),
            ..Envelope::new(Type::Msg)
        };
        let s = enc(&e);
        assert!(
            s.contains(r#""q\"b\\s/n\nr\rt\tb\bf\fz\u0000u\u001fé€😀"#),
            "{s}"
        );
        assert!(!s.bytes().any(|b| b < 0x20), "no raw control bytes");
        assert_eq!(dec(&s), Ok(e.clone()));
        // serde_json agrees on the string
        let v: serde_json::Value = serde_json::from_str(&s).expect("valid JSON");
        assert_eq!(v["ch"].as_str(), Some(nasty));
        assert_eq!(v["reason"].as_str(), Some(nasty));
        // escapes in input are decoded
        let e = dec(r#"{"t":"msg","from":"\u00e9\ud83d\ude00\n"}"#).expect("ok");
        assert_eq!(e.from.as_deref(), Some("é😀\n"));
    }

    #[test]
    fn newlines_in_raw_json_become_spaces() {
        let e = Envelope {
            meta: Some("{\n\"a\": \"x\\ny\"\n}".into()),
            payload: Payload::Json(Bytes::from_static(b"[\n  1,\r\n  \"\\n\"\n]")),
            ..Envelope::new(Type::Msg)
        };
        let s = enc(&e);
        assert!(!s.contains('\n'), "{s}");
        assert_eq!(
            s,
            "{\"t\":\"msg\",\"meta\":{ \"a\": \"x\\ny\" },\"d\":[   1,\r   \"\\n\" ]}"
        );
        let back = dec(&s).unwrap();
        assert_eq!(back.meta.as_deref(), Some(r#"{ "a": "x\ny" }"#));
        let v: serde_json::Value = serde_json::from_slice(back.payload.bytes()).unwrap();
        assert_eq!(v, serde_json::json!([1, "\n"]));
        assert_eq!(decode_batch(format!("{s}\n{s}").as_bytes()).count(), 2);
    }

    #[test]
    fn batch() {
        let mut msg = Vec::new();
        encode(&Envelope::ping(Some(1)), &mut msg);
        msg.extend_from_slice(b"\n\n   \r\n");
        encode(&Envelope::pong(None), &mut msg);
        msg.extend_from_slice(b"\r\n{\"t\":\"bogus\"}\n");
        encode(&full(), &mut msg);
        msg.push(b'\n');
        let got: Vec<_> = decode_batch(&msg).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], Ok(Envelope::ping(Some(1))));
        assert_eq!(got[1], Ok(Envelope::pong(None)));
        assert_eq!(got[2], Err(DecodeError::UnknownType("bogus".into())));
        assert_eq!(got[3], Ok(full()));
        assert_eq!(decode_batch(b"").count(), 0);
        assert_eq!(decode_batch(b"\n \n\t").count(), 0);
        // a newline inside a JSON string cannot occur raw (it must be escaped),
        // so splitting on b'\n' is exact; a raw one makes both halves bad.
        let got: Vec<_> = decode_batch(b"{\"t\":\"pub\",\"ch\":\"a\nb\"}").collect();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(Result::is_err));
    }
}
