"""The server API, HTTP services, hooks and events across two gateways on a
real nats-server: a call on either node acts on the cluster (disconnect
closes the user on every node and counts per node, info lists every node),
hooks reach NATS services written with nats-py, and lifecycle events are
published on P.events.<event> and the control subjects answer."""

from __future__ import annotations

import asyncio
import json

import pytest

from apihelp import Api, Server, api_env, json_answer
from helpers import msgs, new_user, session
from natshelp import PREFIX, NatsServer, nats_client, nats_env, require_backbone


@pytest.fixture(scope="module", autouse=True)
def _nats_backbone_available(tmp_path_factory):
    require_backbone(tmp_path_factory)


@pytest.fixture
def nats_server(tmp_path):
    s = NatsServer(tmp_path, "n").start()
    yield s
    s.stop()


def two(gateway, url, **extra):
    ga = gateway(**nats_env(url, "a", **api_env(), **extra))
    gb = gateway(**nats_env(url, "b", **api_env(), **extra))
    return ga, gb


async def call(api, method, body):
    return await asyncio.to_thread(api.call, method, body)


async def test_api_methods_across_two_nodes(nats_server, gateway):
    ga, gb = two(gateway, nats_server.url)
    api_a, api_b = Api(ga), Api(gb)
    room = f"room:{new_user('r')}"
    ca = await session(ga, "ws-json")
    cb = await session(gb, "tcp")
    await ca.sub(room)
    await cb.sub(room)
    # publish on node a reaches subscribers on both nodes
    st, r = await call(api_a, "publish", {"ch": room, "data": {"n": 1}, "from": "bot"})
    assert st == 200, r
    for c in (ca, cb):
        m = (await msgs(c, room, 1))[0]
        assert m["d"] == {"n": 1} and m["from"] == "bot"
    # ephemeral from node b reaches both, no seq
    st, r = await call(api_b, "publish", {"ch": room, "data": "typing", "ephemeral": True})
    assert st == 200 and r == {}, r
    for c in (ca, cb):
        m = await c.recv_until(lambda e: e["t"] == "msg" and e.get("d") == "typing")
        assert "seq" not in m and m["meta"]["ephemeral"] is True
    # broadcast from node b
    st, r = await call(api_b, "broadcast", {"channels": [room, f"user:{ca.user}"], "data": 2})
    assert st == 200 and all("error" not in x for x in r["results"]), r
    assert (await msgs(cb, room, 1))[0]["d"] == 2
    # info from either node lists both
    for api in (api_a, api_b):
        st, r = await call(api, "info", {})
        assert st == 200 and [n["node"] for n in r["nodes"]] == ["a", "b"], r
    # disconnect from node a closes the user's connections on both nodes
    u = new_user("k")
    on_a = await session(ga, "ws-json", u)
    on_b = [await session(gb, "ws-json", u), await session(gb, "tcp", u)]
    st, r = await call(api_a, "disconnect", {"user": u, "code": 4003, "reason": "moved"})
    assert st == 200 and r["closed"] == 3, r
    per = {n["node"]: n["closed"] for n in r["nodes"]}
    assert per == {"a": 1, "b": 2}, r
    for c in [on_a, *on_b]:
        bye = await c.expect_bye(4003)
        assert bye["reason"] == "moved"
    api_a.close()
    api_b.close()


async def test_control_subjects_and_events_on_nats(nats_server, gateway):
    ga, gb = two(gateway, nats_server.url)
    async with nats_client(nats_server.url) as nc:
        events = []

        def collect(into, subject=False):
            async def cb(m):
                v = json.loads(m.data)
                into.append((m.subject, v) if subject else v)
            return cb

        sub = await nc.subscribe(f"{PREFIX}.events.>", cb=collect(events, subject=True))
        await nc.flush()
        u = new_user("e")
        c = await session(gb, "ws-json", u)
        # a core service kicks with a code and gets each node's count
        inbox = nc.new_inbox()
        answers = []
        s2 = await nc.subscribe(inbox, cb=collect(answers))
        await nc.publish(f"{PREFIX}.ctl.kick.{u}", json.dumps({"code": 4001, "reason": "bye now"}).encode(), reply=inbox)
        await c.expect_bye(4001)
        for _ in range(50):
            if len(answers) >= 2:
                break
            await asyncio.sleep(0.05)
        assert sorted((a["node"], a["closed"]) for a in answers) == [("a", 0), ("b", 1)], answers
        # The user is offline on the cluster before connecting to the other
        # node: its connection there must not race the news of the kick (a
        # user back before the kick's count reached the keeper was never
        # offline, rightly, and would have no offline/online pair to check).
        for _ in range(100):
            if any(e.get("user") == u and e["event"] == "user.offline" for _, e in events):
                break
            await asyncio.sleep(0.05)
        # the plain kick of §4 still closes with 4005
        c = await session(ga, "tcp", u)
        await nc.publish(f"{PREFIX}.ctl.kick.{u}", b"")
        await c.expect_bye(4005)
        # info on the control subject
        replies = []
        s3 = await nc.subscribe(inbox + ".i", cb=collect(replies))
        await nc.publish(f"{PREFIX}.ctl.info", b"", reply=inbox + ".i")
        for _ in range(50):
            if len(replies) >= 2:
                break
            await asyncio.sleep(0.05)
        assert sorted(r["node"] for r in replies) == ["a", "b"]
        for _ in range(50):
            mine = [e for s, e in events if e.get("user") == u]
            if len(mine) >= 4:
                break
            await asyncio.sleep(0.05)
        # the cluster's transitions, each naming the node of the connection
        assert [(e["event"], e["node"]) for e in mine] == [
            ("user.online", "b"), ("user.offline", "b"), ("user.online", "a"), ("user.offline", "a")], mine
        assert all(s == f"{PREFIX}.events.{e['event']}" for s, e in events)
        for x in (sub, s2, s3):
            await x.unsubscribe()


async def test_hooks_and_services_on_nats(nats_server, gateway, tmp_path):
    http_svc = Server(lambda p, h, b: json_answer({"http": True})).start()
    try:
        env = {"EDGEGATE_HOOKS__PUBLISH": "modnats", "EDGEGATE_HOOKS__TIMEOUT_MS": "1000",
               "EDGEGATE_SERVICES__ECHO__URL": http_svc.url}
        ga = gateway(**nats_env(nats_server.url, "a", **env))
        async with nats_client(nats_server.url) as nc:
            async def hook(m):
                b = json.loads(m.data)
                ans = {"allow": b["d"] != "no", "reason": "nope"}
                if b["d"] == "swap":
                    ans["d"] = "swapped"
                await m.respond(json.dumps(ans).encode())
            s = await nc.subscribe(f"{PREFIX}.svc.modnats", cb=hook)
            await nc.flush()
            c = await session(ga, "ws-json")
            room = f"room:{new_user('h')}"
            await c.sub(room)
            assert (await c.call("pub", ch=room, d="swap"))["t"] == "ok"
            assert (await msgs(c, room, 1))[0]["d"] == "swapped"
            r = await c.call("pub", ch=room, d="no")
            assert r["t"] == "err" and r["code"] == "forbidden" and r["reason"] == "nope"
            # An HTTP service of a name wins over P.svc.<name>.
            r = await c.call("req", ch="svc:echo", d=1)
            assert r["t"] == "reply" and r["d"] == {"http": True}, r
            await s.unsubscribe()
    finally:
        http_svc.stop()


async def test_webhooks_on_nats(nats_server, gateway):
    from apihelp import verify_signature
    got = []
    srv = Server(lambda p, h, b: (got.append((h, b)), (204, {}, b""))[1]).start()
    try:
        secret = "webhook-secret-on-nats"
        ga = gateway(**nats_env(nats_server.url, "a", EDGEGATE_WEBHOOKS__URL=srv.url,
                                EDGEGATE_WEBHOOKS__SECRET=secret))
        u = new_user("wn")
        c = await session(ga, "tcp", u)
        await c.close()
        for _ in range(100):
            evs = [e for h, b in got for e in json.loads(b)["events"] if e.get("user") == u]
            if len(evs) >= 2:
                break
            await asyncio.sleep(0.05)
        assert [(e["event"], e["node"]) for e in evs] == [("user.online", "a"), ("user.offline", "a")], evs
        assert all(verify_signature(secret, b, h["eg-signature"]) for h, b in got)
    finally:
        srv.stop()


async def test_presence_and_channels_are_the_clusters(nats_server, gateway):
    ga, gb = two(gateway, nats_server.url)
    api_a = Api(ga)
    tag = new_user("cq")
    room, other = f"room:{tag}-a", f"room:{tag}-b"
    on_a = await session(ga, "ws-json")
    on_b = await session(gb, "tcp")
    both = await session(gb, "ws-bin", on_a.user)       # the same user on both nodes
    for c in (on_a, on_b, both):
        await c.sub(room)
    await on_b.sub(other)
    st, r = await call(api_a, "presence", {"ch": room})
    assert st == 200 and r == {"total": 2, "users": sorted([on_a.user, on_b.user])}, r
    st, r = await call(api_a, "presence", {"ch": f"user:{on_b.user}"})
    assert r == {"total": 1, "users": [on_b.user]}, r
    st, r = await call(api_a, "channels", {"prefix": f"room:{tag}"})
    assert st == 200 and r == {"channels": [{"ch": room, "users": 2}, {"ch": other, "users": 1}]}, r
    st, r = await call(api_a, "history", {"ch": room})
    assert st == 200 and r["reason"] == "unavailable", r   # no JetStream here
    api_a.close()


async def test_history_pages_from_jetstream_through_the_api(tmp_path, gateway):
    js = NatsServer(tmp_path, "js", jetstream=True).start()
    try:
        ga, gb = two(gateway, js.url, EDGEGATE_BACKBONE__NATS__HISTORY="jetstream")
        room = f"room:{new_user('jh')}"
        c = await session(gb, "ws-json")
        seqs = []
        for i in range(6):
            ok = await c.call("pub", ch=room, d={"n": i})
            seqs.append(ok["seq"])
        api_a = Api(ga)
        st, r = await call(api_a, "history", {"ch": room, "limit": 4})
        assert st == 200 and [m["seq"] for m in r["messages"]] == seqs[2:] and r["more"] is True, r
        assert [m["d"]["n"] for m in r["messages"]] == [2, 3, 4, 5]
        api_a.close()
    finally:
        js.stop()
