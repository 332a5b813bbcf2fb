"""The wallet (零钱): create pays, shares and refunds are credited, top-ups are signed."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
import pytest

from redpacket.core.env import SettingsError
from redpacket.gateway.settings import GatewaySettings
from redpacket.gateway.wallet import SIGNATURE_HEADER, signature_header
from tests.conftest import Cluster


async def until(check: Any, timeout_s: float = 15.0) -> Any:
    """Poll ``check()`` until it returns something truthy (credits arrive asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, "not credited in time"
        await asyncio.sleep(0.05)


async def wallet(cluster: Cluster, uid: int) -> dict[str, Any]:
    """The wallet, retrying a 503 as a client does (a shard restarting, a loaded box)."""
    for _ in range(20):
        status, body = await cluster.call("GET", "/v1/me/wallet", uid)
        if status != 503:
            break
        await asyncio.sleep(0.5)
    assert status == 200, body
    return body


async def transactions(cluster: Cluster, uid: int, **params: str) -> dict[str, Any]:
    status, body = await cluster.call("GET", "/v1/me/wallet/transactions", uid, **params)
    assert status == 200, body
    return body


async def topup(
    cluster: Cluster,
    uid: int,
    amount: int,
    topup_id: str,
    *,
    secret: str | None = None,
    now_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    raw = orjson.dumps({"uid": str(uid), "amount": amount, "topup_id": topup_id})
    sig = signature_header(secret or cluster.state["payments_secret"], raw, now_s)
    return await cluster.raw(
        "POST",
        "/v1/wallet/topups",
        raw,
        {"Content-Type": "application/json", SIGNATURE_HEADER: sig, **(headers or {})},
    )


STARTING = 10_000_000  # the dev cluster's default grant (cli/devcluster.py)


async def test_first_read_grants_the_dev_starting_balance_once(cluster: Cluster) -> None:
    first = await wallet(cluster, 18001)
    assert first["balance"] == STARTING and first["incoming"] == 0
    assert (await wallet(cluster, 18001))["balance"] == STARTING
    txns = (await transactions(cluster, 18001))["transactions"]
    assert [(t["kind"], t["amount"], t["balance_after"]) for t in txns] == [
        ("grant", STARTING, STARTING)
    ]


async def test_create_debits_the_sender_and_each_share_is_credited_to_its_winner(
    cluster: Cluster,
) -> None:
    packet_id = await cluster.create(18011, 1000, 3)
    assert (await wallet(cluster, 18011))["balance"] == STARTING - 1000
    won = {}
    for uid in (18012, 18013, 18014):
        status, body = await cluster.open(packet_id, uid)
        assert status == 200, body
        won[uid] = body["amount"]

    async def credited() -> bool:
        seen = {uid: await wallet(cluster, uid) for uid in won}
        for uid, amount in won.items():  # while pending: incoming, then in the balance
            assert seen[uid]["balance"] + seen[uid]["incoming"] == STARTING + amount, seen
        return all(w["incoming"] == 0 for w in seen.values())

    await until(credited)
    txns = (await transactions(cluster, 18012))["transactions"]
    receives = [t for t in txns if t["kind"] == "receive"]
    assert [(t["amount"], t["red_packet_id"]) for t in receives] == [(won[18012], packet_id)]
    sent = (await transactions(cluster, 18011))["transactions"][0]
    assert (sent["kind"], sent["amount"], sent["red_packet_id"]) == ("send", -1000, packet_id)
    await cluster.check()


async def test_a_retried_create_with_the_same_key_debits_once(cluster: Cluster) -> None:
    body = {"total_amount": 500, "total_packet": 2}
    key = {"Idempotency-Key": "wallet-retry-1"}
    first = await cluster.call("POST", "/v1/red-packets", 18021, body, headers=key)
    again = await cluster.call("POST", "/v1/red-packets", 18021, body, headers=key)
    assert first[0] == again[0] == 201
    assert first[1]["red_packet_id"] == again[1]["red_packet_id"]
    assert (await wallet(cluster, 18021))["balance"] == STARTING - 500


async def test_top_up_is_signed_idempotent_and_credited(cluster: Cluster) -> None:
    status, body = await topup(cluster, 18031, 2500, "pay-18031-a")
    assert status == 201, body
    assert body["balance_after"] == STARTING + 2500 and body["replayed"] is False
    status, replay = await topup(cluster, 18031, 2500, "pay-18031-a")
    assert status == 200 and replay["replayed"] is True
    assert replay["transaction_id"] == body["transaction_id"]
    status, reused = await topup(cluster, 18031, 9999, "pay-18031-a")
    assert status == 422 and reused["error"]["code"] == "topup_id_reused"
    assert (await wallet(cluster, 18031))["balance"] == STARTING + 2500


async def test_forged_stale_and_user_token_top_ups_are_401(cluster: Cluster) -> None:
    forged = await topup(cluster, 18041, 100, "forged-1", secret="x" * 40)
    stale = await topup(cluster, 18041, 100, "stale-1", now_s=time.time() - 301)
    raw = orjson.dumps({"uid": "18041", "amount": 100, "topup_id": "jwt-1"})
    with_jwt = await cluster.raw(
        "POST",
        "/v1/wallet/topups",
        raw,
        {"Authorization": f"Bearer {cluster.token(18041)}", "Content-Type": "application/json"},
    )
    for status, body in (forged, stale, with_jwt):
        assert status == 401, body
        assert body["error"]["code"] == "invalid_signature"
    assert (await wallet(cluster, 18041))["balance"] == STARTING


async def test_bad_top_up_bodies_are_400_and_change_nothing(cluster: Cluster) -> None:
    for amount in (0, -5, "100", 1.5, True):
        raw = orjson.dumps({"uid": "18051", "amount": amount, "topup_id": "bad-1"})
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(cluster.state["payments_secret"], raw),
        }
        status, body = await cluster.raw("POST", "/v1/wallet/topups", raw, headers)
        assert status == 400, body
    assert (await wallet(cluster, 18051))["balance"] == STARTING


async def test_wallet_topup_command_signs_and_sends_one(cluster: Cluster) -> None:
    argv = [sys.executable, "-m", "redpacket.cli", "wallet", "topup", "--uid", "18061"]
    argv += ["--amount", "1234", "--topup-id", "cli-18061", "--cluster", cluster.name]
    argv += ["--var", str(cluster.home.parent)]
    for _ in range(2):  # a replay credits once
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out
        assert orjson.loads(out)["amount"] == 1234
    assert (await wallet(cluster, 18061))["balance"] == STARTING + 1234


def test_a_gateway_that_is_not_a_dev_cluster_refuses_a_starting_balance() -> None:
    env = {
        "REDPACKET_RING_FILE": "ring.json",
        "REDPACKET_JWT_SECRET": "j" * 32,
        "REDPACKET_NODE_SECRET": "n" * 32,
        "REDPACKET_DEV_STARTING_BALANCE": "100000",
    }
    with pytest.raises(SettingsError, match="dev clusters only"):
        GatewaySettings.from_env(env)
    dev = GatewaySettings.from_env({**env, "REDPACKET_DEV_LOGIN": "true"})
    assert dev.dev_starting_balance == 100000
    assert (
        GatewaySettings.from_env({**env, "REDPACKET_DEV_STARTING_BALANCE": "0"}).dev_login is False
    )
    with pytest.raises(SettingsError, match="PAYMENTS_SECRET"):
        GatewaySettings.from_env({**env, "REDPACKET_DEV_STARTING_BALANCE": "0",
                                  "REDPACKET_PAYMENTS_SECRET": "short"})  # fmt: skip
