//! WebSocket framing (RFC 6455), server side, sans-IO.
//!
//! [`Reader`] turns a client's bytes into whole messages and control
//! events: it checks masking, reserved bits and opcodes, control-frame
//! rules, close codes and UTF-8, reassembles fragments (the only state it
//! keeps, and only while a fragmented message is in flight), and bounds a
//! message's size. Every breach is a [`Violation`] with the close code the
//! RFC asks for. With permessage-deflate negotiated (RFC 7692, see
//! [`crate::deflate`]) it also takes RSV1 on a message's first frame and
//! inflates that message with the caller's [`Inflater`] before the UTF-8
//! and size checks. [`write_frame`] and [`write_close`] write server frames
//! (unmasked; [`write_frame_deflated`] with RSV1). No socket, no allocation
//! while idle; fuzzed
//! (`fuzz/fuzz_targets/ws_frames.rs`) and checked by the
//! Autobahn|Testsuite through the gateway's echo endpoint.

use crate::deflate::Inflater;

/// Opcode: Continuation frame.
pub const OP_CONT: u8 = 0x0;
/// Opcode: Text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode: Binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Opcode: Close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode: Ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode: Pong frame.
pub const OP_PONG: u8 = 0xA;

/// Appends one unmasked, final frame.
pub fn write_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    write_frame_bits(0x80 | opcode, payload, out);
}

/// Appends one unmasked, final frame of a compressed message (RSV1 set):
/// `payload` is what [`crate::deflate::Deflater::compress`] made.
pub fn write_frame_deflated(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    write_frame_bits(0x80 | RSV1 | opcode, payload, out);
}

/// RSV1: "this message is compressed" under permessage-deflate.
const RSV1: u8 = 0x40;

/// The longest header of an unmasked frame (a 64-bit length).
pub const MAX_HEADER: usize = 10;

/// The header of an unmasked, final frame of `len` payload bytes, for a
/// caller that writes the payload first: the bytes, and how many of them
/// it uses.
pub fn frame_header(opcode: u8, len: usize) -> ([u8; MAX_HEADER], usize) {
    header_bits(0x80 | opcode, len)
}

fn header_bits(b0: u8, n: usize) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    h[0] = b0;
    let used = if n < 126 {
        h[1] = n as u8;
        2
    } else if n <= usize::from(u16::MAX) {
        h[1] = 126;
        h[2..4].copy_from_slice(&(n as u16).to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(n as u64).to_be_bytes());
        10
    };
    (h, used)
}

fn write_frame_bits(b0: u8, payload: &[u8], out: &mut Vec<u8>) {
    let (h, used) = header_bits(b0, payload.len());
    out.reserve(payload.len() + used);
    out.extend_from_slice(&h[..used]);
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and as much of `reason` as fits.
pub fn write_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut p = Vec::with_capacity(2 + reason.len().min(123));
    p.extend_from_slice(&code.to_be_bytes());
    // A control frame's payload is at most 125 bytes; cut on a char boundary.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..end]);
    write_frame(OP_CLOSE, &p, out);
}

/// A breach of RFC 6455 by the peer: the close code the RFC asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// 1002 protocol error, 1007 invalid data, 1009 too big.
    pub code: u16,
    /// What was wrong.
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    /// RSV1: a compressed message (checked against the negotiation by the caller).
    rsv1: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
    header_len: usize,
}

/// Parses a client frame header. `Ok(None)`: need more bytes.
fn parse_header(buf: &[u8], max: usize) -> Result<Option<Header>, Violation> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x30 != 0 {
        return Err(violation(1002, "reserved bits RSV2/RSV3 set"));
    }
    let opcode = b0 & 0x0F;
    let fin = b0 & 0x80 != 0;
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(violation(1002, "reserved opcode"));
    }
    if b1 & 0x80 == 0 {
        return Err(violation(1002, "client frames must be masked"));
    }
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (u64::from_be_bytes(a), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode >= OP_CLOSE && (!fin || len > 125) {
        return Err(violation(
            1002,
            "control frames must be final and at most 125 bytes",
        ));
    }
    if len > max as u64 {
        return Err(violation(1009, "message too big"));
    }
    let Some(m) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        rsv1: b0 & RSV1 != 0,
        opcode,
        mask: [m[0], m[1], m[2], m[3]],
        len: len as usize,
        header_len: at + 4,
    }))
}

fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// A complete message or control event from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A text message (valid UTF-8), reassembled.
    Text(&'a [u8]),
    /// A binary message, reassembled.
    Binary(&'a [u8]),
    /// A ping with its payload (answer with a pong carrying it).
    Ping(&'a [u8]),
    /// A close frame: the peer's code and reason, if it gave them.
    Close(Option<(u16, &'a str)>),
}

/// A message being reassembled from fragments.
#[derive(Debug)]
struct Fragments {
    opcode: u8,
    /// RSV1 was set on the first frame: inflate once complete.
    deflated: bool,
    data: Vec<u8>,
}

/// Frame and message reassembly state: empty (no allocation) while idle.
#[derive(Default, Debug)]
pub struct Reader {
    /// Boxed: every idle connection carries a `Reader` (8 bytes, not 32),
    /// and fragmented messages are rare.
    frag: Option<Box<Fragments>>,
}

impl Reader {
    /// Consumes whole frames from `data` (unmasking them in place), calling
    /// `on` for each message or control event; `max` bounds a message
    /// (inflated, for a compressed one). `inflater` is given when
    /// permessage-deflate was negotiated: without one, RSV1 is a violation.
    /// Returns the bytes used: a partial frame is left for the next call.
    /// Nothing after a close frame is read.
    pub fn process<E>(
        &mut self,
        data: &mut [u8],
        max: usize,
        mut inflater: Option<&mut Inflater>,
        on: &mut dyn FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<usize, ReadError<E>> {
        let mut pos = 0;
        loop {
            let h = match parse_header(&data[pos..], max) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(pos),
                Err(v) => return Err(ReadError::Ws(v)),
            };
            // RFC 7692 §6.1: RSV1 only on the first frame of a data message,
            // and only when the extension is in use.
            if h.rsv1 && (inflater.is_none() || !matches!(h.opcode, OP_TEXT | OP_BINARY)) {
                return Err(ReadError::Ws(violation(
                    1002,
                    "RSV1 set outside a compressed message's first frame",
                )));
            }
            let start = pos + h.header_len;
            if data.len() - start < h.len {
                return Ok(pos);
            }
            let payload = &mut data[start..start + h.len];
            unmask(payload, h.mask);
            pos = start + h.len;
            match h.opcode {
                OP_PING => on(Event::Ping(payload)).map_err(ReadError::Callback)?,
                OP_PONG => {}
                OP_CLOSE => {
                    let ev = match payload.len() {
                        0 => None,
                        1 => return Err(ReadError::Ws(violation(1002, "close payload of 1 byte"))),
                        _ => {
                            let code = u16::from_be_bytes([payload[0], payload[1]]);
                            if !valid_close_code(code) {
                                return Err(ReadError::Ws(violation(1002, "invalid close code")));
                            }
                            let Ok(reason) = std::str::from_utf8(&payload[2..]) else {
                                return Err(ReadError::Ws(violation(
                                    1007,
                                    "close reason is not UTF-8",
                                )));
                            };
                            Some((code, reason))
                        }
                    };
                    on(Event::Close(ev)).map_err(ReadError::Callback)?;
                    return Ok(pos);
                }
                OP_TEXT | OP_BINARY => {
                    if self.frag.is_some() {
                        return Err(ReadError::Ws(violation(
                            1002,
                            "new message inside a fragmented one",
                        )));
                    }
                    if h.fin {
                        Self::message(h.opcode, h.rsv1, payload, max, inflater.as_deref_mut(), on)?;
                    } else {
                        self.frag = Some(Box::new(Fragments {
                            opcode: h.opcode,
                            deflated: h.rsv1,
                            data: payload.to_vec(),
                        }));
                    }
                }
                _ => {
                    // OP_CONT
                    let Some(f) = self.frag.as_mut() else {
                        return Err(ReadError::Ws(violation(
                            1002,
                            "continuation without a message",
                        )));
                    };
                    if f.data.len() + payload.len() > max {
                        return Err(ReadError::Ws(violation(1009, "message too big")));
                    }
                    f.data.extend_from_slice(payload);
                    if h.fin
                        && let Some(f) = self.frag.take()
                    {
                        let inf = inflater.as_deref_mut();
                        Self::message(f.opcode, f.deflated, &f.data, max, inf, on)?;
                    }
                }
            }
        }
    }

    fn message<E>(
        opcode: u8,
        deflated: bool,
        payload: &[u8],
        max: usize,
        inflater: Option<&mut Inflater>,
        on: &mut dyn FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), ReadError<E>> {
        let payload = match inflater {
            Some(inf) if deflated => inf.inflate(payload, max).map_err(ReadError::Ws)?,
            _ => payload,
        };
        if opcode == OP_TEXT {
            if std::str::from_utf8(payload).is_err() {
                return Err(ReadError::Ws(violation(
                    1007,
                    "text message is not valid UTF-8",
                )));
            }
            on(Event::Text(payload)).map_err(ReadError::Callback)?;
        } else {
            on(Event::Binary(payload)).map_err(ReadError::Callback)?;
        }
        Ok(())
    }
}

/// Why [`Reader::process`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError<E> {
    /// The peer broke RFC 6455.
    Ws(Violation),
    /// The callback refused an event.
    Callback(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn run(bytes: &[u8]) -> (Result<usize, u16>, Vec<String>) {
        run_with(bytes, 1 << 20, None)
    }

    fn run_with(
        bytes: &[u8],
        max: usize,
        inflater: Option<&mut Inflater>,
    ) -> (Result<usize, u16>, Vec<String>) {
        let mut r = Reader::default();
        let mut data = bytes.to_vec();
        let mut seen = Vec::new();
        let res = r.process(&mut data, max, inflater, &mut |ev| -> Result<(), ()> {
            seen.push(match ev {
                Event::Text(t) => format!("text:{}", String::from_utf8_lossy(t)),
                Event::Binary(b) => format!("bin:{}", b.len()),
                Event::Ping(p) => format!("ping:{}", p.len()),
                Event::Close(c) => format!("close:{:?}", c.map(|c| c.0)),
            });
            Ok(())
        });
        (
            res.map_err(|e| match e {
                ReadError::Ws(v) => v.code,
                ReadError::Callback(()) => 0,
            }),
            seen,
        )
    }

    #[test]
    fn reassembles_fragments_with_control_frames_between() {
        let mut b = masked(OP_TEXT, false, b"hel");
        b.extend(masked(OP_PING, true, b"p"));
        b.extend(masked(OP_CONT, true, b"lo"));
        let (r, seen) = run(&b);
        assert_eq!(r, Ok(b.len()));
        assert_eq!(seen, vec!["ping:1", "text:hello"]);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let b = masked(OP_BINARY, true, &[7u8; 300]);
        for cut in 0..b.len() {
            assert_eq!(run(&b[..cut]).0, Ok(0), "cut at {cut}");
        }
        assert_eq!(run(&b).1, vec!["bin:300"]);
    }

    #[test]
    fn violations_get_the_rfc_codes() {
        assert_eq!(run(&[0x81, 0x00]).0, Err(1002), "unmasked");
        assert_eq!(run(&masked(0x3, true, b"")).0, Err(1002), "reserved opcode");
        assert_eq!(
            run(&{
                let mut f = masked(OP_TEXT, true, b"x");
                f[0] |= 0x40;
                f
            })
            .0,
            Err(1002),
            "rsv"
        );
        assert_eq!(
            run(&masked(OP_PING, false, b"")).0,
            Err(1002),
            "fragmented control"
        );
        assert_eq!(
            run(&masked(OP_PING, true, &[0; 126])).0,
            Err(1002),
            "long control"
        );
        assert_eq!(
            run(&masked(OP_TEXT, true, &[0xff, 0xfe])).0,
            Err(1007),
            "bad utf-8"
        );
        assert_eq!(
            run(&masked(OP_CONT, true, b"x")).0,
            Err(1002),
            "stray continuation"
        );
        assert_eq!(
            run(&masked(OP_CLOSE, true, &[3])).0,
            Err(1002),
            "1-byte close"
        );
        assert_eq!(
            run(&masked(OP_CLOSE, true, &[0x03, 0xEC])).0,
            Err(1002),
            "close code 1004"
        );
        assert_eq!(
            run(&masked(OP_CLOSE, true, &[0x03, 0xE8, 0xff])).0,
            Err(1007),
            "close reason"
        );
        assert_eq!(
            run(&masked(OP_BINARY, true, &vec![0; (1 << 20) + 1])).0,
            Err(1009)
        );
        let mut two = masked(OP_TEXT, false, b"a");
        two.extend(masked(OP_TEXT, true, b"b"));
        assert_eq!(
            run(&two).0,
            Err(1002),
            "new message inside a fragmented one"
        );
    }

    fn run_deflated(bytes: &[u8], max: usize) -> (Result<usize, u16>, Vec<String>) {
        run_with(bytes, max, Some(&mut Inflater::default()))
    }

    fn deflated(opcode: u8, fin: bool, msg: &[u8]) -> Vec<u8> {
        let mut z = Vec::new();
        assert!(crate::deflate::Deflater::default().compress(&[msg], &mut z));
        let mut f = masked(opcode, fin, &z);
        f[0] |= RSV1;
        f
    }

    #[test]
    fn compressed_messages_inflate_when_negotiated() {
        let mut b = deflated(OP_TEXT, true, "héllo héllo héllo".as_bytes());
        b.extend(masked(OP_TEXT, true, b"plain"));
        b.extend(deflated(OP_BINARY, true, &[9; 1000]));
        let (r, seen) = run_deflated(&b, 1 << 20);
        assert_eq!(r, Ok(b.len()));
        assert_eq!(
            seen,
            vec!["text:héllo héllo héllo", "text:plain", "bin:1000"]
        );
        // Fragmented: RSV1 on the first frame only, a ping between.
        let mut z = Vec::new();
        assert!(
            crate::deflate::Deflater::default().compress(&[b"fragmented and compressed"], &mut z)
        );
        let mut first = masked(OP_TEXT, false, &z[..3]);
        first[0] |= RSV1;
        first.extend(masked(OP_PING, true, b""));
        first.extend(masked(OP_CONT, true, &z[3..]));
        assert_eq!(
            run_deflated(&first, 100).1,
            vec!["ping:0", "text:fragmented and compressed"]
        );
    }

    #[test]
    fn compressed_message_violations_get_the_rfc_codes() {
        let with_rsv1 = |mut f: Vec<u8>| {
            f[0] |= RSV1;
            f
        };
        // Not negotiated.
        assert_eq!(run(&deflated(OP_TEXT, true, b"x")).0, Err(1002));
        // On a control frame, or a continuation.
        assert_eq!(
            run_deflated(&with_rsv1(masked(OP_PING, true, b"")), 100).0,
            Err(1002)
        );
        let mut cont = masked(OP_TEXT, false, b"a");
        cont.extend(with_rsv1(masked(OP_CONT, true, b"b")));
        assert_eq!(run_deflated(&cont, 100).0, Err(1002));
        // RSV2 and RSV3 are never ours.
        let mut rsv2 = masked(OP_TEXT, true, b"x");
        rsv2[0] |= 0x20;
        assert_eq!(run_deflated(&rsv2, 100).0, Err(1002));
        // Inflated text that is not UTF-8; inflated past max; not deflate.
        assert_eq!(
            run_deflated(&deflated(OP_TEXT, true, &[0xff, 0xfe]), 100).0,
            Err(1007)
        );
        assert_eq!(
            run_deflated(&deflated(OP_BINARY, true, &[0; 101]), 100).0,
            Err(1009)
        );
        assert_eq!(
            run_deflated(&deflated(OP_BINARY, true, &[0; 100]), 100).1,
            vec!["bin:100"]
        );
        assert_eq!(
            run_deflated(&with_rsv1(masked(OP_BINARY, true, &[0xff; 8])), 100).0,
            Err(1007)
        );
    }

    #[test]
    fn close_stops_reading() {
        let mut b = masked(OP_CLOSE, true, &[0x03, 0xE8]);
        let first = b.len();
        b.extend(masked(OP_TEXT, true, b"late"));
        let (r, seen) = run(&b);
        assert_eq!(r, Ok(first));
        assert_eq!(seen, vec!["close:Some(1000)"]);
    }

    #[test]
    fn frames_are_written_with_the_right_length_form() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            write_frame(OP_BINARY, &vec![1; n], &mut out);
            let hdr = out.len() - n;
            assert_eq!(
                hdr,
                if n < 126 {
                    2
                } else if n < 65536 {
                    4
                } else {
                    10
                },
                "n={n}"
            );
            assert_eq!(out[0], 0x82);
        }
    }
}
