"""The one client of the shard nodes: routing, deadlines, moves, and the typed calls.

Every caller of a node goes through :class:`NodeClient`: the gateway (over the link, or HTTP
with ``REDPACKET_NODE_TRANSPORT=http``), a node's relay and hold sweeper (HTTP, and calls to
itself run in process through its own call table), and ``redpacket rebalance``
(``sharding/client.py``, over HTTP). The rules live here once:

- **routing**: a packet goes to the owner by the ring version that placed it, a user to the
  owner of ``user:<uid>``, both by the previous ring while a change is in progress
  (``sharding/ring.py`` :func:`route_packet`, :func:`route_user`);
- **moves**: a node that handed a packet (or a user) off answers ``packet_moved`` with the
  new owner; the call follows, at most :data:`MAX_MOVED_HOPS` times. A packet being handed
  off answers ``packet_frozen``: :meth:`NodeClient.packet_call` retries briefly, then 503;
- **deadlines**: every call has one (``timeout_s``, 2 s for the gateway); no answer in time,
  or no connection, is :class:`~redpacket.core.errors.ApiError` 503 ``unavailable`` for that
  call alone; a node that refuses the secret is 502.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from redpacket.core.errors import ApiError, unavailable
from redpacket.core.logs import request_id
from redpacket.core.metrics import SHARD_CALLS, SHARD_ERRORS, SHARD_INFLIGHT, SHARD_LATENCY
from redpacket.nodeclient.http import HttpTransport
from redpacket.nodeclient.link import Links
from redpacket.nodeclient.ring import RingFile
from redpacket.nodeclient.wire import NodeDown
from redpacket.sharding.ring import NodeSpec, RingDoc, route_packet, route_user

log = logging.getLogger("redpacket.nodeclient")

MAX_MOVED_HOPS = 4  # packet_moved answers followed per call (a packet moved twice: 2 hops)


@dataclass(frozen=True, slots=True)
class Answer:
    """A node's answer, decoded once: status, its JSON value, ``Retry-After``, and the error
    code of a refusal (None for a success)."""

    status: int
    data: Any  # the node's JSON value (a dict for every call)
    retry_after: str | None
    code: str | None

    @classmethod
    def decode(cls, status: int, body: Any, retry_after: Any) -> Answer:
        """From a reply whose body is JSON bytes (HTTP, nodes of 0.1.0) or a value (link)."""
        if isinstance(body, bytes | bytearray):
            try:
                body = orjson.loads(body) if body else {}
            except orjson.JSONDecodeError:
                text = bytes(body[:200]).decode("latin1")
                body = {"error": {"code": "not_json", "message": text}}
        code = None
        if status >= 400 and isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict) and isinstance(error.get("code"), str):
                code = error["code"]
        return cls(status, body, retry_after if isinstance(retry_after, str) else None, code)

    @property
    def ok(self) -> bool:
        return self.status < 300

    @property
    def error(self) -> dict[str, Any]:
        """The error object of a refusal (``{}`` for a success or an odd body)."""
        error = self.data.get("error") if self.code is not None else None
        return error if isinstance(error, dict) else {}

    def body(self) -> bytes:
        return orjson.dumps(self.data)


LocalCalls = Callable[[str, dict[str, Any]], Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class Opened:
    amount: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class Winners:
    final: str | None  # "sold_out", "expired", or None while the packet is live
    complete: bool  # every share is committed
    winners: dict[int, int]  # uid -> amount


class NodeClient:
    """Calls to the shard nodes, routed by the ring (see the module docstring)."""

    def __init__(
        self,
        ring: RingFile,
        *,
        http: HttpTransport,
        links: Links | None = None,
        timeout_s: float = 2.0,
        frozen_retry_s: float = 1.0,
        local_name: str = "",
        local: LocalCalls | None = None,
        pass_server_errors: bool = False,
    ) -> None:
        """``links``: calls travel on the link (else HTTP). ``local``: calls to the node named
        ``local_name`` (or with no ring) run in this process. ``pass_server_errors``: a node's
        500 is handed back (a relay tells a refused batch from an outage by it) instead of
        becoming 502."""
        self.ring = ring
        self.http = http
        self._links = links
        self.timeout_s = timeout_s
        self._frozen_retry_s = frozen_retry_s
        self._local_name, self._local = local_name, local
        self._pass_server_errors = pass_server_errors
        self._metrics: dict[str, tuple[Any, Any, Any]] = {}  # per node, looked up once
        if links is not None:  # links to nodes no version names close once idle
            ring.on_change = lambda doc: links.keep_only({(n.name, n.url) for n in doc.all_nodes()})

    # -- routing --------------------------------------------------------------------------

    @property
    def ring_doc(self) -> RingDoc:
        assert self.ring.doc is not None, "this caller has no ring file"
        return self.ring.doc

    def owner(self, packet_id: int) -> NodeSpec | None:
        """The node to call first for a packet (None: no ring, this node owns everything)."""
        doc = self.ring.doc
        return route_packet(doc, packet_id) if doc is not None else None

    def user_owner(self, uid: int) -> NodeSpec | None:
        doc = self.ring.doc
        return route_user(doc, uid) if doc is not None else None

    def resolve(self, name: str, url: str) -> NodeSpec | None:
        """Where a ``packet_moved`` points: the ring's node of that name, or the URL the old
        owner gave (a node newer than this caller's ring: nodes are trusted peers). None when
        it names this node (its own call table answers)."""
        if name == self._local_name:
            return None
        known = self.ring.doc.node(name) if self.ring.doc is not None else None
        return known or NodeSpec(name, url.rstrip("/"))

    # -- calls ----------------------------------------------------------------------------

    async def call(
        self, node: NodeSpec | None, name: str, args: dict[str, Any], timeout_s: float = 0
    ) -> Answer:
        """Call ``node`` (None: this node) within ``timeout_s`` (0: the client's); if it
        answers that the packet (or user) moved, call the new owner."""
        answer = await self._once(node, name, args, timeout_s)
        for _ in range(MAX_MOVED_HOPS):
            if answer.code != "packet_moved":
                break
            error = answer.error
            owner, url = error.get("owner"), error.get("owner_url")
            if not isinstance(owner, str) or owner == (node.name if node else self._local_name):
                break
            node = self.resolve(owner, url if isinstance(url, str) else "")
            if node is not None and not node.url:  # a node of no ring and no URL: stop here
                break
            answer = await self._once(node, name, args, timeout_s)
        return answer

    async def packet_call(self, packet_id: int, name: str, args: dict[str, Any]) -> Answer:
        """Call the node that owns a packet; wait out a handoff and follow where it moved."""
        delay, waited = 0.02, 0.0
        for _ in range(50):
            doc = self.ring.doc  # read each time: the ring may switch meanwhile
            node = route_packet(doc, packet_id) if doc is not None else None
            answer = await self.call(node, name, args)
            code = answer.code
            if code == "packet_moved":  # call() followed as far as it could
                break
            if code != "packet_frozen":
                return answer
            if waited >= self._frozen_retry_s:
                break
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.25)
        raise unavailable("red packet is moving between shards; retry")

    async def user_call(self, uid: int, name: str, args: dict[str, Any]) -> Answer:
        """Call the node that keeps a user's own data (idempotency keys, history, wallet).

        While a rebalance moves the user, the old and new owner may each point at the other
        for a moment; what is left of that after following the moves is a 503 to retry,
        never the internal 421.
        """
        answer = await self.call(self.user_owner(uid), name, args)
        if answer.code == "packet_moved":
            raise unavailable("this user's data is moving between shards; retry")
        if answer.status == 404:
            # no user call answers 404 for data it lacks: the node does not know this call
            # at all, i.e. it still runs the previous release mid-upgrade (docs/deploy.md)
            raise unavailable("this user's shard is being upgraded; retry")
        return answer

    async def _once(
        self, node: NodeSpec | None, name: str, args: dict[str, Any], timeout_s: float
    ) -> Answer:
        if node is None or node.name == self._local_name:
            assert self._local is not None, "a call to this node needs its call table"
            return await self._local(name, args)
        metrics = self._metrics.get(node.name)
        if metrics is None:
            metrics = self._metrics[node.name] = (
                SHARD_CALLS.labels(node.name),
                SHARD_INFLIGHT.labels(node.name),
                SHARD_LATENCY.labels(node.name),
            )
        calls, inflight, latency = metrics
        calls.inc()
        inflight.inc()
        started = time.perf_counter()
        timeout_s = timeout_s or self.timeout_s
        try:
            if self._links is not None:
                link = self._links.get(node.name, node.url)
                reply = await link.call(name, args, rid=request_id.get(), timeout_s=timeout_s)
            else:
                reply = await self.http.call(
                    node.url, name, args, rid=request_id.get(), timeout_s=timeout_s
                )
        except NodeDown as down:
            SHARD_ERRORS.labels(node.name, down.kind).inc()
            if down.kind == "auth":
                raise _misconfigured(node) from None
            if down.kind == "timeout":
                raise unavailable(f"shard {node.name} did not answer in time") from None
            raise unavailable(f"shard {node.name} is unavailable") from None
        finally:
            inflight.dec()
            latency.observe(time.perf_counter() - started)
        answer = Answer.decode(*reply)
        if answer.status == 401:
            SHARD_ERRORS.labels(node.name, "auth").inc()
            raise _misconfigured(node)
        if answer.status >= 500:
            SHARD_ERRORS.labels(node.name, f"http_{answer.status}").inc()
            if answer.status != 503 and not self._pass_server_errors:
                raise ApiError(502, "bad_gateway", f"shard {node.name} failed to answer")
        return answer

    # -- the typed calls ------------------------------------------------------------------

    async def open(self, packet_id: int, uid: int, nick: str, img: str) -> Opened | Answer:
        """The opener's share, or the node's refusal (410 sold out/expired, 404, 503...)."""
        answer = await self.packet_call(
            packet_id, "open", {"id": packet_id, "uid": str(uid), "nick_name": nick, "img_url": img}
        )
        if answer.status == 200:
            return Opened(int(answer.data["amount"]), bool(answer.data["replayed"]))
        return answer

    async def grab(self, packet_id: int, uid: int) -> Answer:
        return await self.packet_call(packet_id, "grab", {"id": packet_id, "uid": str(uid)})

    async def info(self, packet_id: int) -> Answer:
        return await self.packet_call(packet_id, "info", {"id": packet_id})

    async def records(self, packet_id: int, page: dict[str, str]) -> Answer:
        """``page``: the caller's ``limit`` and ``cursor``, checked by the node."""
        return await self.packet_call(packet_id, "records", {"id": packet_id, **page})

    async def winners(self, packet_id: int) -> Winners | None:
        answer = await self.packet_call(packet_id, "winners", {"id": packet_id})
        if answer.status != 200:
            return None
        data = answer.data
        return Winners(
            data.get("final"),
            bool(data.get("complete")),
            {int(uid): amount for uid, amount in data["winners"].items()},
        )

    async def create(self, packet_id: int, fields: dict[str, Any]) -> Answer:
        """``fields``: the new packet's (node/handlers.py ``CREATE_FIELDS``)."""
        return await self.packet_call(
            packet_id, "create", {**fields, "red_packet_id": str(packet_id)}
        )

    async def claim_idempotency_key(
        self, uid: int, key: str, request_hash: str, packet_id: int
    ) -> Answer:
        args = {"uid": str(uid), "key": key, "request_hash": request_hash}
        return await self.user_call(
            uid, "claim_idempotency_key", {**args, "red_packet_id": str(packet_id)}
        )

    async def hold(
        self, uid: int, amount: int, token: str, packet_id: int, starting_balance: int
    ) -> Answer:
        args = {"create_token": token, "uid": str(uid), "amount": amount}
        args |= {"red_packet_id": str(packet_id), "starting_balance": starting_balance}
        return await self.user_call(uid, "hold", args)

    async def confirm_hold(self, uid: int, token: str) -> Answer:
        return await self.user_call(uid, "confirm_hold", {"create_token": token, "uid": str(uid)})

    async def topup(
        self, uid: int, topup_id: str, amount: int, digest: str, starting: int
    ) -> Answer:
        args = {"uid": str(uid), "topup_id": topup_id, "amount": amount}
        args |= {"body_sha256": digest, "starting_balance": starting}
        return await self.user_call(uid, "topup", args)

    async def wallet(self, uid: int, starting_balance: int, pending: Sequence[str]) -> Answer:
        args = {"uid": uid, "starting_balance": str(starting_balance)}
        if pending:
            args["pending"] = ",".join(pending)
        return await self.user_call(uid, "wallet", args)

    async def user_page(self, uid: int, which: str, page: dict[str, str]) -> Answer:
        """One page of ``received``, ``sent`` or ``transactions`` (``page``: the caller's
        ``year``/``limit``/``cursor``, checked by the node)."""
        return await self.user_call(uid, which, {"uid": uid, **page})

    async def incoming(self, node: NodeSpec, uid: int) -> dict[str, int]:
        """The user's committed shares still in ``node``'s outbox: ``{packet id: amount}``."""
        answer = await self.call(node, "incoming", {"uid": uid})
        return answer.data.get("shares", {}) if answer.status == 200 else {}

    async def ready(self, node: NodeSpec) -> bool:
        """The node's Redis and MySQL answer."""
        try:
            return (await self.call(node, "readyz", {})).status == 200
        except ApiError:
            return False

    async def apply_history(self, node: NodeSpec | None, events: Sequence[list[Any]]) -> Answer:
        """Merge events ``[uid, event, packet id, row]`` into the users' history on ``node``;
        the answer's ``moved`` names the owners of the users it does not keep. Not followed
        here: each user of a batch may have gone to another node (the relay sorts them)."""
        return await self._once(node, "apply_history", {"events": list(events)}, 0)

    async def abandon_create(self, packet_id: int, token: str) -> str:
        """The packet's shard's final word on a create: ``created``, ``other`` or
        ``abandoned`` (node/wallet/abandon.py)."""
        answer = await self.call(
            self.owner(packet_id), "abandon_create", {"id": packet_id, "create_token": token}
        )
        if answer.status != 200:
            raise RuntimeError(f"packet {packet_id}: {answer.status} {answer.error}")
        return str(answer.data["outcome"])


def _misconfigured(node: NodeSpec) -> ApiError:
    log.error("shard %s refused this caller's node secret", node.name)
    return ApiError(502, "bad_gateway", "the gateway is misconfigured for this shard")
