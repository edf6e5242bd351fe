#!/usr/bin/env python3
"""QUIC benchmarks of issue 4 (docs/bench-notes.md, "QUIC (issue 4)").

Starts the gateway (release binary by default) with QUIC on 127.0.0.1 and a
test certificate made here, then:

  idle  N   opens N idle QUIC sessions (hello/welcome each) with aioquic and
            reports the gateway's RSS per connection and its CPU while idle;
  rate      K clients per transport (QUIC, then WebSocket binary), each
            sending `req svc:echo` back to back for T seconds: requests per
            second and round-trip latency percentiles.

Bounded: fixed counts, fixed durations, loopback only; the gateway it
started is stopped by its PID. The clients are Python (aioquic,
websockets): they, not the gateway, set the rate ceiling on 2 shared cores.

  .venv/bin/python scripts/bench_quic.py idle --conns 2000
  .venv/bin/python scripts/bench_quic.py rate --clients 8 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))

import egproto  # noqa: E402
from test_quic import QuicClient, make_certs  # noqa: E402


def free_port(kind: int) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime + stime


class Gw:
    def __init__(self, binary: str, tmp: str, shards: int) -> None:
        ca, chain, key = make_certs(tmp)
        self.ca = ca
        self.quic_port = free_port(socket.SOCK_DGRAM)
        self.ws_port = free_port(socket.SOCK_STREAM)
        self.admin_port = free_port(socket.SOCK_STREAM)
        env = dict(os.environ)
        env.update({
            "EDGEGATE_WS__LISTEN": f"127.0.0.1:{self.ws_port}",
            "EDGEGATE_QUIC__LISTEN": f"127.0.0.1:{self.quic_port}",
            "EDGEGATE_ADMIN__LISTEN": f"127.0.0.1:{self.admin_port}",
            "EDGEGATE_TLS__CERT_CHAIN": chain,
            "EDGEGATE_TLS__KEY": key,
            "EDGEGATE_SHARDS__COUNT": str(shards),
            "RUST_LOG": "warn",
        })
        self.err = open(os.path.join(tmp, "gw.stderr"), "wb")
        self.proc = subprocess.Popen([binary, "run"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=self.err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise SystemExit("gateway not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.err.close()


async def idle(gw: Gw, n: int, settle: float) -> None:
    pid = gw.proc.pid
    await asyncio.sleep(1.0)
    base = rss_kb(pid)
    clients = []
    t0 = time.monotonic()
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with sem:
            c = await QuicClient.connect(gw.quic_port, gw.ca, timeout=30)
            await c.hello(f"idle{i}", timeout=30)
            clients.append(c)

    await asyncio.gather(*(one(i) for i in range(n)))
    opened = time.monotonic() - t0
    await asyncio.sleep(settle)
    after = rss_kb(pid)
    c0 = cpu_ticks(pid)
    await asyncio.sleep(10)
    c1 = cpu_ticks(pid)
    hz = os.sysconf("SC_CLK_TCK")
    print(f"idle QUIC sessions: {len(clients)} opened in {opened:.1f} s")
    print(f"gateway RSS: {base} kB before, {after} kB with {n} idle (+{after - base} kB)")
    print(f"RSS per idle QUIC connection: {(after - base) * 1024 / n / 1000:.1f} KB")
    print(f"gateway CPU while idle (10 s): {(c1 - c0) / hz / 10 * 100:.1f} %")
    await asyncio.gather(*(c.close() for c in clients))


async def rate(gw: Gw, k: int, seconds: float) -> None:
    async def run(kind: str) -> None:
        if kind == "quic":
            clients = [await QuicClient.connect(gw.quic_port, gw.ca) for _ in range(k)]
        else:
            clients = [await egproto.WsClient.connect(f"ws://127.0.0.1:{gw.ws_port}/ws", enc="bin")
                       for _ in range(k)]
        for i, c in enumerate(clients):
            await c.hello(f"{kind}{i}")
        rtts: list[float] = []
        stop = time.monotonic() + seconds

        async def loop(c) -> None:
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = await c.call("req", ch="svc:echo", d="x" * 64)
                rtts.append(time.perf_counter() - t)
                assert r["t"] == "reply", r
        t0 = time.monotonic()
        g0, m0 = cpu_ticks(gw.proc.pid), cpu_ticks(os.getpid())
        await asyncio.gather(*(loop(c) for c in clients))
        el = time.monotonic() - t0
        hz = os.sysconf("SC_CLK_TCK")
        g_cpu = (cpu_ticks(gw.proc.pid) - g0) / hz / el * 100
        c_cpu = (cpu_ticks(os.getpid()) - m0) / hz / el * 100
        rtts.sort()
        q = lambda p: rtts[min(len(rtts) - 1, int(p * len(rtts)))] * 1e3  # noqa: E731
        print(f"{kind:4}: {k} clients, {len(rtts)} req/reply in {el:.1f} s = "
              f"{len(rtts) / el:,.0f} round trips/s; RTT p50 {q(0.5):.2f} ms, "
              f"p99 {q(0.99):.2f} ms, max {rtts[-1] * 1e3:.2f} ms; "
              f"CPU: gateway {g_cpu:.0f} %, client {c_cpu:.0f} % (of one core)")
        await asyncio.gather(*(c.close() for c in clients))
        await asyncio.sleep(0.5)

    await run("quic")
    await run("ws")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["idle", "rate"])
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "edgegate"))
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--settle", type=float, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gw = Gw(a.bin, tmp, a.shards)
        try:
            if a.mode == "idle":
                asyncio.run(idle(gw, a.conns, a.settle))
            else:
                asyncio.run(rate(gw, a.clients, a.seconds))
        finally:
            gw.stop()


if __name__ == "__main__":
    main()
