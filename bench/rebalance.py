"""``redpacket rebalance bench``: what a ring change costs a live cluster.

Against a running local cluster (``redpacket dev up --cluster NAME``) it seeds many red
packets straight into the shards' ledgers (as a day of traffic would have left them), runs
an open load and a trickle of creates through the gateway, and changes the ring in the middle
(``add --no-move``, ``add`` or ``remove``). It reports:

- how long after the change began the first new packet was created on the new shard;
- red packets and users moved per second (and for how long);
- the open latency (p50/p99) before, during and after the change.

Seeding writes the rows the create path would (``red_packet_info`` on each packet's owner;
``user_sent`` and an idempotency key per packet, and a wallet with its starting grant per
sender, on each sender's owner: what a user move carries) in multi-row INSERTs: 100,000
packets take seconds, where creating them through the API would take minutes. Redis is
filled lazily: the first open of a packet loads it from MySQL, exactly as after a Redis
restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from redpacket.core.ids import IdGenerator, PublicIds, derive_id_key, snowflake_of
from redpacket.gateway.auth import mint_token
from redpacket.node.history import year_of
from redpacket.node.ledger import (
    PACKET_COLUMNS,
    PACKET_PLACEHOLDERS,
    PacketRow,
    connect_one,
    packet_values,
    to_datetime,
)
from redpacket.sharding.ring import RingDoc, packet_owner, user_key

SEED_CHUNK = 2000  # rows per multi-row INSERT


async def seed_packets(
    doc: RingDoc,
    count: int,
    *,
    senders: int = 1000,
    expire_s: int = 86_400,
    shares: int = 10,
    amount: int = 1000,
    sender_base: int = 1_000_000,
    received: int = 0,
) -> list[int]:
    """Write ``count`` fresh red packets (and their senders' history) into their owners'
    ledgers, as ``doc`` places them; their ids, oldest first. ``received``: each sender also
    took that many shares of the seeded packets (``user_received`` rows: a New-Year user sent
    a few and opened about ten), so a user moves ``2 * sent + received`` rows."""
    ids = IdGenerator(secrets.randbelow(1024))
    now_ms = int(time.time() * 1000)
    packets: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    sent: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    keys: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    made: list[int] = []
    urls = {n.name: n.mysql for n in doc.all_nodes()}
    for n in range(count):
        packet_id, sender = ids.next_id(), sender_base + n % senders
        row = PacketRow(
            red_packet_id=packet_id, uid=sender, total_amount=amount, total_packet=shares,
            remaining_amount=amount, remaining_packet=shares, greeting="seeded",
            status="active", create_token=secrets.token_hex(8),
            create_time_ms=now_ms, expire_time_ms=now_ms + expire_s * 1000,
        )  # fmt: skip
        packets[packet_owner(doc, packet_id).name].append(packet_values(row))
        owner = doc.ring().owner_of_key(user_key(sender)).name
        sent[owner].append(
            (sender, packet_id, year_of(now_ms), "lucky", amount, shares, "seeded",
             to_datetime(now_ms), to_datetime(row.expire_time_ms))
        )  # fmt: skip
        keys[owner].append(
            (sender, f"seed-{packet_id}", secrets.token_hex(32), packet_id, to_datetime(now_ms))
        )
        made.append(packet_id)
    wallets, grants = _seed_wallets(doc, ids, range(sender_base, sender_base + senders), now_ms)
    shares_taken = _seed_received(doc, made, range(sender_base, sender_base + senders), received)
    await asyncio.gather(
        *(_insert(urls[name], _RECEIVED_SQL, rows) for name, rows in shares_taken.items()),
        *(_insert(urls[name], _PACKET_SQL, rows) for name, rows in packets.items()),
        *(_insert(urls[name], _SENT_SQL, rows) for name, rows in sent.items()),
        *(_insert(urls[name], _KEY_SQL, rows) for name, rows in keys.items()),
        *(_insert(urls[name], _WALLET_SQL, rows) for name, rows in wallets.items()),
        *(_insert(urls[name], _GRANT_SQL, rows) for name, rows in grants.items()),
    )
    return made


def _seed_wallets(
    doc: RingDoc, ids: IdGenerator, uids: range, now_ms: int, cents: int = 1_000_000
) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, list[tuple[Any, ...]]]]:
    """A wallet per sender holding a dev starting grant, on the sender's owner (new senders
    only: a second seeding leaves the wallets it finds)."""
    wallets: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    grants: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    when = to_datetime(now_ms)
    for uid in uids:
        owner = doc.ring().owner_of_key(user_key(uid)).name
        wallets[owner].append((uid, cents, 1, when))
        grants[owner].append((ids.next_id(), uid, "grant", "dev", cents, None, cents, when))
    return wallets, grants


def _seed_received(
    doc: RingDoc, packets: list[int], uids: range, per_user: int, amount: int = 100
) -> dict[str, list[tuple[Any, ...]]]:
    """``per_user`` shares taken by each of ``uids``, of packets picked at random, on each
    user's owner (the rows the relay would have merged there)."""
    rows: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    if not per_user or not packets:
        return rows
    rng = random.Random(len(packets))
    ring = doc.ring()
    for uid in uids:
        owner = ring.owner_of_key(user_key(uid)).name
        for packet_id in set(rng.sample(packets, min(per_user, len(packets)))):
            when = IdGenerator.timestamp_ms(packet_id)
            rows[owner].append(
                (uid, packet_id, year_of(when), uid + 1, f"user{uid + 1}", "", "lucky", amount,
                 0, to_datetime(when))
            )  # fmt: skip
    return rows


_RECEIVED_SQL = (
    "INSERT INTO user_received (uid, red_packet_id, year, sender_uid, sender_nick, sender_img, "
    "kind, amount, luckiest, create_time) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_PACKET_SQL = f"INSERT INTO red_packet_info ({PACKET_COLUMNS}) VALUES ({PACKET_PLACEHOLDERS})"
_SENT_SQL = (
    "INSERT INTO user_sent (uid, red_packet_id, year, kind, total_amount, total_packet, "
    "greeting, create_time, expire_time) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


_KEY_SQL = (
    "INSERT INTO idempotency_key (uid, idem_key, request_hash, red_packet_id, create_time) "
    "VALUES (%s, %s, %s, %s, %s)"
)
# a second seeding finds the wallets there: kept (no INSERT IGNORE: a warning per row)
_WALLET_SQL = (
    "INSERT INTO wallet (uid, balance, granted, update_time) VALUES (%s, %s, %s, %s) "
    "ON DUPLICATE KEY UPDATE uid = uid"
)
_GRANT_SQL = (
    "INSERT INTO wallet_txn (id, uid, kind, ref, amount, red_packet_id, balance_after, "
    "create_time) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE uid = uid"
)


async def _insert(mysql_url: str | None, statement: str, rows: list[tuple[Any, ...]]) -> None:
    assert mysql_url, "seeding needs every node's mysql URL in the ring"
    conn = await connect_one(mysql_url)
    try:
        async with conn.cursor() as cur:
            for start in range(0, len(rows), SEED_CHUNK):
                await cur.executemany(statement, rows[start : start + SEED_CHUNK])
                await conn.commit()
    finally:
        conn.close()


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Probe:
    """Opens of seeded packets and a trickle of creates, each timed, until stopped."""

    gateway_url: str
    jwt_secret: str
    packets: list[int]
    # the gateway takes only the ids it gives (issue 19): raw snowflakes are answered 404 by
    # the gateway itself, and the opens would never reach a node
    public_ids: PublicIds
    workers: int = 8
    create_every_s: float = 0.1
    opens: list[tuple[float, float, int]] = field(default_factory=list)  # (at, latency, status)
    creates: list[tuple[float, int]] = field(default_factory=list)  # (answered at, id)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tokens: dict[int, str] = field(default_factory=dict)

    def _auth(self, uid: int) -> dict[str, str]:
        if uid not in self._tokens:
            self._tokens[uid] = mint_token(self.jwt_secret, uid, f"user{uid}")
        return {"Authorization": f"Bearer {self._tokens[uid]}"}

    async def _opener(self, session: aiohttp.ClientSession, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            packet_id, uid = rng.choice(self.packets), rng.randint(1, 50_000)
            started = time.monotonic()
            public_id = self.public_ids.format(packet_id)
            url = f"{self.gateway_url}/v1/red-packets/{public_id}/open"
            try:
                async with session.post(url, headers=self._auth(uid)) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                status = 599
            self.opens.append((started, time.monotonic() - started, status))

    async def warm(self, at_once: int = 32) -> None:
        """One grab of every packet the probe opens, so each is in its node's Redis, as a
        crowd's fresh packets are (a grab loads a packet Redis does not hold)."""
        slots = asyncio.Semaphore(at_once)

        async def grab(session: aiohttp.ClientSession, packet_id: int) -> None:
            url = f"{self.gateway_url}/v1/red-packets/{self.public_ids.format(packet_id)}/grab"
            async with slots, session.post(url, headers=self._auth(1)) as resp:
                await resp.read()

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await asyncio.gather(*(grab(session, p) for p in self.packets))

    async def _creator(self, session: aiohttp.ClientSession) -> None:
        n = 0
        while not self.stop.is_set():
            body = {"total_amount": 100, "total_packet": 1}
            url = f"{self.gateway_url}/v1/red-packets"
            try:
                async with session.post(url, json=body, headers=self._auth(9_000 + n % 100)) as r:
                    answer = await r.json(content_type=None)
                    if r.status == 201:
                        self.creates.append(
                            (time.monotonic(), snowflake_of(answer["red_packet_id"]))
                        )
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                pass
            n += 1
            await asyncio.sleep(self.create_every_s)

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await asyncio.gather(
                *(self._opener(session, i) for i in range(self.workers)), self._creator(session)
            )

    def latency_ms(self, start: float, end: float) -> dict[str, float | int]:
        """p50/p99 (ms) of the opens that started in ``[start, end)``, and how many failed."""
        window = sorted(lat for at, lat, status in self.opens if start <= at < end)
        failed = sum(1 for at, _, status in self.opens if start <= at < end and status >= 500)
        # opens a node answered with a share (the rest: sold out, already opened, refused)
        shares = sum(1 for at, _, status in self.opens if start <= at < end and status == 200)
        if not window:
            return {"opens": 0, "failed_5xx": failed}
        pick = lambda q: round(window[min(len(window) - 1, int(q * len(window)))] * 1000, 1)  # noqa: E731
        return {
            "opens": len(window),
            "p50_ms": pick(0.5),
            "p99_ms": pick(0.99),
            "shares_200": shares,
            "failed_5xx": failed,
        }


def first_on(node_ids: set[int], creates: list[tuple[float, int]], since: float) -> float | None:
    """Seconds from ``since`` until the first create answered from ``node_ids`` was made."""
    times = [at - since for at, packet_id in creates if packet_id in node_ids and at >= since]
    return round(min(times), 2) if times else None


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# -- the benchmark ----------------------------------------------------------------------------


async def run_bench(
    rebalancer: Any,
    state: dict[str, Any],
    *,
    mode: str,
    node: str,
    packets: int,
    senders: int,
    phase_s: float,
    received: int = 0,
    hot: int = 0,
) -> dict[str, Any]:
    """Seed, then measure opens for ``phase_s`` before, during and after one ring change
    (``mode``: add-no-move, add or remove) made by ``rebalancer`` (a Rebalancer). ``hot``:
    the opens go to the newest ``hot`` seeded packets, grabbed once first so they are in
    Redis, as a crowd's fresh packets are (0: to every seeded packet, most of them opened
    for the first time and loaded from MySQL, as after a Redis restart)."""
    doc = await rebalancer.backend.read_ring()
    seed_started = time.monotonic()
    seeded = await seed_packets(doc, packets, senders=senders, received=received)
    seed_s = time.monotonic() - seed_started
    public_ids = PublicIds(derive_id_key(state["node_secret"]))  # the dev cluster's key
    opened = seeded[-hot:] if hot > 0 else seeded
    probe = Probe(state["gateway"]["url"], state["jwt_secret"], opened, public_ids)
    if hot > 0:
        await probe.warm()
    started = time.monotonic()
    load = asyncio.ensure_future(probe.run())
    await asyncio.sleep(phase_s)
    change_started = time.monotonic()
    if mode == "remove":
        rc = await rebalancer.remove(node)
    else:
        rc = await rebalancer.add(node, move=(mode == "add"))
    change_ended = time.monotonic()
    await asyncio.sleep(phase_s)
    probe.stop.set()
    await load
    final = await rebalancer.backend.read_ring()
    target = final.node(node)
    on_new: set[int] = set()
    if target is not None and mode != "remove":
        ids = [pid for _, pid in probe.creates]
        on_new = await _held_by(target.mysql, ids)
    timings = rebalancer.timings
    return {
        "when": utc_now(),
        "mode": mode,
        "node": node,
        "exit_code": rc,
        "seeded_packets": packets,
        "hot_packets": hot,  # 0: opens of every seeded packet (most loaded from MySQL)
        # rows a seeded sender moves: a key and a user_sent row per packet, plus its shares
        "rows_per_user": round(2 * packets / senders + received, 1) if senders else None,
        "seeded_per_s": round(packets / seed_s) if seed_s else None,
        "change_s": round(change_ended - change_started, 2),
        "first_create_on_new_shard_s": first_on(on_new, probe.creates, change_started),
        "packets_moved": rebalancer.moved_packets,
        "packets_per_s": _rate(rebalancer.moved_packets, timings.get("packets_s")),
        "users_moved": rebalancer.moved_users,
        "users_per_s": _rate(rebalancer.moved_users, timings.get("users_s")),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "open_before": probe.latency_ms(started, change_started),
        "open_during": probe.latency_ms(change_started, change_ended),
        # the parts of the change: packets handed off, then users' keys, history, wallets
        **_phases(probe, rebalancer.marks),
        "open_after": probe.latency_ms(change_ended, time.monotonic()),
        "creates": len(probe.creates),
    }


def _phases(probe: Probe, marks: dict[str, float]) -> dict[str, Any]:
    out = {}
    if "packets" in marks:
        out["open_during_packets"] = probe.latency_ms(
            marks["packets"], marks.get("users", marks.get("users_end", time.monotonic()))
        )
    if "users" in marks and "users_end" in marks:
        out["open_during_users"] = probe.latency_ms(marks["users"], marks["users_end"])
    return out


def _rate(count: int, seconds: float | None) -> float | None:
    return round(count / seconds, 1) if count and seconds else None


async def _held_by(mysql_url: str | None, ids: list[int]) -> set[int]:
    if not ids or not mysql_url:
        return set()
    conn = await connect_one(mysql_url)
    try:
        async with conn.cursor() as cur:
            marks = ", ".join(["%s"] * len(ids))
            await cur.execute(
                f"SELECT red_packet_id FROM red_packet_info WHERE red_packet_id IN ({marks})",
                tuple(ids),
            )
            return {int(r[0]) for r in await cur.fetchall()}
    finally:
        conn.close()
