"""The fault schedule: which fault, when, on what, for how long. A pure function of the seed.

The schedule is drawn before anything runs, so a run is replayed by its seed: the same
faults at the same offsets on the same targets (how the system reacts to them may differ
in timing, the schedule does not). Every kind of fault appears at least once (when the run
is long enough); more are drawn at random until the injection window is full. Two faults
never hold the same *resource* at once (a process is not paused while it is being killed,
one rebalance runs at a time), and everything else overlaps freely: that is the point.
Every fault is healed ``margin_s`` before the end, leaving the cluster time to settle before
the load stops.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from dataclasses import asdict, dataclass, field
from typing import Any


class Kind(enum.StrEnum):
    NODE_KILL = "node_kill"  # SIGKILL a node; the supervisor restarts it
    GATEWAY_KILL = "gateway_kill"  # SIGKILL the gateway; the supervisor restarts it
    NODE_PAUSE = "node_pause"  # SIGSTOP a node, SIGCONT it later: it wakes with old state
    REDIS_PAUSE = "redis_pause"  # SIGSTOP a shard's redis-server, then SIGCONT
    REDIS_RESTART = "redis_restart"  # SIGKILL a redis-server: restarted empty
    MYSQL_CUT = "mysql_cut"  # one shard's MySQL unreachable (its TcpProxy blocks), then back
    MYSQL_LATENCY = "mysql_latency"  # one shard's MySQL slow (its TcpProxy delays)
    REBALANCE = "rebalance"  # `redpacket rebalance add|remove` while other faults happen
    REBALANCE_KILL = "rebalance_kill"  # a rebalance SIGKILLed mid-way, then resumed
    LINK_CUT = "link_cut"  # the gateway's link to one node cut (its TcpProxy), then back
    LINK_LATENCY = "link_latency"  # the gateway's link to one node slow
    LINK_ONEWAY = "link_oneway"  # one direction of that link stalls (to_node or to_gateway)
    GATEWAY_RESTART = "gateway_restart"  # SIGTERM the gateway while replies are held back
    CLOCK_JUMP = "clock_jump"  # a node's clock steps forward or back by seconds, then back


# Relative frequency of each kind among the faults drawn after the first round.
WEIGHTS: dict[Kind, int] = {
    Kind.NODE_KILL: 3,
    Kind.GATEWAY_KILL: 2,
    Kind.NODE_PAUSE: 3,
    Kind.REDIS_PAUSE: 3,
    Kind.REDIS_RESTART: 2,
    Kind.MYSQL_CUT: 3,
    Kind.MYSQL_LATENCY: 3,
    Kind.REBALANCE: 1,
    Kind.REBALANCE_KILL: 1,
    Kind.LINK_CUT: 2,
    Kind.LINK_LATENCY: 2,
    Kind.LINK_ONEWAY: 2,
    Kind.GATEWAY_RESTART: 1,
    Kind.CLOCK_JUMP: 2,
}

# How long the resource stays taken after a fault's hold ends: a killed process needs to be
# restarted and to rebuild before it is fair game again; a rebalance takes a while.
SETTLE_S: dict[Kind, float] = {
    Kind.NODE_KILL: 6.0,
    Kind.GATEWAY_KILL: 4.0,
    Kind.GATEWAY_RESTART: 4.0,
    Kind.REDIS_RESTART: 5.0,
    Kind.REBALANCE: 25.0,
    Kind.REBALANCE_KILL: 25.0,
}


@dataclass(frozen=True)
class Fault:
    """One fault: injected ``at_s`` seconds into the run on ``target``, healed ``hold_s`` later
    (kills heal themselves: the supervisor restarts the process; a rebalance is healed when
    it has finished)."""

    index: int
    kind: Kind
    at_s: float
    hold_s: float
    target: str  # "shard-<i>", "gateway", or the shard a rebalance adds or removes
    action: str = ""  # rebalance: "add" or "remove"
    latency_ms: int = 0  # mysql_latency, link_latency
    kill_after_s: float = 0.0  # rebalance_kill: SIGKILL this long after it started
    jump_ms: int = 0  # clock_jump: how far the node's clock steps (back when negative)

    @property
    def resource(self) -> str:
        if self.kind in (Kind.NODE_KILL, Kind.NODE_PAUSE):
            return f"node:{self.target}"
        if self.kind in (Kind.REDIS_PAUSE, Kind.REDIS_RESTART):
            return f"redis:{self.target}"
        if self.kind in (Kind.MYSQL_CUT, Kind.MYSQL_LATENCY):
            return f"mysql:{self.target}"
        if self.kind in (Kind.LINK_CUT, Kind.LINK_LATENCY, Kind.LINK_ONEWAY):
            return f"link:{self.target}"
        if self.kind is Kind.CLOCK_JUMP:
            return f"clock:{self.target}"
        if self.kind in (Kind.GATEWAY_KILL, Kind.GATEWAY_RESTART):
            return "gateway"
        return "rebalance"

    @property
    def heal_s(self) -> float:
        return self.at_s + self.hold_s

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in ("", 0, 0.0)} | {
            "index": self.index,
            "kind": str(self.kind),
            "at_s": self.at_s,
        }


@dataclass(frozen=True)
class Schedule:
    seed: int
    seconds: float
    shards: int
    faults: tuple[Fault, ...]
    start_s: float = 0.0
    inject_until_s: float = 0.0  # no fault is injected after this
    heal_by_s: float = 0.0  # every fault is healed by this (rebalances: started by this)
    notes: list[str] = field(default_factory=list)

    def kinds(self) -> set[Kind]:
        return {f.kind for f in self.faults}

    def overlapping_pairs(self) -> list[tuple[int, int]]:
        """Pairs of faults held at the same time (a kill counts for its restart time)."""
        spans = [(f.at_s, f.heal_s + SETTLE_S.get(f.kind, 0.0) * 0.5, f.index) for f in self.faults]
        pairs = []
        for i, (a0, a1, ai) in enumerate(spans):
            for b0, b1, bi in spans[i + 1 :]:
                if a0 < b1 and b0 < a1:
                    pairs.append((ai, bi))
        return pairs

    def window(self, from_s: float, until_s: float) -> Schedule:
        """The faults injected from ``from_s`` up to ``until_s`` of this schedule, moved to
        start at ``start_s``: a targeted replay of one burst of a long run (same faults, same
        order, same gaps) in a run of its own, with the usual margin to heal and settle.
        Rebalances are left out: each depends on the ring the ones before it left."""
        if not 0 <= from_s < until_s:
            raise ValueError("--from must be >= 0 and below --until")
        shift = self.start_s - from_s
        picked = [
            f for f in self.faults if from_s <= f.at_s <= until_s and f.resource != "rebalance"
        ]
        last_heal = max((f.heal_s + shift for f in picked), default=self.start_s)
        margin = max(8.0, (until_s - from_s) * 0.15)
        seconds = round(last_heal + SETTLE_S[Kind.NODE_KILL] + margin, 2)
        moved = tuple(
            dataclasses.replace(f, index=i, at_s=round(f.at_s + shift, 2))
            for i, f in enumerate(picked)
        )
        note = f"faults {from_s:g}-{until_s:g}s of the {self.seconds:g}s schedule"
        return Schedule(
            self.seed,
            seconds,
            self.shards,
            moved,
            self.start_s,
            max((f.at_s for f in moved), default=self.start_s),
            round(last_heal, 2),
            [note, *(f"was fault {f.index} at {f.at_s:g}s" for f in picked)],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "seconds": self.seconds,
            "shards": self.shards,
            "inject_until_s": self.inject_until_s,
            "heal_by_s": self.heal_by_s,
            "faults": [f.as_dict() for f in self.faults],
        }


def _hold(kind: Kind, rng: random.Random) -> tuple[float, dict[str, Any]]:
    if kind is Kind.NODE_PAUSE:
        return round(rng.uniform(1.5, 5.0), 2), {}
    if kind is Kind.REDIS_PAUSE:
        return round(rng.uniform(1.0, 4.0), 2), {}
    if kind is Kind.MYSQL_CUT:
        return round(rng.uniform(2.0, 6.0), 2), {}
    if kind is Kind.MYSQL_LATENCY:
        return round(rng.uniform(3.0, 8.0), 2), {"latency_ms": rng.choice((50, 100, 200, 400))}
    if kind is Kind.REBALANCE_KILL:
        return 0.0, {"kill_after_s": round(rng.uniform(0.5, 3.0), 2)}
    if kind is Kind.LINK_CUT:
        return round(rng.uniform(1.0, 4.0), 2), {}
    if kind is Kind.LINK_LATENCY:
        return round(rng.uniform(3.0, 8.0), 2), {"latency_ms": rng.choice((20, 100, 400, 1500))}
    if kind is Kind.LINK_ONEWAY:
        return round(rng.uniform(1.0, 4.0), 2), {"action": rng.choice(("to_node", "to_gateway"))}
    if kind is Kind.GATEWAY_RESTART:
        return round(rng.uniform(0.5, 2.0), 2), {}  # replies held this long, then SIGTERM
    if kind is Kind.CLOCK_JUMP:
        return round(rng.uniform(2.0, 8.0), 2), {
            "jump_ms": rng.choice((-1, 1)) * rng.randint(2, 30) * 1000
        }
    return 0.0, {}


def draw(seed: int, seconds: float, shards: int) -> Schedule:
    """The schedule of a run of ``seconds`` on ``shards`` base shards, from ``seed`` alone."""
    if shards < 1:
        raise ValueError("shards must be >= 1")
    rng = random.Random(f"redpacket-chaos:{seed}")
    start = round(min(5.0, seconds * 0.1), 2)
    margin = max(8.0, seconds * 0.15)
    inject_until = round(seconds - margin - 8.0, 2)  # the longest hold ends before heal_by
    heal_by = round(seconds - margin, 2)
    if inject_until <= start:
        return Schedule(seed, seconds, shards, (), start, start, start, ["run too short"])
    base = [f"shard-{i}" for i in range(shards)]
    extra_shard = f"shard-{shards}"
    free_at: dict[str, float] = {}
    # rebalances go in the first part of the run so that they finish (they take a while)
    rebalance_until = start + (inject_until - start) * 0.6

    def place(kind: Kind, at: float) -> Fault | None:
        hold, params = _hold(kind, rng)
        if kind in (Kind.REBALANCE, Kind.REBALANCE_KILL):
            targets = [extra_shard]
            limit = rebalance_until
        elif kind in (Kind.GATEWAY_KILL, Kind.GATEWAY_RESTART):
            targets, limit = ["gateway"], inject_until
        else:
            targets, limit = list(base), inject_until
        rng.shuffle(targets)
        best: tuple[float, str] | None = None
        for target in targets:
            probe = Fault(0, kind, 0.0, 0.0, target)
            when = max(at, free_at.get(probe.resource, 0.0))
            if best is None or when < best[0]:
                best = (when, target)
        assert best is not None
        when, target = best
        if when > limit:
            return None
        fault = Fault(0, kind, round(when, 2), hold, target, **params)  # type: ignore[arg-type]
        settle = SETTLE_S.get(kind, 1.0)
        if fault.resource == "rebalance":  # few packets to move in a short run
            settle = min(settle, seconds * 0.15)
        free_at[fault.resource] = fault.heal_s + settle
        return fault

    faults: list[Fault] = []
    first_round = list(Kind)
    rng.shuffle(first_round)
    # rebalances first in the round's time order, so each overlaps the faults that follow
    first_round.sort(key=lambda k: k not in (Kind.REBALANCE, Kind.REBALANCE_KILL))
    span = (rebalance_until - start) / max(1, len(first_round))
    for i, kind in enumerate(first_round):
        fault = place(kind, start + i * span + rng.uniform(0, span * 0.5))
        if fault is not None:
            faults.append(fault)
    # then random faults, about one every 3 s of the window, at random moments
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    for _ in range(int((inject_until - start) / 3.0)):
        fault = place(rng.choices(kinds, weights)[0], rng.uniform(start, inject_until))
        if fault is not None:
            faults.append(fault)
    faults.sort(key=lambda f: (f.at_s, f.kind))
    numbered: list[Fault] = []
    adding = True  # rebalances alternate: add the extra shard, remove it, add it, ...
    for i, f in enumerate(faults):
        action = f.action
        if f.kind in (Kind.REBALANCE, Kind.REBALANCE_KILL):
            action, adding = ("add" if adding else "remove"), not adding
        numbered.append(dataclasses.replace(f, index=i, action=action))
    return Schedule(seed, seconds, shards, tuple(numbered), start, inject_until, heal_by)
