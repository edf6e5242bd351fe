"""TLS on the stream listeners (issue 4): WSS and TCP+TLS.

A test CA and server certificates are made here with ``cryptography``; the
clients are ones nobody here wrote: Python ``websockets`` over ``wss://``
verifying the chain against the test CA, Python's ``ssl`` module, and
``openssl s_client``.  Covered: the chain and ALPN, TLS 1.2 and 1.3, TCP+TLS
hello/welcome, a room shared by WSS, TCP+TLS and plain WS clients, start-up
errors that name the file, live reload on SIGHUP (open connections survive,
new ones see the new certificate, a broken file is refused and the old
certificate kept), and bad input (a stalled handshake, plain bytes on a TLS
port) with the connection gauge back to zero.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import egproto
from egproto import PREFACE, TcpClient, WsClient
from helpers import new_user, wait_until

HOST = "localhost"


# --------------------------------------------------------------------------
# a test PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Pki:
    """A CA and leaf certificates it signs, written as PEM files."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("edgegate test CA"))
            .issuer_name(_name("edgegate test CA"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_path = d / "ca.pem"
        self.ca_path.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, tag: str = "leaf", *, expired: bool = False, days: float = 7):
        """A server certificate for localhost / 127.0.0.1, valid for ``days``
        more days: (cert, key)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            nb, na = now - datetime.timedelta(days=10), now - datetime.timedelta(days=2)
        else:
            nb, na = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
        import ipaddress
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{HOST} {tag}"))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(HOST), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        return cert, key

    def write(self, cert, key, chain: str = "chain.pem", keyf: str = "key.pem") -> tuple[Path, Path]:
        cp, kp = self.dir / chain, self.dir / keyf
        pem = cert.public_bytes(serialization.Encoding.PEM) + self.ca_cert.public_bytes(
            serialization.Encoding.PEM)
        # Write then rename, as a certificate manager would.
        tmp = self.dir / (chain + ".tmp")
        tmp.write_bytes(pem)
        tmp.replace(cp)
        tmpk = self.dir / (keyf + ".tmp")
        tmpk.write_bytes(_pem_key(key))
        tmpk.replace(kp)
        return cp, kp

    def client_ctx(self, **kw) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        for k, v in kw.items():
            setattr(ctx, k, v)
        return ctx


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path / "pki")


def tls_env(chain: Path, key: Path, **extra) -> dict:
    env = {
        "EDGEGATE_TLS__CERT_CHAIN": str(chain),
        "EDGEGATE_TLS__KEY": str(key),
        "EDGEGATE_WS__TLS": "true",
        "EDGEGATE_TCP__TLS": "true",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def tls_gateway(gateway, pki: Pki, **extra):
    cert, key = pki.leaf()
    chain, keyp = pki.write(cert, key)
    gw = gateway(**tls_env(chain, keyp, **extra))
    gw.cert = cert
    return gw


def wss_url(gw) -> str:
    return f"wss://{HOST}:{gw.ws_port}/ws"


async def wss(gw, pki: Pki, enc: str = "json", **kw) -> WsClient:
    return await WsClient.connect(wss_url(gw), enc=enc, ssl=pki.client_ctx(),
                                  **kw)


async def tcp_tls(gw, pki: Pki, ctx: ssl.SSLContext | None = None) -> TcpClient:
    r, w = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", gw.tcp_port, ssl=ctx or pki.client_ctx(), server_hostname=HOST,
        limit=1 << 24), 5)
    c = TcpClient(r, w)
    w.write(PREFACE)
    await w.drain()
    return c


def peer_cert(port: int, pki: Pki, alpn: list[str] | None = None, **ctxkw):
    """Handshakes with Python's ssl (blocking): (DER of the leaf, ALPN, version)."""
    ctx = pki.client_ctx(**ctxkw)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname=HOST) as t:
            return t.getpeercert(binary_form=True), t.selected_alpn_protocol(), t.version()


def der(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def open_conns(gw) -> float:
    return gw.metric("edgegate_connections")


# --------------------------------------------------------------------------
# interop


async def test_wss_websockets_verifies_chain_and_exchanges(gateway, pki):
    gw = tls_gateway(gateway, pki)
    for enc in ("json", "bin"):
        c = await wss(gw, pki, enc=enc)
        await c.hello(new_user("wss"))
        room = f"room:{new_user('r')}"
        await c.sub(room)
        r = await c.call("pub", ch=room, d={"over": "wss", "enc": enc})
        assert r["t"] == "ok", r
        m = await c.recv_until(lambda e: e["t"] == "msg")
        assert m["d"] == {"over": "wss", "enc": enc}
        await c.close()
    # An unverified chain (no CA) is refused by the client: the server
    # really presents the test chain, not something else.
    with pytest.raises(ssl.SSLCertVerificationError):
        await WsClient.connect(wss_url(gw), ssl=ssl.create_default_context())


async def test_alpn_and_versions(gateway, pki):
    gw = tls_gateway(gateway, pki)
    loop = asyncio.get_running_loop()
    leaf, alpn, ver = await loop.run_in_executor(
        None, lambda: peer_cert(gw.ws_port, pki, alpn=["h2", "http/1.1"]))
    assert leaf == der(gw.cert)
    assert alpn == "http/1.1", "WSS must select ALPN http/1.1"
    assert ver == "TLSv1.3"
    _, _, ver12 = await loop.run_in_executor(
        None, lambda: peer_cert(gw.ws_port, pki, maximum_version=ssl.TLSVersion.TLSv1_2))
    assert ver12 == "TLSv1.2"
    # The raw TCP listener offers no ALPN.
    _, alpn_tcp, _ = await loop.run_in_executor(
        None, lambda: peer_cert(gw.tcp_port, pki, alpn=["http/1.1"]))
    assert alpn_tcp is None


async def test_tcp_tls_openssl_s_client(gateway, pki):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    gw = tls_gateway(gateway, pki)
    user = new_user("ossl")
    hello = egproto.encode_bin("hello", id=1, meta={"user": user})
    proc = await asyncio.create_subprocess_exec(
        openssl, "s_client", "-connect", f"127.0.0.1:{gw.tcp_port}", "-servername", HOST,
        "-CAfile", str(pki.ca_path), "-verify_return_error", "-verify_hostname", HOST,
        "-quiet", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        proc.stdin.write(PREFACE + egproto.tcp_frame(hello))
        await proc.stdin.drain()
        hdr = await asyncio.wait_for(proc.stdout.readexactly(4), 10)
        (n,) = struct.unpack(">I", hdr)
        body = await asyncio.wait_for(proc.stdout.readexactly(n), 5)
        w = egproto.decode_bin(body)
        assert w["t"] == "welcome" and w["id"] == 1, w
        assert w["meta"]["user"] == user
        # A ping answered with pong over the same TLS session.
        proc.stdin.write(egproto.tcp_frame(egproto.encode_bin("ping", id=2)))
        await proc.stdin.drain()
        while True:
            hdr = await asyncio.wait_for(proc.stdout.readexactly(4), 5)
            (n,) = struct.unpack(">I", hdr)
            env = egproto.decode_bin(await asyncio.wait_for(proc.stdout.readexactly(n), 5))
            if env["t"] == "pong":
                assert env.get("id") == 2, env
                break
    finally:
        if proc.returncode is None:
            proc.kill()   # our own child, by its handle
        await proc.wait()
    await wait_until(lambda: open_conns(gw) == 0, 5, what="connections back to 0")


async def test_quic_wss_tcp_tls_and_plain_ws_share_a_room(gateway, pki, tmp_path):
    """One room, four transports (issue 4): QUIC, WSS and TCP+TLS on a TLS
    node, plain WS on a second node (one node has one WebSocket listener),
    the two joined by a NATS backbone."""
    import socket

    from conftest import free_port
    from natshelp import NatsServer, backbone_probe, nats_env
    from test_quic import QuicClient
    reason = backbone_probe(tmp_path / "probe")
    if reason:
        pytest.skip(reason)
    ns = NatsServer(tmp_path, "n").start()
    try:
        cert, key = pki.leaf()
        chain, keyp = pki.write(cert, key)
        quic_port = free_port(socket.SOCK_DGRAM)
        gw_tls = gateway(**nats_env(ns.url, "tls-node", **tls_env(
            chain, keyp, EDGEGATE_QUIC__LISTEN=f"127.0.0.1:{quic_port}")))
        gw_plain = gateway(**nats_env(ns.url, "plain-node"))
        a = await wss(gw_tls, pki, enc="bin")
        b = await tcp_tls(gw_tls, pki)
        c = await WsClient.connect(gw_plain.ws_url, enc="json")
        q = await QuicClient.connect(quic_port, str(pki.ca_path))
        room = f"room:{new_user('mix')}"
        clients = {"wss": a, "tcp+tls": b, "ws": c, "quic": q}
        for name, cl in clients.items():
            await cl.hello(new_user(name.replace("+", "")))
            await cl.sub(room)
        await asyncio.sleep(0.3)   # the NATS interest settles
        for name, cl in clients.items():
            r = await cl.call("pub", ch=room, d={"from": name})
            assert r["t"] == "ok", r
        for name, cl in clients.items():
            seen = set()
            while len(seen) < len(clients):
                m = await cl.recv_until(lambda e: e["t"] == "msg", timeout=5)
                seen.add(m["d"]["from"])
            assert seen == set(clients), (name, seen)
        for cl in clients.values():
            await cl.close()
        await wait_until(lambda: open_conns(gw_tls) == 0, 5, what="TLS node connections back to 0")
        # The gateways stop (by the fixture) before the NATS server.
        for gw in (gw_tls, gw_plain):
            for p in gw.stop():
                raise AssertionError(p)
            gw.proc = None
    finally:
        ns.stop()


async def test_large_and_pipelined_messages_over_tls(gateway, pki):
    """Envelopes bigger than one TLS record (16 KiB), and bursts that make
    records straddle reads, both ways, on WSS (TLS 1.3 and 1.2) and TCP+TLS."""
    gw = tls_gateway(gateway, pki)
    clients = [
        await wss(gw, pki, enc="bin"),
        await WsClient.connect(wss_url(gw), enc="json",
                               ssl=pki.client_ctx(maximum_version=ssl.TLSVersion.TLSv1_2)),
        await tcp_tls(gw, pki),
        await tcp_tls(gw, pki, pki.client_ctx(maximum_version=ssl.TLSVersion.TLSv1_2)),
    ]
    for c in clients:
        await c.hello(new_user("big"))
        ch = f"user:{c.user}"
        big = "x" * 30_000
        n = 24   # 6 big ones: under the 256 KiB outbound queue, even unread
        envs = [("pub", {"id": 1000 + i, "ch": ch, "d": [i, big if i % 4 == 0 else i]})
                for i in range(n)]
        if isinstance(c, TcpClient):
            await c.send_many(envs)   # one write: frames straddle TLS records
        else:
            for t, kw in envs:        # one WebSocket message each (max_frame)
                await c.send(t, **kw)
        got = []
        while len(got) < n:
            m = await c.recv_until(lambda e: e["t"] == "msg", timeout=10)
            got.append(m["d"][0])
            if m["d"][0] % 4 == 0:
                assert m["d"][1] == big
        assert got == list(range(n)), got
        await c.close()
    await wait_until(lambda: open_conns(gw) == 0, 5, what="connections back to 0")


@pytest.mark.parametrize("kind", ["wss", "tcp+tls"])
async def test_4007_refusal_goes_through_tls(gateway, pki, kind):
    """Over the connection limit, a TLS client still gets its bye 4007 with
    retry_ms (and, on WSS, the close frame), through TLS."""
    gw = tls_gateway(gateway, pki, EDGEGATE_LIMITS__MAX_CONNECTIONS=1,
                     EDGEGATE_LIMITS__RETRY_MS=1500)

    async def conn():
        return await (wss(gw, pki) if kind == "wss" else tcp_tls(gw, pki))

    first = await conn()
    await first.hello(new_user("in"))
    second = await conn()
    await second.send("hello", id=1, meta={"user": new_user("out")})
    bye = await second.expect_bye(4007)
    assert bye.get("meta", {}).get("retry_ms", 0) > 0, bye
    await first.close()
    await wait_until(lambda: open_conns(gw) == 0, 5, what="connections back to 0")


# --------------------------------------------------------------------------
# start-up errors name the file


def _start_fails(gateway, env: dict, must_mention: str, also: str | None = None) -> str:
    gw = gateway(_start=False, **env)
    gw.expect_exit()
    gw.start(wait_ready=False)
    rc = gw.wait_exit(15)
    assert rc != 0, "gateway started with a bad certificate"
    text = gw.stderr_text()
    assert must_mention in text, text[-2000:]
    if also:
        assert also in text, text[-2000:]
    return text


def test_startup_errors_name_the_file(gateway, pki):
    cert, key = pki.leaf()
    chain, keyp = pki.write(cert, key)
    missing = pki.dir / "missing.pem"
    _start_fails(gateway, tls_env(missing, keyp), str(missing), "cannot read")
    _start_fails(gateway, tls_env(chain, missing), str(missing), "cannot read")
    empty = pki.dir / "empty.pem"
    empty.write_text("# no certificate here\n")
    _start_fails(gateway, tls_env(empty, keyp), str(empty), "no certificate")
    other_key = pki.dir / "other-key.pem"
    other_key.write_bytes(_pem_key(ec.generate_private_key(ec.SECP256R1())))
    _start_fails(gateway, tls_env(chain, other_key), str(other_key), "does not match")
    ecert, ekey = pki.leaf("expired", expired=True)
    echain, ekeyp = pki.write(ecert, ekey, "expired.pem", "expired-key.pem")
    _start_fails(gateway, tls_env(echain, ekeyp), str(echain), "expired")


# --------------------------------------------------------------------------
# live reload


async def test_sighup_reload(gateway, pki):
    import signal
    cert1, key1 = pki.leaf("one")
    chain, keyp = pki.write(cert1, key1)
    gw = gateway(**tls_env(chain, keyp))
    loop = asyncio.get_running_loop()
    leaf, _, _ = await loop.run_in_executor(None, lambda: peer_cert(gw.ws_port, pki))
    assert leaf == der(cert1)

    old_ws = await wss(gw, pki)
    await old_ws.hello(new_user("old"))
    old_tcp = await tcp_tls(gw, pki)
    await old_tcp.hello(new_user("oldt"))

    def expiry() -> float:
        return gw.metric("edgegate_tls_cert_expiry_timestamp_seconds")

    assert expiry() == int(cert1.not_valid_after_utc.timestamp())
    # A new certificate: new handshakes see it, open connections go on, and
    # /metrics reports its expiry.
    cert2, key2 = pki.leaf("two", days=30)
    pki.write(cert2, key2)
    gw.sigterm(signal.SIGHUP)
    await wait_until(lambda: "certificate reloaded" in gw.stderr_text(), 5, what="reload log")
    for port in (gw.ws_port, gw.tcp_port):
        leaf, _, _ = await loop.run_in_executor(None, lambda p=port: peer_cert(p, pki))
        assert leaf == der(cert2), "a new handshake after SIGHUP must see the new certificate"
    assert expiry() == int(cert2.not_valid_after_utc.timestamp())
    for c in (old_ws, old_tcp):
        r = await c.call("pub", ch=f"user:{c.user}", d="still here")
        assert r["t"] == "ok", r
        m = await c.recv_until(lambda e: e["t"] == "msg")
        assert m["d"] == "still here"
    fresh = await wss(gw, pki)
    await fresh.hello(new_user("fresh"))

    # A broken file: refused with a log line naming it, cert2 still served.
    chain.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")
    gw.sigterm(signal.SIGHUP)
    await wait_until(lambda: "reload refused" in gw.stderr_text(), 5, what="refusal log")
    line = [ln for ln in gw.stderr_text().splitlines() if "reload refused" in ln][-1]
    assert str(chain) in line, line
    leaf, _, _ = await loop.run_in_executor(None, lambda: peer_cert(gw.ws_port, pki))
    assert leaf == der(cert2), "the old certificate must still be served"
    assert expiry() == int(cert2.not_valid_after_utc.timestamp())

    # A key that does not match: refused too.
    pki.write(cert1, key2)
    gw.sigterm(signal.SIGHUP)
    await wait_until(lambda: gw.stderr_text().count("reload refused") >= 2, 5,
                     what="second refusal log")
    leaf, _, _ = await loop.run_in_executor(None, lambda: peer_cert(gw.tcp_port, pki))
    assert leaf == der(cert2)

    # Every connection opened before, or between, the reloads still works.
    for c in (old_ws, old_tcp, fresh):
        r = await c.call("pub", ch=f"user:{c.user}", d=1)
        assert r["t"] == "ok", r
        await c.close()
    await wait_until(lambda: open_conns(gw) == 0, 5, what="connections back to 0")


# --------------------------------------------------------------------------
# bad input


def _client_hello_prefix() -> bytes:
    """The first bytes of a real ClientHello (from Python's ssl, in memory)."""
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    assert hello[0] == 0x16, "not a TLS handshake record"
    return hello[: len(hello) // 2]


async def _read_until_closed(r: asyncio.StreamReader, timeout: float) -> bytes:
    got = b""
    async def loop():
        nonlocal got
        while True:
            try:
                chunk = await r.read(4096)
            except ConnectionResetError:
                return
            if not chunk:
                return
            got += chunk
    await asyncio.wait_for(loop(), timeout)
    return got


async def test_stalled_handshake_closed_at_hello_timeout(gateway, pki):
    gw = tls_gateway(gateway, pki, EDGEGATE_HEARTBEAT__HELLO_TIMEOUT_MS=800)
    before = gw.metric("edgegate_handshake_failures_total")
    half = _client_hello_prefix()
    conns = []
    for port in (gw.ws_port, gw.tcp_port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(half)
        await w.drain()
        conns.append((r, w))
    await wait_until(lambda: open_conns(gw) == 2, 3, what="both sockets counted")
    t0 = time.monotonic()
    for r, w in conns:
        await _read_until_closed(r, 5)
        w.close()
    took = time.monotonic() - t0
    assert 0.5 < took < 4, f"closed after {took:.2f}s, hello timeout is 0.8 s"
    await wait_until(lambda: open_conns(gw) == 0, 5, what="connections back to 0")
    assert gw.metric("edgegate_handshake_failures_total") >= before + 2


async def test_plain_bytes_on_tls_ports(gateway, pki):
    gw = tls_gateway(gateway, pki, EDGEGATE_HEARTBEAT__HELLO_TIMEOUT_MS=3000)
    before = gw.metric("edgegate_handshake_failures_total")
    plain = {
        gw.ws_port: (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        gw.tcp_port: PREFACE + egproto.tcp_frame(egproto.encode_bin("hello", id=1, meta={"user": "x"})),
    }
    for port, data in plain.items():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(data)
        await w.drain()
        t0 = time.monotonic()
        got = await _read_until_closed(r, 5)
        w.close()
        # Answered at once (a TLS alert at most), not left to the timeout.
        assert time.monotonic() - t0 < 2.5
        assert not got or got[0] == 0x15, f"expected a TLS alert or nothing, got {got[:16]!r}"
        assert b"HTTP/1.1 101" not in got and b"welcome" not in got
    await wait_until(lambda: open_conns(gw) == 0, 5, what="connections back to 0")
    assert gw.metric("edgegate_handshake_failures_total") >= before + 2
    # The ports still serve real TLS clients afterwards.
    c = await wss(gw, pki)
    await c.hello(new_user("after"))
    await c.close()
