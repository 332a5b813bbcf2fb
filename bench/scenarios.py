"""The shapes of load a run can take (``--scenario``), and what each phase hands the workers.

- ``crowd`` (default), the real New Year's Eve crowd: many small group packets (each draws
  ``--shares-min``..``--shares`` shares, 5-20) with ``--in-flight`` of them open at once
  (1,000), a random one per opener; every grab+open pair is a different user with a token
  the gateway has never seen; packets come from ``--senders`` different senders (2,000).
- ``hot``: the earlier default. A few big packets (``--packets`` 32 of ``--shares`` 100),
  ``--users`` 256 openers who keep their tokens (the gateway verifies each once).
- ``boss``: the company-wide packet: one packet of 10,000 shares, 30,000 different users,
  each grabs and opens it once; phase 1 ends when they all have (10,000 win, the rest get
  sold-out answers), and phase 2's latecomers hammer the same packet.

Identities of the crowd are minted by the load generator's workers before they report
ready, outside the measured window (``bench/job.py Mint``), so minting costs no measured CPU.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

SCENARIOS = ("crowd", "hot", "boss")
BOSS_SHARES = 10_000
BOSS_USERS = 30_000
CENTS_PER_SHARE = 100


@dataclass(frozen=True)
class Shape:
    """What the open phase's workers do: packet sizes, how many open, who opens."""

    scenario: str
    shares: int  # the most shares of a packet
    shares_min: int  # 0: every packet has ``shares``
    amount: int  # cents of a packet of ``shares`` shares
    initial_packets: int
    in_flight: int  # crowd: packets open at once (over all workers)
    fresh: bool  # every pair a new identity
    finite: bool  # boss: a fixed crowd on given packets
    senders: int  # distinct senders of the creates


def shape_of(args: argparse.Namespace) -> Shape:
    """The scenario with the command line's overrides."""
    if args.scenario == "hot":
        return Shape("hot", args.shares or 100, 0, args.amount or 10_000, args.packets,
                     0, False, False, args.senders or 64)  # fmt: skip
    if args.scenario == "boss":
        return Shape("boss", BOSS_SHARES, 0, BOSS_SHARES * CENTS_PER_SHARE, 1,
                     0, True, True, 1)  # fmt: skip
    shares = args.shares or 20
    return Shape("crowd", shares, args.shares_min, args.amount or shares * CENTS_PER_SHARE,
                 0, args.in_flight, True, False, args.senders or 2000)  # fmt: skip


def lift_limits_for(shape: Shape) -> None:
    """The boss packet is over the product limits (100 shares, 200 yuan): on the bench's own
    cluster they are raised, as a company would for its own packet."""
    if shape.scenario == "boss":
        os.environ.setdefault("REDPACKET_MAX_PACKETS", str(BOSS_SHARES))
        os.environ.setdefault("REDPACKET_MAX_AMOUNT", str(BOSS_SHARES * CENTS_PER_SHARE))
