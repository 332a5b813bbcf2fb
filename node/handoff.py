"""Handing red packets between shard nodes: the node's half of a rebalance.

The protocol, with a sequence diagram, is in docs/rebalancing.md. The orchestrator
(``sharding/rebalance.py``) takes each packet that changes owner through these steps, each
one an idempotent call on one node, so a rebalance killed anywhere is finished (or undone)
by running it again:

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

At every instant at most one node may accept an open: the old owner stops at ``export``
(its Redis copy is frozen before anything else), the new owner starts at ``activate``.

The fence: the ring a rebalance moves to, stored in MySQL (table ``shard_ring``) while the
change is in progress. Once fenced, a node refuses to create a packet, or to bind an
idempotency key of a user, that this ring gives to another node, unless it already holds
it: it answers 421 packet_moved with the owner. That keeps a gateway with an older ring from
creating packets behind a migration's back. Creates and key bindings in flight when the
fence goes up are waited for. A node also redirects, rather than 404s, calls for packets it
does not hold that the fence ring gives to another node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pymysql
from aiohttp import web

from redpacket.core.errors import ApiError, bad_request, json_response, read_json_object
from redpacket.core.errors import unavailable as unavailable_error
from redpacket.core.ids import parse_packet_id, parse_uid
from redpacket.node.keys import packet_keys
from redpacket.node.ledger import PacketRow, retry_lock_conflicts, to_datetime, to_ms
from redpacket.node.shard import MOVING, Shard, moved, now_ms
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc, RingError, user_key

log = logging.getLogger("redpacket.node.handoff")

STATUSES = ("active", "sold_out", "refunded")
_PACKET_COLUMNS = (
    "red_packet_id, uid, total_amount, total_packet, remaining_amount, remaining_packet, "
    "greeting, status, create_token, create_time, expire_time"
)


# Deleting this node's copy of a packet (every row of it, and its handoff row).
_DELETE_COPY = (
    "DELETE FROM red_packet_record WHERE red_packet_id = %s",
    "DELETE FROM red_packet_refund WHERE red_packet_id = %s",
    "DELETE FROM red_packet_info WHERE red_packet_id = %s",
    "DELETE FROM red_packet_handoff WHERE red_packet_id = %s",
)


class HandoffConflict(ApiError):
    """The node's state does not allow this step (the orchestrator asked for the wrong one)."""

    def __init__(self, message: str) -> None:
        super().__init__(409, "handoff_conflict", message)


@dataclass(frozen=True, slots=True)
class Tombstone:
    owner: str
    owner_url: str
    ring_version: int


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
    }


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
    )


def _packet(row: tuple[Any, ...]) -> PacketRow:
    return PacketRow(*row[:9], to_ms(row[9]), to_ms(row[10]))


class Handoff:
    """Tombstones, the fence, and the handoff steps of one node (see the module docstring)."""

    def __init__(self, shard: Shard, name: str) -> None:
        self.shard = shard
        self.name = name
        self.fence: RingDoc | None = None
        self._fence_ring: Ring | None = None
        self._has_tombstones = False
        # creates and key bindings in flight, by the fence epoch they started in
        self._epoch = 0
        self._inflight: dict[int, int] = {}
        self._drained = asyncio.Event()  # set: nothing from before the last fence is in flight
        self._drained.set()
        self._drop = shard.counters.client.register_script(
            Path(__file__).with_name("drop.lua").read_text("utf-8")
        )

    # -- start ----------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the fence and whether any tombstone exists (the schema is applied already)."""
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute("SELECT ring_json FROM shard_ring WHERE id = 1")
            row = await cur.fetchone()
            await cur.execute("SELECT 1 FROM red_packet_tombstone LIMIT 1")
            self._has_tombstones = await cur.fetchone() is not None
            await conn.rollback()
        if row is not None:
            try:
                self._set_fence(RingDoc.parse(orjson.loads(row[0])))
            except (RingError, orjson.JSONDecodeError):
                log.error("the stored fence ring is unreadable; ignoring it", exc_info=True)

    def _set_fence(self, doc: RingDoc) -> None:
        self.fence, self._fence_ring = doc, doc.ring()

    # -- Placement (used by node/shard.py) ------------------------------------------------

    @contextlib.contextmanager
    def admitting(self) -> Iterator[None]:
        epoch = self._epoch
        self._inflight[epoch] = self._inflight.get(epoch, 0) + 1
        try:
            yield
        finally:
            self._inflight[epoch] -= 1
            if not self._inflight[epoch]:
                del self._inflight[epoch]
            self._check_drained()

    def _check_drained(self) -> None:
        if all(epoch >= self._epoch for epoch in self._inflight):
            self._drained.set()

    async def moved(self, packet_id: int) -> ApiError | None:
        if not self._has_tombstones:
            return None
        tomb = await self.tombstone(packet_id)
        return moved(tomb.owner, tomb.owner_url) if tomb else None

    def elsewhere(self, key: str) -> ApiError | None:
        owner = self._fence_owner(key)
        return moved(owner.name, owner.url) if owner is not None else None

    def _fence_owner(self, key: str) -> NodeSpec | None:
        """The owner the fence ring gives ``key``, if that is another node; else None."""
        if self._fence_ring is None:
            return None
        owner = self._fence_ring.owner_of_key(key)
        return None if owner.name == self.name else owner

    async def existing_for_create(self, packet_id: int) -> PacketRow | None:
        err = await self.moved(packet_id)
        if err is not None:
            raise err
        owner = self._fence_owner(str(packet_id))
        if owner is None:
            return None
        row = await self.shard.ledger.get_packet(packet_id)
        if row is None:
            raise moved(owner.name, owner.url)
        return row

    async def existing_key(self, uid: int, key: str) -> tuple[int, str] | None:
        owner = self._fence_owner(user_key(uid))
        if owner is None:
            return None
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT red_packet_id, request_hash FROM idempotency_key "
                "WHERE uid = %s AND idem_key = %s",
                (uid, key),
            )
            row = await cur.fetchone()
            await conn.rollback()
        if row is None:
            raise moved(owner.name, owner.url)
        return int(row[0]), str(row[1])

    # -- fence ----------------------------------------------------------------------------

    async def set_fence(self, doc: RingDoc, wait_s: float = 10.0) -> None:
        """Store the ring being moved to, then wait for creates and bindings in flight."""
        if self.fence is not None and doc.version < self.fence.version:
            raise HandoffConflict(
                f"this node is fenced with ring version {self.fence.version} > {doc.version}"
            )
        body = orjson.dumps(RingDoc(doc.version, doc.nodes).as_dict()).decode()
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "INSERT INTO shard_ring (id, version, ring_json) VALUES (1, %s, %s) "
                "ON DUPLICATE KEY UPDATE version = VALUES(version), ring_json = VALUES(ring_json)",
                (doc.version, body),
            )
            await conn.commit()
        self._set_fence(RingDoc(doc.version, doc.nodes))
        # wait for what started before the fence (it may not have seen it); not for later ones
        self._epoch += 1
        self._drained.clear()
        self._check_drained()
        try:
            async with asyncio.timeout(wait_s):
                await self._drained.wait()
        except TimeoutError:
            raise unavailable_error("creates are still in flight; retry") from None

    async def clear_fence(self) -> None:
        """The change is over and every gateway routes by its ring: stop redirecting."""
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute("DELETE FROM shard_ring WHERE id = 1")
            await conn.commit()
        self.fence, self._fence_ring = None, None

    # -- reads ----------------------------------------------------------------------------

    async def tombstone(self, packet_id: int) -> Tombstone | None:
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT owner, owner_url, ring_version FROM red_packet_tombstone "
                "WHERE red_packet_id = %s",
                (packet_id,),
            )
            row = await cur.fetchone()
            await conn.rollback()
        return Tombstone(str(row[0]), str(row[1]), int(row[2])) if row else None

    async def held(self, packet_id: int) -> Held | None:
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT i.status, i.create_token, h.direction, h.peer, h.prior_status "
                "FROM red_packet_info i LEFT JOIN red_packet_handoff h "
                "ON h.red_packet_id = i.red_packet_id WHERE i.red_packet_id = %s",
                (packet_id,),
            )
            row = await cur.fetchone()
            await conn.rollback()
        return Held(*row) if row else None

    async def inventory(self, after: int, limit: int) -> list[tuple[int, str, str | None]]:
        """``(packet id, "active" | "out" | "in", peer)`` of the packets held here, by id."""
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT i.red_packet_id, h.direction, h.peer FROM red_packet_info i "
                "LEFT JOIN red_packet_handoff h ON h.red_packet_id = i.red_packet_id "
                "WHERE i.red_packet_id > %s ORDER BY i.red_packet_id LIMIT %s",
                (after, limit),
            )
            rows = await cur.fetchall()
            await conn.rollback()
        return [(int(pid), direction or "active", peer) for pid, direction, peer in rows]

    def _current(self, ring_version: int) -> None:
        """Refuse a step made for an older ring than this node's fence (a stale rebalance)."""
        if self.fence is not None and ring_version < self.fence.version:
            raise HandoffConflict(
                f"this step is for ring version {ring_version}, but this node is fenced with "
                f"version {self.fence.version}"
            )

    # -- export (old owner) ---------------------------------------------------------------

    async def export(self, packet_id: int, to: str, ring_version: int) -> dict[str, Any]:
        self._current(ring_version)
        shard = self.shard
        async with shard.packet_lock(packet_id):
            tomb = await self.tombstone(packet_id)
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
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            try:
                await cur.execute(
                    f"SELECT {_PACKET_COLUMNS} FROM red_packet_info "
                    "WHERE red_packet_id = %s FOR UPDATE",
                    (packet_id,),
                )
                row = await cur.fetchone()
                if row is None:
                    raise HandoffConflict("the packet vanished during its export")
                packet = _packet(row)
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
                    "SELECT uid, amount, create_time FROM red_packet_refund "
                    "WHERE red_packet_id = %s",
                    (packet_id,),
                )
                found_refund = await cur.fetchone()
                refund = (
                    [str(found_refund[0]), found_refund[1], to_ms(found_refund[2])]
                    if found_refund
                    else None
                )
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
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
        self._current(ring_version)
        packet = _packet_from_json(payload["packet"])
        if packet.status not in STATUSES:
            raise bad_request("invalid_field", f"cannot import a packet in status {packet.status}")
        records = [
            (int(uid), int(amount), str(nick), str(img), int(ms))
            for uid, amount, nick, img, ms in payload["records"]
        ]
        raw_refund = payload.get("refund")
        refund = (
            (int(raw_refund[0]), int(raw_refund[1]), int(raw_refund[2])) if raw_refund else None
        )
        if len(records) + packet.remaining_packet != packet.total_packet or (
            sum(r[1] for r in records) + packet.remaining_amount != packet.total_amount
        ):
            raise bad_request("invalid_field", "the exported records do not add up")
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
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            try:
                if held is not None:  # a stale staged copy, or this node's own inert one
                    for statement in _DELETE_COPY:
                        await cur.execute(statement, (pid,))
                await cur.execute(
                    f"INSERT INTO red_packet_info ({_PACKET_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        pid,
                        packet.uid,
                        packet.total_amount,
                        packet.total_packet,
                        packet.remaining_amount,
                        packet.remaining_packet,
                        packet.greeting,
                        MOVING,
                        packet.create_token,
                        to_datetime(packet.create_time_ms),
                        to_datetime(packet.expire_time_ms),
                    ),
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
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
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
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            try:
                await cur.execute(
                    "SELECT prior_status FROM red_packet_handoff "
                    "WHERE red_packet_id = %s AND direction = %s FOR UPDATE",
                    (packet_id, direction),
                )
                row = await cur.fetchone()
                if row is None:
                    raise HandoffConflict(f"no '{direction}' handoff of this packet here")
                await cur.execute(
                    "UPDATE red_packet_info SET status = %s "
                    "WHERE red_packet_id = %s AND status = %s",
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
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise

    # -- finish, abort, discard -----------------------------------------------------------

    async def finish(self, packet_id: int, owner: str, owner_url: str, ring_version: int) -> str:
        """Tombstone first, then the Redis copy, then the MySQL copy."""
        self._current(ring_version)
        shard = self.shard
        async with shard.packet_lock(packet_id):
            held = await self.held(packet_id)
            if held is None:
                if await self.tombstone(packet_id) is None:
                    return "absent"
                await self._drop_redis(packet_id)
                return "moved"
            if held.status != MOVING or held.direction != "out":
                raise HandoffConflict("only an exported copy can be finished")
            await self._write_tombstone(packet_id, owner, owner_url, ring_version)
            self._has_tombstones = True
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
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "INSERT INTO red_packet_tombstone "
                "(red_packet_id, owner, owner_url, ring_version, create_time) "
                "VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE owner = VALUES(owner), "
                "owner_url = VALUES(owner_url), ring_version = VALUES(ring_version)",
                (packet_id, owner, owner_url, ring_version, to_datetime(now_ms())),
            )
            await conn.commit()

    @retry_lock_conflicts
    async def _delete_copy(self, packet_id: int, direction: str | None = None) -> None:
        async with self.shard.ledger.connection() as conn, conn.cursor() as cur:
            try:
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
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise

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
                if await self.tombstone(packet_id) is not None:
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

    # -- idempotency keys -----------------------------------------------------------------

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
        leaving = [r for r in rows if self._fence_owner(user_key(r[0])) is not None]
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


# -- HTTP -----------------------------------------------------------------------------------

HANDOFF = web.AppKey("handoff", Handoff)


async def _body(request: web.Request) -> dict[str, Any]:
    return await read_json_object(request) if request.can_read_body else {}


def _int(body: dict[str, Any], field: str, default: int | None = None) -> int:
    value = body.get(field, default)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise bad_request("invalid_field", f"{field} must be a non-negative integer")
    return value


def _name(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value or len(value) > 64:
        raise bad_request("invalid_field", f"{field} must be a node name")
    return value


async def _step(request: web.Request, step: str) -> web.Response:
    handoff = request.app[HANDOFF]
    packet_id = parse_packet_id(request.match_info["id"])
    body = await _body(request)
    try:
        if step == "export":
            return json_response(
                await handoff.export(packet_id, _name(body, "to"), _int(body, "ring_version"))
            )
        if step == "import":
            try:
                payload = body["export"]
                if int(payload["packet"]["red_packet_id"]) != packet_id:
                    raise ValueError("packet id mismatch")
                state = await handoff.import_(
                    payload, _name(body, "from"), _int(body, "ring_version")
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise bad_request("invalid_field", f"malformed export: {exc}") from None
        elif step == "activate":
            state = await handoff.activate(packet_id)
        elif step == "finish":
            url = body.get("owner_url", "")
            state = await handoff.finish(
                packet_id,
                _name(body, "owner"),
                url if isinstance(url, str) else "",
                _int(body, "ring_version"),
            )
        elif step == "abort":
            state = await handoff.abort(packet_id)
        else:
            state = await handoff.discard(packet_id)
    except pymysql.err.OperationalError as exc:
        raise unavailable_error(f"the shard's database refused: {exc.args[:1]}") from None
    return json_response({"state": state})


def _step_handler(step: str) -> Any:
    """The route handler of one handoff step (they differ only in the step they run)."""

    async def handler(request: web.Request) -> web.Response:
        return await _step(request, step)

    return handler


async def list_packets(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    after = _int(dict(request.query), "after", 0)
    limit = min(max(_int(dict(request.query), "limit", 1000), 1), 10_000)
    rows = await handoff.inventory(after, limit)
    return json_response(
        {
            "node": handoff.name,
            "packets": [[str(pid), state, peer] for pid, state, peer in rows],
            "next": str(rows[-1][0]) if len(rows) == limit else None,
        }
    )


async def get_fence(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    fence = handoff.fence.as_dict() if handoff.fence else None
    return json_response({"node": handoff.name, "fence": fence})


async def put_fence(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    try:
        doc = RingDoc.parse(await read_json_object(request))
    except RingError as exc:
        raise bad_request("invalid_ring", str(exc)) from None
    await handoff.set_fence(doc)
    return json_response(
        {
            "node": handoff.name,
            "version": doc.version,
            "member": any(n.name == handoff.name for n in doc.nodes),
        }
    )


async def delete_fence(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    await handoff.clear_fence()
    return json_response({"node": handoff.name, "fence": None})


async def list_keys(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    query = dict(request.query)
    after = (_int(query, "after_uid", 0), query.get("after_key", ""))
    limit = min(max(_int(query, "limit", 1000), 1), 10_000)
    rows = await handoff.keys(after, limit)
    return json_response(
        {
            "node": handoff.name,
            "keys": [[str(u), k, h, str(p), t] for u, k, h, p, t in rows],
            "next": [str(rows[-1][0]), rows[-1][1]] if len(rows) == limit else None,
        }
    )


def _key_rows(body: dict[str, Any]) -> list[list[Any]]:
    rows = body.get("keys")
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) >= 4 for r in rows):
        raise bad_request("invalid_field", "keys must be a list of rows")
    for row in rows:
        if parse_uid(row[0]) is None or parse_uid(row[3]) is None:
            raise bad_request("invalid_field", "every key row needs a uid and a packet id")
    return rows


async def import_keys(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    rows = _key_rows(await read_json_object(request))
    try:
        parsed = [(int(u), str(k), str(h), int(p), int(t)) for u, k, h, p, t, *_ in rows]
    except (TypeError, ValueError):
        raise bad_request("invalid_field", "malformed key rows") from None
    conflicts = await handoff.import_keys(parsed)
    return json_response(
        {"imported": len(parsed) - len(conflicts), "conflicts": [[str(u), k] for u, k in conflicts]}
    )


async def release_keys(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    rows = _key_rows(await read_json_object(request))
    parsed = [(int(u), str(k), str(h), int(p)) for u, k, h, p, *_ in rows]
    return json_response({"deleted": await handoff.release_keys(parsed)})


PREFIX = "/internal/v1/handoff"
ROUTES = [
    web.get(f"{PREFIX}/ring", get_fence),
    web.put(f"{PREFIX}/ring", put_fence),
    web.delete(f"{PREFIX}/ring", delete_fence),
    web.get(f"{PREFIX}/packets", list_packets),
    web.post(f"{PREFIX}/packets/{{id}}/export", _step_handler("export")),
    web.post(f"{PREFIX}/packets/{{id}}/import", _step_handler("import")),
    web.post(f"{PREFIX}/packets/{{id}}/activate", _step_handler("activate")),
    web.post(f"{PREFIX}/packets/{{id}}/finish", _step_handler("finish")),
    web.post(f"{PREFIX}/packets/{{id}}/abort", _step_handler("abort")),
    web.post(f"{PREFIX}/packets/{{id}}/discard", _step_handler("discard")),
    web.get(f"{PREFIX}/idempotency-keys", list_keys),
    web.post(f"{PREFIX}/idempotency-keys", import_keys),
    web.post(f"{PREFIX}/idempotency-keys/release", release_keys),
]


async def start(shard: Shard, name: str) -> Handoff:
    """The node's handoff state, loaded from MySQL; installs itself as the shard's placement."""
    handoff = Handoff(shard, name)
    await handoff.load()
    shard.placement = handoff
    return handoff
