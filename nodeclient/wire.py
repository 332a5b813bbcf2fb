"""The wire contract of node calls: every call by name, its HTTP route, the node secret's
header, and :class:`NodeDown`.

Every node call, by name: what the node's call table (``node/handlers.py CALLS``) serves
and what :class:`~redpacket.nodeclient.client.NodeClient` calls.

On the link a call is its name and a map of msgpack values (``core/frames.py``); the HTTP
adapter of the same table (tools, debugging, ``REDPACKET_NODE_TRANSPORT=http``, and gateways
of 0.1.0 during a rolling upgrade) serves each name at the route below: the ``{params}`` of
the path, then the other arguments as the query (GET) or as the JSON body (POST).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NODE_SECRET_HEADER = "X-Redpacket-Node-Secret"  # every /internal/ call, and the link's upgrade


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str  # e.g. /internal/v1/packets/{id}/open

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(re.findall(r"\{(\w+)\}", self.pattern))

    def request(self, args: Mapping[str, Any]) -> tuple[str, dict[str, str] | None, Any]:
        """``(path, query, body)`` of an HTTP request carrying ``args``."""
        path = self.pattern
        rest = dict(args)
        for name in self.params:
            path = path.replace("{" + name + "}", str(rest.pop(name)))
        if self.method == "GET":
            return path, {k: str(v) for k, v in rest.items()} or None, None
        return path, None, rest


ROUTES: dict[str, Route] = {
    "create": Route("POST", "/internal/v1/packets"),
    "info": Route("GET", "/internal/v1/packets/{id}"),
    "grab": Route("POST", "/internal/v1/packets/{id}/grab"),
    "open": Route("POST", "/internal/v1/packets/{id}/open"),
    "records": Route("GET", "/internal/v1/packets/{id}/records"),
    "winners": Route("GET", "/internal/v1/packets/{id}/winners"),
    "claim_idempotency_key": Route("POST", "/internal/v1/idempotency-keys"),
    "apply_history": Route("POST", "/internal/v1/history/events"),
    "received": Route("GET", "/internal/v1/users/{uid}/received"),
    "sent": Route("GET", "/internal/v1/users/{uid}/sent"),
    "hold": Route("POST", "/internal/v1/wallets/holds"),
    "confirm_hold": Route("POST", "/internal/v1/wallets/holds/confirm"),
    "abandon_create": Route("POST", "/internal/v1/packets/{id}/abandon"),
    "topup": Route("POST", "/internal/v1/wallets/topups"),
    "wallet": Route("GET", "/internal/v1/users/{uid}/wallet"),
    "transactions": Route("GET", "/internal/v1/users/{uid}/wallet/transactions"),
    "incoming": Route("GET", "/internal/v1/users/{uid}/incoming"),
    "healthz": Route("GET", "/healthz"),
    "readyz": Route("GET", "/readyz"),
}


class NodeDown(Exception):
    """The call could not be made or got no answer; ``kind`` says how."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "connect", "closed", "timeout" or "auth"
