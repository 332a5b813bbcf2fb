"""Where a worker's opens go: the packets it creates and hands out as tickets
(:class:`Supply`), and who opens next (:class:`Identities`)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import Any

import orjson

from redpacket.bench.httpclient import ClientConnection, HttpError
from redpacket.bench.job import Recorder, WorkerJob, error_label
from redpacket.core.ids import snowflake_of

POST = b"POST"
PACKETS = b"/v1/red-packets"


class Packet:
    __slots__ = ("id", "left", "shares", "snowflake", "taken", "won")

    def __init__(self, packet_id: bytes, shares: int) -> None:
        self.id = packet_id  # the public id, as the URLs carry it
        self.snowflake = snowflake_of(packet_id.decode())  # the checker's id, decoded once
        self.left = self.shares = shares
        self.taken: set[int] = set()
        self.won = 0  # opens answered 200 with a new share


class Supply:
    """Packets with shares for the worker's users; created through the API as they run out."""

    def __init__(self, job: WorkerJob, rec: Recorder, clock: Any) -> None:
        self._job = job
        self._rec = rec
        self._clock = clock
        self.active: list[Packet] = []
        self.reserve: deque[tuple[bytes, int]] = deque()  # (id, shares)
        self.all: list[Packet] = []
        self._low_water = max(4, 2 * len(job.users) // max(1, job.shares) + 2)
        if job.in_flight:  # the crowd: in_flight open, and a margin created ahead
            self._low_water = job.in_flight + max(16, job.in_flight // 8)
        self._need = asyncio.Event()
        self._have = asyncio.Event()
        self._sender = 0
        self._random = random.Random(job.index)
        self.stopped = False
        self.finite = job.finite
        if job.finite:  # the boss packet(s): given, never created
            self.active = self.all = [Packet(p, job.shares) for p in job.packets]

    def _draw_shares(self) -> int:
        job = self._job
        return self._random.randint(job.shares_min, job.shares) if job.shares_min else job.shares

    def _stocked(self) -> bool:
        """Enough packets: the reserve (hot shape), or the open ones plus the reserve (crowd)."""
        have = len(self.reserve) + (len(self.active) if self._job.in_flight else 0)
        return have >= self._low_water

    async def create(self, conn: ClientConnection) -> bool:
        token = self._job.senders[self._sender % len(self._job.senders)]
        self._sender += 1
        shares = self._draw_shares()
        amount = max(shares, self._job.amount * shares // self._job.shares)
        request = {"total_amount": amount, "total_packet": shares, "greeting": "bench"}
        started = time.perf_counter()
        try:
            status, body = await conn.request(POST, PACKETS, token, orjson.dumps(request))
        except HttpError:
            self._rec.add("error:create:conn", self._clock(), 0.0, 3)
            return False
        if status != 201:
            self._rec.add(error_label("create", status, body), self._clock(), 0.0, 3)
            return False
        self._rec.add("create", self._clock(), time.perf_counter() - started, 4)
        self.reserve.append((orjson.loads(body)["red_packet_id"].encode(), shares))
        self._have.set()
        return True

    async def creator(self, conn: ClientConnection) -> None:
        failures = 0
        while not self.stopped:
            if self._stocked():
                self._need.clear()
                await self._need.wait()
                continue
            if await self.create(conn):
                failures = 0
            else:
                failures += 1
                await asyncio.sleep(min(1.0, 0.05 * failures))

    async def ticket(self, uid: int) -> Packet | None:
        if self._job.finite:  # every identity tries the boss packet, won or not
            return self.active[uid % len(self.active)] if not self.stopped else None
        if self._job.in_flight:
            return await self._crowd_ticket(uid)
        return await self._first_ticket(uid)

    async def _crowd_ticket(self, uid: int) -> Packet | None:
        """A random packet of the ``in_flight`` open ones (the real crowd spreads out)."""
        while not self.stopped:
            while self.reserve and len(self.active) < self._job.in_flight:
                self._activate()
            if self.active:
                i = self._random.randrange(len(self.active))
                packet = self.active[i]
                if uid not in packet.taken:
                    packet.left -= 1
                    packet.taken.add(uid)
                    if not packet.left:  # swap-remove: O(1)
                        self.active[i] = self.active[-1]
                        self.active.pop()
                    if not self._stocked():
                        self._need.set()
                    return packet
                return await self._first_ticket(uid)  # a reused identity: any packet it may take
            self._need.set()
            self._have.clear()
            await self._have.wait()
        return None

    def _activate(self) -> None:
        packet_id, shares = self.reserve.popleft()
        packet = Packet(packet_id, shares)
        self.active.append(packet)
        self.all.append(packet)

    async def _first_ticket(self, uid: int) -> Packet | None:
        """The first open packet with a share this uid has not taken (the hot shape)."""
        users = len(self._job.users)
        while not self.stopped:
            for packet in self.active:
                if packet.left and uid not in packet.taken:
                    packet.left -= 1
                    packet.taken.add(uid)
                    return packet
            # packets no user of this worker can take any more leave the active list
            self.active = [p for p in self.active if p.left and len(p.taken) < users]
            if self.reserve:
                self._activate()
                if len(self.reserve) < self._low_water:
                    self._need.set()
                continue
            self._need.set()
            self._have.clear()
            await self._have.wait()
        return None

    def stop(self) -> None:
        self.stopped = True
        self._have.set()
        self._need.set()


class Identities:
    """Who opens next. With minted identities every grab+open pair takes the next one, a
    token the gateway has never seen (a run that outlasts them wraps around, counted in
    ``reused``; a finite crowd stops instead); without, a virtual user keeps its own."""

    def __init__(self, minted: list[tuple[int, bytes]], finite: bool) -> None:
        self._minted = minted
        self._finite = finite
        self._next = 0
        self.reused = 0

    def take(self, own: tuple[int, bytes]) -> tuple[int, bytes] | None:
        minted = self._minted
        if not minted:
            return own
        if self._next >= len(minted):
            if self._finite:
                return None
            self.reused += 1
        identity = minted[self._next % len(minted)]
        self._next += 1
        return identity
