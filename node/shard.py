"""What one shard node does with its red packets: create, grab, open, rebuild.

The flow of one open, top to bottom:

1. admission (``admission.py``): wait while as many opens run as there are shares left;
   non-winners of a finished packet are answered from memory here;
2. ``open.lua`` (via ``counters.py``): atomically take a share in Redis, or say why not;
3. group commit (``committer.py`` -> ``ledger.py``): the share is written to MySQL with
   other concurrent ones in one transaction; the caller waits for that commit;
4. the answer: 200 only after the commit. If MySQL did not commit, 503: the share stays
   this user's in Redis (a retry returns the same amount) and the reconciler lands it.

Redis can lose a packet (restart without persistence, eviction, a handoff). The node then
rebuilds it from MySQL before serving it again (:meth:`Shard.rebuild`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from redpacket.core.clock import now_ms  # the node's one clock (re-exported for its modules)
from redpacket.core.errors import ApiError, gone, not_found, unavailable
from redpacket.core.profile import bound_img_url, bound_nick
from redpacket.node.admission import Admission, PacketGate
from redpacket.node.committer import GroupCommitter
from redpacket.node.counters import Counters, OpenResult, Outcome, claim_details
from redpacket.node.ledger import (
    CreateAbandoned,
    GuardFailed,
    IdCollision,
    Ledger,
)
from redpacket.node.packet import Claim, PacketRow, PacketTerms, terms_of
from redpacket.node.redis_keys import packet_keys
from redpacket.node.settings import NodeSettings

log = logging.getLogger("redpacket.node.shard")


def frozen() -> ApiError:
    return ApiError(
        409,
        "packet_frozen",
        "this red packet is moving between shards; retry shortly",
        headers={"Retry-After": "1"},
    )


def moved(owner: str, owner_url: str = "") -> ApiError:
    """421: another shard serves this packet now (``owner`` is its ring name)."""
    extra = {"owner": owner, **({"owner_url": owner_url} if owner_url else {})}
    return ApiError(421, "packet_moved", "this red packet is served by another shard", extra=extra)


def not_for_you() -> ApiError:
    return ApiError(403, "not_for_you", "this red packet was sent to someone else")


def id_collision() -> ApiError:
    return ApiError(409, "id_collision", "red_packet_id is taken by another packet; use a new id")


# red_packet_info.status of a copy that is being handed between shards (node/handoff/):
# it takes no claims and no refund, and is served by nobody until the handoff settles.
MOVING = "moving"


class Placement(Protocol):
    """What this node knows of packets that live elsewhere (node/handoff/fence.py)."""

    def admitting(self) -> AbstractContextManager[None]:
        """Counts a create or key binding in flight, so a rebalance can wait for it."""
        ...

    async def moved(self, packet_id: int) -> ApiError | None:
        """packet_moved if this node handed the packet off (it keeps a tombstone), else None."""
        ...

    def elsewhere(self, key: str) -> ApiError | None:
        """packet_moved if the ring a rebalance is moving to gives ``key`` to another node."""
        ...

    def packet_elsewhere(self, packet_id: int) -> ApiError | None:
        """packet_moved if that ring places the packet (by its version) on another node."""
        ...

    async def existing_for_create(self, packet_id: int) -> PacketRow | None:
        """None: create it here. A row: another node owns the id now, but this one still holds
        it (answer with it). Raises packet_moved when the id belongs to another node."""
        ...

    async def existing_key(self, uid: int, key: str) -> tuple[int, str] | None:
        """Like :meth:`existing_for_create`, for an idempotency key of a user."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class NewPacketRequest(PacketTerms):
    """A create: the sender's terms (node/packet.py) and how long the packet lives."""

    expire_s: int


class Shard:
    def __init__(self, settings: NodeSettings, counters: Counters, ledger: Ledger) -> None:
        self.settings = settings
        self.counters = counters
        self.ledger = ledger
        self.admission = Admission(wait_s=settings.admission_wait_s)
        self.committer = GroupCommitter(
            ledger,
            counters,
            max_batch=settings.commit_max_batch,
            workers=settings.commit_workers,
            on_diverged=self.resync,
        )
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}
        self.placement: Placement | None = None  # set once the node can hand packets off

    async def absent(self, packet_id: int) -> ApiError:
        """The answer for a packet this node does not hold: moved (tombstone, or the ring a
        rebalance is moving to names another owner) or not found."""
        if self.placement is not None:
            placement = self.placement
            err = await placement.moved(packet_id) or placement.packet_elsewhere(packet_id)
            if err is not None:
                return err
        return not_found()

    async def moving(self, packet_id: int) -> ApiError:
        """The answer for a packet frozen or inert for a handoff: moved once it has, else 409."""
        if self.placement is not None and (err := await self.placement.moved(packet_id)):
            return err
        return frozen()

    # -- create -------------------------------------------------------------------------

    async def create(self, req: NewPacketRequest) -> tuple[PacketRow, bool]:
        if self.placement is None:
            return await self._create(req)
        with self.placement.admitting():
            existing = await self.placement.existing_for_create(req.red_packet_id)
            if existing is None:
                return await self._create(req)
        if existing.create_token != req.create_token:
            raise id_collision()
        return existing, False

    async def _create(self, req: NewPacketRequest) -> tuple[PacketRow, bool]:
        """MySQL first, then Redis: a packet Redis lacks is rebuilt on first use, never lost."""
        created_ms = now_ms()
        terms = terms_of(req)
        terms.update(
            sender_nick=bound_nick(req.sender_nick), sender_img=bound_img_url(req.sender_img)
        )
        row = PacketRow(
            **terms,
            remaining_amount=req.total_amount,
            remaining_packet=req.total_packet,
            status="active",
            create_time_ms=created_ms,
            expire_time_ms=created_ms + req.expire_s * 1000,
        )
        try:
            stored, created = await self.ledger.insert_packet(row)
        except IdCollision:
            raise id_collision() from None
        except CreateAbandoned:
            # the wallet's sweeper gave this create's money back (node/wallet/abandon.py)
            raise ApiError(
                409, "create_abandoned", "this create was abandoned; retry with a new request"
            ) from None
        if created:
            with contextlib.suppress(Exception):  # Redis missing it is repaired on first use
                await self.counters.load(
                    stored, {}, replace=False, drop_at_ms=self._drop_at(stored)
                )
        return stored, created

    # -- grab ---------------------------------------------------------------------------

    async def grab(self, packet_id: int, uid: int) -> tuple[Outcome, int]:
        gate = self.admission.peek(packet_id)
        if gate is not None and (reason := gate.rejection_for(uid)) is not None:
            return reason, 0
        for _ in range(3):
            outcome, amount = await self.counters.grab(packet_id, uid, now_ms())
            if outcome != Outcome.NOT_LOADED:
                return outcome, amount
            await self.rebuild(packet_id)
        raise unavailable("red packet could not be loaded")

    # -- open ---------------------------------------------------------------------------

    async def open(
        self, packet_id: int, uid: int, nick_name: str, img_url: str
    ) -> tuple[int, bool]:
        """``(amount, replayed)`` once MySQL holds the share; ApiError otherwise."""
        nick_name, img_url = bound_nick(nick_name), bound_img_url(img_url)
        for _ in range(5):
            gate = self.admission.gate(packet_id)
            if (reason := gate.rejection_for(uid)) is not None:
                raise gone("sold_out" if reason == Outcome.SOLD_OUT else "expired")
            await self.admission.enter(gate)
            result: OpenResult | None = None
            commit: asyncio.Future[int] | None = None
            try:
                claimed_at = now_ms()
                claim = Claim(packet_id, uid, 0, nick_name, img_url, claimed_at)
                result = await self.counters.open(
                    packet_id, uid, secrets.randbits(31), claimed_at, claim_details(claim)
                )
                if result.outcome == Outcome.NEW_SHARE:
                    commit = self.committer.submit(with_amount(claim, result.amount))
                elif result.outcome == Outcome.ALREADY_OPENED and result.pending:
                    commit = self.committer.submit(await self._pending_claim(claim, result.amount))
            finally:
                self.admission.leave(gate, result)
            outcome = result.outcome
            if outcome == Outcome.NOT_LOADED:
                await self.rebuild(packet_id)
                continue
            if outcome == Outcome.NOT_FOR_YOU:
                raise not_for_you()
            if outcome == Outcome.FROZEN:
                if not (
                    await self._wait_for_local_rebuild(packet_id)
                    or await self._thaw_if_stale(packet_id)
                ):
                    raise await self.moving(packet_id)
                continue
            if outcome in (Outcome.SOLD_OUT, Outcome.EXPIRED):
                self._learn_winners(packet_id, gate)
                raise gone("sold_out" if outcome == Outcome.SOLD_OUT else "expired")
            replayed = outcome == Outcome.ALREADY_OPENED
            if commit is None:
                return result.amount, replayed
            return await self._committed(commit), replayed
        raise unavailable("red packet is being rebuilt; retry")

    async def _committed(self, commit: asyncio.Future[int]) -> int:
        try:
            return await asyncio.shield(commit)
        except GuardFailed:
            raise unavailable("the shard is repairing this red packet; retry") from None

    async def _pending_claim(self, claim: Claim, amount: int) -> Claim:
        """The claim as first taken (its original time and profile), for a replay to commit."""
        for pending in await self.counters.pending(claim.red_packet_id):
            if pending.uid == claim.uid:
                return pending
        return with_amount(claim, amount)

    def _learn_winners(self, packet_id: int, gate: PacketGate) -> None:
        """Load a finished packet's winners once, so later non-winners never reach Redis."""
        if gate.winners is not None or gate.loading is not None:
            return

        async def load() -> None:
            try:
                winners = await self.counters.claims(packet_id)
                self.admission.remember_winners(packet_id, gate, winners)
            except Exception:
                log.warning("could not load winners of %s", packet_id, exc_info=True)
            finally:
                gate.loading = None

        gate.loading = asyncio.ensure_future(load())

    async def winners(self, packet_id: int) -> tuple[Outcome | None, dict[int, int], bool]:
        """``(final reason or None, uid -> amount, all committed)``, for the gateway's memory."""
        info, claims, pending = packet_keys(packet_id)
        pipe = self.counters.client.pipeline(transaction=False)
        pipe.hmget(info, "remaining_packet", "expire_at_ms")
        pipe.hgetall(claims)
        pipe.hlen(pending)
        (remaining, expire_at), raw, pending_count = await pipe.execute()
        if remaining is None:
            await self.rebuild(packet_id)
            return None, {}, False
        reason = None
        if int(expire_at) <= now_ms():
            reason = Outcome.EXPIRED
        elif int(remaining) == 0:
            reason = Outcome.SOLD_OUT
        return reason, {int(u): int(a) for u, a in raw.items()}, pending_count == 0

    # -- rebuild ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def packet_lock(self, packet_id: int) -> AsyncIterator[None]:
        """Serialises rebuilds, resyncs, reconciliation and handoff of one packet."""
        lock, users = self._locks.get(packet_id, (asyncio.Lock(), 0))
        self._locks[packet_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[packet_id]
            if users == 1:
                del self._locks[packet_id]
            else:
                self._locks[packet_id] = (lock, users - 1)

    async def _wait_for_local_rebuild(self, packet_id: int) -> bool:
        """If this node froze the packet (a resync), wait for it; False if someone else did."""
        entry = self._locks.get(packet_id)
        if entry is None:
            return False
        async with self.packet_lock(packet_id):
            return True

    async def quiesce(self, packet_id: int) -> None:
        """Wait until no open of this packet is between its script and its commit."""
        while (gate := self.admission.peek(packet_id)) is not None and not gate.idle():
            await gate.wait_changed(0.05)
        await self.committer.drain(packet_id)

    async def rebuild(self, packet_id: int, *, replace: bool = False) -> PacketRow:
        """Load a packet into Redis from MySQL, the ledger of record.

        ``replace`` (a resync) first freezes the packet so no new share is taken, waits for
        every claim already taken to finish committing, then replaces Redis's copy with
        MySQL's: claims MySQL never committed were never acknowledged, so dropping them
        loses nothing a client was told it had.
        """
        async with self.packet_lock(packet_id):
            return await self._rebuild_locked(packet_id, replace=replace)

    async def _rebuild_locked(self, packet_id: int, *, replace: bool) -> PacketRow:
        if replace:
            await self.counters.freeze(packet_id, True)
        await self.quiesce(packet_id)
        packet = await self.ledger.get_packet(packet_id)  # LedgerUnavailable: 503 (calls.py)
        if packet is None:
            raise await self.absent(packet_id)
        if packet.status == MOVING:
            raise await self.moving(packet_id)
        claims = await self.ledger.committed_claims(packet_id)
        await self.counters.load(packet, claims, replace=replace, drop_at_ms=self._drop_at(packet))
        self.admission.forget(packet_id)
        return packet

    async def _thaw_if_stale(self, packet_id: int) -> bool:
        """Finish a resync that froze this packet and then failed; True to try the open again.

        A packet is frozen in Redis by a handoff (which marks it ``MOVING`` in MySQL and
        holds its lock while it works) or by a resync (which holds the lock, and unfreezes
        by reloading). A resync that could not read MySQL (cut, restarted) or a process
        that died in the middle leaves the packet frozen with nobody to thaw it: every open
        would answer "frozen" forever (chaos seed 1 found it after a clock jump and a
        MySQL cut). So the first open that finds it frozen here, unlocked and not
        ``MOVING``, does the resync itself; the others wait on the lock and find it thawed.
        """
        async with self.packet_lock(packet_id):
            if not await self.counters.is_frozen(packet_id):
                return True
            packet = await self.ledger.get_packet(packet_id)
            if packet is None or packet.status == MOVING:
                return False
            log.warning(
                "red packet %s: frozen by a resync that did not finish; resyncing", packet_id
            )
            await self._rebuild_locked(packet_id, replace=True)
            return True

    async def resync(self, packet_id: int) -> None:
        """Make Redis agree with MySQL for one packet after they were found to disagree."""
        log.warning(
            "red packet %s: Redis and MySQL disagree, rebuilding Redis from MySQL", packet_id
        )
        try:
            await self.rebuild(packet_id, replace=True)
        except Exception:
            log.exception("resync of red packet %s failed; the reconciler will retry", packet_id)
            self.committer.failed_packets.add(packet_id)

    # -- idempotency keys ---------------------------------------------------------------

    async def claim_idempotency_key(
        self, uid: int, key: str, request_hash: str, packet_id: int, now: int
    ) -> tuple[int, str]:
        """Bind (uid, key) here, unless a rebalance gave this user to another node."""
        expired = now - self.settings.idempotency_key_ttl_s * 1000
        if self.placement is None:
            return await self.ledger.claim_idempotency_key(
                uid, key, request_hash, packet_id, now, expired_before_ms=expired
            )
        with self.placement.admitting():
            existing = await self.placement.existing_key(uid, key)
            if existing is not None:
                return existing
            return await self.ledger.claim_idempotency_key(
                uid, key, request_hash, packet_id, now, expired_before_ms=expired
            )

    def _drop_at(self, packet: PacketRow) -> int:
        return packet.expire_time_ms + self.settings.redis_retention_s * 1000


def with_amount(claim: Claim, amount: int) -> Claim:
    return dataclasses.replace(claim, amount=amount)
