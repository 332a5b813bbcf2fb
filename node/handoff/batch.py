"""Handing off many red packets at once: the per-packet steps of ``packets.py``, batched.

A rebalance that moves a million packets cannot afford a request and a handful of queries
per packet per step (about 140 packets/s). Each step here takes a batch of ids between the
same two nodes and does, for the whole batch: one ``SELECT ... WHERE red_packet_id IN (...)``
to learn what is held, one MySQL transaction to change it, and Redis calls issued together.

The invariants are those of the single steps, per packet (docs/rebalancing.md):

- ``export``: every packet is frozen in Redis first, its opens in flight and pending claims
  committed, then the batch's MySQL copies become inert in one transaction;
- ``import`` stages inert copies in one transaction; ``activate`` restores them in one
  transaction (the commit point of the whole batch), then loads Redis;
- ``finish``: tombstones first (one transaction), then Redis copies dropped, then MySQL copies
  deleted (one transaction).

Packets not in the plain state a step expects (a tombstone, a copy left half way by an earlier
run) go through the single step instead, which knows every state; so a batch killed anywhere
is finished or undone by running it again, exactly like single handoffs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from redpacket.core.errors import ApiError
from redpacket.core.errors import unavailable as unavailable_error
from redpacket.node.handoff.fence import HandoffConflict
from redpacket.node.handoff.packets import (
    Held,
    PacketMoves,
    _packet_json,
    parse_export,
)
from redpacket.node.ledger import (
    PACKET_COLUMNS,
    PACKET_PLACEHOLDERS,
    PacketRow,
    packet_from_row,
    packet_values,
    retry_lock_conflicts,
    to_datetime,
    to_ms,
)
from redpacket.node.packet import PACKET_SELECT
from redpacket.node.redis_keys import packet_keys
from redpacket.node.shard import MOVING, now_ms

log = logging.getLogger("redpacket.node.handoff")

MAX_BATCH = 1000  # ids per call: one IN list, one transaction

# every value a parameter, so that executemany sends one multi-row INSERT (a literal in the
# VALUES list makes the driver send one statement per row)
_HANDOFF_SQL = (
    "INSERT INTO red_packet_handoff (red_packet_id, direction, peer, prior_status, "
    "ring_version, create_time) VALUES (%s, %s, %s, %s, %s, %s)"
)


def _in(ids: Sequence[int]) -> str:
    return ", ".join(["%s"] * len(ids))


def _failure(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        return {"state": "failed", "status": exc.status, "code": exc.code, "message": str(exc)}
    return {"state": "failed", "status": 503, "code": "unavailable", "message": repr(exc)[:200]}


class PacketBatches:
    """The batched handoff steps of one node; each answers ``{id: result}``."""

    def __init__(self, moves: PacketMoves) -> None:
        self.moves = moves
        self.fence = moves.fence
        self.shard = moves.shard
        self.name = moves.name

    @contextlib.asynccontextmanager
    async def _locked(self, ids: Iterable[int]) -> AsyncIterator[None]:
        """Every packet's lock, taken in id order (so two batches cannot deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for packet_id in sorted(set(ids)):
                await stack.enter_async_context(self.shard.packet_lock(packet_id))
            yield

    async def _held(self, ids: Sequence[int]) -> dict[int, Held]:
        async with self.shard.ledger.read() as cur:
            await cur.execute(
                "SELECT i.red_packet_id, i.status, i.create_token, h.direction, h.peer, "
                "h.prior_status FROM red_packet_info i LEFT JOIN red_packet_handoff h "
                f"ON h.red_packet_id = i.red_packet_id WHERE i.red_packet_id IN ({_in(ids)})",
                tuple(ids),
            )
            rows = await cur.fetchall()
        return {int(row[0]): Held(*row[1:]) for row in rows}

    async def _singly(self, ids: Iterable[int], step: Any, *args: Any) -> dict[int, dict[str, Any]]:
        """The single step for packets in a state the batch does not handle."""

        async def one(packet_id: int) -> dict[str, Any]:
            try:
                result = await step(packet_id, *args)
            except Exception as exc:  # reported per packet; the orchestrator retries
                return _failure(exc)
            return result if isinstance(result, dict) else {"state": result}

        ids = list(ids)
        results = await asyncio.gather(*(one(i) for i in ids))
        return dict(zip(ids, results, strict=True))

    # -- export (old owner) ---------------------------------------------------------------

    async def export(self, ids: Sequence[int], to: str, ring_version: int) -> dict[int, Any]:
        self.fence.current(ring_version)
        held = await self._held(ids)
        plain = [i for i in ids if i in held and held[i].direction is None]
        plain = [i for i in plain if held[i].status != MOVING]
        rest = [i for i in ids if i not in set(plain)]
        results = await self._singly(rest, self.moves.export, to, ring_version)
        if not plain:
            return results
        async with self._locked(plain):
            ready, failed = await self._quiesce(plain)
            results.update(failed)
            if ready:
                results.update(await self._export_ready(ready, to, ring_version))
        return results

    async def _quiesce(self, ids: list[int]) -> tuple[list[int], dict[int, Any]]:
        """Freeze every packet, wait for its opens in flight, commit the claims it owes and
        check that MySQL holds every claim Redis does (one pipeline, one query for the
        batch). A packet that cannot be made consistent is unfrozen and reported."""
        shard, counters = self.shard, self.shard.counters
        await counters.freeze_many(ids, True)
        await asyncio.gather(*(shard.quiesce(i) for i in ids))
        owed, in_redis = await counters.pending_many(ids)
        failed: dict[int, BaseException] = {}
        claims = [claim for packet in owed.values() for claim in packet]
        outcomes = await asyncio.gather(
            *(shard.committer.submit(c) for c in claims), return_exceptions=True
        )
        for claim, outcome in zip(claims, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failed[claim.red_packet_id] = unavailable_error(
                    "could not commit the packet's pending claims; retry"
                )
        checked = [i for i in in_redis if i not in failed]
        in_mysql = await self._committed(checked) if checked else {}
        for packet_id in checked:
            mysql = in_mysql.get(packet_id, {})
            if any(mysql.get(uid) != amount for uid, amount in in_redis[packet_id].items()):
                asyncio.get_running_loop().create_task(shard.resync(packet_id))
                failed[packet_id] = unavailable_error("Redis holds claims MySQL does not; retry")
        if failed:
            await counters.freeze_many(failed, False)
        ready = [i for i in ids if i not in failed]
        return ready, {i: _failure(exc) for i, exc in failed.items()}

    async def _committed(self, ids: list[int]) -> dict[int, dict[int, int]]:
        """The claims MySQL holds for each packet (``{packet: {uid: amount}}``)."""
        async with self.shard.ledger.read() as cur:
            await cur.execute(
                "SELECT red_packet_id, uid, amount FROM red_packet_record "
                f"WHERE red_packet_id IN ({_in(ids)})",
                tuple(ids),
            )
            rows = await cur.fetchall()
        found: dict[int, dict[int, int]] = {}
        for packet_id, uid, amount in rows:
            found.setdefault(int(packet_id), {})[int(uid)] = int(amount)
        return found

    async def _export_ready(
        self, ids: list[int], to: str, ring_version: int
    ) -> dict[int, dict[str, Any]]:
        packets, records, refunds = await self._mark_moving(ids, to, ring_version)
        states = await self._redis_states(ids)
        results: dict[int, dict[str, Any]] = {}
        for packet_id in ids:
            if packet_id not in packets:
                results[packet_id] = {"state": "absent"}
                continue
            results[packet_id] = {
                "state": "exported",
                "from": self.name,
                "packet": _packet_json(packets[packet_id]),
                "records": records.get(packet_id, []),
                "refund": refunds.get(packet_id),
                "redis": states[packet_id],
            }
        return results

    @retry_lock_conflicts
    async def _mark_moving(
        self, ids: list[int], to: str, ring_version: int
    ) -> tuple[dict[int, PacketRow], dict[int, list[list[Any]]], dict[int, list[Any]]]:
        """One transaction: the batch's MySQL copies made inert, and read."""
        async with self.shard.ledger.transaction() as cur:
            await cur.execute(
                f"SELECT {PACKET_SELECT} FROM red_packet_info "
                f"WHERE red_packet_id IN ({_in(ids)}) AND status <> %s FOR UPDATE",
                (*ids, MOVING),
            )
            packets = {p.red_packet_id: p for p in map(packet_from_row, await cur.fetchall())}
            found = sorted(packets)
            if found:
                created = to_datetime(now_ms())
                await cur.executemany(_HANDOFF_SQL, [
                    (i, "out", to, packets[i].status, ring_version, created) for i in found
                ])  # fmt: skip
                await cur.execute(
                    f"UPDATE red_packet_info SET status = %s WHERE red_packet_id IN ({_in(found)})",
                    (MOVING, *found),
                )
                records, refunds = await _read_rows(cur, found)
            else:
                records, refunds = {}, {}
        return packets, records, refunds

    async def _redis_states(self, ids: list[int]) -> dict[int, dict[str, Any] | None]:
        pipe = self.shard.counters.client.pipeline(transaction=False)
        for packet_id in ids:
            info, claims, _ = packet_keys(packet_id)
            pipe.hmget(info, "remaining_amount", "remaining_packet", "state")
            pipe.hlen(claims)
        answers = await pipe.execute()
        states: dict[int, dict[str, Any] | None] = {}
        for n, packet_id in enumerate(ids):
            (amount, count, state), claims = answers[2 * n], answers[2 * n + 1]
            states[packet_id] = (
                None
                if amount is None
                else {
                    "remaining_amount": int(amount),
                    "remaining_packet": int(count),
                    "state": state,
                    "claims": int(claims),
                }
            )
        return states

    # -- import and activate (new owner) ----------------------------------------------------

    async def import_(
        self, exports: Sequence[dict[str, Any]], peer: str, ring_version: int
    ) -> dict[int, Any]:
        """Stage every exported packet, inert, in one transaction (``parse_export`` has
        checked that each adds up)."""
        self.fence.current(ring_version)
        parsed = {p.red_packet_id: (p, r, f) for p, r, f in map(parse_export, exports)}
        ids = list(parsed)
        held = await self._held(ids)
        plain = [i for i in ids if i not in held]
        rest = [i for i in ids if i in held]
        results = await self._singly(
            rest, lambda i: self.moves.import_(_payload(exports, i), peer, ring_version)
        )
        if plain:
            async with self._locked(plain):
                staged = await self._stage([parsed[i] for i in plain], peer, ring_version)
            results.update({i: {"state": "staged"} for i in staged})
            # raced with another copy arriving: the single step sorts it out
            late = [i for i in plain if i not in staged]
            results.update(
                await self._singly(
                    late, lambda i: self.moves.import_(_payload(exports, i), peer, ring_version)
                )
            )
        return results

    @retry_lock_conflicts
    async def _stage(
        self,
        batch: list[tuple[PacketRow, list[tuple[int, int, str, str, int]], Any]],
        peer: str,
        ring_version: int,
    ) -> list[int]:
        ids = [p.red_packet_id for p, _, _ in batch]
        created = to_datetime(now_ms())
        async with self.shard.ledger.transaction() as cur:
            await cur.execute(
                "SELECT red_packet_id FROM red_packet_info "
                f"WHERE red_packet_id IN ({_in(ids)}) FOR UPDATE",
                tuple(ids),
            )
            taken = {int(r[0]) for r in await cur.fetchall()}
            batch = [b for b in batch if b[0].red_packet_id not in taken]
            if batch:
                await _insert_staged(cur, batch, peer, ring_version, created)
        return [p.red_packet_id for p, _, _ in batch]

    async def activate(self, ids: Sequence[int]) -> dict[int, Any]:
        held = await self._held(ids)
        plain = [i for i in ids if i in held and held[i].direction == "in"]
        plain = [i for i in plain if held[i].status == MOVING]
        rest = [i for i in ids if i not in set(plain)]
        results = await self._singly(rest, self.moves.activate)
        if plain:
            async with self._locked(plain):
                flipped = await self._restore(plain)
                results.update(await self._load_redis(flipped))
            late = [i for i in plain if i not in set(flipped)]
            results.update(await self._singly(late, self.moves.activate))
        return results

    @retry_lock_conflicts
    async def _restore(self, ids: list[int]) -> list[int]:
        """One transaction, the batch's commit point: staged copies become the packets."""
        async with self.shard.ledger.transaction() as cur:
            await cur.execute(
                "SELECT red_packet_id FROM red_packet_handoff "
                f"WHERE red_packet_id IN ({_in(ids)}) AND direction = 'in' FOR UPDATE",
                tuple(ids),
            )
            found = sorted(int(r[0]) for r in await cur.fetchall())
            if found:
                marks = _in(found)
                await cur.execute(
                    "UPDATE red_packet_info i JOIN red_packet_handoff h "
                    "ON h.red_packet_id = i.red_packet_id SET i.status = h.prior_status "
                    f"WHERE i.red_packet_id IN ({marks}) AND i.status = %s",
                    (*found, MOVING),
                )
                for table in ("red_packet_handoff", "red_packet_tombstone"):
                    await cur.execute(
                        f"DELETE FROM {table} WHERE red_packet_id IN ({marks})", tuple(found)
                    )
        return found

    async def _load_redis(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Load the activated packets into Redis as MySQL has them (a failure is repaired on
        first use, as in the single step)."""
        shard = self.shard
        packets, claims = await self._rows_for_load(ids)
        try:
            await shard.counters.load_many(
                [(p, claims.get(p.red_packet_id, {})) for p in packets],
                replace=True,
                drop_after_s=shard.settings.redis_retention_s,
            )
        except Exception:  # Redis missing a packet is repaired on its first use
            log.warning("Redis load of %d activated packet(s) failed", len(packets))
        for packet in packets:
            shard.admission.forget(packet.red_packet_id)
        return {i: {"state": "active"} for i in ids}

    async def _rows_for_load(
        self, ids: list[int]
    ) -> tuple[list[PacketRow], dict[int, dict[int, int]]]:
        async with self.shard.ledger.read() as cur:
            await cur.execute(
                f"SELECT {PACKET_SELECT} FROM red_packet_info WHERE red_packet_id IN ({_in(ids)})",
                tuple(ids),
            )
            packets = [packet_from_row(r) for r in await cur.fetchall()]
        return packets, await self._committed(ids)

    # -- finish (old owner) ---------------------------------------------------------------

    async def finish(
        self, ids: Sequence[int], owner: str, owner_url: str, ring_version: int
    ) -> dict[int, Any]:
        """Tombstones first (one transaction), then the Redis copies, then the MySQL copies."""
        self.fence.current(ring_version)
        held = await self._held(ids)
        plain = [i for i in ids if i in held and held[i].direction == "out"]
        plain = [i for i in plain if held[i].status == MOVING]
        rest = [i for i in ids if i not in set(plain)]
        results = await self._singly(rest, self.moves.finish, owner, owner_url, ring_version)
        if not plain:
            return results
        async with self._locked(plain):
            await self._tombstones(plain, owner, owner_url, ring_version)
            self.fence.has_tombstones = True
            dropped = await self.shard.counters.run_many(
                self.moves.drop_script, [(list(packet_keys(i)), []) for i in plain]
            )
            if any(int(d) < 0 for d in dropped):  # tombstoned already; finished singly next
                raise HandoffConflict("a Redis copy is live (not frozen): refusing to drop it")
            await self._delete_copies(plain)
            for packet_id in plain:
                self.shard.admission.forget(packet_id)
        results.update({i: {"state": "moved"} for i in plain})
        return results

    @retry_lock_conflicts
    async def _tombstones(
        self, ids: list[int], owner: str, owner_url: str, ring_version: int
    ) -> None:
        created = to_datetime(now_ms())
        async with self.shard.ledger.transaction() as cur:
            await cur.executemany(
                "INSERT INTO red_packet_tombstone "
                "(red_packet_id, owner, owner_url, ring_version, create_time) "
                "VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE owner = VALUES(owner), "
                "owner_url = VALUES(owner_url), ring_version = VALUES(ring_version)",
                [(i, owner, owner_url, ring_version, created) for i in ids],
            )

    @retry_lock_conflicts
    async def _delete_copies(self, ids: list[int]) -> None:
        async with self.shard.ledger.transaction() as cur:
            for table in (
                "red_packet_record",
                "red_packet_refund",
                "red_packet_info",
                "red_packet_handoff",
            ):
                await cur.execute(
                    f"DELETE FROM {table} WHERE red_packet_id IN ({_in(ids)})", tuple(ids)
                )


async def _read_rows(
    cur: Any, ids: list[int]
) -> tuple[dict[int, list[list[Any]]], dict[int, list[Any]]]:
    """The records and refunds of a batch, in the export's format."""
    records: dict[int, list[list[Any]]] = {}
    await cur.execute(
        "SELECT red_packet_id, uid, amount, nick_name, img_url, create_time "
        f"FROM red_packet_record WHERE red_packet_id IN ({_in(ids)}) ORDER BY id",
        tuple(ids),
    )
    for pid, uid, amount, nick, img, when in await cur.fetchall():
        records.setdefault(int(pid), []).append([str(uid), amount, nick, img, to_ms(when)])
    await cur.execute(
        "SELECT red_packet_id, uid, amount, create_time FROM red_packet_refund "
        f"WHERE red_packet_id IN ({_in(ids)})",
        tuple(ids),
    )
    refunds = {
        int(pid): [str(uid), amount, to_ms(when)] for pid, uid, amount, when in await cur.fetchall()
    }
    return records, refunds


async def _insert_staged(
    cur: Any,
    batch: list[tuple[PacketRow, list[tuple[int, int, str, str, int]], Any]],
    peer: str,
    ring_version: int,
    created: Any,
) -> None:
    await cur.executemany(
        f"INSERT INTO red_packet_info ({PACKET_COLUMNS}) VALUES ({PACKET_PLACEHOLDERS})",
        [packet_values(p, MOVING) for p, _, _ in batch],
    )
    records = [
        (p.red_packet_id, u, a, n, i, to_datetime(ms))
        for p, rows, _ in batch
        for u, a, n, i, ms in rows
    ]
    if records:
        await cur.executemany(
            "INSERT INTO red_packet_record "
            "(red_packet_id, uid, amount, nick_name, img_url, create_time) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            records,
        )
    refunds = [
        (p.red_packet_id, f[0], f[1], to_datetime(f[2])) for p, _, f in batch if f is not None
    ]
    if refunds:
        await cur.executemany(
            "INSERT INTO red_packet_refund (red_packet_id, uid, amount, create_time) "
            "VALUES (%s, %s, %s, %s)",
            refunds,
        )
    await cur.executemany(_HANDOFF_SQL, [
        (p.red_packet_id, "in", peer, p.status, ring_version, created) for p, _, _ in batch
    ])  # fmt: skip


def _payload(exports: Sequence[dict[str, Any]], packet_id: int) -> dict[str, Any]:
    for export in exports:
        if int(export["packet"]["red_packet_id"]) == packet_id:
            return export
    raise KeyError(packet_id)
