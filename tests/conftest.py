"""Real servers for the tests, started once per session.

- MariaDB/MySQL: the server in ``REDPACKET_MYSQL_URL`` (default root@127.0.0.1:3306); every
  test database is named ``rptest_*`` and dropped at the end of the session.
- Redis: a fresh ``redis-server`` per fixture on a free port (no persistence).
- A shard node, in process, on a real socket (``node``), and local clusters started with
  the real ``redpacket dev up`` command (``cluster``, ``make_cluster``).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from redpacket.chaos.proxy import TcpProxy
from redpacket.cli.check import Observed, Report, check_shards
from redpacket.cli.children import free_ports, redis_server_argv
from redpacket.core.ids import IdGenerator, PublicIds, derive_id_key, snowflake_of
from redpacket.gateway.auth import mint_token
from redpacket.node.app import create_app as create_node_app
from redpacket.node.handlers import SHARD
from redpacket.node.ledger import connect_one, parse_mysql_url
from redpacket.node.migrations.runner import migrate
from redpacket.node.settings import NodeSettings
from redpacket.node.shard import Shard
from redpacket.nodeclient.wire import NODE_SECRET_HEADER
from redpacket.sharding.ring import NodeSpec, RingDoc, user_key

MYSQL_SERVER = (os.environ.get("REDPACKET_MYSQL_URL") or "mysql://root@127.0.0.1:3306").rstrip("/")
RUN_ID = secrets.token_hex(3)
IDS = IdGenerator()


# -- servers --------------------------------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    data: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart_empty(self) -> None:
        """Kill it and start a fresh one on the same port: everything it held is gone."""
        self.kill()
        self.proc = _spawn_redis(self.port, self.data)


def _spawn_redis(port: int, data: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*redis_server_argv(port, data), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True)
        if done.stdout.strip() == b"PONG":
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server on port {port} did not start")


@pytest.fixture(scope="session")
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A factory of fresh redis-server processes, all stopped at the end of the session."""
    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server is not installed: run `make test` (it installs it) or "
            "`apt-get install redis-server`"
        )
    started: list[RedisServer] = []

    def start(*extra: str) -> RedisServer:
        port = free_ports(1)[0]
        data = tmp_path_factory.mktemp(f"redis-{port}")
        server = RedisServer(port, _spawn_redis(port, data, *extra), data)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def sql(mysql_url: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a shard's database directly, as an auditor would."""
    conn = await connect_one(mysql_url)
    try:
        async with conn.cursor() as cur:
            await cur.execute(statement, args)
            return list(await cur.fetchall())
    finally:
        conn.close()


@pytest_asyncio.fixture
async def proxied_mysql(mysql_databases: Any) -> AsyncIterator[Any]:
    """A factory of MySQL URLs that reach the server through a TcpProxy the test can cut:
    ``(url, proxy)``; pass ``database=False`` for a server URL (a cluster makes its own)."""
    proxies: list[TcpProxy] = []
    server = parse_mysql_url(MYSQL_SERVER)

    async def make(label: str = "proxied", database: bool = True) -> tuple[str, TcpProxy]:
        proxy = TcpProxy(server.host, server.port)
        await proxy.start()
        proxies.append(proxy)
        url = MYSQL_SERVER.replace(f"{server.host}:{server.port}", f"127.0.0.1:{proxy.port}")
        if database:
            url += "/" + parse_mysql_url(mysql_databases(label)).database
        return url, proxy

    yield make
    for proxy in proxies:
        await proxy.stop()


@pytest_asyncio.fixture(scope="session")
async def mysql_databases() -> AsyncIterator[Any]:
    """A factory of fresh MySQL databases on the test server, dropped at the end."""
    try:
        conn = await connect_one(MYSQL_SERVER, with_database=False)
    except Exception as exc:
        pytest.fail(
            f"cannot reach MySQL at {MYSQL_SERVER} ({exc}): run `make test` "
            "(it installs and starts MariaDB) or set REDPACKET_MYSQL_URL"
        )
    made: list[str] = []

    def make(label: str) -> str:
        name = f"rptest_{RUN_ID}_{label}_{len(made)}"
        made.append(name)
        return f"{MYSQL_SERVER}/{name}"

    yield make
    async with conn.cursor() as cur:
        for name in made:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        # clusters started by `redpacket dev up` name theirs redpacket_<cluster>_shard_<i>
        await cur.execute(f"SHOW DATABASES LIKE 'redpacket\\_t{RUN_ID}%'")
        for (name,) in await cur.fetchall():
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


# -- one node, in process -------------------------------------------------------------------


TEST_GRANT = 10_000_000  # what a sender's wallet starts with in node tests (as in dev clusters)


@dataclass
class NodeHandle:
    """A shard node served on a real socket, plus direct access to its stores for checks."""

    url: str
    secret: str
    settings: NodeSettings
    app: web.Application
    redis: RedisServer
    session: aiohttp.ClientSession

    @property
    def shard(self) -> Shard:
        return self.app[SHARD]

    def spec(self) -> NodeSpec:
        return NodeSpec(
            self.settings.name, self.url, 1, self.settings.redis_url, self.settings.mysql_url
        )

    async def call(
        self, method: str, path: str, body: Any = None, **params: str
    ) -> tuple[int, Any]:
        async with self.session.request(
            method,
            self.url + path,
            json=body,
            params=params or None,
            headers={NODE_SECRET_HEADER: self.secret},
        ) as resp:
            return resp.status, await resp.json()

    async def create(
        self, total_amount: int, total_packet: int, *, uid: int = 1, expire_seconds: int = 3600
    ) -> int:
        """A paid create, as the gateway makes it: hold (this node keeps every user when it
        has no ring), create, confirm."""
        packet_id, token = IDS.next_id(), secrets.token_hex(16)
        await self.hold(uid, total_amount, token, packet_id)
        status, body = await self.call(
            "POST",
            "/internal/v1/packets",
            {
                "red_packet_id": str(packet_id),
                "uid": str(uid),
                "total_amount": total_amount,
                "total_packet": total_packet,
                "expire_seconds": expire_seconds,
                "create_token": token,
            },
        )
        assert status == 201, body
        await self.confirm(token, uid)
        return packet_id

    async def hold(self, uid: int, amount: int, token: str, packet_id: int) -> dict[str, Any]:
        """Debit a create on this node, the wallet's shard (granting TEST_GRANT first)."""
        status, body = await self.call(
            "POST",
            "/internal/v1/wallets/holds",
            {
                "create_token": token,
                "uid": str(uid),
                "amount": amount,
                "red_packet_id": str(packet_id),
                "starting_balance": TEST_GRANT,
            },
        )
        assert status == 200, body
        return body

    async def confirm(self, token: str, uid: int = 1) -> None:
        status, body = await self.call(
            "POST", "/internal/v1/wallets/holds/confirm", {"create_token": token, "uid": str(uid)}
        )
        assert status == 200, body

    async def open(self, packet_id: int, uid: int, nick: str = "") -> tuple[int, Any]:
        return await self.call(
            "POST",
            f"/internal/v1/packets/{packet_id}/open",
            {"uid": str(uid), "nick_name": nick or f"user{uid}", "img_url": ""},
        )

    async def grab(self, packet_id: int, uid: int) -> tuple[int, Any]:
        return await self.call("POST", f"/internal/v1/packets/{packet_id}/grab", {"uid": str(uid)})

    async def check(self, observed: list[Observed] | None = None, settle_s: float = 10.0) -> Report:
        report = await check_shards([self.spec()], observed or [], settle_s=settle_s)
        assert report.ok, "\n".join(report.violations)
        return report


async def start_node(
    redis: RedisServer, mysql_url: str, **overrides: str
) -> tuple[web.AppRunner, NodeHandle]:
    secret = secrets.token_hex(16)
    env = {
        "REDPACKET_NODE_NAME": "shard-t",
        "REDPACKET_NODE_SECRET": secret,
        "REDPACKET_REDIS_URL": redis.url,
        "REDPACKET_MYSQL_URL": mysql_url,
        "REDPACKET_RECONCILE_INTERVAL_S": "0.5",
        "REDPACKET_METRICS_PORT": "0",  # app[METRICS_URL] says where
        **overrides,
    }
    settings = NodeSettings.from_env(env)
    await migrate(mysql_url)  # nodes never migrate: `redpacket db migrate` runs first
    app = create_node_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2000))
    return runner, NodeHandle(f"http://127.0.0.1:{port}", secret, settings, app, redis, session)


@pytest_asyncio.fixture(scope="session")
async def node(redis_servers: Any, mysql_databases: Any) -> AsyncIterator[NodeHandle]:
    """One shard node shared by the node-level tests (each test uses its own packets)."""
    runner, handle = await start_node(redis_servers(), mysql_databases("node"))
    yield handle
    await handle.session.close()
    await runner.cleanup()


@pytest_asyncio.fixture
async def fresh_node(redis_servers: Any, mysql_databases: Any) -> AsyncIterator[Any]:
    """A factory of private nodes (own Redis, own database) for tests that break things."""
    made: list[tuple[web.AppRunner, NodeHandle]] = []

    async def make(**overrides: str) -> NodeHandle:
        mysql_url = overrides.pop("REDPACKET_MYSQL_URL", None) or mysql_databases("fresh")
        made.append(await start_node(redis_servers(), mysql_url, **overrides))
        return made[-1][1]

    yield make
    for runner, handle in made:
        await handle.session.close()
        await runner.cleanup()


async def node_pair(fresh_node: Any, secret: str) -> tuple[NodeHandle, NodeHandle, RingDoc]:
    """Two fresh nodes, ``shard-a`` and ``shard-b``, that share ``secret`` (the orchestrator's
    one client calls both with it), and the ring of the two (users split between them)."""
    a, b = [
        replace(
            await fresh_node(REDPACKET_NODE_NAME=name, REDPACKET_NODE_SECRET=secret), secret=secret
        )
        for name in ("shard-a", "shard-b")
    ]
    return a, b, RingDoc(2, (a.spec(), b.spec()))


# -- local clusters (the real `redpacket dev up`) --------------------------------------------


@dataclass
class Cluster:
    """A running `redpacket dev up`, seen through its cluster.json."""

    name: str
    home: Path
    proc: subprocess.Popen[bytes]
    output: Path
    session: aiohttp.ClientSession | None = None
    tokens: dict[int, str] = field(default_factory=dict)

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.home / "cluster.json").read_text())

    @property
    def url(self) -> str:
        return self.state["gateway"]["url"]

    def ring(self) -> RingDoc:
        return RingDoc.load(self.state["ring_file"])

    def token(self, uid: int, name: str | None = None) -> str:
        if uid not in self.tokens:
            self.tokens[uid] = mint_token(
                self.state["jwt_secret"],
                uid,
                name or f"user{uid}",
                f"https://img.example/{uid}.png",
            )
        return self.tokens[uid]

    def public_id(self, packet_id: int) -> str:
        """The id the gateway gives clients for a packet made on a node directly."""
        return PublicIds(derive_id_key(self.state["node_secret"])).format(packet_id)

    def shard_of(self, packet_id: int | str) -> str:
        return self.ring().ring().owner(snowflake_of(packet_id)).name

    def pid_of(self, shard: str, what: str = "pid") -> int:
        for entry in self.state["shards"]:
            if entry["name"] == shard:
                return int(entry[what])
        raise KeyError(shard)

    def restarts(self, child: str) -> int:
        return int(self.state["restarts"].get(child, 0))

    async def wait_restarted(self, child: str, before: int, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while self.restarts(child) <= before:
            assert time.monotonic() < deadline, f"{child} was not restarted: {self.log()}"
            await asyncio.sleep(0.1)

    async def wait_ready(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.session is not None
        while True:
            try:
                async with self.session.get(self.url + "/readyz/shards") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"cluster not ready: {self.log()}"
            await asyncio.sleep(0.1)

    def log(self) -> str:
        return self.output.read_text()[-3000:]

    async def call(
        self,
        method: str,
        path: str,
        uid: int | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        **params: str,
    ) -> tuple[int, Any]:
        assert self.session is not None
        all_headers = dict(headers or {})
        if uid is not None:
            all_headers["Authorization"] = f"Bearer {self.token(uid)}"
        async with self.session.request(
            method, self.url + path, json=body, params=params or None, headers=all_headers
        ) as resp:
            data = await resp.json(content_type=None)
            return resp.status, data

    async def raw(
        self, method: str, path: str, data: bytes, headers: dict[str, str]
    ) -> tuple[int, Any]:
        """A request with a body exactly as given (bad UTF-8, oversized, not JSON at all)."""
        assert self.session is not None
        async with self.session.request(method, self.url + path, data=data, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def create(self, uid: int, total_amount: int, total_packet: int, **extra: Any) -> str:
        status, body = await self.call(
            "POST",
            "/v1/red-packets",
            uid,
            {"total_amount": total_amount, "total_packet": total_packet, **extra},
        )
        assert status == 201, body
        return body["red_packet_id"]

    async def open(self, packet_id: str, uid: int) -> tuple[int, Any]:
        return await self.call("POST", f"/v1/red-packets/{packet_id}/open", uid)

    async def hold(self, uid: int, amount: int, token: str, packet_id: int) -> dict[str, Any]:
        """Debit a create on the user's wallet shard, as the gateway does before a create
        (for tests that create on a node directly)."""
        assert self.session is not None
        owner = self.ring().ring().owner_of_key(user_key(uid))
        async with self.session.post(
            owner.url + "/internal/v1/wallets/holds",
            json={
                "create_token": token,
                "uid": str(uid),
                "amount": amount,
                "red_packet_id": str(packet_id),
                "starting_balance": self.state["starting_balance"],
            },
            headers={NODE_SECRET_HEADER: self.state["node_secret"]},
        ) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            return body

    async def grab(self, packet_id: str, uid: int) -> tuple[int, Any]:
        return await self.call("POST", f"/v1/red-packets/{packet_id}/grab", uid)

    def nodes(self) -> list[NodeSpec]:
        """Every node of every ring version, and of the previous ring during a change."""
        return self.ring().all_nodes()

    async def check(
        self,
        observed: list[Observed] | None = None,
        settle_s: float = 15.0,
        *,
        allow_unfunded: bool = False,
    ) -> Report:
        """The checker on every shard, conservation of money included. ``allow_unfunded``: some
        packets were seeded straight into the ledgers (no wallet paid for them)."""
        doc = self.ring()
        owners = doc.ring() if doc.previous is None else None  # where users' history lives
        report = await check_shards(
            self.nodes(),
            observed or [],
            settle_s=settle_s,
            owners=owners,
            allow_unfunded=allow_unfunded,
        )
        assert report.ok, "\n".join(report.violations)
        return report

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def start_cluster(
    var: Path, shards: int = 2, args: tuple[str, ...] = (), **env: str
) -> Cluster:
    name = f"t{RUN_ID}{secrets.token_hex(2)}"
    output = var / f"{name}.out"
    environment = {
        **os.environ,
        "REDPACKET_MYSQL_URL": MYSQL_SERVER,
        "REDPACKET_RATE_OPEN_PER_S": "1000",
        "REDPACKET_RATE_OPEN_BURST": "1000",
        "REDPACKET_RATE_CREATE_PER_S": "1000",
        "REDPACKET_RATE_CREATE_BURST": "1000",
        "REDPACKET_RECONCILE_INTERVAL_S": "1",
        **env,
    }
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "redpacket.cli",
                "dev",
                "up",
                "--shards",
                str(shards),
                "--port",
                "0",
                "--cluster",
                name,
                "--var",
                str(var),
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    cluster = Cluster(name, var / name, proc, output)
    deadline = time.monotonic() + 60
    while True:
        state_file = cluster.home / "cluster.json"
        if state_file.exists() and json.loads(state_file.read_text()).get("ready"):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            cluster.stop()
            pytest.fail(f"redpacket dev up did not start:\n{output.read_text()[-3000:]}")
        await asyncio.sleep(0.1)
    cluster.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))
    return cluster


@pytest_asyncio.fixture(scope="session")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, mysql_databases: Any
) -> AsyncIterator[Cluster]:
    """The shared 2-shard cluster for end-to-end tests that do not break it."""
    handle = await start_cluster(tmp_path_factory.mktemp("clusters"))
    yield handle
    assert handle.session is not None
    await handle.session.close()
    handle.stop()


@pytest_asyncio.fixture
async def make_cluster(
    tmp_path_factory: pytest.TempPathFactory, mysql_databases: Any
) -> AsyncIterator[Any]:
    """A factory of private clusters, for tests that kill, stop or starve parts of them."""
    made: list[Cluster] = []

    async def make(shards: int = 2, args: tuple[str, ...] = (), **env: str) -> Cluster:
        made.append(await start_cluster(tmp_path_factory.mktemp("clusters"), shards, args, **env))
        return made[-1]

    yield make
    for handle in made:
        if handle.session is not None:
            await handle.session.close()
        handle.stop()
