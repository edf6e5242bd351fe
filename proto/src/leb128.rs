//! Unsigned LEB128 (little-endian base 128) integers, as used by the binary
//! envelope's fields and by the length prefixes of WebSocket binary batches.
//!
//! Each byte carries 7 bits of the value, least significant first; the high
//! bit says another byte follows. A `u64` takes 1 to [`MAX_LEN`] bytes.
//! [`read_u64`] accepts non-minimal encodings (e.g. `0x80 0x00` for 0) but
//! rejects anything longer than 10 bytes or with value bits past bit 63.

use crate::DecodeError;

/// The most bytes a LEB128 `u64` takes.
pub const MAX_LEN: usize = 10;

/// Appends `v` as LEB128 to `out` (1 to 10 bytes, minimal).
#[inline]
pub fn write_u64(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The number of bytes [`write_u64`] writes for `v`.
#[inline]
pub const fn len_u64(v: u64) -> usize {
    // bits needed (at least 1), 7 per byte
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads a LEB128 `u64` from the front of `buf`.
///
/// Returns the value and how many bytes it took.
///
/// # Errors
/// [`DecodeError::Truncated`] when `buf` ends before the last byte (the one
/// with the high bit clear); [`DecodeError::Leb128Overflow`] when the number
/// runs past 10 bytes or its value does not fit in 64 bits.
#[inline]
pub fn read_u64(buf: &[u8]) -> Result<(u64, usize), DecodeError> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().enumerate() {
        if i == MAX_LEN - 1 {
            // 10th byte: only bit 0 is left in a u64 (9 * 7 = 63), and no continuation.
            if b > 1 {
                return Err(DecodeError::Leb128Overflow);
            }
            return Ok((v | (u64::from(b) << 63), MAX_LEN));
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    Err(DecodeError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        write_u64(v, &mut out);
        out
    }

    #[test]
    fn known_encodings() {
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(1), [0x01]);
        assert_eq!(enc(127), [0x7f]);
        assert_eq!(enc(128), [0x80, 0x01]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(enc(16_383), [0xff, 0x7f]);
        assert_eq!(enc(16_384), [0x80, 0x80, 0x01]);
        let max = enc(u64::MAX);
        assert_eq!(max.len(), 10);
        assert_eq!(max[..9], [0xff; 9]);
        assert_eq!(max[9], 0x01);
        assert_eq!(enc(1 << 63).len(), 10);
        assert_eq!(enc((1 << 63) - 1).len(), 9);
    }

    #[test]
    fn round_trip_and_len() {
        let mut vals = vec![
            0,
            1,
            127,
            128,
            255,
            256,
            16_383,
            16_384,
            u64::MAX,
            u64::MAX - 1,
        ];
        for s in 0..64 {
            vals.push(1u64 << s);
            vals.push((1u64 << s) - 1);
            vals.push((1u64 << s) + 1);
        }
        for v in vals {
            let b = enc(v);
            assert_eq!(b.len(), len_u64(v), "len of {v}");
            assert_eq!(read_u64(&b), Ok((v, b.len())), "value {v}");
            // trailing bytes are not consumed
            let mut more = b.clone();
            more.extend_from_slice(&[0xff, 0x00]);
            assert_eq!(read_u64(&more), Ok((v, b.len())));
        }
    }

    #[test]
    fn truncated() {
        assert_eq!(read_u64(&[]), Err(DecodeError::Truncated));
        assert_eq!(read_u64(&[0x80]), Err(DecodeError::Truncated));
        assert_eq!(read_u64(&[0xff; 9]), Err(DecodeError::Truncated));
    }

    #[test]
    fn ten_byte_max_and_overflow() {
        // 10 bytes, last = 1: u64::MAX-ish, fine
        let mut b = vec![0xff; 9];
        b.push(0x01);
        assert_eq!(read_u64(&b), Ok((u64::MAX, 10)));
        // 10th byte with value bit past 63
        let mut b = vec![0xff; 9];
        b.push(0x02);
        assert_eq!(read_u64(&b), Err(DecodeError::Leb128Overflow));
        // 10th byte with continuation: an 11-byte number
        let mut b = vec![0x80; 9];
        b.push(0x80);
        b.push(0x00);
        assert_eq!(read_u64(&b), Err(DecodeError::Leb128Overflow));
        // 10th byte 0x81 (continuation + bit)
        let mut b = vec![0xff; 9];
        b.push(0x81);
        assert_eq!(read_u64(&b), Err(DecodeError::Leb128Overflow));
        // a long run of continuation bytes never reads past 10
        assert_eq!(read_u64(&[0x80; 100]), Err(DecodeError::Leb128Overflow));
    }

    #[test]
    fn non_minimal_accepted() {
        assert_eq!(read_u64(&[0x80, 0x00]), Ok((0, 2)));
        assert_eq!(read_u64(&[0x81, 0x80, 0x00]), Ok((1, 3)));
        let mut b = vec![0x80; 9];
        b.push(0x00);
        assert_eq!(read_u64(&b), Ok((0, 10)));
    }
}
