"""Running one measured phase: spawn the load generator's workers, start them together,
sample every process's CPU and the nodes' memory meanwhile, and merge the answers.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from redpacket.bench import procstats
from redpacket.bench.cluster import Target
from redpacket.bench.httpclient import HttpError, RawConnection
from redpacket.bench.job import LIVE_FIELDS, LIVE_FINISHED, Mint, WorkerJob
from redpacket.bench.loadgen import worker_main
from redpacket.bench.profile import Profiler
from redpacket.bench.scenarios import Shape, shape_of
from redpacket.bench.stats import PhaseResult
from redpacket.core.ids import snowflake_of


class Progress:
    """A live line per phase: elapsed seconds and the current rates of every worker summed."""

    def __init__(self, title: str, duration_s: float, live: Any, workers: int, quiet: bool):
        self._live = live
        self._workers = workers
        self._last = [0.0] * len(LIVE_FIELDS)
        self._last_t = time.monotonic()
        self._bar = None
        if not quiet:
            from tqdm import tqdm

            self._bar = tqdm(
                total=round(duration_s, 1),
                desc=title,
                unit="s",
                bar_format="{desc}: {bar:20} {n:.0f}/{total:.0f}s {postfix}",
                file=sys.stderr,
                leave=True,
            )

    def totals(self) -> list[float]:
        n = len(LIVE_FIELDS)
        return [sum(self._live[w * n + f] for w in range(self._workers)) for f in range(n)]

    def update(self, elapsed_s: float) -> None:
        if self._bar is None:
            return
        now, totals = time.monotonic(), self.totals()
        dt_s = max(1e-6, now - self._last_t)
        rates = {
            name: (total - last) / dt_s
            for name, total, last in zip(LIVE_FIELDS, totals, self._last, strict=True)
        }
        self._last, self._last_t = totals, now
        shown = {
            k: f"{v:,.0f}/s"
            for k, v in rates.items()
            if (v or k in ("opens", "rejections")) and k != "finished"
        }
        self._bar.set_postfix(shown, refresh=False)
        self._bar.n = min(self._bar.total, round(elapsed_s, 1))
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_phase(
    args: argparse.Namespace,
    *,
    title: str,
    mode: str,
    host: str,
    port: int,
    users: list[tuple[int, bytes]],
    duration_s: float,
    pids: dict[str, int],
    senders: list[bytes] | None = None,
    packets: list[bytes] | None = None,
    workers: int | None = None,
    crowd: list[bytes] | None = None,
    rate: float = 0.0,
    shape: Shape | None = None,
    fresh: Mint | None = None,
    profile: str | None = None,
) -> PhaseResult:
    """One measured phase; ``shape`` says how the open phase makes and picks packets,
    ``fresh`` the identities its pairs take (split between the workers); with ``--profile``
    a phase named in ``profile`` is sampled by py-spy. Once every worker has started, each
    is joined (or killed) however the phase ends."""
    workers = max(1, min(workers or args.workers, len(users)))
    ctx = multiprocessing.get_context("spawn")
    live = ctx.RawArray("d", workers * len(LIVE_FIELDS))
    jobs = _worker_jobs(
        args,
        workers=workers,
        mode=mode,
        host=host,
        port=port,
        users=users,
        duration_s=duration_s,
        senders=senders,
        packets=packets,
        crowd=crowd,
        rate=rate,
        shape=shape,
        fresh=fresh,
    )
    procs, pipes = _start_workers(ctx, jobs, live)
    result = PhaseResult(mode, duration_s, workers)
    try:
        await _measure(
            args,
            result,
            title=title,
            pids=pids,
            profile=profile,
            procs=procs,
            pipes=pipes,
            live=live,
        )
    finally:
        _reap(procs)
    return result


def _worker_jobs(
    args: argparse.Namespace,
    *,
    workers: int,
    mode: str,
    host: str,
    port: int,
    users: list[tuple[int, bytes]],
    duration_s: float,
    senders: list[bytes] | None,
    packets: list[bytes] | None,
    crowd: list[bytes] | None,
    rate: float,
    shape: Shape | None,
    fresh: Mint | None,
) -> Iterator[WorkerJob]:
    """Each worker's share of the phase: every ``workers``-th user, sender and crowd token,
    and an even part of the packets made first, of those kept open, of the fresh identities
    and of the rate. A generator: each job is made as its worker is about to start."""
    groups = [users[w::workers] for w in range(workers)]
    shape = shape or shape_of(args)
    initial = max(0, shape.initial_packets)
    per_fresh = fresh.count // workers if fresh else 0
    for w, group in enumerate(groups):
        yield WorkerJob(
            index=w,
            mode=mode,
            host=host,
            port=port,
            client=args.client,
            users=group,
            duration_s=duration_s,
            senders=(senders or [])[w::workers],
            shares=shape.shares,
            shares_min=shape.shares_min,
            amount=shape.amount,
            initial_packets=initial // workers + (1 if w < initial % workers else 0),
            in_flight=shape.in_flight // workers,
            finite=shape.finite,
            fresh=Mint(fresh.secret, fresh.first_uid + w * per_fresh, per_fresh, fresh.ttl_s)
            if fresh
            else None,
            packets=packets or [],
            crowd=(crowd or [])[w::workers],
            rate=rate / workers,
        )


def _start_workers(
    ctx: multiprocessing.context.SpawnContext, jobs: Iterable[WorkerJob], live: Any
) -> tuple[list[multiprocessing.process.BaseProcess], list[multiprocessing.connection.Connection]]:
    """A process per job, started one after the other, each with a pipe (ready, go, done).
    Our copy of the child's end is closed, so that a worker that dies reads as EOF here."""
    procs, pipes = [], []
    for job in jobs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=worker_main, args=(job, child, live), name=f"bench-worker-{job.index}"
        )
        proc.start()
        child.close()
        procs.append(proc)
        pipes.append(parent)
    return procs, pipes


async def _measure(
    args: argparse.Namespace,
    result: PhaseResult,
    *,
    title: str,
    pids: dict[str, int],
    profile: str | None,
    procs: list[multiprocessing.process.BaseProcess],
    pipes: list[multiprocessing.connection.Connection],
    live: Any,
) -> None:
    """The measured window, once every worker is ready: start them all at one wall-clock
    time, watch them meanwhile, and file in ``result`` their merged answers and the CPU and
    memory every process used."""
    duration_s, workers = result.duration_s, result.workers
    await _wait_for(pipes, "ready", timeout_s=120)
    me = os.getpid()
    cpu_pids = {**pids, "bench main": me}
    cpu_before = _read_cpu(cpu_pids)
    go = time.time() + 0.2
    result.started_at = go
    for pipe in pipes:
        pipe.send(("go", go))
    out_dir = getattr(args, "profile", None)
    profiler = Profiler(Path(out_dir) if out_dir and profile else None, profile or "", pids)
    await profiler.start(duration_s)
    progress = Progress(title, duration_s, live, workers, args.quiet)
    try:
        duration_s, rss = await _watch(
            go, duration_s, pids=pids, live=live, workers=workers, progress=progress
        )
        result.duration_s = duration_s
        cpu_after = _read_cpu(cpu_pids)
        progress.update(duration_s)
    finally:
        progress.close()
    for part in await _wait_for(pipes, "done", timeout_s=120):
        result.merge(part)
    await profiler.stop()
    result.profiles, result.profile_note = profiler.files, profiler.note
    result.rss_kib = {k: v for k, v in rss.items() if v}
    ours = {*cpu_pids.values(), *(p.pid for p in procs)}
    _file_cpu(result, cpu_before, cpu_after, ours=ours)


async def _watch(
    go: float,
    duration_s: float,
    *,
    pids: dict[str, int],
    live: Any,
    workers: int,
    progress: Progress,
) -> tuple[float, dict[str, list[tuple[float, int]]]]:
    """Until the window closes: each process's RSS every second, the progress line every
    half second. The window closes early once every worker used up its finite crowd: the
    phase is then that long. Returns the phase's duration and the RSS series (each ending
    with a sample at that duration)."""
    rss: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
    next_sample = 0.0
    while (elapsed := time.time() - go) < duration_s:
        if finished := _finished_at(live, workers):  # a finite crowd used up
            duration_s = finished
            break
        if elapsed >= next_sample:
            for name, pid in pids.items():
                kib = procstats.rss_kib(pid)
                if kib is not None and elapsed >= 0:
                    rss[name].append((round(elapsed, 2), kib))
            next_sample += 1.0 if elapsed >= 0 else 0.0
        progress.update(max(0.0, elapsed))
        await asyncio.sleep(min(0.5, max(0.01, duration_s - elapsed)))
    for name, pid in pids.items():
        kib = procstats.rss_kib(pid)
        if kib is not None:
            rss[name].append((round(duration_s, 2), kib))
    return duration_s, rss


@dataclass(frozen=True)
class _CpuReading:
    """CPU seconds used so far, read right before and right after the window."""

    by_name: dict[str, float | None]  # each process of the phase, and the bench's own
    everyone: dict[int, tuple[str, float]]  # every process of the machine, by pid
    machine_s: float | None  # the whole machine (None: not readable here)


def _read_cpu(cpu_pids: dict[str, int]) -> _CpuReading:
    """One reading, in this order: the named processes, every process, the machine."""
    by_name = {name: procstats.cpu_s(pid) for name, pid in cpu_pids.items()}
    everyone = procstats.all_cpu_s()
    return _CpuReading(by_name, everyone, procstats.machine_cpu_s())


def _file_cpu(
    result: PhaseResult, before: _CpuReading, after: _CpuReading, *, ours: set[int]
) -> None:
    """The CPU each named process and the machine used in the window, and the busiest
    processes that are not ours (``ours``: the phase's, the bench's and its workers')."""
    result.proc_cpu_s = {
        name: cpu - before.by_name[name]
        for name, cpu in after.by_name.items()
        if cpu is not None and before.by_name.get(name) is not None
    }
    if before.machine_s is not None and after.machine_s is not None:
        result.machine_cpu_s = after.machine_s - before.machine_s
    result.others = _busiest_others(before.everyone, after.everyone, ours, result.duration_s)


def _reap(procs: list[multiprocessing.process.BaseProcess]) -> None:
    """Every worker is joined, whatever the phase did: one still alive 5 s later is killed."""
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _finished_at(live: Any, workers: int) -> float:
    """The second at which the last worker used up its finite crowd (0: not all have)."""
    n = len(LIVE_FIELDS)
    done = [live[w * n + LIVE_FINISHED] for w in range(workers)]
    return max(done) if all(done) else 0.0


def _busiest_others(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    ours: set[int],
    duration_s: float,
    top: int = 5,
) -> list[dict[str, Any]]:
    """Processes outside the benchmark that used at least 2% of a core during the phase."""
    used = []
    for pid, (name, cpu) in after.items():
        if pid in ours:
            continue
        cores = (cpu - before.get(pid, (name, 0.0))[1]) / duration_s
        if cores >= 0.02:
            used.append({"pid": pid, "name": name, "cores": round(cores, 3)})
    used.sort(key=lambda u: -u["cores"])
    for entry in used[:top]:
        entry["cmdline"] = procstats.cmdline(entry["pid"])
    return used[:top]


async def machine_busy(sample_s: float) -> float | None:
    """Cores the whole machine kept busy over a short sample (before any load is applied)."""
    before = procstats.machine_cpu_s()
    await asyncio.sleep(sample_s)
    after = procstats.machine_cpu_s()
    return None if before is None or after is None else round((after - before) / sample_s, 3)


async def wait_quiet(args: argparse.Namespace, what: str) -> float | None:
    """With --wait-quiet S: wait up to S seconds for 3 s in a row of an idle machine (under
    0.15 busy cores), so that other work on a shared box does not skew the measurement."""
    if args.wait_quiet <= 0:
        return None
    deadline = time.monotonic() + args.wait_quiet
    calm, busy = 0, None
    while calm < 3 and time.monotonic() < deadline:
        busy = await machine_busy(1.0)
        calm = calm + 1 if busy is not None and busy < 0.15 else 0
    if calm < 3 and not args.quiet:
        print(f"warning: machine still busy ({busy} cores) before {what}", file=sys.stderr)
    return busy


async def _wait_for(pipes: list[Any], what: str, timeout_s: float) -> list[Any]:
    answers: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(answers) < len(pipes):
        for i, pipe in enumerate(pipes):
            if i in answers:
                continue
            try:
                ready = pipe.poll()
            except (EOFError, OSError):
                raise RuntimeError(f"load generator worker {i} died") from None
            if ready:
                try:
                    kind, payload = pipe.recv()
                except EOFError:
                    raise RuntimeError(f"load generator worker {i} died") from None
                if kind == "failed":
                    raise RuntimeError(f"load generator worker {i} failed: {payload}")
                if kind == what:
                    answers[i] = payload
        if time.monotonic() > deadline:
            raise RuntimeError(f"load generator workers not {what} after {timeout_s:.0f}s")
        await asyncio.sleep(0.02)
    return [answers[i] for i in range(len(pipes))]


async def _create(conn: RawConnection, sender: bytes, shares: int, amount: int) -> str:
    body = orjson.dumps({"total_amount": amount, "total_packet": shares, "greeting": "bench"})
    status, answer = await conn.request(b"POST", b"/v1/red-packets", sender, body)
    if status == 402:
        raise RuntimeError(
            f"the sender cannot pay for a packet (402 {answer[:200]!r}): fund the senders "
            "(--payments-secret, or a cluster with a starting balance)"
        )
    if status != 201:
        raise RuntimeError(f"could not create a packet: {status} {answer[:200]!r}")
    return orjson.loads(answer)["red_packet_id"]


async def create_packet(target: Target, sender: bytes, shares: int, amount: int) -> str:
    """One packet through the public API, outside any measured window (the boss packet)."""
    host, port = target.host_port
    conn = RawConnection(host, port)
    try:
        return await _create(conn, sender, shares, amount)
    except HttpError as exc:
        raise RuntimeError(f"gateway unreachable: {exc}") from None
    finally:
        conn.close()


async def top_up_sold_out(
    target: Target, have: list[str], user: tuple[int, bytes], sender: bytes, want: int
) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Make sure phase 2 has sold-out packets even after a very short phase 1."""
    packets, observed = list(have), []
    if len(packets) >= want:
        return packets, observed
    host, port = target.host_port
    conn = RawConnection(host, port)
    uid, token = user
    try:
        while len(packets) < want:
            pid = await _create(conn, sender, 1, 100)
            status, answer = await conn.request(
                b"POST", f"/v1/red-packets/{pid}/open".encode(), token
            )
            if status != 200:
                raise RuntimeError(f"could not open a packet: {status} {answer[:200]!r}")
            observed.append((snowflake_of(pid), uid, int(orjson.loads(answer)["amount"])))
            packets.append(pid)
    except HttpError as exc:
        raise RuntimeError(f"gateway unreachable: {exc}") from None
    finally:
        conn.close()
    return packets, observed
