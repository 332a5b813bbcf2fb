"""Moving users' own data off a node: their idempotency keys and their history (我的红包), to
the owner of ``user:<uid>`` on the new ring."""

from __future__ import annotations

import contextlib
from typing import Any

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
                bound: dict[tuple[int, str], tuple[str, int]] = {}
                if rows:  # what each key is bound to here now: one query for the batch
                    marks = ", ".join(["(%s, %s)"] * len(rows))
                    await cur.execute(
                        "SELECT uid, idem_key, request_hash, red_packet_id FROM idempotency_key "
                        f"WHERE (uid, idem_key) IN ({marks})",
                        [v for u, k, *_ in rows for v in (u, k)],
                    )
                    for uid, key, request_hash, packet_id in await cur.fetchall():
                        bound[(int(uid), str(key))] = (str(request_hash), int(packet_id))
                for uid, key, request_hash, packet_id, _ in rows:
                    if bound.get((uid, key)) != (request_hash, packet_id):
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
                if leaving:  # one statement for the batch
                    marks = ", ".join(["(%s, %s, %s, %s)"] * len(leaving))
                    deleted = await cur.execute(
                        "DELETE FROM idempotency_key "
                        f"WHERE (uid, idem_key, request_hash, red_packet_id) IN ({marks})",
                        [v for row in leaving for v in row],
                    )
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
        return deleted

    # -- users' history (node/history.py) ----------------------------------------------------

    async def history(self, after_uid: int, limit: int) -> list[tuple[int, list[list[Any]]]]:
        """Up to ``limit`` users with history here (uid order), each with their rows as the
        events that would rebuild them anywhere: ``[uid, event, red_packet_id, payload]``."""
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute(  # each side a loose index scan: a plain UNION of the two
                # tables sorted every row of both per page (150,000 rows: past the timeout)
                "SELECT uid FROM ((SELECT DISTINCT uid FROM user_received WHERE uid > %s "
                "ORDER BY uid LIMIT %s) UNION (SELECT DISTINCT uid FROM user_sent "
                "WHERE uid > %s ORDER BY uid LIMIT %s)) u ORDER BY uid LIMIT %s",
                (after_uid, limit, after_uid, limit, limit),
            )
            uids = [int(r[0]) for r in await cur.fetchall()]
            if not uids:
                await conn.rollback()
                return []
            marks = ", ".join(["%s"] * len(uids))
            events: dict[int, list[list[Any]]] = {uid: [] for uid in uids}
            await cur.execute(
                "SELECT uid, red_packet_id, sender_uid, sender_nick, sender_img, kind, amount, "
                f"luckiest, create_time FROM user_received WHERE uid IN ({marks})",
                uids,
            )
            for uid, pid, sender, nick, img, kind, amount, lucky, when in await cur.fetchall():
                payload = {"amount": amount, "time": to_ms(when), "sender": sender,
                           "sender_nick": nick, "sender_img": img, "kind": kind,
                           "luckiest": bool(lucky)}  # fmt: skip
                events[uid].append([str(uid), "received", str(pid), payload])
            await cur.execute(
                "SELECT uid, red_packet_id, kind, total_amount, total_packet, opened_packet, "
                "opened_amount, refunded_amount, greeting, create_time, expire_time "
                f"FROM user_sent WHERE uid IN ({marks})",
                uids,
            )
            for (
                uid,
                pid,
                kind,
                ta,
                tp,
                op,
                oa,
                refunded,
                greeting,
                made,
                expire,
            ) in await cur.fetchall():
                payload = {"kind": kind, "total_amount": ta, "total_packet": tp,
                           "opened_packet": op, "opened_amount": oa, "refunded_amount": refunded,
                           "greeting": greeting, "create_time": to_ms(made),
                           "expire_time": to_ms(expire)}  # fmt: skip
                events[uid].append([str(uid), "sent", str(pid), payload])
            await conn.rollback()
        return list(events.items())

    @retry_lock_conflicts
    async def release_history(self, uids: list[int]) -> int:
        """Delete the history of users copied to their new owner (only those the fence gives
        away: after the fence went up, nothing new of theirs is applied here)."""
        leaving = [u for u in uids if self.fence.owner_elsewhere(user_key(u)) is not None]
        if not leaving:
            return 0
        marks = ", ".join(["%s"] * len(leaving))
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            deleted = await cur.execute(
                f"DELETE FROM user_received WHERE uid IN ({marks})", leaving
            )
            deleted += await cur.execute(f"DELETE FROM user_sent WHERE uid IN ({marks})", leaving)
            await conn.commit()
        return deleted
