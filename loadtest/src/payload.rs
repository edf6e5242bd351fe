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
        Payload::Binary(b) if b.len() >= 24 => {
            let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
            Some(Stamp {
                p: u(0),
                s: u(8),
                t: u(16),
            })
        }
        Payload::Json(b) => {
            // Fast path over our own format, without a JSON parser.
            let txt = std::str::from_utf8(b).ok()?;
            let field = |k: &str| -> Option<u64> {
                let i = txt.find(k)? + k.len();
                let rest = &txt[i..];
                let end = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                rest[..end].parse().ok()
            };
            Some(Stamp {
                p: field("\"p\":")?,
                s: field("\"s\":")?,
                t: field("\"t\":")?,
            })
        }
        _ => None,
    }
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
        assert_eq!(decode(&Payload::Json(Bytes::from_static(b"{}"))), None);
    }
}
