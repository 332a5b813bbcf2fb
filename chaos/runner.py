"""``redpacket chaos``: draw the schedule, start a cluster, run the load and the nemesis
together, heal, judge, report. Every phase is bounded in time; the cluster and its databases
are gone at the end (``--keep`` keeps the databases)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from redpacket.chaos import report as reports
from redpacket.chaos.cluster import ChaosCluster, new_prefix
from redpacket.chaos.load import Client, Load, Outcomes, discover_api
from redpacket.chaos.nemesis import FaultRecord, Nemesis
from redpacket.chaos.schedule import Schedule, draw
from redpacket.chaos.verdict import Verdict, judge
from redpacket.cli.children import ALL_SHARDS_READY, answers_ready
from redpacket.core.env import SettingsError
from redpacket.core.ids import snowflake_of
from redpacket.sharding.ring import NodeSpec, Ring, RingDoc

# every user's dev grant: modest, so top-ups fund the load; below the largest packet, so a
# poor user's create can exceed it (chaos/wallets.py)
STARTING_BALANCE = 10_000
PROBER = 1  # the uid of the prober (it only reads and grabs: it never takes a share)
NEMESIS_GRACE_S = 300.0  # after the load, unfinished heals (a slow rebalance) get this long


def replay_command(args: argparse.Namespace) -> str:
    command = (
        f"redpacket chaos --seconds {args.seconds:g} --seed {args.seed} --shards {args.shards} "
        f"--users {args.users} --lifetime {args.lifetime:g}"
    )
    if args.from_s is not None:
        command += f" --from {args.from_s:g} --until {args.until_s:g}"
    return command


def the_schedule(args: argparse.Namespace) -> Schedule:
    """The seed's schedule, or the window of it that --from/--until picked."""
    schedule = draw(args.seed, args.seconds, args.shards)
    if args.from_s is None and args.until_s is None:
        return schedule
    if args.from_s is None or args.until_s is None:
        raise SettingsError("--from and --until go together")
    try:
        return schedule.window(args.from_s, args.until_s)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def cluster_env(lifetime_s: float) -> None:
    """Settings of the cluster under test (an environment variable already set wins).

    Rate limits are lifted (virtual users act far faster than people); packets live
    ``lifetime_s`` and are refunded a second after, so expiry and refunds happen all through
    the run; the reconciler and the sweeper run every second.
    """
    for name in ("OPEN", "CREATE"):
        os.environ.setdefault(f"REDPACKET_RATE_{name}_PER_S", "1000000")
        os.environ.setdefault(f"REDPACKET_RATE_{name}_BURST", "1000000")
    os.environ.setdefault("REDPACKET_REFUND_GRACE_S", "1")
    os.environ.setdefault("REDPACKET_SWEEP_INTERVAL_S", "1")
    os.environ.setdefault("REDPACKET_RECONCILE_INTERVAL_S", "1")
    os.environ.setdefault("REDPACKET_MYSQL_TIMEOUT_S", "2")


async def make_probes(load: Load, shards: list[NodeSpec], extra: str) -> dict[str, str]:
    """One packet per base shard that the shard owns with and without the extra shard, to
    ask whether that shard answers (GET the packet: MySQL; grab it: Redis)."""
    plain, grown = Ring(shards), Ring([*shards, NodeSpec(extra, "", 1)])
    probes: dict[str, str] = {}
    for _ in range(400):
        if len(probes) == len(shards):
            return probes
        body = {"total_amount": 100, "total_packet": 100}
        answer = await load.client.call("POST", "/v1/red-packets", PROBER, body=body)
        if answer.status != 201:
            await asyncio.sleep(0.2)
            continue
        load.saw_created(PROBER, body, answer.body)
        load.recent.pop()  # the load does not open probes
        packet = str(answer.body["red_packet_id"])
        owner = plain.owner(snowflake_of(packet)).name
        if owner == grown.owner(snowflake_of(packet)).name:
            probes.setdefault(owner, packet)
    raise RuntimeError(f"could not make a probe packet for every shard (have {sorted(probes)})")


def make_probe(load: Load, probes: dict[str, str]) -> Any:
    async def answers(shard: str) -> bool:
        packet = probes[shard]
        info = await load.client.call("GET", f"/v1/red-packets/{packet}", PROBER, timeout_s=1)
        if info.status != 200:
            return False
        grab = await load.client.call(
            "POST", f"/v1/red-packets/{packet}/grab", PROBER + 1, timeout_s=1
        )
        return grab.status == 200

    async def probe(shards: list[str], any_: bool) -> bool:
        answered = await asyncio.gather(*(answers(s) for s in shards))
        return any(answered) if any_ else all(answered)

    return probe


async def progress(
    args: argparse.Namespace, outcomes: Outcomes, nemesis: Nemesis, t0: float, done: asyncio.Event
) -> None:
    if args.quiet:
        await done.wait()
        return
    from tqdm import tqdm

    bar = tqdm(
        total=int(nemesis.schedule.seconds),
        desc=f"chaos seed {args.seed}",
        unit="s",
        bar_format="{desc}: {bar:20} {n:.0f}/{total:.0f}s {postfix}",
        file=sys.stderr,
    )
    try:
        while not done.is_set():
            elapsed = time.monotonic() - t0
            last = outcomes.per_second.get(int(elapsed) - 1, {})
            injected = sum(r.injected_at is not None for r in nemesis.records)
            bar.set_postfix_str(
                f"{last.get('ok', 0)} ok/s {last.get('error', 0)} err/s, "
                f"faults {injected}/{len(nemesis.schedule.faults)} "
                f"active {sorted(str(nemesis.schedule.faults[i].kind) for i in nemesis.active)}",
                refresh=False,
            )
            bar.n = min(bar.total, int(elapsed))
            bar.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)
    finally:
        bar.close()


async def chaos(args: argparse.Namespace) -> dict[str, Any]:
    """One run, in its phases: start the cluster, the load and its probes; load and faults
    together, then heal; judge; the result. The cluster and its databases go whatever
    happens (``_tear_down``), so a failed run leaves nothing behind."""
    schedule = the_schedule(args)
    seconds = schedule.seconds  # a window of a long schedule runs for its own length
    cluster = _new_cluster(args)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    say(f"chaos: {len(schedule.faults)} faults scheduled over {seconds:g}s; starting cluster")
    client: Client | None = None
    try:
        await cluster.up()
        # made here, not in _start_load, so that _tear_down closes it if discovery fails
        client = Client(cluster.gateway_url, cluster.jwt_secret)
        load, probes = await _start_load(args, cluster, client)
        say(f"chaos: kinds {list(load.api.kinds)}, history {load.api.history}; probes {probes}")
        nemesis, load_seconds = await _load_under_faults(args, cluster, schedule, load, probes)
        say("chaos: load stopped, everything healed; judging")
        records = nemesis.records
        verdict, doc, last_heal_s = await _judge_run(args, cluster, load, records)
        return _result(
            args,
            schedule,
            load,
            records,
            load_seconds=load_seconds,
            verdict=verdict,
            doc=doc,
            last_heal_s=last_heal_s,
        )
    finally:
        await _tear_down(args, cluster, client)


def _new_cluster(args: argparse.Namespace) -> ChaosCluster:
    """The cluster under test, not started: its settings are set first (``cluster_env``) as
    its processes read them when they start; fresh databases (a new prefix), so that no run
    judges another's packets; quiet, as the progress bar owns the terminal."""
    cluster_env(args.lifetime)
    return ChaosCluster(
        name=args.name or f"chaos-{args.seed}",
        shards=args.shards,
        port=0,
        var=args.var,
        db_prefix=new_prefix(),
        expire_s=max(1, round(args.lifetime)),
        quiet=True,
        starting_balance=STARTING_BALANCE,
    )


async def _start_load(
    args: argparse.Namespace, cluster: ChaosCluster, client: Client
) -> tuple[Load, dict[str, str]]:
    """The load, shaped by what the cluster's API offers (kinds, history), and its probe
    packets (shard -> packet): made before any fault, while every shard answers, so the
    nemesis can later ask whether a shard serves again."""
    api = await discover_api(client)
    outcomes = Outcomes()
    load = Load(
        client,
        api,
        args.seed,
        args.users,
        outcomes,
        think_s=args.think,
        payments_secret=cluster.payments_secret,
        starting_balance=cluster.starting_balance,
    )
    base = [p.spec() for p in cluster.plans]
    probes = await make_probes(load, base, f"shard-{args.shards}")
    return load, probes


async def _load_under_faults(
    args: argparse.Namespace,
    cluster: ChaosCluster,
    schedule: Schedule,
    load: Load,
    probes: dict[str, str],
) -> tuple[Nemesis, float]:
    """Run the load and the nemesis together for the schedule's length, stop the load, heal
    everything; the nemesis (its records say what it did) and the load's length in seconds.
    Every fault is meant to heal under load, which is why the load waits for a late one."""
    seconds = schedule.seconds
    t0 = time.monotonic()
    load.outcomes.started = t0
    nemesis = Nemesis(cluster, schedule, make_probe(load, probes), t0)
    done = asyncio.Event()
    shown = asyncio.create_task(progress(args, load.outcomes, nemesis, t0, done))
    hurt = asyncio.create_task(nemesis.run())
    load.deadline = t0 + seconds + NEMESIS_GRACE_S
    pressing = asyncio.create_task(load.run())
    await asyncio.sleep(seconds)
    # A heal that is late (a rebalance slowed down by the other faults) happens under
    # load too: the load runs on until the nemesis is done, for NEMESIS_GRACE_S at most.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(hurt), NEMESIS_GRACE_S)
    load.stop.set()
    load_seconds = time.monotonic() - t0
    await pressing
    done.set()
    await shown
    if not hurt.done():
        hurt.cancel()
    await nemesis.heal_all()
    return nemesis, load_seconds


async def _judge_run(
    args: argparse.Namespace, cluster: ChaosCluster, load: Load, records: list[FaultRecord]
) -> tuple[Verdict, RingDoc, float]:
    """``(verdict, final ring, last heal in run seconds)``, judged once every shard answers
    again: the shards of every version of the ring are checked (a draining one too), and
    liveness is counted from the last heal, from when the system owes answers again."""
    await answers_ready(cluster.gateway_url, 120, ALL_SHARDS_READY)
    doc = RingDoc.load(cluster.ring_file)
    nodes = doc.all_nodes()  # every version's shards, a draining one too
    last_heal_s = max((r.healed_at for r in records if r.healed_at is not None), default=0.0)
    verdict: Verdict = await judge(
        load,
        nodes,
        time.monotonic() + args.lifetime + 90,
        last_heal_s=last_heal_s,
        liveness_s=args.liveness_s,
    )
    return verdict, doc, last_heal_s


def _result(
    args: argparse.Namespace,
    schedule: Schedule,
    load: Load,
    records: list[FaultRecord],
    *,
    load_seconds: float,
    verdict: Verdict,
    doc: RingDoc,
    last_heal_s: float,
) -> dict[str, Any]:
    """The run's JSON: enough to replay it (command, seed, schedule), what the load and the
    nemesis did, and every violation, the system's and then the faults' own (the exit
    status, the table and the plot are all drawn from it)."""
    violations, harness = judge_faults(records, load_seconds)
    violations = list(verdict.violations) + violations
    outcomes, api = load.outcomes, load.api
    return {
        "command": replay_command(args),
        "seed": args.seed,
        "seconds": schedule.seconds,
        "shards": args.shards,
        "users": args.users,
        "lifetime_s": args.lifetime,
        "load_seconds": round(load_seconds, 2),
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "api": {"kinds": list(api.kinds), "history": api.history},
        "operations": reports.operations(outcomes.ops),
        "faults": reports.fault_summary(records),
        "fault_log": [r.as_dict() for r in records],
        "violations": violations,
        "harness": harness,
        "last_heal_s": round(last_heal_s, 2),
        "verdict": verdict.as_dict() | {"violations": len(verdict.violations)},
        "final_ring": {"version": doc.version, "nodes": [n.name for n in doc.nodes]},
        "timeline": {str(s): dict(c) for s, c in sorted(outcomes.per_second.items())},
        "schedule": schedule.as_dict(),
    }


async def _tear_down(
    args: argparse.Namespace, cluster: ChaosCluster, client: Client | None
) -> None:
    """Whatever happened: close the client, stop the cluster (a failure to stop is
    swallowed, so it never hides the run's own error), drop its databases unless --keep."""
    if client is not None:
        await client.close()
    with contextlib.suppress(Exception):
        await cluster.down()
    if not args.keep:
        await cluster.drop_databases()


def judge_faults(records: list[FaultRecord], load_seconds: float) -> tuple[list[str], list[str]]:
    """``(violations, harness problems)`` of the faults themselves.

    The system's: a fault injected and never healed (a killed process not restarted or not
    serving again, a rebalance that could not finish), or one healed only after the load
    stopped. The harness's: a fault the nemesis could not place (its resource stayed taken
    past the injection window, or the nemesis itself failed): no verdict on the system, but
    the run did not test what its schedule says, so it is reported apart."""
    violations: list[str] = []
    harness: list[str] = []
    for r in records:
        name = f"fault {r.fault.index} ({r.fault.kind})"
        if (problem := r.harness_problem) is not None:
            harness.append(problem)
            continue
        if r.healed_at is None:
            violations.append(f"{name} injected but never healed: {r.notes}")
        elif r.healed_at > load_seconds:
            violations.append(f"{name} healed after the load")
        violations += [f"{name}: {n}" for n in r.notes if "did not serve" in n]
    return violations, harness


def _git_commit() -> str:
    import subprocess

    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return "unknown"


def publish(result: dict[str, Any], args: argparse.Namespace) -> Path:
    """The JSON, the table and (with --plot) the PNG; the JSON's path. A missing plotting
    extra costs the PNG only, with a line saying what to install."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(args.json) if args.json else Path(args.out_dir) / f"{stamp}-seed{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(reports.table(result))
    print(f"JSON: {path}")
    if args.plot is not None:
        png = Path(args.plot) if args.plot else path.with_suffix(".png")
        try:
            reports.plot(result, png)
            print(f"plot: {png}")
        except reports.PlotUnavailable as exc:
            print(f"plot: {exc}", file=sys.stderr)
    return path


def run_chaos(args: argparse.Namespace) -> int:
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(3), "big")
    try:
        result = asyncio.run(chaos(args))
    except SettingsError as exc:
        print(f"redpacket chaos: {exc}", file=sys.stderr)
        return 2
    publish(result, args)
    if result["violations"]:
        return 1
    return 3 if result["harness"] else 0
