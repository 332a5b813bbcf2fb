"""The public edge's one middleware: request id, metrics and JSON errors in one layer.

It also holds the edge rules of issue 19, so every endpoint (and every endpoint added later)
inherits them: :func:`check_request` (415 for a body that is not JSON, the one rule for query
parameters: unknown ones are 400 ``unknown_field`` on every ``/v1/`` route, a route lists
what it takes in ``query_params``), :func:`secure_headers` (``Cache-Control: no-store``,
``nosniff`` and a ``Server`` without versions on every answer) and
:func:`json_parser_errors` (aiohttp's own answers to unparsable HTTP become JSON errors
that echo nothing and log no request text: an over-long header is a bearer token).

The gateway used to stack ``request_id_middleware``, ``metrics_middleware`` and
``error_middleware``; each is a coroutine frame (and a handler wrapper) per request, on
the path every grab and open takes. This does the same three things in one frame, in the
same order: the request id is set before anything runs (so error logs carry it) and goes on
every answer, an error becomes its JSON answer before the metrics see its status, and an
HTTPException below 400 (a redirect) passes through with its status counted. The node keeps
the three separate middlewares (it answers few public requests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web, web_protocol

from redpacket.core.amounts import refuse_unknown_fields
from redpacket.core.errors import JSON, ApiError, exception_response
from redpacket.core.logs import REQUEST_ID_HEADER, request_id, request_id_for
from redpacket.core.metrics import RequestMetrics

log = logging.getLogger("redpacket.http")

API_PREFIX = "/v1/"
SERVER = "redpacket"
_NO_PARAMS: frozenset[str] = frozenset()


def check_request(request: web.Request, query_params: Mapping[str, frozenset[str]]) -> None:
    """The rules every API request meets before its handler runs (see the module)."""
    if not request.path.startswith(API_PREFIX):
        return
    if request.body_exists and request.content_type != JSON:
        raise ApiError(
            415, "unsupported_media_type", "a request body must be JSON (application/json)"
        )
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    refuse_unknown_fields(request.query, query_params.get(canonical, _NO_PARAMS))
    if len(request.query) != len(set(request.query)):
        raise ApiError(400, "invalid_field", "a query parameter is given more than once")


async def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer, errors and the page included."""
    response.headers["Server"] = SERVER
    response.headers["X-Content-Type-Options"] = "nosniff"
    if not request.path.startswith("/app/"):  # the page's static files may be cached
        response.headers.setdefault("Cache-Control", "no-store")


_PARSER_ERRORS = {
    400: ("invalid_request", "the request is not valid HTTP"),
    413: ("payload_too_large", "request body is too large"),
    431: ("headers_too_large", "the request headers are too large"),
}


def _parser_error(
    self: web_protocol.RequestHandler,
    request: web.BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    """aiohttp's ``RequestHandler.handle_error`` (it answers what it cannot parse, before any
    middleware), as a JSON error. Its own version echoes the input in the body and logs it
    with the exception: the start of a bearer token, for an over-long header."""
    log.info("unparsable request from %s: %s", request.remote, type(exc).__name__)
    if request.writer.output_size > 0:
        raise ConnectionError("a response was sent already")
    code, text = _PARSER_ERRORS.get(status, ("internal_error", "internal error"))
    response = web.Response(
        status=status,
        body=orjson.dumps({"error": {"code": code, "message": text}}),
        content_type=JSON,
        headers={
            "Server": SERVER,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )
    response.force_close()
    return response


def json_parser_errors() -> None:
    """Install :func:`_parser_error` for every aiohttp server of this process (idempotent).
    aiohttp offers no hook for these answers; its handler class is the only place."""
    web_protocol.RequestHandler.handle_error = _parser_error  # type: ignore[method-assign]


def edge_middleware(service: str, query_params: Mapping[str, frozenset[str]] | None = None) -> Any:
    metrics = RequestMetrics(service)
    perf = time.perf_counter
    params = dict(query_params or {})

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        started = perf()
        rid = request_id_for(request.headers.get(REQUEST_ID_HEADER, ""))
        token = request_id.set(rid)
        status = 500
        try:
            try:
                check_request(request, params)
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    status = exc.status
                    raise
                response = exception_response(request, exc)
            except Exception as exc:
                response = exception_response(request, exc)
            status = response.status
            response.headers[REQUEST_ID_HEADER] = rid
            return response
        finally:
            metrics.record(request, status, perf() - started)
            request_id.reset(token)

    return middleware
