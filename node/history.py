"""Each user's red packets (我的红包), on the shard that owns ``user:<uid>`` on the ring.

Rows arrive as events from any shard's outbox (``node/outbox.py``, delivered by
``node/relay.py``) and are applied as idempotent merges keyed by (uid, red_packet_id): a
delivery repeated, or two events of one packet applied in any order, leave the same row.

- ``user_received``: one row per share; ``luckiest`` only ever goes from 0 to 1;
- ``user_sent``: one row per packet sent; opened counts and the refund only grow
  (the later state wins), so an old event arriving late changes nothing.

Years are calendar years in UTC+8 (China Standard Time): the users of red packets count a
Spring Festival by their own calendar, and 00:30 on 1 January in Beijing is still the old
year in UTC.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiomysql
import asyncmy
from aiohttp import web

from redpacket.core.clock import now_ms, now_utc
from redpacket.core.cursors import encode_cursor
from redpacket.core.errors import ApiError
from redpacket.node.ledger import Ledger, retry_lock_conflicts, to_datetime, to_ms
from redpacket.node.outbox import RECEIVED, SENT
from redpacket.node.packet import many_rows
from redpacket.node.rowshape import TIME, RowShape
from redpacket.node.shard import Shard, moved
from redpacket.node.wallet.credits import apply_credits
from redpacket.node.wallet.debits import HoldQueue
from redpacket.node.wallet.store import Wallets
from redpacket.nodeclient.ring import RingFile
from redpacket.sharding.ring import Ring, RingDoc, route_user, user_key

CALENDAR = dt.timezone(dt.timedelta(hours=8), "UTC+8")

# (uid, event, red_packet_id, payload): the outbox row, as it travels
Event = tuple[int, str, int, dict[str, Any]]


def year_of(ms: int) -> int:
    return dt.datetime.fromtimestamp(ms / 1000, CALENDAR).year


def this_year() -> int:
    return dt.datetime.fromtimestamp(now_ms() / 1000, CALENDAR).year


@dataclass(frozen=True, slots=True)
class Page:
    summary: dict[str, int]
    rows: list[dict[str, Any]]
    next_cursor: str | None


# Connections of the shard's pool that history work (relay passes, applies from every other
# shard's relay, reads of 我的红包) may hold at once. The pool is the commit path's too: with
# many shards relaying here at once, history could otherwise take every connection while
# opens wait for one.
HISTORY_CONNECTIONS = 2


class UserHistory:
    def __init__(self, shard: Shard, name: str, ring: RingFile) -> None:
        self.shard = shard
        self.ledger: Ledger = shard.ledger
        self.name = name
        self.ring = ring
        self._slots = asyncio.Semaphore(HISTORY_CONNECTIONS)
        self.wallets = Wallets(shard.ledger)  # the wallets of the users kept here too
        self.debits = HoldQueue(shard.ledger)  # creates' holds, batched per user
        self._settled: tuple[RingDoc, Ring] | None = None

    # Ledger.read and Ledger.transaction, within history's share of the shard's pool.

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[asyncmy.cursors.Cursor]:
        async with self._slots, self.ledger.read() as cur:
            yield cur

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncmy.cursors.Cursor]:
        async with self._slots, self.ledger.transaction() as cur:
            yield cur

    # -- where a user lives ---------------------------------------------------------------

    def elsewhere(self, uid: int) -> ApiError | None:
        """packet_moved (with the owner) if another node keeps this user's history.

        Once a change is over its fence is lifted, but this node's ring file may still be the
        transition ring (which routes by the previous one) for a while: the relay re-reads it
        once a second, a kubelet updates a ConfigMap mount within a minute or so. Until the
        file is newer than the ring of the change, that ring decides, or a user who moved
        away would be taken in here again (and never moved)."""
        placement = self.shard.placement
        if placement is not None and getattr(placement, "fence", None) is not None:
            return placement.elsewhere(user_key(uid))  # the ring being moved to decides
        settled: RingDoc | None = getattr(placement, "settled", None)
        if settled is not None and (
            self.ring.doc is None or self.ring.doc.version <= settled.version
        ):
            if self._settled is None or self._settled[0] is not settled:
                self._settled = (settled, settled.ring())  # built once per change
            owner = self._settled[1].owner_of_key(user_key(uid))
            return None if owner.name == self.name else moved(owner.name, owner.url)
        if self.ring.doc is None:  # no ring file: a single shard keeps every user
            return None
        owner = route_user(self.ring.doc, uid)
        if owner.name == self.name:
            return None
        return moved(owner.name, owner.url)

    # -- apply ----------------------------------------------------------------------------

    async def accept(self, events: list[Event]) -> dict[int, ApiError]:
        """Apply the events of users kept here; ``{uid: packet_moved}`` for the others."""
        placement = self.shard.placement
        guard = placement.admitting() if placement is not None else contextlib.nullcontext()
        with guard:  # a fence being set waits for this apply (its users may be moving)
            away: dict[int, ApiError] = {}
            mine = []
            for event in events:
                err = away.get(event[0]) or self.elsewhere(event[0])
                if err is not None:
                    away[event[0]] = err
                else:
                    mine.append(event)
            if mine:
                await self.apply(mine)
        return away

    @retry_lock_conflicts
    async def apply(self, events: list[Event]) -> None:
        """One transaction, one multi-row merge per table, and the credits the events carry
        posted to the users' wallets (node/wallet/credits.py)."""
        # in key order: two relays applying to the same users lock rows in the same order
        received = sorted(_received_row(e) for e in events if e[1] == RECEIVED)
        sent = sorted(_sent_row(e) for e in events if e[1] == SENT)
        async with self.transaction() as cur:
            if received:
                await cur.execute(
                    _MERGE_RECEIVED.format(rows=many_rows(_RECEIVED_ROW, len(received))),
                    [v for row in received for v in row],
                )
            if sent:
                await cur.execute(
                    _MERGE_SENT.format(rows=many_rows(_SENT_ROW, len(sent))),
                    [v for row in sent for v in row],
                )
            await apply_credits(cur, events, int(time.time() * 1000))

    # -- reads ----------------------------------------------------------------------------

    async def received(
        self, uid: int, year: int, limit: int, after: tuple[int, int] | None
    ) -> Page:
        summary_sql = (
            "SELECT COUNT(*), COALESCE(SUM(amount), 0), COALESCE(SUM(luckiest), 0) "
            "FROM user_received WHERE uid = %s AND year = %s"
        )
        rows_sql = (
            "SELECT red_packet_id, sender_uid, sender_nick, sender_img, kind, amount, luckiest, "
            "create_time FROM user_received WHERE uid = %s AND year = %s"
        )
        (count, total, luckiest), rows = await self._page(
            summary_sql, rows_sql, uid=uid, year=year, limit=limit, after=after
        )
        records = [
            {
                "red_packet_id": str(pid),
                "sender": {"uid": str(s_uid), "nick_name": nick, "img_url": img},
                "kind": kind,
                "amount": amount,
                "luckiest": bool(lucky),
                "create_time": _iso(when),
            }
            for pid, s_uid, nick, img, kind, amount, lucky, when in rows[:limit]
        ]
        summary = {"total_amount": int(total), "count": int(count), "luckiest_count": int(luckiest)}
        return Page(summary, records, _next(rows, limit, 7))

    async def sent(self, uid: int, year: int, limit: int, after: tuple[int, int] | None) -> Page:
        summary_sql = (
            "SELECT COUNT(*), COALESCE(SUM(total_amount), 0), 0 "
            "FROM user_sent WHERE uid = %s AND year = %s"
        )
        rows_sql = (
            "SELECT red_packet_id, kind, total_amount, total_packet, opened_packet, opened_amount, "
            "refunded_amount, greeting, expire_time, create_time "
            "FROM user_sent WHERE uid = %s AND year = %s"
        )
        (count, total, _), rows = await self._page(
            summary_sql, rows_sql, uid=uid, year=year, limit=limit, after=after
        )
        now = now_utc()
        packets = [_sent_json(row, now) for row in rows[:limit]]
        return Page(
            {"total_amount": int(total), "count": int(count)}, packets, _next(rows, limit, 9)
        )

    async def _page(
        self,
        summary_sql: str,
        rows_sql: str,
        *,
        uid: int,
        year: int,
        limit: int,
        after: tuple[int, int] | None,
    ) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
        args: list[Any] = [uid, year]
        if after is not None:
            rows_sql += " AND (create_time < %s OR (create_time = %s AND red_packet_id < %s))"
            when = to_datetime(after[0])
            args += [when, when, after[1]]
        rows_sql += " ORDER BY create_time DESC, red_packet_id DESC LIMIT %s"
        args.append(limit + 1)
        async with self.read() as cur:
            await cur.execute(summary_sql, (uid, year))
            summary = await cur.fetchone()
            await cur.execute(rows_sql, args)
            rows = list(await cur.fetchall())
        return summary, rows


def _sent_json(row: tuple[Any, ...], now: dt.datetime) -> dict[str, Any]:
    pid, kind, total_amount, total_packet, opened_packet, opened_amount, refunded = row[:7]
    greeting, expire, when = row[7:10]
    if refunded:
        status = "refunded"
    elif opened_packet == total_packet:
        status = "sold_out"
    elif now >= expire:
        status = "expired"
    else:
        status = "active"
    return {
        "red_packet_id": str(pid),
        "kind": kind,
        "total_amount": total_amount,
        "total_packet": total_packet,
        "opened_packet": opened_packet,
        "opened_amount": opened_amount,
        "refunded_amount": refunded,
        "status": status,
        "greeting": greeting,
        "create_time": _iso(when),
    }


def _next(rows: list[tuple[Any, ...]], limit: int, time_index: int) -> str | None:
    if len(rows) <= limit:
        return None
    last = rows[limit - 1]
    return encode_cursor(to_ms(last[time_index]), int(last[0]))


def _iso(value: dt.datetime) -> str:
    return value.replace(tzinfo=dt.UTC).isoformat(timespec="milliseconds")


# The columns of each table as they travel (times as epoch ms, converted by the server:
# node/packet.py) and THE merge rule of each: the relay's apply (VALUES lists, below) and a
# rebalance's import of whole users (``merge_json``, JSON arrays) share both.
_RECEIVED = RowShape(
    "user_received",
    (("uid", "BIGINT"), ("red_packet_id", "BIGINT"), ("year", "SMALLINT"),
     ("sender_uid", "BIGINT"), ("sender_nick", "VARCHAR(64)"), ("sender_img", "VARCHAR(512)"),
     ("kind", "VARCHAR(16)"), ("amount", "INT"), ("luckiest", "TINYINT"),
     ("create_time", TIME)),
    "luckiest = GREATEST(luckiest, VALUES(luckiest))",
)  # fmt: skip
_SENT = RowShape(
    "user_sent",
    (("uid", "BIGINT"), ("red_packet_id", "BIGINT"), ("year", "SMALLINT"),
     ("kind", "VARCHAR(16)"), ("total_amount", "INT"), ("total_packet", "INT"),
     ("opened_packet", "INT"), ("opened_amount", "INT"), ("refunded_amount", "INT"),
     ("greeting", "VARCHAR(255)"), ("create_time", TIME), ("expire_time", TIME)),
    # opened counts and the refund only grow: the later state wins, an old one changes nothing
    "opened_amount = IF(VALUES(opened_packet) > opened_packet, "
    "                   VALUES(opened_amount), opened_amount), "
    "opened_packet = GREATEST(opened_packet, VALUES(opened_packet)), "
    "refunded_amount = GREATEST(refunded_amount, VALUES(refunded_amount))",
)  # fmt: skip
HISTORY_TABLES = (_RECEIVED, _SENT)  # what a user's history is, table by table
_MERGE_RECEIVED, _RECEIVED_ROW = _RECEIVED.merge_values(), _RECEIVED.placeholders()
_MERGE_SENT, _SENT_ROW = _SENT.merge_values(), _SENT.placeholders()


async def merge_json(cur: aiomysql.Cursor, arrays: dict[str, str | None]) -> None:
    """Merge users' rows listed elsewhere as JSON arrays (``{table: RowShape.list_json()}``)
    by the same rules as the relay's apply: one statement per table, no Python per row."""
    for shape in HISTORY_TABLES:
        if arrays.get(shape.table):
            await cur.execute(shape.merge_json(), (arrays[shape.table],))


def _received_row(event: Event) -> tuple[Any, ...]:
    uid, _, pid, p = event
    return (
        uid,
        pid,
        year_of(int(p["time"])),
        int(p["sender"]),
        str(p["sender_nick"]),
        str(p["sender_img"]),
        str(p["kind"]),
        int(p["amount"]),
        1 if p.get("luckiest") else 0,
        int(p["time"]),
    )


def _sent_row(event: Event) -> tuple[Any, ...]:
    uid, _, pid, p = event
    return (
        uid,
        pid,
        year_of(int(p["create_time"])),
        str(p["kind"]),
        int(p["total_amount"]),
        int(p["total_packet"]),
        int(p["opened_packet"]),
        int(p["opened_amount"]),
        int(p["refunded_amount"]),
        str(p["greeting"]),
        int(p["create_time"]),
        int(p["expire_time"]),
    )


HISTORY = web.AppKey("history", UserHistory)
