"""The HTTP transport: one pooled keep-alive request per call (``REDPACKET_NODE_TRANSPORT=
http``, node→node calls, and the rebalance tool's handoff API)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from redpacket.core.logs import REQUEST_ID_HEADER
from redpacket.nodeclient.wire import NODE_SECRET_HEADER, ROUTES, NodeDown


class HttpTransport:
    def __init__(self, session: aiohttp.ClientSession, secret: str) -> None:
        self.session, self.secret = session, secret

    async def call(
        self, url: str, name: str, args: dict[str, Any], *, rid: str, timeout_s: float
    ) -> tuple[int, bytes, str | None]:
        route = ROUTES[name]
        path, query, body = route.request(args)
        return await self.request(
            url, route.method, path, params=query, body=body, rid=rid, timeout_s=timeout_s
        )

    async def request(
        self,
        url: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        rid: str = "-",
        timeout_s: float,
    ) -> tuple[int, bytes, str | None]:
        """``(status, JSON body, Retry-After)`` of one request to ``url + path``;
        :class:`NodeDown` if it got no answer."""
        headers = {NODE_SECRET_HEADER: self.secret, REQUEST_ID_HEADER: rid}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            async with self.session.request(
                method,
                url + path,
                data=data,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                raw = await resp.read()
                return resp.status, raw, resp.headers.get("Retry-After")
        except TimeoutError:
            raise NodeDown("timeout", f"{url} did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise NodeDown("connect", f"{url}: {exc}") from None
