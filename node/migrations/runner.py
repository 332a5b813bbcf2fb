"""Apply the numbered migrations to one shard's database, and judge whether code fits it.

A migration is ``NNNN_name.sql`` in this folder: statements separated by lines holding only
``;`` (the same loader rule as before, so no SQL parser), and a first line
``-- oldest code: K``: after it is applied, code whose highest migration is below K must not
start on the database (an expand migration keeps K at the previous release's version; only a
contract migration raises it). The database records every applied migration in
``schema_migration``; its version is the highest one applied.

Why a runner of our own (about 200 lines) rather than a library: yoyo-migrations (raw SQL,
MySQL) is the one that fits, but it is synchronous on PyMySQL, takes its lock with a lock
*table* (a crashed migrator leaves a row to clear by hand) and has no notion of "code this old
may no longer run here", which is what a rolling upgrade needs; alembic wants SQLAlchemy, which
nothing else here uses. MySQL's ``GET_LOCK`` is released by the server when the session ends,
whatever killed it, so two migrators (two Jobs, an operator and a Job) never interleave and a
dead one never blocks the next. MySQL DDL commits on its own, so a migration is not atomic:
every statement must be idempotent (``IF NOT EXISTS``, or guarded as in 0001), and a migrator
that died half way is simply run again.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import aiomysql

from redpacket.core.env import SettingsError
from redpacket.node.ledger import connect_one, ensure_database, parse_mysql_url

MIGRATIONS = Path(__file__).parent
TABLE = "schema_migration"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_OLDEST = re.compile(r"^-- oldest code: (\d+)\s*$")
LOCK_TIMEOUT_S = 120.0

# The runner's own table, never a migration (it must exist before any migration runs), and so
# never changed in a way older runners cannot read.
TABLE_DDL = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
  version      INT          NOT NULL COMMENT 'the number of the migration',
  name         VARCHAR(128) NOT NULL,
  checksum     CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL
               COMMENT 'sha256 of its statements: a released migration is never edited',
  oldest_code  INT          NOT NULL COMMENT 'code below this schema version must not start',
  applied_time DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"""


class MigrationError(SettingsError):
    """The migrations cannot be applied as they are (a bad file, an edited one, a held lock).

    A SettingsError, so the command exits 2 with this message, not a traceback."""


class SchemaMismatch(SettingsError):
    """A node's code and its database's schema version do not fit: the node must not start.

    A SettingsError, so ``redpacket node`` exits 2 with this message, not a traceback."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    oldest_code: int
    statements: tuple[str, ...]

    @property
    def checksum(self) -> str:
        return hashlib.sha256("\n;\n".join(self.statements).encode()).hexdigest()


def parse(path: Path) -> Migration:
    """One migration file (its name gives the version, its first line the oldest code)."""
    match = _FILE.match(path.name)
    if match is None:
        raise MigrationError(f"{path.name}: a migration is named NNNN_name.sql")
    text = path.read_text("utf-8")
    oldest = _OLDEST.match(text.splitlines()[0] if text else "")
    if oldest is None:
        raise MigrationError(f"{path.name}: its first line must be `-- oldest code: K`")
    version = int(match.group(1))
    if not 1 <= int(oldest.group(1)) <= version:
        raise MigrationError(f"{path.name}: oldest code must be between 1 and {version}")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    statements = tuple(s.strip() for s in "\n".join(lines).split("\n;") if s.strip())
    return Migration(version, path.stem, int(oldest.group(1)), statements)


def load(folder: Path = MIGRATIONS) -> tuple[Migration, ...]:
    """Every migration in ``folder``, numbered 1, 2, 3... without a gap."""
    found = tuple(sorted((parse(p) for p in folder.glob("*.sql")), key=lambda m: m.version))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(f"migration {expected:04d} is missing (found {migration.name})")
    return found


def code_version(folder: Path = MIGRATIONS) -> int:
    """The schema version this code was written for: it understands it and needs it."""
    return len(load(folder))


@dataclass(frozen=True)
class SchemaState:
    """What a database records of its migrations (version 0: never migrated)."""

    database: str
    checksums: dict[int, str] = field(default_factory=dict)
    oldest_code: int = 0

    @property
    def version(self) -> int:
        return max(self.checksums, default=0)


async def read_state(cur: aiomysql.Cursor, database: str) -> SchemaState:
    """The state of ``database`` (which may not exist yet), read on any connection."""
    await cur.execute(
        "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
        (database, TABLE),
    )
    if await cur.fetchone() is None:
        return SchemaState(database)
    quoted = "`" + database.replace("`", "``") + "`"
    await cur.execute(f"SELECT version, checksum, oldest_code FROM {quoted}.{TABLE}")
    rows = await cur.fetchall()
    return SchemaState(
        database,
        {int(v): str(c) for v, c, _ in rows},
        max((int(o) for _, _, o in rows), default=0),
    )


def judge(state: SchemaState, code: int) -> None:
    """Raise SchemaMismatch unless code of schema version ``code`` may run on ``state``."""
    if state.version < code:
        now = "was never migrated" if state.version == 0 else f"is at version {state.version}"
        raise SchemaMismatch(
            f"database {state.database!r} {now}, older than this code needs (schema version "
            f"{code}): run `redpacket db migrate` against it first"
        )
    if state.oldest_code > code:
        raise SchemaMismatch(
            f"database {state.database!r} is at schema version {state.version}, which code "
            f"below version {state.oldest_code} must not run on; this code knows version "
            f"{code}: deploy a release that knows version {state.oldest_code} or later"
        )


async def check_database(
    url: str, folder: Path = MIGRATIONS, timeout_s: float = 5.0
) -> SchemaState:
    """The check a node makes before it starts: its database fits its code, or SchemaMismatch.

    Bounded by ``timeout_s`` (TimeoutError), so a link that swallows packets is retried by
    the caller like a refused one, not waited on for ever."""
    target = parse_mysql_url(url)
    async with asyncio.timeout(timeout_s):
        conn = await connect_one(url, with_database=False)
        try:
            async with conn.cursor() as cur:
                state = await read_state(cur, target.database)
        finally:
            conn.close()
    judge(state, code_version(folder))
    return state


@dataclass(frozen=True)
class Outcome:
    """What ``migrate`` did (or, dry, would do) to one database."""

    before: SchemaState
    pending: tuple[Migration, ...]
    dry_run: bool


def _pending(state: SchemaState, migrations: tuple[Migration, ...]) -> tuple[Migration, ...]:
    """The migrations not yet applied; a released one that was edited since is refused."""
    for migration in migrations:
        applied = state.checksums.get(migration.version)
        if applied is not None and applied != migration.checksum:
            raise MigrationError(
                f"{migration.name} was edited after it was applied to {state.database!r}: a "
                "released migration is never changed; add a new one instead"
            )
    return tuple(m for m in migrations if m.version not in state.checksums)


async def migrate(
    url: str,
    *,
    dry_run: bool = False,
    folder: Path = MIGRATIONS,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> Outcome:
    """Bring one shard's database to this code's schema version; idempotent, and locked so
    that any number of migrators may run at once (the others wait, then find nothing to do).

    ``dry_run`` reads what is applied and returns what would be, creating nothing."""
    target = parse_mysql_url(url)
    if not target.database:
        raise MigrationError(f"{_shown(url)} names no database")
    migrations = load(folder)
    if dry_run:
        conn = await connect_one(url, with_database=False)
        try:
            async with conn.cursor() as cur:
                state = await read_state(cur, target.database)
        finally:
            conn.close()
        return Outcome(state, _pending(state, migrations), dry_run=True)
    await ensure_database(url)
    conn = await connect_one(url)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SET time_zone = '+00:00'")
            lock = f"redpacket.migrate.{target.database}"[:64]
            await cur.execute("SELECT GET_LOCK(%s, %s)", (lock, lock_timeout_s))
            (got,) = await cur.fetchone()
            if got != 1:
                raise MigrationError(
                    f"another migrator held the lock of {target.database!r} for "
                    f"{lock_timeout_s:.0f}s; try again when it is done"
                )
            try:
                await cur.execute(TABLE_DDL)
                state = await read_state(cur, target.database)
                pending = _pending(state, migrations)
                for migration in pending:
                    await _apply(cur, migration)
            finally:
                await cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))
    finally:
        conn.close()
    return Outcome(state, pending, dry_run=False)


async def _apply(cur: aiomysql.Cursor, migration: Migration) -> None:
    for statement in migration.statements:
        await cur.execute(statement)
    await cur.execute(
        f"INSERT INTO {TABLE} (version, name, checksum, oldest_code) VALUES (%s, %s, %s, %s)",
        (migration.version, migration.name, migration.checksum, migration.oldest_code),
    )


def _shown(url: str) -> str:
    """The URL without its password, for messages."""
    target = parse_mysql_url(url)
    return f"mysql://{target.user}@{target.host}:{target.port}/{target.database}"


def describe(url: str, outcome: Outcome, *, with_sql: bool = False) -> str:
    """What a migration of ``url`` did, for the operator."""
    lines = []
    if not outcome.pending:
        lines.append(f"{_shown(url)}: at schema version {outcome.before.version}, nothing to apply")
    for migration in outcome.pending:
        verb = "would apply" if outcome.dry_run else "applied"
        lines.append(f"{_shown(url)}: {verb} {migration.name}")
        if with_sql:
            lines += [f"    {s};" for s in migration.statements]
    if outcome.pending and not outcome.dry_run:
        lines.append(f"{_shown(url)}: now at schema version {outcome.pending[-1].version}")
    return "\n".join(lines)
