"""Bad input: truncated frames, undecodable bytes, invalid UTF-8, many
half-open connections.  The server must answer with bye (or a WS close),
never crash, never leak the connection (gauge back to baseline)."""

import asyncio
import socket
import struct
import time

import pytest

from egproto import PREFACE, Closed, RawWs, TcpClient, tcp_frame
from helpers import new_user, session, wait_until


def conn_gauge(gw) -> float:
    return gw.metric("edgegate_connections")


async def assert_alive(gw):
    c = await session(gw, "ws-json")
    r = await c.call("req", ch="svc:echo", d="alive")
    assert r["t"] == "reply" and r["d"] == "alive"
    await c.close()


async def back_to_baseline(gw, baseline, timeout=8):
    await wait_until(lambda: conn_gauge(gw) == baseline, timeout=timeout,
                     what=f"edgegate_connections back to {baseline} (now {conn_gauge(gw)})")


async def test_truncated_tcp_frame_then_peer_closes(gateway):
    gw = gateway()
    base = conn_gauge(gw)
    c = await session(gw, "tcp")
    await c.send_raw(struct.pack(">I", 100) + b"\x04\x00" + b"a" * 8)   # 10 of 100 bytes
    c.writer.write_eof()
    closed = await c.until_closed(timeout=5)   # server must close (bye optional here)
    assert all(e["t"] == "bye" for e in closed.envs), closed.envs
    await c.close()
    await back_to_baseline(gw, base)
    await assert_alive(gw)


async def test_truncated_tcp_header_then_peer_closes(gateway):
    gw = gateway()
    base = conn_gauge(gw)
    c = await session(gw, "tcp")
    await c.send_raw(b"\x00\x00")        # half a length
    c.writer.write_eof()
    await c.until_closed(timeout=5)
    await c.close()
    await back_to_baseline(gw, base)


async def test_truncated_preface_then_peer_closes(gateway):
    gw = gateway()
    base = conn_gauge(gw)
    c = await TcpClient.connect("127.0.0.1", gw.tcp_port, preface=None)
    await c.send_raw(b"EG")
    c.writer.write_eof()
    await c.until_closed(timeout=5)
    await c.close()
    await back_to_baseline(gw, base)


async def test_truncated_ws_frame_then_peer_closes(gateway):
    gw = gateway()
    base = conn_gauge(gw)
    c = await RawWs.connect("127.0.0.1", gw.ws_port, enc="json")
    await c.hello(new_user())
    frame = RawWs.frame(0x1, b'{"t":"ping","id":1}' * 10)
    c.writer.write(frame[:12])
    await c.writer.drain()
    c.writer.write_eof()
    try:
        await c.until_closed(timeout=5)
    except Closed:
        pass
    await c.close()
    await back_to_baseline(gw, base)
    await assert_alive(gw)


async def test_abrupt_reset_mid_session(gateway):
    gw = gateway()
    base = conn_gauge(gw)
    for kind in ("tcp", "ws-bin"):
        c = await session(gw, kind)
        sock = (c.writer if kind == "tcp" else c.ws.transport).get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if kind == "tcp":
            c.writer.transport.abort()
        else:
            c.ws.transport.abort()
    await back_to_baseline(gw, base)
    await assert_alive(gw)


@pytest.mark.parametrize("env", [
    bytes([4, 0x03, 7]),                       # id present, ch missing
    bytes([4, 0x02, 0x85]),                    # truncated LEB128 length
    bytes([4, 0x02, 10]) + b"room:",           # string shorter than its length
    bytes([4]),                                # no field-bits byte
    b"",                                       # empty frame
    bytes([4, 0x80, 1]),                       # reserved bit set
    bytes([4, 0x22, 6]) + b"room:a" + bytes([3]) + b"[1]",   # meta not an object
    bytes([4, 0x02, 6]) + b"room:\xff",        # ch not UTF-8
    bytes([99, 0]),                            # unknown type code
], ids=["missing-ch", "trunc-leb128", "short-string", "one-byte", "empty", "reserved-bit",
        "meta-not-object", "ch-not-utf8", "unknown-type"])
async def test_undecodable_binary_envelope_tcp(gateway, env):
    gw = gateway()
    c = await session(gw, "tcp")
    await c.send_raw(tcp_frame(env))
    await c.expect_bye(4000)


async def test_truncated_ws_binary_batch(gateway):
    gw = gateway()
    c = await session(gw, "ws-bin")
    await c.send_raw(b"\x05\x04\x01")            # says 5 bytes, has 2
    await c.expect_bye(4000)


async def test_binary_frame_in_json_mode_and_text_in_bin_mode(gateway):
    gw = gateway()
    base = conn_gauge(gw)
    c = await session(gw, "ws-json")
    await c.send_raw(b"\x00\x01\x02")
    closed = await c.until_closed(timeout=5)
    # not fixed by the contract beyond "bytes that do not decode": bye 4000 or an err
    assert closed.envs and closed.envs[-1]["t"] == "bye" and closed.envs[-1]["code"] == 4000, closed.envs
    await back_to_baseline(gw, base)


async def test_bin_flagged_json_payload_that_is_not_json(gateway):
    """Bit 0x40 promises JSON text; a receiver in JSON mode could not be given
    invalid JSON as `d`.  The server must refuse it (bye 4000 or err)."""
    gw = gateway()
    c = await session(gw, "tcp")
    bad = bytes([4, 0x43, 1, 6]) + b"room:j" + b"{not json"
    await c.send_raw(tcp_frame(bad))
    e = await c.recv(5)
    assert (e["t"] == "bye" and e["code"] == 4000) or e["t"] == "err", e


async def test_invalid_utf8_text_frame(gateway):
    gw = gateway()
    base = conn_gauge(gw)
    c = await session(gw, "ws-json")
    await c.send_raw(b'{"t":"ping","id":1,"x":"\xff\xfe"}', text=True)
    closed = await c.until_closed(timeout=5)
    assert closed.code in (1007, 4000), f"close code {closed.code}, envelopes {closed.envs}"
    for e in closed.envs:
        assert e["t"] == "bye" and e["code"] in (1007, 4000), closed.envs
    await back_to_baseline(gw, base)
    await assert_alive(gw)


@pytest.mark.parametrize("kind", ["ws-json", "ws-bin", "tcp"])
async def test_unknown_t(gateway, kind):
    gw = gateway()
    c = await session(gw, kind)
    if kind == "ws-json":
        await c.send_raw('{"t":"subscribe","id":1,"ch":"room:x"}')
    elif kind == "ws-bin":
        await c.send_raw(b"\x02\x0a\x00")         # type code 10 is not assigned
    else:
        await c.send_raw(tcp_frame(bytes([71, 0])))    # 71 is not assigned either
    await c.expect_bye(4000)


async def test_1000_half_open_tcp_get_4001(gateway):
    n = 1000
    gw = gateway(EDGEGATE_HEARTBEAT__HELLO_TIMEOUT_MS=1000, EDGEGATE_SHARDS__COUNT=2)
    good = await session(gw, "ws-json")
    baseline = conn_gauge(gw)
    stop = asyncio.Event()
    rtts: list[float] = []

    async def keep_talking():
        i = 0
        while not stop.is_set():
            i += 1
            t0 = time.monotonic()
            r = await good.call("req", ch="svc:echo", d=i, timeout=3)
            assert r["t"] == "reply" and r["d"] == i
            rtts.append(time.monotonic() - t0)
            await asyncio.sleep(0.05)

    async def half_open(k: int):
        c = await TcpClient.connect("127.0.0.1", gw.tcp_port, preface=PREFACE if k % 2 else None,
                                    timeout=15)
        return c

    talker = asyncio.create_task(keep_talking())
    conns = []
    t0 = time.monotonic()
    for i in range(0, n, 50):
        conns += await asyncio.gather(*(half_open(k) for k in range(i, i + 50)))
    opened = time.monotonic() - t0

    async def expect_4001(c):
        try:
            b = await c.expect_bye(4001, timeout=20)
            return b
        finally:
            await c.close()

    results = await asyncio.gather(*(expect_4001(c) for c in conns), return_exceptions=True)
    bad = [r for r in results if isinstance(r, BaseException)]
    assert not bad, f"{len(bad)} of {n} half-open connections did not get bye 4001; first: {bad[0]!r}"
    await back_to_baseline(gw, baseline, timeout=15)
    stop.set()
    await talker       # raises if the good client failed at any point
    assert rtts, "good client made no round trip"
    assert max(rtts) < 3, f"good client stalled: max rtt {max(rtts):.2f}s"
    assert gw.metric("edgegate_closes_total", code="4001") >= n
    print(f"opened {n} in {opened:.2f}s; good client {len(rtts)} round trips, max {max(rtts)*1000:.0f} ms")
