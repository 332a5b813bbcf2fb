"""The opens' p99 on the nodes of a change: before it (the baseline) and while users move
(the signal of the users' :class:`~redpacket.sharding.rebalance.pacer.Window`;
docs/rebalancing.md, "Pacing users' moves").

Each node keeps its open latency in a Prometheus histogram (core/metrics.py
``HTTP_LATENCY``), cumulative since it started, and remembers it as it was a few seconds
ago (``RecentBuckets``). The baseline is the opens between that reading and now, so it is
read at once, of the seconds before the command; while users move, two reads a moment apart
give the opens of that moment. Every node of the change is read (old owners and new: both
serve opens and both do a batch's work), their differences summed, and the p99 interpolated
inside its bucket (core/metrics.py ``quantile``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from redpacket.core.metrics import quantile
from redpacket.sharding.client import HandoffClient, OpenHistogram
from redpacket.sharding.rebalance.pacer import SPAN_READINGS, Window
from redpacket.sharding.ring import NodeSpec

EVERY_S = 0.25  # a reading per node this often while users move (a span: SPAN_READINGS of them)
# a node slower than this to say is left out of that reading: a hung node must not hold the
# window where it is for the client's whole timeout (30 s)
READ_TIMEOUT_S = 1.0

Reads = dict[str, list[tuple[float, float]]]  # node -> its cumulative buckets


class OpenLatency:
    """Reads the open latency histograms of ``nodes``."""

    def __init__(self, client: HandoffClient, nodes: dict[str, NodeSpec]) -> None:
        self.client = client
        self.nodes = nodes

    async def read(self) -> Reads:
        """Every node's histogram now (a node that does not answer is left out)."""
        return {name: answer.now for name, answer in (await self._read_all()).items()}

    async def baseline(self) -> float | None:
        """The opens' p99 over the last seconds, as the nodes remember them (``None``: no
        opens, or no node remembers: nodes of a release before this; see Window)."""
        answers = await self._read_all()
        earlier = {n: a.earlier for n, a in answers.items() if a.earlier is not None}
        p99_s, _ = p99_between(earlier, {n: answers[n].now for n in earlier})
        return p99_s

    async def _read_all(self) -> dict[str, OpenHistogram]:
        names = list(self.nodes)
        answers = await asyncio.gather(*(self._read_one(self.nodes[n]) for n in names))
        return {name: answer for name, answer in zip(names, answers, strict=True) if answer}

    async def _read_one(self, node: NodeSpec) -> OpenHistogram | None:
        try:
            return await asyncio.wait_for(self.client.open_latency(node), READ_TIMEOUT_S)
        except TimeoutError:
            return None

    @contextlib.asynccontextmanager
    async def pacing(self, window: Window) -> AsyncIterator[None]:
        """Feed ``window`` a reading every EVERY_S while the block runs (if it paces by
        latency at all)."""
        if window.threshold_s is None:
            yield
            return
        task = asyncio.ensure_future(self._watch(window))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self, window: Window) -> None:
        reads: deque[Reads] = deque([await self.read()], maxlen=SPAN_READINGS + 1)
        while True:
            await asyncio.sleep(EVERY_S)
            reads.append(await self.read())
            p99_s, opens = p99_between(reads[0], reads[-1])
            window.reading(p99_s, opens)
            await window.wake()


def p99_between(before: Reads, after: Reads) -> tuple[float | None, int]:
    """The p99 of the opens between two reads, every node together, and how many there were.
    A node missing from either read, or whose counts went down (it restarted), is left out."""
    summed: list[tuple[float, float]] | None = None
    for name, now in after.items():
        then = before.get(name)
        if then is None or len(then) != len(now):
            continue
        diff = [(bound, count - old) for (bound, count), (_, old) in zip(now, then, strict=True)]
        if diff[-1][1] < 0:
            continue
        summed = (
            diff
            if summed is None
            else [(b, c + d) for (b, c), (_, d) in zip(summed, diff, strict=True)]
        )
    if not summed:
        return None, 0
    return quantile(summed, 0.99), int(summed[-1][1])
