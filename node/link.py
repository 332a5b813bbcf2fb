"""The node's end of the gateway↔node link: calls as frames on a long-lived WebSocket.

A call frame names its call and carries its arguments as msgpack values; the reply carries
the answer as a value (``core/frames.py``, version 2). Frames of 0.1.0 gateways (method,
path, JSON body) are still served, by path, with JSON replies: a rolling upgrade replaces
the nodes first.

The gateway keeps a few connections open to ``/internal/v1/link`` (the node secret is
checked once, at the upgrade, by the app's auth middleware). Every call frame becomes a
task; its reply frame is queued as soon as that call is done, and all replies of one loop
tick leave in one message (``core/frames.py``). A connection with ``link_max_inflight``
calls running stops reading, so a gateway that sends faster than the node answers is held
back by TCP instead of piling up tasks here.

On SIGTERM (:meth:`LinkServer.drain`) every connection gets a ``goaway`` frame, the calls
in flight finish and are answered, then the connections close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgpack
from aiohttp import WSMsgType, web

from redpacket.core.errors import ApiError
from redpacket.core.frames import (
    CONTROL_ID,
    GOAWAY,
    LINK_PROTOCOL,
    FrameWriter,
    pack,
    unpacker,
)
from redpacket.core.logs import request_id
from redpacket.node.calls import (
    SETTINGS,
    SHARD,
    Call,
    CallTable,
    Reply,
    args_of,
    error_reply,
    log_access,
    run_call,
)
from redpacket.node.history import HISTORY

log = logging.getLogger("redpacket.node.link")
_EMPTY: dict[str, str] = {}


class LinkConnection:
    def __init__(self, server: LinkServer, ws: web.WebSocketResponse, call: Call) -> None:
        self._server = server
        self._ws = ws
        self._template = call  # shard and settings; each frame fills in the rest
        self._writer = FrameWriter(ws.send_bytes, server.max_message_bytes)
        self._max_body = server.max_body_bytes
        self.inflight = 0
        self._room: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        writer = asyncio.create_task(self._writer.run())
        frames = unpacker(self._server.max_message_bytes * 2)
        loop = asyncio.get_running_loop()
        try:
            async for msg in self._ws:
                if msg.type != WSMsgType.BINARY:
                    continue
                frames.feed(msg.data)
                for frame in frames:
                    self._start(frame, loop)
                while self.inflight >= self._server.max_inflight:
                    self._room = loop.create_future()
                    await self._room
        except (msgpack.UnpackException, ValueError) as exc:
            log.warning("closing a link connection that sent a malformed frame: %s", exc)
        finally:
            writer.cancel()
            # a writer that failed on a connection the gateway dropped ends with that error
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await writer
            for task in list(self._tasks):  # the gateway failed these calls already
                task.cancel()

    def _start(self, frame: Any, loop: asyncio.AbstractEventLoop) -> None:
        if not isinstance(frame, list) or len(frame) not in (4, 6) or not isinstance(frame[0], int):
            raise ValueError("a call frame is [call_id, name, args, request_id]")
        self.inflight += 1
        task = loop.create_task(self._serve(frame))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, frame: list[Any]) -> None:
        started = time.perf_counter()
        request_id.set(frame[-1] if isinstance(frame[-1], str) else "-")
        table = self._server.table
        try:
            if len(frame) == 4:  # [call_id, name, args, request_id]
                name, args = frame[1], frame[2]
                handler = table.handlers.get(name) if isinstance(name, str) else None
                size = 0  # a bound of the call's size: its strings (what could be large)
                for value in args.values() if isinstance(args, dict) else ():
                    if isinstance(value, str | bytes):
                        size += len(value)
                if handler is None or not isinstance(args, dict) or size > self._max_body:
                    answer = _refusal(handler, args)
                else:
                    t = self._template
                    call = Call(t.shard, t.settings, t.history, args)
                    answer = await run_call(handler, call, name)
                out = answer.data
            else:  # 0.1.0: [call_id, method, path, query, body, request_id], JSON replies
                name, answer = await self._answer_by_path(*frame[1:5])
                out = answer.body()
            self._writer.put(pack([frame[0], answer.status, out, answer.retry_after]))
            table.observe(name, answer.status, time.perf_counter() - started)
            if self._server.access_log:
                route = table.routes.get(name)
                where = f"{route.method} {route.pattern} ({name})" if route else f"- {name}"
                log_access(where, answer.status, started)
        finally:
            self.inflight -= 1
            room = self._room
            if room is not None and not room.done():
                self._room = None
                room.set_result(None)
            idle = self._idle
            if self.inflight == 0 and idle is not None and not idle.done():
                idle.set_result(None)

    async def _answer_by_path(
        self, method: Any, path: Any, query: Any, body: Any
    ) -> tuple[str, Reply]:
        table = self._server.table
        found = table.match(method, path) if isinstance(path, str) else None
        body = body or b""
        if found is None:
            return "unmatched", error_reply(ApiError(404, "not_found", "no such resource"))
        name, params = found
        if not isinstance(body, bytes) or len(body) > self._server.max_body_bytes:
            return name, error_reply(
                ApiError(413, "payload_too_large", "request body is too large")
            )
        try:
            args = args_of(
                table.routes[name], params, query if isinstance(query, dict) else _EMPTY, body
            )
        except ApiError as err:
            return name, error_reply(err)
        t = self._template
        return name, await run_call(
            table.handlers[name], Call(t.shard, t.settings, t.history, args), path
        )

    async def drain(self, timeout_s: float) -> None:
        """Tell the gateway to stop sending here, answer what is in flight, then close."""
        self._writer.put(pack([CONTROL_ID, GOAWAY]))
        if self.inflight:
            self._idle = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle, timeout_s)
        await asyncio.sleep(0.05)  # let the writer flush the last replies
        await self._ws.close()


class LinkServer:
    """Serves the call table over link connections; one per node process."""

    def __init__(
        self,
        table: CallTable,
        *,
        max_inflight: int,
        max_message_bytes: int,
        max_body_bytes: int,
        access_log: bool,
    ) -> None:
        self.table = table
        self.max_inflight = max_inflight
        self.max_message_bytes = max_message_bytes
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        self.connections: set[LinkConnection] = set()
        self.draining = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            raise ApiError(503, "unavailable", "this node is shutting down")
        ws = web.WebSocketResponse(
            max_msg_size=self.max_message_bytes,
            compress=False,
            heartbeat=None,
            protocols=(LINK_PROTOCOL,),  # offered by callers that send calls by name
        )
        await ws.prepare(request)
        app = request.app
        template = Call(app[SHARD], app[SETTINGS], app[HISTORY], _EMPTY)
        conn = LinkConnection(self, ws, template)
        self.connections.add(conn)
        try:
            # its own task: each message then wakes the connection alone, not also this
            # request's handler and every middleware around it (a cancel reaches it too)
            await asyncio.ensure_future(conn.run())
        finally:
            self.connections.discard(conn)
        return ws

    async def drain(self, timeout_s: float) -> None:
        self.draining = True
        await asyncio.gather(*(c.drain(timeout_s) for c in list(self.connections)))


def _refusal(handler: Any, args: Any) -> Reply:
    """The answer to a call by name that is not served: unknown, malformed or too large."""
    if handler is None:
        return error_reply(ApiError(404, "not_found", "no such call"))
    if not isinstance(args, dict):
        return error_reply(ApiError(400, "invalid_json", "a call's arguments are a map"))
    return error_reply(ApiError(413, "payload_too_large", "request body is too large"))
