"""Wallets move with their users in a live rebalance, under a load of creates, opens and
top-ups, and no cent is created or lost (the checker's conservation, and every wallet on its
user's owner only)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from redpacket.sharding.ring import user_key
from tests.conftest import Cluster, sql
from tests.test_rebalance import rebalance
from tests.test_wallet import topup, wallet

SENDERS = range(19_001, 19_021)
OPENERS = range(19_101, 19_141)


async def wallets_by_node(cluster: Cluster) -> dict[int, list[str]]:
    where: dict[int, list[str]] = {}
    for node in cluster.nodes():
        assert node.mysql
        for (uid,) in await sql(node.mysql, "SELECT uid FROM wallet"):
            where.setdefault(int(uid), []).append(node.name)
    return where


async def test_wallets_move_with_their_users_in_a_live_rebalance(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster(args=("--starting-balance", "100000"))
    for uid in (*SENDERS, *OPENERS):
        await wallet(cluster, uid)  # every wallet exists (granted) before the change
    answers: Counter[int] = Counter()
    stop = asyncio.Event()

    async def traffic(worker: int) -> None:
        i = 0
        while not stop.is_set():
            sender = SENDERS[(worker + i) % len(SENDERS)]
            status, body = await cluster.call(
                "POST", "/v1/red-packets", sender, {"total_amount": 300, "total_packet": 3}
            )
            answers[status] += 1
            if status == 201:
                for opener in (OPENERS[(i + k) % len(OPENERS)] for k in range(3)):
                    answers[(await cluster.open(body["red_packet_id"], opener))[0]] += 1
            if i % 5 == 0:
                status, _ = await topup(cluster, sender, 100, f"move-{worker}-{i}")
                answers[status] += 1
            i += 1

    load = asyncio.gather(*(traffic(w) for w in range(4)))
    await asyncio.sleep(1.0)
    rc, out = await rebalance(cluster, "add", "--node", "shard-2")
    assert rc == 0, out
    assert "moved the wallets of" in out, out
    await asyncio.sleep(1.0)
    rc, out = await rebalance(cluster, "remove", "--node", "shard-2")
    assert rc == 0, out
    stop.set()
    await load
    assert answers[201] > 10 and answers[200] > 10, answers
    assert set(answers) <= {200, 201, 503}, answers  # a 503 (retry) is allowed, nothing else

    report = await cluster.check(settle_s=20)
    assert report.wallets >= len(SENDERS) + len(OPENERS)
    ring = cluster.ring().ring()
    for uid, nodes in (await wallets_by_node(cluster)).items():
        assert nodes == [ring.owner_of_key(user_key(uid)).name], (uid, nodes)
