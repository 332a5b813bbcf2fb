"""The caller's end of the link: node calls multiplexed on a few long-lived WebSockets.

Per (gateway process, node) a :class:`NodeLink` keeps ``connections`` WebSockets open to
the node's ``/internal/v1/link`` (the node secret is presented once, at the upgrade). A
call is a frame with a call id; the frames of one loop tick leave in one message and one
write (``core/frames.py``); replies come back in any order and each wakes its caller.

A call is its name and a map of msgpack values when the node accepted the link's
subprotocol (``LINK_PROTOCOL``) at the upgrade; a node of 0.1.0 did not, and gets the call
as method, path, query and JSON body, as it expects (a rolling upgrade meets both).

What the HTTP hop gave stays: a deadline per call (a late answer is dropped, the caller
gets 503 ``unavailable``), at most ``max_inflight`` calls per connection (callers beyond
that wait their turn within their deadline: a slow node slows its own callers only),
reconnect with backoff, and every call in flight failed at once when its connection dies.
A node that says ``goaway`` (it is draining) gets no new calls on that connection; the
ones in flight are still answered, then the gateway reconnects. A node that a new ring no
longer names is retired: its link takes no new calls, and is closed once the calls in
flight on it have finished (each has a deadline, so that wait is bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

import aiohttp
import msgpack
import orjson
from aiohttp import WSMsgType

from redpacket.core.frames import (
    CONTROL_ID,
    GOAWAY,
    LINK_PATH,
    LINK_PROTOCOL,
    FrameWriter,
    pack,
    unpacker,
)
from redpacket.nodeclient.wire import NODE_SECRET_HEADER, ROUTES, NodeDown, Route

log = logging.getLogger("redpacket.nodeclient.link")

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0


class _Connection:
    def __init__(self, link: NodeLink) -> None:
        self.link = link
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.writer: FrameWriter | None = None
        self.pending: dict[int, asyncio.Future[list[Any]]] = {}
        self.draining = False
        self.named = False  # the node takes calls by name (it accepted LINK_PROTOCOL)
        self.ids = itertools.count(1)

    @property
    def usable(self) -> bool:
        return self.ws is not None and not self.draining

    async def supervise(self) -> None:
        """Connect, serve, and reconnect with backoff, for as long as the link lives."""
        delay = BACKOFF_FIRST_S
        link = self.link
        while not link.session.closed:  # closed: the gateway is shutting down
            try:
                ws = await link.session.ws_connect(
                    link.url + LINK_PATH,
                    headers={NODE_SECRET_HEADER: link.secret},
                    protocols=(LINK_PROTOCOL,),
                    max_msg_size=link.max_message_bytes,
                    autoclose=True,
                    autoping=True,
                    compress=0,
                )
            except aiohttp.WSServerHandshakeError as exc:
                kind = "auth" if exc.status == 401 else "connect"
                if kind == "auth":
                    log.error("shard %s refused the gateway's node secret", link.name)
                link.connect_failed(NodeDown(kind, f"shard {link.name}: {exc.status}"))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                link.connect_failed(NodeDown("connect", f"shard {link.name}: {exc}"))
            else:
                delay = BACKOFF_FIRST_S
                try:  # its own task: a message wakes the connection alone, not this loop too
                    await asyncio.ensure_future(self._serve(ws))
                except Exception:  # this loop is the link's only way back: it must not end
                    log.exception("link to shard %s failed unexpectedly", link.name)
                continue  # a connection that worked is replaced at once
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        writer = FrameWriter(ws.send_bytes, self.link.max_message_bytes)
        writer_task = asyncio.create_task(writer.run())
        self.ws, self.writer, self.draining = ws, writer, False
        self.named = ws.protocol == LINK_PROTOCOL
        self.link.connected()
        frames = unpacker(self.link.max_message_bytes * 2)
        pending = self.pending
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.ERROR:
                        break
                    continue
                frames.feed(msg.data)
                for frame in frames:
                    call_id = frame[0]
                    if call_id == CONTROL_ID:
                        if frame[1] == GOAWAY:
                            self.draining = True
                        continue
                    future = pending.pop(call_id, None)
                    if future is not None and not future.done():
                        future.set_result(frame)
                if self.draining and not pending:
                    break
        except (msgpack.UnpackException, ValueError, TypeError, IndexError) as exc:
            log.error("shard %s sent a malformed frame: %s", self.link.name, exc)
        except aiohttp.ClientError as exc:
            log.warning("link to shard %s failed: %s", self.link.name, exc)
        finally:
            self.ws = self.writer = None
            writer_task.cancel()
            # The writer ends with the send's error when the node died under a write (the
            # reader sees the close too): that error is this connection's end, not the
            # link's. Raised from here it ended supervise(), and the link never reconnected
            # (a SIGKILLed node left its shard unanswerable for good: issue 24).
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, OSError):
                await writer_task
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await ws.close()
            lost = NodeDown("closed", f"connection to shard {self.link.name} was lost")
            for future in pending.values():
                if not future.done():
                    future.set_exception(lost)
            pending.clear()


class NodeLink:
    """All calls from this gateway process to one node."""

    def __init__(
        self,
        name: str,
        url: str,
        session: aiohttp.ClientSession,
        secret: str,
        *,
        connections: int,
        max_inflight: int,
        max_message_bytes: int,
    ) -> None:
        self.name, self.url, self.session, self.secret = name, url.rstrip("/"), session, secret
        self.max_message_bytes = max_message_bytes
        self.routes: dict[str, Route] = ROUTES  # for nodes that take calls by path only
        self._conns = [_Connection(self) for _ in range(connections)]
        self._slots = asyncio.Semaphore(connections * max_inflight)
        self._tasks: list[asyncio.Task[None]] = []
        self._up: asyncio.Future[None] | None = None  # resolved by the first attempt
        self.last_error: NodeDown | None = None
        self._calls = 0  # calls under way (waiting for a slot or an answer)
        self._idle: asyncio.Event | None = None  # set when _calls drops to 0 (retire waits)
        self.retired = False

    def _start(self) -> None:
        self._up = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(c.supervise()) for c in self._conns]

    def connected(self) -> None:
        self.last_error = None
        if self._up is not None and not self._up.done():
            self._up.set_result(None)

    def connect_failed(self, error: NodeDown) -> None:
        self.last_error = error
        if self._up is not None and not self._up.done():
            self._up.set_result(None)

    def _pick(self) -> _Connection | None:
        best = None
        for conn in self._conns:
            if conn.usable and (best is None or len(conn.pending) < len(best.pending)):
                best = conn
        return best

    async def call(
        self, name: str, args: dict[str, Any], *, rid: str, timeout_s: float
    ) -> tuple[int, Any, Any]:
        """The node's reply to call ``name`` with ``args``: ``(status, body, retry_after)``,
        the body a value (or JSON bytes from a node of 0.1.0); or :class:`NodeDown`."""
        if self.retired:
            raise NodeDown("connect", f"shard {self.name} has left the ring")
        self._calls += 1
        try:
            _, status, body, retry_after = await self._call(name, args, rid, timeout_s)
            return status, body, retry_after
        finally:
            self._calls -= 1
            if not self._calls and self._idle is not None:
                self._idle.set()

    async def _call(self, name: str, args: dict[str, Any], rid: str, timeout_s: float) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._up is None:
            self._start()
        conn = self._pick()
        if conn is None:
            assert self._up is not None
            if not self._up.done():  # the very first connections are being made
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._up), timeout_s)
            conn = self._pick()
            if conn is None:  # down: fail fast, the supervisors keep reconnecting
                raise self.last_error or NodeDown("connect", f"shard {self.name} is unavailable")
        slots = self._slots
        if slots.locked():  # backpressure: wait for a slot, within this call's deadline
            try:
                async with asyncio.timeout_at(deadline):
                    await slots.acquire()
            except TimeoutError:
                raise NodeDown("timeout", f"shard {self.name} is saturated") from None
            conn = self._pick()
            if conn is None:
                slots.release()
                raise NodeDown("connect", f"shard {self.name} is unavailable")
        else:
            await slots.acquire()
        call_id = next(conn.ids)
        future: asyncio.Future[list[Any]] = loop.create_future()
        conn.pending[call_id] = future
        assert conn.writer is not None
        if conn.named:
            conn.writer.put(pack([call_id, name, args, rid]))
        else:
            conn.writer.put(pack([call_id, *_by_path(self.routes[name], args), rid]))
        timer = loop.call_at(deadline, _expire, conn.pending, call_id, future)
        try:
            return await future
        finally:
            timer.cancel()
            slots.release()

    async def retire(self) -> None:
        """Take no new calls, let the ones under way finish, then close the connections."""
        self.retired = True
        while self._calls:
            self._idle = asyncio.Event()
            await self._idle.wait()
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _by_path(route: Route, args: dict[str, Any]) -> tuple[str, str, Any, bytes | None]:
    """``method, path, query, body`` of the call frame a node of 0.1.0 reads."""
    path, query, body = route.request(args)
    return route.method, path, query, orjson.dumps(body) if body is not None else None


def _expire(
    pending: dict[int, asyncio.Future[list[Any]]], call_id: int, future: asyncio.Future[list[Any]]
) -> None:
    pending.pop(call_id, None)
    if not future.done():
        future.set_exception(NodeDown("timeout", "no answer in time"))


class Links:
    """One :class:`NodeLink` per node URL, made on first use."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        secret: str,
        *,
        connections: int,
        max_inflight: int,
        max_message_bytes: int,
    ) -> None:
        self._session, self._secret = session, secret
        self._options = {
            "connections": connections,
            "max_inflight": max_inflight,
            "max_message_bytes": max_message_bytes,
        }
        self._links: dict[tuple[str, str], NodeLink] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def get(self, name: str, url: str) -> NodeLink:
        link = self._links.get((name, url))
        if link is None:
            link = self._links[(name, url)] = NodeLink(
                name, url, self._session, self._secret, **self._options
            )
        return link

    def keep_only(self, nodes: set[tuple[str, str]]) -> list[NodeLink]:
        """Retire the links to every (name, url) not in ``nodes`` (a new ring left them out);
        each closes once its calls in flight are done. Returns the links being retired."""
        gone = [key for key in self._links if key not in nodes]
        retired = [self._links.pop(key) for key in gone]
        for link in retired:
            log.info("link to shard %s (%s) retired: not in the ring", link.name, link.url)
            link.retired = True  # no new calls from now on, not from the task's first step
            task = asyncio.get_running_loop().create_task(link.retire())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return retired

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self._links.values()))
        self._links.clear()
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
