"""The public edge's one middleware: request id, metrics and JSON errors in one layer.

The gateway used to stack ``request_id_middleware``, ``metrics_middleware`` and
``error_middleware``; each is a coroutine frame (and a handler wrapper) per request, on
the path every grab and open takes. This does the same three things in one frame, in the
same order: the request id is set before anything runs (so error logs carry it) and goes on
every answer, an error becomes its JSON answer before the metrics see its status, and an
HTTPException below 400 (a redirect) passes through with its status counted. The node keeps
the three separate middlewares (it answers few public requests).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from redpacket.core.errors import exception_response
from redpacket.core.logs import REQUEST_ID_HEADER, request_id, request_id_for
from redpacket.core.metrics import RequestMetrics


def edge_middleware(service: str) -> Any:
    metrics = RequestMetrics(service)
    perf = time.perf_counter

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        started = perf()
        rid = request_id_for(request.headers.get(REQUEST_ID_HEADER, ""))
        token = request_id.set(rid)
        status = 500
        try:
            try:
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
