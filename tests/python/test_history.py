"""Positions, history and recovery (the contract's §7, revision 2) on the
embedded backbone, with the independent Python client (egproto, written
from the contract): every rule, against the real binary."""

import asyncio
import random

import pytest

from helpers import KINDS, connect, msgs, new_user, no_message, session

ALL = pytest.mark.parametrize("kind", KINDS)


async def sub_pos(c, ch, since=None):
    """sub (with meta.since when given); returns the ok."""
    kw = {"meta": {"since": since}} if since is not None else {}
    ok = await c.call("sub", ch=ch, **kw)
    assert ok["t"] == "ok", ok
    return ok


async def publish(c, ch, n, start=0):
    """n pubs; returns their seqs (from the oks)."""
    seqs = []
    for i in range(n):
        ok = await c.call("pub", ch=ch, d={"n": start + i})
        assert ok["t"] == "ok" and isinstance(ok.get("seq"), int), ok
        seqs.append(ok["seq"])
    return seqs


@ALL
async def test_positions_on_pub_msg_and_sub(gateway, kind):
    gw = gateway()
    room = f"room:{new_user('pos')}"
    a = await session(gw, kind)
    ok = await sub_pos(a, room)
    assert ok["seq"] == 0 and ok["meta"]["epoch"], ok
    epoch = ok["meta"]["epoch"]
    seqs = await publish(a, room, 3)
    assert seqs == [1, 2, 3], "contiguous from 1 on the embedded backbone"
    got = await msgs(a, room, 3)
    assert [m["seq"] for m in got] == [1, 2, 3]
    b = await session(gw, kind)
    ok = await sub_pos(b, room)
    assert ok["seq"] == 3 and ok["meta"]["epoch"] == epoch, ok
    # Direct messages carry seq too (the user's own stream).
    r = await a.call("pub", ch=f"user:{b.user}", d="dm")
    assert r["t"] == "ok" and r["seq"] == 1, r
    m = await b.expect("msg")
    assert m["ch"] == f"user:{b.user}" and m["seq"] == 1, m


@ALL
async def test_exact_replay_then_live(gateway, kind):
    gw = gateway()
    room = f"room:{new_user('rep')}"
    p = await session(gw, kind)
    ok = await sub_pos(p, room)
    epoch = ok["meta"]["epoch"]
    await publish(p, room, 6)
    c = await session(gw, kind)
    ok = await sub_pos(c, room, {"seq": 2, "epoch": epoch})
    assert ok["seq"] == 6 and ok["meta"] == {"epoch": epoch, "recovered": True}, ok
    got = await msgs(c, room, 4)
    assert [m["seq"] for m in got] == [3, 4, 5, 6]
    assert [m["d"]["n"] for m in got] == [2, 3, 4, 5], "the very messages"
    await publish(p, room, 1, start=6)
    live = await msgs(c, room, 1)
    assert live[0]["seq"] == 7
    await no_message(c)


async def test_fifty_clients_recover_during_continuous_publishing(gateway):
    """Each recovering client sees every seq after its since exactly once,
    in order, with no gap between the replay and live traffic."""
    gw = gateway()
    room = f"room:{new_user('busy')}"
    pubr = await session(gw, "tcp")
    ok = await sub_pos(pubr, room)
    epoch = ok["meta"]["epoch"]
    total = 400
    published = []

    async def publisher():
        for i in range(total):
            r = await pubr.call("pub", ch=room, d={"n": i})
            assert r["t"] == "ok", r
            published.append(r["seq"])
            await asyncio.sleep(0.004)

    async def recoverer(k):
        await asyncio.sleep(random.uniform(0.05, 1.2))
        kind = KINDS[k % len(KINDS)]
        c = await session(gw, kind)
        top_known = published[-1] if published else 0
        since = max(0, top_known - random.randint(0, 40))
        ok = await sub_pos(c, room, {"seq": since, "epoch": epoch})
        assert ok["meta"].get("recovered") is True, ok
        seen = []
        while not seen or seen[-1] < total:
            env = await c.recv(10)
            if env["t"] == "msg" and env.get("ch") == room:
                seen.append(env["seq"])
        assert seen == list(range(since + 1, total + 1)), \
            f"client {k} since {since}: gaps/dups {sorted(set(range(since + 1, total + 1)) ^ set(seen))[:10]}"
        await c.close()

    await asyncio.gather(publisher(), *(recoverer(k) for k in range(50)))
    assert published == list(range(1, total + 1))
    assert gw.metric("edgegate_recoveries_total", outcome="recovered") >= 50


@ALL
async def test_wrong_epoch_is_epoch_changed(gateway, kind):
    gw = gateway()
    room = f"room:{new_user('ep')}"
    p = await session(gw, kind)
    await publish(p, room, 2)
    c = await session(gw, kind)
    ok = await sub_pos(c, room, {"seq": 1, "epoch": "not-this-one"})
    assert ok["meta"]["recovered"] is False and ok["meta"]["reason"] == "epoch_changed", ok
    assert ok["seq"] == 2
    await publish(p, room, 1, start=2)
    live = await msgs(c, room, 1)
    assert live[0]["seq"] == 3, "nothing replayed; live follows"


async def test_expired_reports_the_oldest_kept(gateway):
    gw = gateway(EDGEGATE_HISTORY__MAX_MESSAGES=5)
    room = f"room:{new_user('exp')}"
    p = await session(gw, "ws-json")
    epoch = (await sub_pos(p, room))["meta"]["epoch"]
    await publish(p, room, 10)
    c = await session(gw, "ws-json")
    ok = await sub_pos(c, room, {"seq": 2, "epoch": epoch})
    assert ok["meta"] == {"epoch": epoch, "recovered": False, "reason": "expired", "oldest": 6}, ok
    await no_message(c)
    # Within what is kept, it recovers.
    ok = await sub_pos(await session(gw, "tcp"), room, {"seq": 5, "epoch": epoch})
    assert ok["meta"]["recovered"] is True, ok


async def test_too_many_missed(gateway):
    gw = gateway(EDGEGATE_HISTORY__RECOVERY_LIMIT=3)
    room = f"room:{new_user('many')}"
    p = await session(gw, "tcp")
    epoch = (await sub_pos(p, room))["meta"]["epoch"]
    await publish(p, room, 5)
    c = await session(gw, "tcp")
    ok = await sub_pos(c, room, {"seq": 1, "epoch": epoch})
    assert ok["meta"]["recovered"] is False and ok["meta"]["reason"] == "too_many", ok
    await no_message(c)
    assert gw.metric("edgegate_recoveries_total", outcome="too_many") == 1


async def test_history_off_is_unavailable_and_messages_carry_no_seq(gateway):
    gw = gateway(EDGEGATE_HISTORY__ENABLED="false")
    room = f"room:{new_user('off')}"
    p = await session(gw, "ws-json")
    ok = await sub_pos(p, room)
    assert "seq" not in ok and "meta" not in ok, ok
    r = await p.call("pub", ch=room, d=1)
    assert r["t"] == "ok" and "seq" not in r, r
    m = await p.expect("msg")
    assert "seq" not in m, m
    ok = await sub_pos(await session(gw, "ws-json"), room, {"seq": 0})
    assert ok["meta"] == {"recovered": False, "reason": "unavailable"}, ok


@ALL
async def test_publish_dedupe_by_user_instance_and_id(gateway, kind):
    gw = gateway()
    room = f"room:{new_user('dd')}"
    watcher = await session(gw, kind)
    await sub_pos(watcher, room)
    user = new_user("dup")
    a = await connect(gw, kind)
    await a.hello(user, instance="tab-1")
    r1 = await a.call("pub", ch=room, d="once")
    assert r1["t"] == "ok" and "meta" not in r1, r1
    await a.close()
    # The same client instance reconnects and retries the same id.
    a2 = await connect(gw, kind)
    await a2.hello(user, instance="tab-1")
    await a2.send("pub", id=r1["id"], ch=room, d="once")
    r2 = await a2.expect("ok", id=r1["id"])
    assert r2["seq"] == r1["seq"] and r2["meta"] == {"duplicate": True}, r2
    # Another instance of the same user with the same id: a new message.
    b = await connect(gw, kind)
    await b.hello(user, instance="tab-2")
    await b.send("pub", id=r1["id"], ch=room, d="other device")
    r3 = await b.expect("ok", id=r1["id"])
    assert r3["seq"] == r1["seq"] + 1 and "meta" not in r3, r3
    # Another user with the same instance and id: a new message.
    o = await connect(gw, kind)
    await o.hello(new_user("oth"), instance="tab-1")
    await o.send("pub", id=r1["id"], ch=room, d="other user")
    r4 = await o.expect("ok", id=r1["id"])
    assert r4["seq"] == r1["seq"] + 2, r4
    got = await msgs(watcher, room, 3)
    assert [m["d"] for m in got] == ["once", "other device", "other user"], got
    await no_message(watcher)
    assert gw.metric("edgegate_history_duplicates_total") == 1


async def test_without_instance_ids_are_scoped_to_the_connection(gateway):
    gw = gateway()
    room = f"room:{new_user('scope')}"
    user = new_user("noinst")
    a = await session(gw, "tcp", user)
    r1 = await a.call("pub", ch=room, d=1)
    again = await connect(gw, "tcp")
    await again.hello(user)
    await again.send("pub", id=r1["id"], ch=room, d=1)
    r2 = await again.expect("ok", id=r1["id"])
    assert r2["seq"] == r1["seq"] + 1 and "meta" not in r2, "a new connection is a new scope"


@ALL
async def test_bad_instance_is_refused_at_hello(gateway, kind):
    gw = gateway()
    c = await connect(gw, kind)
    await c.send("hello", id=1, meta={"user": new_user(), "instance": "no spaces allowed"})
    bye = await c.expect_bye(4000)
    assert "instance" in bye.get("reason", ""), bye


@ALL
async def test_offline_direct_messages_after_welcome(gateway, kind):
    gw = gateway()
    bob = new_user("bob")
    b = await connect(gw, kind)
    w = await b.hello(bob, since={"seq": 0})
    stream = w["meta"]["stream"]
    assert stream["recovered"] is True and stream["seq"] == 0, w
    await b.close()
    alice = await session(gw, kind)
    for i in range(3):
        r = await alice.call("pub", ch=f"user:{bob}", d={"dm": i})
        assert r["t"] == "ok", r
    b2 = await connect(gw, kind)
    w = await b2.hello(bob, since={"seq": stream["seq"], "epoch": stream["epoch"]})
    assert w["meta"]["stream"] == {"epoch": stream["epoch"], "seq": 3, "recovered": True}, w
    got = await msgs(b2, f"user:{bob}", 3)
    assert [m["d"]["dm"] for m in got] == [0, 1, 2] and [m["seq"] for m in got] == [1, 2, 3]
    # Live direct messages follow.
    await alice.call("pub", ch=f"user:{bob}", d={"dm": 3})
    assert (await msgs(b2, f"user:{bob}", 1))[0]["seq"] == 4


async def test_embedded_restart_changes_every_epoch(gateway):
    gw = gateway()
    room = f"room:{new_user('rs')}"
    p = await session(gw, "ws-json")
    epoch = (await sub_pos(p, room))["meta"]["epoch"]
    await publish(p, room, 3)
    bob = new_user("rb")
    b = await connect(gw, "ws-json")
    own = (await b.hello(bob, since={"seq": 0}))["meta"]["stream"]
    await p.close()
    await b.close()
    gw.sigterm()
    await asyncio.get_running_loop().run_in_executor(None, gw.wait_exit, 15)
    gw.exit_expected = True
    gw2 = gateway(**{k: v for k, v in gw.env.items() if k.startswith("EDGEGATE_")})
    c = await session(gw2, "ws-json")
    ok = await sub_pos(c, room, {"seq": 3, "epoch": epoch})
    assert ok["meta"]["recovered"] is False and ok["meta"]["reason"] == "epoch_changed", \
        f"history is in memory: a restart must never claim recovery ({ok})"
    assert ok["meta"]["epoch"] != epoch
    b2 = await connect(gw2, "ws-json")
    w = await b2.hello(bob, since={"seq": own["seq"], "epoch": own["epoch"]})
    assert w["meta"]["stream"]["recovered"] is False and w["meta"]["stream"]["reason"] == "epoch_changed", w
    assert gw2.metric("edgegate_recoveries_total", outcome="epoch_changed") == 2


async def test_history_metrics(gateway):
    gw = gateway()
    room = f"room:{new_user('met')}"
    p = await session(gw, "tcp")
    await publish(p, room, 5)
    assert gw.metric("edgegate_history_bytes") > 0
    assert gw.metric("edgegate_history_channels") >= 1
