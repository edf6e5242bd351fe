"""An independent SSE client for the edgegate protocol (PROTOCOL.md §10),
written from the contract and the WHATWG HTML standard's event-stream
parser, on plain asyncio sockets (no HTTP library, no SDK):

* ``SseClient``: ``GET /sse?hello=`` opens the stream (the first envelope a
  test sends, its ``hello``, goes in the query); later envelopes are POSTed
  with ``Eg-Session`` (the ``welcome``'s ``meta.session``), one body per
  batch, envelopes separated by ``\\n``. Events are parsed line by line
  (CRLF, LF or CR; ``data:`` lines joined; comments counted), so tests see
  the stream's framing as well as its envelopes.
* ``http_request``: one HTTP/1.1 request on a fresh connection, and
  ``HttpConn`` for several on one kept-alive connection.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from typing import Any

from egproto import DEFAULT_TIMEOUT, Closed, _Base, decode_json


class HttpRefused(Exception):
    """The server answered a GET /sse with something else than 200."""

    def __init__(self, status: int, headers: dict, body: bytes):
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.headers = headers
        self.body = body


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict]:
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed before the response")
    parts = line.decode("latin-1").split(" ", 2)
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def _read_body(reader: asyncio.StreamReader, status: int, headers: dict) -> bytes:
    if status == 204 or status == 304:
        return b""
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return out
            out += await reader.readexactly(size)
            await reader.readline()
    return await reader.read()


def _request_bytes(method: str, path: str, host: str, headers: dict | None, body: bytes,
                   keep_alive: bool) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if method in ("POST", "PUT") and not any(k.lower() in ("content-length", "transfer-encoding")
                                              for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def http_request(host: str, port: int, method: str, path: str, headers: dict | None = None,
                       body: bytes = b"", ssl=None, timeout: float = DEFAULT_TIMEOUT
                       ) -> tuple[int, dict, bytes]:
    """One request on a fresh connection (``Connection: close``)."""
    async def go():
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl,
                                                       server_hostname="localhost" if ssl else None)
        try:
            writer.write(_request_bytes(method, path, f"{host}:{port}", headers, body, False))
            await writer.drain()
            status, hdrs = await _read_head(reader)
            return status, hdrs, await _read_body(reader, status, hdrs)
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout)


class HttpConn:
    """Several requests on one kept-alive connection (as a browser's fetch
    reuses its connections)."""

    def __init__(self, host: str, port: int, ssl=None) -> None:
        self.host, self.port, self.ssl = host, port, ssl
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> "HttpConn":
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ssl, server_hostname="localhost" if self.ssl else None)
        return self

    async def request(self, method: str, path: str, headers: dict | None = None, body: bytes = b"",
                      timeout: float = DEFAULT_TIMEOUT) -> tuple[int, dict, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(_request_bytes(method, path, f"{self.host}:{self.port}", headers, body, True))
        await self.writer.drain()

        async def answer():
            status, hdrs = await _read_head(self.reader)
            return status, hdrs, await _read_body(self.reader, status, hdrs)
        return await asyncio.wait_for(answer(), timeout)

    async def at_eof(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """True when the server closed the connection (within ``timeout``)."""
        assert self.reader is not None
        try:
            return await asyncio.wait_for(self.reader.read(1), timeout) == b""
        except (ConnectionError, asyncio.TimeoutError):
            return False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class SseClient(_Base):
    """One SSE session: the event stream, and POSTs for what it sends."""

    enc = "json"
    auto_pong = True

    def __init__(self, host: str, port: int, path: str = "/sse", origin: str | None = None,
                 ssl=None, query: str = "", headers: dict | None = None, keep_alive: bool = True) -> None:
        super().__init__()
        self.host, self.port, self.path = host, port, path
        self.origin, self.ssl, self.query = origin, ssl, query
        self.extra_headers = headers or {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.response_headers: dict = {}
        self.poster = HttpConn(host, port, ssl) if keep_alive else None
        self.keep_alive = keep_alive
        # What the stream looked like: each event's data lines, comment times.
        self.events: list[list[str]] = []
        self.comments: list[float] = []
        self.post_statuses: list[int] = []
        self._line = b""
        self._cr = False
        self._data: list[str] = []
        self._has_data = False
        self._ready: list[list[str]] = []
        self.eof = False

    @classmethod
    def for_gateway(cls, gw, **kw) -> "SseClient":
        return cls("127.0.0.1", gw.ws_port, **kw)

    @property
    def session(self) -> str:
        assert self.welcome is not None
        return self.welcome["meta"]["session"]

    # --- the stream

    async def open(self, hello_text: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """GET /sse?hello=... and read the response head. Raises HttpRefused
        for a status other than 200."""
        q = "hello=" + urllib.parse.quote(hello_text, safe="")
        if self.query:
            q += "&" + self.query
        headers = dict(self.extra_headers)
        if self.origin:
            headers["Origin"] = self.origin
        headers.setdefault("Accept", "text/event-stream")
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, ssl=self.ssl,
            server_hostname="localhost" if self.ssl else None), timeout)
        self.writer.write(_request_bytes("GET", f"{self.path}?{q}", f"{self.host}:{self.port}",
                                         headers, b"", True))
        await self.writer.drain()
        status, hdrs = await asyncio.wait_for(_read_head(self.reader), timeout)
        self.response_headers = hdrs
        if status != 200:
            body = await asyncio.wait_for(_read_body(self.reader, status, hdrs), timeout)
            self.writer.close()
            raise HttpRefused(status, hdrs, body)
        assert hdrs.get("content-type", "").startswith("text/event-stream"), hdrs

    async def _send_envs(self, envs: list) -> None:
        if self.reader is None:
            assert len(envs) == 1 and json.loads(envs[0])["t"] == "hello", \
                "the first envelope of an SSE session is its hello (in the GET)"
            await self.open(envs[0])
            return
        status, _, body = await self.post("\n".join(envs).encode())
        self.post_statuses.append(status)
        if status != 204:
            self.send_failed = True

    async def post(self, body: bytes, session: str | None = None, headers: dict | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> tuple[int, dict, bytes]:
        """POST /sse with this session's token (or ``session``)."""
        h = {"Content-Type": "text/plain"}
        tok = session if session is not None else self.session
        if tok:
            h["Eg-Session"] = tok
        if self.origin:
            h["Origin"] = self.origin
        h.update(headers or {})
        if self.poster is None:
            return await http_request(self.host, self.port, "POST", self.path, h, body,
                                      ssl=self.ssl, timeout=timeout)
        try:
            return await self.poster.request("POST", self.path, h, body, timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            # The server closed the kept-alive connection: a new one.
            self.poster.close()
            self.poster = HttpConn(self.host, self.port, self.ssl)
            return await self.poster.request("POST", self.path, h, body, timeout)

    async def _read_batch(self) -> list[dict]:
        while True:
            envs = self._take_event()
            if envs is not None:
                return envs
            assert self.reader is not None
            chunk = await self.reader.read(65536)
            if not chunk:
                self.eof = True
                raise Closed(None, "end of stream")
            self._feed(chunk)

    # The WHATWG parser: lines end with CRLF, LF or CR; a blank line
    # dispatches the event; `:` starts a comment; `data` lines accumulate.
    def _feed(self, chunk: bytes) -> None:
        for b in chunk:
            c = bytes([b])
            if self._cr:
                self._cr = False
                if c == b"\n":
                    continue
            if c in (b"\n", b"\r"):
                self._cr = c == b"\r"
                self._line_done(self._line.decode("utf-8"))
                self._line = b""
            else:
                self._line += c

    def _line_done(self, line: str) -> None:
        if line == "":
            if self._has_data:
                self._ready.append(list(self._data))
                self.events.append(list(self._data))
            self._data, self._has_data = [], False
            return
        if line.startswith(":"):
            self.comments.append(time.monotonic())
            return
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._has_data = True

    def _take_event(self) -> list[dict] | None:
        if not self._ready:
            return None
        lines = self._ready.pop(0)
        # The event's data is its data lines joined by "\n": a batch of
        # JSON envelopes, one per line.
        return [decode_json(x) for x in "\n".join(lines).split("\n") if x.strip()]

    async def read_comment(self, timeout: float = DEFAULT_TIMEOUT) -> float:
        """Waits for the next comment line; returns when it came."""
        n = len(self.comments)

        async def loop():
            while len(self.comments) == n:
                assert self.reader is not None
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise Closed(None, "end of stream")
                self._feed(chunk)
            return self.comments[n]
        return await asyncio.wait_for(loop(), timeout)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.poster is not None:
            self.poster.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        if self.poster is not None and self.poster.writer is not None:
            self.poster.writer.transport.abort()


async def sse_session(gw, user: str, **kw: Any) -> SseClient:
    """An SSE session of ``user`` on ``gw``, welcomed."""
    hello_meta = kw.pop("hello_meta", {})
    c = SseClient.for_gateway(gw, **kw)
    await c.hello(user, **hello_meta)
    return c
