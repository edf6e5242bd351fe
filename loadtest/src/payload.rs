//! Load-test payloads: publisher index, per-publisher sequence and send time.
//!
//! JSON mode: `{"p":<publisher>,"s":<seq>,"t":<ns>,"x":"<padding>"}`.
//! Binary mode: 24 bytes little-endian (p, s, t as u64) followed by padding.
//! `t` is nanoseconds since the harness's start instant, so sender and
//! receiver must be in the same process.

use bytes::Bytes;
use edgegate_proto::Payload;

use crate::Encoding;

/// A decoded load-test payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Publisher index.
    pub p: u64,
    /// Sequence number per publisher, from 1.
    pub s: u64,
    /// Send time, ns since the harness's start instant.
    pub t: u64,
}

/// Encodes a stamp with `pad` bytes of padding.
pub fn encode(enc: Encoding, st: Stamp, pad: usize) -> Payload {
    match enc {
        Encoding::Json => {
            let mut s = format!("{{\"p\":{},\"s\":{},\"t\":{}", st.p, st.s, st.t);
            if pad > 0 {
                s.push_str(",\"x\":\"");
                s.extend(std::iter::repeat_n('x', pad));
                s.push('"');
            }
            s.push('}');
            Payload::Json(Bytes::from(s))
        }
        Encoding::Binary => {
            let mut v = Vec::with_capacity(24 + pad);
            v.extend_from_slice(&st.p.to_le_bytes());
            v.extend_from_slice(&st.s.to_le_bytes());
            v.extend_from_slice(&st.t.to_le_bytes());
            v.resize(24 + pad, b'x');
            Payload::Binary(Bytes::from(v))
        }
    }
}

/// Decodes a stamp from either form.
pub fn decode(p: &Payload) -> Option<Stamp> {
    match p {
        Payload::Binary(b) => decode_binary(b),
        Payload::Json(b) => decode_json(b),
        _ => None,
    }
}

/// Decodes a binary stamp (24 bytes little-endian, then padding).
pub fn decode_binary(b: &[u8]) -> Option<Stamp> {
    let u = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
    Some(Stamp {
        p: u(0)?,
        s: u(8)?,
        t: u(16)?,
    })
}

/// Decodes a JSON stamp: our own format read straight through, and any
/// other order of the three fields found by search.
pub fn decode_json(b: &[u8]) -> Option<Stamp> {
    exact_json(b).or_else(|| searched_json(b))
}

/// `{"p":<n>,"s":<n>,"t":<n>` as [`encode`] writes it, in one pass.
fn exact_json(b: &[u8]) -> Option<Stamp> {
    let (p, b) = digits(b.strip_prefix(b"{\"p\":")?)?;
    let (s, b) = digits(b.strip_prefix(b",\"s\":")?)?;
    let (t, _) = digits(b.strip_prefix(b",\"t\":")?)?;
    Some(Stamp { p, s, t })
}

/// The decimal number at the start of `b` and what follows it (1 to 19
/// digits, read in one pass: it runs once per delivery in the harness).
fn digits(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    let mut n = 0;
    while let Some(&c) = b.get(n) {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        v = v.wrapping_mul(10).wrapping_add(u64::from(d));
        n += 1;
    }
    if n == 0 || n > 19 {
        return None;
    }
    Some((v, &b[n..]))
}

fn searched_json(b: &[u8]) -> Option<Stamp> {
    let field = |k: &[u8]| -> Option<u64> {
        let i = memchr::memmem::find(b, k)? + k.len();
        Some(digits(&b[i..])?.0)
    };
    Some(Stamp {
        p: field(b"\"p\":")?,
        s: field(b"\"s\":")?,
        t: field(b"\"t\":")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let st = Stamp {
            p: 7,
            s: 123456,
            t: 99_000_000_001,
        };
        for enc in [Encoding::Json, Encoding::Binary] {
            for pad in [0, 10] {
                let p = encode(enc, st, pad);
                assert_eq!(decode(&p), Some(st), "{enc:?} {pad}");
            }
        }
        assert_eq!(decode(&Payload::None), None);
        assert_eq!(
            decode_json(br#"{"t":3,"x":"","s":2,"p":1}"#),
            Some(Stamp { p: 1, s: 2, t: 3 }),
            "any order"
        );
        assert_eq!(decode_json(br#"{"p":1,"s":,"t":3}"#), None);
        assert_eq!(
            decode_json(br#"{"p":1,"s":2,"t":18446744073709551615}"#),
            None,
            "20 digits"
        );
        assert_eq!(
            decode_json(br#"{"p":0,"s":2,"t":9999999999999999999}"#).map(|s| s.t),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(decode_binary(&[0; 23]), None);
        assert_eq!(decode(&Payload::Json(Bytes::from_static(b"{}"))), None);
    }
}
