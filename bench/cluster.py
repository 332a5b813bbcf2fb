"""The cluster under test: our own ``DevCluster`` (started and stopped here, its databases
dropped), a running local one, or any gateway by URL; and the MySQL server's settings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redpacket.bench import procstats
from redpacket.sharding.ring import NodeSpec, RingDoc


@dataclass
class Target:
    """The cluster under test: where its gateway is, its secret, its stores, its processes."""

    url: str
    jwt_secret: str
    nodes: list[NodeSpec] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)  # gateway, shard-0-node, ...
    server_pids: dict[str, int] = field(default_factory=dict)  # mysqld, if it is local
    mysql_server: str | None = None
    cluster: Any = None  # our own DevCluster, stopped at the end
    databases: list[str] = field(default_factory=list)  # ours, dropped at the end
    notes: list[str] = field(default_factory=list)
    starting_balance_cents: int = 0  # every user's first grant (dev clusters only)
    payments_secret: str = ""  # signs the senders' top-ups (bench/funding.py), if known

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    def restarts(self) -> dict[str, int]:
        if self.cluster is None:
            return {}
        return {name: c.restarts for name, c in self.cluster.children.items()}

    def refresh_pids(self) -> None:
        """A supervisor restart changes pids: read them again from our own cluster."""
        if self.cluster is not None:
            self.pids = _cluster_pids(self.cluster)
        self.pids.update(self.server_pids)


def _cluster_pids(cluster: Any) -> dict[str, int]:
    pids = {}
    for name, child in cluster.children.items():
        if child.proc is not None and not name.endswith("-redis"):
            pids[name] = child.proc.pid
    for name, child in cluster.children.items():
        if child.proc is not None and name.endswith("-redis"):
            pids[name] = child.proc.pid
    return pids


def _ring_nodes(ring_file: str) -> list[NodeSpec]:
    return RingDoc.load(Path(ring_file)).all_nodes()  # every version's shards, draining ones too


async def start_target(args: argparse.Namespace) -> Target:
    """Our own cluster, or the one named by ``--cluster`` or ``--url``. Our own has no
    starting balance, as in production: a dev cluster's starting balance is a ``grant`` to
    every user at their first wallet row, which under the real crowd (every opener new) is
    one more wallet transaction per open that production never writes. Its senders are
    funded by signed top-ups instead (bench/funding.py), the production path."""
    from redpacket.cli.devcluster import DevCluster, load_state

    payments = args.payments_secret or os.environ.get("REDPACKET_PAYMENTS_SECRET", "")
    if args.url:
        secret = args.jwt_secret or os.environ.get("REDPACKET_JWT_SECRET", "")
        if not secret:
            raise SystemExit("redpacket bench: --url needs --jwt-secret or REDPACKET_JWT_SECRET")
        target = Target(args.url.rstrip("/"), secret, payments_secret=payments)
        if args.ring:
            target.nodes = _ring_nodes(args.ring)
        else:
            target.notes.append("no --ring: no Lua ceiling, no invariant check")
        return target
    if args.cluster:
        state = load_state(args.var, args.cluster)
        target = Target(state["gateway"]["url"], state["jwt_secret"])
        target.starting_balance_cents = int(state.get("starting_balance") or 0)
        target.payments_secret = payments or state.get("payments_secret", "")
        target.nodes = _ring_nodes(args.ring or state["ring_file"])
        target.mysql_server = state.get("mysql_server")
        target.pids = {"gateway": state["gateway"].get("pid")}
        for shard in state["shards"]:
            target.pids[f"{shard['name']}-node"] = shard.get("pid")
            target.pids[f"{shard['name']}-redis"] = shard.get("redis_pid")
        target.pids = {k: v for k, v in target.pids.items() if v}
        return target

    # Our own cluster. The per-user rate limits exist to stop one client hammering; a
    # benchmark's few hundred virtual users each open far more than a person would, so they
    # are lifted for this cluster (the limiter still runs on every open).
    for name in ("OPEN", "CREATE"):
        os.environ.setdefault(f"REDPACKET_RATE_{name}_PER_S", "1000000")
        os.environ.setdefault(f"REDPACKET_RATE_{name}_BURST", "1000000")
    prefix = f"redpacket_bench_{secrets.token_hex(3)}"
    cluster = DevCluster(
        name=args.name, shards=args.shards, port=0, var=args.var, db_prefix=prefix, quiet=True
    )
    cluster.starting_balance = 0  # production has none: the senders get top-ups
    if args.gateway_workers > 1:
        if not hasattr(cluster, "gateway_workers"):
            raise SystemExit("redpacket bench: this DevCluster cannot run several gateways")
        cluster.gateway_workers = args.gateway_workers
    target = Target("", cluster.jwt_secret, cluster=cluster, mysql_server=cluster.mysql_server)
    target.starting_balance_cents = cluster.starting_balance
    target.payments_secret = cluster.payments_secret
    target.databases = [f"{prefix}_shard_{i}" for i in range(args.shards)]
    try:
        await cluster.up()
    except BaseException:
        await stop_target(target, keep=args.keep)
        raise
    target.url = cluster.gateway_url
    target.nodes = _ring_nodes(str(cluster.ring_file))
    target.pids = _cluster_pids(cluster)
    return target


async def stop_target(target: Target, keep: bool) -> None:
    if target.cluster is None:
        return
    await target.cluster.down()
    if keep or not target.databases or not target.mysql_server:
        return
    import aiomysql

    from redpacket.node.ledger import parse_mysql_url

    server = parse_mysql_url(target.mysql_server)
    with contextlib.suppress(Exception):
        conn = await aiomysql.connect(
            host=server.host, port=server.port, user=server.user, password=server.password
        )
        try:
            async with conn.cursor() as cur:
                for name in target.databases:
                    await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            conn.close()


async def mysql_settings(target: Target) -> dict[str, Any]:
    """The durability settings of the MySQL server the ledgers are on (reported, not changed)."""
    import aiomysql

    from redpacket.node.ledger import parse_mysql_url

    url = target.mysql_server or (target.nodes[0].mysql if target.nodes else None)
    if not url:
        return {}
    server = parse_mysql_url(url)
    try:
        conn = await aiomysql.connect(
            host=server.host, port=server.port, user=server.user, password=server.password
        )
    except Exception as exc:
        return {"error": str(exc)}
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                "SELECT @@version, @@innodb_flush_log_at_trx_commit, @@sync_binlog, @@log_bin, "
                "@@innodb_buffer_pool_size, @@pid_file, @@port"
            )
            row = await cur.fetchone()
    finally:
        conn.close()
    keys = ("version", "innodb_flush_log_at_trx_commit", "sync_binlog", "log_bin", "buffer_pool")
    out: dict[str, Any] = dict(zip(keys, row[:5], strict=True))
    # the server's CPU is sampled per phase: the whole server, shared by every shard's ledger
    pid, found_by = procstats.mysql_server_pid(row[5], row[6])
    if server.host in ("127.0.0.1", "localhost", "::1") and pid is not None:
        target.server_pids["mysqld"] = pid
        target.pids["mysqld"] = pid
    out["server_pid"] = target.server_pids.get("mysqld")
    out["server_pid_found_by"] = found_by
    out["cpu_note"] = (
        "mysqld is the whole server's CPU over each phase: one server holds every shard's "
        "ledger, so it is shared by all shards (and counts anything else using it meanwhile)"
    )
    return out
