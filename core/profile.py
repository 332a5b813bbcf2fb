"""A user's display fields (the token's ``name`` and ``picture``), bounded in bytes.

These fields come from the identity provider, not from us, and reach MySQL columns
(``red_packet_record.nick_name``, ``red_packet_info.sender_*``, the history tables) and the
history outbox, whose payload is a ``VARBINARY(2048)``. A token is never refused for them:
a user with a long name must still be able to send and open red packets. So each has a rule
that always yields something that fits (docs/api.md "Display fields"):

- ``nick_name``: control, format and unassigned characters dropped, then cut at a UTF-8
  character boundary to at most :data:`NICK_MAX_BYTES` bytes (also at most that many
  characters, so it fits ``VARCHAR(64)``).
- ``img_url``: kept only if it is an ``http(s)://`` URL of at most :data:`IMG_URL_MAX_BYTES`
  bytes of visible ASCII without ``"``, ``\\``, ``<`` or ``>``; otherwise dropped (``""``):
  a URL cut short points somewhere else.

With these, the largest history event (a ``received`` event carrying the sender's nick and
avatar) stays under 1 KiB of JSON; ``node/outbox.py`` still checks every payload's size
itself, so a row written before these rules (or by a bug) cannot jam a commit either.

The gateway applies them to every token; the node applies them again to what it is sent
(one rule, two places that cannot trust each other).
"""

from __future__ import annotations

import unicodedata

NICK_MAX_BYTES = 64
IMG_URL_MAX_BYTES = 512
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
_URL_FORBIDDEN = frozenset('"\\<>')


def cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut at a character boundary to at most ``max_bytes`` bytes of UTF-8."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", "ignore")


def bound_nick(raw: object) -> str:
    """The display name as stored: see the module's rule. Anything not a string is ``""``."""
    if not isinstance(raw, str):
        return ""
    if not raw.isascii() or not raw.isprintable():
        raw = "".join(ch for ch in raw if unicodedata.category(ch) not in _DROPPED_CATEGORIES)
    return cut_utf8(raw, NICK_MAX_BYTES)


def bound_img_url(raw: object) -> str:
    """The avatar URL as stored, or ``""`` when it breaks the module's rule."""
    if not isinstance(raw, str) or not raw or len(raw) > IMG_URL_MAX_BYTES or not raw.isascii():
        return ""
    if not raw.startswith(("https://", "http://")):
        return ""
    if any(not "!" <= ch <= "~" or ch in _URL_FORBIDDEN for ch in raw):
        return ""
    return raw
