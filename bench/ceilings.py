"""The ceilings a run is compared with, measured on the same machine in the same run.

- Lua: ``redis-benchmark`` sends ``EVALSHA`` of the project's own ``node/open.lua`` to a
  shard's redis-server. A test packet with a billion shares is loaded first (with
  ``node/load.lua``, into keys of its own outside the ``rp:`` namespace the nodes use) and
  the uid argument is ``__rand_int__`` drawn from a billion values, so almost every call
  takes the new-share path: it reads the packet, checks the uid has no claim, computes the
  amount and writes the three hashes. The share of calls that took a new share is reported.
- Naive peer: the one-process design (``bench/naive.py``), driven by phase 1's load
  generator right after phase 1: the reference the cluster's committed opens are compared
  with (``naive_ratio``).
- Trivial handler: one aiohttp process on uvloop answering grab and open with a constant
  tiny JSON (``bench/trivial.py``), driven by the same load generator as the real phases.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import redis.asyncio as aioredis

from redpacket.core.env import REDIS_PASSWORD_FILE, password_from_file
from redpacket.node.counters import load_args
from redpacket.node.packet import PacketRow

# Not under rp:{...}: a node's reconciler scans rp:{*}:pending and must never see these keys.
CEILING_TAG = "bench:{lua-ceiling}"
CEILING_KEYS = (f"{CEILING_TAG}:info", f"{CEILING_TAG}:claims", f"{CEILING_TAG}:pending")
HUGE_SHARES = 1_000_000_000
UID_SPACE = 1_000_000_000


def _script(name: str) -> str:
    from redpacket.node import counters

    return Path(counters.__file__).with_name(name).read_text("utf-8")


async def _redis_benchmark(argv: list[str]) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {err.decode(errors='replace')[-500:]}")
    lines = out.decode().strip().splitlines()
    header = next(csv.reader(io.StringIO(lines[0])))
    # the test name (the command) may hold quotes and commas: split the numbers off the end
    values = lines[-1].rsplit(",", len(header) - 1)[1:]
    return {name: float(value.strip('"')) for name, value in zip(header[1:], values, strict=True)}


async def lua_ceiling(redis_url: str, duration_s: float, clients: int = 50) -> dict[str, Any]:
    """Rate of open.lua taking new shares, straight against redis-server (no node, no HTTP)."""
    if shutil.which("redis-benchmark") is None:
        return {"per_s": None, "skipped": "redis-benchmark is not installed"}
    parts = urlsplit(redis_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    # the password as the nodes read it: in the URL, or in REDPACKET_REDIS_PASSWORD_FILE
    password = (
        unquote(parts.password) if parts.password else password_from_file(REDIS_PASSWORD_FILE)
    )
    auth = ["-a", password] if password else []
    client = aioredis.Redis(host=host, port=port, password=password, decode_responses=True)
    try:
        open_sha = await client.script_load(_script("open.lua"))
        load_sha = await client.script_load(_script("load.lua"))
        now_ms = int(time.time() * 1000)
        await client.delete(*CEILING_KEYS)
        # a lucky packet that cannot run out or expire during the run, loaded by load.lua
        # with the arguments the node gives it (node/counters.py load_args)
        amount, hour = 1000 * HUGE_SHARES, now_ms + 3_600_000
        ceiling = PacketRow(
            red_packet_id=1, uid=1, total_amount=amount, total_packet=HUGE_SHARES,
            greeting="", create_token="bench-ceiling", kind="lucky", amount_each=None,
            receiver_uid=None, remaining_amount=amount, remaining_packet=HUGE_SHARES,
            status="active", create_time_ms=now_ms, expire_time_ms=hour,
        )  # fmt: skip
        args = load_args(ceiling, {}, replace=False, drop_at_ms=hour)
        await client.evalsha(load_sha, 3, *CEILING_KEYS, *args)
        details = orjson.dumps([now_ms, "bench-user", "https://img.example/bench.png"]).decode()
        command = [
            "EVALSHA", open_sha, "3", *CEILING_KEYS,
            "__rand_int__", "1234567", str(now_ms), details,
        ]  # fmt: skip

        def argv(n: int) -> list[str]:
            return [
                "redis-benchmark", "-h", host, "-p", str(port), "-c", str(clients),
                "-n", str(n), "-r", str(UID_SPACE), *auth, "--csv", *command,
            ]  # fmt: skip

        warm = await _redis_benchmark(argv(20_000))  # warm-up, and the size of the real run
        calls_before = await client.hlen(CEILING_KEYS[1])
        n = max(20_000, int(warm["rps"] * duration_s))
        result = await _redis_benchmark(argv(n))
        new_shares = await client.hlen(CEILING_KEYS[1]) - calls_before
        return {
            "per_s": round(result["rps"], 1),
            "p50_ms": result.get("p50_latency_ms"),
            "p99_ms": result.get("p99_latency_ms"),
            "calls": n,
            "new_share_fraction": round(new_shares / n, 4),
            "clients": clients,
            "pipeline": 1,
            "redis": f"{host}:{port}",
            "what": (
                f"redis-benchmark -c {clients} -P 1 EVALSHA open.lua on a packet with "
                f"{HUGE_SHARES:,} shares, uid = __rand_int__ of {UID_SPACE:,}"
            ),
        }
    finally:
        with contextlib.suppress(Exception):
            await client.unlink(*CEILING_KEYS)
        await client.aclose()


async def start_trivial(port: int) -> asyncio.subprocess.Process:
    return await start_server("redpacket.bench.trivial", port)


async def start_naive(
    port: int, *, redis_url: str, mysql_url: str, database: str, jwt_secret: str
) -> asyncio.subprocess.Process:
    """The naive peer (bench/naive.py) on the bench's own stores, in a database of its own."""
    extra = ["--redis", redis_url, "--mysql", mysql_url, "--database", database]
    env = {**os.environ, "REDPACKET_JWT_SECRET": jwt_secret}
    return await start_server("redpacket.bench.naive", port, *extra, env=env)


async def start_server(
    module: str, port: int, *extra: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """``python -m module --port port ...``, returned once it accepts connections."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--port", str(port), *extra,
        stdin=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc
        except OSError:
            if proc.returncode is not None or time.monotonic() > deadline:
                await stop_process(proc)
                raise RuntimeError(f"{module} did not start") from None
            await asyncio.sleep(0.05)


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
