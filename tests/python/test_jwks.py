"""JWT keys from a JWKS endpoint (`[auth] jwks_url`), against the real
binary and a JWKS server written here (http.server in a thread, counting
the requests it answers; jwkshelp.py). Keys are made in the test and
tokens signed with them (PyJWT + cryptography).

Covers: a token signed by a key of the set is accepted (RS256, ES256,
EdDSA), one whose kid is not in the set or whose signature is not the
kid's key is refused (4001); after the server rotates its keys a token
with the new kid is accepted without a restart, both when the unknown kid
asks for the refresh and on the refresh schedule; the endpoint down (or
answering 500) keeps the last keys; a flood of unknown kids does not
hammer the endpoint (at most one fetch per jwks_min_refresh_ms, counted at
the server); a JWKS unreachable at start is a readiness failure that heals
when it comes up; https with a configured CA; configuration errors.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import time
import uuid

import pytest

from conftest import BIN, free_port, http_get, make_env
from helpers import new_user, wait_until
from jwkshelp import JwksServer, Key, jwks_env
from test_tls import Pki
from egproto import WsClient


async def hello(gw, tok: str) -> dict:
    """A WebSocket hello with the token: welcome, or the bye."""
    c = await WsClient.connect(gw.ws_url)
    try:
        await c.send("hello", id=1, meta={"token": tok})
        return await c.recv_until(lambda e: e["t"] in ("welcome", "bye"))
    finally:
        await c.close()


def status(gw, path: str) -> int | None:
    """The admin endpoint's status for ``path``; None while it does not listen."""
    try:
        return http_get(gw.admin + path)[0]
    except OSError:
        return None


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def refreshes(gw, result: str) -> float:
    return gw.metric("edgegate_jwks_refreshes_total", result=result)


@pytest.fixture
def servers():
    started: list[JwksServer] = []

    def factory(*keys, **kw) -> JwksServer:
        s = JwksServer(*keys, **kw)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_a_token_signed_by_a_key_of_the_set_is_accepted(gateway, servers, alg):
    k1, k2, stranger = Key(alg), Key(alg), Key(alg)
    srv = servers(k1, k2)
    gw = gateway(**jwks_env(srv.url, alg))
    for k in (k1, k2):
        user = new_user("j")
        w = await hello(gw, k.token(user))
        assert w["t"] == "welcome" and w["meta"]["user"] == user, w
    # A kid the set does not have.
    bye = await hello(gw, stranger.token("mallory"))
    assert bye["t"] == "bye" and bye["code"] == 4001 and "kid" in bye["reason"], bye
    # A known kid, signed by another key.
    bye = await hello(gw, stranger.token("mallory", kid=k1.kid))
    assert bye["t"] == "bye" and bye["code"] == 4001 and "signature" in bye["reason"], bye
    assert gw.metric("edgegate_jwks_keys") == 2
    assert refreshes(gw, "ok") >= 1
    assert gw.metric("edgegate_auth_failures_total", reason="unknown_key") == 1
    assert gw.metric("edgegate_auth_failures_total", reason="signature") == 1


async def test_a_rotated_key_is_fetched_when_its_kid_arrives(gateway, servers):
    old, new = Key("RS256"), Key("RS256")
    srv = servers(old)
    # No scheduled refresh within the test: only the unknown kid can cause it.
    gw = gateway(**jwks_env(srv.url, "RS256", EDGEGATE_AUTH__JWKS_REFRESH_MS=600000))
    assert (await hello(gw, old.token("alice")))["t"] == "welcome"
    before = srv.requests
    srv.rotate(new)
    deadline = time.monotonic() + 10
    answers = []
    while True:
        a = await hello(gw, new.token("bob"))
        answers.append(a["t"])
        if a["t"] == "welcome" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert answers[-1] == "welcome", answers
    # The first new-kid token asked for the refresh; one or two fetches did it.
    assert 1 <= srv.requests - before <= 2, (srv.requests, before)
    # The old key left the set with the rotation.
    bye = await hello(gw, old.token("alice"))
    assert bye["t"] == "bye" and bye["code"] == 4001, bye


async def test_a_rotated_key_is_fetched_on_schedule(gateway, servers):
    old, new = Key("ES256"), Key("ES256")
    srv = servers(old)
    gw = gateway(**jwks_env(srv.url, "ES256", EDGEGATE_AUTH__JWKS_REFRESH_MS=1000))
    srv.rotate(old, new)
    await wait_until(lambda: gw.metric("edgegate_jwks_keys") == 2, 5, what="the scheduled refresh")
    # No token has asked: the schedule fetched it, and the first try works.
    assert (await hello(gw, new.token("carol")))["t"] == "welcome"
    assert gw.metric("edgegate_auth_failures_total", reason="unknown_key") == 0


async def test_the_endpoint_down_keeps_the_last_keys(gateway, servers):
    k = Key("EdDSA")
    srv = servers(k)
    gw = gateway(**jwks_env(srv.url, "EdDSA", EDGEGATE_AUTH__JWKS_REFRESH_MS=1000))
    assert (await hello(gw, k.token("dave")))["t"] == "welcome"
    # Answering 500, then not answering at all.
    srv.status = 500
    await wait_until(lambda: refreshes(gw, "failed") >= 1, 5, what="a failed refresh (500)")
    srv.stop()
    failed = refreshes(gw, "failed")
    await wait_until(lambda: refreshes(gw, "failed") > failed, 5, what="a failed refresh (down)")
    assert (await hello(gw, k.token("dave")))["t"] == "welcome"
    assert gw.metric("edgegate_jwks_keys") == 1
    assert http_get(gw.admin + "/readyz")[0] == 200, "keys held: the node stays ready"
    assert "keeping the last good key set" in gw.stderr_text()


async def test_an_unknown_kid_flood_does_not_hammer_the_endpoint(gateway, servers):
    k, forger = Key("RS256"), Key("RS256")
    srv = servers(k)
    gw = gateway(**jwks_env(srv.url, "RS256", EDGEGATE_AUTH__JWKS_REFRESH_MS=600000,
                            EDGEGATE_AUTH__JWKS_MIN_REFRESH_MS=1000))
    await wait_until(lambda: srv.requests >= 1, 5, what="the first fetch")
    before = srv.requests
    t0 = time.monotonic()

    async def one(i: int) -> str:
        a = await hello(gw, forger.token(f"f{i}", kid=uuid.uuid4().hex))
        return a["t"] if a["t"] != "bye" else str(a["code"])

    results = []
    for batch in range(10):
        results += await asyncio.gather(*(one(batch * 20 + i) for i in range(20)))
    elapsed = time.monotonic() - t0
    await asyncio.sleep(1.2)  # a refresh asked at the end may still come
    assert results == ["4001"] * 200, set(results)
    fetched = srv.requests - before
    # At most one fetch per jwks_min_refresh_ms (1 s), whatever the flood.
    assert fetched <= int(elapsed) + 2, (fetched, elapsed)
    assert gw.metric("edgegate_auth_failures_total", reason="unknown_key") == 200
    # The real key still works.
    assert (await hello(gw, k.token("erin")))["t"] == "welcome"


async def test_an_unreachable_jwks_at_start_is_a_readiness_failure(gateway, servers):
    k = Key("RS256")
    port = free_port()
    idle = JwksServer(k, port=port, start=False)
    gw = gateway(_wait_ready=False, **jwks_env(idle.url, "RS256"))
    await wait_until(lambda: status(gw, "/healthz") == 200, 10, what="healthz")
    st, body = http_get(gw.admin + "/readyz")
    assert st == 503 and "JWT keys" in body, (st, body)
    # The shards listen after the admin endpoint does.
    await wait_until(lambda: listening(gw.ws_port), 10, what="the WebSocket listener")
    bye = await hello(gw, k.token("frank"))
    assert bye["t"] == "bye" and bye["code"] == 4001, bye
    await wait_until(lambda: refreshes(gw, "failed") >= 2, 5, what="retries while down")
    # The endpoint comes up: the node becomes ready by itself.
    srv = servers(k, port=port)
    await wait_until(lambda: status(gw, "/readyz") == 200, 10, what="ready")
    assert srv.requests >= 1
    assert (await hello(gw, k.token("frank")))["t"] == "welcome"


async def test_https_with_a_configured_ca(gateway, servers, tmp_path):
    pki = Pki(tmp_path / "pki")
    cert, key = pki.leaf()
    chain, keyp = pki.write(cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(chain), str(keyp))
    k = Key("ES256")
    srv = servers(k, tls=ctx)
    gw = gateway(**jwks_env(srv.url, "ES256", EDGEGATE_AUTH__JWKS_CA_FILE=pki.ca_path))
    assert (await hello(gw, k.token("grace")))["t"] == "welcome"
    # Without the CA (the system's roots), the same endpoint is not trusted.
    gw2 = gateway(_wait_ready=False, **jwks_env(srv.url, "ES256"))
    await wait_until(lambda: status(gw2, "/healthz") == 200, 10, what="healthz")
    await wait_until(lambda: refreshes(gw2, "failed") >= 1, 5, what="a failed TLS fetch")
    assert http_get(gw2.admin + "/readyz")[0] == 503
    assert refreshes(gw2, "ok") == 0


def _start_error(env: dict) -> tuple[int, str]:
    full = dict(os.environ)
    full.update(make_env(**env))
    r = subprocess.run([str(BIN), "run"], env=full, capture_output=True, timeout=30)
    return r.returncode, r.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("env, words", [
    ({"EDGEGATE_AUTH__JWKS_URL": "ftp://idp/jwks"}, "auth.jwks_url"),
    ({"EDGEGATE_AUTH__ALGORITHM": "HS256", "EDGEGATE_AUTH__SECRET": "x" * 32}, "HS256"),
    ({"EDGEGATE_AUTH__JWKS_CA_FILE": "/nonexistent/ca.pem"}, "/nonexistent/ca.pem"),
    ({"EDGEGATE_AUTH__JWKS_MIN_REFRESH_MS": "5000", "EDGEGATE_AUTH__JWKS_REFRESH_MS": "1000"},
     "auth.jwks_refresh_ms"),
    ({"EDGEGATE_AUTH__PUBLIC_KEY": "/etc/hostname"}, "keep one"),
])
def test_bad_jwks_configuration_is_a_start_error(env, words):
    base = jwks_env("http://127.0.0.1:1/jwks", "RS256")
    base.update(env)
    rc, err = _start_error(base)
    assert rc == 2 and words in err, (rc, err)
