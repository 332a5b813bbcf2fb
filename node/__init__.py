"""A shard node: one Redis shard (live counters, Lua) and one MySQL shard (the ledger)."""
