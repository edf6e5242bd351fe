//! Codec benchmarks: a typical `msg` (ch "room:lobby", from "alice", 100-byte
//! JSON payload) through both envelope codecs, and TCP framing.
//!
//! Run: `cargo bench -p edgegate-proto --bench codec` (add `-- --quick` for a
//! short run).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use edgegate_proto::{Envelope, Payload, Type, binary, frame, json};

/// A 100-byte JSON payload.
fn payload() -> Bytes {
    let mut p = String::from(r#"{"text":""#);
    let pad = 100 - p.len() - r#"","ts":1700000000}"#.len();
    p.push_str(&"x".repeat(pad));
    p.push_str(r#"","ts":1700000000}"#);
    assert_eq!(p.len(), 100);
    Bytes::from(p)
}

fn typical_msg() -> Envelope {
    Envelope {
        ch: Some("room:lobby".into()),
        seq: Some(123_456),
        from: Some("alice".into()),
        id: Some(42),
        payload: Payload::Json(payload()),
        ..Envelope::new(Type::Msg)
    }
}

fn codecs(c: &mut Criterion) {
    let env = typical_msg();
    let mut json_bytes = Vec::new();
    json::encode(&env, &mut json_bytes);
    let mut bin_bytes = Vec::new();
    binary::encode(&env, &mut bin_bytes);
    let mut framed = Vec::new();
    frame::encode_frame(&env, &mut framed);

    let mut g = c.benchmark_group("msg");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(1024);
    g.bench_function("json_encode", |b| {
        b.iter(|| {
            out.clear();
            json::encode(black_box(&env), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("json_decode", |b| {
        b.iter(|| json::decode(black_box(&json_bytes)))
    });
    g.bench_function("binary_encode", |b| {
        b.iter(|| {
            out.clear();
            binary::encode(black_box(&env), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("binary_decode", |b| {
        b.iter(|| binary::decode(black_box(&bin_bytes)))
    });
    g.bench_function("tcp_frame_encode", |b| {
        b.iter(|| {
            out.clear();
            frame::encode_frame(black_box(&env), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("tcp_frame_peek", |b| {
        b.iter(|| frame::peek_frame(black_box(&framed), 65_536))
    });
    g.bench_function("tcp_frame_peek_decode", |b| {
        b.iter(|| {
            let buf = black_box(&framed);
            match frame::peek_frame(buf, 65_536) {
                Ok(Some(n)) => binary::decode(&buf[frame::LEN_BYTES..frame::LEN_BYTES + n]).ok(),
                _ => None,
            }
        })
    });
    g.finish();
}

criterion_group!(benches, codecs);
criterion_main!(benches);
