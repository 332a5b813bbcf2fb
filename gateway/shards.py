"""The gateway's side of the shard nodes: the ring, and the calls to every node.

Calls travel on the link (``gateway/link.py``: frames multiplexed on a few WebSockets per
node) or, with ``REDPACKET_NODE_TRANSPORT=http``, as one pooled keep-alive HTTP request
each. A node that is down, slow or refusing costs only its own packets: every call has a
timeout (default 2 s) and failures become 503 ``unavailable`` for that call alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from redpacket.core.errors import ApiError, unavailable
from redpacket.core.logs import REQUEST_ID_HEADER, request_id
from redpacket.core.metrics import SHARD_CALLS, SHARD_ERRORS, SHARD_INFLIGHT, SHARD_LATENCY
from redpacket.gateway.link import LinkDown, Links
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc, RingError, route_packet, route_user

log = logging.getLogger("redpacket.gateway.shards")

NODE_SECRET_HEADER = "X-Redpacket-Node-Secret"
MAX_MOVED_HOPS = 4  # packet_moved answers followed per call (a packet moved twice: 2 hops)


@dataclass(frozen=True, slots=True)
class Upstream:
    """A node's answer, body untouched so the gateway can pass it on without re-encoding."""

    status: int
    body: bytes
    retry_after: str | None

    def json(self) -> dict:
        return orjson.loads(self.body)

    def error_code(self) -> str | None:
        if self.status < 400:
            return None
        try:
            return self.json()["error"]["code"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None


class Shards:
    def __init__(
        self,
        ring_doc: RingDoc,
        session: aiohttp.ClientSession,
        node_secret: str,
        frozen_retry_s: float,
        *,
        links: Links | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        self._session = session
        self._secret = node_secret
        self._frozen_retry_s = frozen_retry_s
        self._links = links
        self._timeout_s = timeout_s
        self._metrics: dict[str, tuple[Any, Any, Any]] = {}  # per node, looked up once
        self.use_ring(ring_doc)

    # -- the ring -----------------------------------------------------------------------

    def use_ring(self, doc: RingDoc) -> None:
        """Switch to a new ring; calls already under way finish against the node they chose.

        While a rebalance runs (the document has a ``previous`` ring) requests are still
        routed by the previous ring: the old owner serves a packet until it has handed it
        off, and then answers ``packet_moved`` with the new owner, which :meth:`call`
        follows. The new ring takes over routing once the rebalance retires the previous one
        (docs/rebalancing.md). Each packet goes to the ring version that placed it
        (``sharding/ring.py`` :func:`route_packet`). Links to nodes that no version names any
        more are closed once their calls in flight have finished.
        """
        ring: Ring = doc.ring()
        self.ring_doc, self.ring = doc, ring
        if self._links is not None:  # links to nodes no version names close when idle
            self._links.keep_only({(n.name, n.url) for n in doc.all_nodes()})

    @property
    def links_managed(self) -> bool:
        """Calls to nodes can be made: the session that carries them (and the links, when the
        transport is the link) is open. False only once the gateway is shutting down."""
        return not self._session.closed

    def owner(self, packet_id: int) -> NodeSpec:
        return route_packet(self.ring_doc, packet_id)

    def user_owner(self, uid: int) -> NodeSpec:
        return route_user(self.ring_doc, uid)

    def _moved_to(self, upstream: Upstream, node: NodeSpec) -> NodeSpec | None:
        """Where a ``packet_moved`` answer points: a node of the ring, or the URL it gave."""
        try:
            error = upstream.json()["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        name, url = error.get("owner"), error.get("owner_url")
        if not isinstance(name, str) or name == node.name:
            return None
        known = self.ring_doc.node(name)
        if known is not None:
            return known
        # A node newer than this gateway's ring (the ring file is on its way): nodes are
        # trusted peers, so the URL the old owner gave is good to use.
        return NodeSpec(name, url.rstrip("/")) if isinstance(url, str) and url else None

    # -- calls --------------------------------------------------------------------------

    async def call(
        self,
        node: NodeSpec,
        method: str,
        path: str,
        *,
        body: Mapping[str, object] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Upstream:
        """Call a node; if it answers that the packet (or user) moved, call the new owner."""
        upstream = await self._call_once(node, method, path, body=body, params=params)
        for _ in range(MAX_MOVED_HOPS):
            if upstream.error_code() != "packet_moved":
                break
            moved_to = self._moved_to(upstream, node)
            if moved_to is None:
                break
            node = moved_to
            upstream = await self._call_once(node, method, path, body=body, params=params)
        return upstream

    async def user_call(
        self,
        uid: int,
        method: str,
        path: str,
        *,
        body: Mapping[str, object] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Upstream:
        """Call the node that keeps a user's own data (idempotency keys, history, wallet).

        While a rebalance moves the user, the old and new owner may each point at the other
        for a moment; what is left of that after following the moves is a 503 to retry,
        never the internal 421.
        """
        upstream = await self.call(self.user_owner(uid), method, path, body=body, params=params)
        if upstream.error_code() == "packet_moved":
            raise unavailable("this user's data is moving between shards; retry")
        if upstream.status == 404:
            # no user call answers 404 for data it lacks: the node does not know this call
            # at all, i.e. it still runs the previous release mid-upgrade (docs/deploy.md)
            raise unavailable("this user's shard is being upgraded; retry")
        return upstream

    async def _call_once(
        self,
        node: NodeSpec,
        method: str,
        path: str,
        *,
        body: Mapping[str, object] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Upstream:
        metrics = self._metrics.get(node.name)
        if metrics is None:
            metrics = self._metrics[node.name] = (
                SHARD_CALLS.labels(node.name),
                SHARD_INFLIGHT.labels(node.name),
                SHARD_LATENCY.labels(node.name),
            )
        calls, inflight, latency = metrics
        calls.inc()
        inflight.inc()
        started = time.perf_counter()
        try:
            if self._links is not None:
                upstream = await self._over_link(node, method, path, body, params)
            else:
                upstream = await self._over_http(node, method, path, body, params)
        finally:
            inflight.dec()
            latency.observe(time.perf_counter() - started)
        if upstream.status == 401:
            SHARD_ERRORS.labels(node.name, "auth").inc()
            log.error("shard %s refused the gateway's node secret", node.name)
            raise ApiError(502, "bad_gateway", "the gateway is misconfigured for this shard")
        if upstream.status >= 500:
            SHARD_ERRORS.labels(node.name, f"http_{upstream.status}").inc()
            if upstream.status != 503:
                raise ApiError(502, "bad_gateway", f"shard {node.name} failed to answer")
        return upstream

    async def _over_link(
        self,
        node: NodeSpec,
        method: str,
        path: str,
        body: Mapping[str, object] | None,
        params: Mapping[str, str] | None,
    ) -> Upstream:
        assert self._links is not None
        data = orjson.dumps(body) if body is not None else None
        query = dict(params) if params else None
        try:
            _, status, payload, retry_after = await self._links.get(node.name, node.url).call(
                method, path, query, data, rid=request_id.get(), timeout_s=self._timeout_s
            )
        except LinkDown as down:
            SHARD_ERRORS.labels(node.name, down.kind).inc()
            if down.kind == "auth":
                raise ApiError(
                    502, "bad_gateway", "the gateway is misconfigured for this shard"
                ) from None
            if down.kind == "timeout":
                raise unavailable(f"shard {node.name} did not answer in time") from None
            raise unavailable(f"shard {node.name} is unavailable") from None
        return Upstream(status, payload, retry_after)

    async def _over_http(
        self,
        node: NodeSpec,
        method: str,
        path: str,
        body: Mapping[str, object] | None,
        params: Mapping[str, str] | None,
    ) -> Upstream:
        headers = {NODE_SECRET_HEADER: self._secret, REQUEST_ID_HEADER: request_id.get()}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method, node.url + path, data=data, params=params, headers=headers
            ) as resp:
                payload = await resp.read()
                return Upstream(resp.status, payload, resp.headers.get("Retry-After"))
        except TimeoutError:
            SHARD_ERRORS.labels(node.name, "timeout").inc()
            raise unavailable(f"shard {node.name} did not answer in time") from None
        except aiohttp.ClientError:
            SHARD_ERRORS.labels(node.name, "connect").inc()
            raise unavailable(f"shard {node.name} is unavailable") from None

    async def packet_call(
        self,
        packet_id: int,
        method: str,
        path: str,
        *,
        body: Mapping[str, object] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Upstream:
        """Call the node that owns a packet; wait out a handoff and follow where it moved."""
        node = self.owner(packet_id)
        delay, waited = 0.02, 0.0
        for _ in range(50):
            upstream = await self.call(node, method, path, body=body, params=params)
            code = upstream.error_code()
            if code == "packet_moved":  # call() followed as far as it could
                raise unavailable("red packet is moving between shards; retry")
            if code != "packet_frozen":
                return upstream
            if waited >= self._frozen_retry_s:
                raise unavailable("red packet is moving between shards; retry")
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.25)
            node = self.owner(packet_id)  # the ring may have switched meanwhile
        raise unavailable("red packet is moving between shards; retry")


class RingWatcher:
    """Reloads the ring file when it changes (a mounted ConfigMap is replaced in place)."""

    def __init__(self, path: str, shards: Shards) -> None:
        self._path = Path(path)
        self._shards = shards
        self._seen = self._stamp()
        self._task: asyncio.Task[None] | None = None

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def reload(self) -> bool:
        """Load the file now; False (and the old ring kept) if it is unreadable."""
        self._seen = self._stamp()
        try:
            doc = RingDoc.load(self._path)
        except (OSError, RingError) as exc:
            log.error(
                "ring file %s is unusable, keeping version %s: %s",
                self._path,
                self._shards.ring_doc.version,
                exc,
            )
            return False
        if doc != self._shards.ring_doc:
            self._shards.use_ring(doc)
            log.info("ring version %s loaded (%d nodes)", doc.version, len(doc.nodes))
        return True

    async def run(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            if self._stamp() != self._seen:
                self.reload()

    def start(self, poll_s: float) -> None:
        """Watch the file in a task until :meth:`stop`."""
        self._task = asyncio.create_task(self.run(poll_s))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def watching(self) -> bool:
        """The watch task runs: a gateway whose watcher died would keep a stale ring through
        every rebalance, so its readiness depends on this."""
        return self._task is not None and not self._task.done()
