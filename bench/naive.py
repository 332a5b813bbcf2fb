"""The naive peer: the one-process design a reader would write first, as a reference.

One aiohttp process on uvloop, served by the same ``serve()`` as the gateway and the nodes.
Every request verifies its token with PyJWT (no cache). An open runs one EVALSHA of a
simple claim script (``naive_claim.lua``) and then one MySQL transaction on the same
server as the ledgers: a guarded ``UPDATE`` of the packet and the ``INSERT`` of the record,
``COMMIT``, awaited before the ``200``, so an answered open is durable, as in the cluster.
A grab reads the packet and the user's claim from Redis; a create inserts the packet in
MySQL (committed) and then loads it into Redis. It speaks the public API's paths and the
fields the load generator reads, so the phase 1 load generator drives it unchanged.

``python -m redpacket.bench.naive --port P --redis URL --mysql URL --database NAME``
(the token secret from ``REDPACKET_JWT_SECRET``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomysql
import jwt
import orjson
import redis.asyncio as aioredis
from aiohttp import web

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS naive_packets (
        id BIGINT PRIMARY KEY, sender BIGINT NOT NULL, total_amount BIGINT NOT NULL,
        total_count INT NOT NULL, remaining_amount BIGINT NOT NULL, remaining_count INT NOT NULL,
        created_at DATETIME(3) NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS naive_records (
        packet_id BIGINT NOT NULL, uid BIGINT NOT NULL, amount BIGINT NOT NULL,
        opened_at DATETIME(3) NOT NULL, PRIMARY KEY (packet_id, uid))""",
)
PREFIX = "bench:naive"  # outside the nodes' rp: namespace
SOLD_OUT = orjson.dumps({"error": {"code": "sold_out", "message": "sold out"}})

SECRET: web.AppKey[str] = web.AppKey("secret", str)
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis", aioredis.Redis)
POOL: web.AppKey[aiomysql.Pool] = web.AppKey("pool", aiomysql.Pool)
CLAIM_SHA: web.AppKey[str] = web.AppKey("claim_sha", str)
IDS: web.AppKey[itertools.count] = web.AppKey("ids", itertools.count)


def _uid(request: web.Request) -> int:
    header = request.headers.get("Authorization", "")
    try:
        claims = jwt.decode(header[7:], request.app[SECRET], algorithms=["HS256"])
        return int(claims["sub"])
    except (jwt.PyJWTError, KeyError, ValueError):
        raise web.HTTPUnauthorized(text='{"error":{"code":"unauthorized"}}') from None


def _keys(packet_id: str) -> tuple[str, str]:
    return f"{PREFIX}:{{{packet_id}}}:info", f"{PREFIX}:{{{packet_id}}}:claims"


async def create(request: web.Request) -> web.Response:
    uid = _uid(request)
    body = orjson.loads(await request.read())
    amount, count = int(body["total_amount"]), int(body["total_packet"])
    packet_id = next(request.app[IDS])
    async with request.app[POOL].acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO naive_packets VALUES (%s, %s, %s, %s, %s, %s, NOW(3))",
            (packet_id, uid, amount, count, amount, count),
        )
        await conn.commit()
    info, _ = _keys(str(packet_id))
    await request.app[REDIS].hset(
        info, mapping={"remaining_amount": amount, "remaining_count": count}
    )
    return web.json_response({"red_packet_id": str(packet_id)}, status=201, dumps=_dumps)


async def grab(request: web.Request) -> web.Response:
    uid = _uid(request)
    info, claims = _keys(request.match_info["id"])
    pipe = request.app[REDIS].pipeline(transaction=False)
    pipe.hget(info, "remaining_count").hexists(claims, str(uid))
    count, claimed = await pipe.execute()
    can_open = bool(claimed) or int(count or 0) > 0
    return web.Response(body=orjson.dumps({"can_open": can_open}), content_type="application/json")


async def open_(request: web.Request) -> web.Response:
    uid = _uid(request)
    packet_id = request.match_info["id"]
    outcome, amount = await request.app[REDIS].evalsha(
        request.app[CLAIM_SHA], 2, *_keys(packet_id), uid, random.getrandbits(31)
    )
    if outcome == 0:
        return web.Response(body=SOLD_OUT, status=410, content_type="application/json")
    if outcome == 1:  # durable before the answer: one transaction, awaited
        async with request.app[POOL].acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "UPDATE naive_packets SET remaining_amount = remaining_amount - %s, "
                "remaining_count = remaining_count - 1 "
                "WHERE id = %s AND remaining_count > 0 AND remaining_amount >= %s",
                (amount, packet_id, amount),
            )
            if cur.rowcount != 1:
                await conn.rollback()
                raise web.HTTPConflict(text='{"error":{"code":"conflict"}}')
            await cur.execute(
                "INSERT INTO naive_records VALUES (%s, %s, %s, NOW(3))", (packet_id, uid, amount)
            )
            await conn.commit()
    answer = {"amount": amount, "replayed": outcome == 2}
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def create_app(secret: str, redis_url: str, mysql_url: str, database: str) -> web.Application:
    from redpacket.node.ledger import parse_mysql_url

    app = web.Application()
    app[SECRET] = secret
    app[IDS] = itertools.count(int(time.time() * 1000) << 20)

    async def stores(app: web.Application) -> AsyncIterator[None]:
        server = parse_mysql_url(mysql_url)
        conn = await aiomysql.connect(
            host=server.host, port=server.port, user=server.user, password=server.password
        )
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        conn.close()
        app[POOL] = await aiomysql.create_pool(
            host=server.host, port=server.port, user=server.user, password=server.password,
            db=database, autocommit=False, minsize=8, maxsize=32,
        )  # fmt: skip
        async with app[POOL].acquire() as conn, conn.cursor() as cur:
            for ddl in SCHEMA:
                await cur.execute(ddl)
        # a full pool waits for a free connection (as the node's does), it does not fail
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=64)
        app[REDIS] = aioredis.Redis(connection_pool=pool)
        script = Path(__file__).with_name("naive_claim.lua").read_text("utf-8")
        app[CLAIM_SHA] = await app[REDIS].script_load(script)
        yield
        app[POOL].close()
        await app[POOL].wait_closed()
        await app[REDIS].aclose()

    app.cleanup_ctx.append(stores)
    app.add_routes(
        [
            web.post("/v1/red-packets", create),
            web.post("/v1/red-packets/{id}/grab", grab),
            web.post("/v1/red-packets/{id}/open", open_),
        ]
    )
    return app


def main() -> None:
    from redpacket.cli.serve import serve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--mysql", required=True)
    parser.add_argument("--database", required=True)
    args = parser.parse_args()
    app = create_app(os.environ["REDPACKET_JWT_SECRET"], args.redis, args.mysql, args.database)
    serve(
        app, host=args.host, port=args.port, service="naive", log_level="WARNING", access_log=False
    )


if __name__ == "__main__":
    main()
