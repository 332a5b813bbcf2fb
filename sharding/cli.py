"""``redpacket rebalance``: add or remove shards while the service runs (docs/rebalancing.md).

    redpacket rebalance add --node shard-2[=URL]      # start a shard, move its packets to it
    redpacket rebalance add --node shard-2 --no-move  # new packets go there; none moves
    redpacket rebalance remove --node shard-2         # move its packets away, stop it
    redpacket rebalance remove --node shard-2 --drain # no new packet there; stops once empty
    redpacket rebalance resume | rollback | retire | status

Running a command again after it was interrupted resumes it; ``rollback`` undoes instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from redpacket.core.env import SettingsError
from redpacket.sharding.backends import Backend, BackendError
from redpacket.sharding.client import NodeError
from redpacket.sharding.rebalance import BATCH, CONCURRENCY, RebalanceError, Rebalancer
from redpacket.sharding.rebalance.pacer import P99_BUDGET


def _common(parser: argparse.ArgumentParser, dry_run: bool = True) -> None:
    if dry_run:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="change nothing: print how many packets would move between each pair of nodes",
        )
    run = parser.add_argument_group("migration")
    run.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help=f"batches (or single packets) handed off at once (default {CONCURRENCY})",
    )
    run.add_argument(
        "--batch", type=int, default=BATCH, help=f"packets per batched handoff (default {BATCH})"
    )
    run.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="at most this many packets, and users, per second (0: no cap)",
    )
    run.add_argument(
        "--p99-budget",
        type=float,
        default=P99_BUDGET,
        help="users' moves slow down while the nodes' open p99 is over this many times its "
        f"value before the change (default {P99_BUDGET:g}; 0: off, as fast as --concurrency "
        "allows)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--gateway-timeout-s",
        type=float,
        default=120.0,
        help="how long to wait for the gateways to load the final ring",
    )
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=120.0,
        help="how long a removed shard may take to deliver its history outbox before it stops",
    )
    parser.add_argument(
        "--backend",
        choices=("local", "kubernetes"),
        default="local",
        help="where the shards run (default: local, a `redpacket dev up` cluster)",
    )
    local = parser.add_argument_group("local backend")
    local.add_argument("--cluster", default="dev", help="local cluster name (default: dev)")
    local.add_argument("--var", default="var", help="folder of local clusters (default: ./var)")
    kube = parser.add_argument_group(
        "kubernetes backend (node secret from REDPACKET_NODE_SECRET; names follow the chart)"
    )
    kube.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    kube.add_argument("--release", default="redpacket", help="Helm release name")
    kube.add_argument("--fullname", default="", help="the chart's full name (default: chart rule)")
    kube.add_argument("--node-statefulset", default="", help="default <fullname>-node")
    kube.add_argument(
        "--redis-statefulset", default="", help="default <fullname>-redis; 'none': external"
    )
    kube.add_argument(
        "--mysql-statefulset", default="", help="default <fullname>-mysql; 'none': external"
    )
    kube.add_argument("--ring-configmap", default="", help="default <fullname>-ring")
    kube.add_argument("--ring-key", default="ring.json")
    kube.add_argument("--node-port", type=int, default=9000)
    kube.add_argument("--cluster-domain", default="cluster.local")
    kube.add_argument(
        "--gateway-selector",
        default="",
        help="label selector of the gateway pods (default: instance=<release>, component=gateway)",
    )
    kube.add_argument("--gateway-port", type=int, default=8080)
    kube.add_argument(
        "--gateway-deployment",
        default="",
        help="gateway Deployment whose replicas must confirm a ring (default <fullname>-gateway)",
    )
    kube.add_argument("--context", default=None, help="kubeconfig context (outside a pod)")
    kube.add_argument("--ready-timeout-s", type=float, default=600.0)


def _backend(args: argparse.Namespace) -> Backend:
    if args.backend == "local":
        from redpacket.sharding.backends.local import LocalBackend

        return LocalBackend(args.cluster, args.var)
    from redpacket.sharding.backends.kubernetes import (
        KubernetesBackend,
        KubernetesNames,
        api_client_from_env,
    )

    secret = os.environ.get("REDPACKET_NODE_SECRET", "")
    if not secret:
        raise SettingsError(
            "the kubernetes backend needs REDPACKET_NODE_SECRET (the nodes' secret)"
        )

    def store(value: str) -> str | None:
        return None if value.lower() == "none" else value

    names = KubernetesNames(
        namespace=args.namespace,
        release=args.release,
        fullname=args.fullname,
        node_statefulset=args.node_statefulset,
        redis_statefulset=store(args.redis_statefulset),
        mysql_statefulset=store(args.mysql_statefulset),
        ring_configmap=args.ring_configmap,
        ring_key=args.ring_key,
        node_port=args.node_port,
        cluster_domain=args.cluster_domain,
        gateway_selector=args.gateway_selector,
        gateway_port=args.gateway_port,
        gateway_deployment=args.gateway_deployment,
    )
    return KubernetesBackend(
        names,
        secret,
        api_client=api_client_from_env(args.context),
        ready_timeout_s=args.ready_timeout_s,
    )


async def _bench(rebalancer: Rebalancer, args: argparse.Namespace) -> int:
    """``rebalance bench`` (bench/rebalance.py): local clusters only, it reads their state."""
    from redpacket.bench.rebalance import report_json, run_bench
    from redpacket.cli.devcluster import load_state

    if args.backend != "local":
        raise SettingsError("rebalance bench runs against a local cluster (--backend local)")
    rebalancer.progress = False
    name, _ = args.node
    report = await run_bench(
        rebalancer,
        load_state(args.var, args.cluster),
        mode=args.mode,
        node=name,
        packets=args.packets,
        senders=args.senders,
        phase_s=args.phase_s,
        received=args.received,
        hot=args.hot,
    )
    print(report_json(report))
    return int(report["exit_code"])


def _versions(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ring versions")
    group.add_argument(
        "--settle-s",
        type=float,
        default=2.0,
        help="a new ring version places packets made from this many seconds on (default 2)",
    )
    group.add_argument(
        "--wait-s",
        type=float,
        default=0.0,
        help="wait up to this long for draining versions to retire (default: don't wait)",
    )


def _node_arg(raw: str) -> tuple[str, str | None]:
    name, _, url = raw.partition("=")
    if not name or len(name) > 64:
        raise argparse.ArgumentTypeError("--node is NAME or NAME=URL")
    return name, (url or None)


def run(args: argparse.Namespace) -> int:
    rebalancer = Rebalancer(
        _backend(args),
        concurrency=args.concurrency,
        rate=args.rate,
        p99_budget=args.p99_budget,
        batch_size=args.batch,
        progress=not args.no_progress,
        gateway_timeout_s=args.gateway_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        settle_s=getattr(args, "settle_s", 2.0),
        wait_s=getattr(args, "wait_s", 0.0),
    )
    dry_run = getattr(args, "dry_run", False)
    if args.action == "add":
        name, url = args.node
        job = rebalancer.add(name, url, args.weight, dry_run, move=not args.no_move)
    elif args.action == "remove":
        name, url = args.node
        if url:
            raise SettingsError("remove takes --node NAME (no URL)")
        job = rebalancer.remove(name, dry_run, drain=args.drain)
    elif args.action == "resume":
        job = rebalancer.resume(dry_run)
    elif args.action == "rollback":
        job = rebalancer.rollback(dry_run)
    elif args.action == "retire":
        job = rebalancer.retire(dry_run)
    elif args.action == "bench":
        job = _bench(rebalancer, args)
    else:
        job = rebalancer.status()
    try:
        return asyncio.run(job)
    except (RebalanceError, BackendError, NodeError) as exc:
        print(f"redpacket rebalance {args.action}: {exc}", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "rebalance",
        help="add or remove shards live (moves red packets between shards)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("add", help="start a shard and move the packets it now owns to it")
    p.add_argument("--node", type=_node_arg, required=True, metavar="NAME[=URL]")
    p.add_argument("--weight", type=int, default=1, help="share of the packets (default 1)")
    p.add_argument(
        "--no-move",
        action="store_true",
        help="move no packet: a new ring version places only new packets (done in seconds)",
    )
    _versions(p)
    _common(p)
    p = actions.add_parser("remove", help="take a shard out (moving its packets, or draining)")
    p.add_argument("--node", type=_node_arg, required=True, metavar="NAME")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--move", action="store_true", help="move its packets to the others now (the default)"
    )
    mode.add_argument(
        "--drain",
        action="store_true",
        help="send it no new packet; it stops once its last one has expired and been refunded "
        "(run `retire` later, or pass --wait-s)",
    )
    _versions(p)
    _common(p)
    p = actions.add_parser(
        "retire", help="retire ring versions with no live packet left; stop drained shards"
    )
    _versions(p)
    _common(p)
    p = actions.add_parser("resume", help="finish a change that was interrupted")
    _common(p)
    p = actions.add_parser("rollback", help="undo a change that was interrupted")
    _common(p)
    p = actions.add_parser(
        "bench", help="seed packets, change the ring under an open load, report the cost"
    )
    p.add_argument("--node", type=_node_arg, required=True, metavar="NAME")
    p.add_argument("--mode", choices=("add-no-move", "add", "remove"), default="add-no-move")
    p.add_argument("--packets", type=int, default=100_000, help="seeded first (default 100000)")
    p.add_argument("--senders", type=int, default=2000, help="users who sent them")
    p.add_argument("--phase-s", type=float, default=5.0, help="seconds measured before and after")
    p.add_argument(
        "--received",
        type=int,
        default=0,
        help="shares each sender took (user_received rows, seeded; default 0)",
    )
    p.add_argument(
        "--hot",
        type=int,
        default=0,
        help="open only the newest N seeded packets, each grabbed once first so that it is in "
        "Redis, as a crowd's fresh packets are (default 0: every seeded packet, most opened "
        "for the first time and loaded from MySQL, as after a Redis restart)",
    )
    _versions(p)
    _common(p, dry_run=False)
    p = actions.add_parser("status", help="the ring, and how many packets each node holds")
    _common(p, dry_run=False)
    parser.set_defaults(func=run)
