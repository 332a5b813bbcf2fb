"""Idempotency-Keys have a lifetime (REDPACKET_IDEMPOTENCY_KEY_TTL_S, 24 h by default): a
key older than that is treated as unused, and the node purges expired keys in the
background in bounded batches. On a real node with a real MariaDB ledger."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from redpacket.node.ledger import Ledger, to_datetime
from redpacket.node.migrations.runner import migrate
from redpacket.node.settings import NodeSettings
from tests.conftest import NodeHandle, sql

KEYS = "/internal/v1/idempotency-keys"


def claim_body(key: str, packet_id: int, body: str = "same body") -> dict[str, str]:
    return {
        "uid": "77",
        "key": key,
        "request_hash": hashlib.sha256(body.encode()).hexdigest(),
        "red_packet_id": str(packet_id),
    }


def test_the_default_lifetime_is_24_hours() -> None:
    env = {"REDPACKET_NODE_SECRET": "s"}
    assert NodeSettings.from_env(env).idempotency_key_ttl_s == 86400
    env["REDPACKET_IDEMPOTENCY_KEY_TTL_S"] = "3600"
    assert NodeSettings.from_env(env).idempotency_key_ttl_s == 3600


async def test_a_key_older_than_its_lifetime_is_treated_as_unused(fresh_node: Any) -> None:
    node: NodeHandle = await fresh_node(
        REDPACKET_IDEMPOTENCY_KEY_TTL_S="3600", REDPACKET_SWEEP_INTERVAL_S="3600"
    )
    status, bound = await node.call("POST", KEYS, claim_body("k-1", 1001))
    assert status == 200 and bound["red_packet_id"] == "1001"
    status, again = await node.call("POST", KEYS, claim_body("k-1", 1002))
    assert status == 200 and again["red_packet_id"] == "1001"  # within its lifetime: bound
    # the key was made 61 minutes ago (the purge has not run: the node still ignores it)
    old = to_datetime(int(time.time() * 1000) - 61 * 60 * 1000)
    await sql(node.settings.mysql_url, "UPDATE idempotency_key SET create_time = %s", (old,))
    status, fresh = await node.call("POST", KEYS, claim_body("k-1", 1003, "another body"))
    assert status == 200 and fresh["red_packet_id"] == "1003"
    assert fresh["request_hash"] == hashlib.sha256(b"another body").hexdigest()
    rows = await sql(node.settings.mysql_url, "SELECT red_packet_id FROM idempotency_key")
    assert rows == [(1003,)]


async def test_the_node_purges_expired_keys_in_the_background(fresh_node: Any) -> None:
    node: NodeHandle = await fresh_node(
        REDPACKET_IDEMPOTENCY_KEY_TTL_S="60", REDPACKET_SWEEP_INTERVAL_S="0.2"
    )
    now_ms = int(time.time() * 1000)
    expired, live = to_datetime(now_ms - 120_000), to_datetime(now_ms - 10_000)
    url = node.settings.mysql_url
    rows = [(i, f"old-{i}", "0" * 64, 5000 + i, expired) for i in range(1, 1301)]
    rows += [(i, f"new-{i}", "0" * 64, 9000 + i, live) for i in range(1, 6)]
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        await sql(
            url,
            "INSERT INTO idempotency_key (uid, idem_key, request_hash, red_packet_id, create_time) "
            "VALUES " + ", ".join(["(%s, %s, %s, %s, %s)"] * len(chunk)),
            tuple(v for row in chunk for v in row),
        )
    deadline = time.monotonic() + 30
    while (await sql(url, "SELECT COUNT(*) FROM idempotency_key"))[0][0] > 5:
        assert time.monotonic() < deadline, "expired keys were not purged within 30 s"
        await asyncio.sleep(0.2)
    left = await sql(url, "SELECT idem_key FROM idempotency_key ORDER BY uid")
    assert [k for (k,) in left] == [f"new-{i}" for i in range(1, 6)]


async def test_one_purge_batch_is_bounded(mysql_databases: Any) -> None:
    # the ledger alone: a node's sweeper purges at start and would race the rows in
    url = mysql_databases("purge")
    await migrate(url)
    ledger = await Ledger.connect(url, 2, timeout_s=5)
    try:
        expired = to_datetime(int(time.time() * 1000) - 2 * 86400 * 1000)
        await sql(
            url,
            "INSERT INTO idempotency_key (uid, idem_key, request_hash, red_packet_id, create_time) "
            "VALUES " + ", ".join(["(%s, %s, %s, %s, %s)"] * 30),
            tuple(v for i in range(30) for v in (i, f"k{i}", "0" * 64, i + 1, expired)),
        )
        assert await ledger.purge_idempotency_keys(int(time.time() * 1000) - 86400_000, 12) == 12
        assert (await sql(url, "SELECT COUNT(*) FROM idempotency_key"))[0][0] == 18
    finally:
        await ledger.close()
