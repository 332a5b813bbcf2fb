"""Reads and writes of wallets on the user's shard: balance, transactions, holds, top-ups.

Each write is one MySQL transaction that locks the user's wallet row first (holds are made
in batches per user, node/wallet/debits.py)
(:func:`redpacket.node.wallet.book.open_book`), so concurrent debits of one user queue on
that row and a balance never goes below zero. Every write is idempotent by its reference:
a hold by its create token, a top-up by its topup_id, a release by the hold it releases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redpacket.node.ledger import Ledger, retry_lock_conflicts, to_datetime, to_ms
from redpacket.node.wallet.book import Book, iso, open_book

HELD, SENT, RELEASED = "held", "sent", "released"
RELEASE_PREFIX = "release:"


class HoldConflict(Exception):
    """A create token already holds money for another user or amount (never a retry)."""


class TopupConflict(Exception):
    """A topup_id seen before with another body."""


@dataclass(frozen=True, slots=True)
class Hold:
    create_token: str
    uid: int
    amount: int
    red_packet_id: int
    state: str
    balance: int  # the wallet's balance after the hold (or now, for a replay)


class Wallets:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    # -- reads ----------------------------------------------------------------------------

    async def balance(self, uid: int, now_ms: int, starting_balance: int) -> tuple[int, int]:
        """``(balance, updated_ms)``; the first read of a dev cluster grants the starting one."""
        async with self.ledger.read() as cur:
            await cur.execute("SELECT balance, granted, update_time FROM wallet WHERE uid = %s",
                              (uid,))  # fmt: skip
            row = await cur.fetchone()
        if row is not None and (row[1] or starting_balance <= 0):
            return int(row[0]), to_ms(row[2])
        if starting_balance <= 0:
            return 0, 0
        book = await self._granted(uid, now_ms, starting_balance)
        return book.balance(uid), now_ms

    @retry_lock_conflicts
    async def _granted(self, uid: int, now_ms: int, starting_balance: int) -> Book:
        async with self.ledger.transaction() as cur:
            book = await open_book(cur, [uid], now_ms, starting_balance)
            await book.write()
        return book

    async def applied(self, uid: int, packet_ids: list[int]) -> set[int]:
        """Which of these packets' shares are credited to the user already."""
        if not packet_ids:
            return set()
        marks = ", ".join(["%s"] * len(packet_ids))
        async with self.ledger.read() as cur:
            await cur.execute(
                "SELECT red_packet_id FROM wallet_txn WHERE uid = %s AND kind = 'receive' "
                f"AND ref IN ({marks})",
                [uid, *(str(p) for p in packet_ids)],
            )
            rows = await cur.fetchall()
        return {int(r[0]) for r in rows}

    async def transactions(
        self, uid: int, limit: int, before_id: int | None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Newest first; the id to continue before, if there is more."""
        sql = ("SELECT id, kind, amount, red_packet_id, balance_after, create_time "
               "FROM wallet_txn WHERE uid = %s")  # fmt: skip
        args: list[Any] = [uid]
        if before_id is not None:
            sql += " AND id < %s"
            args.append(before_id)
        sql += " ORDER BY id DESC LIMIT %s"
        args.append(limit + 1)
        async with self.ledger.read() as cur:
            await cur.execute(sql, args)
            rows = list(await cur.fetchall())
        page = [
            {
                "id": str(tid),
                "kind": kind,
                "amount": int(amount),
                **({"red_packet_id": str(pid)} if pid is not None else {}),
                "balance_after": int(after),
                "create_time": iso(when),
            }
            for tid, kind, amount, pid, after, when in rows[:limit]
        ]
        return page, int(rows[limit - 1][0]) if len(rows) > limit else None

    # -- holds (the debit of a create: made in node/wallet/debits.py) ---------------------

    async def confirm(self, token: str) -> str | None:
        """The packet exists: the hold is spent. Its state afterwards (None: no such hold)."""
        async with self.ledger.transaction() as cur:
            await cur.execute(
                "UPDATE wallet_hold SET state = 'sent' WHERE create_token = %s AND state = 'held'",
                (token,),
            )
            await cur.execute("SELECT state FROM wallet_hold WHERE create_token = %s", (token,))
            row = await cur.fetchone()
        return str(row[0]) if row else None

    @retry_lock_conflicts
    async def release(self, token: str, now_ms: int) -> str | None:
        """The packet will never exist: give the money back (a ``refund`` with ref
        ``release:<token>``). Idempotent; the hold's state afterwards."""
        async with self.ledger.transaction() as cur:
            await cur.execute("SELECT uid FROM wallet_hold WHERE create_token = %s", (token,))
            row = await cur.fetchone()
            if row is None:
                return None
            book = await open_book(cur, [int(row[0])], now_ms)  # wallet first, then the hold
            await cur.execute(
                "SELECT uid, amount, red_packet_id, state FROM wallet_hold "
                "WHERE create_token = %s FOR UPDATE",
                (token,),
            )
            uid, amount, packet_id, state = await cur.fetchone()
            if state != HELD:
                return str(state)
            book.post(int(uid), "refund", RELEASE_PREFIX + token, int(amount), int(packet_id))
            await cur.execute(
                "UPDATE wallet_hold SET state = 'released' WHERE create_token = %s", (token,)
            )
            await book.write()
        return RELEASED

    async def stale_holds(self, before_ms: int, limit: int) -> list[tuple[str, int, int]]:
        """Holds still open since before ``before_ms``: ``(create token, red packet id, uid)``."""
        async with self.ledger.read() as cur:
            await cur.execute(
                "SELECT create_token, red_packet_id, uid FROM wallet_hold "
                "WHERE state = 'held' AND create_time < %s ORDER BY create_time LIMIT %s",
                (to_datetime(before_ms), limit),
            )
            rows = await cur.fetchall()
        return [(str(t), int(p), int(u)) for t, p, u in rows]

    # -- top-ups ----------------------------------------------------------------------------

    @retry_lock_conflicts
    async def topup(
        self, uid: int, topup_id: str, amount: int, digest: str, *, now_ms: int, starting: int
    ) -> tuple[dict[str, Any], bool]:
        """Credit a top-up once: ``(result, replayed)``. A replay answers the first result,
        kept in ``wallet_topup`` (and moved with it, node/handoff/wallets.py), never one
        recomputed from wherever its transaction is now. Raises TopupConflict for a topup_id
        seen with another body."""
        async with self.ledger.transaction() as cur:
            book = await open_book(cur, [uid], now_ms, starting)
            await cur.execute(
                # top-ups from before migration 0004 kept no answer: their transaction's
                "SELECT t.body_sha256, COALESCE(t.txn_id, x.id), "
                "COALESCE(t.balance_after, x.balance_after), t.create_time FROM wallet_topup t "
                "LEFT JOIN wallet_txn x ON x.uid = t.uid AND x.kind = 'topup' "
                "AND x.ref = t.topup_id WHERE t.topup_id = %s FOR UPDATE",
                (topup_id,),
            )
            found = await cur.fetchone()
            if found is not None:
                await book.write()
                if found[0] != digest:
                    raise TopupConflict(topup_id)
                return _topup_json(
                    topup_id, uid, amount, txn_id=found[1], after=found[2], when=found[3]
                ), True
            after = book.post(uid, "topup", topup_id, amount, None)
            txn_id, when = book.last_id, to_datetime(now_ms)
            await book.write()
            await cur.execute(
                "INSERT INTO wallet_topup (topup_id, uid, amount, body_sha256, create_time, "
                "txn_id, balance_after) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (topup_id, uid, amount, digest, when, txn_id, after),
            )
        return _topup_json(topup_id, uid, amount, txn_id=txn_id, after=after, when=when), False


def _topup_json(
    topup_id: str, uid: int, amount: int, *, txn_id: int, after: int, when: Any
) -> dict[str, Any]:
    return {
        "topup_id": topup_id,
        "uid": str(uid),
        "amount": amount,
        "transaction_id": str(txn_id),
        "balance_after": int(after),
        "create_time": iso(when),
    }
