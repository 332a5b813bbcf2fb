"""``redpacket db migrate`` (and its alias ``db init``): which databases, then the runner.

The databases are, first found: every ``--mysql-url``; every shard of ``--ring`` (the ring
file); every shard of the local cluster ``--cluster``; the node's own ``REDPACKET_MYSQL_URL``
(``{ordinal}`` filled in as the node does, so a Job or init container with the node's
environment migrates that node's database); else the default of ``db init``.

The runner and the MySQL driver are imported when the command runs, not when the parser is
built (``redpacket token`` does not load them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from redpacket.core.env import SettingsError

INIT_DEFAULT_URL = "mysql://root@127.0.0.1:3306/redpacket_shard_0"


def _node_url_from_env() -> str | None:
    """REDPACKET_MYSQL_URL as the node reads it (with {ordinal}), if it names a database."""
    from redpacket.node.ledger import parse_mysql_url
    from redpacket.node.settings import NodeSettings

    raw = os.environ.get("REDPACKET_MYSQL_URL", "")
    if not raw:
        return None
    env = {**os.environ, "REDPACKET_NODE_SECRET": os.environ.get("REDPACKET_NODE_SECRET") or "-"}
    url = NodeSettings.from_env(env).mysql_url
    return url if parse_mysql_url(url).database else None


def _ring_urls(path: str) -> list[str]:
    """Each shard's MySQL in a ring file: every version's, the previous ring's too."""
    from redpacket.sharding.ring import RingDoc

    nodes = RingDoc.load(path).all_nodes()
    urls = list(dict.fromkeys(n.mysql for n in nodes if n.mysql))
    if not urls:
        raise SettingsError(f"the ring {path} names no shard's mysql URL")
    return urls


def target_urls(args: argparse.Namespace, fallback: str | None) -> list[str]:
    if args.mysql_url:
        return list(args.mysql_url)
    if args.ring:
        return _ring_urls(args.ring)
    if args.cluster:
        from redpacket.cli.devcluster import load_state

        return _ring_urls(load_state(args.var, args.cluster)["ring_file"])
    url = _node_url_from_env() or fallback
    if url is None:
        raise SettingsError(
            "which database? pass --mysql-url URL, --ring FILE or --cluster NAME, or set "
            "REDPACKET_MYSQL_URL to a URL naming the shard's database"
        )
    return [url]


async def _migrate_patiently(url: str, dry_run: bool, wait_s: float) -> str:
    """Migrate one database, waiting up to ``wait_s`` for its server to answer (a Job may
    start before MySQL does)."""
    import pymysql

    from redpacket.node.migrations.runner import describe, migrate

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return describe(url, await migrate(url, dry_run=dry_run), with_sql=dry_run)
        except (OSError, pymysql.err.OperationalError) as exc:
            refused = isinstance(exc, OSError) or (exc.args and exc.args[0] == 2003)
            if not refused or time.monotonic() > deadline:
                raise
        await asyncio.sleep(1.0)


def run_migrate(args: argparse.Namespace, fallback: str | None = None) -> int:
    """Migrate every target, one after the other; each one is locked on its own server."""
    urls = target_urls(args, fallback)

    async def run() -> None:
        for url in urls:
            print(await _migrate_patiently(url, args.dry_run, args.wait_s), flush=True)

    asyncio.run(run())
    return 0


def register(db: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``db migrate`` and ``db init`` (the same, with a default database)."""
    for name, help_text, fallback in (
        ("migrate", "bring shard databases to this release's schema version (idempotent)", None),
        ("init", "alias of `db migrate` (default: the local shard-0 database)", INIT_DEFAULT_URL),
    ):
        p = db.add_parser(name, help=help_text)
        p.add_argument(
            "--mysql-url",
            action="append",
            help="mysql://user:pass@host:port/database (repeatable)",
        )
        p.add_argument("--ring", help="ring file: migrate every shard it lists")
        p.add_argument("--cluster", help="local cluster: migrate every shard of its ring")
        p.add_argument("--var", default="var", help="folder of local clusters (default: ./var)")
        p.add_argument(
            "--dry-run", action="store_true", help="print what would be applied, change nothing"
        )
        p.add_argument(
            "--wait-s",
            type=float,
            default=0.0,
            help="seconds to wait for a MySQL server that does not answer yet (default: 0)",
        )
        p.set_defaults(func=lambda args, fb=fallback: run_migrate(args, fb))
