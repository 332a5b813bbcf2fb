"""How far "my red packets" trails the opens under the benchmark's load (issue 12's 1 s p99).

Every committed open writes a history event to its shard's outbox; the relay delivers it to
the shard that owns the user, which observes ``redpacket_history_lag_seconds`` (commit of
the event → its apply there) when it applies it. The benchmark reads that histogram from
every node before and after the load and reports the difference, and samples the outbox
backlog gauge while the load runs. Histogram buckets bound the percentiles: "p99 ≤ 0.25 s"
means at least 99% of the events were applied within 0.25 s of their commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from redpacket.bench.scrape import metrics_pages
from redpacket.sharding.ring import NodeSpec

LAG = "redpacket_history_lag_seconds"
BACKLOG = "redpacket_history_outbox_backlog"
# a share taken -> credited to the winner's wallet on the wallet's shard (node/wallet/
# credits.py, issue 18); a cluster whose nodes predate wallets reports n/a
CREDIT_LAG = "redpacket_credit_lag_seconds"


@dataclass
class HistorySample:
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    count: float = 0.0
    total_s: float = 0.0
    backlog: float = 0.0  # summed over nodes
    credit_buckets: dict[float, float] = field(default_factory=dict)
    credit_count: float | None = None  # None: no node exposes the credit lag


async def sample(nodes: list[NodeSpec]) -> HistorySample:
    """The lag histogram and the outbox backlog, summed over every node that answers."""
    out = HistorySample()
    for text in await metrics_pages(nodes):
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == LAG + "_bucket":
                    le = float(s.labels["le"])
                    out.buckets[le] = out.buckets.get(le, 0.0) + s.value
                elif s.name == LAG + "_count":
                    out.count += s.value
                elif s.name == LAG + "_sum":
                    out.total_s += s.value
                elif s.name == BACKLOG:
                    out.backlog += s.value
                elif s.name == CREDIT_LAG + "_bucket":
                    le = float(s.labels["le"])
                    out.credit_buckets[le] = out.credit_buckets.get(le, 0.0) + s.value
                elif s.name == CREDIT_LAG + "_count":
                    out.credit_count = (out.credit_count or 0.0) + s.value
    return out


class BacklogWatch:
    """Samples the summed outbox backlog every ``every_s`` while the load runs."""

    def __init__(self, nodes: list[NodeSpec], every_s: float = 1.0) -> None:
        self._nodes, self._every_s = nodes, every_s
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append((await sample(self._nodes)).backlog)
            await asyncio.sleep(self._every_s)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _bound(buckets: dict[float, float], total: float, q: float) -> float | None:
    """The smallest bucket bound that holds at least ``q`` of the events."""
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return None


async def drain(nodes: list[NodeSpec], timeout_s: float) -> HistorySample:
    """The sample once every outbox is empty (or ``timeout_s`` has passed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    now = await sample(nodes)
    while now.backlog > 0 and loop.time() < deadline:
        await asyncio.sleep(0.2)
        now = await sample(nodes)
    return now


def report(before: HistorySample, after: HistorySample, watch: BacklogWatch) -> dict[str, Any]:
    events = after.count - before.count
    buckets = {le: after.buckets.get(le, 0.0) - before.buckets.get(le, 0.0) for le in after.buckets}

    def fmt(le: float | None) -> float | None:
        return None if le is None or math.isinf(le) else le

    return {
        "events_applied": int(events),
        "lag_mean_ms": round(1000 * (after.total_s - before.total_s) / events, 1)
        if events
        else None,
        "lag_p50_le_s": fmt(_bound(buckets, events, 0.50)) if events else None,
        "lag_p99_le_s": fmt(_bound(buckets, events, 0.99)) if events else None,
        "lag_p99_within_1s": bool(events) and (_bound(buckets, events, 0.99) or math.inf) <= 1.0,
        "backlog_max": int(max(watch.samples, default=0)),
        "backlog_end": int(after.backlog),
    }


def credit_lag(before: HistorySample, after: HistorySample) -> dict[str, Any]:
    """Commit -> credited to the wallet, p99 bound from the node's histogram; n/a without it."""
    if after.credit_count is None:
        return {"credits": None, "p99_le_s": None, "note": f"n/a: no node exposes {CREDIT_LAG}"}
    credits = after.credit_count - (before.credit_count or 0.0)
    buckets = {le: n - before.credit_buckets.get(le, 0.0) for le, n in after.credit_buckets.items()}
    p99 = _bound(buckets, credits, 0.99) if credits else None
    return {
        "credits": int(credits),
        "p99_le_s": None if p99 is None or math.isinf(p99) else p99,
        "p99_within_1s": bool(credits) and (p99 or math.inf) <= 1.0,  # issue 18's target
    }


def render(h: dict[str, Any]) -> str:
    def s(v: float | None) -> str:
        return "-" if v is None else f"≤ {v:g} s"

    return (
        f"my red packets (phase 1 + open loop): {h['events_applied']:,} history events applied, "
        f"lag mean {h['lag_mean_ms']} ms, p50 {s(h['lag_p50_le_s'])}, "
        f"p99 {s(h['lag_p99_le_s'])} (target ≤ 1 s: "
        f"{'met' if h['lag_p99_within_1s'] else 'MISSED'}); "
        f"outbox backlog max {h['backlog_max']:,}, at end {h['backlog_end']:,}"
    )
