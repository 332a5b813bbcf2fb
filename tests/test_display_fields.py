"""Issue 19, the money jam: nothing in a token's display fields can keep a share, a packet
or a refund from committing, and one claim that MySQL refuses never takes its batch down.

The token of the issue: ``picture`` is 512 emoji (512 characters, 2,048 bytes of UTF-8).
Every test ends with the invariant checker clean.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import secrets
import time
from typing import Any

import orjson

from redpacket.core.profile import IMG_URL_MAX_BYTES, NICK_MAX_BYTES, bound_img_url, bound_nick
from redpacket.node.counters import claim_details
from redpacket.node.ledger import Claim
from redpacket.node.outbox import PAYLOAD_MAX_BYTES, encode_payload
from redpacket.node.shard import now_ms
from tests.conftest import Cluster, NodeHandle, sql

EMOJI_PICTURE = "😀" * 512
EMOJI_NAME = "🧧" * 40  # 160 bytes: cut to 64


def utf8_token(secret: str, claims: dict[str, Any]) -> str:
    """An HS256 token whose claims are raw UTF-8 JSON (PyJWT escapes non-ASCII, 6x larger):
    the 2,048-byte picture of the issue, as its attacker sent it."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    signing = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + "." + b64(orjson.dumps(claims))
    signature = hmac.digest(secret.encode(), signing.encode(), "sha256")
    return signing + "." + b64(signature)


def hostile_token(cluster: Cluster, uid: int) -> str:
    claims = {"sub": str(uid), "name": EMOJI_NAME, "picture": EMOJI_PICTURE}
    return utf8_token(cluster.state["jwt_secret"], {**claims, "exp": int(time.time()) + 3600})


async def call_as(
    cluster: Cluster, token: str, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    assert cluster.session is not None
    async with cluster.session.request(
        method, cluster.url + path, json=body, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        return resp.status, await resp.json(content_type=None)


async def until(probe: Any, done: Any, timeout_s: float = 15) -> Any:
    async with asyncio.timeout(timeout_s):
        while not done(answer := await probe()):  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.1)
    return answer


def test_display_fields_are_bounded_in_bytes_never_refused() -> None:
    assert len(EMOJI_PICTURE.encode()) == 2048
    assert bound_img_url(EMOJI_PICTURE) == ""  # not a URL we can keep: dropped
    assert bound_img_url("https://img.example/" + "a" * IMG_URL_MAX_BYTES) == ""
    assert bound_img_url('https://img.example/"onerror=x') == ""
    assert bound_img_url("javascript:alert(1)") == ""
    assert bound_img_url("https://img.example/42.png") == "https://img.example/42.png"
    nick = bound_nick(EMOJI_NAME)
    assert nick == "🧧" * (NICK_MAX_BYTES // 4) and len(nick.encode()) <= NICK_MAX_BYTES
    assert bound_nick("阿明" * 40).encode() == ("阿明" * 40).encode()[:63]  # cut at a boundary
    assert bound_nick("bell\x07\u202eevil") == "bellevil"
    assert bound_nick(42) == ""


def test_an_oversized_outbox_payload_loses_its_display_fields_not_its_money() -> None:
    payload = {"amount": 7, "sender": 1, "sender_nick": "n", "sender_img": "😀" * 600}
    stored = orjson.loads(encode_payload(1, payload))
    assert stored == {**payload, "sender_img": ""}
    assert len(encode_payload(1, payload)) <= PAYLOAD_MAX_BYTES


async def test_the_emoji_token_as_sender(cluster: Cluster) -> None:
    sender = hostile_token(cluster, 1901)
    status, made = await call_as(
        cluster, sender, "POST", "/v1/red-packets", {"total_amount": 300, "total_packet": 3}
    )
    assert status == 201, made
    packet_id = made["red_packet_id"]
    amounts = []
    for uid in (1911, 1912, 1913):
        status, opened = await cluster.open(packet_id, uid)
        assert status == 200, opened
        amounts.append(opened["amount"])
    assert sum(amounts) == 300
    _, info = await cluster.call("GET", f"/v1/red-packets/{packet_id}", 1911)
    assert info["sender"]["img_url"] == "" and info["sender"]["nick_name"] == "🧧" * 16
    _, got = await until(
        lambda: cluster.call("GET", "/v1/me/received", 1911),
        lambda answer: any(r["red_packet_id"] == packet_id for r in answer[1]["records"]),
    )
    assert got["records"][0]["sender"]["img_url"] == ""
    await until(
        lambda: call_as(cluster, sender, "GET", "/v1/me/sent"),
        lambda answer: [p["opened_packet"] for p in answer[1]["packets"]] == [3],
    )
    await cluster.check()


async def test_the_emoji_token_as_opener(cluster: Cluster) -> None:
    packet_id = await cluster.create(1902, 200, 2)
    opener = hostile_token(cluster, 1921)
    status, opened = await call_as(cluster, opener, "POST", f"/v1/red-packets/{packet_id}/open")
    assert status == 200, opened
    assert await call_as(cluster, opener, "POST", f"/v1/red-packets/{packet_id}/open") == (
        200,
        {"amount": opened["amount"], "replayed": True},
    )
    _, records = await cluster.call("GET", f"/v1/red-packets/{packet_id}/records", 1902)
    (record,) = records["records"]
    assert (record["amount"], record["img_url"]) == (opened["amount"], "")
    assert len(record["nick_name"].encode()) <= NICK_MAX_BYTES
    await until(
        lambda: call_as(cluster, opener, "GET", "/v1/me/received"),
        lambda answer: [r["amount"] for r in answer[1]["records"]] == [opened["amount"]],
    )
    await cluster.check()


async def test_the_emoji_token_at_expiry_is_refunded(make_cluster: Any) -> None:
    cluster: Cluster = await make_cluster(
        args=("--expire-s", "1"),
        REDPACKET_SWEEP_INTERVAL_S="0.2",
        REDPACKET_REFUND_GRACE_S="0.2",
    )
    sender = hostile_token(cluster, 1903)
    status, made = await call_as(
        cluster, sender, "POST", "/v1/red-packets", {"total_amount": 500, "total_packet": 5}
    )
    assert status == 201, made
    packet_id = made["red_packet_id"]
    status, opened = await call_as(
        cluster, hostile_token(cluster, 1931), "POST", f"/v1/red-packets/{packet_id}/open"
    )
    assert status == 200, opened
    _, info = await until(
        lambda: cluster.call("GET", f"/v1/red-packets/{packet_id}", 1931),
        lambda answer: answer[1].get("status") == "refunded",
    )
    assert info["remaining_amount"] == 500 - opened["amount"]
    report = await cluster.check()
    assert report.refunds == 1


async def test_a_packet_row_holding_an_emoji_avatar_still_commits_and_refunds(
    fresh_node: Any,
) -> None:
    """The packet of the issue, written before the byte rules (a 2,048-byte avatar in
    ``sender_img``): its opens commit, their history events lose the avatar, it is refunded."""
    node: NodeHandle = await fresh_node(
        REDPACKET_SWEEP_INTERVAL_S="0.2", REDPACKET_REFUND_GRACE_S="0.1"
    )
    packet_id = await node.create(total_amount=400, total_packet=4, uid=1904, expire_seconds=2)
    await sql(
        node.settings.mysql_url,
        "UPDATE red_packet_info SET sender_img = %s WHERE red_packet_id = %s",
        (EMOJI_PICTURE, packet_id),
    )
    status, opened = await node.open(packet_id, 1941)
    assert status == 200, opened
    async with asyncio.timeout(15):
        while await node.shard.ledger.refund_of(packet_id) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert await node.shard.ledger.refund_of(packet_id) == 400 - opened["amount"]
    await node.check()


async def test_a_batch_with_one_uncommittable_claim_commits_the_rest(fresh_node: Any) -> None:
    """Claims that reach the committer with a field MySQL refuses (here an avatar longer than
    its column, past the node's own bounds) commit without it; the rest of their batch
    commits as it is; every share stays its user's."""
    node: NodeHandle = await fresh_node()
    shard = node.shard
    packet_a = await node.create(total_amount=1000, total_packet=10, uid=1905)
    packet_b = await node.create(total_amount=1000, total_packet=10, uid=1905)
    too_long = "https://img.example/" + "x" * 600
    claims = []
    for i, (packet_id, img) in enumerate(
        [(packet_a, ""), (packet_a, too_long), (packet_b, ""), (packet_b, ""), (packet_a, "")]
    ):
        claimed_at = now_ms()
        claim = Claim(packet_id, 1950 + i, 0, f"u{i}", img, claimed_at)
        result = await shard.counters.open(
            packet_id, claim.uid, secrets.randbits(31), claimed_at, claim_details(claim)
        )
        claims.append(Claim(packet_id, claim.uid, result.amount, f"u{i}", img, claimed_at))
    futures = [shard.committer.submit(claim) for claim in claims]  # one tick: one batch
    amounts = await asyncio.gather(*futures)
    assert amounts == [claim.amount for claim in claims]
    rows = await sql(
        node.settings.mysql_url,
        "SELECT uid, amount, img_url FROM red_packet_record WHERE red_packet_id IN (%s, %s) "
        "ORDER BY uid",
        (packet_a, packet_b),
    )
    assert [(uid, amount) for uid, amount, _ in rows] == [(c.uid, c.amount) for c in claims]
    assert [img for _, _, img in rows] == ["", "", "", "", ""]
    await node.check()
