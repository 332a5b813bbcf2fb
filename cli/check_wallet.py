"""The third part of ``redpacket check``: the wallets (零钱) and conservation of money.

Run once every outbox is drained (the history part waits for that), on the ledgers of every
shard, with its own queries:

1. per user, the balance equals the sum of the user's transactions (and the last
   ``balance_after``), and is never negative;
2. every record (share) has exactly one ``receive``, of its amount, to its winner; no
   ``receive`` without a record;
3. every expiry refund has exactly one ``refund``, of its amount, to the sender;
4. every packet has exactly one ``send``, of minus its total, by its sender, whose hold was not
   released; every released hold has exactly one release (a ``refund`` with ref
   ``release:<token>``) and no packet;
5. conservation: Σ top-ups + Σ grants = Σ balances + Σ remaining of packets not refunded
   + Σ open holds whose packet does not exist (yet, or ever: the sweeper settles them).
   An open hold whose packet exists is in the packet's remaining already: the ``send`` is
   written with the hold (docs/architecture.md "Money flow").
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from redpacket.cli.check_history import _rows
from redpacket.sharding.ring import NodeSpec

MAX_LISTED = 20
RELEASE = "release:"


async def wallet_violations(
    nodes: Sequence[NodeSpec], *, allow_unfunded: bool = False
) -> tuple[list[str], dict[str, int]]:
    """The violations, and totals for the report (cents).

    ``allow_unfunded``: packets with neither a ``send`` nor a hold anywhere were made by code
    older than the wallet (release 0.1.0, during a rolling upgrade): they, and the credits of
    their shares and refunds, are money from outside the wallets, left out of every check
    instead of reported. Only the upgrade test asks for it."""
    txns, wallets, holds, packets, records, refunds = [], [], [], {}, [], []
    for node in nodes:
        txns += await _rows(
            node, "SELECT uid, kind, ref, amount, red_packet_id, balance_after, id FROM wallet_txn"
        )
        wallets += await _rows(node, "SELECT uid, balance FROM wallet")
        holds += await _rows(
            node, "SELECT create_token, uid, amount, red_packet_id, state FROM wallet_hold"
        )
        for pid, uid, total, remaining, status in await _rows(
            node,
            "SELECT red_packet_id, uid, total_amount, remaining_amount, status "
            "FROM red_packet_info",
        ):
            packets[pid] = (uid, total, remaining, status)  # a packet mid-move: one copy
        records += await _rows(node, "SELECT red_packet_id, uid, amount FROM red_packet_record")
        refunds += await _rows(node, "SELECT red_packet_id, uid, amount FROM red_packet_refund")
    out: list[str] = []
    rows: list[str] = []
    rows += _balances(txns, wallets)
    unfunded = _unfunded(txns, holds, packets) if allow_unfunded else {}
    if unfunded:  # neither their money nor their credits are the wallet's business
        packets = {p: v for p, v in packets.items() if p not in unfunded}
        records = [r for r in records if r[0] not in unfunded]
        refunds = [r for r in refunds if r[0] not in unfunded]
        outside = [t for t in txns if t[1] in ("receive", "refund") and t[4] in unfunded
                   and not str(t[2]).startswith(RELEASE)]  # fmt: skip
        leave_out = set(outside)
        txns = [t for t in txns if t not in leave_out]
    by_ref: dict[tuple[int, str, str], list[int]] = defaultdict(list)
    for uid, kind, ref, amount, *_ in txns:
        by_ref[(int(uid), str(kind), str(ref))].append(int(amount))
    rows += _credits(by_ref, {(p, u): a for p, u, a in records}, "receive", "record")
    rows += _credits(by_ref, {(p, u): a for p, u, a in refunds}, "refund", "expiry refund")
    rows += _sends(txns, holds, packets)

    kinds: Counter[str] = Counter()
    for _, kind, _, amount, *_ in txns:
        kinds[str(kind)] += int(amount)
    remaining = sum(int(p[2]) for p in packets.values() if p[3] != "refunded")
    orphaned = sum(int(h[2]) for h in holds if h[4] == "held" and int(h[3]) not in packets)
    money_in = kinds["topup"] + kinds["grant"]
    held = sum(int(b) for _, b in wallets) + remaining + orphaned
    held -= sum(int(t[3]) for t in outside) if unfunded else 0  # credited from outside money
    if money_in != held:
        out.append(
            f"conservation: top-ups + grants = {money_in} cents, but balances + packets' "
            f"remaining + orphan holds = {held} cents (difference {held - money_in})"
        )
    out += rows[:MAX_LISTED]
    if len(rows) > MAX_LISTED:
        out.append(f"... and {len(rows) - MAX_LISTED} more wallet differences")
    return out, {"wallets": len(wallets), "money_in": money_in}


def _balances(txns: list[tuple[Any, ...]], wallets: list[tuple[Any, ...]]) -> list[str]:
    out = []
    total: Counter[int] = Counter()
    last: dict[int, tuple[int, int]] = {}
    for uid, _, _, amount, _, after, tid in txns:
        total[int(uid)] += int(amount)
        if int(uid) not in last or int(tid) > last[int(uid)][0]:
            last[int(uid)] = (int(tid), int(after))
    copies = Counter(int(u) for u, _ in wallets)
    for raw_uid, balance in wallets:
        uid = int(raw_uid)
        if copies[uid] > 1:
            out.append(f"user {uid}: the wallet is on {copies[uid]} shards")
        if int(balance) < 0 or int(balance) != total[uid]:
            out.append(f"user {uid}: balance {balance}, the transactions sum to {total[uid]}")
        if uid in last and last[uid][1] != int(balance):
            out.append(f"user {uid}: balance {balance}, the last balance_after is {last[uid][1]}")
    return out


def _credits(
    by_ref: dict[tuple[int, str, str], list[int]],
    want: dict[tuple[int, int], int],
    kind: str,
    what: str,
) -> list[str]:
    out = []
    for (pid, uid), amount in want.items():
        got = by_ref.get((int(uid), kind, str(pid)), [])
        if got != [int(amount)]:
            out.append(f"{what} {pid}/{uid} of {amount} cents has {kind} transactions {got}")
    for (uid, k, ref), got in by_ref.items():
        if k == kind and not ref.startswith(RELEASE) and (int(ref), uid) not in want:
            out.append(f"user {uid}: {kind} {got} for {ref} without a matching {what}")
    return out


def _unfunded(
    txns: list[tuple[Any, ...]], holds: list[tuple[Any, ...]], packets: dict[int, tuple[Any, ...]]
) -> dict[int, tuple[Any, ...]]:
    paid = {int(t[4]) for t in txns if t[1] == "send"} | {int(h[3]) for h in holds}
    return {pid: p for pid, p in packets.items() if pid not in paid}


def _sends(
    txns: list[tuple[Any, ...]], holds: list[tuple[Any, ...]], packets: dict[int, tuple[Any, ...]]
) -> list[str]:
    out = []
    hold_of = {str(h[0]): h for h in holds}
    sends: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    releases: Counter[str] = Counter()
    for uid, kind, ref, amount, pid, _, _ in txns:
        if kind == "send":
            sends[int(pid)].append((int(uid), int(amount), str(ref)))
        elif kind == "refund" and str(ref).startswith(RELEASE):
            releases[str(ref)[len(RELEASE) :]] += 1
    for pid, (sender, total, _, _) in packets.items():
        got = sends.get(pid, [])
        if [(u, a) for u, a, _ in got] != [(int(sender), -int(total))]:
            out.append(f"red packet {pid} of {total} cents by {sender} has sends {got}")
        elif (hold := hold_of.get(got[0][2])) is not None and hold[4] == "released":
            out.append(f"red packet {pid} exists but its hold was released (paid back)")
    for token, uid, amount, pid, state in holds:
        if state == "released" and (releases[str(token)] != 1 or int(pid) in packets):
            out.append(f"hold {token} of user {uid} ({amount} cents) released badly")
        elif state != "released" and releases[str(token)]:
            out.append(f"hold {token} of user {uid} is {state} but was paid back")
    return out
