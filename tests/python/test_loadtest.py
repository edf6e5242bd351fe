"""The bundled harness against the real gateway: its fan-out scenario with
lean receivers (own socket, deliveries counted in place) must account for
every delivery exactly as the client-library receivers do, on each plain
transport and encoding, and report its own CPU per delivery."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from natshelp import NatsServer, nats_server_bin

LT = Path(os.environ.get("EDGEGATE_LOADTEST_BIN", REPO / "target" / "debug" / "loadtest"))


def sent_of(r: dict) -> int:
    """Publishes written: 300/s for 2 s is 600, or a few fewer when the
    run's clock ends before the pacer's last tick; every check below is
    exact against the number actually sent."""
    n = r["sent"]
    assert 590 <= n <= 600, n
    return n


def fanout(gw, tmp_path, *args: str) -> dict:
    assert LT.exists(), f"loadtest binary not found at {LT} (cargo build --workspace)"
    out = tmp_path / "fanout.json"
    p = subprocess.run(
        [str(LT), "fanout", "--subscribers", "30", "--publishers", "3", "--rate", "300",
         "--duration", "2", "--size", "40", "--admin", f"127.0.0.1:{gw.admin_port}",
         "--gateway-pid", str(gw.proc.pid), "--quiet", "--json", str(out), *args],
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"loadtest failed:\n{p.stdout}\n{p.stderr}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("transport,encoding,receiver", [
    ("ws", "json", "lean"), ("ws", "bin", "lean"), ("tcp", "bin", "lean"),
    ("ws", "json", "client"), ("sse", "json", "lean"), ("sse", "json", "client"),
])
def test_fanout_accounts_for_every_delivery(gateway, tmp_path, transport, encoding, receiver):
    gw = gateway()
    port = gw.tcp_port if transport == "tcp" else gw.ws_port
    r = fanout(gw, tmp_path, "--transport", transport, "--encoding", encoding,
               "--target", f"127.0.0.1:{port}", "--receiver", receiver)
    assert r["params"]["receiver"] == receiver
    if transport == "sse":
        # The subscribers' streams are SSE (the publishers speak WebSocket).
        assert r["params"]["transport"] == "sse"
        assert gw.metric("edgegate_connections_accepted_total", transport="sse") >= 30
    n = sent_of(r)
    assert r["expected_deliveries"] == 30 * n
    assert (r["received"], r["unique"], r["lost"]) == (30 * n, 30 * n, 0), r
    assert (r["duplicates"], r["order_violations"], r["malformed"]) == (0, 0, 0), r
    assert r["latency"]["count"] == 30 * n
    # The gateway sent at least what the harness counted (welcome, ok and
    # heartbeat envelopes besides).
    assert gw.metric("edgegate_messages_out_total") >= 30 * n + n + 30 + 33
    # Envelopes per write over the phase: each write carried at least one.
    epw = r["gateway_envelopes_per_write"]
    assert epw is not None and epw >= 1.0, epw
    assert gw.metric("edgegate_writes_out_total") <= gw.metric("edgegate_messages_out_total")
    assert r["harness_cpu_us_per_delivery"] > 0
    assert r["gateway_cpu_us_per_delivery"] > 0
    # Each side's share, user and system apart, adds up to its whole.
    for side in ("harness", "gateway"):
        user, system = r[f"{side}_cpu_user_us_per_delivery"], r[f"{side}_cpu_sys_us_per_delivery"]
        assert user >= 0 and system >= 0, (side, user, system)
        assert user + system == pytest.approx(r[f"{side}_cpu_us_per_delivery"], rel=1e-6), side


def test_fanout_over_many_small_rooms(gateway, tmp_path):
    """fanout --rooms N --rooms-per-subscriber R: 40 subscribers in 8 rooms
    of 10 (each in 2), 8 publishers, one room each: every member gets every
    message of its rooms once and in order, so the expected deliveries are
    10 per message sent; impossible shapes are refused."""
    gw = gateway()
    out = tmp_path / "fanout.json"
    base = [str(LT), "fanout", "--publishers", "8", "--rate", "300", "--duration", "2",
            "--target", f"127.0.0.1:{gw.ws_port}", "--admin", f"127.0.0.1:{gw.admin_port}",
            "--gateway-pid", str(gw.proc.pid), "--quiet", "--json", str(out)]
    p = subprocess.run(base + ["--subscribers", "40", "--rooms", "8", "--rooms-per-subscriber", "2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"loadtest failed:\n{p.stdout}\n{p.stderr}"
    r = json.loads(out.read_text())
    assert (r["params"]["rooms"], r["params"]["members"]) == (8, 10), r["params"]
    n = sent_of(r)
    assert r["expected_deliveries"] == 10 * n
    assert (r["received"], r["unique"], r["lost"]) == (10 * n, 10 * n, 0), r
    assert (r["duplicates"], r["order_violations"], r["malformed"]) == (0, 0, 0), r
    # 41 subscriptions do not split into rooms of equal size.
    p = subprocess.run(base + ["--subscribers", "41", "--rooms", "8", "--rooms-per-subscriber", "2"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "multiple of N" in p.stderr, p.stderr


@pytest.mark.parametrize("transport", ["ws", "tcp"])
def test_lean_receivers_over_tls(gateway, tmp_path, transport):
    """--tls with lean receivers: the subscribers read WSS (or raw TCP over
    TLS) in place, so TLS fan-out is measured without the client library;
    every delivery is accounted for as over plain text."""
    from test_tls import Pki, tls_gateway

    pki = Pki(tmp_path / "pki")
    gw = tls_gateway(gateway, pki)
    port = gw.tcp_port if transport == "tcp" else gw.ws_port
    r = fanout(gw, tmp_path, "--transport", transport, "--tls", "--ca", str(pki.ca_path),
               "--target", f"127.0.0.1:{port}", "--receiver", "lean")
    assert r["params"]["receiver"] == "lean" and r["params"]["tls"] is True, r["params"]
    n = sent_of(r)
    assert (r["received"], r["unique"], r["lost"]) == (30 * n, 30 * n, 0), r
    assert (r["duplicates"], r["order_violations"], r["malformed"]) == (0, 0, 0), r
    assert gw.metric("edgegate_connections_accepted_total", transport=("tcp" if transport == "tcp" else "ws")) >= 33


def test_lean_receivers_over_quic(gateway, tmp_path):
    """--transport quic with lean receivers: each subscriber reads its QUIC
    session stream in place (the raw-TCP framing, no preface), so QUIC
    fan-out is measured without the client library; every delivery is
    accounted for as over TCP."""
    import socket

    from conftest import free_port
    from test_quic import make_certs

    ca, chain, key = make_certs(str(tmp_path))
    port = free_port(socket.SOCK_DGRAM)
    gw = gateway(EDGEGATE_QUIC__LISTEN=f"127.0.0.1:{port}", EDGEGATE_TLS__CERT_CHAIN=chain,
                 EDGEGATE_TLS__KEY=key)
    r = fanout(gw, tmp_path, "--transport", "quic", "--ca", ca,
               "--target", f"127.0.0.1:{port}", "--receiver", "lean")
    assert r["params"]["receiver"] == "lean" and r["params"]["transport"] == "quic", r["params"]
    n = sent_of(r)
    assert (r["received"], r["unique"], r["lost"]) == (30 * n, 30 * n, 0), r
    assert (r["duplicates"], r["order_violations"], r["malformed"]) == (0, 0, 0), r
    assert r["latency"]["count"] == 30 * n
    assert gw.metric("edgegate_connections_accepted_total", transport="quic") >= 33


def test_idle_sse_connections(gateway, tmp_path):
    """idle --transport sse: every connection an SSE stream, held open (the
    heartbeat comments answered), memory per connection reported."""
    gw = gateway(EDGEGATE_HEARTBEAT__INTERVAL_MS=500, EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS=1500)
    out = tmp_path / "idle.json"
    p = subprocess.run(
        [str(LT), "idle", "--transport", "sse", "--connections", "200", "--rate", "400",
         "--hold-secs", "3", "--target", f"127.0.0.1:{gw.ws_port}", "--admin",
         f"127.0.0.1:{gw.admin_port}", "--gateway-pid", str(gw.proc.pid), "--quiet",
         "--json", str(out)],
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"loadtest failed:\n{p.stdout}\n{p.stderr}"
    r = json.loads(out.read_text())
    assert r["params"]["transport"] == "sse", r["params"]
    assert r["connected"] == 200 and r["failed"] == 0, r
    # Held past twice the idle timeout: the comments were answered.
    assert r["dropped_during_run"] == 0 and r["alive_after_hold"] == 200, r
    assert r["gateway_rss_per_conn_kib"] > 0, r


def test_idle_connections_join_rooms(gateway, tmp_path):
    """idle --rooms R --members M: each connection joins R rooms before it
    counts as connected, and every room gets M distinct members (seen by
    the server API's presence query while the connections are held)."""
    from apihelp import Api, api_env

    gw = gateway(**api_env())
    out = tmp_path / "idle.json"
    p = subprocess.Popen(
        [str(LT), "idle", "--transport", "ws", "--connections", "100", "--rate", "400",
         "--hold-secs", "6", "--rooms", "4", "--members", "10",
         "--target", f"127.0.0.1:{gw.ws_port}", "--admin", f"127.0.0.1:{gw.admin_port}",
         "--gateway-pid", str(gw.proc.pid), "--quiet", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        api = Api(gw)
        deadline = time.monotonic() + 30
        totals = []
        while time.monotonic() < deadline:
            totals = [api.call("presence", {"ch": f"room:idle-{k}"})[1].get("total") for k in range(40)]
            if totals == [10] * 40:
                break
            time.sleep(0.2)
        assert totals == [10] * 40, totals
        assert api.call("presence", {"ch": "room:idle-40"})[1]["total"] == 0
        api.close()
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, f"loadtest failed:\n{stdout}\n{stderr}"
    r = json.loads(out.read_text())
    assert r["connected"] == 100 and r["failed"] == 0, r
    assert r["subscriptions"] == 400 and r["params"]["rooms"] == 40, r
    assert r["alive_after_hold"] == 100, r


def test_lean_receivers_inflate_compressed_deliveries(gateway, tmp_path):
    """With --deflate the lean subscribers negotiate permessage-deflate and
    inflate what the gateway compressed once per shard: every delivery is
    still accounted for, and the gateway did compress."""
    gw = gateway(EDGEGATE_WS__COMPRESSION_MIN_BYTES=64)
    r = fanout(gw, tmp_path, "--target", f"127.0.0.1:{gw.ws_port}", "--deflate")
    assert r["params"]["deflate"] is True
    n = sent_of(r)
    assert (r["received"], r["unique"], r["lost"], r["malformed"]) == (30 * n, 30 * n, 0, 0), r
    assert (r["duplicates"], r["order_violations"]) == (0, 0)
    compressions = gw.metric("edgegate_ws_deflate_compressions_total")
    # Once per message and shard (2 shards), not once per subscriber.
    assert n <= compressions <= 2 * n + 100, compressions
    out = gw.metric("edgegate_ws_deflate_bytes_total", dir="out", form="compressed")
    assert out > 0


def test_lean_receivers_report_a_drain(gateway, tmp_path):
    """A gateway drained mid-run (SIGTERM) says goodbye to every lean
    subscriber: the harness reports each close with the gateway's code
    instead of hanging or counting what never came."""
    gw = gateway(EDGEGATE_DRAIN__WINDOW_MS=500)
    out = tmp_path / "fanout.json"
    p = subprocess.Popen(
        [str(LT), "fanout", "--subscribers", "20", "--publishers", "1", "--rate", "200",
         "--duration", "6", "--drain-secs", "1", "--target", f"127.0.0.1:{gw.ws_port}",
         "--gateway-pid", str(gw.proc.pid), "--quiet", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while gw.metric("edgegate_messages_out_total") < 20 * 100 and time.monotonic() < deadline:
        time.sleep(0.1)
    gw.expect_exit()
    gw.sigterm()
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, f"loadtest failed:\n{stdout}\n{stderr}"
    r = json.loads(out.read_text())
    assert r["params"]["receiver"] == "lean"
    # Publishing was cut short by the drain (6 s at 200/s would be 1 200),
    # and what was sent before it was delivered, or counted as lost.
    assert 0 < r["sent"] < 1200, r["sent"]
    assert 0 < r["received"] <= r["expected_deliveries"]
    assert r["disconnects"] == 21, r["disconnect_reasons"]
    lean = {k: v for k, v in r["disconnect_reasons"].items() if "1001" in k}
    assert sum(lean.values()) >= 20, r["disconnect_reasons"]


def test_nats_dialect_against_nats_server(tmp_path):
    """The comparison mode: the same fan-out, spoken as NATS over
    WebSocket to a real nats-server, accounts for every delivery."""
    if not nats_server_bin():
        if os.environ.get("EG_REQUIRE_NATS") == "1":
            pytest.fail("EG_REQUIRE_NATS=1 but nats-server is missing", pytrace=False)
        pytest.skip("nats-server not installed")
    ns = NatsServer(tmp_path, "lt", websocket=True).start()
    try:
        out = tmp_path / "nats.json"
        p = subprocess.run(
            [str(LT), "fanout", "--dialect", "nats", "--subscribers", "30", "--publishers", "3",
             "--rate", "300", "--duration", "2", "--size", "40", "--room", "lt-nats",
             "--target", f"127.0.0.1:{ns.ws_port}", "--gateway-pid", str(ns.proc.pid),
             "--quiet", "--json", str(out)],
            capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"loadtest failed:\n{p.stdout}\n{p.stderr}"
        r = json.loads(out.read_text())
        assert r["params"]["dialect"] == "nats"
        n = sent_of(r)
        assert (r["received"], r["unique"], r["lost"], r["malformed"]) == (30 * n, 30 * n, 0, 0), r
        assert (r["duplicates"], r["order_violations"]) == (0, 0)
        # nats-server's own counters agree: n published, 30 × n delivered.
        varz = ns.monitor("/varz")
        assert (varz["in_msgs"], varz["out_msgs"]) == (n, 30 * n), varz
    finally:
        ns.stop()
