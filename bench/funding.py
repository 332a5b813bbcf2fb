"""Money for the senders: a create debits its sender's wallet (issue 18), so a run that ran a
sender dry would measure 402s instead of creates.

The budget is an upper bound, per sender, of what the run can spend: the packets it could
create (phase 1 and the open-loop phase at ``OPENS_PER_S_BOUND`` opens/s, far above what one
box reaches, over the fewest shares a packet draws, plus the stock created ahead) times the
amount of the biggest packet. Unless the cluster's starting balance already covers it (a
running dev cluster's), each sender gets a signed top-up through the payment webhook
(``POST /v1/wallet/topups``), which the conservation check counts like any top-up: the bench's
own cluster (which has no starting balance, bench/cluster.py), a running local cluster, or a
gateway by ``--url`` with ``--payments-secret``. Without a secret, the run says so and its
402s are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import secrets
from typing import Any

import aiohttp
import orjson

from redpacket.bench.cluster import Target
from redpacket.bench.scenarios import CENTS_PER_SHARE, Shape

# more committed opens per second than any cluster this bench drives has reached
OPENS_PER_S_BOUND = 50_000
SOLD_OUT_TOP_UP = 20 * CENTS_PER_SHARE  # runner.top_up_sold_out: 20 one-share packets of 1 元
TOPUP_CONCURRENCY = 32


def budget_cents(args: argparse.Namespace, shape: Shape) -> int:
    """What one sender may spend in this run, at most (see the module's docstring)."""
    if shape.finite:  # the boss packet, then the sold-out top-up: no other creates
        return shape.amount + SOLD_OUT_TOP_UP
    seconds = max(0.0, args.duration) + max(0.0, args.rate_duration)
    fewest = shape.shares_min or shape.shares
    stock = shape.initial_packets + shape.in_flight + max(16, shape.in_flight // 8) * args.workers
    packets = OPENS_PER_S_BOUND * seconds / fewest + stock
    return math.ceil(packets / max(1, shape.senders)) * shape.amount + SOLD_OUT_TOP_UP


async def top_up(url: str, secret: str, uids: list[int], cents: int, run_id: str) -> dict[str, Any]:
    """One signed top-up of ``cents`` per uid (idempotent by its ``topup_id``)."""
    from redpacket.gateway.wallet import SIGNATURE_HEADER, signature_header

    gate = asyncio.Semaphore(TOPUP_CONCURRENCY)
    failed: dict[str, int] = {}

    async def one(session: aiohttp.ClientSession, uid: int) -> None:
        raw = orjson.dumps({"uid": str(uid), "amount": cents, "topup_id": f"bench-{run_id}-{uid}"})
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(secret, raw),
        }
        async with gate, session.post(url + "/v1/wallet/topups", data=raw, headers=headers) as resp:
            if resp.status not in (200, 201):
                failed[str(resp.status)] = failed.get(str(resp.status), 0) + 1

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, uid) for uid in uids))
    return {"topups": len(uids) - sum(failed.values()), "failed": failed}


async def fund_senders(target: Target, uids: list[int], budget: int) -> dict[str, Any]:
    """Top the senders up to ``budget`` when the cluster's starting balance falls short."""
    have = target.starting_balance_cents
    out: dict[str, Any] = {"budget_per_sender_cents": budget, "starting_balance_cents": have}
    if have >= budget:
        return {**out, "funded_by": "starting balance"}
    if not target.payments_secret:
        target.notes.append(
            "senders not funded: no --payments-secret (or REDPACKET_PAYMENTS_SECRET), so "
            "creates may answer 402 insufficient_funds (counted in errors)"
        )
        return {**out, "funded_by": None}
    done = await top_up(
        target.url, target.payments_secret, uids, budget - have, secrets.token_hex(4)
    )
    if done["failed"]:
        raise RuntimeError(f"topping up the senders failed: {done['failed']}")
    return {**out, "funded_by": "top-up", "topups": done["topups"]}


def refused(results: dict[str, Any]) -> int:
    """Creates answered 402 insufficient_funds over the run (zero when the senders were
    funded: a non-zero count means the budget above was too small for this machine)."""
    return sum(n for key, n in results["errors"].items() if key.startswith("error:create:402"))
