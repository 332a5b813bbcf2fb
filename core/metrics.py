"""Every Prometheus metric of the project, in one place so dashboards have one source.

Both services expose them at ``GET /metrics``. Labels stay low-cardinality: routes are the
route templates (``/v1/red-packets/{id}/open``), never concrete ids.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

HTTP_REQUESTS = Counter(
    "redpacket_http_requests_total",
    "HTTP requests served, by service, route template, method and status.",
    ["service", "route", "method", "status"],
)
# a bound every ~1.5x up to 250 ms: a rebalance paces users' moves by the opens' p99 against
# twice its baseline (sharding/rebalance/latency.py), read from these buckets, so twice a p99
# should not fall inside the bucket of the p99 itself
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1,
                     0.15, 0.25, 0.5, 1.0, 2.5, 5.0)  # fmt: skip
HTTP_LATENCY = Histogram(
    "redpacket_http_request_duration_seconds",
    "HTTP request latency, by service and route template.",
    ["service", "route"],
    buckets=LATENCY_BUCKETS_S,
)
OPENS_COMMITTED = Counter(
    "redpacket_opens_committed_total", "Shares committed to the MySQL ledger by this node."
)
REJECTIONS = Counter(
    "redpacket_rejections_total",
    "Grabs and opens answered without a share, by service and reason.",
    ["service", "reason"],
)
COMMIT_BATCH_SIZE = Histogram(
    "redpacket_commit_batch_size",
    "Claims written per group-commit transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
COMMIT_LATENCY = Histogram(
    "redpacket_commit_duration_seconds",
    "Time of one group-commit transaction.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
RECONCILER_BACKLOG = Gauge(
    "redpacket_reconciler_backlog", "Claims held in Redis that are not yet committed to MySQL."
)
REFUNDS = Counter("redpacket_refunds_total", "Expired red packets refunded to their sender.")
SHARD_ERRORS = Counter(
    "redpacket_shard_errors_total",
    "Calls from the gateway to a shard node that failed, by shard and kind.",
    ["shard", "kind"],
)
SHARD_CALLS = Counter(
    "redpacket_shard_calls_total", "Calls from the gateway to a shard node.", ["shard"]
)
SHARD_INFLIGHT = Gauge(
    "redpacket_shard_calls_in_flight", "Gateway calls waiting for a shard node.", ["shard"]
)
SHARD_LATENCY = Histogram(
    "redpacket_shard_call_duration_seconds",
    "Latency of gateway calls to a shard node, by shard.",
    ["shard"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


Buckets = list[tuple[float, float]]  # cumulative: (upper bound, observations at or under it)


def cumulative_buckets(child: Histogram) -> Buckets:
    """``(upper bound, observations at or under it)`` of one labelled child of a histogram
    (``HISTOGRAM.labels(...)``), the last bound ``inf``: what a ``/metrics`` scrape shows of
    it, read in process (the rebalance paces users' moves by the nodes' open latency,
    docs/rebalancing.md). The child's own samples only: collecting the whole histogram (every
    route of the process) costs 50 times more, ~2 ms of the event loop."""
    return sorted(
        (float(sample.labels["le"]), sample.value)
        for family in child.collect()
        for sample in family.samples
        if sample.name.endswith("_bucket")
    )


class RecentBuckets:
    """Cumulative buckets of one histogram, as they were once a second over the last
    ``keep_s``: compared with now, they give the observations of the last seconds at once.

    Why: a rebalance paces users' moves against the opens' p99 *before* the change
    (sharding/rebalance/latency.py). Read by the tool itself, that p99 would cost a wait of its
    span before every change, and on a shared box it would time the new shard's own start."""

    def __init__(self, read: Callable[[], Buckets], keep_s: float = 5.0, every_s: float = 1.0):
        self._read = read
        self.every_s = every_s
        # the oldest kept is keep_s old (to every_s more); the first is the process's start
        self._kept: deque[tuple[float, Buckets]] = deque(maxlen=round(keep_s / every_s) + 1)
        self.tick()

    def tick(self) -> None:
        self._kept.append((time.monotonic(), self._read()))

    async def run(self) -> None:
        """Keep a reading every ``every_s`` (a background task for the process's life)."""
        while True:
            await asyncio.sleep(self.every_s)
            self.tick()

    def now(self) -> Buckets:
        return self._read()

    def earliest(self) -> tuple[float, Buckets]:
        """``(age_s, buckets)`` of the oldest reading kept."""
        at, buckets = self._kept[0]
        return time.monotonic() - at, buckets


def quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (as :func:`cumulative_buckets`, or the
    difference of two reads of them), interpolated linearly inside its bucket as Prometheus'
    ``histogram_quantile`` does; ``None`` without observations. Past the last finite bound it
    is that bound (the histogram says no more)."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


class RequestMetrics:
    """Requests and latency of one service, by route, method and status."""

    def __init__(self, service: str) -> None:
        self._service = service
        # The labelled children, looked up once per (route, method, status): ``labels()``
        # costs a lock and a validation per call, a few percent of a request's CPU on the
        # hot paths. As bounded as the label sets themselves.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def record(self, request: web.Request, status: int, seconds: float) -> None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        key = (route, request.method, status)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (
                HTTP_REQUESTS.labels(self._service, route, request.method, str(status)),
                HTTP_LATENCY.labels(self._service, route),
            )
        pair[0].inc()
        pair[1].observe(seconds)


def metrics_middleware(service: str) -> Any:
    metrics = RequestMetrics(service)

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.record(request, status, time.perf_counter() - started)

    return middleware


async def metrics_handler(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


METRICS_URL = web.AppKey("metrics_url", str)


def metrics_server(host: str, port: int) -> Any:
    """A cleanup_ctx serving ``GET /metrics`` on its own port (0: any free one), never on the
    service's public port (issue 19): the chart scrapes it, the public Service does not
    expose it. Its URL goes into ``app[METRICS_URL]``. ``reuse_port`` lets the processes of
    one gateway share it, as they share the API port."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        metrics_app = web.Application()
        metrics_app.router.add_get("/metrics", metrics_handler)
        runner = web.AppRunner(metrics_app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_port=True)
            await site.start()
            bound = runner.addresses[0][1] if runner.addresses else port
            app[METRICS_URL] = f"http://{host}:{bound}"
            yield
        finally:
            await runner.cleanup()

    return ctx
