"""How fast a change moves: ``--rate``, a hard cap, and for users' batches a window that adapts
to how busy the nodes are (docs/rebalancing.md, "Pacing users' moves")."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Pacer:
    """At most ``rate`` packet handoffs (or users moved) per second (0: as fast as the nodes
    go)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self, count: int = 1) -> None:
        """Wait for the turn of ``count`` handoffs (a batch takes as many turns as packets)."""
        if not self._interval:
            return
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if self._next > now:
                await asyncio.sleep(self._next - now)
            self._next = max(now, self._next) + self._interval * count


# a batch whose round trip per row is over SLOWER times the best seen means the nodes are
# busy (with opens, mostly): the window halves; otherwise it grows by one batch per window
SLOWER = 2.0
LEAST = 0.25  # below one batch in flight: a batch, then a pause of three times its length
# the best round trip seen drifts up by this much per batch, so that one lucky batch early
# on does not keep the window shut for the rest of the move (doubles in 35 batches)
DRIFT = 1.02
FLOOR_ROWS = 100  # small batches are judged as if this big (their round trip is overhead)


class Window:
    """How many users' batches are in flight: AIMD on each batch's round trip per row.

    Why: a users' batch is work for two nodes that also serve opens, and the opens' p99 is
    what suffers when both are busy. The round trip of a batch is the signal the orchestrator
    has without asking the nodes: it grows when their CPU or MySQL is contended. So, like
    TCP's congestion window, the number of batches in flight grows by one per window of
    batches that came back in time, and halves on each one that came back slow; under one
    batch in flight the window becomes a duty cycle (a batch, then a pause). ``--rate``
    (:class:`Pacer`) still caps the users moved per second on top of this.
    """

    def __init__(self, most: int) -> None:
        self.most = max(1, most)
        self.limit = float(max(1, self.most // 2))  # grows to ``most`` if the nodes keep up
        self.best_s_per_row: float | None = None
        self.backoffs = 0  # halvings (the report and the bench say how often)
        self._since_cut = 0  # batches back since the last halving
        self._in_flight = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def slot(self, rows: int) -> AsyncIterator[None]:
        """Hold one of the window's places for a batch of ``rows`` rows."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._in_flight < max(1, int(self.limit)))
            self._in_flight += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            yield
            elapsed_s = loop.time() - started
            self.record(elapsed_s, rows)
            if self.limit < 1:  # a duty cycle: the nodes get the pause to themselves
                await asyncio.sleep(elapsed_s * (1 / self.limit - 1))
        finally:
            async with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()

    def record(self, elapsed_s: float, rows: int) -> None:
        """Adjust the window to one batch's round trip."""
        cost = elapsed_s / max(rows, FLOOR_ROWS)
        best = self.best_s_per_row
        self._since_cut += 1
        if best is not None and cost > SLOWER * best:
            # once per window, as TCP: the batches in flight when it halved were slowed by
            # the same moment of contention, and would cut it again for one cause
            if self._since_cut > self.limit and self.limit > LEAST:
                self.limit = max(LEAST, self.limit / 2)
                self.backoffs += 1
                self._since_cut = 0
        else:
            self.limit = min(float(self.most), self.limit + 1 / max(1.0, self.limit))
        self.best_s_per_row = cost if best is None else min(cost, best * DRIFT)
