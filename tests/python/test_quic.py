"""QUIC transport (issue 4), tested with a client nobody here wrote: aioquic.

* ALPN ``edgegate/1``; hello/welcome, sub/pub/req/ping on the session stream
  (u32-BE framed binary envelopes, PROTOCOL.md §1);
* a QUIC client and a plain WebSocket client in one room;
* a client offering another ALPN fails its handshake; garbage datagrams on
  the UDP port are ignored; the gateway keeps serving;
* the connection limit answers ``bye`` 4007 + CONNECTION_CLOSE 4007;
* drain (SIGTERM): ``bye`` 1001, then CONNECTION_CLOSE with application
  error code 1001;
* the quic connection gauge returns to zero.

The certificate (a test CA and a leaf for 127.0.0.1 / localhost) is made
here with ``cryptography``; the client verifies the chain against the CA.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import ssl
import struct
import time

import pytest

pytest.importorskip("aioquic")

from aioquic.asyncio import connect as quic_connect  # noqa: E402
from aioquic.asyncio.protocol import QuicConnectionProtocol  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived  # noqa: E402

import egproto  # noqa: E402
from conftest import free_port  # noqa: E402
from egproto import Closed, decode_bin, tcp_frame  # noqa: E402
from helpers import new_user, session  # noqa: E402

ALPN = "edgegate/1"


# --------------------------------------------------------------------------
# certificates


def make_certs(dirpath) -> tuple[str, str, str]:
    """Writes ca.pem, chain.pem (leaf + CA) and key.pem; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgegate test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = os.path.join(dirpath, "ca.pem")
    chain_path = os.path.join(dirpath, "chain.pem")
    key_path = os.path.join(dirpath, "key.pem")
    pem = serialization.Encoding.PEM
    with open(ca_path, "wb") as f:
        f.write(ca.public_bytes(pem))
    with open(chain_path, "wb") as f:
        f.write(leaf.public_bytes(pem) + ca.public_bytes(pem))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return ca_path, chain_path, key_path


@pytest.fixture
def quic_gateway(gateway, tmp_path):
    """Factory: a gateway with QUIC on (and the ws listener), plus the CA."""
    ca, chain, key = make_certs(str(tmp_path))

    def factory(**env):
        port = free_port(socket.SOCK_DGRAM)
        gw = gateway(
            EDGEGATE_QUIC__LISTEN=f"127.0.0.1:{port}",
            EDGEGATE_TLS__CERT_CHAIN=chain,
            EDGEGATE_TLS__KEY=key,
            **env,
        )
        gw.quic_port = port
        gw.ca = ca
        return gw

    return factory


# --------------------------------------------------------------------------
# the client


class _Proto(QuicConnectionProtocol):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.buf = bytearray()
        self.more = asyncio.Event()
        self.terminated: ConnectionTerminated | None = None

    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived):
            self.buf += event.data
            self.more.set()
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
            self.more.set()


class QuicClient(egproto._Base):
    """edgegate over QUIC: one bidirectional session stream, u32 framing."""

    enc = "bin"

    def __init__(self, cm, proto: _Proto) -> None:
        super().__init__()
        self._cm = cm
        self.proto = proto
        self.stream = proto._quic.get_next_available_stream_id()

    @classmethod
    async def connect(cls, port: int, ca: str, alpn: str = ALPN,
                      timeout: float = egproto.DEFAULT_TIMEOUT) -> "QuicClient":
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[alpn],
                                server_name="localhost", idle_timeout=30.0)
        cfg.load_verify_locations(ca)
        cm = quic_connect("127.0.0.1", port, configuration=cfg, create_protocol=_Proto,
                          wait_connected=True)
        proto = await asyncio.wait_for(cm.__aenter__(), timeout)
        return cls(cm, proto)

    async def _send_envs(self, envs: list) -> None:
        await self.send_raw(b"".join(tcp_frame(e) for e in envs))

    async def send_raw(self, data: bytes) -> None:
        if self.proto.terminated is not None:
            self.send_failed = True
            return
        self.proto._quic.send_stream_data(self.stream, data)
        self.proto.transmit()

    async def _read_batch(self) -> list[dict]:
        p = self.proto
        while True:
            if len(p.buf) >= 4:
                (n,) = struct.unpack(">I", p.buf[:4])
                if len(p.buf) >= 4 + n:
                    body = bytes(p.buf[4:4 + n])
                    del p.buf[:4 + n]
                    return [decode_bin(body)]
            if p.terminated is not None:
                t = p.terminated
                raise Closed(t.error_code, t.reason_phrase)
            p.more.clear()
            await p.more.wait()

    async def close(self) -> None:
        # Leaves aioquic's connect() context: CONNECTION_CLOSE, wait, close
        # the UDP socket.
        try:
            await asyncio.wait_for(self._cm.__aexit__(None, None, None), 3)
        except Exception:
            pass

    def abort(self) -> None:
        try:
            self.proto._transport.close()
        except Exception:
            pass


async def quic_session(gw, user: str | None = None) -> QuicClient:
    c = await QuicClient.connect(gw.quic_port, gw.ca)
    await c.hello(user or new_user("q"))
    return c


async def wait_metric(gw, name: str, value: float, timeout: float = 10.0, **labels) -> float:
    deadline = time.monotonic() + timeout
    while True:
        v = gw.metric(name, **labels)
        if v == value or time.monotonic() > deadline:
            return v
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------
# tests


async def test_quic_hello_welcome_and_messages(quic_gateway):
    gw = quic_gateway()
    c = await QuicClient.connect(gw.quic_port, gw.ca)
    w = await c.hello(new_user("q"))
    assert w["meta"]["hb_ms"] > 0 and "shard" in w["meta"]
    assert gw.metric("edgegate_connections", transport="quic") == 1
    room = f"room:q{time.monotonic_ns()}"
    await c.sub(room)
    r = await c.call("pub", ch=room, d={"text": "hi over quic"})
    assert r["t"] == "ok", r
    m = await c.recv_until(lambda e: e["t"] == "msg")
    assert m["ch"] == room and m["d"] == {"text": "hi over quic"} and m["from"] == c.user
    r = await c.call("req", ch="svc:echo", d={"x": 1})
    assert r["t"] == "reply" and r["d"] == {"x": 1}, r
    await c.send("ping", id=77)
    p = await c.recv_until(lambda e: e["t"] == "pong")
    assert p.get("id") == 77
    # Several envelopes in one stream write, and a frame split over writes.
    frames = b"".join(tcp_frame(egproto.encode_bin("ping", id=i)) for i in (100, 101))
    await c.send_raw(frames[:3])
    await asyncio.sleep(0.05)
    await c.send_raw(frames[3:])
    ids = {(await c.expect("pong"))["id"], (await c.expect("pong"))["id"]}
    assert ids == {100, 101}
    await c.close()
    assert await wait_metric(gw, "edgegate_connections", 0, transport="quic") == 0


async def test_key_updates_from_either_side(quic_gateway):
    """Key updates (RFC 9001 §6) keep the session going, whichever side
    starts them. The gateway's quinn derives a key phase's keys only when a
    packet needs them (third_party/README.md), so both paths are driven: the
    gateway's own update (quinn starts one after 10 to 1 000 packets, chosen
    at random, to exercise it early) and three updates by the client in a
    row, each confirmed by a round trip in the new phase."""
    from aioquic import tls

    gw = quic_gateway()
    c = await quic_session(gw)
    pair = c.proto._quic._cryptos[tls.Epoch.ONE_RTT]
    triggers: list[str] = []
    update = pair._update_key

    def spy(trigger: str) -> None:
        triggers.append(trigger)
        update(trigger)

    pair._update_key = spy
    n = 0
    while "remote_update" not in triggers and n < 1500:
        await c.send("ping", id=n)
        assert (await c.expect("pong"))["id"] == n
        n += 1
    assert triggers == ["remote_update"], f"after {n} round trips: {triggers}"
    # RFC 9001 §6.1: no new update before a packet in the current phase is
    # acknowledged (until then the gateway reads the other phase as the old
    # one). One round trip in the phase the gateway started does that.
    await c.send("ping", id=n)
    assert (await c.expect("pong"))["id"] == n
    for k in range(3):
        phase = pair.key_phase
        c.proto._quic.request_key_update()
        for i in range(2):   # the first in the new phase; the second acks the gateway's reply
            await c.send("ping", id=10_000 + 10 * k + i)
            assert (await c.expect("pong"))["id"] == 10_000 + 10 * k + i
        assert pair.key_phase != phase
    assert triggers == ["remote_update"] + ["local_update"] * 3, triggers
    room = f"room:ku{time.monotonic_ns()}"
    await c.sub(room)
    r = await c.call("pub", ch=room, d={"after": "key updates"})
    assert r["t"] == "ok", r
    m = await c.recv_until(lambda e: e["t"] == "msg")
    assert m["d"] == {"after": "key updates"}
    await c.close()
    assert await wait_metric(gw, "edgegate_connections", 0, transport="quic") == 0


async def test_connection_ids_are_replenished_as_the_client_retires_them(quic_gateway):
    """The gateway issues three spare connection IDs (third_party/README.md:
    4 in all rather than quinn's 8), and a new one for each the client
    retires: eight switches in a row, each followed by a round trip on the
    new ID, never leave the client without a spare."""
    gw = quic_gateway()
    c = await quic_session(gw)
    quic = c.proto._quic
    await c.send("ping", id=0)
    await c.expect("pong")
    assert len(quic._peer_cid_available) == 3, [x.sequence_number for x in quic._peer_cid_available]
    seen = {quic._peer_cid.sequence_number}
    for i in range(1, 9):
        assert quic._peer_cid_available, f"no spare connection ID after {i - 1} switches"
        quic.change_connection_id()
        seen.add(quic._peer_cid.sequence_number)
        await c.send("ping", id=i)
        assert (await c.expect("pong"))["id"] == i
        await asyncio.sleep(0.05)   # the NEW_CONNECTION_ID answering the retirement
    assert len(seen) == 9, seen
    await c.close()


async def test_quic_and_ws_clients_share_a_room(quic_gateway):
    gw = quic_gateway()
    room = f"room:mix{time.monotonic_ns()}"
    q = await quic_session(gw, new_user("q"))
    ws = await session(gw, "ws-json", new_user("w"))
    await q.sub(room)
    await ws.sub(room)
    r = await q.call("pub", ch=room, d={"from": "quic"})
    assert r["t"] == "ok"
    m = await ws.recv_until(lambda e: e["t"] == "msg")
    assert m["d"] == {"from": "quic"} and m["from"] == q.user
    r = await ws.call("pub", ch=room, d={"from": "ws"})
    assert r["t"] == "ok"
    m = await q.recv_until(lambda e: e["t"] == "msg" and e["d"] == {"from": "ws"})
    assert m["from"] == ws.user
    # Direct message from the WebSocket user to the QUIC user.
    r = await ws.call("pub", ch=f"user:{q.user}", d="dm")
    assert r["t"] == "ok"
    m = await q.recv_until(lambda e: e["t"] == "msg" and e["ch"] == f"user:{q.user}")
    assert m["d"] == "dm"
    await q.close()
    await ws.close()
    assert await wait_metric(gw, "edgegate_connections", 0, transport="quic") == 0


async def test_wrong_alpn_is_refused_and_gateway_keeps_serving(quic_gateway):
    gw = quic_gateway()
    before = gw.metric("edgegate_handshake_failures_total")
    with pytest.raises((ConnectionError, asyncio.TimeoutError)):
        await QuicClient.connect(gw.quic_port, gw.ca, alpn="h3", timeout=5)
    assert await wait_metric(gw, "edgegate_handshake_failures_total", before + 1) >= before + 1
    c = await quic_session(gw)
    await c.close()
    assert await wait_metric(gw, "edgegate_connections", 0, transport="quic") == 0


async def test_garbage_datagrams_are_ignored(quic_gateway):
    gw = quic_gateway()
    c = await quic_session(gw)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rnd = __import__("random").Random(4)
        for i in range(300):
            size = rnd.choice([1, 7, 40, 600, 1200, 1350, 1500])
            data = bytearray(rnd.randbytes(size))
            if i % 3 == 0 and size >= 8:
                data[0] |= 0xC0          # looks like a long-header (Initial) packet
                data[1:5] = b"\x00\x00\x00\x01"
            s.sendto(bytes(data), ("127.0.0.1", gw.quic_port))
    finally:
        s.close()
    await asyncio.sleep(0.3)
    # The open connection still works, and new ones are accepted.
    r = await c.call("req", ch="svc:echo", d="still here")
    assert r["t"] == "reply" and r["d"] == "still here"
    c2 = await quic_session(gw)
    await c2.close()
    await c.close()
    assert await wait_metric(gw, "edgegate_connections", 0, transport="quic") == 0


async def test_connection_limit_is_bye_4007_over_quic(quic_gateway):
    gw = quic_gateway(EDGEGATE_LIMITS__MAX_CONNECTIONS=1)
    first = await quic_session(gw)
    second = await QuicClient.connect(gw.quic_port, gw.ca)
    # The session stream exists once the client sends on it (its hello).
    await second.send("hello", id=1, meta={"user": new_user("q")})
    c = await second.until_closed(timeout=10)
    byes = [e for e in c.envs if e["t"] == "bye"]
    assert byes and byes[-1]["code"] == 4007, c.envs
    assert byes[-1].get("meta", {}).get("retry_ms", 0) > 0, byes[-1]
    assert c.code == 4007, f"CONNECTION_CLOSE application code {c.code}"
    await first.close()
    assert await wait_metric(gw, "edgegate_connections", 0, transport="quic") == 0


async def test_drain_sends_bye_1001_then_connection_close_1001(quic_gateway):
    gw = quic_gateway()
    gw.expect_exit()
    clients = [await quic_session(gw) for _ in range(4)]
    gw.sigterm()
    for c in clients:
        bye = await c.expect_bye(1001, timeout=10)
        assert bye.get("meta", {}).get("retry_ms", 0) > 0, bye
        t = c.proto.terminated
        assert t is not None and t.error_code == 1001, t
    rc = await asyncio.get_running_loop().run_in_executor(None, gw.wait_exit, 15)
    assert rc == 0, gw.stderr_tail()


async def test_client_address_change_fails_safe(quic_gateway):
    """A client whose address changes lands on whichever shard its new
    4-tuple hashes to. On its own shard quinn migrates the connection; on
    another, that shard has no state for it (the packet is dropped or
    answered with a stateless reset) and the old shard closes the silent
    connection at the idle timeout. Either way nothing hangs or leaks: the
    quic gauge returns to zero and the gateway keeps serving."""
    gw = quic_gateway(EDGEGATE_HEARTBEAT__INTERVAL_MS=1000,
                      EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS=4000)
    loop = asyncio.get_running_loop()
    clients = [await quic_session(gw) for _ in range(6)]
    old_transports = [c.proto._transport for c in clients]

    async def move(c) -> str:
        # Rebind: from now on the client sends from a new UDP port (aioquic's
        # socket is a dual-stack IPv6 one; so is the new one).
        await loop.create_datagram_endpoint(lambda: c.proto, local_addr=("::", 0),
                                            family=socket.AF_INET6)
        try:
            r = await c.call("req", ch="svc:echo", d="moved", timeout=2)
        except (asyncio.TimeoutError, Closed):
            return "stranded"
        except AssertionError:
            return "closed"   # a bye (the gateway's idle check) came first
        assert r["t"] == "reply" and r["d"] == "moved", r
        return "migrated"

    outcomes = await asyncio.gather(*(move(c) for c in clients))
    print("address change:", {k: outcomes.count(k) for k in set(outcomes)})
    # Stop answering everything: the gateway must close every connection by
    # its idle timeout (2 s), whichever shard holds it.
    for c in clients:
        c.abort()
    for t in old_transports:
        t.close()
    assert await wait_metric(gw, "edgegate_connections", 0, timeout=15, transport="quic") == 0
    assert await wait_metric(gw, "edgegate_sessions", 0, timeout=5) == 0
    c = await quic_session(gw)
    r = await c.call("req", ch="svc:echo", d="fresh")
    assert r["d"] == "fresh"
    await c.close()


async def test_sighup_reload_reaches_quic(quic_gateway, tmp_path):
    """QUIC's TLS config reads the node's certificate store, so after SIGHUP
    a new QUIC handshake sees the new certificate and an open QUIC session
    goes on."""
    import shutil
    import signal
    gw = quic_gateway()
    old = await quic_session(gw)
    serial1 = old.proto._quic.tls._peer_certificate.serial_number
    # New chain and key (same CA file name in a new dir), copied over the
    # files the gateway was started with.
    newdir = tmp_path / "new"
    newdir.mkdir()
    ca2, chain2, key2 = make_certs(str(newdir))
    chain_path = gw.env["EDGEGATE_TLS__CERT_CHAIN"]
    key_path = gw.env["EDGEGATE_TLS__KEY"]
    shutil.copyfile(chain2, chain_path)
    shutil.copyfile(key2, key_path)
    gw.sigterm(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "certificate reloaded" not in gw.stderr_text():
        assert time.monotonic() < deadline, "no reload log line"
        await asyncio.sleep(0.05)
    fresh = await QuicClient.connect(gw.quic_port, ca2)
    await fresh.hello(new_user("q"))
    serial2 = fresh.proto._quic.tls._peer_certificate.serial_number
    assert serial2 != serial1
    r = await old.call("req", ch="svc:echo", d="still here")
    assert r["t"] == "reply" and r["d"] == "still here"
    await old.close()
    await fresh.close()
    assert await wait_metric(gw, "edgegate_connections", 0, transport="quic") == 0
