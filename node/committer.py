"""Group commit: concurrent claims on one node reach MySQL in small batches.

A per-claim transaction on a 2-core box commits in the low thousands per second; one
transaction per batch (one guarded update for all packets, one multi-row insert) reaches
several times that. Batching is natural, not timed: while a worker's transaction is in
flight the next claims queue up, and the next free worker takes all of them. Nobody waits
for a batch to fill, so a lone claim commits as fast as it would alone.

Every caller is answered only after the batch holding its claim has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace

from prometheus_client import Counter

from redpacket.core.metrics import COMMIT_BATCH_SIZE, COMMIT_LATENCY, OPENS_COMMITTED
from redpacket.node.counters import Counters
from redpacket.node.ledger import (
    GuardFailed,
    Ledger,
    LedgerRefused,
    LedgerUnavailable,
    LockConflict,
    ValueRefused,
)
from redpacket.node.packet import Claim

log = logging.getLogger("redpacket.node.commit")

Key = tuple[int, int]  # (red_packet_id, uid)

CLAIMS_SET_ASIDE = Counter(
    "redpacket_claims_set_aside_total",
    "Claims MySQL refused for their data, committed again without their display fields.",
)


class GroupCommitter:
    def __init__(
        self,
        ledger: Ledger,
        counters: Counters,
        *,
        max_batch: int = 256,
        workers: int = 4,
        on_diverged: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self._ledger = ledger
        self._counters = counters
        self._max_batch = max_batch
        self._workers = workers
        self._on_diverged = on_diverged
        self._queue: deque[tuple[Claim, asyncio.Future[int]]] = deque()
        self._wakeup = asyncio.Event()
        self._inflight: dict[int, set[asyncio.Future[int]]] = {}
        self._by_claim: dict[Key, asyncio.Future[int]] = {}  # queued, committing or settling
        self._tasks: list[asyncio.Task[None]] = []
        self._repairs: set[asyncio.Task[None]] = set()
        self.failed_packets: set[int] = set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self._workers)]

    async def stop(self) -> None:
        """Finish what is queued, then stop the workers."""
        while self._inflight:
            waiting = [f for futures in self._inflight.values() for f in futures]
            await asyncio.gather(*waiting, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def submit(self, claim: Claim) -> asyncio.Future[int]:
        """Queue a claim; the future gives the amount MySQL holds for it once committed.

        Synchronous on purpose: the claim is counted in flight for its packet before the
        caller yields, so :meth:`drain` can never miss it.
        """
        loop = asyncio.get_running_loop()
        key = (claim.red_packet_id, claim.uid)
        first = self._by_claim.get(key)
        if first is not None:
            # Already queued, committing or settling (the reconciler found it pending in
            # Redis, or a replay): follow that commit. A second copy would hit the unique key
            # and send its whole batch down the one-claim-per-transaction path: measured as
            # the open latency spikes every reconciler pass (docs/benchmarks.md).
            follower: asyncio.Future[int] = loop.create_future()
            first.add_done_callback(lambda f: _follow(f, follower))
            return follower
        future: asyncio.Future[int] = loop.create_future()
        self._by_claim[key] = future
        self._queue.append((claim, future))
        waiting = self._inflight.setdefault(claim.red_packet_id, set())
        waiting.add(future)
        future.add_done_callback(lambda f, pid=claim.red_packet_id: self._done(pid, f))
        self._wakeup.set()
        return future

    def _done(self, packet_id: int, future: asyncio.Future[int]) -> None:
        waiting = self._inflight.get(packet_id)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._inflight[packet_id]

    async def drain(self, packet_id: int) -> None:
        """Wait until no claim of this packet is queued or committing."""
        while waiting := self._inflight.get(packet_id):
            await asyncio.gather(*waiting, return_exceptions=True)

    def backlog(self) -> int:
        return len(self._queue)

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            try:
                await self._commit(batch)
            except Exception as exc:  # never let a worker die with callers waiting
                log.exception("group commit failed unexpectedly")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            finally:
                # only now, past the commit *and* the clearing of pending in Redis: until then
                # the reconciler can still find these claims pending, and follows them
                for claim, future in batch:
                    key = (claim.red_packet_id, claim.uid)
                    if self._by_claim.get(key) is future:
                        del self._by_claim[key]

    async def _commit(self, batch: list[tuple[Claim, asyncio.Future[int]]]) -> None:
        # The same (packet, uid) can be queued twice (a replay while the first is queued):
        # commit it once and answer both callers.
        by_key: dict[Key, tuple[Claim, list[asyncio.Future[int]]]] = {}
        for claim, future in batch:
            key = (claim.red_packet_id, claim.uid)
            if key in by_key:
                by_key[key][1].append(future)
            else:
                by_key[key] = (claim, [future])
        claims = [claim for claim, _ in by_key.values()]
        started = time.perf_counter()
        try:
            await self._ledger.commit_batch(claims)
        except (GuardFailed, LedgerRefused, LockConflict):
            # one claim that cannot go in (already committed, guard, a field that does not
            # fit) must not take the batch with it, nor may a deadlock with another batch:
            # each claim alone sorts them out
            await self._commit_one_by_one(by_key)
            return
        except LedgerUnavailable as exc:
            self._fail_all(by_key, exc)
            return
        COMMIT_LATENCY.observe(time.perf_counter() - started)
        COMMIT_BATCH_SIZE.observe(len(claims))
        OPENS_COMMITTED.inc(len(claims))
        for claim, futures in by_key.values():
            for future in futures:
                if not future.done():
                    future.set_result(claim.amount)
        await self._settle(claims)

    async def _commit_one_by_one(
        self, by_key: dict[Key, tuple[Claim, list[asyncio.Future[int]]]]
    ) -> None:
        settled: list[Claim] = []
        for claim, futures in by_key.values():
            try:
                amount, inserted = await self._commit_one(claim)
            except Exception as exc:
                if isinstance(exc, GuardFailed):
                    self._repair(claim.red_packet_id)
                elif isinstance(exc, LedgerUnavailable):
                    self.failed_packets.add(claim.red_packet_id)
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
                continue
            if amount != claim.amount:
                # MySQL holds another amount for this uid: Redis diverged, so it follows MySQL
                self._repair(claim.red_packet_id)
            if inserted:
                OPENS_COMMITTED.inc()
            COMMIT_BATCH_SIZE.observe(1)
            settled.append(claim)
            for future in futures:
                if not future.done():
                    future.set_result(amount)
        await self._settle(settled)

    async def _commit_one(self, claim: Claim) -> tuple[int, bool]:
        """One claim alone; one that MySQL refuses for its data (a display field too long for
        its column: ``1406 Data too long``) is set aside and committed without its display
        fields. The share is the user's whatever their name is: it must never stay pending,
        jam its packet, or keep its packet from being refunded (issue 19)."""
        try:
            return await self._ledger.commit_one(claim)
        except ValueRefused as exc:
            log.warning(
                "red packet %s: the claim of uid %s does not fit the ledger (%s); "
                "committing it without its display fields",
                claim.red_packet_id,
                claim.uid,
                exc,
            )
            CLAIMS_SET_ASIDE.inc()
            return await self._ledger.commit_one(replace(claim, nick_name="", img_url=""))

    def _repair(self, packet_id: int) -> None:
        """Have Redis rebuilt from MySQL for a packet where the two disagree (in the background)."""
        if self._on_diverged is None:
            return
        task = asyncio.get_running_loop().create_task(self._on_diverged(packet_id))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    def _fail_all(
        self, by_key: dict[Key, tuple[Claim, list[asyncio.Future[int]]]], exc: Exception
    ) -> None:
        for claim, futures in by_key.values():
            self.failed_packets.add(claim.red_packet_id)
            for future in futures:
                if not future.done():
                    future.set_exception(exc)

    async def _settle(self, claims: list[Claim]) -> None:
        """Drop committed claims from Redis's pending hash; if this fails the reconciler does it."""
        if not claims:
            return
        try:
            await self._counters.settle(claims)
        except Exception:
            log.warning(
                "could not clear %d settled claims from pending", len(claims), exc_info=True
            )


def _follow(first: asyncio.Future[int], follower: asyncio.Future[int]) -> None:
    """Give a follower the outcome of the commit it follows."""
    if follower.done():
        return
    if first.cancelled():
        follower.cancel()
    elif (exc := first.exception()) is not None:
        follower.set_exception(exc)
    else:
        follower.set_result(first.result())
