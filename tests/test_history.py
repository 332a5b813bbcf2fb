"""My red packets (我的红包): each user's history on the shard owning ``user:<uid>``."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from tests.conftest import Cluster

BEIJING = dt.timezone(dt.timedelta(hours=8))


async def until(check: Any, timeout_s: float = 10.0) -> Any:
    """Poll ``check()`` until it returns something truthy (history is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, "not delivered in time"
        await asyncio.sleep(0.05)


async def received(cluster: Cluster, uid: int, **params: str) -> dict[str, Any]:
    status, body = await cluster.call("GET", "/v1/me/received", uid, **params)
    assert status == 200, body
    return body


async def sent(cluster: Cluster, uid: int, **params: str) -> dict[str, Any]:
    status, body = await cluster.call("GET", "/v1/me/sent", uid, **params)
    assert status == 200, body
    return body


async def test_my_open_shows_in_my_received_within_seconds(cluster: Cluster) -> None:
    packet_id = await cluster.create(9001, 600, 2, greeting="新年快乐")
    status, opened = await cluster.open(packet_id, 9002)
    assert status == 200
    started = time.monotonic()

    async def mine() -> dict[str, Any] | None:
        body = await received(cluster, 9002)
        return body if body["records"] else None

    body = await until(mine)
    assert time.monotonic() - started < 5
    year = dt.datetime.now(BEIJING).year
    assert body == {
        "year": year,
        "total_amount": opened["amount"],
        "count": 1,
        "luckiest_count": 0,
        "records": [
            {
                "red_packet_id": packet_id,
                "sender": {
                    "uid": "9001",
                    "nick_name": "user9001",
                    "img_url": "https://img.example/9001.png",
                },
                "kind": "lucky",
                "amount": opened["amount"],
                "luckiest": False,
                "create_time": body["records"][0]["create_time"],
            }
        ],
        "next_cursor": None,
    }


async def test_my_sent_shows_each_packet_and_its_progress(cluster: Cluster) -> None:
    first = await cluster.create(9010, 300, 3)
    second = await cluster.create(9010, 500, 1, kind="exclusive", receiver_uid="9011")
    for uid in (9012, 9013, 9014):
        assert (await cluster.open(first, uid))[0] == 200

    async def progressed() -> dict[str, Any] | None:
        body = await sent(cluster, 9010)
        done = body["count"] == 2 and body["packets"][1]["opened_packet"] == 3
        return body if done else None

    body = await until(progressed)
    assert (body["total_amount"], body["count"]) == (800, 2)
    newest, oldest = body["packets"]
    assert newest["red_packet_id"] == second and newest["kind"] == "exclusive"
    assert (newest["opened_packet"], newest["status"]) == (0, "active")
    assert oldest == {
        "red_packet_id": first,
        "kind": "lucky",
        "total_amount": 300,
        "total_packet": 3,
        "opened_packet": 3,
        "opened_amount": 300,
        "refunded_amount": 0,
        "status": "sold_out",
        "greeting": "恭喜发财，大吉大利",
        "create_time": oldest["create_time"],
    }


async def test_luckiest_reaches_the_winners_history(cluster: Cluster) -> None:
    packet_id = await cluster.create(9020, 900, 3)
    for uid in (9021, 9022, 9023):
        assert (await cluster.open(packet_id, uid))[0] == 200
    _, packet = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 9020)
    winner = int(packet["luckiest"]["uid"])

    async def flagged() -> bool:
        body = await received(cluster, winner)
        return body["luckiest_count"] == 1

    await until(flagged)
    body = await received(cluster, winner)
    assert [r["luckiest"] for r in body["records"] if r["red_packet_id"] == packet_id] == [True]
    for other in {9021, 9022, 9023} - {winner}:
        assert (await received(cluster, other))["luckiest_count"] == 0
    await cluster.check()


async def test_history_pages_newest_first_with_a_cursor(cluster: Cluster) -> None:
    packets = [await cluster.create(9030 + i, 100, 1) for i in range(5)]
    for packet_id in packets:
        assert (await cluster.open(packet_id, 9040))[0] == 200

    async def all_five() -> bool:
        return (await received(cluster, 9040))["count"] == 5

    await until(all_five)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await received(cluster, 9040, **params)
        assert page["count"] == 5 and page["total_amount"] == 500
        seen += [r["red_packet_id"] for r in page["records"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == packets[::-1]


async def test_history_of_another_year_is_empty_and_bad_queries_are_400(cluster: Cluster) -> None:
    assert await received(cluster, 9050, year="2001") == {
        "year": 2001,
        "total_amount": 0,
        "count": 0,
        "luckiest_count": 0,
        "records": [],
        "next_cursor": None,
    }
    for params, code in (
        ({"year": "26"}, "invalid_field"),
        ({"year": "twenty"}, "invalid_field"),
        ({"limit": "0"}, "invalid_field"),
        ({"cursor": "!!"}, "invalid_cursor"),
        ({"user": "1"}, "unknown_field"),
    ):
        for path in ("/v1/me/received", "/v1/me/sent"):
            status, body = await cluster.call("GET", path, 9050, **params)
            assert (status, body["error"]["code"]) == (400, code), (path, params)
    status, body = await cluster.call("GET", "/v1/me/received")
    assert status == 401
