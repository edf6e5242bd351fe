//! The decode error shared by every codec in this crate.

use std::fmt;

/// Longest piece of peer input quoted back inside an error message.
const QUOTE_MAX: usize = 64;
/// Longest message carried by [`DecodeError::BadJson`].
const MSG_MAX: usize = 200;

/// Why bytes did not decode.
///
/// Every variant's [`Display`](fmt::Display) text says what is wrong in a few
/// words and quotes at most a short piece of the input, so it is safe to send
/// back to the peer as the `reason` of a `bye` or `err`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended in the middle of a field.
    Truncated,
    /// Binary: the type code names no [`Type`](crate::Type).
    BadType(u8),
    /// JSON: `t` names no [`Type`](crate::Type) (the name, shortened).
    UnknownType(String),
    /// JSON: the envelope has no `t`.
    MissingType,
    /// Binary: the reserved field bit 0x80 is set.
    ReservedBit,
    /// A string field (named) is not valid UTF-8.
    BadUtf8(&'static str),
    /// The text is not valid JSON, or a field has the wrong JSON type
    /// (serde_json's message, shortened).
    BadJson(String),
    /// JSON: non-whitespace after the envelope object.
    TrailingBytes,
    /// `meta` is not a JSON object.
    BadMeta,
    /// `db` is not standard base64 with padding.
    BadBase64,
    /// Both `d` and `db` are present.
    DAndDb,
    /// Binary: bit 0x40 (payload is JSON text) is set but the payload is not
    /// valid JSON text (or is empty).
    BadPayload,
    /// A LEB128 number is longer than 10 bytes or does not fit in a `u64`.
    Leb128Overflow,
    /// A number (the field named) is out of range (e.g. `code` over `u32`).
    OutOfRange(&'static str),
    /// JSON: `code` is a string that names no [`ErrCode`](crate::ErrCode).
    UnknownErrCode(String),
    /// JSON: `code` is neither a string nor an unsigned number.
    BadCode,
}

impl DecodeError {
    /// Builds [`DecodeError::BadJson`] from a serde_json error, shortened.
    pub(crate) fn json(e: &serde_json::Error) -> Self {
        DecodeError::BadJson(shorten(&e.to_string(), MSG_MAX))
    }

    pub(crate) fn unknown_type(name: &str) -> Self {
        DecodeError::UnknownType(shorten(name, QUOTE_MAX))
    }

    pub(crate) fn unknown_err_code(name: &str) -> Self {
        DecodeError::UnknownErrCode(shorten(name, QUOTE_MAX))
    }
}

/// `s` cut to at most `max` bytes on a character boundary, with `…` when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 3);
    out.push_str(&s[..end]);
    out.push('…');
    out
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("envelope truncated"),
            DecodeError::BadType(c) => write!(f, "unknown type code {c}"),
            DecodeError::UnknownType(t) => write!(f, "unknown type {t:?}"),
            DecodeError::MissingType => f.write_str("missing field `t`"),
            DecodeError::ReservedBit => f.write_str("reserved field bit 0x80 set"),
            DecodeError::BadUtf8(field) => write!(f, "field `{field}` is not valid UTF-8"),
            DecodeError::BadJson(m) => write!(f, "bad JSON: {m}"),
            DecodeError::TrailingBytes => f.write_str("trailing bytes after the envelope"),
            DecodeError::BadMeta => f.write_str("`meta` is not a JSON object"),
            DecodeError::BadBase64 => f.write_str("`db` is not valid base64"),
            DecodeError::DAndDb => f.write_str("both `d` and `db` present"),
            DecodeError::BadPayload => f.write_str("payload marked JSON is not valid JSON text"),
            DecodeError::Leb128Overflow => f.write_str("LEB128 number overflows u64"),
            DecodeError::OutOfRange(field) => write!(f, "field `{field}` out of range"),
            DecodeError::UnknownErrCode(c) => write!(f, "unknown err code {c:?}"),
            DecodeError::BadCode => f.write_str("`code` must be a string or an unsigned number"),
        }
    }
}

impl std::error::Error for DecodeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorten_cuts_on_char_boundary() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcd", 3), "abc…");
        // 'é' is 2 bytes: cutting at 2 would split it.
        assert_eq!(shorten("aéb", 2), "a…");
        let long = "x".repeat(1000);
        let e = DecodeError::unknown_type(&long);
        assert!(e.to_string().len() < 100);
    }

    #[test]
    fn display_is_short_and_specific() {
        let all = [
            DecodeError::Truncated,
            DecodeError::BadType(9),
            DecodeError::UnknownType("x".into()),
            DecodeError::MissingType,
            DecodeError::ReservedBit,
            DecodeError::BadUtf8("ch"),
            DecodeError::BadJson("eof".into()),
            DecodeError::TrailingBytes,
            DecodeError::BadMeta,
            DecodeError::BadBase64,
            DecodeError::DAndDb,
            DecodeError::BadPayload,
            DecodeError::Leb128Overflow,
            DecodeError::OutOfRange("code"),
            DecodeError::UnknownErrCode("nope".into()),
            DecodeError::BadCode,
        ];
        let mut seen = std::collections::HashSet::new();
        for e in all {
            let s = e.to_string();
            assert!(!s.is_empty() && s.len() < 80, "{s}");
            assert!(seen.insert(s));
        }
        assert_eq!(DecodeError::BadType(9).to_string(), "unknown type code 9");
        assert_eq!(
            DecodeError::BadUtf8("ch").to_string(),
            "field `ch` is not valid UTF-8"
        );
    }
}
