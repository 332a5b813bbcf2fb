"""The idempotency keys a node holds, listed for ``rebalance --dry-run``'s count (the keys
and history themselves move by users: node/handoff/users.py)."""

from __future__ import annotations

from redpacket.node.handoff.fence import Fence
from redpacket.node.ledger import to_ms


class KeyMoves:
    """Lists the idempotency keys held by one node."""

    def __init__(self, fence: Fence) -> None:
        self.fence = fence
        self.shard = fence.shard

    async def keys(
        self, after: tuple[int, str], limit: int
    ) -> list[tuple[int, str, str, int, int]]:
        async with self.shard.ledger.read() as cur:
            await cur.execute(
                "SELECT uid, idem_key, request_hash, red_packet_id, create_time "
                "FROM idempotency_key WHERE uid > %s OR (uid = %s AND idem_key > %s) "
                "ORDER BY uid, idem_key LIMIT %s",
                (after[0], after[0], after[1], limit),
            )
            rows = await cur.fetchall()
        return [(int(u), str(k), str(h), int(p), to_ms(t)) for u, k, h, p, t in rows]
