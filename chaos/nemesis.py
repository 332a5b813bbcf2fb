"""The nemesis: injects each fault of the schedule at its time, heals it, and measures how
long the affected shard takes to answer again.

Faults of one resource (a node, a redis-server, a shard's MySQL, the gateway, the ring) run
one after the other; everything else overlaps. Signals go through the supervisor's own
process handles, so a signal never reaches a pid the kernel has given to someone else. Kills
heal themselves (the supervisor restarts the process: that moment is the heal); a pause, a
cut and a latency are healed by the nemesis after their hold; a rebalance is healed when the
command (run again after a kill, or after failing under other faults) has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from redpacket.chaos.cluster import ChaosCluster
from redpacket.chaos.schedule import Fault, Kind, Schedule
from redpacket.sharding.ring import RingDoc

REBALANCE_ATTEMPT_S = 120.0  # one run of the rebalance command, at most
REBALANCE_ATTEMPTS = 6
RESTART_WAIT_S = 60.0
ANSWER_WAIT_S = 120.0
LATE_LIMIT_S = 60.0  # a fault may be injected this long after the run's end, at most

Probe = Callable[[list[str], bool], Awaitable[bool]]  # (shards, any of them is enough)


@dataclass
class FaultRecord:
    """What happened to one fault of the schedule (seconds since the start of the run)."""

    fault: Fault
    injected_at: float | None = None
    healed_at: float | None = None
    answered_at: float | None = None  # the affected shard(s) answered again
    serving_at: float | None = None  # a killed process answers its own port again
    skipped: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def recovery_s(self) -> float | None:
        if self.healed_at is None or self.answered_at is None:
            return None
        return max(0.0, self.answered_at - self.healed_at)

    @property
    def late_s(self) -> float | None:
        """How much later than scheduled the nemesis could inject it (its resource was
        still taken: a process not yet back from the fault before). The harness's delay,
        not the system's."""
        if self.injected_at is None:
            return None
        return max(0.0, self.injected_at - self.fault.at_s)

    @property
    def harness_problem(self) -> str | None:
        """Why the nemesis could not run this fault as scheduled, if it could not: the
        harness's problem, reported apart from the verdict on the system."""
        if self.skipped:
            return f"fault {self.fault.index} ({self.fault.kind}) not injected: {self.skipped}"
        errors = [n for n in self.notes if n.startswith("error:")]
        if self.injected_at is None or errors:
            why = "; ".join(errors) or "never injected"
            return f"fault {self.fault.index} ({self.fault.kind}) could not be run: {why}"
        return None

    @property
    def outage_s(self) -> float | None:
        if self.injected_at is None or self.answered_at is None:
            return None
        return max(0.0, self.answered_at - self.injected_at)

    def as_dict(self) -> dict[str, Any]:
        rnd = lambda v: None if v is None else round(v, 3)  # noqa: E731
        return {
            **self.fault.as_dict(),
            "injected_at": rnd(self.injected_at),
            "healed_at": rnd(self.healed_at),
            "answered_at": rnd(self.answered_at),
            "serving_at": rnd(self.serving_at),
            "late_s": rnd(self.late_s),
            "recovery_s": rnd(self.recovery_s),
            "outage_s": rnd(self.outage_s),
            **({"skipped": self.skipped} if self.skipped else {}),
            **({"notes": self.notes} if self.notes else {}),
        }


@dataclass
class Nemesis:
    cluster: ChaosCluster
    schedule: Schedule
    probe: Probe
    t0: float = field(default_factory=time.monotonic)
    log_dir: Path | None = None
    records: list[FaultRecord] = field(default_factory=list)
    active: set[int] = field(default_factory=set)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _paused: list[asyncio.subprocess.Process] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    @property
    def base_shards(self) -> list[str]:
        return [f"shard-{i}" for i in range(self.schedule.shards)]

    async def run(self) -> None:
        self.records = [FaultRecord(f) for f in self.schedule.faults]
        await asyncio.gather(*(self._one(r) for r in self.records))

    async def _one(self, record: FaultRecord) -> None:
        fault = record.fault
        await asyncio.sleep(max(0.0, fault.at_s - self.now()))
        lock = self._locks.setdefault(fault.resource, asyncio.Lock())
        async with lock:
            # A fault waits for its resource (the fault before it on the same process, node,
            # store or ring) however long the faults made that take, up to LATE_LIMIT_S past
            # the run: the load runs on until every fault is healed, so a late one still
            # happens under load (its delay is reported: late_s). Past that it is the
            # harness's problem: its resource never came free.
            last = self.schedule.seconds + LATE_LIMIT_S
            if self.now() > last:
                record.skipped = f"its resource was busy until {self.now():.1f}s"
                return
            self.active.add(fault.index)
            try:
                await self._inject_and_heal(record)
            except Exception as exc:  # a fault that could not be run is reported, not hidden
                record.notes.append(f"error: {type(exc).__name__}: {exc}")
            finally:
                self.active.discard(fault.index)
        if record.healed_at is not None:
            if fault.target in self.base_shards:
                await self._until_answered(record, [fault.target], False)
            else:  # the gateway or the ring: answering again means routing again, anywhere
                await self._until_answered(record, self.base_shards, True)

    async def _until_answered(self, record: FaultRecord, shards: list[str], any_: bool) -> None:
        deadline = time.monotonic() + ANSWER_WAIT_S
        while time.monotonic() < deadline:
            if await self.probe(shards, any_):
                record.answered_at = self.now()
                return
            await asyncio.sleep(0.1)
        record.notes.append(f"{shards} did not answer within {ANSWER_WAIT_S:.0f}s of the heal")

    # -- the faults -------------------------------------------------------------------------

    async def _inject_and_heal(self, record: FaultRecord) -> None:
        fault = record.fault
        kind = fault.kind
        if kind in (Kind.NODE_KILL, Kind.GATEWAY_KILL, Kind.REDIS_RESTART):
            name = {
                Kind.NODE_KILL: f"{fault.target}-node",
                Kind.REDIS_RESTART: f"{fault.target}-redis",
            }.get(kind, "gateway")
            child = self.cluster.child(name)
            _, before = await self._signal_live(name, signal.SIGKILL)
            record.injected_at = self.now()
            deadline = time.monotonic() + RESTART_WAIT_S
            while child.restarts <= before and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # the supervisor's counter, in this process
            if child.restarts > before:
                record.healed_at = self.now()
                # Its resource stays taken until the process serves again: the next fault on
                # it must hit a running service. Released at the restart alone, a burst of
                # kills hit a gateway (and a node) still starting, again and again, and
                # neither listened for 38 s (issue 24: seed 690262816 at 471-508 s).
                await self._until_serving(record, name)
            else:
                record.notes.append(f"{name} was not restarted within {RESTART_WAIT_S:.0f}s")
        elif kind in (Kind.NODE_PAUSE, Kind.REDIS_PAUSE):
            suffix = "-node" if kind is Kind.NODE_PAUSE else "-redis"
            proc, _ = await self._signal_live(fault.target + suffix, signal.SIGSTOP)
            self._paused.append(proc)
            record.injected_at = self.now()
            await asyncio.sleep(fault.hold_s)
            self._resume(proc)
            record.healed_at = self.now()
        elif kind is Kind.MYSQL_CUT:
            proxy = self.cluster.proxies[fault.target]
            proxy.block()
            record.injected_at = self.now()
            try:
                await asyncio.sleep(fault.hold_s)
            finally:
                proxy.unblock()
            record.healed_at = self.now()
        elif kind in (Kind.MYSQL_LATENCY, Kind.LINK_LATENCY):
            proxies = self.cluster.proxies if kind is Kind.MYSQL_LATENCY else self.cluster.links
            proxy = proxies[fault.target]
            proxy.delay_s = fault.latency_ms / 1000
            record.injected_at = self.now()
            try:
                await asyncio.sleep(fault.hold_s)
            finally:
                proxy.delay_s = 0.0
            record.healed_at = self.now()
        elif kind in (Kind.LINK_CUT, Kind.LINK_ONEWAY, Kind.CLOCK_JUMP):
            await self._hold(record)
        elif kind is Kind.GATEWAY_RESTART:
            await self._gateway_restart(record)
        else:
            await self._rebalance(record)

    async def _hold(self, record: FaultRecord) -> None:
        """A link cut or stalled one way, or a node clock moved, for the fault's hold."""
        fault = record.fault
        link = self.cluster.links.get(fault.target)
        clock = self.cluster.clock_file(fault.target)
        if fault.kind is Kind.LINK_CUT:
            assert link is not None
            link.block()
        elif fault.kind is Kind.LINK_ONEWAY:
            assert link is not None
            link.hold("up" if fault.action == "to_node" else "down")
        else:
            clock.write_text(str(fault.jump_ms))
        record.injected_at = self.now()
        try:
            await asyncio.sleep(fault.hold_s)
        finally:
            if fault.kind is Kind.CLOCK_JUMP:
                clock.write_text("0")  # and back: the clock steps the other way
            elif link is not None:
                link.unblock()
                link.release()
        record.healed_at = self.now()

    async def _gateway_restart(self, record: FaultRecord) -> None:
        """Hold every node's replies to the gateway so its links fill with calls in flight,
        then SIGTERM it (a rolling restart) while they are full; release; it is healed when
        the supervisor has started it again, and released when it serves."""
        links = list(self.cluster.links.values())
        for link in links:
            link.hold("down")
        try:
            await asyncio.sleep(record.fault.hold_s)
            child = self.cluster.child("gateway")
            _, before = await self._signal_live("gateway", signal.SIGTERM)
            record.injected_at = self.now()
        finally:
            for link in links:
                link.release()
        deadline = time.monotonic() + RESTART_WAIT_S
        while child.restarts <= before and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if child.restarts > before:
            record.healed_at = self.now()
            await self._until_serving(record, "gateway")
        else:
            record.notes.append(f"gateway was not restarted within {RESTART_WAIT_S:.0f}s")

    def _serving_url(self, name: str) -> str | None:
        """Where a supervised process answers for itself (None: redis, checked by a connect)."""
        if name.startswith("gateway"):
            return self.cluster.gateway_url + "/healthz"
        for plan in self.cluster.plans:
            if name == f"{plan.name}-node":
                return plan.node_url + "/healthz"
        return None

    async def _until_serving(self, record: FaultRecord, name: str) -> None:
        """Wait (RESTART_WAIT_S at most) until a restarted process answers its own port."""
        url = self._serving_url(name)
        port = next((p.redis_port for p in self.cluster.plans if name == f"{p.name}-redis"), None)
        deadline = time.monotonic() + RESTART_WAIT_S
        timeout = aiohttp.ClientTimeout(total=1)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    if url is not None:
                        async with session.get(url) as resp:
                            if resp.status == 200:
                                record.serving_at = self.now()
                                return
                    elif port is not None:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                        writer.close()
                        record.serving_at = self.now()
                        return
                await asyncio.sleep(0.1)
        record.notes.append(f"{name} did not serve within {RESTART_WAIT_S:.0f}s of its restart")

    async def _signal_live(
        self, name: str, sig: signal.Signals
    ) -> tuple[asyncio.subprocess.Process, int]:
        """Signal the child's live process: ``(that process, the child's restart count then)``.

        One that is down (an earlier fault killed it, or it exited starting up under other
        faults) is signalled once its supervisor has brought it back, within RESTART_WAIT_S:
        a fault needs a process to hit (seeds 1 and 3 at 600 s found this race)."""
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            child = self.cluster.child(name)
            proc = child.proc
            if proc is not None and proc.returncode is None:
                before = child.restarts
                with contextlib.suppress(ProcessLookupError):  # it died just now: wait again
                    proc.send_signal(sig)
                    return proc, before
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not running for {RESTART_WAIT_S:.0f}s")
            await asyncio.sleep(0.05)

    def _resume(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            if proc.returncode is None:
                proc.send_signal(signal.SIGCONT)
        with contextlib.suppress(ValueError):
            self._paused.remove(proc)

    def _ring(self) -> RingDoc:
        return RingDoc.load(self.cluster.ring_file)

    def _argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "redpacket.cli",
            "rebalance",
            *args,
            "--cluster",
            self.cluster.name,
            "--var",
            self.cluster.var,
            "--no-progress",
            "--gateway-timeout-s",
            "60",
        ]

    async def _start(self, record: FaultRecord, *args: str) -> asyncio.subprocess.Process:
        log = (self.log_dir or self.cluster.home / "logs") / f"rebalance-{record.fault.index}.log"
        with log.open("ab") as out:
            out.write(f"$ {' '.join(self._argv(*args))}\n".encode())
            out.flush()
            return await asyncio.create_subprocess_exec(
                *self._argv(*args), stdout=out, stderr=asyncio.subprocess.STDOUT
            )

    async def _finish(self, record: FaultRecord, *args: str) -> bool:
        """Run a rebalance command to the end (bounded in time); True if it exited 0."""
        proc = await self._start(record, *args)
        try:
            code = await asyncio.wait_for(proc.wait(), REBALANCE_ATTEMPT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            record.notes.append(f"`rebalance {' '.join(args)}` timed out: killed")
            return False
        if code != 0:
            record.notes.append(f"`rebalance {' '.join(args)}` exited {code}: run again")
        return code == 0

    def _done(self, fault: Fault) -> bool:
        doc = self._ring()
        present = any(n.name == fault.target for n in doc.nodes)
        return doc.previous is None and present == (fault.action == "add")

    async def _rebalance(self, record: FaultRecord) -> None:
        fault = record.fault
        command = (fault.action, "--node", fault.target)
        if fault.kind is Kind.REBALANCE_KILL:
            proc = await self._start(record, *command)
            record.injected_at = self.now()
            try:
                await asyncio.wait_for(proc.wait(), fault.kill_after_s)
                record.notes.append("finished before the kill")
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                doc = self._ring()
                where = "mid-change" if doc.previous is not None else "before the ring changed"
                record.notes.append(f"SIGKILLed {fault.kill_after_s}s in ({where}, v{doc.version})")
            await self._finish(record, "resume")
        else:
            record.injected_at = self.now()
        for _ in range(REBALANCE_ATTEMPTS):
            if self._done(fault):
                break
            await self._finish(record, *command)
            if not self._done(fault):
                await asyncio.sleep(1.0)
                await self._finish(record, "resume")
        if self._done(fault):
            record.healed_at = self.now()
        else:
            record.notes.append("the rebalance could not be finished")

    async def heal_all(self) -> None:
        """The safety net at the end: nothing stays paused, cut or slow."""
        for proc in list(self._paused):
            self._resume(proc)
        for proxy in [*self.cluster.proxies.values(), *self.cluster.links.values()]:
            proxy.unblock()
            proxy.release()
            proxy.delay_s = 0.0
        for plan in self.cluster.plans:
            self.cluster.clock_file(plan.name).write_text("0")
