"""Red packet ids: positive, time-ordered 63-bit integers made without coordination.

Layout (most significant first): 41 bits of milliseconds since 2026-01-01 UTC (good for
69 years), 10 bits of generator id, 12 bits of sequence within the millisecond. Gateway
replicas pick their generator id at random unless told one, so two replicas *can* collide;
the node detects that (same id, different creation token) and the gateway retries with a
fresh id, so a collision is never merged into someone else's packet.

That snowflake is the *internal* id (MySQL, Redis, the ring, node calls). It is guessable
(issue 19: a packet was found in 28 GETs from its neighbours), so clients never see it: the
*public* id is :class:`PublicIds`' format, the snowflake followed by an HMAC tag. The gateway
formats every id it outputs and parses every id it receives here and nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time

from redpacket.core.errors import ApiError, not_found

EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MAX_ID = 2**63 - 1
_SEQ_BITS = 12
_GEN_BITS = 10


def parse_packet_id(raw: object) -> int:
    """A call's red packet id (a path segment, or an int on the link), or 400 ``invalid_id``."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not (isinstance(raw, str) and 0 < len(raw) <= 19 and raw.isascii() and raw.isdigit()):
        raise ApiError(400, "invalid_id", "red packet id must be a positive decimal integer")
    value = int(raw)
    if not 0 < value <= MAX_ID:
        raise ApiError(400, "invalid_id", "red packet id is out of range")
    return value


def parse_uid(raw: object) -> int | None:
    """A user id (decimal string or int, 1..2^63-1), or None if it is not one."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):  # canonical decimal only: "07777" is not uid 7777 (issue 19)
        if not (0 < len(raw) <= 19 and raw.isascii() and raw.isdigit()) or raw[0] == "0":
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


# -- public ids -------------------------------------------------------------------------------

PUBLIC_ID_CHARS = 22  # base64url, no padding, of 16 bytes
_TAG_BYTES = 8
_ID_KEY_LABEL = b"redpacket public packet id key v1"
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def derive_id_key(node_secret: str) -> bytes:
    """The default id key: an HMAC of a fixed label under the node secret, so a deployment
    needs no new secret (and every gateway of it derives the same key)."""
    return hmac.digest(node_secret.encode(), _ID_KEY_LABEL, "sha256")


def snowflake_of(public_id: str | int) -> int:
    """The snowflake inside a public id, *without* checking its tag: for tools and tests that
    read the stores behind a public answer (an int or a decimal string is taken as it is).
    Never for a client's input: that is :meth:`PublicIds.parse`."""
    if isinstance(public_id, int):
        return public_id
    if public_id.isdigit():
        return int(public_id)
    raw = base64.urlsafe_b64decode(public_id + "==")
    return int.from_bytes(raw[:8], "big")


class PublicIds:
    """Public red packet ids: ``base64url(snowflake as 8 bytes || tag)`` without padding, 22
    characters, where tag = HMAC-SHA256(id key, those 8 bytes)[:8]. 64 bits nobody can
    predict from other ids without the key, so a packet is found only by those given its id.

    ``legacy_before_ms``: packets whose snowflake time is before this keep the decimal ids of
    release 0.1.0: they are accepted, and given, in that form (tagged ids are accepted too).
    Given as well, because during a rolling upgrade a gateway of the previous release may
    serve the next call of a client a new gateway answered: set it past the end of the
    gateway roll, then back to that moment (docs/deploy.md, "Upgrades"); 0: none."""

    def __init__(self, key: bytes, legacy_before_ms: int = 0) -> None:
        if len(key) < 16:
            raise ValueError("the public id key must be at least 16 bytes")
        self._key = key
        self._legacy_before_ms = legacy_before_ms

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_TAG_BYTES]

    def format(self, packet_id: int) -> str:
        if IdGenerator.timestamp_ms(packet_id) < self._legacy_before_ms:
            return str(packet_id)  # a 0.1.0 gateway, still in the roll, can parse only these
        body = packet_id.to_bytes(8, "big")
        return base64.urlsafe_b64encode(body + self._tag(body)).decode().rstrip("=")

    def parse(self, raw: str) -> int:
        """The snowflake of a public id; 400 ``invalid_id`` for what cannot be an id at all,
        404 ``not_found`` (the very answer of an unknown packet) for a tag that does not check
        or a legacy id the settings do not accept."""
        if len(raw) == PUBLIC_ID_CHARS and _B64URL.issuperset(raw):
            try:
                decoded = base64.urlsafe_b64decode(raw + "==")
            except (binascii.Error, ValueError):
                raise not_found() from None
            body, tag = decoded[:8], decoded[8:]
            canonical = base64.urlsafe_b64encode(decoded).decode().rstrip("=") == raw
            if not hmac.compare_digest(tag, self._tag(body)) or not canonical:
                raise not_found()
            value = int.from_bytes(body, "big")
            if not 0 < value <= MAX_ID:
                raise not_found()
            return value
        if 0 < len(raw) <= 19 and raw.isascii() and raw.isdigit():
            value = parse_packet_id(raw)
            if IdGenerator.timestamp_ms(value) >= self._legacy_before_ms:
                raise not_found()
            return value
        raise ApiError(400, "invalid_id", "red packet id must be an id this API returned")
