"""``redpacket rebalance``: add or remove shards while the service runs (docs/rebalancing.md).

    redpacket rebalance add --node shard-2[=URL]      # start a shard, move its packets to it
    redpacket rebalance remove --node shard-2         # move its packets away, stop it
    redpacket rebalance resume | rollback | status

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
from redpacket.sharding.rebalance import RebalanceError, Rebalancer


def _common(parser: argparse.ArgumentParser, dry_run: bool = True) -> None:
    if dry_run:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="change nothing: print how many packets would move between each pair of nodes",
        )
    run = parser.add_argument_group("migration")
    run.add_argument("--concurrency", type=int, default=8, help="packets handed off at once")
    run.add_argument(
        "--rate", type=float, default=0.0, help="at most this many packets per second (0: no cap)"
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
        progress=not args.no_progress,
        gateway_timeout_s=args.gateway_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
    )
    dry_run = getattr(args, "dry_run", False)
    if args.action == "add":
        name, url = args.node
        job = rebalancer.add(name, url, args.weight, dry_run)
    elif args.action == "remove":
        name, url = args.node
        if url:
            raise SettingsError("remove takes --node NAME (no URL)")
        job = rebalancer.remove(name, dry_run)
    elif args.action == "resume":
        job = rebalancer.resume(dry_run)
    elif args.action == "rollback":
        job = rebalancer.rollback(dry_run)
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
    _common(p)
    p = actions.add_parser("remove", help="move a shard's packets to the others and stop it")
    p.add_argument("--node", type=_node_arg, required=True, metavar="NAME")
    _common(p)
    p = actions.add_parser("resume", help="finish a change that was interrupted")
    _common(p)
    p = actions.add_parser("rollback", help="undo a change that was interrupted")
    _common(p)
    p = actions.add_parser("status", help="the ring, and how many packets each node holds")
    _common(p, dry_run=False)
    parser.set_defaults(func=run)
