"""Scaling out at peak (issue 22): ring versions (`add --no-move`, `remove --drain`), and
batched moves (`remove --move`, killed and resumed, rolled back), live under load.

Many packets are seeded straight into the ledgers (bench/rebalance.py ``seed_packets``):
creating them through the API would take minutes. The suite seeds 20,000 (the 2-core CI box
runs it in seconds); ``redpacket rebalance bench`` runs the same change with 100,000.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from typing import Any

from redpacket.bench.rebalance import seed_packets
from redpacket.cli.check import Observed
from redpacket.core.ids import MAX_ID, IdGenerator, snowflake_of
from redpacket.sharding.client import HandoffClient
from redpacket.sharding.ring import NodeSpec, RingDoc, packet_owner
from tests.conftest import Cluster
from tests.test_rebalance import (
    Load,
    create_many,
    database_exists,
    keyed_create,
    keyed_creates,
    kill_when,
    packets_by_node,
    query,
    rebalance,
    records_via_gateway,
    wait_for,
)

SEEDED = 20_000


async def assert_keys_and_history_follow_users(cluster: Cluster, keyed: dict[int, str]) -> None:
    """A retried create gets the same packet, and the sender's history lists it: both are on
    the user's owner in the newest ring, wherever the packet lives."""
    for uid, packet_id in keyed.items():
        status, body = await keyed_create(cluster, uid)
        assert (status, body["red_packet_id"]) == (201, packet_id), body

        async def listed(uid: int = uid, packet_id: str = packet_id) -> bool:
            status, page = await cluster.call("GET", "/v1/me/sent", uid)
            assert status == 200, page
            return packet_id in {p["red_packet_id"] for p in page["packets"]}

        await wait_for(listed, what=f"user {uid}'s sent history")


async def assert_every_packet_on_its_version_owner(cluster: Cluster) -> dict[str, set[int]]:
    """Every packet is live on exactly the owner its placing version gives it."""
    doc = cluster.ring()
    assert doc.previous is None, doc
    held = await packets_by_node(doc.all_nodes())
    for name, packets in held.items():
        assert "moving" not in packets.values(), name
        for packet_id in packets:
            assert packet_owner(doc, packet_id).name == name, (
                packet_id,
                name,
                IdGenerator.timestamp_ms(packet_id) - doc.since_ms,
                doc.as_dict(),
            )
    assert set(Counter(p for packets in held.values() for p in packets).values()) <= {1}
    return {name: set(packets) for name, packets in held.items()}


class Creator:
    """Creates through the gateway (each opened at once) while a change runs."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.created: list[tuple[float, int]] = []  # (answered at, unix s; id)
        self.answers: Counter[int] = Counter()
        self.opens: list[Observed] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            status, body = await self.cluster.call(
                "POST", "/v1/red-packets", 7000 + i % 50, {"total_amount": 200, "total_packet": 2}
            )
            self.answers[status] += 1
            if status == 201:
                packet_id = snowflake_of(body["red_packet_id"])
                self.created.append((time.time(), packet_id))
                status, body = await self.cluster.open(body["red_packet_id"], 1)
                self.answers[status] += 1
                if status == 200:
                    self.opens.append(Observed(packet_id, 1, body["amount"]))
            i += 1
            await asyncio.sleep(0.02)


async def test_add_no_move_places_only_new_packets_and_a_drained_shard_stops_once_refunded(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster(
        2,
        ("--expire-s", "8"),
        REDPACKET_REFUND_GRACE_S="0.2",
        REDPACKET_SWEEP_INTERVAL_S="0.3",
    )
    seeded = await seed_packets(cluster.ring(), SEEDED, senders=SEEDED // 10, expire_s=3600)
    before = {n: set(p) for n, p in (await packets_by_node(cluster.nodes())).items()}
    first_real = IdGenerator.first_id_at(int(time.time() * 1000))  # seeded ones are older
    keyed = await keyed_creates(cluster, range(9001, 9011))
    real = await create_many(cluster, 30, amount=10_000, shares=100)
    load = Load(cluster, real + [cluster.public_id(p) for p in seeded[:: SEEDED // 200]], users=150)
    creator = Creator(cluster)
    task = asyncio.gather(load.start(), creator.run())
    await asyncio.sleep(1.0)

    # 1. add --no-move: a new version places new packets; none of the old ones moves
    began_ms = int(time.time() * 1000)
    phases = {"add": time.monotonic()}
    rc, out = await rebalance(cluster, "add", "--node", "shard-2", "--no-move", "--settle-s", "1")
    phases["added"] = time.monotonic()
    assert rc == 0, out
    doc = cluster.ring()
    assert [n.name for n in doc.nodes] == ["shard-0", "shard-1", "shard-2"]
    assert [[n.name for n in v.nodes] for v in doc.older] == [["shard-0", "shard-1"]]
    assert began_ms < doc.since_ms and "moving 0 red packet" not in out
    await wait_for(
        lambda: _any_created_on(creator, doc, "shard-2"), what="a create placed on shard-2"
    )
    held = await assert_every_packet_on_its_version_owner(cluster)
    for name, packets in before.items():
        assert packets <= held[name], f"an old packet left {name}"
    first_new = IdGenerator.first_id_at(doc.since_ms)
    assert held["shard-2"] and all(p >= first_new for p in held["shard-2"])
    for node in doc.all_nodes():
        assert node.mysql and await query(node.mysql, "SELECT * FROM red_packet_tombstone") == []
    for packet_id in seeded[1 :: SEEDED // 20]:  # old packets are still served where they are
        status, body = await cluster.open(cluster.public_id(packet_id), 4242)
        assert status == 200, body
        load.amounts[(packet_id, 4242)] = body["amount"]
    print(f"add --no-move with {SEEDED} packets: since_ms {doc.since_ms - began_ms} ms after")

    # 2. remove --drain: no new packet goes to shard-2; it stops once its packets have expired,
    # been refunded and (settled) moved to where the remaining versions place them
    phases["drain"] = time.monotonic()
    rc, out = await rebalance(
        cluster, "remove", "--node", "shard-2", "--drain", "--settle-s", "1", "--wait-s", "60"
    )
    phases["drained"] = time.monotonic()
    assert rc == 0, out
    load.stop.set()
    creator.stop.set()
    await task
    doc = cluster.ring()
    assert "shard-2" not in {n.name for n in doc.all_nodes()}, doc
    assert "stopped shard-2" in out, out
    assert "shard-2" not in {s["name"] for s in cluster.state["shards"]}
    when = {k: round(v - phases["add"], 1) for k, v in phases.items()}
    failed = [round(t - phases["add"], 1) for t in load.failed_at]
    assert set(load.statuses) <= {200, 410}, (load.statuses, load.messages, when, failed, out)
    assert not load.mismatches, load.mismatches[:10]
    assert set(creator.answers) <= {200, 201}, creator.answers
    await assert_every_packet_on_its_version_owner(cluster)
    for _, packet_id in creator.created[-5:]:  # refunded, still answered with their records
        assert await records_via_gateway(cluster, cluster.public_id(packet_id)) is not None
    await assert_keys_and_history_follow_users(cluster, keyed)
    await wait_for(lambda: _all_settled(cluster, first_real), timeout_s=60, what="the refunds")
    await cluster.check(load.observed + creator.opens, allow_unfunded=True)  # seeded packets


async def _all_settled(cluster: Cluster, from_id: int) -> bool:
    """No node holds a live packet made through the gateway (the checker reads tables one
    after another, so a refund committing meanwhile would look half done)."""
    async with HandoffClient(cluster.state["node_secret"]) as client:
        counts = [await client.live(n, from_id, MAX_ID) for n in cluster.nodes()]
    return not any(counts)


def _any_created_on(creator: Creator, doc: RingDoc, name: str) -> Any:
    async def check() -> bool:
        return any(packet_owner(doc, pid).name == name for _, pid in creator.created)

    return check()


async def test_remove_move_killed_then_rolled_back_then_resumed_under_load(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster(3)
    keyed = await keyed_creates(cluster, range(9101, 9121))
    packets = await create_many(cluster, 300, amount=10_000, shares=100)
    seeded = await seed_packets(cluster.ring(), 3000, senders=300, expire_s=3600)
    load = Load(cluster, packets + [cluster.public_id(p) for p in seeded[::30]], users=150)
    task = load.start()
    await asyncio.sleep(0.5)
    shard_2 = cluster.ring().nodes[2]

    async def some_moved() -> bool:
        doc = cluster.ring()
        if doc.previous is None:
            return False
        rows = await query(shard_2.mysql or "", "SELECT COUNT(*) FROM red_packet_tombstone")
        return int(rows[0][0]) >= 20

    # 1. killed mid-move, then undone by rollback: everything is back on shard-2's side
    await kill_when(
        cluster, ["remove", "--node", "shard-2", "--move", "--batch", "10"], some_moved, "moves"
    )
    assert cluster.ring().previous is not None
    rc, out = await rebalance(cluster, "rollback")
    assert rc == 0, out
    assert [n.name for n in cluster.ring().nodes] == ["shard-0", "shard-1", "shard-2"]
    await assert_every_packet_on_its_version_owner(cluster)
    await assert_keys_and_history_follow_users(cluster, keyed)

    # 2. killed mid-move again, then finished by running the same command
    await kill_when(
        cluster, ["remove", "--node", "shard-2", "--move", "--batch", "10"], some_moved, "moves"
    )
    rc, out = await rebalance(cluster, "remove", "--node", "shard-2", "--move")
    assert rc == 0, out
    assert "resuming" in out, out
    load.stop.set()
    await task
    doc = cluster.ring()
    assert [n.name for n in doc.nodes] == ["shard-0", "shard-1"] and not doc.older
    assert shard_2.mysql and not await database_exists(shard_2.mysql)
    # A killed move leaves its batch frozen until the next command: opens of those packets
    # get 503 "moving" after the gateway's retry window (as with single handoffs), or, on a
    # slow box, 503 "being rebuilt" when a packet frozen, thawed by the rollback and loaded
    # again outlasts an open's attempts; nothing else fails but the node timeouts of a box
    # this loaded (printed). Every 503 is a retry: the mismatches and the checker below say
    # no share was lost or given twice.
    assert set(load.statuses) <= {200, 410, 503}, (load.statuses, load.messages)
    allowed = {"red packet is moving between shards; retry", "red packet is being rebuilt; retry"}
    timeouts = {m for m in load.messages if m.endswith("did not answer in time")}
    assert set(load.messages) <= allowed | timeouts, load.messages
    print(f"opens: {load.statuses}, failures: {load.messages}")
    assert not load.mismatches, load.mismatches[:10]
    held = await assert_every_packet_on_its_version_owner(cluster)
    assert {snowflake_of(p) for p in packets} | set(seeded) <= set().union(*held.values())
    await assert_keys_and_history_follow_users(cluster, keyed)
    await cluster.check(load.observed, allow_unfunded=True)  # seeded packets


def test_a_packet_is_served_by_the_version_that_placed_it() -> None:
    """The one routing rule: the newest version whose since_ms is not after the id's time."""
    a, b, c = (NodeSpec(f"shard-{i}", f"http://x{i}") for i in range(3))
    since_ms = int(time.time() * 1000)
    doc = RingDoc(
        5, (a, b, c), since_ms=since_ms, older=(RingDoc(3, (a, b), since_ms=since_ms - 10_000),)
    )
    assert RingDoc.parse(doc.as_dict()) == doc
    before = [IdGenerator.first_id_at(since_ms - 1) + i * 4096 for i in range(300)]
    after = [IdGenerator.first_id_at(since_ms) + i * 4096 for i in range(300)]
    assert {packet_owner(doc, p).name for p in before} == {"shard-0", "shard-1"}
    assert {packet_owner(doc, p).name for p in after} == {"shard-0", "shard-1", "shard-2"}
    # ids older than every version fall to the oldest one
    assert packet_owner(doc, IdGenerator.first_id_at(since_ms - 60_000)).name != "shard-2"


async def test_a_fenced_node_places_each_create_by_the_version_of_its_id(fresh_node: Any) -> None:
    """The fence carries the ring's versions: an id made before the newest version's
    since_ms is placed by the older version (here: this node alone), a later one by the
    newest (which gives part of them to another node: packet_moved to it)."""
    node = await fresh_node()
    me, other = node.spec(), NodeSpec("shard-x", "http://127.0.0.1:9")
    since_ms = int(time.time() * 1000) + 60_000
    doc = RingDoc(9, (me, other), since_ms=since_ms, older=(RingDoc(8, (me,)),))
    async with HandoffClient(node.secret) as client:  # the orchestrator's own call
        assert (await client.fence(me, doc))["node"] == me.name

    async def create(packet_id: int) -> tuple[int, Any]:
        return await node.call(
            "POST",
            "/internal/v1/packets",
            {
                "red_packet_id": str(packet_id),
                "uid": "5",
                "total_amount": 100,
                "total_packet": 1,
                "expire_seconds": 60,
                "create_token": secrets.token_hex(16),
            },
        )

    made_now = IdGenerator(3)
    for _ in range(10):  # the newest version would give about half of these to shard-x
        old = made_now.next_id()
        assert (await create(old))[0] == 201
    later = [IdGenerator.first_id_at(since_ms) + i * 4096 for i in range(40)]
    owners = Counter()
    for packet_id in later:
        status, body = await create(packet_id)
        owner = packet_owner(doc, packet_id).name
        owners[owner] += 1
        if owner == me.name:
            assert status == 201, body
        else:
            assert (status, body["error"]["owner"]) == (421, "shard-x"), body
    assert owners[me.name] and owners["shard-x"], owners
    # a node tells how many packets of an id range are still live (a version retires at 0)
    status, body = await node.call(
        "GET", "/internal/v1/handoff/live", from_id=str(old), before_id=str(old + 1)
    )
    assert (status, body["live"]) == (200, 1), body
    assert (await node.call("DELETE", "/internal/v1/handoff/ring"))[0] == 200


async def test_a_call_arriving_after_the_fence_is_lifted_is_sent_on_not_answered_404(
    fresh_node: Any,
) -> None:
    """A call routed by a change's transition ring can reach an old owner after the change
    ended and the fence was lifted (chaos seed 1: grabs held behind a paused Redis). For a
    packet the change's ring gives to another node, the answer is still packet_moved to it;
    404 stays for what this node should hold and does not."""
    node = await fresh_node()
    me, other = node.spec(), NodeSpec("shard-x", "http://127.0.0.1:9")
    doc = RingDoc(9, (me, other))
    async with HandoffClient(node.secret) as client:
        assert (await client.fence(me, doc))["node"] == me.name
    assert (await node.call("DELETE", "/internal/v1/handoff/ring"))[0] == 200  # lifted
    ids = [IdGenerator(5).next_id() + i * 4096 for i in range(40)]
    answers = Counter()
    for packet_id in ids:
        status, body = await node.call(
            "POST", f"/internal/v1/packets/{packet_id}/grab", {"uid": "7"}
        )
        if packet_owner(doc, packet_id).name == "shard-x":
            assert (status, body["error"]["owner"]) == (421, "shard-x"), body
        else:
            assert (status, body["error"]["code"]) == (404, "not_found"), body
        answers[status] += 1
    assert answers[421] and answers[404], answers


async def test_the_rebalance_bench_times_real_opens_of_warm_packets_through_a_change(
    make_cluster: Any,
) -> None:
    """`redpacket rebalance bench` (issue 22's benchmark) on a small cluster: its probe's opens
    reach the nodes and take shares before, during and after the change (for a while it
    timed the gateway's 404 of ids it never gave), `--hot` opens only the newest seeded
    packets, and the report says how many users moved and how fast. The checker is clean."""
    cluster: Cluster = await make_cluster(2)
    rc, out = await rebalance(
        cluster, "bench", "--node", "shard-2", "--packets", "2000", "--senders", "200",
        "--phase-s", "1.5", "--hot", "300", timeout_s=180,
    )  # fmt: skip
    assert rc == 0, out
    report = json.loads(out[out.index("{") :])
    assert report["hot_packets"] == 300 and report["exit_code"] == 0
    for phase in ("open_before", "open_during", "open_after"):
        assert report[phase]["shares_200"] > 0, (phase, report[phase])
    # users (and their keys) moved, at a measured rate
    assert report["users_moved"] > 0 and report["users_per_s"] > 0, report
    assert report["timings_s"]["user_rows"] >= report["timings_s"]["keys"] > 0, report
    await cluster.check(allow_unfunded=True)  # seeded packets are not funded by a wallet
