"""Expiry and refunds: after its lifetime a packet refuses new opens, and its remainder goes
back to the sender exactly once, even when the sweeper dies mid-way and runs again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redpacket.node.app import SWEEPER
from redpacket.node.ledger import LedgerUnavailable
from redpacket.node.shard import now_ms
from tests.conftest import Cluster, NodeHandle

SLOW_SWEEPER = {"REDPACKET_SWEEP_INTERVAL_S": "3600", "REDPACKET_REFUND_GRACE_S": "0"}


async def eventually(probe: Any, done: Any, timeout_s: float = 10) -> None:
    """Poll an async probe until its result satisfies ``done`` (the sweeper runs on its own)."""
    async with asyncio.timeout(timeout_s):
        while not done(await probe()):  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.1)


async def expired_packet(node: NodeHandle, opens: int) -> tuple[int, int]:
    """A 1 s packet of 1000 cents in 10 shares with ``opens`` of them taken; (id, cents left)."""
    packet_id = await node.create(total_amount=1000, total_packet=10, uid=8, expire_seconds=1)
    taken = sum([(await node.open(packet_id, uid))[1]["amount"] for uid in range(1, opens + 1)])
    await asyncio.sleep(1.05)
    return packet_id, 1000 - taken


async def test_the_sweeper_refunds_the_remainder_to_the_sender_once(fresh_node: Any) -> None:
    node: NodeHandle = await fresh_node(
        REDPACKET_SWEEP_INTERVAL_S="0.2", REDPACKET_REFUND_GRACE_S="0.1"
    )
    packet_id, left = await expired_packet(node, opens=3)
    await eventually(lambda: node.shard.ledger.refund_of(packet_id), lambda r: r is not None)
    assert await node.shard.ledger.refund_of(packet_id) == left
    _, info = await node.call("GET", f"/internal/v1/packets/{packet_id}")
    assert (info["status"], info["remaining_amount"]) == ("refunded", left)
    await asyncio.sleep(0.5)  # more sweeps pass: still one refund
    report = await node.check()
    assert report.refunds == 1


async def test_a_sweeper_that_dies_between_steps_refunds_once_when_run_again(
    fresh_node: Any,
) -> None:
    node: NodeHandle = await fresh_node(**SLOW_SWEEPER)
    packet_id, left = await expired_packet(node, opens=4)

    async def die(conn: Any) -> None:
        """The refund row is written; the process 'dies' before the status change commits."""
        conn.close()
        raise ConnectionError("sweeper killed between steps")

    with pytest.raises(LedgerUnavailable):
        await node.shard.ledger.refund(packet_id, now_ms(), between_steps=die)
    assert await node.shard.ledger.refund_of(packet_id) is None  # nothing half-done survives

    sweeper = node.app[SWEEPER]
    results = await asyncio.gather(*(sweeper.sweep_once() for _ in range(5)))
    assert [r for batch in results for r in batch] == [(packet_id, left)]
    assert await sweeper.sweep_once() == []
    assert (await node.check()).refunds == 1


async def test_a_sold_out_packet_is_never_refunded(fresh_node: Any) -> None:
    node: NodeHandle = await fresh_node(**SLOW_SWEEPER)
    packet_id, left = await expired_packet(node, opens=10)
    assert left == 0
    assert await node.app[SWEEPER].sweep_once() == []
    assert await node.shard.ledger.refund_of(packet_id) is None


async def test_claims_taken_before_expiry_land_before_the_refund(
    proxied_mysql: Any, fresh_node: Any
) -> None:
    """A share taken before the expiry whose commit failed is the opener's, not the sender's."""
    url, proxy = await proxied_mysql("expiry")
    node: NodeHandle = await fresh_node(
        REDPACKET_MYSQL_URL=url,
        REDPACKET_MYSQL_TIMEOUT_S="1",
        REDPACKET_RECONCILE_INTERVAL_S="3600",
        **SLOW_SWEEPER,
    )
    packet_id = await node.create(total_amount=1000, total_packet=10, expire_seconds=2)
    await node.open(packet_id, 1)
    proxy.block()
    status, _ = await node.open(packet_id, 2)  # taken in Redis, not committed
    assert status == 503
    proxy.unblock()
    await asyncio.sleep(2.05)
    claimed = await node.shard.counters.claims(packet_id)
    refunded = await node.app[SWEEPER].sweep_once()
    assert refunded == [(packet_id, 1000 - sum(claimed.values()))]
    report = await node.check()
    assert report.records == 2 and report.refunds == 1


async def test_an_expired_packet_through_the_gateway(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster(
        args=("--expire-s", "1"),
        REDPACKET_SWEEP_INTERVAL_S="0.2",
        REDPACKET_REFUND_GRACE_S="0.2",
    )
    packet_id = await cluster.create(1, 500, 5)
    status, first = await cluster.open(packet_id, 10)
    assert status == 200
    await asyncio.sleep(1.1)
    assert await cluster.grab(packet_id, 11) == (200, {"can_open": False, "reason": "expired"})
    status, body = await cluster.open(packet_id, 11)
    assert (status, body["error"]["code"]) == (410, "expired")
    assert await cluster.open(packet_id, 10) == (200, {"amount": first["amount"], "replayed": True})
    await eventually(
        lambda: cluster.call("GET", f"/v1/red-packets/{packet_id}", 1),
        lambda answer: answer[1]["status"] == "refunded",
    )
    _, info = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 1)
    assert info["remaining_amount"] == 500 - first["amount"]
    report = await cluster.check()
    assert report.refunds == 1
