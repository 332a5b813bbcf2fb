"""The node's internal API, called only by the gateway (see docs/api.md, "Node API").

Handlers turn a :class:`Call` (over the link or HTTP, node/calls.py) into calls on
:class:`Shard` and results into JSON values; the rules live there. ``CALLS`` at the bottom is
the one table, by call name (``nodeclient/wire.py``), both transports serve.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from redpacket.core.amounts import (
    NEW_PACKET_FIELDS,
    check_sender,
    parse_new_packet,
    refuse_unknown_fields,
)
from redpacket.core.cursors import decode_cursor, encode_cursor
from redpacket.core.errors import ApiError, bad_request
from redpacket.core.ids import parse_packet_id, parse_uid
from redpacket.core.metrics import REJECTIONS
from redpacket.node.calls import SETTINGS, SHARD, Call, CallTable, Reply, reply
from redpacket.node.counters import Outcome
from redpacket.node.history import Page, UserHistory, this_year
from redpacket.node.ledger import PacketRow, RecordRow
from redpacket.node.shard import MOVING, NewPacketRequest, now_ms
from redpacket.node.wallet.calls import WALLET_CALLS

__all__ = ["CALLS", "SETTINGS", "SHARD"]  # the app keys live with Call; imported from here

_REASONS = {
    Outcome.SOLD_OUT: "sold_out",
    Outcome.EXPIRED: "expired",
    Outcome.ALREADY_OPENED: "already_opened",
    Outcome.NOT_FOR_YOU: "not_for_you",
}


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def packet_status(row: PacketRow, now: int) -> str:
    if row.status == "refunded":
        return "refunded"
    if row.remaining_packet == 0:
        return "sold_out"
    if now >= row.expire_time_ms:
        return "expired"
    return "active"


def packet_json(row: PacketRow) -> dict[str, Any]:
    return {
        "red_packet_id": str(row.red_packet_id),
        "uid": str(row.uid),
        "sender": {"uid": str(row.uid), "nick_name": row.sender_nick, "img_url": row.sender_img},
        "total_amount": row.total_amount,
        "total_packet": row.total_packet,
        "remaining_amount": row.remaining_amount,
        "remaining_packet": row.remaining_packet,
        "greeting": row.greeting,
        "status": packet_status(row, now_ms()),
        "create_time": iso(row.create_time_ms),
        "expire_time": iso(row.expire_time_ms),
        "kind": row.kind,
        **({"amount_each": row.amount_each} if row.amount_each is not None else {}),
        **({"receiver_uid": str(row.receiver_uid)} if row.receiver_uid is not None else {}),
        "luckiest": luckiest_json(row.luckiest),
    }


def luckiest_json(row: RecordRow | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "uid": str(row.uid),
        "nick_name": row.nick_name,
        "img_url": row.img_url,
        "amount": row.amount,
    }


def record_json(row: RecordRow) -> dict[str, Any]:
    return {
        "uid": str(row.uid),
        "nick_name": row.nick_name,
        "img_url": row.img_url,
        "amount": row.amount,
        "create_time": iso(row.create_time_ms),
        "luckiest": row.luckiest,
    }


def _uid(body: Any) -> int:
    uid = parse_uid(body.get("uid"))
    if uid is None:
        raise bad_request("invalid_field", "uid must be a positive 64-bit integer")
    return uid


def _str(body: Any, field: str) -> str:
    value = body.get(field, "")
    if not isinstance(value, str):
        raise bad_request("invalid_field", f"{field} must be a string")
    return value


CREATE_FIELDS = frozenset(
    {
        "red_packet_id",
        "uid",
        "total_amount",
        "total_packet",
        "greeting",
        "expire_seconds",
        "create_token",
        "kind",
        "amount_each",
        "receiver_uid",
        "nick_name",
        "img_url",
    }
)


async def create(call: Call) -> Reply:
    settings = call.settings
    body = call.args
    refuse_unknown_fields(body, CREATE_FIELDS)
    packet_id = parse_packet_id(body.get("red_packet_id"))
    new = parse_new_packet(
        {k: body[k] for k in NEW_PACKET_FIELDS if k in body},
        settings.limits,
    )
    uid = _uid(body)
    check_sender(new, uid)
    expire_s = body.get("expire_seconds")
    if (
        not isinstance(expire_s, int)
        or isinstance(expire_s, bool)
        or not (1 <= expire_s <= settings.max_expire_s)
    ):
        raise bad_request("invalid_field", f"expire_seconds must be 1..{settings.max_expire_s}")
    token = _str(body, "create_token")
    if not (len(token) == 32 and token.isascii() and token.isalnum()):
        raise bad_request("invalid_field", "create_token must be 32 ASCII letters or digits")
    row, created = await call.shard.create(
        NewPacketRequest(
            red_packet_id=packet_id,
            uid=uid,
            total_amount=new.total_amount,
            total_packet=new.total_packet,
            greeting=new.greeting,
            expire_s=expire_s,
            create_token=token,
            kind=new.kind,
            amount_each=new.amount_each,
            receiver_uid=new.receiver_uid,
            sender_nick=_str(body, "nick_name"),
            sender_img=_str(body, "img_url"),
        )
    )
    return reply(packet_json(row), status=201 if created else 200)


async def info(call: Call) -> Reply:
    packet_id = parse_packet_id(call.args["id"])
    row = await call.shard.ledger.get_packet(packet_id)
    if row is None:
        raise await call.shard.absent(packet_id)  # 404, or 421 if it moved
    if row.status == MOVING:
        raise await call.shard.moving(packet_id)  # 409 while it is handed off
    return reply(packet_json(row))


async def grab(call: Call) -> Reply:
    body = call.args
    refuse_unknown_fields(body, frozenset({"id", "uid"}))
    packet_id = parse_packet_id(body["id"])
    outcome, amount = await call.shard.grab(packet_id, _uid(body))
    if outcome == Outcome.NEW_SHARE:
        return reply({"can_open": True})
    reason = _REASONS[outcome]
    REJECTIONS.labels("node", reason).inc()
    answer: dict[str, Any] = {"can_open": False, "reason": reason}
    if outcome == Outcome.ALREADY_OPENED:
        answer["amount"] = amount
    return reply(answer)


async def open_(call: Call) -> Reply:
    body = call.args
    refuse_unknown_fields(body, frozenset({"id", "uid", "nick_name", "img_url"}))
    packet_id = parse_packet_id(body["id"])
    try:
        amount, replayed = await call.shard.open(
            packet_id, _uid(body), _str(body, "nick_name"), _str(body, "img_url")
        )
    except ApiError as err:
        if err.status == 410:
            REJECTIONS.labels("node", err.code).inc()
        raise
    return reply({"amount": amount, "replayed": replayed})


async def records(call: Call) -> Reply:
    packet_id = parse_packet_id(call.args["id"])
    raw_limit = str(call.args.get("limit", "20"))
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= 100):
        raise ApiError(
            400, "invalid_field", "limit must be an integer from 1 to 100", extra={"field": "limit"}
        )
    limit = int(raw_limit)
    cursor = call.args.get("cursor")
    after = decode_cursor(cursor) if cursor else None
    shard = call.shard
    rows = await shard.ledger.records(packet_id, limit + 1, after)
    if not rows and await shard.ledger.get_packet(packet_id) is None:
        missing = await shard.absent(packet_id)  # a later page may find the packet moved
        if after is None or missing.code == "packet_moved":
            raise missing
    page = rows[:limit]
    next_cursor = (
        encode_cursor(page[-1].create_time_ms, page[-1].uid) if len(rows) > limit else None
    )
    return reply({"records": [record_json(r) for r in page], "next_cursor": next_cursor})


async def winners(call: Call) -> Reply:
    packet_id = parse_packet_id(call.args["id"])
    reason, claims, complete = await call.shard.winners(packet_id)
    return reply(
        {
            "final": _REASONS.get(reason) if reason is not None else None,
            "complete": complete,
            "winners": {str(uid): amount for uid, amount in claims.items()},
        }
    )


async def claim_idempotency_key(call: Call) -> Reply:
    body = call.args
    refuse_unknown_fields(body, frozenset({"uid", "key", "request_hash", "red_packet_id"}))
    key, request_hash = _str(body, "key"), _str(body, "request_hash")
    packet_id = parse_packet_id(body.get("red_packet_id"))
    if not key or len(key) > 255 or not key.isascii() or len(request_hash) != 64:
        raise bad_request("invalid_field", "key or request_hash is malformed")
    bound_id, bound_hash = await call.shard.claim_idempotency_key(
        _uid(body), key, request_hash, packet_id, now_ms()
    )
    return reply({"red_packet_id": str(bound_id), "request_hash": bound_hash})


async def healthz(_: Call) -> Reply:
    return reply({"ok": True})


async def readyz(call: Call) -> Reply:
    shard = call.shard
    problems = {}
    for name, check in (("redis", shard.counters.ping), ("mysql", shard.ledger.ping)):
        try:
            await check()
        except Exception as exc:
            problems[name] = type(exc).__name__
    if problems:
        raise ApiError(
            503, "unavailable", "a store of this shard is down", extra={"down": problems}
        )
    return reply({"ready": True, "node": call.settings.name})


# -- my red packets (node/history.py) -------------------------------------------------------


async def apply_history(call: Call) -> Reply:
    """Events from a relay (node/relay.py): applied here, or ``moved`` for users kept elsewhere."""
    body = call.args
    refuse_unknown_fields(body, frozenset({"events"}))
    raw = body.get("events")
    if not isinstance(raw, list) or len(raw) > 10_000:
        raise bad_request("invalid_field", "events must be a list of at most 10000 events")
    try:
        events = [(int(u), str(kind), int(pid), dict(p)) for u, kind, pid, p in raw]
    except (TypeError, ValueError):
        raise bad_request(
            "invalid_field", "events must be a list of [uid, event, id, row]"
        ) from None
    try:
        moved = await call.history.accept(events)
    except (KeyError, TypeError, ValueError):
        raise bad_request("invalid_field", "an event row is malformed") from None
    return reply(
        {
            "applied": sum(1 for e in events if e[0] not in moved),
            "moved": {
                str(uid): [err.extra.get("owner"), err.extra.get("owner_url", "")]
                for uid, err in moved.items()
            },
        }
    )


def _history_query(call: Call) -> tuple[int, int, int, tuple[int, int] | None]:
    args = call.args
    uid = _uid(args)
    refuse_unknown_fields(args, frozenset({"uid", "year", "limit", "cursor"}))
    raw_year = args.get("year")
    raw_year = None if raw_year is None else str(raw_year)
    if raw_year is None:
        year = this_year()
    elif raw_year.isascii() and raw_year.isdigit() and 2000 <= int(raw_year) <= 2999:
        year = int(raw_year)
    else:
        raise ApiError(400, "invalid_field", "year must be 2000..2999", extra={"field": "year"})
    raw_limit = str(args.get("limit", "20"))
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= 100):
        raise ApiError(
            400, "invalid_field", "limit must be an integer from 1 to 100", extra={"field": "limit"}
        )
    cursor = args.get("cursor")
    return uid, year, int(raw_limit), decode_cursor(cursor) if cursor else None


def _moved_unless_held(history: UserHistory, uid: int, page: Page) -> None:
    """packet_moved for a user another node keeps, unless this node still holds the user's
    history of that year: then it answers from it.

    During a rebalance the old owner sends a moving user's new events on at once (the fence)
    but copies the history itself only near the end, then releases it here. Sent on at once,
    reads found the new owner with the events since the fence only: a history shrank, then
    grew back (chaos seed 13, issue 24). Answered here until released, it never shrinks;
    the shares taken meanwhile show once the change has copied it."""
    if not page.summary.get("count") and (err := history.elsewhere(uid)) is not None:
        raise err


async def received(call: Call) -> Reply:
    uid, year, limit, after = _history_query(call)
    history = call.history
    page = await history.received(uid, year, limit, after)
    _moved_unless_held(history, uid, page)
    return reply(
        {"year": year, **page.summary, "records": page.rows, "next_cursor": page.next_cursor}
    )


async def sent(call: Call) -> Reply:
    uid, year, limit, after = _history_query(call)
    history = call.history
    page = await history.sent(uid, year, limit, after)
    _moved_unless_held(history, uid, page)
    return reply(
        {"year": year, **page.summary, "packets": page.rows, "next_cursor": page.next_cursor}
    )


# The node's calls, by name: served over the link (node/link.py) and as HTTP routes
# (node/app.py) at their nodeclient/wire.py paths.
CALLS = CallTable(
    {
        "create": create,
        "info": info,
        "grab": grab,
        "open": open_,
        "records": records,
        "winners": winners,
        "claim_idempotency_key": claim_idempotency_key,
        "apply_history": apply_history,
        "received": received,
        "sent": sent,
        **WALLET_CALLS,  # the wallet (node/wallet/calls.py)
        "healthz": healthz,
        "readyz": readyz,
    }
)
