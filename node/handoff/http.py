"""The handoff API of a node (``/internal/v1/handoff/...``), called by ``redpacket rebalance``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from aiohttp import web

from redpacket.core.body import read_body, read_json_object
from redpacket.core.errors import bad_request, json_response
from redpacket.core.ids import parse_packet_id, parse_uid
from redpacket.core.metrics import HTTP_LATENCY, Buckets, RecentBuckets, cumulative_buckets
from redpacket.node.handoff.batch import MAX_BATCH, PacketBatches
from redpacket.node.handoff.fence import Fence
from redpacket.node.handoff.packets import PacketMoves
from redpacket.node.handoff.user_data import KeyMoves
from redpacket.node.handoff.users import USER_TABLES, UserMoves
from redpacket.node.history import HISTORY
from redpacket.node.relay import RELAY
from redpacket.node.shard import Shard
from redpacket.nodeclient.wire import ROUTES as CALL_ROUTES
from redpacket.sharding.ring import RingDoc, RingError


@dataclass(frozen=True)
class Handoff:
    """A node's half of rebalancing, one part per concept."""

    fence: Fence
    packets: PacketMoves
    keys: KeyMoves
    batches: PacketBatches
    users: UserMoves
    opens: RecentBuckets  # the open latency histogram's last seconds (open_latency)

    @property
    def name(self) -> str:
        return self.fence.name


HANDOFF = web.AppKey("handoff", Handoff)


async def _body(request: web.Request) -> dict[str, Any]:
    return await read_json_object(request) if request.can_read_body else {}


def _int(body: dict[str, Any], field: str, default: int | None = None) -> int:
    value = body.get(field, default)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise bad_request("invalid_field", f"{field} must be a non-negative integer")
    return value


def _name(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value or len(value) > 64:
        raise bad_request("invalid_field", f"{field} must be a node name")
    return value


async def _step(request: web.Request, step: str) -> web.Response:
    handoff = request.app[HANDOFF]
    packet_id = parse_packet_id(request.match_info["id"])
    body = await _body(request)
    if step == "export":
        return json_response(
            await handoff.packets.export(packet_id, _name(body, "to"), _int(body, "ring_version"))
        )
    if step == "import":
        try:
            payload = body["export"]
            if int(payload["packet"]["red_packet_id"]) != packet_id:
                raise ValueError("packet id mismatch")
            state = await handoff.packets.import_(
                payload, _name(body, "from"), _int(body, "ring_version")
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise bad_request("invalid_field", f"malformed export: {exc}") from None
    elif step == "activate":
        state = await handoff.packets.activate(packet_id)
    elif step == "finish":
        url = body.get("owner_url", "")
        state = await handoff.packets.finish(
            packet_id,
            _name(body, "owner"),
            url if isinstance(url, str) else "",
            _int(body, "ring_version"),
        )
    elif step == "abort":
        state = await handoff.packets.abort(packet_id)
    else:
        state = await handoff.packets.discard(packet_id)
    return json_response({"state": state})


def _ids(body: dict[str, Any]) -> list[int]:
    raw = body.get("ids")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_BATCH:
        raise bad_request("invalid_field", f"ids must be a list of 1 to {MAX_BATCH} packet ids")
    return list(dict.fromkeys(parse_packet_id(i) for i in raw))


async def batch_step(request: web.Request) -> web.Response:
    """One handoff step for a batch of packets between the same two nodes (batch.py)."""
    batches = request.app[HANDOFF].batches
    step = request.match_info["step"]
    body = await read_json_object(request)
    if step == "export":
        results = await batches.export(_ids(body), _name(body, "to"), _int(body, "ring_version"))
    elif step == "import":
        exports = body.get("exports")
        if not isinstance(exports, list) or not 0 < len(exports) <= MAX_BATCH:
            raise bad_request("invalid_field", "exports must be a list of exports")
        try:
            results = await batches.import_(
                exports, _name(body, "from"), _int(body, "ring_version")
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise bad_request("invalid_field", f"malformed export: {exc}") from None
    elif step == "activate":
        results = await batches.activate(_ids(body))
    elif step == "finish":
        url = body.get("owner_url", "")
        results = await batches.finish(
            _ids(body),
            _name(body, "owner"),
            url if isinstance(url, str) else "",
            _int(body, "ring_version"),
        )
    else:
        raise bad_request("invalid_step", f"no batched handoff step {step!r}")
    return json_response({"results": {str(i): r for i, r in results.items()}})


def _step_handler(step: str) -> Any:
    """The route handler of one handoff step (they differ only in the step they run)."""

    async def handler(request: web.Request) -> web.Response:
        return await _step(request, step)

    return handler


async def list_packets(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    after = _int(dict(request.query), "after", 0)
    limit = min(max(_int(dict(request.query), "limit", 1000), 1), 10_000)
    rows = await handoff.packets.inventory(after, limit)
    return json_response(
        {
            "node": handoff.name,
            "packets": [[str(pid), state, peer] for pid, state, peer in rows],
            "next": str(rows[-1][0]) if len(rows) == limit else None,
        }
    )


async def live_packets(request: web.Request) -> web.Response:
    """``{"live": n}``: packets of ``from_id <= id < before_id`` not yet expired and settled
    (does a ring version still serve anything here?)."""
    handoff = request.app[HANDOFF]
    query = dict(request.query)
    from_id, before_id = _int(query, "from_id", 0), _int(query, "before_id", 2**63 - 1)
    live = await handoff.packets.live(from_id, before_id)
    return json_response({"node": handoff.name, "live": live})


async def get_fence(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    fence = handoff.fence.fence.as_dict() if handoff.fence.fence else None
    return json_response({"node": handoff.name, "fence": fence})


async def put_fence(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    try:
        doc = RingDoc.parse(await read_json_object(request))
    except RingError as exc:
        raise bad_request("invalid_ring", str(exc)) from None
    await handoff.fence.set_fence(doc)
    return json_response(
        {
            "node": handoff.name,
            "version": doc.version,
            "member": any(n.name == handoff.name for n in doc.nodes),
        }
    )


async def delete_fence(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    await handoff.fence.clear_fence()
    return json_response({"node": handoff.name, "fence": None})


async def list_keys(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    query = dict(request.query)
    after = (_int(query, "after_uid", 0), query.get("after_key", ""))
    limit = min(max(_int(query, "limit", 1000), 1), 10_000)
    rows = await handoff.keys.keys(after, limit)
    return json_response(
        {
            "node": handoff.name,
            "keys": [[str(u), k, h, str(p), t] for u, k, h, p, t in rows],
            "next": [str(rows[-1][0]), rows[-1][1]] if len(rows) == limit else None,
        }
    )


MSGPACK = "application/msgpack"


def _msgpack(value: Any) -> web.Response:
    return web.Response(body=msgpack.packb(value, use_bin_type=True), content_type=MSGPACK)


async def list_users(request: web.Request) -> web.Response:
    """A page of this node's users and, for those its fence gives away, their keys and history
    in batches per new owner (node/handoff/users.py), as msgpack: the rows are JSON arrays
    MySQL built, passed on as they are."""
    handoff = request.app[HANDOFF]
    query = dict(request.query)
    limit = min(max(_int(query, "limit", 1000), 1), 10_000)
    page_rows = min(max(_int(query, "page_rows", 10_000), 1), 100_000)
    batch_rows = min(max(_int(query, "batch_rows", 1000), 1), page_rows)
    batches, nxt, users, counted = await handoff.users.leaving(
        _int(query, "after_uid", 0), limit, page_rows, batch_rows
    )
    return _msgpack(
        {
            "node": handoff.name,
            "next": nxt,
            "users": users,
            "counted": counted,  # users whose rows were counted (the caller sizes the next page)
            "batches": [[b.owner, b.uids, b.counts, b.arrays] for b in batches],
        }
    )


async def import_users(request: web.Request) -> web.Response:
    """Merge a batch of users listed by their old owner (msgpack ``{"uids", "arrays"}``)."""
    handoff = request.app[HANDOFF]
    try:
        body = msgpack.unpackb(await read_body(request), raw=False)
        uids = [int(u) for u in body["uids"]]
        arrays = {t.table: body["arrays"].get(t.table) for t in USER_TABLES}
        keys = body.get("counts", {}).get("idempotency_key")
        keys = None if keys is None else int(keys)
        if not all(a is None or isinstance(a, str) for a in arrays.values()):
            raise ValueError("arrays must be JSON text")
    except (msgpack.UnpackException, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise bad_request("invalid_body", f"malformed users batch: {exc}") from None
    clashes, refused = await handoff.users.import_(request.app[HISTORY], uids, arrays, keys)
    return json_response(
        {"clashes": [[str(u), k] for u, k in clashes], "refused": [str(u) for u in refused]}
    )


async def release_users(request: web.Request) -> web.Response:
    handoff = request.app[HANDOFF]
    body = await read_json_object(request)
    raw_uids, raw_keep = body.get("uids"), body.get("keep", [])
    if not isinstance(raw_uids, list) or not isinstance(raw_keep, list):
        raise bad_request("invalid_field", "uids and keep must be lists")
    uids = [parse_uid(u) for u in raw_uids]
    try:
        keep = [(int(u), str(k)) for u, k in raw_keep]
    except (TypeError, ValueError):
        raise bad_request("invalid_field", "keep must be a list of [uid, key]") from None
    if not uids or any(u is None for u in uids):
        raise bad_request("invalid_field", "uids must be a list of user ids")
    return json_response({"deleted": await handoff.users.release([u for u in uids if u], keep)})


async def drain_outbox(request: web.Request) -> web.Response:
    """Deliver this node's history outbox now (up to ``timeout_s``, at most 60): what a shard
    being removed must do before it stops (node/relay.py ``Relay.drain``)."""
    query = dict(request.query)
    timeout_s = min(max(_int(query, "timeout_s", 10), 1), 60)
    delivered, left = await request.app[RELAY].drain(timeout_s)
    return json_response({"node": request.app[HANDOFF].name, "delivered": delivered, "left": left})


def open_buckets() -> Buckets:
    """This node's open latency histogram as ``/metrics`` shows it (cumulative counts per
    bucket, the last one ``+Inf``)."""
    return cumulative_buckets(HTTP_LATENCY.labels("node", CALL_ROUTES["open"].pattern))


async def open_latency(request: web.Request) -> web.Response:
    """The open latency histogram now, and as it was about 5 s ago (``earlier``; since the
    node started, if that is less), on the node's own port: the rebalance takes the p99 of
    the opens between the two as its baseline, at once, and paces users' moves by the
    difference of two reads of ``counts`` (sharding/rebalance/latency.py). Read here rather
    than scraped because the metrics port is not always known to the orchestrator (the ring
    names it for local clusters only)."""
    opens = request.app[HANDOFF].opens
    buckets = opens.now()
    age_s, earlier = opens.earliest()
    return json_response(
        {
            "node": request.app[HANDOFF].name,
            "bounds_s": [le for le, _ in buckets[:-1]],  # the last bound is +Inf
            "counts": [count for _, count in buckets],
            "earlier": {"age_s": round(age_s, 3), "counts": [count for _, count in earlier]},
        }
    )


PREFIX = "/internal/v1/handoff"
ROUTES = [
    web.get(f"{PREFIX}/ring", get_fence),
    web.put(f"{PREFIX}/ring", put_fence),
    web.delete(f"{PREFIX}/ring", delete_fence),
    web.get(f"{PREFIX}/packets", list_packets),
    web.get(f"{PREFIX}/live", live_packets),
    web.post(f"{PREFIX}/packets/{{id}}/export", _step_handler("export")),
    web.post(f"{PREFIX}/packets/{{id}}/import", _step_handler("import")),
    web.post(f"{PREFIX}/packets/{{id}}/activate", _step_handler("activate")),
    web.post(f"{PREFIX}/packets/{{id}}/finish", _step_handler("finish")),
    web.post(f"{PREFIX}/packets/{{id}}/abort", _step_handler("abort")),
    web.post(f"{PREFIX}/packets/{{id}}/discard", _step_handler("discard")),
    web.post(f"{PREFIX}/batches/{{step}}", batch_step),
    web.get(f"{PREFIX}/idempotency-keys", list_keys),
    web.get(f"{PREFIX}/users", list_users),
    web.post(f"{PREFIX}/users", import_users),
    web.post(f"{PREFIX}/users/release", release_users),
    web.post(f"{PREFIX}/outbox/drain", drain_outbox),
    web.get(f"{PREFIX}/opens/latency", open_latency),
]


async def start(shard: Shard, name: str) -> Handoff:
    """The node's handoff state, loaded from MySQL; installs its fence as the shard's placement."""
    fence = Fence(shard, name)
    await fence.load()
    shard.placement = fence
    packets = PacketMoves(fence)
    return Handoff(
        fence,
        packets,
        KeyMoves(fence),
        PacketBatches(packets),
        UserMoves(fence),
        RecentBuckets(open_buckets),
    )
