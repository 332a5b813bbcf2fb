"""The load generator: worker processes, each with its own uvloop and its own connections.

A worker runs one phase for a fixed time, closed loop: each virtual user has one keep-alive
connection and sends its next request only when the previous one was answered.

- ``open`` phase: every user takes a ticket for a packet that still has a share for it
  (each packet's K tickets go to K different users of the worker), then grabs and opens it.
  The worker creates packets through the public API as they run out.
  The real crowd (``in_flight`` > 0, ``fresh``): each pair is the next minted identity, on
  a random one of ``in_flight`` open packets of ``shares_min``..``shares`` shares. The boss
  packet (``finite``): every identity grabs and opens the given packet once, then the
  worker is done (see bench/scenarios.py).
- ``reject`` phase: every user grabs, then opens, packets that are already sold out, with a
  uid that never won a share of them: each answer is a rejection.
- ``open`` phase with ``rate`` > 0, **open loop**: grab+open pairs arrive at a fixed rate
  whatever the answers (arrival k is due at k / rate), each on the next free connection of
  the pool. Latency counts from the time a request was *due*, not from when a connection
  was free to send it, so a slow system cannot slow the arrivals down and hide its own
  queueing (no coordinated omission): a grab from its arrival's due time, an open from its
  grab's answer (it is due then), and the whole pair from the arrival's due time. Answers
  are filed under their arrival's due time, so every arrival of the window counts, however
  late its answer; one not answered within ``drain_s`` after the end is an error.

The worker records the end time and latency of every answer, counts answers by label for
the live progress line, and sends everything back to the parent when the phase is over.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing.connection
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from redpacket.bench.httpclient import (
    AiohttpConnection,
    ClientConnection,
    HttpError,
    RawConnection,
    aiohttp_session,
    close_quietly,
)
from redpacket.bench.job import (
    LIVE_ERRORS,
    LIVE_FIELDS,
    LIVE_FINISHED,
    LIVE_GRABS,
    LIVE_OPENS,
    LIVE_REJECTIONS,
    Recorder,
    WorkerJob,
    error_label,
)
from redpacket.bench.supply import PACKETS, POST, Identities, Supply

# -- the open phase -------------------------------------------------------------------------


async def open_user(
    *,
    own: tuple[int, bytes],
    identities: Identities,
    conn: ClientConnection,
    supply: Supply,
    rec: Recorder,
    clock: Any,
    end: float,
    observed: list[tuple[int, int, int]],
) -> None:
    perf = time.perf_counter
    while clock() < end:
        identity = identities.take(own)
        if identity is None:  # a finite crowd is used up
            return
        uid, token = identity
        packet = await supply.ticket(uid)
        if packet is None or clock() >= end:
            return
        base = PACKETS + b"/" + packet.id
        started = perf()
        try:
            status, body = await conn.request(POST, base + b"/grab", token)
        except HttpError:
            rec.add("error:grab:conn", clock(), perf() - started, LIVE_ERRORS)
            continue
        if status != 200:
            rec.add(error_label("grab", status, body), clock(), perf() - started, LIVE_ERRORS)
            continue
        rec.add("grab", clock(), perf() - started, LIVE_GRABS)
        if not orjson.loads(body).get("can_open"):
            rec.add("grab_cannot_open", clock(), 0.0, None)
            continue
        started = perf()
        try:
            status, body = await conn.request(POST, base + b"/open", token)
        except HttpError:
            rec.add("error:open:conn", clock(), perf() - started, LIVE_ERRORS)
            continue
        if status == 200:
            answer = orjson.loads(body)
            observed.append((packet.snowflake, uid, int(answer["amount"])))
            if answer.get("replayed"):
                rec.add("open_replayed", clock(), perf() - started, None)
            else:
                packet.won += 1
                rec.add("open", clock(), perf() - started, LIVE_OPENS)
        elif status == 410 and supply.finite:  # the boss packet sold out: expected
            rec.add("open_sold_out", clock(), perf() - started, LIVE_REJECTIONS)
        else:
            rec.add(error_label("open", status, body), clock(), perf() - started, LIVE_ERRORS)


# -- the open phase, open loop --------------------------------------------------------------


async def open_arrival(
    *,
    due: float,
    uid: int,
    token: bytes,
    pool: asyncio.Queue[ClientConnection],
    supply: Supply,
    rec: Recorder,
    clock: Any,
    observed: list[tuple[int, int, int]],
) -> None:
    """One grab+open pair due at ``due``; every latency is measured from a due time."""
    packet = await supply.ticket(uid)
    if packet is None:  # the phase ended before a packet with a share for it was created
        rec.add("error:open-loop:no_packet", due, clock() - due, LIVE_ERRORS)
        return
    conn = await pool.get()  # waiting for a free connection counts: the clock started at due
    try:
        base = PACKETS + b"/" + packet.id
        try:
            status, body = await conn.request(POST, base + b"/grab", token)
        except HttpError:
            rec.add("error:grab:conn", due, clock() - due, LIVE_ERRORS)
            return
        grabbed = clock()
        if status != 200:
            rec.add(error_label("grab", status, body), due, grabbed - due, LIVE_ERRORS)
            return
        rec.add("grab", due, grabbed - due, LIVE_GRABS)
        if not orjson.loads(body).get("can_open"):
            rec.add("grab_cannot_open", due, 0.0, None)
            return
        try:
            status, body = await conn.request(POST, base + b"/open", token)
        except HttpError:
            rec.add("error:open:conn", due, clock() - due, LIVE_ERRORS)
            return
        done = clock()
        if status != 200:
            rec.add(error_label("open", status, body), due, done - due, LIVE_ERRORS)
            return
        answer = orjson.loads(body)
        observed.append((packet.snowflake, uid, int(answer["amount"])))
        if answer.get("replayed"):
            rec.add("open_replayed", due, done - grabbed, None)
            return
        packet.won += 1
        rec.add("open", due, done - grabbed, LIVE_OPENS)
        rec.add("pair", due, done - due, None)
    finally:
        pool.put_nowait(conn)


async def open_loop(
    *,
    job: WorkerJob,
    conns: list[ClientConnection],
    identities: Identities,
    supply: Supply,
    rec: Recorder,
    clock: Any,
    observed: list[tuple[int, int, int]],
) -> list[asyncio.Task[None]]:
    """Start ``rate x duration`` arrivals on schedule (bounded in time and count); returns
    their tasks, some possibly still running."""
    pool: asyncio.Queue[ClientConnection] = asyncio.Queue()
    for conn in conns:
        pool.put_nowait(conn)
    total = int(job.rate * job.duration_s)
    users = job.users
    # arrivals still running; a finished one is dropped, so the set stays as small as the
    # number in flight (a list of every arrival grew by rate x duration tasks)
    tasks: set[asyncio.Task[None]] = set()
    k = 0
    while k < total:
        now = clock()
        # every arrival already due starts now (a late wake-up does not skip or delay any)
        while k < total and k / job.rate <= now:
            identity = identities.take(users[k % len(users)])
            if identity is None:
                break
            uid, token = identity
            task = asyncio.ensure_future(
                open_arrival(
                    due=k / job.rate,
                    uid=uid,
                    token=token,
                    pool=pool,
                    supply=supply,
                    rec=rec,
                    clock=clock,
                    observed=observed,
                )
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(rec.count_crash)
            k += 1
        if k < total:
            await asyncio.sleep(max(0.0, k / job.rate - clock()))
    return list(tasks)


# -- the reject phase -----------------------------------------------------------------------


async def reject_user(
    *,
    n: int,
    token: bytes,
    conn: ClientConnection,
    packets: list[bytes],
    rec: Recorder,
    clock: Any,
    end: float,
    crowd: list[bytes],
    next_in_crowd: list[int],
) -> None:
    perf = time.perf_counter
    i = n * 7919
    while clock() < end:
        base = PACKETS + b"/" + packets[i % len(packets)]
        i += 1
        if crowd:
            token = crowd[next_in_crowd[0] % len(crowd)]
            next_in_crowd[0] += 1
        started = perf()
        try:
            status, body = await conn.request(POST, base + b"/grab", token)
        except HttpError:
            rec.add("error:grab:conn", clock(), perf() - started, LIVE_ERRORS)
            continue
        if status == 200 and not orjson.loads(body).get("can_open"):
            rec.add("reject_grab", clock(), perf() - started, LIVE_REJECTIONS)
        else:
            rec.add(error_label("grab", status, body), clock(), perf() - started, LIVE_ERRORS)
        if clock() >= end:
            return
        started = perf()
        try:
            status, body = await conn.request(POST, base + b"/open", token)
        except HttpError:
            rec.add("error:open:conn", clock(), perf() - started, LIVE_ERRORS)
            continue
        if status == 410:
            rec.add("reject_open", clock(), perf() - started, LIVE_REJECTIONS)
        else:
            rec.add(error_label("open", status, body), clock(), perf() - started, LIVE_ERRORS)


# -- the worker process ---------------------------------------------------------------------


class GcWatch:
    """Times the worker's own cyclic-GC collections by generation: a pause in the load
    generator delays answers it then files as the system's latency."""

    def __init__(self) -> None:
        self.by_gen: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.by_gen[info["generation"]].append(time.perf_counter() - self._started)

    def report(self) -> dict[str, Any]:
        return {
            f"gen{g}": {
                "collections": len(ms),
                "total_ms": round(1000 * sum(ms), 1),
                "max_ms": round(1000 * max(ms, default=0.0), 2),
            }
            for g, ms in self.by_gen.items()
        }


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _start_users(
    job: WorkerJob,
    *,
    conns: list[ClientConnection],
    identities: Identities,
    supply: Supply | None,
    rec: Recorder,
    clock: Any,
    observed: list[tuple[int, int, int]],
) -> list[asyncio.Task[None]]:
    """One task per virtual user (closed loop), each on its own connection."""
    end = job.duration_s
    if supply is not None:
        return [
            asyncio.ensure_future(
                open_user(
                    own=own,
                    identities=identities,
                    conn=conn,
                    supply=supply,
                    rec=rec,
                    clock=clock,
                    end=end,
                    observed=observed,
                )
            )
            for own, conn in zip(job.users, conns, strict=True)
        ]
    next_in_crowd = [0]
    return [
        asyncio.ensure_future(
            reject_user(
                n=n,
                token=token,
                conn=conn,
                packets=job.packets,
                rec=rec,
                clock=clock,
                end=end,
                crowd=job.crowd,
                next_in_crowd=next_in_crowd,
            )
        )
        for n, ((_, token), conn) in enumerate(zip(job.users, conns, strict=True))
    ]


async def _fill(supply: Supply, creators: list[ClientConnection], count: int) -> None:
    """The packets open before the phase starts, created over every creator connection."""
    per = [
        count // len(creators) + (1 if i < count % len(creators) else 0)
        for i in range(len(creators))
    ]

    async def create(conn: ClientConnection, n: int) -> None:
        for _ in range(n):
            await supply.create(conn)

    await asyncio.gather(*(create(c, n) for c, n in zip(creators, per, strict=True)))


@dataclass
class _Kit:
    """What a worker makes before its phase and uses all through it; its connections and its
    aiohttp session are closed when the phase ends, however it ends."""

    rec: Recorder
    session: aiohttp.ClientSession | None  # --client aiohttp: shared by every connection
    conns: list[ClientConnection]  # one per virtual user
    creators: list[ClientConnection]  # the open phase's packet creators (none: no creates)
    observed: list[tuple[int, int, int]]  # every 200 open, for the invariant checker
    # the clock: seconds since the phase start, which the parent sets in wall time (until
    # then, since the kit was made); ``origin[0]`` is reset when the phase starts
    origin: list[float]
    clock: Callable[[], float]
    supply: Supply | None  # the open phase's packets
    identities: Identities
    gc_watch: GcWatch

    def close_connections(self) -> None:
        """Close every socket: a request still waiting on one fails at once (ends a phase)."""
        for conn in [*self.conns, *self.creators]:
            conn.close()


def _connections(
    job: WorkerJob, session: aiohttp.ClientSession | None
) -> tuple[list[ClientConnection], list[ClientConnection]]:
    """A connection per virtual user, then the creators' (open phase, packets not given)."""

    def connection() -> ClientConnection:
        if session is not None:
            return AiohttpConnection(session, f"http://{job.host}:{job.port}")
        return RawConnection(job.host, job.port)

    conns = [connection() for _ in job.users]
    making = job.mode == "open" and not job.finite
    # the crowd creates a packet per ~12 opens: more connections keep up with it
    creators = [connection() for _ in range(8 if job.in_flight else 2)] if making else []
    return conns, creators


def _make_kit(job: WorkerJob, rec: Recorder) -> _Kit:
    """Everything the phase needs, made in this order: the connections (not yet connected),
    the clock, the packet supply and the identities (minted here, outside the window)."""
    session = aiohttp_session(len(job.users) + 4) if job.client == "aiohttp" else None
    conns, creators = _connections(job, session)
    observed: list[tuple[int, int, int]] = []
    origin = [time.perf_counter()]

    def clock() -> float:
        return time.perf_counter() - origin[0]

    supply = Supply(job, rec, clock) if job.mode == "open" else None
    identities = Identities(job.fresh.tokens() if job.fresh else [], job.finite)
    return _Kit(
        rec=rec,
        session=session,
        conns=conns,
        creators=creators,
        observed=observed,
        origin=origin,
        clock=clock,
        supply=supply,
        identities=identities,
        gc_watch=GcWatch(),
    )


async def _get_ready(
    job: WorkerJob, pipe: multiprocessing.connection.Connection, kit: _Kit
) -> None:
    """Connect, make the packets open at the start, stop the collector, report ready, then
    sleep until the wall-clock time at which the parent starts every worker."""
    await asyncio.gather(*(c.warm() for c in [*kit.conns, *kit.creators]))
    if kit.supply is not None and kit.creators:
        await _fill(kit.supply, kit.creators, max(job.initial_packets, job.in_flight))
    # Everything made so far lives all phase (identities, connections, packets): frozen,
    # the collector no longer walks it. And no collection runs in the measured window: a
    # full one took 640 ms in a 60 s open loop (its heap grows with every answer kept), a
    # pause that delayed the answers then filed as the system's latency. A worker lives
    # for one phase; what cycles it leaves are collected once the window is over.
    gc.collect()
    gc.freeze()
    gc.callbacks.append(kit.gc_watch)
    gc.disable()
    pipe.send(("ready", job.index))
    # the parent answers with the wall-clock time at which every worker starts
    _, start_at = await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    await asyncio.sleep(max(0.0, start_at - time.time()))


async def _wind_down(
    job: WorkerJob, kit: _Kit, users: list[asyncio.Task[None]], tasks: list[asyncio.Task[None]]
) -> set[asyncio.Task[None]]:
    """After the window: the collector back on, no more creates, the answers still in flight
    waited for (a 200 open must reach the checker), then every connection closed and what
    still runs (``tasks``: the creators) cancelled. Returns the users' tasks that were late."""
    gc.enable()
    gc.callbacks.remove(kit.gc_watch)
    if kit.supply is not None:
        kit.supply.stop()
    _, late = await asyncio.wait(users, timeout=job.drain_s) if users else (set(), set())
    if job.rate > 0 and late:  # open loop: an arrival never answered is an error
        kit.rec.counts["error:open-loop:unanswered"] = len(late)
    if kit.identities.reused:
        kit.rec.counts["identities_reused"] = kit.identities.reused
    kit.close_connections()
    for task in [*late, *tasks]:
        task.cancel()
    await asyncio.gather(*late, *tasks, return_exceptions=True)
    return late


def _answer(
    job: WorkerJob, kit: _Kit, *, cpu_s: float, late: set[asyncio.Task[None]]
) -> dict[str, Any]:
    """What the worker sends the parent (merged by PhaseResult.merge): every answer
    recorded, the 200 opens for the checker, the packets sold out for phase 2, its CPU."""
    supply = kit.supply
    sold_out = [p.id.decode() for p in supply.all if p.won == p.shares] if supply else []
    return {
        "index": job.index,
        "times": dict(kit.rec.times),
        "lats": dict(kit.rec.lats),
        "counts": dict(kit.rec.counts),
        "observed": kit.observed,
        "sold_out": sold_out,
        "cpu_s": cpu_s,
        "late": len(late),
        "packets_created": len(supply.all) if supply and kit.creators else 0,
        "gc": kit.gc_watch.report(),
    }


async def run_job(
    job: WorkerJob, pipe: multiprocessing.connection.Connection, live: Any
) -> dict[str, Any]:
    """One phase in this worker, from connecting to its answer. The open loop's scheduler
    (open_loop, woken per arrival) is awaited right here, not through a helper coroutine."""
    slot = job.index * len(LIVE_FIELDS)
    kit = _make_kit(job, Recorder(live, slot))
    rec, supply, clock = kit.rec, kit.supply, kit.clock
    try:
        await _get_ready(job, pipe, kit)
        kit.origin[0] = time.perf_counter()
        cpu_start = _cpu_s()
        end = job.duration_s
        tasks = [asyncio.ensure_future(supply.creator(c)) for c in kit.creators] if supply else []
        if supply is not None and job.rate > 0:
            users = await open_loop(
                job=job,
                conns=kit.conns,
                identities=kit.identities,
                supply=supply,
                rec=rec,
                clock=clock,
                observed=kit.observed,
            )
        else:
            users = _start_users(
                job,
                conns=kit.conns,
                identities=kit.identities,
                supply=supply,
                rec=rec,
                clock=clock,
                observed=kit.observed,
            )
        for task in users if job.rate <= 0 else []:  # open-loop arrivals count their own
            task.add_done_callback(rec.count_crash)
        if users:
            await asyncio.wait(users, timeout=max(0.0, end - clock()))
        if clock() < end:  # a finite crowd used up early: the phase is this long
            live[slot + LIVE_FINISHED] = clock()
        cpu_s = _cpu_s() - cpu_start
        late = await _wind_down(job, kit, users, tasks)
        return _answer(job, kit, cpu_s=cpu_s, late=late)
    finally:
        kit.close_connections()
        await close_quietly(kit.session)


def worker_main(job: WorkerJob, pipe: multiprocessing.connection.Connection, live: Any) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter, its own uvloop)."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        result = runner(run_job(job, pipe, live))
    except BaseException as exc:
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise
    pipe.send(("done", result))
    pipe.close()
