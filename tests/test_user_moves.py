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
from redpacket.core.metrics import RecentBuckets, quantile
from redpacket.sharding.client import HandoffClient
from redpacket.sharding.rebalance.latency import READ_TIMEOUT_S, OpenLatency, p99_between
from redpacket.sharding.rebalance.pacer import FLOOR_S, LEAST, SPAN_READINGS, Pacer, Window
from redpacket.sharding.rebalance.users import UserMover
from redpacket.sharding.ring import NodeSpec, user_key
from tests.conftest import Cluster, node_pair, sql
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
    a, b, doc = await node_pair(fresh_node, SECRET)
    single = await fresh_node(REDPACKET_NODE_NAME="shard-single")
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
    # paced against the opens' p99 read before the change (while shard-2 started)
    assert "the opens' p99 was" in out, out
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


def test_the_users_window_halves_when_the_opens_p99_is_over_budget_and_grows_back() -> None:
    """AIMD on the nodes' open p99 (sharding/rebalance/pacer.py): a reading over the budget
    times the baseline halves the batches in flight, at most once per span of readings, down
    to a duty cycle under one; readings within it add a batch each, up to --concurrency.
    A slow batch by itself no longer means anything: only the opens' latency does."""
    window = Window(4, budget=2.0)
    assert window.limit == 4  # no baseline yet: nothing to pace by
    window.set_baseline(0.005)  # the opens' p99 before users move: 5 ms
    assert window.limit == 2 and window.threshold_s == 0.010  # half of --concurrency
    for _ in range(2):
        window.reading(0.008, opens=500)  # within 2 x 5 ms: a batch more each
    assert window.limit == 4
    window.reading(0.0125, opens=500)  # over 10 ms: the nodes' opens wait behind the move
    assert window.limit == 2 and window.backoffs == 1
    for _ in range(SPAN_READINGS - 1):
        window.reading(0.0125, opens=500)  # the same span's opens: no second cut
    assert window.limit == 2 and window.backoffs == 1
    for _ in range(40):
        window.reading(0.030, opens=500)
    assert window.limit == LEAST and window.backoffs == 4  # 2 -> 1 -> 0.5 -> 0.25
    window.reading(0.030, opens=5)  # too few opens to judge: a reading like no opens at all
    assert window.limit == 2 * LEAST
    for _ in range(40):
        window.reading(0.009, opens=500)
    assert window.limit == 4 and window.worst_s == 0.030


def test_the_window_judges_a_tiny_baseline_as_the_floor_and_stays_open_without_budget() -> None:
    """A baseline under FLOOR_S (the histogram's finest buckets) is judged as FLOOR_S; a
    budget of 0, or no opens before the move, leaves the window at --concurrency."""
    window = Window(8, budget=2.0)
    window.set_baseline(0.0003)
    assert window.threshold_s == 2 * FLOOR_S
    window.reading(0.004, opens=500)  # over 2 x 0.3 ms, within 2 x FLOOR_S
    assert window.backoffs == 0
    for budget, baseline in ((0.0, 0.005), (2.0, None)):
        window = Window(8, budget=budget)
        window.set_baseline(baseline)
        window.reading(1.0, opens=500)
        assert window.limit == 8 and window.backoffs == 0


def test_the_p99_of_two_reads_of_the_nodes_histograms_is_interpolated_in_its_bucket() -> None:
    """The opens between two reads, every node together, as Prometheus' histogram_quantile
    reads them (core/metrics.py ``quantile``); a node missing or restarted is left out."""
    inf = float("inf")

    def h(*counts: float) -> list[tuple[float, float]]:  # buckets of 5 ms, 10 ms, +Inf
        return list(zip((0.005, 0.01, inf), counts, strict=True))

    before = {"a": h(100, 100, 100), "b": h(7, 7, 9)}
    after = {"a": h(150, 195, 200), "b": h(0, 0, 0), "c": h(1, 1, 1)}
    p99_s, opens = p99_between(before, after)
    assert opens == 100  # a's alone: b restarted, c was not read before
    assert p99_s == 0.01  # the 99th of 100 is past the 10 ms bucket: its last finite bound
    assert quantile(h(50, 95, 100), 0.5) == 0.005
    assert quantile(h(40, 90, 100), 0.6) == 0.005 + 0.005 * 0.4
    assert p99_between(before, before) == (None, 0)


async def test_a_node_says_its_open_latency_histogram_to_the_rebalance(fresh_node: Any) -> None:
    """The signal of the users' window comes from the node's own open histogram (the one
    /metrics shows), read over the handoff API: opens between two reads are counted there,
    and the baseline (the opens since the node's reading of a few seconds ago, here its
    start) is there at once, without waiting for more opens."""
    node = replace(await fresh_node(REDPACKET_NODE_SECRET=SECRET), secret=SECRET)
    async with HandoffClient(SECRET) as client:
        before = await client.open_latency(node.spec())
        assert before is not None and before.now[-1][0] == float("inf")
        for _ in range(3):  # answered (404: no such packet) and timed like any open
            await node.call("POST", "/internal/v1/packets/1234/open", {"uid": "7"})
        after = await client.open_latency(node.spec())
        baseline_s = await OpenLatency(client, {"n": node.spec()}).baseline()
    assert after is not None and after.earlier is not None
    p99_s, opens = p99_between({"n": before.now}, {"n": after.now})
    assert opens >= 3 and p99_s is not None and p99_s > 0  # other nodes of this process too
    _, since_start = p99_between({"n": after.earlier}, {"n": after.now})
    assert since_start >= 3 and baseline_s is not None and baseline_s > 0


def test_a_node_remembers_its_histogram_of_the_last_seconds_only() -> None:
    """The baseline is the opens of the last few seconds: of a reading per ``every_s``, the
    node keeps those of the last ``keep_s`` (and one more, the span's start)."""
    inf = float("inf")
    counts = [0.0]
    recent = RecentBuckets(lambda: [(inf, counts[0])], keep_s=2.0, every_s=1.0)
    for count in (1.0, 2.0, 3.0, 4.0):  # five readings in all: the start's 0, then these
        counts[0] = count
        recent.tick()
    assert recent.earliest()[1] == [(inf, 2.0)]  # 2, 3 and 4 kept
    counts[0] = 9.0
    assert recent.now() == [(inf, 9.0)]


async def test_a_hung_node_is_left_out_of_a_latency_reading_not_waited_for(
    fresh_node: Any,
) -> None:
    """A node that accepts the connection and never answers must not hold the window for the
    client's whole timeout: its reading is left out after READ_TIMEOUT_S."""
    node = replace(await fresh_node(REDPACKET_NODE_SECRET=SECRET), secret=SECRET)

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes

    hung = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    async with hung, HandoffClient(SECRET) as client:
        nodes = {"live": node.spec(), "hung": NodeSpec("hung", f"http://127.0.0.1:{port}")}
        started = time.monotonic()
        reads = await OpenLatency(client, nodes).read()
        waited_s = time.monotonic() - started
    assert set(reads) == {"live"}
    assert waited_s < 10 * READ_TIMEOUT_S  # not the client's 30 s


async def test_a_user_with_more_rows_than_the_old_request_cap_moves_whole(
    fresh_node: Any,
) -> None:
    """A batch holds at least one whole user: a user with 25,000 history rows (about 8 MiB as
    they travel, past the 4 MiB a node used to accept in one request) moves in one batch
    instead of failing the change."""
    a, b, doc = await node_pair(fresh_node, SECRET)
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
