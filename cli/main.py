"""``redpacket <command>``: one console script for every service and tool.

Each command's module is imported only when that command runs, so ``redpacket token``
does not pay for matplotlib and ``redpacket node`` does not load the benchmark.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from redpacket.core.env import SettingsError


def _serve(service: str, settings: Any, create_app: Any) -> int:
    from redpacket.cli.serve import serve

    serve(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        service=service,
        log_level=settings.log_level,
        access_log=settings.access_log,
        keepalive_timeout_s=getattr(settings, "header_timeout_s", 75.0),
    )
    return 0


def _gateway(_: argparse.Namespace) -> int:
    from redpacket.gateway.app import create_app
    from redpacket.gateway.settings import GatewaySettings

    return _serve("gateway", GatewaySettings.from_env(), create_app)


def _node(_: argparse.Namespace) -> int:
    from redpacket.node.app import create_app
    from redpacket.node.settings import NodeSettings

    return _serve("node", NodeSettings.from_env(), create_app)


def _token(args: argparse.Namespace) -> int:
    from redpacket.cli.devcluster import jwt_secret_for
    from redpacket.gateway.auth import mint_token

    secret = jwt_secret_for(args.cluster, args.var)
    print(mint_token(secret, args.uid, args.name, args.picture, args.ttl))
    return 0


def _dev(args: argparse.Namespace) -> int:
    from redpacket.cli.devcluster import run_dev_up

    return run_dev_up(args)


def _demo(args: argparse.Namespace) -> int:
    from redpacket.cli.demo import run_demo

    return run_demo(args)


def _check(args: argparse.Namespace) -> int:
    from redpacket.cli.check import run_check

    return run_check(args)


def _cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", default="dev", help="local cluster name (default: dev)")
    parser.add_argument("--var", default="var", help="folder of local clusters (default: ./var)")


def build_parser() -> argparse.ArgumentParser:
    from redpacket.bench.cli import register as register_bench
    from redpacket.chaos.cli import register as register_chaos
    from redpacket.cli.deadletters import register as register_dead_letters
    from redpacket.cli.wallet import register as register_wallet
    from redpacket.sharding.cli import register as register_rebalance

    parser = argparse.ArgumentParser(
        prog="redpacket", description="WeChat-style red packet backend: services and tools."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("gateway", help="run the public gateway (settings from REDPACKET_* env)")
    p.set_defaults(func=_gateway)
    p = sub.add_parser("node", help="run a shard node (settings from REDPACKET_* env)")
    p.set_defaults(func=_node)

    db = sub.add_parser("db", help="database tools").add_subparsers(
        dest="db_command", required=True
    )
    from redpacket.cli.migrate import register as register_db

    register_db(db)

    p = sub.add_parser("token", help="print a signed user token (JWT) for local use")
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--name", default="")
    p.add_argument("--picture", default="")
    p.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    _cluster_args(p)
    p.set_defaults(func=_token)

    dev = sub.add_parser("dev", help="local multi-shard cluster").add_subparsers(
        dest="dev_command", required=True
    )
    p = dev.add_parser(
        "up",
        help="start gateway, nodes, one redis-server and one database "
        "per shard, in the foreground; Ctrl-C stops them all",
    )
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--port", type=int, default=8080, help="gateway port (0: any free port)")
    p.add_argument(
        "--db-prefix",
        default=None,
        help="MySQL database name prefix (default: redpacket_<cluster>)",
    )
    p.add_argument("--expire-s", type=int, default=86400, help="red packet lifetime")
    p.add_argument(
        "--gateway-workers", type=int, default=1, help="gateway processes sharing the port"
    )
    p.add_argument(
        "--starting-balance",
        type=int,
        default=None,
        metavar="CENTS",
        help="every user's wallet starts with this (a grant; default: "
        "REDPACKET_DEV_STARTING_BALANCE, else 10000000)",
    )
    _cluster_args(p)
    p.set_defaults(func=_dev)

    p = sub.add_parser("demo", help="a sender, a few packets and a crowd of users, on a cluster")
    p.add_argument("--packets", type=int, default=3)
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--shards", type=int, default=2, help="shards of the cluster it starts")
    p.add_argument("--url", help="gateway of a running cluster (default: start one)")
    _cluster_args(p)
    p.set_defaults(func=_demo)

    p = sub.add_parser("check", help="check the ledger invariants on every shard")
    p.add_argument(
        "--ring",
        help="ring file listing each node's redis and mysql (default: the local cluster's)",
    )
    p.add_argument(
        "--reconcile-wait",
        type=float,
        default=10.0,
        help="seconds to let pending claims land before calling them violations",
    )
    p.add_argument(
        "--allow-unfunded",
        action="store_true",
        help="accept packets no wallet paid for (made by release 0.1.0, before wallets)",
    )
    _cluster_args(p)
    p.set_defaults(func=_check)

    register_wallet(sub)
    register_dead_letters(sub)
    register_bench(sub)
    register_chaos(sub)
    register_rebalance(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"redpacket {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
