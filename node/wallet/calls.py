"""The node's wallet calls (entries of ``node/handlers.py CALLS``), made by the gateway
(gateway/wallet.py, gateway/handlers.py create_packet) and by other nodes' hold sweepers.

A user's wallet calls are answered by the shard that owns ``user:<uid>``; any other node says
``packet_moved`` with the owner, as for history. The amounts the gateway sends were checked
there; they are checked again here (positive cents), as every node input is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from redpacket.core.amounts import refuse_unknown_fields
from redpacket.core.errors import ApiError, bad_request, unavailable
from redpacket.core.ids import parse_packet_id, parse_uid
from redpacket.node.calls import Call, Handler, Reply, reply
from redpacket.node.shard import now_ms
from redpacket.node.wallet.abandon import ask_here
from redpacket.node.wallet.book import InsufficientFunds
from redpacket.node.wallet.debits import HoldRequest
from redpacket.node.wallet.store import HoldConflict, TopupConflict

MAX_CENTS = 10**15  # far above any real balance, far below BIGINT
# how long a wallet call of a user whose wallet a rebalance is bringing here waits for it
# (wallets move first, a few hundred users per second at least) before 503: inside the
# gateway's node timeout (2 s)
ARRIVAL_WAIT_S = 1.5


def cents(body: dict[str, Any], field: str, *, minimum: int = 1) -> int:
    value = body.get(field, 0 if minimum == 0 else None)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= MAX_CENTS:
        raise bad_request("invalid_field", f"{field} must be an integer number of cents")
    return value


def token_of(body: dict[str, Any]) -> str:
    token = body.get("create_token")
    if not (isinstance(token, str) and len(token) == 32 and token.isascii() and token.isalnum()):
        raise bad_request("invalid_field", "create_token must be 32 ASCII letters or digits")
    return token


def user_of(value: Any) -> int:
    uid = parse_uid(value)
    if uid is None:
        raise bad_request("invalid_field", "uid must be a positive 64-bit integer")
    return uid


def insufficient(balance: int) -> ApiError:
    return ApiError(
        402,
        "insufficient_funds",
        "the wallet's balance does not cover this red packet",
        extra={"balance": balance},
    )


@contextlib.asynccontextmanager
async def kept_here(call: Call, uid: int) -> AsyncIterator[None]:
    """Inside: this node keeps the user's wallet, all of it (a fence being set waits for the
    block). A wallet a rebalance is bringing here is not all here until imported: its calls
    wait for it a moment, then get 503 (retry), or a replayed top-up would be credited again
    or answered differently."""
    placement = call.shard.placement
    with placement.admitting() if placement is not None else contextlib.nullcontext():
        if (err := call.history.elsewhere(uid)) is not None:
            raise err
        arriving = getattr(placement, "wallet_arriving", None)
        if arriving is not None:
            deadline = time.monotonic() + ARRIVAL_WAIT_S
            while await arriving(uid):
                if time.monotonic() >= deadline:
                    raise unavailable("this user's wallet is moving here; retry")
                await asyncio.sleep(0.05)
        yield


async def hold(call: Call) -> Reply:
    body = call.args
    refuse_unknown_fields(
        body, frozenset({"create_token", "uid", "amount", "red_packet_id", "starting_balance"})
    )
    uid, token, amount = user_of(body.get("uid")), token_of(body), cents(body, "amount")
    packet_id = parse_packet_id(body.get("red_packet_id"))
    starting = cents(body, "starting_balance", minimum=0)
    async with kept_here(call, uid):
        try:
            held = await call.history.debits.hold(
                HoldRequest(token, uid, amount, packet_id, starting)
            )
        except InsufficientFunds as short:
            raise insufficient(short.balance) from None
        except HoldConflict:
            raise ApiError(409, "hold_conflict", "this create token holds another debit") from None
    return reply({"state": held.state, "balance": held.balance})


async def confirm(call: Call) -> Reply:
    body = call.args
    refuse_unknown_fields(body, frozenset({"create_token", "uid"}))
    async with kept_here(call, user_of(body.get("uid"))):
        state = await call.history.wallets.confirm(token_of(body))
    return reply({"state": state})


async def abandon_create(call: Call) -> Reply:
    """The packet's shard: does the packet of this hold exist? If not, it never will."""
    body = call.args
    refuse_unknown_fields(body, frozenset({"id", "create_token"}))
    packet_id = parse_packet_id(body["id"])
    outcome = await ask_here(call.shard, packet_id, token_of(body), now_ms())
    return reply({"outcome": outcome})


async def wallet(call: Call) -> Reply:
    args = call.args
    uid = user_of(args.get("uid"))
    refuse_unknown_fields(args, frozenset({"uid", "starting_balance", "pending"}))
    raw = str(args.get("starting_balance", "0"))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 15):
        raise bad_request("invalid_field", "starting_balance must be cents")
    pending = [p for p in str(args.get("pending", "")).split(",") if p]
    if len(pending) > 1000 or not all(
        p.isascii() and p.isdigit() and len(p) <= 19 for p in pending
    ):
        raise bad_request("invalid_field", "pending must be red packet ids, comma separated")
    wallets = call.history.wallets
    async with kept_here(call, uid):
        balance, updated_ms = await wallets.balance(uid, now_ms(), int(raw))
        applied = await wallets.applied(uid, [int(p) for p in pending])
    return reply(
        {"balance": balance, "updated_ms": updated_ms, "applied": [str(p) for p in applied]}
    )


async def transactions(call: Call) -> Reply:
    args = call.args
    uid = user_of(args.get("uid"))
    refuse_unknown_fields(args, frozenset({"uid", "limit", "cursor"}))
    raw_limit = str(args.get("limit", "20"))
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= 100):
        raise ApiError(
            400, "invalid_field", "limit must be an integer from 1 to 100", extra={"field": "limit"}
        )
    cursor = args.get("cursor")
    cursor = None if cursor is None else str(cursor)
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 19):
        raise bad_request("invalid_cursor", "cursor is not one this API returned")
    async with kept_here(call, uid):
        rows, more = await call.history.wallets.transactions(
            uid, int(raw_limit), int(cursor) if cursor else None
        )
    return reply({"transactions": rows, "next_cursor": str(more) if more else None})


async def incoming(call: Call) -> Reply:
    """Shares of this user committed here whose credit is still in this node's outbox."""
    uid = user_of(call.args.get("uid"))
    async with call.history.read() as cur:
        await cur.execute(
            "SELECT red_packet_id, payload FROM history_outbox WHERE uid = %s "
            "AND event = 'received' LIMIT 1000",
            (uid,),
        )
        rows = await cur.fetchall()
    shares = {str(pid): int(orjson.loads(p)["amount"]) for pid, p in rows}
    return reply({"shares": shares})


async def topup(call: Call) -> Reply:
    body = call.args
    refuse_unknown_fields(
        body, frozenset({"uid", "topup_id", "amount", "body_sha256", "starting_balance"})
    )
    uid, amount = user_of(body.get("uid")), cents(body, "amount")
    topup_id, digest = body.get("topup_id"), body.get("body_sha256")
    if not (isinstance(topup_id, str) and 1 <= len(topup_id) <= 64 and topup_id.isascii()):
        raise bad_request("invalid_field", "topup_id must be 1 to 64 ASCII characters")
    if not (isinstance(digest, str) and len(digest) == 64):
        raise bad_request("invalid_field", "body_sha256 must be 64 hex digits")
    starting = cents(body, "starting_balance", minimum=0)
    async with kept_here(call, uid):
        try:
            result, replayed = await call.history.wallets.topup(
                uid, topup_id, amount, digest, now_ms=now_ms(), starting=starting
            )
        except TopupConflict:
            raise ApiError(
                422, "topup_id_reused", "this topup_id was already used with another body"
            ) from None
    return reply({**result, "replayed": replayed}, status=200 if replayed else 201)


WALLET_CALLS: dict[str, Handler] = {
    "hold": hold,
    "confirm_hold": confirm,
    "abandon_create": abandon_create,
    "topup": topup,
    "wallet": wallet,
    "transactions": transactions,
    "incoming": incoming,
}
