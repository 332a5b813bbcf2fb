"""The fence and tombstones: what a node knows of packets and users that live elsewhere.

The fence is the ring a rebalance moves to, stored in MySQL (table ``shard_ring``) while the
change is in progress. Once fenced, a node refuses to create a packet, or to bind an
idempotency key of a user (or apply history of a user), that this ring gives to another node,
unless it already holds it: it answers 421 packet_moved with the owner. Creates, key bindings
and history deliveries in flight when the fence goes up are waited for. A node also
redirects, rather than 404s, calls for packets it does not hold that the fence ring gives to
another node, and answers packet_moved from a tombstone for a packet it handed off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from redpacket.core.errors import ApiError
from redpacket.core.errors import unavailable as unavailable_error
from redpacket.node.ledger import PacketRow
from redpacket.node.shard import Shard, moved
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc, RingError, packet_owner, user_key

log = logging.getLogger("redpacket.node.handoff")


class HandoffConflict(ApiError):
    """The node's state does not allow this step (the orchestrator asked for the wrong one)."""

    def __init__(self, message: str) -> None:
        super().__init__(409, "handoff_conflict", message)


@dataclass(frozen=True, slots=True)
class Tombstone:
    owner: str
    owner_url: str
    ring_version: int


class Fence:
    """The fence and tombstones of one node; the shard's :class:`Placement`."""

    def __init__(self, shard: Shard, name: str) -> None:
        self.shard = shard
        self.name = name
        self.fence: RingDoc | None = None
        self._fence_ring: Ring | None = None
        # the ring of the last change this node was fenced for, kept after the fence is lifted:
        # users' history follows it until this node's ring file is as new (node/history.py)
        self.settled: RingDoc | None = None
        self.has_tombstones = False
        # creates and key bindings in flight, by the fence epoch they started in
        self._epoch = 0
        self._inflight: dict[int, int] = {}
        self._drained = asyncio.Event()  # set: nothing from before the last fence is in flight
        self._drained.set()
        # (ring version, the ring users move from) while users' wallets are arriving here:
        # their calls are refused until each one's wallet is in (node/handoff/wallets.py)
        self.incoming: tuple[int, Ring] | None = None

    # -- start ----------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the fence and whether any tombstone exists (the schema is applied already)."""
        async with self.shard.ledger.read() as cur:
            await cur.execute("SELECT ring_json FROM shard_ring WHERE id = 1")
            row = await cur.fetchone()
            await cur.execute("SELECT 1 FROM red_packet_tombstone LIMIT 1")
            self.has_tombstones = await cur.fetchone() is not None
            await cur.execute("SELECT ring_version, from_json FROM wallet_incoming WHERE id = 1")
            incoming = await cur.fetchone()
        if incoming is not None:
            with contextlib.suppress(RingError, orjson.JSONDecodeError):
                doc = RingDoc.parse(orjson.loads(incoming[1]))
                self.incoming = (int(incoming[0]), doc.ring())
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
        if not self.has_tombstones:
            return None
        tomb = await self.tombstone(packet_id)
        return moved(tomb.owner, tomb.owner_url) if tomb else None

    def elsewhere(self, key: str) -> ApiError | None:
        owner = self.owner_elsewhere(key)
        return moved(owner.name, owner.url) if owner is not None else None

    def packet_elsewhere(self, packet_id: int) -> ApiError | None:
        owner = self.packet_owner_elsewhere(packet_id)
        return moved(owner.name, owner.url) if owner is not None else None

    def owner_elsewhere(self, key: str) -> NodeSpec | None:
        """The owner the fence ring's newest version gives ``key`` (a user's key), if that is
        another node; else None."""
        if self._fence_ring is None:
            return None
        owner = self._fence_ring.owner_of_key(key)
        return None if owner.name == self.name else owner

    def packet_owner_elsewhere(self, packet_id: int) -> NodeSpec | None:
        """The owner the fence ring gives a packet (by the version that places it, so a
        packet created after a version's ``since_ms`` belongs to that version's owner), if
        that is another node; else None.

        Once the fence is lifted the ring of that change (``settled``) still answers: a call
        routed by the transition ring may arrive after the lift (chaos seed 1: grabs that
        waited behind this node's paused Redis reached it just after a `rebalance add`
        ended, for packets created on the new shard, and were answered 404)."""
        doc = self.fence if self.fence is not None else self.settled
        if doc is None:
            return None
        owner = packet_owner(doc, packet_id)
        return None if owner.name == self.name else owner

    async def existing_for_create(self, packet_id: int) -> PacketRow | None:
        err = await self.moved(packet_id)
        if err is not None:
            raise err
        owner = self.packet_owner_elsewhere(packet_id)
        if owner is None:
            return None
        row = await self.shard.ledger.get_packet(packet_id)
        if row is None:
            raise moved(owner.name, owner.url)
        return row

    async def existing_key(self, uid: int, key: str) -> tuple[int, str] | None:
        owner = self.owner_elsewhere(user_key(uid))
        if owner is None:
            return None
        async with self.shard.ledger.read() as cur:
            await cur.execute(
                "SELECT red_packet_id, request_hash FROM idempotency_key "
                "WHERE uid = %s AND idem_key = %s",
                (uid, key),
            )
            row = await cur.fetchone()
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
        body = orjson.dumps(doc.settled().as_dict()).decode()
        async with self.shard.ledger.transaction() as cur:
            await cur.execute(
                "INSERT INTO shard_ring (id, version, ring_json) VALUES (1, %s, %s) "
                "ON DUPLICATE KEY UPDATE version = VALUES(version), ring_json = VALUES(ring_json)",
                (doc.version, body),
            )
        self._set_fence(doc.settled())
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
        async with self.shard.ledger.transaction() as cur:
            await cur.execute("DELETE FROM shard_ring WHERE id = 1")
            await cur.execute("DELETE FROM wallet_incoming")
            await cur.execute("DELETE FROM wallet_arrival")
        self.incoming = None
        if self.fence is not None:
            self.settled = self.fence
        self.fence, self._fence_ring = None, None

    # -- wallets arriving -------------------------------------------------------------------

    async def expect_wallets(self, version: int, moving_from: RingDoc) -> None:
        """Users that ``moving_from`` gives to other nodes and the fence gives here are
        arriving: refuse their wallet calls until each wallet is in. Set before the fence, so
        no call of theirs is ever answered here from a wallet that is not all here yet (a
        top-up replay answered 201 a second time, a balance read as empty)."""
        body = orjson.dumps(moving_from.settled().as_dict()).decode()
        async with self.shard.ledger.transaction() as cur:
            if self.incoming is None or self.incoming[0] != version:  # another change's marks
                await cur.execute("DELETE FROM wallet_arrival")
            await cur.execute(
                "INSERT INTO wallet_incoming (id, ring_version, from_json) VALUES (1, %s, %s) "
                "ON DUPLICATE KEY UPDATE ring_version = VALUES(ring_version), "
                "from_json = VALUES(from_json)",
                (version, body),
            )
        self.incoming = (version, moving_from.settled().ring())

    async def wallets_in(self) -> None:
        """The rebalance tool imported every arriving wallet: serve all users again."""
        async with self.shard.ledger.transaction() as cur:
            await cur.execute("DELETE FROM wallet_incoming")
            await cur.execute("DELETE FROM wallet_arrival")
        self.incoming = None

    async def wallet_arriving(self, uid: int) -> bool:
        """Is this user's wallet still on its way here (its calls must wait)?"""
        if self.incoming is None:
            return False
        version, moving_from = self.incoming
        if moving_from.owner_of_key(user_key(uid)).name == self.name:
            return False  # the user was here already
        async with self.shard.ledger.read() as cur:
            await cur.execute(
                "SELECT 1 FROM wallet_arrival WHERE uid = %s AND ring_version = %s", (uid, version)
            )
            arrived = await cur.fetchone() is not None
        return not arrived

    # -- reads ----------------------------------------------------------------------------

    async def tombstone(self, packet_id: int) -> Tombstone | None:
        async with self.shard.ledger.read() as cur:
            await cur.execute(
                "SELECT owner, owner_url, ring_version FROM red_packet_tombstone "
                "WHERE red_packet_id = %s",
                (packet_id,),
            )
            row = await cur.fetchone()
        return Tombstone(str(row[0]), str(row[1]), int(row[2])) if row else None

    def current(self, ring_version: int) -> None:
        """Refuse a step made for an older ring than this node's fence (a stale rebalance)."""
        if self.fence is not None and ring_version < self.fence.version:
            raise HandoffConflict(
                f"this step is for ring version {ring_version}, but this node is fenced with "
                f"version {self.fence.version}"
            )
