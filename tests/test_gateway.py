"""The public API end to end: a real 2-shard cluster (`redpacket dev up`), real JWTs."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from redpacket.cli.check import Observed
from redpacket.core.ids import snowflake_of
from redpacket.gateway import wallet
from redpacket.gateway.app import ROUTES
from tests.conftest import Cluster, sql

PACKET_FIELDS = {
    "red_packet_id",
    "uid",
    "sender",
    "total_amount",
    "total_packet",
    "remaining_amount",
    "remaining_packet",
    "kind",
    "luckiest",
    "greeting",
    "status",
    "create_time",
    "expire_time",
}


async def ledger_ids(mysql_url: str) -> set[int]:
    return {row[0] for row in await sql(mysql_url, "SELECT red_packet_id FROM red_packet_info")}


async def test_create_returns_the_packet_with_string_ids_and_zoned_times(cluster: Cluster) -> None:
    status, body = await cluster.call(
        "POST",
        "/v1/red-packets",
        42,
        {"total_amount": 888, "total_packet": 8, "greeting": "新年快乐"},
    )
    assert status == 201
    assert set(body) == PACKET_FIELDS
    assert isinstance(body["red_packet_id"], str) and len(body["red_packet_id"]) == 22
    assert snowflake_of(body["red_packet_id"]) > 2**53
    assert body["uid"] == "42"
    assert body["sender"] == {
        "uid": "42",
        "nick_name": "user42",  # as the token named the sender
        "img_url": "https://img.example/42.png",
    }
    assert (body["remaining_amount"], body["remaining_packet"]) == (888, 8)
    assert (body["greeting"], body["status"]) == ("新年快乐", "active")
    created = dt.datetime.fromisoformat(body["create_time"])
    expires = dt.datetime.fromisoformat(body["expire_time"])
    assert created.tzinfo is not None and expires - created == dt.timedelta(days=1)
    status, again = await cluster.call("GET", f"/v1/red-packets/{body['red_packet_id']}", 7)
    assert (status, again) == (200, body)


async def test_ids_are_time_ordered(cluster: Cluster) -> None:
    ids = [snowflake_of(await cluster.create(42, 100, 1)) for _ in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5


async def test_open_then_replay_then_sold_out(cluster: Cluster) -> None:
    packet_id = await cluster.create(1, 300, 2)
    status, first = await cluster.open(packet_id, 10)
    assert status == 200 and first["replayed"] is False and first["amount"] >= 1
    assert await cluster.open(packet_id, 10) == (200, {"amount": first["amount"], "replayed": True})
    status, second = await cluster.open(packet_id, 11)
    assert status == 200 and first["amount"] + second["amount"] == 300
    status, body = await cluster.open(packet_id, 12)
    assert (status, body["error"]["code"]) == (410, "sold_out")
    # the sold-out packet is now answered by the gateway's memory: the contract holds
    await asyncio.sleep(0.3)
    assert await cluster.open(packet_id, 10) == (200, {"amount": first["amount"], "replayed": True})
    assert (await cluster.open(packet_id, 12))[0] == 410
    assert await cluster.grab(packet_id, 11) == (
        200,
        {"can_open": False, "reason": "already_opened", "amount": second["amount"]},
    )
    assert await cluster.grab(packet_id, 13) == (200, {"can_open": False, "reason": "sold_out"})
    status, info = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 1)
    assert (info["status"], info["remaining_amount"], info["remaining_packet"]) == (
        "sold_out",
        0,
        0,
    )


async def test_grab_reserves_nothing(cluster: Cluster) -> None:
    packet_id = await cluster.create(1, 100, 1)
    for uid in (20, 21, 22):
        assert await cluster.grab(packet_id, uid) == (200, {"can_open": True})
    status, _ = await cluster.open(packet_id, 22)
    assert status == 200


async def test_unknown_packet_is_404_everywhere(cluster: Cluster) -> None:
    missing = "123456789012345"
    for method, path in (("GET", ""), ("POST", "/grab"), ("POST", "/open"), ("GET", "/records")):
        status, body = await cluster.call(method, f"/v1/red-packets/{missing}{path}", 5)
        assert (status, body["error"]["code"]) == (404, "not_found"), path


async def test_records_are_newest_first_with_profiles_and_pages(cluster: Cluster) -> None:
    packet_id = await cluster.create(1, 1000, 5)
    for uid in (31, 32, 33, 34, 35):
        assert (await cluster.open(packet_id, uid))[0] == 200
    status, page = await cluster.call("GET", f"/v1/red-packets/{packet_id}/records", 1, limit="2")
    assert status == 200 and len(page["records"]) == 2 and page["next_cursor"]
    assert page["records"][0] == {
        "uid": "35",
        "nick_name": "user35",
        "img_url": "https://img.example/35.png",
        "amount": page["records"][0]["amount"],
        "create_time": page["records"][0]["create_time"],
        "luckiest": page["records"][0]["luckiest"],  # tests/test_kinds.py checks which
    }
    rest = page["records"]
    cursor = page["next_cursor"]
    while cursor:
        _, page = await cluster.call(
            "GET", f"/v1/red-packets/{packet_id}/records", 1, limit="2", cursor=cursor
        )
        rest += page["records"]
        cursor = page["next_cursor"]
    assert [r["uid"] for r in rest] == ["35", "34", "33", "32", "31"]
    assert sum(r["amount"] for r in rest) == 1000
    for bad in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"cursor": "%%%"}):
        status, body = await cluster.call("GET", f"/v1/red-packets/{packet_id}/records", 1, **bad)
        assert status == 400, (bad, body)


async def test_idempotency_key_returns_the_same_packet(cluster: Cluster) -> None:
    key = {"Idempotency-Key": f"order-{os.getpid()}-1"}
    body = {"total_amount": 500, "total_packet": 5}
    status, first = await cluster.call("POST", "/v1/red-packets", 50, body, headers=key)
    assert status == 201
    results = await asyncio.gather(
        *(cluster.call("POST", "/v1/red-packets", 50, body, headers=key) for _ in range(10))
    )
    assert {(s, b["red_packet_id"]) for s, b in results} == {(201, first["red_packet_id"])}
    # the same key from another user is another packet
    status, other = await cluster.call("POST", "/v1/red-packets", 51, body, headers=key)
    assert status == 201 and other["red_packet_id"] != first["red_packet_id"]
    # the same key with another body is refused
    status, err = await cluster.call(
        "POST", "/v1/red-packets", 50, {"total_amount": 600, "total_packet": 5}, headers=key
    )
    assert (status, err["error"]["code"]) == (422, "idempotency_key_reused")


async def test_a_packet_lives_on_its_ring_owner_and_packets_spread(cluster: Cluster) -> None:
    public = [await cluster.create(60, 200, 2) for _ in range(40)]
    for packet_id in public:
        assert (await cluster.open(packet_id, 61))[0] == 200
    ids = [snowflake_of(p) for p in public]
    ring = cluster.ring().ring()
    owners = {spec.name: await ledger_ids(spec.mysql or "") for spec in cluster.nodes()}
    for packet_id in ids:
        holders = [name for name, held in owners.items() if packet_id in held]
        assert holders == [ring.owner(snowflake_of(packet_id)).name]
    assert all(any(pid in held for pid in ids) for held in owners.values()), "one shard got none"


async def test_missing_or_bad_tokens_are_401(cluster: Cluster) -> None:
    packet_id = await cluster.create(1, 100, 1)
    for headers in (
        {},
        {"Authorization": "Bearer nonsense"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer " + cluster.token(5)[:-3] + "abc"},
    ):
        status, body = await cluster.call(
            "POST", f"/v1/red-packets/{packet_id}/open", headers=headers
        )
        assert (status, body["error"]["code"]) == (401, "unauthenticated"), headers


async def test_health_readiness_metrics_and_openapi(cluster: Cluster) -> None:
    assert await cluster.call("GET", "/healthz") == (200, {"ok": True})
    status, ready = await cluster.call("GET", "/readyz")
    assert status == 200 and set(ready["shards"]) == {"shard-0", "shard-1"}
    assert cluster.session is not None
    async with cluster.session.get(cluster.state["gateway"]["metrics_url"] + "/metrics") as resp:
        text = await resp.text()
    assert resp.status == 200 and "redpacket_http_requests_total" in text
    status, body = await cluster.call("GET", "/metrics")  # not on the public port
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, doc = await cluster.call("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")


def test_openapi_document_matches_the_routes() -> None:
    doc = json.loads((Path(__file__).parents[1] / "gateway" / "openapi.json").read_text())
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    wallet_routes = (*wallet.ROUTES, *wallet.TOPUP_ROUTES)  # the top-up: with a payments secret
    served = {(r.method, r.path) for r in (*ROUTES, *wallet_routes)}
    assert documented == served


async def test_a_stopped_node_costs_only_its_own_packets(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster(REDPACKET_NODE_TIMEOUT_S="1")
    ids = [await cluster.create(1, 1000, 10) for _ in range(20)]
    by_shard: dict[str, list[str]] = {}
    for packet_id in ids:
        by_shard.setdefault(cluster.shard_of(snowflake_of(packet_id)), []).append(packet_id)
    assert set(by_shard) == {"shard-0", "shard-1"}
    stopped = cluster.pid_of("shard-1")
    os.kill(stopped, signal.SIGSTOP)
    try:
        slow = [asyncio.ensure_future(cluster.open(p, 100)) for p in by_shard["shard-1"]]
        healthy = await asyncio.gather(*(cluster.open(p, 100) for p in by_shard["shard-0"]))
        assert all(status == 200 for status, _ in healthy)
        assert not any(task.done() for task in slow), "healthy shard answered after the dead one"
        for status, body in await asyncio.gather(*slow):
            assert (status, body["error"]["code"]) == (503, "unavailable")
    finally:
        os.kill(stopped, signal.SIGCONT)
    await cluster.wait_ready()
    assert all(s == 200 for s, _ in await asyncio.gather(*(cluster.open(p, 100) for p in ids)))
    await cluster.check()


@pytest.mark.parametrize("senders,packets_each,users", [(5, 4, 300)])
async def test_concurrent_create_open_and_records_keep_every_invariant(
    cluster: Cluster, senders: int, packets_each: int, users: int
) -> None:
    async def send(sender: int) -> list[str]:
        return [await cluster.create(1000 + sender, 2000, 10) for _ in range(packets_each)]

    packet_ids = [
        p for batch in await asyncio.gather(*(send(s) for s in range(senders))) for p in batch
    ]

    async def user(uid: int) -> list[Observed]:
        seen = []
        for packet_id in packet_ids[uid % len(packet_ids) :] + packet_ids[: uid % len(packet_ids)]:
            status, body = await cluster.open(packet_id, uid)
            if status == 200:
                seen.append(Observed(snowflake_of(packet_id), uid, body["amount"]))
            else:
                assert body["error"]["code"] == "sold_out", body
        return seen

    observed = [
        o
        for seen in await asyncio.gather(*(user(u) for u in range(2000, 2000 + users)))
        for o in seen
    ]
    assert len(observed) == len(packet_ids) * 10
    for packet_id in packet_ids:
        status, page = await cluster.call(
            "GET", f"/v1/red-packets/{packet_id}/records", 1, limit="100"
        )
        assert status == 200
        mine = {(o.uid, o.amount) for o in observed if o.red_packet_id == snowflake_of(packet_id)}
        assert {(int(r["uid"]), r["amount"]) for r in page["records"]} == mine
        assert sum(amount for _, amount in mine) == 2000
    await cluster.check(observed)


async def test_a_request_id_flows_from_the_gateway_to_the_node_logs(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster(REDPACKET_ACCESS_LOG="true")
    packet_id = await cluster.create(1, 100, 1)
    shard = cluster.shard_of(snowflake_of(packet_id))
    status, _ = await cluster.call(
        "POST", f"/v1/red-packets/{packet_id}/open", 7, headers={"X-Request-Id": "trace-me-42"}
    )
    assert status == 200
    await asyncio.sleep(0.3)  # access lines are written after the response

    def lines(name: str) -> list[dict[str, Any]]:
        text = (cluster.home / "logs" / f"{name}.log").read_text()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    gateway = [e for e in lines("gateway") if e["request_id"] == "trace-me-42"]
    node = [e for e in lines(f"{shard}-node") if e["request_id"] == "trace-me-42"]
    assert gateway and gateway[0]["service"] == "gateway" and "/open" in gateway[0]["msg"]
    assert node and node[0]["service"] == "node" and "/internal/v1/packets" in node[0]["msg"]


async def test_metrics_count_commits_rejections_and_batches(cluster: Cluster) -> None:
    packet_id = await cluster.create(1, 100, 1)
    await cluster.open(packet_id, 70)
    await cluster.open(packet_id, 71)  # sold out
    assert cluster.session is not None
    node_metrics = next(
        n.metrics or "" for n in cluster.nodes() if n.name == cluster.shard_of(packet_id)
    )
    async with cluster.session.get(node_metrics + "/metrics") as resp:
        node = await resp.text()
    async with cluster.session.get(cluster.state["gateway"]["metrics_url"] + "/metrics") as resp:
        gateway = await resp.text()

    def value(text: str, sample: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(sample + " ")]
        assert lines, f"{sample} not exported"
        return float(lines[0].split()[-1])

    assert value(node, "redpacket_opens_committed_total") >= 1
    assert value(node, 'redpacket_rejections_total{reason="sold_out",service="node"}') >= 1
    assert value(node, "redpacket_commit_batch_size_count") >= 1
    assert "redpacket_reconciler_backlog" in node
    route = 'route="/v1/red-packets/{id}/open"'
    assert any(route in line and 'status="410"' in line for line in gateway.splitlines())
