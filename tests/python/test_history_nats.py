"""Positions, history and recovery (the contract's §7) over NATS JetStream
(issue 11): gateways with ``[backbone.nats] history = "jetstream"`` on a real
nats-server with JetStream (one node, and a three-node cluster with replicas 3
where failures are the point), the independent Python client (egproto) for
clients and nats-py as the core service.

With JetStream, ``seq`` is the stream-wide sequence: a channel's messages are
not numbered 1, 2, 3, so these tests compare against the ``seq`` each ``ok``
reported, never against counting.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest

from conftest import BIN, make_env
from helpers import KINDS, connect, msgs, new_user, no_message, session
from natshelp import (PREFIX, NatsCluster, NatsServer, require_backbone, nats_client,
                      nats_env, wait_for)

ALL = pytest.mark.parametrize("kind", KINDS)


@pytest.fixture(scope="module", autouse=True)
def _nats_backbone_available(tmp_path_factory):
    require_backbone(tmp_path_factory)


@pytest.fixture
def js_server(tmp_path):
    """One nats-server with JetStream; request it before ``gateway``."""
    s = NatsServer(tmp_path, "js", jetstream=True).start()
    yield s
    s.stop()


def js_env(urls, node_id: str, **extra) -> dict:
    return nats_env(urls, node_id, EDGEGATE_BACKBONE__NATS__HISTORY="jetstream", **extra)


async def sub_pos(c, ch, since=None):
    kw = {"meta": {"since": since}} if since is not None else {}
    ok = await c.call("sub", ch=ch, **kw)
    assert ok["t"] == "ok", ok
    return ok


async def publish(c, ch, n, start=0, retry_for: float = 0.0):
    """n pubs; their seqs from the oks. With ``retry_for``, a publish refused
    (backbone_unavailable during a failover) is sent again with the same id."""
    seqs = []
    for i in range(n):
        deadline = time.monotonic() + retry_for
        pid = c.next_id()
        while True:
            ok = await call_with_id(c, pid, "pub", ch=ch, d={"n": start + i})
            if ok["t"] == "ok" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert ok["t"] == "ok" and isinstance(ok.get("seq"), int), ok
        seqs.append(ok["seq"])
    return seqs


async def call_with_id(c, pid, t, timeout=10.0, **kw):
    """Like egproto's call, with the id given (a retry keeps its id, so the
    stream drops it if the first try was stored after all)."""
    await c.send(t, id=pid, **kw)
    skipped = []
    try:
        while True:
            env = await c.recv(timeout)
            if env["t"] in ("ok", "err") and env.get("id") == pid:
                return env
            skipped.append(env)
    finally:
        c._pending[0:0] = skipped


async def hsession(gw, kind, user=None, **meta):
    """A session whose hello carries ``meta`` (instance, since)."""
    c = await connect(gw, kind)
    await c.hello(user or new_user(), **meta)
    return c


@ALL
async def test_positions_replay_and_live_over_jetstream(js_server, gateway, kind):
    gw = gateway(**js_env(js_server.url, "a"))
    room = f"room:{new_user('js')}"
    a = await session(gw, kind)
    ok = await sub_pos(a, room)
    epoch = ok["meta"]["epoch"]
    assert epoch.startswith("EG@") and isinstance(ok["seq"], int), ok
    seqs = await publish(a, room, 4)
    assert seqs == sorted(seqs) and seqs[0] > ok["seq"], seqs
    got = await msgs(a, room, 4)
    assert [m["seq"] for m in got] == seqs, "every msg carries the seq its ok reported"
    assert [m["d"]["n"] for m in got] == [0, 1, 2, 3]
    # Another client recovers what came after the first message.
    b = await session(gw, kind)
    ok_b = await sub_pos(b, room, {"seq": seqs[0], "epoch": epoch})
    assert ok_b["meta"] == {"epoch": epoch, "recovered": True}, ok_b
    assert ok_b["seq"] >= seqs[-1]
    replay = await msgs(b, room, 3)
    assert [m["seq"] for m in replay] == seqs[1:]
    assert [m["d"]["n"] for m in replay] == [1, 2, 3], "the very messages"
    more = await publish(a, room, 1, start=4)
    live = await msgs(b, room, 1)
    assert live[0]["seq"] == more[0]
    await no_message(b)
    assert gw.metric("edgegate_recoveries_total", outcome="recovered") >= 1


async def test_refusals_are_typed(js_server, gateway):
    gw = gateway(**js_env(js_server.url, "a",
                          EDGEGATE_BACKBONE__NATS__MAX_MSGS_PER_SUBJECT=5,
                          EDGEGATE_HISTORY__RECOVERY_LIMIT=3))
    room = f"room:{new_user('ref')}"
    p = await session(gw, "ws-json")
    epoch = (await sub_pos(p, room))["meta"]["epoch"]
    seqs = await publish(p, room, 8)
    await msgs(p, room, 8)
    c = await session(gw, "tcp")
    # Only the last 5 are kept: a position before them is expired.
    ok = await sub_pos(c, room, {"seq": seqs[1], "epoch": epoch})
    assert ok["meta"] == {"epoch": epoch, "recovered": False, "reason": "expired",
                          "oldest": seqs[3]}, ok
    await no_message(c)
    # Within what is kept, but more than the recovery limit (3).
    c2 = await session(gw, "ws-bin")
    ok = await sub_pos(c2, room, {"seq": seqs[3], "epoch": epoch})
    assert ok["meta"]["recovered"] is False and ok["meta"]["reason"] == "too_many", ok
    # Within the limit: recovered.
    c3 = await session(gw, "ws-json")
    ok = await sub_pos(c3, room, {"seq": seqs[5], "epoch": epoch})
    assert ok["meta"]["recovered"] is True, ok
    assert [m["seq"] for m in await msgs(c3, room, 2)] == seqs[6:]
    # Another epoch, and a position ahead of the stream.
    c4 = await session(gw, "ws-json")
    ok = await sub_pos(c4, room, {"seq": seqs[5], "epoch": "EG@another"})
    assert ok["meta"]["reason"] == "epoch_changed", ok
    c5 = await session(gw, "ws-json")
    ok = await sub_pos(c5, room, {"seq": seqs[-1] + 10_000, "epoch": epoch})
    assert ok["meta"]["reason"] == "epoch_changed", ok


async def test_a_position_on_an_empty_channel_recovers_what_came_after(js_server, gateway):
    gw = gateway(**js_env(js_server.url, "a"))
    room = f"room:{new_user('empty')}"
    c = await session(gw, "ws-json")
    ok = await sub_pos(c, room)
    pos = {"seq": ok["seq"], "epoch": ok["meta"]["epoch"]}
    await c.close()
    p = await session(gw, "tcp")
    seqs = await publish(p, room, 3)
    c = await session(gw, "ws-json")
    ok = await sub_pos(c, room, pos)
    assert ok["meta"]["recovered"] is True, ok
    assert [m["seq"] for m in await msgs(c, room, 3)] == seqs


async def test_offline_direct_messages_recover_with_hello_since(js_server, gateway):
    gw = gateway(**js_env(js_server.url, "a"))
    bob = new_user("bob")
    b = await hsession(gw, "ws-json", bob, since={"seq": 0, "epoch": ""})
    stream = b.welcome["meta"]["stream"]
    await b.close()
    a = await session(gw, "tcp")
    seqs = await publish(a, f"user:{bob}", 2)
    b = await hsession(gw, "ws-bin", bob, since={"seq": stream["seq"], "epoch": stream["epoch"]})
    st = b.welcome["meta"]["stream"]
    assert st["recovered"] is True and st["epoch"] == stream["epoch"], st
    assert [m["seq"] for m in await msgs(b, f"user:{bob}", 2)] == seqs


async def test_a_retried_publish_is_dropped_by_the_stream(js_server, gateway):
    gw = gateway(**js_env(js_server.url, "a"))
    room = f"room:{new_user('dup')}"
    watcher = await session(gw, "ws-json")
    await sub_pos(watcher, room)
    user = new_user("al")
    a = await hsession(gw, "tcp", user, instance="tab-1")
    first = await a.call("pub", ch=room, d={"text": "once"})
    assert first["t"] == "ok" and "meta" not in first, first
    await a.close()
    # The client reconnects and resends what it had no ok for, same id.
    a2 = await hsession(gw, "ws-json", user, instance="tab-1")
    await a2.send("pub", id=first["id"], ch=room, d={"text": "once"})
    again = await a2.expect("ok")
    assert again["seq"] == first["seq"] and again["meta"] == {"duplicate": True}, again
    got = await msgs(watcher, room, 1)
    assert got[0]["seq"] == first["seq"]
    await no_message(watcher, 0.5)


async def test_core_service_publishes_carry_seq(js_server, gateway):
    gw = gateway(**js_env(js_server.url, "a"))
    room_id = new_user("svc")
    c = await session(gw, "ws-json")
    top = (await sub_pos(c, f"room:{room_id}"))["seq"]
    async with nats_client(js_server.url) as nc:
        # A plain core-NATS publish to the room's subject: the stream stores
        # it and republishes it with its sequence.
        await nc.publish(f"{PREFIX}.room.{room_id}", json.dumps({"text": "from svc"}).encode())
        await nc.flush()
    m = await c.expect("msg")
    assert m["from"] == "svc" and m["d"] == {"text": "from svc"}, m
    assert isinstance(m.get("seq"), int) and m["seq"] > top, m


async def test_a_client_moving_between_gateways_recovers_exactly_what_it_missed(js_server, gateway):
    ga = gateway(**js_env(js_server.url, "ga"))
    gb = gateway(**js_env(js_server.url, "gb"))
    room = f"room:{new_user('move')}"
    user = new_user("mover")
    c = await session(ga, "ws-json", user)
    ok = await sub_pos(c, room)
    epoch = ok["meta"]["epoch"]
    p = await session(gb, "tcp")
    first = await publish(p, room, 3)
    seen = await msgs(c, room, 3)
    assert [m["seq"] for m in seen] == first
    await c.close()
    missed = await publish(p, room, 5, start=3)
    # Back, on the other gateway, from the last seq it had.
    c = await session(gb, "ws-bin", user)
    ok = await sub_pos(c, room, {"seq": seen[-1]["seq"], "epoch": epoch})
    assert ok["meta"] == {"epoch": epoch, "recovered": True}, ok
    got = await msgs(c, room, 5)
    assert [m["seq"] for m in got] == missed
    assert [m["d"]["n"] for m in got] == [3, 4, 5, 6, 7]
    live = await publish(p, room, 1, start=8)
    assert [m["seq"] for m in await msgs(c, room, 1)] == live
    await no_message(c)


async def test_a_recovery_during_a_nats_outage_waits_for_nats(js_server, gateway):
    """A client comes back and asks to recover while the gateway's NATS
    server is down: the gateway cannot read the stream, so it keeps trying
    (bounded), and the client gets its replay once NATS is back — not
    ``recovered: false``, ``unavailable`` for a failover of a few seconds."""
    gw = gateway(**js_env(js_server.url, "a"))
    room = f"room:{new_user('wait')}"
    user = new_user("back")
    keeper = await session(gw, "tcp", user)  # the user's channel stays live
    c = await session(gw, "ws-json", user)
    ok = await sub_pos(c, room)
    epoch = ok["meta"]["epoch"]
    p = await session(gw, "tcp")
    await publish(p, room, 2)
    seen = await msgs(c, room, 2)
    await c.close()
    missed = await publish(p, room, 3, start=2)
    js_server.kill()
    await wait_for(lambda: gw.metric("edgegate_backbone_up") == 0, 10, what="NATS lost")

    async def come_back():
        c2 = await session(gw, "ws-json", user)
        return c2, await sub_pos(c2, room, {"seq": seen[-1]["seq"], "epoch": epoch})

    back = asyncio.create_task(come_back())
    await asyncio.sleep(1.5)
    assert not back.done(), "the recovery waits for NATS"
    js_server.start()
    c2, ok = await asyncio.wait_for(back, 40)
    assert ok["meta"] == {"epoch": epoch, "recovered": True}, ok
    got = await msgs(c2, room, 3, timeout=20)
    assert [m["seq"] for m in got] == missed
    await keeper.close()


def _start_error(env: dict, workdir) -> str:
    r = subprocess.run([str(BIN), "run"], env=make_env(**env), capture_output=True,
                       timeout=60, cwd=workdir)
    assert r.returncode != 0, f"gateway started: {r.stderr.decode()[-800:]}"
    return r.stderr.decode("utf-8", "replace")


async def test_a_conflicting_stream_is_a_start_error(js_server, tmp_path):
    from nats.js.api import StreamConfig
    async with nats_client(js_server.url) as nc:
        await nc.jetstream().add_stream(StreamConfig(name="EG", subjects=["orders.>"]))
    err = _start_error(js_env(js_server.url, "x"), tmp_path)
    assert "backbone.nats.stream" in err and "orders.>" in err, err[-800:]


async def test_a_nats_without_jetstream_is_a_start_error(tmp_path):
    ns = NatsServer(tmp_path, "plain").start()
    try:
        err = _start_error(js_env(ns.url, "x"), tmp_path)
        assert "JetStream is not enabled" in err, err[-800:]
    finally:
        ns.stop()


async def test_history_off_keeps_core_nats(js_server, gateway):
    """history = "off" on the same server: no stream is made, no seq."""
    gw = gateway(**nats_env(js_server.url, "off"))
    room = f"room:{new_user('off')}"
    c = await session(gw, "ws-json")
    ok = await sub_pos(c, room, {"seq": 1})
    assert "seq" not in ok and ok["meta"]["reason"] == "unavailable", ok
    r = await c.call("pub", ch=room, d=1)
    assert r["t"] == "ok" and "seq" not in r, r
    m = await c.expect("msg")
    assert "seq" not in m
    async with nats_client(js_server.url) as nc:
        names = await nc.jetstream().streams_info()
        assert names == [], "history off makes no stream"


# --------------------------------------------------------------------------
# a three-node JetStream cluster, replicas 3


@pytest.fixture
def js_cluster(tmp_path):
    # no_advertise: a gateway given one node's URL stays on it (the test
    # decides which node's death it lives through).
    c = NatsCluster(tmp_path, 3, jetstream=True, no_advertise=True).start()
    yield c
    c.stop()


def split_gateways(cluster, gateway, **env):
    """Gateway A on the cluster's first node only, B on the other two
    (replicas 3): killing the first node cuts A off and leaves B running."""
    n0, n1, n2 = cluster.nodes
    env["EDGEGATE_BACKBONE__NATS__REPLICAS"] = 3
    ga = gateway(_wait_ready=False, **js_env(n0.url, "ga", **env))
    gb = gateway(_wait_ready=False, **js_env([n1.url, n2.url], "gb", **env))
    ga.wait_ready(60)
    gb.wait_ready(60)
    return ga, gb


async def across(sub_gw, pub_gw, tag):
    """A room, a WebSocket member of it on ``sub_gw`` and a TCP publisher on
    ``pub_gw``."""
    room = f"room:{new_user(tag)}"
    sub = await session(sub_gw, "ws-json")
    await sub_pos(sub, room)
    return room, sub, await session(pub_gw, "tcp")


async def test_a_gap_on_the_live_subject_is_healed_from_the_stream(js_cluster, gateway):
    """Gateway A's only NATS server is killed while messages keep flowing
    through the others (gateway B): they are stored (2 of 3 replicas), A
    misses their live copies; when its server is back, A reads them from
    the stream and its subscriber gets every one, in order, no gap — and A
    counts the healed gap. The room is at its per-subject bound (7) when A
    fills, and another room's message sits between what A delivered and
    what it missed: stream-wide seqs skip, and the room still keeps what A
    delivered last, so nothing A missed was deleted (this was taken for
    "expired" and closed the room's members with 4009)."""
    n0 = js_cluster.nodes[0]
    ga, gb = split_gateways(js_cluster, gateway,
                            EDGEGATE_BACKBONE__NATS__MAX_MSGS_PER_SUBJECT=7)
    room, sub, p = await across(ga, gb, "heal")
    before = await publish(p, room, 2, retry_for=20)
    assert [m["seq"] for m in await msgs(sub, room, 2)] == before
    n0.kill()
    await wait_for(lambda: ga.metric("edgegate_backbone_up") == 0, 10, what="A lost NATS")
    await publish(p, f"room:{new_user('other')}", 1, retry_for=30)
    missed = await publish(p, room, 5, start=2, retry_for=30)
    assert ga.metric("edgegate_backbone_up") == 0, "A must miss them live"
    n0.start()
    after = await publish(p, room, 1, start=7, retry_for=30)
    got = await msgs(sub, room, 6, timeout=30)
    assert [m["seq"] for m in got] == missed + after, "no gap, no duplicate, in order"
    assert [m["d"]["n"] for m in got] == [2, 3, 4, 5, 6, 7]
    await wait_for(lambda: ga.metric("edgegate_backbone_gaps_healed_total") >= 1, 10,
                   what="a healed gap counted")
    assert ga.metric("edgegate_backbone_healed_messages_total") >= 5
    assert ga.metric("edgegate_backbone_gaps_unhealed_total") == 0


async def test_a_connections_publishes_keep_their_order_through_its_nats_servers_death(
        js_cluster, gateway):
    """A client pipelines publishes on gateway A while A's only NATS server
    is SIGKILLed and started again. The publish on the wire is sent again
    by A with the same Nats-Msg-Id once A is back, the ones behind it wait
    (one publish of a connection at a time with the stream), and the room
    holds them in the client's order: no err, no gap, no inversion. Before,
    a publish lost with the server was refused while later ones were
    stored, so the client's retry landed after them."""
    n0 = js_cluster.nodes[0]
    ga, gb = split_gateways(js_cluster, gateway)
    room, sub, p = await across(gb, ga, "order")
    await publish(p, room, 1, start=-1, retry_for=20)  # the stream is there for A
    await msgs(sub, room, 1)
    n, first = 150, 1_000
    answers: dict[int, dict] = {}
    errs = []

    async def send():
        for i in range(n):
            await p.send("pub", id=first + i, ch=room, d={"n": i})
            if i == 30:
                n0.kill()
            if i == 90:
                n0.start()
            await asyncio.sleep(0.01)

    async def read():
        # A naive client: a refused publish is sent again at once.
        while len([a for a in answers.values() if a["t"] == "ok"]) < n:
            env = await p.recv(40)
            pid = env.get("id")
            if env["t"] == "err" and pid is not None:
                errs.append(env)
                assert len(errs) < 1_000, errs[-1]
                await asyncio.sleep(0.05)
                await p.send("pub", id=pid, ch=room, d={"n": pid - first})
            elif env["t"] == "ok" and pid is not None:
                answers[pid] = env

    await asyncio.gather(send(), read())
    got = await msgs(sub, room, n, timeout=40)
    assert [m["d"]["n"] for m in got] == list(range(n)), (
        f"the room's order is not the publisher's ({len(errs)} errs: {errs[:3]})")
    seqs = [answers[first + i]["seq"] for i in range(n)]
    assert seqs == sorted(seqs) and [m["seq"] for m in got] == seqs
    assert errs == [], "an outage shorter than the retry time costs latency, not an err"
    assert ga.metric("edgegate_backbone_publish_retries_total") >= 1
    await no_message(sub, 0.3)


async def test_a_restarted_gateway_never_reuses_a_connection_scoped_publish_id(js_server, gateway):
    """Without hello.meta.instance, publish ids are scoped to the connection
    (Nats-Msg-Id = user:conn:id). A restarted node must not name a new
    connection like an old one: the stream would drop the new client's
    first messages as retries (seen by the benchmark before the fix)."""
    user = new_user("re")
    room = f"room:{new_user('re')}"
    gw = gateway(**js_env(js_server.url, "same-node"))
    a = await session(gw, "tcp", user)
    first = await a.call("pub", ch=room, d={"run": 1})
    assert first["t"] == "ok", first
    conn1 = a.welcome["meta"]["conn"]
    await a.close()
    gw.expect_exit()
    gw.sigterm()
    assert gw.wait_exit(15) == 0
    gw2 = gateway(**js_env(js_server.url, "same-node"))
    w = await session(gw2, "ws-json")
    await sub_pos(w, room)
    b = await session(gw2, "tcp", user)
    assert b.welcome["meta"]["conn"] != conn1
    await b.send("pub", id=first["id"], ch=room, d={"run": 2})
    again = await b.expect("ok")
    assert "meta" not in again and again["seq"] > first["seq"], again
    got = await msgs(w, room, 1)
    assert got[0]["d"] == {"run": 2}
