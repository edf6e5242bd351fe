//! What permessage-deflate costs and saves per message, by zlib level:
//! compressed size and time to compress and to inflate one message, each a
//! stream of its own (no context takeover), as the gateway does it.
//!
//!     cargo run --release -p edgegate-proto --example deflate_levels

use std::time::Instant;

use edgegate_proto::deflate::{Deflater, Inflater};

const CHAT: &[u8] = br#"{"t":"msg","ch":"room:lobby","seq":3,"from":"pub1_123","id":7,"d":{"text":"Hey team, the deploy to staging finished; can someone check the dashboard for the checkout service? Latency looks a bit high since the last release.","ts":1733212345678,"kind":"text","mentions":["user_19ab","user_77cd"],"client_msg_id":"c0a8f1e2-1b2c-4d5e-9f00-112233445566"}}"#;

const TEXT: &str = "Hey team, the deploy to staging finished; can someone check the dashboard for the checkout service? Latency looks a bit high since the last release.";

fn main() {
    // A catch-up batch: twenty different chat messages (the words of one
    // rotated) in one WebSocket message.
    let words: Vec<&str> = TEXT.split(' ').collect();
    let batch: Vec<u8> = (0..20)
        .map(|i| {
            let text = [&words[i % words.len()..], &words[..i % words.len()]].concat().join(" ");
            format!(
                r#"{{"t":"msg","ch":"room:lobby","seq":{},"from":"user_{:04x}","id":{},"d":{{"text":"{text}","ts":{},"kind":"text"}}}}"#,
                100 + i,
                i * 7919 % 65536,
                i * 31,
                1733212345678u64 + i as u64 * 1373
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    let n = 20_000;
    for level in [1, 2, 6, 9] {
        for (name, msg) in [
            ("empty", &b""[..]),
            ("chat", CHAT),
            ("batch of 20", &batch[..]),
        ] {
            let (mut d, mut i, mut z) = (Deflater::new(level), Inflater::default(), Vec::new());
            let t = Instant::now();
            for _ in 0..n {
                z.clear();
                assert!(d.compress(&[msg], &mut z));
            }
            let c = t.elapsed().as_secs_f64() / f64::from(n) * 1e6;
            let t = Instant::now();
            for _ in 0..n {
                assert_eq!(i.inflate(&z, 1 << 20).map(<[u8]>::len), Ok(msg.len()));
            }
            let u = t.elapsed().as_secs_f64() / f64::from(n) * 1e6;
            println!(
                "level {level} {name:>11}: {:>5} -> {:>4} B ({:.2}x), compress {c:5.2} us, inflate {u:5.2} us",
                msg.len(),
                z.len(),
                msg.len() as f64 / z.len() as f64
            );
        }
    }
}
