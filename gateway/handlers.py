"""The public API (docs/api.md, gateway/openapi.json): authenticate, check, route, answer.

Every handler starts the same way: the user comes from the verified token (never from the
body), the red packet id from the path. Nodes are called through the node client
(``nodeclient/``: typed calls, routing, moves); their answers are passed through as they are,
the node already speaks the public error shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from typing import Any

import orjson
from aiohttp import web

from redpacket.core.amounts import check_sender, parse_new_packet, refuse_unknown_fields
from redpacket.core.body import read_json_object
from redpacket.core.errors import ApiError, gone, json_response
from redpacket.core.ids import IdGenerator, PublicIds
from redpacket.core.metrics import REJECTIONS
from redpacket.gateway.auth import Authenticator, User
from redpacket.gateway.finished import FinishedPackets
from redpacket.gateway.ratelimit import RateLimiter
from redpacket.gateway.settings import GatewaySettings
from redpacket.nodeclient.client import Answer, NodeClient, Opened

log = logging.getLogger("redpacket.gateway")

SETTINGS = web.AppKey("settings", GatewaySettings)
AUTH = web.AppKey("auth", Authenticator)
NODES = web.AppKey("nodes", NodeClient)
IDS = web.AppKey("ids", IdGenerator)
FINISHED = web.AppKey("finished", FinishedPackets)
CREATE_LIMIT = web.AppKey("create_limit", RateLimiter)
OPEN_LIMIT = web.AppKey("open_limit", RateLimiter)
CONFIRMING = web.AppKey("confirming", set)  # holds being confirmed after their 201
PUBLIC_IDS = web.AppKey("public_ids", PublicIds)
UNKNOWN_LIMIT = web.AppKey("unknown_limit", RateLimiter)

_FINAL_REASONS = ("sold_out", "expired")
# What a latecomer to a finished packet gets, built once: this is the crowd's hot path, and
# prebuilt bodies and counters (no exception through the middlewares for the 410) measured
# about 5% less gateway CPU per rejection (docs/benchmarks.md).
_REJECTED = {reason: REJECTIONS.labels("gateway", reason) for reason in _FINAL_REASONS}
_GRAB_FINAL = {r: orjson.dumps({"can_open": False, "reason": r}) for r in _FINAL_REASONS}
_OPEN_FINAL = {r: orjson.dumps(gone(r).body()) for r in _FINAL_REASONS}


def passthrough(answer: Answer) -> web.Response:
    headers = {"Retry-After": answer.retry_after} if answer.retry_after else None
    return web.Response(
        body=answer.body(), status=answer.status, content_type="application/json", headers=headers
    )


def _user(request: web.Request) -> User:
    return request.app[AUTH].user(request.headers.get("Authorization"))


def _packet_id(request: web.Request, user: User) -> int:
    """The snowflake of the public id in the path (core/ids.py PublicIds).

    Every "no such red packet" a user gets spends a token of their unknown-id bucket, and a
    user whose bucket is empty gets 429 before the id is even looked at: guessing ids costs
    the guesser (issue 19), and a 200 cannot tell an exhausted guesser a right guess."""
    unknown = request.app[UNKNOWN_LIMIT]
    unknown.check(user.uid)
    try:
        return request.app[PUBLIC_IDS].parse(request.match_info["id"])
    except ApiError as err:
        if err.status == 404:
            unknown.take(user.uid)
        raise


def _counted(request: web.Request, user: User, answer: Answer) -> Answer:
    """A node's 404 for a packet counts against the caller like a bad tag does."""
    if answer.status == 404:
        request.app[UNKNOWN_LIMIT].take(user.uid)
    return answer


def with_public_ids(
    request: web.Request, answer: Answer, rows: str = "", status: int = 0
) -> web.Response:
    """The node's answer with every red packet id in it made public (the body's own
    ``red_packet_id``, and each row's in the list ``rows``); errors pass through."""
    if answer.status not in (200, 201):
        return passthrough(answer)
    ids = request.app[PUBLIC_IDS]
    data = answer.data
    for item in [data, *(data.get(rows) or [] if rows else [])]:
        if "red_packet_id" in item:
            item["red_packet_id"] = ids.format(int(item["red_packet_id"]))
    return json_response(data, status=status or answer.status)


async def _empty_body(request: web.Request) -> None:
    """grab and open take no fields: the uid comes from the token, so a body may only be {}."""
    if request.can_read_body:
        refuse_unknown_fields(await read_json_object(request), frozenset())


def _valid_idempotency_key(raw: str) -> str:
    if not (0 < len(raw) <= 255 and all("!" <= ch <= "~" for ch in raw)):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters (no spaces)",
        )
    return raw


# -- create ---------------------------------------------------------------------------------


async def create_packet(request: web.Request) -> web.Response:
    app = request.app
    user = _user(request)
    app[CREATE_LIMIT].take(user.uid)
    new = parse_new_packet(await read_json_object(request), app[SETTINGS].limits)
    check_sender(new, user.uid)
    nodes, ids = app[NODES], app[IDS]
    fields: dict[str, Any] = {
        "uid": str(user.uid),
        "total_amount": new.total_amount,
        "total_packet": new.total_packet,
        "greeting": new.greeting,
        "expire_seconds": app[SETTINGS].expire_s,
        "nick_name": user.nick_name,
        "img_url": user.img_url,
    }
    if new.kind != "lucky":  # lucky is the node's default: today's body, unchanged
        fields["kind"] = new.kind
    if new.amount_each is not None:
        fields["amount_each"] = new.amount_each
    if new.receiver_uid is not None:
        fields["receiver_uid"] = str(new.receiver_uid)
    raw_key = request.headers.get("Idempotency-Key")
    if raw_key is None:
        token, packet_id = secrets.token_hex(16), ids.next_id()
    else:
        bound = await _bind_key(app, user, new, _valid_idempotency_key(raw_key))
        if isinstance(bound, web.Response):
            return bound
        token, packet_id = bound
    fields["create_token"] = token
    held = await _hold(app, user.uid, new.total_amount, token, packet_id)
    if held is not None:
        return held  # 402 (not enough money) or another refusal: no packet
    answer = await nodes.create(packet_id, fields)
    if answer.code == "id_collision":
        # The id belongs to someone else's packet (two gateways made the same id in the same
        # millisecond). Never merge: refuse; the hold is given back by the wallet's sweeper
        # (the packet's shard answers that this create's packet does not exist). The client
        # retries (with a new key). Astronomically rare; see docs/api.md.
        if raw_key is not None:
            raise ApiError(409, "id_collision", "retry this create with a new Idempotency-Key")
        raise ApiError(
            503, "unavailable", "could not allocate a red packet id; retry",
            headers={"Retry-After": "1"},
        )  # fmt: skip
    if answer.status in (200, 201):  # 200: the node already had it, a replayed create
        _confirm_soon(app, user.uid, token)
        response = with_public_ids(request, answer, status=201)
        if answer.status == 200:
            response.headers["Idempotent-Replayed"] = "true"
        return response
    # not created (yet): the hold stays until a retry with the same Idempotency-Key creates
    # the packet, or the wallet's sweeper asks the packet's shard and settles it
    return passthrough(answer)


async def _bind_key(
    app: web.Application, user: User, new: Any, key: str
) -> tuple[str, int] | web.Response:
    """The create token and packet id an Idempotency-Key stands for (bound on first use), or
    the shard's refusal to pass on."""
    described: list[Any] = [new.total_amount, new.total_packet, new.greeting]
    if new.kind != "lucky":  # a lucky packet hashes as it did before kinds existed
        described += [new.kind, new.amount_each, new.receiver_uid]
    request_hash = hashlib.sha256(orjson.dumps(described)).hexdigest()
    token = hashlib.sha256(f"{user.uid}:{key}".encode()).hexdigest()[:32]
    bound = await app[NODES].claim_idempotency_key(user.uid, key, request_hash, app[IDS].next_id())
    if bound.status != 200:
        return passthrough(bound)
    binding = bound.data
    if binding["request_hash"] != request_hash:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different red packet",
        )
    return token, int(binding["red_packet_id"])


async def _hold(
    app: web.Application, uid: int, amount: int, token: str, packet_id: int
) -> web.Response | None:
    """Debit the sender on their wallet's shard before the packet exists (keyed by the create
    token: a retried create debits once). None when held; else the answer to give."""
    held = await app[NODES].hold(uid, amount, token, packet_id, app[SETTINGS].dev_starting_balance)
    if held.status != 200:
        return passthrough(held)
    if held.data["state"] == "released":  # the sweeper gave this create's money back
        raise ApiError(409, "create_abandoned", "this create was abandoned; use a new key")
    return None


def _confirm_soon(app: web.Application, uid: int, token: str) -> None:
    """Confirm the hold after answering: the client's 201 does not wait for it (it only marks
    the hold settled; the debit was final at the hold), and the sweeper does it otherwise."""
    task = asyncio.get_running_loop().create_task(_confirm(app, uid, token))
    pending = app[CONFIRMING]
    pending.add(task)
    task.add_done_callback(pending.discard)


async def _confirm(app: web.Application, uid: int, token: str) -> None:
    """The packet exists: the hold becomes final. Best effort: the sweeper does it otherwise."""
    try:
        await app[NODES].confirm_hold(uid, token)
    except ApiError:
        log.info("could not confirm a hold now; the wallet's sweeper will")


# -- reads ----------------------------------------------------------------------------------


async def get_packet(request: web.Request) -> web.Response:
    user = _user(request)
    packet_id = _packet_id(request, user)
    answer = await request.app[NODES].info(packet_id)
    return with_public_ids(request, _counted(request, user, answer))


async def list_records(request: web.Request) -> web.Response:
    user = _user(request)
    packet_id = _packet_id(request, user)
    params = {k: request.query[k] for k in ("limit", "cursor") if k in request.query}
    answer = await request.app[NODES].records(packet_id, params)
    return passthrough(_counted(request, user, answer))


# -- grab and open --------------------------------------------------------------------------


async def grab(request: web.Request) -> web.Response:
    app = request.app
    user = _user(request)
    packet_id = _packet_id(request, user)
    await _empty_body(request)
    finished = app[FINISHED].get(packet_id)
    if finished is not None:
        amount = finished.winners.get(user.uid)
        if amount is not None:
            return json_response({"can_open": False, "reason": "already_opened", "amount": amount})
        _REJECTED[finished.reason].inc()
        return web.Response(body=_GRAB_FINAL[finished.reason], content_type="application/json")
    answer = _counted(request, user, await app[NODES].grab(packet_id, user.uid))
    if answer.status == 200 and answer.data.get("reason") in _FINAL_REASONS:
        _learn_winners(app, packet_id)
    return passthrough(answer)


async def open_packet(request: web.Request) -> web.Response:
    app = request.app
    user = _user(request)
    packet_id = _packet_id(request, user)
    await _empty_body(request)
    finished = app[FINISHED].get(packet_id)
    if finished is not None:
        amount = finished.winners.get(user.uid)
        if amount is not None:
            return json_response({"amount": amount, "replayed": True})
        _REJECTED[finished.reason].inc()
        return web.Response(
            body=_OPEN_FINAL[finished.reason], status=410, content_type="application/json"
        )
    app[OPEN_LIMIT].take(user.uid)
    result = await app[NODES].open(packet_id, user.uid, user.nick_name, user.img_url)
    if isinstance(result, Opened):
        return json_response({"amount": result.amount, "replayed": result.replayed})
    _counted(request, user, result)
    if result.status == 410:
        _learn_winners(app, packet_id)
    return passthrough(result)


def _learn_winners(app: web.Application, packet_id: int) -> None:
    """Fetch a finished packet's winners once, in the background, to answer later calls here."""
    finished = app[FINISHED]
    if packet_id in finished.learning:
        return

    async def learn() -> None:
        try:
            known = await app[NODES].winners(packet_id)
            if known is not None and known.final in _FINAL_REASONS and known.complete:
                finished.remember(packet_id, known.final, known.winners)
        except Exception:
            log.debug("could not learn winners of %s", packet_id, exc_info=True)
        finally:
            # a packet whose last commits are still landing is asked again a little later
            asyncio.get_running_loop().call_later(0.2, finished.learning.pop, packet_id, None)

    finished.learning[packet_id] = asyncio.ensure_future(learn())


# -- service --------------------------------------------------------------------------------


async def healthz(_: web.Request) -> web.Response:
    return json_response({"ok": True})


async def _shard_states(client: NodeClient) -> dict[str, str]:
    """Each shard of the ring: "ready" when its node's /readyz is 200 (its Redis and MySQL
    answer), else "down"."""
    nodes = list(client.ring_doc.ring().nodes.values())
    results = await asyncio.gather(*(client.ready(n) for n in nodes))
    return {n.name: ("ready" if ok else "down") for n, ok in zip(nodes, results, strict=True)}


async def readyz(request: web.Request) -> web.Response:
    """This gateway can serve: it answers (so it listens), its ring is loaded and watched,
    and its node links are managed. Shards that are down do NOT make it unready: a dead
    shard costs only its own packets, and a readiness probe that failed on any shard would
    empty the gateway Service for every shard at once (issue 20). The body still lists each
    shard's state; ``/readyz/shards`` is the signal that every shard is up."""
    nodes = request.app[NODES]
    problems = []
    if not nodes.ring.watching:
        problems.append("the ring file is not being watched")
    if nodes.http.session.closed:
        problems.append("the node links are closed")
    status = await _shard_states(nodes)
    if problems:
        raise ApiError(503, "unavailable", "; ".join(problems), extra={"shards": status})
    body = {"ready": True, "ring_version": nodes.ring_doc.version, "shards": status}
    return json_response(body)


async def readyz_shards(request: web.Request) -> web.Response:
    """Every shard of the ring is up (for alerts and `helm test`, not for the gateway's own
    readiness probe): 200, or 503 naming the shards that are down."""
    nodes = request.app[NODES]
    status = await _shard_states(nodes)
    if any(state != "ready" for state in status.values()):
        raise ApiError(503, "unavailable", "not every shard is ready", extra={"shards": status})
    return json_response({"ready": True, "ring_version": nodes.ring_doc.version, "shards": status})


# -- my red packets -------------------------------------------------------------------------


async def _my_history(request: web.Request, which: str) -> web.Response:
    """One call to the shard owning ``user:<uid>``: a user's history is one shard's read."""
    user = _user(request)  # the parameters were checked at the edge (gateway/app.py)
    params = {k: request.query[k] for k in ("year", "limit", "cursor") if k in request.query}
    answer = await request.app[NODES].user_page(user.uid, which, params)
    return with_public_ids(request, answer, "records" if which == "received" else "packets")


async def my_received(request: web.Request) -> web.Response:
    return await _my_history(request, "received")


async def my_sent(request: web.Request) -> web.Response:
    return await _my_history(request, "sent")
