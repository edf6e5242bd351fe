//! The binary envelope codec (docs/protocol.md §2, "Binary envelope").
//!
//! ```text
//! u8  type code
//! u8  field bits: 0x01 id, 0x02 ch, 0x04 seq, 0x08 from, 0x10 code+reason,
//!                 0x20 meta, 0x40 payload is JSON text, 0x80 reserved (0)
//! then, in bit order, only the fields whose bit is set:
//!   id     LEB128 u64
//!   ch     LEB128 length + UTF-8
//!   seq    LEB128 u64
//!   from   LEB128 length + UTF-8
//!   code   LEB128 u64, then reason as LEB128 length + UTF-8
//!   meta   LEB128 length + JSON object text
//! payload: every remaining byte
//! ```
//!
//! The envelope carries no length of its own: its end is the end of the
//! TCP/QUIC frame or of the WebSocket batch entry.
//!
//! Normalisations (the only places where decode(encode(e)) ≠ e):
//! a `reason` without a `code` is not written; an empty `reason` reads back as
//! `None`; an empty [`Payload::Binary`] reads back as [`Payload::None`];
//! whitespace around `meta` and a JSON payload is dropped.

use bytes::Bytes;

use crate::envelope::{Envelope, Payload, Type};
use crate::{DecodeError, leb128};

/// Field bit: `id` present.
pub const BIT_ID: u8 = 0x01;
/// Field bit: `ch` present.
pub const BIT_CH: u8 = 0x02;
/// Field bit: `seq` present.
pub const BIT_SEQ: u8 = 0x04;
/// Field bit: `from` present.
pub const BIT_FROM: u8 = 0x08;
/// Field bit: `code` and `reason` present.
pub const BIT_CODE: u8 = 0x10;
/// Field bit: `meta` present.
pub const BIT_META: u8 = 0x20;
/// Field bit: the payload is JSON text.
pub const BIT_JSON: u8 = 0x40;
/// Reserved field bit; must be 0.
pub const BIT_RESERVED: u8 = 0x80;

/// The field bits `env` encodes with.
fn bits(env: &Envelope) -> u8 {
    let mut b = 0;
    if env.id.is_some() {
        b |= BIT_ID;
    }
    if env.ch.is_some() {
        b |= BIT_CH;
    }
    if env.seq.is_some() {
        b |= BIT_SEQ;
    }
    if env.from.is_some() {
        b |= BIT_FROM;
    }
    if env.code.is_some() {
        b |= BIT_CODE;
    }
    if env.meta.is_some() {
        b |= BIT_META;
    }
    if env.payload.is_json() {
        b |= BIT_JSON;
    }
    b
}

fn str_len(s: &str) -> usize {
    leb128::len_u64(s.len() as u64) + s.len()
}

/// The exact number of bytes [`encode`] appends for `env`.
pub fn encoded_len(env: &Envelope) -> usize {
    let mut n = 2;
    if let Some(id) = env.id {
        n += leb128::len_u64(id);
    }
    if let Some(ch) = &env.ch {
        n += str_len(ch);
    }
    if let Some(seq) = env.seq {
        n += leb128::len_u64(seq);
    }
    if let Some(from) = &env.from {
        n += str_len(from);
    }
    if let Some(code) = env.code {
        n += leb128::len_u64(u64::from(code));
        n += str_len(env.reason.as_deref().unwrap_or(""));
    }
    if let Some(meta) = &env.meta {
        n += str_len(meta);
    }
    n + env.payload.bytes().len()
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    leb128::write_u64(s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

/// Appends one envelope to `out` (no length prefix).
///
/// `meta` and a [`Payload::Json`] are trusted to be a JSON object and JSON
/// text. `reason` is written only with `code` (as `""` when `None`).
pub fn encode(env: &Envelope, out: &mut Vec<u8>) {
    out.reserve(encoded_len(env));
    out.push(env.t.code());
    out.push(bits(env));
    if let Some(id) = env.id {
        leb128::write_u64(id, out);
    }
    if let Some(ch) = &env.ch {
        write_str(ch, out);
    }
    if let Some(seq) = env.seq {
        leb128::write_u64(seq, out);
    }
    if let Some(from) = &env.from {
        write_str(from, out);
    }
    if let Some(code) = env.code {
        leb128::write_u64(u64::from(code), out);
        write_str(env.reason.as_deref().unwrap_or(""), out);
    }
    if let Some(meta) = &env.meta {
        write_str(meta, out);
    }
    out.extend_from_slice(env.payload.bytes());
}

/// A read position in an envelope.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.buf.split_first().ok_or(DecodeError::Truncated)?;
        self.buf = rest;
        Ok(b)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let (v, n) = leb128::read_u64(self.buf)?;
        self.buf = self.buf.get(n..).ok_or(DecodeError::Truncated)?;
        Ok(v)
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let len = usize::try_from(self.u64()?).map_err(|_| DecodeError::Truncated)?;
        if len > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        std::str::from_utf8(s).map_err(|_| DecodeError::BadUtf8(field))
    }
}

/// True when `s` is one valid JSON value (RFC 8259 text, surrounding
/// whitespace allowed). serde_json skips an ignored value iteratively, so
/// any nesting depth is checked without recursion.
pub(crate) fn is_json_text(s: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok()
}

/// `s` without leading and trailing JSON whitespace (space, tab, CR, LF).
fn trim_json_ws(s: &str) -> &str {
    s.trim_matches([' ', '\t', '\r', '\n'])
}

/// One binary envelope read in place: the fields borrowed from the buffer,
/// nothing allocated and nothing checked beyond the framing (UTF-8 of the
/// strings included). [`decode`] is this plus the JSON checks and owned
/// copies; a reader that needs only a few fields of many envelopes (a load
/// generator counting deliveries, a relay) reads the view alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View<'a> {
    /// Envelope type.
    pub t: Type,
    /// Field bits as written (see the `BIT_*` constants).
    pub bits: u8,
    /// `id`.
    pub id: Option<u64>,
    /// `ch`.
    pub ch: Option<&'a str>,
    /// `seq`.
    pub seq: Option<u64>,
    /// `from`.
    pub from: Option<&'a str>,
    /// `code` and `reason` (possibly empty).
    pub code: Option<(u64, &'a str)>,
    /// `meta`, as written (not checked to be JSON).
    pub meta: Option<&'a str>,
    /// Every byte after the fields.
    pub payload: &'a [u8],
}

/// Reads the fields of one binary envelope that fills all of `buf`, borrowed.
///
/// # Errors
/// Truncated fields, an unknown type code, the reserved bit set, LEB128
/// overflow, strings that are not UTF-8.
pub fn view(buf: &[u8]) -> Result<View<'_>, DecodeError> {
    let mut r = Reader { buf };
    let code = r.u8()?;
    let t = Type::from_code(code).ok_or(DecodeError::BadType(code))?;
    let bits = r.u8()?;
    if bits & BIT_RESERVED != 0 {
        return Err(DecodeError::ReservedBit);
    }
    let id = (bits & BIT_ID != 0).then(|| r.u64()).transpose()?;
    let ch = (bits & BIT_CH != 0).then(|| r.str("ch")).transpose()?;
    let seq = (bits & BIT_SEQ != 0).then(|| r.u64()).transpose()?;
    let from = (bits & BIT_FROM != 0).then(|| r.str("from")).transpose()?;
    let code = (bits & BIT_CODE != 0)
        .then(|| Ok::<_, DecodeError>((r.u64()?, r.str("reason")?)))
        .transpose()?;
    let meta = (bits & BIT_META != 0).then(|| r.str("meta")).transpose()?;
    Ok(View {
        t,
        bits,
        id,
        ch,
        seq,
        from,
        code,
        meta,
        payload: r.buf,
    })
}

/// Decodes one binary envelope that fills all of `buf`.
///
/// `meta` and a JSON payload are kept without surrounding whitespace, as the
/// JSON codec keeps them, so an envelope reads the same from either codec.
///
/// # Errors
/// Truncated fields, an unknown type code, the reserved bit set, LEB128
/// overflow, `code` over `u32`, strings that are not UTF-8, `meta` that is not
/// a JSON object, or bit 0x40 set with a payload that is not JSON text (an
/// empty one included).
pub fn decode(buf: &[u8]) -> Result<Envelope, DecodeError> {
    let v = view(buf)?;
    let mut env = Envelope::new(v.t);
    env.id = v.id;
    env.ch = v.ch.map(str::to_owned);
    env.seq = v.seq;
    env.from = v.from.map(str::to_owned);
    if let Some((code, reason)) = v.code {
        env.code = Some(u32::try_from(code).map_err(|_| DecodeError::OutOfRange("code"))?);
        if !reason.is_empty() {
            env.reason = Some(reason.to_owned());
        }
    }
    if let Some(meta) = v.meta {
        let meta = trim_json_ws(meta);
        if !meta.starts_with('{') || !is_json_text(meta) {
            return Err(DecodeError::BadMeta);
        }
        env.meta = Some(meta.to_owned());
    }
    let rest = v.payload;
    env.payload = if v.bits & BIT_JSON != 0 {
        let text = std::str::from_utf8(rest).map_err(|_| DecodeError::BadPayload)?;
        if !is_json_text(text) {
            return Err(DecodeError::BadPayload);
        }
        Payload::Json(Bytes::copy_from_slice(trim_json_ws(text).as_bytes()))
    } else if rest.is_empty() {
        Payload::None
    } else {
        Payload::Binary(Bytes::copy_from_slice(rest))
    };
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CloseCode, ErrCode};

    fn enc(env: &Envelope) -> Vec<u8> {
        let mut out = Vec::new();
        encode(env, &mut out);
        assert_eq!(out.len(), encoded_len(env));
        out
    }

    #[test]
    fn view_borrows_every_field() {
        let e = Envelope {
            t: Type::Msg,
            id: Some(9),
            ch: Some("room:a".into()),
            seq: Some(77),
            from: Some("bob".into()),
            code: Some(4),
            reason: Some("r".into()),
            meta: Some(r#"{"k":1}"#.into()),
            payload: Payload::Binary(Bytes::from_static(b"\x01\x02")),
        };
        let b = enc(&e);
        let v = view(&b).expect("view");
        assert_eq!(
            (v.t, v.id, v.ch, v.seq, v.from, v.code, v.meta, v.payload),
            (
                Type::Msg,
                Some(9),
                Some("room:a"),
                Some(77),
                Some("bob"),
                Some((4, "r")),
                Some(r#"{"k":1}"#),
                &b"\x01\x02"[..]
            )
        );
        assert_eq!(v.bits & BIT_JSON, 0);
        assert_eq!(view(&b[..b.len() - 3]).err(), Some(DecodeError::Truncated));
    }

    #[test]
    fn minimal_per_type() {
        for t in Type::ALL {
            let e = Envelope::new(t);
            let b = enc(&e);
            assert_eq!(b, [t.code(), 0]);
            assert_eq!(decode(&b), Ok(e));
        }
    }

    #[test]
    fn each_field_bit() {
        let cases: Vec<(Envelope, u8, Vec<u8>)> = vec![
            (
                Envelope {
                    id: Some(300),
                    ..Envelope::new(Type::Ok)
                },
                BIT_ID,
                vec![0xac, 0x02],
            ),
            (
                Envelope {
                    ch: Some("room:a".into()),
                    ..Envelope::new(Type::Sub)
                },
                BIT_CH,
                [&[6u8][..], b"room:a"].concat(),
            ),
            (
                Envelope {
                    seq: Some(5),
                    ..Envelope::new(Type::Ok)
                },
                BIT_SEQ,
                vec![5],
            ),
            (
                Envelope {
                    from: Some("bob".into()),
                    ..Envelope::new(Type::Msg)
                },
                BIT_FROM,
                [&[3u8][..], b"bob"].concat(),
            ),
            (
                Envelope::err(None, ErrCode::Forbidden, "no"),
                BIT_CODE,
                [&[3u8, 2][..], b"no"].concat(),
            ),
            (
                Envelope {
                    meta: Some("{}".into()),
                    ..Envelope::new(Type::Hello)
                },
                BIT_META,
                [&[2u8][..], b"{}"].concat(),
            ),
            (
                Envelope {
                    payload: Payload::Json(Bytes::from_static(b"[1]")),
                    ..Envelope::new(Type::Pub)
                },
                BIT_JSON,
                b"[1]".to_vec(),
            ),
            (
                Envelope {
                    payload: Payload::Binary(Bytes::from_static(b"\x00\x01")),
                    ..Envelope::new(Type::Pub)
                },
                0,
                vec![0, 1],
            ),
        ];
        for (e, bit, body) in cases {
            let b = enc(&e);
            assert_eq!(b[0], e.t.code());
            assert_eq!(b[1], bit, "{e:?}");
            assert_eq!(&b[2..], &body[..], "{e:?}");
            assert_eq!(decode(&b), Ok(e));
        }
    }

    #[test]
    fn all_fields_in_bit_order() {
        let e = Envelope {
            t: Type::Msg,
            id: Some(1),
            ch: Some("c".into()),
            seq: Some(2),
            from: Some("f".into()),
            code: Some(3),
            reason: Some("r".into()),
            meta: Some(r#"{"m":0}"#.into()),
            payload: Payload::Json(Bytes::from_static(b"\"p\"")),
        };
        let b = enc(&e);
        let mut want = vec![67, 0x7f, 1, 1, b'c', 2, 1, b'f', 3, 1, b'r', 7];
        want.extend_from_slice(br#"{"m":0}"#);
        want.extend_from_slice(b"\"p\"");
        assert_eq!(b, want);
        assert_eq!(decode(&b), Ok(e));
    }

    #[test]
    fn reason_normalisation() {
        // code without reason: written as "", read back as None
        let e = Envelope::bye(CloseCode::PROTOCOL_ERROR, "", None);
        let b = enc(&e);
        assert_eq!(b, [69, BIT_CODE, 0xa0, 0x1f, 0]);
        assert_eq!(decode(&b), Ok(e));
        // empty reason reads back as None
        let e = Envelope {
            reason: Some(String::new()),
            ..Envelope::bye(1000u16, "", None)
        };
        assert_eq!(decode(&enc(&e)).unwrap().reason, None);
        // reason without code is not written
        let e = Envelope {
            reason: Some("x".into()),
            ..Envelope::new(Type::Err)
        };
        assert_eq!(enc(&e), [66, 0]);
    }

    #[test]
    fn payload_kinds() {
        // empty binary payload reads back as None
        let e = Envelope {
            payload: Payload::Binary(Bytes::new()),
            ..Envelope::new(Type::Pub)
        };
        assert_eq!(decode(&enc(&e)).unwrap().payload, Payload::None);
        // JSON bit with empty payload: error
        assert_eq!(decode(&[4, BIT_JSON]), Err(DecodeError::BadPayload));
        // JSON bit with non-JSON: error
        assert_eq!(decode(&[4, BIT_JSON, b'{']), Err(DecodeError::BadPayload));
        assert_eq!(
            decode(&[4, BIT_JSON, b'1', b'2', b' ', b'3']),
            Err(DecodeError::BadPayload)
        );
        assert_eq!(decode(b"\x04\x40\"\xff\""), Err(DecodeError::BadPayload));
        // JSON text: inner whitespace kept, surrounding whitespace dropped
        let b = b"\x04\x40 \t[ 1 ]\r\n";
        assert_eq!(
            decode(b).unwrap().payload,
            Payload::Json(Bytes::from_static(b"[ 1 ]"))
        );
        // non-JSON bytes without the bit are binary
        assert_eq!(
            decode(b"\x04\x00{").unwrap().payload,
            Payload::Binary(Bytes::from_static(b"{"))
        );
        // valid JSON without the bit is still binary (the bit decides)
        assert_eq!(
            decode(b"\x04\x001").unwrap().payload,
            Payload::Binary(Bytes::from_static(b"1"))
        );
        // RFC 8259 sets no range on numbers: -8e318 is valid JSON text
        assert!(decode(b"\x04\x40[-8076388380008745e+303]").is_ok_and(|e| e.payload.is_json()));
        // deep nesting is validated iteratively: no stack overflow
        let mut deep = vec![4, BIT_JSON];
        deep.extend(std::iter::repeat_n(b'[', 100_000));
        deep.extend(std::iter::repeat_n(b']', 100_000));
        assert!(decode(&deep).is_ok_and(|e| e.payload.is_json()));
        deep.pop();
        assert_eq!(decode(&deep), Err(DecodeError::BadPayload));
    }

    #[test]
    fn meta_validation() {
        let with_meta = |m: &[u8]| {
            let mut b = vec![1, BIT_META, m.len() as u8];
            b.extend_from_slice(m);
            decode(&b)
        };
        assert_eq!(
            with_meta(br#"{"token":"t"}"#).unwrap().meta.as_deref(),
            Some(r#"{"token":"t"}"#)
        );
        assert_eq!(
            with_meta(b" {\n} \n").unwrap().meta.as_deref(),
            Some("{\n}")
        );
        for bad in [
            &b""[..],
            b"[]",
            b"1",
            b"null",
            b"\"{}\"",
            b"{",
            b"{} {}",
            b"{\"a\":}",
        ] {
            assert_eq!(with_meta(bad), Err(DecodeError::BadMeta), "{bad:?}");
        }
        assert_eq!(with_meta(b"\xff"), Err(DecodeError::BadUtf8("meta")));
    }

    #[test]
    fn reserved_bit_and_type() {
        assert_eq!(decode(&[1, 0x80]), Err(DecodeError::ReservedBit));
        assert_eq!(decode(&[1, 0xff]), Err(DecodeError::ReservedBit));
        assert_eq!(decode(&[0, 0]), Err(DecodeError::BadType(0)));
        assert_eq!(decode(&[10, 0]), Err(DecodeError::BadType(10)));
        assert_eq!(decode(&[71, 0]), Err(DecodeError::BadType(71)));
        assert_eq!(decode(&[255, 0]), Err(DecodeError::BadType(255)));
    }

    #[test]
    fn truncation() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[1]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[1, BIT_ID]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[1, BIT_ID, 0x80]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[1, BIT_CH]), Err(DecodeError::Truncated));
        assert_eq!(
            decode(&[1, BIT_CH, 3, b'a', b'b']),
            Err(DecodeError::Truncated)
        );
        assert_eq!(decode(&[1, BIT_SEQ]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[1, BIT_FROM, 1]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[66, BIT_CODE, 1]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[66, BIT_CODE, 1, 1]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[1, BIT_META, 2, b'{']), Err(DecodeError::Truncated));
        // a huge string length does not allocate or overflow
        let mut b = vec![1, BIT_CH];
        leb128::write_u64(u64::MAX, &mut b);
        assert_eq!(decode(&b), Err(DecodeError::Truncated));
        // id present but a second field's bit set with nothing left
        assert_eq!(
            decode(&[1, BIT_ID | BIT_SEQ, 5]),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn leb_overflow_and_code_range() {
        let mut b = vec![65, BIT_ID];
        b.extend_from_slice(&[0xff; 10]);
        assert_eq!(decode(&b), Err(DecodeError::Leb128Overflow));
        let e = Envelope {
            id: Some(u64::MAX),
            seq: Some(u64::MAX),
            ..Envelope::new(Type::Ok)
        };
        assert_eq!(decode(&enc(&e)), Ok(e));
        let e = Envelope {
            code: Some(u32::MAX),
            ..Envelope::new(Type::Bye)
        };
        assert_eq!(decode(&enc(&e)), Ok(e));
        let mut b = vec![69, BIT_CODE];
        leb128::write_u64(u64::from(u32::MAX) + 1, &mut b);
        b.push(0);
        assert_eq!(decode(&b), Err(DecodeError::OutOfRange("code")));
    }

    #[test]
    fn bad_utf8_names_field() {
        assert_eq!(
            decode(&[67, BIT_CH, 1, 0xff]),
            Err(DecodeError::BadUtf8("ch"))
        );
        assert_eq!(
            decode(&[67, BIT_FROM, 1, 0xc3]),
            Err(DecodeError::BadUtf8("from"))
        );
        assert_eq!(
            decode(&[66, BIT_CODE, 1, 1, 0x80]),
            Err(DecodeError::BadUtf8("reason"))
        );
    }

    #[test]
    fn err_code_is_number() {
        for c in ErrCode::ALL {
            let b = enc(&Envelope::err(Some(9), c, ""));
            assert_eq!(b, [66, BIT_ID | BIT_CODE, 9, c.number() as u8, 0]);
            assert_eq!(decode(&b).unwrap().err_code(), Some(c));
        }
    }

    #[test]
    fn bye_with_retry() {
        let e = Envelope::bye(CloseCode::OVERLOADED, "full", Some(250));
        let back = decode(&enc(&e)).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.meta.as_deref(), Some(r#"{"retry_ms":250}"#));
    }
}
