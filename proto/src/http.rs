//! HTTP/1.1 message heads and bodies, sans I/O: what the server API, the
//! HTTP services client and the webhook sender read from peers.
//!
//! Heads are parsed with `httparse`; this module adds what a server and a
//! client must decide from them (body framing, keep-alive, the bearer
//! token) and the `chunked` transfer coding, as pure functions over byte
//! buffers. Everything is bounded: a head must fit the caller's buffer, a
//! body its limit, and nothing a peer sends can make these functions panic
//! (unit tests below, fuzz target `http`).

use std::fmt;

/// Most headers a head may carry; more is an error.
pub const MAX_HEADERS: usize = 48;

/// Why a message cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Not an HTTP/1.x head, or a header line httparse refuses.
    Malformed,
    /// More than [`MAX_HEADERS`] headers.
    TooManyHeaders,
    /// A `Content-Length` that is not one decimal number, or two that differ.
    BadLength,
    /// A transfer coding other than `chunked` (alone).
    BadTransferEncoding,
    /// A chunk size line that does not parse, or a chunk not followed by CRLF.
    BadChunk,
    /// The body is longer than the caller's limit.
    TooLarge,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpError::Malformed => "malformed HTTP head",
            HttpError::TooManyHeaders => "too many headers",
            HttpError::BadLength => "invalid Content-Length",
            HttpError::BadTransferEncoding => "unsupported Transfer-Encoding",
            HttpError::BadChunk => "malformed chunked body",
            HttpError::TooLarge => "body too large",
        })
    }
}

impl std::error::Error for HttpError {}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`: decode with [`Chunked`].
    Chunked,
    /// A response with neither: the body runs until the server closes.
    UntilClose,
}

/// What a server needs of a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The target's path, without the query.
    pub path: String,
    /// The query string, without `?` (empty when none).
    pub query: String,
    /// The `Authorization: Bearer` token, trimmed.
    pub bearer: Option<String>,
    /// The body's framing (`Length(0)` when the request has none).
    pub body: Body,
    /// The client keeps the connection open after the answer (HTTP/1.1
    /// without `Connection: close`).
    pub keep_alive: bool,
    /// Bytes of the buffer the head took.
    pub len: usize,
}

/// What a client needs of a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// The body's framing.
    pub body: Body,
    /// The server keeps the connection open after this response.
    pub keep_alive: bool,
    /// Headers the caller asked for by name (lower case), with their values
    /// (lossy UTF-8, trimmed), in the order asked.
    pub wanted: Vec<Option<String>>,
    /// Bytes of the buffer the head took.
    pub len: usize,
}

fn header_value<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
        .collect()
}

fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
    header_value(headers, name).iter().any(|v| {
        std::str::from_utf8(v)
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The body framing from `Content-Length` / `Transfer-Encoding` (RFC 9112
/// §6.3): chunked wins; several lengths must agree; anything else is refused.
pub(crate) fn framing(headers: &[httparse::Header<'_>], default: Body) -> Result<Body, HttpError> {
    let te = header_value(headers, "transfer-encoding");
    if !te.is_empty() {
        let codings: Vec<String> = te
            .iter()
            .flat_map(|v| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .filter(|s| !s.is_empty())
            .collect();
        return if codings == ["chunked"] {
            Ok(Body::Chunked)
        } else {
            Err(HttpError::BadTransferEncoding)
        };
    }
    let mut len = None;
    for v in header_value(headers, "content-length") {
        let s = std::str::from_utf8(v).map_err(|_| HttpError::BadLength)?;
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) || part.len() > 19 {
                return Err(HttpError::BadLength);
            }
            let n: u64 = part.parse().map_err(|_| HttpError::BadLength)?;
            if len.is_some_and(|l| l != n) {
                return Err(HttpError::BadLength);
            }
            len = Some(n);
        }
    }
    Ok(len.map_or(default, Body::Length))
}

/// Parses a request head at the start of `buf`: `Ok(None)` when more bytes
/// are needed.
pub fn parse_request(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(_) => return Err(HttpError::Malformed),
    };
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let bearer = header_value(req.headers, "authorization")
        .into_iter()
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find_map(|v| v.trim().strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let http11 = req.version == Some(1);
    let keep_alive = if http11 {
        !has_token(req.headers, "connection", "close")
    } else {
        has_token(req.headers, "connection", "keep-alive")
    };
    Ok(Some(RequestHead {
        method: req.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        bearer,
        body: framing(req.headers, Body::Length(0))?,
        keep_alive,
        len,
    }))
}

/// Parses a response head at the start of `buf`, picking out the headers
/// named in `wanted` (lower case): `Ok(None)` when more bytes are needed.
/// Interim (1xx) responses are not expected: the client sends no
/// `Expect: 100-continue`.
pub fn parse_response(buf: &[u8], wanted: &[&str]) -> Result<Option<ResponseHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(_) => return Err(HttpError::Malformed),
    };
    let status = res.code.ok_or(HttpError::Malformed)?;
    let http11 = res.version == Some(1);
    let keep_alive = if http11 {
        !has_token(res.headers, "connection", "close")
    } else {
        has_token(res.headers, "connection", "keep-alive")
    };
    // RFC 9112 §6.3: these never have a body.
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Body::Length(0)
    } else {
        framing(res.headers, Body::UntilClose)?
    };
    let wanted = wanted
        .iter()
        .map(|name| {
            header_value(res.headers, name)
                .first()
                .map(|v| String::from_utf8_lossy(v).trim().to_owned())
        })
        .collect();
    Ok(Some(ResponseHead {
        status,
        body,
        // A body delimited by the close cannot leave the connection reusable.
        keep_alive: keep_alive && body != Body::UntilClose,
        wanted,
        len,
    }))
}

/// The `chunked` transfer coding's decoder (RFC 9112 §7.1): feed it bytes as
/// they arrive; it appends the data to `out` and says how much input it
/// took. Extensions are skipped, trailers read and dropped.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    state: ChunkState,
    /// Bytes of the current size or trailer line seen (bounded).
    line: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line; the size so far, and whether an extension began.
    #[default]
    Size,
    SizeDigits(u64, bool),
    /// The CR of a size line was seen.
    SizeLf(u64),
    /// `left` bytes of chunk data to go.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataCr,
    DataLf,
    /// Trailer lines after the last chunk: at the start of a line, or inside one.
    TrailerStart,
    TrailerLine,
    TrailerLf(bool),
    Done,
}

/// Longest size or trailer line accepted.
const MAX_LINE: usize = 4096;

impl Chunked {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Chunked::default()
    }

    /// True once the last chunk and the trailers were read.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from `input`, appending data to `out` (never past `max`
    /// bytes of `out` in all); returns the bytes of `input` consumed. Stops
    /// at the end of the body (see [`Chunked::done`]); bytes after it are
    /// not consumed.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Size | ChunkState::SizeDigits(..) => {
                    let (n, ext) = match self.state {
                        ChunkState::SizeDigits(n, ext) => (n, ext),
                        _ => (0, false),
                    };
                    self.bump_line()?;
                    if b == b'\r' {
                        if self.state == ChunkState::Size {
                            return Err(HttpError::BadChunk);
                        }
                        self.state = ChunkState::SizeLf(n);
                    } else if ext {
                        // Inside an extension: skipped up to CR.
                    } else if let Some(d) = (b as char).to_digit(16) {
                        let n = n
                            .checked_mul(16)
                            .and_then(|n| n.checked_add(u64::from(d)))
                            .ok_or(HttpError::BadChunk)?;
                        self.state = ChunkState::SizeDigits(n, false);
                    } else if (b == b';' || b == b' ' || b == b'\t')
                        && self.state != ChunkState::Size
                    {
                        self.state = ChunkState::SizeDigits(n, true);
                    } else {
                        return Err(HttpError::BadChunk);
                    }
                    i += 1;
                }
                ChunkState::SizeLf(n) => {
                    if b != b'\n' {
                        return Err(HttpError::BadChunk);
                    }
                    self.line = 0;
                    self.state = if n == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data(n)
                    };
                    i += 1;
                }
                ChunkState::Data(left) => {
                    let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    if out.len() + take > max {
                        return Err(HttpError::TooLarge);
                    }
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataCr | ChunkState::DataLf => {
                    let want = if self.state == ChunkState::DataCr {
                        b'\r'
                    } else {
                        b'\n'
                    };
                    if b != want {
                        return Err(HttpError::BadChunk);
                    }
                    self.state = if want == b'\r' {
                        ChunkState::DataLf
                    } else {
                        ChunkState::Size
                    };
                    i += 1;
                }
                ChunkState::TrailerStart | ChunkState::TrailerLine => {
                    let start = self.state == ChunkState::TrailerStart;
                    self.bump_line()?;
                    if b == b'\r' {
                        self.state = ChunkState::TrailerLf(start);
                    } else {
                        self.state = ChunkState::TrailerLine;
                    }
                    i += 1;
                }
                ChunkState::TrailerLf(last) => {
                    if b != b'\n' {
                        return Err(HttpError::BadChunk);
                    }
                    self.line = 0;
                    self.state = if last {
                        ChunkState::Done
                    } else {
                        ChunkState::TrailerStart
                    };
                    i += 1;
                }
            }
        }
        Ok(i)
    }

    fn bump_line(&mut self) -> Result<(), HttpError> {
        self.line += 1;
        if self.line > MAX_LINE {
            return Err(HttpError::BadChunk);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let r = parse_request(b"POST /api/publish?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer  k1 \r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/api/publish");
        assert_eq!(r.query, "x=1");
        assert_eq!(r.bearer.as_deref(), Some("k1"));
        assert_eq!(r.body, Body::Length(5));
        assert!(r.keep_alive);
        assert_eq!(&b"hello"[..], &b"POST /api/publish?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer  k1 \r\nContent-Length: 5\r\n\r\nhello"[r.len..]);
        let close = parse_request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!close.keep_alive);
        assert_eq!(close.body, Body::Length(0));
        let old = parse_request(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!old.keep_alive);
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(
            parse_request(b"\x00\x01 junk\r\n\r\n"),
            Err(HttpError::Malformed)
        );
    }

    #[test]
    fn body_framing_rules() {
        let chunked = parse_request(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(chunked.body, Body::Chunked);
        assert_eq!(
            parse_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(HttpError::BadTransferEncoding)
        );
        assert_eq!(
            parse_request(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            Err(HttpError::BadLength)
        );
        assert_eq!(
            parse_request(b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n"),
            Err(HttpError::BadLength)
        );
        assert_eq!(
            parse_request(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Err(HttpError::BadLength)
        );
        let same = parse_request(b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(same.body, Body::Length(3));
    }

    #[test]
    fn response_heads() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nEg-Error: forbidden\r\n\r\nok",
            &["eg-error", "eg-enc"],
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, Body::Length(2));
        assert!(r.keep_alive);
        assert_eq!(r.wanted, vec![Some("forbidden".to_owned()), None]);
        let until = parse_response(b"HTTP/1.1 200 OK\r\n\r\n", &[])
            .unwrap()
            .unwrap();
        assert_eq!(until.body, Body::UntilClose);
        assert!(!until.keep_alive);
        let nc = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", &[])
            .unwrap()
            .unwrap();
        assert_eq!(nc.body, Body::Length(0));
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\n", &[])
                .unwrap()
                .is_none()
        );
    }

    fn dechunk(input: &[u8], max: usize) -> Result<(Vec<u8>, usize, bool), HttpError> {
        let mut c = Chunked::new();
        let mut out = Vec::new();
        let n = c.feed(input, &mut out, max)?;
        Ok((out, n, c.done()))
    }

    #[test]
    fn chunked_bodies() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let (out, n, done) = dechunk(body, 100).unwrap();
        assert_eq!(out, b"Wikipedia");
        assert!(done);
        assert_eq!(&body[n..], b"NEXT");
        // Byte by byte gives the same.
        let mut c = Chunked::new();
        let mut out = Vec::new();
        for b in &body[..body.len() - 4] {
            assert_eq!(c.feed(std::slice::from_ref(b), &mut out, 100), Ok(1));
        }
        assert!(c.done());
        assert_eq!(out, b"Wikipedia");
        assert_eq!(
            dechunk(b"4\r\nWiki\r\n0\r\n\r\n", 3),
            Err(HttpError::TooLarge)
        );
        assert_eq!(dechunk(b"x\r\n", 10), Err(HttpError::BadChunk));
        assert_eq!(dechunk(b"4\r\nWikiX", 10), Err(HttpError::BadChunk));
        assert_eq!(dechunk(b"\r\n", 10), Err(HttpError::BadChunk));
        assert_eq!(
            dechunk(b"fffffffffffffffffffff\r\n", 10),
            Err(HttpError::BadChunk)
        );
        let long = vec![b'1'; 5000];
        assert_eq!(dechunk(&long, 10), Err(HttpError::BadChunk));
    }
}
