"""Structured JSON logs, and the request id that ties a gateway line to its node line.

The gateway takes ``X-Request-Id`` from the client (or makes one), sends it on to the node,
and both services put it in every log line written while serving that request.
"""

from __future__ import annotations

import contextvars
import logging
import random
import re
import sys
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

REQUEST_ID_HEADER = "X-Request-Id"
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "request_id": getattr(record, "request_id", None) or request_id.get(),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class AccessLogger(AbstractAccessLogger):
    """One JSON line per request (when access logs are on), with the request's id.

    aiohttp writes access logs after the handler returns, outside the request's context, so
    the id is taken from the response header the middleware set.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %.1fms",
            request.method,
            request.path,
            response.status,
            time * 1000,
            extra={"request_id": response.headers.get(REQUEST_ID_HEADER, "-")},
        )


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def request_id_for(incoming: str) -> str:
    """The caller's request id if it is a sane one, else a new one."""
    # A request id only has to be unique enough to find log lines, not unguessable: the
    # CSPRNG (a getrandom syscall per request) cost about 5% of a sold-out rejection's CPU
    # at the gateway (docs/benchmarks.md). `random` is seeded from the OS, reseeded on fork.
    return incoming if _VALID_ID.match(incoming) else f"{random.getrandbits(64):016x}"


@web.middleware
async def request_id_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    rid = request_id_for(request.headers.get(REQUEST_ID_HEADER, ""))
    token = request_id.set(rid)
    try:
        response = await handler(request)
        response.headers[REQUEST_ID_HEADER] = rid
        return response
    finally:
        request_id.reset(token)
