//! Framing: how envelopes are cut out of a byte stream or a WebSocket
//! message (docs/protocol.md §1).
//!
//! * **TCP and QUIC:** each binary envelope is preceded by its length as a
//!   `u32` big-endian ([`write_frame`], [`encode_frame`], [`peek_frame`]).
//!   On TCP the client first sends [`PREFACE`].
//! * **WebSocket binary mode:** one WS message holds one or more binary
//!   envelopes, each preceded by its length as LEB128
//!   ([`encode_ws_binary`], [`split_ws_binary`]).
//! * **WebSocket text mode:** see [`json::decode_batch`](crate::json::decode_batch).

use crate::envelope::Envelope;
use crate::{DecodeError, binary, leb128};

/// The 4 bytes a TCP client sends first: `EG1` + `\n`.
pub const PREFACE: [u8; 4] = *b"EG1\n";

/// Size of the TCP/QUIC length prefix.
pub const LEN_BYTES: usize = 4;

/// Appends a TCP/QUIC frame: `u32` big-endian length, then `env_bytes`.
///
/// A body longer than `u32::MAX` bytes cannot be framed; its length is
/// saturated (callers keep bodies far below `max_frame`).
pub fn write_frame(env_bytes: &[u8], out: &mut Vec<u8>) {
    let n = u32::try_from(env_bytes.len()).unwrap_or(u32::MAX);
    out.reserve(LEN_BYTES + env_bytes.len());
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(env_bytes);
}

/// Appends `env` as a TCP/QUIC frame, encoding in place: 4 bytes are
/// reserved, the binary envelope appended, and the length patched.
pub fn encode_frame(env: &Envelope, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_BYTES]);
    binary::encode(env, out);
    let n = u32::try_from(out.len() - start - LEN_BYTES).unwrap_or(u32::MAX);
    out[start..start + LEN_BYTES].copy_from_slice(&n.to_be_bytes());
}

/// A frame that may not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix says `len`, over the connection's `max`: answer
    /// `bye` 4006 without reading the body.
    TooLarge {
        /// The announced body length.
        len: u32,
        /// The connection's maximum.
        max: u32,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes over the maximum of {max}")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Looks at the front of a TCP/QUIC read buffer.
///
/// * `Ok(None)`: need more bytes (fewer than 4, or the body is incomplete).
/// * `Ok(Some(n))`: a whole frame is there; its body is
///   `buf[LEN_BYTES..LEN_BYTES + n]` and the next frame starts at
///   `LEN_BYTES + n`.
/// * `Err(TooLarge)`: as soon as the 4 length bytes are there and say more
///   than `max`, without waiting for the body.
///
/// A zero-length frame is `Ok(Some(0))`; its empty body then fails to decode.
pub fn peek_frame(buf: &[u8], max: u32) -> Result<Option<usize>, FrameError> {
    let Some(len) = buf.first_chunk::<LEN_BYTES>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*len);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let n = len as usize;
    if buf.len() - LEN_BYTES < n {
        return Ok(None);
    }
    Ok(Some(n))
}

/// Appends `env` to a WebSocket binary message: LEB128 length, then the
/// binary envelope. Call repeatedly to batch.
pub fn encode_ws_binary(env: &Envelope, out: &mut Vec<u8>) {
    let n = binary::encoded_len(env);
    out.reserve(leb128::len_u64(n as u64) + n);
    leb128::write_u64(n as u64, out);
    binary::encode(env, out);
}

/// Splits a WebSocket binary message into its envelopes (each preceded by its
/// LEB128 length), yielding each envelope's bytes for
/// [`binary::decode`].
///
/// A length that overflows or runs past the end of the message yields one
/// `Err` and ends the iteration (nothing after it can be found). A zero
/// length yields an empty slice, which does not decode.
pub fn split_ws_binary(msg: &[u8]) -> impl Iterator<Item = Result<&[u8], DecodeError>> + '_ {
    WsBinarySplit { rest: msg }
}

/// Iterator behind [`split_ws_binary`].
struct WsBinarySplit<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for WsBinarySplit<'a> {
    type Item = Result<&'a [u8], DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let item = leb128::read_u64(self.rest).and_then(|(len, used)| {
            let body = &self.rest[used..];
            match usize::try_from(len) {
                Ok(len) if len <= body.len() => {
                    let (env, rest) = body.split_at(len);
                    self.rest = rest;
                    Ok(env)
                }
                _ => Err(DecodeError::Truncated),
            }
        });
        if item.is_err() {
            self.rest = &[];
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Payload, Type};
    use bytes::Bytes;

    fn msg() -> Envelope {
        Envelope {
            ch: Some("room:lobby".into()),
            from: Some("alice".into()),
            payload: Payload::Json(Bytes::from_static(b"{\"a\":1}")),
            ..Envelope::new(Type::Msg)
        }
    }

    #[test]
    fn preface() {
        assert_eq!(PREFACE, [0x45, 0x47, 0x31, 0x0a]);
    }

    #[test]
    fn write_and_encode_agree() {
        let e = msg();
        let mut body = Vec::new();
        binary::encode(&e, &mut body);
        let mut a = vec![9, 9];
        write_frame(&body, &mut a);
        let mut b = vec![9, 9];
        encode_frame(&e, &mut b);
        assert_eq!(a, b);
        assert_eq!(&a[2..6], &(body.len() as u32).to_be_bytes());
        assert_eq!(peek_frame(&a[2..], 1 << 20), Ok(Some(body.len())));
    }

    #[test]
    fn peek_need_more() {
        let mut f = Vec::new();
        encode_frame(&msg(), &mut f);
        let n = f.len() - LEN_BYTES;
        for cut in 0..f.len() {
            assert_eq!(peek_frame(&f[..cut], 1 << 20), Ok(None), "cut at {cut}");
        }
        assert_eq!(peek_frame(&f, 1 << 20), Ok(Some(n)));
        // extra bytes of the next frame do not matter
        f.extend_from_slice(&[0, 0]);
        assert_eq!(peek_frame(&f, 1 << 20), Ok(Some(n)));
        let env = binary::decode(&f[LEN_BYTES..LEN_BYTES + n]).unwrap();
        assert_eq!(env, msg());
    }

    #[test]
    fn peek_too_large_before_body() {
        // only the length, no body at all
        let hdr = 1001u32.to_be_bytes();
        assert_eq!(
            peek_frame(&hdr, 1000),
            Err(FrameError::TooLarge {
                len: 1001,
                max: 1000
            })
        );
        assert_eq!(peek_frame(&hdr[..3], 1000), Ok(None));
        assert_eq!(peek_frame(&1000u32.to_be_bytes(), 1000), Ok(None));
        assert_eq!(
            peek_frame(&u32::MAX.to_be_bytes(), u32::MAX - 1),
            Err(FrameError::TooLarge {
                len: u32::MAX,
                max: u32::MAX - 1
            })
        );
        assert_eq!(peek_frame(&u32::MAX.to_be_bytes(), u32::MAX), Ok(None));
        // exactly max is allowed
        let mut f = 3u32.to_be_bytes().to_vec();
        f.extend_from_slice(&[6, 0, 0]);
        assert_eq!(peek_frame(&f, 3), Ok(Some(3)));
        assert_eq!(
            peek_frame(&f, 2),
            Err(FrameError::TooLarge { len: 3, max: 2 })
        );
        // zero-length frame
        assert_eq!(peek_frame(&[0, 0, 0, 0], 0), Ok(Some(0)));
        assert!(
            FrameError::TooLarge { len: 5, max: 4 }
                .to_string()
                .contains("over the maximum")
        );
    }

    #[test]
    fn frames_in_a_stream() {
        let envs = [
            Envelope::ping(Some(1)),
            msg(),
            Envelope::bye(4000u16, "x", None),
        ];
        let mut stream = Vec::new();
        for e in &envs {
            encode_frame(e, &mut stream);
        }
        let mut got = Vec::new();
        let mut buf = &stream[..];
        while let Some(n) = peek_frame(buf, 1024).unwrap() {
            got.push(binary::decode(&buf[LEN_BYTES..LEN_BYTES + n]).unwrap());
            buf = &buf[LEN_BYTES + n..];
        }
        assert!(buf.is_empty());
        assert_eq!(got, envs);
    }

    #[test]
    fn ws_binary_batch() {
        let big = Envelope {
            payload: Payload::Binary(Bytes::from(vec![7u8; 300])),
            ..Envelope::new(Type::Pub)
        };
        let envs = [Envelope::ping(None), msg(), big];
        let mut m = Vec::new();
        for e in &envs {
            encode_ws_binary(e, &mut m);
        }
        // the big one has a 2-byte LEB128 length (302 bytes)
        let got: Vec<Envelope> = split_ws_binary(&m)
            .map(|r| binary::decode(r.unwrap()).unwrap())
            .collect();
        assert_eq!(got, envs);
        assert_eq!(m[0], 2);
        assert_eq!(&m[1..3], &[6, 0]);
        // a batch of one
        let mut one = Vec::new();
        encode_ws_binary(&msg(), &mut one);
        assert_eq!(split_ws_binary(&one).count(), 1);
        // empty message: nothing
        assert_eq!(split_ws_binary(&[]).count(), 0);
    }

    #[test]
    fn ws_binary_bad_lengths() {
        // length past the end: one error, then nothing
        let got: Vec<_> = split_ws_binary(&[2, 6, 0, 5, 1]).collect();
        assert_eq!(got, vec![Ok(&[6u8, 0][..]), Err(DecodeError::Truncated)]);
        // truncated LEB128
        let got: Vec<_> = split_ws_binary(&[0x80]).collect();
        assert_eq!(got, vec![Err(DecodeError::Truncated)]);
        // overflowing LEB128
        let got: Vec<_> = split_ws_binary(&[0xff; 12]).collect();
        assert_eq!(got, vec![Err(DecodeError::Leb128Overflow)]);
        // huge length
        let mut m = Vec::new();
        leb128::write_u64(u64::MAX, &mut m);
        let got: Vec<_> = split_ws_binary(&m).collect();
        assert_eq!(got, vec![Err(DecodeError::Truncated)]);
        // zero length yields an empty slice, which does not decode
        let got: Vec<_> = split_ws_binary(&[0, 2, 6, 0]).collect();
        assert_eq!(got, vec![Ok(&[][..]), Ok(&[6u8, 0][..])]);
        assert_eq!(binary::decode(&[]), Err(DecodeError::Truncated));
    }
}
