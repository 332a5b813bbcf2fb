"""Registers ``redpacket chaos``: see docs/reliability.md (Chaos runs) for what it does."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from redpacket.chaos.runner import run_chaos

    return run_chaos(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chaos",
        help="faults from a seeded schedule under mixed load, on a local cluster; then a verdict",
        description="Start a local cluster, run a mixed load against it while a nemesis "
        "injects the seed's faults (kills, pauses, Redis restarts, MySQL cuts and latency, "
        "rebalances, killed rebalances), heal everything, learn every unknown outcome, check "
        "what the clients saw against the ledgers through the API and with `redpacket check`, "
        "and report. Exit status 1 on any violation of the system; 3 when there is none but the "
        "nemesis could not run a fault as scheduled (a harness problem, reported apart). "
        "The same seed draws the same schedule.",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="length of the load and faults")
    p.add_argument("--seed", type=int, default=None, help="draws the schedule (default: random)")
    p.add_argument("--shards", type=int, default=2, help="shards of the cluster it starts")
    p.add_argument("--users", type=int, default=24, help="concurrent virtual users")
    p.add_argument(
        "--lifetime", type=float, default=10.0, help="seconds a red packet lives (then refunded)"
    )
    p.add_argument(
        "--from",
        dest="from_s",
        type=float,
        default=None,
        metavar="S",
        help="replay only the faults that the --seconds schedule injects from S seconds on "
        "(with --until), in a run of their own: a burst of a long run, quickly",
    )
    p.add_argument(
        "--until", dest="until_s", type=float, default=None, metavar="S", help="see --from"
    )
    p.add_argument(
        "--liveness-s",
        type=float,
        default=30.0,
        metavar="S",
        help="every open must have a final answer this long after the last fault healed",
    )
    p.add_argument("--think", type=float, default=0.05, help="mean pause between a user's ops")
    p.add_argument("--name", default=None, help="name of the cluster it starts")
    p.add_argument("--var", default="var", help="folder of local clusters (default: ./var)")
    p.add_argument("--keep", action="store_true", help="keep the cluster's databases")
    p.add_argument("--out-dir", default="var/chaos", help="where the JSON goes")
    p.add_argument("--json", help="write the JSON here instead")
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="draw throughput and errors over time with the faults (default: next to the JSON)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
