"""Users' idempotency keys and history move by users, as rows MySQL lists and merges itself
(node/handoff/users.py, sharding/rebalance/users.py), by the same merge rules as the relay's
apply (node/history.py): a user's history copied while new events for them reach the new
owner ends as the rows a single owner would have."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace
from typing import Any

from redpacket.bench.rebalance import seed_packets
from redpacket.sharding.client import HandoffClient
from redpacket.sharding.rebalance.pacer import LEAST, Pacer, Window
from redpacket.sharding.rebalance.users import UserMover
from redpacket.sharding.ring import RingDoc, user_key
from tests.conftest import Cluster, sql
from tests.test_rebalance import Load, keyed_creates, rebalance
from tests.test_scaleout import assert_keys_and_history_follow_users

NOW_MS = int(time.time() * 1000)
SECRET = secrets.token_hex(16)
_ROWS = {
    "user_received": "SELECT uid, red_packet_id, year, sender_uid, sender_nick, sender_img, "
    "kind, amount, luckiest, create_time FROM user_received ORDER BY uid, red_packet_id",
    "user_sent": "SELECT uid, red_packet_id, year, kind, total_amount, total_packet, "
    "opened_packet, opened_amount, refunded_amount, greeting, create_time, expire_time "
    "FROM user_sent ORDER BY uid, red_packet_id",
}


def received(uid: int, pid: int, amount: int, *, luckiest: bool = False) -> list[Any]:
    payload = {"amount": amount, "time": NOW_MS, "sender": "7", "sender_nick": '新年 "7"\\',
               "sender_img": "", "kind": "lucky", "luckiest": luckiest}  # fmt: skip
    return [str(uid), "received", str(pid), payload]


def sent(uid: int, pid: int, opened: int, *, refunded: int = 0) -> list[Any]:
    payload = {"kind": "lucky", "total_amount": 1000, "total_packet": 10,
               "opened_packet": opened, "opened_amount": opened * 100,
               "refunded_amount": refunded, "greeting": "恭喜", "create_time": NOW_MS,
               "expire_time": NOW_MS + 86_400_000}  # fmt: skip
    return [str(uid), "sent", str(pid), payload]


async def apply(node: Any, events: list[list[Any]]) -> None:
    status, body = await node.call("POST", "/internal/v1/history/events", {"events": events})
    assert status == 200 and not body.get("moved"), body


async def test_a_moved_history_merges_with_newer_events_already_on_the_new_owner(
    fresh_node: Any,
) -> None:
    """Node a holds users' keys and history; the ring gives them to node b, which meanwhile
    took newer events of theirs (more opens of their packets, a 手气最佳 flag, a refund) and
    an older one. After the move b holds exactly what one node applying every event would
    hold, a holds nothing of theirs, and a key bound differently on b is kept on both."""
    a, b = [
        replace(node, secret=SECRET)  # one secret: the orchestrator's client calls both
        for node in [
            await fresh_node(REDPACKET_NODE_NAME=name, REDPACKET_NODE_SECRET=SECRET)
            for name in ("shard-a", "shard-b")
        ]
    ]
    single = await fresh_node(REDPACKET_NODE_NAME="shard-single")
    doc = RingDoc(2, (a.spec(), b.spec()))
    uids = [u for u in range(1, 400) if doc.ring().owner_of_key(user_key(u)).name == "shard-b"]
    uids = uids[:40]
    before = [e for u in uids for p in range(5) for e in (received(u, 10 * u + p, 100 + p),
              sent(u, 50_000 + 10 * u + p, opened=3))]  # fmt: skip
    after = [e for u in uids[::2] for e in (
        received(u, 10 * u, 100, luckiest=True),  # the same share, now 手气最佳
        received(u, 10 * u + 9, 7),  # a share taken after the fence
        sent(u, 50_000 + 10 * u, opened=10, refunded=0),  # opened further
        sent(u, 50_000 + 10 * u + 1, opened=1),  # an older state, arriving late
        sent(u, 50_000 + 10 * u + 2, opened=3, refunded=700),  # refunded
    )]  # fmt: skip
    await apply(a, before)  # a has no ring: it keeps every user
    for uid in uids:
        await sql(a.settings.mysql_url, "INSERT INTO idempotency_key VALUES "
                  "(%s, %s, %s, %s, NOW(3))", (uid, f"k-{uid}", "a" * 64, 10 * uid))  # fmt: skip
    clash = uids[1]  # bound on b to another request (a change made outside this tool)
    await sql(b.settings.mysql_url, "INSERT INTO idempotency_key VALUES "
              "(%s, %s, %s, %s, NOW(3))", (clash, f"k-{clash}", "b" * 64, 1))  # fmt: skip
    async with HandoffClient(SECRET) as client:
        for node in (a, b):
            assert (await client.fence(node.spec(), doc))["node"] == node.settings.name
    await apply(b, after)  # new events of the moving users reach their new owner
    await apply(single, before + after)  # one owner, every event

    nodes = {"shard-a": a.spec(), "shard-b": b.spec()}
    async with HandoffClient(SECRET) as client:
        mover = UserMover(client, concurrency=2, rate=0, pacer=Pacer(0))
        done = await mover.move_users(nodes)
    assert done.users == len(uids) and done.clashes == 1, done
    for table, statement in _ROWS.items():
        assert await sql(b.settings.mysql_url, statement) == await sql(
            single.settings.mysql_url, statement
        ), table
        assert await sql(a.settings.mysql_url, statement) == [], table
    keys_b = await sql(b.settings.mysql_url, "SELECT uid, request_hash FROM idempotency_key")
    expected = [(u, "a" * 64) for u in uids if u != clash] + [(clash, "b" * 64)]
    assert sorted(keys_b) == sorted(expected)
    keys_a = await sql(a.settings.mysql_url, "SELECT uid, request_hash FROM idempotency_key")
    assert keys_a == [(clash, "a" * 64)]  # kept on both, reported
    # a second run finds nothing left to move (a resumed change repeats nothing)
    async with HandoffClient(SECRET) as client:
        mover = UserMover(client, concurrency=2, rate=0, pacer=Pacer(0))
        again = await mover.move_users(nodes)
    assert again.users == 1 and again.clashes == 1  # only the clashing key is still on a


async def test_users_history_copied_while_their_packets_are_opened_merges_like_one_owner(
    make_cluster: Any,
) -> None:
    """Heavy users (200 packets sent each: a key and a history row per packet) keep taking
    shares and having their packets opened through a live `rebalance add`; their rows reach
    the new owner while being copied there. Afterwards every user's history equals the ledgers,
    on their owner only (the checker), and their keys answer retried creates."""
    cluster: Cluster = await make_cluster(2)
    seeded = await seed_packets(
        cluster.ring(), 4000, senders=20, sender_base=1, expire_s=3600, shares=50
    )
    keyed = await keyed_creates(cluster, range(1, 21))  # after: the first of their sent pages
    # the same 20 users open those packets: shares for them, and their sent packets opened
    load = Load(cluster, [cluster.public_id(p) for p in seeded[::8]], users=20)
    task = load.start()
    await asyncio.sleep(1.0)
    rc, out = await rebalance(cluster, "add", "--node", "shard-2", "--no-move")
    assert rc == 0, out
    assert "moved the idempotency keys and history of" in out, out
    print(out)
    await asyncio.sleep(0.5)
    load.stop.set()
    await task
    # nothing fails but the node timeouts of a box this loaded (as in test_scaleout.py)
    assert set(load.statuses) <= {200, 410, 503}, (load.statuses, load.messages)
    assert all(m.endswith("did not answer in time") for m in load.messages), load.messages
    print(f"opens: {load.statuses}, failures: {load.messages}")
    assert not load.mismatches, load.mismatches[:10]
    await assert_keys_and_history_follow_users(cluster, keyed)
    await cluster.check(load.observed, allow_unfunded=True)  # seeded packets


def test_the_users_window_halves_on_a_slow_batch_and_grows_back_by_one_per_window() -> None:
    """AIMD on the round trip per row (sharding/rebalance/pacer.py): a batch over twice the
    best seen halves the batches in flight, down to a duty cycle under one; batches in time
    add one batch per window of them, up to --concurrency."""
    window = Window(4)
    assert window.limit == 2  # half of --concurrency to begin with
    window.record(0.1, 1000)  # the best: 0.1 ms per row
    window.record(0.1, 1000)
    window.record(0.1, 1000)
    assert 3 <= window.limit <= 4
    window.record(1.0, 1000)  # ten times slower: the nodes are busy
    assert 1.5 <= window.limit <= 2 and window.backoffs == 1
    window.record(1.0, 1000)  # slowed by the same moment: no second cut within the window
    assert window.backoffs == 1
    for _ in range(20):
        window.record(1.0, 1000)
    assert window.limit == LEAST and window.backoffs < 20
    for _ in range(40):
        window.record(0.1, 1000)
    assert window.limit == 4
    cuts = window.backoffs
    window.record(0.015, 10)  # a small batch is judged as FLOOR_ROWS rows: not slow
    assert window.limit == 4 and window.backoffs == cuts


async def test_a_user_with_more_rows_than_the_old_request_cap_moves_whole(
    fresh_node: Any,
) -> None:
    """A batch holds at least one whole user: a user with 25,000 history rows (about 8 MiB as
    they travel, past the 4 MiB a node used to accept in one request) moves in one batch
    instead of failing the change."""
    a, b = [
        replace(node, secret=SECRET)
        for node in [
            await fresh_node(REDPACKET_NODE_NAME=name, REDPACKET_NODE_SECRET=SECRET)
            for name in ("shard-a", "shard-b")
        ]
    ]
    doc = RingDoc(2, (a.spec(), b.spec()))
    uid = next(u for u in range(1, 400) if doc.ring().owner_of_key(user_key(u)).name == "shard-b")
    await sql(  # MariaDB's sequence engine: 25,000 shares this user took, long display fields
        a.settings.mysql_url,
        "INSERT INTO user_received (uid, red_packet_id, year, sender_uid, sender_nick, "
        "sender_img, kind, amount, luckiest, create_time) SELECT %s, seq, 2026, seq, "
        "REPEAT('新', 60), CONCAT('https://img.example/', REPEAT('x', 150)), 'lucky', 1, 0, "
        "NOW(3) FROM seq_1_to_25000",
        (uid,),
    )
    async with HandoffClient(SECRET) as client:
        for node in (a, b):
            await client.fence(node.spec(), doc)
        mover = UserMover(client, concurrency=2, rate=0, pacer=Pacer(0))
        done = await mover.move_users({"shard-a": a.spec(), "shard-b": b.spec()})
    assert done.users == 1, done
    count = "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM user_received WHERE uid = %s"
    assert await sql(b.settings.mysql_url, count, (uid,)) == [(25_000, 25_000)]
    assert await sql(a.settings.mysql_url, count, (uid,)) == [(0, 0)]
