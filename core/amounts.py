"""The money rules of a red packet, checked the same way at the gateway and at the node.

Money is always an ``int`` number of cents (分). JSON floats, booleans and strings are
refused rather than coerced: ``10.0`` or ``"10"`` from a client is a bug on their side, and
silently rounding money is how ledgers drift.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redpacket.core.errors import ApiError
from redpacket.core.ids import parse_uid

DEFAULT_GREETING = "恭喜发财，大吉大利"


@dataclass(frozen=True)
class Limits:
    """Product limits per red packet (WeChat's are 100 shares and 200 yuan)."""

    max_packets: int = 100
    max_amount: int = 20_000
    max_greeting_chars: int = 64


KINDS = ("lucky", "equal", "exclusive")


@dataclass(frozen=True)
class NewPacket:
    total_amount: int
    total_packet: int
    greeting: str
    kind: str = "lucky"
    amount_each: int | None = None  # equal packets
    receiver_uid: int | None = None  # exclusive packets


def invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_field", message, extra={"field": field})


def refuse_unknown_fields(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """Unknown fields are refused everywhere: a typo like ``total_amout`` never passes silently."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(
            400,
            "unknown_field",
            f"unknown field(s): {', '.join(unknown)}",
            extra={"fields": unknown},
        )


def strict_int(value: Any) -> int | None:
    """``value`` if it is a JSON integer, else None: ``1.0``, ``true``, ``"1"`` are not
    integers, wherever money or a count is given (issue 19). The one rule for every endpoint."""
    return value if type(value) is int else None


def _int_in_range(body: Mapping[str, Any], field: str, low: int, high: int, what: str) -> int:
    value = body.get(field)
    if value is None:
        raise invalid(field, f"{field} is required")
    value = strict_int(value)
    if value is None or not low <= value <= high:
        raise invalid(field, f"{field} must be an integer {what} between {low} and {high}")
    return value


def parse_greeting(value: Any, limits: Limits) -> str:
    if value is None:
        return DEFAULT_GREETING
    if not isinstance(value, str):
        raise invalid("greeting", "greeting must be a string")
    if len(value) > limits.max_greeting_chars:
        raise invalid(
            "greeting", f"greeting must be at most {limits.max_greeting_chars} characters"
        )
    if any(unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") for ch in value):
        raise invalid("greeting", "greeting must not contain control or unassigned characters")
    return value or DEFAULT_GREETING


NEW_PACKET_FIELDS = frozenset(
    {"total_amount", "total_packet", "greeting", "kind", "amount_each", "receiver_uid"}
)


def _kind(body: Mapping[str, Any]) -> str:
    kind = body.get("kind", "lucky")
    if kind not in KINDS:
        raise invalid("kind", "kind must be one of: " + ", ".join(KINDS))
    return kind


def _receiver(value: Any) -> int:
    uid = parse_uid(value) if isinstance(value, str) else None
    if uid is None:
        raise invalid("receiver_uid", "receiver_uid must be a user id: a decimal string")
    return uid


def parse_new_packet(body: Mapping[str, Any], limits: Limits) -> NewPacket:
    """The rules per kind (docs/api.md, "Kinds and their limits").

    lucky: ``total_amount`` into ``total_packet`` random shares (double-average rule);
    equal: ``amount_each`` times ``total_packet`` (``total_amount`` may be given, and must
    then match); exclusive: one share, for ``receiver_uid`` only.
    """
    refuse_unknown_fields(body, NEW_PACKET_FIELDS)
    kind = _kind(body)
    for field, allowed in (("amount_each", "equal"), ("receiver_uid", "exclusive")):
        if field in body and kind != allowed:
            raise invalid(field, f"{field} is only for kind {allowed!r}")
    amount_each = receiver = None
    if kind == "equal":
        amount_each = _int_in_range(body, "amount_each", 1, limits.max_amount, "number of cents")
        total_packet = _int_in_range(
            body, "total_packet", 1, limits.max_packets, "number of shares"
        )
        total_amount = amount_each * total_packet
        if total_amount > limits.max_amount:
            raise invalid(
                "amount_each",
                f"amount_each x total_packet must be at most {limits.max_amount} cents",
            )
        given = strict_int(body.get("total_amount", total_amount))
        if given != total_amount:
            raise invalid("total_amount", "total_amount must equal amount_each x total_packet")
    else:
        total_amount = _int_in_range(body, "total_amount", 1, limits.max_amount, "number of cents")
        if kind == "exclusive":
            if strict_int(body.get("total_packet", 1)) != 1:
                raise invalid("total_packet", "an exclusive red packet has exactly 1 share")
            total_packet = 1
            receiver = _receiver(body.get("receiver_uid"))
        else:
            total_packet = _int_in_range(
                body, "total_packet", 1, limits.max_packets, "number of shares"
            )
    if total_amount < total_packet:
        raise invalid(
            "total_amount",
            "total_amount must be at least total_packet: every share is at least 1 cent",
        )
    if "greeting" in body and body["greeting"] is None:
        raise invalid("greeting", "greeting must be a string; leave it out for the default")
    greeting = parse_greeting(body.get("greeting"), limits)
    return NewPacket(total_amount, total_packet, greeting, kind, amount_each, receiver)


def check_sender(new: NewPacket, sender_uid: int) -> None:
    """An exclusive packet is for someone else: sending one to yourself is refused."""
    if new.receiver_uid is not None and new.receiver_uid == sender_uid:
        raise invalid("receiver_uid", "an exclusive red packet is for someone other than you")
