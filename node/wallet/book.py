"""One transaction's changes of wallets: lock, check, post, write.

Every writer of a wallet takes its row lock first (``SELECT ... FOR UPDATE``, uids in
ascending order so two writers never wait on each other in a cycle), computes the new balance
in Python under that lock, and writes the transactions and balances in the same MySQL
transaction. A balance is never negative: :meth:`Book.post` refuses a debit the balance does
not cover, and the ``CHECK (balance >= 0)`` of the table backs it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import aiomysql

from redpacket.core.ids import IdGenerator
from redpacket.node.ledger import to_datetime

GRANT_REF = "dev"  # the one grant of a dev starting balance per user
# Transaction ids are shown to users (``GET /v1/me/wallet/transactions``) and must survive a
# move of the wallet verbatim, so they are snowflakes, ordered in time (a user's list stays
# ordered by id after a move), not each shard's AUTO_INCREMENT. Made under the wallet's row
# lock, so one user's ids grow with their balance_after chain. Two nodes draw the same
# generator id once in 1,024 pairs; if they also met in a millisecond, a move renumbers the
# arriving user's transactions from the taken one on (node/handoff/wallets.py).
TXN_IDS = IdGenerator()


class InsufficientFunds(Exception):
    def __init__(self, balance: int) -> None:
        super().__init__(balance)
        self.balance = balance


@dataclass(slots=True)
class _Wallet:
    balance: int
    granted: bool
    changed: bool = False


@dataclass(slots=True)
class Book:
    """The wallets of one transaction, locked by :func:`open_book`."""

    cur: aiomysql.Cursor
    now_ms: int
    wallets: dict[int, _Wallet]
    rows: list[tuple[Any, ...]] = field(default_factory=list)

    def balance(self, uid: int) -> int:
        return self.wallets[uid].balance

    def post(self, uid: int, kind: str, ref: str, amount: int, packet_id: int | None) -> int:
        """Add one transaction (signed cents); the balance after it (its id: :attr:`last_id`)."""
        wallet = self.wallets[uid]
        after = wallet.balance + amount
        if after < 0:
            raise InsufficientFunds(wallet.balance)
        wallet.balance, wallet.changed = after, True
        self.rows.append(
            (TXN_IDS.next_id(), uid, kind, ref, amount, packet_id, after, to_datetime(self.now_ms))
        )
        return after

    @property
    def last_id(self) -> int:
        """The id of the transaction posted last."""
        return int(self.rows[-1][0])

    async def write(self) -> None:
        """The transactions (one multi-row insert) and the changed balances."""
        if self.rows:
            await self.cur.executemany(
                "INSERT INTO wallet_txn (id, uid, kind, ref, amount, red_packet_id, balance_after, "
                "create_time) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                self.rows,
            )
        changed = [(uid, w.balance, int(w.granted), to_datetime(self.now_ms))
                   for uid, w in sorted(self.wallets.items()) if w.changed]  # fmt: skip
        if changed:  # one multi-row statement (an UPDATE per wallet measured as the cost of a
            # credit batch of 150 users: 150 round trips with every wallet row locked)
            await self.cur.executemany(
                "INSERT INTO wallet (uid, balance, granted, update_time) VALUES (%s, %s, %s, %s) "
                "ON DUPLICATE KEY UPDATE balance = VALUES(balance), granted = VALUES(granted), "
                "update_time = VALUES(update_time)",
                changed,
            )


async def open_book(
    cur: aiomysql.Cursor, uids: list[int], now_ms: int, starting_balance: int = 0
) -> Book:
    """Lock the wallets of ``uids`` (made if missing) and, with a dev starting balance, grant
    it to those that never had it (a ``grant`` transaction: conservation counts it)."""
    ordered = sorted(set(uids))
    marks = ", ".join(["%s"] * len(ordered))
    when = to_datetime(now_ms)
    await cur.executemany(
        # ON DUPLICATE KEY UPDATE takes the existing row's exclusive lock at once; INSERT IGNORE
        # would take a shared one, and two writers upgrading theirs deadlock
        # (placeholders only, so executemany sends one multi-row statement)
        "INSERT INTO wallet (uid, balance, granted, update_time) VALUES (%s, %s, %s, %s) "
        "ON DUPLICATE KEY UPDATE uid = uid",
        [(uid, 0, 0, when) for uid in ordered],
    )
    await cur.execute(
        f"SELECT uid, balance, granted FROM wallet WHERE uid IN ({marks}) ORDER BY uid FOR UPDATE",
        ordered,
    )
    wallets = {int(u): _Wallet(int(b), bool(g)) for u, b, g in await cur.fetchall()}
    book = Book(cur, now_ms, wallets)
    if starting_balance > 0:
        for uid, wallet in wallets.items():
            if not wallet.granted:
                wallet.granted = True
                book.post(uid, "grant", GRANT_REF, starting_balance, None)
    return book


def iso(value: dt.datetime) -> str:
    return value.replace(tzinfo=dt.UTC).isoformat(timespec="milliseconds")
