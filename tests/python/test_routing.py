"""Routing between connections on different shards, across encodings and
transports (PROTOCOL.md §1-§4, embedded backbone)."""

import asyncio

import pytest

from egproto import F_JSON
from helpers import new_user, pair_on_different_shards, session

COMBOS = [
    ("ws-json", "ws-json"), ("ws-bin", "ws-bin"), ("tcp", "tcp"),
    ("ws-json", "tcp"), ("tcp", "ws-json"), ("ws-bin", "ws-json"),
    ("ws-json", "ws-bin"), ("tcp", "ws-bin"),
]


def _msg_ok(m, ch, frm, d, pub_id):
    assert m["t"] == "msg", m
    assert m.get("ch") == ch, m
    assert m.get("from") == frm, m
    assert m.get("d") == d, m
    assert m.get("id") == pub_id, f"msg must carry the publisher's id {pub_id}: {m}"


async def _next_msg(c, timeout=5):
    return await c.recv_until(lambda e: e["t"] == "msg", timeout)


@pytest.mark.parametrize("ka,kb", COMBOS, ids=[f"{a}__{b}" for a, b in COMBOS])
async def test_cross_shard_direct_and_room(gateway, ka, kb):
    gw = gateway(EDGEGATE_SHARDS__COUNT=2)
    a, b = await pair_on_different_shards(gw, ka, kb)
    assert a.shard != b.shard
    room = f"room:{new_user('r')}"
    await a.sub(room)
    await b.sub(room)

    # direct A -> B
    d1 = {"text": "hi b", "n": 1, "uni": "h\u00e9\u2603"}
    r = await a.call("pub", ch=f"user:{b.user}", d=d1)
    assert r["t"] == "ok", r
    _msg_ok(await _next_msg(b), f"user:{b.user}", a.user, d1, r["id"])

    # direct B -> A
    d2 = ["list", 2, None, True]
    r = await b.call("pub", ch=f"user:{a.user}", d=d2)
    assert r["t"] == "ok", r
    _msg_ok(await _next_msg(a), f"user:{a.user}", b.user, d2, r["id"])

    # room from A: both members get it, the publisher too
    d3 = {"room": "from a"}
    r = await a.call("pub", ch=room, d=d3)
    assert r["t"] == "ok", r
    ma, mb = await _next_msg(a), await _next_msg(b)
    _msg_ok(ma, room, a.user, d3, r["id"])
    _msg_ok(mb, room, a.user, d3, r["id"])
    if "seq" in ma or "seq" in mb:
        assert ma.get("seq") == mb.get("seq"), (ma, mb)

    # room from B
    d4 = "plain string"
    r = await b.call("pub", ch=room, d=d4)
    assert r["t"] == "ok", r
    _msg_ok(await _next_msg(a), room, b.user, d4, r["id"])
    _msg_ok(await _next_msg(b), room, b.user, d4, r["id"])
    await a.close()
    await b.close()


ORDER_COMBOS = [("ws-json", "tcp"), ("tcp", "ws-bin"), ("ws-bin", "ws-json")]


@pytest.mark.parametrize("ka,kb", ORDER_COMBOS, ids=[f"{a}__{b}" for a, b in ORDER_COMBOS])
async def test_order_per_publisher_preserved(gateway, ka, kb):
    n = 200
    gw = gateway(EDGEGATE_SHARDS__COUNT=2)
    a, b = await pair_on_different_shards(gw, ka, kb)
    room = f"room:{new_user('ord')}"
    await a.sub(room)
    await b.sub(room)
    ids = [a.next_id() for _ in range(n)]
    # send in batches without waiting for answers
    for i in range(0, n, 20):
        await a.send_many([("pub", {"id": ids[k], "ch": room, "d": {"n": k}}) for k in range(i, min(n, i + 20))])

    async def collect(c, want_oks):
        got, oks = [], []
        while len(got) < n or len(oks) < want_oks:
            e = await c.recv(timeout=10)
            if e["t"] == "msg":
                got.append(e)
            elif e["t"] == "ok":
                oks.append(e["id"])
            else:
                raise AssertionError(f"unexpected {e}")
        return got, oks

    (ga, oks), (gb, _) = await asyncio.gather(collect(a, n), collect(b, 0))
    assert [m["d"]["n"] for m in gb] == list(range(n)), "receiver saw a different order"
    assert [m["d"]["n"] for m in ga] == list(range(n)), "publisher saw its own messages out of order"
    assert [m["id"] for m in gb] == ids
    assert sorted(oks) == sorted(ids)
    seqs = [m["seq"] for m in gb if "seq" in m]
    assert seqs == sorted(seqs)


@pytest.mark.parametrize("kj,kb", [("ws-json", "ws-bin"), ("ws-json", "tcp")])
async def test_binary_payload_between_json_and_binary_clients(gateway, kj, kb):
    gw = gateway(EDGEGATE_SHARDS__COUNT=2)
    j, b = await pair_on_different_shards(gw, kj, kb)
    blob = bytes(range(256)) + b"\x00\xff not json"

    # JSON client sends db (base64) -> binary client gets the raw bytes, bit 0x40 clear
    r = await j.call("pub", ch=f"user:{b.user}", raw=blob)
    assert r["t"] == "ok", r
    m = await _next_msg(b)
    assert m.get("raw") == blob, m
    assert not m["_bits"] & F_JSON, "opaque payload must not be flagged JSON"
    assert "d" not in m

    # binary client sends opaque bytes -> JSON client gets db
    r = await b.call("pub", ch=f"user:{j.user}", raw=blob[::-1])
    assert r["t"] == "ok", r
    m = await _next_msg(j)
    assert "db" in m and "d" not in m, m
    assert m["raw"] == blob[::-1]

    # binary client sends JSON text (bit 0x40) -> JSON client gets d
    r = await b.call("pub", ch=f"user:{j.user}", d={"json": [1, 2]})
    m = await _next_msg(j)
    assert m.get("d") == {"json": [1, 2]} and "db" not in m, m

    # JSON client's d -> binary client: bit 0x40 set, JSON text
    r = await j.call("pub", ch=f"user:{b.user}", d={"k": "v"})
    m = await _next_msg(b)
    assert m["_bits"] & F_JSON and m["d"] == {"k": "v"}, m


async def test_same_user_two_connections_both_get_direct(gateway):
    gw = gateway()
    u = new_user("multi")
    c1 = await session(gw, "ws-json", u)
    c2 = await session(gw, "tcp", u)
    s = await session(gw, "ws-bin")
    r = await s.call("pub", ch=f"user:{u}", d={"to": "both"})
    assert r["t"] == "ok"
    for c in (c1, c2):
        m = await _next_msg(c)
        assert m["d"] == {"to": "both"} and m["from"] == s.user


async def test_every_member_sees_one_order(gateway):
    """PROTOCOL §6: a publisher subscribed to the room receives its own
    message too, "so every member sees one order": with two publishers on
    different shards publishing concurrently, every member (publishers
    included) receives the room's messages in the same order."""
    n = 150
    gw = gateway(EDGEGATE_SHARDS__COUNT=2)
    p1, p2 = await pair_on_different_shards(gw, "ws-json", "tcp")
    others = [await session(gw, k) for k in ("ws-bin", "tcp", "ws-json", "tcp")]
    members = [p1, p2] + others
    assert len({m.shard for m in members}) == 2
    room = f"room:{new_user('one')}"
    for m in members:
        await m.sub(room)

    async def publish(p, tag):
        for i in range(0, n, 10):
            await p.send_many([("pub", {"id": p.next_id(), "ch": room, "d": f"{tag}{k}"})
                               for k in range(i, i + 10)])
            await asyncio.sleep(0)

    async def collect(m):
        got = []
        while len(got) < 2 * n:
            e = await m.recv(timeout=10)
            if e["t"] == "msg":
                got.append(e["d"])
        return got

    collectors = [asyncio.create_task(collect(m)) for m in members]
    await asyncio.gather(publish(p1, "a"), publish(p2, "b"))
    orders = await asyncio.gather(*collectors)
    for o in orders:   # per-publisher order always
        assert [x for x in o if x[0] == "a"] == [f"a{k}" for k in range(n)]
        assert [x for x in o if x[0] == "b"] == [f"b{k}" for k in range(n)]
    distinct = {tuple(o) for o in orders}
    first_diff = None
    if len(distinct) > 1:
        o0 = orders[0]
        for j, o in enumerate(orders[1:], 1):
            if o != o0:
                k = next(i for i, (x, y) in enumerate(zip(o0, o)) if x != y)
                first_diff = f"member 0 (shard {members[0].shard}) vs member {j} (shard {members[j].shard}) differ first at #{k}: {o0[k]} vs {o[k]}"
                break
    assert len(distinct) == 1, f"{len(distinct)} different orders among {len(members)} members; {first_diff}"
