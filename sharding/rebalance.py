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

Ring versions (``add --no-move``, ``remove --drain``, ``retire``) are changes of the same
shape: T keeps P's versions and adds one that places only packets made from its ``since_ms``
on, so step 4 looks only at packets from then on (none, mostly) and moves users' data alone;
retiring a version whose packets are all settled moves just those. Plain moves go in batches
(node/handoff/batch.py). docs/rebalancing.md says which mode to choose.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from redpacket.core.ids import IdGenerator
from redpacket.sharding.backends import Backend, BackendError
from redpacket.sharding.client import HandoffClient, NodeError
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc, packet_owner, user_key

ACTIVE, OUT, IN = "active", "out", "in"
# keys per import call: one MySQL transaction (a multi-row insert, one IN read); 100 made a
# move of 28,640 keys take 4.4 s (round trips), 1,000 held a node's event loop long enough
# (escaping, JSON) to double the opens' p99
KEY_BATCH = 500
KEY_PAGE = 2000  # keys listed per call: a page's batches go concurrently
PASSES = 4  # listings of what must move, each acting on what the previous one left
HISTORY_BATCH = 100  # users per history apply (one multi-row merge per table)
# events per history apply: 5,000 outlasted the node's MySQL timeout (3 s) under load
HISTORY_EVENTS = 500
HISTORY_PAGE = 400  # users listed per call: a busy user has hundreds of rows
WALLET_BATCH = 100  # users per wallet import (one transaction; the users wait for it)
USER_PAGE = 1000  # users (or keys) listed per call
# packets per batched handoff: one IN list and one transaction per step on each node; small
# enough that a batch's packets are frozen (opens retried by the gateway) only tens of ms.
# Measured under the bench's open load (docs/rebalancing.md): 100 x 2 at once moved ~600
# packets/s, 200 x 4 1,050-2,500/s with open p99 within 1.2-2.8x of before
BATCH = 200
# batches (or single handoffs) in flight: each step holds one of the node's MySQL connections
# (8 by default) for its transaction, and opens must keep getting theirs
CONCURRENCY = 4
PASSES = 4  # listings of what must move, each acting on what the previous one left


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


def _plain(action: Action) -> bool:
    """A move with no leftover copies elsewhere: the kind a batch carries out."""
    return action.kind == "move" and not action.stale_out and not action.stale_in


def _batches(actions: list[Action], size: int) -> list[list[Action]]:
    """Plain moves in batches of ``size`` per pair of nodes; every other action alone."""
    by_pair: dict[tuple[str, str], list[Action]] = {}
    batches: list[list[Action]] = []
    for action in actions:
        if _plain(action):
            by_pair.setdefault((action.source, action.target), []).append(action)
        else:
            batches.append([action])
    for pair in by_pair.values():
        batches += [pair[i : i + size] for i in range(0, len(pair), size)]
    return batches


def _failed(results: dict[int, Any]) -> list[str]:
    return [
        f"red packet {pid}: {r.get('status')} {r.get('code')}: {r.get('message')}"
        for pid, r in results.items()
        if r.get("state") == "failed"
    ]


def transition(doc: RingDoc, nodes: Iterable[NodeSpec], note: str) -> RingDoc:
    """The ring document of a change from ``doc`` to ``nodes`` that moves packets: every
    packet goes to its owner in ``nodes``, whichever version placed it (the versions of
    ``doc`` collapse into one)."""
    return RingDoc(doc.version + 1, tuple(nodes), doc.settled(), note)


def new_version(doc: RingDoc, nodes: Iterable[NodeSpec], note: str, since_ms: int) -> RingDoc:
    """The ring document of a change that moves no packet: ``nodes`` place the packets made
    from ``since_ms`` on, and every version of ``doc`` keeps serving the packets it placed."""
    since_ms = max(since_ms, doc.since_ms + 1)
    older = tuple(v.as_version() for v in doc.versions())
    return RingDoc(doc.version + 1, tuple(nodes), doc.settled(), note, since_ms, older)


def rollback_of(doc: RingDoc, note: str) -> RingDoc:
    """The ring document that undoes the change ``doc``: back to the previous ring's nodes and
    versions, routed meanwhile by the ring it abandons."""
    assert doc.previous is not None
    back = doc.previous
    return RingDoc(doc.version + 1, back.nodes, doc.settled(), note, back.since_ms, back.older)


def unmoved_before_ms(doc: RingDoc) -> int | None:
    """Packets made before the returned time are placed alike by the change's old and new
    versions, so only later ones can need a move (a new version: none yet; retiring one:
    only its own). None: any packet may move."""
    previous = doc.previous
    if previous is None:
        return None
    old, new = _placements(previous.versions()), _placements(doc.versions())
    if old[-1] != new[-1]:  # ids older than every version fall to the oldest one
        return None
    changed = [since for since, nodes in set(old) ^ set(new)]
    return min(changed) if changed else None


def _placements(versions: Iterable[RingDoc]) -> list[tuple[int, tuple[NodeSpec, ...]]]:
    """What decides where packets are: each version's start and nodes (not its number)."""
    return [(v.since_ms, v.nodes) for v in versions]


def now_ms() -> int:
    return int(time.time() * 1000)


class Pacer:
    """At most ``rate`` packet handoffs (or users moved) per second (0: as fast as the nodes
    go)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self, count: int = 1) -> None:
        """Wait for the turn of ``count`` handoffs (a batch takes as many turns as packets)."""
        if not self._interval:
            return
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if self._next > now:
                await asyncio.sleep(self._next - now)
            self._next = max(now, self._next) + self._interval * count


class Rebalancer:
    def __init__(
        self,
        backend: Backend,
        *,
        concurrency: int = CONCURRENCY,
        rate: float = 0.0,
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
                raise RebalanceError(_in_progress(doc))
            if any(n.name == name for n in doc.nodes):
                self.say(f"{name} is already in the ring (v{doc.version}): nothing to do")
                return 0
            if dry_run:
                spec = NodeSpec(name, url or "http://dry-run.invalid", weight)
                if not move:
                    return await self._dry_run(doc, self._versioned(doc, [*doc.nodes, spec], ""))
                return await self._dry_run(doc, transition(doc, [*doc.nodes, spec], ""))
            self.say(f"starting {name} ({self.backend.name} backend) ...")
            spec = await self.backend.start_node(name, url, weight)
            self.say(f"{name} is ready at {spec.url}")
            nodes = [*doc.nodes, spec]
            if move:
                return await self._complete(transition(doc, nodes, f"add {name}"), dry_run)
            return await self._complete(self._versioned(doc, nodes, f"add {name} (no move)"))

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
                raise RebalanceError(_in_progress(doc))
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
            return await self._retire_after(await self._complete(change), drain, dry_run)

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
                raise RebalanceError(_in_progress(doc))
            return await self._retire(doc, dry_run)

    def _versioned(self, doc: RingDoc, nodes: list[NodeSpec], note: str) -> RingDoc:
        """A new ring version placing packets from a moment every gateway and node will have
        been told of it (``settle_s`` from now: the fence, below, covers a late one)."""
        return new_version(doc, nodes, note, now_ms() + int(self.settle_s * 1000))

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
            back = rollback_of(doc, note)
            self.say(f"rolling back ring v{doc.version} to the nodes of v{doc.previous.version}")
            return await self._complete(back, dry_run, rollback=True)

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
            plan = await self._plan(_members(doc), doc.settled())
            for node, count in sorted(plan.held.items()):
                self.say(f"  {node}: {count} red packet(s)")
            self._print_pairs(plan, "would move" if doc.previous else "misplaced")
            return 0

    # -- one change -----------------------------------------------------------------------

    async def _complete(self, doc: RingDoc, dry_run: bool = False, rollback: bool = False) -> int:
        """Carry out the change ``doc`` describes (nodes and versions = the target, previous =
        the old ring)."""
        assert doc.previous is not None
        nodes = _members(doc)
        target = doc.settled()
        if dry_run:
            return await self._dry_run(doc.previous, doc)
        started = time.monotonic()
        # 2.+3. fence and publish. A change keeps routing by the ring that routed before it, so
        # its transition ring is published first: a crash right after leaves a ring that says
        # what was going on. A rollback routes by the ring it abandons, where some packets
        # never went, so the nodes must redirect by their fence before that ring routes.
        published = await self.backend.read_ring() == doc
        if not published and not rollback:
            await self.backend.publish_ring(doc)
            self.say(f"published the transition ring v{doc.version}")
        users_move = doc.previous.nodes != doc.nodes
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
        await self._move_packets(nodes, target, unmoved_before_ms(doc))
        self.timings["packets_s"] = time.monotonic() - started - self.timings["fenced_s"]
        # 4b.+4c. users' own data (idempotency keys, then history), if their ring changed
        if users_move:
            self.marks["users"] = time.monotonic()
            await self._move_users(nodes, target)
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

    async def _move_packets(
        self, nodes: dict[str, NodeSpec], target: RingDoc, unmoved_before_ms: int | None
    ) -> None:
        """Hand every packet to its owner in ``target``. A change that keeps the old versions
        only looks at packets made from the new version's start (none, mostly)."""
        after_id = 0 if unmoved_before_ms is None else IdGenerator.first_id_at(unmoved_before_ms)
        failed = 0
        for _ in range(PASSES):
            plan = await self._plan(nodes, target, after_id)
            if plan.conflicts:
                for conflict in plan.conflicts:
                    self.say(f"  CONFLICT {conflict}")
                raise RebalanceError(
                    f"{len(plan.conflicts)} packet(s) in a state this tool will not guess about; "
                    "nothing else was changed by this pass"
                )
            if not plan.actions:
                return
            self._print_pairs(plan, "moving")
            # a packet that failed (a store busy for longer than the client retries) is left
            # as the table above says, and the next pass, listing afresh, takes it up again
            failed = await self._run(plan.actions, nodes, target.version)
        if failed:
            raise RebalanceError(
                f"{failed} packet(s) could not be handed off; run the same command "
                "again to resume (or `redpacket rebalance rollback`)"
            )
        raise RebalanceError(f"packets kept needing moves after {PASSES} passes; run it again")

    async def _move_arriving_wallets(self, nodes: dict[str, NodeSpec], target: RingDoc) -> None:
        """Users' wallets (零钱), right after the fence: from then on their new owners answer
        their wallet calls only once each wallet is in (node/handoff/wallets.py), so this
        comes before the packets. A wallet is a few rows: the users wait seconds at most."""
        started = time.monotonic()
        wallets = await self._move_wallets(nodes, target.ring())
        await asyncio.gather(*(self.client.wallets_in(n) for n in nodes.values()))
        if wallets:
            self.say(f"moved the wallets of {wallets} user(s)")
        self.moved_wallets = wallets
        self.timings["wallets_s"] = time.monotonic() - started

    async def _move_users(self, nodes: dict[str, NodeSpec], target: RingDoc) -> None:
        """Users' idempotency keys, then history, each copied (an idempotent merge) to the
        user's new owner, then released (one after the other: at once, the two measured no
        faster on two cores, and left the opens less CPU)."""
        started = time.monotonic()
        moved, conflicts = await self._move_keys(nodes, target.ring())
        self.timings["keys_s"] = time.monotonic() - started
        if moved:
            self.say(f"moved {sum(moved.values())} idempotency key(s): {_pairs_text(moved)}")
        if conflicts:
            self.say(
                f"  {conflicts} idempotency key(s) were bound differently on their new owner; "
                "kept on both (see docs/rebalancing.md)"
            )
        users = await self._move_history(nodes, target.ring())
        self.timings["history_s"] = time.monotonic() - started - self.timings["keys_s"]
        if users:
            self.say(f"moved the history of {users} user(s)")
        self.moved_users = max(users, self.moved_wallets)
        # the users' part of the change: their wallets (before the packets), keys, history
        self.timings["users_s"] = time.monotonic() - started + self.timings.get("wallets_s", 0.0)
        self.timings["keys"] = float(sum(moved.values()))
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

    async def _plan(self, nodes: dict[str, NodeSpec], target: RingDoc, after_id: int = 0) -> Plan:
        """What every packet (of id above ``after_id``) needs to be on its ``target`` owner."""
        holders: dict[int, dict[str, tuple[str, str | None]]] = {}
        plan = Plan()

        async def scan(node: NodeSpec) -> None:
            async for packet_id, state, peer in self.client.inventory(node, after=after_id):
                holders.setdefault(packet_id, {})[node.name] = (state, peer)
                plan.held[node.name] += 1

        await asyncio.gather(*(scan(n) for n in nodes.values()))
        for packet_id in sorted(holders):
            owner = packet_owner(target, packet_id).name
            result = plan_packet(packet_id, holders[packet_id], owner)
            if isinstance(result, str):
                plan.conflicts.append(result)
            elif result is not None:
                plan.actions.append(result)
        return plan

    async def _run(self, actions: list[Action], nodes: dict[str, NodeSpec], version: int) -> int:
        """Carry out a pass's actions: plain moves in batches per pair of nodes (one call per
        step for the batch, node/handoff/batch.py), anything else one packet at a time."""
        queue: asyncio.Queue[list[Action]] = asyncio.Queue()
        # under a --rate cap, batches of a fifth of a second's worth keep the pace smooth
        size = min(self.batch_size, max(1, int(self.rate) // 5)) if self.rate else self.batch_size
        for batch in _batches(actions, size):
            queue.put_nowait(batch)
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
                batch = queue.get_nowait()
                await pacer.wait(len(batch))
                try:
                    if len(batch) == 1 and not _plain(batch[0]):
                        await self._carry_out(batch[0], nodes, version)
                    else:
                        failures.extend(await self._move_batch(batch, nodes, version))
                except (NodeError, BackendError) as exc:
                    failures.extend(f"red packet {a.packet_id}: {exc}" for a in batch)
                bar.update(len(batch))
                self.moved_packets += len(batch)

        try:
            workers = min(self.concurrency, queue.qsize())
            await asyncio.gather(*(worker() for _ in range(workers)))
        finally:
            bar.close()
        for failure in failures[:20]:
            self.say(f"  FAILED {failure}")
        return len(failures)

    async def _move_batch(
        self, batch: list[Action], nodes: dict[str, NodeSpec], version: int
    ) -> list[str]:
        """export -> import -> activate -> finish for a batch of plain moves from one node to
        another, one call per step; the packets that fail a step are reported (and left for
        the next pass or run, as a single handoff would be)."""
        client = self.client
        source, target = nodes[batch[0].source], nodes[batch[0].target]
        ids = [a.packet_id for a in batch]
        body = {"ids": ids, "to": target.name, "ring_version": version}
        exported = await client.batch(source, "export", body)
        failures = _failed(exported)
        exports = [r for r in exported.values() if r.get("state") == "exported"]
        if not exports:
            return failures
        body = {"exports": exports, "from": source.name, "ring_version": version}
        staged = await client.batch(target, "import", body)
        failures += _failed(staged)
        ready = [i for i, r in staged.items() if r.get("state") in ("staged", "active")]
        if not ready:
            return failures
        activated = await client.batch(target, "activate", {"ids": ready})  # the commit point
        failures += _failed(activated)
        done = [i for i, r in activated.items() if r.get("state") == "active"]
        if not done:
            return failures
        body = {"ids": done, "owner": target.name, "owner_url": target.url, "ring_version": version}
        failures += _failed(await client.batch(source, "finish", body))
        return failures

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
        them where they were: ``(keys moved per node pair, keys left because of conflicts)``.
        Every node is read at once, a page of keys per call."""
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

        listing = lambda node: self.client.keys(node, page=KEY_PAGE)  # noqa: E731
        await self._pour(nodes, listing, KEY_PAGE, target, flush=flush, batch=KEY_BATCH)
        return moved, conflicts

    async def _move_wallets(self, nodes: dict[str, NodeSpec], target: Ring) -> int:
        """Merge each user's wallet into the user's owner in ``target``, then delete it where it
        was (node/handoff/wallets.py); the number of wallets moved. Every node is read at
        once, a page of users per call, like the history."""
        moved = 0

        async def flush(source: NodeSpec, owner: str, batch: list[list[Any]]) -> None:
            nonlocal moved
            users = [user for _, user in batch]
            refused = await self.client.import_wallets(nodes[owner], users)
            if refused:
                raise RebalanceError(f"{owner} refused the wallets of users {refused}")
            await self.client.release_wallets(source, [u["uid"] for u in users])
            moved += len(batch)

        async def listing(node: NodeSpec) -> AsyncIterator[list[Any]]:
            async for user in self.client.wallets(node, page=WALLET_BATCH):
                yield [user["uid"], user]

        await self._pour(
            nodes, listing, USER_PAGE, target, flush=flush, batch=WALLET_BATCH, gentle=False
        )
        return moved

    async def _move_history(self, nodes: dict[str, NodeSpec], target: Ring) -> int:
        """Copy each user's history (我的红包) to the user's owner in ``target``, then delete it
        where it was; the number of users moved. Fenced nodes already send new events there.
        Every node is read at once, a page of users per call."""
        moved = 0

        async def flush(source: NodeSpec, owner: str, batch: list[list[Any]]) -> None:
            nonlocal moved
            events = [event for _, user_events in batch for event in user_events]
            for start in range(0, max(1, len(events)), HISTORY_EVENTS):  # a node takes 10,000
                refused = await self.client.apply_history(
                    nodes[owner], events[start : start + HISTORY_EVENTS]
                )
                if refused:
                    raise RebalanceError(f"{owner} refused the history of users {sorted(refused)}")
            await self.client.release_history(source, [uid for uid, _ in batch])
            moved += len(batch)

        listing = lambda node: self.client.history(node, page=HISTORY_PAGE)  # noqa: E731
        await self._pour(nodes, listing, HISTORY_PAGE, target, flush=flush, batch=HISTORY_BATCH)
        return moved

    async def _pour(
        self,
        nodes: dict[str, NodeSpec],
        listing: Callable[[NodeSpec], AsyncIterator[list[Any]]],
        page_size: int,
        target: Ring,
        *,
        flush: Callable[[NodeSpec, str, list[list[Any]]], Awaitable[None]],
        batch: int,
        gentle: bool = True,
    ) -> None:
        """Every node's users' rows (``listing``, uid order) to their owners in ``target``,
        every node at once; a node's next page is listed while its last one is sent."""

        async def one(node: NodeSpec) -> None:
            page: list[list[Any]] = []
            sending: asyncio.Future[None] | None = None
            try:
                async for row in listing(node):
                    page.append(row)
                    if len(page) >= page_size:
                        if sending is not None:
                            await sending
                        sending = asyncio.ensure_future(
                            self._flush_page(node, page, target, flush, batch, gentle=gentle)
                        )
                        page = []
                if sending is not None:
                    await sending
            finally:
                if sending is not None and not sending.done():
                    sending.cancel()
            await self._flush_page(node, page, target, flush, batch, gentle=gentle)

        await asyncio.gather(*(one(n) for n in nodes.values()))

    async def _flush_page(
        self,
        node: NodeSpec,
        page: list[list[Any]],
        target: Ring,
        flush: Callable[[NodeSpec, str, list[list[Any]]], Awaitable[None]],
        batch: int,
        *,
        gentle: bool = True,
    ) -> None:
        """Send a page of users' rows (``[uid, ...]``) that ``target`` gives to other nodes
        to their owners, in batches of ``batch``, ``concurrency`` batches at a time (each
        holds a MySQL connection of its two nodes for one transaction; opens keep the rest).
        ``gentle``: half as many, for keys and history (a batch of their rows is CPU on both
        nodes, JSON and escaping, that opens wait behind), not for wallets (a few rows each,
        and their users wait for them)."""
        by_owner: dict[str, list[list[Any]]] = {}
        for row in page:
            owner = target.owner_of_key(user_key(int(row[0]))).name
            if owner != node.name:
                by_owner.setdefault(owner, []).append(row)
        batches = [
            (owner, rows[i : i + batch])
            for owner, rows in by_owner.items()
            for i in range(0, len(rows), batch)
        ]
        slots = asyncio.Semaphore(max(1, self.concurrency // 2 if gentle else self.concurrency))

        async def send(owner: str, rows: list[list[Any]]) -> None:
            async with slots:
                await self.user_pacer.wait(len(rows))
                await flush(node, owner, rows)

        await asyncio.gather(*(send(owner, rows) for owner, rows in batches))

    # -- the edges ------------------------------------------------------------------------

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
        plan = await self._plan(reachable, change.settled(), after_id)
        for node, count in sorted(plan.held.items()):
            self.say(f"  {node} holds {count} red packet(s)")
        if unmoved is not None:
            self.say("  (a new ring version: packets made before it stay where they are)")
        self._print_pairs(plan, "would move")
        keys, _ = await self._move_keys(reachable, change.ring(), dry_run=True)
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
    """Every node of every version of the ring and of its previous ring, by name (the newest
    spec first)."""
    return {n.name: n for n in doc.all_nodes()}


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
