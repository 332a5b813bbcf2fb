"""``redpacket dev up``: a real multi-shard cluster on one machine, supervised.

Per shard: one ``redis-server`` on a free port (data under ``var/<cluster>/``, no
persistence: the node rebuilds from MySQL), one MySQL database ``<prefix>_shard_<i>`` on
the server in ``REDPACKET_MYSQL_URL``, one node process. Plus one gateway. Children that die
are restarted within a second or two, as Kubernetes would, and the supervisor says so.

Everything a tool needs to find the cluster (URLs, pids, secrets, the ring file) is written
to ``var/<cluster>/cluster.json`` and kept current across restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from redpacket.cli.children import (
    ALL_SHARDS_READY,
    Child,
    answers_ready,
    free_ports,
    redis_server_argv,
)
from redpacket.core.env import SettingsError
from redpacket.node.ledger import connect_one, parse_mysql_url
from redpacket.node.migrations.runner import migrate
from redpacket.nodeclient.wire import NODE_SECRET_HEADER
from redpacket.sharding.ring import NodeSpec, RingDoc, RingError

DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306"


class Unmet(SettingsError):
    """Something the cluster needs is missing; the message says what to install or start."""


def cluster_dir(var: str, name: str) -> Path:
    return Path(var) / name


def load_state(var: str, name: str) -> dict[str, Any]:
    path = cluster_dir(var, name) / "cluster.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise Unmet(
            f"no local cluster {name!r} (looked for {path}); start one with "
            f"`redpacket dev up --cluster {name}`"
        ) from None


def jwt_secret_from_env() -> str:
    """REDPACKET_JWT_SECRET when set (the docs say the gateway reads it, and `redpacket token`
    signs with it), refused like the gateway does when shorter than 32 bytes; else a new one."""
    secret = os.environ.get("REDPACKET_JWT_SECRET", "")
    if not secret:
        return secrets.token_urlsafe(32)
    if len(secret.encode()) < 32:
        raise SettingsError("REDPACKET_JWT_SECRET must be at least 32 bytes (HS256 key)")
    return secret


# Every user of a dev cluster starts with this much (a `grant`), unless
# REDPACKET_DEV_STARTING_BALANCE or --starting-balance says otherwise: 100 000 元, so the
# demo, the page, the bench and the tests create packets without topping up first.
DEFAULT_STARTING_BALANCE = 10_000_000


def starting_balance_from_env() -> int:
    raw = os.environ.get("REDPACKET_DEV_STARTING_BALANCE", "")
    if not raw:
        return DEFAULT_STARTING_BALANCE
    if not (raw.isascii() and raw.isdigit()):
        raise SettingsError("REDPACKET_DEV_STARTING_BALANCE must be a number of cents")
    return int(raw)


def payments_secret_for(cluster: str, var: str) -> str:
    """REDPACKET_PAYMENTS_SECRET if set, else the local cluster's (`redpacket wallet topup`)."""
    return (
        os.environ.get("REDPACKET_PAYMENTS_SECRET") or load_state(var, cluster)["payments_secret"]
    )


def jwt_secret_for(cluster: str, var: str) -> str:
    """REDPACKET_JWT_SECRET if set, else the secret of the local cluster."""
    return os.environ.get("REDPACKET_JWT_SECRET") or load_state(var, cluster)["jwt_secret"]


@dataclass
class ShardPlan:
    index: int
    name: str
    node_port: int
    redis_port: int
    database: str
    mysql_server: str
    metrics_port: int = 0
    redis_password: str = ""

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def node_url(self) -> str:
        return f"http://127.0.0.1:{self.node_port}"

    @property
    def redis_url(self) -> str:
        auth = f":{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        return f"redis://{auth}127.0.0.1:{self.redis_port}/0"

    @property
    def mysql_url(self) -> str:
        return f"{self.mysql_server.rstrip('/')}/{self.database}"

    def spec(self) -> NodeSpec:
        return NodeSpec(
            self.name, self.node_url, 1, self.redis_url, self.mysql_url, metrics=self.metrics_url
        )


@dataclass
class DevCluster:
    name: str = "dev"
    shards: int = 2
    port: int = 8080
    var: str = "var"
    db_prefix: str | None = None
    expire_s: int = 86400
    mysql_server: str = field(
        default_factory=lambda: os.environ.get("REDPACKET_MYSQL_URL") or DEFAULT_MYSQL_URL
    )
    quiet: bool = False
    gateway_workers: int = 1  # gateway processes sharing the port (SO_REUSEPORT)
    children: dict[str, Child] = field(default_factory=dict)
    plans: list[ShardPlan] = field(default_factory=list)
    gateway_url: str = ""
    metrics_port: int = 0  # the gateway's /metrics (every process listens on its own port)
    jwt_secret: str = field(default_factory=jwt_secret_from_env)
    node_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    starting_balance: int = field(default_factory=starting_balance_from_env)
    payments_secret: str = field(
        default_factory=lambda: (
            os.environ.get("REDPACKET_PAYMENTS_SECRET") or secrets.token_urlsafe(32)
        )
    )
    _stopping: bool = False
    _watchers: list[asyncio.Task[None]] = field(default_factory=list)
    control_url: str = ""  # the supervisor's control endpoint (see `control_app`)
    _control: web.AppRunner | None = None
    _change_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def home(self) -> Path:
        return cluster_dir(self.var, self.name)

    @property
    def ring_file(self) -> Path:
        return self.home / "ring.json"

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"[dev {self.name}] {message}", flush=True)

    # -- start --------------------------------------------------------------------------

    async def check_prerequisites(self) -> None:
        if shutil.which("redis-server") is None:
            raise Unmet(
                "redis-server is not installed. Install it with "
                "`apt-get install redis-server` (Debian/Ubuntu) or `brew install redis`."
            )
        target = parse_mysql_url(self.mysql_server)
        try:
            (await connect_one(self.mysql_server, with_database=False)).close()
        except Exception as exc:
            raise Unmet(
                f"cannot reach MySQL at {target.host}:{target.port} ({exc}). Start it "
                "(`service mariadb start`), install it (`apt-get install mariadb-server`), "
                "or point REDPACKET_MYSQL_URL at a server, e.g. mysql://root@127.0.0.1:3306"
            ) from None

    def plan(self) -> None:
        prefix = self._prefix()
        ports = free_ports(3 * self.shards + 2)
        self.metrics_port = ports.pop()
        if self.port == 0:
            self.port = ports.pop()
        else:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", self.port))
                except OSError:
                    raise Unmet(
                        f"port {self.port} is taken (another cluster?): pass --port 0 for any "
                        "free port, or another --port"
                    ) from None
        self.plans = [
            ShardPlan(
                i,
                f"shard-{i}",
                ports[3 * i],
                ports[3 * i + 1],
                f"{prefix}_shard_{i}",
                self.mysql_server,
                metrics_port=ports[3 * i + 2],
                redis_password=secrets.token_urlsafe(24),
            )
            for i in range(self.shards)
        ]
        self.gateway_url = f"http://127.0.0.1:{self.port}"

    def _service_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(REDPACKET_NODE_SECRET=self.node_secret, **extra)
        return env

    def _prefix(self) -> str:
        return self.db_prefix or ("redpacket" if self.name == "dev" else f"redpacket_{self.name}")

    def _shard_children(self, plan: ShardPlan) -> list[Child]:
        """The redis-server and the node of one shard."""
        logs = self.home / "logs"
        python = [sys.executable, "-m", "redpacket.cli"]
        data = self.home / f"redis-{plan.index}"
        data.mkdir(parents=True, exist_ok=True)
        return [
            Child(
                f"{plan.name}-redis",
                redis_server_argv(plan.redis_port, data.resolve(), plan.redis_password),
                dict(os.environ),
                logs / f"{plan.name}-redis.log",
            ),
            Child(
                f"{plan.name}-node",
                [*python, "node"],
                self._service_env(
                    REDPACKET_NODE_NAME=plan.name,
                    REDPACKET_PORT=str(plan.node_port),
                    REDPACKET_REDIS_URL=plan.redis_url,
                    REDPACKET_MYSQL_URL=plan.mysql_url,
                    REDPACKET_RING_FILE=str(self.ring_file.resolve()),  # users' history
                    REDPACKET_METRICS_PORT=str(plan.metrics_port),
                ),
                logs / f"{plan.name}-node.log",
            ),
        ]

    def _children(self) -> list[Child]:
        logs = self.home / "logs"
        python = [sys.executable, "-m", "redpacket.cli"]
        children = [child for plan in self.plans for child in self._shard_children(plan)]
        for worker in range(max(1, self.gateway_workers)):
            name = "gateway" if worker == 0 else f"gateway-{worker + 1}"
            children.append(
                Child(
                    name,
                    [*python, "gateway"],
                    self._service_env(
                        REDPACKET_PORT=str(self.port),
                        REDPACKET_METRICS_PORT=str(self.metrics_port),
                        REDPACKET_RING_FILE=str(self.ring_file.resolve()),
                        REDPACKET_JWT_SECRET=self.jwt_secret,
                        REDPACKET_EXPIRE_S=str(self.expire_s),
                        # the page at /app/ signs in through it; never on in production
                        REDPACKET_DEV_LOGIN=os.environ.get("REDPACKET_DEV_LOGIN", "true"),
                        # the wallet: free money for every user (a dev cluster only), and the
                        # key of the top-up webhook (`redpacket wallet topup` reads it here)
                        REDPACKET_DEV_STARTING_BALANCE=str(self.starting_balance),
                        REDPACKET_PAYMENTS_SECRET=self.payments_secret,
                    ),
                    logs / f"{name}.log",
                )
            )
        return children

    async def up(self, timeout_s: float = 60.0) -> None:
        """Start everything and wait until the gateway says every shard is ready."""
        await self.check_prerequisites()
        self.plan()
        # cluster.json holds the JWT and node secrets, ring.json the Redis passwords: every
        # file and folder this supervisor (and its children) makes is its user's alone
        os.umask(0o077)
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        await self.write_ring(RingDoc(1, tuple(p.spec() for p in self.plans)))
        started = time.monotonic()
        for plan in self.plans:  # as the chart's Job does before the nodes start
            await migrate(plan.mysql_url)
        for child in self._children():
            self.children[child.name] = child
            await child.start()
            self._watchers.append(asyncio.create_task(self._supervise(child)))
        await self.start_control()
        self.write_state(ready=False)
        await self.wait_ready(timeout_s)
        self.write_state(ready=True)
        self.say(f"ready in {time.monotonic() - started:.1f}s")

    async def wait_ready(self, timeout_s: float) -> None:
        if not await answers_ready(self.gateway_url, timeout_s, ALL_SHARDS_READY):
            raise Unmet(
                f"cluster not ready after {timeout_s:.0f}s; see the logs in {self.home / 'logs'}"
            )

    # -- supervise ----------------------------------------------------------------------

    async def _supervise(self, child: Child) -> None:
        """Restart a child that exits, as a Kubernetes kubelet would (with backoff)."""
        delay, started = 0.5, time.monotonic()
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            if self._stopping or child.retired:
                return
            if time.monotonic() - started >= 10:  # it ran a while: no backoff
                delay = 0.5
            self.say(f"{child.name} exited with code {code}; restarting in {delay:.1f}s")
            await asyncio.sleep(delay)
            if self._stopping or child.retired:
                return
            await child.start()
            child.restarts += 1
            self.write_state(ready=True)
            self.say(f"{child.name} restarted (pid {child.proc.pid if child.proc else '?'})")
            # a child that keeps dying soon after it starts waits longer each time
            delay, started = min(delay * 2, 5.0), time.monotonic()

    def write_state(self, ready: bool) -> None:
        state = {
            "name": self.name,
            "ready": ready,
            "supervisor_pid": os.getpid(),
            "gateway": {
                "url": self.gateway_url,
                "metrics_url": f"http://127.0.0.1:{self.metrics_port}",
                "pid": self._pid("gateway"),
            },
            "ring_file": str(self.ring_file.resolve()),
            "jwt_secret": self.jwt_secret,
            "node_secret": self.node_secret,
            "payments_secret": self.payments_secret,
            "starting_balance": self.starting_balance,
            "mysql_server": self.mysql_server,
            "control": {"url": self.control_url},
            "shards": [
                {
                    "name": p.name,
                    "url": p.node_url,
                    "metrics_url": p.metrics_url,
                    "pid": self._pid(f"{p.name}-node"),
                    "redis": p.redis_url,
                    "redis_pid": self._pid(f"{p.name}-redis"),
                    "mysql": p.mysql_url,
                }
                for p in self.plans
            ],
            "restarts": {name: c.restarts for name, c in self.children.items()},
        }
        path = self.home / "cluster.json"
        tmp = path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.chmod(0o600)
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)

    def _pid(self, name: str) -> int | None:
        child = self.children.get(name)
        return child.proc.pid if child and child.proc else None

    async def down(self) -> None:
        self._stopping = True
        if self._control is not None:
            await self._control.cleanup()
        for task in self._watchers:
            task.cancel()
        # the gateway first, then the nodes (they finish their commits), then their stores
        order = [
            *[name for name in self.children if name.startswith("gateway")],
            *[f"{p.name}-node" for p in self.plans],
            *[f"{p.name}-redis" for p in self.plans],
        ]
        for name in order:
            if name in self.children:
                await self.children[name].stop()
        with contextlib.suppress(FileNotFoundError):
            (self.home / "cluster.json").unlink()

    # -- changes at run time (the `local` backend of `redpacket rebalance`) -----------------

    async def start_control(self) -> None:
        """Serve :func:`control_app` on 127.0.0.1 (its URL goes into cluster.json)."""
        self._control = web.AppRunner(control_app(self), access_log=None)
        await self._control.setup()
        port = free_ports(1)[0]
        await web.TCPSite(self._control, "127.0.0.1", port).start()
        self.control_url = f"http://127.0.0.1:{port}"

    async def add_shard(self, name: str, node_port: int = 0, timeout_s: float = 60.0) -> ShardPlan:
        """Start one more shard (redis-server, database, node) under supervision; idempotent."""
        async with self._change_lock:
            plan = next((p for p in self.plans if p.name == name), None)
            if plan is None:
                ports = free_ports(3)
                plan = ShardPlan(
                    max((p.index for p in self.plans), default=-1) + 1,
                    name,
                    node_port or ports[0],
                    ports[1],
                    f"{self._prefix()}_{re.sub(r'[^a-z0-9]+', '_', name.lower())}",
                    self.mysql_server,
                    metrics_port=ports[2],
                    redis_password=secrets.token_urlsafe(24),
                )
                self.plans.append(plan)
                await migrate(plan.mysql_url)
                for child in self._shard_children(plan):
                    self.children[child.name] = child
                    await child.start()
                    self._watchers.append(asyncio.create_task(self._supervise(child)))
                self.write_state(ready=True)
                self.say(f"{name} started: node {plan.node_url}, redis {plan.redis_url}")
        if not await answers_ready(plan.node_url, timeout_s):
            raise Unmet(f"{name} not ready after {timeout_s:.0f}s; see its logs")
        return plan

    async def remove_shard(self, name: str) -> tuple[bool, bool]:
        """Stop a shard's node, then its redis-server; drop its database if it holds nothing.

        ``(stopped, database dropped)``; idempotent.
        """
        async with self._change_lock:
            plan = next((p for p in self.plans if p.name == name), None)
            if plan is None:
                return False, False
            for child_name in (f"{name}-node", f"{name}-redis"):
                child = self.children.pop(child_name, None)
                if child is not None:
                    child.retired = True
                    await child.stop()
            self.plans.remove(plan)
            self.write_state(ready=True)
            dropped = await _drop_if_empty(plan.mysql_url)
            self.say(f"{name} stopped" + (", its database dropped" if dropped else ""))
            return True, dropped

    async def publish_ring(self, doc: RingDoc) -> None:
        """Write the ring file, and tell every running gateway to load it now (SIGHUP).

        A gateway ignores SIGHUP until it serves (cli/serve.py), and one still starting reads
        the new file when it starts; any it misses, it picks up by polling the file.
        """
        await self.write_ring(doc)
        for name, child in self.children.items():
            if name.startswith("gateway") and child.proc and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGHUP)

    async def write_ring(self, doc: RingDoc) -> None:
        """Write the ring file (`redpacket chaos` also writes its gateways' proxied view)."""
        doc.save(self.ring_file)

    def describe(self) -> str:
        lines = [
            f"local cluster {self.name!r}: {self.shards} shard(s)",
            f"  gateway  {self.gateway_url}   (ring {self.ring_file})",
        ]
        for p in self.plans:
            lines.append(
                f"  {p.name:<8} node {p.node_url}  redis {p.redis_url}  mysql {p.mysql_url}"
            )
        lines += [
            f"  app      {self.gateway_url}/app/   (dev login on)",
            f"  logs     {self.home / 'logs'}/",
            f"  token    redpacket token --cluster {self.name} --uid 42 --name Alice",
            f"  demo     redpacket demo --cluster {self.name}",
        ]
        return "\n".join(lines)


async def _drop_if_empty(mysql_url: str) -> bool:
    """Drop a removed shard's database when it holds no packet, no idempotency key and no
    undelivered history event."""
    target = parse_mysql_url(mysql_url)
    try:
        conn = await connect_one(mysql_url)
    except Exception:
        return False
    try:
        async with conn.cursor() as cur:
            for statement in (
                "SELECT 1 FROM red_packet_info LIMIT 1",
                "SELECT 1 FROM idempotency_key LIMIT 1",
                "SELECT 1 FROM history_outbox LIMIT 1",
            ):
                await cur.execute(statement)
                if await cur.fetchone():
                    return False
            await cur.execute("DROP DATABASE `" + target.database.replace("`", "``") + "`")
            return True
    except Exception:
        return False
    finally:
        conn.close()


def control_app(cluster: DevCluster) -> web.Application:
    """The supervisor's control endpoint, for `redpacket rebalance --backend local`.

    ``POST /shards {"name", "port"?}`` starts a shard, ``DELETE /shards/{name}`` stops one,
    ``PUT /ring`` publishes a ring document. Listens on 127.0.0.1 only, and every call must
    carry the cluster's node secret (header X-Redpacket-Node-Secret).
    """
    secret = cluster.node_secret.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get(NODE_SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, secret):
            return web.json_response({"error": "unauthenticated"}, status=401)
        try:
            return await handler(request)
        except (Unmet, RingError, ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def add(request: web.Request) -> web.Response:
        body = await request.json()
        plan = await cluster.add_shard(str(body["name"]), int(body.get("port") or 0))
        return web.json_response(
            {
                "name": plan.name,
                "url": plan.node_url,
                "redis": plan.redis_url,
                "mysql": plan.mysql_url,
            }
        )

    async def remove(request: web.Request) -> web.Response:
        stopped, dropped = await cluster.remove_shard(request.match_info["name"])
        return web.json_response({"stopped": stopped, "dropped_database": dropped})

    async def put_ring(request: web.Request) -> web.Response:
        doc = RingDoc.parse(await request.json())
        await cluster.publish_ring(doc)
        return web.json_response({"version": doc.version})

    app = web.Application(middlewares=[auth])
    app.add_routes(
        [
            web.post("/shards", add),
            web.delete("/shards/{name}", remove),
            web.put("/ring", put_ring),
        ]
    )
    return app


def run_dev_up(args: argparse.Namespace) -> int:
    cluster = DevCluster(
        name=args.cluster,
        shards=args.shards,
        port=args.port,
        var=args.var,
        db_prefix=args.db_prefix,
        expire_s=args.expire_s,
        gateway_workers=args.gateway_workers,
    )
    if args.starting_balance is not None:
        cluster.starting_balance = args.starting_balance

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await cluster.up()
        except Unmet as exc:
            print(f"redpacket dev up: {exc}", file=sys.stderr)
            await cluster.down()
            return 2
        print(cluster.describe(), flush=True)
        cluster.say("running; Ctrl-C stops everything")
        await stop.wait()
        cluster.say("stopping")
        await cluster.down()
        cluster.say("stopped")
        return 0

    return asyncio.run(main())
