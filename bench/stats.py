"""Turning the workers' raw answers into rates, percentiles and per-second series."""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]) of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(latencies_ms: Iterable[float]) -> dict[str, float | int | None]:
    values = sorted(latencies_ms)
    return {
        "count": len(values),
        "mean_ms": round(sum(values) / len(values), 3) if values else None,
        "p50_ms": _r(percentile(values, 0.50)),
        "p90_ms": _r(percentile(values, 0.90)),
        "p99_ms": _r(percentile(values, 0.99)),
        "p999_ms": _r(percentile(values, 0.999)),
        "max_ms": _r(values[-1] if values else None),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class PhaseResult:
    """Every worker's answers of one phase, merged."""

    mode: str
    duration_s: float
    workers: int
    times: dict[str, array] = field(default_factory=dict)
    lats: dict[str, array] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    observed: list[tuple[int, int, int]] = field(default_factory=list)
    sold_out: list[str] = field(default_factory=list)
    worker_cpu_s: list[float] = field(default_factory=list)
    late: int = 0
    proc_cpu_s: dict[str, float] = field(default_factory=dict)
    machine_cpu_s: float | None = None
    rss_kib: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    others: list[dict[str, Any]] = field(default_factory=list)  # busiest processes not ours
    started_at: float = 0.0  # wall-clock time of t = 0 (to line up with service logs)
    loadgen_gc: list[dict[str, Any]] = field(default_factory=list)  # per worker
    profiles: list[str] = field(default_factory=list)  # --profile: py-spy's files
    profile_note: str | None = None

    def merge(self, part: dict[str, Any]) -> None:
        for label, times in part["times"].items():
            self.times.setdefault(label, array("d")).extend(times)
            self.lats.setdefault(label, array("d")).extend(part["lats"][label])
        for label, n in part["counts"].items():
            self.counts[label] = self.counts.get(label, 0) + n
        self.observed += part["observed"]
        self.sold_out += part["sold_out"]
        self.worker_cpu_s.append(part["cpu_s"])
        self.late += part["late"]
        self.loadgen_gc.append(part.get("gc", {}))

    def _in_window(self, labels: Iterable[str]) -> tuple[list[float], list[float]]:
        times: list[float] = []
        lats: list[float] = []
        for label in labels:
            for t, lat in zip(self.times.get(label, ()), self.lats.get(label, ()), strict=True):
                if 0.0 <= t <= self.duration_s:
                    times.append(t)
                    lats.append(lat)
        return times, lats

    def latency_between(self, t0: float, t1: float, *labels: str) -> dict[str, float | int | None]:
        """Latency of the answers filed between ``t0`` and ``t1`` s (the open loop's first and
        last 10 s: a fixed-rate load must have a flat latency)."""
        times, lats = self._in_window(labels)
        return summary(lat for t, lat in zip(times, lats, strict=True) if t0 <= t < t1)

    def count(self, *labels: str) -> int:
        return len(self._in_window(labels)[0])

    def rate(self, *labels: str) -> float:
        return self.count(*labels) / self.duration_s if self.duration_s > 0 else 0.0

    def latency(self, *labels: str) -> dict[str, float | int | None]:
        return summary(self._in_window(labels)[1])

    def errors(self) -> dict[str, int]:
        """Every answer that was not the expected one, by operation, status and error code."""
        return {k: v for k, v in sorted(self.counts.items()) if k.startswith("error:")}

    def series(self, labels: Iterable[str], bucket_s: float = 1.0) -> dict[str, list[Any]]:
        """Per-bucket rate and p50/p99 latency, for the plot and the JSON."""
        n = max(1, math.ceil(self.duration_s / bucket_s))
        buckets: list[list[float]] = [[] for _ in range(n)]
        times, lats = self._in_window(labels)
        for t, lat in zip(times, lats, strict=True):
            buckets[min(n - 1, int(t / bucket_s))].append(lat)
        out: dict[str, list[Any]] = {"t": [], "per_s": [], "p50_ms": [], "p99_ms": []}
        for i, values in enumerate(buckets):
            width = min(bucket_s, self.duration_s - i * bucket_s)
            values.sort()
            out["t"].append(round(i * bucket_s, 3))
            out["per_s"].append(round(len(values) / width, 1) if width > 0 else 0.0)
            out["p50_ms"].append(_r(percentile(values, 0.50)))
            out["p99_ms"].append(_r(percentile(values, 0.99)))
        return out

    def loadgen(self, cpus: int) -> dict[str, Any]:
        per_core = [c / self.duration_s for c in self.worker_cpu_s] if self.duration_s else []
        return {
            "workers": self.workers,
            "cpu_s": round(sum(self.worker_cpu_s), 2),
            "cpu_per_worker": [round(c, 3) for c in per_core],
            "machine_share": round(sum(self.worker_cpu_s) / (self.duration_s * cpus), 3)
            if self.duration_s
            else None,
            "saturated": any(c >= 0.9 for c in per_core),
            "gc": self.loadgen_gc,
        }

    def process_cpu(self) -> dict[str, float]:
        """Cores used by each process during the phase (1.0 = one core busy all the time),
        the load generator's workers, and what the rest of the machine used meanwhile."""
        out = {k: round(v / self.duration_s, 3) for k, v in self.proc_cpu_s.items()}
        loadgen = sum(self.worker_cpu_s)
        out["loadgen"] = round(loadgen / self.duration_s, 3)
        if self.machine_cpu_s is not None:
            other = self.machine_cpu_s - sum(self.proc_cpu_s.values()) - loadgen
            out["other (not measured here)"] = round(max(0.0, other) / self.duration_s, 3)
            out["machine"] = round(self.machine_cpu_s / self.duration_s, 3)
        return out
