"""A red packet's fields, defined once: the node's request, the ledger's row, its SQL and Redis.

``PacketTerms`` is what the sender chose; a create request adds the lifetime
(``NewPacketRequest``, node/shard.py), the stored row adds the packet's progress
(``PacketRow``). From ``PacketRow``'s fields derive the column list of every INSERT and
SELECT of ``red_packet_info`` (node/ledger.py, node/outbox.py, node/handoff/), the row
mapping, and the hash that load.lua puts in Redis (node/counters.py).

Times are epoch milliseconds in Python and ``DATETIME(3)`` (UTC) in MySQL. The hot
statements convert them on the server (:data:`MS_TO_TIME`, :func:`time_to_ms`): an integer
is the cheapest value the pure-Python client escapes and parses, a datetime the costliest
(issue 23), and the conversion does not depend on the session's time zone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field, fields
from typing import Any

_EPOCH = dt.datetime(1970, 1, 1)
_MS = dt.timedelta(milliseconds=1)

# A placeholder for epoch ms, as the DATETIME(3) it stands for (exact: whole microseconds).
MS_TO_TIME = "TIMESTAMPADD(MICROSECOND, %s * 1000, '1970-01-01')"


def time_to_ms(column: str) -> str:
    """A DATETIME column read as epoch ms (an integer), whatever the session's time zone."""
    return f"TIMESTAMPDIFF(MICROSECOND, '1970-01-01', {column}) DIV 1000"


def to_datetime(ms: int) -> dt.datetime:
    """Epoch ms as the naive UTC datetime of a DATETIME(3) (statements off the hot path)."""
    return _EPOCH + dt.timedelta(milliseconds=ms)


def to_ms(value: dt.datetime) -> int:
    return (value - _EPOCH) // _MS


def _time(column: str, redis: str = "") -> Any:
    """A field kept as epoch ms, stored in the DATETIME(3) column ``column``."""
    return field(metadata={"time_column": column, "redis": redis})


def _redis(name: str, default: Any = dataclasses.MISSING) -> Any:
    """A field that load.lua also puts in the packet's Redis hash, as ``name``."""
    return field(default=default, metadata={"redis": name})


@dataclass(frozen=True, slots=True, kw_only=True)
class PacketTerms:
    """What the sender chose at create; none of it changes afterwards."""

    red_packet_id: int
    uid: int
    total_amount: int = _redis("total_amount")
    total_packet: int = _redis("total_packet")
    greeting: str
    create_token: str
    kind: str = _redis("kind", "lucky")
    amount_each: int | None = _redis("each", None)
    receiver_uid: int | None = _redis("receiver", None)
    sender_nick: str = ""
    sender_img: str = ""


@dataclass(frozen=True, slots=True)
class RecordRow:
    uid: int
    nick_name: str
    img_url: str
    amount: int
    create_time_ms: int
    luckiest: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PacketRow(PacketTerms):
    """One row of ``red_packet_info``: the terms and the packet's progress."""

    remaining_amount: int = _redis("remaining_amount")
    remaining_packet: int = _redis("remaining_packet")
    status: str
    create_time_ms: int = _time("create_time")
    expire_time_ms: int = _time("expire_time", redis="expire_at_ms")
    luckiest_uid: int | None = None
    luckiest: RecordRow | None = field(default=None, metadata={"stored": False})  # 手气最佳


@dataclass(frozen=True, slots=True)
class Claim:
    """One share taken in Redis, on its way to MySQL."""

    red_packet_id: int
    uid: int
    amount: int
    nick_name: str
    img_url: str
    claimed_at_ms: int


def terms_of(terms: PacketTerms) -> dict[str, Any]:
    """The terms of a request or a row, as keywords for another of the family."""
    return {f.name: getattr(terms, f.name) for f in fields(PacketTerms)}


_STORED = [f for f in fields(PacketRow) if f.metadata.get("stored", True)]
PACKET_FIELDS = tuple(f.name for f in _STORED)
_COLUMNS = [f.metadata.get("time_column", f.name) for f in _STORED]
_TIMES = frozenset(f.name for f in _STORED if "time_column" in f.metadata)

# INSERT INTO red_packet_info ({PACKET_COLUMNS}) VALUES ({PACKET_PLACEHOLDERS}), with
# packet_values(row): every value a plain parameter, so that executemany of it sends one
# multi-row INSERT (a handoff's batch). One per create: its datetimes cost little.
PACKET_COLUMNS = ", ".join(_COLUMNS)
PACKET_PLACEHOLDERS = ", ".join(["%s"] * len(_COLUMNS))


def packet_select(alias: str = "") -> str:
    """The SELECT list of a PacketRow, times read as integers (``alias``: the table's, in a
    join); see :func:`packet_from_row`."""
    prefix = alias + "." if alias else ""
    return ", ".join(
        time_to_ms(prefix + column) if name in _TIMES else prefix + column
        for name, column in zip(PACKET_FIELDS, _COLUMNS, strict=True)
    )


PACKET_SELECT = packet_select()
PACKET_WIDTH = len(PACKET_FIELDS)  # the columns of packet_select(), first in a joined row


_IN_REDIS = [(f.name, f.metadata["redis"]) for f in _STORED if f.metadata.get("redis")]


def redis_fields(row: PacketRow) -> list[int | str]:
    """The packet's fields in its Redis hash (``rp:{id}:info``, node/open.lua), as the
    name, value pairs that load.lua sets; a missing value is ``""``."""
    pairs: list[int | str] = []
    for name, key in _IN_REDIS:
        value = getattr(row, name)
        pairs += [key, "" if value is None else value]
    return pairs


def packet_from_row(row: tuple[Any, ...] | list[Any]) -> PacketRow:
    """A PacketRow from the :func:`packet_select` columns of a SELECT."""
    return PacketRow(**dict(zip(PACKET_FIELDS, row, strict=True)))


def packet_values(row: PacketRow, status: str | None = None) -> tuple[Any, ...]:
    """The PACKET_COLUMNS of an INSERT (``status`` overrides the row's)."""
    values = [
        to_datetime(getattr(row, name)) if name in _TIMES else getattr(row, name)
        for name in PACKET_FIELDS
    ]
    if status is not None:
        values[PACKET_FIELDS.index("status")] = status
    return tuple(values)


def many_rows(row: str, count: int) -> str:
    """``row, row, ...``: the VALUES of a multi-row INSERT built by hand, for rows with a
    server-side conversion in them (executemany batches only rows of plain ``%s``)."""
    return ", ".join([row] * count)
