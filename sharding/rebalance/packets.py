"""The packets' part of a change: list what every node holds, decide per packet
(``plan.py``), and carry the moves out, plain moves in batches per pair of nodes
(node/handoff/batch.py) and anything else one packet at a time (node/handoff/packets.py)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

from tqdm import tqdm

from redpacket.core.ids import IdGenerator
from redpacket.sharding.backends import BackendError
from redpacket.sharding.client import HandoffClient, NodeError
from redpacket.sharding.rebalance.pacer import Pacer
from redpacket.sharding.rebalance.plan import (
    Action,
    Plan,
    RebalanceError,
    batches_of,
    failed,
    pairs_text,
    plain,
    plan_packet,
)
from redpacket.sharding.ring import NodeSpec, RingDoc, packet_owner

# packets per batched handoff: one IN list and one transaction per step on each node; small
# enough that a batch's packets are frozen (opens retried by the gateway) only tens of ms.
# Measured under the bench's open load (docs/rebalancing.md): 100 x 2 at once moved ~600
# packets/s, 200 x 4 1,050-2,500/s with open p99 within 1.2-2.8x of before
BATCH = 200
# batches (or single handoffs) in flight: each step holds one of the node's MySQL connections
# (8 by default) for its transaction, and opens must keep getting theirs
CONCURRENCY = 4
PASSES = 4  # listings of what must move, each acting on what the previous one left


def print_pairs(say: Callable[[str], None], plan: Plan, verb: str) -> None:
    pairs = plan.pairs()
    others = len(plan.actions) - sum(pairs.values())
    text = f"{verb} {sum(pairs.values())} red packet(s){pairs_text(pairs, ': ')}"
    if others:
        text += f" (+{others} unfinished handoff(s) to settle)"
    say(text)


class PacketMover:
    """Moves packets for one change; ``moved`` counts the handoffs carried out."""

    def __init__(
        self,
        client: HandoffClient,
        say: Callable[[str], None],
        *,
        concurrency: int = CONCURRENCY,
        batch_size: int = BATCH,
        rate: float = 0.0,
        progress: bool = True,
    ) -> None:
        self.client, self.say = client, say
        self.concurrency, self.batch_size = max(1, concurrency), max(1, batch_size)
        self.rate, self.progress = rate, progress
        self.moved = 0

    async def move_all(
        self, nodes: dict[str, NodeSpec], target: RingDoc, unmoved_before_ms: int | None
    ) -> None:
        """Hand every packet to its owner in ``target``. A change that keeps the old versions
        only looks at packets made from the new version's start (none, mostly)."""
        after_id = 0 if unmoved_before_ms is None else IdGenerator.first_id_at(unmoved_before_ms)
        failures = 0
        for _ in range(PASSES):
            plan = await self.plan(nodes, target, after_id)
            if plan.conflicts:
                for conflict in plan.conflicts:
                    self.say(f"  CONFLICT {conflict}")
                raise RebalanceError(
                    f"{len(plan.conflicts)} packet(s) in a state this tool will not guess about; "
                    "nothing else was changed by this pass"
                )
            if not plan.actions:
                return
            print_pairs(self.say, plan, "moving")
            # a packet that failed (a store busy for longer than the client retries) is left
            # as the table above says, and the next pass, listing afresh, takes it up again
            failures = await self.run(plan.actions, nodes, target.version)
        if failures:
            raise RebalanceError(
                f"{failures} packet(s) could not be handed off; run the same command "
                "again to resume (or `redpacket rebalance rollback`)"
            )
        raise RebalanceError(f"packets kept needing moves after {PASSES} passes; run it again")

    async def plan(self, nodes: dict[str, NodeSpec], target: RingDoc, after_id: int = 0) -> Plan:
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

    async def run(self, actions: list[Action], nodes: dict[str, NodeSpec], version: int) -> int:
        """Carry out a pass's actions: plain moves in batches per pair of nodes (one call per
        step for the batch, node/handoff/batch.py), anything else one packet at a time."""
        queue: asyncio.Queue[list[Action]] = asyncio.Queue()
        # under a --rate cap, batches of a fifth of a second's worth keep the pace smooth
        size = min(self.batch_size, max(1, int(self.rate) // 5)) if self.rate else self.batch_size
        for batch in batches_of(actions, size):
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
                    if len(batch) == 1 and not plain(batch[0]):
                        await self.carry_out(batch[0], nodes, version)
                    else:
                        failures.extend(await self.move_batch(batch, nodes, version))
                except (NodeError, BackendError) as exc:
                    failures.extend(f"red packet {a.packet_id}: {exc}" for a in batch)
                bar.update(len(batch))
                self.moved += len(batch)

        try:
            workers = min(self.concurrency, queue.qsize())
            await asyncio.gather(*(worker() for _ in range(workers)))
        finally:
            bar.close()
        for failure in failures[:20]:
            self.say(f"  FAILED {failure}")
        return len(failures)

    async def move_batch(
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
        failures = failed(exported)
        exports = [r for r in exported.values() if r.get("state") == "exported"]
        if not exports:
            return failures
        body = {"exports": exports, "from": source.name, "ring_version": version}
        staged = await client.batch(target, "import", body)
        failures += failed(staged)
        ready = [i for i, r in staged.items() if r.get("state") in ("staged", "active")]
        if not ready:
            return failures
        activated = await client.batch(target, "activate", {"ids": ready})  # the commit point
        failures += failed(activated)
        done = [i for i, r in activated.items() if r.get("state") == "active"]
        if not done:
            return failures
        body = {"ids": done, "owner": target.name, "owner_url": target.url, "ring_version": version}
        failures += failed(await client.batch(source, "finish", body))
        return failures

    async def carry_out(self, action: Action, nodes: dict[str, NodeSpec], version: int) -> None:
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
