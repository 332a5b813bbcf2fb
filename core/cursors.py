"""Page cursors of the list endpoints (records, my red packets): opaque to clients.

A cursor is the last row's ``(time in ms, tie-breaker id)``, so the next page starts right
after it in the list's order however many rows are added meanwhile.
"""

from __future__ import annotations

import base64
import binascii

from redpacket.core.errors import bad_request


def encode_cursor(time_ms: int, tie: int) -> str:
    return base64.urlsafe_b64encode(f"{time_ms}:{tie}".encode()).decode().rstrip("=")


MAX_CURSOR_CHARS = 64
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time MySQL and Python hold
MAX_TIE = 2**63 - 1  # uids and red packet ids are positive BIGINTs


def _canonical(text: str, high: int) -> int:
    """A canonical decimal (no sign, no leading zero) in ``0..high``, else ValueError."""
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0"):
        raise ValueError(text)
    value = int(text)
    if value > high:
        raise ValueError(text)
    return value


def decode_cursor(raw: str) -> tuple[int, int]:
    """``(time in ms, tie-breaker)``, or 400 ``invalid_cursor`` for anything else: a forged
    cursor with a number out of range must not reach a datetime or a query (issue 19 saw
    OverflowError become a 502)."""
    try:
        if len(raw) > MAX_CURSOR_CHARS:
            raise ValueError(raw)
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
        ms, tie = text.split(":")
        return _canonical(ms, MAX_TIME_MS), _canonical(tie, MAX_TIE)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad_request("invalid_cursor", "cursor is not one this API returned") from None
