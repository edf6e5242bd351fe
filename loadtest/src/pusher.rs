//! The Pusher dialect: the fan-out scenario against a server that speaks
//! the Pusher Channels protocol (sockudo, soketi), with the same lean
//! subscribers, the same stamps and the same accounting as for edgegate
//! (`loadtest fanout --dialect pusher --target HOST:PORT`).
//!
//! Subscribers open the WebSocket at `/app/<key>?protocol=7`, wait for
//! `pusher:connection_established`, send `pusher:subscribe` and wait for
//! `pusher_internal:subscription_succeeded`; the server's `pusher:ping` is
//! answered with `pusher:pong`. Each delivery is one text frame, an event
//! whose `data` string is the stamp: `<p>.<s>.<t>` and the padding (no
//! character that JSON would escape, so it is read in place).
//!
//! Publishers use the HTTP API as a backend would: `POST
//! /apps/<id>/batch_events` (up to 10 events a request), signed as the
//! Pusher HTTP API asks (`auth_key`, `auth_timestamp`, `auth_version`,
//! `body_md5`, and `auth_signature`, the HMAC-SHA256 of the method, path
//! and sorted query with the app's secret), one request at a time on a
//! keep-alive connection (a new one after a response that says
//! `Connection: close`, as sockudo's do); a publish counts as sent when
//! its request is answered 200. Channel names cannot hold `:`, so `room:x` is `room-x`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::{Context, Result, anyhow, bail};
use edgegate_client::ClientConfig;
use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use crate::lean::{Batch, Books, LeanSub, close_text};
use crate::payload::Stamp;
use crate::peer::{Counters, PeerStats, now_ns};

/// Events per HTTP request (the Pusher API's batch limit).
const BATCH_EVENTS: usize = 10;

/// An app's credentials on the Pusher server.
#[derive(Clone, Debug)]
pub struct App {
    /// App id (in the HTTP API's path).
    pub id: String,
    /// App key (in the WebSocket path and the API's `auth_key`).
    pub key: String,
    /// App secret (signs API requests).
    pub secret: String,
}

impl App {
    /// `id:key:secret`.
    pub fn parse(s: &str) -> Result<App> {
        let mut it = s.splitn(3, ':');
        match (it.next(), it.next(), it.next()) {
            (Some(id), Some(key), Some(secret))
                if !id.is_empty() && !key.is_empty() && !secret.is_empty() =>
            {
                Ok(App {
                    id: id.into(),
                    key: key.into(),
                    secret: secret.into(),
                })
            }
            _ => bail!("--pusher-app takes id:key:secret"),
        }
    }
}

/// The Pusher channel for an edgegate channel name (`room:a` → `room-a`).
pub fn channel(ch: &str) -> String {
    ch.replace(':', "-")
}

/// One subscriber: a [`LeanSub`] speaking Pusher.
pub struct PusherSub {
    ws: LeanSub,
}

/// What a text frame from the server is.
#[derive(Debug, PartialEq, Eq)]
enum Event<'a> {
    /// An event carrying `data` (a delivery, or one of the protocol's).
    Data { name: &'a [u8], data: &'a [u8] },
    /// Anything without a string `data`.
    Other { name: &'a [u8] },
}

/// The value of the string field `key` (`"key":"…"`), unescaped only where
/// nothing needs it (the stamp never has an escape).
fn field<'a>(frame: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = memchr::memmem::find(frame, key)? + key.len();
    let rest = &frame[at..];
    let end = memchr::memchr(b'"', rest)?;
    Some(&rest[..end])
}

fn event(frame: &[u8]) -> Event<'_> {
    let name = field(frame, br#""event":""#).unwrap_or_default();
    match field(frame, br#""data":""#) {
        Some(data) => Event::Data { name, data },
        None => Event::Other { name },
    }
}

/// A stamp as [`encode_stamp`] writes it.
fn decode_stamp(b: &[u8]) -> Option<Stamp> {
    let mut it = b.split(|&c| c == b'.');
    let num = |s: Option<&[u8]>| -> Option<u64> {
        let s = s?;
        let digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
        std::str::from_utf8(&s[..digits]).ok()?.parse().ok()
    };
    let p = num(it.next())?;
    let s = num(it.next())?;
    let t = num(it.next())?;
    Some(Stamp { p, s, t })
}

fn encode_stamp(st: Stamp, pad: usize) -> String {
    let mut s = format!("{}.{}.{}", st.p, st.s, st.t);
    s.extend(std::iter::repeat_n('x', pad));
    s
}

impl PusherSub {
    /// Connects, waits for the connection, subscribes to each of `channels`
    /// and waits for each subscription, within `cfg.connect_timeout`.
    pub async fn connect(cfg: &ClientConfig, app: &App, channels: &[String]) -> Result<Self> {
        let t = cfg.connect_timeout;
        tokio::time::timeout(t, Self::connect_inner(cfg, app, channels))
            .await
            .map_err(|_| anyhow!("{}: Pusher subscribe timed out after {t:?}", cfg.addr))?
    }

    async fn connect_inner(cfg: &ClientConfig, app: &App, channels: &[String]) -> Result<Self> {
        let path = format!(
            "/app/{}?protocol=7&client=edgegate-loadtest&version=1.0",
            app.key
        );
        let ws = LeanSub::open(cfg, false, None, &path).await?;
        let mut s = PusherSub { ws };
        s.wait_for(b"pusher:connection_established").await?;
        for ch in channels {
            let sub = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": ch}});
            s.ws.send_text(sub.to_string().into_bytes()).await?;
            s.wait_for(b"pusher_internal:subscription_succeeded")
                .await?;
        }
        Ok(s)
    }

    /// Reads until an event named `want` (an error event is an error).
    async fn wait_for(&mut self, want: &[u8]) -> Result<()> {
        loop {
            while let Some(n) = self.ws.next_frame()? {
                match n.op {
                    Some(OpCode::Data(Data::Text | Data::Binary)) => {
                        let f = &self.ws.buf[n.body];
                        let name = match event(f) {
                            Event::Data { name, .. } | Event::Other { name } => name,
                        };
                        if name == want {
                            return Ok(());
                        }
                        if name == b"pusher:error" {
                            bail!("{}", String::from_utf8_lossy(f));
                        }
                    }
                    Some(OpCode::Control(Control::Close)) => {
                        bail!("closed by server: {}", close_text(&self.ws.buf[n.body]))
                    }
                    _ => {}
                }
            }
            if self.ws.fill().await? == 0 {
                bail!("closed before {}", String::from_utf8_lossy(want));
            }
        }
    }
}

/// Starts a subscriber's receive loop (records deliveries until `stop`).
pub fn spawn_subscriber(
    s: PusherSub,
    counters: &Arc<Counters>,
    stop: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<PeerStats> {
    tokio::spawn(run_sub(s, counters.clone(), stop.clone()))
}

async fn run_sub(
    mut s: PusherSub,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> PeerStats {
    let mut books = Books::new();
    let mut batch = Batch::default();
    let mut lat_us = Vec::new();
    let end: Result<()> = 'outer: loop {
        let mut pings = 0usize;
        let mut ws_pings = Vec::new();
        loop {
            let n = match s.ws.next_frame() {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => break 'outer Err(e),
            };
            match n.op {
                Some(OpCode::Data(Data::Text | Data::Binary)) => match event(&s.ws.buf[n.body]) {
                    Event::Data { name, data } if !name.starts_with(b"pusher") => {
                        books.stamp(&mut batch, decode_stamp(data));
                    }
                    Event::Data { name, .. } | Event::Other { name } => {
                        if name == b"pusher:ping" {
                            pings += 1;
                        }
                    }
                },
                Some(OpCode::Control(Control::Ping)) => {
                    ws_pings.push(s.ws.buf[n.body].to_vec());
                }
                Some(OpCode::Control(Control::Close)) => {
                    break 'outer Err(anyhow!(
                        "closed by server: {}",
                        close_text(&s.ws.buf[n.body])
                    ));
                }
                _ => {}
            }
        }
        batch.publish(&mut books, &counters, &mut lat_us);
        for body in ws_pings {
            if let Err(e) = s.ws.pong(&body).await {
                break 'outer Err(e);
            }
        }
        for _ in 0..pings {
            if let Err(e) =
                s.ws.send_text(br#"{"event":"pusher:pong","data":{}}"#.to_vec())
                    .await
            {
                break 'outer Err(e);
            }
        }
        tokio::select! {
            r = s.ws.fill() => match r {
                Ok(0) => break Err(anyhow!("connection closed by the server")),
                Ok(_) => {}
                Err(e) => break Err(e),
            },
            _ = stop.changed() => break Ok(()),
        }
    };
    let stats = books.finish();
    finish(stats, end, &counters)
}

fn finish(mut stats: PeerStats, end: Result<()>, counters: &Counters) -> PeerStats {
    if let Err(e) = end {
        counters.disconnects.fetch_add(1, Relaxed);
        stats.lost = Some(e.to_string());
    }
    stats
}

/// A publisher's connection to the HTTP API (kept alive while the server
/// allows).
pub struct PusherPub {
    /// `None` after the server said `Connection: close`.
    stream: Option<TcpStream>,
    target: SocketAddr,
    source: Option<std::net::IpAddr>,
    timeout: std::time::Duration,
    host: String,
    app: App,
    buf: Vec<u8>,
}

impl PusherPub {
    /// Connects to the HTTP API at `cfg.addr` (from `cfg.source_addr`).
    pub async fn connect(cfg: &ClientConfig, app: &App) -> Result<Self> {
        let host = cfg
            .addr
            .trim_start_matches("http://")
            .trim_start_matches("ws://")
            .to_owned();
        let target: SocketAddr = tokio::net::lookup_host(host.as_str())
            .await?
            .next()
            .ok_or_else(|| anyhow!("{host}: no address"))?;
        let mut p = PusherPub {
            stream: None,
            target,
            source: cfg.source_addr,
            timeout: cfg.connect_timeout,
            host,
            app: app.clone(),
            buf: Vec::new(),
        };
        p.stream = Some(p.dial().await?);
        Ok(p)
    }

    async fn dial(&self) -> Result<TcpStream> {
        let target = self.target;
        let sock = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self.source {
            sock.bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("bind {ip}"))?;
        }
        let stream = tokio::time::timeout(self.timeout, sock.connect(target))
            .await
            .map_err(|_| anyhow!("{target}: connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Publishes `events` (channel, data) in one signed request; `Ok` on 200.
    async fn publish(&mut self, events: &[(String, String)]) -> Result<()> {
        let batch: Vec<serde_json::Value> = events
            .iter()
            .map(|(ch, data)| serde_json::json!({"name": "msg", "channel": ch, "data": data}))
            .collect();
        let body = serde_json::json!({ "batch": batch }).to_string();
        let path = format!("/apps/{}/batch_events", self.app.id);
        let query = signed_query(&self.app, "POST", &path, body.as_bytes(), unix_secs());
        let req = format!(
            "POST {path}?{query} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        let mut stream = match self.stream.take() {
            Some(s) => s,
            None => self.dial().await?,
        };
        self.buf.clear();
        stream.write_all(req.as_bytes()).await?;
        let (status, body, keep) = self.response(&mut stream).await?;
        if keep {
            self.stream = Some(stream);
        }
        if status != 200 {
            bail!(
                "the HTTP API answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }

    /// Reads one response with a `Content-Length` body: status, body, and
    /// whether the connection stays open.
    async fn response(&mut self, stream: &mut TcpStream) -> Result<(u16, Vec<u8>, bool)> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = resp.parse(&self.buf)? {
                let status = resp.code.unwrap_or(0);
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                    .unwrap_or(0usize);
                let keep = !resp.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("connection")
                        && h.value.eq_ignore_ascii_case(b"close")
                });
                if self.buf.len() >= head + len {
                    let body = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    return Ok((status, body, keep));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the HTTP API closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The query string of a signed Pusher HTTP API request (keys sorted, as
/// the signature is made over them).
fn signed_query(app: &App, method: &str, path: &str, body: &[u8], now: u64) -> String {
    let md5 = hex(&Md5::digest(body));
    let query = format!(
        "auth_key={}&auth_timestamp={now}&auth_version=1.0&body_md5={md5}",
        app.key
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, app.secret.as_bytes());
    let sig = ring::hmac::sign(&key, format!("{method}\n{path}\n{query}").as_bytes());
    format!("{query}&auth_signature={}", hex(sig.as_ref()))
}

/// Starts a publisher: on each command `n` it publishes `n` stamped events
/// to `channel`, 10 to a request.
pub fn spawn_publisher(
    p: PusherPub,
    index: u64,
    channel: String,
    pad: usize,
    counters: &Arc<Counters>,
    stop: &watch::Receiver<bool>,
) -> crate::peer::Publisher {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        tx,
        tokio::spawn(run_pub(
            p,
            rx,
            index,
            channel,
            pad,
            counters.clone(),
            stop.clone(),
        )),
    )
}

async fn run_pub(
    mut p: PusherPub,
    mut rx: mpsc::UnboundedReceiver<u32>,
    index: u64,
    channel: String,
    pad: usize,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> PeerStats {
    let mut seq = 0u64;
    let mut sent = 0u64;
    let end: Result<()> = loop {
        let n = tokio::select! {
            c = rx.recv() => match c {
                Some(n) => n,
                None => break Ok(()),
            },
            _ = stop.changed() => break Ok(()),
        };
        let mut left = n as usize;
        let mut failed = None;
        while left > 0 {
            let k = left.min(BATCH_EVENTS);
            let events: Vec<(String, String)> = (0..k)
                .map(|_| {
                    seq += 1;
                    let st = Stamp {
                        p: index,
                        s: seq,
                        t: now_ns(),
                    };
                    (channel.clone(), encode_stamp(st, pad))
                })
                .collect();
            if let Err(e) = p.publish(&events).await {
                failed = Some(e);
                break;
            }
            sent += k as u64;
            counters.sent.fetch_add(k as u64, Relaxed);
            counters.acked.fetch_add(k as u64, Relaxed);
            left -= k;
        }
        if let Some(e) = failed {
            break Err(e);
        }
    };
    let stats = PeerStats {
        sent,
        ..PeerStats::default()
    };
    finish(stats, end, &counters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_events_are_read_in_place() {
        let st = Stamp {
            p: 3,
            s: 17,
            t: 123_456,
        };
        let data = encode_stamp(st, 5);
        assert_eq!(data, "3.17.123456xxxxx");
        let frame = format!(r#"{{"event":"msg","channel":"room-a","data":"{data}"}}"#);
        match event(frame.as_bytes()) {
            Event::Data { name, data } => {
                assert_eq!(name, b"msg");
                let got = decode_stamp(data).expect("stamp");
                assert_eq!((got.p, got.s, got.t), (3, 17, 123_456));
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(
            event(br#"{"event":"pusher:ping","data":{}}"#),
            Event::Other {
                name: b"pusher:ping"
            }
        );
        assert!(decode_stamp(b"x.1.2").is_none());
        assert_eq!(channel("room:lt-1"), "room-lt-1");
        assert!(App::parse("a:b").is_err());
    }

    #[test]
    fn requests_are_signed_as_the_pusher_api_documents() {
        // The worked example of Pusher's HTTP API reference ("Generating
        // authentication signatures"): the same key, secret, timestamp and
        // body give the documented signature.
        let app = App {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        };
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let q = signed_query(&app, "POST", "/apps/3/events", body, 1_353_088_179);
        assert_eq!(
            q,
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }
}
