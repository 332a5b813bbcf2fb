"""Refunds the remainder of expired red packets to their senders, exactly once.

A packet becomes due ``grace`` after it expires: by then every open that the script
accepted before the expiry has committed or failed, so the remainder is final. Pending
claims are committed first (they were taken before the expiry and are owed). The refund
itself is one transaction in the ledger (:meth:`Ledger.refund`), so a sweeper that dies
anywhere leaves either a full refund or nothing, and the next run finishes the job.
"""

from __future__ import annotations

import asyncio
import logging

from redpacket.core.metrics import REFUNDS
from redpacket.node.reconciler import Reconciler
from redpacket.node.shard import Shard, now_ms

log = logging.getLogger("redpacket.node.sweeper")


class Sweeper:
    def __init__(
        self, shard: Shard, reconciler: Reconciler, interval_s: float, grace_s: float
    ) -> None:
        self._shard = shard
        self._reconciler = reconciler
        self._interval_s = interval_s
        self._grace_ms = int(grace_s * 1000)

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception:
                log.warning("refund sweep failed; retrying next round", exc_info=True)
            try:
                await self.purge_expired_keys()
            except Exception:
                log.warning("idempotency key purge failed; retrying next round", exc_info=True)
            await asyncio.sleep(self._interval_s)

    async def purge_expired_keys(self, batch: int = 500, max_batches: int = 20) -> int:
        """Delete Idempotency-Keys past their lifetime, in short batches and at most
        ``max_batches`` a round, so a backlog drains over a few rounds without long locks.
        (A key past its lifetime is already treated as unused; this only frees the space.)"""
        shard = self._shard
        expired_before = now_ms() - shard.settings.idempotency_key_ttl_s * 1000
        purged = 0
        for _ in range(max_batches):
            deleted = await shard.ledger.purge_idempotency_keys(expired_before, batch)
            purged += deleted
            if deleted < batch:
                break
        if purged:
            log.info("purged %d idempotency keys older than their lifetime", purged)
        return purged

    async def sweep_once(self, batch: int = 200) -> list[tuple[int, int]]:
        """Refund every packet that is due: ``(packet id, cents)`` for each one refunded."""
        shard = self._shard
        now = now_ms()
        refunded = []
        for packet_id in await shard.ledger.expired_active(now - self._grace_ms, batch):
            if await self._reconciler.reconcile(packet_id):
                continue  # claims taken before expiry are still uncommitted: next round
            async with shard.packet_lock(packet_id):
                amount = await shard.ledger.refund(packet_id, now)
            if amount is not None:
                REFUNDS.inc()
                refunded.append((packet_id, amount))
                log.info(
                    "red packet %s expired: refunded %d cents to its sender", packet_id, amount
                )
        return refunded
