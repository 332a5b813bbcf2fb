"""The gateway's readiness on real processes (a `redpacket dev up` cluster): ``/readyz`` says
*this gateway can serve* and stays 200 while a shard is down, so a readiness probe on it never
empties the gateway Service because of one shard; ``/readyz/shards`` is the all-shards signal
for alerts."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from tests.conftest import Cluster


async def packets_on(cluster: Cluster, shard: str, count: int) -> list[str]:
    """``count`` new packets (2 shares each) whose owner is ``shard``."""
    found: list[str] = []
    for _ in range(200):
        packet_id = await cluster.create(1, 200, 2)
        if cluster.shard_of(int(packet_id)) == shard:
            found.append(packet_id)
            if len(found) == count:
                return found
    raise AssertionError(f"no packets landed on {shard} in 200 creations")


async def test_one_stopped_node_leaves_the_gateway_ready_and_the_other_shard_serving(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster(REDPACKET_NODE_TIMEOUT_S="1")
    on_1 = await packets_on(cluster, "shard-1", 3)
    status, body = await cluster.call("GET", "/readyz/shards")
    assert status == 200 and body["shards"] == {"shard-0": "ready", "shard-1": "ready"}

    node_0 = cluster.pid_of("shard-0")
    os.kill(node_0, signal.SIGSTOP)  # stopped: connections hang, nothing answers
    try:
        for _ in range(5):  # the probe's verdict every time, not once by luck
            status, body = await cluster.call("GET", "/readyz")
            assert status == 200, body
            assert body["ready"] is True
            assert body["shards"] == {"shard-0": "down", "shard-1": "ready"}
        status, body = await cluster.call("GET", "/readyz/shards")
        assert status == 503, body
        assert body["error"]["shards"] == {"shard-0": "down", "shard-1": "ready"}
        opened = await asyncio.gather(*(cluster.open(p, 500 + i) for i, p in enumerate(on_1)))
        assert [s for s, _ in opened] == [200, 200, 200], opened
    finally:
        os.kill(node_0, signal.SIGCONT)

    await cluster.wait_ready()  # /readyz/shards: 200 again once shard-0 answers
    status, body = await cluster.call("GET", "/readyz")
    assert status == 200 and body["shards"] == {"shard-0": "ready", "shard-1": "ready"}
    await cluster.check()
