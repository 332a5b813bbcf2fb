"""Red packet ids: positive, time-ordered 63-bit integers made without coordination.

Layout (most significant first): 41 bits of milliseconds since 2026-01-01 UTC (good for
69 years), 10 bits of generator id, 12 bits of sequence within the millisecond. Gateway
replicas pick their generator id at random unless told one, so two replicas *can* collide;
the node detects that (same id, different creation token) and the gateway retries with a
fresh id, so a collision is never merged into someone else's packet.

In JSON an id is always a decimal string: it does not fit a JavaScript number.
"""

from __future__ import annotations

import secrets
import threading
import time

from redpacket.core.errors import ApiError

EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MAX_ID = 2**63 - 1
_SEQ_BITS = 12
_GEN_BITS = 10


def parse_packet_id(raw: str) -> int:
    """A path segment as a red packet id, or 400 ``invalid_id``."""
    if not (0 < len(raw) <= 19 and raw.isascii() and raw.isdigit()):
        raise ApiError(400, "invalid_id", "red packet id must be a positive decimal integer")
    value = int(raw)
    if not 0 < value <= MAX_ID:
        raise ApiError(400, "invalid_id", "red packet id is out of range")
    return value


def parse_uid(raw: object) -> int | None:
    """A user id (decimal string or int, 1..2^63-1), or None if it is not one."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        if not (0 < len(raw) <= 19 and raw.isascii() and raw.isdigit()):
            return None
        raw = int(raw)
    if isinstance(raw, int) and 0 < raw <= MAX_ID:
        return raw
    return None


class IdGenerator:
    """Snowflake-style generator; thread-safe, monotonic per process."""

    def __init__(self, generator_id: int | None = None) -> None:
        if generator_id is None:
            generator_id = secrets.randbits(_GEN_BITS)
        if not 0 <= generator_id < 2**_GEN_BITS:
            raise ValueError(f"generator id must be in [0, {2**_GEN_BITS})")
        self.generator_id = generator_id
        self._lock = threading.Lock()
        self._last_ms = 0
        self._seq = 0

    def next_id(self) -> int:
        with self._lock:
            now = max(int(time.time() * 1000) - EPOCH_MS, self._last_ms)
            if now == self._last_ms:
                self._seq = (self._seq + 1) & ((1 << _SEQ_BITS) - 1)
                if self._seq == 0:  # 4096 ids in one millisecond: borrow the next one
                    now += 1
            else:
                self._seq = 0
            self._last_ms = now
            return (now << (_GEN_BITS + _SEQ_BITS)) | (self.generator_id << _SEQ_BITS) | self._seq

    @staticmethod
    def timestamp_ms(packet_id: int) -> int:
        return (packet_id >> (_GEN_BITS + _SEQ_BITS)) + EPOCH_MS

    @staticmethod
    def first_id_at(unix_ms: int) -> int:
        """The smallest id made at or after ``unix_ms`` (ids made before it are smaller)."""
        return max(0, unix_ms - EPOCH_MS) << (_GEN_BITS + _SEQ_BITS)
