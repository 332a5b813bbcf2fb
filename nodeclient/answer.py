"""A node's answer, decoded once: status, the JSON value, and ``Retry-After``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    data: Any  # the node's JSON value (a dict for every call)
    retry_after: str | None = None

    @classmethod
    def decode(cls, status: int, body: Any, retry_after: str | None) -> Answer:
        """From a reply whose body may be JSON bytes (HTTP, links of 0.1.0) or a value."""
        if isinstance(body, bytes | bytearray):
            try:
                body = orjson.loads(body) if body else {}
            except orjson.JSONDecodeError:
                body = {
                    "error": {"code": "not_json", "message": bytes(body[:200]).decode("latin1")}
                }
        return cls(status, body, retry_after if isinstance(retry_after, str) else None)

    @property
    def ok(self) -> bool:
        return self.status < 300

    @property
    def error(self) -> dict[str, Any]:
        """The error object of a refusal (``{}`` for a success or an odd body)."""
        if self.status < 400 or not isinstance(self.data, dict):
            return {}
        error = self.data.get("error")
        return error if isinstance(error, dict) else {}

    @property
    def code(self) -> str | None:
        code = self.error.get("code")
        return code if isinstance(code, str) else None

    def body(self) -> bytes:
        return orjson.dumps(self.data)


class NodeDown(Exception):
    """The call could not be made or got no answer; ``kind`` says how."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "connect", "closed", "timeout" or "auth"
