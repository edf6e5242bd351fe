"""SSE (PROTOCOL.md §10) on the embedded backbone, with an independent
client on plain sockets (ssehelp.py: GET /sse?hello=, POST /sse with
Eg-Session, the event stream parsed as the WHATWG standard says):

the stream's events (one per batch, a data: line per envelope) and its
welcome.meta.session; POSTs answered 204 / 404 / 413 / 400, a 404 touching
nothing; a POST that lands on another shard than its session's; comment
lines as heartbeats, the idle timeout counting POSTs; bye then the end of
the stream; recovery with since after a dropped stream; refused origins
and CORS; rate limits counting POSTed envelopes; the connection limit; SSE
over TLS; the connection gauge and the POST counters.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time

import pytest

from helpers import new_user, session, wait_until
from ssehelp import HttpConn, HttpRefused, SseClient, http_request, sse_session


def sse(gw, **kw) -> SseClient:
    return SseClient.for_gateway(gw, **kw)


async def pong(c: SseClient, timeout: float = 5.0) -> dict:
    """A ping POSTed, its pong read from the stream."""
    i = c.next_id()
    await c.send("ping", id=i)
    assert c.post_statuses[-1] == 204, c.post_statuses
    return await c.recv_until(lambda e: e["t"] == "pong" and e.get("id") == i, timeout)


async def test_the_stream_carries_every_answer_as_events(gateway):
    gw = gateway()
    user = new_user("s")
    c = sse(gw)
    w = await c.hello(user, client="pytest")
    h = c.response_headers
    assert h["content-type"].startswith("text/event-stream"), h
    assert "no-cache" in h["cache-control"], h
    m = w["meta"]
    assert m["user"] == user and m["hb_ms"] > 0 and m["max_frame"] > 0, m
    # The session token: node, shard, slot, serial, then a MAC of at
    # least 128 bits (base64url).
    parts = m["session"].split(".")
    assert len(parts) == 5, m["session"]
    assert parts[0] == m["node"] and int(parts[1]) == m["shard"], m
    assert m["conn"].endswith("-" + parts[3]), m
    mac = base64.urlsafe_b64decode(parts[4] + "=" * (-len(parts[4]) % 4))
    assert len(mac) * 8 >= 128, parts[4]

    # A sub and a publish from another transport reach the stream.
    room = f"room:{new_user('r')}"
    ok = await c.sub(room)
    assert ok["t"] == "ok"
    assert c.post_statuses == [204], c.post_statuses
    ws = await session(gw, "ws-json")
    await ws.call("pub", ch=room, d={"text": "hi sse"})
    msg = await c.recv_until(lambda e: e["t"] == "msg")
    assert msg["ch"] == room and msg["d"] == {"text": "hi sse"} and msg["from"] == ws.user

    # The SSE client publishes; the WebSocket client hears it.
    await ws.sub(room)
    r = await c.call("pub", ch=room, d={"text": "from sse"})
    assert r["t"] == "ok", r
    got = await ws.recv_until(lambda e: e["t"] == "msg" and e.get("from") == user)
    assert got["d"] == {"text": "from sse"}

    # A batch: three envelopes POSTed in one body are answered together,
    # as one event with one data: line per envelope.
    before = len(c.events)
    status, _, _ = await c.post(b'{"t":"ping","id":901}\n{"t":"ping","id":902}\n{"t":"ping","id":903}')
    assert status == 204
    pongs = [await c.recv_until(lambda e: e["t"] == "pong") for _ in range(3)]
    assert [p["id"] for p in pongs] == [901, 902, 903]
    assert any(len(ev) == 3 for ev in c.events[before:]), c.events[before:]
    for ev in c.events:
        for line in ev:
            json.loads(line)  # every data: line is one whole envelope
    await c.close()


async def test_posts_are_answered_204_404_413_400(gateway):
    gw = gateway(EDGEGATE_LIMITS__MAX_FRAME_BYTES=4096)
    a = await sse_session(gw, new_user("a"))
    b = await sse_session(gw, new_user("b"))
    room = f"room:{new_user('r')}"
    await b.sub(room)
    # 204: taken; the answers come on the stream.
    st, _, body = await a.post(b'{"t":"ping","id":1}')
    assert (st, body) == (204, b"")
    assert (await a.recv_until(lambda e: e["t"] == "pong"))["id"] == 1

    # 404: a token nobody has, a forged MAC, a malformed one. None of them
    # touches the session it names: b publishes nothing.
    forged = b.session[:-2] + ("AA" if not b.session.endswith("AA") else "BB")
    pub = json.dumps({"t": "pub", "id": 5, "ch": room, "d": "forged"}).encode()
    for tok in (forged, "nope", b.session.rsplit(".", 1)[0] + "." + "A" * 43,
                b.session.replace(f".{b.shard}.", ".99.", 1)):
        st, _, body = await a.post(pub, session=tok)
        assert st == 404, (tok, st, body)
    with pytest.raises(asyncio.TimeoutError):
        await b.recv_until(lambda e: e["t"] in ("msg", "ok"), timeout=0.5)

    # 400: no Eg-Session at all.
    st, _, _ = await http_request("127.0.0.1", gw.ws_port, "POST", "/sse", {}, b"{}")
    assert st == 400

    # 413: a body over max_frame, refused before it is read.
    st, hdrs, _ = await http_request("127.0.0.1", gw.ws_port, "POST", "/sse",
                                     {"Eg-Session": a.session}, b"x" * 5000)
    assert st == 413 and hdrs.get("connection") == "close", (st, hdrs)
    # The same for a chunked body.
    chunked = b"".join(b"%x\r\n%s\r\n" % (1000, b"y" * 1000) for _ in range(5)) + b"0\r\n\r\n"
    st, _, _ = await http_request("127.0.0.1", gw.ws_port, "POST", "/sse",
                                  {"Eg-Session": a.session, "Transfer-Encoding": "chunked"}, chunked)
    assert st == 413
    # ...and a session is still fine afterwards.
    await pong(a)

    # A closed session: 404 once its stream is gone.
    tok = b.session
    await b.close()
    await wait_until(lambda: gw.metric("edgegate_connections", transport="sse") <= 2,
                     what="b's stream released")
    st, _, _ = await a.post(pub, session=tok)
    assert st == 404
    assert gw.metric("edgegate_sse_posts_total", outcome="unknown") >= 5
    assert gw.metric("edgegate_sse_posts_total", outcome="too_large") == 2
    assert gw.metric("edgegate_sse_posts_total", outcome="bad_request") == 1


async def test_a_post_on_another_shard_reaches_its_session(gateway):
    """Sessions on both shards; POSTs on fresh connections (the kernel
    spreads them over the shards): every one reaches its own session."""
    gw = gateway(EDGEGATE_SHARDS__COUNT=2)
    by_shard: dict[int, SseClient] = {}
    spare = []
    for _ in range(40):
        c = await sse_session(gw, new_user("m"), keep_alive=False)
        if c.shard in by_shard:
            spare.append(c)
        else:
            by_shard[c.shard] = c
        if len(by_shard) == 2:
            break
    assert len(by_shard) == 2, "40 SSE sessions all on one shard"
    n = 0
    for round_ in range(12):
        for shard, c in by_shard.items():
            n += 1
            st, _, _ = await c.post(json.dumps({"t": "ping", "id": 1000 + n}).encode())
            assert st == 204
            pong = await c.recv_until(lambda e: e["t"] == "pong")
            assert pong["id"] == 1000 + n, (shard, pong)
    forwarded = gw.metric("edgegate_sse_posts_forwarded_total", to="shard")
    assert forwarded >= 1, "no POST was read by the other shard (24 fresh connections)"
    assert gw.metric("edgegate_sse_posts_total", outcome="taken") >= 24
    for c in spare:
        await c.close()


async def test_posts_keep_their_connection_alive_and_a_get_may_follow(gateway):
    gw = gateway()
    c = await sse_session(gw, new_user("k"), keep_alive=False)
    conn = HttpConn("127.0.0.1", gw.ws_port)
    for i in range(5):
        st, hdrs, _ = await conn.request("POST", "/sse", {"Eg-Session": c.session},
                                         json.dumps({"t": "ping", "id": i}).encode())
        assert st == 204 and hdrs.get("connection") != "close"
        assert (await c.recv_until(lambda e: e["t"] == "pong"))["id"] == i
    # A preflight on it too.
    st, hdrs, _ = await conn.request("OPTIONS", "/sse", {"Origin": "https://x.example",
                                                         "Access-Control-Request-Method": "POST"})
    assert st == 204 and "eg-session" in hdrs["access-control-allow-headers"].lower()
    # Then the same connection becomes a stream.
    hello = json.dumps({"t": "hello", "id": 1, "meta": {"user": new_user("k2")}})
    assert conn.writer is not None and conn.reader is not None
    conn.writer.write(f"GET /sse?hello={__import__('urllib.parse').parse.quote(hello)} HTTP/1.1\r\n"
                      f"Host: x\r\n\r\n".encode())
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    ev = await asyncio.wait_for(conn.reader.readuntil(b"\n\n"), 5)
    assert b'"t":"welcome"' in ev, ev
    conn.close()
    # Anything but SSE on a kept-alive SSE connection: 404, closed.
    conn = HttpConn("127.0.0.1", gw.ws_port)
    st, _, _ = await conn.request("POST", "/sse", {"Eg-Session": c.session}, b"")
    assert st == 204
    st, _, _ = await conn.request("GET", "/metrics")
    assert st == 404
    assert await conn.at_eof()


async def test_heartbeat_comments_and_the_idle_timeout(gateway):
    gw = gateway(EDGEGATE_HEARTBEAT__INTERVAL_MS=300, EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS=1500)
    quiet = await sse_session(gw, new_user("q"))
    t0 = time.monotonic()
    # Nothing sent: a comment line every heartbeat interval...
    first = await quiet.read_comment(timeout=2)
    second = await quiet.read_comment(timeout=2)
    assert 0.15 <= first - t0 <= 1.0 and second > first, (first - t0, second - first)
    # ...and the idle timeout closes it: bye 4002, then the stream ends.
    bye = await quiet.expect_bye(4002, timeout=5)
    assert quiet.eof
    took = time.monotonic() - t0
    assert 1.2 <= took <= 3.5, took

    # A client that POSTs a ping now and then stays: POSTs count as activity.
    busy = await sse_session(gw, new_user("b"))
    end = time.monotonic() + 3.5
    i = 0
    while time.monotonic() < end:
        i += 1
        await pong(busy)
        await asyncio.sleep(0.4)
    # Still open: a further ping is answered.
    await pong(busy, timeout=2)
    assert bye["reason"]


async def test_bye_ends_the_stream(gateway):
    gw = gateway()
    # An envelope that does not decode: bye 4000, then the end of the stream.
    c = await sse_session(gw, new_user("x"))
    st, _, _ = await c.post(b'{"t":"pub",')
    assert st == 204
    await c.expect_bye(4000)
    assert c.eof
    # Sending on the stream itself is a protocol error too.
    c = await sse_session(gw, new_user("y"))
    assert c.writer is not None
    c.writer.write(b'{"t":"ping"}\n')
    await c.expect_bye(4000)
    # A drain: bye 1001 with retry_ms, then the end of the stream.
    d = await sse_session(gw, new_user("z"))
    gw.expect_exit()
    gw.sigterm()
    bye = await d.expect_bye(1001, timeout=10)
    assert bye["meta"]["retry_ms"] > 0
    assert d.eof
    assert gw.wait_exit(15) == 0


async def test_hello_in_the_query_is_checked_like_a_websocket_hello(gateway):
    gw = gateway()
    # No hello at all: not an SSE request.
    st, _, body = await http_request("127.0.0.1", gw.ws_port, "GET", "/sse")
    assert st == 400 and b"hello" in body
    st, _, _ = await http_request("127.0.0.1", gw.ws_port, "GET", "/sse?hello=%zz")
    assert st == 400
    # JSON that is no envelope: the stream opens and says bye 4000.
    c = sse(gw)
    await c.open("not json")
    await c.expect_bye(4000)
    # Another type first: 4000 too. No user (auth "none"): 4001.
    c = sse(gw)
    await c.open(json.dumps({"t": "sub", "id": 1, "ch": "room:a"}))
    await c.expect_bye(4000)
    c = sse(gw)
    await c.open(json.dumps({"t": "hello", "id": 1}))
    await c.expect_bye(4001)
    # Other methods: 405.
    st, hdrs, _ = await http_request("127.0.0.1", gw.ws_port, "PUT", "/sse", {}, b"")
    assert st == 405 and "POST" in hdrs["allow"]


async def test_recovery_with_since_after_a_dropped_stream(gateway):
    gw = gateway()
    user = new_user("rec")
    room = f"room:{new_user('r')}"
    c = await sse_session(gw, user)
    ok = await c.sub(room)
    pos = {"seq": ok["seq"], "epoch": ok["meta"]["epoch"]}
    own = c.welcome["meta"]["stream"]
    c.abort()                                   # the stream drops, no goodbye
    ws = await session(gw, "ws-json")
    seqs = []
    for i in range(3):
        seqs.append((await ws.call("pub", ch=room, d={"n": i}))["seq"])
    dm = await ws.call("pub", ch=f"user:{user}", d={"dm": 1})
    assert dm["t"] == "ok"
    # Back: the own stream recovers in welcome, the room with sub since.
    c2 = sse(gw)
    w = await c2.hello(user, since={"seq": own["seq"], "epoch": own["epoch"]})
    assert w["meta"]["stream"]["recovered"] is True, w
    got = await c2.recv_until(lambda e: e["t"] == "msg")
    assert got["d"] == {"dm": 1}
    r = await c2.call("sub", ch=room, meta={"since": pos})
    assert r["t"] == "ok" and r["meta"]["recovered"] is True, r
    replay = [await c2.recv_until(lambda e: e["t"] == "msg") for _ in range(3)]
    assert [m["seq"] for m in replay] == seqs
    assert [m["d"]["n"] for m in replay] == [0, 1, 2]


async def test_origins_and_cors(gateway):
    gw = gateway(EDGEGATE_WS__ALLOWED_ORIGINS="https://chat.example.com")
    bad = sse(gw, origin="https://evil.example.com")
    with pytest.raises(HttpRefused) as e:
        await bad.hello(new_user())
    assert e.value.status == 403
    good = sse(gw, origin="https://chat.example.com")
    await good.hello(new_user())
    assert good.response_headers["access-control-allow-origin"] == "https://chat.example.com"
    st, hdrs, _ = await good.post(b'{"t":"ping","id":3}')
    assert st == 204 and hdrs["access-control-allow-origin"] == "https://chat.example.com"
    st, _, _ = await good.post(b'{"t":"ping"}', headers={"Origin": "https://evil.example.com"})
    assert st == 403
    # The browser's preflight: allowed origins only.
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "eg-session"}
    st, hdrs, _ = await http_request("127.0.0.1", gw.ws_port, "OPTIONS", "/sse",
                                     {"Origin": "https://chat.example.com", **pre})
    assert st == 204 and hdrs["access-control-allow-origin"] == "https://chat.example.com"
    assert "POST" in hdrs["access-control-allow-methods"]
    st, _, _ = await http_request("127.0.0.1", gw.ws_port, "OPTIONS", "/sse",
                                  {"Origin": "https://evil.example.com", **pre})
    assert st == 403
    # No Origin: not a browser; the list does not apply.
    native = await sse_session(gw, new_user())
    assert "access-control-allow-origin" not in native.response_headers
    assert gw.metric("edgegate_limit_hits_total", limit="origin") == 3


async def test_rate_limits_count_posted_envelopes(gateway):
    gw = gateway(EDGEGATE_LIMITS__CONN_MSGS_PER_S=20, EDGEGATE_LIMITS__CONN_MSGS_BURST=10,
                 EDGEGATE_LIMITS__RATE_LIMITED_CLOSE_AFTER=30)
    c = await sse_session(gw, new_user("rl"))
    body = "\n".join(json.dumps({"t": "ping", "id": i}) for i in range(1, 26)).encode()
    assert (await c.post(body))[0] == 204
    answers = [await c.recv_until(lambda e: e["t"] in ("pong", "err")) for _ in range(25)]
    refused = [a for a in answers if a["t"] == "err"]
    assert refused and all(a["code"] == "rate_limited" for a in refused), answers
    assert len(answers) - len(refused) <= 11
    # Keep going: 4004 closes the stream.
    for _ in range(3):
        await c.post(body)
    await c.expect_bye(4004, timeout=5)


async def test_tokens_in_the_query_hello_and_header(gateway, tmp_path):
    import hmac, hashlib
    secret = "0123456789abcdef0123456789abcdef"
    gw = gateway(EDGEGATE_AUTH__MODE="jwt", EDGEGATE_AUTH__SECRET=secret,
                 EDGEGATE_AUTH__TOKEN_SOURCES="hello,header,query")

    def tok(sub):
        b64 = lambda o: base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()
        head = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64({'sub': sub, 'exp': int(time.time()) + 60})}"
        sig = hmac.new(secret.encode(), head.encode(), hashlib.sha256).digest()
        return head + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    # hello.meta.token inside hello=
    c = sse(gw)
    await c.send("hello", id=1, meta={"token": tok("ann")})
    w = await c.expect("welcome")
    assert w["meta"]["user"] == "ann"
    # Authorization: Bearer on the GET
    c = sse(gw, headers={"Authorization": f"Bearer {tok('bob')}"})
    await c.send("hello", id=1)
    assert (await c.expect("welcome"))["meta"]["user"] == "bob"
    # ?token=
    c = sse(gw, query=f"token={tok('cid')}")
    await c.send("hello", id=1)
    assert (await c.expect("welcome"))["meta"]["user"] == "cid"
    # A bad one: bye 4001 on the stream.
    c = sse(gw)
    await c.send("hello", id=1, meta={"token": "x.y.z"})
    await c.expect_bye(4001)


async def test_connection_limit_and_gauges(gateway):
    gw = gateway(EDGEGATE_LIMITS__MAX_CONNECTIONS=2, EDGEGATE_LIMITS__RETRY_MS=1000)
    a = await sse_session(gw, new_user("g1"))
    b = await sse_session(gw, new_user("g2"))
    assert gw.metric("edgegate_connections", transport="sse") == 2
    assert gw.metric("edgegate_connections", transport="ws") == 0
    # A third stream: the event stream with only bye 4007 (and retry_ms).
    c = sse(gw)
    await c.send("hello", id=1, meta={"user": new_user()})
    bye = await c.expect_bye(4007)
    assert bye["meta"]["retry_ms"] > 0
    # A POST over the limit: 503 with Retry-After.
    st, hdrs, _ = await http_request("127.0.0.1", gw.ws_port, "POST", "/sse",
                                     {"Eg-Session": a.session}, b'{"t":"ping"}')
    assert st == 503 and int(hdrs["retry-after"]) >= 1
    await a.close()
    await b.close()
    await wait_until(lambda: gw.metric("edgegate_connections", transport="sse") == 0,
                     what="SSE sockets released")
    assert gw.metric("edgegate_sessions") == 0


async def test_sse_over_tls(gateway, tmp_path):
    from test_tls import Pki, tls_env
    pki = Pki(tmp_path / "pki")
    chain, key = pki.write(*pki.leaf())
    gw = gateway(**tls_env(chain, key))
    ctx = pki.client_ctx()
    c = SseClient("127.0.0.1", gw.ws_port, ssl=ctx)
    await c.hello(new_user("t"))
    room = f"room:{new_user('r')}"
    await c.sub(room)
    r = await c.call("pub", ch=room, d={"tls": True})
    assert r["t"] == "ok"
    msg = await c.recv_until(lambda e: e["t"] == "msg")
    assert msg["d"] == {"tls": True}
    # Plain HTTP on the TLS port is not served.
    with pytest.raises((HttpRefused, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError,
                        asyncio.TimeoutError, ValueError, IndexError)):
        await sse_session(gw, new_user("p"))
