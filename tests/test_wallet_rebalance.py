"""Wallets move with their users in a live rebalance, under a load of creates, opens and
top-ups, and no cent is created or lost (the checker's conservation, and every wallet on its
user's owner only)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from redpacket.cli.check import check_shards
from redpacket.sharding.client import HandoffClient
from redpacket.sharding.rebalance.pacer import Pacer
from redpacket.sharding.rebalance.users import UserMover
from redpacket.sharding.ring import user_key
from tests.conftest import TEST_GRANT, Cluster, node_pair, sql
from tests.test_rebalance import rebalance
from tests.test_wallet import topup, transactions, wallet

SECRET = "wallet-moves-" + "0" * 20
CHAIN = "SELECT id, kind, balance_after FROM wallet_txn WHERE uid = %s ORDER BY id"
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


MOVERS = range(19_201, 19_241)


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "replayed"}


async def test_a_topup_replayed_across_a_wallet_move_answers_its_first_result(
    make_cluster: Any,
) -> None:
    """Top up, move the wallets (rebalance add), replay: the same body, and the transactions
    keep their ids. Replays sent all through the move (the fence to import window included)
    get the first answer or 503 (retry), never a second credit or another answer."""
    cluster: Cluster = await make_cluster(args=("--starting-balance", "1000"))
    first: dict[int, dict[str, Any]] = {}
    for uid in MOVERS:
        status, body = await topup(cluster, uid, 250, f"first-{uid}")
        assert status == 201, body
        first[uid] = _answer(body)
    before = {uid: (await transactions(cluster, uid))["transactions"] for uid in MOVERS}
    seen: Counter[int] = Counter()
    stop = asyncio.Event()

    async def replays() -> None:
        while not stop.is_set():
            for uid in MOVERS:
                status, body = await topup(cluster, uid, 250, f"first-{uid}")
                seen[status] += 1
                if status != 503:
                    assert (status, _answer(body)) == (200, first[uid]), (uid, status, body)

    load = asyncio.gather(replays(), replays())
    rc, out = await rebalance(cluster, "add", "--node", "shard-2")
    stop.set()
    await load
    assert rc == 0, out
    assert set(seen) <= {200, 503} and seen[200] > 0, seen
    ring = cluster.ring().ring()
    moved = [u for u in MOVERS if ring.owner_of_key(user_key(u)).name == "shard-2"]
    assert moved, "no wallet moved: pick other users"
    for uid in MOVERS:
        status, body = await topup(cluster, uid, 250, f"first-{uid}")
        assert (status, _answer(body)) == (200, first[uid]), (uid, status, body)
        assert (await wallet(cluster, uid))["balance"] == 1250
        assert (await transactions(cluster, uid))["transactions"] == before[uid], uid
    await cluster.check(settle_s=20)


async def test_a_moved_transaction_whose_id_is_taken_is_renumbered_with_its_successors(
    fresh_node: Any,
) -> None:
    """Two nodes whose generators drew the same generator id made one transaction id each
    (here: a sender's grant on a, another user's grant on b). When the sender's wallet moves
    to b, the grant gets a new id, and so does every later transaction of the sender, in
    order: the chain still reads by id (the send after the grant, the last ``balance_after``
    the balance), and the other user's row is untouched."""
    a, b, doc = await node_pair(fresh_node, SECRET)
    sender, other = [u for u in range(1, 100) if doc.ring().owner_of_key(user_key(u)).name
                     == "shard-b"][:2]  # fmt: skip
    await a.create(1000, 10, uid=sender)  # a keeps every user until fenced: grant, send
    grant_id, send_id = [r[0] for r in await sql(a.settings.mysql_url, CHAIN, (sender,))]
    await sql(
        b.settings.mysql_url,
        "INSERT INTO wallet (uid, balance, granted, update_time) VALUES (%s, %s, 1, NOW(3))",
        (other, TEST_GRANT),
    )
    await sql(
        b.settings.mysql_url,
        "INSERT INTO wallet_txn (id, uid, kind, ref, amount, red_packet_id, balance_after, "
        "create_time) VALUES (%s, %s, 'grant', 'dev', %s, NULL, %s, NOW(3))",
        (grant_id, other, TEST_GRANT, TEST_GRANT),
    )
    async with HandoffClient(SECRET) as client:
        for node in (a, b):
            await client.fence(node.spec(), doc)
        mover = UserMover(client, concurrency=2, rate=0, pacer=Pacer(0))
        assert await mover.move_wallets({"shard-a": a.spec(), "shard-b": b.spec()}, doc.ring()) == 1

    chain = await sql(b.settings.mysql_url, CHAIN, (sender,))
    assert [(kind, after) for _, kind, after in chain] == [
        ("grant", TEST_GRANT),
        ("send", TEST_GRANT - 1000),
    ]
    assert grant_id < chain[0][0] < chain[1][0] and send_id not in {r[0] for r in chain}
    assert await sql(b.settings.mysql_url, CHAIN, (other,)) == [(grant_id, "grant", TEST_GRANT)]
    assert await sql(a.settings.mysql_url, CHAIN, (sender,)) == []
    report = await check_shards([a.spec(), b.spec()], [], settle_s=10)
    assert report.ok, report.violations
