"""The server API (docs/api.md) on the embedded backbone, against the real
binary with stdlib http.client: every method, auth, body and channel
refusals, limits, keep-alive, slow clients, and the OpenAPI document
checked against what the server accepts."""

import asyncio
import json
import socket
import time

from apihelp import KEY, Api, api_env, b64
from conftest import free_port
from helpers import msgs, new_user, pair_on_different_shards, session


async def call(api, method, body):
    return await asyncio.to_thread(api.call, method, body)


async def test_publish_reaches_subscribers_like_a_client_pub(gateway):
    gw = gateway(**api_env())
    api = Api(gw)
    a, b = await pair_on_different_shards(gw, "ws-json", "tcp")
    room = f"room:{new_user('r')}"
    await a.sub(room)
    await b.sub(room)
    st, r = await call(api, "publish", {"ch": room, "data": {"text": "hi"}})
    assert st == 200, r
    assert r["seq"] == 1 and r["epoch"], r
    for c in (a, b):
        m = (await msgs(c, room, 1))[0]
        assert m["d"] == {"text": "hi"} and m["from"] == "svc" and m["seq"] == 1
    # from, binary payload, a user: channel
    st, r = await call(api, "publish", {"ch": f"user:{b.user}", "b64data": b64(b"\x00\x01"), "from": "bot-1"})
    assert st == 200 and r["seq"] >= 1, r
    m = (await msgs(b, f"user:{b.user}", 1))[0]
    assert m["from"] == "bot-1"
    # idempotency: the same key answers the first seq, delivered once
    body = {"ch": room, "data": 2, "idempotency_key": "order-17"}
    st1, r1 = await call(api, "publish", body)
    st2, r2 = await call(api, "publish", body)
    assert st1 == st2 == 200 and r1["seq"] == r2["seq"] == 2 and r2.get("duplicate") is True, (r1, r2)
    got = await msgs(a, room, 1)
    assert got[0]["d"] == 2
    st, r = await call(api, "publish", {"ch": room, "data": 3})
    assert r["seq"] == 3 and (await msgs(a, room, 1))[0]["d"] == 3, "the duplicate was not delivered again"
    # ephemeral: delivered, never stored (no seq anywhere)
    st, r = await call(api, "publish", {"ch": room, "data": "typing", "ephemeral": True})
    assert st == 200 and r == {}, r
    for c in (a, b):
        m = await c.recv_until(lambda e: e["t"] == "msg" and e.get("d") == "typing")
        assert "seq" not in m and m["meta"]["ephemeral"] is True, m
    st, r = await call(api, "publish", {"ch": room, "data": 4})
    assert r["seq"] == 4, "the ephemeral message took no seq"
    st, r = await call(api, "publish", {"ch": room, "data": 1, "ephemeral": True, "idempotency_key": "k"})
    assert st == 400
    api.close()


async def test_broadcast_answers_in_order(gateway):
    gw = gateway(**api_env())
    api = Api(gw)
    c = await session(gw, "ws-json")
    rooms = [f"room:{new_user('b')}" for _ in range(3)]
    for r in rooms:
        await c.sub(r)
    st, r = await call(api, "broadcast", {"channels": [rooms[0], "room:bad id", rooms[1], "svc:x", rooms[2]], "data": "x"})
    assert st == 200, r
    res = r["results"]
    assert [("seq" in x, x.get("error", {}).get("code")) for x in res] == [
        (True, None), (False, "bad_channel"), (True, None), (False, "bad_channel"), (True, None)], res
    got = set()
    while len(got) < 3:
        m = await c.recv(5)
        if m["t"] == "msg":
            got.add(m["ch"])
    assert got == set(rooms)
    st, r = await call(api, "broadcast", {"channels": [], "data": 1})
    assert st == 400
    api.close()


async def test_disconnect_closes_every_connection_of_the_user(gateway):
    gw = gateway(**api_env())
    api = Api(gw)
    user = new_user("k")
    conns = [await session(gw, kind, user) for kind in ("ws-json", "tcp", "ws-bin")]
    other = await session(gw, "ws-json")
    st, r = await call(api, "disconnect", {"user": user, "code": 4001, "reason": "banned", "retry_ms": 7000})
    assert st == 200 and r["closed"] == 3, r
    for c in conns:
        bye = await c.expect_bye(4001)
        assert bye.get("reason") == "banned" and bye["meta"]["retry_ms"] == 7000, bye
    # Another user's connection stays.
    r = await other.call("sub", ch=f"room:{new_user('still')}")
    assert r["t"] == "ok"
    st, r = await call(api, "disconnect", {"user": user})
    assert st == 200 and r["closed"] == 0
    # default: 4005 kicked
    c = await session(gw, "ws-json", user)
    st, r = await call(api, "disconnect", {"user": user})
    assert r["closed"] == 1
    await c.expect_bye(4005)
    for bad in ({"user": "a b"}, {"user": user, "code": 3000}, {"user": user, "reason": "x" * 200}, {}):
        st, r = await call(api, "disconnect", bad)
        assert st == 400, (bad, r)
    api.close()


async def test_info_counts_connections_and_users(gateway):
    gw = gateway(**api_env(EDGEGATE_BACKBONE__NODE_ID="n-info"))
    api = Api(gw)
    u = new_user("i")
    cs = [await session(gw, "ws-json", u), await session(gw, "tcp", u), await session(gw, "ws-json")]
    for _ in range(50):
        st, r = await call(api, "info", {})
        if r["nodes"][0]["users"] == 2:
            break
        await asyncio.sleep(0.05)
    assert st == 200, r
    (n,) = r["nodes"]
    assert n["node"] == "n-info" and n["connections"] == 3 and n["users"] == 2, n
    assert n["version"] and n["uptime_s"] >= 0
    for c in cs:
        await c.close()
    api.close()


async def test_refusals(gateway):
    gw = gateway(**api_env(EDGEGATE_API__MAX_BODY_BYTES=2048))
    ok = {"ch": "room:x", "data": 1}
    st, r = await asyncio.to_thread(Api(gw, key=None).call, "publish", ok)
    assert st == 401 and r["error"]["code"] == "unauthorized"
    st, r = await asyncio.to_thread(Api(gw, key="wrong-key-0123456789").call, "publish", ok)
    assert st == 401
    api = Api(gw)
    for body, code in [
        ({"ch": "room:x"}, "bad_request"),
        ({"ch": "room:x", "data": 1, "b64data": "AA=="}, "bad_request"),
        ({"ch": "room:x", "data": 1, "nope": 1}, "bad_request"),
        ({"ch": 5, "data": 1}, "bad_request"),
        ({"ch": "room:a b", "data": 1}, "bad_channel"),
        ({"ch": "svc:echo", "data": 1}, "bad_channel"),
        ({"ch": "foo:x", "data": 1}, "bad_channel"),
        ({"ch": "room:x", "data": 1, "from": "a b"}, "bad_request"),
        ({"ch": "room:x", "data": 1, "idempotency_key": "has space"}, "bad_request"),
    ]:
        st, r = await call(api, "publish", body)
        assert st == 400 and r["error"]["code"] == code, (body, st, r)
    st, r = await asyncio.to_thread(api.raw, "POST", "/api/publish", b"{not json")
    assert st == 400
    st, r = await call(api, "nope", {})
    assert st == 404 and r["error"]["code"] == "not_found"
    st, r = await asyncio.to_thread(api.raw, "GET", "/api/publish")
    assert st == 405
    st, r = await call(api, "publish", {"ch": "room:x", "data": "x" * 4000})
    assert st == 413 and r["error"]["code"] == "too_large"
    # The connection was closed after the 413 (its body was not read): a
    # new one works.
    api = Api(gw)
    st, r = await call(api, "publish", ok)
    assert st == 200
    api.close()
    text = gw.metrics()
    errs = sum(v for n, lab, v in text if n == "edgegate_api_errors_total" and lab.get("method") == "publish")
    reqs = sum(v for n, lab, v in text if n == "edgegate_api_requests_total" and lab.get("method") == "publish")
    assert errs >= 12 and reqs >= errs + 1, (errs, reqs)
    assert any(n == "edgegate_api_latency_seconds_bucket" for n, _, _ in text)


async def test_keep_alive_and_slow_clients_never_delay_others(gateway):
    gw = gateway(**api_env())
    port = int(gw.env["EDGEGATE_API__LISTEN"].rsplit(":", 1)[1])
    # Idle connections and ones that trickle a request head.
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for s in slow:
        s.sendall(b"POST /api/publish HTTP/1.1\r\nHost: x\r\n")
    api = Api(gw)
    t0 = time.monotonic()
    for i in range(200):
        st, r = await call(api, "publish", {"ch": "room:ka", "data": i})
        assert st == 200, r
    took = time.monotonic() - t0
    assert took < 10, f"200 keep-alive publishes took {took:.1f} s"
    assert api.conn.sock is not None, "the connection was kept alive"
    for s in idle + slow:
        s.close()
    api.close()


async def test_openapi_document_matches_what_the_server_accepts(gateway):
    gw = gateway(**api_env())
    api = Api(gw)
    st, doc = await asyncio.to_thread(api.raw, "GET", "/api/openapi.json")
    assert st == 200 and doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    methods = [p.removeprefix("/api/") for p in doc["paths"]]
    assert set(methods) == {"publish", "broadcast", "disconnect", "info", "presence", "history",
                            "channels"}
    wrong = {"string": 12345, "integer": "x", "array": "x", "object": [], "boolean": "x"}
    for m in methods:
        ref = doc["paths"][f"/api/{m}"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = schemas[ref.rsplit("/", 1)[1]]
        example = schema["example"]
        st, r = await call(api, m, example)
        assert st == 200, (m, example, st, r)
        # additionalProperties: false
        st, r = await call(api, m, {**example, "surplus": 1})
        assert st == 400, (m, r)
        # each property with a type, given another type
        for prop, ps in schema["properties"].items():
            if "type" in ps:
                st, r = await call(api, m, {**example, prop: wrong[ps["type"]]})
                assert st == 400, (m, prop, r)
        # each required property left out
        for prop in schema.get("required", []):
            body = {k: v for k, v in example.items() if k != prop}
            st, r = await call(api, m, body)
            assert st == 400, (m, prop, r)
    # A method the document does not name is not served.
    for m in ("kick", "openapi", "members"):
        st, r = await call(api, m, {})
        assert st == 404, (m, r)
    api.close()


async def test_presence_history_and_channels(gateway):
    """The chat features' queries for core services: who is in a room (and
    whether a user is online), a page of history, the rooms with someone
    present; every refusal."""
    gw = gateway(**api_env())
    api = Api(gw)
    tag = new_user("q")
    rooms = [f"room:{tag}-{i}" for i in range(3)]
    users = [await session(gw, ("ws-json", "tcp")[i % 2], f"{tag}u{i}") for i in range(4)]
    for i, c in enumerate(users):
        for r in rooms[: i % 3 + 1]:
            await c.sub(r)
    # presence: rooms[0] has all four, rooms[2] only users[2]
    st, r = await call(api, "presence", {"ch": rooms[0]})
    assert st == 200 and r == {"total": 4, "users": sorted(c.user for c in users)}, r
    st, r = await call(api, "presence", {"ch": rooms[0], "limit": 3})
    assert st == 200 and len(r["users"]) == 3 and r["next"] == r["users"][-1], r
    st, r2 = await call(api, "presence", {"ch": rooms[0], "after": r["next"]})
    assert r2 == {"total": 4, "users": [sorted(c.user for c in users)[3]]}, r2
    st, r = await call(api, "presence", {"ch": f"user:{users[1].user}"})
    assert r == {"total": 1, "users": [users[1].user]}, r
    st, r = await call(api, "presence", {"ch": f"user:{tag}nobody"})
    assert r == {"total": 0, "users": []}, r
    # history: what clients published, oldest first
    for i in range(5):
        ok = await users[0].call("pub", ch=rooms[1], d={"n": i})
        assert ok["t"] == "ok"
    st, r = await call(api, "history", {"ch": rooms[1], "limit": 3})
    assert st == 200 and [m["d"]["n"] for m in r["messages"]] == [2, 3, 4] and r["more"] is True, r
    assert r["top"] == 5 and r["epoch"] and r["messages"][0]["from"] == users[0].user
    st, r = await call(api, "history", {"ch": rooms[1], "before": 3})
    assert [m["seq"] for m in r["messages"]] == [1, 2] and r["more"] is False, r
    # channels: the rooms with someone present, by name, with their counts
    st, r = await call(api, "channels", {"prefix": f"room:{tag}"})
    assert st == 200 and r == {"channels": [
        {"ch": rooms[0], "users": 4}, {"ch": rooms[1], "users": 2}, {"ch": rooms[2], "users": 1}]}, r
    st, r = await call(api, "channels", {"prefix": f"room:{tag}", "limit": 2})
    assert [c["ch"] for c in r["channels"]] == rooms[:2] and r["next"] == rooms[1], r
    st, r = await call(api, "channels", {"prefix": f"room:{tag}", "after": rooms[1]})
    assert r == {"channels": [{"ch": rooms[2], "users": 1}]}, r
    await users[2].close()
    await asyncio.sleep(0.3)
    st, r = await call(api, "channels", {"prefix": f"room:{tag}"})
    assert [c["ch"] for c in r["channels"]] == rooms[:2], r
    # refusals: 400 with the protocol's code, nothing changes
    for method, body, code in [
        ("presence", {"ch": "svc:echo"}, "bad_channel"),
        ("presence", {"ch": "room:bad id"}, "bad_channel"),
        ("presence", {"ch": rooms[0], "limit": 0}, "bad_request"),
        ("presence", {"ch": rooms[0], "limit": 1001}, "bad_request"),
        ("presence", {"ch": rooms[0], "limit": -1}, "bad_request"),
        ("presence", {"ch": rooms[0], "after": 5}, "bad_request"),
        ("history", {"ch": rooms[0], "limit": 201}, "bad_request"),
        ("history", {"ch": rooms[0], "before": -1}, "bad_request"),
        ("history", {"ch": rooms[0], "before": "x"}, "bad_request"),
        ("history", {"ch": "svc:x"}, "bad_channel"),
        ("channels", {"prefix": "user:"}, "bad_channel"),
        ("channels", {"limit": 0}, "bad_request"),
    ]:
        st, r = await call(api, method, body)
        assert st == 400 and r["error"]["code"] == code, (method, body, st, r)
    api.close()


async def test_presence_queries_refused_when_presence_is_off(gateway):
    gw = gateway(**api_env(EDGEGATE_PRESENCE__ENABLED="false"))
    api = Api(gw)
    for method, body in [("presence", {"ch": "room:x"}), ("channels", {})]:
        st, r = await call(api, method, body)
        assert st == 400 and "presence is off" in r["error"]["reason"], r
    api.close()
