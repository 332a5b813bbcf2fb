"""A TCP hop in front of a real server that a fault injector can cut, restore or slow down.

The tests put it between a node and MySQL (``proxied_mysql``); ``redpacket chaos`` puts one in
front of each shard's MySQL so it can cut or slow one shard's ledger without touching the
others or the server they share.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a real server. ``block()`` aborts every connection through
    it and refuses new ones, as a store that went away would; ``unblock()`` lets them in again.
    ``delay_s`` holds every chunk that much before passing it on (both directions), as a slow
    network or an overloaded server would. ``hold(direction)`` stops one direction ("up":
    client to server, "down": server to client) without closing anything, as a one-way
    partition does to TCP (the bytes wait, then flow once ``release()``d).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)  # may change: new connections go there
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.blocked = False
        self.delay_s = 0.0
        self.port = 0
        self._flow = {"up": asyncio.Event(), "down": asyncio.Event()}
        for flowing in self._flow.values():
            flowing.set()

    def hold(self, direction: str) -> None:
        self._flow[direction].clear()

    def release(self) -> None:
        for flowing in self._flow.values():
            flowing.set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        self.block()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def block(self) -> None:
        self.blocked = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def unblock(self) -> None:
        self.blocked = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self.blocked:  # blocked while this connection was being made
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer, self._flow["up"]),
            self._pipe(up_reader, writer, self._flow["down"]),
        )
        self._writers.discard(writer)
        self._writers.discard(up_writer)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
    ) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                if self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                await flowing.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()
