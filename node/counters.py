"""The live state of this shard's red packets in Redis.

What changes it: the Lua scripts (``open``, ``grab``, ``load``, ``freeze`` here, and
``drop.lua``, which a handoff runs through :meth:`Counters.run_many` once a packet has left,
node/handoff/packets.py), plus one plain command: :meth:`Counters.settle`'s ``HDEL`` of the
``pending`` entries MySQL has committed.

Each script's KEYS, ARGV and return codes are documented at the top of its ``.lua`` file.
Scripts are loaded into Redis once at start; redis-py re-sends one transparently if Redis
restarted and forgot it (NOSCRIPT).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from redpacket.core.env import REDIS_PASSWORD_FILE, password_from_file
from redpacket.node.batcher import ScriptBatcher
from redpacket.node.packet import Claim, PacketRow, redis_fields
from redpacket.node.redis_keys import PENDING_PATTERN, packet_id_of, packet_keys

RedisClient = aioredis.Redis | RedisCluster
CLUSTER_MIN_CONNECTIONS = 1024  # per master


class Outcome(enum.IntEnum):
    """Return codes shared by open.lua and grab.lua."""

    NEW_SHARE = 1  # open: a new share was drawn; grab: a share is there to open
    ALREADY_OPENED = 2
    NOT_LOADED = 0
    SOLD_OUT = -1
    EXPIRED = -2
    FROZEN = -3
    NOT_FOR_YOU = -4  # an exclusive packet, for someone else


@dataclass(frozen=True, slots=True)
class OpenResult:
    outcome: Outcome
    amount: int
    remaining_packet: int
    pending: bool


def _script(name: str) -> str:
    return Path(__file__).with_name(name).read_text("utf-8")


def connect_redis(url: str, cluster: bool, pool_size: int) -> RedisClient:
    """A pooled client that retries a command once a dropped connection is replaced.

    Retrying is safe for every script here: open.lua answers a second call by the same uid
    with the first amount, load.lua in create mode and freeze.lua are idempotent, grab.lua
    only reads.
    """
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=3)
    errors = [RedisConnectionError, RedisTimeoutError]
    # the password: in the URL, or in the file REDPACKET_REDIS_PASSWORD_FILE names
    auth = {} if urlsplit(url).password else {"password": password_from_file(REDIS_PASSWORD_FILE)}
    if cluster:
        # redis-py's cluster client fails a command when a master's pool is full instead of
        # waiting for a connection, so its cap sits above anything the node can have in
        # flight (the gateway keeps at most REDPACKET_NODE_CONNECTIONS calls per node).
        return RedisCluster.from_url(
            url,
            decode_responses=True,
            max_connections=max(pool_size, CLUSTER_MIN_CONNECTIONS),
            **auth,
            retry=retry,
            retry_on_error=errors,
            socket_timeout=5,
        )
    # timeout=None: a caller waits its turn for a connection instead of failing after 5 s
    # ("No connection available"); the hot scripts use few connections anyway (one pipeline
    # per tick, node/batcher.py), and a dead Redis is still noticed by socket_timeout.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        max_connections=pool_size,
        timeout=None,
        **auth,
        retry=retry,
        retry_on_error=errors,
        socket_timeout=5,
    )
    return aioredis.Redis(connection_pool=pool)


def claim_details(claim: Claim) -> bytes:
    """What pending keeps of a claim so the reconciler can write its record without the client.

    The amount is not in it: the script decides the amount and keeps it in claims.
    """
    return orjson.dumps([claim.claimed_at_ms, claim.nick_name, claim.img_url])


def load_args(
    packet: PacketRow, claims: dict[int, int], replace: bool, drop_at_ms: int
) -> list[int | str]:
    """ARGV of load.lua for a packet as MySQL has it.

    A refunded packet loads as expired whatever its expiry says: a node whose clock stepped
    back after the refund would otherwise sell its shares again in Redis (MySQL refuses them,
    but every such open answered 503 until the clock caught up)."""
    if packet.status == "refunded":
        packet = dataclasses.replace(packet, expire_time_ms=0)
    fields = redis_fields(packet)  # the hash's fields, from their one definition
    args: list[int | str] = ["replace" if replace else "create", drop_at_ms, len(fields), *fields]
    for uid, amount in claims.items():
        args += [uid, amount]
    return args


def _pending_claims(packet_id: int, pending: dict, claims: dict) -> list[Claim]:
    """The claims of a packet's pending hash that Redis still holds (a resync drops claims,
    and the pending entries with them)."""
    result = []
    for uid, details in pending.items():
        if uid not in claims:
            continue
        claimed_at_ms, nick_name, img_url = orjson.loads(details)
        result.append(
            Claim(packet_id, int(uid), int(claims[uid]), nick_name, img_url, int(claimed_at_ms))
        )
    return result


class Counters:
    def __init__(self, client: RedisClient, max_pipelines: int = 4) -> None:
        self.client = client
        # open and grab, the hot scripts, go out as one pipeline per loop tick
        self._batch = ScriptBatcher(client, max_pipelines)
        self._open = client.register_script(_script("open.lua"))
        self._grab = client.register_script(_script("grab.lua"))
        self._load = client.register_script(_script("load.lua"))
        self._freeze = client.register_script(_script("freeze.lua"))

    async def register_scripts(self) -> None:
        for script in (self._open, self._grab, self._load, self._freeze):
            await self.client.script_load(script.script)

    async def open(
        self, packet_id: int, uid: int, rand31: int, now_ms: int, details: bytes
    ) -> OpenResult:
        code, amount, remaining, pending = await self._batch.run(
            self._open, list(packet_keys(packet_id)), [uid, rand31, now_ms, details]
        )
        return OpenResult(Outcome(code), int(amount), int(remaining), bool(pending))

    async def grab(self, packet_id: int, uid: int, now_ms: int) -> tuple[Outcome, int]:
        info, claims, _ = packet_keys(packet_id)
        code, amount = await self._batch.run(self._grab, [info, claims], [uid, now_ms])
        return Outcome(code), int(amount)

    async def load(
        self,
        packet: PacketRow,
        claims: dict[int, int],
        *,
        replace: bool,
        drop_at_ms: int,
    ) -> bool:
        """Load a packet as MySQL has it; ``replace`` also discards claims MySQL never got."""
        args = load_args(packet, claims, replace, drop_at_ms)
        return bool(await self._load(keys=packet_keys(packet.red_packet_id), args=args))

    async def load_many(
        self, packets: list[tuple[PacketRow, dict[int, int]]], *, replace: bool, drop_after_s: int
    ) -> None:
        """Load many packets (with their claims) in pipelines: a batched handoff's activate."""
        calls = [
            self._batch.run(
                self._load,
                list(packet_keys(packet.red_packet_id)),
                load_args(packet, claims, replace, packet.expire_time_ms + drop_after_s * 1000),
            )
            for packet, claims in packets
        ]
        await asyncio.gather(*calls)

    async def freeze(self, packet_id: int, frozen: bool) -> bool:
        info, _, _ = packet_keys(packet_id)
        return bool(await self._freeze(keys=[info], args=["frozen" if frozen else ""]))

    async def is_frozen(self, packet_id: int) -> bool:
        """Whether open.lua would answer "frozen" for this packet now."""
        info, _, _ = packet_keys(packet_id)
        return await self.client.hget(info, "state") in ("frozen", b"frozen")

    async def freeze_many(self, packet_ids: Iterable[int], frozen: bool) -> None:
        """Freeze (or resume) many packets in one pipeline: a batched handoff's first step."""
        arg = "frozen" if frozen else ""
        calls = [self._batch.run(self._freeze, [packet_keys(i)[0]], [arg]) for i in packet_ids]
        await asyncio.gather(*calls)

    async def run_many(
        self, script: AsyncScript, calls: list[tuple[list[Any], list[Any]]]
    ) -> list[Any]:
        """Run one script for many ``(keys, args)`` in the tick's pipelines (a batched
        handoff's Redis work); the results in order."""
        return list(await asyncio.gather(*(self._batch.run(script, k, a) for k, a in calls)))

    async def claims(self, packet_id: int) -> dict[int, int]:
        _, claims, _ = packet_keys(packet_id)
        raw = await self.client.hgetall(claims)
        return {int(uid): int(amount) for uid, amount in raw.items()}

    async def pending(self, packet_id: int) -> list[Claim]:
        """The claims of a packet that MySQL may not hold yet."""
        _, claims_key, pending_key = packet_keys(packet_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(pending_key)
        pipe.hgetall(claims_key)
        pending, claims = await pipe.execute()
        return _pending_claims(packet_id, pending, claims)

    async def pending_many(
        self, packet_ids: list[int]
    ) -> tuple[dict[int, list[Claim]], dict[int, dict[int, int]]]:
        """For many packets in one pipeline: the claims MySQL may not hold yet, and every
        claim Redis holds (``{packet: {uid: amount}}``), as a batched handoff checks them."""
        pipe = self.client.pipeline(transaction=False)
        for packet_id in packet_ids:
            _, claims_key, pending_key = packet_keys(packet_id)
            pipe.hgetall(pending_key)
            pipe.hgetall(claims_key)
        answers = await pipe.execute()
        owed: dict[int, list[Claim]] = {}
        held: dict[int, dict[int, int]] = {}
        for n, packet_id in enumerate(packet_ids):
            pending, claims = answers[2 * n], answers[2 * n + 1]
            if pending:
                owed[packet_id] = _pending_claims(packet_id, pending, claims)
            if claims:
                held[packet_id] = {int(uid): int(amount) for uid, amount in claims.items()}
        return owed, held

    async def settle(self, claims: Iterable[Claim]) -> None:
        """Forget pending entries whose claims MySQL now holds."""
        pipe = self.client.pipeline(transaction=False)
        for claim in claims:
            pipe.hdel(packet_keys(claim.red_packet_id)[2], str(claim.uid))
        await pipe.execute()

    async def packets_with_pending(self) -> AsyncIterator[int]:
        """Every packet with claims not yet in MySQL: a full keyspace scan, for background use."""
        async for key in self.client.scan_iter(match=PENDING_PATTERN, count=1000):
            try:
                packet_id = packet_id_of(key)
            except ValueError:  # not one of ours (someone else's key in this Redis)
                continue
            yield packet_id

    async def ping(self) -> None:
        await self.client.ping()
