"""``redpacket wallet topup``: sign and send one top-up, as a payment provider's callback
would (gateway/wallet.py checks it). The secret is REDPACKET_PAYMENTS_SECRET, or the local
cluster's."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys

import aiohttp
import orjson


async def send_topup(
    session: aiohttp.ClientSession, url: str, secret: str, *, uid: int, amount: int, topup_id: str
) -> tuple[int, bytes]:
    """One signed top-up, as the payment provider sends it: ``(status, body)``."""
    from redpacket.gateway.wallet import SIGNATURE_HEADER, signature_header

    raw = orjson.dumps({"uid": str(uid), "amount": amount, "topup_id": topup_id})
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature_header(secret, raw)}
    async with session.post(url.rstrip("/") + "/v1/wallet/topups", data=raw, headers=headers) as r:
        return r.status, await r.read()


def run_topup(args: argparse.Namespace) -> int:
    from redpacket.cli.devcluster import load_state, payments_secret_for

    url = args.url or load_state(args.var, args.cluster)["gateway"]["url"]
    secret = payments_secret_for(args.cluster, args.var)
    topup_id = args.topup_id or f"cli-{secrets.token_hex(8)}"

    async def send() -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as session:
            return await send_topup(
                session, url, secret, uid=args.uid, amount=args.amount, topup_id=topup_id
            )

    status, body = asyncio.run(send())
    print(body.decode())
    if status not in (200, 201):
        print(f"redpacket wallet topup: the gateway answered {status}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    wallet = sub.add_parser("wallet", help="the wallet (零钱)").add_subparsers(
        dest="wallet_command", required=True
    )
    p = wallet.add_parser("topup", help="sign and send one top-up (the payment webhook)")
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--amount", type=int, required=True, metavar="CENTS")
    p.add_argument(
        "--topup-id", help="the provider's id (default: a new one); a replay credits once"
    )
    p.add_argument("--url", help="gateway URL (default: the local cluster's)")
    p.add_argument("--cluster", default="dev", help="local cluster name (default: dev)")
    p.add_argument("--var", default="var", help="folder of local clusters (default: ./var)")
    p.set_defaults(func=run_topup)
