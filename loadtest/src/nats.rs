//! The NATS dialect: the fan-out scenario against nats-server's WebSocket
//! listener, with the same lean subscribers, the same stamps and the same
//! accounting, so that a figure for edgegate has a twin measured the same
//! way (`loadtest fanout --dialect nats --target HOST:PORT`).
//!
//! Over the WebSocket (the upgrade and framing of [`LeanSub`]) the client
//! speaks the NATS text protocol: the server's `INFO`, then `CONNECT`,
//! `SUB <subject> 1` and `PING`, ready at the `PONG`. Deliveries are
//! `MSG <subject> <sid> [reply] <size>\r\n<payload>\r\n`, the stamp being
//! the same JSON as edgegate's; NATS operations may straddle WebSocket
//! frames, so the frames' payloads are joined into one byte stream first.
//! The server's `PING` is answered. Publishers write `PUB` batches as one
//! frame each; NATS has no acknowledgement (core NATS is at most once), so
//! `acked` stays 0 and a publish counts as sent once written.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::{Result, anyhow, bail};
use edgegate_client::ClientConfig;
use tokio::sync::{mpsc, watch};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use crate::lean::{Batch, Books, LeanSub, close_text};
use crate::payload::{self, Stamp};
use crate::peer::{Counters, PeerStats, now_ns};

/// The NATS subject for an edgegate channel name (`room:a` → `room.a`).
pub fn subject(ch: &str) -> String {
    ch.replace(':', ".")
}

/// One NATS connection over WebSocket: a [`LeanSub`] and the NATS byte stream.
pub struct NatsConn {
    ws: LeanSub,
    /// NATS protocol bytes received, not yet parsed.
    stream: Vec<u8>,
}

/// A protocol operation read from the stream.
enum Op {
    Msg(std::ops::Range<usize>),
    Ping,
    Pong,
    Err(String),
    Other,
}

impl NatsConn {
    /// Connects (WebSocket upgrade on `/` unless the address names a path),
    /// reads `INFO`, sends `CONNECT` (and `SUB <subject> <n>` for each of
    /// `subs`), and waits for the `PONG` of a `PING`, within
    /// `cfg.connect_timeout`.
    pub async fn connect(cfg: &ClientConfig, subs: &[String]) -> Result<NatsConn> {
        let t = cfg.connect_timeout;
        tokio::time::timeout(t, Self::connect_inner(cfg, subs))
            .await
            .map_err(|_| anyhow!("{}: NATS connect timed out after {t:?}", cfg.addr))?
    }

    async fn connect_inner(cfg: &ClientConfig, subs: &[String]) -> Result<NatsConn> {
        let ws = LeanSub::open(cfg, false, None, "/").await?;
        let mut c = NatsConn {
            ws,
            stream: Vec::new(),
        };
        let mut hello = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":false,\"name\":\"{}\"}}\r\n",
            cfg.user
        );
        for (i, s) in subs.iter().enumerate() {
            hello.push_str(&format!("SUB {s} {}\r\n", i + 1));
        }
        hello.push_str("PING\r\n");
        c.ws.send_frame(hello.into_bytes()).await?;
        loop {
            let mut pos = 0;
            while let Some((op, next)) = parse_op(&c.stream, pos)? {
                pos = next;
                match op {
                    Op::Err(e) => bail!("{}: {e}", cfg.addr),
                    Op::Pong => {
                        c.stream.drain(..pos);
                        return Ok(c);
                    }
                    _ => {}
                }
            }
            c.stream.drain(..pos);
            if !c.read().await? {
                bail!("{}: closed during the NATS handshake", cfg.addr);
            }
        }
    }

    /// Reads once and appends the data frames' payloads to the stream
    /// (answering WebSocket pings); false at the end of the connection.
    async fn read(&mut self) -> Result<bool> {
        loop {
            while let Some(n) = self.ws.next_frame()? {
                match n.op {
                    Some(OpCode::Data(Data::Binary | Data::Text)) => {
                        self.stream.extend_from_slice(&self.ws.buf[n.body]);
                    }
                    Some(OpCode::Control(Control::Ping)) => {
                        let body = self.ws.buf[n.body].to_vec();
                        self.ws.pong(&body).await?;
                    }
                    Some(OpCode::Control(Control::Close)) => {
                        bail!("closed by server: {}", close_text(&self.ws.buf[n.body]))
                    }
                    _ => {}
                }
            }
            if !self.stream.is_empty() {
                return Ok(true);
            }
            if self.ws.fill().await? == 0 {
                return Ok(false);
            }
        }
    }
}

/// The operation starting at `pos`, and where the next one starts; `None`
/// until it is all in `buf`.
fn parse_op(buf: &[u8], pos: usize) -> Result<Option<(Op, usize)>> {
    let Some(nl) = memchr::memmem::find(&buf[pos..], b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[pos..pos + nl];
    let after = pos + nl + 2;
    if let Some(args) = line.strip_prefix(b"MSG ") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let size = args
            .rsplit(|&c| c == b' ')
            .next()
            .and_then(|s| std::str::from_utf8(s).ok()?.parse::<usize>().ok())
            .ok_or_else(|| anyhow!("bad MSG line {:?}", String::from_utf8_lossy(line)))?;
        if buf.len() < after + size + 2 {
            return Ok(None);
        }
        return Ok(Some((Op::Msg(after..after + size), after + size + 2)));
    }
    let op = if line == b"PING" {
        Op::Ping
    } else if line == b"PONG" {
        Op::Pong
    } else if line.starts_with(b"-ERR") {
        Op::Err(String::from_utf8_lossy(line).into_owned())
    } else {
        Op::Other // +OK, INFO
    };
    Ok(Some((op, after)))
}

/// Starts a subscriber's receive loop (records deliveries until `stop`).
pub fn spawn_subscriber(
    c: NatsConn,
    counters: &Arc<Counters>,
    stop: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<PeerStats> {
    tokio::spawn(run(c, None, counters.clone(), stop.clone()))
}

/// Starts a publisher: on each command `n` it writes `n` stamped `PUB`s to
/// `subject` in one frame.
pub fn spawn_publisher(
    c: NatsConn,
    index: u64,
    subject: String,
    pad: usize,
    counters: &Arc<Counters>,
    stop: &watch::Receiver<bool>,
) -> crate::peer::Publisher {
    let (tx, rx) = mpsc::unbounded_channel();
    let role = Some((rx, index, subject, pad));
    (
        tx,
        tokio::spawn(run(c, role, counters.clone(), stop.clone())),
    )
}

type PubRole = (mpsc::UnboundedReceiver<u32>, u64, String, usize);

async fn run(
    mut c: NatsConn,
    mut role: Option<PubRole>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> PeerStats {
    let mut books = Books::new();
    let mut batch = Batch::default();
    let mut lat_us = Vec::new();
    let mut seq = 0u64;
    let mut sent = 0u64;
    let end: Result<()> = loop {
        // Parse what has arrived.
        let mut pos = 0;
        let mut pings = 0;
        let parsed = loop {
            match parse_op(&c.stream, pos) {
                Ok(Some((op, next))) => {
                    match op {
                        Op::Msg(r) => books.stamp(&mut batch, payload::decode_json(&c.stream[r])),
                        Op::Ping => pings += 1,
                        Op::Err(e) => break Err(anyhow!("{e}")),
                        Op::Pong | Op::Other => {}
                    }
                    pos = next;
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        c.stream.drain(..pos);
        batch.publish(&mut books, &counters, &mut lat_us);
        if let Err(e) = parsed {
            break Err(e);
        }
        if pings > 0
            && let Err(e) = c.ws.send_frame(b"PONG\r\n".repeat(pings)).await
        {
            break Err(e);
        }
        tokio::select! {
            r = c.read() => match r {
                Ok(true) => {}
                Ok(false) => break Err(anyhow!("connection closed by the server")),
                Err(e) => break Err(e),
            },
            cmd = async {
                match role.as_mut() {
                    Some((rx, ..)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match (cmd, role.as_ref()) {
                (Some(n), Some((_, index, subject, pad))) => {
                    let mut out = Vec::new();
                    for _ in 0..n {
                        seq += 1;
                        let st = Stamp { p: *index, s: seq, t: now_ns() };
                        let body = payload::encode(crate::Encoding::Json, st, *pad);
                        let body = body.bytes();
                        out.extend_from_slice(format!("PUB {subject} {}\r\n", body.len()).as_bytes());
                        out.extend_from_slice(body);
                        out.extend_from_slice(b"\r\n");
                    }
                    if let Err(e) = c.ws.send_frame(out).await {
                        break Err(e);
                    }
                    sent += u64::from(n);
                    counters.sent.fetch_add(u64::from(n), Relaxed);
                }
                _ => role = None,
            },
            _ = stop.changed() => break Ok(()),
        }
    };
    let mut stats = books.finish();
    stats.sent = sent;
    if let Err(e) = end {
        counters.disconnects.fetch_add(1, Relaxed);
        stats.lost = Some(e.to_string());
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_msg_ping_and_errors_and_waits_for_whole_messages() {
        let wire = b"INFO {}\r\nMSG room.a 1 5\r\nhello\r\nPING\r\nPONG\r\nMSG room.a 1 _INBOX.x 2\r\nhi\r\n-ERR 'Slow Consumer'\r\n";
        let mut pos = 0;
        let mut seen = Vec::new();
        while let Some((op, next)) = parse_op(wire, pos).expect("parse") {
            seen.push(match op {
                Op::Msg(r) => String::from_utf8_lossy(&wire[r]).into_owned(),
                Op::Ping => "PING".into(),
                Op::Pong => "PONG".into(),
                Op::Err(e) => e,
                Op::Other => "other".into(),
            });
            pos = next;
        }
        assert_eq!(
            seen,
            [
                "other",
                "hello",
                "PING",
                "PONG",
                "hi",
                "-ERR 'Slow Consumer'"
            ]
        );
        assert_eq!(pos, wire.len());
        let cut = b"MSG room.a 1 5\r\nhel";
        assert!(parse_op(cut, 0).expect("partial").is_none());
        assert!(parse_op(b"MSG room.a 1 x\r\n", 0).is_err());
        assert_eq!(subject("room:lt-1"), "room.lt-1");
    }
}
