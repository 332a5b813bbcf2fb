"""The users' part of a change: their wallets (right after the fence), then their idempotency
keys and history together (after the packets), each to the owner of ``user:<uid>`` in the
target ring (docs/rebalancing.md, "Users' keys and history" and "Users' wallets").

Keys and history go by users, not by rows (node/handoff/users.py): every node lists a page of
its leaving users at once, already in batches per new owner with their rows as JSON arrays
MySQL built; the orchestrator passes each batch on untouched (msgpack) to the new owner, which
merges it in one transaction, then releases the page on the old owner in one call. The next
page is listed while the last one is sent; the batches in flight follow a :class:`Window`
(AIMD on the nodes' open p99 against a baseline read before the change, latency.py) under the
``--rate`` cap.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redpacket.sharding.client import HandoffClient
from redpacket.sharding.rebalance.latency import OpenLatency
from redpacket.sharding.rebalance.pacer import P99_BUDGET, Pacer, Window
from redpacket.sharding.rebalance.plan import RebalanceError
from redpacket.sharding.ring import NodeSpec, Ring, user_key

WALLET_BATCH = 100  # users per wallet import (one transaction; the users wait for it)
USER_PAGE = 1000  # wallets looked at per listing call (the node lists those leaving only)
# leaving users' rows per batch (one transaction on each node: their keys and history). The
# rows stay inside MySQL, so a batch costs the nodes' event loops almost nothing; its size is
# MySQL's time in one transaction, which opens' commits queue behind
USER_BATCH_ROWS = 1000
USER_PAGE_ROWS = 4000  # leaving rows per listing call (its batches go at once)
# users counted per listing call (a scan of their keys in each table's primary key): it
# follows how many a page takes, since a page stops at USER_PAGE_ROWS leaving rows and the
# users counted beyond it are counted again by the next call (heavy users: a few dozen)
USERS_LISTED = (20, 500, 5000)  # least, first, most
KEY_PAGE = 2000  # keys listed per call by --dry-run's count


@dataclass
class UsersMoved:
    """What a users' move did (the report and the bench read it)."""

    users: int = 0
    rows: Counter[str] = field(default_factory=Counter)  # per table
    clashes: int = 0  # keys bound differently on their new owner: kept on both
    batches: int = 0


class UserMover:
    """Moves users' wallets, keys and history for one change."""

    def __init__(
        self,
        client: HandoffClient,
        *,
        concurrency: int,
        rate: float,
        pacer: Pacer,
        p99_budget: float = P99_BUDGET,
    ) -> None:
        self.client = client
        self.concurrency = max(1, concurrency)
        self.rate = rate
        self.pacer = pacer  # --rate: users moved per second, wallets and the rest alike
        self.window = Window(self.concurrency, p99_budget)

    # -- keys and history ---------------------------------------------------------------------

    async def move_users(
        self, nodes: dict[str, NodeSpec], baseline_s: float | None = None
    ) -> UsersMoved:
        """Every node's leaving users' keys and history to their new owners (the nodes' fences
        say who leaves and where to), paced by the opens' p99 on those nodes against
        ``baseline_s``, their p99 before the change (``None``: at full ``--concurrency``)."""
        done = UsersMoved()
        latency = OpenLatency(self.client, nodes)
        self.window.set_baseline(baseline_s)
        # under a --rate cap, batches of about a fifth of a second's worth keep the pace smooth
        batch_rows = min(USER_BATCH_ROWS, max(10, int(self.rate) // 5)) if self.rate else None

        async def one(node: NodeSpec) -> None:
            after, sending, limit = 0, None, USERS_LISTED[1]
            try:
                while True:
                    page = await self.client.users_page(
                        node,
                        after,
                        limit=limit,
                        page_rows=USER_PAGE_ROWS,
                        batch_rows=batch_rows or USER_BATCH_ROWS,
                    )
                    if sending is not None:
                        await sending
                    sending = asyncio.ensure_future(self._send_page(node, nodes, page, done))
                    if page.get("next") is None:
                        break
                    after = int(page["next"])
                    limit = _next_limit(limit, int(page["users"]), int(page["counted"]))
                await sending
            finally:
                if sending is not None and not sending.done():
                    sending.cancel()

        async with latency.pacing(self.window):
            await asyncio.gather(*(one(n) for n in nodes.values()))
        return done

    async def _send_page(
        self, source: NodeSpec, nodes: dict[str, NodeSpec], page: dict[str, Any], done: UsersMoved
    ) -> None:
        """A page's batches to their new owners (each within the window), then the page
        released on ``source``: nothing is deleted before every batch of it is merged."""
        keep: list[list[Any]] = []
        uids: list[int] = []

        async def send(
            owner: str, batch_uids: list[int], counts: dict[str, int], arrays: Any
        ) -> None:
            await self.pacer.wait(len(batch_uids))
            async with self.window.slot():
                clashes, refused = await self.client.import_users(
                    nodes[owner], batch_uids, counts, arrays
                )
            if refused:
                raise RebalanceError(f"{owner} refused the keys and history of users {refused}")
            keep.extend(clashes)
            uids.extend(batch_uids)
            done.users += len(batch_uids)
            done.rows.update(counts)
            done.clashes += len(clashes)
            done.batches += 1

        await asyncio.gather(*(send(*batch) for batch in page.get("batches", [])))
        if uids:
            await self.client.release_users(source, uids, keep)

    async def count_keys(
        self, nodes: dict[str, NodeSpec], target: Ring
    ) -> Counter[tuple[str, str]]:
        """``--dry-run``: the idempotency keys that would move, per pair of nodes (the nodes
        are not fenced yet, so the target ring decides here)."""
        moving: Counter[tuple[str, str]] = Counter()

        async def one(node: NodeSpec) -> None:
            async for row in self.client.keys(node, page=KEY_PAGE):
                owner = target.owner_of_key(user_key(int(row[0]))).name
                if owner != node.name:
                    moving[(node.name, owner)] += 1

        await asyncio.gather(*(one(n) for n in nodes.values()))
        return moving

    # -- wallets ------------------------------------------------------------------------------

    async def move_wallets(self, nodes: dict[str, NodeSpec], target: Ring) -> int:
        """Merge each user's wallet into the user's owner in ``target``, then delete it where it
        was (node/handoff/wallets.py); the number of wallets moved. Every node is read at
        once, a page of users per call; a page's batches go at full concurrency (a wallet is a
        few rows, and its user waits for it)."""
        moved = 0

        async def flush(source: NodeSpec, owner: str, users: list[dict[str, Any]]) -> None:
            nonlocal moved
            refused = await self.client.import_wallets(nodes[owner], users)
            if refused:
                raise RebalanceError(f"{owner} refused the wallets of users {refused}")
            await self.client.release_wallets(source, [u["uid"] for u in users])
            moved += len(users)

        async def one(node: NodeSpec) -> None:
            await _pages(
                self.client.wallets(node, page=USER_PAGE),
                lambda page: self._flush_wallets(node, page, target, flush),
            )

        await asyncio.gather(*(one(n) for n in nodes.values()))
        return moved

    async def _flush_wallets(
        self,
        node: NodeSpec,
        page: list[dict[str, Any]],
        target: Ring,
        flush: Callable[[NodeSpec, str, list[dict[str, Any]]], Awaitable[None]],
    ) -> None:
        """A page of wallets that ``target`` gives to other nodes, to their owners in batches
        of WALLET_BATCH, ``concurrency`` batches at a time."""
        by_owner: dict[str, list[dict[str, Any]]] = {}
        for user in page:
            owner = target.owner_of_key(user_key(int(user["uid"]))).name
            if owner != node.name:
                by_owner.setdefault(owner, []).append(user)
        slots = asyncio.Semaphore(self.concurrency)

        async def send(owner: str, users: list[dict[str, Any]]) -> None:
            async with slots:
                await self.pacer.wait(len(users))
                await flush(node, owner, users)

        await asyncio.gather(
            *(
                send(owner, users[i : i + WALLET_BATCH])
                for owner, users in by_owner.items()
                for i in range(0, len(users), WALLET_BATCH)
            )
        )


def _next_limit(limit: int, taken: int, counted: int) -> int:
    """Users to count in the next listing: a quarter more than the last page took when it
    stopped short of what was counted, twice as many when it took them all."""
    least, _, most = USERS_LISTED
    wanted = limit * 2 if taken >= counted else taken + taken // 4 + 1
    return max(least, min(most, wanted))


async def _pages(
    rows: AsyncIterator[dict[str, Any]],
    send: Callable[[list[dict[str, Any]]], Awaitable[None]],
) -> None:
    """``rows`` in pages of USER_PAGE, each sent while the next one is listed."""
    page: list[dict[str, Any]] = []
    sending: asyncio.Future[None] | None = None
    try:
        async for row in rows:
            page.append(row)
            if len(page) >= USER_PAGE:
                if sending is not None:
                    await sending
                sending = asyncio.ensure_future(send(page))
                page = []
        if sending is not None:
            await sending
    finally:
        if sending is not None and not sending.done():
            sending.cancel()
    await send(page)
