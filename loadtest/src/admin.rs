//! The gateway's admin endpoint: a minimal HTTP/1.0 GET and Prometheus text parsing.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on `addr`; returns (status, body). Bounded to 5 s.
pub async fn get(addr: &str, path: &str) -> Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect admin {addr}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("bad HTTP status line")?;
        Ok::<_, anyhow::Error>((status, body.to_string()))
    };
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(r) => r,
        Err(_) => bail!("admin {addr}{path}: timed out"),
    }
}

/// Sum of every sample of metric `name` (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    metric_sum_with(text, name, "")
}

/// Sum of the samples of metric `name` whose labels contain `label`
/// (e.g. `code="4003"`; empty: all).
pub fn metric_sum_with(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') || !line.contains(label) {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = match rest.rfind('}') {
            Some(i) if rest.starts_with('{') => &rest[i + 1..],
            _ => rest,
        };
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            sum += v;
            found = true;
        }
    }
    found.then_some(sum)
}

/// A snapshot of the metrics the harness reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Snapshot {
    /// `edgegate_connections` summed.
    pub connections: Option<f64>,
    /// `edgegate_sessions` summed.
    pub sessions: Option<f64>,
    /// `edgegate_messages_in_total` summed.
    pub messages_in: Option<f64>,
    /// `edgegate_messages_out_total` summed.
    pub messages_out: Option<f64>,
    /// `edgegate_writes_out_total` summed (batches handed to transports).
    pub writes_out: Option<f64>,
    /// `edgegate_drops_total` summed.
    pub drops: Option<f64>,
    /// `edgegate_connections_refused_total` summed.
    pub refused: Option<f64>,
    /// `process_resident_memory_bytes`, when the gateway exports it.
    pub rss_bytes: Option<f64>,
}

/// Reads `/metrics` from `addr`; `None` when unreachable.
pub async fn snapshot(addr: &str) -> Option<Snapshot> {
    let (status, body) = get(addr, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    Some(Snapshot {
        connections: metric_sum(&body, "edgegate_connections"),
        sessions: metric_sum(&body, "edgegate_sessions"),
        messages_in: metric_sum(&body, "edgegate_messages_in_total"),
        messages_out: metric_sum(&body, "edgegate_messages_out_total"),
        writes_out: metric_sum(&body, "edgegate_writes_out_total"),
        drops: metric_sum(&body, "edgegate_drops_total"),
        refused: metric_sum(&body, "edgegate_connections_refused_total"),
        rss_bytes: metric_sum(&body, "process_resident_memory_bytes"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_over_labels() {
        let t = "# HELP edgegate_connections open\n# TYPE edgegate_connections gauge\n\
edgegate_connections{shard=\"0\",transport=\"ws\"} 10\n\
edgegate_connections{shard=\"1\",transport=\"ws\"} 5\n\
edgegate_connections_accepted_total{shard=\"0\",transport=\"ws\"} 99\n\
edgegate_sessions 3\n";
        assert_eq!(metric_sum(t, "edgegate_connections"), Some(15.0));
        assert_eq!(
            metric_sum(t, "edgegate_connections_accepted_total"),
            Some(99.0)
        );
        assert_eq!(metric_sum(t, "edgegate_sessions"), Some(3.0));
        assert_eq!(metric_sum(t, "edgegate_nothing"), None);
        assert_eq!(
            metric_sum_with(t, "edgegate_connections", "shard=\"1\""),
            Some(5.0)
        );
    }
}
