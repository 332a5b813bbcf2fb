"""The ``local`` backend: a cluster started by ``redpacket dev up``.

It talks to the running supervisor's control endpoint (its URL is in
``var/<cluster>/cluster.json``), which starts or stops a shard's redis-server, MySQL
database and node under supervision and writes the ring file (then SIGHUPs the gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from redpacket.cli.devcluster import cluster_dir, load_state
from redpacket.nodeclient.wire import NODE_SECRET_HEADER
from redpacket.sharding.backends import BackendError
from redpacket.sharding.ring import NodeSpec, RingDoc


class LocalBackend:
    name = "local"

    def __init__(self, cluster: str = "dev", var: str = "var") -> None:
        self.cluster, self.var = cluster, var
        state = load_state(var, cluster)
        self.node_secret: str = state["node_secret"]
        if not state.get("control", {}).get("url"):
            raise BackendError(
                f"cluster {cluster!r} has no control endpoint: restart it with this version "
                "of `redpacket dev up`"
            )

    def _state(self) -> dict[str, Any]:
        return load_state(self.var, self.cluster)

    async def _control(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        url = self._state()["control"]["url"] + path
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
                session.request(
                    method, url, json=body, headers={NODE_SECRET_HEADER: self.node_secret}
                ) as resp,
            ):
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    raise BackendError(f"dev cluster supervisor: {answer.get('error', answer)}")
                return dict(answer)
        except aiohttp.ClientError as exc:
            raise BackendError(
                f"cannot reach the supervisor of cluster {self.cluster!r} ({exc}); is "
                "`redpacket dev up` running?"
            ) from None

    # -- the ring -------------------------------------------------------------------------

    async def read_ring(self) -> RingDoc:
        return RingDoc.load(self._state()["ring_file"])

    async def publish_ring(self, doc: RingDoc) -> None:
        await self._control("PUT", "/ring", doc.as_dict())

    async def ring_loaded(self, version: int, timeout_s: float) -> bool:
        """Poll the gateway's /readyz until it reports ``version`` (or a newer one)."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            while True:
                url = self._state()["gateway"]["url"] + "/readyz"
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with session.get(url) as resp:
                        seen = (await resp.json(content_type=None)).get("ring_version")
                        if isinstance(seen, int) and seen >= version:
                            return True
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.2)

    # -- shards ---------------------------------------------------------------------------

    async def start_node(self, name: str, url: str | None, weight: int) -> NodeSpec:
        port = 0
        if url:
            parts = urlsplit(url)
            if parts.hostname not in ("127.0.0.1", "localhost") or not parts.port:
                raise BackendError(
                    f"the local backend runs nodes on 127.0.0.1: {url!r} is not such a URL "
                    "(leave the URL out to get a free port)"
                )
            port = parts.port
        answer = await self._control("POST", "/shards", {"name": name, "port": port})
        return NodeSpec(name, answer["url"], weight, answer["redis"], answer["mysql"])

    async def check_stop(self, name: str) -> None:
        return None  # any shard of a dev cluster can be stopped

    async def stop_node(self, name: str) -> None:
        await self._control("DELETE", f"/shards/{name}")

    async def running_node(self, name: str) -> NodeSpec | None:
        for shard in self._state()["shards"]:
            if shard["name"] == name:
                return NodeSpec(name, shard["url"], 1, shard["redis"], shard["mysql"])
        return None

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        """An exclusive lock file next to cluster.json (released if the process dies)."""
        path = Path(cluster_dir(self.var, self.cluster)) / "rebalance.lock"
        with path.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BackendError(
                    f"another rebalance of cluster {self.cluster!r} is running ({path})"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
