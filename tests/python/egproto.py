"""Independent Python implementation of the edgegate client protocol v1.

Written from /work/shared/PROTOCOL.md only (not from the Rust code), so that
the integration tests check the server against a second reading of the
contract.  Contents:

* LEB128, the binary envelope codec, JSON envelopes, TCP framing, WS batches;
* asyncio clients: ``WsClient`` (Python ``websockets``), ``TcpClient``
  (asyncio streams) and ``RawWs`` (a minimal hand-written WebSocket client for
  the cases ``websockets`` hides: server pings, malformed frames).

Decoded envelopes are plain dicts in the JSON shape (``t`` is the name), for
both encodings, so tests can compare across transports.  Payloads are
normalised: ``d`` is the JSON value when the payload is JSON text, ``raw`` is
the bytes when it is not (``db`` in JSON mode is also kept as received).
Binary ``err`` codes are mapped to their names; the wire number is kept in
``code_num``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import zlib
from typing import Any

# --------------------------------------------------------------------------
# constants (PROTOCOL.md §2, §5)

TYPES = {
    "hello": 1, "sub": 2, "unsub": 3, "pub": 4, "req": 5, "ping": 6, "pong": 7,
    "presence": 8, "history": 9,
    "welcome": 64, "ok": 65, "err": 66, "msg": 67, "reply": 68, "bye": 69,
    "members": 70,
}
TYPE_NAMES = {v: k for k, v in TYPES.items()}

ERR_CODES = {
    "bad_request": 1, "unauthorized": 2, "forbidden": 3, "bad_channel": 4,
    "no_service": 5, "timeout": 6, "rate_limited": 7, "too_large": 8,
    "not_subscribed": 9, "backbone_unavailable": 10, "internal": 11,
}
ERR_NAMES = {v: k for k, v in ERR_CODES.items()}

F_ID, F_CH, F_SEQ, F_FROM, F_CODE, F_META, F_JSON, F_RESERVED = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)

PREFACE = b"EG1\n"
SUBPROTO_JSON = "edgegate.v1.json"
SUBPROTO_BIN = "edgegate.v1.bin"


class DecodeError(Exception):
    pass


# --------------------------------------------------------------------------
# LEB128


def leb128_encode(n: int) -> bytes:
    if n < 0:
        raise ValueError("LEB128 of a negative number")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def leb128_decode(buf: bytes, pos: int) -> tuple[int, int]:
    """Returns (value, new_pos); raises DecodeError when truncated/too long."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated LEB128")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift > 63:
            raise DecodeError("LEB128 too long")
    if result >= 1 << 64:
        raise DecodeError("LEB128 over u64")
    return result, pos


def _read_str(buf: bytes, pos: int) -> tuple[str, int]:
    n, pos = leb128_decode(buf, pos)
    if pos + n > len(buf):
        raise DecodeError("truncated string")
    try:
        return buf[pos:pos + n].decode("utf-8"), pos + n
    except UnicodeDecodeError as e:
        raise DecodeError(f"bad UTF-8: {e}") from None


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return leb128_encode(len(b)) + b


# --------------------------------------------------------------------------
# binary envelope (§2 "Binary envelope")


def encode_bin(t: str | int, *, id: int | None = None, ch: str | None = None,
               seq: int | None = None, frm: str | None = None,
               code: int | str | None = None, reason: str | None = None,
               meta: dict | None = None, d: Any = None, raw: bytes | None = None,
               has_d: bool = False) -> bytes:
    """Encodes one binary envelope.  ``d`` (or ``has_d=True`` for a JSON null)
    is carried as JSON text with bit 0x40; ``raw`` as opaque bytes."""
    tc = TYPES[t] if isinstance(t, str) else int(t)
    bits = 0
    body = bytearray()
    if id is not None:
        bits |= F_ID
        body += leb128_encode(id)
    if ch is not None:
        bits |= F_CH
        body += _str(ch)
    if seq is not None:
        bits |= F_SEQ
        body += leb128_encode(seq)
    if frm is not None:
        bits |= F_FROM
        body += _str(frm)
    if code is not None:
        bits |= F_CODE
        if isinstance(code, str):
            code = ERR_CODES[code]
        body += leb128_encode(code)
        body += _str(reason or "")
    if meta is not None:
        bits |= F_META
        body += _str(json.dumps(meta, separators=(",", ":")))
    if d is not None or has_d:
        if raw is not None:
            raise ValueError("both d and raw")
        bits |= F_JSON
        body += json.dumps(d, separators=(",", ":")).encode()
    elif raw is not None:
        body += raw
    return bytes([tc, bits]) + bytes(body)


def decode_bin(buf: bytes) -> dict:
    """Decodes one binary envelope into the normalised dict form."""
    if len(buf) < 2:
        raise DecodeError("envelope shorter than 2 bytes")
    tc, bits = buf[0], buf[1]
    if tc not in TYPE_NAMES:
        raise DecodeError(f"unknown type code {tc}")
    if bits & F_RESERVED:
        raise DecodeError("reserved bit set")
    t = TYPE_NAMES[tc]
    env: dict[str, Any] = {"t": t, "_bits": bits}
    pos = 2
    if bits & F_ID:
        env["id"], pos = leb128_decode(buf, pos)
    if bits & F_CH:
        env["ch"], pos = _read_str(buf, pos)
    if bits & F_SEQ:
        env["seq"], pos = leb128_decode(buf, pos)
    if bits & F_FROM:
        env["from"], pos = _read_str(buf, pos)
    if bits & F_CODE:
        num, pos = leb128_decode(buf, pos)
        env["reason"], pos = _read_str(buf, pos)
        env["code_num"] = num
        env["code"] = ERR_NAMES.get(num, num) if t == "err" else num
    if bits & F_META:
        text, pos = _read_str(buf, pos)
        try:
            meta = json.loads(text)
        except ValueError as e:
            raise DecodeError(f"meta is not JSON: {e}") from None
        if not isinstance(meta, dict):
            raise DecodeError("meta is not a JSON object")
        env["meta"] = meta
    payload = bytes(buf[pos:])
    env["_payload"] = payload
    if bits & F_JSON:
        try:
            env["d"] = json.loads(payload.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DecodeError(f"payload flagged JSON is not JSON: {e}") from None
    elif payload:
        env["raw"] = payload
    return env


# --------------------------------------------------------------------------
# JSON envelopes


def encode_json(t: str, *, id: int | None = None, ch: str | None = None,
                d: Any = None, raw: bytes | None = None, meta: dict | None = None,
                has_d: bool = False, **extra: Any) -> str:
    env: dict[str, Any] = {"t": t}
    if id is not None:
        env["id"] = id
    if ch is not None:
        env["ch"] = ch
    if d is not None or has_d:
        env["d"] = d
    if raw is not None:
        env["db"] = base64.b64encode(raw).decode()
    if meta is not None:
        env["meta"] = meta
    env.update(extra)
    return json.dumps(env, separators=(",", ":"))


def decode_json(text: str) -> dict:
    try:
        env = json.loads(text)
    except ValueError as e:
        raise DecodeError(f"bad JSON envelope {text!r}: {e}") from None
    if not isinstance(env, dict) or not isinstance(env.get("t"), str):
        raise DecodeError(f"not an envelope: {text!r}")
    if "db" in env:
        env["raw"] = base64.b64decode(env["db"], validate=True)
    return env


def split_json_batch(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def split_bin_batch(buf: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(buf):
        n, pos = leb128_decode(buf, pos)
        if pos + n > len(buf):
            raise DecodeError("truncated envelope in binary batch")
        out.append(bytes(buf[pos:pos + n]))
        pos += n
    return out


def bin_batch(*envs: bytes) -> bytes:
    return b"".join(leb128_encode(len(e)) + e for e in envs)


# --------------------------------------------------------------------------
# TCP framing


def tcp_frame(env: bytes) -> bytes:
    return struct.pack(">I", len(env)) + env


# --------------------------------------------------------------------------
# clients


class Closed(Exception):
    """The server closed the connection.  ``code`` is the WebSocket close
    code (None for TCP / no close frame); ``envs`` any envelopes that came
    before (when collected)."""

    def __init__(self, code: int | None, reason: str = "", envs: list | None = None):
        super().__init__(f"closed code={code} reason={reason!r}")
        self.code = code
        self.reason = reason
        self.envs = envs or []


DEFAULT_TIMEOUT = 5.0

# Every client ever created in this process; the test runner aborts those
# still open when a test ends (so the gateway's shutdown need not linger).
OPEN_CLIENTS: list = []


def abort_all_clients() -> None:
    for c in OPEN_CLIENTS:
        try:
            c.abort()
        except Exception:
            pass
    OPEN_CLIENTS.clear()


class _Base:
    enc = "bin"
    auto_pong = True

    def __init__(self) -> None:
        self._pending: list[dict] = []
        self.welcome: dict | None = None
        self.received: list[dict] = []   # every envelope ever returned / skipped
        self.pings_seen = 0
        self.send_failed = False
        self._next_id = 1
        OPEN_CLIENTS.append(self)

    def next_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    # subclasses implement: _send_envs(list[bytes|str]), _read_batch() -> list[dict]

    def encode(self, t: str, **kw: Any) -> bytes | str:
        if self.enc == "json":
            return encode_json(t, **kw)
        if "from_" in kw:
            kw["frm"] = kw.pop("from_")
        return encode_bin(t, **kw)

    async def send(self, t: str, **kw: Any) -> None:
        await self._send_envs([self.encode(t, **kw)])

    async def send_many(self, envs: list[tuple[str, dict]]) -> None:
        """Sends several envelopes; in WS they are batched in one message."""
        await self._send_envs([self.encode(t, **kw) for t, kw in envs])

    async def recv(self, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Next envelope (server pings are answered and skipped when
        auto_pong).  Raises Closed at end of stream, TimeoutError."""
        async def _next() -> dict:
            while True:
                while not self._pending:
                    self._pending.extend(await self._read_batch())
                env = self._pending.pop(0)
                self.received.append(env)
                if env["t"] == "ping" and self.auto_pong:
                    self.pings_seen += 1
                    kw = {"id": env["id"]} if "id" in env else {}
                    await self.send("pong", **kw)
                    continue
                return env
        return await asyncio.wait_for(_next(), timeout)

    async def expect(self, t: str, timeout: float = DEFAULT_TIMEOUT, **fields: Any) -> dict:
        env = await self.recv(timeout)
        assert env["t"] == t, f"expected {t} {fields}, got {env}"
        for k, v in fields.items():
            assert env.get(k) == v, f"expected {k}={v!r} in {t}, got {env}"
        return env

    async def recv_until(self, pred, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Skips envelopes until pred(env); returns it."""
        async def _loop() -> dict:
            while True:
                env = await self.recv(timeout=3600)
                if pred(env):
                    return env
        return await asyncio.wait_for(_loop(), timeout)

    async def until_closed(self, timeout: float = DEFAULT_TIMEOUT) -> Closed:
        """Reads until the server closes; returns Closed with the envelopes
        read on the way (``.envs``)."""
        envs: list[dict] = []

        async def _loop() -> Closed:
            while True:
                try:
                    envs.append(await self.recv(timeout=3600))
                except Closed as c:
                    c.envs = envs
                    return c
        return await asyncio.wait_for(_loop(), timeout)

    async def expect_bye(self, code: int, timeout: float = DEFAULT_TIMEOUT,
                         ws_codes: tuple | None = None) -> dict:
        """Reads to the end: the last envelope must be bye ``code``; on WS the
        close frame must carry the same code (or one of ws_codes)."""
        c = await self.until_closed(timeout)
        byes = [e for e in c.envs if e["t"] == "bye"]
        assert byes, f"no bye before close (close code {c.code}); got {c.envs[-5:]}"
        bye = byes[-1]
        assert bye is c.envs[-1], f"envelopes after bye: {c.envs[-3:]}"
        assert bye.get("code") == code, f"expected bye {code}, got {bye}"
        if isinstance(self, (WsClient, RawWs)):
            allowed = ws_codes or (code,)
            assert c.code in allowed, f"WS close code {c.code}, expected {allowed} (bye {bye})"
        return bye

    async def hello(self, user: str, id: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                    **meta: Any) -> dict:
        hid = self.next_id() if id is None else id
        await self.send("hello", id=hid, meta={"user": user, **meta})
        w = await self.recv(timeout)
        assert w["t"] == "welcome", f"expected welcome, got {w}"
        assert w.get("id") == hid, f"welcome must carry hello's id {hid}: {w}"
        self.welcome = w
        return w

    @property
    def shard(self) -> int:
        assert self.welcome is not None
        return self.welcome["meta"]["shard"]

    @property
    def user(self) -> str:
        assert self.welcome is not None
        return self.welcome["meta"]["user"]

    async def call(self, t: str, timeout: float = DEFAULT_TIMEOUT, **kw: Any) -> dict:
        """Sends t with a fresh id; returns the ok/err/reply with that id,
        queueing other envelopes (msg) for later recv()."""
        i = self.next_id()
        await self.send(t, id=i, **kw)
        skipped: list[dict] = []

        async def _loop() -> dict:
            while True:
                env = await self.recv(timeout=3600)
                if env["t"] in ("ok", "err", "reply") and env.get("id") == i:
                    return env
                if env["t"] == "bye":
                    raise AssertionError(f"bye while waiting for answer to {t}: {env}")
                skipped.append(env)
        try:
            return await asyncio.wait_for(_loop(), timeout)
        finally:
            self._pending[0:0] = skipped
            # they were appended to received already; fine.

    async def sub(self, ch: str, **kw: Any) -> dict:
        r = await self.call("sub", ch=ch, **kw)
        assert r["t"] == "ok", f"sub {ch}: {r}"
        return r


class WsClient(_Base):
    """WebSocket client on Python ``websockets``."""

    def __init__(self, ws, enc: str) -> None:
        super().__init__()
        self.ws = ws
        self.enc = enc

    @classmethod
    async def connect(cls, url: str, enc: str = "json", subprotocol: str | None | bool = True,
                      timeout: float = DEFAULT_TIMEOUT, compression: str | None = None,
                      **kw: Any) -> "WsClient":
        """``compression="deflate"``: offer permessage-deflate (off by default,
        so that most tests see the frames as sent)."""
        from websockets.asyncio.client import connect
        if subprotocol is True:
            subprotocol = SUBPROTO_JSON if enc == "json" else SUBPROTO_BIN
        subs = [subprotocol] if subprotocol else None
        ws = await asyncio.wait_for(connect(
            url, subprotocols=subs, max_size=None, ping_interval=None,
            close_timeout=2, open_timeout=timeout, compression=compression, **kw), timeout)
        return cls(ws, enc)

    async def _send_envs(self, envs: list) -> None:
        if self.enc == "json":
            await self.send_raw("\n".join(envs))
        else:
            await self.send_raw(bin_batch(*envs))

    async def send_raw(self, data: str | bytes, text: bool | None = None) -> None:
        # A send racing with the server's close is not an error here: the
        # next recv() reports the bye / close.
        from websockets.exceptions import ConnectionClosed
        try:
            await self.ws.send(data, text=text)
        except ConnectionClosed:
            self.send_failed = True

    async def _read_batch(self) -> list[dict]:
        from websockets.exceptions import ConnectionClosed
        try:
            m = await self.ws.recv()
        except ConnectionClosed as e:
            rc = e.rcvd
            raise Closed(rc.code if rc else None, rc.reason if rc else "") from None
        if isinstance(m, str):
            assert self.enc == "json", f"text message in binary mode: {m!r}"
            return [decode_json(x) for x in split_json_batch(m)]
        assert self.enc == "bin", f"binary message in JSON mode: {m!r}"
        return [decode_bin(x) for x in split_bin_batch(m)]

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 3)
        except Exception:
            pass

    def abort(self) -> None:
        self.ws.transport.abort()


class TcpClient(_Base):
    """Raw TCP transport: preface, then u32-BE framed binary envelopes."""

    enc = "bin"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self.reader = reader
        self.writer = writer
        self._hdr: bytes | None = None

    @classmethod
    async def connect(cls, host: str, port: int, preface: bytes | None = PREFACE,
                      rcvbuf: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> "TcpClient":
        if rcvbuf is not None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (host, port)), timeout)
            r, w = await asyncio.open_connection(sock=s, limit=1 << 16)
        else:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 24), timeout)
        c = cls(r, w)
        if preface:
            w.write(preface)
            await w.drain()
        return c

    async def _send_envs(self, envs: list) -> None:
        await self.send_raw(b"".join(tcp_frame(e) for e in envs))

    async def send_raw(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            self.send_failed = True   # the next recv() reports the bye / close

    async def read_frame(self) -> bytes:
        # cancel-safe (recv timeouts): a header already read is kept for the next call
        if self._hdr is None:
            try:
                self._hdr = await self.reader.readexactly(4)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise AssertionError(f"server sent a partial frame header {e.partial!r}") from None
                raise Closed(None) from None
            except ConnectionResetError:
                raise Closed(None, "reset") from None
        (n,) = struct.unpack(">I", self._hdr)
        try:
            body = await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as e:
            raise AssertionError(f"server sent a truncated frame: {n} announced, {len(e.partial)} sent") from None
        except ConnectionResetError:
            raise Closed(None, "reset") from None
        self._hdr = None
        return body

    async def _read_batch(self) -> list[dict]:
        return [decode_bin(await self.read_frame())]

    async def close(self) -> None:
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except Exception:
            pass

    def abort(self) -> None:
        self.writer.transport.abort()


class RawWs(_Base):
    """A minimal hand-written WebSocket client (RFC 6455) that shows the test
    what ``websockets`` hides: server Ping frames (not answered unless
    ``answer_pings``), and lets it send malformed/oversized frames."""

    def __init__(self, reader, writer, enc: str, headers: dict) -> None:
        super().__init__()
        self.reader = reader
        self.writer = writer
        self.enc = enc
        self.headers = headers
        self.ws_pings: list[bytes] = []
        self.answer_pings = False
        self.status = 101
        # permessage-deflate, inflated here with Python's zlib (an
        # implementation independent of the gateway's).
        self.deflate = "permessage-deflate" in headers.get("sec-websocket-extensions", "")
        self.data_frames: list[tuple[bool, int]] = []   # (RSV1, payload bytes) per message
        self.last_rsv1 = False

    @classmethod
    async def connect(cls, host: str, port: int, path: str = "/ws", enc: str = "json",
                      subprotocol: str | None | bool = True, timeout: float = DEFAULT_TIMEOUT,
                      expect_status: int = 101, extensions: str | None = None) -> "RawWs":
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 24), timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        if subprotocol is True:
            subprotocol = SUBPROTO_JSON if enc == "json" else SUBPROTO_BIN
        req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
        if subprotocol:
            req += f"Sec-WebSocket-Protocol: {subprotocol}\r\n"
        if extensions:
            req += f"Sec-WebSocket-Extensions: {extensions}\r\n"
        w.write((req + "\r\n").encode())
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for ln in lines[1:]:
            if ":" in ln:
                k, v = ln.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        c = cls(r, w, enc, headers)
        c.status = status
        assert status == expect_status, f"HTTP status {status}, expected {expect_status}: {lines[0]}"
        return c

    @staticmethod
    def frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True,
              rsv: int = 0) -> bytes:
        b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
        n = len(payload)
        mbit = 0x80 if mask else 0
        if n < 126:
            hdr = bytes([b0, mbit | n])
        elif n < 65536:
            hdr = bytes([b0, mbit | 126]) + struct.pack(">H", n)
        else:
            hdr = bytes([b0, mbit | 127]) + struct.pack(">Q", n)
        if not mask:
            return hdr + payload
        key = os.urandom(4)
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else _xor_big(payload, key)
        return hdr + key + masked

    async def send_frame(self, opcode: int, payload: bytes, **kw: Any) -> None:
        self.writer.write(self.frame(opcode, payload, **kw))
        await self.writer.drain()

    async def read_ws_frame(self) -> tuple[bool, int, bytes]:
        try:
            h = await self.reader.readexactly(2)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            raise Closed(None, "EOF without close frame") from None
        fin = bool(h[0] & 0x80)
        self.last_rsv1 = bool(h[0] & 0x40)
        assert not h[0] & 0x30, "RSV2/RSV3 set by the server"
        assert not self.last_rsv1 or self.deflate, "RSV1 without permessage-deflate"
        op = h[0] & 0x0F
        n = h[1] & 0x7F
        assert not h[1] & 0x80, "server frames must not be masked"
        if n == 126:
            (n,) = struct.unpack(">H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
        payload = await self.reader.readexactly(n)
        return fin, op, payload

    async def _read_batch(self) -> list[dict]:
        data = b""
        first_op = None
        while True:
            fin, op, payload = await self.read_ws_frame()
            if op == 0x9:   # ping
                self.ws_pings.append(payload)
                if self.answer_pings:
                    await self.send_frame(0xA, payload)
                continue
            if op == 0xA:
                continue
            if op == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                reason = payload[2:].decode("utf-8", "replace")
                try:
                    await self.send_frame(0x8, payload[:2])
                except Exception:
                    pass
                raise Closed(code, reason)
            if first_op is None:
                first_op, rsv1 = op, self.last_rsv1
            data += payload
            if fin:
                break
        self.data_frames.append((rsv1, len(data)))
        if rsv1:
            # A fresh inflater per message: the server promised no context takeover.
            data = zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")
        if first_op == 0x1:
            return [decode_json(x) for x in split_json_batch(data.decode("utf-8"))]
        return [decode_bin(x) for x in split_bin_batch(data)]

    @staticmethod
    def deflate_payload(data: bytes) -> bytes:
        """One message compressed as permessage-deflate wants it (a stream of
        its own, sync-flushed, the 00 00 ff ff tail removed)."""
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        z = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
        assert z.endswith(b"\x00\x00\xff\xff")
        return z[:-4]

    async def send_deflated(self, opcode: int, data: bytes) -> None:
        await self.send_frame(opcode, self.deflate_payload(data), rsv=4)

    async def _send_envs(self, envs: list) -> None:
        if self.enc == "json":
            await self.send_frame(0x1, "\n".join(envs).encode())
        else:
            await self.send_frame(0x2, bin_batch(*envs))

    async def close(self) -> None:
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except Exception:
            pass

    def abort(self) -> None:
        self.writer.transport.abort()


def _xor_big(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")
