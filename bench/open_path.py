"""How many files and function frames of redpacket's own code one open passes through.

``python -m redpacket.bench.open_path``: starts one shard node and one gateway in this process
(real sockets, real Redis and MySQL: ``REDPACKET_REDIS_URL``, ``REDPACKET_MYSQL_URL``, the
database migrated here), creates a packet, opens it once to warm up, then opens it again with
``sys.setprofile`` on. Every Python function entered while that one open runs (gateway, link,
node, Lua call, group commit, reply) is counted if its code lives in this repository (not in
aiohttp, redis-py or the standard library). The node's background loops are slowed right down
so that what is counted is the open.

It prints the distinct files, the distinct functions (the "frames" docs/architecture.md
states), and the total calls into them. docs/architecture.md, "The path of one open", quotes
the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from redpacket.cli.children import free_ports
from redpacket.gateway.app import create_app as create_gateway_app
from redpacket.gateway.auth import mint_token
from redpacket.gateway.settings import GatewaySettings
from redpacket.node.app import create_app as create_node_app
from redpacket.node.migrations.runner import migrate
from redpacket.node.settings import NodeSettings
from redpacket.sharding.ring import NodeSpec, RingDoc

ROOT = str(Path(__file__).resolve().parent.parent)


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def measure(redis_url: str, mysql_url: str, transport: str) -> dict[str, Any]:
    secret, jwt_secret = secrets.token_hex(16), secrets.token_hex(16)
    await migrate(mysql_url)
    node = create_node_app(
        NodeSettings.from_env(
            {
                "REDPACKET_NODE_NAME": "shard-0",
                "REDPACKET_NODE_SECRET": secret,
                "REDPACKET_REDIS_URL": redis_url,
                "REDPACKET_MYSQL_URL": mysql_url,
                "REDPACKET_METRICS_PORT": "0",
                "REDPACKET_RECONCILE_INTERVAL_S": "3600",
                "REDPACKET_SWEEP_INTERVAL_S": "3600",
                "REDPACKET_HISTORY_RELAY_IDLE_S": "3600",
            }
        )
    )
    node_runner, node_url = await _serve(node)
    with tempfile.TemporaryDirectory() as tmp:
        ring_file = Path(tmp) / "ring.json"
        RingDoc(1, (NodeSpec("shard-0", node_url),)).save(ring_file)
        gateway = create_gateway_app(
            GatewaySettings.from_env(
                {
                    "REDPACKET_RING_FILE": str(ring_file),
                    "REDPACKET_JWT_SECRET": jwt_secret,
                    "REDPACKET_NODE_SECRET": secret,
                    "REDPACKET_NODE_TRANSPORT": transport,
                    "REDPACKET_METRICS_PORT": "0",
                    "REDPACKET_RING_POLL_S": "3600",
                    "REDPACKET_DEV_STARTING_BALANCE": "100000",
                    "REDPACKET_DEV_LOGIN": "true",
                }
            )
        )
        gw_runner, gw_url = await _serve(gateway)
        try:
            async with aiohttp.ClientSession() as session:
                sender = {"Authorization": "Bearer " + mint_token(jwt_secret, 1, "s")}
                async with session.post(
                    gw_url + "/v1/red-packets",
                    json={"total_amount": 1000, "total_packet": 10},
                    headers=sender,
                ) as resp:
                    created = await resp.json()
                    assert resp.status == 201, created
                url = f"{gw_url}/v1/red-packets/{created['red_packet_id']}/open"
                calls: Counter[tuple[str, str]] = Counter()

                def profile(frame: Any, event: str, _: Any) -> None:
                    if event == "call":
                        code = frame.f_code
                        name = code.co_filename
                        if name.startswith(ROOT) and "/.venv/" not in name:
                            calls[(name[len(ROOT) + 1 :], code.co_qualname)] += 1

                for uid in (2, 3):  # 2 warms every path up; 3 is measured
                    opener = {"Authorization": "Bearer " + mint_token(jwt_secret, uid, "o")}
                    await asyncio.sleep(0.2)
                    calls.clear()
                    sys.setprofile(profile if uid == 3 else None)
                    try:
                        async with session.post(url, headers=opener) as resp:
                            answer = await resp.json()
                    finally:
                        sys.setprofile(None)
                    assert resp.status == 200, answer
        finally:
            await gw_runner.cleanup()
            await node_runner.cleanup()
    files = sorted({f for f, _ in calls})
    return {
        "transport": transport,
        "files": len(files),
        "functions": len(calls),
        "calls": sum(calls.values()),
        "by_file": {f: sorted(q for g, q in calls if g == f) for f in files},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--mysql-url", required=True, help="a database to use (migrated here)")
    parser.add_argument("--transport", default="link", choices=("link", "http"))
    parser.add_argument("--detail", action="store_true", help="list the functions per file")
    args = parser.parse_args()
    result = asyncio.run(measure(args.redis_url, args.mysql_url, args.transport))
    if not args.detail:
        result.pop("by_file")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
