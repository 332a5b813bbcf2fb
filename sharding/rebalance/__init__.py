"""``redpacket rebalance``: add or remove a shard while the service runs.

This package is the whole orchestration (docs/rebalancing.md has the protocol and a sequence
diagram); the backends (``sharding/backends/``) only start and stop shards and publish the
ring. One change, from ring P to ring T:

1. infrastructure: start the new shard (add);
2. fence every node of P and T with T (node/handoff/): from now on no node creates a packet
   or binds a user's idempotency key that T gives to another node;
3. publish the transition ring ``{version: v+1, nodes: T, previous: P}``. Gateways keep
   routing by P (where every packet is, or has a tombstone pointing on) and follow
   ``packet_moved`` answers;
4. migrate: list what every node holds, and take each packet whose T owner is another node
   through export -> import -> activate -> finish; then copy the idempotency keys of users
   whose owner changes, and delete them at the old owner;
5. publish the final ring ``{version: v+2, nodes: T}`` (the previous ring is retired), wait
   for the gateways to load it, and lift the fence;
6. infrastructure: stop the removed shard (remove), once its history outbox has reached the
   users' shards.

Every step is idempotent, and the state of every packet can be read back from the nodes, so
running the same command again after a crash resumes where it stopped; ``rollback`` moves
everything back to P instead.

Ring versions (``add --no-move``, ``remove --drain``, ``retire``) are changes of the same
shape: T keeps P's versions and adds one that places only packets made from its ``since_ms``
on, so step 4 looks only at packets from then on (none, mostly) and moves users' data alone;
retiring a version whose packets are all settled moves just those. Plain moves go in batches
(node/handoff/batch.py). docs/rebalancing.md says which mode to choose.

The modules: ``plan.py`` (the ring documents of a change, and what each packet needs),
``packets.py`` (the packets' moves), ``users.py`` (users' wallets, keys and history),
``pacer.py`` (``--rate`` and the window of users' batches), ``latency.py`` (the nodes' open
p99 that window keeps within ``--p99-budget``), ``orchestrator.py`` (the commands, and the
steps above).
"""

from redpacket.sharding.rebalance.orchestrator import Rebalancer
from redpacket.sharding.rebalance.pacer import Pacer, Window
from redpacket.sharding.rebalance.packets import BATCH, CONCURRENCY, PASSES, PacketMover
from redpacket.sharding.rebalance.plan import (
    Action,
    Plan,
    RebalanceError,
    new_version,
    plan_packet,
    rollback_of,
    transition,
    unmoved_before_ms,
)
from redpacket.sharding.rebalance.users import UserMover

__all__ = [
    "BATCH",
    "CONCURRENCY",
    "PASSES",
    "Action",
    "Pacer",
    "PacketMover",
    "Plan",
    "RebalanceError",
    "Rebalancer",
    "UserMover",
    "Window",
    "new_version",
    "plan_packet",
    "rollback_of",
    "transition",
    "unmoved_before_ms",
]
