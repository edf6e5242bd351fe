"""HTTP services, hooks, channel tokens and webhooks (docs/api.md) against
the real binary, with small HTTP services and a webhook receiver written
here on Python's stdlib."""

import asyncio
import json
import time

import jwt as pyjwt
import pytest

from apihelp import Server, json_answer, verify_signature
from conftest import free_port
from helpers import connect, msgs, new_user, pair_on_different_shards, session

SECRET = "0123456789abcdef0123456789abcdef"
WH_SECRET = "webhook-secret-0123"


def svc_env(name: str, url: str, **extra) -> dict:
    env = {f"EDGEGATE_SERVICES__{name.upper()}__URL": url,
           f"EDGEGATE_SERVICES__{name.upper()}__TIMEOUT_MS": "500"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def servers():
    started = []

    def make(handler, port=None):
        s = Server(handler, port).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


# ---------------------------------------------------------------- services


async def test_req_reaches_an_http_service(gateway, servers):
    def handler(path, h, body):
        if body == b'"fail"':
            return 200, {"Eg-Error": "forbidden"}, b""
        if body == b'"slow"':
            time.sleep(1.5)
            return json_answer("late")
        if body == b'"crash"':
            return 500, {}, b"oops"
        return json_answer({"echo": json.loads(body), "from": h.get("eg-from"), "conn": h.get("eg-conn"),
                            "node": h.get("eg-node"), "enc": h.get("eg-enc")})
    srv = servers(handler)
    gw = gateway(**svc_env("mod", srv.url, EDGEGATE_BACKBONE__NODE_ID="nsvc"))
    c = await session(gw, "ws-json", new_user("s"))
    r = await c.call("req", ch="svc:mod", d={"q": 1})
    assert r["t"] == "reply", r
    assert r["d"]["echo"] == {"q": 1} and r["d"]["from"] == c.user and r["d"]["node"] == "nsvc"
    assert r["d"]["enc"] == "json" and r["d"]["conn"] == c.welcome["meta"]["conn"]
    r = await c.call("req", ch="svc:mod", d="fail")
    assert r["t"] == "err" and r["code"] == "forbidden", r
    r = await c.call("req", ch="svc:mod", d="slow", timeout=5)
    assert r["t"] == "err" and r["code"] == "timeout", r
    r = await c.call("req", ch="svc:mod", d="crash")
    assert r["t"] == "err" and r["code"] == "internal", r
    # keep-alive: the pool reused connections (far fewer than calls)
    for i in range(20):
        assert (await c.call("req", ch="svc:mod", d=i))["t"] == "reply"
    # built-in echo still there; an unknown service is no_service
    assert (await c.call("req", ch="svc:echo", d=5))["d"] == 5
    assert (await c.call("req", ch="svc:nope", d=5))["code"] == "no_service"
    assert gw.metric("edgegate_service_calls_total", outcome="ok") >= 21


async def test_req_to_a_service_nobody_serves(gateway):
    port = free_port()
    gw = gateway(**svc_env("down", f"http://127.0.0.1:{port}/x"))
    c = await session(gw, "tcp")
    r = await c.call("req", ch="svc:down", d=1)
    assert r["t"] == "err" and r["code"] == "no_service", r


# ---------------------------------------------------------------- hooks


def hook_env(url, **hooks):
    env = svc_env("hooks", url)
    for k, v in hooks.items():
        env[f"EDGEGATE_HOOKS__{k.upper()}"] = str(v)
    return env


async def test_connect_hook(gateway, servers):
    def handler(path, h, body):
        b = json.loads(body)
        assert h.get("eg-hook") == "connect"
        if b["user"].startswith("banned"):
            return json_answer({"allow": False, "code": 4005, "reason": "banned here"})
        if b["user"].startswith("slow"):
            time.sleep(1.0)
        return json_answer({"allow": True})
    srv = servers(handler)
    gw = gateway(**hook_env(srv.url, connect="hooks", timeout_ms=300))
    c = await session(gw, "ws-json", new_user("ok"))
    assert c.welcome["meta"]["user"].startswith("ok")
    bodies = [json.loads(b) for _, _, b in srv.requests]
    assert bodies[-1]["user"] == c.user and bodies[-1]["conn"] == c.welcome["meta"]["conn"]
    b = await connect(gw, "ws-json")
    await b.send("hello", id=1, meta={"user": new_user("banned")})
    bye = await b.expect_bye(4005)
    assert bye["reason"] == "banned here"
    # timing out, on_error = deny: bye 4007 with retry_ms
    s = await connect(gw, "tcp")
    await s.send("hello", id=1, meta={"user": new_user("slow")})
    bye = await s.expect_bye(4007, timeout=5)
    assert bye["meta"]["retry_ms"] > 0
    assert gw.metric("edgegate_hook_calls_total", hook="connect", outcome="timed_out") == 1
    assert gw.metric("edgegate_hook_calls_total", hook="connect", outcome="refused") == 1


async def test_connect_hook_failure_allowed(gateway):
    port = free_port()  # nobody serves it
    gw = gateway(**hook_env(f"http://127.0.0.1:{port}/", connect="hooks", on_error="allow"))
    c = await session(gw, "ws-json")
    assert c.welcome["t"] == "welcome"
    assert gw.metric("edgegate_hook_calls_total", hook="connect", outcome="failed") == 1


async def test_subscribe_hook_and_its_cache(gateway, servers):
    def handler(path, h, body):
        b = json.loads(body)
        if b["ch"] == "room:secret":
            return json_answer({"allow": False, "reason": "members only"})
        if b["ch"] == "room:slow":
            time.sleep(1.0)
        return json_answer({"allow": True})
    srv = servers(handler)
    gw = gateway(**hook_env(srv.url, subscribe="hooks", subscribe_cache_ms=60000, timeout_ms=300))
    u = new_user("sub")
    c = await session(gw, "ws-json", u)
    assert (await c.call("sub", ch="room:open"))["t"] == "ok"
    r = await c.call("sub", ch="room:secret")
    assert r["t"] == "err" and r["code"] == "forbidden" and r["reason"] == "members only", r
    r = await c.call("sub", ch="room:slow", timeout=5)
    assert r["t"] == "err" and r["code"] == "timeout", r
    # user: channels are not asked
    n = len(srv.requests)
    assert (await c.call("sub", ch=f"user:{u}"))["t"] == "ok"
    assert len(srv.requests) == n
    # cached allow: the same user on the same shard is not asked again
    await c.call("unsub", ch="room:open")
    assert (await c.call("sub", ch="room:open"))["t"] == "ok"
    assert len(srv.requests) == n, "the allow was remembered"
    assert gw.metric("edgegate_hook_calls_total", hook="subscribe", outcome="cached") >= 1


async def test_publish_hook_allows_refuses_and_replaces(gateway, servers):
    def handler(path, h, body):
        b = json.loads(body)
        d = b.get("d")
        if d == "spam":
            return json_answer({"allow": False, "reason": "no spam"})
        if d == "slow":
            time.sleep(1.0)
        if isinstance(d, str) and "darn" in d:
            return json_answer({"allow": True, "d": d.replace("darn", "****")})
        return json_answer({"allow": True})
    srv = servers(handler)
    for on_error in ("deny", "allow"):
        gw = gateway(**hook_env(srv.url, publish="hooks", timeout_ms=300, on_error=on_error))
        c = await session(gw, "ws-json")
        room = f"room:{new_user('p')}"
        await c.sub(room)
        assert (await c.call("pub", ch=room, d="hello"))["t"] == "ok"
        assert (await msgs(c, room, 1))[0]["d"] == "hello"
        r = await c.call("pub", ch=room, d="spam")
        assert r["t"] == "err" and r["code"] == "forbidden" and r["reason"] == "no spam"
        assert (await c.call("pub", ch=room, d="oh darn"))["t"] == "ok"
        assert (await msgs(c, room, 1))[0]["d"] == "oh ****", "the hook's d replaced the payload"
        r = await c.call("pub", ch=room, d="slow", timeout=5)
        if on_error == "deny":
            assert r["t"] == "err" and r["code"] == "timeout", r
        else:
            assert r["t"] == "ok", r
            assert (await msgs(c, room, 1))[0]["d"] == "slow"
        body = json.loads(srv.requests[-1][2])
        assert body["ch"] == room and body["ephemeral"] is False and body["user"] == c.user


# ---------------------------------------------------------------- channel tokens


def tok(claims):
    return pyjwt.encode(claims, SECRET, algorithm="HS256")


async def test_channel_tokens(gateway):
    gw = gateway(EDGEGATE_AUTH__MODE="jwt", EDGEGATE_AUTH__SECRET=SECRET, EDGEGATE_ROOMS__POLICY="claims")
    now = int(time.time())
    c = await connect(gw, "ws-json")
    await c.send("hello", id=1, meta={"token": tok({"sub": "alice", "exp": now + 600, "rooms": []})})
    assert (await c.recv())["t"] == "welcome"
    r = await c.call("sub", ch="room:g1")
    assert r["code"] == "forbidden"
    cases = [
        ({"sub": "alice", "ch": "room:g1", "exp": now - 60}, "expired"),
        ({"sub": "bob", "ch": "room:g1", "exp": now + 60}, "another user"),
        ({"sub": "alice", "ch": "room:g2", "exp": now + 60}, "another channel"),
    ]
    for claims, why in cases:
        r = await c.call("sub", ch="room:g1", meta={"token": tok(claims)})
        assert r["t"] == "err" and r["code"] == "forbidden" and why in r["reason"], (claims, r)
    r = await c.call("sub", ch="room:g1", meta={"token": tok({"sub": "alice", "ch": "room:g1", "exp": now + 60})})
    assert r["t"] == "ok", r
    assert (await c.call("pub", ch="room:g1", d="in"))["t"] == "ok"
    assert (await msgs(c, "room:g1", 1))[0]["d"] == "in"


# ---------------------------------------------------------------- webhooks


def wh_env(url, **extra):
    env = {"EDGEGATE_WEBHOOKS__URL": url, "EDGEGATE_WEBHOOKS__SECRET": WH_SECRET}
    env.update({f"EDGEGATE_WEBHOOKS__{k.upper()}": str(v) for k, v in extra.items()})
    return env


def events_of(srv):
    out = []
    for _, h, body in srv.requests:
        assert verify_signature(WH_SECRET, body, h["eg-signature"]), "signature does not verify"
        out.extend(json.loads(body)["events"])
    return out


async def test_webhooks_user_online_offline_signed(gateway, servers):
    srv = servers(lambda p, h, b: (204, {}, b""))
    gw = gateway(**wh_env(srv.url), EDGEGATE_BACKBONE__NODE_ID="nwh")
    u = new_user("w")
    a = await session(gw, "ws-json", u)
    b = await session(gw, "tcp", u)
    await b.close()
    await a.close()
    for _ in range(100):
        evs = [e for e in events_of(srv) if e.get("user") == u]
        if len(evs) >= 2:
            break
        await asyncio.sleep(0.05)
    assert [e["event"] for e in evs] == ["user.online", "user.offline"], evs
    assert all(e["node"] == "nwh" and e["ts_ms"] > 0 for e in evs)
    assert gw.metric("edgegate_webhook_events_total", outcome="sent") >= 2


async def test_webhooks_room_events_once_per_room_transition(gateway, servers):
    """room.occupied / room.join / room.leave / room.vacated from the room's
    presence, with its users on both shards: a second connection of a
    present user, or one on the other shard, adds nothing."""
    srv = servers(lambda p, h, b: (204, {}, b""))
    gw = gateway(**wh_env(srv.url), EDGEGATE_BACKBONE__NODE_ID="nre")
    room = f"room:{new_user('re')}"
    a, b = await pair_on_different_shards(gw, "ws-json", "tcp")
    a2 = await session(gw, "ws-bin", a.user)
    for c in (a, b, a2):
        await c.sub(room)
    await a.close()            # a2 still holds a.user: no leave
    r = await b.call("unsub", ch=room)
    assert r["t"] == "ok", r
    await a2.close()

    def room_evs():
        return [(e["event"], e.get("user")) for e in events_of(srv) if e.get("ch") == room]

    want = [("room.occupied", None), ("room.join", a.user), ("room.join", b.user),
            ("room.leave", b.user), ("room.leave", a.user), ("room.vacated", None)]
    for _ in range(100):
        if len(room_evs()) >= len(want):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)   # nothing more comes
    got = room_evs()
    # The two shards' reports reach the room's owner in either order; the
    # room's own events frame them.
    assert got[0] == want[0] and got[-1] == want[-1], got
    assert sorted(got, key=str) == sorted(want, key=str), got
    assert all(e["node"] == "nre" for e in events_of(srv) if e.get("ch") == room)
    await b.close()


async def test_webhooks_retried_after_the_receiver_was_down(gateway, servers):
    port = free_port()
    gw = gateway(**wh_env(f"http://127.0.0.1:{port}/hook", retry_for_ms=20000))
    u = new_user("r")
    a = await session(gw, "ws-json", u)
    await asyncio.sleep(1.0)
    assert gw.metric("edgegate_webhook_events_total", outcome="retried") >= 1
    srv = servers(lambda p, h, b: (200, {}, b"ok"), port=port)
    await a.close()
    for _ in range(200):
        evs = [e["event"] for e in events_of(srv) if e.get("user") == u]
        if len(evs) >= 2:
            break
        await asyncio.sleep(0.05)
    assert evs == ["user.online", "user.offline"], evs
    assert gw.metric("edgegate_webhook_events_total", outcome="dropped") == 0


async def test_webhook_drops_are_counted(gateway):
    port = free_port()  # stays down
    gw = gateway(**wh_env(f"http://127.0.0.1:{port}/hook", queue=2, batch=1, retry_for_ms=60000))
    for _ in range(8):
        c = await session(gw, "tcp")
        await c.close()
    for _ in range(100):
        if gw.metric("edgegate_webhook_events_total", outcome="dropped") >= 5:
            break
        await asyncio.sleep(0.05)
    dropped = gw.metric("edgegate_webhook_events_total", outcome="dropped")
    assert dropped >= 5, dropped  # 16 events, 1 in flight + 2 queued
