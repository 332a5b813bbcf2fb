"""The sweeper of orphan holds, on the wallet's shard.

A create debits the sender (a hold, keyed by the create token, with the red packet id chosen
before it), then creates the packet on its shard, then confirms the hold. A gateway that dies
in between leaves the hold open. Once a hold is ``wallet_hold_timeout_s`` old, this sweeper
asks the packet's owner (``POST /internal/v1/packets/{id}/abandon``, node/wallet/abandon.py):

- ``created``: the packet exists: the hold is confirmed (the ``send`` stands);
- ``abandoned`` (or ``other``: the id holds someone else's packet): the packet does not
  exist and the owner now refuses any create of it: the hold is released (a ``refund`` with
  ref ``release:<token>`` gives the money back).

A sweeper that dies anywhere in this leaves the hold open; the next round asks again and
gets the same answer (both answers are final on the packet's shard).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redpacket.node.history import UserHistory
from redpacket.node.shard import now_ms
from redpacket.nodeclient.client import NodeClient

log = logging.getLogger("redpacket.node.wallet")


class HoldSweeper:
    def __init__(
        self,
        history: UserHistory,
        client: NodeClient,
        *,
        timeout_s: float,
    ) -> None:
        self.history = history
        self.client = client
        self.timeout_ms = int(timeout_s * 1000)
        self.interval_s = max(0.2, min(timeout_s / 3, 10.0))

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception:
                log.warning("orphan hold sweep failed; retrying next round", exc_info=True)
            await asyncio.sleep(self.interval_s)

    async def sweep_once(self, limit: int = 200) -> dict[str, str]:
        """Settle the holds open too long: ``{create token: state afterwards}``."""
        wallets = self.history.wallets
        settled = {}
        placement = self.history.shard.placement
        for token, packet_id, uid in await wallets.stale_holds(now_ms() - self.timeout_ms, limit):
            try:
                outcome = await self._ask(packet_id, token)
            except Exception as exc:
                log.warning("could not ask about the hold of packet %s: %s", packet_id, exc)
                continue
            # a rebalance fenced away waits for this; a user moving away is settled there
            with placement.admitting() if placement is not None else contextlib.nullcontext():
                if self.history.elsewhere(uid) is not None:
                    continue
                if outcome == "created":
                    state = await wallets.confirm(token)
                else:
                    state = await wallets.release(token, now_ms())
                    log.info("released the orphan hold of packet %s (%s)", packet_id, outcome)
            settled[token] = str(state)
        return settled

    async def _ask(self, packet_id: int, token: str) -> str:
        """The packet owner's answer (this node's own table when it is the owner), following
        packet_moved."""
        self.history.ring.refresh()
        return await self.client.abandon_create(packet_id, token)
