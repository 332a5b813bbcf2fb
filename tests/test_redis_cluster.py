"""A shard node whose store is a real 3-master Redis Cluster (REDPACKET_REDIS_CLUSTER=true).

Every key of a packet carries the packet id as its hash tag, so each Lua script touches one
slot; packets spread over the three masters. Opens, the checker (in cluster mode), and
handoffs between the cluster-backed node and a single-server node all run for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest_asyncio

from redpacket.cli.check import Observed, check_shards
from redpacket.cli.children import free_ports
from redpacket.core.ids import snowflake_of
from redpacket.sharding.rebalance import Rebalancer
from redpacket.sharding.ring import NodeSpec, RingDoc
from tests.conftest import NodeHandle, RedisServer, start_node


def redis_cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30
    )
    return done.stdout


@pytest_asyncio.fixture
async def redis_cluster(redis_servers: Any) -> list[RedisServer]:
    """Three masters, all 16384 slots assigned, cluster_state:ok on each."""
    # the cluster bus port defaults to port + 10000, too high for an ephemeral port: pick one
    servers = [
        redis_servers(
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            str(bus_port),
            "--cluster-node-timeout",
            "5000",
        )
        for bus_port in free_ports(3)
    ]
    done = subprocess.run(
        [
            "redis-cli",
            "--cluster",
            "create",
            *(f"127.0.0.1:{s.port}" for s in servers),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + 30
    while not all("cluster_state:ok" in redis_cli(s.port, "cluster", "info") for s in servers):
        assert time.monotonic() < deadline, "the Redis Cluster did not converge"
        await asyncio.sleep(0.1)
    return servers


def spec(handle: NodeHandle, cluster: bool) -> NodeSpec:
    s = handle.settings
    return NodeSpec(s.name, handle.url, 1, s.redis_url, s.mysql_url, redis_cluster=cluster)


@pytest_asyncio.fixture
async def cluster_node(
    redis_cluster: list[RedisServer], mysql_databases: Any
) -> AsyncIterator[NodeHandle]:
    runner, handle = await start_node(
        redis_cluster[0],
        mysql_databases("rcluster"),
        REDPACKET_REDIS_CLUSTER="true",
        REDPACKET_NODE_NAME="shard-0",
    )
    yield handle
    await handle.session.close()
    await runner.cleanup()


async def test_opens_on_a_redis_cluster_node_are_exact_and_the_checker_agrees(
    cluster_node: NodeHandle, redis_cluster: list[RedisServer]
) -> None:
    packets = [await cluster_node.create(total_amount=5000, total_packet=50) for _ in range(12)]

    async def one(packet_id: int, uid: int) -> tuple[int, int, Any]:
        status, body = await cluster_node.open(packet_id, uid)
        return packet_id, uid, (status, body)

    results = await asyncio.gather(*(one(p, uid) for p in packets for uid in range(1, 81)))
    observed = []
    for packet_id in packets:
        mine = [(uid, r) for p, uid, r in results if p == packet_id]
        won = [body["amount"] for _, (status, body) in mine if status == 200]
        assert len(won) == 50 and sum(won) == 5000 and min(won) >= 1
        assert {body["error"]["code"] for _, (s, body) in mine if s != 200} == {"sold_out"}
        observed += [Observed(packet_id, uid, b["amount"]) for uid, (s, b) in mine if s == 200]
    # the packets really are spread over the masters
    holding = [int(redis_cli(s.port, "dbsize").strip() or 0) for s in redis_cluster]
    assert sum(1 for keys in holding if keys > 0) >= 2, holding
    report = await check_shards([spec(cluster_node, cluster=True)], observed, settle_s=10)
    assert report.ok, report.violations
    assert report.records == 12 * 50


@dataclass
class InProcessNodes:
    """The infrastructure step of a rebalance for nodes this test started itself: the ring
    lives in memory, and starting or stopping a node is already done or left to the test."""

    node_secret: str
    doc: RingDoc
    nodes: dict[str, NodeSpec]
    name: str = "in-process"
    published: list[int] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)

    async def read_ring(self) -> RingDoc:
        return self.doc

    async def publish_ring(self, doc: RingDoc) -> None:
        self.doc = doc
        self.published.append(doc.version)

    async def ring_loaded(self, version: int, timeout_s: float) -> bool:
        return True

    async def start_node(self, name: str, url: str | None, weight: int) -> NodeSpec:
        return self.nodes[name]

    async def check_stop(self, name: str) -> None:
        return None

    async def stop_node(self, name: str) -> None:
        self.stopped.append(name)

    async def running_node(self, name: str) -> NodeSpec | None:
        return None

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        yield


async def test_packets_move_out_of_and_back_into_a_redis_cluster(
    redis_cluster: list[RedisServer], redis_servers: Any, mysql_databases: Any
) -> None:
    secret = secrets.token_hex(16)
    started = [
        await start_node(
            redis_cluster[0],
            mysql_databases("rc-a"),
            REDPACKET_REDIS_CLUSTER="true",
            REDPACKET_NODE_NAME="shard-0",
            REDPACKET_NODE_SECRET=secret,
        ),
        await start_node(
            redis_servers(),
            mysql_databases("rc-b"),
            REDPACKET_NODE_NAME="shard-1",
            REDPACKET_NODE_SECRET=secret,
        ),
    ]
    (_, in_cluster), (_, single) = started
    in_cluster.secret = single.secret = secret
    try:
        packets, observed = [], []
        for _ in range(40):
            packet_id = await in_cluster.create(total_amount=1000, total_packet=10)
            packets.append(packet_id)
            for uid in (1, 2, 3):
                status, body = await in_cluster.open(packet_id, uid)
                assert status == 200
                observed.append(Observed(packet_id, uid, body["amount"]))
        a, b = spec(in_cluster, cluster=True), spec(single, cluster=False)
        backend = InProcessNodes(secret, RingDoc(1, (a,)), {"shard-1": b})
        rebalancer = Rebalancer(backend, progress=False, say=lambda _: None)

        assert await rebalancer.add("shard-1") == 0
        ring = backend.doc.ring()
        moved = [p for p in packets if ring.owner(snowflake_of(p)).name == "shard-1"]
        assert moved and len(moved) < len(packets)
        report = await check_shards([a, b], observed, settle_s=5)
        assert report.ok, report.violations
        # a moved packet is served where it went (replays too), and answered 421 where it was
        status, body = await in_cluster.open(moved[0], 1)
        assert (status, body["error"]["code"], body["error"]["owner"]) == (
            421,
            "packet_moved",
            "shard-1",
        )
        status, body = await single.open(moved[0], 1)
        assert status == 200 and body["replayed"] is True
        for packet_id in moved:
            status, body = await single.open(packet_id, 4)
            assert status == 200
            observed.append(Observed(packet_id, 4, body["amount"]))

        assert await rebalancer.remove("shard-1") == 0
        assert backend.stopped == ["shard-1"] and backend.published == [2, 3, 4, 5]
        report = await check_shards([a], observed, settle_s=5)
        assert report.ok, report.violations
        assert report.packets == 40 and report.records == 40 * 3 + len(moved)
        for packet_id in moved:  # back in the Redis Cluster, live
            status, body = await in_cluster.open(packet_id, 5)
            assert status == 200
    finally:
        for runner, handle in started:
            await handle.session.close()
            await runner.cleanup()
