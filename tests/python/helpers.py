"""Shared helpers for the integration tests."""

from __future__ import annotations

import asyncio
import itertools
import time

from egproto import TcpClient, WsClient

KINDS = ("ws-json", "ws-bin", "tcp")
_user_seq = itertools.count(1)


def new_user(prefix: str = "u") -> str:
    return f"{prefix}{next(_user_seq)}_{int(time.time() * 1000) % 100000}"


async def connect(gw, kind: str, **kw):
    if kind == "ws-json":
        return await WsClient.connect(gw.ws_url, enc="json", **kw)
    if kind == "ws-bin":
        return await WsClient.connect(gw.ws_url, enc="bin", **kw)
    if kind == "tcp":
        return await TcpClient.connect("127.0.0.1", gw.tcp_port, **kw)
    raise ValueError(kind)


async def session(gw, kind: str, user: str | None = None, **kw):
    c = await connect(gw, kind, **kw)
    await c.hello(user or new_user())
    return c


async def pair_on_different_shards(gw, kind_a: str, kind_b: str, tries: int = 40):
    """Opens A, then B connections until B's shard differs from A's."""
    a = await session(gw, kind_a, new_user("a"))
    spare = []
    try:
        for _ in range(tries):
            b = await session(gw, kind_b, new_user("b"))
            if b.shard != a.shard:
                return a, b
            spare.append(b)
        raise AssertionError(f"{tries} connections all landed on shard {a.shard}")
    finally:
        for s in spare:
            await s.close()


async def wait_until(pred, timeout: float = 5.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value {last!r})")


async def no_message(c, timeout: float = 0.3):
    """Asserts nothing arrives on c within timeout."""
    try:
        env = await c.recv(timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return
    raise AssertionError(f"unexpected envelope {env}")


async def msgs(c, ch, count, timeout=5.0):
    """The next ``count`` msgs on ``ch`` (other envelopes are skipped)."""
    out = []
    while len(out) < count:
        env = await c.recv(timeout)
        if env["t"] == "msg" and env.get("ch") == ch:
            out.append(env)
    return out
