"""scripts/nats-cluster.sh: the three-node NATS cluster with JetStream that
operators (and the NATS-backed history of issue 11) run on. A replicas-3
stream keeps taking acknowledged writes with one node SIGKILLed, drops a
repeated Nats-Msg-Id inside its duplicate window, and the node comes back
with the same data."""

import asyncio
import os
import random
import socket
import subprocess
import time

import pytest

from conftest import REPO
from natshelp import nats_server_bin

SCRIPT = REPO / "scripts" / "nats-cluster.sh"

nats = pytest.importorskip("nats")


def sh(*args: str) -> str:
    p = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"nats-cluster.sh {' '.join(args)}:\n{p.stdout}\n{p.stderr}"
    return p.stdout.strip()


def _free_block(tries: int = 50) -> int:
    """A base port whose nine ports (clients, routes, monitoring) are all free
    right now on 127.0.0.1."""
    for _ in range(tries):
        base = random.randrange(10000, 20000, 10)
        ports = [base + off + n for off in (0, 1000, 4000) for n in range(3)]
        socks = []
        try:
            for p in ports:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free block of cluster ports in 10000..24002")


def logs(d) -> str:
    out = []
    for n in (1, 2, 3):
        try:
            tail = (d / f"n{n}.log").read_text("utf-8", "replace").splitlines()[-15:]
        except OSError:
            tail = ["<no log>"]
        out.append(f"--- n{n}.log (tail)\n" + "\n".join(tail))
    return "\n".join(out)


@pytest.fixture
def cluster(tmp_path):
    if not nats_server_bin():
        if os.environ.get("EG_REQUIRE_NATS") == "1":
            pytest.fail("EG_REQUIRE_NATS=1 but nats-server is missing", pytrace=False)
        pytest.skip("nats-server not installed")
    d = tmp_path / "cluster"
    # Ports base..base+2 (clients), +1000 (routes), +4000 (monitoring).
    urls = sh("start", str(d), str(_free_block()))
    try:
        yield d, urls.split(",")
    finally:
        sh("stop", str(d))


async def until_ok(what: str, d, op, deadline_s: float = 30.0):
    """``op()`` retried while the cluster elects leaders or the client moves
    to a live node (timeouts, no responders, 503s): a node was just killed or
    restarted."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return await op()
        except nats.errors.Error as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still {e!r} after {deadline_s}s\n{logs(d)}") from e
            await asyncio.sleep(0.2)


async def replicated_writes(d, urls):
    nc = await nats.connect(servers=urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        await until_ok("add_stream", d, lambda: js.add_stream(
            name="egtest", subjects=["egtest.>"], num_replicas=3, duplicate_window=60))

        async def write(i):
            ack = await until_ok(f"publish {i}", d, lambda: js.publish(
                "egtest.a", f"m{i}".encode(), headers={"Nats-Msg-Id": f"id{i}"}, timeout=1))
            # A retry after a lost ack is answered as a duplicate of the first.
            assert ack.seq == i + 1, (i, ack)

        for i in range(50):
            await write(i)
        sh("kill", str(d), "2")
        # Quorum is 2 of 3: writes still acknowledged (retried across the
        # pool while the client finds a live node and leaders are elected).
        for i in range(50, 100):
            await write(i)
        dup = await until_ok("duplicate publish", d, lambda: js.publish(
            "egtest.a", b"again", headers={"Nats-Msg-Id": "id7"}, timeout=1))
        assert dup.duplicate and dup.seq == 8, dup
        sh("restart", str(d), "2")
        deadline = time.monotonic() + 30
        while True:
            info = await until_ok("stream_info", d, lambda: js.stream_info("egtest"))
            replicas = info.cluster.replicas or []
            if info.state.messages == 100 and len(replicas) == 2:
                break
            assert time.monotonic() < deadline, f"{info}\n{logs(d)}"
            await asyncio.sleep(0.2)
        assert info.config.num_replicas == 3
    finally:
        await nc.close()


def test_replicas_3_survive_a_node_kill(cluster):
    d, urls = cluster
    assert len(urls) == 3
    asyncio.run(replicated_writes(d, urls))
