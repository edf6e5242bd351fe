//! HTTP heads and chunked bodies (`edgegate_proto::http`) on arbitrary
//! bytes: no panic, consumed counts in bounds, decoded bodies within the
//! limit.
#![no_main]

use edgegate_proto::http;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = http::parse_request(data) {
        assert!(h.len <= data.len());
    }
    if let Ok(Some(h)) = http::parse_response(data, &["eg-error", "content-type"]) {
        assert!(h.len <= data.len());
        assert_eq!(h.wanted.len(), 2);
    }
    let mut c = http::Chunked::new();
    let mut out = Vec::new();
    if let Ok(n) = c.feed(data, &mut out, 1024) {
        assert!(n <= data.len());
        assert!(out.len() <= 1024);
    }
    // Split in two at every tenth position: the same outcome as in one go.
    for cut in (0..data.len()).step_by(10) {
        let mut a = http::Chunked::new();
        let mut o = Vec::new();
        let Ok(n1) = a.feed(&data[..cut], &mut o, 1024) else { continue };
        if n1 < cut {
            continue; // ended early
        }
        let _ = a.feed(&data[cut..], &mut o, 1024);
        assert!(o.len() <= 1024);
    }
});
