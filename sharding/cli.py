"""Registers ``redpacket rebalance`` (filled in by the rebalancing work)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rebalance", help="add or remove shards live (not yet available)")
    p.set_defaults(func=lambda _: print("redpacket rebalance: not implemented yet") or 2)
