"""The Lua scripts on their own, against a real redis-server: no node, no MySQL.

Each script's KEYS/ARGV/returns header (node/*.lua) is the contract tested here; the node's
tests exercise the same scripts through the open flow. A share's amount is drawn from ARGV[2]
(the caller's CSPRNG), so these tests pick it to reach the bounds of the double-average rule.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio
import redis.asyncio as aioredis

import redpacket.node as node_pkg
from redpacket.node.redis_keys import packet_keys

NOW_MS = 1_800_000_000_000
HOUR_MS = 3_600_000
_ids = itertools.count(1)


def _source(name: str) -> str:
    return (Path(node_pkg.__file__).parent / name).read_text("utf-8")


class Scripts:
    """Each .lua file registered once, called with its documented KEYS and ARGV."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._scripts = {
            name: client.register_script(_source(f"{name}.lua"))
            for name in ("open", "grab", "load", "freeze", "drop")
        }

    async def load(
        self,
        packet_id: int,
        total_amount: int,
        total_packet: int,
        *,
        kind: str = "lucky",
        each: int | None = None,
        receiver: int | None = None,
        expire_at_ms: int = NOW_MS + HOUR_MS,
        mode: str = "create",
        remaining: tuple[int, int] | None = None,
        claims: tuple[tuple[int, int], ...] = (),
    ) -> int:
        left_amount, left_packet = remaining or (total_amount, total_packet)
        fields: list[Any] = [
            "total_amount", total_amount, "total_packet", total_packet,
            "remaining_amount", left_amount, "remaining_packet", left_packet,
            "expire_at_ms", expire_at_ms, "kind", kind,
            "each", "" if each is None else each, "receiver", "" if receiver is None else receiver,
        ]  # fmt: skip
        argv: list[Any] = [mode, expire_at_ms + HOUR_MS, len(fields), *fields]
        for uid, amount in claims:
            argv += [uid, amount]
        return int(await self._scripts["load"](keys=packet_keys(packet_id), args=argv))

    async def open(
        self, packet_id: int, uid: int, rand: int = 0, now_ms: int = NOW_MS
    ) -> list[int]:
        reply = await self._scripts["open"](
            keys=packet_keys(packet_id), args=[uid, rand, now_ms, f"claim-of-{uid}"]
        )
        return [int(x) for x in reply]

    async def grab(self, packet_id: int, uid: int, now_ms: int = NOW_MS) -> list[int]:
        reply = await self._scripts["grab"](keys=packet_keys(packet_id)[:2], args=[uid, now_ms])
        return [int(x) for x in reply]

    async def freeze(self, packet_id: int, state: str) -> int:
        return int(await self._scripts["freeze"](keys=packet_keys(packet_id)[:1], args=[state]))

    async def drop(self, packet_id: int) -> int:
        return int(await self._scripts["drop"](keys=packet_keys(packet_id)))

    async def info(self, packet_id: int) -> dict[str, str]:
        raw = await self.client.hgetall(packet_keys(packet_id)[0])
        return {k.decode(): v.decode() for k, v in raw.items()}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def lua(redis_servers: Any) -> AsyncIterator[Scripts]:
    server = redis_servers()
    client = aioredis.Redis.from_url(server.url)
    try:
        yield Scripts(client)
    finally:
        await client.aclose()


def new_id() -> int:
    return next(_ids)


# -- open.lua: the double-average rule --------------------------------------------------------


async def test_a_share_is_at_least_one_cent(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 1000, 10)
    code, amount, left, pending = await lua.open(pid, 1, rand=0)
    assert (code, amount, left, pending) == (1, 1, 9, 1)


async def test_a_share_stays_below_twice_the_remaining_average(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 1000, 10)  # average 100: the largest share is 199
    code, amount, _, _ = await lua.open(pid, 1, rand=198)
    assert (code, amount) == (1, 199)
    pid = new_id()
    await lua.load(pid, 1000, 10)
    assert (await lua.open(pid, 1, rand=199))[1] == 1  # the draw wraps inside [1, 199]


async def test_every_unopened_share_keeps_a_cent(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 5, 4)  # twice the average is 2.5, but 3 shares must keep 1 cent each
    amounts = [(await lua.open(pid, uid, rand=10**6 - 1))[1] for uid in (1, 2, 3, 4)]
    assert sorted(amounts) == [1, 1, 1, 2] and sum(amounts) == 5


async def test_last_share_takes_the_rest(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 1001, 3)
    first = (await lua.open(pid, 1, rand=5))[1]
    second = (await lua.open(pid, 2, rand=77))[1]
    code, last, left, _ = await lua.open(pid, 3, rand=0)
    assert (code, left) == (1, 0)
    assert last == 1001 - first - second
    assert (await lua.info(pid))["remaining_amount"] == "0"


async def test_shares_always_sum_to_the_total(lua: Scripts) -> None:
    for rand in (0, 1, 12345, 2**31 - 1):
        pid = new_id()
        await lua.load(pid, 777, 7)
        amounts = [(await lua.open(pid, uid, rand=rand + uid))[1] for uid in range(1, 8)]
        assert sum(amounts) == 777 and min(amounts) >= 1


async def test_a_repeat_open_answers_the_first_amount(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 500, 5)
    code, amount, left, _pending = await lua.open(pid, 9, rand=42)
    assert code == 1
    assert await lua.open(pid, 9, rand=7) == [2, amount, left, 1]
    await lua.client.hdel(packet_keys(pid)[2], "9")  # the claim is committed
    assert await lua.open(pid, 9, rand=7) == [2, amount, left, 0]
    assert (await lua.info(pid))["remaining_packet"] == "4"


async def test_sold_out_after_the_last_share(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 2, 2)
    await lua.open(pid, 1)
    await lua.open(pid, 2)
    assert await lua.open(pid, 3) == [-1, 0, 0, 0]
    assert await lua.grab(pid, 3) == [-1, 0]


async def test_expired_packets_give_nothing(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 100, 2, expire_at_ms=NOW_MS)
    assert (await lua.open(pid, 1, now_ms=NOW_MS))[0] == -2
    assert (await lua.grab(pid, 1, now_ms=NOW_MS))[0] == -2
    assert (await lua.open(pid, 1, now_ms=NOW_MS - 1))[0] == 1  # a millisecond before, it opens


async def test_an_unknown_packet_asks_the_caller_to_load_it(lua: Scripts) -> None:
    pid = new_id()
    assert await lua.open(pid, 1) == [0, 0, 0, 0]
    assert await lua.grab(pid, 1) == [0, 0]


# -- kinds ---------------------------------------------------------------------------------------


async def test_equal_shares_are_the_same(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 300, 3, kind="equal", each=100)
    amounts = [(await lua.open(pid, uid, rand=99_999))[1] for uid in (1, 2, 3)]
    assert amounts == [100, 100, 100]


async def test_an_exclusive_packet_opens_only_for_its_receiver(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 888, 1, kind="exclusive", receiver=42)
    assert await lua.open(pid, 7) == [-4, 0, 1, 0]
    assert (await lua.grab(pid, 7))[0] == -4
    assert (await lua.grab(pid, 42)) == [1, 0]
    assert (await lua.open(pid, 42))[:3] == [1, 888, 0]
    assert (await lua.open(pid, 7))[0] == -4  # still not for you, even sold out


# -- load, freeze, drop --------------------------------------------------------------------------


async def test_create_loads_once_and_replace_rebuilds(lua: Scripts) -> None:
    pid = new_id()
    assert await lua.load(pid, 100, 4) == 1
    await lua.open(pid, 1, rand=3)
    assert await lua.load(pid, 100, 4) == 0  # a second create changes nothing
    assert (await lua.info(pid))["remaining_packet"] == "3"
    assert (
        await lua.load(pid, 100, 4, mode="replace", remaining=(60, 2), claims=((1, 25), (2, 15)))
        == 1
    )
    assert (await lua.info(pid))["remaining_amount"] == "60"
    assert await lua.open(pid, 2) == [2, 15, 2, 0]  # committed claims come back, not pending


async def test_a_frozen_packet_takes_no_share_but_answers_reads(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 100, 4)
    await lua.open(pid, 1)
    assert await lua.freeze(pid, "frozen") == 1
    assert (await lua.open(pid, 2))[0] == -3
    assert (await lua.open(pid, 1))[0] == -3  # its claim is not committed yet: retry later
    assert (await lua.grab(pid, 2))[0] == 1
    assert await lua.freeze(pid, "") == 1
    assert (await lua.open(pid, 2))[0] == 1
    assert await lua.freeze(new_id(), "frozen") == 0


async def test_only_a_frozen_packet_is_dropped(lua: Scripts) -> None:
    pid = new_id()
    await lua.load(pid, 100, 4)
    assert await lua.drop(pid) == -1
    await lua.freeze(pid, "frozen")
    assert await lua.drop(pid) == 1
    assert await lua.info(pid) == {}
    assert await lua.drop(pid) == 0
