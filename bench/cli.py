"""Registers ``redpacket bench`` (filled in by the benchmark work)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a local cluster (not yet available)")
    p.set_defaults(func=lambda _: print("redpacket bench: not implemented yet") or 2)
