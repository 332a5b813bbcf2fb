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


def decode_cursor(raw: str) -> tuple[int, int]:
    """``(time in ms, tie-breaker)``, or 400 ``invalid_cursor`` for anything else."""
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
        ms, tie = text.split(":")
        return int(ms), int(tie)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad_request("invalid_cursor", "cursor is not one this API returned") from None
