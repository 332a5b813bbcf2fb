"""The gateway service: ``create_app(settings)`` and its route table."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from redpacket.core.body import BODY_READ_TIMEOUT_S
from redpacket.core.edge import edge_middleware, json_parser_errors, secure_headers
from redpacket.core.ids import IdGenerator, PublicIds
from redpacket.core.metrics import metrics_server
from redpacket.gateway import handlers
from redpacket.gateway.auth import Authenticator
from redpacket.gateway.finished import FinishedPackets
from redpacket.gateway.handlers import (
    AUTH,
    CONFIRMING,
    CREATE_LIMIT,
    FINISHED,
    IDS,
    NODES,
    OPEN_LIMIT,
    PUBLIC_IDS,
    SETTINGS,
    UNKNOWN_LIMIT,
)
from redpacket.gateway.ratelimit import RateLimiter
from redpacket.gateway.settings import GatewaySettings
from redpacket.gateway.wallet import add_wallet_routes
from redpacket.gateway.webapp import add_page_routes
from redpacket.nodeclient.client import NodeClient
from redpacket.nodeclient.http import HttpTransport
from redpacket.nodeclient.link import Links
from redpacket.nodeclient.ring import RingFile
from redpacket.sharding.ring import RingDoc

OPENAPI_PATH = Path(__file__).with_name("openapi.json")


async def openapi(_: web.Request) -> web.Response:
    return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/json")


# The query parameters each /v1/ route takes; any other is 400 unknown_field (core/edge.py).
QUERY_PARAMS = {
    "/v1/red-packets/{id}/records": frozenset({"limit", "cursor"}),
    "/v1/me/received": frozenset({"year", "limit", "cursor"}),
    "/v1/me/sent": frozenset({"year", "limit", "cursor"}),
    "/v1/me/wallet/transactions": frozenset({"limit", "cursor"}),
}

ROUTES = [
    web.post("/v1/red-packets", handlers.create_packet),
    web.get("/v1/red-packets/{id}", handlers.get_packet),
    web.post("/v1/red-packets/{id}/grab", handlers.grab),
    web.post("/v1/red-packets/{id}/open", handlers.open_packet),
    web.get("/v1/red-packets/{id}/records", handlers.list_records),
    web.get("/v1/me/received", handlers.my_received),
    web.get("/v1/me/sent", handlers.my_sent),
    web.get("/healthz", handlers.healthz),
    web.get("/readyz", handlers.readyz),
    web.get("/readyz/shards", handlers.readyz_shards),
    web.get("/openapi.json", openapi),
]


async def shards_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep-alive connections to every shard node, and the ring, watched for changes."""
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=settings.node_connections, keepalive_timeout=60, ttl_dns_cache=60
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=settings.node_timeout_s),
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
        auto_decompress=False,
    )
    links = None
    if settings.node_transport == "link":
        links = Links(
            session,
            settings.node_secret,
            connections=settings.link_connections,
            max_inflight=settings.link_max_inflight,
            max_message_bytes=settings.link_max_message_bytes,
        )
    ring = RingFile(settings.ring_file, RingDoc.load(settings.ring_file))
    app[NODES] = NodeClient(
        ring,
        http=HttpTransport(session, settings.node_secret),
        links=links,
        timeout_s=settings.node_timeout_s,
        frozen_retry_s=settings.frozen_retry_s,
    )
    ring.start(settings.ring_poll_s)
    # SIGHUP: re-read the ring file now (`redpacket rebalance` says so after publishing it)
    loop = asyncio.get_running_loop()
    hup = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, ring.reload)
        hup = True
    try:
        yield
    finally:
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        await ring.stop()
        if links is not None:
            await links.close()
        await session.close()


async def confirmations_ctx(app: web.Application) -> AsyncIterator[None]:
    """Holds confirmed after their create's 201: finished (briefly) before the gateway stops;
    one cut short is confirmed by the wallet's sweeper."""
    app[CONFIRMING] = set()
    yield
    if app[CONFIRMING]:
        await asyncio.wait(app[CONFIRMING], timeout=2.0)


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(
        middlewares=[edge_middleware("gateway", QUERY_PARAMS)],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[BODY_READ_TIMEOUT_S] = settings.body_read_timeout_s
    app.on_response_prepare.append(secure_headers)
    json_parser_errors()
    app[AUTH] = Authenticator(settings.jwt_secret, settings.token_cache_size)
    app[IDS] = IdGenerator(settings.generator_id)
    app[FINISHED] = FinishedPackets(settings.finished_cache_size, settings.finished_ttl_s)
    app[CREATE_LIMIT] = RateLimiter(settings.create_per_s, settings.create_burst)
    app[OPEN_LIMIT] = RateLimiter(settings.open_per_s, settings.open_burst)
    app[PUBLIC_IDS] = PublicIds(settings.id_key(), settings.legacy_ids_before_ms)
    app[UNKNOWN_LIMIT] = RateLimiter(settings.unknown_ids_per_s, settings.unknown_ids_burst)
    app.cleanup_ctx.append(metrics_server(settings.host, settings.metrics_port))
    app.cleanup_ctx.append(shards_ctx)
    app.cleanup_ctx.append(confirmations_ctx)  # after shards_ctx: cleaned up before it
    app.add_routes(ROUTES)
    add_wallet_routes(app, settings.payments_secret)  # the wallet (gateway/wallet.py)
    add_page_routes(app, settings.dev_login)  # /app/, not part of the API (openapi.json)
    return app
