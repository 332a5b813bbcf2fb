"""Dead letters: history events whose destination refused them, set aside (issue 19).

The relay (node/relay.py) delivers the outbox in order; an event its destination refuses
for what it holds (a malformed row, a value its columns cannot take) would be read and
refused again on every pass, and every event after it would wait. Such a row moves, in one
transaction, from ``history_outbox`` to ``history_dead_letter`` with the reason; a row whose
destination is merely down stays in the outbox and is retried (that is an outage, not a
dead letter). ``redpacket dead-letters list|retry`` reads them and puts them back.

The money is never here: a dead letter is a line of someone's 我的红包 history, and the
ledger (records, refunds) committed without it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

import aiomysql
from prometheus_client import Gauge

DEAD_LETTERS = Gauge(
    "redpacket_dead_letters",
    "History events this shard's relay set aside because their destination refused them.",
)
ERROR_MAX_CHARS = 255


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    uid: int
    event: str
    red_packet_id: int
    payload: bytes
    error: str
    dead_time: dt.datetime


async def bury(cur: aiomysql.Cursor, errors: dict[int, str]) -> None:
    """Move these outbox rows to the dead letters, with why (the caller commits)."""
    ids = sorted(errors)
    marks = ", ".join(["%s"] * len(ids))
    when = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    await cur.execute(
        "INSERT IGNORE INTO history_dead_letter "
        "(id, uid, event, red_packet_id, payload, create_time, error, dead_time) "
        "SELECT id, uid, event, red_packet_id, payload, create_time, "
        "(CASE id " + " ".join(["WHEN %s THEN %s"] * len(ids)) + " END), %s "
        f"FROM history_outbox WHERE id IN ({marks})",
        [*(v for i in ids for v in (i, errors[i][:ERROR_MAX_CHARS])), when, *ids],
    )
    await cur.execute(f"DELETE FROM history_outbox WHERE id IN ({marks})", ids)


async def count(cur: aiomysql.Cursor) -> int:
    await cur.execute("SELECT COUNT(*) FROM history_dead_letter")
    (n,) = await cur.fetchone()
    return int(n)


async def listing(cur: aiomysql.Cursor, limit: int = 1000) -> list[DeadLetter]:
    await cur.execute(
        "SELECT id, uid, event, red_packet_id, payload, error, dead_time "
        "FROM history_dead_letter ORDER BY id LIMIT %s",
        (limit,),
    )
    return [DeadLetter(*row) for row in await cur.fetchall()]


async def retry(cur: aiomysql.Cursor, ids: Iterable[int] | None = None) -> int:
    """Put dead letters back in the outbox (all, or these ids); how many (caller commits).

    They get new outbox ids, so the relay reads them after what is waiting now; applying an
    event is an idempotent merge, so one that was in fact delivered is harmless."""
    if ids is None:  # the ids now: a letter buried meanwhile is not deleted uncopied
        await cur.execute("SELECT id FROM history_dead_letter FOR UPDATE")
        ids = [int(row[0]) for row in await cur.fetchall()]
    args = sorted(set(ids))
    if not args:
        return 0
    where = " WHERE id IN (" + ", ".join(["%s"] * len(args)) + ")"
    await cur.execute(
        "INSERT INTO history_outbox (uid, event, red_packet_id, payload, create_time) "
        "SELECT uid, event, red_packet_id, payload, create_time FROM history_dead_letter"
        + where
        + " ORDER BY id",
        args,
    )
    moved = int(cur.rowcount)
    await cur.execute("DELETE FROM history_dead_letter" + where, args)
    return moved
