"""The second half of ``redpacket check``: every user's history equals the ledgers.

Once every shard's outbox is drained, for every user and year (UTC+8): the shares in
``user_received`` and the packets in ``user_sent`` are exactly those the ledgers hold
(counts and sums; nothing missing, nothing twice, on no shard but the user's owner), with the
same amounts, opened counts, refunds and 手气最佳 flags. It also checks 手气最佳 itself: a
sold-out lucky packet names the highest share, the earliest on a tie; no other packet names one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from redpacket.node.ledger import connect_one
from redpacket.sharding.ring import NodeSpec, Ring, user_key

CALENDAR = dt.timezone(dt.timedelta(hours=8))
EPOCH = dt.datetime(1970, 1, 1)
MAX_LISTED = 20  # row-level differences printed; the per-year totals cover the rest


def _year(value: dt.datetime) -> int:
    return value.replace(tzinfo=dt.UTC).astimezone(CALENDAR).year


async def _rows(node: NodeSpec, statement: str) -> list[tuple[Any, ...]]:
    conn = await connect_one(node.mysql or "")
    try:
        async with conn.cursor() as cur:
            await cur.execute(statement)
            return list(await cur.fetchall())
    finally:
        conn.close()


async def _backlog(node: NodeSpec) -> int:
    return int((await _rows(node, "SELECT COUNT(*) FROM history_outbox"))[0][0])


async def wait_drained(nodes: Sequence[NodeSpec], wait_s: float) -> dict[str, int]:
    """Wait until no shard's outbox holds an event; what is left after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        left = dict(
            zip(
                [n.name for n in nodes],
                await asyncio.gather(*(_backlog(n) for n in nodes)),
                strict=True,
            )
        )
        left = {name: count for name, count in left.items() if count}
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(0.2)


async def history_violations(
    nodes: Sequence[NodeSpec], owners: Ring | None = None, wait_s: float = 15.0
) -> list[str]:
    left = await wait_drained(nodes, wait_s)
    if left:
        return [f"history outbox not drained after {wait_s:.0f}s: {left}"]
    infos, records, refunds, got_received, got_sent = [], [], [], [], []
    for node in nodes:
        infos += await _rows(
            node,
            "SELECT red_packet_id, uid, kind, total_amount, total_packet, remaining_amount, "
            "remaining_packet, status, create_time, luckiest_uid FROM red_packet_info",
        )
        records += await _rows(
            node, "SELECT red_packet_id, uid, amount, create_time, id FROM red_packet_record"
        )
        refunds += await _rows(node, "SELECT red_packet_id, amount FROM red_packet_refund")
        got_received += [
            (node.name, *r)
            for r in await _rows(
                node, "SELECT uid, red_packet_id, year, amount, luckiest FROM user_received"
            )
        ]
        got_sent += [
            (node.name, *r)
            for r in await _rows(
                node,
                "SELECT uid, red_packet_id, year, total_amount, total_packet, opened_packet, "
                "opened_amount, refunded_amount FROM user_sent",
            )
        ]
    out: list[str] = []
    packets = {row[0]: row for row in infos}  # a packet in two ledgers is reported elsewhere
    refund_of = dict(refunds)
    by_packet: dict[int, list[tuple[Any, ...]]] = {}
    for pid, uid, amount, when, rid in {(r[0], r[1]): r for r in records}.values():
        by_packet.setdefault(pid, []).append((uid, amount, when, rid))

    # 手气最佳 in the ledger
    for pid, info in packets.items():
        kind, status, named = info[2], info[7], info[9]
        shares = by_packet.get(pid, [])
        if kind == "lucky" and status == "sold_out" and shares:
            best = min(shares, key=lambda s: (-s[1], s[2], s[3]))[0]
            if named != best:
                out.append(f"red packet {pid}: luckiest is {named}, the ledger's best is {best}")
        elif named is not None and not (kind == "lucky" and status in ("sold_out", "moving")):
            out.append(f"red packet {pid}: a {kind} {status} packet names a luckiest ({named})")

    # what the histories should hold
    want_received = {}
    for pid, shares in by_packet.items():
        info = packets.get(pid)
        if info is None:
            continue
        for uid, amount, when, _ in shares:
            want_received[(uid, pid)] = (_year(when), amount, int(info[9] == uid))
    want_sent = {}
    for pid, (_, sender, _, ta, tp, ra, rp, _, created, _) in packets.items():
        want_sent[(sender, pid)] = (_year(created), ta, tp, tp - rp, ta - ra, refund_of.get(pid, 0))

    out += _compare("received", want_received, got_received, owners)
    out += _compare("sent", want_sent, got_sent, owners)
    return out


def _compare(
    what: str,
    want: dict[tuple[int, int], tuple[Any, ...]],
    got_rows: list[tuple[Any, ...]],
    owners: Ring | None,
) -> list[str]:
    out: list[str] = []
    rows: list[str] = []
    copies = Counter((r[1], r[2]) for r in got_rows)
    got = {}
    for node, uid, pid, *values in got_rows:
        got[(uid, pid)] = tuple(values)
        if owners is not None and owners.owner_of_key(user_key(uid)).name != node:
            rows.append(f"user {uid}: {what} {pid} is kept on {node}, not on the user's owner")
    for key, count in copies.items():
        if count > 1:
            rows.append(f"user {key[0]}: {what} {key[1]} is in the history {count} times")
    for key in want.keys() | got.keys():
        if want.get(key) != got.get(key):
            rows.append(
                f"user {key[0]}: {what} {key[1]}: history has {got.get(key)}, "
                f"the ledger says {want.get(key)}"
            )
    # per user and year: counts and sums (the amount is column 1 of both shapes)
    totals_want: Counter[tuple[int, int]] = Counter()
    totals_got: Counter[tuple[int, int]] = Counter()
    counts_want: Counter[tuple[int, int]] = Counter()
    counts_got: Counter[tuple[int, int]] = Counter()
    for (uid, _), values in want.items():
        totals_want[(uid, values[0])] += values[1]
        counts_want[(uid, values[0])] += 1
    for _node, uid, _pid, year, amount, *_ in got_rows:
        totals_got[(uid, year)] += amount
        counts_got[(uid, year)] += 1
    for key in counts_want.keys() | counts_got.keys():
        if (counts_want[key], totals_want[key]) != (counts_got[key], totals_got[key]):
            out.append(
                f"user {key[0]} year {key[1]}: {what} history {counts_got[key]} / "
                f"{totals_got[key]} cents, ledgers {counts_want[key]} / {totals_want[key]} cents"
            )
    out += rows[:MAX_LISTED]
    if len(rows) > MAX_LISTED:
        out.append(f"... and {len(rows) - MAX_LISTED} more {what} history differences")
    return out
