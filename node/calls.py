"""The node's calls, by name, independent of how they arrive: over the link or over HTTP.

The call table (``handlers.CALLS``) maps each call's name (``nodeclient/wire.py``) to an
``async def f(call: Call) -> Reply``. The link (``link.py``) finds a call by its name and
hands it the frame's map of arguments; the HTTP routes (``http_routes``: tools, debugging,
``REDPACKET_NODE_TRANSPORT=http``) and the link frames of 0.1.0 gateways (method and path)
are adapters that build the same map from the path's parameters and the query (GET) or the
JSON body (POST). A new node call is one function, one table line and one route.

This is also the one place where a store that is down becomes 503 (:data:`STORE_ERRORS`,
used by :func:`run_call` and, for the handoff routes outside the table, by node/app.py).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from redpacket.core.errors import ApiError, bad_request, parse_json_object, unavailable
from redpacket.core.logs import request_id
from redpacket.core.metrics import HTTP_LATENCY, HTTP_REQUESTS
from redpacket.node.history import HISTORY, UserHistory
from redpacket.node.ledger import LedgerUnavailable, ValueRefused
from redpacket.node.settings import NodeSettings
from redpacket.node.shard import Shard
from redpacket.nodeclient.client import Answer
from redpacket.nodeclient.wire import ROUTES, Route

log = logging.getLogger("redpacket.node")
access_log = logging.getLogger("aiohttp.access")

SHARD = web.AppKey("shard", Shard)
SETTINGS = web.AppKey("settings", NodeSettings)
JSON = "application/json"
# A store that is down, or a MySQL connection that failed (lost, lock wait, deadlock: the
# ledger raises every such failure as LedgerUnavailable, never the driver's error): the
# caller may retry, so 503, never a 500 (which a relay reads as "this batch is refused").
STORE_ERRORS = (RedisConnectionError, RedisTimeoutError, LedgerUnavailable)


def store_unavailable(where: str, exc: BaseException) -> ApiError:
    log.warning("store unavailable on %s: %s: %s", where, type(exc).__name__, exc)
    return unavailable("a store of this shard is unavailable; retry")


@dataclass(slots=True)
class Call:
    """One call's inputs: the shard, its users' history, and the call's arguments (path
    parameters, query or body fields, as one map)."""

    shard: Shard
    settings: NodeSettings
    history: UserHistory
    args: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    data: Any  # the answer's value: JSON over HTTP, a msgpack value on the link
    retry_after: str | None = None

    def body(self) -> bytes:
        return orjson.dumps(self.data)


def reply(data: Any, status: int = 200) -> Reply:
    return Reply(status, data)


def error_reply(err: ApiError) -> Reply:
    return Reply(err.status, err.body(), err.headers.get("Retry-After"))


Handler = Callable[[Call], Awaitable[Reply]]


async def run_call(handler: Handler, call: Call, where: str) -> Reply:
    """A call's reply, with a store that is down as 503 and a bug as 500, never a trace."""
    try:
        return await handler(call)
    except ApiError as err:
        return error_reply(err)
    except STORE_ERRORS as exc:
        return error_reply(store_unavailable(where, exc))
    except ValueRefused as exc:  # a value that does not fit its column: the same every time
        log.warning("the ledger refused a value on %s: %s", where, exc)
        return error_reply(ApiError(422, "value_refused", "the ledger refused a value"))
    except Exception:
        log.exception("unhandled error on %s", where)
        return error_reply(ApiError(500, "internal_error", "internal error"))


def args_of(
    route: Route, params: Mapping[str, str], query: Mapping[str, str], body: bytes
) -> dict[str, Any]:
    """The arguments of a call that came as an HTTP request (or a link frame of 0.1.0)."""
    args: dict[str, Any] = (
        dict(query) if route.method == "GET" else parse_json_object(body or b"{}")
    )
    for name, value in params.items():
        if name in args:
            raise bad_request("unknown_field", f"{name} is given by the path")
        args[name] = value
    return args


class CallTable:
    """The calls by name (the link's dispatch), and by method and path (HTTP, 0.1.0 links)."""

    def __init__(
        self, handlers: Mapping[str, Handler], routes: Mapping[str, Route] = ROUTES
    ) -> None:
        self.handlers = dict(handlers)
        self.routes = {name: routes[name] for name in handlers}
        self._by_shape: dict[tuple[str, int], list[tuple[re.Pattern[str], str]]] = {}
        for name, route in self.routes.items():
            parts = re.split(r"\{(\w+)\}", route.pattern)  # literal, name, literal, ...
            regex = re.compile(
                "^"
                + "".join(
                    re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)"
                    for i, part in enumerate(parts)
                )
                + "$"
            )
            shape = (route.method, route.pattern.count("/"))
            self._by_shape.setdefault(shape, []).append((regex, name))
        # counters per (route, method, status), looked up once (see core/metrics.py)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        """``(name, path parameters)`` of a call that came by path."""
        for regex, name in self._by_shape.get((method, path.count("/")), ()):
            found = regex.match(path)
            if found is not None:
                return name, found.groupdict()
        return None

    def observe(self, name: str, status: int, seconds: float) -> None:
        route = self.routes.get(name)
        key = (route.pattern if route else "unmatched", route.method if route else "-", status)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (
                HTTP_REQUESTS.labels("node", key[0], key[1], str(status)),
                HTTP_LATENCY.labels("node", key[0]),
            )
        pair[0].inc()
        pair[1].observe(seconds)

    def local(self, template: Call) -> Callable[[str, dict[str, Any]], Awaitable[Answer]]:
        """This node's calls to itself (its relay and sweeper), through the same table."""

        async def call(name: str, args: dict[str, Any]) -> Answer:
            made = Call(template.shard, template.settings, template.history, args)
            answer = await run_call(self.handlers[name], made, name)
            return Answer.decode(answer.status, answer.data, answer.retry_after)

        return call


def http_routes(table: CallTable) -> list[web.RouteDef]:
    """The same calls as aiohttp routes (tests, tools, and the gateway's HTTP transport)."""

    def adapt(name: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        route = table.routes[name]

        async def handle(request: web.Request) -> web.Response:
            body = await request.read() if request.can_read_body else b""
            app = request.app
            try:
                args = args_of(route, request.match_info, request.query, body)
            except ApiError as err:
                answer = error_reply(err)
            else:
                call = Call(app[SHARD], app[SETTINGS], app[HISTORY], args)
                answer = await run_call(handler, call, request.path)
            headers = {"Retry-After": answer.retry_after} if answer.retry_after else None
            return web.Response(
                body=answer.body(), status=answer.status, content_type=JSON, headers=headers
            )

        handle.__name__ = handler.__name__
        return handle

    return [
        web.route(table.routes[name].method, table.routes[name].pattern, adapt(name, handler))
        for name, handler in table.handlers.items()
    ]


def log_access(where: str, status: int, started: float) -> None:
    """The link's access line, like aiohttp's for HTTP (only when access logs are on):
    ``where`` is the call's route and name."""
    access_log.info(
        "LINK %s %s %.1fms",
        where,
        status,
        (time.perf_counter() - started) * 1000,
        extra={"request_id": request_id.get()},
    )
