"""JWT authentication (issue 6): real tokens, signed in the test with keys
generated in the test (PyJWT + cryptography), against the real binary.

Covers: good tokens for HS256 / RS256 / ES256 / EdDSA; refusals with bye 4001
(expired, not yet valid, wrong signature, wrong algorithm, alg none, wrong
audience, wrong issuer, missing); reasons that leak no secret; token in the
Authorization header and the query string, and token_sources; room claims
(forbidden); expiry closing with 4008; token refresh; the Origin allow-list;
a bad public key file stopping the start.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import BIN, make_env
from egproto import TcpClient, WsClient
from helpers import connect, new_user

SECRET = "test-secret-" + "0123456789abcdef" * 4
OTHER_SECRET = "another-secret-0123456789abcdef-012345"


def token(sub: str | None = "alice", key=SECRET, alg: str = "HS256", exp_in: float | None = 300,
          **claims) -> str:
    now = int(time.time())
    body = dict(claims)
    if sub is not None:
        body["sub"] = sub
    if exp_in is not None:
        body["exp"] = now + exp_in
    return jwt.encode(body, key, algorithm=alg)


def b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def alg_none_token(sub: str = "alice") -> str:
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': sub, 'exp': int(time.time()) + 300})}."


def jwt_gateway(gateway, **env):
    base = {"EDGEGATE_AUTH__MODE": "jwt", "EDGEGATE_AUTH__SECRET": SECRET,
            "EDGEGATE_AUTH__LEEWAY_MS": "0"}
    base.update(env)
    return gateway(**base)


async def hello_token(c, tok: str | None, **meta) -> dict:
    """Sends hello with the token; returns the answer (welcome or bye)."""
    m = dict(meta)
    if tok is not None:
        m["token"] = tok
    await c.send("hello", id=1, meta=m)
    return await c.recv()


async def ping(c) -> dict:
    await c.send("ping", id=777)
    return await c.recv_until(lambda e: e["t"] in ("pong", "bye"))


async def expect_refused(c, tok: str | None, leak: tuple[str, ...] = ()) -> dict:
    await c.send("hello", id=1, meta={"token": tok} if tok is not None else {})
    bye = await c.expect_bye(4001)
    reason = bye.get("reason", "")
    for secret in (SECRET, OTHER_SECRET, *leak):
        assert secret not in reason, f"reason leaks a secret: {reason!r}"
    if tok:
        sig = tok.split(".")[-1]
        assert tok not in reason and (not sig or sig not in reason)
    return bye


@pytest.mark.parametrize("kind", ["ws-json", "ws-bin", "tcp"])
async def test_good_token_is_welcomed_as_its_sub(gateway, kind):
    gw = jwt_gateway(gateway)
    user = new_user("jwt")
    c = await connect(gw, kind)
    w = await hello_token(c, token(user))
    assert w["t"] == "welcome" and w["meta"]["user"] == user, w
    assert (await ping(c))["t"] == "pong"
    assert gw.metric("edgegate_auth_ok_total") >= 1


REFUSALS = {
    "expired": lambda: token(exp_in=-30),
    "not_yet_valid": lambda: token(nbf=int(time.time()) + 60),
    "wrong_signature": lambda: token(key=OTHER_SECRET),
    "wrong_algorithm": lambda: token(alg="HS512"),
    "alg_none": alg_none_token,
    "no_exp": lambda: token(exp_in=None),
    "bad_sub": lambda: token(sub="not a valid id"),
    "garbage": lambda: "definitely.not.a-token",
    "missing": lambda: None,
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest.mark.parametrize("kind", ["ws-json", "tcp"])
async def test_bad_tokens_are_refused_with_4001(gateway, kind, case):
    gw = jwt_gateway(gateway)
    c = await connect(gw, kind)
    bye = await expect_refused(c, REFUSALS[case]())
    print(case, "->", bye.get("reason"))
    assert gw.metric("edgegate_auth_failures_total") >= 1


async def test_audience_and_issuer(gateway):
    gw = jwt_gateway(gateway, EDGEGATE_AUTH__AUDIENCE="edge", EDGEGATE_AUTH__ISSUER="https://auth.test")
    good = token("carol", aud="edge", iss="https://auth.test")
    c = await connect(gw, "tcp")
    assert (await hello_token(c, good))["t"] == "welcome"
    for bad in (token("carol", aud="other", iss="https://auth.test"),
                token("carol", iss="https://auth.test"),                  # no aud
                token("carol", aud="edge", iss="https://evil.test")):
        c = await connect(gw, "tcp")
        bye = await expect_refused(c, bad)
        assert "audience" in bye["reason"] or "issuer" in bye["reason"], bye
    assert gw.metric("edgegate_auth_failures_total", reason="audience") >= 2
    assert gw.metric("edgegate_auth_failures_total", reason="issuer") >= 1


def _pem_pub(private) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


KEYS = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": lambda: ed25519.Ed25519PrivateKey.generate(),
}


@pytest.mark.parametrize("alg", sorted(KEYS))
async def test_public_key_algorithms(gateway, tmp_path, alg):
    key, other = KEYS[alg](), KEYS[alg]()
    pem = tmp_path / f"{alg}.pub.pem"
    pem.write_bytes(_pem_pub(key))
    gw = gateway(EDGEGATE_AUTH__MODE="jwt", EDGEGATE_AUTH__ALGORITHM=alg,
                 EDGEGATE_AUTH__PUBLIC_KEY=str(pem))
    c = await connect(gw, "ws-json")
    w = await hello_token(c, token("dave", key=key, alg=alg))
    assert w["t"] == "welcome" and w["meta"]["user"] == "dave", w
    # Signed by another key of the same kind.
    await expect_refused(await connect(gw, "ws-json"), token("dave", key=other, alg=alg))
    # The HS256 confusion attack: the public key used as an HMAC secret
    # (PyJWT refuses to HMAC with a PEM key, so it is signed by hand).
    import hashlib
    import hmac
    head = b64({"alg": "HS256", "typ": "JWT"})
    body = b64({"sub": "dave", "exp": int(time.time()) + 300})
    sig = hmac.new(pem.read_bytes(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{head}.{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    bye = await expect_refused(await connect(gw, "tcp"), forged)
    assert "algorithm" in bye["reason"], bye


def test_bad_public_key_file_stops_the_start(tmp_path):
    for content in (None, b"not a pem file\n"):
        path = tmp_path / "jwt.pub.pem"
        if content is None:
            path = tmp_path / "missing.pem"
        else:
            path.write_bytes(content)
        env = make_env(EDGEGATE_AUTH__MODE="jwt", EDGEGATE_AUTH__ALGORITHM="ES256",
                       EDGEGATE_AUTH__PUBLIC_KEY=str(path))
        import os
        full = dict(os.environ)
        full.update(env)
        p = subprocess.run([str(BIN), "run"], env=full, capture_output=True, timeout=30)
        assert p.returncode != 0
        assert str(path) in p.stderr.decode(), p.stderr.decode()[-2000:]


async def test_token_in_header_and_query(gateway):
    gw = jwt_gateway(gateway)
    tok = token("erin")
    c = await WsClient.connect(gw.ws_url, additional_headers={"Authorization": f"Bearer {tok}"})
    w = await hello_token(c, None)
    assert w["t"] == "welcome" and w["meta"]["user"] == "erin", w
    c = await WsClient.connect(gw.ws_url + "?token=" + token("frank"))
    w = await hello_token(c, None)
    assert w["t"] == "welcome" and w["meta"]["user"] == "frank", w
    # A bad header token is answered with bye 4001 after the upgrade.
    c = await WsClient.connect(gw.ws_url, additional_headers={"Authorization": f"Bearer {token(exp_in=-60)}"})
    bye = await c.expect_bye(4001)
    assert "expired" in bye["reason"], bye


async def test_token_sources_restrict_websocket_carriers(gateway):
    gw = jwt_gateway(gateway, EDGEGATE_AUTH__TOKEN_SOURCES="header")
    # query not accepted: the token is ignored, and hello has none
    c = await WsClient.connect(gw.ws_url + "?token=" + token("gina"))
    await expect_refused(c, None)
    # hello not accepted on WebSocket either
    c = await WsClient.connect(gw.ws_url)
    await expect_refused(c, token("gina"))
    # TCP always uses hello
    c = await TcpClient.connect("127.0.0.1", gw.tcp_port)
    assert (await hello_token(c, token("gina")))["t"] == "welcome"
    c = await WsClient.connect(gw.ws_url, additional_headers={"Authorization": f"Bearer {token('gina')}"})
    assert (await hello_token(c, None))["t"] == "welcome"


@pytest.mark.parametrize("kind", ["ws-json", "tcp"])
async def test_room_claims_are_enforced(gateway, kind):
    gw = jwt_gateway(gateway, EDGEGATE_ROOMS__POLICY="claims")
    c = await connect(gw, kind)
    w = await hello_token(c, token("hank", rooms=["lobby", "team-*"]))
    assert w["t"] == "welcome"
    for ch in ("room:lobby", "room:team-a", "room:team-"):
        r = await c.call("sub", ch=ch)
        assert r["t"] == "ok", (ch, r)
    for ch in ("room:lobby2", "room:secret", "room:tea"):
        r = await c.call("sub", ch=ch)
        assert r["t"] == "err" and r["code"] == "forbidden", (ch, r)
        r = await c.call("pub", ch=ch, d={"x": 1})
        assert r["t"] == "err" and r["code"] == "forbidden", (ch, r)
    r = await c.call("pub", ch="room:lobby", d={"x": 1})
    assert r["t"] == "ok", r
    # No rooms claim: no rooms.
    c2 = await connect(gw, kind)
    assert (await hello_token(c2, token("ivan")))["t"] == "welcome"
    r = await c2.call("sub", ch="room:lobby")
    assert r["t"] == "err" and r["code"] == "forbidden", r


@pytest.mark.parametrize("kind", ["ws-json", "tcp"])
async def test_expiry_closes_with_4008(gateway, kind):
    gw = jwt_gateway(gateway)
    c = await connect(gw, kind)
    exp = int(time.time()) + 2
    w = await hello_token(c, jwt.encode({"sub": "judy", "exp": exp}, SECRET, algorithm="HS256"))
    assert w["t"] == "welcome"
    bye = await c.expect_bye(4008, timeout=6)
    late = time.time() - exp
    print(f"4008 arrived {late * 1000:.0f} ms after exp")
    assert -0.05 <= late < 1.5, f"closed {late:.3f} s after exp"
    assert gw.metric("edgegate_closes_total", code="4008") >= 1


async def test_refresh_replaces_the_token(gateway):
    gw = jwt_gateway(gateway, EDGEGATE_ROOMS__POLICY="claims")
    c = await connect(gw, "ws-json")
    w = await hello_token(c, token("kim", exp_in=2, rooms=["a", "b"]))
    assert w["t"] == "welcome"
    await c.sub("room:a")
    await c.sub("room:b")
    # Refresh: same sub, later exp, fewer rooms.
    r = await c.call("hello", meta={"token": token("kim", exp_in=60, rooms=["a"])})
    assert r["t"] == "ok", r
    # Another user's token is refused, the connection stays.
    r = await c.call("hello", meta={"token": token("mallory", exp_in=60)})
    assert r["t"] == "err" and r["code"] == "unauthorized", r
    # A bad token is refused too.
    r = await c.call("hello", meta={"token": token("kim", key=OTHER_SECRET)})
    assert r["t"] == "err" and r["code"] == "unauthorized", r
    # Past the first token's exp: still open, room:b was left, room:a works.
    await asyncio.sleep(3.0)
    r = await ping(c)
    assert r["t"] == "pong", r
    r = await c.call("pub", ch="room:b", d=1)
    assert r["t"] == "err" and r["code"] == "forbidden", r
    r = await c.call("unsub", ch="room:b")
    assert r["t"] == "err" and r["code"] == "not_subscribed", r
    r = await c.call("pub", ch="room:a", d=1)
    assert r["t"] == "ok", r
    assert gw.metric("edgegate_auth_refreshes_total") == 1
    # A refresh to an earlier exp is honoured too.
    r = await c.call("hello", meta={"token": token("kim", exp_in=1)})
    assert r["t"] == "ok", r
    await c.expect_bye(4008, timeout=5)


async def test_refresh_in_auth_none_is_still_refused(gateway):
    gw = gateway()
    c = await connect(gw, "tcp")
    await c.hello(new_user())
    r = await c.call("hello", meta={"token": "x"})
    assert r["t"] == "err" and r["code"] == "bad_request", r


async def test_origin_allow_list(gateway):
    from websockets.exceptions import InvalidStatus
    gw = gateway(EDGEGATE_WS__ALLOWED_ORIGINS="https://chat.example.com,https://app.example.com")
    with pytest.raises(InvalidStatus) as e:
        await WsClient.connect(gw.ws_url, origin="https://evil.example.com")
    assert e.value.response.status_code == 403
    ok = await WsClient.connect(gw.ws_url, origin="https://app.example.com")
    await ok.hello(new_user())
    native = await WsClient.connect(gw.ws_url)        # no Origin: not a browser
    await native.hello(new_user())
    assert gw.metric("edgegate_limit_hits_total", limit="origin") == 1
