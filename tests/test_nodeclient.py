"""The node client (nodeclient/): typed calls, moves, handoffs, deadlines, and both wire
versions, against real node processes and real sockets.

Moves and handoffs are answered by small node tables of their own (a node's LinkServer and
HTTP routes on a real socket, like tests/test_link.py), so each answer is exactly the one the
test needs; typed calls run against a real shard node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from redpacket.cli.children import free_ports
from redpacket.core.errors import ApiError
from redpacket.core.frames import LINK_PATH, LINK_PROTOCOL, pack, unpacker
from redpacket.node.app import node_auth_middleware
from redpacket.node.calls import SETTINGS, SHARD, Call, CallTable, Reply, http_routes, reply
from redpacket.node.history import HISTORY
from redpacket.node.link import LinkServer
from redpacket.node.shard import frozen, moved
from redpacket.nodeclient.client import NodeClient, Opened
from redpacket.nodeclient.http import HttpTransport
from redpacket.nodeclient.link import Links
from redpacket.nodeclient.ring import RingFile
from redpacket.nodeclient.wire import NODE_SECRET_HEADER
from redpacket.sharding.ring import NodeSpec, RingDoc
from tests.conftest import IDS, Cluster, NodeHandle

SECRET = "nodeclient-test-secret"


async def serve(table: CallTable, port: int) -> web.AppRunner:
    """A node's two transports (link and HTTP) on a real socket, serving only ``table``."""
    link = LinkServer(
        table, max_inflight=64, max_message_bytes=1 << 20, max_body_bytes=4096, access_log=False
    )
    app = web.Application(middlewares=[node_auth_middleware(SECRET)])
    app[SHARD] = None  # type: ignore[assignment]  # these calls need no shard
    app[SETTINGS] = None  # type: ignore[assignment]
    app[HISTORY] = None  # type: ignore[assignment]
    app.router.add_get(LINK_PATH, link.handle)
    app.add_routes(http_routes(table))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest_asyncio.fixture
async def nodes() -> AsyncIterator[Any]:
    """``make({name: table})``: a node per table, and a ring naming them all."""
    runners: list[web.AppRunner] = []

    async def make(
        tables: dict[str, CallTable], ports: list[int] | None = None
    ) -> tuple[NodeSpec, ...]:
        specs = []
        ports = ports or free_ports(len(tables))
        for (name, table), port in zip(tables.items(), ports, strict=True):
            runners.append(await serve(table, port))
            specs.append(NodeSpec(name, f"http://127.0.0.1:{port}"))
        return tuple(specs)

    yield make
    for runner in runners:
        await runner.cleanup()


OPENED: list[Links] = []


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A session whose links are closed before the nodes stop (an open link would hold up a
    node's shutdown for its whole timeout)."""
    async with aiohttp.ClientSession() as client:
        yield client
        while OPENED:
            await OPENED.pop().close()


def client_of(
    session: aiohttp.ClientSession, transport: str, *nodes: NodeSpec, secret: str = SECRET
) -> NodeClient:
    links = None
    if transport == "link":
        links = Links(session, secret, connections=1, max_inflight=16, max_message_bytes=1 << 20)
        OPENED.append(links)
    return NodeClient(
        RingFile("", RingDoc(version=1, nodes=nodes)),
        http=HttpTransport(session, secret),
        links=links,
        timeout_s=1.0,
        frozen_retry_s=0.3,
    )


def opens(amount: int) -> Any:
    async def open_(call: Call) -> Reply:
        return reply({"amount": amount, "replayed": False})

    return open_


def points_at(name: str, url: str) -> Any:
    async def open_(call: Call) -> Reply:
        raise moved(name, url)

    return open_


@pytest.mark.parametrize("transport", ["link", "http"])
async def test_a_packet_moved_answer_is_followed_to_the_new_owner(
    nodes: Any, session: aiohttp.ClientSession, transport: str
) -> None:
    """Every packet of the ring is on ``old``, which handed it to ``new`` (a node the caller's
    ring does not name yet: the URL of the answer is used)."""
    new_port = free_ports(1)[0]
    new_url = f"http://127.0.0.1:{new_port}"
    (old,) = await nodes({"old": CallTable({"open": points_at("new", new_url)})})
    await nodes({"new": CallTable({"open": opens(7)})}, [new_port])
    client = client_of(session, transport, old)
    assert await client.open(IDS.next_id(), 5, "n", "") == Opened(7, False)


@pytest.mark.parametrize("transport", ["link", "http"])
async def test_two_nodes_that_point_at_each_other_cost_a_503_not_a_loop(
    nodes: Any, session: aiohttp.ClientSession, transport: str
) -> None:
    ports = free_ports(2)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    tables = {
        "a": CallTable({"open": points_at("b", urls[1])}),
        "b": CallTable({"open": points_at("a", urls[0])}),
    }
    client = client_of(session, transport, *await nodes(tables, ports))
    with pytest.raises(ApiError) as err:
        await client.open(IDS.next_id(), 5, "n", "")
    assert (err.value.status, err.value.code) == (503, "unavailable")


@pytest.mark.parametrize("transport", ["link", "http"])
async def test_a_frozen_packet_is_retried_until_it_thaws_and_is_503_if_it_does_not(
    nodes: Any, session: aiohttp.ClientSession, transport: str
) -> None:
    asked = {"n": 0}

    async def thaws(call: Call) -> Reply:
        asked["n"] += 1
        if asked["n"] < 3:
            raise frozen()
        return reply({"amount": 3, "replayed": False})

    async def stays_frozen(call: Call) -> Reply:
        raise frozen()

    (node,) = await nodes({"n": CallTable({"open": thaws, "grab": stays_frozen})})
    client = client_of(session, transport, node)
    assert await client.open(IDS.next_id(), 5, "n", "") == Opened(3, False)
    assert asked["n"] == 3
    started = asyncio.get_running_loop().time()
    with pytest.raises(ApiError) as err:
        await client.grab(IDS.next_id(), 5)
    assert (err.value.status, err.value.code) == (503, "unavailable")
    assert asyncio.get_running_loop().time() - started < 2.0  # frozen_retry_s, not forever


@pytest.mark.parametrize("transport", ["link", "http"])
async def test_a_call_past_its_deadline_is_503_and_the_next_call_is_answered(
    nodes: Any, session: aiohttp.ClientSession, transport: str
) -> None:
    async def slow(call: Call) -> Reply:
        await asyncio.sleep(3)
        return reply({"can_open": True})

    (node,) = await nodes({"n": CallTable({"grab": slow, "open": opens(1)})})
    client = client_of(session, transport, node)
    started = asyncio.get_running_loop().time()
    with pytest.raises(ApiError) as err:
        await client.grab(IDS.next_id(), 5)
    assert (err.value.status, err.value.code) == (503, "unavailable")
    assert asyncio.get_running_loop().time() - started < 2.5  # timeout_s is 1 s
    assert await client.open(IDS.next_id(), 5, "n", "") == Opened(1, False)


async def test_a_wrong_secret_is_502_on_either_transport(
    node: NodeHandle, session: aiohttp.ClientSession
) -> None:
    spec = NodeSpec(node.settings.name, node.url)
    for transport in ("link", "http"):
        client = client_of(session, transport, spec, secret="not-it")
        with pytest.raises(ApiError) as err:
            await client.open(IDS.next_id(), 5, "n", "")
        assert (err.value.status, err.value.code) == (502, "bad_gateway")


@pytest.mark.parametrize("transport", ["link", "http"])
async def test_typed_calls_against_a_real_node(
    node: NodeHandle, session: aiohttp.ClientSession, transport: str
) -> None:
    spec = NodeSpec(node.settings.name, node.url)
    client = client_of(session, transport, spec, secret=node.secret)
    packet_id = await node.create(300, 2)
    first = await client.open(packet_id, 801, "a", "")
    assert isinstance(first, Opened) and not first.replayed
    assert await client.open(packet_id, 801, "a", "") == Opened(first.amount, True)
    last = await client.open(packet_id, 802, "b", "")
    assert isinstance(last, Opened) and first.amount + last.amount == 300
    sold_out = await client.open(packet_id, 803, "c", "")
    assert not isinstance(sold_out, Opened)
    assert (sold_out.status, sold_out.code) == (410, "sold_out")
    grab = await client.grab(packet_id, 801)
    assert grab.data == {"can_open": False, "reason": "already_opened", "amount": first.amount}
    winners = await client.winners(packet_id)
    assert winners is not None and winners.final == "sold_out" and winners.complete
    assert winners.winners == {801: first.amount, 802: last.amount}
    assert (await client.info(IDS.next_id())).code == "not_found"
    assert await client.ready(spec)
    await node.check()


async def test_a_link_of_0_1_0_is_served_by_path_with_json_replies(
    node: NodeHandle, session: aiohttp.ClientSession
) -> None:
    """A gateway of 0.1.0 (no subprotocol, frames by method and path, JSON bodies) during a
    rolling upgrade: the new node answers it as before."""
    packet_id = await node.create(100, 1)
    async with session.ws_connect(
        node.url + LINK_PATH, headers={NODE_SECRET_HEADER: node.secret}
    ) as ws:
        assert ws.protocol is None
        body = orjson.dumps({"uid": "901", "nick_name": "old", "img_url": ""})
        path = f"/internal/v1/packets/{packet_id}/open"
        await ws.send_bytes(pack([1, "POST", path, None, body, "rid-old"]))
        await ws.send_bytes(pack([2, "GET", "/internal/v1/no-such-call", None, None, "x"]))
        replies: dict[int, list[Any]] = {}
        frames = unpacker(1 << 20)
        while len(replies) < 2:
            msg = await asyncio.wait_for(ws.receive(), 5)
            frames.feed(msg.data)
            replies.update({frame[0]: frame for frame in frames if frame[0] != 0})
    _, status, payload, _ = replies[1]
    assert status == 200 and isinstance(payload, bytes)
    assert orjson.loads(payload) == {"amount": 100, "replayed": False}
    assert replies[2][1] == 404 and orjson.loads(replies[2][2])["error"]["code"] == "not_found"
    await node.check()


async def test_calls_by_name_carry_msgpack_values_both_ways(
    node: NodeHandle, session: aiohttp.ClientSession
) -> None:
    packet_id = await node.create(100, 1)
    async with session.ws_connect(
        node.url + LINK_PATH, headers={NODE_SECRET_HEADER: node.secret}, protocols=(LINK_PROTOCOL,)
    ) as ws:
        assert ws.protocol == LINK_PROTOCOL
        await ws.send_bytes(pack([1, "grab", {"id": packet_id, "uid": 902}, "rid"]))
        await ws.send_bytes(pack([2, "no_such_call", {}, "rid"]))
        await ws.send_bytes(pack([3, "grab", ["not", "a", "map"], "rid"]))
        replies: dict[int, list[Any]] = {}
        frames = msgpack.Unpacker(raw=False)
        while len(replies) < 3:
            frames.feed((await asyncio.wait_for(ws.receive(), 5)).data)
            replies.update({frame[0]: frame for frame in frames if frame[0] != 0})
    assert replies[1][1:3] == [200, {"can_open": True}]  # a value, not JSON bytes
    assert replies[2][1] == 404 and replies[2][2]["error"]["code"] == "not_found"
    assert replies[3][1] == 400
    await node.check()


@pytest.mark.parametrize("transport", ["link", "http"])
async def test_a_gateway_on_either_transport_creates_opens_and_reads(
    make_cluster: Any, transport: str
) -> None:
    """The gateway end to end through the node client: create (hold, create, confirm),
    open, a replayed open, records, a sold-out open, history and the wallet."""
    cluster: Cluster = await make_cluster(REDPACKET_NODE_TRANSPORT=transport)
    packet_id = await cluster.create(1, 300, 2)
    status, first = await cluster.open(packet_id, 2)
    assert status == 200 and not first["replayed"]
    assert await cluster.open(packet_id, 2) == (200, {**first, "replayed": True})
    assert (await cluster.open(packet_id, 3))[0] == 200
    status, late = await cluster.open(packet_id, 4)
    assert (status, late["error"]["code"]) == (410, "sold_out")
    status, page = await cluster.call("GET", f"/v1/red-packets/{packet_id}/records", 1)
    assert status == 200 and len(page["records"]) == 2
    status, wallet = await cluster.call("GET", "/v1/me/wallet", 1)
    assert status == 200 and wallet["balance"] >= 0
    await cluster.check()
