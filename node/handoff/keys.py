"""Moving users' idempotency keys to the user's new owner (``user:<uid>`` on the ring)."""

from __future__ import annotations

import contextlib

from redpacket.node.handoff.fence import Fence
from redpacket.node.ledger import retry_lock_conflicts, to_datetime, to_ms
from redpacket.sharding.ring import user_key


class KeyMoves:
    """Lists, copies in and releases the idempotency keys held by one node."""

    def __init__(self, fence: Fence) -> None:
        self.fence = fence
        self.shard = fence.shard

    async def keys(
        self, after: tuple[int, str], limit: int
    ) -> list[tuple[int, str, str, int, int]]:
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT uid, idem_key, request_hash, red_packet_id, create_time "
                "FROM idempotency_key WHERE uid > %s OR (uid = %s AND idem_key > %s) "
                "ORDER BY uid, idem_key LIMIT %s",
                (after[0], after[0], after[1], limit),
            )
            rows = await cur.fetchall()
            await conn.rollback()
        return [(int(u), str(k), str(h), int(p), to_ms(t)) for u, k, h, p, t in rows]

    @retry_lock_conflicts
    async def import_keys(
        self, rows: list[tuple[int, str, str, int, int]]
    ) -> list[tuple[int, str]]:
        """Insert the keys that are new here; the (uid, key)s bound here to something else."""
        conflicts = []
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            try:
                await cur.executemany(
                    "INSERT IGNORE INTO idempotency_key "
                    "(uid, idem_key, request_hash, red_packet_id, create_time) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    [(u, k, h, p, to_datetime(t)) for u, k, h, p, t in rows],
                )
                for uid, key, request_hash, packet_id, _ in rows:
                    await cur.execute(
                        "SELECT request_hash, red_packet_id FROM idempotency_key "
                        "WHERE uid = %s AND idem_key = %s",
                        (uid, key),
                    )
                    found = await cur.fetchone()
                    if found is None or (str(found[0]), int(found[1])) != (request_hash, packet_id):
                        conflicts.append((uid, key))
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
        return conflicts

    @retry_lock_conflicts
    async def release_keys(self, rows: list[tuple[int, str, str, int]]) -> int:
        """Delete keys copied to their new owner (only those the fence gives to another)."""
        leaving = [r for r in rows if self.fence.owner_elsewhere(user_key(r[0])) is not None]
        deleted = 0
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            try:
                for uid, key, request_hash, packet_id in leaving:
                    deleted += await cur.execute(
                        "DELETE FROM idempotency_key WHERE uid = %s AND idem_key = %s "
                        "AND request_hash = %s AND red_packet_id = %s",
                        (uid, key, request_hash, packet_id),
                    )
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
        return deleted
