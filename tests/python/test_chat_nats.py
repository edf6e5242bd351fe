"""Chat features (the contract's §8) across two gateways on a real NATS
backbone: presence is the cluster's (joins, leaves and queries cross-node,
the users of a SIGKILLed node leave within node_ttl_ms), ephemeral messages
reach the other node and are never stored, history pages come from
JetStream, and every welcome carries the user stream's position."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from helpers import msgs, new_user, session
from natshelp import PREFIX, NatsServer, nats_client, nats_env, require_backbone, wait_for

FLUSH_MS = 200
TTL_MS = 3000


@pytest.fixture(scope="module", autouse=True)
def _nats_backbone_available(tmp_path_factory):
    require_backbone(tmp_path_factory)


@pytest.fixture
def nats(tmp_path):
    s = NatsServer(tmp_path, "core").start()
    yield s
    s.stop()


@pytest.fixture
def js(tmp_path):
    s = NatsServer(tmp_path, "js", jetstream=True).start()
    yield s
    s.stop()


def two(gateway, url, **extra):
    env = dict(EDGEGATE_PRESENCE__FLUSH_MS=FLUSH_MS, EDGEGATE_PRESENCE__NODE_TTL_MS=TTL_MS, **extra)
    return (gateway(**nats_env(url, "gw-a", **env)), gateway(**nats_env(url, "gw-b", **env)))


async def members(c, ch, timeout=5.0):
    return await c.recv_until(lambda e: e["t"] == "members" and e.get("ch") == ch, timeout)


async def query(c, ch, **meta):
    r = await c.call("presence", ch=ch, **({"meta": meta} if meta else {}))
    assert r["t"] == "reply", r
    return r["d"]


async def test_presence_is_the_clusters(gateway, nats):
    a_gw, b_gw = two(gateway, nats.url)
    room = f"room:{new_user('cl')}"
    w = await session(a_gw, "ws-json")
    ok = await w.sub(room, meta={"presence": True})
    assert ok["meta"]["present"] == 1, ok
    # A join on node B reaches the watcher on node A.
    x = await session(b_gw, "tcp")
    await x.sub(room)
    m = await members(w, room)
    assert m["meta"] == {"present": 2, "join": [x.user], "leave": []}, m
    # A second connection of the same user, on node A, changes nothing.
    x2 = await session(a_gw, "ws-bin", x.user)
    await x2.sub(room)
    # A query on either node sees both (B keeps no view: it asks the cluster).
    both = {"total": 2, "users": sorted([w.user, x.user])}
    assert await query(w, room) == both
    y = await session(b_gw, "ws-json")
    assert await query(y, room) == both
    # A watcher on node B counts the users of both nodes.
    ok = await y.sub(room, meta={"presence": True})
    assert ok["meta"]["present"] == 3, ok     # w, x and y
    m = await members(w, room)
    assert m["meta"] == {"present": 3, "join": [y.user], "leave": []}, m
    # x leaves on B but is still on A: no leave; then everywhere: a leave on both nodes.
    await x.close()
    await asyncio.sleep(2 * FLUSH_MS / 1000 + 0.3)
    assert await query(y, room) == {"total": 3, "users": sorted([w.user, x.user, y.user])}
    await x2.call("unsub", ch=room)
    for c in (w, y):
        m = await members(c, room)
        assert m["meta"] == {"present": 2, "join": [], "leave": [x.user]}, m
    # Online anywhere, asked on the other node.
    assert await query(w, f"user:{y.user}") == {"total": 1, "users": [y.user]}
    assert await query(y, f"user:{w.user}") == {"total": 1, "users": [w.user]}
    assert await query(w, f"user:{new_user('nobody')}") == {"total": 0, "users": []}


async def test_a_killed_nodes_users_leave_within_node_ttl(gateway, nats):
    a_gw, b_gw = two(gateway, nats.url)
    room = f"room:{new_user('kill')}"
    w = await session(a_gw, "ws-json")
    await w.sub(room, meta={"presence": True})
    on_b = [await session(b_gw, "tcp") for _ in range(3)]
    for c in on_b:
        await c.sub(room)
    joined = set()
    while len(joined) < 3:
        m = await members(w, room)
        joined |= set(m["meta"]["join"])
    assert joined == {c.user for c in on_b}
    # Node B dies without a word.
    b_gw.expect_exit()
    t0 = asyncio.get_running_loop().time()
    b_gw.sigterm(signal.SIGKILL)
    b_gw.wait_exit(10)
    m = await members(w, room, timeout=TTL_MS / 1000 + 5)
    waited = asyncio.get_running_loop().time() - t0
    assert m["meta"] == {"present": 1, "join": [], "leave": sorted(c.user for c in on_b)}, m
    # node_ttl (the heartbeat is a third of it) plus a flush and the reaper's tick.
    assert waited <= TTL_MS / 1000 + TTL_MS / 3000 + 2 * FLUSH_MS / 1000 + 1.0, waited
    assert await query(w, room) == {"total": 1, "users": [w.user]}


async def test_ephemeral_messages_cross_nodes_on_core_nats(gateway, nats):
    a_gw, b_gw = two(gateway, nats.url)
    room = f"room:{new_user('ec')}"
    a = await session(a_gw, "ws-json")
    b = await session(b_gw, "tcp")
    await a.sub(room)
    await b.sub(room)
    async with nats_client(nats.url) as nc:
        seen = []

        async def got(m):
            seen.append(m)
        sub = await nc.subscribe(f"eg.room.{room[5:]}", cb=got)
        await nc.flush()    # the SUB is in place before the publish
        r = await a.call("pub", ch=room, d={"typing": True}, meta={"ephemeral": True})
        assert r["t"] == "ok" and "seq" not in r, r
        for c in (a, b):
            m = (await msgs(c, room, 1))[0]
            assert m["meta"] == {"ephemeral": True} and "seq" not in m and m["d"] == {"typing": True}
        # Core services see it on the room's subject, marked.
        await wait_for(lambda: seen, 3, what="the ephemeral message on NATS")
        assert seen[0].headers.get("Eg-Ephemeral") == "true", seen[0].headers
        await sub.unsubscribe()


async def test_history_pages_and_ephemeral_with_jetstream(gateway, js):
    env = dict(EDGEGATE_BACKBONE__NATS__HISTORY="jetstream")
    a_gw, b_gw = two(gateway, js.url, **env)
    room = f"room:{new_user('jsp')}"
    a = await session(a_gw, "ws-json")
    b = await session(b_gw, "ws-bin")
    assert a.welcome["meta"]["stream"]["epoch"], a.welcome
    assert set(a.welcome["meta"]["stream"]) == {"epoch", "seq"}
    ok = await b.sub(room)
    seqs = []
    for i in range(25):
        r = await a.call("pub", ch=room, d={"n": i})
        assert r["t"] == "ok", r
        seqs.append(r["seq"])
        if i == 10:
            e = await a.call("pub", ch=room, d={"typing": True}, meta={"ephemeral": True})
            assert e["t"] == "ok" and "seq" not in e, e
    got = await msgs(b, room, 26)
    eph = [m for m in got if "seq" not in m]
    assert len(eph) == 1 and eph[0]["meta"] == {"ephemeral": True}, eph
    assert [m["seq"] for m in got if "seq" in m] == seqs
    # Pages from the stream, read on the other node: the newest first page,
    # then older ones; never the ephemeral message.
    r = await b.call("history", ch=room, meta={"limit": 10})
    d = r["d"]
    assert [m["seq"] for m in d["messages"]] == seqs[-10:], d
    assert [m["d"]["n"] for m in d["messages"]] == list(range(15, 25))
    assert d["more"] is True and d["top"] == seqs[-1] and d["epoch"] == ok["meta"]["epoch"]
    r = await a.call("history", ch=room, meta={"limit": 10, "before": seqs[-10]})
    assert [m["seq"] for m in r["d"]["messages"]] == seqs[5:15] and r["d"]["more"] is True
    r = await a.call("history", ch=room, meta={"limit": 10, "before": seqs[5]})
    assert [m["seq"] for m in r["d"]["messages"]] == seqs[:5] and r["d"]["more"] is False
    assert all(m["from"] == a.user for m in r["d"]["messages"])
    # The user's own stream: its position in every welcome, its pages.
    r = await b.call("pub", ch=f"user:{a.user}", d="dm")
    a2 = await session(b_gw, "ws-json", a.user)
    assert a2.welcome["meta"]["stream"] == {
        "epoch": a.welcome["meta"]["stream"]["epoch"], "seq": r["seq"]}
    r2 = await a2.call("history", ch=f"user:{a.user}")
    assert [m["d"] for m in r2["d"]["messages"]] == ["dm"], r2


async def test_without_history_the_welcome_says_so_and_pages_are_unavailable(gateway, nats):
    a_gw, _ = two(gateway, nats.url)
    a = await session(a_gw, "ws-json")
    assert a.welcome["meta"]["stream"] == {"epoch": "", "seq": 0}
    r = await a.call("history", ch=f"room:{new_user('x')}")
    assert r["d"] == {"epoch": "", "top": 0, "messages": [], "more": False, "reason": "unavailable"}


def keeper(nodes: list[str], key: str) -> str:
    """The node that keeps `key`'s events: the highest FNV-1a 64 score of
    node + NUL + key (as the gateway computes it)."""
    def score(n: str) -> int:
        h = 0xcbf29ce484222325
        for b in n.encode() + b"\0" + key.encode():
            h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
        return h
    return max(nodes, key=lambda n: (score(n), n))


def kept_by(node: str, tag: str, kind: str) -> str:
    """A fresh id whose `kind:<id>` key gw-a / gw-b keep at `node`."""
    for i in range(1000):
        ident = f"{new_user(tag)}x{i}"
        if keeper(["gw-a", "gw-b"], f"{kind}:{ident}") == node:
            return ident
    raise AssertionError("no id found")


async def test_lifecycle_events_once_for_the_cluster(gateway, nats):
    """user.* and room.* are the cluster's transitions, each emitted once
    (by the key's keeper), whichever node the connections are on; a killed
    node's users leave through the keepers that survive it."""
    a_gw, b_gw = two(gateway, nats.url)
    room = f"room:{kept_by('gw-a', 'ev', 'room')}"
    u = kept_by("gw-a", "eu", "user")
    v = kept_by("gw-a", "ev", "user")
    async with nats_client(nats.url) as nc:
        events = []

        async def got(m):
            e = json.loads(m.data)
            if e.get("ch") == room or e.get("user") in (u, v):
                events.append((m.subject.split(".events.")[1], e))
        sub = await nc.subscribe(f"{PREFIX}.events.>", cb=got)
        await nc.flush()

        async def settle(n):
            await wait_for(lambda: len(events) >= n, timeout=10)
            await asyncio.sleep(3 * FLUSH_MS / 1000)   # and nothing more
            got_now = [(name, e.get("user") or e.get("ch"), e["node"]) for name, e in events]
            events.clear()
            return got_now

        # u on both nodes, in the room on both: online once, joins once.
        ua = await session(a_gw, "ws-json", u)
        ub = await session(b_gw, "tcp", u)
        await ua.sub(room)
        await ub.sub(room)
        got_now = await settle(3)
        assert [g[:2] for g in got_now] == [("user.online", u), ("room.occupied", room),
                                            ("room.join", u)], got_now
        assert got_now[0][2] == "gw-a", got_now   # u's first connection
        # v on node B joins.
        vb = await session(b_gw, "ws-bin", v)
        await vb.sub(room)
        assert await settle(2) == [("user.online", v, "gw-b"), ("room.join", v, "gw-b")]
        # u leaves node A: still on B, nothing; then B too.
        await ua.close()
        await asyncio.sleep(3 * FLUSH_MS / 1000)
        assert events == []
        await ub.close()
        got_now = await settle(2)
        assert sorted(got_now) == [("room.leave", u, "gw-b"), ("user.offline", u, "gw-b")], got_now
        # Node B dies with v: its users leave, once, through gw-a.
        b_gw.expect_exit()
        b_gw.sigterm(signal.SIGKILL)
        b_gw.wait_exit(10)
        got_now = await settle(3)
        assert sorted(got_now) == [("room.leave", v, "gw-b"), ("room.vacated", room, "gw-b"),
                                   ("user.offline", v, "gw-b")], got_now
        await sub.unsubscribe()
