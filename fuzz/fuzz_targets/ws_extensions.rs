//! permessage-deflate negotiation: `deflate::negotiate` on arbitrary
//! `Sec-WebSocket-Extensions` values (one per line of the input) must not
//! panic, and an offer it accepts must be answered with a header value the
//! gateway can echo as is: ours alone (the extension, no context takeover
//! both ways, at most the window the client asked for), printable ASCII,
//! never a line break that would split the upgrade response.
#![no_main]

use edgegate_proto::deflate::{EXTENSION, negotiate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Some(agreed) = negotiate(text.lines()) else {
        return;
    };
    let r = agreed.response.as_str();
    assert!(
        r.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "response is printable ASCII: {r:?}"
    );
    let base = format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
    let rest = r.strip_prefix(base.as_str()).expect("our parameters first");
    match rest.strip_prefix("; server_max_window_bits=") {
        None => {
            assert!(rest.is_empty(), "nothing else answered: {r:?}");
            assert!(agreed.compress, "no window asked: compressed");
        }
        Some(bits) => {
            let b: u8 = bits.parse().expect("a window size");
            assert!((8..=15).contains(&b), "window 8..=15: {b}");
            assert_eq!(
                agreed.compress,
                b == 15,
                "compressed only with the full window"
            );
        }
    }
});
