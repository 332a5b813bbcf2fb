"""Lands claims that Redis holds and MySQL does not, until none are left.

A claim is left pending when its commit failed (MySQL down: the client got 503) or when the
node died between the script and the commit (the client got no answer). Either way the
client was never told "200", so the claim is still owed to MySQL, not to them: the
reconciler commits it through the same group committer (idempotent on (packet, uid)).

Where to look: packets whose commit failed in this process (known at once), and a full scan
of Redis for pending hashes at start and every ``interval`` (catches a crash).
"""

from __future__ import annotations

import asyncio
import logging

from redpacket.core.metrics import RECONCILER_BACKLOG
from redpacket.node.ledger import GuardFailed
from redpacket.node.shard import Shard, now_ms

log = logging.getLogger("redpacket.node.reconciler")

IN_FLIGHT_GRACE_MS = 1000  # a claim this young is still on its way through its own commit


class Reconciler:
    def __init__(self, shard: Shard, interval_s: float) -> None:
        self._shard = shard
        self._interval_s = interval_s

    async def run(self) -> None:
        retry_s = 0.5
        while True:
            try:
                backlog = await self.pass_once()
            except Exception:
                log.warning("reconciler pass failed; retrying", exc_info=True)
                backlog = -1
            if backlog != 0 or self._shard.committer.failed_packets:
                wait_s, retry_s = retry_s, min(retry_s * 2, self._interval_s)
            else:
                wait_s, retry_s = self._interval_s, 0.5
            await asyncio.sleep(wait_s)

    async def pass_once(self) -> int:
        """One sweep over every packet with pending claims; how many claims are still pending."""
        shard = self._shard
        candidates = set(shard.committer.failed_packets)
        shard.committer.failed_packets.clear()
        async for packet_id in shard.counters.packets_with_pending():
            candidates.add(packet_id)
        backlog = 0
        for packet_id in sorted(candidates):
            backlog += await self.reconcile(packet_id, min_age_ms=IN_FLIGHT_GRACE_MS)
        RECONCILER_BACKLOG.set(backlog)
        return backlog

    async def reconcile(self, packet_id: int, min_age_ms: int = 0) -> int:
        """Commit one packet's pending claims; how many could not be committed.

        Claims younger than ``min_age_ms`` are left to the open that took them, which is
        committing them right now (the periodic pass sees many of those under load).
        """
        shard = self._shard
        async with shard.packet_lock(packet_id):
            now = now_ms()
            claims = [
                claim
                for claim in await shard.counters.pending(packet_id)
                if now - claim.claimed_at_ms >= min_age_ms
            ]
            if not claims:
                return 0
            results = await asyncio.gather(
                *(shard.committer.submit(claim) for claim in claims), return_exceptions=True
            )
        failed = [r for r in results if isinstance(r, BaseException)]
        if any(isinstance(r, GuardFailed) for r in failed):
            await shard.resync(packet_id)  # MySQL cannot take them: Redis must follow MySQL
            return 0
        if failed:
            shard.committer.failed_packets.add(packet_id)
        else:
            log.info("red packet %s: %d pending claim(s) committed", packet_id, len(claims))
        return len(failed)
