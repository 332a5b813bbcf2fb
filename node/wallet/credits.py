"""Credits of shares (``receive``) and expiry refunds (``refund``), applied on the user's
shard in the same transaction as the history events that carry them (node/history.py).

The packet's shard marks the events that move money with ``"credit": true`` in the outbox
(node/outbox.py): every share's ``received`` event and the ``sent`` event of a refund. The
copies a rebalance makes of a user's history carry no mark, so moving history never pays
twice. Each credit is posted once: its reference is the packet id, unique per (uid, kind),
and a repeated delivery finds it posted (one read of the references under the wallet locks).
"""

from __future__ import annotations

import time

import aiomysql
from prometheus_client import Histogram

from redpacket.node.outbox import RECEIVED, SENT
from redpacket.node.wallet.book import open_book

Event = tuple[int, str, int, dict]

CREDIT_LAG = Histogram(
    "redpacket_credit_lag_seconds",
    "From a share taken (the open's 200 follows its commit) to its credit in the winner's wallet.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60),
)

Credit = tuple[int, str, str, int, int, int]  # uid, kind, ref, cents, red packet id, taken ms


def credits_of(events: list[Event]) -> list[Credit]:
    found: dict[tuple[int, str, str], Credit] = {}
    for uid, event, pid, payload in events:
        if not payload.get("credit"):
            continue
        if event == RECEIVED:
            credit = (uid, "receive", str(pid), int(payload["amount"]), pid, int(payload["time"]))
        elif event == SENT and int(payload.get("refunded_amount", 0)) > 0:
            credit = (uid, "refund", str(pid), int(payload["refunded_amount"]), pid, 0)
        else:
            continue
        found.setdefault(credit[:3], credit)  # the 手气最佳 copy of a share is the same credit
    return list(found.values())


async def apply_credits(cur: aiomysql.Cursor, events: list[Event], now_ms: int) -> int:
    """Post the credits these events carry that are not posted yet; how many were posted."""
    credits = credits_of(events)
    if not credits:
        return 0
    book = await open_book(cur, [c[0] for c in credits], now_ms)
    await cur.execute(
        "SELECT uid, kind, ref FROM wallet_txn WHERE (uid, kind, ref) IN ("
        + ", ".join(["(%s, %s, %s)"] * len(credits))
        + ")",
        [v for c in credits for v in c[:3]],
    )
    posted = {(int(u), str(k), str(r)) for u, k, r in await cur.fetchall()}
    fresh = [c for c in credits if c[:3] not in posted]
    for uid, kind, ref, amount, pid, _ in fresh:
        book.post(uid, kind, ref, amount, pid)
    await book.write()
    now_s = time.time()
    for *_, taken_ms in fresh:
        if taken_ms:
            CREDIT_LAG.observe(max(0.0, now_s - taken_ms / 1000))
    return len(fresh)
