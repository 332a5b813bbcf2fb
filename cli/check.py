"""``redpacket check``: the ledger invariants, checked on every shard.

It reads each shard's Redis and MySQL directly (the stores listed in the ring file), with
its own queries, so it does not trust the code it is checking. For every red packet:

1. sum(record amounts) + remaining_amount == total_amount, and
   count(records) + remaining_packet == total_packet;
2. every amount >= 1 cent; no uid has two records for one packet;
3. every open a client saw answered 200 has exactly one record, with that amount
   (tests pass what their clients saw as ``observed``);
4. Redis and MySQL agree (remaining counters, and claims == records) once the reconciler
   has run: disagreements are re-checked for ``settle_s`` before they count;
5. a refunded packet's refund equals its remaining amount, paid once, to its sender.

Plus: a packet lives in exactly one shard's ledger. And the second half
(``cli/check_history.py``): once every outbox is drained, every user's history (我的红包)
equals the ledgers, and 手气最佳 names the right share. And the third (``cli/check_wallet.py``):
wallets, one ``receive`` per share, one ``refund`` per refund, one ``send`` per packet, and
conservation of money across every shard.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from redpacket.cli.check_history import history_violations
from redpacket.cli.check_wallet import wallet_violations
from redpacket.node.counters import connect_redis
from redpacket.node.ledger import connect_one
from redpacket.node.redis_keys import packet_keys
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc


@dataclass(frozen=True, slots=True)
class Observed:
    """An open a client saw answered 200."""

    red_packet_id: int
    uid: int
    amount: int


@dataclass
class Report:
    shards: int = 0
    packets: int = 0
    records: int = 0
    refunds: int = 0
    wallets: int = 0
    money_in: int = 0  # cents topped up and granted, all of which must be accounted for
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.violations)} VIOLATION(S)"
        return (
            f"{verdict}: {self.packets} red packets, {self.records} records, "
            f"{self.refunds} refunds, {self.wallets} wallets holding {self.money_in} cents "
            f"on {self.shards} shard(s)"
        )


@dataclass
class PacketLedger:
    shard: str
    sender: int
    total_amount: int
    total_packet: int
    remaining_amount: int
    remaining_packet: int
    status: str
    records: dict[int, int] = field(default_factory=dict)
    duplicate_uids: set[int] = field(default_factory=set)
    refund: tuple[int, int] | None = None  # (uid, amount)
    refund_rows: int = 0


async def _read_mysql(node: NodeSpec) -> dict[int, PacketLedger]:
    conn = await connect_one(node.mysql or "")
    packets: dict[int, PacketLedger] = {}
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                "SELECT red_packet_id, uid, total_amount, total_packet, remaining_amount, "
                "remaining_packet, status FROM red_packet_info"
            )
            for pid, uid, ta, tp, ra, rp, status in await cur.fetchall():
                packets[pid] = PacketLedger(node.name, uid, ta, tp, ra, rp, status)
            await cur.execute("SELECT red_packet_id, uid, amount FROM red_packet_record")
            orphans = []
            for pid, uid, amount in await cur.fetchall():
                packet = packets.get(pid)
                if packet is None:
                    orphans.append(pid)
                    continue
                if uid in packet.records:
                    packet.duplicate_uids.add(uid)
                packet.records[uid] = amount
            await cur.execute("SELECT red_packet_id, uid, amount FROM red_packet_refund")
            for pid, uid, amount in await cur.fetchall():
                packet = packets.get(pid)
                if packet is None:
                    orphans.append(pid)
                    continue
                packet.refund = (uid, amount)
                packet.refund_rows += 1
    finally:
        conn.close()
    for pid in orphans:
        packets.setdefault(pid, PacketLedger(node.name, 0, -1, -1, -1, -1, "orphan"))
    return packets


def _ledger_violations(pid: int, p: PacketLedger) -> list[str]:
    where = f"[{p.shard}] red packet {pid}"
    if p.status == "orphan":
        return [f"{where}: records or a refund exist but the packet row does not"]
    out = []
    if p.status == "moving":  # node/handoff.py: exported or staged, never settled
        out.append(f"{where}: left in the middle of a handoff (run the rebalance again)")
    spent = sum(p.records.values())
    if spent + p.remaining_amount != p.total_amount:
        out.append(
            f"{where}: records sum {spent} + remaining {p.remaining_amount} "
            f"!= total {p.total_amount}"
        )
    if len(p.records) + p.remaining_packet != p.total_packet:
        out.append(
            f"{where}: {len(p.records)} records + {p.remaining_packet} remaining "
            f"!= {p.total_packet} shares"
        )
    small = [uid for uid, amount in p.records.items() if amount < 1]
    if small:
        out.append(f"{where}: amounts below 1 cent for uids {small}")
    if p.duplicate_uids:
        out.append(f"{where}: uids with two records: {sorted(p.duplicate_uids)}")
    if p.remaining_packet == 0 and p.status not in ("sold_out",):
        out.append(f"{where}: no shares left but status is {p.status!r}")
    if p.status == "sold_out" and p.remaining_packet != 0:
        out.append(f"{where}: status sold_out with {p.remaining_packet} shares left")
    if p.status == "refunded":
        if p.refund is None:
            out.append(f"{where}: status refunded but no refund row")
        elif p.refund != (p.sender, p.remaining_amount):
            out.append(
                f"{where}: refund {p.refund} != (sender {p.sender}, remaining {p.remaining_amount})"
            )
    elif p.refund is not None:
        out.append(f"{where}: a refund row exists but status is {p.status!r}")
    if p.refund_rows > 1:
        out.append(f"{where}: refunded {p.refund_rows} times")
    return out


async def _redis_disagreements(
    client: aioredis.Redis, shard: str, packets: dict[int, PacketLedger], ids: Iterable[int]
) -> dict[int, str]:
    """Packets whose Redis state differs from MySQL's; a packet absent from Redis is fine."""
    ids = list(ids)
    found: dict[int, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        pipe = client.pipeline(transaction=False)
        for pid in chunk:
            info, claims, pending = packet_keys(pid)
            pipe.hmget(info, "remaining_amount", "remaining_packet", "total_amount", "total_packet")
            pipe.hgetall(claims)
            pipe.hlen(pending)
        replies = await pipe.execute()
        for i, pid in enumerate(chunk):
            (ra, rp, ta, tp), claims, pending = replies[3 * i : 3 * i + 3]
            p = packets[pid]
            if ra is None:
                continue
            where = f"[{shard}] red packet {pid}"
            redis_claims = {int(u): int(a) for u, a in claims.items()}
            if pending:
                found[pid] = f"{where}: {pending} claim(s) in Redis not yet committed to MySQL"
            elif (int(ra), int(rp), int(ta), int(tp)) != (
                p.remaining_amount,
                p.remaining_packet,
                p.total_amount,
                p.total_packet,
            ):
                found[pid] = (
                    f"{where}: Redis remaining {ra}/{rp} of {ta}/{tp} but MySQL "
                    f"{p.remaining_amount}/{p.remaining_packet} of "
                    f"{p.total_amount}/{p.total_packet}"
                )
            elif redis_claims != p.records:
                found[pid] = f"{where}: Redis claims differ from MySQL records"
    return found


async def check_shards(
    nodes: Sequence[NodeSpec],
    observed: Iterable[Observed] = (),
    settle_s: float = 10.0,
    owners: Ring | None = None,
    *,
    allow_unfunded: bool = False,
) -> Report:
    """``owners``: the ring that places users' history (checked when given);
    ``allow_unfunded``: packets made before the wallet existed (cli/check_wallet.py)."""
    report = Report(shards=len(nodes))
    missing = [n.name for n in nodes if not (n.redis and n.mysql)]
    if missing:
        report.violations.append(f"ring lists no redis/mysql for {missing}: cannot check them")
        return report
    ledgers = await asyncio.gather(*(_read_mysql(n) for n in nodes))

    # 4 first: disagreements get time to settle (the reconciler may be landing claims), and
    # everything else is then judged on the MySQL state read last.
    deadline = time.monotonic() + settle_s
    for node, packets in zip(nodes, ledgers, strict=True):
        client = connect_redis(node.redis or "", node.redis_cluster, 4)
        try:
            todo = list(packets)
            while True:
                disagree = await _redis_disagreements(client, node.name, packets, todo)
                if not disagree or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.5)
                fresh = await _read_mysql(node)
                packets.update({pid: fresh[pid] for pid in disagree if pid in fresh})
                todo = list(disagree)
            report.violations += list(disagree.values())
        finally:
            await client.aclose()

    where_is: dict[int, list[str]] = {}
    for node, packets in zip(nodes, ledgers, strict=True):
        for pid, packet in packets.items():
            where_is.setdefault(pid, []).append(node.name)
            report.packets += 1
            report.records += len(packet.records)
            report.refunds += packet.refund_rows
            report.violations += _ledger_violations(pid, packet)
    for pid, shards in where_is.items():
        if len(shards) > 1:
            report.violations.append(f"red packet {pid} is in the ledgers of {shards}")

    by_packet = {pid: p for packets in ledgers for pid, p in packets.items()}
    for seen in observed:
        packet = by_packet.get(seen.red_packet_id)
        got = packet.records.get(seen.uid) if packet else None
        if got != seen.amount:
            report.violations.append(
                f"red packet {seen.red_packet_id}: uid {seen.uid} was answered 200 with "
                f"{seen.amount} cents but the ledger has {got}"
            )
    report.violations += await history_violations(nodes, owners, wait_s=max(settle_s, 5.0))
    # after the outboxes drained (above)
    wallet, totals = await wallet_violations(nodes, allow_unfunded=allow_unfunded)
    report.violations += wallet
    report.wallets, report.money_in = totals["wallets"], totals["money_in"]
    return report


def run_check(args: argparse.Namespace) -> int:
    from redpacket.cli.devcluster import load_state

    ring_path = args.ring or load_state(args.var, args.cluster)["ring_file"]
    doc = RingDoc.load(Path(ring_path))
    nodes = doc.all_nodes()  # every ring version's, and the previous ring's during a change
    print(f"checking {len(nodes)} shard(s) from {ring_path} ...", flush=True)
    owners = doc.ring() if doc.previous is None else None
    report = asyncio.run(
        check_shards(
            nodes,
            settle_s=args.reconcile_wait,
            owners=owners,
            allow_unfunded=args.allow_unfunded,
        )
    )
    for violation in report.violations:
        print(f"  VIOLATION {violation}")
    print(report.summary())
    return 0 if report.ok else 1
