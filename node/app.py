"""The shard node service: ``create_app(settings)`` and its route table.

A node owns one Redis shard (live counters, Lua scripts) and one MySQL shard (the ledger).
Only the gateway may call it: every ``/internal/`` route needs the shared node secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pymysql
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from redpacket.core import clock
from redpacket.core.edge import json_parser_errors, secure_headers
from redpacket.core.errors import ApiError, error_middleware
from redpacket.core.frames import LINK_PATH
from redpacket.core.logs import request_id_middleware
from redpacket.core.metrics import metrics_middleware, metrics_server
from redpacket.node import handoff
from redpacket.node.calls import STORE_ERRORS, http_routes, store_unavailable
from redpacket.node.counters import Counters, connect_redis
from redpacket.node.handlers import CALLS, SETTINGS, SHARD
from redpacket.node.handoff import wallets as wallet_moves
from redpacket.node.ledger import Ledger, LedgerUnavailable
from redpacket.node.link import LinkServer
from redpacket.node.migrations.runner import SchemaMismatch, check_database
from redpacket.node.reconciler import Reconciler
from redpacket.node.relay import relay_ctx
from redpacket.node.rowshape import MAX_JSON_BYTES
from redpacket.node.settings import NodeSettings
from redpacket.node.shard import Shard
from redpacket.node.sweeper import Sweeper
from redpacket.nodeclient.wire import NODE_SECRET_HEADER

log = logging.getLogger("redpacket.node")

T = TypeVar("T")
SWEEPER = web.AppKey("sweeper", Sweeper)  # tests drive a sweep directly

ROUTES = [
    *http_routes(CALLS),  # the gateway's calls (node/handlers.py), also served over the link
    *handoff.ROUTES,  # /internal/v1/handoff/...: rebalancing (node/handoff/)
    *wallet_moves.ROUTES,  # /internal/v1/handoff/wallets: users' wallets
]


@web.middleware
async def store_errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The handoff routes (outside the call table, which maps its own): a store that is down
    is a 503 the caller may retry, by the same rule (node/calls.py ``STORE_ERRORS``)."""
    try:
        return await handler(request)
    except STORE_ERRORS as exc:
        raise store_unavailable(request.path, exc) from None


def node_auth_middleware(secret: str) -> Any:
    expected = secret.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/internal/"):
            given = request.headers.get(NODE_SECRET_HEADER, "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(
                    401, "unauthenticated", "shard nodes accept calls from the gateway only"
                )
        return await handler(request)

    return middleware


async def _patiently(what: str, connect: Callable[[], Awaitable[T]], wait_s: float) -> T:
    """Retry reaching a store at start: in Kubernetes the stores may come up after the node,
    and waiting here is quicker than a crash loop's growing back-off."""
    deadline = time.monotonic() + wait_s
    delay = 0.2
    while True:
        try:
            return await connect()
        except (
            OSError,
            RedisConnectionError,
            RedisTimeoutError,
            LedgerUnavailable,
            pymysql.err.OperationalError,
        ) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s is not reachable yet (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def stores_ctx(app: web.Application) -> AsyncIterator[None]:
    """Redis and MySQL of this shard: schema checked, scripts loaded, group commit running.

    The node never changes the schema: `redpacket db migrate` (a Job before the nodes roll)
    does, and a node whose code does not fit its database's schema version refuses to start.
    """
    settings = app[SETTINGS]
    try:
        state = await _patiently(
            "MySQL",
            # a bound longer than one query's: with latency on the MySQL link (chaos), a node
            # that timed out here every time would stay down after MySQL was fine again
            lambda: check_database(settings.mysql_url, timeout_s=settings.startup_wait_s / 4),
            settings.startup_wait_s,
        )
    except SchemaMismatch as exc:
        log.error("not starting: %s", exc)
        raise
    log.info("database %s at schema version %d", state.database, state.version)
    ledger = await _patiently(
        "MySQL",
        lambda: Ledger.connect(
            settings.mysql_url, settings.mysql_pool_size, timeout_s=settings.mysql_timeout_s
        ),
        settings.startup_wait_s,
    )
    redis_client = connect_redis(
        settings.redis_url, settings.redis_cluster, settings.redis_pool_size
    )
    try:
        counters = Counters(redis_client, settings.redis_max_pipelines)
        await _patiently("Redis", counters.register_scripts, settings.startup_wait_s)
        shard = Shard(settings, counters, ledger)
        shard.committer.start()
        app[SHARD] = shard
        app[handoff.HANDOFF] = await handoff.start(shard, settings.name)
        yield
        await shard.committer.stop()
    finally:
        await redis_client.aclose()
        await ledger.close()


async def background_ctx(app: web.Application) -> AsyncIterator[None]:
    """The reconciler, the refund sweeper and the open latency's last seconds (read by a
    rebalance as its baseline), for as long as the node runs."""
    settings = app[SETTINGS]
    shard = app[SHARD]
    reconciler = Reconciler(shard, settings.reconcile_interval_s)
    sweeper = Sweeper(shard, reconciler, settings.sweep_interval_s, settings.refund_grace_s)
    app[SWEEPER] = sweeper
    tasks = [
        asyncio.create_task(reconciler.run()),
        asyncio.create_task(sweeper.run()),
        asyncio.create_task(app[handoff.HANDOFF].opens.run()),
    ]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_app(settings: NodeSettings) -> web.Application:
    app = web.Application(
        middlewares=[
            request_id_middleware,
            metrics_middleware("node"),
            error_middleware,
            node_auth_middleware(settings.node_secret),
            store_errors_middleware,
        ],
        # history batches (relay, rebalance) are larger than any gateway call, and a users'
        # move carries at least one whole user, however many rows (node/rowshape.py); the
        # secret is checked before a handler reads a body
        client_max_size=max(settings.max_body_bytes, MAX_JSON_BYTES),
    )
    app[SETTINGS] = settings
    clock.use_offset_file(settings.clock_offset_file)
    app.on_response_prepare.append(secure_headers)  # no versions in Server (issue 19)
    json_parser_errors()
    link = LinkServer(
        CALLS,
        max_inflight=settings.link_max_inflight,
        max_message_bytes=settings.link_max_message_bytes,
        max_body_bytes=settings.max_body_bytes,
        access_log=settings.access_log,
    )
    app.cleanup_ctx.append(metrics_server(settings.host, settings.metrics_port))
    app.cleanup_ctx.append(stores_ctx)
    app.cleanup_ctx.append(background_ctx)
    app.cleanup_ctx.append(relay_ctx)  # users' history and the outbox relay (node/relay.py)
    app.on_shutdown.append(lambda _: link.drain(settings.drain_s))
    app.add_routes([web.get(LINK_PATH, link.handle), *ROUTES])
    return app
