"""Adding and removing shards live (`redpacket rebalance`, local backend) on real clusters."""

from __future__ import annotations

import asyncio
import random
import secrets
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from redpacket.cli.check import Observed, check_shards
from redpacket.core.ids import snowflake_of
from redpacket.node.ledger import parse_mysql_url
from redpacket.node.redis_keys import packet_keys
from redpacket.sharding.backends.local import LocalBackend
from redpacket.sharding.client import HandoffClient, NodeError
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc
from tests.conftest import IDS, NODE_SECRET_HEADER, Cluster, NodeHandle, sql

# -- helpers --------------------------------------------------------------------------------


@dataclass
class Load:
    """Users opening random packets until told to stop (a uid may open a packet again: a
    replay must answer the same amount, wherever the packet lives by then)."""

    cluster: Cluster
    packets: list[str]
    users: int
    workers: int = 40
    amounts: dict[tuple[int, int], int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    messages: Counter[str] = field(default_factory=Counter)
    failed_at: list[float] = field(default_factory=list)  # time.monotonic() of each failure
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            packet_id, uid = rng.choice(self.packets), rng.randint(1, self.users)
            try:
                status, body = await self.cluster.open(packet_id, uid)
            except (aiohttp.ClientError, TimeoutError):
                status, body = 599, {"error": {"code": "connection"}}
            self.statuses[status] += 1
            if status == 200:
                first = self.amounts.setdefault((snowflake_of(packet_id), uid), body["amount"])
                if first != body["amount"]:
                    self.mismatches.append(f"{packet_id}/{uid}: {first} then {body['amount']}")
            elif status != 410:
                error = (body or {}).get("error", {})
                self.codes[str(error.get("code", status))] += 1
                self.messages[str(error.get("message", ""))] += 1
                self.failed_at.append(time.monotonic())
            await asyncio.sleep(rng.random() * 0.01)

    def start(self) -> asyncio.Future[list[None]]:
        return asyncio.gather(*(self._worker(i) for i in range(self.workers)))

    def opens(self) -> int:
        return sum(self.statuses.values())

    @property
    def observed(self) -> list[Observed]:
        return [Observed(p, u, a) for (p, u), a in self.amounts.items()]


def rebalance_argv(cluster: Cluster, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "redpacket.cli",
        "rebalance",
        *args,
        "--cluster",
        cluster.name,
        "--var",
        str(cluster.home.parent),
        "--no-progress",
        "--gateway-timeout-s",
        "20",
    ]


async def start_rebalance(cluster: Cluster, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *rebalance_argv(cluster, *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def rebalance(cluster: Cluster, *args: str, timeout_s: float = 120) -> tuple[int, str]:
    proc = await start_rebalance(cluster, *args)
    async with asyncio.timeout(timeout_s):
        out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode()


async def query(mysql_url: str, statement: str) -> list[tuple[Any, ...]]:
    return await sql(mysql_url, statement)


async def database_exists(mysql_url: str) -> bool:
    server = mysql_url.rsplit("/", 1)[0]
    database = parse_mysql_url(mysql_url).database
    return bool(await sql(server, "SHOW DATABASES LIKE %s", (database,)))


async def create_many(cluster: Cluster, count: int, amount: int, shares: int) -> list[str]:
    async def one(i: int) -> str:
        return await cluster.create(5000 + i, amount, shares)

    ids: list[str] = []
    for start in range(0, count, 50):
        ids += await asyncio.gather(*(one(i) for i in range(start, min(count, start + 50))))
    return ids


async def keyed_create(cluster: Cluster, uid: int) -> tuple[int, Any]:
    """One create with the user's Idempotency-Key (``key-<uid>``): a retry gets the same
    packet, wherever the key moved with its user."""
    return await cluster.call(
        "POST",
        "/v1/red-packets",
        uid,
        {"total_amount": 300, "total_packet": 3},
        headers={"Idempotency-Key": f"key-{uid}"},
    )


async def keyed_creates(cluster: Cluster, uids: range) -> dict[int, str]:
    """Creates with an Idempotency-Key (the key lives with its user, and moves with them)."""
    keyed = {}
    for uid in uids:
        status, body = await keyed_create(cluster, uid)
        assert status == 201, body
        keyed[uid] = body["red_packet_id"]
    return keyed


async def create_on_owner(cluster: Cluster, *, expire_seconds: int, shares: int) -> str:
    """A packet created on its node directly (the gateway's lifetime is fixed per cluster)."""
    packet_id, token = IDS.next_id(), secrets.token_hex(16)
    owner = cluster.ring().ring().owner(snowflake_of(packet_id))
    assert cluster.session is not None
    await cluster.hold(77, 1000, token, packet_id)  # paid for (the sweeper confirms the hold)
    async with cluster.session.post(
        owner.url + "/internal/v1/packets",
        json={
            "red_packet_id": str(packet_id),
            "uid": "77",
            "total_amount": 1000,
            "total_packet": shares,
            "expire_seconds": expire_seconds,
            "create_token": token,
        },
        headers={NODE_SECRET_HEADER: cluster.state["node_secret"]},
    ) as resp:
        assert resp.status == 201, await resp.text()
    return cluster.public_id(packet_id)


async def records_by_node(nodes: list[NodeSpec]) -> dict[str, list[tuple[int, int, int]]]:
    found = {}
    for node in nodes:
        assert node.mysql
        found[node.name] = [
            (int(p), int(u), int(a))
            for p, u, a in await query(
                node.mysql, "SELECT red_packet_id, uid, amount FROM red_packet_record"
            )
        ]
    return found


async def packets_by_node(nodes: list[NodeSpec]) -> dict[str, dict[int, str]]:
    found = {}
    for node in nodes:
        assert node.mysql
        rows = await query(node.mysql, "SELECT red_packet_id, status FROM red_packet_info")
        found[node.name] = {int(p): str(s) for p, s in rows}
    return found


async def assert_all_on_their_owner(cluster: Cluster, packet_ids: list[str]) -> None:
    """Every packet is live on exactly its owner in the ring, and nothing is mid-handoff."""
    doc = cluster.ring()
    assert doc.previous is None, doc
    held = await packets_by_node(list(doc.nodes))
    ring = doc.ring()
    for name, packets in held.items():
        assert "moving" not in packets.values(), name
        for packet_id in packets:
            assert ring.owner(snowflake_of(packet_id)).name == name, (packet_id, name)
    everywhere = Counter(pid for packets in held.values() for pid in packets)
    assert {snowflake_of(p) for p in packet_ids} <= set(everywhere)
    assert set(everywhere.values()) == {1}
    for node in doc.nodes:
        assert node.mysql
        assert await query(node.mysql, "SELECT * FROM red_packet_handoff") == []


async def records_via_gateway(cluster: Cluster, packet_id: str) -> dict[int, int]:
    found: dict[int, int] = {}
    cursor = None
    while True:
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        status, page = await cluster.call(
            "GET", f"/v1/red-packets/{packet_id}/records", 1, **params
        )
        assert status == 200, (packet_id, page)
        found.update({int(r["uid"]): r["amount"] for r in page["records"]})
        cursor = page["next_cursor"]
        if cursor is None:
            return found


async def wait_for(predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# -- the tests ------------------------------------------------------------------------------


async def test_scale_2_to_3_to_2_under_an_open_load(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster(
        2, REDPACKET_REFUND_GRACE_S="0.2", REDPACKET_SWEEP_INTERVAL_S="0.3"
    )
    started = time.monotonic()
    busy = await create_many(cluster, 240, amount=10_000, shares=100)  # never sell out here
    small = await create_many(cluster, 60, amount=500, shares=5)  # sell out, then 410
    keyed = await keyed_creates(cluster, range(9001, 9021))  # the keys move too
    # packets that expire and are refunded before they move: the refund moves with them
    expiring = [await create_on_owner(cluster, expire_seconds=1, shares=5) for _ in range(10)]
    early: list[Observed] = []
    for packet_id in expiring:
        status, body = await cluster.open(packet_id, 1)
        assert status == 200, body
        early.append(Observed(snowflake_of(packet_id), 1, body["amount"]))

    async def refunded() -> bool:
        statuses = [(await cluster.call("GET", f"/v1/red-packets/{p}", 1))[1] for p in expiring]
        return all(s["status"] == "refunded" for s in statuses)

    await wait_for(refunded, what="refunds")

    load = Load(cluster, busy + small, users=150)
    created: list[str] = []
    create_answers: Counter[int] = Counter()
    fresh_opens: list[Observed] = []

    async def creator() -> None:
        """Packets created while the ring changes, each opened at once."""
        i = 0
        while not load.stop.is_set():
            status, body = await cluster.call(
                "POST", "/v1/red-packets", 7000 + i % 50, {"total_amount": 200, "total_packet": 2}
            )
            create_answers[status] += 1
            if status == 201:
                created.append(body["red_packet_id"])
                status, body = await cluster.open(body["red_packet_id"], 1)
                create_answers[status] += 1
                if status == 200:
                    fresh_opens.append(Observed(snowflake_of(created[-1]), 1, body["amount"]))
            i += 1
            await asyncio.sleep(0.01)

    task = asyncio.gather(load.start(), creator())
    await asyncio.sleep(1.0)
    opens = [load.opens()]
    rc, out = await rebalance(cluster, "add", "--node", "shard-2")
    assert rc == 0, out
    opens.append(load.opens())
    doc = cluster.ring()
    assert [n.name for n in doc.nodes] == ["shard-0", "shard-1", "shard-2"]
    assert doc.previous is None and doc.version == 3
    shard_2 = doc.nodes[2]
    await asyncio.sleep(1.0)  # the load on three shards
    rc, out = await rebalance(cluster, "remove", "--node", "shard-2")
    assert rc == 0, out
    opens.append(load.opens())
    load.stop.set()
    await task

    doc = cluster.ring()
    assert [n.name for n in doc.nodes] == ["shard-0", "shard-1"] and doc.version == 5
    assert "shard-2" not in {s["name"] for s in cluster.state["shards"]}
    # the load ran while packets moved, and never saw a 5xx, a 404 or a handoff answer
    assert opens[0] < opens[1] < opens[2], opens
    assert set(load.statuses) <= {200, 410}, (load.statuses, load.codes)
    assert not load.mismatches, load.mismatches[:10]
    assert len(load.observed) > 1000
    assert set(create_answers) == {200, 201} and len(created) > 20, create_answers

    observed = load.observed + early + fresh_opens
    await cluster.check(observed)
    await assert_all_on_their_owner(
        cluster, busy + small + expiring + created + list(keyed.values())
    )
    # the change is over: the nodes are not fenced any more
    for node in doc.nodes:
        assert node.mysql and await query(node.mysql, "SELECT * FROM shard_ring") == []
    # every 200 is in MySQL exactly once, on the packet's final owner
    assert shard_2.mysql and not await database_exists(shard_2.mysql)
    ring = doc.ring()
    where: Counter[tuple[int, int]] = Counter()
    for name, rows in (await records_by_node(list(doc.nodes))).items():
        for packet_id, uid, _ in rows:
            assert ring.owner(snowflake_of(packet_id)).name == name
            where[(packet_id, uid)] += 1
    for seen in observed:
        assert where[(seen.red_packet_id, seen.uid)] == 1, seen
    # records of every packet are complete, through the public API
    winners: dict[int, dict[int, int]] = {}
    for seen in observed:
        winners.setdefault(seen.red_packet_id, {})[seen.uid] = seen.amount
    for packet_id in busy + small + expiring + created:
        assert await records_via_gateway(cluster, packet_id) == winners.get(
            snowflake_of(packet_id), {}
        )
    for packet_id in expiring:
        _, info = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 1)
        assert info["status"] == "refunded"
    # idempotency keys followed their users: a retried create gets the same packet
    for uid, packet_id in keyed.items():
        status, body = await keyed_create(cluster, uid)
        assert (status, body["red_packet_id"]) == (201, packet_id)
    print(f"2 -> 3 -> 2 with {len(load.observed)} opens took {time.monotonic() - started:.1f}s")


async def leave_half_done(
    client: HandoffClient, doc: Any, packet_ids: list[str], held: dict[str, dict[int, str]]
) -> list[int]:
    """Put three packets that must move into each half-done handoff state, by hand."""
    nodes = {n.name: n for n in (*doc.nodes, *doc.previous.nodes)}
    target = doc.ring()
    picked = []
    for packet_id in map(snowflake_of, packet_ids):
        owner = target.owner(snowflake_of(packet_id)).name
        holder = next((n for n, packets in held.items() if packet_id in packets), owner)
        if holder != owner and held[holder][packet_id] != "moving":
            picked.append((packet_id, nodes[holder], nodes[owner]))
        if len(picked) == 3:
            break
    assert len(picked) == 3
    for step, (packet_id, source, dest) in enumerate(picked):
        export = await client.export(source, packet_id, dest.name, doc.version)
        if step >= 1:
            assert await client.import_(dest, packet_id, export, doc.version) == "staged"
        if step >= 2:
            assert await client.activate(dest, packet_id) == "active"
    return [p for p, _, _ in picked]


async def kill_when(cluster: Cluster, args: list[str], predicate: Any, what: str) -> None:
    """Start a paced rebalance and SIGKILL it as soon as ``predicate()`` holds."""
    proc = await start_rebalance(cluster, *args, "--rate", "25", "--concurrency", "2")
    try:
        await wait_for(predicate, what=what)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


async def kill_midway(cluster: Cluster, *args: str, moved_to: str) -> None:
    """Start a paced rebalance and SIGKILL it once a few packets reached ``moved_to``."""

    async def some_moved() -> bool:
        doc = cluster.ring()
        node = doc.node(moved_to)
        if doc.previous is None or node is None or node.mysql is None:
            return False
        if not await database_exists(node.mysql):
            return False
        try:
            held = await query(node.mysql, "SELECT COUNT(*) FROM red_packet_info")
        except Exception:  # the schema is not there yet
            return False
        return int(held[0][0]) >= 5

    await kill_when(cluster, list(args), some_moved, f"packets on {moved_to}")


async def test_a_killed_rebalance_is_finished_or_undone_by_running_again(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster(2)
    secret = cluster.state["node_secret"]
    packets = await create_many(cluster, 200, amount=1000, shares=10)
    observed: list[Observed] = []

    async def open_all(uid: int, subset: list[str]) -> None:
        results = await asyncio.gather(*(cluster.open(p, uid) for p in subset))
        for packet_id, (status, body) in zip(subset, results, strict=True):
            assert status == 200, (packet_id, body)
            observed.append(Observed(snowflake_of(packet_id), uid, body["amount"]))

    for uid in (1, 2, 3):
        await open_all(uid, packets[:120])

    # 1. an addition killed mid-way, with handoffs left half done, is undone by `rollback`
    await kill_midway(cluster, "add", "--node", "shard-2", moved_to="shard-2")
    doc = cluster.ring()
    assert doc.previous is not None and [n.name for n in doc.nodes][-1] == "shard-2"
    async with HandoffClient(secret) as client:
        half = await leave_half_done(client, doc, packets, await packets_by_node(cluster.nodes()))
    # exported, not finished: frozen where it was, not yet live where it goes, so no node
    # takes the open; the gateway retries it for a while, then answers 503
    status, body = await cluster.open(cluster.public_id(half[0]), 4)
    assert (status, body["error"]["code"]) == (503, "unavailable")

    async def rolling_back() -> bool:
        return cluster.ring().note.startswith("rollback")

    await kill_when(cluster, ["rollback"], rolling_back, "the rollback ring")  # killed too
    rc, out = await rebalance(cluster, "rollback")  # the same command again: it goes on
    assert rc == 0, out
    assert "resuming the interrupted rollback" in out, out
    assert [n.name for n in cluster.ring().nodes] == ["shard-0", "shard-1"]
    assert "shard-2" not in {s["name"] for s in cluster.state["shards"]}
    await assert_all_on_their_owner(cluster, packets)
    await open_all(4, packets[:150])
    await cluster.check(observed)

    # 2. an addition killed mid-way is finished by running the same command again
    await kill_midway(cluster, "add", "--node", "shard-2", moved_to="shard-2")
    doc = cluster.ring()
    async with HandoffClient(secret) as client:
        await leave_half_done(client, doc, packets, await packets_by_node(cluster.nodes()))
    rc, out = await rebalance(cluster, "add", "--node", "shard-2")
    assert rc == 0, out
    assert "resuming" in out
    assert [n.name for n in cluster.ring().nodes] == ["shard-0", "shard-1", "shard-2"]
    await assert_all_on_their_owner(cluster, packets)
    await open_all(5, packets[:150])
    await cluster.check(observed)
    ring: Ring = cluster.ring().ring()
    assert any(ring.owner(snowflake_of(p)).name == "shard-2" for p in packets)


async def test_dry_run_counts_and_changes_nothing_and_sighup_reloads_the_ring(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster(2, REDPACKET_RING_POLL_S="600")  # SIGHUP only
    packets = await create_many(cluster, 40, amount=100, shares=2)
    before = cluster.ring()
    rc, out = await rebalance(cluster, "add", "--node", "shard-9", "--dry-run")
    assert rc == 0, out
    target = Ring([*before.nodes, NodeSpec("shard-9", "http://x")])
    expected = Counter(
        cluster.shard_of(snowflake_of(p))
        for p in packets
        if target.owner(snowflake_of(p)).name == "shard-9"
    )
    for source, count in expected.items():
        assert f"{source} -> shard-9: {count}" in out, out
    assert cluster.ring() == before
    assert "shard-9" not in {s["name"] for s in cluster.state["shards"]}
    rc, out = await rebalance(cluster, "remove", "--node", "shard-1", "--dry-run")
    assert rc == 0 and "shard-1 -> shard-0" in out, out
    assert cluster.ring() == before
    # publishing through the supervisor makes the gateway load the ring at once (SIGHUP)
    backend = LocalBackend(cluster.name, str(cluster.home.parent))
    await backend.publish_ring(RingDoc(before.version + 1, before.nodes))
    assert await backend.ring_loaded(before.version + 1, timeout_s=2)


async def test_a_handoff_commits_pending_claims_first_and_leaves_a_tombstone(
    fresh_node: Any, proxied_mysql: Any
) -> None:
    """One packet through export -> import -> activate -> finish by hand, on two nodes."""
    url, proxy = await proxied_mysql("handoff")  # the given credentials, through a proxy
    secret = secrets.token_hex(16)
    src: NodeHandle = await fresh_node(
        REDPACKET_MYSQL_URL=url,
        REDPACKET_MYSQL_TIMEOUT_S="1",
        REDPACKET_RECONCILE_INTERVAL_S="60",
        REDPACKET_NODE_NAME="shard-0",
        REDPACKET_NODE_SECRET=secret,
    )
    dst: NodeHandle = await fresh_node(REDPACKET_NODE_NAME="shard-1", REDPACKET_NODE_SECRET=secret)
    src.secret = dst.secret = secret
    try:
        packet_id = await src.create(total_amount=1000, total_packet=10)
        observed = []
        for uid in (1, 2):
            status, body = await src.open(packet_id, uid)
            assert status == 200
            observed.append(Observed(packet_id, uid, body["amount"]))
        proxy.block()
        refused = await asyncio.gather(*(src.open(packet_id, uid) for uid in (3, 4, 5)))
        assert {status for status, _ in refused} == {503}
        assert len(await src.shard.counters.pending(packet_id)) == 3

        async with HandoffClient(secret) as client:
            # the claims Redis holds cannot be committed: the packet does not move, and stays live
            with pytest.raises(NodeError) as refusal:
                await client.export(src.spec(), packet_id, "shard-1", 2)
            assert refusal.value.status == 503
            info_key = packet_keys(packet_id)[0]
            assert await src.shard.counters.client.hget(info_key, "state") == ""
            proxy.unblock()
            export = await client.export(src.spec(), packet_id, "shard-1", 2)
            assert export["state"] == "exported"
            assert len(export["records"]) == 5  # the three pending claims were committed first
            assert export["packet"]["remaining_packet"] == 5
            # exported: frozen where it is, nowhere else yet
            status, body = await src.open(packet_id, 6)
            assert (status, body["error"]["code"]) == (409, "packet_frozen")
            assert (await dst.open(packet_id, 6))[0] == 404
            assert await client.import_(dst.spec(), packet_id, export, 2) == "staged"
            status, body = await dst.open(packet_id, 6)  # staged copies are inert
            assert (status, body["error"]["code"]) == (409, "packet_frozen")
            assert await client.activate(dst.spec(), packet_id) == "active"
            assert await client.finish(src.spec(), packet_id, dst.spec(), 2) == "moved"
            # every step again: nothing changes
            assert (await client.export(src.spec(), packet_id, "shard-1", 2))["state"] == "moved"
            assert await client.import_(dst.spec(), packet_id, export, 2) == "active"
            assert await client.activate(dst.spec(), packet_id) == "active"
            assert await client.finish(src.spec(), packet_id, dst.spec(), 2) == "moved"
            with pytest.raises(NodeError, match="handoff_conflict"):
                await client.discard(dst.spec(), packet_id)  # live, not staged: never dropped
            await client.fence(dst.spec(), RingDoc(3, (dst.spec(),)))
            with pytest.raises(NodeError, match="handoff_conflict"):
                await client.export(dst.spec(), packet_id, "shard-0", 2)  # a stale rebalance

        # the old owner sends every call for the packet to the new one
        open_body = {"uid": "7", "nick_name": "", "img_url": ""}
        create_body = {
            "red_packet_id": str(packet_id),
            "uid": "1",
            "total_amount": 1000,
            "total_packet": 10,
            "expire_seconds": 3600,
            "create_token": "x" * 32,
        }
        for method, path, body in (
            ("POST", f"/internal/v1/packets/{packet_id}/open", open_body),
            ("POST", f"/internal/v1/packets/{packet_id}/grab", {"uid": "7"}),
            ("GET", f"/internal/v1/packets/{packet_id}", None),
            ("GET", f"/internal/v1/packets/{packet_id}/records", None),
            ("GET", f"/internal/v1/packets/{packet_id}/winners", None),
            ("POST", "/internal/v1/packets", create_body),
        ):
            status, answer = await src.call(method, path, body)
            assert status == 421, (path, answer)
            assert answer["error"]["code"] == "packet_moved"
            assert (answer["error"]["owner"], answer["error"]["owner_url"]) == ("shard-1", dst.url)
        # the users refused with 503 were owed their share, and get it where the packet is now
        for uid in (3, 4, 5):
            status, body = await dst.open(packet_id, uid)
            assert status == 200 and body["replayed"] is True
            observed.append(Observed(packet_id, uid, body["amount"]))
        # two nodes without a ring each keep every user's history (here: src's): check both
        report = await check_shards([src.spec(), dst.spec()], observed, settle_s=10)
        assert report.ok, "\n".join(report.violations)
        assert report.packets == 1
    finally:
        await proxy.stop()
