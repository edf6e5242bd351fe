"""scripts/nats-cluster.sh: the three-node NATS cluster with JetStream that
operators (and the NATS-backed history of issue 11) run on. A replicas-3
stream keeps taking acknowledged writes with one node SIGKILLed, drops a
repeated Nats-Msg-Id inside its duplicate window, and the node comes back
with the same data."""

import asyncio
import os
import random
import subprocess

import pytest

from conftest import REPO
from natshelp import nats_server_bin

SCRIPT = REPO / "scripts" / "nats-cluster.sh"

nats = pytest.importorskip("nats")


def sh(*args: str) -> str:
    p = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"nats-cluster.sh {' '.join(args)}:\n{p.stdout}\n{p.stderr}"
    return p.stdout.strip()


@pytest.fixture
def cluster(tmp_path):
    if not nats_server_bin():
        if os.environ.get("EG_REQUIRE_NATS") == "1":
            pytest.fail("EG_REQUIRE_NATS=1 but nats-server is missing", pytrace=False)
        pytest.skip("nats-server not installed")
    d = tmp_path / "cluster"
    # Ports base..base+2 (clients), +1000 (routes), +4000 (monitoring).
    base = random.randrange(10000, 20000, 10)
    urls = sh("start", str(d), str(base))
    try:
        yield d, urls.split(",")
    finally:
        sh("stop", str(d))


async def replicated_writes(d, urls):
    nc = await nats.connect(servers=urls, max_reconnect_attempts=20, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        await js.add_stream(name="egtest", subjects=["egtest.>"], num_replicas=3,
                            duplicate_window=60)
        for i in range(50):
            ack = await js.publish("egtest.a", f"m{i}".encode(), headers={"Nats-Msg-Id": f"id{i}"})
            assert ack.seq == i + 1
        sh("kill", str(d), "2")
        # Quorum is 2 of 3: writes still acknowledged (retried across the
        # pool while the client finds a live node).
        for i in range(50, 100):
            for _ in range(50):
                try:
                    ack = await js.publish("egtest.a", f"m{i}".encode(),
                                           headers={"Nats-Msg-Id": f"id{i}"}, timeout=1)
                    break
                except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError,
                        nats.errors.ConnectionClosedError):
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"publish {i} never acknowledged with one node down")
        dup = await js.publish("egtest.a", b"again", headers={"Nats-Msg-Id": "id7"})
        assert dup.duplicate and dup.seq == 8
        sh("restart", str(d), "2")
        info = await js.stream_info("egtest")
        assert info.state.messages == 100
        assert info.config.num_replicas == 3
        assert len(info.cluster.replicas or []) == 2
    finally:
        await nc.close()


def test_replicas_3_survive_a_node_kill(cluster):
    d, urls = cluster
    assert len(urls) == 3
    asyncio.run(replicated_writes(d, urls))
