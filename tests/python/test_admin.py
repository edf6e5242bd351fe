"""Admin endpoints, metrics names, CLI (check-config), port conflicts."""

import asyncio
import os
import subprocess

import pytest

from conftest import BIN, http_get, make_env
from helpers import connect, session, wait_until

METRICS_ALWAYS = [
    "edgegate_connections", "edgegate_connections_accepted_total", "edgegate_sessions",
    "edgegate_messages_in_total", "edgegate_messages_out_total", "edgegate_bytes_in_total",
    "edgegate_bytes_out_total", "edgegate_writes_out_total", "edgegate_closes_total",
]


def names(gw):
    return {n for n, _, _ in gw.metrics()}


async def test_healthz_readyz(gateway):
    gw = gateway()
    assert http_get(gw.admin + "/healthz")[0] == 200
    assert http_get(gw.admin + "/readyz")[0] == 200
    st, _ = http_get(gw.admin + "/nope")
    assert st == 404


async def test_metrics_names_and_values(gateway):
    gw = gateway()
    st, text = http_get(gw.admin + "/metrics")
    assert st == 200
    ws = [await session(gw, "ws-json") for _ in range(3)]
    tcp = [await session(gw, "tcp") for _ in range(2)]
    bad = await connect(gw, "ws-json")
    await bad.send("pub", id=1, ch="room:x", d=1)
    await bad.expect_bye(4000)
    r = await ws[0].call("pub", ch=f"user:{tcp[0].user}", d="m")
    assert r["t"] == "ok"
    await tcp[0].expect("msg", d="m")

    await wait_until(lambda: gw.metric("edgegate_connections", transport="ws") == 3, what="ws gauge == 3")
    have = names(gw)
    missing = [m for m in METRICS_ALWAYS if m not in have]
    assert not missing, f"/metrics lacks {missing}; has {sorted(have)}"
    assert gw.metric("edgegate_connections", transport="tcp") == 2
    assert gw.metric("edgegate_sessions") == 5
    assert gw.metric("edgegate_connections_accepted_total", transport="ws") >= 4
    assert gw.metric("edgegate_connections_accepted_total", transport="tcp") >= 2
    assert gw.metric("edgegate_closes_total", code="4000") >= 1
    assert gw.metric("edgegate_messages_in_total") >= 7     # 5 hello + pub + bad pub
    assert gw.metric("edgegate_messages_out_total") >= 7    # 5 welcome + ok + msg
    assert gw.metric("edgegate_bytes_in_total") > 0 and gw.metric("edgegate_bytes_out_total") > 0
    shards = {lab.get("shard") for n, lab, _ in gw.metrics() if n == "edgegate_sessions"}
    assert shards and None not in shards, "edgegate_sessions must be labelled by shard"
    for c in ws + tcp:
        await c.close()
    await wait_until(lambda: gw.metric("edgegate_connections") == 0, what="gauge back to 0")
    await wait_until(lambda: gw.metric("edgegate_sessions") == 0, what="sessions back to 0")


def run_cli(args, timeout=20, **env):
    full = dict(os.environ)
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run([str(BIN), *args], env=full, capture_output=True, text=True, timeout=timeout)


def test_check_config_prints_effective_config():
    p = run_cli(["check-config"], EDGEGATE_LIMITS__MAX_FRAME_BYTES=4321,
                EDGEGATE_WS__LISTEN="127.0.0.1:18123")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "4321" in out and "127.0.0.1:18123" in out, out
    for section in ("[ws]", "[tcp]", "[limits]", "[heartbeat]"):
        assert section in out, f"{section} missing from check-config output:\n{out}"


@pytest.mark.parametrize("var,val,key", [
    ("EDGEGATE_WS__LISEN", "127.0.0.1:1", "EDGEGATE_WS__LISEN"),
    ("EDGEGATE_LIMITS__MAX_FRAME_BYTES", "abc", "limits.max_frame_bytes"),
    ("EDGEGATE_WS__LISTEN", "not-an-address", "ws.listen"),
    ("EDGEGATE_HEARTBEAT__INTERVAL_MS", "5", "heartbeat.interval_ms"),
])
def test_check_config_bad_env_names_key(var, val, key):
    p = run_cli(["check-config"], **{var: val})
    assert p.returncode != 0, f"accepted {var}={val}:\n{p.stdout}"
    msg = p.stderr + p.stdout
    assert key in msg, f"message does not name {key}: {msg!r}"
    assert "panicked" not in msg


def test_check_config_bad_key_in_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[ws]\nlisen = "127.0.0.1:1"\n')
    p = run_cli(["check-config", "--config", str(f)])
    assert p.returncode != 0
    msg = p.stderr + p.stdout
    assert "lisen" in msg and str(f) in msg, msg


def test_run_with_bad_key_exits_nonzero():
    env = make_env(EDGEGATE_LIMITS__MAX_FRAME_BYTS="1")
    p = run_cli(["run"], **env)
    assert p.returncode != 0
    assert "MAX_FRAME_BYTS" in (p.stderr + p.stdout) or "max_frame_byts" in (p.stderr + p.stdout)


@pytest.mark.parametrize("which", ["EDGEGATE_WS__LISTEN", "EDGEGATE_TCP__LISTEN", "EDGEGATE_ADMIN__LISTEN"])
async def test_second_gateway_on_same_port_fails(gateway, which):
    gw1 = gateway()
    addr = gw1.env[which]
    gw2 = gateway(_start=False, **{which: addr})
    gw2.start(wait_ready=False)
    gw2.expect_exit()
    rc = await asyncio.get_running_loop().run_in_executor(None, gw2.wait_exit, 15)
    assert rc != 0, "second gateway on the same port started"
    err = gw2.stderr_text()
    assert addr in err, f"message does not name {addr}:\n{gw2.stderr_tail()}"
    # the first one still owns every connection
    for _ in range(10):
        c = await session(gw1, "tcp" if "TCP" in which else "ws-json")
        await c.close()


async def test_admin_answers_while_idle_and_trickling_clients_hold_connections(gateway):
    """200 idle admin connections and 20 that trickle a request a byte at a
    time must not delay a health check: each probe answers within 1 s."""
    import time
    gw = gateway()
    host, port = "127.0.0.1", gw.admin_port
    idle = []
    for _ in range(200):
        _, w = await asyncio.open_connection(host, port)
        idle.append(w)
    trickle = []
    for _ in range(20):
        _, w = await asyncio.open_connection(host, port)
        w.write(b"GET /hea")
        await w.drain()
        trickle.append(w)

    async def keep_trickling():
        for _ in range(8):
            await asyncio.sleep(0.5)
            for w in trickle:
                w.write(b"l")
                await w.drain()

    trickling = asyncio.create_task(keep_trickling())
    try:
        for path in ["/healthz", "/readyz", "/metrics"] * 3:
            t0 = time.monotonic()
            st, body = await asyncio.to_thread(http_get, gw.admin + path, 1.0)
            took = time.monotonic() - t0
            assert st == 200, (path, st, body[:200])
            assert took < 1.0, f"{path} took {took:.2f} s with 220 slow admin clients"
    finally:
        trickling.cancel()
        for w in idle + trickle:
            w.close()


async def test_admin_closes_a_client_that_never_finishes_its_request(gateway):
    """A request head that never completes is dropped after the deadline,
    so slow clients cannot pile up for ever."""
    gw = gateway()
    r, w = await asyncio.open_connection("127.0.0.1", gw.admin_port)
    w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    await w.drain()
    data = await asyncio.wait_for(r.read(), timeout=10)
    assert data == b"", data
    w.close()
