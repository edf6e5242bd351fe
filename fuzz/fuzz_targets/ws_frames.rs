//! WebSocket framing: `ws::Reader` on arbitrary client bytes must not
//! panic, must never use more bytes than it was given, must bound every
//! message by `max`, must hand out only valid UTF-8 as text, and must see
//! the same events whether the bytes arrive at once or split in two at any
//! point (the gateway carries a partial frame over to the next read).
//! Half the inputs run with permessage-deflate negotiated: RSV1 messages
//! are inflated (bounded by `max` too) with one inflater for the whole run,
//! as a shard shares one among its connections.
#![no_main]

use edgegate_proto::deflate::Inflater;
use edgegate_proto::ws::{Event, ReadError, Reader};
use libfuzzer_sys::fuzz_target;

/// What one run saw: events (owned) and whether it ended in a violation.
fn run(chunks: &[&[u8]], max: usize, deflate: bool) -> (Vec<(u8, Vec<u8>)>, Option<u16>) {
    let mut r = Reader::default();
    let mut inflater = Inflater::default();
    let mut seen = Vec::new();
    let mut carry: Vec<u8> = Vec::new();
    for chunk in chunks {
        carry.extend_from_slice(chunk);
        let mut buf = std::mem::take(&mut carry);
        let len = buf.len();
        let inf = deflate.then_some(&mut inflater);
        let res = r.process(&mut buf, max, inf, &mut |ev| -> Result<(), ()> {
            seen.push(match ev {
                Event::Text(t) => {
                    assert!(std::str::from_utf8(t).is_ok(), "text is UTF-8");
                    assert!(t.len() <= max, "message bounded");
                    (1, t.to_vec())
                }
                Event::Binary(b) => {
                    assert!(b.len() <= max, "message bounded");
                    (2, b.to_vec())
                }
                Event::Ping(p) => {
                    assert!(p.len() <= 125, "control payload bounded");
                    (9, p.to_vec())
                }
                Event::Close(c) => (8, c.map(|(code, r)| [&code.to_be_bytes()[..], r.as_bytes()].concat()).unwrap_or_default()),
            });
            Ok(())
        });
        match res {
            Ok(used) => {
                assert!(used <= len, "used {used} of {len}");
                if seen.last().is_some_and(|e| e.0 == 8) {
                    return (seen, None); // nothing after a close is read
                }
                carry = buf[used..].to_vec();
            }
            Err(ReadError::Ws(v)) => return (seen, Some(v.code)),
            Err(ReadError::Callback(())) => unreachable!("the callback never refuses"),
        }
    }
    (seen, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&[cut, max], bytes)) = data.split_first_chunk::<2>() else {
        return;
    };
    let deflate = max & 1 == 1;
    let max = usize::from(max >> 1) * 128 + 1;
    let whole = run(&[bytes], max, deflate);
    let at = usize::from(cut).min(bytes.len());
    let split = run(&[&bytes[..at], &bytes[at..]], max, deflate);
    assert_eq!(whole, split, "split at {at}");
});
