"""Packet kinds (lucky, equal, exclusive) and 手气最佳, on a real cluster (docs/api.md)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import Cluster, NodeHandle


async def test_equal_packet_shares_are_all_equal(cluster: Cluster) -> None:
    status, body = await cluster.call(
        "POST", "/v1/red-packets", 70, {"kind": "equal", "amount_each": 125, "total_packet": 8}
    )
    assert status == 201, body
    packet_id = body["red_packet_id"]
    opens = await asyncio.gather(*(cluster.open(packet_id, 7000 + i) for i in range(30)))
    amounts = [body["amount"] for status, body in opens if status == 200]
    assert amounts == [125] * 8
    assert sorted(status for status, _ in opens).count(410) == 22
    status, packet = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 70)
    assert status == 200
    assert (packet["kind"], packet["amount_each"], packet["total_amount"]) == ("equal", 125, 1000)
    assert packet["status"] == "sold_out" and packet["luckiest"] is None
    await cluster.check()


async def test_equal_packet_total_must_match_amount_each(cluster: Cluster) -> None:
    good = {"kind": "equal", "amount_each": 100, "total_packet": 3}
    status, body = await cluster.call("POST", "/v1/red-packets", 71, {**good, "total_amount": 300})
    assert status == 201 and body["total_amount"] == 300
    for bad, field in (
        ({**good, "total_amount": 301}, "total_amount"),
        ({**good, "amount_each": 0}, "amount_each"),
        ({**good, "amount_each": 10_000}, "amount_each"),  # 3 x 10000 over the 20000 limit
        (
            {"kind": "lucky", "total_amount": 300, "total_packet": 3, "amount_each": 100},
            "amount_each",
        ),
        ({"kind": "sparkly", "total_amount": 300, "total_packet": 3}, "kind"),
    ):
        status, body = await cluster.call("POST", "/v1/red-packets", 71, bad)
        assert (status, body["error"]["code"], body["error"]["field"]) == (
            400,
            "invalid_field",
            field,
        ), bad


async def test_exclusive_packet_refuses_others_and_lets_the_receiver(cluster: Cluster) -> None:
    packet_id = await cluster.create(72, 520, 1, kind="exclusive", receiver_uid="73")
    status, packet = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 74)
    assert (packet["kind"], packet["receiver_uid"], packet["total_packet"]) == (
        "exclusive",
        "73",
        1,
    )
    for uid in (72, 74, 75):  # the sender too: it is not theirs
        assert await cluster.grab(packet_id, uid) == (
            200,
            {"can_open": False, "reason": "not_for_you"},
        )
        status, body = await cluster.open(packet_id, uid)
        assert (status, body["error"]["code"]) == (403, "not_for_you")
    assert await cluster.grab(packet_id, 73) == (200, {"can_open": True})
    assert await cluster.open(packet_id, 73) == (200, {"amount": 520, "replayed": False})
    status, body = await cluster.open(packet_id, 74)
    assert (status, body["error"]["code"]) == (403, "not_for_you")
    _, packet = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 73)
    assert packet["status"] == "sold_out" and packet["luckiest"] is None
    await cluster.check()


async def test_exclusive_packet_needs_one_share_and_another_receiver(cluster: Cluster) -> None:
    for bad, field in (
        ({"total_amount": 100, "receiver_uid": "76"}, "receiver_uid"),  # to yourself (76)
        ({"total_amount": 100, "total_packet": 2, "receiver_uid": "9"}, "total_packet"),
        ({"total_amount": 100}, "receiver_uid"),
        ({"total_amount": 100, "receiver_uid": 9}, "receiver_uid"),  # a number, not a string
    ):
        status, body = await cluster.call(
            "POST", "/v1/red-packets", 76, {"kind": "exclusive", **bad}
        )
        assert (status, body["error"]["field"]) == (400, field), bad


async def test_luckiest_is_null_until_sold_out_then_the_highest_share(cluster: Cluster) -> None:
    packet_id = await cluster.create(80, 5000, 10)
    for uid in range(8100, 8109):
        assert (await cluster.open(packet_id, uid))[0] == 200
    _, packet = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 80)
    assert packet["kind"] == "lucky" and packet["luckiest"] is None
    assert (await cluster.open(packet_id, 8109))[0] == 200
    _, packet = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 80)
    records = await _all_records(cluster, packet_id)
    # the highest amount; max() keeps the first of equals, so the earliest on a tie
    best = max(sorted(records, key=lambda r: r["create_time"]), key=lambda r: r["amount"])
    assert packet["luckiest"] == {
        "uid": best["uid"],
        "nick_name": best["nick_name"],
        "img_url": best["img_url"],
        "amount": best["amount"],
    }
    assert [r["uid"] for r in records if r["luckiest"]] == [best["uid"]]
    await cluster.check()


async def test_luckiest_on_a_tie_is_the_earliest_share(cluster: Cluster) -> None:
    packet_id = await cluster.create(81, 3, 3)  # 1 cent each: a three-way tie
    for uid in (8201, 8202, 8203):
        assert await cluster.open(packet_id, uid) == (200, {"amount": 1, "replayed": False})
    _, packet = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 81)
    assert packet["luckiest"]["uid"] == "8201"


async def test_luckiest_of_a_crowd_is_decided_once(cluster: Cluster) -> None:
    packet_id = await cluster.create(82, 2000, 20)
    results = await asyncio.gather(*(cluster.open(packet_id, 8300 + i) for i in range(60)))
    assert sum(1 for status, _ in results if status == 200) == 20
    _, packet = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 82)
    records = await _all_records(cluster, packet_id)
    assert packet["luckiest"]["amount"] == max(r["amount"] for r in records)
    assert sum(r["luckiest"] for r in records) == 1
    await cluster.check()


async def test_luckiest_survives_redis_restarted_empty(fresh_node: Any) -> None:
    node: NodeHandle = await fresh_node()
    packet_id = await node.create(300, 3)
    for uid in (1, 2, 3):
        assert (await node.open(packet_id, uid))[0] == 200
    _, before = await node.call("GET", f"/internal/v1/packets/{packet_id}")
    assert before["luckiest"] is not None
    node.redis.restart_empty()
    await asyncio.sleep(0.3)
    assert (await node.open(packet_id, 4))[1]["error"]["code"] == "sold_out"
    _, after = await node.call("GET", f"/internal/v1/packets/{packet_id}")
    assert after["luckiest"] == before["luckiest"]
    await node.check()


async def _all_records(cluster: Cluster, packet_id: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        status, page = await cluster.call(
            "GET", f"/v1/red-packets/{packet_id}/records", 1, **params
        )
        assert status == 200
        records += page["records"]
        cursor = page["next_cursor"]
        if not cursor:
            return records
