//! The webhook sender: lifecycle events POSTed to `[webhooks] url` in
//! batches `{"events":[...]}`, signed with
//! `Eg-Signature: sha256=<hex HMAC-SHA256 of the body with [webhooks] secret>`.
//!
//! Events wait in a bounded queue ([`super::Bus`] drops and counts what does
//! not fit). The sender takes what is queued, up to `batch` events, as one
//! POST; a batch that fails (no answer in time, a refused connection, a
//! non-2xx status) is sent again with exponential backoff and full jitter
//! until `retry_for_ms` has passed since its first try, then dropped and
//! counted. Meanwhile new events queue behind it, so a receiver that is
//! down for a while gets everything in order once it is back, within the
//! queue's bound.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use ring::hmac;
use tracing::warn;

use crate::config::Webhooks;
use crate::http::client::{Pool, Target};
use crate::metrics::ServicesStats;

/// Index of the events sent, in [`ServicesStats::webhook`].
pub const SENT: usize = 0;
/// Index of the events sent again after a failed try.
pub const RETRIED: usize = 1;
/// Index of the events dropped (queue full, or retried too long).
pub const DROPPED: usize = 2;

/// The signature header's value for `body`.
pub fn signature(key: &hmac::Key, body: &[u8]) -> String {
    let tag = hmac::sign(key, body);
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256=");
    for b in tag.as_ref() {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// Sends what arrives on `rx` until every sender is gone.
pub async fn run(
    cfg: Webhooks,
    mut rx: tokio::sync::mpsc::Receiver<serde_json::Value>,
    stats: Arc<ServicesStats>,
) {
    let (Some(url), Some(secret)) = (cfg.url.as_deref(), cfg.secret.as_deref()) else {
        return;
    };
    let target = match Target::parse(url) {
        Ok(t) => t,
        Err(e) => return warn!(error = %e, "webhooks: off"),
    };
    // The receiver's answers are not read beyond their status.
    let pool = Pool::new(target, 64 * 1024);
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let retry_for = Duration::from_millis(cfg.retry_for_ms);
    let mut batch = Vec::with_capacity(cfg.batch);
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, cfg.batch).await == 0 {
            return;
        }
        let n = batch.len() as u64;
        let body = serde_json::json!({ "events": batch })
            .to_string()
            .into_bytes();
        let sig = signature(&key, &body);
        let headers = [
            ("Content-Type", "application/json"),
            ("Eg-Signature", sig.as_str()),
        ];
        let first = Instant::now();
        let mut attempt = 0u32;
        loop {
            let r = pool.post(&headers, &body, &[], timeout).await;
            if r.as_ref().is_ok_and(|r| (200..300).contains(&r.status)) {
                stats.webhook[SENT].fetch_add(n, Relaxed);
                break;
            }
            let left = retry_for.saturating_sub(first.elapsed());
            if left.is_zero() {
                stats.webhook[DROPPED].fetch_add(n, Relaxed);
                warn!(events = n, url, outcome = ?r.map(|r| r.status), "webhooks: batch dropped after retrying for webhooks.retry_for_ms");
                break;
            }
            stats.webhook[RETRIED].fetch_add(n, Relaxed);
            let wait = edgegate_proto::backoff::full_jitter(
                Duration::from_millis(100),
                Duration::from_secs(5),
                attempt,
                |max| fastrand::u64(0..=max),
            );
            tokio::time::sleep(wait.min(left)).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            signature(&key, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
