"""Fixtures: start the real edgegate binary on free ports.

``gateway(**env)`` starts a process (extra env overrides as keyword
arguments, e.g. ``gateway(EDGEGATE_LIMITS__MAX_CONNECTIONS=3)``), waits for
admin /readyz, and returns a ``Gateway``.  At teardown every gateway still
running gets SIGTERM (by its PID), must exit 0 within the drain bound, and
must not have panicked; a gateway that died during the test fails it unless
the test said so (``gw.expect_exit()``).  stderr goes to a file whose tail is
attached to failure reports.

Async tests: ``async def test_...`` functions are run with asyncio.run
(no plugin needed), under an overall timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import egproto

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("EDGEGATE_BIN", REPO / "target" / "debug" / "edgegate"))
ASYNC_TEST_TIMEOUT = float(os.environ.get("EG_ASYNC_TEST_TIMEOUT", "90"))


_ISSUED: set[int] = set()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 now and never handed out before in this test
    run: ports are picked before anything listens on them (a cluster's nine
    are all picked first), and the kernel may give the same free port to
    two binds in a row (CI saw a nats-server's client port equal another
    node's route port)."""
    for _ in range(1000):
        s = socket.socket(socket.AF_INET, kind)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in _ISSUED:
            _ISSUED.add(port)
            return port
    raise AssertionError("no fresh free port on 127.0.0.1")


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            labels_s, value_s = rest.rsplit("}", 1)
            labels = {}
            for part in _split_labels(labels_s):
                k, v = part.split("=", 1)
                labels[k.strip()] = v.strip().strip('"')
        else:
            name, value_s = line.split(None, 1)
            labels = {}
        value_s = value_s.split()[0]
        out.append((name.strip(), labels, float(value_s)))
    return out


def _split_labels(s: str) -> list[str]:
    parts, cur, inq = [], "", False
    for ch in s:
        if ch == '"':
            inq = not inq
        if ch == "," and not inq:
            if cur.strip():
                parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


class Gateway:
    def __init__(self, env: dict, workdir: Path, name: str) -> None:
        self.ws_port = int(env["EDGEGATE_WS__LISTEN"].rsplit(":", 1)[1]) if env.get("EDGEGATE_WS__LISTEN") else None
        self.tcp_port = int(env["EDGEGATE_TCP__LISTEN"].rsplit(":", 1)[1]) if env.get("EDGEGATE_TCP__LISTEN") else None
        self.admin_port = int(env["EDGEGATE_ADMIN__LISTEN"].rsplit(":", 1)[1])
        self.env = env
        self.stderr_path = workdir / f"{name}.stderr"
        self.stdout_path = workdir / f"{name}.stdout"
        self.proc: subprocess.Popen | None = None
        self.exit_expected = False

    # --- addresses
    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    # --- process
    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> "Gateway":
        assert BIN.exists(), f"edgegate binary not found at {BIN} (cargo build, or set EDGEGATE_BIN)"
        full = dict(os.environ)
        full.update(self.env)
        self._err = open(self.stderr_path, "wb")
        self._out = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen([str(BIN), "run"], env=full, stdout=self._out,
                                     stderr=self._err, stdin=subprocess.DEVNULL)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"edgegate exited with {self.proc.returncode} before ready:\n{self.stderr_tail()}")
            try:
                st, _ = http_get(self.admin + "/readyz", timeout=1)
                if st == 200:
                    return
                last = st
            except OSError as e:
                last = e
            time.sleep(0.05)
        why = self._not_ready_why()
        raise AssertionError(f"edgegate not ready after {timeout}s (last: {last}):\n{self.stderr_tail()}\n{why}")

    def _not_ready_why(self) -> str:
        """What a gateway that never became ready was doing: /readyz's body,
        the readiness metrics and, with gdb, every thread's stack (saved
        beside its stderr)."""
        out = []
        try:
            _, body = http_get(self.admin + "/readyz", timeout=1)
            out.append(f"readyz: {body[:300]!r}")
        except OSError as e:
            out.append(f"readyz: {e}")
        if shutil.which("gdb"):
            stacks = self.stderr_path.with_suffix(".stacks.txt")
            try:
                r = subprocess.run(["gdb", "-p", str(self.proc.pid), "-batch", "-ex", "thread apply all bt 30"],
                                   capture_output=True, text=True, timeout=60)
                stacks.write_text(r.stdout + r.stderr)
                out.append(f"thread stacks in {stacks}:\n{r.stdout[-6000:]}")
            except (OSError, subprocess.SubprocessError) as e:
                out.append(f"gdb: {e}")
        return "\n".join(out)

    def stderr_tail(self, n: int = 60) -> str:
        try:
            lines = self.stderr_path.read_text("utf-8", "replace").splitlines()
        except OSError:
            return "<no stderr>"
        return "\n".join(lines[-n:])

    def stderr_text(self) -> str:
        return self.stderr_path.read_text("utf-8", "replace")

    def expect_exit(self) -> None:
        self.exit_expected = True

    def sigterm(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    # --- admin
    def metrics(self) -> list[tuple[str, dict, float]]:
        st, text = http_get(self.admin + "/metrics")
        assert st == 200, f"/metrics answered {st}"
        return parse_metrics(text)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric over every series whose labels include ``labels``."""
        total = 0.0
        for n, lab, v in self.metrics():
            if n == name and all(lab.get(k) == str(val) for k, val in labels.items()):
                total += v
        return total

    def stop(self) -> list[str]:
        """Teardown: returns a list of problems (empty = fine)."""
        problems = []
        if self.proc is None:
            return problems
        rc = self.proc.poll()
        if rc is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                rc = self.proc.wait(15)
                if rc != 0:
                    problems.append(f"exit code {rc} after SIGTERM (expected 0)")
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                problems.append("did not exit within 15 s of SIGTERM (killed)")
        elif not self.exit_expected:
            problems.append(f"gateway exited on its own during the test (code {rc})")
        for f in (self._err, self._out):
            f.close()
        text = self.stderr_text()
        if "panicked" in text:
            problems.append("gateway stderr contains a panic")
        return problems


def make_env(**extra) -> dict:
    env = {
        "EDGEGATE_WS__LISTEN": f"127.0.0.1:{free_port()}",
        "EDGEGATE_TCP__LISTEN": f"127.0.0.1:{free_port()}",
        "EDGEGATE_ADMIN__LISTEN": f"127.0.0.1:{free_port()}",
        "EDGEGATE_QUIC__LISTEN": "",
        "EDGEGATE_SHARDS__COUNT": "2",
    }
    for k, v in extra.items():
        env[k] = str(v)
    return env


@pytest.fixture
def gateway(request, tmp_path):
    """Factory: ``gw = gateway(EDGEGATE_X__Y=..., ...)`` starts and waits ready.
    Pass ``_start=False`` to get an unstarted Gateway."""
    started: list[Gateway] = []
    request.node._gateways = started

    def factory(_start: bool = True, _wait_ready: bool = True, **env) -> Gateway:
        gw = Gateway(make_env(**env), tmp_path, f"gateway{len(started)}")
        started.append(gw)
        if _start:
            gw.start(wait_ready=_wait_ready)
        return gw

    yield factory
    problems = []
    for i, gw in enumerate(started):
        for p in gw.stop():
            problems.append(f"gateway{i}: {p}\n--- stderr tail ---\n{gw.stderr_tail()}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and call.when == "call":
        for i, gw in enumerate(getattr(item, "_gateways", [])):
            rep.sections.append((f"gateway{i} stderr (tail)", gw.stderr_tail()))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        funcargs = pyfuncitem.funcargs
        args = {a: funcargs[a] for a in pyfuncitem._fixtureinfo.argnames}
        async def runner():
            try:
                await asyncio.wait_for(pyfuncitem.obj(**args), ASYNC_TEST_TIMEOUT)
            finally:
                egproto.abort_all_clients()
        asyncio.run(runner())
        return True
    return None
