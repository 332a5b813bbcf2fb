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


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    say = (lambda *_: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    shape = shape_of(args)
    if not (args.url or args.cluster):
        say(f"redpacket bench: starting a local cluster (scenario {shape.scenario})")
        lift_limits_for(shape)
    budget = funding.budget_cents(args, shape)
    target = await start_target(args)
    try:
        host, port = target.host_port
        say(f"minting {args.latecomers} tokens for the sold-out crowd ...")
        ids = _crowds(args, target.jwt_secret, shape)
        openers, latecomers, senders, crowd = ids.openers, ids.latecomers, ids.senders, ids.crowd
        # a create debits its sender: fund them for the whole run before any load
        wallets = await funding.fund_senders(target, ids.sender_uids, budget)
        mysql = await mysql_settings(target)
        per_worker = args.users // max(1, args.workers)
        if shape.scenario == "hot" and shape.shares > per_worker:
            target.notes.append(
                f"--shares {shape.shares} > {per_worker} users per load worker: a packet needs "
                "that many different users, so phase 1 leaves packets partly opened and "
                f"phase 2 hammers {MIN_SOLD_OUT} small packets sold out for it"
            )
        busy_before = await machine_busy(1.0)
        if busy_before is not None and busy_before > 0.2:
            say(
                f"warning: the machine was already busy ({busy_before:.2f} cores) before the "
                "benchmark started; other work skews every number"
            )

        lua = await lua_phase(args, target, say)
        target.refresh_pids()
        await wait_quiet(args, "phase 1")
        metrics_before = await node_metrics(target.nodes)
        history_before = await history.sample(target.nodes)
        backlog = history.BacklogWatch(target.nodes)
        backlog.start()
        boss = (
            [await create_packet(target, senders[0], shape.shares, shape.amount)]
            if shape.finite
            else None
        )
        fresh_1 = int(args.fresh_per_s * args.duration) if shape.fresh else 0
        p1 = await run_phase(
            args,
            title=f"phase 1: grab + open ({shape.scenario})",
            profile="phase1",
            mode="open",
            host=host,
            port=port,
            users=openers,
            duration_s=args.duration,
            pids=target.pids,
            senders=senders,
            packets=[p.encode() for p in boss] if boss else None,
            shape=shape,
            fresh=ids.fresh(BOSS_USERS if shape.finite else fresh_1) if shape.fresh else None,
        )
        commits = commit_stats(metrics_before, await node_metrics(target.nodes))
        naive = await naive_phase(args, target, shape, ids)
        # open loop: pairs arrive at a fixed rate, by default half the closed-loop maximum
        rate = args.rate if args.rate is not None else round(0.5 * p1.rate("open"), 1)
        if shape.finite:
            rate = 0.0
            target.notes.append("boss: no open-loop phase (its one packet is phase 1's)")
        ol = await open_loop_phase(args, target, shape, ids, rate)
        await backlog.stop()
        history_after = await history.drain(target.nodes, timeout_s=10)
        sold_out, extra = await top_up_sold_out(
            target, p1.sold_out + (ol.sold_out if ol else []), openers[0], senders[0], MIN_SOLD_OUT
        )
        trivial = await trivial_phase(args, latecomers)

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

        observed = [*p1.observed, *(ol.observed if ol else []), *extra]
        check = await check_phase(args, target, observed, say)
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
        naive=naive,
    )
    results["machine"]["busy_before_start_cores"] = busy_before
    results["group_commit"] = commits
    results["history"] = history.report(history_before, history_after, backlog)
    results["credit_lag"] = history.credit_lag(history_before, history_after)
    results["wallets"] = {**wallets, "creates_402": funding.refused(results)}
    results["profiles"] = [*p1.profiles, *(naive.profiles if naive else [])]
    for note in (p1.profile_note, naive.profile_note if naive else None):
        if note and note not in results["notes"]:
            results["notes"].append(note)
    # a phase is clean when processes outside the benchmark used under 0.1 core meanwhile
    results["clean"] = {
        phase: cores.get("other (not measured here)", 0.0) < 0.1
        for phase, cores in results["process_cores"].items()
        if cores
    }
    return results


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
