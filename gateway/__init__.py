"""The public entry: authenticates users, routes each red packet to its shard node."""
