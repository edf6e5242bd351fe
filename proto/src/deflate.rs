//! permessage-deflate (RFC 7692), sans-IO: the negotiation, and a
//! compressor and a decompressor that keep no state between messages.
//!
//! The gateway agrees to the extension only with *no context takeover in
//! both directions*: every message is a deflate stream of its own. So
//! compression state exists only while one message is being compressed or
//! inflated, and one [`Deflater`] and one [`Inflater`] per shard serve all
//! of its connections: an idle connection pays nothing, and a message fanned
//! out to many subscribers is compressed once and the same bytes go to each
//! (the per-connection sliding window of context takeover, 32 KiB or more
//! each way, is exactly what this design refuses to hold).
//!
//! The server's window is always the full 32 KiB: an offer that limits it
//! (`server_max_window_bits` below 15) is accepted, but such a peer is only
//! sent uncompressed messages (RFC 7692 §6 lets an endpoint send any
//! message uncompressed), so a shard never needs a second compressor. Its
//! own messages, compressed with any window, inflate with the 32 KiB one.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::ws::Violation;

/// The extension's token in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// The four bytes a sync flush ends with, removed from every message
/// (RFC 7692 §7.2.1) and put back before inflating (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// An inflate buffer bigger than this is not kept for the next message.
const KEEP: usize = 64 * 1024;

/// An accepted offer: what to answer, and whether messages to this peer may
/// be compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The `Sec-WebSocket-Extensions` value of the response.
    pub response: String,
    /// False when the peer limited the server's window below 32 KiB: it is
    /// sent uncompressed messages only.
    pub compress: bool,
}

/// Picks the first acceptable permessage-deflate offer from the values of
/// the request's `Sec-WebSocket-Extensions` headers (RFC 7692 §5, §7.1).
/// An offer with an unknown or repeated parameter, or a bad value, is
/// declined (§7.1: the server must not accept it); no acceptable offer, no
/// compression.
pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>) -> Option<Agreed> {
    header_values
        .into_iter()
        .flat_map(|v| v.split(','))
        .find_map(accept_offer)
}

fn accept_offer(offer: &str) -> Option<Agreed> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let (mut seen, mut server_bits) = (0u8, None);
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        let bit = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 1,
            "client_no_context_takeover" if value.is_none() => 2,
            "server_max_window_bits" => {
                server_bits = Some(window_bits(value?)?);
                4
            }
            "client_max_window_bits" => {
                if let Some(v) = value {
                    window_bits(v)?;
                }
                8
            }
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
    }
    // No context takeover both ways, always: the client must reset its
    // compressor per message (§7.1.1.2: a server may ask this of any
    // client), and so does the server.
    let mut response =
        format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
    if let Some(bits) = server_bits {
        // §7.1.2.1: accepted by answering with the same value.
        response.push_str(&format!("; server_max_window_bits={bits}"));
    }
    Some(Agreed {
        response,
        compress: server_bits.is_none_or(|b| b == 15),
    })
}

/// A window size parameter: 8 to 15, no leading zero (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.len() > 2 || v.starts_with('0') {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// A message compressor: one per shard, reset for every message.
pub struct Deflater {
    c: Compress,
}

impl Default for Deflater {
    fn default() -> Self {
        Deflater::new(LEVEL)
    }
}

/// zlib level 2: level 1 (zlib-rs's "quick" strategy, static Huffman codes
/// only) saves almost nothing on a chat message (351 to 328 bytes) where 2
/// and up give 258; higher levels cost more for no gain on short messages
/// (`cargo run --release -p edgegate-proto --example deflate_levels`).
pub const LEVEL: u32 = 2;

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deflater")
    }
}

impl Deflater {
    /// A compressor at zlib level `level` (0-9; see [`LEVEL`]).
    pub fn new(level: u32) -> Self {
        Deflater {
            c: Compress::new(Compression::new(level.min(9)), false),
        }
    }

    /// Appends the compressed payload of one message made of `parts` (in
    /// order) to `out`: a deflate stream of its own, sync-flushed, the
    /// final `00 00 ff ff` removed. False, with `out` as it was, if the
    /// compressor failed (the caller sends the message uncompressed).
    pub fn compress(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> bool {
        let start = out.len();
        self.c.reset();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let flush = if last {
                FlushCompress::Sync
            } else {
                FlushCompress::None
            };
            let mut input = *part;
            loop {
                out.reserve(total / 2 + 64);
                let before = self.c.total_in();
                if self.c.compress_vec(input, out, flush).is_err() {
                    out.truncate(start);
                    return false;
                }
                input = &input[(self.c.total_in() - before) as usize..];
                // Done with this part once it is consumed and (for the last)
                // the flush had room to finish.
                if input.is_empty() && (!last || out.len() < out.capacity()) {
                    break;
                }
            }
        }
        if out[start..].ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        true
    }
}

/// A message decompressor: one per shard, reset for every message; its
/// output buffer is reused (and given back when a big message grew it).
pub struct Inflater {
    d: Decompress,
    buf: Vec<u8>,
    /// Bytes inflated and bytes taken in, since [`Inflater::take_counts`].
    counts: (u64, u64),
}

impl Default for Inflater {
    fn default() -> Self {
        Inflater {
            d: Decompress::new(false),
            buf: Vec::new(),
            counts: (0, 0),
        }
    }
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inflater")
    }
}

impl Inflater {
    /// Inflates one message's payload. More than `max` bytes out is 1009
    /// (checked as it inflates: a small message cannot make it allocate
    /// much more than `max`); bytes that are not deflate data are 1007.
    pub fn inflate(&mut self, data: &[u8], max: usize) -> Result<&[u8], Violation> {
        self.d.reset(false);
        if self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        }
        self.buf.clear();
        'parts: for part in [data, &TAIL[..]] {
            let mut input = part;
            loop {
                if self.buf.len() == self.buf.capacity() {
                    let room = (max + 1).saturating_sub(self.buf.len());
                    self.buf
                        .reserve(self.buf.len().clamp(256, 64 * 1024).min(room));
                }
                let (in0, out0) = (self.d.total_in(), self.d.total_out());
                let status = self
                    .d
                    .decompress_vec(input, &mut self.buf, FlushDecompress::Sync)
                    .map_err(|_| Violation {
                        code: 1007,
                        reason: "invalid permessage-deflate data",
                    })?;
                if self.buf.len() > max {
                    return Err(Violation {
                        code: 1009,
                        reason: "message too big (inflated)",
                    });
                }
                input = &input[(self.d.total_in() - in0) as usize..];
                let stuck = self.d.total_in() == in0 && self.d.total_out() == out0;
                if status == Status::StreamEnd {
                    // A final block: the message ends here.
                    break 'parts;
                }
                // (Nothing moved: the data ended inside a block. Take what
                // it gave; a truncated message is the peer's loss.)
                if (input.is_empty() && self.buf.len() < self.buf.capacity()) || stuck {
                    break;
                }
            }
        }
        self.counts.0 += self.buf.len() as u64;
        self.counts.1 += data.len() as u64;
        Ok(&self.buf)
    }

    /// The bytes inflated and the compressed bytes they came from, since the
    /// last call (for metrics).
    pub fn take_counts(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed(offers: &[&str]) -> Option<(String, bool)> {
        negotiate(offers.iter().copied()).map(|a| (a.response, a.compress))
    }

    #[test]
    fn negotiation_accepts_with_no_context_takeover_both_ways() {
        const BOTH: &str =
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        // What browsers send.
        assert_eq!(
            agreed(&["permessage-deflate; client_max_window_bits"]),
            Some((BOTH.into(), true))
        );
        assert_eq!(agreed(&["permessage-deflate"]), Some((BOTH.into(), true)));
        assert_eq!(
            agreed(&[
                "x-webkit-deflate-frame",
                "permessage-deflate; client_max_window_bits=10"
            ]),
            Some((BOTH.into(), true))
        );
        // A limited server window: accepted, echoed, but never compressed to.
        assert_eq!(
            agreed(&["permessage-deflate; server_max_window_bits=9"]),
            Some((format!("{BOTH}; server_max_window_bits=9"), false))
        );
        assert_eq!(
            agreed(&["permessage-deflate; server_max_window_bits=\"15\""]),
            Some((format!("{BOTH}; server_max_window_bits=15"), true))
        );
        // The first acceptable offer of a list wins.
        assert_eq!(
            agreed(&["permessage-deflate; foo, permessage-deflate; server_no_context_takeover"]),
            Some((BOTH.into(), true))
        );
    }

    #[test]
    fn negotiation_declines_what_it_cannot_accept() {
        for bad in [
            "",
            "deflate-frame",
            "permessage-deflate; unknown",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; client_max_window_bits=x",
            "permessage-deflate; client_no_context_takeover=1",
        ] {
            assert_eq!(agreed(&[bad]), None, "{bad:?}");
        }
    }

    fn roundtrip(msg: &[u8]) -> Vec<u8> {
        let mut z = Vec::new();
        assert!(Deflater::default().compress(&[msg], &mut z));
        Inflater::default().inflate(&z, 1 << 20).unwrap().to_vec()
    }

    #[test]
    fn every_message_is_a_stream_of_its_own() {
        let mut d = Deflater::default();
        let mut i = Inflater::default();
        let chat = br#"{"t":"msg","ch":"room:lobby","seq":42,"from":"alice","d":{"text":"hello there, this is a chat message","ts":1733212345678}}"#;
        for _ in 0..3 {
            let mut z = Vec::new();
            assert!(d.compress(&[chat], &mut z));
            assert!(!z.ends_with(&TAIL));
            // A fresh inflater each time, as a peer without context takeover.
            assert_eq!(Inflater::default().inflate(&z, 1 << 20).unwrap(), chat);
            assert_eq!(i.inflate(&z, 1 << 20).unwrap(), chat);
        }
        assert_eq!(roundtrip(b""), b"");
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(roundtrip(&big), big);
        // Parts compress as one message.
        let mut z = Vec::new();
        assert!(d.compress(&[b"hello ", b"world"], &mut z));
        assert_eq!(i.inflate(&z, 100).unwrap(), b"hello world");
    }

    #[test]
    fn rfc7692_examples_inflate() {
        // §7.2.3.1: "Hello", compressed, as one message.
        let mut i = Inflater::default();
        assert_eq!(
            i.inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100)
                .unwrap(),
            b"Hello"
        );
        // §7.2.3.3: with no compression (a stored block).
        assert_eq!(
            i.inflate(
                &[
                    0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00
                ],
                100
            )
            .unwrap(),
            b"Hello"
        );
        // §7.2.3.4: with BFINAL set.
        assert_eq!(
            i.inflate(&[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100)
                .unwrap(),
            b"Hello"
        );
        // §7.2.3.6: an empty message as one byte.
        assert_eq!(i.inflate(&[0x00], 100).unwrap(), b"");
    }

    #[test]
    fn inflating_is_bounded_and_bad_data_is_1007() {
        let mut z = Vec::new();
        assert!(Deflater::default().compress(&[&vec![b'a'; 1 << 20]], &mut z));
        assert!(z.len() < (1 << 20) / 64, "a bomb: {} bytes", z.len());
        let mut i = Inflater::default();
        assert_eq!(i.inflate(&z, 1000).unwrap_err().code, 1009);
        assert_eq!(i.inflate(&z, 1 << 20).unwrap().len(), 1 << 20);
        assert_eq!(i.inflate(&[0xff, 0xff, 0xff], 100).unwrap_err().code, 1007);
        // And it recovers for the next message.
        assert_eq!(roundtrip(b"ok"), b"ok");
        assert_eq!(
            i.inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 5)
                .unwrap(),
            b"Hello"
        );
    }
}
