"""``redpacket dead-letters list|retry``: the history events each shard's relay set aside.

Reads each shard's MySQL directly (the ring file lists them, as for ``redpacket check``).
``retry`` puts the letters back in their shard's outbox; the relay delivers them on its
next pass, or sets them aside again if their destination still refuses them.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from redpacket.node import deadletters
from redpacket.node.ledger import connect_one
from redpacket.sharding.ring import NodeSpec, RingDoc


def ring_nodes(args: argparse.Namespace) -> list[NodeSpec]:
    from redpacket.cli.devcluster import load_state

    doc = RingDoc.load(Path(args.ring or load_state(args.var, args.cluster)["ring_file"]))
    return doc.all_nodes()  # every version's shards, and the previous ring's mid-change


async def list_letters(nodes: list[NodeSpec]) -> int:
    total = 0
    for node in nodes:
        conn = await connect_one(node.mysql or "")
        try:
            async with conn.cursor() as cur:
                letters = await deadletters.listing(cur)
        finally:
            conn.close()
        for letter in letters:
            print(
                f"{node.name}\t{letter.id}\t{letter.dead_time:%Y-%m-%dT%H:%M:%S}Z\t"
                f"uid={letter.uid}\t{letter.event}\tpacket={letter.red_packet_id}\t{letter.error}"
            )
        total += len(letters)
    print(f"{total} dead letter(s) on {len(nodes)} shard(s)")
    return total


async def retry_letters(nodes: list[NodeSpec], shard: str | None, ids: list[int] | None) -> int:
    moved = 0
    for node in nodes:
        if shard is not None and node.name != shard:
            continue
        conn = await connect_one(node.mysql or "")
        try:
            await conn.begin()
            async with conn.cursor() as cur:
                moved += await deadletters.retry(cur, ids)
            await conn.commit()
        finally:
            conn.close()
    print(f"{moved} dead letter(s) put back in the outbox")
    return moved


def run_dead_letters(args: argparse.Namespace) -> int:
    nodes = ring_nodes(args)
    if args.dead_command == "list":
        asyncio.run(list_letters(nodes))
        return 0
    if args.id and not args.shard:
        print("redpacket dead-letters retry: --id needs --shard (ids are per shard)")
        return 2
    asyncio.run(retry_letters(nodes, args.shard, args.id or None))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dead = sub.add_parser(
        "dead-letters", help="history events a shard's relay set aside: list or retry them"
    ).add_subparsers(dest="dead_command", required=True)
    for name, text in (
        ("list", "list every shard's dead letters"),
        ("retry", "put dead letters back in their shard's outbox (all, or --shard/--id)"),
    ):
        p = dead.add_parser(name, help=text)
        p.add_argument("--ring", help="ring file (default: the local cluster's)")
        p.add_argument("--cluster", default="dev", help="local cluster name (default: dev)")
        p.add_argument("--var", default="var", help="folder of local clusters (default: ./var)")
        if name == "retry":
            p.add_argument("--shard", help="only this shard (its ring name)")
            p.add_argument("--id", type=int, action="append", help="only this letter (repeat)")
        p.set_defaults(func=run_dead_letters)
