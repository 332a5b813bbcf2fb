"""The nodes' group-commit counters, read from their ``/metrics`` before and after phase 1."""

from __future__ import annotations

from typing import Any

from redpacket.bench.scrape import metrics_pages
from redpacket.sharding.ring import NodeSpec

COMMIT_METRICS = (
    "redpacket_commit_batch_size_sum",
    "redpacket_commit_batch_size_count",
    "redpacket_commit_duration_seconds_sum",
    "redpacket_commit_duration_seconds_count",
    "redpacket_opens_committed_total",
)


async def node_metrics(nodes: list[NodeSpec]) -> dict[str, dict[str, float]]:
    """The group-commit counters of every node (from its /metrics), summed over nodes."""
    totals = dict.fromkeys(COMMIT_METRICS, 0.0)
    for text in await metrics_pages(nodes):
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in totals:
                totals[name] += float(value)
    return {"totals": totals}


def commit_stats(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    d = {k: after["totals"][k] - before["totals"][k] for k in COMMIT_METRICS}
    batches = d["redpacket_commit_batch_size_count"]
    return {
        "transactions": int(batches),
        "claims": int(d["redpacket_commit_batch_size_sum"]),
        "mean_batch": round(d["redpacket_commit_batch_size_sum"] / batches, 2) if batches else None,
        "mean_commit_ms": round(1000 * d["redpacket_commit_duration_seconds_sum"] / batches, 3)
        if batches
        else None,
        "opens_committed_metric": int(d["redpacket_opens_committed_total"]),
    }
