"""The wallet (零钱) API: the balance, its transactions, and the payment provider's top-ups.

Every wallet lives on the shard owning ``user:<uid>`` (node/wallet/); these handlers route
there as history does. ``incoming`` (shares won whose credit is not applied yet) is read where
it is exact: every shard's outbox holds the committed shares not yet delivered, and the user's
shard says which of those it has applied already (a share between its apply and the delete
of its outbox row is counted once, in the balance).

The top-up webhook is authenticated like Stripe's: ``X-Redpacket-Signature: t=<unix>,v1=<hex
HMAC-SHA256(REDPACKET_PAYMENTS_SECRET, "<t>.<raw body>")>``, 5 minutes of tolerance, compared
in constant time. A user's token is no credential here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import time
from typing import Any

import orjson
from aiohttp import web

from redpacket.core.amounts import refuse_unknown_fields, strict_int
from redpacket.core.body import read_body
from redpacket.core.errors import ApiError, bad_request, json_response, parse_json_object
from redpacket.core.ids import parse_uid
from redpacket.gateway.handlers import NODES, SETTINGS, _user, passthrough, with_public_ids
from redpacket.nodeclient.client import NodeClient

SIGNATURE_HEADER = "X-Redpacket-Signature"
SIGNATURE_TOLERANCE_S = 300
MAX_TOPUP_CENTS = 10**12  # 100 亿元: any larger top-up is a bug upstream


# -- reads ----------------------------------------------------------------------------------


async def _incoming_shares(client: NodeClient, uid: int) -> dict[str, int]:
    """The user's committed shares still in some shard's outbox (undelivered credits)."""
    nodes = {n.name: n for n in client.ring_doc.all_nodes()}  # every version's shards

    async def ask(node: Any) -> dict[str, int]:
        try:
            return await client.incoming(node, uid)
        except ApiError:
            return {}

    shares: dict[str, int] = {}
    for found in await asyncio.gather(*(ask(n) for n in nodes.values())):
        shares.update(found)
    return shares


async def my_wallet(request: web.Request) -> web.Response:
    user = _user(request)
    nodes = request.app[NODES]
    shares = await _incoming_shares(nodes, user.uid)
    answer = await nodes.wallet(user.uid, request.app[SETTINGS].dev_starting_balance, list(shares))
    if answer.status != 200:
        return passthrough(answer)
    data = answer.data
    applied = set(data["applied"])
    updated_ms = int(data["updated_ms"])
    return json_response(
        {
            "balance": data["balance"],
            "incoming": sum(amount for pid, amount in shares.items() if pid not in applied),
            "updated_time": _iso(updated_ms) if updated_ms else None,
        }
    )


async def my_transactions(request: web.Request) -> web.Response:
    user = _user(request)
    params = {k: request.query[k] for k in ("limit", "cursor") if k in request.query}
    answer = await request.app[NODES].user_page(user.uid, "transactions", params)
    return with_public_ids(request, answer, "transactions")


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


# -- top-ups (the payment provider's webhook) ---------------------------------------------


def unsigned(message: str) -> ApiError:
    return ApiError(401, "invalid_signature", message)


def verify_signature(secret: str, header: str | None, raw: bytes, now_s: float) -> None:
    """Raise 401 unless ``header`` signs ``raw`` with ``secret`` within the tolerance."""
    if not header:
        raise unsigned(f"{SIGNATURE_HEADER} is required: top-ups come from the payment provider")
    stamp, signatures = None, []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            stamp = value
        elif key == "v1":
            signatures.append(value)
    if not (stamp and stamp.isascii() and stamp.isdigit() and len(stamp) <= 12) or not signatures:
        raise unsigned(f"{SIGNATURE_HEADER} must be t=<unix seconds>,v1=<hex>")
    if abs(now_s - int(stamp)) > SIGNATURE_TOLERANCE_S:
        raise unsigned("the signature's timestamp is outside the 5-minute tolerance")
    expected = sign(secret, int(stamp), raw)
    if not any(hmac.compare_digest(expected, s.encode()) for s in signatures):
        raise unsigned("the signature does not match")


def sign(secret: str, stamp: int, raw: bytes) -> bytes:
    """The hex v1 signature of a body at a timestamp (also what `redpacket wallet topup` sends)."""
    return (
        hmac.new(secret.encode(), f"{stamp}.".encode() + raw, hashlib.sha256).hexdigest().encode()
    )


def signature_header(secret: str, raw: bytes, now_s: float | None = None) -> str:
    stamp = int(time.time() if now_s is None else now_s)
    return f"t={stamp},v1={sign(secret, stamp, raw).decode()}"


async def create_topup(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    raw = await read_body(request)  # within the body read timeout, decoded
    verify_signature(settings.payments_secret, request.headers.get(SIGNATURE_HEADER), raw,
                     time.time())  # fmt: skip
    body = parse_json_object(raw)
    refuse_unknown_fields(body, frozenset({"uid", "amount", "topup_id"}))
    uid = parse_uid(body.get("uid"))
    if uid is None:
        raise bad_request("invalid_field", "uid must be a positive 64-bit integer")
    amount, topup_id = strict_int(body.get("amount")), body.get("topup_id")
    if amount is None or not 1 <= amount <= MAX_TOPUP_CENTS:
        raise bad_request("invalid_field", f"amount must be 1..{MAX_TOPUP_CENTS} cents")
    if not (
        isinstance(topup_id, str) and 1 <= len(topup_id) <= 64
        and all("!" <= ch <= "~" for ch in topup_id)
    ):  # fmt: skip
        raise bad_request("invalid_field", "topup_id must be 1 to 64 visible ASCII characters")
    # the request as the provider meant it (not its bytes): a replay re-serialized is the same
    digest = hashlib.sha256(orjson.dumps([str(uid), amount, topup_id])).hexdigest()
    answer = await request.app[NODES].topup(
        uid, topup_id, amount, digest, settings.dev_starting_balance
    )
    return passthrough(answer)


ROUTES = [
    web.get("/v1/me/wallet", my_wallet),
    web.get("/v1/me/wallet/transactions", my_transactions),
]
TOPUP_ROUTES = [web.post("/v1/wallet/topups", create_topup)]


def add_wallet_routes(app: web.Application, payments_secret: str) -> None:
    """The wallet's routes; the top-up webhook only with a payments secret (else 404)."""
    app.add_routes(ROUTES)
    if payments_secret:
        app.add_routes(TOPUP_ROUTES)
