"""The node's calls, independent of how they arrive: over the link or over HTTP.

A call is one entry of the call table (``handlers.CALLS``): ``(method, path pattern,
function)``, the function an ``async def f(call: Call) -> Reply``. The frame server
(``link.py``) and the HTTP routes (``http_routes``) both serve every entry, so a new node
call is one function and one table line. Errors are raised as :class:`ApiError` and take
the same JSON shape on both transports.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from redpacket.core.errors import ApiError, parse_json_object, unavailable
from redpacket.core.logs import request_id
from redpacket.core.metrics import HTTP_LATENCY, HTTP_REQUESTS
from redpacket.node.history import HISTORY, UserHistory
from redpacket.node.ledger import LedgerUnavailable
from redpacket.node.settings import NodeSettings
from redpacket.node.shard import Shard

log = logging.getLogger("redpacket.node")
access_log = logging.getLogger("aiohttp.access")

SHARD = web.AppKey("shard", Shard)
SETTINGS = web.AppKey("settings", NodeSettings)
JSON = "application/json"
STORE_ERRORS = (RedisConnectionError, RedisTimeoutError, LedgerUnavailable)


@dataclass(slots=True)
class Call:
    """One call's inputs: the shard, its users' history, path parameters, query and the raw
    JSON body."""

    shard: Shard
    settings: NodeSettings
    history: UserHistory
    params: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        """The body as a JSON object, or 400 ``invalid_json``."""
        return parse_json_object(self.body)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    retry_after: str | None = None


def reply(data: Any, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(data))


def error_reply(err: ApiError) -> Reply:
    return Reply(err.status, orjson.dumps(err.body()), err.headers.get("Retry-After"))


Handler = Callable[[Call], Awaitable[Reply]]
CallEntry = tuple[str, str, Handler]


async def run_call(handler: Handler, call: Call, where: str) -> Reply:
    """A call's reply, with a store that is down as 503 and a bug as 500, never a trace."""
    try:
        return await handler(call)
    except ApiError as err:
        return error_reply(err)
    except STORE_ERRORS as exc:
        log.warning("store unavailable on %s: %s", where, exc)
        return error_reply(unavailable("a store of this shard is unavailable; retry"))
    except Exception:
        log.exception("unhandled error on %s", where)
        return error_reply(ApiError(500, "internal_error", "internal error"))


class CallTable:
    """Finds the entry of a (method, concrete path): the link's router."""

    def __init__(self, entries: Sequence[CallEntry]) -> None:
        self._by_shape: dict[tuple[str, int], list[tuple[re.Pattern[str], str, Handler]]] = {}
        for method, pattern, handler in entries:
            parts = re.split(r"\{(\w+)\}", pattern)  # literal, name, literal, ...
            regex = re.compile(
                "^"
                + "".join(
                    re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)"
                    for i, part in enumerate(parts)
                )
                + "$"
            )
            shape = (method, pattern.count("/"))
            self._by_shape.setdefault(shape, []).append((regex, pattern, handler))
        # counters per (route, method, status), looked up once (see core/metrics.py)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def match(self, method: str, path: str) -> tuple[Handler, str, dict[str, str]] | None:
        for regex, pattern, handler in self._by_shape.get((method, path.count("/")), ()):
            found = regex.match(path)
            if found is not None:
                return handler, pattern, found.groupdict()
        return None

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (
                HTTP_REQUESTS.labels("node", route, method, str(status)),
                HTTP_LATENCY.labels("node", route),
            )
        pair[0].inc()
        pair[1].observe(seconds)


def http_routes(entries: Sequence[CallEntry]) -> list[web.RouteDef]:
    """The same calls as aiohttp routes (tests, tools, and the gateway's HTTP fallback)."""

    def adapt(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read() if request.can_read_body else b""
            app = request.app
            call = Call(
                app[SHARD], app[SETTINGS], app[HISTORY], request.match_info, request.query, body
            )
            answer = await run_call(handler, call, request.path)
            headers = {"Retry-After": answer.retry_after} if answer.retry_after else None
            return web.Response(
                body=answer.body, status=answer.status, content_type=JSON, headers=headers
            )

        handle.__name__ = handler.__name__
        return handle

    return [web.route(method, pattern, adapt(handler)) for method, pattern, handler in entries]


def log_access(method: str, path: str, status: int, started: float) -> None:
    """The link's access line, like aiohttp's for HTTP (only when access logs are on)."""
    access_log.info(
        "LINK %s %s %s %.1fms",
        method,
        path,
        status,
        (time.perf_counter() - started) * 1000,
        extra={"request_id": request_id.get()},
    )
