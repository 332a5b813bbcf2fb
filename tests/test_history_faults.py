"""Faults while history (我的红包) is on its way from the packet's shard to the user's shard.

Each test uses two shards where every packet lives on one and every user (opener and sender)
on the other, so each open crosses the outbox and the relay (node/outbox.py, node/relay.py).
After each: the checker, history half included (every user's history equals the ledgers, on
the user's owner), and every acknowledged open is in its user's received list exactly once.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from redpacket.cli.check import Observed, check_shards
from redpacket.core.ids import snowflake_of
from redpacket.core.metrics import METRICS_URL
from redpacket.node.history import HISTORY
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc, user_key
from tests.conftest import IDS, NODE_SECRET_HEADER, Cluster, NodeHandle, sql
from tests.load import OpenLoad
from tests.test_rebalance import database_exists, rebalance

# -- helpers --------------------------------------------------------------------------------


def users_of(ring: Ring, shard: str, count: int, start: int) -> list[int]:
    """``count`` uids from ``start`` on whose history ``shard`` keeps."""
    uids: list[int] = []
    uid = start
    while len(uids) < count:
        if ring.owner_of_key(user_key(uid)).name == shard:
            uids.append(uid)
        uid += 1
    return uids


async def until(condition: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition()`` (plain or async) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not (await held if inspect.isawaitable(held := condition()) else held):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def outbox_rows(node: NodeSpec, event: str | None = None) -> int:
    assert node.mysql
    where, args = (" WHERE event = %s", (event,)) if event else ("", ())
    return int((await sql(node.mysql, "SELECT COUNT(*) FROM history_outbox" + where, args))[0][0])


async def packets_on(
    cluster: Cluster, shard: str, sender: int, count: int, shares: int
) -> list[str]:
    """``count`` packets of ``sender`` that the ring puts on ``shard`` (the gateway picks ids:
    create until enough land there; the others are simply not opened)."""
    picked: list[str] = []
    while len(picked) < count:
        packet_id = await cluster.create(sender, shares * 50, shares)
        if cluster.shard_of(snowflake_of(packet_id)) == shard:
            picked.append(packet_id)
    return picked


def assert_received_once(pages: dict[int, list[dict[str, Any]]], observed: list[Observed]) -> None:
    """Every acknowledged open is in its user's received list once, with its amount."""
    want: dict[int, dict[int, int]] = {}
    for o in observed:
        want.setdefault(o.uid, {})[o.red_packet_id] = o.amount
    for uid, opened in want.items():
        rows = pages.get(uid, [])
        copies = Counter(snowflake_of(r["red_packet_id"]) for r in rows)
        assert all(n == 1 for n in copies.values()), (uid, copies)
        assert {snowflake_of(r["red_packet_id"]): r["amount"] for r in rows} == opened, uid


async def received_via_gateway(cluster: Cluster, uids: set[int]) -> dict[int, list[dict[str, Any]]]:
    pages: dict[int, list[dict[str, Any]]] = {}
    for uid in uids:
        rows: list[dict[str, Any]] = []
        cursor = None
        while True:
            params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
            status, page = await cluster.call("GET", "/v1/me/received", uid, **params)
            assert status == 200, page
            rows += page["records"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        pages[uid] = rows
    return pages


async def open_crossing_load(cluster: Cluster, first_uid: int) -> tuple[OpenLoad, list[NodeSpec]]:
    """A load of opens of shard-0 packets by shard-1 users (sender on shard-1 too)."""
    ring = cluster.ring().ring()
    sender = users_of(ring, "shard-1", 1, first_uid)[0]
    users = users_of(ring, "shard-1", 60, first_uid + 100)
    packet_ids = await packets_on(cluster, "shard-0", sender, 20, 10)
    nodes = {n.name: n for n in cluster.nodes()}
    return OpenLoad(cluster, packet_ids, users), [nodes["shard-0"], nodes["shard-1"]]


# -- the tests ------------------------------------------------------------------------------


async def test_sigkill_of_the_packets_node_mid_delivery_loses_and_repeats_no_history(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster()
    load, (packets_shard, users_shard) = await open_crossing_load(cluster, 11_000)
    task = load.start()
    await until(lambda: load.statuses[200] >= 40, what="opens")
    # the users' node stops answering: shard-0's relay is left inside a delivery and its
    # outbox holds the events of the opens that follow
    users_pid = cluster.pid_of("shard-1")
    os.kill(users_pid, signal.SIGSTOP)
    try:
        before = load.statuses[200]
        await until(lambda: load.statuses[200] >= before + 40, what="opens meanwhile")

        async def backed_up() -> bool:
            return await outbox_rows(packets_shard) >= 40

        await until(backed_up, what="events waiting in shard-0's outbox")
        restarts = cluster.restarts("shard-0-node")
        os.kill(cluster.pid_of("shard-0"), signal.SIGKILL)
        await cluster.wait_restarted("shard-0-node", restarts)
    finally:
        os.kill(users_pid, signal.SIGCONT)
    await asyncio.wait_for(task, 120)
    assert "shard-0-node exited with code -9; restarting" in cluster.log()
    assert load.statuses[200] == 20 * 10
    await cluster.check(load.observed)  # history half: outboxes drained, history == ledgers
    assert await outbox_rows(packets_shard) == 0 and await outbox_rows(users_shard) == 0
    pages = await received_via_gateway(cluster, {o.uid for o in load.observed})
    assert_received_once(pages, load.observed)


async def test_redis_restarted_empty_during_history_traffic_changes_no_history(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster()
    load, _ = await open_crossing_load(cluster, 12_000)
    task = load.start()
    await until(lambda: load.statuses[200] >= 40, what="opens")
    for shard in ("shard-0", "shard-1"):  # the packets' Redis, then the users' shard's
        restarts = cluster.restarts(f"{shard}-redis")
        os.kill(cluster.pid_of(shard, "redis_pid"), signal.SIGKILL)
        await cluster.wait_restarted(f"{shard}-redis", restarts)
        before = load.statuses[200]
        await until(lambda b=before: load.statuses[200] > b or task.done(), what="opens")
    await asyncio.wait_for(task, 120)
    assert load.statuses[200] == 20 * 10
    assert max(load.winners_per_packet().values()) <= 10
    await cluster.check(load.observed)
    pages = await received_via_gateway(cluster, {o.uid for o in load.observed})
    assert_received_once(pages, load.observed)


async def test_users_shard_mysql_cut_backs_the_outbox_up_then_it_drains(
    fresh_node: Any, proxied_mysql: Any, tmp_path: Path
) -> None:
    """In-process nodes (each with its own MySQL URL: the users' one through a proxy the test
    cuts). The backlog gauge is read from the packets' node while only it can set it: the
    users' node cannot reach its MySQL (the two nodes share this process's registry)."""
    ring_file = tmp_path / "ring.json"
    users_url, proxy = await proxied_mysql("users")
    secret = secrets.token_hex(16)  # one cluster: the relay calls the other node with it
    packets_node: NodeHandle = await fresh_node(
        REDPACKET_NODE_NAME="shard-p",
        REDPACKET_RING_FILE=str(ring_file),
        REDPACKET_NODE_SECRET=secret,
    )
    users_node: NodeHandle = await fresh_node(
        REDPACKET_NODE_NAME="shard-u",
        REDPACKET_RING_FILE=str(ring_file),
        REDPACKET_NODE_SECRET=secret,
        REDPACKET_MYSQL_URL=users_url,
        REDPACKET_MYSQL_TIMEOUT_S="1",
    )
    packets_node.secret = users_node.secret = secret
    doc = RingDoc(1, (packets_node.spec(), users_node.spec()))
    doc.save(ring_file)

    async def ring_loaded() -> bool:
        return all(n.app[HISTORY].ring.doc == doc for n in (packets_node, users_node))

    await until(ring_loaded, what="both nodes to load the ring")
    ring = doc.ring()
    # the sender's wallet (which pays each create) is on the packets' shard: only the credits
    # and history of the openers wait for the users' MySQL
    sender = users_of(ring, "shard-p", 1, 13_000)[0]
    users = users_of(ring, "shard-u", 10, 13_100)

    async def create() -> int:
        while ring.owner(packet_id := IDS.next_id()).name != "shard-p":
            pass
        token = secrets.token_hex(16)
        await packets_node.hold(sender, 1000, token, packet_id)  # the sender's wallet pays
        status, body = await packets_node.call(
            "POST",
            "/internal/v1/packets",
            {
                "red_packet_id": str(packet_id),
                "uid": str(sender),
                "total_amount": 1000,
                "total_packet": 10,
                "expire_seconds": 3600,
                "create_token": token,
            },
        )
        assert status == 201, body
        return packet_id

    observed: list[Observed] = []

    async def open_all(packet_id: int) -> None:
        answers = await asyncio.gather(*(packets_node.open(packet_id, uid) for uid in users))
        for uid, (status, body) in zip(users, answers, strict=True):
            assert status == 200, body  # the packet's shard commits: its MySQL is fine
            observed.append(Observed(packet_id, uid, body["amount"]))

    for packet_id in [await create() for _ in range(2)]:
        await open_all(packet_id)

    async def drained() -> bool:
        return await outbox_rows(packets_node.spec()) == 0

    await until(drained, what="the first opens to reach the users' shard")
    proxy.block()
    for packet_id in [await create() for _ in range(4)]:
        await open_all(packet_id)
    waiting = await outbox_rows(packets_node.spec(), "received")
    assert waiting == 4 * 10  # a received per open (the sender's sent rows are applied here)

    async def backlog_gauge() -> float:
        async with packets_node.session.get(packets_node.app[METRICS_URL] + "/metrics") as resp:
            text = await resp.text()
        (line,) = [
            x for x in text.splitlines() if x.startswith("redpacket_history_outbox_backlog ")
        ]
        return float(line.split()[-1])

    async def gauge_rose() -> bool:
        return await backlog_gauge() >= 40

    await until(gauge_rose, what="the backlog gauge to rise")
    await asyncio.sleep(1.0)  # the relay keeps trying; nothing is delivered, nothing dropped
    assert await outbox_rows(packets_node.spec(), "received") == waiting

    proxy.unblock()
    await until(drained, what="the outbox to drain once the users' MySQL is back")

    async def gauge_zero() -> bool:
        return await backlog_gauge() == 0

    await until(gauge_zero, what="the backlog gauge to fall back")
    report = await check_shards(
        [packets_node.spec(), users_node.spec()], observed, settle_s=15, owners=ring
    )
    assert report.ok, "\n".join(report.violations)
    pages: dict[int, list[dict[str, Any]]] = {}
    for uid in users:
        status, page = await users_node.call(
            "GET", f"/internal/v1/users/{uid}/received", limit="100"
        )
        assert status == 200, page
        pages[uid] = page["records"]
    assert_received_once(pages, observed)
    status, page = await packets_node.call("GET", f"/internal/v1/users/{sender}/sent", limit="100")
    assert status == 200 and page["count"] == 6
    assert all(p["status"] == "sold_out" and p["opened_packet"] == 10 for p in page["packets"])


async def drain_now(cluster: Cluster, node: NodeSpec) -> tuple[int, int]:
    """Have a node deliver its outbox now (the endpoint `rebalance remove` uses)."""
    assert cluster.session is not None
    async with cluster.session.post(
        node.url + "/internal/v1/handoff/outbox/drain",
        params={"timeout_s": "30"},
        headers={NODE_SECRET_HEADER: cluster.state["node_secret"]},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return int(body["delivered"]), int(body["left"])


async def test_removing_a_shard_under_load_delivers_its_outbox_before_it_stops(
    make_cluster: Any,
) -> None:
    """The relays here sleep far longer than the test runs once their outbox is empty, so
    whatever shard-2's last commits wrote is still in its outbox when the removal ends: the
    removal itself must deliver it before the shard and its database go."""
    cluster: Cluster = await make_cluster(REDPACKET_HISTORY_RELAY_IDLE_S="900")
    rc, out = await rebalance(cluster, "add", "--node", "shard-2")
    assert rc == 0, out
    users = list(range(14_000, 14_060))
    packet_ids = [await cluster.create(14_999, 500, 10) for _ in range(60)]
    on_2 = [p for p in packet_ids if cluster.shard_of(snowflake_of(p)) == "shard-2"]
    assert len(on_2) >= 5, "the ring gave shard-2 too few packets"
    load = OpenLoad(cluster, packet_ids, users)
    task = load.start()
    removed = cluster.ring().node("shard-2")
    assert removed is not None and removed.mysql

    async def written_on_2() -> bool:
        return await outbox_rows(removed) >= 20

    await until(written_on_2, what="events in shard-2's outbox")
    rc, out = await rebalance(cluster, "remove", "--node", "shard-2")
    assert rc == 0, out
    await asyncio.wait_for(task, 120)
    assert load.statuses[200] == 60 * 10
    drained = [line for line in out.splitlines() if "history outbox drained" in line]
    assert drained and drained[0].startswith("shard-2:"), out
    assert int(drained[0].split("(")[1].split()[0]) > 0  # it had events left to deliver
    assert not await database_exists(removed.mysql)  # dropped: nothing was left in it
    for node in cluster.nodes():  # the remaining shards deliver theirs now, not in 15 minutes
        assert (await drain_now(cluster, node))[1] == 0
    await cluster.check(load.observed)
    pages = await received_via_gateway(cluster, {o.uid for o in load.observed})
    assert_received_once(pages, load.observed)
