"""The internal hop alone: CPU per call on each side, today's HTTP hop against the link.

``python -m redpacket.bench.transport [--inflight 256] [--seconds 5]`` starts a server
process with one trivial call (``POST /internal/v1/packets/{id}/grab`` answering a small
JSON), then drives it from this process with ``--inflight`` calls always outstanding, once
per transport: ``http`` (one aiohttp request per call on pooled keep-alive connections,
the gateway's old hop) and ``link`` (nodeclient/link.py against node/link.py: msgpack frames
on 2 WebSockets, frames of one tick in one write). It prints calls/s and CPU µs per call
on the client and on the server side, measured from /proc, and ``--json`` writes them.
No database is involved: this isolates what the hop itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import sys
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from redpacket.bench.procstats import cpu_s
from redpacket.cli.children import free_ports
from redpacket.cli.serve import new_event_loop
from redpacket.core.frames import LINK_PATH
from redpacket.node.app import node_auth_middleware
from redpacket.node.calls import SETTINGS, SHARD, Call, CallTable, Reply, http_routes, reply
from redpacket.node.history import HISTORY
from redpacket.node.link import LinkServer
from redpacket.nodeclient.link import NodeLink
from redpacket.nodeclient.wire import NODE_SECRET_HEADER

SECRET = "transport-bench-secret"


async def _grab(call: Call) -> Reply:
    call.args.get("uid")
    return reply({"can_open": True})


def _serve(port: int) -> None:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    table = CallTable({"grab": _grab})
    link = LinkServer(
        table,
        max_inflight=1024,
        max_message_bytes=4 << 20,
        max_body_bytes=16 * 1024,
        access_log=False,
    )
    app = web.Application(middlewares=[node_auth_middleware(SECRET)])
    app[SHARD] = None  # type: ignore[assignment]  # the trivial call needs no shard
    app[SETTINGS] = None  # type: ignore[assignment]
    app[HISTORY] = None  # type: ignore[assignment]
    app.router.add_get(LINK_PATH, link.handle)
    app.add_routes(http_routes(table))
    web.run_app(app, host="127.0.0.1", port=port, loop=loop, print=None, access_log=None)


async def _drive(
    kind: str, url: str, inflight: int, seconds: float, server_cpu: Any
) -> dict[str, float]:
    body = orjson.dumps({"uid": "12345"})
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=inflight)
    async with aiohttp.ClientSession(connector=connector) as session:
        link = NodeLink(
            "bench",
            url,
            session,
            SECRET,
            connections=2,
            max_inflight=512,
            max_message_bytes=4 << 20,
        )
        headers = {NODE_SECRET_HEADER: SECRET, "Content-Type": "application/json"}

        async def one(i: int) -> None:
            path = f"/internal/v1/packets/{i}/grab"
            if kind == "link":
                status, _, _ = await link.call(
                    "grab", {"id": i, "uid": "12345"}, rid="b", timeout_s=5
                )
                assert status == 200
            else:
                async with session.post(url + path, data=body, headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 200

        done = 0
        stop_at = 0.0

        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while time.monotonic() < stop_at:
                await one(i)
                done += 1
                i += inflight

        stop_at = time.monotonic() + 1.0  # warm up: connections made, code paths hot
        await asyncio.gather(*(worker(w) for w in range(inflight)))
        done = 0
        started, cpu0, server0 = time.monotonic(), time.process_time(), server_cpu()
        stop_at = started + seconds
        await asyncio.gather(*(worker(w) for w in range(inflight)))
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu0
        server = server_cpu() - server0
        await link.close()
    return {"calls": done, "elapsed_s": elapsed, "client_cpu_s": cpu, "server_cpu_s": server}


def measure(kind: str, inflight: int, seconds: float) -> dict[str, Any]:
    port = free_ports(1)[0]
    proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(port,), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        loop = new_event_loop()
        try:
            result = loop.run_until_complete(
                _drive(kind, url, inflight, seconds, lambda: cpu_s(proc.pid) or 0.0)
            )
        finally:
            loop.close()
    finally:
        proc.terminate()
        proc.join(10)
    calls = result["calls"]
    return {
        "transport": kind,
        "inflight": inflight,
        "calls_per_s": calls / result["elapsed_s"],
        "client_us_per_call": result["client_cpu_s"] / calls * 1e6,
        "server_us_per_call": result["server_cpu_s"] / calls * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inflight", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--transports", default="http,link")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'transport':<10}{'calls/s':>10}{'client µs':>11}{'server µs':>11}  (CPU per call)")
    for kind in args.transports.split(","):
        row = measure(kind, args.inflight, args.seconds)
        rows.append(row)
        print(
            f"{kind:<10}{row['calls_per_s']:>10.0f}{row['client_us_per_call']:>11.1f}"
            f"{row['server_us_per_call']:>11.1f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "wb") as out:
            out.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
