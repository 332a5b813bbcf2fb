"""Reaching a shard's MySQL: its URL, the node's pool (asyncmy) and the tools' one-off
connections (aiomysql on PyMySQL), and creating its database."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiomysql
import asyncmy
import pymysql

from redpacket.core.env import MYSQL_PASSWORD_FILE, password_from_file

# "CREATE ... IF NOT EXISTS" on something that exists is the normal case for an idempotent
# migration (node/migrations), not news: keep PyMySQL from printing a warning for it.
warnings.filterwarnings(
    "ignore", message=r".*(already exists|database exists)", category=pymysql.Warning
)


@dataclass(frozen=True)
class MysqlTarget:
    host: str
    port: int
    user: str
    password: str
    database: str


def parse_mysql_url(url: str) -> MysqlTarget:
    """``mysql://user:password@host:port/database``; the database part may be empty."""
    parts = urlsplit(url)
    if parts.scheme not in ("mysql", "mariadb"):
        raise ValueError(f"not a mysql:// URL: {url!r}")
    return MysqlTarget(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        # the password: in the URL, or in the file REDPACKET_MYSQL_PASSWORD_FILE names
        password=unquote(parts.password or "") or password_from_file(MYSQL_PASSWORD_FILE) or "",
        database=parts.path.lstrip("/"),
    )


async def create_pool(target: MysqlTarget, pool_size: int, timeout_s: float) -> asyncmy.Pool:
    """The node's pool: asyncmy, whose protocol and escaping are compiled (Cython). Measured
    against aiomysql on the group commit: about a third less client CPU per claim
    (docs/benchmarks.md "Node levers"). Tools keep aiomysql/PyMySQL (:func:`connect_one`)."""
    return await asyncmy.create_pool(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        database=target.database,
        minsize=1,
        maxsize=pool_size,
        autocommit=False,
        charset="utf8mb4",
        connect_timeout=timeout_s,
        init_command="SET time_zone = '+00:00'",
        pool_recycle=300,
    )


async def connect_one(url: str, *, with_database: bool = True) -> aiomysql.Connection:
    """One unpooled autocommit connection to the server (and database) of a mysql:// URL,
    for tools and tests that read a shard's ledger directly."""
    target = parse_mysql_url(url)
    return await aiomysql.connect(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        db=target.database if with_database and target.database else None,
        charset="utf8mb4",
        connect_timeout=5,
        autocommit=True,
    )


async def ensure_database(url: str) -> None:
    """Create the shard's database if missing: one database per shard, made by its first
    migration (node/migrations/runner.py).

    An existing database is left alone, so a user without the CREATE privilege (a managed
    MySQL with a database made for us) works too.
    """
    target = parse_mysql_url(url)
    if not target.database:
        return
    try:
        (await connect_one(url)).close()
        return
    except pymysql.err.OperationalError as exc:
        if not exc.args or exc.args[0] != 1049:  # 1049: unknown database
            raise
    conn = await connect_one(url, with_database=False)
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                "CREATE DATABASE IF NOT EXISTS `"
                + target.database.replace("`", "``")
                + "` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
    finally:
        conn.close()
