"""Reading a request body at the edge: one reader for every endpoint that takes a body.

What it guarantees (issue 19), so a new endpoint inherits it by calling
:func:`read_json_object`:

- a body that does not arrive within the body read timeout (``BODY_READ_TIMEOUT_S`` on the
  app, default 10 s) is answered 408 and its connection closed: a client trickling a partial
  body no longer holds a connection forever;
- a body that cannot be decoded (``Content-Encoding: gzip`` that is not gzip, a chunked or
  length-framed body cut short) is 400 ``invalid_body``, never a 500;
- a client that disconnects mid-body is a 400 nobody reads, logged as nothing worse than a
  debug line, never a traceback;
- then the bytes must be a JSON object in UTF-8 (:func:`parse_json_object`).

The ``Content-Type`` rule (415 for a body that is not JSON) is the gateway's edge
middleware's, so it holds on routes that never read their body too.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from redpacket.core.errors import ApiError, parse_json_object

log = logging.getLogger("redpacket.http")

BODY_READ_TIMEOUT_S = web.AppKey("body_read_timeout_s", float)
DEFAULT_BODY_READ_TIMEOUT_S = 10.0


async def read_body(request: web.Request) -> bytes:
    """The whole body, decoded, within the app's body read timeout (see the module)."""
    timeout_s = request.app.get(BODY_READ_TIMEOUT_S, DEFAULT_BODY_READ_TIMEOUT_S)
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408, "request_timeout", f"the request body did not arrive within {timeout_s:g} s"
        ) from None
    except web.HTTPException:
        raise  # over client_max_size: aiohttp's 413
    except (RequestPayloadError, HttpProcessingError, zlib.error, UnicodeError, ValueError):
        raise ApiError(400, "invalid_body", "the request body cannot be decoded") from None
    except ConnectionError:
        log.debug("client went away mid-body on %s %s", request.method, request.path)
        raise ApiError(400, "incomplete_body", "the request body ended early") from None


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx that says what is wrong with it.

    orjson rejects invalid UTF-8 itself, so bad bytes and bad JSON both land here as 400.
    The size cap is aiohttp's ``client_max_size``, set per app.
    """
    return parse_json_object(await read_body(request))
