//! Framing: `peek_frame` and `split_ws_binary` on arbitrary bytes must not
//! panic and must stay in bounds; every envelope found that decodes is
//! re-framed both ways and read back unchanged.
#![no_main]

use edgegate_proto::{binary, frame};
use libfuzzer_sys::fuzz_target;

fn check_round_trip(env: &edgegate_proto::Envelope) {
    let mut tcp = Vec::new();
    frame::encode_frame(env, &mut tcp);
    let n = frame::peek_frame(&tcp, u32::MAX)
        .expect("no max")
        .expect("whole frame");
    assert_eq!(frame::LEN_BYTES + n, tcp.len());
    assert_eq!(frame::peek_frame(&tcp[..tcp.len() - 1], u32::MAX), Ok(None));
    assert_eq!(
        &binary::decode(&tcp[frame::LEN_BYTES..]).expect("decodes"),
        env
    );

    let mut ws = Vec::new();
    frame::encode_ws_binary(env, &mut ws);
    frame::encode_ws_binary(env, &mut ws);
    let parts: Vec<_> = frame::split_ws_binary(&ws).collect();
    assert_eq!(parts.len(), 2);
    for p in parts {
        assert_eq!(&binary::decode(p.expect("whole")).expect("decodes"), env);
    }
}

fuzz_target!(|data: &[u8]| {
    // The first 4 bytes pick a max, the rest is a TCP stream.
    let (max, stream) = match data.split_first_chunk::<4>() {
        Some((m, rest)) => (u32::from_le_bytes(*m), rest),
        None => (0, data),
    };
    let mut buf = stream;
    while let Ok(Some(n)) = frame::peek_frame(buf, max) {
        assert!(n as u64 <= u64::from(max));
        let body = &buf[frame::LEN_BYTES..frame::LEN_BYTES + n];
        if let Ok(env) = binary::decode(body) {
            check_round_trip(&env);
        }
        buf = &buf[frame::LEN_BYTES + n..];
    }

    // The whole input as a WebSocket binary message.
    let mut seen = 0;
    for part in frame::split_ws_binary(data) {
        let Ok(part) = part else { break };
        seen += part.len();
        if let Ok(env) = binary::decode(part) {
            check_round_trip(&env);
        }
    }
    assert!(seen <= data.len());
});
