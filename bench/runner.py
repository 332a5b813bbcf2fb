"""``redpacket bench``: start (or find) a cluster, measure the ceilings, run both phases,
check the ledgers, report.

Order of a run: the cluster is started and idle -> Lua ceiling (redis-benchmark against
shard 0's redis-server) -> phase 1 (grab then open, closed loop: the maximum) -> open-loop
phase (grab+open pairs arriving at a fixed rate, by default 50% of phase 1's committed
opens/s) -> trivial-handler ceiling -> phase 2 (sold-out rejections) -> invariant checker
over every shard with every 200 open the load generator saw -> table, JSON, optional PNG.
Exit status 1 if the checker finds anything.
Each ceiling runs right before the phase it is compared with, so that a machine whose speed
drifts (a shared VM does) skews both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import multiprocessing
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from redpacket.bench import ceilings, history, procstats
from redpacket.bench.httpclient import HttpError, RawConnection
from redpacket.bench.loadgen import LIVE_FIELDS, WorkerJob, worker_main
from redpacket.bench.scrape import metrics_pages
from redpacket.bench.stats import PhaseResult
from redpacket.core.ids import snowflake_of
from redpacket.gateway.auth import mint_token
from redpacket.sharding.ring import NodeSpec, RingDoc

REPO = Path(__file__).resolve().parent.parent
FIRST_UID = 7_000_000_000  # + a random offset per run, so runs on one cluster never share uids
MIN_SOLD_OUT = 20

# What a 60 s run's targets are (the issue's, for a 2-core machine, all on one box).
TARGET_OPEN_RATIO = 0.10
TARGET_OPEN_P99_MS = 50.0
TARGET_REJECT_RATIO = 0.6
FLAT_GROWTH_KIB = 8 * 1024
FLAT_GROWTH_FRACTION = 0.05


@dataclass
class Target:
    """The cluster under test: where its gateway is, its secret, its stores, its processes."""

    url: str
    jwt_secret: str
    nodes: list[NodeSpec] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)  # gateway, shard-0-node, ...
    server_pids: dict[str, int] = field(default_factory=dict)  # mysqld, if it is local
    mysql_server: str | None = None
    cluster: Any = None  # our own DevCluster, stopped at the end
    databases: list[str] = field(default_factory=list)  # ours, dropped at the end
    notes: list[str] = field(default_factory=list)

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    def restarts(self) -> dict[str, int]:
        if self.cluster is None:
            return {}
        return {name: c.restarts for name, c in self.cluster.children.items()}

    def refresh_pids(self) -> None:
        """A supervisor restart changes pids: read them again from our own cluster."""
        if self.cluster is not None:
            self.pids = _cluster_pids(self.cluster)
        self.pids.update(self.server_pids)


def _cluster_pids(cluster: Any) -> dict[str, int]:
    pids = {}
    for name, child in cluster.children.items():
        if child.proc is not None and not name.endswith("-redis"):
            pids[name] = child.proc.pid
    for name, child in cluster.children.items():
        if child.proc is not None and name.endswith("-redis"):
            pids[name] = child.proc.pid
    return pids


def _ring_nodes(ring_file: str) -> list[NodeSpec]:
    doc = RingDoc.load(Path(ring_file))
    nodes = list(doc.nodes)
    if doc.previous is not None:
        nodes += [n for n in doc.previous.nodes if n.name not in {m.name for m in nodes}]
    return nodes


async def start_target(args: argparse.Namespace) -> Target:
    from redpacket.cli.devcluster import DevCluster, load_state

    if args.url:
        secret = args.jwt_secret or os.environ.get("REDPACKET_JWT_SECRET", "")
        if not secret:
            raise SystemExit("redpacket bench: --url needs --jwt-secret or REDPACKET_JWT_SECRET")
        target = Target(args.url.rstrip("/"), secret)
        if args.ring:
            target.nodes = _ring_nodes(args.ring)
        else:
            target.notes.append("no --ring: no Lua ceiling, no invariant check")
        return target
    if args.cluster:
        state = load_state(args.var, args.cluster)
        target = Target(state["gateway"]["url"], state["jwt_secret"])
        target.nodes = _ring_nodes(args.ring or state["ring_file"])
        target.mysql_server = state.get("mysql_server")
        target.pids = {"gateway": state["gateway"].get("pid")}
        for shard in state["shards"]:
            target.pids[f"{shard['name']}-node"] = shard.get("pid")
            target.pids[f"{shard['name']}-redis"] = shard.get("redis_pid")
        target.pids = {k: v for k, v in target.pids.items() if v}
        return target

    # Our own cluster. The per-user rate limits exist to stop one client hammering; a
    # benchmark's few hundred virtual users each open far more than a person would, so they
    # are lifted for this cluster (the limiter still runs on every open).
    for name in ("OPEN", "CREATE"):
        os.environ.setdefault(f"REDPACKET_RATE_{name}_PER_S", "1000000")
        os.environ.setdefault(f"REDPACKET_RATE_{name}_BURST", "1000000")
    prefix = f"redpacket_bench_{secrets.token_hex(3)}"
    cluster = DevCluster(
        name=args.name, shards=args.shards, port=0, var=args.var, db_prefix=prefix, quiet=True
    )
    if args.gateway_workers > 1:
        if not hasattr(cluster, "gateway_workers"):
            raise SystemExit("redpacket bench: this DevCluster cannot run several gateways")
        cluster.gateway_workers = args.gateway_workers
    target = Target("", cluster.jwt_secret, cluster=cluster, mysql_server=cluster.mysql_server)
    target.databases = [f"{prefix}_shard_{i}" for i in range(args.shards)]
    try:
        await cluster.up()
    except BaseException:
        await stop_target(target, keep=args.keep)
        raise
    target.url = cluster.gateway_url
    target.nodes = _ring_nodes(str(cluster.ring_file))
    target.pids = _cluster_pids(cluster)
    return target


async def stop_target(target: Target, keep: bool) -> None:
    if target.cluster is None:
        return
    await target.cluster.down()
    if keep or not target.databases or not target.mysql_server:
        return
    import aiomysql

    from redpacket.node.ledger import parse_mysql_url

    server = parse_mysql_url(target.mysql_server)
    with contextlib.suppress(Exception):
        conn = await aiomysql.connect(
            host=server.host, port=server.port, user=server.user, password=server.password
        )
        try:
            async with conn.cursor() as cur:
                for name in target.databases:
                    await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            conn.close()


async def mysql_settings(target: Target) -> dict[str, Any]:
    """The durability settings of the MySQL server the ledgers are on (reported, not changed)."""
    import aiomysql

    from redpacket.node.ledger import parse_mysql_url

    url = target.mysql_server or (target.nodes[0].mysql if target.nodes else None)
    if not url:
        return {}
    server = parse_mysql_url(url)
    try:
        conn = await aiomysql.connect(
            host=server.host, port=server.port, user=server.user, password=server.password
        )
    except Exception as exc:
        return {"error": str(exc)}
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                "SELECT @@version, @@innodb_flush_log_at_trx_commit, @@sync_binlog, @@log_bin, "
                "@@innodb_buffer_pool_size, @@pid_file, @@port"
            )
            row = await cur.fetchone()
    finally:
        conn.close()
    keys = ("version", "innodb_flush_log_at_trx_commit", "sync_binlog", "log_bin", "buffer_pool")
    out: dict[str, Any] = dict(zip(keys, row[:5], strict=True))
    # the server's CPU is sampled per phase: the whole server, shared by every shard's ledger
    pid, found_by = procstats.mysql_server_pid(row[5], row[6])
    if server.host in ("127.0.0.1", "localhost", "::1") and pid is not None:
        target.server_pids["mysqld"] = pid
        target.pids["mysqld"] = pid
    out["server_pid"] = target.server_pids.get("mysqld")
    out["server_pid_found_by"] = found_by
    out["cpu_note"] = (
        "mysqld is the whole server's CPU over each phase: one server holds every shard's "
        "ledger, so it is shared by all shards (and counts anything else using it meanwhile)"
    )
    return out


# -- phases ---------------------------------------------------------------------------------


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
        shown = {k: f"{v:,.0f}/s" for k, v in rates.items() if v or k in ("opens", "rejections")}
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
) -> PhaseResult:
    workers = max(1, min(workers or args.workers, len(users)))
    ctx = multiprocessing.get_context("spawn")
    live = ctx.RawArray("d", workers * len(LIVE_FIELDS))
    groups = [users[w::workers] for w in range(workers)]
    procs, pipes = [], []
    initial = max(0, args.packets)
    for w, group in enumerate(groups):
        job = WorkerJob(
            index=w,
            mode=mode,
            host=host,
            port=port,
            client=args.client,
            users=group,
            duration_s=duration_s,
            senders=(senders or [])[w::workers],
            shares=args.shares,
            amount=args.amount,
            initial_packets=initial // workers + (1 if w < initial % workers else 0),
            packets=packets or [],
            crowd=(crowd or [])[w::workers],
            rate=rate / workers,
        )
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(job, child, live), name=f"bench-worker-{w}")
        proc.start()
        child.close()
        procs.append(proc)
        pipes.append(parent)
    result = PhaseResult(mode, duration_s, workers)
    try:
        await _wait_for(pipes, "ready", timeout_s=120)
        me = os.getpid()
        cpu_pids = {**pids, "bench main": me}
        cpu_before = {name: procstats.cpu_s(pid) for name, pid in cpu_pids.items()}
        everyone_before = procstats.all_cpu_s()
        machine_before = procstats.machine_cpu_s()
        go = time.time() + 0.2
        result.started_at = go
        for pipe in pipes:
            pipe.send(("go", go))
        progress = Progress(title, duration_s, live, workers, args.quiet)
        rss: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        next_sample = 0.0
        try:
            while (elapsed := time.time() - go) < duration_s:
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
            cpu_after = {name: procstats.cpu_s(pid) for name, pid in cpu_pids.items()}
            everyone_after = procstats.all_cpu_s()
            machine_after = procstats.machine_cpu_s()
            progress.update(duration_s)
        finally:
            progress.close()
        for part in await _wait_for(pipes, "done", timeout_s=120):
            result.merge(part)
        result.rss_kib = {k: v for k, v in rss.items() if v}
        result.proc_cpu_s = {
            name: after - cpu_before[name]
            for name, after in cpu_after.items()
            if after is not None and cpu_before.get(name) is not None
        }
        if machine_before is not None and machine_after is not None:
            result.machine_cpu_s = machine_after - machine_before
        ours = {*cpu_pids.values(), *(p.pid for p in procs)}
        result.others = _busiest_others(everyone_before, everyone_after, ours, duration_s)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return result


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


async def _machine_busy(sample_s: float) -> float | None:
    """Cores the whole machine kept busy over a short sample (before any load is applied)."""
    before = procstats.machine_cpu_s()
    await asyncio.sleep(sample_s)
    after = procstats.machine_cpu_s()
    return None if before is None or after is None else round((after - before) / sample_s, 3)


COMMIT_METRICS = (
    "redpacket_commit_batch_size_sum",
    "redpacket_commit_batch_size_count",
    "redpacket_commit_duration_seconds_sum",
    "redpacket_commit_duration_seconds_count",
    "redpacket_opens_committed_total",
)


async def node_metrics(nodes: list[NodeSpec]) -> dict[str, dict[str, float]]:
    """The group-commit counters of every node (from its /metrics), summed over nodes."""
    totals = dict.fromkeys(COMMIT_METRICS, 0.0)
    for text in await metrics_pages(nodes):
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in totals:
                totals[name] += float(value)
    return {"totals": totals}


def commit_stats(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    d = {k: after["totals"][k] - before["totals"][k] for k in COMMIT_METRICS}
    batches = d["redpacket_commit_batch_size_count"]
    return {
        "transactions": int(batches),
        "claims": int(d["redpacket_commit_batch_size_sum"]),
        "mean_batch": round(d["redpacket_commit_batch_size_sum"] / batches, 2) if batches else None,
        "mean_commit_ms": round(1000 * d["redpacket_commit_duration_seconds_sum"] / batches, 3)
        if batches
        else None,
        "opens_committed_metric": int(d["redpacket_opens_committed_total"]),
    }


async def wait_quiet(args: argparse.Namespace, what: str) -> float | None:
    """With --wait-quiet S: wait up to S seconds for 3 s in a row of an idle machine (under
    0.15 busy cores), so that other work on a shared box does not skew the measurement."""
    if args.wait_quiet <= 0:
        return None
    deadline = time.monotonic() + args.wait_quiet
    calm, busy = 0, None
    while calm < 3 and time.monotonic() < deadline:
        busy = await _machine_busy(1.0)
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
    body = orjson.dumps({"total_amount": 100, "total_packet": 1, "greeting": "bench"})
    try:
        while len(packets) < want:
            status, answer = await conn.request(b"POST", b"/v1/red-packets", sender, body)
            if status != 201:
                raise RuntimeError(f"could not create a packet: {status} {answer[:200]!r}")
            pid = orjson.loads(answer)["red_packet_id"]
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


# -- report ---------------------------------------------------------------------------------


def git_commit() -> tuple[str, bool]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(dirty)


def rss_verdict(samples: list[tuple[float, int]], duration_s: float) -> dict[str, Any]:
    """Memory is flat if, after the first 10% of the phase (warm-up), it grew by no more than
    8 MiB or 5%, whichever is larger."""
    if not samples:
        return {}
    warm = [kib for t, kib in samples if t >= 0.1 * duration_s] or [samples[-1][1]]
    base, end = warm[0], samples[-1][1]
    growth = end - base
    return {
        "start_kib": samples[0][1],
        "after_warmup_kib": base,
        "end_kib": end,
        "max_kib": max(kib for _, kib in samples),
        "growth_after_warmup_kib": growth,
        "flat": growth <= max(FLAT_GROWTH_KIB, FLAT_GROWTH_FRACTION * base),
    }


def _ratio(value: float | None, ceiling: float | None) -> float | None:
    if not value or not ceiling:
        return None
    return round(value / ceiling, 4)


def build_results(
    args: argparse.Namespace,
    *,
    target: Target,
    lua: dict[str, Any],
    trivial: PhaseResult | None,
    p1: PhaseResult,
    p2: PhaseResult,
    check: dict[str, Any],
    mysql: dict[str, Any],
    started: dt.datetime,
    ol: PhaseResult | None = None,
    ol_rate: float = 0.0,
) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    commit, dirty = git_commit()
    opens = p1.rate("open")
    grabs = p1.rate("grab")
    rejections = p2.rate("reject_grab", "reject_open")
    lua_per_s = lua.get("per_s")
    trivial_per_s = trivial.rate("reject_grab", "reject_open") if trivial else None
    lat = {
        "grab": p1.latency("grab"),
        "open": p1.latency("open"),
        "create": p1.latency("create"),
        "reject": p2.latency("reject_grab", "reject_open"),
        "reject_grab": p2.latency("reject_grab"),
        "reject_open": p2.latency("reject_open"),
    }
    if trivial is not None:
        lat["trivial"] = trivial.latency("reject_grab", "reject_open")
    errors: dict[str, int] = {}
    for phase in (p1, p2, ol):
        if phase is None:
            continue
        for key, n in phase.errors().items():
            errors[key] = errors.get(key, 0) + n
    node_rss = {
        name: rss_verdict(samples, p1.duration_s)
        for name, samples in p1.rss_kib.items()
        if name.endswith("-node")
    }
    memory_flat = all(v.get("flat") for v in node_rss.values()) if node_rss else None
    open_ratio = _ratio(opens, lua_per_s)
    reject_ratio = _ratio(rejections, trivial_per_s)
    open_p99 = lat["open"]["p99_ms"]
    open_loop = open_loop_results(args, ol, ol_rate, opens) if ol is not None else None
    # the p99 target is the open loop's (at 50% of the maximum), the closed loop's otherwise
    target_p99 = open_loop["latency_ms"]["open"]["p99_ms"] if open_loop else open_p99
    results: dict[str, Any] = {
        # the keys other tools read
        "opens_per_s": round(opens, 1),
        "grabs_per_s": round(grabs, 1),
        "rejections_per_s": round(rejections, 1),
        "open_p99_ms": open_p99,
        "reject_p99_ms": lat["reject"]["p99_ms"],
        "lua_ceiling_per_s": lua_per_s,
        "trivial_ceiling_per_s": round(trivial_per_s, 1) if trivial_per_s else None,
        "open_ratio": open_ratio,
        "reject_ratio": reject_ratio,
        "errors": errors,
        "commit": commit,
        # and the rest
        "commit_dirty": dirty,
        "started_at": started.isoformat(timespec="seconds"),
        "machine": {"cpus": cpus, "cpu_model": procstats.cpu_model()},
        "config": {
            "target": "own cluster" if target.cluster is not None else target.url,
            "shards": len(target.nodes) or None,
            "gateway_workers": args.gateway_workers if target.cluster is not None else None,
            "users": args.users,
            "workers": args.workers,
            "client": args.client,
            "initial_packets": args.packets,
            "shares": args.shares,
            "amount": args.amount,
            "duration_s": args.duration,
            "reject_duration_s": args.reject_duration,
            "latecomers": getattr(args, "latecomers", 0),
            "ceiling_duration_s": args.ceiling_duration,
            "rate_limits_lifted": target.cluster is not None,
        },
        "mysql": mysql,
        "latency_ms": lat,
        "open_p50_ms": lat["open"]["p50_ms"],
        "open_p999_ms": lat["open"]["p999_ms"],
        "grab_p50_ms": lat["grab"]["p50_ms"],
        "grab_p99_ms": lat["grab"]["p99_ms"],
        "grab_p999_ms": lat["grab"]["p999_ms"],
        "reject_p50_ms": lat["reject"]["p50_ms"],
        "reject_p999_ms": lat["reject"]["p999_ms"],
        "creates_per_s": round(p1.rate("create"), 1),
        "opens_replayed": p1.count("open_replayed"),
        "opens_answered_200_total": len(p1.observed),  # replays and late answers included
        "sold_out_packets": len(p1.sold_out),
        "lua_ceiling": lua,
        "trivial_ceiling": {
            "per_s": round(trivial_per_s, 1) if trivial_per_s else None,
            "loadgen": trivial.loadgen(cpus) if trivial else None,
            "process_cores": trivial.process_cpu() if trivial else None,
            "what": "one aiohttp process on uvloop, constant JSON for grab (200) and open (410),"
            " driven by the same load generator as phase 2",
        },
        "loadgen": {
            "open_phase": p1.loadgen(cpus),
            "reject_phase": p2.loadgen(cpus),
            "trivial": trivial.loadgen(cpus) if trivial else None,
        },
        "process_cores": {
            "trivial_ceiling": trivial.process_cpu() if trivial else None,
            "open_phase": p1.process_cpu(),
            "open_loop": ol.process_cpu() if ol else None,
            "reject_phase": p2.process_cpu(),
        },
        "open_loop": open_loop,
        "open_loop_open_p50_ms": open_loop["latency_ms"]["open"]["p50_ms"] if open_loop else None,
        "open_loop_open_p99_ms": open_loop["latency_ms"]["open"]["p99_ms"] if open_loop else None,
        "open_loop_open_p999_ms": open_loop["latency_ms"]["open"]["p999_ms"] if open_loop else None,
        # CPU µs each process spent per committed grab+open pair in phase 1 (capacity.md)
        "cpu_us_per_committed_open": {
            name: round(cores / opens * 1e6, 1)
            for name, cores in p1.process_cpu().items()
            if opens and name != "machine"
        },
        "other_processes": {
            "trivial_ceiling": trivial.others if trivial else None,
            "open_phase": p1.others,
            "open_loop": ol.others if ol else None,
            "reject_phase": p2.others,
        },
        "node_rss": node_rss,
        "memory_flat": memory_flat,
        "rss_kib": {
            "open_phase": p1.rss_kib,
            "open_loop": ol.rss_kib if ol else {},
            "reject_phase": p2.rss_kib,
        },
        "restarts": target.restarts(),
        "late_answers_abandoned": p1.late + p2.late,
        "phase_started_at": {
            "open_phase": dt.datetime.fromtimestamp(p1.started_at, dt.UTC).isoformat(),
            "reject_phase": dt.datetime.fromtimestamp(p2.started_at, dt.UTC).isoformat(),
        },
        "check": check,
        "targets": {
            "open_ratio_ge_0.10": open_ratio is not None and open_ratio >= TARGET_OPEN_RATIO,
            "open_p99_lt_50ms": target_p99 is not None and target_p99 < TARGET_OPEN_P99_MS,
            "open_p99_measured_in": "open_loop" if open_loop else "open_phase",
            "reject_ratio_ge_0.6": reject_ratio is not None and reject_ratio >= TARGET_REJECT_RATIO,
            "node_memory_flat": memory_flat,
        },
        "series": {
            "open_phase": {
                "open": p1.series(["open"]),
                "grab": p1.series(["grab"]),
            },
            "reject_phase": {"reject": p2.series(["reject_grab", "reject_open"])},
            "open_loop": {"open": ol.series(["open"]), "pair": ol.series(["pair"])} if ol else None,
        },
        "notes": target.notes,
    }
    return results


def open_loop_results(
    args: argparse.Namespace, ol: PhaseResult, rate: float, closed_loop_opens: float
) -> dict[str, Any]:
    """The open-loop phase: arrivals at a fixed rate, latency from each request's due time."""
    opens = ol.rate("open")
    return {
        "rate_per_s": rate,
        "rate_from": "--rate" if args.rate is not None else "50% of phase 1's committed opens/s",
        "share_of_closed_loop_max": _ratio(rate, closed_loop_opens),
        "duration_s": ol.duration_s,
        "arrivals": int(rate * ol.duration_s),
        "opens_per_s": round(opens, 1),
        "grabs_per_s": round(ol.rate("grab"), 1),
        "kept_up": rate > 0 and opens >= 0.95 * rate,
        "latency_ms": {
            # open: from its due time, which is its grab's answer; grab: from the arrival's
            # due time; pair: from the arrival's due time to the open's answer
            "open": ol.latency("open"),
            "grab": ol.latency("grab"),
            "pair": ol.latency("pair"),
        },
        "errors": ol.errors(),
        "loadgen": ol.loadgen(os.cpu_count() or 1),
        "cpu_us_per_committed_open": {
            name: round(cores / opens * 1e6, 1)
            for name, cores in ol.process_cpu().items()
            if opens and name != "machine"
        },
    }


def _who(process: str) -> str:
    return "mysqld (whole server, shared by all shards)" if process == "mysqld" else process


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def render_table(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    cfg = r["config"]
    lines = [
        "",
        f"redpacket bench  commit {r['commit']}"
        + (" (uncommitted changes)" if r["commit_dirty"] else "")
        + f"  {r['machine']['cpus']} CPUs  {cfg['shards']} shards  "
        f"gateway workers {cfg['gateway_workers'] or '-'}  {cfg['users']} users  "
        f"{cfg['workers']} load worker(s), {cfg['client']} client",
        "",
        f"{'':34}{'per s':>11}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'count':>10}",
    ]

    def row(name: str, per_s: Any, stats: dict[str, Any] | None) -> str:
        stats = stats or {}
        return (
            f"{name:34}{_fmt(per_s):>11}{_fmt(stats.get('p50_ms'), 2):>9}"
            f"{_fmt(stats.get('p99_ms'), 2):>9}{_fmt(stats.get('p999_ms'), 2):>10}"
            f"{_fmt(stats.get('count')):>10}"
        )

    lua = r["lua_ceiling"]
    lines += [
        row("ceiling: open.lua EVALSHA", lua.get("per_s"), lua),
        row("ceiling: trivial aiohttp handler", r["trivial_ceiling_per_s"], lat.get("trivial")),
        row("phase 1: grab", r["grabs_per_s"], lat["grab"]),
        row("phase 1: open (committed, 200)", r["opens_per_s"], lat["open"]),
        row("phase 1: create", r["creates_per_s"], lat["create"]),
        *(
            [
                row(
                    f"open loop @ {ol['rate_per_s']:,.0f} pairs/s: grab",
                    ol["grabs_per_s"],
                    ol["latency_ms"]["grab"],
                ),
                row(
                    "  open (committed, from due time)", ol["opens_per_s"], ol["latency_ms"]["open"]
                ),
                row("  grab+open pair, from arrival", None, ol["latency_ms"]["pair"]),
            ]
            if (ol := r.get("open_loop"))
            else []
        ),
        row("phase 2: sold-out rejections", r["rejections_per_s"], lat["reject"]),
        row("  of which grab", None, lat["reject_grab"]),
        row("  of which open (410)", None, lat["reject_open"]),
        "",
        f"open_ratio   {_fmt(r['open_ratio'], 4)}  (opens/s / Lua ceiling; target >= 0.10)",
        f"reject_ratio {_fmt(r['reject_ratio'], 4)}  (rejections/s / trivial ceiling;"
        " target >= 0.6)",
    ]
    if r["errors"]:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in r["errors"].items()))
    else:
        lines.append("errors: none")
    for phase, gen in r["loadgen"].items():
        if gen is None:
            continue
        lines.append(
            f"load generator ({phase}): {gen['cpu_s']} CPU s, per worker "
            f"{', '.join(f'{c:.0%}' for c in gen['cpu_per_worker'])} of a core, "
            f"{gen['machine_share']:.0%} of the machine"
            + (
                "  ** SATURATED: the load generator may be the bottleneck **"
                if gen["saturated"]
                else ""
            )
        )
    for phase, cores in r["process_cores"].items():
        if cores:
            lines.append(
                f"cores used ({phase}): " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
            )
    per_open = r.get("cpu_us_per_committed_open") or {}
    if per_open:
        lines.append(
            "CPU µs per committed grab+open (phase 1): "
            + ", ".join(f"{_who(k)} {v:.0f}" for k, v in per_open.items())
        )
    ol_per_open = (r.get("open_loop") or {}).get("cpu_us_per_committed_open") or {}
    if ol_per_open:
        lines.append(
            "CPU µs per committed grab+open (open loop): "
            + ", ".join(f"{_who(k)} {v:.0f}" for k, v in ol_per_open.items())
        )
    for phase, others in r["other_processes"].items():
        if others:
            lines.append(
                f"BUSY outside the benchmark ({phase}): "
                + ", ".join(f"{o['name']} (pid {o['pid']}) {o['cores']:.2f}" for o in others)
            )
    for name, v in r["node_rss"].items():
        lines.append(
            f"{name} RSS: {v['start_kib'] / 1024:.1f} MiB at start, "
            f"{v['after_warmup_kib'] / 1024:.1f} after warm-up, {v['end_kib'] / 1024:.1f} at end"
            f" ({'flat' if v['flat'] else 'GROWING'})"
        )
    if any(r["restarts"].values()):
        lines.append(f"RESTARTS during the run: {r['restarts']}")
    gc = r.get("group_commit") or {}
    if gc.get("transactions"):
        lines.append(
            f"group commit (phase 1): {gc['claims']:,} claims in {gc['transactions']:,} "
            f"transactions, mean batch {gc['mean_batch']}, mean commit {gc['mean_commit_ms']} ms"
        )
    if (r.get("history") or {}).get("events_applied"):
        lines.append(history.render(r["history"]))
    mysql = r["mysql"]
    if mysql and "error" not in mysql:
        lines.append(
            f"mysql {mysql['version']}: innodb_flush_log_at_trx_commit="
            f"{mysql['innodb_flush_log_at_trx_commit']} sync_binlog={mysql['sync_binlog']}"
            f" log_bin={mysql['log_bin']}"
        )
    dirty = [phase for phase, clean in r.get("clean", {}).items() if not clean]
    if dirty:
        lines.append(
            f"WARNING: other processes used >= 0.1 core during {', '.join(dirty)}: "
            "those numbers are skewed"
        )
    busy = r["machine"].get("busy_before_start_cores")
    if busy is not None and busy > 0.2:
        lines.append(f"WARNING: {busy:.2f} cores were busy before the run started")
    t = r["targets"]

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    lines += [
        "targets: "
        f"opens >= 0.10 x Lua {verdict(t['open_ratio_ge_0.10'])}; "
        f"open p99 < 50 ms ({t['open_p99_measured_in'].replace('_', ' ')}) "
        f"{verdict(t['open_p99_lt_50ms'])}; "
        f"rejections >= 0.6 x trivial {verdict(t['reject_ratio_ge_0.6'])}; "
        f"node memory flat {verdict(t['node_memory_flat'])}",
        f"invariant check: {r['check'].get('summary', r['check'].get('skipped', '-'))}",
    ]
    for note in r["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    """Throughput, latency and memory over time: phase 1, the open loop, then phase 2, on one
    time axis with a gap between phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s1, s2 = r["series"]["open_phase"], r["series"]["reject_phase"]
    sol = r["series"].get("open_loop")
    ol_offset = r["config"]["duration_s"] + 2  # the open loop drawn after phase 1, with a gap
    offset = ol_offset + (r["open_loop"]["duration_s"] + 2 if sol else 0)  # then phase 2
    shift2 = [t + offset for t in s2["reject"]["t"]]
    shift_ol = [t + ol_offset for t in sol["open"]["t"]] if sol else []
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    ax = axes[0]
    ax.plot(s1["open"]["t"], s1["open"]["per_s"], c="C0", label="opens committed /s")
    ax.plot(s1["grab"]["t"], s1["grab"]["per_s"], c="C1", ls=":", label="grabs /s")
    ax.plot(shift2, s2["reject"]["per_s"], c="C2", label="sold-out rejections /s")
    if sol:
        ax.plot(shift_ol, sol["open"]["per_s"], c="C3", label="open loop: opens committed /s")
        ax.axhline(r["open_loop"]["rate_per_s"], ls=":", c="C3", lw=0.8, label="open-loop rate")
    if r["lua_ceiling_per_s"]:
        ax.axhline(
            0.10 * r["lua_ceiling_per_s"], ls="--", c="C0", lw=0.8, label="target 0.10 x Lua"
        )
    if r["trivial_ceiling_per_s"]:
        ax.axhline(r["trivial_ceiling_per_s"], ls="-.", c="C2", lw=0.8, label="trivial handler")
        ax.axhline(
            0.6 * r["trivial_ceiling_per_s"], ls="--", c="C2", lw=0.8, label="target 0.6 x trivial"
        )
    ax.set_yscale("log")
    ax.set_ylabel("per second (log)")
    ax.legend(loc="center left", fontsize=8)
    cfg = r["config"]
    ax.set_title(
        f"redpacket bench @ {r['commit']}{' (+uncommitted)' if r['commit_dirty'] else ''}: "
        f"{cfg['users']} users, {cfg['shards']} shards, "
        f"{cfg['gateway_workers'] or '?'} gateway process(es), {r['machine']['cpus']} CPUs"
    )
    ax = axes[1]
    ax.plot(s1["open"]["t"], s1["open"]["p50_ms"], c="C0", ls=":", label="open p50")
    ax.plot(s1["open"]["t"], s1["open"]["p99_ms"], c="C0", label="open p99")
    ax.plot(s1["grab"]["t"], s1["grab"]["p99_ms"], c="C1", label="grab p99")
    if sol:
        ax.plot(shift_ol, sol["open"]["p50_ms"], c="C3", ls=":", label="open loop: open p50")
        ax.plot(shift_ol, sol["open"]["p99_ms"], c="C3", label="open loop: open p99")
        ax.plot(shift_ol, sol["pair"]["p99_ms"], c="C4", label="open loop: pair p99")
    ax.plot(shift2, s2["reject"]["p50_ms"], c="C2", ls=":", label="rejection p50")
    ax.plot(shift2, s2["reject"]["p99_ms"], c="C2", label="rejection p99")
    ax.axhline(50, ls="--", c="k", lw=0.8, label="50 ms")
    ax.set_ylabel("latency ms (log)")
    ax.set_yscale("log")
    ax.legend(loc="center left", fontsize=8, ncol=2)
    ax = axes[2]
    names = sorted({n for phase in r["rss_kib"].values() for n in phase})
    names = [n for n in names if n.endswith("-node") or n.startswith("gateway")]
    for i, name in enumerate(names):
        for phase, shift in (
            ("open_phase", 0),
            ("open_loop", ol_offset),
            ("reject_phase", offset),
        ):
            samples = r["rss_kib"].get(phase, {}).get(name, [])
            ax.plot(
                [t + shift for t, _ in samples],
                [kib / 1024 for _, kib in samples],
                c=f"C{i}",
                label=name if phase == "open_phase" else None,
            )
    ax.set_ylabel("RSS MiB")
    ax.set_xlabel("seconds (phase 1: grab + open, open loop, phase 2: sold out)")
    ax.legend(loc="center left", fontsize=8)
    for ax in axes:
        ax.axvspan(offset - 1, offset, color="0.9")
        if sol:
            ax.axvspan(ol_offset - 1, ol_offset, color="0.9")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- the command ----------------------------------------------------------------------------


def _tokens(secret: str, first_uid: int, n: int, ttl_s: int) -> list[tuple[int, bytes]]:
    return [
        (
            uid,
            mint_token(
                secret, uid, f"bench{uid}", f"https://img.example/u/{uid}.png", ttl_s
            ).encode(),
        )
        for uid in range(first_uid, first_uid + n)
    ]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from redpacket.cli.check import Observed, check_shards

    started = dt.datetime.now(dt.UTC)
    say = (lambda *_: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if not (args.url or args.cluster):
        say("redpacket bench: starting a local cluster")
    target = await start_target(args)
    try:
        host, port = target.host_port
        ttl = int(args.duration + args.reject_duration + 2 * args.ceiling_duration + 3600)
        base = FIRST_UID + secrets.randbelow(10**9) * 1000
        openers = _tokens(target.jwt_secret, base, args.users, ttl)
        latecomers = _tokens(target.jwt_secret, base + args.users, args.users, ttl)
        senders = [t for _, t in _tokens(target.jwt_secret, base + 2 * args.users, 64, ttl)]
        say(f"minting {args.latecomers} tokens for the sold-out crowd ...")
        crowd = [
            t
            for _, t in _tokens(target.jwt_secret, base + 2 * args.users + 64, args.latecomers, ttl)
        ]
        mysql = await mysql_settings(target)
        per_worker = args.users // max(1, args.workers)
        if args.shares > per_worker:
            target.notes.append(
                f"--shares {args.shares} > {per_worker} users per load worker: a packet needs "
                "that many different users, so phase 1 leaves packets partly opened and "
                f"phase 2 hammers {MIN_SOLD_OUT} small packets sold out for it"
            )
        busy_before = await _machine_busy(1.0)
        if busy_before is not None and busy_before > 0.2:
            say(
                f"warning: the machine was already busy ({busy_before:.2f} cores) before the "
                "benchmark started; other work skews every number"
            )

        lua: dict[str, Any] = {"per_s": None, "skipped": "no redis listed for the shards"}
        if target.nodes and target.nodes[0].redis and args.ceiling_duration > 0:
            await wait_quiet(args, "the Lua ceiling")
            say(f"ceiling 1/2: open.lua via redis-benchmark ({args.ceiling_duration:.0f}s)")
            lua = await ceilings.lua_ceiling(target.nodes[0].redis, args.ceiling_duration)
        target.refresh_pids()
        await wait_quiet(args, "phase 1")
        metrics_before = await node_metrics(target.nodes)
        history_before = await history.sample(target.nodes)
        backlog = history.BacklogWatch(target.nodes)
        backlog.start()
        p1 = await run_phase(
            args,
            title="phase 1: grab + open",
            mode="open",
            host=host,
            port=port,
            users=openers,
            duration_s=args.duration,
            pids=target.pids,
            senders=senders,
        )
        commits = commit_stats(metrics_before, await node_metrics(target.nodes))
        # open loop: pairs arrive at a fixed rate, by default half the closed-loop maximum
        rate = args.rate if args.rate is not None else round(0.5 * p1.rate("open"), 1)
        ol = None
        if rate > 0 and args.rate_duration > 0:
            await wait_quiet(args, "the open-loop phase")
            target.refresh_pids()
            ol = await run_phase(
                args,
                title=f"open loop: {rate:,.0f} pairs/s",
                mode="open",
                host=host,
                port=port,
                users=openers,
                duration_s=args.rate_duration,
                pids=target.pids,
                senders=senders,
                rate=rate,
            )
        await backlog.stop()
        history_after = await history.drain(target.nodes, timeout_s=10)
        sold_out, extra = await top_up_sold_out(
            target, p1.sold_out + (ol.sold_out if ol else []), openers[0], senders[0], MIN_SOLD_OUT
        )
        trivial = None
        if args.ceiling_duration > 0:
            from redpacket.cli.devcluster import free_ports

            await wait_quiet(args, "the trivial ceiling")
            trivial_port = free_ports(1)[0]
            proc = await ceilings.start_trivial(trivial_port)
            try:
                trivial = await run_phase(
                    args,
                    title="ceiling 2/2: trivial handler",
                    mode="reject",
                    host="127.0.0.1",
                    port=trivial_port,
                    users=latecomers,
                    duration_s=args.ceiling_duration,
                    pids={"trivial": proc.pid},
                    packets=[str(10**15 + i).encode() for i in range(64)],
                )
            finally:
                await ceilings.stop_process(proc)

        await wait_quiet(args, "phase 2")
        target.refresh_pids()
        p2 = await run_phase(
            args,
            title="phase 2: sold out",
            mode="reject",
            host=host,
            port=port,
            users=latecomers,
            duration_s=args.reject_duration,
            pids=target.pids,
            packets=[p.encode() for p in sold_out],
            crowd=crowd,
        )

        observed = [Observed(*o) for o in [*p1.observed, *(ol.observed if ol else []), *extra]]
        check: dict[str, Any]
        if target.nodes and args.settle >= 0:
            say(f"checking the ledgers of {len(target.nodes)} shard(s) ...")
            report = await check_shards(target.nodes, observed, settle_s=args.settle)
            check = {
                "ok": report.ok,
                "summary": report.summary(),
                "violations": report.violations[:100],
                "violation_count": len(report.violations),
                "packets": report.packets,
                "records": report.records,
                "observed_200_opens": len(observed),
            }
        else:
            check = {"ok": None, "skipped": "no ring: the ledgers were not checked"}
    finally:
        await stop_target(target, keep=args.keep)

    results = build_results(
        args,
        target=target,
        lua=lua,
        trivial=trivial,
        p1=p1,
        p2=p2,
        ol=ol,
        ol_rate=rate,
        check=check,
        mysql=mysql,
        started=started,
    )
    results["machine"]["busy_before_start_cores"] = busy_before
    results["group_commit"] = commits
    results["history"] = history.report(history_before, history_after, backlog)
    # a phase is clean when processes outside the benchmark used under 0.1 core meanwhile
    results["clean"] = {
        phase: cores.get("other (not measured here)", 0.0) < 0.1
        for phase, cores in results["process_cores"].items()
        if cores
    }
    return results


def write_outputs(args: argparse.Namespace, results: dict[str, Any]) -> int:
    started = dt.datetime.fromisoformat(results["started_at"])
    check = results["check"]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path = Path(args.json) if args.json else out_dir / f"{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(render_table(results), flush=True)
    print(f"wrote {json_path}", flush=True)
    if args.plot is not None:
        png = Path(args.plot) if args.plot else json_path.with_suffix(".png")
        plot(results, png)
        print(f"wrote {png}", flush=True)
    for violation in check.get("violations", []):
        print(f"  VIOLATION {violation}", file=sys.stderr)
    return 1 if check.get("ok") is False else 0


def run_bench(args: argparse.Namespace) -> int:
    from redpacket.core.env import SettingsError

    try:
        results = asyncio.run(bench(args))
    except SettingsError as exc:
        print(f"redpacket bench: {exc}", file=sys.stderr)
        return 2
    return write_outputs(args, results)
