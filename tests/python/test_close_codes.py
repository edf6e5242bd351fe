"""Every close code that can be provoked without a backbone or auth
(PROTOCOL.md §5, §6).  On WebSocket the close frame must carry the bye code."""

import asyncio
import signal
import struct
import time

import pytest

from egproto import RawWs, TcpClient, encode_bin, tcp_frame
from helpers import KINDS, connect, new_user, pair_on_different_shards, session, wait_until

ALL = pytest.mark.parametrize("kind", KINDS)


# ---------------------------------------------------------------- 4000

@ALL
async def test_4000_pub_before_hello(gateway, kind):
    gw = gateway()
    c = await connect(gw, kind)
    await c.send("pub", id=1, ch="room:x", d={"early": True})
    await c.expect_bye(4000)


@pytest.mark.parametrize("kind", KINDS)
async def test_4000_sub_before_hello(gateway, kind):
    gw = gateway()
    c = await connect(gw, kind)
    await c.send("sub", id=1, ch="room:x")
    await c.expect_bye(4000)


@pytest.mark.parametrize("when", ["before_hello", "after_hello"])
async def test_4000_bad_json(gateway, when):
    gw = gateway()
    c = await connect(gw, "ws-json")
    if when == "after_hello":
        await c.hello(new_user())
    await c.send_raw('{"t":"pub","id":1,"ch":"room:x","d":')
    await c.expect_bye(4000)


async def test_4000_json_not_an_object(gateway):
    gw = gateway()
    c = await session(gw, "ws-json")
    await c.send_raw('[1,2,3]')
    await c.expect_bye(4000)


@pytest.mark.parametrize("kind", KINDS)
async def test_4000_unknown_type(gateway, kind):
    gw = gateway()
    c = await session(gw, kind)
    if kind == "ws-json":
        await c.send_raw('{"t":"nope","id":1}')
    elif kind == "ws-bin":
        await c.send_raw(b"\x02\x63\x00")         # LEB128 len 2, type 99, no fields
    else:
        await c.send_raw(tcp_frame(bytes([99, 0])))
    await c.expect_bye(4000)


@pytest.mark.parametrize("preface", [b"EG2\n", b"eg1\n", b"\x00\x00\x00\x05", b"XXXXXXXX"])
async def test_4000_wrong_tcp_preface(gateway, preface):
    gw = gateway()
    c = await TcpClient.connect("127.0.0.1", gw.tcp_port, preface=None)
    await c.send_raw(preface)
    await c.expect_bye(4000)


async def test_4000_http_request_on_tcp_port(gateway):
    gw = gateway()
    c = await TcpClient.connect("127.0.0.1", gw.tcp_port, preface=None)
    await c.send_raw(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\r\n")
    await c.expect_bye(4000)


# ---------------------------------------------------------------- 4001

@ALL
async def test_4001_hello_timeout(gateway, kind):
    gw = gateway(EDGEGATE_HEARTBEAT__HELLO_TIMEOUT_MS=600)
    t0 = time.monotonic()
    c = await connect(gw, kind)
    bye = await c.expect_bye(4001, timeout=6)
    dt = time.monotonic() - t0
    assert 0.45 <= dt <= 4.0, f"hello timeout fired after {dt:.2f}s (configured 0.6s)"
    assert "timeout" in (bye.get("reason") or ""), bye


async def test_4001_tcp_no_preface_at_all(gateway):
    gw = gateway(EDGEGATE_HEARTBEAT__HELLO_TIMEOUT_MS=500)
    c = await TcpClient.connect("127.0.0.1", gw.tcp_port, preface=None)
    await c.expect_bye(4001, timeout=6)


@pytest.mark.parametrize("meta", [{}, {"user": ""}, {"user": "bad user"}, {"user": "x" * 129},
                                  {"user": 12}])
async def test_4001_hello_without_valid_user(gateway, meta):
    gw = gateway()
    c = await connect(gw, "ws-json")
    await c.send("hello", id=1, meta=meta)
    await c.expect_bye(4001)


# ---------------------------------------------------------------- 4002

async def test_4002_tcp_client_ignoring_pings(gateway):
    gw = gateway(EDGEGATE_HEARTBEAT__INTERVAL_MS=300, EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS=1000)
    c = await session(gw, "tcp")
    c.auto_pong = False
    t0 = time.monotonic()
    closed = await c.until_closed(timeout=8)
    dt = time.monotonic() - t0
    ts = [e["t"] for e in closed.envs]
    assert "ping" in ts, f"server never pinged before closing: {closed.envs}"
    assert ts.index("ping") < len(ts) - 1
    assert closed.envs[-1]["t"] == "bye" and closed.envs[-1]["code"] == 4002, closed.envs
    assert 0.8 <= dt <= 4.0, f"idle close after {dt:.2f}s, configured 1.0s"


async def test_4002_ws_client_ignoring_pings(gateway):
    gw = gateway(EDGEGATE_HEARTBEAT__INTERVAL_MS=300, EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS=1000)
    c = await RawWs.connect("127.0.0.1", gw.ws_port, enc="json")
    await c.hello(new_user())
    c.answer_pings = False
    bye = await c.expect_bye(4002, timeout=8)
    assert c.ws_pings, "server sent no WebSocket Ping before closing 4002"
    assert bye


@pytest.mark.parametrize("kind", ["tcp", "ws-json"])
async def test_heartbeat_answered_keeps_connection(gateway, kind):
    gw = gateway(EDGEGATE_HEARTBEAT__INTERVAL_MS=200, EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS=700)
    c = await session(gw, kind)   # tcp answers ping envelopes; websockets answers WS pings
    # keep reading for 2.2 s (> 3 idle timeouts): recv() answers ping envelopes
    deadline = time.monotonic() + 2.2
    while (left := deadline - time.monotonic()) > 0:
        try:
            e = await c.recv(timeout=left)
        except (asyncio.TimeoutError, TimeoutError):
            break
        raise AssertionError(f"unexpected {e}")
    await c.send("ping", id=5)
    await c.expect("pong", id=5)
    if kind == "tcp":
        assert c.pings_seen >= 3, f"expected pings every 200 ms, saw {c.pings_seen}"


@pytest.mark.parametrize("kind", ["tcp", "raw-ws"])
async def test_no_server_ping_while_client_sends(gateway, kind):
    """§5: the server pings when the connection has sent nothing for hb_ms; a
    client that keeps sending (its own pings every 100 ms, hb 400 ms) gets no
    server ping and is never closed, though it never sends a pong."""
    gw = gateway(EDGEGATE_HEARTBEAT__INTERVAL_MS=400, EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS=1000)
    if kind == "tcp":
        c = await session(gw, "tcp")
    else:
        c = await RawWs.connect("127.0.0.1", gw.ws_port, enc="json")
        await c.hello(new_user())
    c.auto_pong = False
    t_end = time.monotonic() + 2.0
    i = 0
    while time.monotonic() < t_end:
        i += 1
        await c.send("ping", id=i)
        e = await c.recv(timeout=2)
        assert e["t"] == "pong" and e.get("id") == i, f"expected pong {i}, got {e}"
        await asyncio.sleep(0.1)
    if kind == "raw-ws":
        assert not c.ws_pings, f"server sent {len(c.ws_pings)} WS Pings to an active client"


async def test_no_ping_before_welcome(gateway):
    gw = gateway(EDGEGATE_HEARTBEAT__INTERVAL_MS=200, EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS=700,
                 EDGEGATE_HEARTBEAT__HELLO_TIMEOUT_MS=1500)
    c = await TcpClient.connect("127.0.0.1", gw.tcp_port)
    c.auto_pong = False
    closed = await c.until_closed(timeout=6)
    assert [e["t"] for e in closed.envs] == ["bye"], closed.envs
    assert closed.envs[0]["code"] in (4001, 4002), closed.envs


# ---------------------------------------------------------------- 4003

async def test_4003_slow_consumer(gateway):
    gw = gateway(EDGEGATE_LIMITS__MAX_FRAME_BYTES=1024, EDGEGATE_LIMITS__OUTBOUND_QUEUE_BYTES=8192,
                 EDGEGATE_SHARDS__COUNT=2)
    room = f"room:{new_user('slow')}"
    slow = await TcpClient.connect("127.0.0.1", gw.tcp_port, rcvbuf=4096)
    await slow.hello(new_user("slow"))
    await slow.sub(room)
    pub = await session(gw, "tcp")

    # publisher's answers must be read, or it becomes a slow consumer itself
    async def drain_pub():
        while True:
            await pub.recv(timeout=3600)
    drainer = asyncio.create_task(drain_pub())

    payload = b"x" * 800
    sent = 0
    t0 = time.monotonic()
    try:
        # publish until the server reports the 4003 close (bounded: 60k msgs / 20 s)
        while sent < 60000 and time.monotonic() - t0 < 20:
            frames = b"".join(tcp_frame(encode_bin("pub", id=pub.next_id(), ch=room, raw=payload))
                              for _ in range(200))
            await pub.send_raw(frames)
            sent += 200
            if sent % 2000 == 0 and gw.metric("edgegate_closes_total", code="4003") >= 1:
                break
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))   # stay unread ~1 s
        closed = await slow.until_closed(timeout=15)
    finally:
        drainer.cancel()
    last = closed.envs[-1] if closed.envs else None
    assert last and last["t"] == "bye" and last["code"] == 4003, \
        f"slow consumer: expected bye 4003 at the end, got {closed.envs[-2:]} after {sent} publishes"
    nmsgs = sum(1 for e in closed.envs if e["t"] == "msg")
    print(f"published {sent}, slow consumer read {nmsgs} msgs then bye 4003")
    assert nmsgs < sent, "nothing was dropped?"
    assert gw.metric("edgegate_closes_total", code="4003") >= 1
    assert gw.metric("edgegate_drops_total", reason="slow_consumer") >= 1


# ---------------------------------------------------------------- 4006

async def test_4006_tcp_length_over_max_without_body(gateway):
    gw = gateway(EDGEGATE_LIMITS__MAX_FRAME_BYTES=1024)
    c = await session(gw, "tcp")
    assert c.welcome["meta"]["max_frame"] == 1024
    t0 = time.monotonic()
    await c.send_raw(struct.pack(">I", 1025))       # header only: must not wait for the body
    await c.expect_bye(4006, timeout=3)
    assert time.monotonic() - t0 < 2


async def test_tcp_frame_of_exactly_max_accepted(gateway):
    gw = gateway(EDGEGATE_LIMITS__MAX_FRAME_BYTES=1024)
    c = await session(gw, "tcp")
    head = encode_bin("req", id=1, ch="svc:echo")
    env = head + b"y" * (1024 - len(head))
    assert len(env) == 1024
    await c.send_raw(tcp_frame(env))
    r = await c.expect("reply", id=1)
    assert r["raw"] == b"y" * (1024 - len(head))


@pytest.mark.parametrize("enc", ["json", "bin"])
async def test_4006_ws_oversized_message(gateway, enc):
    gw = gateway(EDGEGATE_LIMITS__MAX_FRAME_BYTES=1024)
    c = await session(gw, f"ws-{enc}")
    await c.send("pub", id=1, ch="room:big", d="z" * 2000)
    await c.expect_bye(4006)   # PROTOCOL §5: the WS close code equals the bye code


async def test_ws_message_of_exactly_max_accepted(gateway):
    gw = gateway(EDGEGATE_LIMITS__MAX_FRAME_BYTES=1024)
    c = await session(gw, "ws-json")
    base = '{"t":"req","id":1,"ch":"svc:echo","d":""}'
    text = base[:-2] + "q" * (1024 - len(base)) + '"}'
    assert len(text) == 1024
    await c.send_raw(text)
    r = await c.expect("reply", id=1)
    assert r["d"] == "q" * (1024 - len(base))


# ---------------------------------------------------------------- 4007

@pytest.mark.parametrize("kind", ["ws-json", "tcp"])
async def test_4007_max_connections(gateway, kind):
    maxc = 3
    gw = gateway(EDGEGATE_LIMITS__MAX_CONNECTIONS=maxc, EDGEGATE_LIMITS__RETRY_MS=1500)
    ok = []
    bye = None
    for i in range(maxc + 4):
        c = await connect(gw, kind)
        await c.send("hello", id=1, meta={"user": new_user()})
        e = await c.recv(5)
        if e["t"] == "welcome":
            ok.append(c)
            continue
        assert e["t"] == "bye", e
        assert e["code"] == 4007, e
        bye = e
        closed = await c.until_closed(5)
        if kind == "ws-json":
            assert closed.code == 4007, f"WS close code {closed.code}, bye was 4007"
        break
    assert bye is not None, f"{len(ok)} connections accepted with max_connections={maxc}"
    assert len(ok) == maxc, f"refused after {len(ok)} connections (max_connections={maxc})"
    print(f"{kind}: {len(ok)} accepted with max_connections={maxc}, then {bye}")
    assert bye.get("meta", {}).get("retry_ms", 0) > 0, f"4007 without meta.retry_ms: {bye}"
    assert gw.metric("edgegate_connections_refused_total", reason="max_connections") >= 1
    # freeing a slot lets a new connection in
    await ok[0].close()
    await wait_until(lambda: gw.metric("edgegate_connections") < maxc, what="connection gauge to drop")
    c = await connect(gw, kind)
    await c.hello(new_user())


# ---------------------------------------------------------------- 1001

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_1001_on_sigterm(gateway, sig):
    gw = gateway(EDGEGATE_LIMITS__RETRY_MS=2000, EDGEGATE_SHARDS__COUNT=2)
    clients = []
    for kind in KINDS + KINDS:
        clients.append(await session(gw, kind))
    gw.expect_exit()
    gw.sigterm(sig)
    byes = await asyncio.gather(*(c.expect_bye(1001, timeout=10) for c in clients))
    retries = [b.get("meta", {}).get("retry_ms") for b in byes]
    assert all(isinstance(r, int) and r > 0 for r in retries), f"retry_ms missing: {byes}"
    assert len(set(retries)) > 1, f"retry_ms not jittered per connection: {retries}"
    rc = await asyncio.get_running_loop().run_in_executor(None, gw.wait_exit, 15)
    assert rc == 0, f"exit code {rc} after SIGTERM"


async def test_drain_readyz_503_and_no_new_sessions(gateway):
    """While draining (drain window spreads the closes), /readyz answers 503,
    /healthz 200, and a new connection gets no welcome."""
    from conftest import http_get
    gw = gateway(EDGEGATE_DRAIN__WINDOW_MS=2000, EDGEGATE_LIMITS__RETRY_MS=1000)
    clients = [await session(gw, "tcp") for _ in range(20)]
    gw.expect_exit()
    gw.sigterm()
    loop = asyncio.get_running_loop()
    seen = []
    for _ in range(30):       # up to ~1.5 s for the signal to be handled
        st, _ = await loop.run_in_executor(None, http_get, gw.admin + "/readyz")
        seen.append(st)
        if st == 503:
            break
        await asyncio.sleep(0.05)
    assert seen[-1] == 503, f"/readyz never answered 503 while draining: {seen}"
    st, _ = await loop.run_in_executor(None, http_get, gw.admin + "/healthz")
    assert st == 200, f"/healthz answered {st} while draining"
    try:
        c = await TcpClient.connect("127.0.0.1", gw.tcp_port)
        await c.send("hello", id=1, meta={"user": new_user()})
        closed = await c.until_closed(timeout=5)
        assert all(e["t"] == "bye" for e in closed.envs), f"new connection served while draining: {closed.envs}"
    except (ConnectionRefusedError, ConnectionResetError):
        pass
    byes = await asyncio.gather(*(c.expect_bye(1001, timeout=10) for c in clients))
    assert all(b.get("meta", {}).get("retry_ms", 0) > 0 for b in byes)
    rc = await loop.run_in_executor(None, gw.wait_exit, 15)
    assert rc == 0


@pytest.mark.parametrize("trigger", ["bad-preface", "pub-before-hello"])
async def test_bye_survives_unread_input(gateway, trigger):
    """After bye the server half-closes and discards input for a linger, so a
    client that keeps sending still reads the bye (no RST destroying it)."""
    gw = gateway()
    for _ in range(5):
        if trigger == "bad-preface":
            c = await TcpClient.connect("127.0.0.1", gw.tcp_port, preface=None)
            data = b"GARBAGE!" + b"g" * (1 << 20)
        else:
            c = await TcpClient.connect("127.0.0.1", gw.tcp_port)
            data = b"".join(tcp_frame(encode_bin("pub", id=i, ch="room:x", raw=b"p" * 900))
                            for i in range(1000))
        c.writer.write(data)            # no drain: the server may stop reading at any time
        await c.expect_bye(4000, timeout=5)
        c.writer.transport.abort()


async def test_reading_consumer_is_not_dropped(gateway):
    """The 4003 limit is for consumers that do not keep up: a subscriber that
    keeps reading, with the publisher never more than 2 windows (~170 KB)
    ahead of it (under the default 256 KiB outbound queue, even with no
    kernel buffering), gets every message, in order, and no 4003."""
    gw = gateway(EDGEGATE_SHARDS__COUNT=2)
    sub, pub = await pair_on_different_shards(gw, "tcp", "ws-bin")
    room = f"room:{new_user('fast')}"
    await sub.sub(room)
    n, window = 3000, 100
    payload = b"f" * 800
    got: list[int] = []

    async def consume():
        while len(got) < n:
            e = await sub.recv(timeout=10)
            assert e["t"] == "msg", e
            got.append(int(e["raw"][:8]))

    task = asyncio.create_task(consume())
    for i in range(0, n, window):
        while len(got) < i - window:          # at most 2 windows outstanding
            if task.done():
                task.result()
            await asyncio.sleep(0.002)
        for j in range(i, i + window, 50):   # one WS message must stay under max_frame (64 KiB)
            await pub.send_many([("pub", {"id": pub.next_id(), "ch": room, "raw": b"%08d" % k + payload})
                                 for k in range(j, j + 50)])
        for _ in range(window):
            e = await pub.recv(timeout=10)
            assert e["t"] == "ok", e
    await asyncio.wait_for(task, 20)
    assert got == list(range(n))
    assert gw.metric("edgegate_closes_total", code="4003") == 0
