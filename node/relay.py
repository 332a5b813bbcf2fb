"""The outbox relay: delivers this shard's history events to the shards that own the users.

At least once, in batches: one read of the oldest N outbox rows, one call (one apply
transaction) per destination shard, one delete of everything delivered. A row whose delivery
failed stays and is read again next pass; its destination applies it exactly once (merges on
primary keys, node/history.py), so a relay killed between apply and delete only repeats
work. Rows for users this node owns are applied locally, in the same way.

An event its destination refuses for what it holds (not for being down) becomes a dead
letter (node/deadletters.py): the relay never blocks behind it. A batch that fails for one
event is split in halves until that event is alone, so the others are delivered in the same
pass. A 500 (a bug at the destination, not a verdict on the event) is retried like an
outage, and only an event that alone still gets 500 after a grace (60 s,
``REDPACKET_RELAY_SERVER_ERROR_GRACE_S``) is set aside: a money event (a credit, a refund)
is not buried for a fault fixed by a restart.

Metrics: ``redpacket_history_outbox_backlog`` (rows waiting),
``redpacket_history_lag_seconds`` (from the commit that wrote a row to its apply) and
``redpacket_dead_letters`` (events set aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import Gauge, Histogram

from redpacket.core.clock import now_ms
from redpacket.node import deadletters, outbox
from redpacket.node.calls import Call
from redpacket.node.deadletters import DEAD_LETTERS
from redpacket.node.handlers import CALLS, SETTINGS, SHARD
from redpacket.node.history import HISTORY, Event, UserHistory
from redpacket.node.packet import time_to_ms
from redpacket.node.wallet.holds import HoldSweeper
from redpacket.nodeclient.client import MAX_MOVED_HOPS, NodeClient
from redpacket.nodeclient.http import HttpTransport
from redpacket.nodeclient.ring import RingFile
from redpacket.sharding.ring import NodeSpec

log = logging.getLogger("redpacket.node.relay")

OUTBOX_BACKLOG = Gauge(
    "redpacket_history_outbox_backlog", "History events written here and not yet delivered."
)
HISTORY_LAG = Histogram(
    "redpacket_history_lag_seconds",
    "From the commit that wrote a history event to its apply on the user's shard.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DELIVERY_ERRORS = Gauge(
    "redpacket_history_delivery_failing", "1 while the last delivery to a shard failed.", ["node"]
)


class Relay:
    def __init__(
        self,
        history: UserHistory,
        client: NodeClient,
        *,
        batch: int = 500,
        idle_s: float = 0.05,
        server_error_grace_s: float,
    ) -> None:
        self.history = history
        self.client = client
        self.batch = batch
        self.idle_s = idle_s
        self.server_error_grace_s = server_error_grace_s
        self._ring_checked = 0.0
        self._dead_counted = 0.0
        self._pass = asyncio.Lock()  # the background loop and drain() never overlap
        # outbox id -> when it first got a 500 alone (monotonic s); bounded by the failing rows
        self._failing_since: dict[int, float] = {}

    async def run(self) -> None:
        while True:
            try:
                delivered, more = await self.pass_once()
            except Exception:
                log.warning("history relay pass failed; retrying", exc_info=True)
                delivered, more = 0, False
                await asyncio.sleep(1.0)
            if not more:
                await asyncio.sleep(self.idle_s / 2 if delivered else self.idle_s)

    async def drain(self, timeout_s: float) -> tuple[int, int]:
        """Deliver until the outbox is empty or ``timeout_s`` passed: ``(delivered, left)``.

        ``redpacket rebalance remove`` calls this (``POST /internal/v1/handoff/outbox/drain``)
        before it stops a shard: once its packets moved out nothing writes to its outbox, and
        what is in it must reach the users' shards before the database goes."""
        delivered = 0
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                done, _ = await self.pass_once()
                delivered += done
            except Exception as exc:
                log.warning("history drain pass failed: %s", exc)
                done = 0
            left = await self._backlog()
            OUTBOX_BACKLOG.set(left)
            if left == 0 or time.monotonic() >= deadline:
                return delivered, left
            if not done:
                await asyncio.sleep(0.2)

    async def pass_once(self) -> tuple[int, bool]:
        """Deliver one batch: ``(rows delivered, whether more are waiting)``."""
        async with self._pass:
            return await self._pass_once()

    async def _pass_once(self) -> tuple[int, bool]:
        if time.monotonic() - self._ring_checked > 1.0:
            self.history.ring.refresh()
            self._ring_checked = time.monotonic()
        if time.monotonic() - self._dead_counted > DEAD_LETTERS_RECOUNT_S:
            # `redpacket dead-letters retry` (another process) changes the count too
            async with self.history.read() as cur:
                DEAD_LETTERS.set(await deadletters.count(cur))
            self._dead_counted = time.monotonic()
        async with self.history.read() as cur:
            await cur.execute(
                "SELECT id, uid, event, red_packet_id, payload, "
                f"{time_to_ms('create_time')} FROM history_outbox ORDER BY id LIMIT %s",
                (self.batch,),
            )
            rows = await cur.fetchall()
        if not rows:
            OUTBOX_BACKLOG.set(0)
            return 0, False
        events: dict[int, Event] = {}
        written: dict[int, int] = {}
        dead: dict[int, str] = {}  # outbox id -> why its destination refused it
        for row_id, uid, event, pid, payload, when in rows:
            try:
                events[row_id] = (int(uid), str(event), int(pid), dict(orjson.loads(payload)))
            except (orjson.JSONDecodeError, TypeError, ValueError):
                dead[row_id] = "the payload is not a JSON object"
                continue
            written[row_id] = int(when)
        # a packet's redundant `sent` states go with the latest one (node/outbox.py)
        kept, stands_for = outbox.coalesce(events)
        done = await self._deliver(kept, dead)
        done += [row_id for kept_id in done for row_id in stands_for.get(kept_id, ())]
        for kept_id, row_ids in stands_for.items():
            if kept_id in dead:
                dead.update((row_id, dead[kept_id]) for row_id in row_ids)
        if done or dead:
            async with self.history.transaction() as cur:
                if done:
                    await cur.execute(
                        "DELETE FROM history_outbox WHERE id IN ("
                        + ", ".join(["%s"] * len(done))
                        + ")",
                        done,
                    )
                if dead:
                    await deadletters.bury(cur, dead)
                    DEAD_LETTERS.set(await deadletters.count(cur))
            for row_id, why in dead.items():
                log.error("history event %s is a dead letter: %s", row_id, why)
            now = now_ms()
            for row_id in done:
                HISTORY_LAG.observe(max(0.0, (now - written[row_id]) / 1000))
        if self._failing_since:
            for row_id in (*done, *dead):
                self._failing_since.pop(row_id, None)
        more = len(rows) == self.batch
        OUTBOX_BACKLOG.set(await self._backlog() if more else len(rows) - len(done) - len(dead))
        return len(done), more and bool(done or dead)

    async def _backlog(self) -> int:
        async with self.history.read() as cur:
            await cur.execute("SELECT COUNT(*) FROM history_outbox")
            (count,) = await cur.fetchone()
        return int(count)

    async def _deliver(self, events: dict[int, Event], dead: dict[int, str]) -> list[int]:
        """Send every event to its user's shard; the outbox ids that were applied. Those its
        destination refused for what they hold go into ``dead``."""
        by_node: dict[str | None, list[int]] = defaultdict(list)
        targets: dict[str | None, NodeSpec | None] = {}
        for row_id, event in events.items():
            owner = self.client.user_owner(event[0])
            name = None if owner is None or owner.name == self.history.name else owner.name
            by_node[name].append(row_id)
            targets[name] = owner if name is not None else None
        results = await asyncio.gather(
            *(self._send(targets[name], ids, events, dead) for name, ids in by_node.items())
        )
        return [row_id for ids in results for row_id in ids]

    async def _send(
        self, node: NodeSpec | None, ids: list[int], events: dict[int, Event], dead: dict[int, str]
    ) -> list[int]:
        """Apply ``ids`` on ``node`` (None: here), following packet_moved for moved users.

        A batch refused for its content, or failing with a 500, is split in halves and each
        half sent again, so only the event that fails alone is held back (a dead letter if
        refused, retried next pass if a 500) and the others are delivered now."""
        pending = ids
        done: list[int] = []
        for _ in range(MAX_MOVED_HOPS):
            try:
                away = await self._apply_on(node, [events[i] for i in pending])
            except (Refused, ServerFailed) as exc:
                if len(pending) > 1:
                    half = len(pending) // 2
                    for part in (pending[:half], pending[half:]):
                        done += await self._send(node, part, events, dead)
                    return done
                if isinstance(exc, Refused) or self._failing_too_long(pending[0]):
                    dead[pending[0]] = str(exc)
                return done
            except Exception as exc:
                log.warning("history delivery to %s failed: %s", node.name if node else "self", exc)
                if node is not None:
                    DELIVERY_ERRORS.labels(node.name).set(1)
                return done
            if node is not None:
                DELIVERY_ERRORS.labels(node.name).set(0)
            done += [i for i in pending if events[i][0] not in away]
            pending = [i for i in pending if events[i][0] in away]
            if not pending:
                return done
            # every moved user of one answer points at the same owner (the node's fence ring),
            # or at several: take them one owner at a time
            owner_name, owner_url = away[events[pending[0]][0]]
            node = self.client.resolve(owner_name, owner_url)
            pending = [i for i in pending if away[events[i][0]][0] == owner_name]
        return done

    def _failing_too_long(self, row_id: int) -> bool:
        """Whether the event ``row_id``, answered 500 alone again now, has been for longer
        than the grace: a bug that stays, not a fault that a restart or a retry clears."""
        now = time.monotonic()
        first = self._failing_since.setdefault(row_id, now)
        log.warning("history event %s answered 500 (failing for %.0f s)", row_id, now - first)
        return now - first >= self.server_error_grace_s

    async def _apply_on(
        self, node: NodeSpec | None, batch: list[Event]
    ) -> dict[int, tuple[str, str]]:
        """Apply on ``node`` (None: here, through this node's own call table): the users it
        does not keep, with their owner."""
        events = [[str(u), kind, str(pid), payload] for u, kind, pid, payload in batch]
        answer = await self.client.apply_history(node, events)
        if answer.status in REFUSED_STATUSES:  # a dead letter says where it was refused
            where = f"{node.name} answered" if node is not None else "refused here:"
            raise Refused(f"{where} {answer.status}: {answer.error}")
        if answer.status == 500:
            where = f"{node.name} answered" if node is not None else "failed here:"
            raise ServerFailed(f"{where} 500: {answer.error}")
        if answer.status != 200:
            where = node.name if node is not None else "this node"
            raise RuntimeError(f"{where} answered {answer.status}: {answer.error}")
        moved = answer.data.get("moved", {})
        return {int(uid): (str(o[0]), str(o[1])) for uid, o in moved.items()}


class Refused(Exception):
    """The destination refused the events for what they hold: sending them again will not help."""


class ServerFailed(Exception):
    """The destination failed with a 500: a bug there, which may or may not be the event's."""


# A shard that answers these refuses the content (400 a malformed row, 413 too large, 422 a
# value its database refused); 503, 502, 421 and connection errors are outages, retried; a 500
# is retried too, and set aside only after the grace. This node's own table answers the same
# way (node/calls.py maps a store that is down to 503, a refused value to 422).
REFUSED_STATUSES = frozenset({400, 413, 422})
DEAD_LETTERS_RECOUNT_S = 10.0


RELAY = web.AppKey("relay", Relay)  # the handoff API drains it (node/handoff/http.py)


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    """The history of this node's users (HISTORY), the relay of its outbox, and the sweeper
    of its users' orphan wallet holds (node/wallet/holds.py), with the node client they
    share (calls to this node run through its own call table)."""
    settings = app[SETTINGS]
    ring = RingFile(settings.ring_file)
    history = UserHistory(app[SHARD], settings.name, ring)
    app[HISTORY] = history
    session = aiohttp.ClientSession()
    client = NodeClient(
        ring,
        http=HttpTransport(session, settings.node_secret),
        timeout_s=5.0,
        local_name=settings.name,
        local=CALLS.local(Call(app[SHARD], settings, history, {})),
        pass_server_errors=True,  # a 500 is retried, set aside after the grace (ServerFailed)
    )
    relay = Relay(
        history,
        client,
        idle_s=settings.history_relay_idle_s,
        server_error_grace_s=settings.relay_server_error_grace_s,
    )
    task = asyncio.create_task(relay.run())
    app[RELAY] = relay
    holds = HoldSweeper(history, client, timeout_s=settings.wallet_hold_timeout_s)
    holds_task = asyncio.create_task(holds.run())
    try:
        yield
    finally:
        for running in (task, holds_task):
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        await session.close()
