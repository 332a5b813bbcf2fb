"""What a load generator worker is told (:class:`WorkerJob`, the identities it mints) and
what it records (:class:`Recorder`), shared by the parent (bench/phases.py) and the worker
(bench/loadgen.py)."""

from __future__ import annotations

import asyncio
import contextlib
from array import array
from dataclasses import dataclass, field
from typing import Any

import orjson

# live counters, one slot each per worker (see Progress in phases.py)
# (``finished``: the phase second at which a finite crowd was used up, 0 until then)
LIVE_FIELDS = ("grabs", "opens", "rejections", "errors", "creates", "finished")
LIVE_GRABS, LIVE_OPENS, LIVE_REJECTIONS, LIVE_ERRORS, LIVE_CREATES, LIVE_FINISHED = range(
    len(LIVE_FIELDS)
)


@dataclass(frozen=True)
class Mint:
    """Identities a worker mints for itself before it reports ready (outside the measured
    window, so minting is not load generator CPU): uids ``first_uid`` .. ``+ count - 1``."""

    secret: str
    first_uid: int
    count: int
    ttl_s: int

    def tokens(self) -> list[tuple[int, bytes]]:
        from redpacket.gateway.auth import mint_token

        uids = range(self.first_uid, self.first_uid + self.count)
        return [
            (uid, mint_token(self.secret, uid, f"bench{uid}", "", self.ttl_s).encode())
            for uid in uids
        ]


@dataclass
class WorkerJob:
    index: int
    mode: str  # "open" or "reject"
    host: str
    port: int
    client: str  # "raw" or "aiohttp"
    users: list[tuple[int, bytes]]  # (uid, token)
    duration_s: float
    senders: list[bytes] = field(default_factory=list)  # tokens that create packets
    shares: int = 100  # the most shares of a packet; each packet draws from shares_min..shares
    shares_min: int = 0  # 0: every packet has ``shares``
    amount: int = 10_000  # cents of a packet of ``shares`` shares (smaller ones: pro rata)
    initial_packets: int = 0
    # the real crowd: this many packets kept open at once, a ticket for a random one of them
    in_flight: int = 0
    # every grab+open pair takes the next of these identities (a token never seen before);
    # None: each virtual user keeps its own (uid, token) of ``users``
    fresh: Mint | None = None
    # the boss packet: no creates, every identity opens ``packets`` once, the phase ends
    # when they are used up (sold-out answers are expected, not errors)
    finite: bool = False
    packets: list[bytes] = field(default_factory=list)  # reject phase: sold-out packet ids
    # reject phase: a crowd of distinct users; each grab+open pair takes the next token, so
    # the gateway sees a token it has never verified (wraps around once all are used)
    crowd: list[bytes] = field(default_factory=list)
    drain_s: float = 15.0  # how long answers still in flight at the end are waited for
    rate: float = 0.0  # open phase: grab+open pairs per second, open loop (0: closed loop)


class Recorder:
    """Answers by label: their end time (s since the phase start) and latency (ms)."""

    def __init__(self, live: Any, slot: int) -> None:
        self.times: dict[str, array] = {}
        self.lats: dict[str, array] = {}
        self.counts: dict[str, int] = {}
        self._live = live
        self._slot = slot

    def add(self, label: str, t_end: float, latency_s: float, live_field: int | None) -> None:
        times = self.times.get(label)
        if times is None:
            times = self.times[label] = array("d")
            self.lats[label] = array("d")
        times.append(t_end)
        self.lats[label].append(latency_s * 1000.0)
        self.counts[label] = self.counts.get(label, 0) + 1
        if live_field is not None:
            self._live[self._slot + live_field] += 1

    def count_crash(self, task: asyncio.Task[Any]) -> None:
        """A virtual user's task that raised is an error of the run, never a silent zero."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            label = f"error:loadgen:{type(exc).__name__}"
            self.counts[label] = self.counts.get(label, 0) + 1


def error_label(op: str, status: int, body: bytes) -> str:
    code = ""
    with contextlib.suppress(Exception):
        code = orjson.loads(body)["error"]["code"]
    return f"error:{op}:{status}:{code}" if code else f"error:{op}:{status}"
