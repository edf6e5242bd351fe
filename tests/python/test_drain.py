"""Lame-duck drain and the admin endpoints of issue 6.

* SIGTERM with N clients connected: the closes are spread over
  `drain.window_ms` (the measured distribution is printed and recorded in
  docs/bench-notes.md, "Drain"), every close is `bye` 1001 with `retry_ms`,
  and the process exits 0.
* `POST /drain` starts the same drain, behind `admin.token`.
* `GET /connz` lists connections with paging, behind `admin.token`.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.error
import urllib.request

from conftest import http_get
from helpers import connect, new_user, session

N_CLIENTS = 300
WINDOW_MS = 3000
TOKEN = "admin-test-token"


def http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def _open_clients(gw, n: int) -> list:
    kinds = ("tcp", "ws-json", "ws-bin")
    clients = []
    for i in range(0, n, 50):
        clients += await asyncio.gather(*(session(gw, kinds[(i + k) % 3], new_user("d"))
                                          for k in range(min(50, n - i))))
    return clients


async def _byes(clients, t0_holder: list, timeout: float) -> list[tuple[float, dict]]:
    async def one(c):
        bye = await c.expect_bye(1001, timeout=timeout)
        return time.monotonic(), bye
    got = await asyncio.gather(*(one(c) for c in clients))
    return [(t - t0_holder[0], b) for t, b in got]


async def test_sigterm_spreads_closes_over_the_window(gateway):
    gw = gateway(EDGEGATE_DRAIN__WINDOW_MS=WINDOW_MS, EDGEGATE_DRAIN__TIMEOUT_MS=10000)
    gw.expect_exit()
    clients = await _open_clients(gw, N_CLIENTS)
    t0 = [0.0]
    waiter = asyncio.create_task(_byes(clients, t0, timeout=15))
    await asyncio.sleep(0.2)
    t0[0] = time.monotonic()
    gw.sigterm()
    # /readyz turns 503 while draining.
    await asyncio.sleep(0.3)
    st, body = http_get(gw.admin + "/readyz")
    assert st == 503 and "draining" in body, (st, body)
    results = await waiter
    rc = await asyncio.get_running_loop().run_in_executor(None, gw.wait_exit, 15)
    total = time.monotonic() - t0[0]
    assert rc == 0, f"exit code {rc}"

    times = sorted(t for t, _ in results)
    retries = [b["meta"]["retry_ms"] for _, b in results]
    assert all(b["code"] == 1001 for _, b in results)
    assert all(isinstance(r, int) and r > 0 for r in retries), retries[:10]
    q = statistics.quantiles(times, n=10)
    buckets = [0] * 8
    for t in times:
        buckets[min(int(t / (WINDOW_MS / 1000 / 6)), 7)] += 1
    print(f"\ndrain: {N_CLIENTS} clients, window {WINDOW_MS} ms: first {times[0] * 1000:.0f} ms, "
          f"p10 {q[0] * 1000:.0f}, p50 {q[4] * 1000:.0f}, p90 {q[8] * 1000:.0f}, "
          f"last {times[-1] * 1000:.0f} ms; per {WINDOW_MS // 6} ms bucket: {buckets}; "
          f"retry_ms min {min(retries)} median {statistics.median(retries):.0f} max {max(retries)}; "
          f"exit {total * 1000:.0f} ms after SIGTERM")
    w = WINDOW_MS / 1000
    # Spread, not a wave: each sixth of the window gets a fair share
    # (expected 1/6 each; at least a third of that, at most twice), and
    # nothing closes after the window (plus tick and scheduling slack).
    for b in buckets[:6]:
        assert N_CLIENTS / 18 <= b <= N_CLIENTS / 3, buckets
    assert times[-1] <= w + 0.7, f"last close {times[-1]:.2f} s after SIGTERM"
    assert q[0] < 0.3 * w and q[8] > 0.7 * w, q
    # The jitter spreads the comeback too: retry_ms spans [base/2, 3 base/2).
    assert max(retries) - min(retries) > 1000, (min(retries), max(retries))


async def test_admin_drain_endpoint(gateway):
    gw = gateway(EDGEGATE_ADMIN__TOKEN=TOKEN, EDGEGATE_DRAIN__WINDOW_MS=500)
    gw.expect_exit()
    clients = await _open_clients(gw, 10)
    st, _ = http(gw.admin + "/drain", "POST")
    assert st == 401
    st, _ = http(gw.admin + "/drain", "POST", token="wrong")
    assert st == 401
    st, _ = http(gw.admin + "/drain", "GET", token=TOKEN)
    assert st in (404, 405)
    assert http_get(gw.admin + "/readyz")[0] == 200, "a refused drain request drained"
    st, body = http(gw.admin + "/drain", "POST", token=TOKEN)
    assert st == 202, (st, body)
    for c in clients:
        bye = await c.expect_bye(1001, timeout=5)
        assert bye["meta"]["retry_ms"] > 0
    rc = await asyncio.get_running_loop().run_in_executor(None, gw.wait_exit, 15)
    assert rc == 0


async def test_connz_lists_connections_with_paging(gateway):
    gw = gateway(EDGEGATE_ADMIN__TOKEN=TOKEN)
    users = [new_user("cz") for _ in range(5)]
    clients = [await session(gw, kind, u) for kind, u in zip(("tcp", "ws-json", "ws-bin", "tcp", "tcp"), users)]
    await clients[0].sub(f"room:{users[0]}")
    st, _ = http(gw.admin + "/connz")
    assert st == 401
    st, body = http(gw.admin + "/connz?limit=1000", token=TOKEN)
    assert st == 200, body
    page = json.loads(body)
    assert page["total"] == 5 and len(page["conns"]) == 5
    by_user = {c["user"]: c for c in page["conns"]}
    assert set(by_user) == set(users)
    first = by_user[users[0]]
    assert first["transport"] == "tcp" and first["subscriptions"] == 2
    assert by_user[users[1]]["transport"] == "ws"
    for c in page["conns"]:
        assert c["peer"].startswith("127.0.0.1:") and c["age_ms"] >= 0 and c["queue_bytes"] >= 0
        assert c["shard"] in (0, 1) and c["conn"]
    # Pages partition the list, across shards.
    seen = []
    for off in range(0, 6, 2):
        st, body = http(gw.admin + f"/connz?offset={off}&limit=2", token=TOKEN)
        p = json.loads(body)
        assert p["total"] == 5 and p["offset"] == off and p["limit"] == 2
        seen += [c["conn"] for c in p["conns"]]
    assert sorted(seen) == sorted(c["conn"] for c in page["conns"])
    st, _ = http(gw.admin + "/connz?limit=x", token=TOKEN)
    assert st == 400
    # Per-shard / per-transport counts and limits in /metrics.
    names = {n for n, _, _ in gw.metrics()}
    for name in ("edgegate_connections", "edgegate_limit_hits_total", "edgegate_auth_failures_total",
                 "edgegate_draining", "edgegate_backbone_up"):
        assert name in names, name
    assert gw.metric("edgegate_connections", transport="ws") == 2
