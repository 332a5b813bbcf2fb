"""Handing red packets (and users' keys) between shard nodes: the node's half of a rebalance.

One module per concept: ``fence.py`` (the fence and tombstones), ``packets.py`` (the per-packet
steps), ``batch.py`` (the same steps for a batch), ``users.py`` (users' idempotency keys and
history, moved by users), ``user_data.py`` (keys listed for a dry run), ``wallets.py`` (users'
wallets), ``http.py`` (the handoff API).

The protocol, with a sequence diagram, is in docs/rebalancing.md. The orchestrator
(``sharding/rebalance/``) takes each packet that changes owner through these steps, each
one an idempotent call on one node, so a rebalance killed anywhere is finished (or undone)
by running it again: export, import, activate and finish (or abort and discard to roll
back), each described at the top of ``packets.py``.

At every instant at most one node may accept an open: the old owner stops at ``export``
(its Redis copy is frozen before anything else), the new owner starts at ``activate``.

The fence: the ring a rebalance moves to, stored in MySQL (table ``shard_ring``) while the
change is in progress. Once fenced, a node refuses to create a packet, or to bind an
idempotency key of a user, that this ring gives to another node, unless it already holds
it: it answers 421 packet_moved with the owner. That keeps a gateway with an older ring from
creating packets behind a migration's back. Creates and key bindings in flight when the
fence goes up are waited for. A node also redirects, rather than 404s, calls for packets it
does not hold that the fence ring gives to another node.
"""

from redpacket.node.handoff.fence import Fence, HandoffConflict
from redpacket.node.handoff.http import HANDOFF, ROUTES, Handoff, start
from redpacket.node.handoff.packets import PacketMoves
from redpacket.node.handoff.user_data import KeyMoves

__all__ = [
    "HANDOFF",
    "ROUTES",
    "Fence",
    "Handoff",
    "HandoffConflict",
    "KeyMoves",
    "PacketMoves",
    "start",
]
