//! Binary envelopes: `binary::decode` on arbitrary bytes must not panic, and
//! whatever decodes must re-encode to the same envelope, and survive a trip
//! through the JSON codec.
#![no_main]

use bytes::Bytes;
use edgegate_proto::{Envelope, Payload};
use edgegate_proto::{binary, json};
use libfuzzer_sys::fuzz_target;

/// What JSON mode makes of an envelope: raw newlines (whitespace) inside
/// `meta` and a JSON payload are written as spaces.
fn json_normal(mut e: Envelope) -> Envelope {
    e.meta = e.meta.map(|m| m.replace('\n', " "));
    if let Payload::Json(d) = &e.payload {
        let d: Vec<u8> = d
            .iter()
            .map(|&b| if b == b'\n' { b' ' } else { b })
            .collect();
        e.payload = Payload::Json(Bytes::from(d));
    }
    e
}

fuzz_target!(|data: &[u8]| {
    let Ok(env) = binary::decode(data) else {
        return;
    };
    let mut bin = Vec::new();
    binary::encode(&env, &mut bin);
    assert_eq!(bin.len(), binary::encoded_len(&env));
    assert_eq!(
        binary::decode(&bin).expect("re-encoded envelope decodes"),
        env.clone()
    );

    let mut text = Vec::new();
    json::encode(&env, &mut text);
    let via_json = json::decode(&text).expect("JSON of a binary envelope decodes");
    assert_eq!(via_json, json_normal(env));
});
