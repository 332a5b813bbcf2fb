"""Where shards run: the infrastructure step of a rebalance, behind one small protocol.

The orchestration (what moves, in which order, when the ring changes) is in
``sharding/rebalance/`` and is the same for every backend; a backend only starts and stops
a shard's processes and stores and publishes the ring document where the gateways read it.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from redpacket.sharding.ring import NodeSpec, RingDoc


class BackendError(RuntimeError):
    """The infrastructure refused or failed a step; the message says what to do."""


class Backend(Protocol):
    name: str
    node_secret: str  # the secret every node call carries (X-Redpacket-Node-Secret)

    async def read_ring(self) -> RingDoc:
        """The ring document the gateways read."""
        ...

    async def publish_ring(self, doc: RingDoc) -> None:
        """Replace the ring document (atomically) and nudge the gateways to reload it."""
        ...

    async def ring_loaded(self, version: int, timeout_s: float) -> bool:
        """Wait until every gateway serves with ring ``version`` or newer; False on timeout."""
        ...

    async def start_node(self, name: str, url: str | None, weight: int) -> NodeSpec:
        """Start a shard (node, Redis, MySQL) and wait until its node is ready. Idempotent."""
        ...

    async def check_stop(self, name: str) -> None:
        """Raise BackendError if this shard could not be stopped (checked before moving)."""
        ...

    async def stop_node(self, name: str) -> None:
        """Stop a shard that no longer holds anything. Idempotent."""
        ...

    async def running_node(self, name: str) -> NodeSpec | None:
        """A shard this backend runs, whether or not the ring lists it (None: not running)."""
        ...

    def lock(self) -> AbstractAsyncContextManager[None]:
        """Held for a whole rebalance, so that two never run at once."""
        ...
