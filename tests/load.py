"""A concurrent open load for fault tests: users keep opening packets until told to stop,
and every 200 they saw is kept, to be checked against the ledger afterwards."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from redpacket.cli.check import Observed
from redpacket.core.ids import snowflake_of
from tests.conftest import Cluster


@dataclass
class OpenLoad:
    cluster: Cluster
    packet_ids: list[str]
    users: Sequence[int]
    observed: list[Observed] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _user(self, uid: int) -> None:
        todo = list(self.packet_ids)
        random.shuffle(todo)
        while todo and not self.stop.is_set():
            packet_id = todo[-1]
            try:
                status, body = await self.cluster.open(packet_id, uid)
            except (aiohttp.ClientError, TimeoutError):
                status, body = 599, {"error": {"code": "connection"}}
            self.statuses[status] += 1
            if status == 200:
                self.observed.append(Observed(snowflake_of(packet_id), uid, body["amount"]))
                todo.pop()
            elif status in (404, 410):
                todo.pop()
                self.codes[body["error"]["code"]] += 1
            else:  # 503 and friends: the user taps again a little later
                self.codes[body.get("error", {}).get("code", str(status))] += 1
                await asyncio.sleep(0.05 + random.random() * 0.1)
            await asyncio.sleep(random.random() * 0.02)

    async def run(self) -> None:
        await asyncio.gather(*(self._user(uid) for uid in self.users))

    def start(self) -> asyncio.Task[None]:
        return asyncio.ensure_future(self.run())

    def winners_per_packet(self) -> Counter[int]:
        return Counter(o.red_packet_id for o in self.observed)
