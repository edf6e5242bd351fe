//! JSON envelopes: `json::decode_batch` on arbitrary bytes must not panic,
//! and whatever decodes must re-encode to valid JSON that decodes the same,
//! in JSON and through the binary codec.
#![no_main]

use edgegate_proto::{binary, json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = json::decode(data);
    for env in json::decode_batch(data).flatten() {
        let mut text = Vec::new();
        json::encode(&env, &mut text);
        assert!(!text.contains(&b'\n'));
        let again = json::decode(&text).expect("re-encoded JSON envelope decodes");
        assert_eq!(again, env);
        let mut bin = Vec::new();
        binary::encode(&env, &mut bin);
        assert_eq!(bin.len(), binary::encoded_len(&env));
        assert_eq!(
            binary::decode(&bin).expect("binary of a JSON envelope decodes"),
            env
        );
    }
});
