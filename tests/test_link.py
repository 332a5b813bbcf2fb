"""The gateway↔node link on real sockets: frames, ordering, failures, limits and drain.

Transport tests use a real aiohttp server running the node's LinkServer with a small call
table of their own (calls that wait on events the test controls); the end-to-end tests use
real nodes and clusters.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from redpacket.chaos.proxy import TcpProxy
from redpacket.cli.children import free_ports
from redpacket.core.errors import ApiError
from redpacket.core.frames import LINK_PATH
from redpacket.node.app import node_auth_middleware
from redpacket.node.calls import SETTINGS, SHARD, Call, CallTable, Reply, reply
from redpacket.node.history import HISTORY
from redpacket.node.link import LinkServer
from redpacket.node.shard import moved
from redpacket.nodeclient.client import NodeClient
from redpacket.nodeclient.http import HttpTransport
from redpacket.nodeclient.link import Links, NodeLink
from redpacket.nodeclient.ring import RingFile
from redpacket.nodeclient.wire import ROUTES, NodeDown, Route
from redpacket.sharding.ring import NodeSpec, RingDoc
from tests.conftest import Cluster, NodeHandle
from tests.load import OpenLoad

SECRET = "link-test-secret"


class Calls:
    """A call table whose calls wait until the test releases them."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.running = 0
        self.most_running = 0

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def wait(self, call: Call) -> Reply:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate(call.args["name"]).wait()
        finally:
            self.running -= 1
        return reply({"name": call.args["name"]})

    async def echo(self, call: Call) -> Reply:
        return reply({"len": len(call.args.get("data", ""))})

    def table(self) -> CallTable:
        return CallTable({"wait": self.wait, "echo": self.echo}, TEST_ROUTES)


TEST_ROUTES = {"wait": Route("POST", "/wait/{name}"), "echo": Route("POST", "/echo")}


class Server:
    def __init__(self, calls: Calls, link: LinkServer, runner: web.AppRunner, url: str) -> None:
        self.calls, self.link, self.runner, self.url = calls, link, runner, url


async def serve_calls(
    table: CallTable, port: int, **options: int
) -> tuple[LinkServer, web.AppRunner]:
    """A node's link server on a real socket, serving only ``table`` (no shard behind it)."""
    link = LinkServer(
        table,
        max_inflight=options.get("max_inflight", 1024),
        max_message_bytes=options.get("max_message_bytes", 1 << 20),
        max_body_bytes=options.get("max_body_bytes", 1024),
        access_log=False,
    )
    app = web.Application(middlewares=[node_auth_middleware(SECRET)])
    app[SHARD] = None  # type: ignore[assignment]  # these calls need no shard
    app[SETTINGS] = None  # type: ignore[assignment]
    app[HISTORY] = None  # type: ignore[assignment]
    app.router.add_get(LINK_PATH, link.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return link, runner


@pytest_asyncio.fixture
async def link_server() -> AsyncIterator[Any]:
    made: list[web.AppRunner] = []

    async def make(**options: int) -> Server:
        calls = Calls()
        port = free_ports(1)[0]
        link, runner = await serve_calls(calls.table(), port, **options)
        made.append(runner)
        return Server(calls, link, runner, f"http://127.0.0.1:{port}")

    yield make
    for runner in made:
        await runner.cleanup()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def link_to(url: str, session: aiohttp.ClientSession, **options: Any) -> NodeLink:
    link = NodeLink(
        "shard-t",
        url,
        session,
        options.pop("secret", SECRET),
        connections=options.pop("connections", 2),
        max_inflight=options.pop("max_inflight", 64),
        max_message_bytes=options.pop("max_message_bytes", 1 << 20),
    )
    link.routes = {**ROUTES, **TEST_ROUTES}
    return link


async def call(link: NodeLink, call_name: str, timeout_s: float = 30, **args: Any) -> Any:
    status, body, _ = await link.call(call_name, args, rid="test", timeout_s=timeout_s)
    return status, body


def client_of(
    session: aiohttp.ClientSession, secret: str, links: Links, *nodes: NodeSpec
) -> NodeClient:
    return NodeClient(
        RingFile("", RingDoc(version=1, nodes=nodes)),
        http=HttpTransport(session, secret),
        links=links,
        frozen_retry_s=0.1,
    )


async def eventually(condition: Any, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling state of real servers
            await asyncio.sleep(0.01)


async def test_answers_come_back_as_each_call_finishes_not_in_order(
    link_server: Any, session: aiohttp.ClientSession
) -> None:
    server = await link_server()
    link = link_to(server.url, session, connections=1)
    finished: list[str] = []

    async def one(name: str) -> None:
        assert await call(link, "wait", name=name) == (200, {"name": name})
        finished.append(name)

    tasks = [asyncio.create_task(one(name)) for name in ("first", "second", "third")]
    await eventually(lambda: server.calls.running == 3)
    for name in ("third", "first", "second"):
        server.calls.gate(name).set()
        await eventually(lambda name=name: name in finished)
    await asyncio.gather(*tasks)
    assert finished == ["third", "first", "second"]
    await link.close()


async def test_a_killed_connection_fails_its_calls_at_once_and_the_link_reconnects(
    link_server: Any, session: aiohttp.ClientSession
) -> None:
    server = await link_server()
    port = int(server.url.rsplit(":", 1)[1])
    proxy = TcpProxy("127.0.0.1", port)
    await proxy.start()
    link = link_to(f"http://127.0.0.1:{proxy.port}", session)
    stuck = [asyncio.create_task(call(link, "wait", timeout_s=60, name="never")) for _ in range(10)]
    await eventually(lambda: server.calls.running == 10)
    proxy.block()
    for task in stuck:
        with pytest.raises(NodeDown) as lost:
            await task
        assert lost.value.kind == "closed"  # failed with the connection, not by the 60 s timeout
    with pytest.raises(NodeDown) as down:  # while the node is unreachable: fail fast
        await call(link, "echo")
    assert down.value.kind in ("connect", "closed")
    proxy.unblock()
    await eventually(lambda: link._pick() is not None)
    assert await call(link, "echo", data="abc") == (200, {"len": 3})
    server.calls.gate("never").set()
    await link.close()
    await proxy.stop()


async def test_a_connection_lost_under_a_write_is_replaced_and_the_link_carries_on(
    link_server: Any, session: aiohttp.ClientSession
) -> None:
    """The socket closes while the writer holds a frame: the send fails, the connection ends,
    and the link must come back. That failure once escaped the connection's supervisor and
    left its shard unanswerable until the gateway restarted (issue 24: a SIGKILLed node)."""
    server = await link_server()
    link = link_to(server.url, session, connections=1)
    assert await call(link, "echo", data="a") == (200, {"len": 1})
    (conn,) = link._conns
    assert conn.ws is not None
    conn.ws._writer.transport.abort()  # as a SIGKILLed node's socket: closing at once
    with pytest.raises(NodeDown) as lost:  # its frame is in the writer, the send fails
        await call(link, "echo", data="b")
    assert lost.value.kind == "closed"
    await eventually(lambda: link._pick() is not None)
    assert await call(link, "echo", data="abc") == (200, {"len": 3})
    assert all(not task.done() for task in link._tasks)  # the supervisor lives on
    await link.close()


async def test_a_call_past_its_deadline_gets_timeout_and_the_others_carry_on(
    link_server: Any, session: aiohttp.ClientSession
) -> None:
    server = await link_server()
    link = link_to(server.url, session, connections=1)
    with pytest.raises(NodeDown) as late:
        await call(link, "wait", timeout_s=0.2, name="slow")
    assert late.value.kind == "timeout"
    assert await call(link, "echo", data="x") == (200, {"len": 1})  # same connection, still fine
    server.calls.gate("slow").set()  # its late answer arrives and is dropped
    assert await call(link, "echo", data="xy") == (200, {"len": 2})
    await link.close()


async def test_a_wrong_node_secret_is_refused_at_the_handshake(
    node: NodeHandle, session: aiohttp.ClientSession
) -> None:
    link = link_to(node.url, session, secret="not-the-secret")
    with pytest.raises(NodeDown) as refused:
        await call(link, "healthz")
    assert refused.value.kind == "auth"
    await link.close()
    spec = NodeSpec("shard-t", node.url)
    bad_links = _links(session, "not-the-secret")
    shards = client_of(session, "not-the-secret", bad_links, spec)
    with pytest.raises(ApiError) as err:
        await shards.call(spec, "healthz", {})
    assert (err.value.status, err.value.code) == (502, "bad_gateway")
    good_links = _links(session, node.secret)
    good = client_of(session, node.secret, good_links, spec)
    assert (await good.call(spec, "healthz", {})).status == 200
    await bad_links.close()
    await good_links.close()


def _links(session: aiohttp.ClientSession, secret: str) -> Links:
    return Links(session, secret, connections=1, max_inflight=8, max_message_bytes=1 << 20)


async def test_oversize_bodies_and_messages_are_refused(
    link_server: Any, session: aiohttp.ClientSession
) -> None:
    server = await link_server(max_body_bytes=100, max_message_bytes=64 * 1024)
    link = link_to(server.url, session, connections=1)
    status, body = await call(link, "echo", data="x" * 101)
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    assert await call(link, "echo", data="x" * 100) == (200, {"len": 100})
    with pytest.raises(NodeDown) as cut:  # a message over the node's limit closes the link
        await call(link, "echo", data="x" * 100_000)
    assert cut.value.kind == "closed"
    await eventually(lambda: link._pick() is not None)
    assert await call(link, "echo", data="x") == (200, {"len": 1})
    await link.close()


async def test_calls_in_flight_per_connection_are_bounded(
    link_server: Any, session: aiohttp.ClientSession
) -> None:
    server = await link_server()
    link = link_to(server.url, session, connections=2, max_inflight=3)
    tasks = [asyncio.create_task(call(link, "wait", name="crowd")) for _ in range(40)]
    await eventually(lambda: server.calls.running == 6)
    await asyncio.sleep(0.2)
    assert server.calls.running == 6  # 2 connections x 3; the other 34 wait their turn
    server.calls.gate("crowd").set()
    assert [status for status, _ in await asyncio.gather(*tasks)] == [200] * 40
    assert server.calls.most_running == 6
    await link.close()


async def test_a_draining_node_answers_its_calls_in_flight_and_takes_no_new_ones(
    link_server: Any, session: aiohttp.ClientSession
) -> None:
    server = await link_server()
    link = link_to(server.url, session, connections=1)
    in_flight = [asyncio.create_task(call(link, "wait", name="drain")) for _ in range(5)]
    await eventually(lambda: server.calls.running == 5)
    drain = asyncio.create_task(server.link.drain(10))
    await eventually(lambda: link._pick() is None)  # goaway heard: no new calls here
    server.calls.gate("drain").set()
    assert [status for status, _ in await asyncio.gather(*in_flight)] == [200] * 5
    await drain
    await link.close()


async def test_a_node_left_out_of_a_new_ring_has_its_link_closed_after_its_calls_finish(
    link_server: Any, session: aiohttp.ClientSession
) -> None:
    staying, leaving = await link_server(), await link_server()
    a, b = NodeSpec("shard-a", staying.url), NodeSpec("shard-b", leaving.url)
    links = _links(session, SECRET)
    shards = client_of(session, SECRET, links, a, b)
    in_flight = asyncio.create_task(shards.call(b, "wait", {"name": "last"}))
    assert (await shards.call(a, "echo", {})).status == 200
    await eventually(lambda: leaving.calls.running == 1)
    old_link = links.get("shard-b", b.url)
    assert len(leaving.link.connections) == 1

    shards.ring.use(RingDoc(version=2, nodes=(a,)))
    assert old_link.retired
    await asyncio.sleep(0.2)
    assert len(leaving.link.connections) == 1  # kept open while a call is under way on it
    leaving.calls.gate("last").set()
    assert (await in_flight).status == 200  # the call in flight is answered
    await eventually(lambda: not leaving.link.connections)  # then the link is closed
    assert len(staying.link.connections) == 1  # the node still in the ring keeps its link
    assert (await shards.call(a, "echo", {})).status == 200
    await links.close()


async def test_sigterm_of_a_node_mid_load_answers_its_calls_and_the_ledger_is_clean(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster()
    packets = [await cluster.create(1, 20 * 50, 20) for _ in range(20)]
    load = OpenLoad(cluster, packets, range(3000, 3120))
    task = load.start()
    await eventually(lambda: load.statuses[200] >= 50, 30)
    restarts = cluster.restarts("shard-0-node")
    os.kill(cluster.pid_of("shard-0"), signal.SIGTERM)
    await cluster.wait_restarted("shard-0-node", restarts, 60)
    await asyncio.wait_for(task, 120)
    assert load.statuses[200] == 20 * 20
    assert set(load.statuses) <= {200, 410, 503}, load.statuses  # a stopped node: only 503
    await cluster.check(load.observed)


async def test_a_user_whose_two_owners_point_at_each_other_gets_503_not_421(
    session: aiohttp.ClientSession,
) -> None:
    """Mid-rebalance the old and the new owner of ``user:<uid>`` may each answer that the
    other keeps it; the gateway follows, then answers 503 to retry, never the internal 421."""
    runners: list[web.AppRunner] = []
    ports = free_ports(2)
    names = ("shard-a", "shard-b")

    def pointing_at(other: str) -> Any:
        async def received(call: Call) -> Reply:
            raise moved(other, f"http://127.0.0.1:{ports[names.index(other)]}")

        return received

    for other, port in zip(reversed(names), ports, strict=True):
        table = CallTable({"received": pointing_at(other)})
        runners.append((await serve_calls(table, port))[1])
    nodes = tuple(NodeSpec(n, f"http://127.0.0.1:{p}") for n, p in zip(names, ports, strict=True))
    links = _links(session, SECRET)
    shards = client_of(session, SECRET, links, *nodes)
    try:
        with pytest.raises(ApiError) as err:
            await shards.user_call(42, "received", {"uid": 42})
        assert (err.value.status, err.value.code) == (503, "unavailable")
        assert err.value.headers.get("Retry-After") == "1"
        # the plain call, which packet routes use, still hands the last answer back
        plain = await shards.call(nodes[0], "received", {"uid": 42})
        assert plain.code == "packet_moved"
    finally:
        await links.close()
        for runner in runners:
            await runner.cleanup()
