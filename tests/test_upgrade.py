"""A rolling upgrade from the previous release, under load (docs/deploy.md "Upgrades").

The previous release's commit comes from CHANGELOG.md; it is checked out into a temporary git
worktree and run with this venv's Python and dependencies: its folders are mapped to
``redpacket.*`` (its pyproject's ``package-dir``) by a folder of symlinks put first on
PYTHONPATH, so nothing is installed. Its cluster is spawned process by process (2 shards: a
redis-server, a database and a node each; 2 gateways sharing one port, as SO_REUSEPORT
workers), so that each process can be replaced by this code's on the same port:

1. the old cluster starts (its nodes make their schema, as 0.1.0 did) and a load starts:
   a creator keeps sending packets, users keep opening them;
2. this code's ``redpacket db migrate`` runs on every shard while the old nodes serve;
3. gateways, then nodes, are stopped (SIGTERM: they drain) and started again from this code,
   one at a time, while the load goes on;
4. the load ends; the checker must be clean (no lost or doubled share, conservation) and
   every 200 a client saw must be in a ledger.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from redpacket.cli.check import Observed, check_shards
from redpacket.cli.children import free_ports
from redpacket.gateway.auth import mint_token
from redpacket.node.migrations.runner import code_version
from redpacket.sharding.ring import RingDoc
from tests.conftest import sql
from tests.helm_tool import REPO
from tests.releases import previous_release

pytestmark = pytest.mark.timeout(240)

USERS = range(1, 41)
# the new gateways accept the decimal ids 0.1.0 handed out for packets made before this
LEGACY_IDS_SETTING = "REDPACKET_LEGACY_IDS_BEFORE_MS"


def internal_id(public_id: str) -> int:
    """The snowflake behind a packet id a gateway returned: 0.1.0's decimal string, or the
    22-char tagged form (base64url of the snowflake's 8 big-endian bytes + an 8-byte tag)."""
    if public_id.isdigit():
        return int(public_id)
    raw = base64.urlsafe_b64decode(public_id + "=" * (-len(public_id) % 4))
    return int.from_bytes(raw[:8], "big")


@dataclass
class Release:
    """How to run one release's code: its python path (empty: this code)."""

    pythonpath: str

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, **extra}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    commit = previous_release().commit
    home = tmp_path_factory.mktemp("previous-release")
    tree = home / "tree"
    # a run killed before its cleanup left a worktree entry whose folder is gone: forget it
    subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)
    added = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit],
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        pytest.fail(
            f"cannot check out the previous release {commit} (CHANGELOG.md): the test needs "
            f"the repository's git history (not a shallow clone).\n{added.stderr}"
        )
    try:
        package_dir = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ]
        for name, folder in package_dir.items():
            link = home / "pkg" / Path(*name.split("."))
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(tree / folder)
        yield Release(str(home / "pkg"))
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
            capture_output=True,
        )


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        """SIGTERM: a gateway or node drains its calls in flight, as in a rolling update."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class UpgradeCluster:
    """Two shards and two gateways, each process replaceable by another release's."""

    home: Path
    ring_file: Path
    port: int
    jwt_secret: str
    node_secret: str
    shards: list[dict[str, Any]]
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, name: str, release: Release, service: str, **env: str) -> None:
        proc = Proc(
            name,
            [sys.executable, "-m", "redpacket.cli", service],
            release.env(REDPACKET_NODE_SECRET=self.node_secret, **env),
            self.home / f"{name}{'-old' if release.pythonpath else ''}.log",
        )
        self.procs[name] = proc
        proc.start()

    def start_node(self, i: int, release: Release) -> None:
        shard = self.shards[i]
        self.start(
            f"shard-{i}",
            release,
            "node",
            REDPACKET_NODE_NAME=shard["name"],
            REDPACKET_PORT=str(shard["port"]),
            REDPACKET_REDIS_URL=shard["redis"],
            REDPACKET_MYSQL_URL=shard["mysql"],
            REDPACKET_RING_FILE=str(self.ring_file),
            REDPACKET_RECONCILE_INTERVAL_S="1",
        )

    def start_gateway(self, i: int, release: Release, **env: str) -> None:
        self.start(
            f"gateway-{i}",
            release,
            "gateway",
            REDPACKET_PORT=str(self.port),
            REDPACKET_RING_FILE=str(self.ring_file),
            REDPACKET_JWT_SECRET=self.jwt_secret,
            REDPACKET_RATE_OPEN_PER_S="1000",
            REDPACKET_RATE_OPEN_BURST="1000",
            REDPACKET_RATE_CREATE_PER_S="1000",
            REDPACKET_RATE_CREATE_BURST="1000",
            # creates pay from the sender's wallet since 0.2.0: a dev starting balance funds
            # the creator (the previous release ignores both settings)
            REDPACKET_DEV_LOGIN="true",
            REDPACKET_DEV_STARTING_BALANCE="1000000000",
            **env,
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log.read_text()[-1500:]}" for p in self.procs.values())

    async def listening(self, name: str, timeout_s: float = 60) -> None:
        """Until the process ``name`` said it listens (a gateway: its port is shared, so
        /readyz may be answered by the other one)."""
        deadline = time.monotonic() + timeout_s
        while "listening on" not in self.procs[name].log.read_text():
            assert time.monotonic() < deadline, f"{name} did not start:\n{self.logs()}"
            await asyncio.sleep(0.2)

    async def ready(self, url: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"{url} not ready:\n{self.logs()}"
                await asyncio.sleep(0.2)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()


@pytest_asyncio.fixture
async def old_cluster(
    old_release: Release, redis_servers: Any, mysql_databases: Any, tmp_path: Path
) -> AsyncIterator[UpgradeCluster]:
    ports = free_ports(3)
    shards = [
        {
            "name": f"shard-{i}",
            "port": ports[i],
            "redis": redis_servers().url,
            "mysql": mysql_databases(f"upgrade{i}"),
        }
        for i in range(2)
    ]
    ring = tmp_path / "ring.json"
    # written as plain JSON in 0.1.0's format: both releases must read it
    ring.write_text(
        json.dumps(
            {
                "version": 1,
                "nodes": [
                    {
                        "name": s["name"],
                        "url": f"http://127.0.0.1:{s['port']}",
                        "weight": 1,
                        "redis": s["redis"],
                        "mysql": s["mysql"],
                    }
                    for s in shards
                ],
            }
        )
    )
    cluster = UpgradeCluster(
        tmp_path, ring, ports[2], secrets.token_urlsafe(32), secrets.token_hex(16), shards
    )
    try:
        for i in range(2):
            cluster.start_node(i, old_release)
        for i in range(2):
            cluster.start_gateway(i, old_release)
        await cluster.ready(cluster.url)
        yield cluster
    finally:
        cluster.stop_all()


@dataclass
class Load:
    """A creator that keeps sending packets and users that keep opening them; every 201 and
    every 200 is kept."""

    url: str
    jwt_secret: str
    packets: list[str] = field(default_factory=list)
    observed: list[Observed] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    odd: list[str] = field(default_factory=list)  # answers the test does not expect, for its report
    creating: asyncio.Event = field(default_factory=asyncio.Event)
    session: aiohttp.ClientSession | None = None

    def headers(self, uid: int) -> dict[str, str]:
        token = mint_token(self.jwt_secret, uid, f"user{uid}", "")
        return {"Authorization": f"Bearer {token}"}

    async def call(self, path: str, uid: int, body: Any = None) -> tuple[int, Any]:
        assert self.session is not None
        try:
            async with self.session.post(
                self.url + path, json=body, headers=self.headers(uid)
            ) as resp:
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError):
            return 599, None

    async def creator(self) -> None:
        while self.creating.is_set():
            status, body = await self.call(
                "/v1/red-packets", 1000, {"total_amount": 600, "total_packet": 6}
            )
            self.statuses[status] += 1
            if status not in (201, 503, 599):
                self.odd.append(f"create: {status} {body}")
            if status == 201:
                self.packets.append(body["red_packet_id"])
            await asyncio.sleep(0.15)

    async def user(self, uid: int) -> None:
        done: set[str] = set()
        while True:
            todo = [p for p in self.packets if p not in done]
            if not todo:
                if not self.creating.is_set():
                    return
                await asyncio.sleep(0.1)
                continue
            packet = random.choice(todo)
            status, body = await self.call(f"/v1/red-packets/{packet}/open", uid)
            self.statuses[status] += 1
            if status == 200:
                self.observed.append(Observed(internal_id(packet), uid, body["amount"]))
                done.add(packet)
            elif 400 <= status < 500:  # 410 sold out is final; anything else is judged below
                done.add(packet)
                if status != 410:
                    self.odd.append(f"open {packet}: {status} {body}")
            else:  # 503, a connection cut by a restart: the user taps again
                await asyncio.sleep(0.05 + random.random() * 0.1)

    async def run(self) -> None:
        async with aiohttp.ClientSession() as self.session:
            await asyncio.gather(self.creator(), *(self.user(uid) for uid in USERS))


async def test_a_cluster_of_the_previous_release_rolls_to_this_code_under_load(
    old_cluster: UpgradeCluster,
) -> None:
    cluster = old_cluster
    new = Release("")
    load = Load(cluster.url, cluster.jwt_secret)
    load.creating.set()
    running = asyncio.ensure_future(load.run())
    try:
        await asyncio.sleep(2)
        for shard in cluster.shards:  # the old nodes made their schema, unversioned
            assert await sql(shard["mysql"], "SHOW TABLES LIKE 'schema_migration'") == []
        migrated = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "redpacket.cli",
                "db",
                "migrate",
                "--ring",
                str(cluster.ring_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert migrated.returncode == 0, migrated.stderr
        # nodes first: a new node serves every call of the previous release's gateway, while a
        # new gateway needs the new nodes' calls (the wallet's holds) (docs/deploy.md)
        for i, shard in enumerate(cluster.shards):
            cluster.procs[f"shard-{i}"].stop()
            cluster.start_node(i, new)
            await cluster.ready(f"http://127.0.0.1:{shard['port']}")
            await asyncio.sleep(1)
        legacy_before_ms = str(int(time.time() * 1000) + 3_600_000)
        for i in range(2):
            cluster.procs[f"gateway-{i}"].stop()
            cluster.start_gateway(i, new, **{LEGACY_IDS_SETTING: legacy_before_ms})
            await cluster.listening(f"gateway-{i}")
            await cluster.ready(cluster.url)
            await asyncio.sleep(1)
        opened_before = len(load.observed)
        await asyncio.sleep(2)
        load.creating.clear()
        await asyncio.wait_for(asyncio.shield(running), 60)
    finally:
        load.creating.clear()
        await asyncio.wait_for(running, 60)
    assert len(load.observed) > opened_before, "nothing was opened once every process was new"
    assert load.statuses[201] >= 10 and load.statuses[200] >= 50, load.statuses
    # every packet the clients were given stays openable (old decimal ids included), and no
    # answer but 503 or a cut connection asks them to retry
    unexpected = set(load.statuses) - {200, 201, 410, 503, 599}
    assert not unexpected, f"{load.statuses}\n{load.odd[:10]}\n{cluster.logs()}"
    for shard in cluster.shards:
        assert (await sql(shard["mysql"], "SELECT MAX(version) FROM schema_migration")) == [
            (code_version(),)
        ]
    doc = RingDoc.load(cluster.ring_file)
    # packets the previous release made were not paid for (it had no wallet): allowed here only
    report = await check_shards(
        list(doc.nodes), load.observed, settle_s=15, owners=doc.ring(), allow_unfunded=True
    )
    assert report.ok, "\n".join(report.violations) + "\n" + cluster.logs()
