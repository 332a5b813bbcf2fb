"""Per-packet admission: the seed's request queue, kept in the node's memory.

A hot packet has far more contenders than shares. Running the open script for every one
of them costs a Redis round trip each and changes nothing once the shares are gone. So:

- at most about as many opens run the script at once as the packet has shares left; the
  others wait (briefly, bounded) for those to finish instead of being refused, so nobody who
  could still win a share while shares remain is turned away;
- once the script has said "sold out" or "expired", the node loads the final set of winners
  once and answers every later non-winner from memory, touching Redis zero times. Winners
  still go through the script, which answers their replay (and commits it if needed).

A node is the only writer of its packets, so this memory is exact for it; a rebuild or a
handoff forgets the packet's gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict

from redpacket.node.counters import OpenResult, Outcome

_FINAL = (Outcome.SOLD_OUT, Outcome.EXPIRED)


class PacketGate:
    __slots__ = ("_changed", "closed", "inflight", "loading", "remaining", "winners")

    def __init__(self) -> None:
        self.inflight = 0
        self.remaining: int | None = None  # shares left, as the script last reported
        self.closed: Outcome | None = None  # SOLD_OUT or EXPIRED once the script said so
        self.winners: dict[int, int] | None = None  # every claim, once closed (final set)
        self.loading: asyncio.Future[None] | None = None
        self._changed = asyncio.Event()

    def idle(self) -> bool:
        return self.inflight == 0

    def rejection_for(self, uid: int) -> Outcome | None:
        """The final answer for a uid that took no share, when memory can give it."""
        if self.closed is not None and self.winners is not None and uid not in self.winners:
            return self.closed
        return None

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout_s: float) -> bool:
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await changed.wait()
            return True
        return False


class Admission:
    def __init__(
        self, max_gates: int = 50_000, wait_s: float = 0.5, max_winners: int = 1_000_000
    ) -> None:
        self._gates: OrderedDict[int, PacketGate] = OrderedDict()
        self._max_gates = max_gates
        self._max_winners = max_winners  # the real memory bound: ~100 bytes a winner
        self._winners = 0
        self._wait_s = wait_s

    def gate(self, packet_id: int) -> PacketGate:
        gate = self._gates.get(packet_id)
        if gate is None:
            gate = self._gates[packet_id] = PacketGate()
            self._evict()
        else:
            self._gates.move_to_end(packet_id)
        return gate

    def peek(self, packet_id: int) -> PacketGate | None:
        return self._gates.get(packet_id)

    def forget(self, packet_id: int) -> None:
        """Drop what memory knows of a packet (after a rebuild or a handoff)."""
        gate = self._gates.pop(packet_id, None)
        if gate is not None:
            gate.closed = None
            self._winners -= len(gate.winners or ())
            gate.winners = None
            gate.remaining = None
            gate.notify()

    def remember_winners(self, packet_id: int, gate: PacketGate, winners: dict[int, int]) -> None:
        """Keep a finished packet's final winners (counted against the memory bound)."""
        if self._gates.get(packet_id) is gate:
            self._winners += len(winners) - len(gate.winners or ())
        gate.winners = winners
        self._evict()

    def _evict(self) -> None:
        """Drop least recently used idle gates while over either bound."""
        while len(self._gates) > self._max_gates or self._winners > self._max_winners:
            for packet_id, gate in self._gates.items():
                if gate.idle():
                    del self._gates[packet_id]
                    self._winners -= len(gate.winners or ())
                    break
            else:
                return

    async def enter(self, gate: PacketGate) -> None:
        """Wait while as many opens are running as there are shares left, then count this one in."""
        deadline = time.monotonic() + self._wait_s
        while (
            gate.closed is None
            and gate.remaining is not None
            and 0 < gate.remaining <= gate.inflight
        ):
            left = deadline - time.monotonic()
            if left <= 0 or not await gate.wait_changed(left):
                break  # never refuse while shares remain: past the wait, run the script
        gate.inflight += 1

    def leave(self, gate: PacketGate, result: OpenResult | None) -> None:
        gate.inflight -= 1
        if result is not None and result.outcome not in (Outcome.NOT_LOADED, Outcome.FROZEN):
            gate.remaining = result.remaining_packet
            if result.outcome in _FINAL:
                gate.closed = result.outcome
        gate.notify()
