"""``redpacket rebalance``: add or remove a shard while the service runs.

This module is the whole orchestration (docs/rebalancing.md has the protocol and a sequence
diagram); the backends (``sharding/backends/``) only start and stop shards and publish the
ring. One change, from ring P to ring T:

1. infrastructure: start the new shard (add);
2. fence every node of P and T with T (node/handoff/): from now on no node creates a packet
   or binds a user's idempotency key that T gives to another node;
3. publish the transition ring ``{version: v+1, nodes: T, previous: P}``. Gateways keep
   routing by P (where every packet is, or has a tombstone pointing on) and follow
   ``packet_moved`` answers;
4. migrate: list what every node holds, and take each packet whose T owner is another node
   through export -> import -> activate -> finish; then copy the idempotency keys of users
   whose owner changes, and delete them at the old owner;
5. publish the final ring ``{version: v+2, nodes: T}`` (the previous ring is retired), wait
   for the gateways to load it, and lift the fence;
6. infrastructure: stop the removed shard (remove), once its history outbox has reached the
   users' shards.

Every step is idempotent, and the state of every packet can be read back from the nodes, so
running the same command again after a crash resumes where it stopped; ``rollback`` moves
everything back to P instead.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from redpacket.sharding.backends import Backend, BackendError
from redpacket.sharding.client import NodeClient, NodeError
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc, user_key

ACTIVE, OUT, IN = "active", "out", "in"
# keys per import call: one MySQL transaction that must beat the node's MySQL timeout under load
KEY_BATCH = 100


class RebalanceError(RuntimeError):
    """The change cannot go on; the message says why and what to run."""


@dataclass(frozen=True, slots=True)
class Action:
    """What one packet needs so that exactly its owner in the target ring holds it.

    ``move``: from ``source`` (the copy that counts) to ``target``; ``tidy``: the target has
    it, but older copies remain; ``abort``: an unfinished handoff out of ``source`` (which
    is the target) is undone. Then ``stale_out`` copies (exported, superseded) get their
    tombstone and ``stale_in`` copies (staged, never activated) are discarded.
    """

    packet_id: int
    kind: str
    source: str
    target: str
    stale_out: tuple[str, ...] = ()
    stale_in: tuple[str, ...] = ()


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    held: Counter[str] = field(default_factory=Counter)  # packets per node

    def pairs(self) -> Counter[tuple[str, str]]:
        return Counter((a.source, a.target) for a in self.actions if a.kind == "move")


def plan_packet(
    packet_id: int, holders: dict[str, tuple[str, str | None]], target: str
) -> Action | str | None:
    """The action one packet needs (None: none), or a description of a conflict.

    ``holders`` maps each node that has a row for the packet to its state there: ``active``
    (a live copy), ``out`` (exported: inert, handed to the peer) or ``in`` (staged from the
    peer, inert until activated). Activation is the commit point, so an active copy wins
    over an exported one; with no active copy, the exported one counts.
    """
    actives = [n for n, (state, _) in holders.items() if state == ACTIVE]
    outs = [n for n, (state, _) in holders.items() if state == OUT]
    ins = [n for n, (state, _) in holders.items() if state == IN]
    if len(actives) > 1:
        return f"red packet {packet_id} is live on {sorted(actives)}"
    if actives:
        source = actives[0]
        stale_out = tuple(n for n in outs if n != target)
        stale_in = tuple(n for n in ins if n != target)
        if source == target:
            return (
                Action(packet_id, "tidy", source, target, stale_out, stale_in)
                if (stale_out or stale_in)
                else None
            )
        return Action(packet_id, "move", source, target, stale_out, stale_in)
    if len(outs) != 1:
        where = {n: state for n, (state, _) in holders.items()}
        return f"red packet {packet_id} has no copy that counts: {where}"
    source = outs[0]
    if source == target:
        return Action(packet_id, "abort", source, target, (), tuple(ins))
    return Action(packet_id, "move", source, target, (), tuple(n for n in ins if n != target))


def transition(doc: RingDoc, nodes: Iterable[NodeSpec], note: str) -> RingDoc:
    """The ring document of a change from ``doc`` to ``nodes``."""
    return RingDoc(doc.version + 1, tuple(nodes), RingDoc(doc.version, doc.nodes), note)


class Pacer:
    """At most ``rate`` packet handoffs per second (0: as fast as the nodes go)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self._interval:
            return
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if self._next > now:
                await asyncio.sleep(self._next - now)
            self._next = max(now, self._next) + self._interval


class Rebalancer:
    def __init__(
        self,
        backend: Backend,
        *,
        concurrency: int = 8,
        rate: float = 0.0,
        progress: bool = True,
        gateway_timeout_s: float = 120.0,
        drain_timeout_s: float = 120.0,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        self.concurrency = max(1, concurrency)
        self.rate = rate
        self.progress = progress
        self.gateway_timeout_s = gateway_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.say = say or (lambda message: print(message, flush=True))
        self.client = NodeClient(backend.node_secret)

    # -- commands -------------------------------------------------------------------------

    async def add(
        self, name: str, url: str | None = None, weight: int = 1, dry_run: bool = False
    ) -> int:
        async with self.backend.lock(), self.client:
            doc = await self.backend.read_ring()
            if doc.previous is not None:
                if any(n.name == name for n in doc.nodes) and doc.previous.node(name) is None:
                    self.say(f"resuming the interrupted addition of {name} (ring v{doc.version})")
                    return await self._complete(doc, dry_run)
                raise RebalanceError(_in_progress(doc))
            if any(n.name == name for n in doc.nodes):
                self.say(f"{name} is already in the ring (v{doc.version}): nothing to do")
                return 0
            if dry_run:
                spec = NodeSpec(name, url or "http://dry-run.invalid", weight)
                return await self._dry_run(list(doc.nodes), [*doc.nodes, spec])
            self.say(f"starting {name} ({self.backend.name} backend) ...")
            spec = await self.backend.start_node(name, url, weight)
            self.say(f"{name} is ready at {spec.url}")
            return await self._complete(transition(doc, [*doc.nodes, spec], f"add {name}"), dry_run)

    async def remove(self, name: str, dry_run: bool = False) -> int:
        async with self.backend.lock(), self.client:
            doc = await self.backend.read_ring()
            if doc.previous is not None:
                if doc.previous.node(name) is not None and all(n.name != name for n in doc.nodes):
                    self.say(f"resuming the interrupted removal of {name} (ring v{doc.version})")
                    return await self._complete(doc, dry_run)
                raise RebalanceError(_in_progress(doc))
            if all(n.name != name for n in doc.nodes):
                return await self._stop_leftover(name, dry_run)
            if len(doc.nodes) == 1:
                raise RebalanceError(f"{name} is the only shard: it cannot be removed")
            await self.backend.check_stop(name)
            rest = [n for n in doc.nodes if n.name != name]
            if dry_run:
                return await self._dry_run(list(doc.nodes), rest)
            return await self._complete(transition(doc, rest, f"remove {name}"), dry_run)

    async def resume(self, dry_run: bool = False) -> int:
        async with self.backend.lock(), self.client:
            doc = await self.backend.read_ring()
            if doc.previous is None:
                self.say(f"ring v{doc.version} has no change in progress: nothing to resume")
                return 0
            self.say(f"resuming {doc.note or 'the change'} (ring v{doc.version})")
            return await self._complete(doc, dry_run, rollback=doc.note.startswith("rollback"))

    async def rollback(self, dry_run: bool = False) -> int:
        """Undo an interrupted change: every packet goes back to its owner in the old ring."""
        async with self.backend.lock(), self.client:
            doc = await self.backend.read_ring()
            if doc.previous is None:
                self.say(f"ring v{doc.version} has no change in progress: nothing to roll back")
                return 0
            if doc.note.startswith("rollback"):
                self.say(f"resuming the interrupted {doc.note} (ring v{doc.version})")
                return await self._complete(doc, dry_run, rollback=True)
            note = f"rollback of v{doc.version}" + (f" ({doc.note})" if doc.note else "")
            back = transition(doc, doc.previous.nodes, note)
            self.say(f"rolling back ring v{doc.version} to the nodes of v{doc.previous.version}")
            return await self._complete(back, dry_run, rollback=True)

    async def status(self) -> int:
        async with self.client:
            doc = await self.backend.read_ring()
            self.say(f"ring v{doc.version}: {', '.join(n.name for n in doc.nodes)}")
            if doc.previous is not None:
                self.say(
                    f"  change in progress from v{doc.previous.version}: "
                    f"{', '.join(n.name for n in doc.previous.nodes)}"
                )
            plan = await self._plan(_members(doc), doc.ring())
            for node, count in sorted(plan.held.items()):
                self.say(f"  {node}: {count} red packet(s)")
            self._print_pairs(plan, "would move" if doc.previous else "misplaced")
            return 0

    # -- one change -----------------------------------------------------------------------

    async def _complete(self, doc: RingDoc, dry_run: bool, rollback: bool = False) -> int:
        """Carry out the change ``doc`` describes (nodes = the target, previous = the old)."""
        assert doc.previous is not None
        nodes = _members(doc)
        target = doc.ring()
        if dry_run:
            return await self._dry_run(list(nodes.values()), list(doc.nodes))
        # 2.+3. fence and publish. A change keeps routing by the ring that routed before it, so
        # its transition ring is published first: a crash right after leaves a ring that says
        # what was going on. A rollback routes by the ring it abandons, where some packets
        # never went, so the nodes must redirect by their fence before that ring routes.
        published = await self.backend.read_ring() == doc
        if not published and not rollback:
            await self.backend.publish_ring(doc)
            self.say(f"published the transition ring v{doc.version}")
        await self._fence(nodes, doc)
        if not published and rollback:
            await self.backend.publish_ring(doc)
            self.say(f"published the rollback ring v{doc.version}")
        # 4. packets, until a fresh look finds nothing left to do
        for _ in range(3):
            plan = await self._plan(nodes, target)
            if plan.conflicts:
                for conflict in plan.conflicts:
                    self.say(f"  CONFLICT {conflict}")
                raise RebalanceError(
                    f"{len(plan.conflicts)} packet(s) in a state this tool will not guess about; "
                    "nothing else was changed by this pass"
                )
            if not plan.actions:
                break
            self._print_pairs(plan, "moving")
            failed = await self._run(plan.actions, nodes, doc.version)
            if failed:
                raise RebalanceError(
                    f"{failed} packet(s) could not be handed off; run the same command "
                    "again to resume (or `redpacket rebalance rollback`)"
                )
        else:
            raise RebalanceError("packets kept needing moves after 3 passes; run it again")
        # 4b. idempotency keys
        moved, conflicts = await self._move_keys(nodes, target)
        if moved:
            self.say(f"moved {sum(moved.values())} idempotency key(s): {_pairs_text(moved)}")
        if conflicts:
            self.say(
                f"  {conflicts} idempotency key(s) were bound differently on their new owner; "
                "kept on both (see docs/rebalancing.md)"
            )
        # 4c. users' history, like the keys: copied (an idempotent merge), then released
        users = await self._move_history(nodes, target)
        if users:
            self.say(f"moved the history of {users} user(s)")
        # 4d. users' wallets (零钱), like the history: merged into the new owner, then released
        wallets = await self._move_wallets(nodes, target)
        if wallets:
            self.say(f"moved the wallets of {wallets} user(s)")
        # 5. retire the previous ring
        final = RingDoc(doc.version + 1, doc.nodes)
        await self.backend.publish_ring(final)
        self.say(f"published ring v{final.version}: {', '.join(n.name for n in doc.nodes)}")
        if await self.backend.ring_loaded(final.version, self.gateway_timeout_s):
            # every gateway routes by the new ring: the fence has done its job
            await asyncio.gather(*(self.client.clear_fence(n) for n in doc.nodes))
        else:
            self.say(
                f"  warning: not every gateway reported ring v{final.version} within "
                f"{self.gateway_timeout_s:.0f}s; the nodes stay fenced (harmless: they keep "
                "redirecting what a late gateway sends them)"
            )
        # 6. stop what left the ring
        for name in sorted(set(nodes) - {n.name for n in doc.nodes}):
            await self._stop_empty(nodes[name])
        self.say("done")
        return 0

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

    async def _plan(self, nodes: dict[str, NodeSpec], target: Ring) -> Plan:
        holders: dict[int, dict[str, tuple[str, str | None]]] = {}
        plan = Plan()

        async def scan(node: NodeSpec) -> None:
            async for packet_id, state, peer in self.client.inventory(node):
                holders.setdefault(packet_id, {})[node.name] = (state, peer)
                plan.held[node.name] += 1

        await asyncio.gather(*(scan(n) for n in nodes.values()))
        for packet_id in sorted(holders):
            result = plan_packet(packet_id, holders[packet_id], target.owner(packet_id).name)
            if isinstance(result, str):
                plan.conflicts.append(result)
            elif result is not None:
                plan.actions.append(result)
        return plan

    async def _run(self, actions: list[Action], nodes: dict[str, NodeSpec], version: int) -> int:
        queue: asyncio.Queue[Action] = asyncio.Queue()
        for action in actions:
            queue.put_nowait(action)
        pacer = Pacer(self.rate)
        failures: list[str] = []
        bar = tqdm(
            total=len(actions),
            desc="red packets",
            unit="pkt",
            file=sys.stderr,
            disable=not self.progress,
            mininterval=0.2,
            dynamic_ncols=True,
        )

        async def worker() -> None:
            while not queue.empty():
                action = queue.get_nowait()
                await pacer.wait()
                try:
                    await self._carry_out(action, nodes, version)
                except (NodeError, BackendError) as exc:
                    failures.append(f"red packet {action.packet_id}: {exc}")
                bar.update(1)

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(actions)))))
        finally:
            bar.close()
        for failure in failures[:20]:
            self.say(f"  FAILED {failure}")
        return len(failures)

    async def _carry_out(self, action: Action, nodes: dict[str, NodeSpec], version: int) -> None:
        client, pid = self.client, action.packet_id
        source, target = nodes[action.source], nodes[action.target]
        if action.kind == "abort":
            for name in action.stale_in:
                await client.discard(nodes[name], pid)
            await client.abort(source, pid)
            return
        if action.kind == "move":
            export = await client.export(source, pid, target.name, version)
            if export["state"] != "exported":
                return  # moved or gone since it was listed: the next pass takes a fresh look
            await client.import_(target, pid, export, version)
            await client.activate(target, pid)  # the commit point
            await client.finish(source, pid, target, version)
        for name in action.stale_out:
            await client.finish(nodes[name], pid, target, version)
        for name in action.stale_in:
            await client.discard(nodes[name], pid)

    async def _move_keys(
        self, nodes: dict[str, NodeSpec], target: Ring, dry_run: bool = False
    ) -> tuple[Counter[tuple[str, str]], int]:
        """Copy each user's idempotency keys to the user's owner in ``target``, then delete
        them where they were: ``(keys moved per node pair, keys left because of conflicts)``."""
        moved: Counter[tuple[str, str]] = Counter()
        conflicts = 0

        async def flush(source: NodeSpec, owner: str, rows: list[list[Any]]) -> None:
            nonlocal conflicts
            if dry_run:
                moved[(source.name, owner)] += len(rows)
                return
            clashes = {(str(u), k) for u, k in await self.client.import_keys(nodes[owner], rows)}
            clean = [r for r in rows if (str(r[0]), r[1]) not in clashes]
            conflicts += len(rows) - len(clean)
            if clean:
                await self.client.release_keys(source, clean)
            moved[(source.name, owner)] += len(clean)

        for node in nodes.values():
            batches: dict[str, list[list[Any]]] = {}
            async for row in self.client.keys(node):
                owner = target.owner_of_key(user_key(int(row[0]))).name
                if owner == node.name:
                    continue
                batch = batches.setdefault(owner, [])
                batch.append(row)
                if len(batch) >= KEY_BATCH:
                    await flush(node, owner, batch)
                    batches[owner] = []
            for owner, batch in batches.items():
                if batch:
                    await flush(node, owner, batch)
        return moved, conflicts

    async def _move_wallets(self, nodes: dict[str, NodeSpec], target: Ring) -> int:
        """Merge each user's wallet into the user's owner in ``target``, then delete it where it
        was (node/handoff/wallets.py); the number of wallets moved."""
        moved = 0
        for node in nodes.values():
            batches: dict[str, list[dict[str, Any]]] = {}
            async for user in self.client.wallets(node):
                owner = target.owner_of_key(user_key(int(user["uid"]))).name
                if owner != node.name:
                    batches.setdefault(owner, []).append(user)
            for owner, users in batches.items():
                for start in range(0, len(users), 200):
                    batch = users[start : start + 200]
                    refused = await self.client.import_wallets(nodes[owner], batch)
                    if refused:
                        raise RebalanceError(f"{owner} refused the wallets of users {refused}")
                    await self.client.release_wallets(node, [u["uid"] for u in batch])
                    moved += len(batch)
        return moved

    async def _move_history(self, nodes: dict[str, NodeSpec], target: Ring) -> int:
        """Copy each user's history (我的红包) to the user's owner in ``target``, then delete it
        where it was; the number of users moved. Fenced nodes already send new events there."""
        moved = 0

        async def flush(source: NodeSpec, owner: str, batch: list[tuple[str, list[Any]]]) -> None:
            nonlocal moved
            events = [event for _, user_events in batch for event in user_events]
            refused = await self.client.apply_history(nodes[owner], events)
            if refused:
                raise RebalanceError(f"{owner} refused the history of users {sorted(refused)}")
            await self.client.release_history(source, [uid for uid, _ in batch])
            moved += len(batch)

        for node in nodes.values():
            batches: dict[str, list[tuple[str, list[Any]]]] = {}
            async for uid, events in self.client.history(node):
                owner = target.owner_of_key(user_key(int(uid))).name
                if owner == node.name:
                    continue
                batch = batches.setdefault(owner, [])
                batch.append((uid, events))
                if len(batch) >= 200:
                    await flush(node, owner, batch)
                    batches[owner] = []
            for owner, batch in batches.items():
                if batch:
                    await flush(node, owner, batch)
        return moved

    # -- the edges ------------------------------------------------------------------------

    async def _dry_run(self, holders: list[NodeSpec], target_nodes: list[NodeSpec]) -> int:
        target = Ring(target_nodes)
        reachable: dict[str, NodeSpec] = {}
        for node in holders:
            try:
                await self.client.ready_name(node)
                reachable[node.name] = node
            except NodeError:
                self.say(f"  ({node.name} is not reachable: counted as holding nothing)")
        plan = await self._plan(reachable, target)
        for node, count in sorted(plan.held.items()):
            self.say(f"  {node} holds {count} red packet(s)")
        self._print_pairs(plan, "would move")
        keys, _ = await self._move_keys(reachable, target, dry_run=True)
        self.say(f"would move {sum(keys.values())} idempotency key(s){_pairs_text(keys, ': ')}")
        for conflict in plan.conflicts:
            self.say(f"  CONFLICT {conflict}")
        return 0

    def _print_pairs(self, plan: Plan, verb: str) -> None:
        pairs = plan.pairs()
        others = len(plan.actions) - sum(pairs.values())
        text = f"{verb} {sum(pairs.values())} red packet(s){_pairs_text(pairs, ': ')}"
        if others:
            text += f" (+{others} unfinished handoff(s) to settle)"
        self.say(text)

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


def _members(doc: RingDoc) -> dict[str, NodeSpec]:
    """Every node of the ring and of its previous ring, by name (the ring's spec first)."""
    nodes = {n.name: n for n in doc.nodes}
    if doc.previous is not None:
        for node in doc.previous.nodes:
            nodes.setdefault(node.name, node)
    return nodes


def _in_progress(doc: RingDoc) -> str:
    assert doc.previous is not None
    note = f", {doc.note}" if doc.note else ""
    return (
        f"a change is in progress (ring v{doc.version}{note}: "
        f"{', '.join(n.name for n in doc.previous.nodes)} -> "
        f"{', '.join(n.name for n in doc.nodes)}); finish it with `redpacket rebalance resume` "
        "or undo it with `redpacket rebalance rollback` first"
    )


def _pairs_text(pairs: Counter[tuple[str, str]], lead: str = "") -> str:
    if not pairs:
        return ""
    return lead + ", ".join(f"{a} -> {b}: {n}" for (a, b), n in sorted(pairs.items()))
