"""Faults injected while a concurrent open load runs: nothing acknowledged is lost, nothing is
paid twice, and the ledger checker is clean afterwards (invariants 1-4, plus every 200 the
clients saw is in MySQL exactly once with that amount)."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from tests.conftest import Cluster
from tests.load import OpenLoad


async def until(condition: Any, timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the condition is counters of a running load
            await asyncio.sleep(0.02)


async def packets(cluster: Cluster, count: int, shares: int) -> list[str]:
    return list(
        await asyncio.gather(*(cluster.create(1, shares * 50, shares) for _ in range(count)))
    )


async def test_sigkill_of_a_node_mid_load_loses_no_acknowledged_share(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster()
    load = OpenLoad(cluster, await packets(cluster, 30, 20), range(1000, 1150))
    task = load.start()
    await asyncio.sleep(1.0)
    restarts = cluster.restarts("shard-0-node")
    os.kill(cluster.pid_of("shard-0"), signal.SIGKILL)
    await cluster.wait_restarted("shard-0-node", restarts)
    await asyncio.wait_for(task, 120)
    assert "shard-0-node exited with code -9; restarting" in cluster.log()
    assert load.statuses[200] == 30 * 20  # every share found a taker once the node was back
    await cluster.check(load.observed)


async def test_mysql_refusing_connections_gives_503_then_converges(
    proxied_mysql: Any, make_cluster: Any
) -> None:
    url, proxy = await proxied_mysql(database=False)
    cluster: Cluster = await make_cluster(
        REDPACKET_MYSQL_URL=url, REDPACKET_MYSQL_TIMEOUT_S="1", REDPACKET_NODE_TIMEOUT_S="3"
    )
    load = OpenLoad(cluster, await packets(cluster, 40, 20), range(2000, 2080))
    task = load.start()
    await until(lambda: load.statuses[200] >= 50)
    proxy.block()
    await until(lambda: load.codes["unavailable"] >= 20)  # the outage is answered 503
    acknowledged = load.statuses[200]
    await asyncio.sleep(2)
    assert load.statuses[200] == acknowledged  # no 200 while MySQL cannot commit
    proxy.unblock()
    await asyncio.wait_for(task, 120)
    assert load.statuses[200] == 40 * 20
    await cluster.check(load.observed, settle_s=30)


async def test_redis_restarted_empty_is_rebuilt_without_overspending(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster()
    load = OpenLoad(cluster, await packets(cluster, 30, 20), range(3000, 3150))
    task = load.start()
    await asyncio.sleep(1.0)
    restarts = cluster.restarts("shard-1-redis")
    os.kill(cluster.pid_of("shard-1", "redis_pid"), signal.SIGKILL)
    await cluster.wait_restarted("shard-1-redis", restarts)
    await asyncio.wait_for(task, 120)
    winners = load.winners_per_packet()
    assert max(winners.values()) <= 20  # never more winners than shares
    assert load.statuses[200] == 30 * 20
    await cluster.check(load.observed)


async def test_a_dead_gateway_is_restarted_by_the_supervisor(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster()
    restarts = cluster.restarts("gateway")
    os.kill(cluster.state["gateway"]["pid"], signal.SIGKILL)
    await cluster.wait_restarted("gateway", restarts)
    await cluster.wait_ready()
    assert "gateway exited with code -9; restarting" in cluster.log()
    packet_id = await cluster.create(1, 100, 2)
    assert (await cluster.open(packet_id, 5))[0] == 200
