"""The MySQL ledger of one shard: the record of who got what.

Redis decides shares; this module makes them permanent. Every write is one transaction and
every retry is idempotent (``UNIQUE(red_packet_id, uid)``), so the group committer and the
reconciler can both try the same claim and it still lands exactly once.
All SQL here is parameterised; no value is ever formatted into a statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncmy

from redpacket.node import outbox
from redpacket.node.ledger_errors import (
    INTEGRITY_ERRORS,
    CreateAbandoned,
    GuardFailed,
    IdCollision,
    LedgerError,
    LedgerRefused,
    LedgerUnavailable,
    LockConflict,
    ValueRefused,
    is_duplicate,
    ledger_error,
    retry_lock_conflicts,
)
from redpacket.node.mysql import (
    MysqlTarget,
    connect_one,
    create_pool,
    ensure_database,
    parse_mysql_url,
)
from redpacket.node.packet import (
    MS_TO_TIME,
    PACKET_COLUMNS,
    PACKET_PLACEHOLDERS,
    PACKET_WIDTH,
    Claim,
    PacketRow,
    RecordRow,
    many_rows,
    packet_from_row,
    packet_select,
    packet_values,
    time_to_ms,
    to_datetime,
    to_ms,
)

# The ledger's API. The packet's types and the time conversions are defined in
# node/packet.py (which both this module and node/outbox.py import), the errors in
# node/ledger_errors.py and the connections in node/mysql.py; all are offered here too.
__all__ = [
    "PACKET_COLUMNS",
    "PACKET_PLACEHOLDERS",
    "Claim",
    "CreateAbandoned",
    "GuardFailed",
    "IdCollision",
    "Ledger",
    "LedgerError",
    "LedgerRefused",
    "LedgerUnavailable",
    "LockConflict",
    "MysqlTarget",
    "PacketRow",
    "RecordRow",
    "ValueRefused",
    "connect_one",
    "ensure_database",
    "ledger_error",
    "packet_from_row",
    "packet_values",
    "parse_mysql_url",
    "retry_lock_conflicts",
    "to_datetime",
    "to_ms",
]


_PACKET_AND_BEST = (
    f"{packet_select('i')}, r.nick_name, r.img_url, r.amount, {time_to_ms('r.create_time')}"
)
_INSERT_RECORDS = (
    "INSERT INTO red_packet_record (red_packet_id, uid, amount, nick_name, img_url, create_time) "
    "VALUES "
)
_RECORD_ROW = f"(%s, %s, %s, %s, %s, {MS_TO_TIME})"


def _record_values(claim: Claim) -> tuple[int, int, int, str, str, int]:
    return (
        claim.red_packet_id,
        claim.uid,
        claim.amount,
        claim.nick_name,
        claim.img_url,
        claim.claimed_at_ms,
    )


class Ledger:
    def __init__(self, pool: asyncmy.Pool, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    @classmethod
    async def connect(cls, url: str, pool_size: int = 8, timeout_s: float = 5.0) -> Ledger:
        target = parse_mysql_url(url)
        try:
            pool = await create_pool(target, pool_size, timeout_s)
        except Exception as exc:
            if (mapped := ledger_error(exc)) is None:
                raise
            raise mapped from exc
        return cls(pool, timeout_s)

    async def close(self) -> None:
        self._pool.close()
        await self._pool.wait_closed()

    @contextlib.asynccontextmanager
    async def connection(self, timeout_s: float | None = None) -> AsyncIterator[asyncmy.Connection]:
        """A pooled connection; any failure closes it. The driver's errors leave as the
        ledger's (:func:`ledger_error`): inside the block a method may still look at them
        (a duplicate key), its callers never do. ``timeout_s`` (default: the ledger's) bounds
        the acquire and, again, the use."""
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                conn = await self._pool.acquire()
        except Exception as exc:
            # Nothing of ours runs in an acquire: whatever fails there is the server or the
            # way to it. asyncmy even raises a bare RuntimeError ("Transport does not expose
            # socket instance") for a connection cut while it opens (chaos: a MySQL cut); left
            # unmapped it was a 500, and the relay buried money events as refused.
            raise ledger_error(exc) or LedgerUnavailable(f"{type(exc).__name__}: {exc}") from exc
        try:
            async with asyncio.timeout(timeout_s):
                yield conn
        except BaseException as exc:
            conn.close()
            if isinstance(exc, Exception) and (mapped := ledger_error(exc)) is not None:
                raise mapped from exc
            raise
        finally:
            self._pool.release(conn)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncmy.cursors.Cursor]:
        """A cursor in one transaction: committed when the block ends, rolled back when an
        exception leaves it. Every write of a node goes through here, so none can forget its
        commit (the pool would close the connection and MySQL drop the write, silently). The
        rollback's own failure is swallowed: the connection is closed next anyway
        (:meth:`connection`), and the block's error is the one that says what happened; it
        leaves, like every driver error, as the ledger's.

        A block that finds it must not write after all (a duplicate, a claim committed
        before) undoes what it did with ``await cur.connection.rollback()`` and returns; the
        commit at the end then commits nothing. An error the block means to survive (a
        duplicate key) is caught inside it: one that leaves closes the connection."""
        async with self.connection() as conn, conn.cursor() as cur:
            try:
                yield cur
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[asyncmy.cursors.Cursor]:
        """A cursor for reads; the block ends with a rollback. The pool's connections do not
        autocommit, so the first SELECT opens a transaction (and its snapshot), and asyncmy's
        pool closes a connection handed back inside one: without the rollback every read
        would cost a new connection. On an exception the connection is closed anyway
        (:meth:`connection`)."""
        async with self.connection() as conn, conn.cursor() as cur:
            yield cur
            await conn.rollback()

    async def ping(self) -> None:
        async with self.read() as cur:
            await cur.execute("SELECT 1")

    # -- packets ------------------------------------------------------------------------

    @retry_lock_conflicts
    async def insert_packet(self, row: PacketRow) -> tuple[PacketRow, bool]:
        """Insert a packet: ``(row, created)``; a retry with the same token gets the first row."""
        from redpacket.node.wallet.abandon import refuse_abandoned  # imports this module

        async with self.transaction() as cur:
            try:
                await refuse_abandoned(cur, row.red_packet_id)  # raises CreateAbandoned
                await cur.execute(
                    f"INSERT INTO red_packet_info ({PACKET_COLUMNS}) "
                    f"VALUES ({PACKET_PLACEHOLDERS})",
                    packet_values(row),
                )
                await outbox.write(cur, [outbox.sent(row)])
                return row, True  # committed as the block ends
            except INTEGRITY_ERRORS as exc:  # caught inside: an error that leaves closes the
                if not is_duplicate(exc):  # connection, and a retried create is no failure
                    raise
                await cur.connection.rollback()
        existing = await self.get_packet(row.red_packet_id)
        if existing is None or existing.create_token != row.create_token:
            raise IdCollision(row.red_packet_id)
        return existing, False

    async def get_packet(self, packet_id: int) -> PacketRow | None:
        """The packet, with its 手气最佳 record once decided (one query, a join on the key)."""
        async with self.read() as cur:
            await cur.execute(
                f"SELECT {_PACKET_AND_BEST} FROM red_packet_info i LEFT JOIN red_packet_record r "
                "ON r.red_packet_id = i.red_packet_id AND r.uid = i.luckiest_uid "
                "WHERE i.red_packet_id = %s",
                (packet_id,),
            )
            row = await cur.fetchone()
        if not row:
            return None
        packet = packet_from_row(row[:PACKET_WIDTH])
        nick, img, amount, taken_ms = row[PACKET_WIDTH:]
        if packet.luckiest_uid is not None and amount is not None:
            best = RecordRow(packet.luckiest_uid, nick, img, amount, taken_ms, True)
            packet = dataclasses.replace(packet, luckiest=best)
        return packet

    async def committed_claims(self, packet_id: int) -> dict[int, int]:
        async with self.read() as cur:
            await cur.execute(
                "SELECT uid, amount FROM red_packet_record WHERE red_packet_id = %s",
                (packet_id,),
            )
            rows = await cur.fetchall()
        return {uid: amount for uid, amount in rows}

    # -- claims -------------------------------------------------------------------------

    async def commit_batch(self, claims: list[Claim]) -> None:
        """Commit many claims in one transaction: one guarded update for all packets (which also
        marks the ones it sells out), one insert of records, one read of the packets' state and
        one insert into the outbox; a batch that sells a lucky packet out also names its
        手气最佳 (node/outbox.py). Every statement runs while the packets' rows are locked, so
        each one added is paid by every batch waiting for a hot packet.

        Raises GuardFailed or a duplicate-key IntegrityError when any claim cannot go in as a
        new share; the caller then falls back to :meth:`commit_one` per claim, which sorts
        the already-committed from the impossible.
        """
        per_packet: dict[int, list[int]] = {}
        for claim in claims:
            per_packet.setdefault(claim.red_packet_id, []).append(claim.amount)
        packet_ids = sorted(per_packet)
        # One statement for every packet of the batch. FORCE INDEX keeps the row locks to
        # exactly these packets (in id order): left to itself the optimizer may walk the
        # status index and lock every active packet of the shard.
        case = "(CASE red_packet_id " + " ".join(["WHEN %s THEN %s"] * len(packet_ids)) + " END)"
        args_n = [v for pid in packet_ids for v in (pid, len(per_packet[pid]))]
        args_s = [v for pid in packet_ids for v in (pid, sum(per_packet[pid]))]
        in_list = ", ".join(["%s"] * len(packet_ids))
        # The packets this batch sells out are marked in the same statement: ``status`` is
        # assigned first, so it reads remaining_packet before the decrement whether the server
        # assigns left to right (MySQL, MariaDB) or all at once (SIMULTANEOUS_ASSIGNMENT).
        update_sql = (
            "UPDATE red_packet_info FORCE INDEX (uk_red_packet_id) "
            f"SET status = IF(remaining_packet = {case}, 'sold_out', status), "
            f"    remaining_amount = remaining_amount - {case}, "
            f"    remaining_packet = remaining_packet - {case} "
            f"WHERE red_packet_id IN ({in_list}) AND status = 'active' "
            f"  AND remaining_packet >= {case} "
            f"  AND remaining_amount - {case} >= remaining_packet - {case}"
        )
        update_args = [*args_n, *args_s, *args_n, *packet_ids, *args_n, *args_s, *args_n]
        async with self.transaction() as cur:
            changed = await cur.execute(update_sql, update_args)
            if changed != len(packet_ids):
                raise GuardFailed(packet_ids)
            await cur.execute(
                _INSERT_RECORDS + many_rows(_RECORD_ROW, len(claims)),
                [v for c in claims for v in _record_values(c)],
            )
            events = await outbox.claim_events(cur, claims, packet_ids)
            await outbox.write(cur, events)

    @retry_lock_conflicts
    async def commit_one(self, claim: Claim) -> tuple[int, bool]:
        """Commit one claim idempotently: ``(amount MySQL holds for it, inserted now)``.

        The guarded update runs first so the packet row lock orders every writer of the
        packet; if the uid already has a record, the update is rolled back and that record
        wins.
        """
        async with self.transaction() as cur:
            changed = await cur.execute(
                "UPDATE red_packet_info "
                "SET status = IF(remaining_packet = 1, 'sold_out', status), "
                "    remaining_amount = remaining_amount - %s, "
                "    remaining_packet = remaining_packet - 1 "
                "WHERE red_packet_id = %s AND status = 'active' AND remaining_packet >= 1 "
                "  AND remaining_amount - %s >= remaining_packet - 1",
                (claim.amount, claim.red_packet_id, claim.amount),
            )
            await cur.execute(
                "SELECT amount FROM red_packet_record WHERE red_packet_id = %s AND uid = %s",
                (claim.red_packet_id, claim.uid),
            )
            existing = await cur.fetchone()
            if existing is not None:
                await cur.connection.rollback()  # undo the update
                return int(existing[0]), False
            if changed != 1:
                raise GuardFailed([claim.red_packet_id])  # rolled back as it leaves
            await cur.execute(_INSERT_RECORDS + _RECORD_ROW, _record_values(claim))
            events = await outbox.claim_events(cur, [claim], [claim.red_packet_id])
            await outbox.write(cur, events)
            return claim.amount, True

    # -- reads --------------------------------------------------------------------------

    async def records(
        self, packet_id: int, limit: int, after: tuple[int, int] | None
    ) -> list[RecordRow]:
        """Newest first; ``after`` is (create_time_ms, uid) of the previous page's last record."""
        sql = (
            f"SELECT uid, nick_name, img_url, amount, {time_to_ms('create_time')}, uid <=> ("
            "  SELECT luckiest_uid FROM red_packet_info WHERE red_packet_id = %s) "
            "FROM red_packet_record WHERE red_packet_id = %s"
        )
        args: list[Any] = [packet_id, packet_id]
        if after is not None:
            sql += f" AND (create_time < {MS_TO_TIME} OR (create_time = {MS_TO_TIME} AND uid < %s))"
            args += [after[0], after[0], after[1]]
        sql += " ORDER BY create_time DESC, uid DESC LIMIT %s"
        args.append(limit)
        async with self.read() as cur:
            await cur.execute(sql, args)
            rows = await cur.fetchall()
        return [RecordRow(*r[:5], luckiest=bool(r[5])) for r in rows]

    # -- expiry -------------------------------------------------------------------------

    async def expired_active(self, before_ms: int, limit: int) -> list[int]:
        async with self.read() as cur:
            await cur.execute(
                "SELECT red_packet_id FROM red_packet_info "
                f"WHERE status = 'active' AND expire_time <= {MS_TO_TIME} "
                "ORDER BY expire_time LIMIT %s",
                (before_ms, limit),
            )
            rows = await cur.fetchall()
        return [r[0] for r in rows]

    @retry_lock_conflicts
    async def refund(
        self,
        packet_id: int,
        now_ms: int,
        between_steps: Callable[[asyncmy.Connection], Awaitable[None]] | None = None,
    ) -> int | None:
        """Pay an expired packet's remainder back to its sender; the amount, or None if not due.

        One transaction: the refund row (unique per packet) and the status change commit
        together or not at all, so a sweeper that dies anywhere inside leaves nothing behind,
        and running it again refunds exactly once. ``between_steps`` lets a test break the
        connection between the two writes.
        """
        async with self.transaction() as cur:
            await cur.execute(
                f"SELECT uid, remaining_amount, status, {time_to_ms('expire_time')} "
                "FROM red_packet_info WHERE red_packet_id = %s FOR UPDATE",
                (packet_id,),
            )
            row = await cur.fetchone()
            if row is None or row[2] != "active" or row[3] > now_ms or row[1] <= 0:
                await cur.connection.rollback()
                return None
            uid, amount = row[0], row[1]
            await cur.execute(
                "INSERT INTO red_packet_refund (red_packet_id, uid, amount, create_time) "
                f"VALUES (%s, %s, %s, {MS_TO_TIME})",
                (packet_id, uid, amount, now_ms),
            )
            if between_steps is not None:
                await between_steps(cur.connection)
            await cur.execute(
                "UPDATE red_packet_info SET status = 'refunded' WHERE red_packet_id = %s",
                (packet_id,),
            )
            states = await outbox.packet_states(cur, [packet_id])
            await outbox.write(cur, [outbox.sent(states[packet_id], int(amount))])
            return int(amount)

    async def refund_of(self, packet_id: int) -> int | None:
        async with self.read() as cur:
            await cur.execute(
                "SELECT amount FROM red_packet_refund WHERE red_packet_id = %s", (packet_id,)
            )
            row = await cur.fetchone()
        return int(row[0]) if row else None

    # -- idempotency keys ---------------------------------------------------------------

    @retry_lock_conflicts
    async def claim_idempotency_key(
        self,
        uid: int,
        key: str,
        request_hash: str,
        packet_id: int,
        now_ms: int,
        *,
        expired_before_ms: int,
    ) -> tuple[int, str]:
        """Bind (uid, key) to a packet id unless already bound; the binding that stands.

        A binding made before ``expired_before_ms`` has outlived the key's lifetime: it is
        treated as unused (replaced), whether or not the purge has removed it yet."""
        async with self.transaction() as cur:
            await cur.execute(
                "DELETE FROM idempotency_key WHERE uid = %s AND idem_key = %s "
                f"AND create_time < {MS_TO_TIME}",
                (uid, key, expired_before_ms),
            )
            await cur.execute(
                "INSERT IGNORE INTO idempotency_key "
                "(uid, idem_key, request_hash, red_packet_id, create_time) "
                f"VALUES (%s, %s, %s, %s, {MS_TO_TIME})",
                (uid, key, request_hash, packet_id, now_ms),
            )
            await cur.execute(
                "SELECT red_packet_id, request_hash FROM idempotency_key "
                "WHERE uid = %s AND idem_key = %s",
                (uid, key),
            )
            row = await cur.fetchone()
        return int(row[0]), str(row[1])

    async def purge_idempotency_keys(self, expired_before_ms: int, batch: int) -> int:
        """Delete up to ``batch`` keys made before ``expired_before_ms`` (oldest first, by
        index): one short transaction, so the purge never holds locks for long."""
        async with self.transaction() as cur:
            deleted = await cur.execute(
                f"DELETE FROM idempotency_key WHERE create_time < {MS_TO_TIME} "
                "ORDER BY create_time LIMIT %s",
                (expired_before_ms, batch),
            )
        return int(deleted)
