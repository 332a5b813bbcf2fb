"""The wallet through crashes and races, on real clusters: every debit becomes a packet's
``send`` or is given back, every share is credited once, and conservation holds after each.

The crash points of a create (docs/architecture.md "Money flow"): after the hold (the gateway
dies), before and after the packet's insert (its node dies), and the wallet's MySQL cut
while credits arrive.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from typing import Any

from redpacket.core.ids import IdGenerator
from redpacket.nodeclient.wire import NODE_SECRET_HEADER
from redpacket.sharding.ring import user_key
from tests.conftest import Cluster, sql
from tests.test_history_faults import until, users_of
from tests.test_wallet import topup, transactions, wallet

IDS = IdGenerator(1017)


async def node_post(cluster: Cluster, url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    assert cluster.session is not None
    async with cluster.session.post(
        url + path, json=body, headers={NODE_SECRET_HEADER: cluster.state["node_secret"]}
    ) as resp:
        return resp.status, await resp.json()


def packet_body(packet_id: int, uid: int, amount: int, token: str) -> dict[str, Any]:
    return {
        "red_packet_id": str(packet_id),
        "uid": str(uid),
        "total_amount": amount,
        "total_packet": 2,
        "expire_seconds": 3600,
        "create_token": token,
    }


async def hold_states(cluster: Cluster, uid: int) -> list[str]:
    owner = cluster.ring().ring().owner_of_key(user_key(uid))
    assert owner.mysql
    rows = await sql(owner.mysql, "SELECT state FROM wallet_hold WHERE uid = %s", (uid,))
    return sorted(str(r[0]) for r in rows)


async def packets_of(cluster: Cluster, uid: int) -> tuple[int, int]:
    """How many packets ``uid`` has on any shard, and their total cents."""
    made = spent = 0
    for node in cluster.nodes():
        assert node.mysql
        (count, total), *_ = await sql(
            node.mysql,
            "SELECT COUNT(*), COALESCE(SUM(total_amount), 0) FROM red_packet_info WHERE uid = %s",
            (uid,),
        )
        made, spent = made + int(count), spent + int(total)
    return made, spent


async def test_fifty_concurrent_creates_with_money_for_ten(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster(args=("--starting-balance", "1000"))
    assert (await wallet(cluster, 18101))["balance"] == 1000  # (retries until the links are up)
    body = {"total_amount": 100, "total_packet": 1}
    answers = await asyncio.gather(
        *(cluster.call("POST", "/v1/red-packets", 18101, body) for _ in range(50))
    )
    statuses = sorted(status for status, _ in answers)
    assert statuses == [201] * 10 + [402] * 40, answers
    for status, answer in answers:
        if status == 402:
            assert answer["error"]["code"] == "insufficient_funds"
            assert 0 <= answer["error"]["balance"] < 100
    assert (await wallet(cluster, 18101))["balance"] == 0
    assert len((await transactions(cluster, 18101, limit="100"))["transactions"]) == 11
    await cluster.check()


async def test_gateway_dead_after_the_hold_the_money_comes_back_and_the_create_never_lands(
    make_cluster: Any,
) -> None:
    """The gateway held the money and died before the create: the sweeper asks the packet's
    shard, which records that create as abandoned; the money comes back, and the create, if
    it arrives late after all, is refused."""
    cluster: Cluster = await make_cluster(REDPACKET_WALLET_HOLD_TIMEOUT_S="1")
    uid, token, packet_id = 18201, secrets.token_hex(16), IDS.next_id()
    start = (await wallet(cluster, uid))["balance"]
    await cluster.hold(uid, 700, token, packet_id)
    assert (await wallet(cluster, uid))["balance"] == start - 700

    async def released() -> bool:
        return await hold_states(cluster, uid) == ["released"]

    await until(released, what="the sweeper to release the orphan hold")
    assert (await wallet(cluster, uid))["balance"] == start
    kinds = [(t["kind"], t["amount"]) for t in (await transactions(cluster, uid))["transactions"]]
    assert kinds[:2] == [("refund", 700), ("send", -700)]
    owner = cluster.ring().ring().owner(packet_id)
    status, late = await node_post(
        cluster, owner.url, "/internal/v1/packets", packet_body(packet_id, uid, 700, token)
    )
    assert (status, late["error"]["code"]) == (409, "create_abandoned")
    await cluster.check()


async def test_gateway_dead_after_the_insert_the_hold_becomes_the_send(make_cluster: Any) -> None:
    """The packet was created but the gateway died before confirming: the sweeper finds the
    packet and confirms; the money stays spent, once."""
    cluster: Cluster = await make_cluster(REDPACKET_WALLET_HOLD_TIMEOUT_S="1")
    uid, token, packet_id = 18301, secrets.token_hex(16), IDS.next_id()
    start = (await wallet(cluster, uid))["balance"]
    await cluster.hold(uid, 800, token, packet_id)
    owner = cluster.ring().ring().owner(packet_id)
    status, created = await node_post(
        cluster, owner.url, "/internal/v1/packets", packet_body(packet_id, uid, 800, token)
    )
    assert status == 201, created

    async def confirmed() -> bool:
        return await hold_states(cluster, uid) == ["sent"]

    await until(confirmed, what="the sweeper to confirm the hold")
    assert (await wallet(cluster, uid))["balance"] == start - 800
    await cluster.check()


async def test_packets_node_sigkilled_around_its_insert_loses_and_doubles_no_money(
    make_cluster: Any,
) -> None:
    """Creates in flight when the packet's node is SIGKILLed (some before their insert, some
    after, some never sent): each hold becomes the packet's send or comes back."""
    cluster: Cluster = await make_cluster(REDPACKET_WALLET_HOLD_TIMEOUT_S="2")
    ring = cluster.ring().ring()
    uid = users_of(ring, "shard-0", 1, 18_400)[0]  # the wallet on shard-0, packets on shard-1
    start = (await wallet(cluster, uid))["balance"]
    restarts = cluster.restarts("shard-1-node")

    async def create(i: int) -> int:
        status, _ = await cluster.call(
            "POST", "/v1/red-packets", uid, {"total_amount": 100 + i, "total_packet": 2}
        )
        return status

    creates = [asyncio.create_task(create(i)) for i in range(40)]
    await asyncio.sleep(0.05)
    os.kill(cluster.pid_of("shard-1"), signal.SIGKILL)
    statuses = await asyncio.gather(*creates)
    assert set(statuses) <= {201, 503}, statuses
    await cluster.wait_restarted("shard-1-node", restarts)
    await cluster.wait_ready()

    async def settled() -> bool:
        return "held" not in await hold_states(cluster, uid)

    await until(settled, timeout_s=60, what="every hold to be confirmed or released")
    sends = [
        t
        for t in (await transactions(cluster, uid, limit="100"))["transactions"]
        if t["kind"] == "send"
    ]
    assert len(sends) == 40
    report = await cluster.check()
    _, spent = await packets_of(cluster, uid)
    assert (await wallet(cluster, uid))["balance"] == start - spent
    assert statuses.count(201) <= report.packets


async def test_gateway_sigkilled_with_creates_in_flight_loses_no_money(make_cluster: Any) -> None:
    """The gateway dies with holds made and creates waiting on a stopped packet node."""
    cluster: Cluster = await make_cluster(REDPACKET_WALLET_HOLD_TIMEOUT_S="2")
    ring = cluster.ring().ring()
    uid = users_of(ring, "shard-0", 1, 18_500)[0]
    start = (await wallet(cluster, uid))["balance"]
    packet_node = cluster.pid_of("shard-1")
    os.kill(packet_node, signal.SIGSTOP)
    try:
        creates = [
            asyncio.create_task(
                cluster.call(
                    "POST", "/v1/red-packets", uid, {"total_amount": 300, "total_packet": 3}
                )
            )
            for _ in range(10)
        ]

        async def held() -> bool:
            return len(await hold_states(cluster, uid)) >= 3

        await until(held, what="holds to be made")
        restarts = cluster.restarts("gateway")
        os.kill(cluster.state["gateway"]["pid"], signal.SIGKILL)
        await asyncio.gather(*creates, return_exceptions=True)
    finally:
        os.kill(packet_node, signal.SIGCONT)
    await cluster.wait_restarted("gateway", restarts)
    await cluster.wait_ready()

    async def settled() -> bool:
        return "held" not in await hold_states(cluster, uid)

    await until(settled, timeout_s=60, what="every hold to be confirmed or released")
    await cluster.check()
    _, spent = await packets_of(cluster, uid)
    assert (await wallet(cluster, uid))["balance"] == start - spent


async def test_replayed_top_ups_credit_once_under_concurrency(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster(args=("--starting-balance", "0"))
    assert (await wallet(cluster, 18601))["balance"] == 0  # (retries until the links are up)
    answers = await asyncio.gather(*(topup(cluster, 18601, 5000, "pay-once") for _ in range(20)))
    assert sorted(s for s, _ in answers) == [200] * 19 + [201]
    assert len({a["transaction_id"] for _, a in answers}) == 1
    assert (await wallet(cluster, 18601))["balance"] == 5000
    status, _ = await cluster.call(
        "POST", "/v1/red-packets", 18601, {"total_amount": 6000, "total_packet": 2}
    )
    assert status == 402
    await cluster.check()
