"""Chat features (the contract's §8, revision 3) on the embedded backbone
with two shards, with the independent Python client (egproto, written from
the contract): the user stream's position in every welcome, ephemeral
messages, presence (users spread over both shards) and history pages,
every rule and every refusal, against the real binary."""

import asyncio

import pytest

from helpers import (KINDS, connect, msgs, new_user, no_message, pair_on_different_shards, session,
                     wait_until)

ALL = pytest.mark.parametrize("kind", KINDS)
FLUSH_MS = 200
# Presence batches every 200 ms here; a batch is due within two of them.
BATCH_S = 2 * FLUSH_MS / 1000 + 1.0


def chat_gateway(gateway, **env):
    env.setdefault("EDGEGATE_PRESENCE__FLUSH_MS", FLUSH_MS)
    return gateway(**env)


async def members(c, ch, timeout=BATCH_S + 2):
    """The next members envelope of ``ch`` (other envelopes are skipped)."""
    return await c.recv_until(lambda e: e["t"] == "members" and e.get("ch") == ch, timeout)


async def no_members(c, ch, wait=BATCH_S):
    """Nothing but other envelopes for ``ch`` within ``wait``."""
    try:
        env = await c.recv_until(lambda e: e["t"] == "members" and e.get("ch") == ch, wait)
    except (asyncio.TimeoutError, TimeoutError):
        return
    raise AssertionError(f"unexpected members {env}")


async def query(c, ch, **meta):
    r = await c.call("presence", ch=ch, **({"meta": meta} if meta else {}))
    assert r["t"] == "reply", r
    return r["d"]


async def page(c, ch, **meta):
    r = await c.call("history", ch=ch, **({"meta": meta} if meta else {}))
    assert r["t"] == "reply", r
    return r["d"]


# ---------------------------------------------------------------- §8.1


@ALL
async def test_every_welcome_carries_the_own_streams_position(gateway, kind):
    gw = chat_gateway(gateway)
    before = gw.metric("edgegate_recoveries_total")
    alice = new_user("alice")
    a = await session(gw, kind, alice)
    stream = a.welcome["meta"]["stream"]
    assert stream["seq"] == 0 and isinstance(stream["epoch"], str) and stream["epoch"], stream
    assert set(stream) == {"epoch", "seq"}, f"no recovery fields without since: {stream}"
    # Two direct messages move the position; a new connection learns it.
    b = await session(gw, kind)
    for i in range(2):
        r = await b.call("pub", ch=f"user:{alice}", d={"n": i})
        assert r["t"] == "ok", r
    a2 = await session(gw, kind, alice)
    assert a2.welcome["meta"]["stream"] == {"epoch": stream["epoch"], "seq": 2}
    assert gw.metric("edgegate_recoveries_total") == before, "a hello without since is no recovery"
    # With since, the outcome is added (and counted).
    a3 = await connect(gw, kind)
    await a3.hello(alice, since={"seq": 1, "epoch": stream["epoch"]})
    assert a3.welcome["meta"]["stream"] == {"epoch": stream["epoch"], "seq": 2, "recovered": True}
    m = await a3.expect("msg")
    assert m["seq"] == 2 and m["d"] == {"n": 1}
    assert gw.metric("edgegate_recoveries_total", outcome="recovered") == 1


async def test_without_history_the_welcome_says_epoch_empty_seq_zero(gateway):
    gw = chat_gateway(gateway, EDGEGATE_HISTORY__ENABLED="false")
    a = await session(gw, "ws-json")
    assert a.welcome["meta"]["stream"] == {"epoch": "", "seq": 0}
    r = await a.call("history", ch=f"user:{a.user}")
    assert r["t"] == "reply" and r["d"] == {
        "epoch": "", "top": 0, "messages": [], "more": False, "reason": "unavailable"}, r


# ---------------------------------------------------------------- §8.2


@ALL
async def test_ephemeral_messages_reach_every_shard_and_are_never_stored(gateway, kind):
    gw = chat_gateway(gateway)
    room = f"room:{new_user('eph')}"
    a, b = await pair_on_different_shards(gw, kind, kind)
    ok = await a.sub(room)
    await b.sub(room)
    top = ok["seq"]
    r = await a.call("pub", ch=room, d={"typing": True}, meta={"ephemeral": True})
    assert r["t"] == "ok" and "seq" not in r, f"an ephemeral ok has no seq: {r}"
    for c in (a, b):  # the publisher too: it is subscribed
        m = (await msgs(c, room, 1))[0]
        assert m.get("meta") == {"ephemeral": True} and "seq" not in m, m
        assert m["d"] == {"typing": True} and m["from"] == a.user
    # Not deduplicated: the same id again is delivered again.
    for _ in range(2):
        await a.send("pub", id=777, ch=room, d="same", meta={"ephemeral": True})
    got = await msgs(b, room, 2)
    assert [m["d"] for m in got] == ["same", "same"]
    # Not in the stream: the next stored message takes the next seq...
    r = await a.call("pub", ch=room, d="stored")
    assert r["seq"] == top + 1, r
    # ...no history page holds them, and no recovery replays them.
    p = await page(b, room)
    assert [m["d"] for m in p["messages"]] == ["stored"], p
    c = await session(gw, kind)
    ok = await c.sub(room, meta={"since": {"seq": 0, "epoch": ok["meta"]["epoch"]}})
    assert ok["meta"]["recovered"] is True
    replay = await msgs(c, room, 1)
    assert replay[0]["d"] == "stored"
    await no_message(c)


async def test_ephemeral_direct_messages(gateway):
    gw = chat_gateway(gateway)
    a, b = await pair_on_different_shards(gw, "ws-json", "tcp")
    r = await a.call("pub", ch=f"user:{b.user}", d={"read": 5}, meta={"ephemeral": True})
    assert r["t"] == "ok" and "seq" not in r
    m = await b.expect("msg")
    assert m["meta"] == {"ephemeral": True} and "seq" not in m and m["d"] == {"read": 5}
    # The user's stream did not move.
    b2 = await session(gw, "ws-json", b.user)
    assert b2.welcome["meta"]["stream"]["seq"] == 0


async def test_ephemeral_messages_are_dropped_for_a_subscriber_that_is_behind(gateway):
    """A subscriber that stops reading loses ephemeral messages (counted)
    and is not closed; stored messages past the queue bound close it 4003."""
    gw = chat_gateway(gateway, EDGEGATE_LIMITS__OUTBOUND_QUEUE_BYTES=262144,
                      EDGEGATE_LIMITS__CONN_MSGS_PER_S=100000,
                      EDGEGATE_LIMITS__CONN_MSGS_BURST=100000,
                      EDGEGATE_LIMITS__CONN_BYTES_PER_S=1000000000,
                      EDGEGATE_LIMITS__CONN_BYTES_BURST=1000000000)
    room = f"room:{new_user('slow')}"
    slow = await session(gw, "tcp")
    await slow.sub(room)
    pub = await session(gw, "tcp")
    blob = "x" * 8000
    # About 16 MB: far past the kernel's socket buffers and the queue bound.
    for burst in range(40):
        await pub.send_many([("pub", {"id": 100000 + burst * 50 + i, "ch": room, "d": blob,
                                      "meta": {"ephemeral": True}}) for i in range(50)])
        await asyncio.sleep(0.01)
    await wait_until(lambda: gw.metric("edgegate_ephemeral_dropped_total") > 0, 10,
                     what="ephemeral drops")
    assert gw.metric("edgegate_closes_total", code="4003") == 0, "ephemeral never causes a 4003"
    # The slow subscriber is still there: it reads again and gets a stored message.
    r = await pub.call("pub", ch=room, d="after", timeout=20)
    assert r["t"] == "ok", r
    m = await slow.recv_until(lambda e: e["t"] == "msg" and e.get("d") == "after", 30)
    assert m.get("seq") == r["seq"], (m, r)


# ---------------------------------------------------------------- §8.3


@ALL
async def test_presence_join_and_leave_across_shards(gateway, kind):
    gw = chat_gateway(gateway)
    room = f"room:{new_user('pres')}"
    w, x = await pair_on_different_shards(gw, kind, kind)   # the watcher, and a user on the other shard
    ok = await w.sub(room, meta={"presence": True})
    assert ok["meta"]["present"] == 1, f"the watcher counts itself: {ok}"
    # A user on the other shard joins: one members batch with the join.
    await x.sub(room)
    m = await members(w, room)
    assert m["meta"] == {"present": 2, "join": [x.user], "leave": []}, m
    assert "seq" not in m
    # A second connection of the same user, elsewhere, changes nothing.
    x2 = await session(gw, kind, x.user)
    await x2.sub(room)
    await no_members(w, room)
    q = await query(w, room)
    assert q == {"total": 2, "users": sorted([w.user, x.user])}, q
    # Leaving with one connection left: still present.
    await x.close()
    await no_members(w, room)
    # The last connection leaves: a leave.
    r = await x2.call("unsub", ch=room)
    assert r["t"] == "ok"
    m = await members(w, room)
    assert m["meta"] == {"present": 1, "join": [], "leave": [x.user]}, m


async def test_members_hold_net_changes_and_big_rooms_get_the_count_only(gateway):
    gw = chat_gateway(gateway, EDGEGATE_PRESENCE__FLUSH_MS=1000, EDGEGATE_PRESENCE__DIFF_LIMIT=3)
    room = f"room:{new_user('net')}"
    w = await session(gw, "ws-json")
    await w.sub(room, meta={"presence": True})
    # Joined and left within one batch: in neither list.
    flicker = await session(gw, "tcp")
    await flicker.sub(room)
    await flicker.call("unsub", ch=room)
    stay = await session(gw, "tcp")
    await stay.sub(room)
    m = await members(w, room, timeout=4)
    assert m["meta"] == {"present": 2, "join": [stay.user], "leave": []}, m
    # More present than diff_limit: the count only.
    others = [await session(gw, "tcp") for _ in range(3)]
    for o in others:
        await o.sub(room)
    m = await members(w, room, timeout=4)
    assert m["meta"] == {"present": 5}, m
    await wait_until(lambda: gw.metric("edgegate_members_suppressed_total") >= 1, 3)
    assert gw.metric("edgegate_members_sent_total") >= 2


async def test_presence_queries_page_in_byte_order(gateway):
    gw = chat_gateway(gateway)
    room = f"room:{new_user('q')}"
    tag = new_user("")
    names = [f"{p}{tag}" for p in ("carol", "Bob", "alice", "dave", "_eve")]
    conns = [await session(gw, ("tcp", "ws-json")[i % 2], n) for i, n in enumerate(names)]
    for c in conns:
        await c.sub(room)
    asker = await session(gw, "ws-bin")    # no subscription needed
    want = sorted(names)                    # byte order: upper case, then _, then lower
    got, after = [], None
    while True:
        d = await query(asker, room, limit=2, **({"after": after} if after else {}))
        assert d["total"] == 5, d
        got += d["users"]
        if "next" not in d:
            assert len(d["users"]) <= 2
            break
        assert d["next"] == d["users"][-1] and len(d["users"]) == 2, d
        after = d["next"]
    assert got == want
    assert await query(asker, room) == {"total": 5, "users": want}
    assert await query(asker, f"room:{new_user('empty')}") == {"total": 0, "users": []}
    # Online anywhere, whichever shard holds the user.
    for c in conns[:2]:
        assert await query(asker, f"user:{c.user}") == {"total": 1, "users": [c.user]}
    assert await query(asker, f"user:{new_user('nobody')}") == {"total": 0, "users": []}
    await conns[0].close()
    await wait_until(lambda: True, 0.1)
    await asyncio.sleep(0.2)
    assert await query(asker, f"user:{conns[0].user}") == {"total": 0, "users": []}
    d = await query(asker, room)
    assert d["total"] == 4 and conns[0].user not in d["users"]


# ---------------------------------------------------------------- §8.4


@ALL
async def test_history_pages_newest_before_oldest_first(gateway, kind):
    gw = chat_gateway(gateway, EDGEGATE_HISTORY__MAX_MESSAGES=30)
    room = f"room:{new_user('hist')}"
    p = await session(gw, kind)
    for i in range(40):
        r = await p.call("pub", ch=room, d={"n": i})
        assert r["seq"] == i + 1
    p.received.clear()
    reader = await session(gw, kind)       # opening the room: no subscription needed
    d = await page(reader, room, limit=10)
    assert d["top"] == 40 and d["more"] is True and d["epoch"], d
    assert [m["seq"] for m in d["messages"]] == list(range(31, 41))
    assert [m["d"]["n"] for m in d["messages"]] == list(range(30, 40))
    assert all(m["from"] == p.user for m in d["messages"])
    d2 = await page(reader, room, limit=10, before=31)
    assert [m["seq"] for m in d2["messages"]] == list(range(21, 31)) and d2["more"] is True
    d3 = await page(reader, room, limit=10, before=21)
    # 30 kept (11..=40): the last page holds 11..=20 and says no more.
    assert [m["seq"] for m in d3["messages"]] == list(range(11, 21)) and d3["more"] is False
    d4 = await page(reader, room)            # default limit 50: all 30
    assert len(d4["messages"]) == 30 and d4["more"] is False
    assert d4["epoch"] == d["epoch"]
    # The own stream; binary payloads come as db.
    r = await p.call("pub", ch=f"user:{reader.user}", raw=b"\x00\x01\x02")
    assert r["t"] == "ok"
    d = await page(reader, f"user:{reader.user}")
    assert len(d["messages"]) == 1 and d["top"] == 1
    assert d["messages"][0] == {"seq": 1, "from": p.user, "db": "AAEC"}, d


# ---------------------------------------------------------------- refusals


@ALL
async def test_bad_input_gets_the_protocols_answer_and_changes_nothing(gateway, kind):
    gw = chat_gateway(gateway)
    room = f"room:{new_user('bad')}"
    a = await session(gw, kind)
    ok = await a.sub(room, meta={"presence": True})
    assert ok["meta"]["present"] == 1
    bad = [
        ("presence", {"limit": 0}), ("presence", {"limit": -1}), ("presence", {"limit": 1001}),
        ("presence", {"limit": 2.5}), ("presence", {"limit": "10"}), ("presence", {"after": 7}),
        ("history", {"limit": 0}), ("history", {"limit": -5}), ("history", {"limit": 201}),
        ("history", {"limit": "3"}), ("history", {"before": -1}), ("history", {"before": "9"}),
        ("history", {"before": 1.5}),
    ]
    for t, meta in bad:
        r = await a.call(t, ch=room, meta=meta)
        assert r["t"] == "err" and r["code"] == "bad_request", (t, meta, r)
    for t in ("presence", "history"):
        r = await a.call(t, ch="svc:echo")
        assert r["t"] == "err" and r["code"] == "bad_channel", r
        r = await a.call(t, ch="foo:x")
        assert r["t"] == "err" and r["code"] == "bad_channel", r
    r = await a.call("history", ch=f"user:{new_user('other')}")
    assert r["t"] == "err" and r["code"] == "forbidden", r
    r = await a.call("pub", ch="svc:echo", d=1, meta={"ephemeral": True})
    assert r["t"] == "err" and r["code"] == "bad_request", r
    r = await a.call("pub", ch=room, d=1, meta={"ephemeral": "yes"})
    assert r["t"] == "err" and r["code"] == "bad_request", r
    r = await a.call("sub", ch=f"user:{a.user}", meta={"presence": True})
    assert r["t"] == "err" and r["code"] == "bad_request", r
    # Nothing changed: the room's stream, its presence, the session.
    d = await page(a, room)
    assert d["messages"] == [] and d["top"] == 0, d
    assert await query(a, room) == {"total": 1, "users": [a.user]}
    r = await a.call("pub", ch=room, d="fine")
    assert r["t"] == "ok" and r["seq"] == 1


async def test_presence_off_refuses_presence_and_tracks_nothing(gateway):
    gw = chat_gateway(gateway, EDGEGATE_PRESENCE__ENABLED="false")
    room = f"room:{new_user('off')}"
    a = await session(gw, "ws-json")
    r = await a.call("sub", ch=room, meta={"presence": True})
    assert r["t"] == "err" and r["code"] == "bad_request", r
    await a.sub(room)
    r = await a.call("presence", ch=room)
    assert r["t"] == "err" and r["code"] == "bad_request", r
    assert gw.metric("edgegate_presence_entries") == 0
