"""What a change must do to the packets: the ring documents of a change, and per packet the
action that leaves exactly its owner in the target ring holding it (docs/rebalancing.md, the
table "State of a handoff")."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redpacket.sharding.ring import NodeSpec, RingDoc

ACTIVE, OUT, IN = "active", "out", "in"


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


def plain(action: Action) -> bool:
    """A move with no leftover copies elsewhere: the kind a batch carries out."""
    return action.kind == "move" and not action.stale_out and not action.stale_in


def batches_of(actions: list[Action], size: int) -> list[list[Action]]:
    """Plain moves in batches of ``size`` per pair of nodes; every other action alone."""
    by_pair: dict[tuple[str, str], list[Action]] = {}
    batches: list[list[Action]] = []
    for action in actions:
        if plain(action):
            by_pair.setdefault((action.source, action.target), []).append(action)
        else:
            batches.append([action])
    for pair in by_pair.values():
        batches += [pair[i : i + size] for i in range(0, len(pair), size)]
    return batches


def failed(results: dict[int, Any]) -> list[str]:
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


def members(doc: RingDoc) -> dict[str, NodeSpec]:
    """Every node of every version of the ring and of its previous ring, by name (the newest
    spec first)."""
    return {n.name: n for n in doc.all_nodes()}


def in_progress(doc: RingDoc) -> str:
    assert doc.previous is not None
    note = f", {doc.note}" if doc.note else ""
    return (
        f"a change is in progress (ring v{doc.version}{note}: "
        f"{', '.join(n.name for n in doc.previous.nodes)} -> "
        f"{', '.join(n.name for n in doc.nodes)}); finish it with `redpacket rebalance resume` "
        "or undo it with `redpacket rebalance rollback` first"
    )


def pairs_text(pairs: Counter[tuple[str, str]], lead: str = "") -> str:
    if not pairs:
        return ""
    return lead + ", ".join(f"{a} -> {b}: {n}" for (a, b), n in sorted(pairs.items()))
