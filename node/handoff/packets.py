"""Moving one red packet between shard nodes: the per-packet steps of a rebalance.

``export``   (old owner) freeze the packet in Redis, wait for the opens and commits in
             flight, commit every claim still pending in Redis, then mark the MySQL copy
             inert (status ``moving``: no claim, no refund, nobody serves it) and return the
             rows and the Redis state;
``import``   (new owner) stage the rows, inert as well, replacing any staged copy;
``activate`` (new owner) restore the status, drop an old tombstone, load Redis. This is the
             commit point: from here on the new owner's copy is the packet;
``finish``   (old owner) write a tombstone pointing at the new owner, drop the Redis copy,
             then delete the MySQL copy;
``abort``    (old owner) undo an export (rollback before the commit point);
``discard``  (new owner) drop a staged copy (rollback before the commit point).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redpacket.core.errors import bad_request
from redpacket.core.errors import unavailable as unavailable_error
from redpacket.node.handoff.fence import Fence, HandoffConflict
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

STATUSES = ("active", "sold_out", "refunded")


# Deleting this node's copy of a packet (every row of it, and its handoff row).
_DELETE_COPY = (
    "DELETE FROM red_packet_record WHERE red_packet_id = %s",
    "DELETE FROM red_packet_refund WHERE red_packet_id = %s",
    "DELETE FROM red_packet_info WHERE red_packet_id = %s",
    "DELETE FROM red_packet_handoff WHERE red_packet_id = %s",
)


@dataclass(frozen=True, slots=True)
class Held:
    """This node's copy of a packet: its status and the handoff it is in, if any."""

    status: str
    create_token: str
    direction: str | None  # "out", "in" or None
    peer: str | None
    prior_status: str | None


def _packet_json(row: PacketRow) -> dict[str, Any]:
    return {
        "red_packet_id": str(row.red_packet_id),
        "uid": str(row.uid),
        "total_amount": row.total_amount,
        "total_packet": row.total_packet,
        "remaining_amount": row.remaining_amount,
        "remaining_packet": row.remaining_packet,
        "greeting": row.greeting,
        "status": row.status,
        "create_token": row.create_token,
        "create_time_ms": row.create_time_ms,
        "expire_time_ms": row.expire_time_ms,
        "kind": row.kind,
        "amount_each": row.amount_each,
        "receiver_uid": _opt_str(row.receiver_uid),
        "sender_nick": row.sender_nick,
        "sender_img": row.sender_img,
        "luckiest_uid": _opt_str(row.luckiest_uid),
    }


def _opt_str(value: int | None) -> str | None:
    return None if value is None else str(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _packet_from_json(data: dict[str, Any]) -> PacketRow:
    return PacketRow(
        red_packet_id=int(data["red_packet_id"]),
        uid=int(data["uid"]),
        total_amount=int(data["total_amount"]),
        total_packet=int(data["total_packet"]),
        remaining_amount=int(data["remaining_amount"]),
        remaining_packet=int(data["remaining_packet"]),
        greeting=str(data["greeting"]),
        status=str(data["status"]),
        create_token=str(data["create_token"]),
        create_time_ms=int(data["create_time_ms"]),
        expire_time_ms=int(data["expire_time_ms"]),
        # absent in an export from a node older than packet kinds: a lucky packet
        kind=str(data.get("kind", "lucky")),
        amount_each=_opt_int(data.get("amount_each")),
        receiver_uid=_opt_int(data.get("receiver_uid")),
        sender_nick=str(data.get("sender_nick", "")),
        sender_img=str(data.get("sender_img", "")),
        luckiest_uid=_opt_int(data.get("luckiest_uid")),
    )


Records = list[tuple[int, int, str, str, int]]


def parse_export(
    payload: dict[str, Any],
) -> tuple[PacketRow, Records, tuple[int, int, int] | None]:
    """An export's packet, records and refund, checked to add up (400 otherwise)."""
    packet = _packet_from_json(payload["packet"])
    if packet.status not in STATUSES:
        raise bad_request("invalid_field", f"cannot import a packet in status {packet.status}")
    records = [
        (int(uid), int(amount), str(nick), str(img), int(ms))
        for uid, amount, nick, img, ms in payload["records"]
    ]
    raw_refund = payload.get("refund")
    refund = (int(raw_refund[0]), int(raw_refund[1]), int(raw_refund[2])) if raw_refund else None
    if len(records) + packet.remaining_packet != packet.total_packet or (
        sum(r[1] for r in records) + packet.remaining_amount != packet.total_amount
    ):
        raise bad_request("invalid_field", "the exported records do not add up")
    return packet, records, refund


class PacketMoves:
    """The handoff steps of one node (see the module docstring)."""

    def __init__(self, fence: Fence) -> None:
        self.fence = fence
        self.shard = fence.shard
        self.name = fence.name
        self.drop_script = self._drop = fence.shard.counters.client.register_script(
            Path(__file__).parent.parent.joinpath("drop.lua").read_text("utf-8")
        )

    async def held(self, packet_id: int) -> Held | None:
        async with self.shard.ledger.read() as cur:
            await cur.execute(
                "SELECT i.status, i.create_token, h.direction, h.peer, h.prior_status "
                "FROM red_packet_info i LEFT JOIN red_packet_handoff h "
                "ON h.red_packet_id = i.red_packet_id WHERE i.red_packet_id = %s",
                (packet_id,),
            )
            row = await cur.fetchone()
        return Held(*row) if row else None

    async def inventory(self, after: int, limit: int) -> list[tuple[int, str, str | None]]:
        """``(packet id, "active" | "out" | "in", peer)`` of the packets held here, by id."""
        async with self.shard.ledger.read() as cur:
            await cur.execute(
                "SELECT i.red_packet_id, h.direction, h.peer FROM red_packet_info i "
                "LEFT JOIN red_packet_handoff h ON h.red_packet_id = i.red_packet_id "
                "WHERE i.red_packet_id > %s ORDER BY i.red_packet_id LIMIT %s",
                (after, limit),
            )
            rows = await cur.fetchall()
        return [(int(pid), direction or "active", peer) for pid, direction, peer in rows]

    async def live(self, from_id: int, before_id: int) -> int:
        """How many packets with ``from_id <= id < before_id`` are still live here: not yet
        expired, or expired but not settled (an active one awaits its refund; a moving one is
        in a handoff). A ring version retires once none of its packets is live anywhere."""
        async with self.shard.ledger.read() as cur:
            await cur.execute(
                "SELECT COUNT(*) FROM red_packet_info WHERE red_packet_id >= %s "
                "AND red_packet_id < %s AND (status IN ('active', %s) OR expire_time > %s)",
                (from_id, before_id, MOVING, to_datetime(now_ms())),
            )
            (count,) = await cur.fetchone()
        return int(count)

    # -- export (old owner) ---------------------------------------------------------------

    async def export(self, packet_id: int, to: str, ring_version: int) -> dict[str, Any]:
        self.fence.current(ring_version)
        shard = self.shard
        async with shard.packet_lock(packet_id):
            tomb = await self.fence.tombstone(packet_id)
            if tomb is not None:
                return {"state": "moved", "owner": tomb.owner}
            held = await self.held(packet_id)
            if held is None:
                return {"state": "absent"}
            if held.direction == "in":
                raise HandoffConflict("this node holds only a staged copy of the packet")
            await shard.counters.freeze(packet_id, True)
            if held.status != MOVING:
                try:
                    await shard.quiesce(packet_id)
                    await self._commit_pending(packet_id)
                    await self._check_redis_claims(packet_id)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await shard.counters.freeze(packet_id, False)
                    raise
            packet, records, refund = await self._mark_moving(packet_id, to, ring_version)
            redis_state = await self._redis_state(packet_id)
        return {
            "state": "exported",
            "from": self.name,
            "packet": _packet_json(packet),
            "records": records,
            "refund": refund,
            "redis": redis_state,
        }

    async def _commit_pending(self, packet_id: int) -> None:
        """Claims Redis took and MySQL may lack are owed: commit them before anything moves."""
        shard = self.shard
        claims = await shard.counters.pending(packet_id)
        if not claims:
            return
        results = await asyncio.gather(
            *(shard.committer.submit(claim) for claim in claims), return_exceptions=True
        )
        if any(isinstance(r, BaseException) for r in results):
            raise unavailable_error("could not commit the packet's pending claims; retry")
        log.info("red packet %s: %d pending claim(s) committed for handoff", packet_id, len(claims))

    async def _check_redis_claims(self, packet_id: int) -> None:
        """Every claim Redis holds must now be in MySQL with the same amount."""
        shard = self.shard
        in_redis = await shard.counters.claims(packet_id)
        if not in_redis:
            return
        in_mysql = await shard.ledger.committed_claims(packet_id)
        missing = {uid for uid, amount in in_redis.items() if in_mysql.get(uid) != amount}
        if missing:
            asyncio.get_running_loop().create_task(shard.resync(packet_id))
            raise unavailable_error(
                f"Redis holds {len(missing)} claim(s) MySQL does not; resyncing, retry"
            )

    @retry_lock_conflicts
    async def _mark_moving(
        self, packet_id: int, to: str, ring_version: int
    ) -> tuple[PacketRow, list[list[Any]], list[Any] | None]:
        """One transaction: make the MySQL copy inert and read it (packet, records, refund)."""
        async with self.shard.ledger.transaction() as cur:
            await cur.execute(
                f"SELECT {PACKET_SELECT} FROM red_packet_info WHERE red_packet_id = %s FOR UPDATE",
                (packet_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise HandoffConflict("the packet vanished during its export")
            packet = packet_from_row(row)
            if packet.status != MOVING:
                await cur.execute(
                    "INSERT INTO red_packet_handoff (red_packet_id, direction, peer, "
                    "prior_status, ring_version, create_time) "
                    "VALUES (%s, 'out', %s, %s, %s, %s)",
                    (packet_id, to, packet.status, ring_version, to_datetime(now_ms())),
                )
                await cur.execute(
                    "UPDATE red_packet_info SET status = %s WHERE red_packet_id = %s",
                    (MOVING, packet_id),
                )
                prior = packet.status
            else:
                await cur.execute(
                    "UPDATE red_packet_handoff SET peer = %s, ring_version = %s "
                    "WHERE red_packet_id = %s AND direction = 'out'",
                    (to, ring_version, packet_id),
                )
                await cur.execute(
                    "SELECT prior_status FROM red_packet_handoff "
                    "WHERE red_packet_id = %s AND direction = 'out'",
                    (packet_id,),
                )
                found = await cur.fetchone()
                if found is None:
                    raise HandoffConflict("the packet is inert here but not exported")
                prior = str(found[0])
            await cur.execute(
                "SELECT uid, amount, nick_name, img_url, create_time FROM red_packet_record "
                "WHERE red_packet_id = %s ORDER BY id",
                (packet_id,),
            )
            records = [
                [str(uid), amount, nick, img, to_ms(when)]
                for uid, amount, nick, img, when in await cur.fetchall()
            ]
            await cur.execute(
                "SELECT uid, amount, create_time FROM red_packet_refund WHERE red_packet_id = %s",
                (packet_id,),
            )
            found_refund = await cur.fetchone()
            refund = (
                [str(found_refund[0]), found_refund[1], to_ms(found_refund[2])]
                if found_refund
                else None
            )
        return dataclasses.replace(packet, status=prior), records, refund

    async def _redis_state(self, packet_id: int) -> dict[str, Any] | None:
        info, claims, _ = packet_keys(packet_id)
        pipe = self.shard.counters.client.pipeline(transaction=False)
        pipe.hmget(info, "remaining_amount", "remaining_packet", "state")
        pipe.hlen(claims)
        (remaining_amount, remaining_packet, state), count = await pipe.execute()
        if remaining_amount is None:
            return None
        return {
            "remaining_amount": int(remaining_amount),
            "remaining_packet": int(remaining_packet),
            "state": state,
            "claims": int(count),
        }

    # -- import and activate (new owner) ----------------------------------------------------

    async def import_(self, payload: dict[str, Any], peer: str, ring_version: int) -> str:
        self.fence.current(ring_version)
        packet, records, refund = parse_export(payload)
        async with self.shard.packet_lock(packet.red_packet_id):
            return await self._stage(packet, records, refund, peer, ring_version)

    @retry_lock_conflicts
    async def _stage(
        self,
        packet: PacketRow,
        records: list[tuple[int, int, str, str, int]],
        refund: tuple[int, int, int] | None,
        peer: str,
        ring_version: int,
    ) -> str:
        pid = packet.red_packet_id
        held = await self.held(pid)
        if held is not None and held.status != MOVING:
            if held.create_token != packet.create_token:
                raise HandoffConflict("another packet with this id is live here")
            return "active"  # activated before: nothing to do
        async with self.shard.ledger.transaction() as cur:
            if held is not None:  # a stale staged copy, or this node's own inert one
                for statement in _DELETE_COPY:
                    await cur.execute(statement, (pid,))
            await cur.execute(
                f"INSERT INTO red_packet_info ({PACKET_COLUMNS}) VALUES ({PACKET_PLACEHOLDERS})",
                packet_values(packet, MOVING),
            )
            if records:
                await cur.executemany(
                    "INSERT INTO red_packet_record "
                    "(red_packet_id, uid, amount, nick_name, img_url, create_time) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    [(pid, u, a, n, i, to_datetime(ms)) for u, a, n, i, ms in records],
                )
            if refund is not None:
                await cur.execute(
                    "INSERT INTO red_packet_refund (red_packet_id, uid, amount, create_time) "
                    "VALUES (%s, %s, %s, %s)",
                    (pid, refund[0], refund[1], to_datetime(refund[2])),
                )
            await cur.execute(
                "INSERT INTO red_packet_handoff (red_packet_id, direction, peer, "
                "prior_status, ring_version, create_time) VALUES (%s, 'in', %s, %s, %s, %s)",
                (pid, peer, packet.status, ring_version, to_datetime(now_ms())),
            )
        return "staged"

    async def activate(self, packet_id: int) -> str:
        shard = self.shard
        async with shard.packet_lock(packet_id):
            held = await self.held(packet_id)
            if held is None:
                raise HandoffConflict("nothing is staged here for this packet")
            if held.status == MOVING and held.direction != "in":
                raise HandoffConflict("this node's copy is exported, not staged")
            flipped = held.status == MOVING
            if flipped:
                await self._restore(packet_id, "in")
            packet = await shard.ledger.get_packet(packet_id)
            claims = await shard.ledger.committed_claims(packet_id)
            if packet is not None:
                try:
                    await shard.counters.load(
                        packet,
                        claims,
                        replace=flipped,
                        drop_at_ms=packet.expire_time_ms + shard.settings.redis_retention_s * 1000,
                    )
                except Exception:  # Redis missing it is repaired on first use
                    log.warning("red packet %s: Redis load after import failed", packet_id)
            shard.admission.forget(packet_id)
        return "active"

    @retry_lock_conflicts
    async def _restore(self, packet_id: int, direction: str) -> None:
        """One transaction: status back from 'moving', handoff row and any tombstone gone."""
        async with self.shard.ledger.transaction() as cur:
            await cur.execute(
                "SELECT prior_status FROM red_packet_handoff "
                "WHERE red_packet_id = %s AND direction = %s FOR UPDATE",
                (packet_id, direction),
            )
            row = await cur.fetchone()
            if row is None:
                raise HandoffConflict(f"no '{direction}' handoff of this packet here")
            await cur.execute(
                "UPDATE red_packet_info SET status = %s WHERE red_packet_id = %s AND status = %s",
                (row[0], packet_id, MOVING),
            )
            await cur.execute(
                "DELETE FROM red_packet_handoff WHERE red_packet_id = %s", (packet_id,)
            )
            if direction == "in":
                await cur.execute(
                    "SELECT 1 FROM red_packet_tombstone WHERE red_packet_id = %s",
                    (packet_id,),
                )
                if await cur.fetchone():  # the packet came back: it lives here again
                    await cur.execute(
                        "DELETE FROM red_packet_tombstone WHERE red_packet_id = %s",
                        (packet_id,),
                    )

    # -- finish, abort, discard -----------------------------------------------------------

    async def finish(self, packet_id: int, owner: str, owner_url: str, ring_version: int) -> str:
        """Tombstone first, then the Redis copy, then the MySQL copy."""
        self.fence.current(ring_version)
        shard = self.shard
        async with shard.packet_lock(packet_id):
            held = await self.held(packet_id)
            if held is None:
                if await self.fence.tombstone(packet_id) is None:
                    return "absent"
                await self._drop_redis(packet_id)
                return "moved"
            if held.status != MOVING or held.direction != "out":
                raise HandoffConflict("only an exported copy can be finished")
            await self._write_tombstone(packet_id, owner, owner_url, ring_version)
            self.fence.has_tombstones = True
            await self._drop_redis(packet_id)
            await self._delete_copy(packet_id)
            shard.admission.forget(packet_id)
        return "moved"

    async def _drop_redis(self, packet_id: int) -> None:
        if int(await self._drop(keys=packet_keys(packet_id), args=[])) < 0:
            raise HandoffConflict("the Redis copy is live (not frozen): refusing to drop it")

    @retry_lock_conflicts
    async def _write_tombstone(
        self, packet_id: int, owner: str, owner_url: str, ring_version: int
    ) -> None:
        async with self.shard.ledger.transaction() as cur:
            await cur.execute(
                "INSERT INTO red_packet_tombstone "
                "(red_packet_id, owner, owner_url, ring_version, create_time) "
                "VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE owner = VALUES(owner), "
                "owner_url = VALUES(owner_url), ring_version = VALUES(ring_version)",
                (packet_id, owner, owner_url, ring_version, to_datetime(now_ms())),
            )

    @retry_lock_conflicts
    async def _delete_copy(self, packet_id: int, direction: str | None = None) -> None:
        async with self.shard.ledger.transaction() as cur:
            if direction is not None:
                await cur.execute(
                    "SELECT 1 FROM red_packet_handoff "
                    "WHERE red_packet_id = %s AND direction = %s FOR UPDATE",
                    (packet_id, direction),
                )
                if await cur.fetchone() is None:
                    raise HandoffConflict(f"no '{direction}' handoff of this packet here")
            for statement in _DELETE_COPY:
                await cur.execute(statement, (packet_id,))

    async def abort(self, packet_id: int) -> str:
        """Undo an export: the packet is live here again (only before the commit point)."""
        shard = self.shard
        async with shard.packet_lock(packet_id):
            held = await self.held(packet_id)
            if held is None:
                return "absent"
            if held.status == MOVING:
                if held.direction != "out":
                    raise HandoffConflict("only an exported copy can be taken back")
                if await self.fence.tombstone(packet_id) is not None:
                    raise HandoffConflict("the handoff was finished: it cannot be aborted")
                await self._restore(packet_id, "out")
            elif held.direction is not None:
                raise HandoffConflict("the packet is live here with a handoff row")
            await shard.counters.freeze(packet_id, False)
            shard.admission.forget(packet_id)
        return "active"

    async def discard(self, packet_id: int) -> str:
        """Drop a staged copy that will not be activated (only before the commit point)."""
        async with self.shard.packet_lock(packet_id):
            held = await self.held(packet_id)
            if held is None:
                return "absent"
            if held.status != MOVING or held.direction != "in":
                raise HandoffConflict("only a staged copy can be discarded")
            await self._delete_copy(packet_id, "in")
            await self._drop_redis(packet_id)  # a frozen copy from an earlier stay here
        return "discarded"
