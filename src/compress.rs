//! permessage-deflate state that a shard shares among its WebSocket
//! connections.
//!
//! Negotiated only with no context takeover both ways
//! ([`edgegate_proto::deflate`]), a message's compression state lives just
//! while it is compressed or inflated, so a shard needs one compressor and
//! one decompressor for all of its connections, and an idle connection
//! holds nothing. A routed message is compressed at most once per shard and
//! encoding ([`crate::conn::Delivery::deflated`]), and those bytes go to
//! every subscriber that negotiated the extension; replies are compressed
//! per connection, when big enough to gain.

use std::cell::RefCell;
use std::sync::atomic::Ordering::Relaxed;

use edgegate_proto::deflate::{Deflater, Inflater};
use edgegate_proto::ws::{write_frame, write_frame_deflated};

use crate::metrics::ShardMetrics;

/// One shard's compressor, decompressor and compression scratch.
#[derive(Default)]
pub struct ShardDeflate {
    deflater: RefCell<Deflater>,
    /// Borrowed by the WebSocket reader while it inflates one message.
    pub inflater: RefCell<Inflater>,
    /// Compressed bytes of a per-connection message, before framing.
    scratch: RefCell<Vec<u8>>,
}

/// The scratch buffer is given back when a big message grew it past this.
const KEEP: usize = 64 * 1024;

impl ShardDeflate {
    /// Compresses one message made of `parts`; `None` when it would not
    /// shrink (or the compressor failed): send it as it is. Counts the run.
    pub fn compress(&self, parts: &[&[u8]], m: &ShardMetrics) -> Option<Vec<u8>> {
        let raw: usize = parts.iter().map(|p| p.len()).sum();
        let mut z = Vec::with_capacity(raw / 2 + 16);
        ShardMetrics::add(&m.deflate_runs, 1);
        let ok = self.deflater.borrow_mut().compress(parts, &mut z);
        (ok && z.len() < raw).then_some(z)
    }

    /// Appends `msg` to `out` as one frame: compressed (RSV1) when that
    /// shrinks it, as it is otherwise. Counts what it sent compressed.
    pub fn write_message(&self, opcode: u8, msg: &[u8], out: &mut Vec<u8>, m: &ShardMetrics) {
        let mut z = self.scratch.borrow_mut();
        z.clear();
        ShardMetrics::add(&m.deflate_runs, 1);
        if self.deflater.borrow_mut().compress(&[msg], &mut z) && z.len() < msg.len() {
            write_frame_deflated(opcode, &z, out);
            count_out(m, msg.len(), z.len());
        } else {
            write_frame(opcode, msg, out);
        }
        if z.capacity() > KEEP {
            *z = Vec::new();
        }
    }
}

/// Counts one message sent compressed: `raw` bytes as `wire` bytes.
pub fn count_out(m: &ShardMetrics, raw: usize, wire: usize) {
    m.deflate_out[0].fetch_add(raw as u64, Relaxed);
    m.deflate_out[1].fetch_add(wire as u64, Relaxed);
}

/// Counts what the inflater took in and gave out since the last count.
pub fn count_in(inflater: &mut Inflater, m: &ShardMetrics) {
    let (raw, wire) = inflater.take_counts();
    if wire > 0 {
        m.deflate_in[0].fetch_add(raw, Relaxed);
        m.deflate_in[1].fetch_add(wire, Relaxed);
    }
}
