//! The shared codec vectors (`proto/vectors/binary.json`): the same file
//! pins the TypeScript SDK's codecs (client-js/test/codec.test.mjs), so the
//! two implementations cannot drift apart.

use edgegate_proto::{binary, frame, json};
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/binary.json");
    let text = std::fs::read_to_string(path).expect("proto/vectors/binary.json is readable");
    serde_json::from_str(&text).expect("proto/vectors/binary.json is JSON")
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn envelopes_read_and_write_the_same_in_both_codecs() {
    let v = vectors();
    let cases = v["envelopes"].as_array().expect("envelopes");
    assert!(cases.len() >= 20);
    for c in cases {
        let name = str_of(c, "name");
        let bin = hex(str_of(c, "bin"));
        let text = str_of(c, "json");
        let from_json = json::decode(text.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let from_bin = binary::decode(&bin).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(from_bin, from_json, "{name}");
        let mut out = Vec::new();
        binary::encode(&from_json, &mut out);
        assert_eq!(out, bin, "{name}: binary encode");
        let mut out = Vec::new();
        json::encode(&from_bin, &mut out);
        assert_eq!(
            String::from_utf8(out).expect("UTF-8"),
            text,
            "{name}: JSON encode"
        );
    }
}

#[test]
fn a_websocket_binary_batch_splits_into_its_envelopes() {
    let v = vectors();
    let b = &v["ws_binary_batch"];
    let msg = hex(str_of(b, "bin"));
    let want: Vec<_> = b["json"]
        .as_array()
        .expect("json")
        .iter()
        .map(|j| json::decode(j.as_str().expect("string").as_bytes()).expect("decodes"))
        .collect();
    let got: Vec<_> = frame::split_ws_binary(&msg)
        .map(|e| binary::decode(e.expect("splits")).expect("decodes"))
        .collect();
    assert_eq!(got, want);
    let mut out = Vec::new();
    for e in &want {
        frame::encode_ws_binary(e, &mut out);
    }
    assert_eq!(out, msg);
}

#[test]
fn bad_inputs_do_not_decode() {
    let v = vectors();
    for c in v["bad_bin"].as_array().expect("bad_bin") {
        let bin = hex(str_of(c, "bin"));
        assert!(binary::decode(&bin).is_err(), "{}", str_of(c, "name"));
    }
    for c in v["bad_json"].as_array().expect("bad_json") {
        let text = str_of(c, "json");
        assert!(
            json::decode(text.as_bytes()).is_err(),
            "{}",
            str_of(c, "name")
        );
    }
}
