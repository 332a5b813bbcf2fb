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

This module only orders a run. The parts, in the order a run uses them (as chaos/ is split):
``cluster.py`` (start, find and stop the cluster under test), ``ceilings.py``,
``phases.py`` (one measured phase: the load generator's workers, CPU and memory sampling),
``commits.py`` (the nodes' group-commit counters), ``history.py``, ``results.py`` (the
JSON and the targets), ``report.py`` (the table, the JSON file, the PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import sys
from dataclasses import dataclass
from typing import Any

from redpacket.bench import ceilings, funding, history
from redpacket.bench.cluster import Target, mysql_settings, start_target, stop_target
from redpacket.bench.commits import commit_stats, node_metrics
from redpacket.bench.job import Mint
from redpacket.bench.phases import (
    create_packet,
    machine_busy,
    run_phase,
    top_up_sold_out,
    wait_quiet,
)
from redpacket.bench.report import write_outputs
from redpacket.bench.results import build_results
from redpacket.bench.scenarios import BOSS_USERS, Shape, lift_limits_for, shape_of
from redpacket.bench.stats import PhaseResult
from redpacket.gateway.auth import mint_token

FIRST_UID = 7_000_000_000  # + a random offset per run, so runs on one cluster never share uids
MIN_SOLD_OUT = 20


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


@dataclass
class Crowds:
    """Every identity of a run, in disjoint uid ranges: the virtual users' own, phase 2's
    latecomers, the senders, and (minted by the workers) the fresh openers of each phase."""

    openers: list[tuple[int, bytes]]
    latecomers: list[tuple[int, bytes]]
    senders: list[bytes]
    sender_uids: list[int]  # funded before the load (bench/funding.py)
    crowd: list[bytes]
    next_uid: int
    secret: str
    ttl_s: int

    def fresh(self, count: int) -> Mint:
        mint = Mint(self.secret, self.next_uid, count, self.ttl_s)
        self.next_uid += count
        return mint


def _crowds(args: argparse.Namespace, secret: str, shape: Shape) -> Crowds:
    ttl = int(args.duration + args.reject_duration + 2 * args.ceiling_duration + 3600)
    uid = FIRST_UID + secrets.randbelow(10**9) * 1000
    openers = _tokens(secret, uid, args.users, ttl)
    latecomers = _tokens(secret, uid + args.users, args.users, ttl)
    uid += 2 * args.users
    senders = _tokens(secret, uid, shape.senders, ttl)
    uid += shape.senders
    crowd = [t for _, t in _tokens(secret, uid, args.latecomers, ttl)]
    return Crowds(
        openers,
        latecomers,
        [t for _, t in senders],
        [u for u, _ in senders],
        crowd,
        uid + args.latecomers,
        secret,
        ttl,
    )


async def naive_phase(
    args: argparse.Namespace, target: Target, shape: Shape, ids: Crowds
) -> PhaseResult | None:
    """The naive peer (bench/naive.py) driven by phase 1's load generator, same shape, same
    kind of identities, on the same Redis and MySQL servers; only on the bench's own cluster
    (it needs a MySQL server and a database it may create and drop)."""
    duration_s = args.naive_duration
    if duration_s <= 0 or target.cluster is None or not target.mysql_server or shape.finite:
        return None
    from redpacket.cli.children import free_ports

    await wait_quiet(args, "the naive peer")
    database = f"{target.databases[0].rsplit('_shard_', 1)[0]}_naive"
    target.databases.append(database)  # dropped with the shards' at the end
    port = free_ports(1)[0]
    proc = await ceilings.start_naive(
        port,
        redis_url=target.nodes[0].redis,
        mysql_url=target.mysql_server,
        database=database,
        jwt_secret=target.jwt_secret,
    )
    pids = {
        "naive": proc.pid,
        f"{target.nodes[0].name}-redis": target.pids.get(f"{target.nodes[0].name}-redis", 0),
    }
    if "mysqld" in target.pids:
        pids["mysqld"] = target.pids["mysqld"]
    try:
        return await run_phase(
            args,
            title="reference: naive peer",
            profile="naive",
            mode="open",
            host="127.0.0.1",
            port=port,
            users=ids.openers,
            duration_s=duration_s,
            pids={k: v for k, v in pids.items() if v},
            senders=ids.senders,
            shape=shape,
            fresh=ids.fresh(int(args.fresh_per_s * duration_s)) if shape.fresh else None,
        )
    finally:
        await ceilings.stop_process(proc)


async def lua_phase(args: argparse.Namespace, target: Target, say: Any) -> dict[str, Any]:
    """The Lua ceiling against shard 0's redis-server, while the cluster is idle."""
    if not (target.nodes and target.nodes[0].redis and args.ceiling_duration > 0):
        return {"per_s": None, "skipped": "no redis listed for the shards"}
    await wait_quiet(args, "the Lua ceiling")
    say(f"ceiling 1/2: open.lua via redis-benchmark ({args.ceiling_duration:.0f}s)")
    return await ceilings.lua_ceiling(target.nodes[0].redis, args.ceiling_duration)


async def open_loop_phase(
    args: argparse.Namespace, target: Target, shape: Shape, ids: Crowds, rate: float
) -> PhaseResult | None:
    """Pairs arriving at a fixed rate (by default half the closed-loop maximum)."""
    if rate <= 0 or args.rate_duration <= 0:
        return None
    await wait_quiet(args, "the open-loop phase")
    target.refresh_pids()
    host, port = target.host_port
    return await run_phase(
        args,
        title=f"open loop: {rate:,.0f} pairs/s",
        mode="open",
        host=host,
        port=port,
        users=ids.openers,
        duration_s=args.rate_duration,
        pids=target.pids,
        senders=ids.senders,
        rate=rate,
        shape=shape,
        fresh=ids.fresh(int(rate * args.rate_duration) + 1) if shape.fresh else None,
    )


async def trivial_phase(
    args: argparse.Namespace, latecomers: list[tuple[int, bytes]]
) -> PhaseResult | None:
    """The trivial-handler ceiling, driven by phase 2's load generator."""
    if args.ceiling_duration <= 0:
        return None
    from redpacket.cli.children import free_ports

    await wait_quiet(args, "the trivial ceiling")
    port = free_ports(1)[0]
    proc = await ceilings.start_trivial(port)
    try:
        return await run_phase(
            args,
            title="ceiling 2/2: trivial handler",
            mode="reject",
            host="127.0.0.1",
            port=port,
            users=latecomers,
            duration_s=args.ceiling_duration,
            pids={"trivial": proc.pid},
            packets=[str(10**15 + i).encode() for i in range(64)],
        )
    finally:
        await ceilings.stop_process(proc)


async def check_phase(
    args: argparse.Namespace, target: Target, observed: list[tuple[int, int, int]], say: Any
) -> dict[str, Any]:
    """The invariant checker over every shard, with every 200 open the load generator saw."""
    from redpacket.cli.check import Observed, check_shards

    if not target.nodes or args.settle < 0:
        return {"ok": None, "skipped": "no ring: the ledgers were not checked"}
    say(f"checking the ledgers of {len(target.nodes)} shard(s) ...")
    report = await check_shards(
        target.nodes, [Observed(*o) for o in observed], settle_s=args.settle
    )
    return {
        "ok": report.ok,
        "summary": report.summary(),
        "violations": report.violations[:100],
        "violation_count": len(report.violations),
        "packets": report.packets,
        "records": report.records,
        "observed_200_opens": len(observed),
    }


def _note_hot_shares(args: argparse.Namespace, target: Target, shape: Shape) -> None:
    """The hot shape needs ``shares`` different users per packet in each load worker: say so
    in the report when a worker has fewer (its numbers then mean something else)."""
    per_worker = args.users // max(1, args.workers)
    if shape.scenario == "hot" and shape.shares > per_worker:
        target.notes.append(
            f"--shares {shape.shares} > {per_worker} users per load worker: a packet needs "
            "that many different users, so phase 1 leaves packets partly opened and "
            f"phase 2 hammers {MIN_SOLD_OUT} small packets sold out for it"
        )


async def _busy_before(say: Any) -> float | None:
    """Cores the machine kept busy before any load: other work skews every number, so a
    busy machine is warned about (and the figure reported)."""
    busy_before = await machine_busy(1.0)
    if busy_before is not None and busy_before > 0.2:
        say(
            f"warning: the machine was already busy ({busy_before:.2f} cores) before the "
            "benchmark started; other work skews every number"
        )
    return busy_before


async def closed_loop_phase(
    args: argparse.Namespace, target: Target, shape: Shape, ids: Crowds, *, host: str, port: int
) -> PhaseResult:
    """Phase 1: grab then open, closed loop (the maximum). The boss scenario's one packet is
    created first, outside the measured window."""
    boss = (
        [await create_packet(target, ids.senders[0], shape.shares, shape.amount)]
        if shape.finite
        else None
    )
    fresh_1 = int(args.fresh_per_s * args.duration) if shape.fresh else 0
    return await run_phase(
        args,
        title=f"phase 1: grab + open ({shape.scenario})",
        profile="phase1",
        mode="open",
        host=host,
        port=port,
        users=ids.openers,
        duration_s=args.duration,
        pids=target.pids,
        senders=ids.senders,
        packets=[p.encode() for p in boss] if boss else None,
        shape=shape,
        fresh=ids.fresh(BOSS_USERS if shape.finite else fresh_1) if shape.fresh else None,
    )


def _open_loop_rate(
    args: argparse.Namespace, target: Target, shape: Shape, p1: PhaseResult
) -> float:
    """Pairs/s of the open-loop phase: ``--rate``, by default half phase 1's committed
    opens/s; none for the boss, whose one packet phase 1 used up."""
    rate = args.rate if args.rate is not None else round(0.5 * p1.rate("open"), 1)
    if shape.finite:
        rate = 0.0
        target.notes.append("boss: no open-loop phase (its one packet is phase 1's)")
    return rate


async def sold_out_phase(
    args: argparse.Namespace,
    target: Target,
    ids: Crowds,
    sold_out: list[str],
    *,
    host: str,
    port: int,
) -> PhaseResult:
    """Phase 2: the latecomers (or the crowd's never-seen tokens) on sold-out packets, where
    every answer is a rejection."""
    await wait_quiet(args, "phase 2")
    target.refresh_pids()
    return await run_phase(
        args,
        title="phase 2: sold out",
        mode="reject",
        host=host,
        port=port,
        users=ids.latecomers,
        duration_s=args.reject_duration,
        pids=target.pids,
        packets=[p.encode() for p in sold_out],
        crowd=ids.crowd,
    )


@dataclass
class Measured:
    """What the phases of a run measured, kept until the cluster is stopped and the JSON is
    built (``_results``)."""

    wallets: dict[str, Any]
    mysql: dict[str, Any]
    busy_before: float | None
    lua: dict[str, Any]
    p1: PhaseResult
    commits: dict[str, Any]
    history_before: history.HistorySample
    backlog: history.BacklogWatch
    naive: PhaseResult | None
    rate: float  # the open loop's pairs/s (0: no open-loop phase)
    ol: PhaseResult | None
    history_after: history.HistorySample
    trivial: PhaseResult | None
    p2: PhaseResult
    check: dict[str, Any]


async def _run_phases(
    args: argparse.Namespace, target: Target, shape: Shape, budget: int, say: Any
) -> Measured:
    """Every phase of a run in order (the module's docstring), on a started cluster; the
    caller stops it whatever happens here."""
    host, port = target.host_port
    say(f"minting {args.latecomers} tokens for the sold-out crowd ...")
    ids = _crowds(args, target.jwt_secret, shape)
    # a create debits its sender: fund them for the whole run before any load
    wallets = await funding.fund_senders(target, ids.sender_uids, budget)
    mysql = await mysql_settings(target)
    _note_hot_shares(args, target, shape)
    busy_before = await _busy_before(say)

    lua = await lua_phase(args, target, say)
    target.refresh_pids()
    await wait_quiet(args, "phase 1")
    metrics_before = await node_metrics(target.nodes)
    history_before = await history.sample(target.nodes)
    backlog = history.BacklogWatch(target.nodes)
    backlog.start()
    p1 = await closed_loop_phase(args, target, shape, ids, host=host, port=port)
    commits = commit_stats(metrics_before, await node_metrics(target.nodes))
    naive = await naive_phase(args, target, shape, ids)
    rate = _open_loop_rate(args, target, shape, p1)
    ol = await open_loop_phase(args, target, shape, ids, rate)
    await backlog.stop()
    history_after = await history.drain(target.nodes, timeout_s=10)
    have = p1.sold_out + (ol.sold_out if ol else [])
    sold_out, extra = await top_up_sold_out(
        target, have, ids.openers[0], ids.senders[0], MIN_SOLD_OUT
    )
    trivial = await trivial_phase(args, ids.latecomers)
    p2 = await sold_out_phase(args, target, ids, sold_out, host=host, port=port)

    observed = [*p1.observed, *(ol.observed if ol else []), *extra]
    check = await check_phase(args, target, observed, say)
    return Measured(
        wallets=wallets,
        mysql=mysql,
        busy_before=busy_before,
        lua=lua,
        p1=p1,
        commits=commits,
        history_before=history_before,
        backlog=backlog,
        naive=naive,
        rate=rate,
        ol=ol,
        history_after=history_after,
        trivial=trivial,
        p2=p2,
        check=check,
    )


def _results(
    args: argparse.Namespace, target: Target, run: Measured, started: dt.datetime
) -> dict[str, Any]:
    """The run's JSON: build_results' sections, then what only a whole run knows (the load
    before it, the group commits, the history and credit lag, the wallets, the profiles) and
    which phases ran on a quiet machine."""
    results = build_results(
        args,
        target=target,
        lua=run.lua,
        trivial=run.trivial,
        p1=run.p1,
        p2=run.p2,
        ol=run.ol,
        ol_rate=run.rate,
        check=run.check,
        mysql=run.mysql,
        started=started,
        naive=run.naive,
    )
    naive = run.naive
    results["machine"]["busy_before_start_cores"] = run.busy_before
    results["group_commit"] = run.commits
    results["history"] = history.report(run.history_before, run.history_after, run.backlog)
    results["credit_lag"] = history.credit_lag(run.history_before, run.history_after)
    results["wallets"] = {**run.wallets, "creates_402": funding.refused(results)}
    results["profiles"] = [*run.p1.profiles, *(naive.profiles if naive else [])]
    for note in (run.p1.profile_note, naive.profile_note if naive else None):
        if note and note not in results["notes"]:
            results["notes"].append(note)
    # a phase is clean when processes outside the benchmark used under 0.1 core meanwhile
    results["clean"] = {
        phase: cores.get("other (not measured here)", 0.0) < 0.1
        for phase, cores in results["process_cores"].items()
        if cores
    }
    return results


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """One whole run: start (or find) the cluster, run every phase, stop the cluster (or
    leave it with ``--keep``) whatever happened, then build the JSON."""
    started = dt.datetime.now(dt.UTC)
    say = (lambda *_: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    shape = shape_of(args)
    if not (args.url or args.cluster):
        say(f"redpacket bench: starting a local cluster (scenario {shape.scenario})")
        lift_limits_for(shape)
    budget = funding.budget_cents(args, shape)
    target = await start_target(args)
    try:
        run = await _run_phases(args, target, shape, budget, say)
    finally:
        await stop_target(target, keep=args.keep)
    return _results(args, target, run, started)


def run_bench(args: argparse.Namespace) -> int:
    from redpacket.core.env import SettingsError

    try:
        results = asyncio.run(bench(args))
    except SettingsError as exc:
        print(f"redpacket bench: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the bench's own "cannot go on" (a 402, a dead worker)
        print(f"redpacket bench: {exc}", file=sys.stderr)
        return 1
    return write_outputs(args, results)
