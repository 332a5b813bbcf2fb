"""Hostile input and access: every bad request gets a clear 4xx JSON error and changes nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import jwt
import pytest

from redpacket.core.ids import snowflake_of
from redpacket.gateway.auth import mint_token
from tests.conftest import Cluster, sql

HOSTILE_SENDER = 666


async def packets_of(cluster: Cluster, sender: int) -> int:
    statement = "SELECT COUNT(*) FROM red_packet_info WHERE uid = %s"
    return sum([(await sql(n.mysql or "", statement, (sender,)))[0][0] for n in cluster.nodes()])


BAD_CREATES: list[tuple[Any, str]] = [
    ({"total_amount": "100", "total_packet": 2}, "invalid_field"),
    ({"total_amount": 1.5, "total_packet": 2}, "invalid_field"),
    ({"total_amount": 100.0, "total_packet": 2}, "invalid_field"),
    ({"total_amount": True, "total_packet": 2}, "invalid_field"),
    ({"total_amount": None, "total_packet": 2}, "invalid_field"),
    ({"total_amount": [100], "total_packet": 2}, "invalid_field"),
    ({"total_amount": -100, "total_packet": 2}, "invalid_field"),
    ({"total_amount": 0, "total_packet": 2}, "invalid_field"),
    ({"total_amount": 100, "total_packet": 0}, "invalid_field"),
    ({"total_amount": 100, "total_packet": -1}, "invalid_field"),
    ({"total_amount": 20_001, "total_packet": 2}, "invalid_field"),
    ({"total_amount": 2**62, "total_packet": 2}, "invalid_field"),
    ({"total_amount": 1000, "total_packet": 101}, "invalid_field"),
    ({"total_amount": 5, "total_packet": 6}, "invalid_field"),
    ({"total_packet": 2}, "invalid_field"),
    ({"total_amount": 100}, "invalid_field"),
    ({"total_amount": 100, "total_packet": 2, "uid": "1"}, "unknown_field"),
    ({"total_amount": 100, "total_packet": 2, "greeting": "x" * 65}, "invalid_field"),
    ({"total_amount": 100, "total_packet": 2, "greeting": 42}, "invalid_field"),
    ({"total_amount": 100, "total_packet": 2, "greeting": None}, "invalid_field"),
    ({"total_amount": 100, "total_packet": 2, "greeting": "bell\x07"}, "invalid_field"),
    ([100, 2], "invalid_json"),
    ("a string", "invalid_json"),
]


@pytest.mark.parametrize("body,code", BAD_CREATES)
async def test_a_bad_create_is_a_400_with_its_code(cluster: Cluster, body: Any, code: str) -> None:
    status, answer = await cluster.call("POST", "/v1/red-packets", HOSTILE_SENDER, body)
    assert status == 400, answer
    assert answer["error"]["code"] == code and answer["error"]["message"]


async def test_malformed_bodies_are_refused(cluster: Cluster) -> None:
    auth = {
        "Authorization": f"Bearer {cluster.token(HOSTILE_SENDER)}",
        "Content-Type": "application/json",
    }
    cases = [
        (b'{"total_amount": 100, "total_packet": 2, "greeting": "\xff\xfe"}', 400, "invalid_json"),
        (b'{"total_amount": 100, "total_packet": ', 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b'{"total_amount": 1' + b"0" * 400 + b', "total_packet": 2}', 400, "invalid_json"),
        (b'{"greeting": "' + b"x" * 10_000 + b'"}', 413, "payload_too_large"),
    ]
    for data, status, code in cases:
        got_status, answer = await cluster.raw("POST", "/v1/red-packets", data, auth)
        assert (got_status, answer["error"]["code"]) == (status, code), data[:60]


async def test_bad_input_changes_nothing(cluster: Cluster) -> None:
    for body, _ in BAD_CREATES:
        await cluster.call("POST", "/v1/red-packets", HOSTILE_SENDER, body)
    assert await packets_of(cluster, HOSTILE_SENDER) == 0


@pytest.mark.parametrize(
    "raw_id",
    [
        "abc",
        "0",
        "-1",
        "1.5",
        "1e5",
        "9223372036854775808",
        "99999999999999999999999",
        "%20",
        "١٢٣",
    ],
)
async def test_malformed_ids_are_400_on_every_endpoint(cluster: Cluster, raw_id: str) -> None:
    for method, suffix in (("GET", ""), ("POST", "/grab"), ("POST", "/open"), ("GET", "/records")):
        status, body = await cluster.call(method, f"/v1/red-packets/{raw_id}{suffix}", 5)
        assert (status, body["error"]["code"]) == (400, "invalid_id"), (raw_id, suffix, body)


async def test_nobody_opens_as_someone_else(cluster: Cluster) -> None:
    packet_id = await cluster.create(1, 300, 3)
    for body in ({"uid": "999"}, {"uid": 999}, {"user": "999"}):
        status, answer = await cluster.call("POST", f"/v1/red-packets/{packet_id}/open", 5, body)
        assert (status, answer["error"]["code"]) == (400, "unknown_field")
    assert (await cluster.call("POST", f"/v1/red-packets/{packet_id}/open", 5, {}))[0] == 200
    _, page = await cluster.call("GET", f"/v1/red-packets/{packet_id}/records", 1)
    assert [r["uid"] for r in page["records"]] == ["5"]


def _tokens(secret: str) -> dict[str, str]:
    now = int(time.time())
    good = {"sub": "77", "name": "Mallory", "exp": now + 600}
    return {
        "expired": jwt.encode({**good, "exp": now - 10}, secret, algorithm="HS256"),
        "not yet valid": jwt.encode({**good, "nbf": now + 600}, secret, algorithm="HS256"),
        "wrong signature": jwt.encode(
            good, "another-secret-that-is-32-bytes-long!!", algorithm="HS256"
        ),
        "alg none": jwt.encode(good, None, algorithm="none"),
        "wrong algorithm": jwt.encode(good, secret, algorithm="HS512"),
        "missing sub": jwt.encode({"exp": now + 600}, secret, algorithm="HS256"),
        "non-numeric sub": jwt.encode({**good, "sub": "mallory"}, secret, algorithm="HS256"),
        "zero sub": jwt.encode({**good, "sub": "0"}, secret, algorithm="HS256"),
        "overflowing sub": jwt.encode({**good, "sub": str(2**64)}, secret, algorithm="HS256"),
        "missing exp": jwt.encode({"sub": "77"}, secret, algorithm="HS256"),
        "garbage": "a.b.c",
    }


@pytest.mark.filterwarnings("ignore:The HMAC key is")  # the HS512 token is bad on purpose
async def test_every_kind_of_bad_token_is_401(cluster: Cluster) -> None:
    packet_id = await cluster.create(1, 100, 1)
    for kind, token in _tokens(cluster.state["jwt_secret"]).items():
        for method, path in (
            ("POST", "/v1/red-packets"),
            ("POST", f"/v1/red-packets/{packet_id}/open"),
            ("GET", f"/v1/red-packets/{packet_id}"),
        ):
            body = {"total_amount": 100, "total_packet": 1} if path.endswith("packets") else None
            status, answer = await cluster.call(
                method, path, body=body, headers={"Authorization": f"Bearer {token}"}
            )
            assert (status, answer["error"]["code"]) == (401, "unauthenticated"), (kind, path)
    assert (await cluster.grab(packet_id, 77))[1] == {"can_open": True}  # nothing was taken


async def test_sql_metacharacters_are_stored_as_text(cluster: Cluster) -> None:
    evil = "'); DROP TABLE red_packet_info; --"
    packet_id = await cluster.create(1, 100, 1, greeting=evil)
    token = mint_token(
        cluster.state["jwt_secret"], 4242, "Robert'); DROP TABLE red_packet_record;--"
    )
    status, _ = await cluster.call(
        "POST", f"/v1/red-packets/{packet_id}/open", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 200
    _, info = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 1)
    _, page = await cluster.call("GET", f"/v1/red-packets/{packet_id}/records", 1)
    assert info["greeting"] == evil
    assert page["records"][0]["nick_name"] == "Robert'); DROP TABLE red_packet_record;--"
    await cluster.check()


async def test_nodes_refuse_callers_without_the_gateway_secret(cluster: Cluster) -> None:
    packet_id = await cluster.create(1, 100, 1)
    node_url = next(
        n.url for n in cluster.nodes() if n.name == cluster.shard_of(snowflake_of(packet_id))
    )
    body = {"uid": "9", "nick_name": "", "img_url": ""}
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"X-Redpacket-Node-Secret": "guess"}):
            async with session.post(
                f"{node_url}/internal/v1/packets/{packet_id}/open", json=body, headers=headers
            ) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthenticated"
    assert (await cluster.grab(packet_id, 9))[1] == {"can_open": True}


async def test_per_user_rate_limits_answer_429_with_retry_after(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster(
        REDPACKET_RATE_OPEN_PER_S="1",
        REDPACKET_RATE_OPEN_BURST="3",
        REDPACKET_RATE_CREATE_PER_S="1",
        REDPACKET_RATE_CREATE_BURST="2",
    )
    creates = [
        await cluster.call("POST", "/v1/red-packets", 1, {"total_amount": 100, "total_packet": 50})
        for _ in range(3)
    ]
    assert [s for s, _ in creates] == [201, 201, 429]
    assert creates[2][1]["error"]["code"] == "rate_limited"
    packet_id = creates[0][1]["red_packet_id"]
    assert cluster.session is not None
    statuses = []
    for uid in (5, 5, 5, 5, 6):
        async with cluster.session.post(
            f"{cluster.url}/v1/red-packets/{packet_id}/open",
            headers={"Authorization": f"Bearer {cluster.token(uid)}"},
        ) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                assert int(resp.headers["Retry-After"]) >= 1
    assert statuses == [200, 200, 200, 429, 200]  # per user: uid 6 is not slowed by uid 5
    await asyncio.sleep(1.1)
    assert (await cluster.open(packet_id, 5))[0] == 200
