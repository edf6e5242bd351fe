"""SSE (PROTOCOL.md §10) across two gateways on a real nats-server: a POST
that lands on the other node reaches its session through P.ctl.sse.<node>
(its answers still come on the stream), a forged or unknown token posted to
the other node is refused 404 and touches nothing, a token naming a node
that is gone is 404, and an SSE client chats with a WebSocket client on the
other node in a room and by direct message."""

from __future__ import annotations

import asyncio
import json

import pytest

from helpers import new_user, session
from natshelp import nats_client, nats_env
from ssehelp import http_request, sse_session
# The same fixtures: a nats-server per test, skipped where the build has no
# NATS backbone.
from test_chat_nats import _nats_backbone_available, nats  # noqa: F401


async def test_a_post_on_another_node_reaches_its_session(gateway, nats):
    a_gw = gateway(**nats_env(nats.url, "gw-a"))
    b_gw = gateway(**nats_env(nats.url, "gw-b"))
    user = new_user("n")
    c = await sse_session(a_gw, user)
    assert c.welcome["meta"]["node"] == "gw-a"
    assert c.session.startswith("gw-a.")
    # POSTs to node b with a's token: forwarded, taken, answered on a's stream.
    for i in range(3):
        st, _, body = await http_request("127.0.0.1", b_gw.ws_port, "POST", "/sse",
                                         {"Eg-Session": c.session},
                                         json.dumps({"t": "ping", "id": 50 + i}).encode())
        assert st == 204, (st, body)
        assert (await c.recv_until(lambda e: e["t"] == "pong"))["id"] == 50 + i
    assert b_gw.metric("edgegate_sse_posts_forwarded_total", to="node") == 3
    assert a_gw.metric("edgegate_sse_posts_forwarded_total", to="node") == 0

    # A room across the nodes: the SSE client subscribes and publishes with
    # every POST sent to the other node.
    room = f"room:{new_user('r')}"
    ws = await session(b_gw, "ws-json")
    await ws.sub(room)
    sub = json.dumps({"t": "sub", "id": 60, "ch": room}).encode()
    st, _, _ = await http_request("127.0.0.1", b_gw.ws_port, "POST", "/sse",
                                  {"Eg-Session": c.session}, sub)
    assert st == 204
    ok = await c.recv_until(lambda e: e.get("id") == 60)
    assert ok["t"] == "ok", ok
    pub = json.dumps({"t": "pub", "id": 61, "ch": room, "d": {"via": "b"}}).encode()
    st, _, _ = await http_request("127.0.0.1", b_gw.ws_port, "POST", "/sse",
                                  {"Eg-Session": c.session}, pub)
    assert st == 204
    got = await ws.recv_until(lambda e: e["t"] == "msg")
    assert got["d"] == {"via": "b"} and got["from"] == user
    mine = await c.recv_until(lambda e: e["t"] == "msg")
    assert mine["d"] == {"via": "b"}
    # A direct message from the WebSocket client on b reaches the stream on a.
    await ws.call("pub", ch=f"user:{user}", d={"dm": "hi"})
    dm = await c.recv_until(lambda e: e["t"] == "msg" and e.get("ch") == f"user:{user}")
    assert dm["d"] == {"dm": "hi"}

    # Refused and untouched: a forged MAC, and a node nobody runs.
    forged = c.session[:-3] + ("AAA" if not c.session.endswith("AAA") else "BBB")
    evil = json.dumps({"t": "pub", "id": 70, "ch": room, "d": "forged"}).encode()
    st, _, _ = await http_request("127.0.0.1", b_gw.ws_port, "POST", "/sse",
                                  {"Eg-Session": forged}, evil)
    assert st == 404
    gone = c.session.replace("gw-a.", "gw-z.", 1)
    st, _, _ = await http_request("127.0.0.1", b_gw.ws_port, "POST", "/sse",
                                  {"Eg-Session": gone}, evil)
    assert st == 404
    with pytest.raises(asyncio.TimeoutError):
        await ws.recv_until(lambda e: e["t"] == "msg", timeout=0.7)

    # The session closed: its token is 404 on both nodes.
    tok = c.session
    await c.close()
    await asyncio.sleep(0.3)
    for gw in (a_gw, b_gw):
        st, _, _ = await http_request("127.0.0.1", gw.ws_port, "POST", "/sse",
                                      {"Eg-Session": tok}, b'{"t":"ping"}')
        assert st == 404, gw.env["EDGEGATE_BACKBONE__NODE_ID"]


async def test_the_control_subject_answers_a_core_service(gateway, nats):
    """P.ctl.sse.<node> is the node's: a nats-py client asking it with a
    node's token gets the outcome as the answer."""
    gw = gateway(**nats_env(nats.url, "gw-c"))
    c = await sse_session(gw, new_user("p"))
    async with nats_client(nats.url) as nc:
        m = await nc.request("eg.ctl.sse.gw-c", b'{"t":"ping","id":9}',
                             headers={"Eg-Session": c.session}, timeout=3)
        assert m.data == b"204"
        assert (await c.recv_until(lambda e: e["t"] == "pong"))["id"] == 9
        m = await nc.request("eg.ctl.sse.gw-c", b"{}", headers={"Eg-Session": "x"}, timeout=3)
        assert m.data == b"404"
