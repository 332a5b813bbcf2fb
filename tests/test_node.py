"""The shard node on real Redis and real MariaDB: the rules of grab and open."""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from redpacket.cli.check import Observed
from tests.conftest import NodeHandle


def observed(packet_id: int, results: list[tuple[int, int, Any]]) -> list[Observed]:
    return [
        Observed(packet_id, uid, body["amount"]) for uid, status, body in results if status == 200
    ]


async def open_all(node: NodeHandle, packet_id: int, uids: list[int]) -> list[tuple[int, int, Any]]:
    async def one(uid: int) -> tuple[int, int, Any]:
        status, body = await node.open(packet_id, uid)
        return uid, status, body

    return await asyncio.gather(*(one(uid) for uid in uids))


async def test_1000_users_racing_for_100_shares_get_exactly_100(node: NodeHandle) -> None:
    packet_id = await node.create(total_amount=20_000, total_packet=100)
    results = await open_all(node, packet_id, list(range(1, 1001)))
    won = [body["amount"] for _, status, body in results if status == 200]
    lost = [body["error"]["code"] for _, status, body in results if status != 200]
    assert len(won) == 100
    assert sum(won) == 20_000
    assert min(won) >= 1
    assert set(lost) == {"sold_out"} and len(lost) == 900
    await node.check(observed(packet_id, results))


async def test_same_user_opening_50_times_at_once_gets_one_share(node: NodeHandle) -> None:
    packet_id = await node.create(total_amount=1000, total_packet=10)
    results = await open_all(node, packet_id, [7] * 50)
    assert all(status == 200 for _, status, _ in results)
    amounts = {body["amount"] for _, _, body in results}
    assert len(amounts) == 1
    assert sum(1 for _, _, body in results if not body["replayed"]) == 1
    _, info = await node.call("GET", f"/internal/v1/packets/{packet_id}")
    assert info["remaining_packet"] == 9
    assert info["remaining_amount"] == 1000 - amounts.pop()
    await node.check(observed(packet_id, results))


async def test_last_share_takes_the_rest(node: NodeHandle) -> None:
    packet_id = await node.create(total_amount=500, total_packet=3)
    amounts = [(await node.open(packet_id, uid))[1]["amount"] for uid in (1, 2, 3)]
    assert sum(amounts) == 500
    _, info = await node.call("GET", f"/internal/v1/packets/{packet_id}")
    assert (info["remaining_amount"], info["remaining_packet"], info["status"]) == (
        0,
        0,
        "sold_out",
    )


async def test_every_share_is_at_least_one_cent_when_money_is_tight(node: NodeHandle) -> None:
    packet_id = await node.create(total_amount=12, total_packet=10)
    results = await open_all(node, packet_id, list(range(1, 11)))
    amounts = [body["amount"] for _, status, body in results if status == 200]
    assert len(amounts) == 10 and sum(amounts) == 12 and min(amounts) >= 1


async def test_double_average_rule_is_random_and_fair_per_position(node: NodeHandle) -> None:
    """Over many identical packets opened in the same order, the first share varies and the
    mean share at every position is close to total / count (the double-average promise)."""
    total, count, packets = 1000, 5, 300
    # a statistical test, not a load test: 300 creates at once timed out on a loaded box
    at_once = asyncio.Semaphore(20)

    async def open_in_order() -> list[int]:
        async with at_once:
            packet_id = await node.create(total_amount=total, total_packet=count)
            return [(await node.open(packet_id, uid))[1]["amount"] for uid in range(1, count + 1)]

    rows = await asyncio.gather(*(open_in_order() for _ in range(packets)))
    assert all(sum(row) == total for row in rows)
    firsts = [row[0] for row in rows]
    assert len(set(firsts)) > 50  # not a constant, not a handful of values
    assert max(firsts) <= 2 * total // count  # below twice the average
    for position in range(count):
        mean = statistics.fmean(row[position] for row in rows)
        # the standard error of each mean here is under 9 cents (simulated): 40 is > 4.5 sigma
        assert abs(mean - total / count) < 40, (position, mean)


async def test_grab_tells_without_taking(node: NodeHandle) -> None:
    packet_id = await node.create(total_amount=300, total_packet=2)
    assert (await node.grab(packet_id, 1))[1] == {"can_open": True}
    assert (await node.grab(packet_id, 1))[1] == {"can_open": True}  # nothing was reserved
    _, first = await node.open(packet_id, 1)
    assert (await node.grab(packet_id, 1))[1] == {
        "can_open": False,
        "reason": "already_opened",
        "amount": first["amount"],
    }
    await node.open(packet_id, 2)
    assert (await node.grab(packet_id, 3))[1] == {"can_open": False, "reason": "sold_out"}
    status, body = await node.grab(packet_id + 1, 3)
    assert (status, body["error"]["code"]) == (404, "not_found")


async def test_expired_packet_refuses_grab_and_open(node: NodeHandle) -> None:
    packet_id = await node.create(total_amount=300, total_packet=3, expire_seconds=1)
    _, first = await node.open(packet_id, 1)
    await asyncio.sleep(1.1)
    assert (await node.grab(packet_id, 2))[1] == {"can_open": False, "reason": "expired"}
    status, body = await node.open(packet_id, 2)
    assert (status, body["error"]["code"]) == (410, "expired")
    # the winner still sees their share
    assert (await node.open(packet_id, 1))[1] == {"amount": first["amount"], "replayed": True}


async def test_records_are_newest_first_and_paged(node: NodeHandle) -> None:
    packet_id = await node.create(total_amount=1000, total_packet=7)
    for uid in range(1, 8):
        await node.open(packet_id, uid)
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        status, page = await node.call("GET", f"/internal/v1/packets/{packet_id}/records", **params)
        assert status == 200
        seen += page["records"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [r["uid"] for r in seen] == [str(uid) for uid in range(7, 0, -1)]
    assert sum(r["amount"] for r in seen) == 1000
    assert seen[0]["nick_name"] == "user7"


async def test_create_is_idempotent_and_a_reused_id_is_refused(node: NodeHandle) -> None:
    body = {
        "red_packet_id": "4242424242",
        "uid": "9",
        "total_amount": 100,
        "total_packet": 2,
        "expire_seconds": 60,
        "create_token": "a" * 32,
    }
    await node.hold(9, 100, "a" * 32, 4242424242)  # paid for, as the gateway does first
    status, first = await node.call("POST", "/internal/v1/packets", body)
    assert status in (200, 201)
    status, again = await node.call("POST", "/internal/v1/packets", body)
    assert (status, again["red_packet_id"]) == (200, first["red_packet_id"])
    status, clash = await node.call(
        "POST", "/internal/v1/packets", {**body, "create_token": "b" * 32}
    )
    assert (status, clash["error"]["code"]) == (409, "id_collision")


async def test_bad_input_is_refused_and_changes_nothing(node: NodeHandle) -> None:
    packet_id = await node.create(total_amount=100, total_packet=2)
    base = {
        "red_packet_id": "777000111",
        "uid": "9",
        "total_amount": 100,
        "total_packet": 2,
        "expire_seconds": 60,
        "create_token": "c" * 32,
    }
    for change in (
        {"total_amount": -5},
        {"total_amount": 1.5},
        {"total_amount": "100"},
        {"total_amount": 1, "total_packet": 2},
        {"total_packet": 101},
        {"total_amount": 20_001},
        {"red_packet_id": "x"},
        {"uid": "-1"},
        {"expire_seconds": 0},
        {"surprise": 1},
    ):
        status, body = await node.call("POST", "/internal/v1/packets", {**base, **change})
        assert status == 400, (change, body)
        assert body["error"]["code"] in ("invalid_field", "invalid_id", "unknown_field")
    status, _ = await node.call("GET", "/internal/v1/packets/777000111")
    assert status == 404
    for bad_id in ("abc", "0", "-3", "99999999999999999999"):
        status, body = await node.call(
            "POST",
            f"/internal/v1/packets/{bad_id}/open",
            {"uid": "1", "nick_name": "", "img_url": ""},
        )
        assert (status, body["error"]["code"]) == (400, "invalid_id"), bad_id
    status, body = await node.call("POST", f"/internal/v1/packets/{packet_id}/open", {"uid": "x"})
    assert status == 400
    await node.check()


async def test_calls_without_the_node_secret_are_refused(node: NodeHandle) -> None:
    async with node.session.post(
        node.url + "/internal/v1/packets/1/open",
        json={"uid": "1"},
        headers={"X-Redpacket-Node-Secret": "guess"},
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthenticated"


async def test_redis_flushed_mid_life_is_rebuilt_from_mysql(fresh_node: Any) -> None:
    node: NodeHandle = await fresh_node()
    packet_id = await node.create(total_amount=5000, total_packet=50)
    before = await open_all(node, packet_id, list(range(1, 21)))
    node.redis.restart_empty()
    after = await open_all(node, packet_id, list(range(1, 101)))  # 1..20 are replays
    replays = {
        uid: body["amount"] for uid, status, body in after if status == 200 and body["replayed"]
    }
    assert replays == {uid: body["amount"] for uid, _, body in before}
    won = [
        body["amount"]
        for _, status, body in before + after
        if status == 200 and not body["replayed"]
    ]
    assert len(won) == 50 and sum(won) == 5000
    await node.check(observed(packet_id, before + after))


async def test_mysql_outage_loses_no_acknowledged_share_and_the_reconciler_converges(
    proxied_mysql: Any, fresh_node: Any
) -> None:
    url, proxy = await proxied_mysql("outage")
    node: NodeHandle = await fresh_node(REDPACKET_MYSQL_URL=url, REDPACKET_MYSQL_TIMEOUT_S="1")
    packet_id = await node.create(total_amount=10_000, total_packet=100)
    first = await open_all(node, packet_id, list(range(1, 31)))
    proxy.block()
    during = await open_all(node, packet_id, list(range(31, 61)))
    assert {status for _, status, _ in during} == {503}  # never 200 without a commit
    proxy.unblock()
    retried = await open_all(node, packet_id, list(range(31, 61)))
    later = await open_all(node, packet_id, list(range(61, 161)))
    results = first + retried + later
    # a user refused with 503 keeps the share Redis gave them: the retry replays it
    assert all(status == 200 for _, status, _ in retried)
    won = [body["amount"] for _, status, body in results if status == 200 and not body["replayed"]]
    assert len(won) + sum(1 for _, s, b in results if s == 200 and b["replayed"]) == 100
    await node.check(observed(packet_id, results))


async def test_claims_left_pending_by_an_outage_are_landed_by_the_reconciler(
    proxied_mysql: Any, fresh_node: Any
) -> None:
    url, proxy = await proxied_mysql("pending")
    node: NodeHandle = await fresh_node(REDPACKET_MYSQL_URL=url, REDPACKET_MYSQL_TIMEOUT_S="1")
    packet_id = await node.create(total_amount=1000, total_packet=10)
    proxy.block()
    during = await open_all(node, packet_id, list(range(1, 6)))
    assert {status for _, status, _ in during} == {503}
    assert len(await node.shard.counters.pending(packet_id)) == 5
    proxy.unblock()
    # nobody retries: the reconciler alone must land the five claims
    report = await node.check(settle_s=20)
    assert report.records == 5


async def test_a_resync_cut_short_by_mysql_does_not_leave_the_packet_frozen(
    proxied_mysql: Any, fresh_node: Any
) -> None:
    """A resync freezes the packet, then reads MySQL. If MySQL is cut at that moment the
    packet stays frozen in Redis with nobody to thaw it (chaos seed 1: every open of it
    answered "frozen" for 200 s). The next open after MySQL is back finishes the resync."""
    url, proxy = await proxied_mysql("resync")
    node: NodeHandle = await fresh_node(REDPACKET_MYSQL_URL=url, REDPACKET_MYSQL_TIMEOUT_S="1")
    packet_id = await node.create(total_amount=1000, total_packet=10)
    first = await open_all(node, packet_id, [1, 2, 3])
    proxy.block()
    await node.shard.resync(packet_id)  # logs its failure, as it does in production
    assert await node.shard.counters.is_frozen(packet_id)
    proxy.unblock()
    later = await open_all(node, packet_id, list(range(1, 11)))
    assert all(status == 200 for _, status, _ in later)
    assert not await node.shard.counters.is_frozen(packet_id)
    replayed = {uid: body["amount"] for uid, _, body in later if body["replayed"]}
    assert replayed == {uid: body["amount"] for uid, _, body in first}
    await node.check(observed(packet_id, first + later))
