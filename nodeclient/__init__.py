"""The one way to call a shard node: used by the gateway, the node's relay and sweeper, and
the rebalance tool (docs/architecture.md, "Calling a node").

- :mod:`.wire`: every node call by name (the node's call table is keyed by the same names)
  and its HTTP route, the node secret's header, :class:`~.wire.NodeDown`;
- :mod:`.link` and :mod:`.http`: the two transports;
- :mod:`.ring`: the ring file, watched and reloaded;
- :mod:`.client`: :class:`~.client.NodeClient`, routing, per-call deadlines, following
  ``packet_moved``/``packet_frozen``, the typed calls, and :class:`~.client.Answer` (a node's
  answer, decoded once).
"""
