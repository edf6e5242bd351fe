//! Binary envelopes: `binary::decode` on arbitrary bytes must not panic, and
//! whatever decodes must re-encode to the same envelope, and survive a trip
//! through the JSON codec.
#![no_main]

use edgegate_proto::{binary, json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(env) = binary::decode(data) else {
        return;
    };
    let mut bin = Vec::new();
    binary::encode(&env, &mut bin);
    assert_eq!(bin.len(), binary::encoded_len(&env));
    assert_eq!(binary::decode(&bin).expect("re-encoded envelope decodes"), env);

    let mut text = Vec::new();
    json::encode(&env, &mut text);
    let via_json = json::decode(&text).expect("JSON of a binary envelope decodes");
    // JSON mode writes raw newlines inside `meta`/`d` as spaces; otherwise equal.
    assert_eq!(via_json.t, env.t);
    assert_eq!((via_json.id, via_json.seq, via_json.code), (env.id, env.seq, env.code));
    assert_eq!((&via_json.ch, &via_json.from, &via_json.reason), (&env.ch, &env.from, &env.reason));
    assert_eq!(via_json.payload.is_json(), env.payload.is_json());
    assert_eq!(via_json.payload.bytes().len(), env.payload.bytes().len());
});
