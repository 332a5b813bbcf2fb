"""``redpacket demo``: one sender, a few red packets, a crowd of users, on a real cluster.

It uses a running local cluster if there is one (``--cluster``), or a gateway you name
(``--url``, with REDPACKET_JWT_SECRET set), or starts a cluster of its own and stops it
afterwards. Then a sender creates a few packets and a few hundred users grab and open
them at once, through the public API only. It prints who got how much, the luckiest user
(手气最佳) and checks that the shares add up; on a local cluster it also runs the full
ledger checker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import sys
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tqdm import tqdm

from redpacket.cli.check import Observed, check_shards
from redpacket.cli.children import ALL_SHARDS_READY, answers_ready
from redpacket.cli.devcluster import DevCluster, Unmet, load_state
from redpacket.cli.wallet import send_topup
from redpacket.core.ids import snowflake_of
from redpacket.gateway.auth import mint_token
from redpacket.sharding.ring import RingDoc

SENDER = (1, "Alice")
PACKETS = [(8888, 10, "恭喜发财，大吉大利"), (2000, 5, "新年快乐"), (20000, 100, "万事如意")]
NAMES = [
    "Bo",
    "Chen",
    "Dai",
    "Fang",
    "Gao",
    "Hui",
    "Jing",
    "Kai",
    "Lan",
    "Ming",
    "Ning",
    "Ping",
    "Qiang",
    "Rui",
    "Shan",
    "Tao",
    "Wei",
    "Xin",
    "Yan",
    "Zhi",
]


@dataclass
class PacketRun:
    packet_id: str
    total_amount: int
    total_packet: int
    greeting: str
    wins: dict[int, int] = field(default_factory=dict)
    sold_out_answers: int = 0


def yuan(cents: int) -> str:
    return f"¥{cents // 100}.{cents % 100:02d}"


class Api:
    def __init__(self, session: aiohttp.ClientSession, url: str, secret: str) -> None:
        self.session, self.url, self.secret = session, url, secret
        self.tokens: dict[int, str] = {}

    def token(self, uid: int, name: str) -> str:
        if uid not in self.tokens:
            self.tokens[uid] = mint_token(self.secret, uid, name, f"https://img.example/{uid}.png")
        return self.tokens[uid]

    async def call(
        self, method: str, path: str, uid: int, name: str, body: Any = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token(uid, name)}"}
        async with self.session.request(method, self.url + path, json=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)


async def crowd(api: Api, runs: list[PacketRun], users: int) -> None:
    """Every user grabs, then (if it says yes) opens, every packet in a random order."""
    total = users * len(runs)
    bar = tqdm(total=total, desc="grab + open", unit="op", file=sys.stdout, leave=True)

    async def user(uid: int) -> None:
        name = f"{random.choice(NAMES)}{uid}"
        for run in random.sample(runs, len(runs)):
            await asyncio.sleep(random.random() * 0.05)
            path = f"/v1/red-packets/{run.packet_id}"
            status, grab = await api.call("POST", path + "/grab", uid, name)
            if status == 200 and grab.get("can_open"):
                status, opened = await api.call("POST", path + "/open", uid, name)
                if status == 200:
                    run.wins[uid] = opened["amount"]
                elif status == 410:
                    run.sold_out_answers += 1
            else:
                run.sold_out_answers += 1
            bar.update(1)

    await asyncio.gather(*(user(uid) for uid in range(100, 100 + users)))
    bar.close()


async def report(api: Api, runs: list[PacketRun]) -> bool:
    ok = True
    for run in runs:
        status, page = await api.call(
            "GET", f"/v1/red-packets/{run.packet_id}/records?limit=100", *SENDER
        )
        records = page["records"] if status == 200 else []
        print(
            f"\nred packet {run.packet_id}  {yuan(run.total_amount)} in {run.total_packet} "
            f"shares  “{run.greeting}”"
        )
        shown = sorted(records, key=lambda r: -r["amount"])
        for record in shown[:8]:
            print(f"   {record['nick_name']:<12} {yuan(record['amount']):>9}")
        if len(shown) > 8:
            print(f"   ... and {len(shown) - 8} more")
        _, packet = await api.call("GET", f"/v1/red-packets/{run.packet_id}", *SENDER)
        best = packet.get("luckiest") if isinstance(packet, dict) else None
        if best:  # decided by the ledger when the last share was taken, not computed here
            print(f"   手气最佳 luckiest: {best['nick_name']} with {yuan(best['amount'])}")
        total = sum(r["amount"] for r in records)
        matches = {int(r["uid"]): r["amount"] for r in records} == run.wins
        good = total == run.total_amount and len(records) == run.total_packet and matches
        ok &= good
        mark = "✓" if good else "✗"
        print(
            f"   {mark} {len(records)} shares sum to {yuan(total)} "
            f"(total {yuan(run.total_amount)}); "
            f"records {'match' if matches else 'DO NOT match'} what users were told; "
            f"{run.sold_out_answers} users were told it was gone"
        )
    return ok


async def my_red_packets(api: Api, runs: list[PacketRun]) -> None:
    """One lucky user's 我的红包 for this year, as the app would show it."""
    winners = sorted({uid for run in runs for uid in run.wins})
    if not winners:
        return
    uid = max(winners, key=lambda u: sum(run.wins.get(u, 0) for run in runs))
    want = sum(1 for run in runs if uid in run.wins)
    body: dict = {}
    for _ in range(50):  # history arrives asynchronously, within about a second
        status, body = await api.call("GET", "/v1/me/received", uid, f"user{uid}")
        if status == 200 and body["count"] >= want:
            break
        await asyncio.sleep(0.1)
    if not body.get("records"):
        print(f"\n我的红包 of uid {uid}: not available ({body})")
        return
    print(
        f"\n我的红包 of uid {uid}, {body['year']} (UTC+8): received {body['count']} red packets, "
        f"{yuan(body['total_amount'])} in all, 手气最佳 {body['luckiest_count']} time(s)"
    )
    for record in body["records"][:5]:
        lucky = "  手气最佳" if record["luckiest"] else ""
        print(f"   from {record['sender']['nick_name']:<10} {yuan(record['amount']):>9}{lucky}")


async def demo(url: str, secret: str, users: int, packets: int, ring_file: str | None) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=500)) as session:
        api = Api(session, url, secret)
        runs = []
        plan = (PACKETS * packets)[:packets]
        payments_secret = os.environ.get("REDPACKET_PAYMENTS_SECRET", "")
        if payments_secret:  # a cluster without a dev starting balance: pay in first
            total = sum(amount for amount, _, _ in plan)
            status, answer = await send_topup(
                session,
                url,
                payments_secret,
                uid=SENDER[0],
                amount=total,
                topup_id=f"demo-{secrets.token_hex(8)}",
            )
            if status != 201:
                print(f"top-up failed: {status} {answer[:200]!r}", file=sys.stderr)
                return 1
            print(f"{SENDER[1]} tops up {total / 100:.2f} 元 through the payments webhook")
        print(f"{SENDER[1]} (uid {SENDER[0]}) sends {packets} red packets through {url}")
        for amount, shares, greeting in plan:
            status, body = await api.call(
                "POST",
                "/v1/red-packets",
                *SENDER,
                body={"total_amount": amount, "total_packet": shares, "greeting": greeting},
            )
            if status != 201:
                print(f"create failed: {status} {body}", file=sys.stderr)
                return 1
            runs.append(PacketRun(body["red_packet_id"], amount, shares, greeting))
        print(f"{users} users grab and open them at once:")
        await crowd(api, runs, users)
        ok = await report(api, runs)
        await my_red_packets(api, runs)
    if ring_file:
        nodes = list(RingDoc.load(ring_file).nodes)
        seen = [
            Observed(snowflake_of(r.packet_id), uid, amount)
            for r in runs
            for uid, amount in r.wins.items()
        ]
        result = await check_shards(nodes, seen)
        print(f"\nledger check on every shard: {result.summary()}")
        for violation in result.violations:
            print(f"   VIOLATION {violation}")
        ok &= result.ok
    return 0 if ok else 1


def run_demo(args: argparse.Namespace) -> int:
    async def main() -> int:
        if args.url:
            secret = os.environ.get("REDPACKET_JWT_SECRET", "")
            if not secret:
                raise Unmet("--url needs REDPACKET_JWT_SECRET, the gateway's token secret")
            return await demo(args.url, secret, args.users, args.packets, None)
        with contextlib.suppress(Unmet):
            state = load_state(args.var, args.cluster)
            if state.get("ready") and await answers_ready(
                state["gateway"]["url"], 0, ALL_SHARDS_READY
            ):
                print(f"using the running local cluster {args.cluster!r}")
                return await demo(
                    state["gateway"]["url"],
                    state["jwt_secret"],
                    args.users,
                    args.packets,
                    state["ring_file"],
                )
        cluster = DevCluster(name="demo", shards=args.shards, port=0, var=args.var)
        print(f"starting a local cluster with {args.shards} shards ...")
        try:
            await cluster.up()
            print(cluster.describe())
            return await demo(
                cluster.gateway_url,
                cluster.jwt_secret,
                args.users,
                args.packets,
                str(cluster.ring_file),
            )
        finally:
            await cluster.down()

    return asyncio.run(main())
