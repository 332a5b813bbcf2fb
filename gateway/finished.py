"""Memory of finished red packets, so the crowd that arrives after the last share never
reaches a shard.

Once a packet is sold out or expired, nothing about it changes: its winners are final. The
gateway asks the owning node for them once (only after every claim has committed, so a
remembered winner is always a committed one) and from then on answers every grab and open
for that packet itself: winners get their amount (``replayed: true`` / ``already_opened``),
everybody else the final reason. Bounded in size and held for a short TTL.

Expired entries leave as new ones come, oldest first (one TTL for all, so insertion order is
expiry order), not only when someone asks for them: the crowd of a 10-share packet never
asks again once it is sold out, and entries waiting for a read that never comes filled the
cache to its bound (the gateway's memory grew all through a bench's phase).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str  # "sold_out" or "expired"
    winners: dict[int, int]  # uid -> amount in cents
    until: float  # monotonic time after which it is forgotten


class FinishedPackets:
    def __init__(self, max_entries: int, ttl_s: float, max_winners: int = 1_000_000) -> None:
        self._entries: OrderedDict[int, Finished] = OrderedDict()
        self._max_entries = max_entries
        self._max_winners = max_winners  # the real memory bound: ~100 bytes a winner
        self._winners = 0
        self._ttl_s = ttl_s
        self.learning: dict[int, asyncio.Task[None]] = {}  # winners being fetched, by packet

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, packet_id: int) -> Finished | None:
        entry = self._entries.get(packet_id)
        if entry is None:
            return None
        if entry.until < time.monotonic():
            self.forget(packet_id)
            return None
        return entry

    def remember(self, packet_id: int, reason: str, winners: dict[int, int]) -> None:
        if self._max_entries <= 0:
            return
        self.forget(packet_id)
        now = time.monotonic()
        self._entries[packet_id] = Finished(reason, winners, now + self._ttl_s)
        self._winners += len(winners)
        entries = self._entries
        while entries and (
            len(entries) > self._max_entries
            or self._winners > self._max_winners
            or next(iter(entries.values())).until < now
        ):
            _, oldest = entries.popitem(last=False)
            self._winners -= len(oldest.winners)

    def forget(self, packet_id: int) -> None:
        entry = self._entries.pop(packet_id, None)
        if entry is not None:
            self._winners -= len(entry.winners)
