"""Run one service in the foreground: uvloop, JSON logs, graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from redpacket.core.logs import AccessLogger, setup_logging


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is not built for every platform
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(
    app: web.Application, *, host: str, port: int, service: str, log_level: str, access_log: bool
) -> None:
    setup_logging(service, log_level)
    logging.getLogger("aiohttp.access").setLevel(logging.INFO if access_log else logging.WARNING)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        app,
        host=host,
        port=port,
        loop=loop,
        print=lambda *_: logging.getLogger("redpacket").info(
            "%s listening on %s:%s", service, host, port
        ),
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
        access_log_class=AccessLogger,
        shutdown_timeout=10,
        reuse_port=True,
    )
