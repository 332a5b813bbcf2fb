"""Issue 19: the relay never blocks behind an event its destination refuses.

Poison rows (a ``received`` event missing its fields) are put in both shards' outboxes, for
users kept on the same shard and on the other one; history written after them still
arrives, the poison rows become dead letters (metric, ``redpacket dead-letters list``), and
``retry`` puts them back. The checker stays clean.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
from typing import Any

import aiohttp

from tests.conftest import Cluster, sql

POISON = '{"amount": 1}'


async def dead_letters(cluster: Cluster) -> int:
    rows = [
        (await sql(n.mysql or "", "SELECT COUNT(*) FROM history_dead_letter"))[0][0]
        for n in cluster.nodes()
    ]
    return sum(rows)


def cli(cluster: Cluster, *args: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "redpacket.cli",
            "dead-letters",
            *args,
            "--cluster",
            cluster.name,
            "--var",
            str(cluster.home.parent),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


async def node_metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exposed at {url}")


async def test_an_undeliverable_event_is_set_aside_and_the_rest_is_delivered(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster()
    ring = cluster.ring().ring()
    uids = list(range(7000, 7040))
    per_shard = {
        n.name: [u for u in uids if ring.owner(u).name == n.name][:1] for n in cluster.nodes()
    }
    poison_uids = [u for found in per_shard.values() for u in found]
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    for node in cluster.nodes():
        for uid in poison_uids:  # one for a user kept here, one for a user kept on the other
            await sql(
                node.mysql or "",
                "INSERT INTO history_outbox (uid, event, red_packet_id, payload, create_time) "
                "VALUES (%s, 'received', 1, %s, %s)",
                (uid, POISON, now),
            )
    packet_id = await cluster.create(7100, 200, 2)
    status, opened = await cluster.open(packet_id, poison_uids[0])
    assert status == 200

    async with asyncio.timeout(20):
        while True:
            _, mine = await cluster.call("GET", "/v1/me/received", poison_uids[0])
            if mine["records"] and await dead_letters(cluster) == 4:
                break
            await asyncio.sleep(0.1)
    assert [r["amount"] for r in mine["records"]] == [opened["amount"]]
    listed = cli(cluster, "list")
    assert "4 dead letter(s)" in listed
    assert "refused here: 400" in listed and "answered 400" in listed
    shard_urls = [n.metrics or "" for n in cluster.nodes()]
    async with asyncio.timeout(20):
        while sum([await node_metric(u, "redpacket_dead_letters") for u in shard_urls]) != 4:  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    assert "4 dead letter(s) put back" in cli(cluster, "retry")
    async with asyncio.timeout(20):  # the relay reads them again, and sets them aside again
        while await dead_letters(cluster) != 4:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.1)
    outbox = [
        (await sql(n.mysql or "", "SELECT COUNT(*) FROM history_outbox"))[0][0]
        for n in cluster.nodes()
    ]
    assert outbox == [0, 0]
    await cluster.check()
