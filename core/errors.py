"""One error shape for every HTTP answer of the project: ``{"error": {"code", "message"}}``.

Handlers raise :class:`ApiError`; :func:`error_middleware` turns it (and aiohttp's own
HTTP exceptions, and anything unexpected) into that JSON shape, so no stack trace and no
HTML page ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger("redpacket.http")

JSON = "application/json"


class ApiError(Exception):
    """A failure the client should see, with its HTTP status and a stable snake_case code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def unavailable(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "unavailable", message, headers={"Retry-After": str(retry_after_s)})


def not_found() -> ApiError:
    return ApiError(404, "not_found", "no such red packet")


def gone(reason: str) -> ApiError:
    """410 for a packet with no share for this caller: ``sold_out`` or ``expired``."""
    if reason == "sold_out":
        return ApiError(410, "sold_out", "every share of this red packet has been opened")
    return ApiError(410, "expired", "this red packet has expired")


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


def error_response(err: ApiError) -> web.Response:
    return json_response(err.body(), status=err.status, headers=err.headers)


# A body that never came or could not be decoded leaves the connection mid-message: it is
# answered with Connection: close (core/body.py raises these).
CONNECTION_BROKEN = frozenset({"request_timeout", "invalid_body", "incomplete_body"})

# aiohttp raises these itself (unknown route, wrong method, body over client_max_size).
_HTTP_CODES = {
    404: ("not_found", "no such resource"),
    405: ("method_not_allowed", "method not allowed on this resource"),
    413: ("payload_too_large", "request body is too large"),
}


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return exception_response(request, exc)
    except Exception as exc:
        return exception_response(request, exc)


def exception_response(request: web.Request, exc: Exception) -> web.Response:
    """The JSON error for what a handler raised (an HTTPException below 400 is not an error:
    the caller re-raises it); anything unexpected is logged and becomes a 500."""
    if isinstance(exc, ApiError):
        response = error_response(exc)
        if exc.code in CONNECTION_BROKEN:
            response.force_close()
        return response
    if isinstance(exc, web.HTTPException):
        code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(ApiError(exc.status, code, message, headers=headers))
    log.exception("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(ApiError(500, "internal_error", "internal error"))


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A body as a JSON object, or a 400 that says what is wrong with it (the reader of a
    request's body is ``core/body.py read_json_object``; the node's link carries bytes)."""
    if not raw:
        raise bad_request("invalid_json", "request body must be a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = (
            "request body is not valid UTF-8"
            if "utf-8" in str(exc).lower()
            else ("request body is not valid JSON")
        )
        raise bad_request("invalid_json", message) from None
    if not isinstance(data, dict):
        raise bad_request("invalid_json", "request body must be a JSON object")
    return data
