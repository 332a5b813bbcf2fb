"""The mixed load: virtual users creating, grabbing, opening (and opening again), reading
packets, records and their own history, through the public API only, and keeping every
answer they got, so that the verdict can hold the system to it.

What the API offers is read from the gateway's ``/openapi.json``: the packet kinds the
create body's ``kind`` enumerates (only ``lucky`` when it has none), and the per-user history
routes (``/v1/me/received``, ``/v1/me/sent``) when they exist. A new packet kind is one entry
in :data:`KINDS`; a new read is one entry in :meth:`Load._ops`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from redpacket.chaos.wallets import POOR_UID, WalletsSeen, over_balance_body
from redpacket.gateway.auth import mint_token
from redpacket.gateway.wallet import SIGNATURE_HEADER, signature_header

FIRST_UID = 10_000
MAX_AMOUNT = 20_000

# An answer that says nothing about what happened: the client must find out later.
UNKNOWN = ("timeout", "conn_error", "500", "502", "503", "504")


def _lucky(rng: random.Random, sender: int, users: list[int]) -> dict[str, Any]:
    shares = rng.randint(1, 8)
    return {
        "total_amount": rng.randint(shares, min(MAX_AMOUNT, shares * 300)),
        "total_packet": shares,
    }


def _equal(rng: random.Random, sender: int, users: list[int]) -> dict[str, Any]:
    shares = rng.randint(1, 8)
    return {"kind": "equal", "amount_each": rng.randint(1, 300), "total_packet": shares}


def _exclusive(rng: random.Random, sender: int, users: list[int]) -> dict[str, Any]:
    receiver = rng.choice([u for u in users if u != sender] or users)
    return {
        "kind": "exclusive",
        "receiver_uid": str(receiver),
        "total_amount": rng.randint(1, 2000),
        "total_packet": 1,
    }


# kind -> a create body for it (random sizes, always valid)
KINDS: dict[str, Callable[[random.Random, int, list[int]], dict[str, Any]]] = {
    "lucky": _lucky,
    "equal": _equal,
    "exclusive": _exclusive,
}


@dataclass(frozen=True)
class Api:
    """What this gateway's API has, as its OpenAPI document says."""

    kinds: tuple[str, ...] = ("lucky",)
    history: bool = False  # GET /v1/me/received and /v1/me/sent

    @classmethod
    def from_openapi(cls, doc: dict[str, Any]) -> Api:
        schema = doc.get("components", {}).get("schemas", {}).get("NewRedPacket", {})
        enum = schema.get("properties", {}).get("kind", {}).get("enum") or ["lucky"]
        paths = doc.get("paths", {})
        return cls(
            kinds=tuple(k for k in enum if k in KINDS) or ("lucky",),
            history="/v1/me/received" in paths and "/v1/me/sent" in paths,
        )


@dataclass
class Packet:
    """A packet a client saw created (201), with the body that created it."""

    id: str  # the public id, as the API gave it (opaque)
    sender: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", "lucky"))

    @property
    def receiver(self) -> int | None:
        uid = self.body.get("receiver_uid")
        return int(uid) if uid is not None else None


@dataclass
class Answer:
    status: int | None  # None: no answer (timeout, connection refused or cut)
    body: Any
    outcome: str  # "200", "503", "timeout", "conn_error", ...

    @property
    def unknown(self) -> bool:
        return self.outcome in UNKNOWN


class Client:
    """The public API over one aiohttp session, with a token per user."""

    def __init__(self, url: str, jwt_secret: str, timeout_s: float = 10.0) -> None:
        self.url = url
        self._secret = jwt_secret
        self._tokens: dict[int, str] = {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), timeout=self._timeout
        )

    def _token(self, uid: int) -> str:
        if uid not in self._tokens:
            self._tokens[uid] = mint_token(self._secret, uid, f"user{uid}", "", 7 * 86400)
        return self._tokens[uid]

    async def call(
        self,
        method: str,
        path: str,
        uid: int,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        timeout_s: float | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        """``uid`` 0: no user token (the payment provider's calls); ``raw``: these exact bytes
        as a JSON body (a signed one) instead of ``body``."""
        auth = {"Authorization": f"Bearer {self._token(uid)}"} if uid else {}
        if raw is not None:
            auth["Content-Type"] = "application/json"
        all_headers = {**auth, **(headers or {})}
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else self._timeout
        try:
            async with self.session.request(
                method,
                self.url + path,
                json=body if raw is None else None,
                data=raw,
                headers=all_headers,
                params=params,
                timeout=timeout,
            ) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                return Answer(resp.status, data, str(resp.status))
        except TimeoutError:
            return Answer(None, None, "timeout")
        except aiohttp.ClientError:
            return Answer(None, None, "conn_error")

    async def close(self) -> None:
        await self.session.close()


@dataclass
class Outcomes:
    """Everything the clients saw, kept for the verdict and the report."""

    started: float = field(default_factory=time.monotonic)
    ops: Counter[tuple[str, str]] = field(default_factory=Counter)  # (op, outcome) -> count
    per_second: dict[int, Counter[str]] = field(default_factory=dict)  # second -> ok/error
    packets: dict[str, Packet] = field(default_factory=dict)
    opened: dict[tuple[str, int], int] = field(default_factory=dict)  # (packet, uid) -> amount
    opened_at: dict[str, dict[int, float]] = field(default_factory=dict)  # first 200, run s
    refused: dict[tuple[str, int], str] = field(default_factory=dict)  # last known "no share"
    unknown_opens: set[tuple[str, int]] = field(default_factory=set)
    # the last moment (run s) each open was answered without an outcome: liveness
    last_unknown_open: dict[tuple[str, int], float] = field(default_factory=dict)
    unknown_creates: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    contradictions: list[str] = field(default_factory=list)  # seen during the run
    # what reads showed last: (answered at, value), to hold later reads to it
    remaining: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    received_count: dict[int, tuple[float, int]] = field(default_factory=dict)
    wallets: WalletsSeen = field(default_factory=WalletsSeen)

    def now(self) -> float:
        """Seconds since the start of the run."""
        return time.monotonic() - self.started

    def count(self, op: str, answer: Answer) -> None:
        self.ops[(op, answer.outcome)] += 1
        bucket = self.per_second.setdefault(int(self.now()), Counter())
        bucket["error" if answer.unknown else "ok"] += 1

    def saw_open(self, packet: str, uid: int, answer: Answer) -> None:
        """Fold one open answer into what is known about (packet, uid)."""
        key = (packet, uid)
        if answer.status == 200 and isinstance(answer.body, dict):
            amount = int(answer.body["amount"])
            first = self.opened.setdefault(key, amount)
            self.opened_at.setdefault(packet, {}).setdefault(uid, self.now())
            if first != amount:
                self.contradictions.append(
                    f"red packet {packet}: uid {uid} was answered {first} then {amount}"
                )
            self.unknown_opens.discard(key)
            self.refused.pop(key, None)
        elif answer.unknown:
            self.last_unknown_open[key] = self.now()
            if key not in self.opened:
                self.unknown_opens.add(key)
        elif answer.status in (403, 404, 410):
            self.unknown_opens.discard(key)
            if key not in self.opened:
                code = (answer.body or {}).get("error", {}).get("code", answer.outcome)
                self.refused[key] = str(code)
        self.saw_packet_answer(packet, "open", answer)

    def saw_packet_answer(self, packet: str, op: str, answer: Answer) -> None:
        """A packet that was created (201 seen) is never answered 404, by any call."""
        if answer.status == 404 and packet in self.packets:
            self.contradictions.append(
                f"red packet {packet}: created (201) but {op} answered 404 at "
                f"{self.now():.1f}s: {str(answer.body)[:160]}"
            )

    def saw_info(self, packet: str, sent_s: float, answer: Answer) -> None:
        """``remaining_*`` never goes up (a refund pays what remained; it does not add any):
        a read sent after another was answered shows no more than that one did."""
        self.saw_packet_answer(packet, "GET packet", answer)
        if answer.status != 200 or not isinstance(answer.body, dict):
            return
        amount, shares = int(answer.body["remaining_amount"]), int(answer.body["remaining_packet"])
        last = self.remaining.get(packet)
        if last is not None and last[0] <= sent_s and (amount > last[1] or shares > last[2]):
            self.contradictions.append(
                f"red packet {packet}: remaining went up from {last[1]}/{last[2]} to "
                f"{amount}/{shares} at {self.now():.1f}s"
            )
        if last is None or (amount, shares) <= (last[1], last[2]):
            self.remaining[packet] = (self.now(), amount, shares)

    def saw_records(self, packet: str, sent_s: float, answer: Answer) -> None:
        """Every share whose open was answered 200 before this read was sent is in it (the
        records are the ledger, and 200 comes after the commit), and none ever leaves."""
        self.saw_packet_answer(packet, "records", answer)
        if answer.status != 200 or not isinstance(answer.body, dict):
            return
        if answer.body.get("next_cursor"):
            return  # one page of a longer list: not every share is on it
        listed = {int(r["uid"]) for r in answer.body.get("records", [])}
        for uid, at in self.opened_at.get(packet, {}).items():
            if at <= sent_s and uid not in listed:
                self.contradictions.append(
                    f"red packet {packet}: uid {uid}'s share (200 at {at:.1f}s) missing from "
                    f"the records read at {sent_s:.1f}s"
                )

    def saw_received(self, uid: int, sent_s: float, answer: Answer) -> None:
        """A share in a user's received history never disappears: the count of the year only
        grows between reads (how soon it appears is judged after the run, within
        HISTORY_BOUND_S: under faults delivery waits for the user's shard)."""
        if answer.status != 200 or not isinstance(answer.body, dict):
            return
        count = answer.body.get("count")
        if not isinstance(count, int):
            return
        last = self.received_count.get(uid)
        if last is not None and last[0] <= sent_s and count < last[1]:
            self.contradictions.append(
                f"uid {uid}: received history went from {last[1]} to {count} entries at "
                f"{self.now():.1f}s"
            )
        if last is None or count >= last[1]:
            self.received_count[uid] = (self.now(), count)


@dataclass
class Load:
    """``users`` virtual users, each a loop of random operations with short pauses."""

    client: Client
    api: Api
    seed: int
    users: int
    outcomes: Outcomes
    think_s: float = 0.05
    payments_secret: str = ""  # signs top-ups; none: the load makes no wallet calls
    starting_balance: int = 0  # every user's grant (the cluster's dev starting balance)
    max_ops_per_user: int = 1_000_000
    deadline: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=48))

    @property
    def uids(self) -> list[int]:
        return [FIRST_UID + i for i in range(self.users)]

    def _ops(self) -> dict[str, tuple[int, Callable[..., Any]]]:
        ops: dict[str, tuple[int, Callable[..., Any]]] = {
            "create": (5, self._create),
            "grab": (15, self._grab),
            "open": (35, self._open),
            "open_again": (10, self._open_again),
            "packet": (10, self._packet),
            "records": (10, self._records),
        }
        if self.api.history:
            ops["history"] = (10, self._history)
        if self.payments_secret:
            ops |= {
                "topup": (3, self._topup),
                "topup_replay": (2, self._topup_replay),
                "create_402": (2, self._create_402),
                "wallet": (4, self._wallet),
                "wallet_transactions": (2, self._wallet_transactions),
            }
        return ops

    async def run(self) -> None:
        """Until ``stop`` is set or ``deadline`` (monotonic; may be moved) has passed."""
        await asyncio.gather(*(self._user(i) for i in range(self.users)))

    async def _user(self, index: int) -> None:
        rng = random.Random(f"redpacket-chaos:{self.seed}:user:{index}")
        uid = FIRST_UID + index
        ops = self._ops()
        names, weights = list(ops), [w for w, _ in ops.values()]
        mine: list[str] = []  # packets this user opened (or tried to)
        for n in range(self.max_ops_per_user):
            if self.stop.is_set() or time.monotonic() >= self.deadline:
                return
            name = rng.choices(names, weights)[0]
            if not self.recent and name != "create":
                name = "create"
            await ops[name][1](rng, uid, n, mine)
            await asyncio.sleep(rng.uniform(0, 2 * self.think_s))

    def _pick(self, rng: random.Random) -> str:
        return rng.choice(self.recent)

    async def _create(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        kind = rng.choice(self.api.kinds)
        body = KINDS[kind](rng, uid, self.uids)
        if len(self.api.kinds) > 1:
            body = {"kind": kind, **body}
        key = f"chaos-{self.seed}-{uid}-{n}"
        answer = await self.client.call(
            "POST", "/v1/red-packets", uid, body=body, headers={"Idempotency-Key": key}
        )
        self.outcomes.count("create", answer)
        if answer.status == 201:
            self.saw_created(uid, body, answer.body)
        elif answer.unknown:
            self.outcomes.unknown_creates.append((uid, key, body))
        elif answer.status == 402:
            self.outcomes.wallets.saw_402(uid, body, answer)

    def saw_created(self, uid: int, body: dict[str, Any], answer: dict[str, Any]) -> None:
        packet = Packet(str(answer["red_packet_id"]), uid, body)
        self.outcomes.packets[packet.id] = packet
        self.recent.append(packet.id)

    async def _grab(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        packet = self._pick(rng)
        answer = await self.client.call("POST", f"/v1/red-packets/{packet}/grab", uid)
        self.outcomes.count("grab", answer)
        self.outcomes.saw_packet_answer(packet, "grab", answer)

    async def open_one(self, packet: str, uid: int, op: str = "open") -> Answer:
        answer = await self.client.call("POST", f"/v1/red-packets/{packet}/open", uid)
        self.outcomes.count(op, answer)
        self.outcomes.saw_open(packet, uid, answer)
        return answer

    async def _open(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        packet = self._pick(rng)
        packet_info = self.outcomes.packets.get(packet)
        if packet_info and packet_info.receiver is not None and rng.random() < 0.7:
            uid = packet_info.receiver  # exclusive packets are mostly opened by their receiver
        await self.open_one(packet, uid)
        mine.append(packet)

    async def _open_again(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        """The same user taps again: a replay must answer the same amount."""
        if not mine:
            return await self._open(rng, uid, n, mine)
        await self.open_one(rng.choice(mine[-20:]), uid, "open_again")
        return None

    async def _packet(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        packet, sent_s = self._pick(rng), self.outcomes.now()
        answer = await self.client.call("GET", f"/v1/red-packets/{packet}", uid)
        self.outcomes.count("packet", answer)
        self.outcomes.saw_info(packet, sent_s, answer)

    async def _records(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        packet, sent_s = self._pick(rng), self.outcomes.now()
        answer = await self.client.call(
            "GET", f"/v1/red-packets/{packet}/records", uid, params={"limit": "20"}
        )
        self.outcomes.count("records", answer)
        self.outcomes.saw_records(packet, sent_s, answer)

    async def _history(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        which, sent_s = rng.choice(("received", "sent")), self.outcomes.now()
        answer = await self.client.call("GET", f"/v1/me/{which}", uid, params={"limit": "20"})
        self.outcomes.count(f"history_{which}", answer)
        if which == "received":
            self.outcomes.saw_received(uid, sent_s, answer)

    # -- the wallet -------------------------------------------------------------------------

    async def topup_call(self, uid: int, amount: int, topup_id: str, op: str) -> Answer:
        """The payment provider's signed webhook, for ``uid`` (no user token)."""
        raw = orjson.dumps({"uid": str(uid), "amount": amount, "topup_id": topup_id})
        signed = {SIGNATURE_HEADER: signature_header(self.payments_secret, raw)}
        answer = await self.client.call("POST", "/v1/wallet/topups", 0, raw=raw, headers=signed)
        self.outcomes.count(op, answer)
        self.outcomes.wallets.saw_topup(uid, amount, topup_id, answer, self.outcomes.now())
        return answer

    async def _topup(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        amount = rng.randint(2_000, 30_000)
        await self.topup_call(uid, amount, f"chaos-{self.seed}-{uid}-{n}", "topup")

    async def _topup_replay(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        """The provider sends a top-up again: it must answer the first result, credit nothing."""
        own = self.outcomes.wallets.topups_of.get(uid)
        if not own:
            return await self._topup(rng, uid, n, mine)
        topup_id = rng.choice(own[-10:])
        first = self.outcomes.wallets.topups[topup_id]
        await self.topup_call(uid, first.amount, topup_id, "topup_replay")
        return None

    async def _create_402(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        """A create beyond the balance, by this loop's poor user (granted the starting
        balance, never a top-up, never a share): it must be 402, and stay 402 when retried."""
        poor = POOR_UID + uid - FIRST_UID
        body = over_balance_body(rng, self.starting_balance, MAX_AMOUNT)
        key = f"chaos-{self.seed}-{poor}-{n}"
        answer = await self.client.call(
            "POST", "/v1/red-packets", poor, body=body, headers={"Idempotency-Key": key}
        )
        self.outcomes.count("create_402", answer)
        self.outcomes.wallets.saw_over_balance(poor, key, body, answer, self.starting_balance)

    async def _wallet(self, rng: random.Random, uid: int, n: int, mine: list[str]) -> None:
        answer = await self.client.call("GET", "/v1/me/wallet", uid)
        self.outcomes.count("wallet", answer)
        self.outcomes.wallets.saw_wallet(uid, answer)

    async def _wallet_transactions(
        self, rng: random.Random, uid: int, n: int, mine: list[str]
    ) -> None:
        answer = await self.client.call(
            "GET", "/v1/me/wallet/transactions", uid, params={"limit": "20"}
        )
        self.outcomes.count("wallet_transactions", answer)
        self.outcomes.wallets.saw_transactions(uid, answer)


async def discover_api(client: Client) -> Api:
    """The API of the gateway, from its OpenAPI document (lucky only if it cannot be read)."""
    with contextlib.suppress(Exception):
        async with client.session.get(client.url + "/openapi.json") as resp:
            if resp.status == 200:
                return Api.from_openapi(await resp.json(content_type=None))
    return Api()
