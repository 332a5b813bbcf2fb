"""Registers ``redpacket bench``: see docs/benchmarks.md for what it measures and how."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from redpacket.bench.runner import run_bench

    return run_bench(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark a cluster: committed opens, sold-out rejections, and their ceilings",
        description="Start a local cluster (or use a running one), measure the Lua and "
        "trivial-handler ceilings, run grab+open then sold-out load with real JWTs, check "
        "the ledgers, print a table and write bench-results/<timestamp>.json.",
    )
    where = p.add_argument_group("cluster (default: start a local one)")
    where.add_argument("--shards", type=int, default=2, help="shards of the cluster it starts")
    where.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="gateway processes of the cluster it starts (sharing the port)",
    )
    where.add_argument("--name", default="bench", help="name of the cluster it starts")
    where.add_argument("--var", default="var", help="folder of local clusters (default: ./var)")
    where.add_argument(
        "--keep", action="store_true", help="keep the databases of the cluster it started"
    )
    where.add_argument("--cluster", help="use this running local cluster (redpacket dev up)")
    where.add_argument("--url", help="use the gateway at this URL")
    where.add_argument("--jwt-secret", help="with --url (default: REDPACKET_JWT_SECRET)")
    where.add_argument(
        "--payments-secret",
        help="with --url or --cluster: signs the top-ups that fund the senders (default: "
        "REDPACKET_PAYMENTS_SECRET, or the local cluster's)",
    )
    where.add_argument("--ring", help="ring file, for the Lua ceiling and the ledger check")

    load = p.add_argument_group("load")
    load.add_argument(
        "--scenario",
        choices=("crowd", "hot", "boss"),
        default="crowd",
        help="crowd: many 5-20-share packets, every opener new (default); hot: 32 packets of "
        "100 shares, 256 users keeping their tokens; boss: one packet of 10,000 shares, "
        "30,000 users (see bench/scenarios.py)",
    )
    load.add_argument("--in-flight", type=int, default=1000, help="crowd: packets open at once")
    load.add_argument(
        "--shares-min", type=int, default=5, help="crowd: fewest shares a packet draws"
    )
    load.add_argument(
        "--senders",
        type=int,
        default=None,
        help="distinct senders of the creates (crowd 2,000, hot 64)",
    )
    load.add_argument(
        "--fresh-per-s",
        type=float,
        default=4000.0,
        help="crowd: identities minted per second of phase 1 (a faster run reuses them, "
        "counted in identities_reused)",
    )
    load.add_argument("--users", type=int, default=256, help="concurrent virtual users")
    load.add_argument("--workers", type=int, default=1, help="load generator processes")
    load.add_argument(
        "--client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="load generator HTTP client (raw: minimal keep-alive HTTP/1.1)",
    )
    load.add_argument(
        "--latecomers",
        type=int,
        default=20_000,
        help="distinct users of phase 2, each token new to the gateway (0: the --users only)",
    )
    load.add_argument(
        "--packets", type=int, default=32, help="hot: red packets created before phase 1 starts"
    )
    load.add_argument(
        "--shares",
        type=int,
        default=None,
        help="shares per red packet (crowd: the most, 20; hot: 100)",
    )
    load.add_argument(
        "--amount",
        type=int,
        default=None,
        help="cents per red packet of --shares shares (100 a share)",
    )
    load.add_argument(
        "--duration", type=float, default=60.0, help="seconds of phase 1 (grab then open)"
    )
    load.add_argument(
        "--reject-duration", type=float, default=30.0, help="seconds of phase 2 (sold out)"
    )
    load.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="open-loop phase: R grab+open pairs arriving per second whatever the answers "
        "(default: 50%% of phase 1's committed opens/s; 0 skips it)",
    )
    load.add_argument(
        "--rate-duration",
        type=float,
        default=120.0,
        help="seconds of the open-loop phase (the target's flatness is over 120 s; 30 for a "
        "quick run)",
    )
    load.add_argument(
        "--ceiling-duration",
        type=float,
        default=10.0,
        help="seconds of each ceiling measurement (0: skip them)",
    )
    load.add_argument(
        "--naive-duration",
        type=float,
        default=15.0,
        help="seconds of the naive peer, right after phase 1 (0: skip it)",
    )
    load.add_argument(
        "--settle",
        type=float,
        default=15.0,
        help="seconds the checker lets pending claims land (negative: skip the check)",
    )

    load.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each measurement wait up to S seconds for the machine to be idle",
    )

    out = p.add_argument_group("output")
    out.add_argument("--out-dir", default="bench-results", help="where the JSON goes")
    out.add_argument("--json", help="write the JSON here instead")
    out.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="draw throughput and latency over time (default: next to the JSON)",
    )
    out.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy the gateway and the nodes during phase 1 (and the naive peer during its "
        "phase) into DIR/*.speedscope.json (needs py-spy)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_run)
