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

DEFAULT_GREETING = "恭喜发财，大吉大利"


@dataclass(frozen=True)
class Limits:
    """Product limits per red packet (WeChat's are 100 shares and 200 yuan)."""

    max_packets: int = 100
    max_amount: int = 20_000
    max_greeting_chars: int = 64


@dataclass(frozen=True)
class NewPacket:
    total_amount: int
    total_packet: int
    greeting: str


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


def _int_in_range(body: Mapping[str, Any], field: str, low: int, high: int, what: str) -> int:
    value = body.get(field)
    if value is None:
        raise invalid(field, f"{field} is required")
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
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


NEW_PACKET_FIELDS = frozenset({"total_amount", "total_packet", "greeting"})


def parse_new_packet(body: Mapping[str, Any], limits: Limits) -> NewPacket:
    refuse_unknown_fields(body, NEW_PACKET_FIELDS)
    total_amount = _int_in_range(body, "total_amount", 1, limits.max_amount, "number of cents")
    total_packet = _int_in_range(body, "total_packet", 1, limits.max_packets, "number of shares")
    if total_amount < total_packet:
        raise invalid(
            "total_amount",
            "total_amount must be at least total_packet: every share is at least 1 cent",
        )
    if "greeting" in body and body["greeting"] is None:
        raise invalid("greeting", "greeting must be a string; leave it out for the default")
    return NewPacket(total_amount, total_packet, parse_greeting(body.get("greeting"), limits))
