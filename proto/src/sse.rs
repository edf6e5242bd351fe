//! SSE, for clients that cannot use WebSocket (docs/protocol.md §10), sans
//! I/O: the requests a client makes on `/sse`, the event stream the server
//! writes, the session token that names a connection, and a reader of the
//! event stream for clients (the harness, the Rust client, tests).
//!
//! * [`parse_request`]: a request head on the SSE path — `GET /sse?hello=`
//!   (the `hello` envelope, URL-encoded), `POST /sse` with `Eg-Session`, or
//!   a browser's CORS preflight (`OPTIONS`) — with what the gateway
//!   decides from it: the decoded `hello`, the origin, the session token,
//!   the body's framing, keep-alive.
//! * [`write_event`]: a batch of JSON envelopes (separated by `\n`, as in a
//!   WebSocket text message) as one event, one `data:` line per envelope.
//!   [`HEARTBEAT`] is the comment line sent when the stream is quiet.
//! * [`SessionId`]: `welcome.meta.session` is
//!   `<node>.<shard>.<slot>.<serial>.<mac>`: where the connection lives
//!   (so a POST that lands on another shard or node is forwarded there) and
//!   a MAC the gateway makes with a secret key, so that a token cannot be
//!   guessed from a connection's name. The MAC is the gateway's business;
//!   this module only splits and joins the text.
//! * [`EventReader`]: `text/event-stream` as the WHATWG HTML standard
//!   parses it (lines end with CRLF, LF or CR; `data:` lines accumulate;
//!   a blank line dispatches; `:` lines are comments).
//!
//! Nothing here can panic on peer input (unit tests below, fuzz target
//! `sse`); everything is bounded by the caller's buffers and limits.

use std::borrow::Cow;

use crate::http::{self, Body, HttpError};

/// The comment line the server writes when the stream has been quiet for
/// `hb_ms` (docs/protocol.md §10).
pub const HEARTBEAT: &[u8] = b":\n";

/// Longest session token accepted (a node id can be long; the rest is
/// about 80 bytes).
pub const MAX_TOKEN: usize = 512;

/// The request's method, as far as SSE cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`: open the event stream.
    Get,
    /// `POST`: envelopes for an open session.
    Post,
    /// `OPTIONS`: a browser's CORS preflight for the `POST`.
    Options,
    /// Anything else (answered 405).
    Other,
}

/// What the gateway needs of a request head on the SSE path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The target's path, without the query.
    pub path: String,
    /// `hello=` from the query: the `hello` envelope's JSON text,
    /// percent-decoded (`+` is a space, as in a form).
    pub hello: Option<Vec<u8>>,
    /// `token=` from the query, percent-decoded.
    pub query_token: Option<String>,
    /// The `Authorization: Bearer` token, trimmed.
    pub bearer: Option<String>,
    /// The `Origin` header (browsers send it on cross-origin requests and
    /// on every `POST`).
    pub origin: Option<String>,
    /// The `Eg-Session` header, trimmed.
    pub session: Option<String>,
    /// The body's framing (`Length(0)` when the request has none).
    pub body: Body,
    /// The client keeps the connection open after the answer.
    pub keep_alive: bool,
    /// Bytes of the buffer the head took.
    pub len: usize,
}

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// Not an HTTP/1.x head, too many headers, or a body framing refused
    /// (answered 400, or 431 for too many headers).
    Http(HttpError),
    /// The query's `hello` or `token` is not valid percent-encoding.
    BadQuery,
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Http(e) => e.fmt(f),
            RequestError::BadQuery => f.write_str("malformed percent-encoding in the query"),
        }
    }
}

impl std::error::Error for RequestError {}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

/// Parses a request head at the start of `buf`: `Ok(None)` when more bytes
/// are needed.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; http::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError::Http(HttpError::TooManyHeaders));
        }
        Err(_) => return Err(RequestError::Http(HttpError::Malformed)),
    };
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| -> Result<Option<Vec<u8>>, RequestError> {
        match query
            .split('&')
            .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
        {
            Some(v) => percent_decode(v.as_bytes())
                .map(Some)
                .ok_or(RequestError::BadQuery),
            None => Ok(None),
        }
    };
    let hello = param("hello")?;
    let query_token = match param("token")? {
        Some(t) => Some(String::from_utf8(t).map_err(|_| RequestError::BadQuery)?),
        None => None,
    };
    let bearer = header(req.headers, "authorization").and_then(|v| {
        let (scheme, rest) = v.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim().to_owned())
    });
    let http11 = req.version == Some(1);
    let connection = header(req.headers, "connection").unwrap_or("");
    let has = |token: &str| {
        connection
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let keep_alive = if http11 {
        !has("close")
    } else {
        has("keep-alive")
    };
    Ok(Some(Request {
        method,
        path: path.to_owned(),
        hello,
        query_token: query_token.filter(|t| !t.is_empty()),
        bearer: bearer.filter(|t| !t.is_empty()),
        origin: header(req.headers, "origin").map(str::to_owned),
        session: header(req.headers, "eg-session").map(str::to_owned),
        body: http::framing(req.headers, Body::Length(0)).map_err(RequestError::Http)?,
        keep_alive,
        len,
    }))
}

/// `s` percent-encoded as a query value: every byte but the unreserved
/// characters (`A-Z a-z 0-9 - _ . ~`) as `%XX` (what a client puts in
/// `hello=`).
pub fn percent_encode(s: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    out
}

/// Decodes `%XX` escapes, and `+` as a space (`application/x-www-form-urlencoded`,
/// what `URLSearchParams` writes; `encodeURIComponent` writes `%20`, and a
/// literal `+` is `%2B` in both). `None` on a bad escape.
pub fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let hi = (*s.get(i + 1)? as char).to_digit(16)?;
                let lo = (*s.get(i + 2)? as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Appends `batch` — JSON envelopes separated by `\n`, as the server
/// batches them for a WebSocket text message — as one event: a `data:`
/// line per envelope, then a blank line. The event's data is then the
/// batch itself (the standard joins `data:` lines with `\n`).
///
/// An encoded envelope never holds `\n` ([`crate::json::encode`]); a raw
/// `\r` (whitespace in a payload's JSON text: inside a JSON string it must
/// be escaped) would end the line for an SSE parser, so it is written as a
/// space, which keeps the value. Nothing is written for an empty batch.
pub fn write_event(batch: &[u8], out: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    out.reserve(batch.len() + 16);
    for line in batch.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        if line.contains(&b'\r') {
            out.extend(line.iter().map(|&b| if b == b'\r' { b' ' } else { b }));
        } else {
            out.extend_from_slice(line);
        }
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// A node id as it appears in a session token and a NATS subject token:
/// itself when it is made of `[A-Za-z0-9_-]` only, otherwise `~` and the
/// hex of its UTF-8 bytes (a node id may hold `.`, which separates the
/// token's parts and a subject's tokens).
pub fn node_token(node: &str) -> Cow<'_, str> {
    if !node.is_empty()
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Cow::Borrowed(node);
    }
    let mut s = String::with_capacity(1 + node.len() * 2);
    s.push('~');
    for b in node.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    Cow::Owned(s)
}

/// The part of a session token its MAC covers: `<node>.<shard>.<slot>.<serial>`
/// (the node as [`node_token`] writes it).
pub fn session_prefix(node: &str, shard: usize, slot: u32, serial: u64) -> String {
    format!("{}.{shard}.{slot}.{serial}", node_token(node))
}

/// A session token, split (borrowing the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionId<'a> {
    /// The node, as [`node_token`] wrote it.
    pub node: &'a str,
    /// The shard that owns the connection.
    pub shard: usize,
    /// The connection's slot on that shard.
    pub slot: u32,
    /// The connection's serial (a reused slot is not mistaken for it).
    pub serial: u64,
    /// What the MAC covers ([`session_prefix`]).
    pub signed: &'a str,
    /// The MAC, as written (base64url, no padding).
    pub mac: &'a str,
}

/// Splits a session token; `None` when it is not one (too long, a part
/// missing, a number that does not parse, characters no token holds).
pub fn parse_session(token: &str) -> Option<SessionId<'_>> {
    if token.len() > MAX_TOKEN {
        return None;
    }
    let (signed, mac) = token.rsplit_once('.')?;
    let mut parts = signed.rsplitn(4, '.');
    let serial = digits(parts.next()?)?;
    let slot = u32::try_from(digits(parts.next()?)?).ok()?;
    let shard = usize::try_from(digits(parts.next()?)?).ok()?;
    let node = parts.next()?;
    let node_ok = match node.strip_prefix('~') {
        Some(hex) => !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => node_token(node) == node,
    };
    let mac_ok = !mac.is_empty()
        && mac
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    (node_ok && mac_ok).then_some(SessionId {
        node,
        shard,
        slot,
        serial,
        signed,
        mac,
    })
}

/// What the MAC of a parsed token covers, made again from its parts: the
/// same text as [`SessionId::signed`] (numbers are read in their one
/// canonical form).
pub fn session_prefix_of(s: &SessionId<'_>) -> String {
    format!("{}.{}.{}.{}", s.node, s.shard, s.slot, s.serial)
}

/// A decimal number in canonical form: ASCII digits only, no sign, no
/// leading zero, at most 20 digits.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty()
        || s.len() > 20
        || (s.len() > 1 && s.starts_with('0'))
        || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

/// One thing read from an event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An event's data: its `data:` lines joined with `\n` (for edgegate,
    /// a batch of JSON envelopes, as in a WebSocket text message).
    Event(Vec<u8>),
    /// A comment line (the server's heartbeat).
    Comment,
}

/// An event or line longer than the reader's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

/// Reads `text/event-stream` incrementally, as the WHATWG HTML standard's
/// parser does (fields other than `data` are ignored: edgegate sends none).
#[derive(Debug, Clone)]
pub struct EventReader {
    /// The current line, not yet ended.
    line: Vec<u8>,
    /// The event's data so far, each line followed by `\n`.
    data: Vec<u8>,
    /// A `data` field was seen since the last dispatch.
    has_data: bool,
    /// The last byte was a CR: a LF right after it ends nothing more.
    after_cr: bool,
    /// Largest event (or line) accepted, in bytes.
    max: usize,
}

impl EventReader {
    /// A reader at the start of a stream, taking events up to `max` bytes.
    pub fn new(max: usize) -> Self {
        EventReader {
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            after_cr: false,
            max,
        }
    }

    /// Reads `bytes`, appending what they complete to `out`. Bytes of an
    /// unfinished line are kept for the next call.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Item>) -> Result<(), TooLong> {
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.after_cr && rest[0] == b'\n' {
                rest = &rest[1..];
                self.after_cr = false;
                continue;
            }
            self.after_cr = false;
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    if self.line.len() + i > self.max {
                        return Err(TooLong);
                    }
                    self.line.extend_from_slice(&rest[..i]);
                    self.after_cr = rest[i] == b'\r';
                    rest = &rest[i + 1..];
                    let line = std::mem::take(&mut self.line);
                    self.end_line(&line, out)?;
                    self.line = line;
                    self.line.clear();
                }
                None => {
                    if self.line.len() + rest.len() > self.max {
                        return Err(TooLong);
                    }
                    self.line.extend_from_slice(rest);
                    rest = &[];
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, line: &[u8], out: &mut Vec<Item>) -> Result<(), TooLong> {
        if line.is_empty() {
            if self.has_data {
                let mut data = std::mem::take(&mut self.data);
                // The standard drops the last line's LF.
                data.pop();
                out.push(Item::Event(data));
                self.has_data = false;
            }
            return Ok(());
        }
        if line[0] == b':' {
            out.push(Item::Comment);
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        if field == b"data" {
            if self.data.len() + value.len() + 1 > self.max {
                return Err(TooLong);
            }
            self.data.extend_from_slice(value);
            self.data.push(b'\n');
            self.has_data = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Request {
        parse_request(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn a_get_with_its_hello() {
        let r = req(
            "GET /sse?x=1&hello=%7B%22t%22%3A%22hello%22%2C%22meta%22%3A%7B%22user%22%3A%22a+b%22%7D%7D&token=abc%2E HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\r\n",
        );
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.path, "/sse");
        assert_eq!(
            r.hello.as_deref(),
            Some(&br#"{"t":"hello","meta":{"user":"a b"}}"#[..])
        );
        assert_eq!(r.query_token.as_deref(), Some("abc."));
        assert_eq!(r.origin.as_deref(), Some("https://app.example"));
        assert_eq!(r.body, Body::Length(0));
        assert!(r.keep_alive);
    }

    #[test]
    fn a_post_with_its_session_and_body() {
        let r = req(
            "POST /sse HTTP/1.1\r\nEg-Session:  n.0.1.2.mac \r\nContent-Length: 12\r\nConnection: close\r\nAuthorization: Bearer t\r\n\r\n",
        );
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.session.as_deref(), Some("n.0.1.2.mac"));
        assert_eq!(r.body, Body::Length(12));
        assert!(!r.keep_alive);
        assert_eq!(r.bearer.as_deref(), Some("t"));
        let r = req("POST /sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(r.body, Body::Chunked);
        let r = req("OPTIONS /sse HTTP/1.0\r\n\r\n");
        assert_eq!((r.method, r.keep_alive), (Method::Options, false));
        assert_eq!(req("PUT /sse HTTP/1.1\r\n\r\n").method, Method::Other);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert_eq!(parse_request(b"GET /sse HTTP/1.1\r\n"), Ok(None));
        assert_eq!(
            parse_request(b"GET /sse?hello=%7 HTTP/1.1\r\n\r\n"),
            Err(RequestError::BadQuery)
        );
        assert_eq!(
            parse_request(b"GET /sse?token=%FF HTTP/1.1\r\n\r\n"),
            Err(RequestError::BadQuery)
        );
        assert!(matches!(
            parse_request(b"POST /sse HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(RequestError::Http(HttpError::BadLength))
        ));
        assert!(matches!(
            parse_request(b"\x00\x01 nonsense\r\n\r\n"),
            Err(RequestError::Http(_))
        ));
        // A bad escape elsewhere in the query is none of SSE's business.
        assert!(
            req("GET /sse?a=%zz&hello=%7B%7D HTTP/1.1\r\n\r\n")
                .hello
                .is_some()
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"a%20b+c%2Bd").unwrap(), b"a b c+d");
        assert_eq!(percent_decode(b"%e2%82%ac").unwrap(), "€".as_bytes());
        assert_eq!(percent_decode(b"%"), None);
        assert_eq!(percent_decode(b"%4"), None);
        assert_eq!(percent_decode(b"%g0"), None);
        assert_eq!(percent_decode(b""), Some(vec![]));
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(percent_decode(percent_encode(&all).as_bytes()), Some(all));
        assert_eq!(percent_encode(b"{\"a b\"}"), "%7B%22a%20b%22%7D");
    }

    #[test]
    fn events_round_trip_through_the_reader() {
        let mut out = Vec::new();
        write_event(
            b"{\"t\":\"ok\",\"id\":1}\n{\"t\":\"msg\",\"d\":{\"a\":\r1}}",
            &mut out,
        );
        write_event(b"", &mut out);
        out.extend_from_slice(HEARTBEAT);
        write_event(b"{\"t\":\"pong\"}", &mut out);
        assert_eq!(
            out,
            b"data: {\"t\":\"ok\",\"id\":1}\ndata: {\"t\":\"msg\",\"d\":{\"a\": 1}}\n\n:\ndata: {\"t\":\"pong\"}\n\n"
        );
        let want = vec![
            Item::Event(b"{\"t\":\"ok\",\"id\":1}\n{\"t\":\"msg\",\"d\":{\"a\": 1}}".to_vec()),
            Item::Comment,
            Item::Event(b"{\"t\":\"pong\"}".to_vec()),
        ];
        // Whatever the split, the same items.
        for cut in 0..out.len() {
            let mut r = EventReader::new(1024);
            let mut items = Vec::new();
            r.feed(&out[..cut], &mut items).unwrap();
            r.feed(&out[cut..], &mut items).unwrap();
            assert_eq!(items, want, "cut at {cut}");
        }
    }

    #[test]
    fn the_reader_follows_the_standard() {
        let mut r = EventReader::new(64);
        let mut items = Vec::new();
        // CRLF and CR line ends, a field without a space, other fields, a
        // line without a colon, an event without data.
        r.feed(
            b"data:a\r\ndata\rid: 7\r\nevent: x\n\nretry: 5\n\n: hi\r\n",
            &mut items,
        )
        .unwrap();
        assert_eq!(items, vec![Item::Event(b"a\n".to_vec()), Item::Comment]);
        let mut r = EventReader::new(8);
        assert_eq!(r.feed(b"data: 0123456789", &mut Vec::new()), Err(TooLong));
        let mut r = EventReader::new(8);
        assert_eq!(
            r.feed(b"data: 0123\ndata: 4567\n", &mut Vec::new()),
            Err(TooLong)
        );
    }

    #[test]
    fn session_tokens() {
        let p = session_prefix("edge-1", 3, 17, 1_234_567);
        assert_eq!(p, "edge-1.3.17.1234567");
        let t = format!("{p}.AbC_-9");
        let s = parse_session(&t).unwrap();
        assert_eq!(
            (s.node, s.shard, s.slot, s.serial, s.signed, s.mac),
            ("edge-1", 3, 17, 1_234_567, p.as_str(), "AbC_-9")
        );
        // A node id with dots is hex-encoded, and still parses.
        let p = session_prefix("edge.eu 1", 0, 0, 0);
        assert_eq!(p, "~656467652e65752031.0.0.0");
        let t = format!("{p}.m");
        let s = parse_session(&t).unwrap();
        assert_eq!(s.node, "~656467652e65752031");
        assert_eq!(session_prefix_of(&s), p);
        for bad in [
            "",
            "a.b.c.d.e",
            "n.0.1.2",
            "n.0.1.2.",
            "n.-1.1.2.m",
            "n.0.1.+2.m",
            "n.0.99999999999.2.m",
            ".0.1.2.m",
            "n!.0.1.2.m",
            "~.0.1.2.m",
            "~zz.0.1.2.m",
            "n.0.1.2.m=",
            "n.0.1.2.m/",
            "n.0.1.123456789012345678901.m",
            "n.00.1.2.m",
            "n.0.01.2.m",
        ] {
            assert_eq!(parse_session(bad), None, "{bad:?}");
        }
        assert_eq!(parse_session(&"n.0.1.2.".repeat(100)), None);
    }

    #[test]
    fn node_tokens() {
        assert_eq!(node_token("a-B_9"), "a-B_9");
        assert_eq!(node_token(""), "~");
        assert_eq!(node_token("é"), "~c3a9");
        assert_eq!(node_token("a.b"), "~612e62");
    }
}
