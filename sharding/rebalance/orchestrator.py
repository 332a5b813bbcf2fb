"""The orchestrator: ``redpacket rebalance``'s commands and the steps of one change (the
package's docstring lists them)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable

from redpacket.core.ids import IdGenerator
from redpacket.sharding.backends import Backend
from redpacket.sharding.client import HandoffClient, NodeError
from redpacket.sharding.rebalance.latency import OpenLatency
from redpacket.sharding.rebalance.pacer import P99_BUDGET, Pacer, Window
from redpacket.sharding.rebalance.packets import BATCH, CONCURRENCY, PacketMover, print_pairs
from redpacket.sharding.rebalance.plan import (
    RebalanceError,
    in_progress,
    members,
    new_version,
    now_ms,
    pairs_text,
    rollback_of,
    transition,
    unmoved_before_ms,
)
from redpacket.sharding.rebalance.users import UserMover
from redpacket.sharding.ring import NodeSpec, RingDoc


class Unread:
    """The type of :data:`UNREAD`: a change's baseline p99 not read yet."""


UNREAD = Unread()


class Rebalancer:
    """``redpacket rebalance``'s commands, each one change (or none) carried through."""

    def __init__(
        self,
        backend: Backend,
        *,
        concurrency: int = CONCURRENCY,
        rate: float = 0.0,
        p99_budget: float = P99_BUDGET,
        batch_size: int = BATCH,
        progress: bool = True,
        gateway_timeout_s: float = 120.0,
        drain_timeout_s: float = 120.0,
        settle_s: float = 2.0,
        wait_s: float = 0.0,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        self.concurrency = max(1, concurrency)
        self.rate = rate
        self.user_pacer = Pacer(rate)  # --rate caps users moved per second too
        self.p99_budget = p99_budget  # users' batches keep the opens' p99 within it (0: off)
        self.batch_size = max(1, batch_size)
        self.moved_packets = 0  # handoffs carried out (the benchmark reads it)
        self.progress = progress
        self.gateway_timeout_s = gateway_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.settle_s = settle_s  # how far ahead a new ring version starts placing packets
        self.wait_s = wait_s  # how long `retire` waits for draining versions to empty
        self.timings: dict[str, float] = {}  # seconds per phase of the last change (bench)
        self.marks: dict[str, float] = {}  # time.monotonic() as each phase began (bench)
        self.moved_users = 0
        self.moved_wallets = 0
        self.say = say or (lambda message: print(message, flush=True))
        self.client = HandoffClient(backend.node_secret)

    # -- commands -------------------------------------------------------------------------

    async def add(
        self,
        name: str,
        url: str | None = None,
        weight: int = 1,
        dry_run: bool = False,
        move: bool = True,
    ) -> int:
        """Start a shard; ``move``: hand it the packets the new ring gives it now; else
        (``--no-move``) only packets made from the new version's ``since_ms`` on go there."""
        async with self.backend.lock(), self.client:
            doc = await self.backend.read_ring()
            if doc.previous is not None:
                if any(n.name == name for n in doc.nodes) and doc.previous.node(name) is None:
                    self.say(f"resuming the interrupted addition of {name} (ring v{doc.version})")
                    return await self._complete(doc, dry_run)
                raise RebalanceError(in_progress(doc))
            if any(n.name == name for n in doc.nodes):
                self.say(f"{name} is already in the ring (v{doc.version}): nothing to do")
                return 0
            if dry_run:
                spec = NodeSpec(name, url or "http://dry-run.invalid", weight)
                if not move:
                    return await self._dry_run(doc, self._versioned(doc, [*doc.nodes, spec], ""))
                return await self._dry_run(doc, transition(doc, [*doc.nodes, spec], ""))
            # read before the new shard starts: locally its process boots on the same cores
            baseline_s = await self._baseline(doc.nodes)
            self.say(f"starting {name} ({self.backend.name} backend) ...")
            spec = await self.backend.start_node(name, url, weight)
            self.say(f"{name} is ready at {spec.url}")
            nodes = [*doc.nodes, spec]
            change = (
                transition(doc, nodes, f"add {name}")
                if move
                else self._versioned(doc, nodes, f"add {name} (no move)")
            )
            return await self._complete(change, baseline_s=baseline_s)

    async def remove(self, name: str, dry_run: bool = False, drain: bool = False) -> int:
        """Take a shard out; ``drain``: it places no new packet and stops once the last one it
        holds has expired and been refunded (``retire``), else its packets move now."""
        async with self.backend.lock(), self.client:
            doc = await self.backend.read_ring()
            if doc.previous is not None:
                if doc.previous.node(name) is not None and all(n.name != name for n in doc.nodes):
                    self.say(f"resuming the interrupted removal of {name} (ring v{doc.version})")
                    rc = await self._complete(doc, dry_run)
                    return await self._retire_after(rc, "(drain)" in doc.note, dry_run)
                raise RebalanceError(in_progress(doc))
            if all(n.name != name for n in doc.nodes):
                if doc.node(name) is None:
                    return await self._stop_leftover(name, dry_run)
                if drain:  # draining already: retire what has drained
                    return await self._retire(doc, dry_run)
                # --move of a draining shard: everything moves to the newest ring now
                note = f"remove {name} (move)"
                if dry_run:
                    return await self._dry_run(doc, transition(doc, doc.nodes, note))
                return await self._complete(transition(doc, doc.nodes, note))
            if len(doc.nodes) == 1:
                raise RebalanceError(f"{name} is the only shard: it cannot be removed")
            await self.backend.check_stop(name)  # a drained shard stops too, later
            rest = [n for n in doc.nodes if n.name != name]
            change = (
                self._versioned(doc, rest, f"remove {name} (drain)")
                if drain
                else transition(doc, rest, f"remove {name}")
            )
            if dry_run:
                return await self._dry_run(doc, change)
            rc = await self._complete(change)
            return await self._retire_after(rc, drain, dry_run)

    async def _retire_after(self, rc: int, drain: bool, dry_run: bool) -> int:
        """After a drain's new version: retire what has drained already (or within
        ``wait_s``); what has not is retired by a later ``retire``."""
        if rc or not drain or dry_run:
            return rc
        return await self._retire(await self.backend.read_ring(), dry_run)

    async def retire(self, dry_run: bool = False) -> int:
        """Retire the ring versions whose packets have all expired and been refunded, and stop
        the shards no version names any more (``remove --drain`` ends here)."""
        async with self.backend.lock(), self.client:
            doc = await self.backend.read_ring()
            if doc.previous is not None:
                raise RebalanceError(in_progress(doc))
            return await self._retire(doc, dry_run)

    def _versioned(self, doc: RingDoc, nodes: list[NodeSpec], note: str) -> RingDoc:
        """A new ring version placing packets from a moment every gateway and node will have
        been told of it (``settle_s`` from now: the fence, below, covers a late one)."""
        return new_version(doc, nodes, note, now_ms() + int(self.settle_s * 1000))

    async def resume(self, dry_run: bool = False) -> int:
        async def carry_on(doc: RingDoc) -> int:
            self.say(f"resuming {doc.note or 'the change'} (ring v{doc.version})")
            return await self._complete(doc, dry_run, rollback=doc.note.startswith("rollback"))

        return await self._in_progress("resume", carry_on)

    async def rollback(self, dry_run: bool = False) -> int:
        """Undo an interrupted change: every packet goes back to its owner in the old ring."""

        async def undo(doc: RingDoc) -> int:
            assert doc.previous is not None
            if doc.note.startswith("rollback"):
                self.say(f"resuming the interrupted {doc.note} (ring v{doc.version})")
                return await self._complete(doc, dry_run, rollback=True)
            note = f"rollback of v{doc.version}" + (f" ({doc.note})" if doc.note else "")
            back = rollback_of(doc, note)
            self.say(f"rolling back ring v{doc.version} to the nodes of v{doc.previous.version}")
            return await self._complete(back, dry_run, rollback=True)

        return await self._in_progress("roll back", undo)

    async def _in_progress(self, what: str, step: Callable[[RingDoc], Awaitable[int]]) -> int:
        """``step`` on the ring of the change in progress, under the rebalance lock; with no
        change in progress, say there is nothing to do (``what``: resume, roll back) and
        succeed: both commands are safe to run again after they finished."""
        async with self.backend.lock(), self.client:
            doc = await self.backend.read_ring()
            if doc.previous is None:
                self.say(f"ring v{doc.version} has no change in progress: nothing to {what}")
                return 0
            return await step(doc)

    async def status(self) -> int:
        async with self.client:
            doc = await self.backend.read_ring()
            self.say(f"ring v{doc.version}: {', '.join(n.name for n in doc.nodes)}")
            for version in doc.older:
                self.say(
                    f"  older version v{version.version} (packets made before the next one): "
                    f"{', '.join(n.name for n in version.nodes)}"
                )
            if doc.previous is not None:
                self.say(
                    f"  change in progress from v{doc.previous.version}: "
                    f"{', '.join(n.name for n in doc.previous.nodes)}"
                )
            plan = await self._packets().plan(members(doc), doc.settled())
            for node, count in sorted(plan.held.items()):
                self.say(f"  {node}: {count} red packet(s)")
            print_pairs(self.say, plan, "would move" if doc.previous else "misplaced")
            return 0

    # -- one change -----------------------------------------------------------------------

    async def _complete(
        self,
        doc: RingDoc,
        dry_run: bool = False,
        rollback: bool = False,
        baseline_s: float | Unread | None = UNREAD,
    ) -> int:
        """Carry out the change ``doc`` describes (nodes and versions = the target, previous =
        the old ring). ``baseline_s``: the opens' p99 before it (UNREAD: read it now, before
        anything of the change is done)."""
        assert doc.previous is not None
        nodes = members(doc)
        target = doc.settled()
        if dry_run:
            return await self._dry_run(doc.previous, doc)
        users_move = doc.previous.nodes != doc.nodes
        if isinstance(baseline_s, Unread):
            baseline_s = await self._baseline(nodes.values()) if users_move else None
        started = time.monotonic()
        # 2.+3. fence and publish. A change keeps routing by the ring that routed before it, so
        # its transition ring is published first: a crash right after leaves a ring that says
        # what was going on. A rollback routes by the ring it abandons, where some packets
        # never went, so the nodes must redirect by their fence before that ring routes.
        published = await self.backend.read_ring() == doc
        if not published and not rollback:
            await self.backend.publish_ring(doc)
            self.say(f"published the transition ring v{doc.version}")
        if users_move:  # before the fence: no arriving user is served from half a wallet
            await asyncio.gather(*(self.client.wallets_arriving(n, doc) for n in nodes.values()))
        await self._fence(nodes, doc)
        if not published and rollback:
            await self.backend.publish_ring(doc)
            self.say(f"published the rollback ring v{doc.version}")
        self.timings["fenced_s"] = time.monotonic() - started
        if users_move:  # 4a. wallets first: their users wait (503) until theirs is in
            self.marks["wallets"] = time.monotonic()
            await self._move_arriving_wallets(nodes, target)
        # 4. packets, until a fresh look finds nothing left to do
        self.marks["packets"] = time.monotonic()
        mover = self._packets()
        try:
            await mover.move_all(nodes, target, unmoved_before_ms(doc))
        finally:
            self.moved_packets += mover.moved
        self.timings["packets_s"] = time.monotonic() - started - self.timings["fenced_s"]
        # 4b.+4c. users' own data (idempotency keys, then history), if their ring changed
        if users_move:
            self.marks["users"] = time.monotonic()
            await self._move_users(nodes, baseline_s)
        # 5. retire the previous ring
        final = RingDoc(doc.version + 1, doc.nodes, since_ms=doc.since_ms, older=doc.older)
        await self.backend.publish_ring(final)
        self.say(f"published ring v{final.version}: {', '.join(n.name for n in doc.nodes)}")
        if await self.backend.ring_loaded(final.version, self.gateway_timeout_s):
            # every gateway routes by the new ring: the fence has done its job
            await asyncio.gather(*(self.client.clear_fence(n) for n in final.all_nodes()))
        else:
            self.say(
                f"  warning: not every gateway reported ring v{final.version} within "
                f"{self.gateway_timeout_s:.0f}s; the nodes stay fenced (harmless: they keep "
                "redirecting what a late gateway sends them)"
            )
        self.timings["total_s"] = time.monotonic() - started
        # 6. stop what no version names any more
        for name in sorted(set(nodes) - {n.name for n in final.all_nodes()}):
            await self._stop_empty(nodes[name])
        self.say("done")
        return 0

    def _packets(self) -> PacketMover:
        return PacketMover(
            self.client,
            self.say,
            concurrency=self.concurrency,
            batch_size=self.batch_size,
            rate=self.rate,
            progress=self.progress,
        )

    def _users(self) -> UserMover:
        return UserMover(
            self.client,
            concurrency=self.concurrency,
            rate=self.rate,
            pacer=self.user_pacer,
            p99_budget=self.p99_budget,
        )

    async def _move_arriving_wallets(self, nodes: dict[str, NodeSpec], target: RingDoc) -> None:
        """Users' wallets (零钱), right after the fence: from then on their new owners answer
        their wallet calls only once each wallet is in (node/handoff/wallets.py), so this
        comes before the packets. A wallet is a few rows: the users wait seconds at most."""
        started = time.monotonic()
        wallets = await self._users().move_wallets(nodes, target.ring())
        await asyncio.gather(*(self.client.wallets_in(n) for n in nodes.values()))
        if wallets:
            self.say(f"moved the wallets of {wallets} user(s)")
        self.moved_wallets = wallets
        self.timings["wallets_s"] = time.monotonic() - started

    async def _baseline(self, nodes: Iterable[NodeSpec]) -> float | None:
        """The opens' p99 on ``nodes`` over the last seconds, as they remember it (``None``:
        not pacing users by latency, or no opens to judge by).

        Why before the change: the users' move is paced against this p99 (users.py). The
        nodes keep their histogram of a few seconds ago, so it is read at once: no command
        waits for it, and nothing of the change (not even a new shard's start) is in it."""
        if self.p99_budget <= 0:
            return None
        return await OpenLatency(self.client, {n.name: n for n in nodes}).baseline()

    async def _move_users(self, nodes: dict[str, NodeSpec], baseline_s: float | None) -> None:
        """Users' idempotency keys and history, together, copied (an idempotent merge) to
        each user's new owner, then released (users.py), paced against ``baseline_s``."""
        started = time.monotonic()
        mover = self._users()
        done = await mover.move_users(nodes, baseline_s)
        keys, rows = done.rows["idempotency_key"], sum(done.rows.values())
        window = mover.window
        if done.users:
            self.say(
                f"moved the idempotency keys and history of {done.users} user(s): {rows} row(s)"
                f", {keys} of them keys, in {done.batches} batch(es); {_pacing(window)}"
            )
        if done.clashes:
            self.say(
                f"  {done.clashes} idempotency key(s) were bound differently on their new "
                "owner; kept on both (see docs/rebalancing.md)"
            )
        self.moved_users = max(done.users, self.moved_wallets)
        # the users' part of the change: their wallets (before the packets), keys, history
        self.timings["keys_history_s"] = time.monotonic() - started
        self.timings["users_s"] = time.monotonic() - started + self.timings.get("wallets_s", 0.0)
        self.timings["keys"] = float(keys)
        self.timings["user_rows"] = float(rows)
        self.timings["window_backoffs"] = float(window.backoffs)
        if window.baseline_s is not None:
            self.timings["open_p99_baseline_ms"] = 1000 * window.baseline_s
            self.timings["open_p99_worst_ms"] = 1000 * window.worst_s
        self.marks["users_end"] = time.monotonic()

    async def _retire(self, doc: RingDoc, dry_run: bool) -> int:
        """Retire the older versions that serve no live packet any more (waiting up to
        ``wait_s`` for that). Retiring is itself a change: the version's settled packets
        (finished, refunded) move to where the remaining versions place them, so every
        packet stays reachable; shards no version names any more then stop."""
        deadline = time.monotonic() + self.wait_s
        keep = await self._live_versions(doc)
        while len(keep) == len(doc.older) and time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, max(0.01, deadline - time.monotonic())))
            keep = await self._live_versions(doc)
        for version in keep:
            self.say(f"  ring version v{version.version} still serves live red packets: kept")
        retired = [v.version for v in doc.older if v not in keep]
        if not retired:
            self.say("no ring version to retire")
            return 0
        note = f"retire version(s) {', '.join(map(str, retired))}"
        change = RingDoc(doc.version + 1, doc.nodes, doc.settled(), note, doc.since_ms, tuple(keep))
        if dry_run:
            return await self._dry_run(doc, change)
        self.say(note)
        return await self._complete(change)

    async def _live_versions(self, doc: RingDoc) -> list[RingDoc]:
        """The older versions that still place a packet not yet expired and refunded."""
        versions = doc.versions()
        keep = []
        for newer, version in itertools.pairwise(versions):
            first, before = (IdGenerator.first_id_at(version.since_ms), newer.since_ms)
            counts = await asyncio.gather(
                *(
                    self.client.live(n, first, IdGenerator.first_id_at(before))
                    for n in version.nodes
                )
            )
            if sum(counts):
                keep.append(version)
        return keep

    async def _fence(self, nodes: dict[str, NodeSpec], doc: RingDoc) -> None:
        async def one(node: NodeSpec) -> None:
            try:
                answer = await self.client.fence(node, doc)
            except NodeError as exc:
                raise RebalanceError(f"cannot fence {node.name}: {exc}") from None
            if answer.get("node") != node.name:
                raise RebalanceError(
                    f"the ring calls {node.url} {node.name!r} but it calls itself "
                    f"{answer.get('node')!r}: fix the ring or the node's REDPACKET_NODE_NAME"
                )

        await asyncio.gather(*(one(n) for n in nodes.values()))

    async def _dry_run(self, before: RingDoc, change: RingDoc) -> int:
        """Print what ``change`` (a transition from ``before``) would move; change nothing."""
        reachable: dict[str, NodeSpec] = {}
        for node in before.all_nodes():
            try:
                await self.client.ready_name(node)
                reachable[node.name] = node
            except NodeError:
                self.say(f"  ({node.name} is not reachable: counted as holding nothing)")
        unmoved = unmoved_before_ms(change)
        after_id = 0 if unmoved is None else IdGenerator.first_id_at(unmoved)
        plan = await self._packets().plan(reachable, change.settled(), after_id)
        for node, count in sorted(plan.held.items()):
            self.say(f"  {node} holds {count} red packet(s)")
        if unmoved is not None:
            self.say("  (a new ring version: packets made before it stay where they are)")
        print_pairs(self.say, plan, "would move")
        keys = await self._users().count_keys(reachable, change.ring())
        self.say(f"would move {sum(keys.values())} idempotency key(s){pairs_text(keys, ': ')}")
        for conflict in plan.conflicts:
            self.say(f"  CONFLICT {conflict}")
        return 0

    async def _stop_empty(self, node: NodeSpec) -> None:
        async for packet_id, _, _ in self.client.inventory(node, page=1):
            raise RebalanceError(
                f"{node.name} still holds red packet {packet_id}: not stopping it; "
                "run the command again"
            )
        await self._drain_outbox(node)
        await self.backend.stop_node(node.name)
        self.say(f"stopped {node.name}")

    async def _drain_outbox(self, node: NodeSpec) -> None:
        """Wait until the node's history outbox reached the users' shards: the events of its
        last commits would go with its database otherwise. Nothing adds to it any more (its
        packets moved out), so this ends once the users' shards take them."""
        deadline = asyncio.get_running_loop().time() + self.drain_timeout_s
        delivered, left = await self.client.drain_outbox(node)
        while left:
            if asyncio.get_running_loop().time() >= deadline:
                raise RebalanceError(
                    f"{node.name} still has {left} history event(s) to deliver after "
                    f"{self.drain_timeout_s:.0f}s (is a user's shard down?): not stopping it; "
                    "run the command again"
                )
            done, left = await self.client.drain_outbox(node)
            delivered += done
        self.say(f"{node.name}: history outbox drained ({delivered} event(s) delivered now)")

    async def _stop_leftover(self, name: str, dry_run: bool) -> int:
        """A shard out of the ring that still runs (a removal killed after its last ring)."""
        spec = await self.backend.running_node(name)
        if spec is None:
            self.say(f"{name} is not in the ring and not running: nothing to do")
            return 0
        if dry_run:
            self.say(f"would stop {name} (out of the ring, still running)")
            return 0
        await self._stop_empty(spec)
        return 0


def _pacing(window: Window) -> str:
    """What the users' window did, for the report."""
    if window.threshold_s is None or window.baseline_s is None:
        return "not paced by the opens' p99 (no budget, or no opens before the move)"
    return (
        f"the opens' p99 was {1000 * window.baseline_s:.1f} ms before, at most "
        f"{1000 * window.worst_s:.1f} ms during (budget {1000 * window.threshold_s:.1f} ms); "
        f"the window backed off {window.backoffs} time(s)"
    )
