"""The frames of the gateway↔node link (docs/architecture.md, "The link").

The link is a WebSocket on the node's HTTP port (``/internal/v1/link``). Each binary
WebSocket message carries one or more msgpack frames back to back, so every frame that
became ready in one loop tick leaves in one message and one write:

- call, caller → node: ``[call_id, name, args, request_id]``: the call's name
  (``nodeclient/wire.py``) and its arguments as a map of msgpack values;
- reply, node → caller: ``[call_id, status, value, retry_after | None]``, the answer as a
  msgpack value (the JSON the HTTP adapter would send, not encoded as JSON);
- control, node → gateway: ``[0, "goaway"]``: the node is draining (SIGTERM); no new calls
  on this connection, the ones in flight are still answered.

Call ids are positive and unique per connection; answers come in any order.

Versions. The frames above are version 2: the caller offers the WebSocket subprotocol
``LINK_PROTOCOL`` at the upgrade and a node that takes calls by name accepts it. Gateways and
nodes of 0.1.0 (every build before issue 21) neither offer nor accept it, and speak version
1: a call is ``[call_id, method, path, query | None, body | None, request_id]`` (``body``
the JSON bytes of the HTTP hop) and its reply's ``body`` is JSON bytes. A node serves both
on any connection (by the frame's length), a caller sends version 1 to a node that did not
accept version 2, and reads a reply body of bytes as JSON: every mix of a rolling upgrade
talks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

LINK_PATH = "/internal/v1/link"
LINK_PROTOCOL = "redpacket.link.v2"  # calls by name, msgpack values (docstring above)
GOAWAY = "goaway"
CONTROL_ID = 0

_packer = msgpack.Packer(use_bin_type=True)
pack = _packer.pack


def unpacker(max_buffer_size: int) -> msgpack.Unpacker:
    """A streaming decoder of one connection's frames (str stays str, bytes stay bytes)."""
    return msgpack.Unpacker(raw=False, use_list=True, max_buffer_size=max_buffer_size)


class FrameWriter:
    """Coalesces the frames of one loop tick into one message and one write.

    Callers :meth:`put` frames synchronously; a single writer task wakes once per tick,
    joins what is queued (at most ``max_message_bytes`` per message) and sends it. While a
    send waits for the socket to drain, new frames pile up and leave together next.
    """

    def __init__(self, send: Callable[[bytes], Awaitable[Any]], max_message_bytes: int) -> None:
        self._send = send
        self._max = max_message_bytes
        self._out: list[bytes] = []
        self._wake: asyncio.Future[None] | None = None
        self.closed = False

    def put(self, frame: bytes) -> None:
        self._out.append(frame)
        wake = self._wake
        if wake is not None:
            self._wake = None
            if not wake.done():
                wake.set_result(None)

    async def run(self) -> None:
        """Send until cancelled or the connection fails (the reader notices and cleans up)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._out:
                    self._wake = loop.create_future()
                    await self._wake
                    continue
                out, self._out = self._out, []
                message: list[bytes] = []
                size = 0
                for frame in out:
                    if message and size + len(frame) > self._max:
                        await self._send(b"".join(message))
                        message, size = [], 0
                    message.append(frame)
                    size += len(frame)
                await self._send(message[0] if len(message) == 1 else b"".join(message))
        finally:
            self.closed = True
