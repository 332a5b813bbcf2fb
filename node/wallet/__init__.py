"""The wallet (零钱) of each user, on the shard that owns ``user:<uid>`` (docs/architecture.md
"Money flow"): ``book.py`` (one transaction's changes of balances), ``store.py`` (reads,
confirm and release of holds, top-ups), ``debits.py`` (creates' holds, batched per user),
``credits.py`` (receive and refund, applied with the user's history), ``holds.py`` (the
sweeper of orphan holds), ``abandon.py`` (the packet shard's side of it) and ``calls.py``
(the node calls)."""
