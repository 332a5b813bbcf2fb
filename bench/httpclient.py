"""The load generator's HTTP clients: a minimal keep-alive HTTP/1.1 client, and aiohttp's.

A closed-loop virtual user sends one request at a time on its own connection, so the client
needs no pipelining, no pool and no redirects: :class:`RawConnection` writes prebuilt request
bytes and parses just the status line and ``Content-Length``. It costs the load generator
a fraction of the CPU aiohttp's client does (see docs/benchmarks.md), which matters when the
load generator shares two cores with everything it measures. ``--client aiohttp`` swaps in
aiohttp's client to compare.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import aiohttp

Reply = tuple[int, bytes]


class ClientConnection(Protocol):
    async def request(
        self, method: bytes, path: bytes, token: bytes | None, body: bytes = b""
    ) -> Reply: ...

    async def warm(self) -> None: ...

    def close(self) -> None: ...


class HttpError(Exception):
    """The connection broke or the server said something this client does not parse."""


class _Parser(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head_end = -1
        self._need = -1
        self._status = 0
        self._keep_alive = True
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(HttpError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self._head_end = end + 4
            try:
                self._status = int(head[9:12])
                at = head.index(b"\r\ncontent-length:") + 17
                stop = head.find(b"\r\n", at)
                length = int(head[at : stop if stop >= 0 else len(head)])
            except ValueError:
                self._fail(HttpError("response without a status or Content-Length"))
                return
            self._need = self._head_end + length
            self._keep_alive = b"\r\nconnection: close" not in head
        if len(buf) < self._need:
            return
        reply = (self._status, bytes(buf[self._head_end : self._need]))
        del buf[: self._need]
        self._head_end = self._need = -1
        if not self._keep_alive and self.transport is not None:
            self.transport.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class RawConnection:
    """One keep-alive connection; reconnects by itself after the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._prefix = b" HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() + b"\r\n"
        self._proto: _Parser | None = None
        self._stopped = False

    async def _connect(self) -> _Parser:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_Parser, self._host, self._port)
        self._proto = proto
        return proto

    async def request(
        self, method: bytes, path: bytes, token: bytes | None, body: bytes = b""
    ) -> Reply:
        if self._stopped:
            raise HttpError("client stopped")
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connect()
        parts = [method, b" ", path, self._prefix]
        if token is not None:
            parts += [b"Authorization: Bearer ", token, b"\r\n"]
        if body:
            parts += [
                b"Content-Type: application/json\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            ]
        else:
            parts.append(b"Content-Length: 0\r\n\r\n")
        waiter = proto.waiter = asyncio.get_running_loop().create_future()
        assert proto.transport is not None
        proto.transport.write(b"".join(parts))
        return await waiter

    async def warm(self) -> None:
        if self._proto is None:
            await self._connect()

    def close(self) -> None:
        """Close the socket: a request waiting on it fails at once (used to end a phase)."""
        self._stopped = True
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()


class AiohttpConnection:
    """The same interface over one aiohttp session (shared connector, keep-alive)."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self._session = session
        self._base = base

    async def request(
        self, method: bytes, path: bytes, token: bytes | None, body: bytes = b""
    ) -> Reply:
        headers = {"Authorization": "Bearer " + token.decode()} if token is not None else {}
        if body:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method.decode(), self._base + path.decode(), headers=headers, data=body or None
            ) as resp:
                return resp.status, await resp.read()
        except aiohttp.ClientError as exc:
            raise HttpError(str(exc)) from None

    async def warm(self) -> None:
        return None

    def close(self) -> None:
        return None


def aiohttp_session(users: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=users + 16, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
    )


async def close_quietly(session: aiohttp.ClientSession | None) -> None:
    if session is not None:
        with contextlib.suppress(Exception):
            await session.close()
