//! SSE (`edgegate_proto::sse`) on arbitrary bytes: request heads (the
//! query's `hello` and `token`, the headers), session tokens, the event
//! stream reader fed whole and in two parts, and the event writer read
//! back by the reader: no panic, consumed counts and sizes in bounds, the
//! same items whatever the split.
#![no_main]

use edgegate_proto::{json, sse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(r)) = sse::parse_request(data) {
        assert!(r.len <= data.len());
        if let Some(h) = &r.hello {
            // hello= decodes to no more bytes than it took.
            assert!(h.len() <= data.len());
            let _ = json::decode(h);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(s) = sse::parse_session(text) {
            assert!(s.signed.len() < text.len());
            assert_eq!(
                sse::session_prefix_of(&s),
                s.signed,
                "a parsed token's parts give back what its MAC covers"
            );
        }
    }
    let _ = sse::percent_decode(data);
    let mut whole = Vec::new();
    let mut r = sse::EventReader::new(4096);
    let ok = r.feed(data, &mut whole).is_ok();
    for cut in (0..data.len()).step_by(7) {
        let mut r = sse::EventReader::new(4096);
        let mut parts = Vec::new();
        if r.feed(&data[..cut], &mut parts).is_err() {
            continue;
        }
        let ok2 = r.feed(&data[cut..], &mut parts).is_ok();
        if ok && ok2 {
            assert_eq!(parts, whole, "split at {cut}");
        }
    }
    // Whatever the batch, the writer's event reads back as the batch with
    // its CRs as spaces.
    let mut out = Vec::new();
    sse::write_event(data, &mut out);
    let mut r = sse::EventReader::new(usize::MAX);
    let mut items = Vec::new();
    assert!(r.feed(&out, &mut items).is_ok());
    if data.is_empty() {
        assert!(items.is_empty());
    } else {
        let want: Vec<u8> = data.iter().map(|&b| if b == b'\r' { b' ' } else { b }).collect();
        assert_eq!(items, vec![sse::Item::Event(want)]);
    }
    // POST bodies: envelopes separated by newlines.
    for env in json::decode_batch(data) {
        let _ = env;
    }
});
