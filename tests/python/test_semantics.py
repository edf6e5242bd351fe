"""sub/unsub/pub/req semantics and err codes in embedded / auth-none mode."""

import asyncio
import json

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from egproto import ERR_CODES, PREFACE, RawWs, TcpClient, WsClient, decode_json, encode_bin, tcp_frame
from helpers import KINDS, connect, new_user, no_message, pair_on_different_shards, session

ALL = pytest.mark.parametrize("kind", KINDS)


@ALL
async def test_welcome_fields(gateway, kind):
    gw = gateway(EDGEGATE_HEARTBEAT__INTERVAL_MS=7000, EDGEGATE_LIMITS__MAX_FRAME_BYTES=4096)
    c = await session(gw, kind, "welcomer")
    m = c.welcome["meta"]
    for k in ("conn", "user", "node", "shard", "hb_ms", "max_frame"):
        assert k in m, f"welcome.meta lacks {k}: {c.welcome}"
    assert m["user"] == "welcomer"
    assert m["hb_ms"] == 7000 and m["max_frame"] == 4096
    assert m["shard"] in (0, 1)


@ALL
async def test_svc_echo_reply(gateway, kind):
    gw = gateway()
    c = await session(gw, kind)
    r = await c.call("req", ch="svc:echo", d={"echo": [1, "two"]})
    assert r["t"] == "reply" and r["d"] == {"echo": [1, "two"]}, r
    r = await c.call("req", ch="svc:echo", raw=b"\x00\x01raw")
    assert r["t"] == "reply" and r.get("raw") == b"\x00\x01raw", r


@ALL
async def test_ping_pong_with_id(gateway, kind):
    gw = gateway()
    c = await session(gw, kind)
    await c.send("ping", id=4242)
    await c.expect("pong", id=4242)
    await c.send("ping")
    p = await c.expect("pong")
    assert "id" not in p, p


@pytest.mark.parametrize("kind", ["ws-json", "tcp"])
async def test_ping_before_hello_tolerated(gateway, kind):
    gw = gateway()
    c = await connect(gw, kind)
    await c.send("ping", id=1)
    await c.expect("pong", id=1)
    await c.hello(new_user())


@ALL
async def test_err_codes(gateway, kind):
    gw = gateway()
    c = await session(gw, kind)
    other = new_user("other")
    cases = [
        ("sub", {"ch": "foo:x"}, "bad_channel"),
        ("sub", {"ch": "room:has space"}, "bad_channel"),
        ("sub", {"ch": "room:" + "x" * 129}, "bad_channel"),
        ("sub", {"ch": "room:"}, "bad_channel"),
        ("sub", {"ch": "noprefix"}, "bad_channel"),
        ("pub", {"ch": "room:b\u00e4d", "d": 1}, "bad_channel"),
        ("req", {"ch": "room:x", "d": 1}, "bad_channel"),
        ("req", {"ch": "user:x", "d": 1}, "bad_channel"),
        ("sub", {"ch": f"user:{other}"}, "forbidden"),
        ("sub", {"ch": "svc:echo"}, "forbidden"),
        ("pub", {"ch": "svc:x", "d": 1}, "bad_request"),
        ("req", {"ch": "svc:nosuchservice", "d": 1}, "no_service"),
        ("unsub", {"ch": "room:never"}, "not_subscribed"),
    ]
    failures = []
    for t, kw, code in cases:
        r = await c.call(t, **kw)
        if r["t"] != "err" or r.get("code") != code:
            failures.append(f"{t} {kw}: expected err {code}, got {r}")
        elif kind != "ws-json":
            assert r["code_num"] == ERR_CODES[code]
    # `sub svc:x` is only specified as "nobody may subscribe"; accept forbidden or bad_channel
    failures = [f for f in failures if not (f.startswith("sub {'ch': 'svc:echo'}") and "bad_channel" in f)]
    assert not failures, "\n".join(failures)
    # the connection is still usable after errors
    await c.send("ping", id=9)
    await c.expect("pong", id=9)


@ALL
async def test_sub_unsub(gateway, kind):
    gw = gateway()
    c = await session(gw, kind)
    p = await session(gw, "ws-json")
    room = f"room:{new_user('su')}"
    # own user channel: sub answers ok
    r = await c.call("sub", ch=f"user:{c.user}")
    assert r["t"] == "ok", r
    await c.sub(room)
    r = await p.call("pub", ch=room, d=1)   # publisher not subscribed: allowed (open policy)
    assert r["t"] == "ok", r
    m = await c.expect("msg", ch=room, d=1)
    assert m["from"] == p.user
    r = await c.call("unsub", ch=room)
    assert r["t"] == "ok", r
    r = await p.call("pub", ch=room, d=2)
    assert r["t"] == "ok"
    await no_message(c, 0.3)
    r = await c.call("unsub", ch=room)
    assert r["t"] == "err" and r["code"] == "not_subscribed", r
    # still subscribed to own user channel
    r = await p.call("pub", ch=f"user:{c.user}", d=3)
    await c.expect("msg", ch=f"user:{c.user}", d=3)


async def test_ok_to_sub_means_live(gateway):
    """Every message published after the client received `ok` reaches it."""
    gw = gateway(EDGEGATE_SHARDS__COUNT=2)
    s, p = await pair_on_different_shards(gw, "ws-json", "tcp")
    for i in range(20):
        room = f"room:live{i}_{new_user()}"
        await s.sub(room)
        r = await p.call("pub", ch=room, d=i)
        assert r["t"] == "ok"
        m = await s.expect("msg", ch=room, timeout=3)
        assert m["d"] == i


async def test_json_batch_in_one_ws_message(gateway):
    gw = gateway()
    c = await session(gw, "ws-json")
    await c.send_raw('{"t":"ping","id":1}\n{"t":"ping","id":2}\n{"t":"req","id":3,"ch":"svc:echo","d":"x"}')
    got = [await c.recv() for _ in range(3)]
    assert [(g["t"], g.get("id")) for g in got] == [("pong", 1), ("pong", 2), ("reply", 3)], got


async def test_binary_batch_in_one_ws_message(gateway):
    gw = gateway()
    c = await session(gw, "ws-bin")
    await c.send_many([("ping", {"id": 1}), ("ping", {"id": 2}), ("req", {"id": 3, "ch": "svc:echo", "raw": b"z"})])
    got = [await c.recv() for _ in range(3)]
    assert [(g["t"], g.get("id")) for g in got] == [("pong", 1), ("pong", 2), ("reply", 3)], got


async def test_subprotocol_negotiation(gateway):
    gw = gateway()
    for sp in ("edgegate.v1.json", "edgegate.v1.bin"):
        async with ws_connect(gw.ws_url, subprotocols=[sp]) as ws:
            assert ws.subprotocol == sp
    # none offered: JSON mode, no subprotocol in the answer
    async with ws_connect(gw.ws_url) as ws:
        assert ws.subprotocol is None
        assert "sec-websocket-protocol" not in {k.lower() for k in ws.response.headers.keys()}
        await ws.send(json.dumps({"t": "hello", "id": 5, "meta": {"user": "nosp"}}))
        w = decode_json(await asyncio.wait_for(ws.recv(), 5))
        assert w["t"] == "welcome" and w["id"] == 5
    # unknown subprotocols only: still JSON mode
    c = await WsClient.connect(gw.ws_url, enc="json", subprotocol="other.proto")
    await c.hello("other")


async def test_ws_wrong_path_404(gateway):
    gw = gateway()
    with pytest.raises(InvalidStatus) as ei:
        async with ws_connect(f"ws://127.0.0.1:{gw.ws_port}/nope"):
            pass
    assert ei.value.response.status_code == 404


async def test_binary_err_is_number_on_wire(gateway):
    gw = gateway()
    c = await session(gw, "tcp")
    await c.send_raw(tcp_frame(encode_bin("sub", id=77, ch="foo:x")))
    r = await c.recv()
    assert r["t"] == "err" and r["id"] == 77 and r["code_num"] == 4, r


async def test_raw_ws_client_handshake(gateway):
    """Our hand-written WS client sees the subprotocol echoed."""
    gw = gateway()
    c = await RawWs.connect("127.0.0.1", gw.ws_port, enc="bin")
    assert c.headers.get("sec-websocket-protocol") == "edgegate.v1.bin"
    await c.hello(new_user())
    await c.send("ping", id=3)
    await c.expect("pong", id=3)


async def test_tcp_frames_split_and_coalesced(gateway):
    """TCP framing is a byte stream: a frame dribbled byte by byte and
    several frames in one write both work."""
    gw = gateway()
    c = await TcpClient.connect("127.0.0.1", gw.tcp_port, preface=None)
    data = PREFACE + tcp_frame(encode_bin("hello", id=1, meta={"user": new_user()}))
    for i in range(len(data)):
        await c.send_raw(data[i:i + 1])
        await asyncio.sleep(0.002)
    await c.expect("welcome", id=1)
    await c.send_raw(b"".join(tcp_frame(encode_bin("ping", id=i)) for i in range(10, 20)))
    for i in range(10, 20):
        await c.expect("pong", id=i)


async def test_ws_fragmented_message(gateway):
    """A WS message in continuation frames (and a client Ping in between) is
    reassembled; the Ping is answered."""
    gw = gateway()
    c = await RawWs.connect("127.0.0.1", gw.ws_port, enc="json")
    await c.hello(new_user())
    text = b'{"t":"req","id":7,"ch":"svc:echo","d":{"k":"fragmented"}}'
    await c.send_frame(0x1, text[:10], fin=False)
    await c.send_frame(0x0, text[10:20], fin=False)
    await c.send_frame(0x9, b"cping")                       # control frame between fragments
    await c.send_frame(0x0, text[20:], fin=True)
    got_pong = False
    while True:
        fin, op, payload = await asyncio.wait_for(c.read_ws_frame(), 5)
        if op == 0xA:
            assert payload == b"cping"
            got_pong = True
            continue
        assert op == 0x1 and fin
        env = decode_json(payload.decode())
        assert env["t"] == "reply" and env["id"] == 7 and env["d"] == {"k": "fragmented"}, env
        break
    if not got_pong:
        fin, op, payload = await asyncio.wait_for(c.read_ws_frame(), 5)
        assert op == 0xA and payload == b"cping"


@pytest.mark.parametrize("kind", ["ws-bin", "tcp"])
async def test_no_payload_means_no_d(gateway, kind):
    """A frame with no payload bytes and bit 0x40 clear has no d/db."""
    gw = gateway()
    j, b = await pair_on_different_shards(gw, "ws-json", kind)
    r = await b.call("pub", ch=f"user:{j.user}")
    assert r["t"] == "ok", r
    m = await j.recv_until(lambda e: e["t"] == "msg")
    assert "d" not in m and "db" not in m, m
    r = await j.call("pub", ch=f"user:{b.user}")
    m = await b.recv_until(lambda e: e["t"] == "msg")
    assert m["_payload"] == b"" and "d" not in m, m


async def test_subprotocol_both_offered_mode_follows_choice(gateway):
    gw = gateway()
    for offer in (["edgegate.v1.bin", "edgegate.v1.json"], ["edgegate.v1.json", "edgegate.v1.bin"]):
        ws = await ws_connect(gw.ws_url, subprotocols=offer, ping_interval=None)
        assert ws.subprotocol in offer, ws.subprotocol
        c = WsClient(ws, "bin" if ws.subprotocol == "edgegate.v1.bin" else "json")
        await c.hello(new_user())          # asserts the reply arrives in the chosen encoding
        await c.send("ping", id=2)
        await c.expect("pong", id=2)
        await c.close()
