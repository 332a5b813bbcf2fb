"""Versioned migrations (node/migrations): the runner on a real MariaDB/MySQL, the node's
refusal of a database that does not fit its code, the release rules, and the chart's Jobs."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import secrets
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from redpacket.cli.main import build_parser
from redpacket.node.ledger import parse_mysql_url
from redpacket.node.migrations.runner import (
    MIGRATIONS,
    MigrationError,
    SchemaMismatch,
    check_database,
    code_version,
    load,
    migrate,
)
from redpacket.node.settings import NodeSettings
from tests.conftest import MYSQL_SERVER, RUN_ID, sql
from tests.helm_tool import REPO, helm_binary
from tests.releases import previous_release, releases


def redpacket(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redpacket.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


async def columns(url: str, table: str) -> set[str]:
    return {row[0] for row in await sql(url, f"SHOW COLUMNS FROM {table}")}


async def applied(url: str) -> list[tuple[int, str]]:
    return [(int(v), n) for v, n in await sql(url, "SELECT version, name FROM schema_migration")]


def write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


@pytest.fixture
def two_step(tmp_path: Path) -> Path:
    """Migrations of a toy schema: 0002 is not idempotent (a second run would insert a second
    row), so applying it twice shows."""
    write(
        tmp_path, "0001_counter.sql", "-- oldest code: 1\nCREATE TABLE IF NOT EXISTS c (n INT)\n;\n"
    )
    write(tmp_path, "0002_seed.sql", "-- oldest code: 1\nINSERT INTO c VALUES (1)\n;\n")
    return tmp_path


# -- the runner -------------------------------------------------------------------------------


async def test_migrate_brings_a_new_database_to_this_code_and_again_changes_nothing(
    mysql_databases: Any,
) -> None:
    url = mysql_databases("migrate")
    first = redpacket("db", "migrate", "--mysql-url", url)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stdout
    assert await applied(url) == [(m.version, m.name) for m in load()]
    assert {"red_packet_info", "red_packet_record", "idempotency_key"} <= {
        t for (t,) in await sql(url, "SHOW TABLES")
    }
    again = redpacket("db", "migrate", "--mysql-url", url)
    assert again.returncode == 0, again.stderr
    assert f"at schema version {code_version()}, nothing to apply" in again.stdout
    assert await applied(url) == [(m.version, m.name) for m in load()]
    await check_database(url)  # a node of this code may start on it


async def test_dry_run_prints_the_sql_and_creates_nothing(mysql_databases: Any) -> None:
    url = mysql_databases("dry")
    done = redpacket("db", "migrate", "--dry-run", "--mysql-url", url)
    assert done.returncode == 0, done.stderr
    assert "would apply 0001_initial" in done.stdout
    assert "CREATE TABLE IF NOT EXISTS red_packet_info" in done.stdout
    database = parse_mysql_url(url).database
    assert await sql(url.rsplit("/", 1)[0], "SHOW DATABASES LIKE %s", (database,)) == []


async def test_db_init_is_an_alias_of_migrate(mysql_databases: Any) -> None:
    url = mysql_databases("init")
    done = redpacket("db", "init", "--mysql-url", url)
    assert done.returncode == 0, done.stderr
    assert await applied(url) == [(m.version, m.name) for m in load()]


def test_migrate_without_a_database_says_how_to_name_one() -> None:
    done = redpacket("db", "migrate", REDPACKET_MYSQL_URL="mysql://root@127.0.0.1:3306")
    assert done.returncode == 2
    assert "which database?" in done.stderr and "Traceback" not in done.stderr


async def test_migrate_takes_every_shard_of_a_ring(mysql_databases: Any, tmp_path: Path) -> None:
    from redpacket.sharding.ring import NodeSpec, RingDoc

    urls = [mysql_databases("ring"), mysql_databases("ring")]
    ring = tmp_path / "ring.json"
    nodes = tuple(
        NodeSpec(f"shard-{i}", f"http://127.0.0.1:{9000 + i}", 1, "redis://x:1/0", url)
        for i, url in enumerate(urls)
    )
    RingDoc(1, nodes).save(ring)
    done = redpacket("db", "migrate", "--ring", str(ring))
    assert done.returncode == 0, done.stderr
    for url in urls:
        assert await applied(url) == [(m.version, m.name) for m in load()]


async def test_concurrent_migrators_apply_each_migration_once(
    mysql_databases: Any, two_step: Path
) -> None:
    url = mysql_databases("race")
    outcomes = await asyncio.gather(*(migrate(url, folder=two_step) for _ in range(6)))
    assert sum(len(o.pending) for o in outcomes) == 2  # one migrator did the work
    assert await sql(url, "SELECT n FROM c") == [(1,)]
    assert await applied(url) == [(1, "0001_counter"), (2, "0002_seed")]


async def test_an_edited_migration_is_refused(mysql_databases: Any, two_step: Path) -> None:
    url = mysql_databases("edited")
    await migrate(url, folder=two_step)
    write(two_step, "0002_seed.sql", "-- oldest code: 1\nINSERT INTO c VALUES (2)\n;\n")
    with pytest.raises(MigrationError, match="edited after it was applied"):
        await migrate(url, folder=two_step)
    assert await sql(url, "SELECT n FROM c") == [(1,)]


def test_a_gap_in_the_numbers_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "0001_a.sql", "-- oldest code: 1\nDO 0\n;\n")
    write(tmp_path, "0003_c.sql", "-- oldest code: 1\nDO 0\n;\n")
    with pytest.raises(MigrationError, match="0002 is missing"):
        load(tmp_path)


async def test_a_database_made_by_0_1_0_is_adopted_and_gets_its_late_columns(
    mysql_databases: Any,
) -> None:
    """0.1.0 nodes made their schema themselves (no version table); tables made before packet
    kinds got their columns from ADDED_COLUMNS. Migration 0001 adopts both."""
    url = mysql_databases("adopt")
    await migrate(url)
    await sql(url, "DROP TABLE schema_migration")
    await sql(url, "ALTER TABLE red_packet_info DROP COLUMN luckiest_uid, DROP COLUMN kind")
    await sql(
        url,
        "INSERT INTO red_packet_info (red_packet_id, uid, total_amount, total_packet, "
        "remaining_amount, remaining_packet, create_token, create_time, expire_time) "
        "VALUES (7, 1, 100, 2, 100, 2, %s, NOW(3), NOW(3))",
        ("t" * 32,),
    )
    with pytest.raises(SchemaMismatch, match="was never migrated"):
        await check_database(url)
    outcome = await migrate(url)
    assert outcome.pending[0].name == "0001_initial"  # and every later one: none is recorded
    assert {"kind", "luckiest_uid"} <= await columns(url, "red_packet_info")
    assert await sql(url, "SELECT red_packet_id, kind FROM red_packet_info") == [(7, "lucky")]
    await check_database(url)


# -- what a node accepts ------------------------------------------------------------------------


def test_a_node_refuses_an_unmigrated_database_with_a_clear_error(mysql_databases: Any) -> None:
    url = mysql_databases("unmigrated")
    done = redpacket(
        "node",
        REDPACKET_MYSQL_URL=url,
        REDPACKET_NODE_SECRET=secrets.token_hex(16),
        REDPACKET_PORT="0",
        REDPACKET_REDIS_URL="redis://127.0.0.1:1/0",
    )
    assert done.returncode == 2, done.stderr
    assert "never migrated" in done.stderr and "redpacket db migrate" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_node_refuses_a_database_its_code_is_too_old_for(
    mysql_databases: Any, tmp_path: Path
) -> None:
    """A contract migration (oldest code = its own version) locks out older code; an expand
    migration does not."""
    url = mysql_databases("newer")
    for migration in MIGRATIONS.glob("*.sql"):
        write(tmp_path, migration.name, migration.read_text())
    expand = code_version() + 1
    write(tmp_path, f"{expand:04d}_expand.sql", f"-- oldest code: {expand - 1}\nDO 0\n;\n")
    await migrate(url, folder=tmp_path)
    await check_database(url)  # this code runs beside the next release's expand migration
    contract = expand + 1
    write(tmp_path, f"{contract:04d}_contract.sql", f"-- oldest code: {contract}\nDO 0\n;\n")
    await migrate(url, folder=tmp_path)
    with pytest.raises(SchemaMismatch, match=f"below version {contract} must not run"):
        await check_database(url)


async def test_a_node_refuses_a_database_older_than_its_code(
    mysql_databases: Any, tmp_path: Path
) -> None:
    url = mysql_databases("older")
    for migration in MIGRATIONS.glob("*.sql"):
        write(tmp_path, migration.name, migration.read_text())
    await migrate(url)
    write(tmp_path, f"{code_version() + 1:04d}_next.sql", "-- oldest code: 1\nDO 0\n;\n")
    with pytest.raises(SchemaMismatch, match="older than this code needs"):
        await check_database(url, folder=tmp_path)


# -- releases ------------------------------------------------------------------------------------


def test_the_changelog_names_this_version_and_the_previous_release() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    current, *older = releases()
    assert current.version == version
    assert current.schema == code_version()
    assert older and re.fullmatch(r"[0-9a-f]{7,40}", previous_release().commit)


def test_every_migration_since_the_previous_release_lets_its_code_run() -> None:
    """Expand, then contract: while a rolling upgrade runs, the previous release's nodes run
    on the migrated database, so no new migration may lock out their schema version."""
    previous = previous_release().schema
    for migration in load():
        if migration.version > previous:
            assert migration.oldest_code <= previous, (
                f"{migration.name} locks out code below schema {migration.oldest_code}, but "
                f"the previous release's code is at {previous}: split it (expand now, contract "
                "in the next release)"
            )


# -- the chart's migration Jobs ------------------------------------------------------------------

CHART = REPO / "helm" / "redpacket"
HELM_HOMES = {
    f"HELM_{kind}_HOME": str(REPO / ".cache" / "helm" / kind.lower())
    for kind in ("CACHE", "CONFIG", "DATA")
}


@functools.cache
def render(*args: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        [helm_binary(), "template", "rp", str(CHART), "--namespace", "shop", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **HELM_HOMES},
    )
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def migrate_jobs(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == "Job"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "migrate"
    ]


def mysql_target_of(pod: dict[str, Any], container: dict[str, Any]) -> tuple[str, str]:
    """The MySQL URL `redpacket db migrate` (or the node) reads from this container's env,
    and the Secret key its password file holds."""
    env = {v["name"]: v["value"] for v in container["env"] if "value" in v}
    url = NodeSettings.from_env({**env, "REDPACKET_NODE_SECRET": "x"}).mysql_url
    folder, file = env["REDPACKET_MYSQL_PASSWORD_FILE"].rsplit("/", 1)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (item,) = [i for i in volume["secret"]["items"] if i["path"] == file]
    return url, item["key"]


def mysql_env(container: dict[str, Any]) -> list[dict[str, Any]]:
    """The env entries that choose a container's MySQL: URL, password file, ordinal."""
    return [
        v
        for v in container["env"]
        if v["name"] == "REDPACKET_ORDINAL" or v["name"].startswith("REDPACKET_MYSQL_")
    ]


@pytest.mark.parametrize("shards", [1, 3])
def test_the_chart_migrates_every_shard_before_the_nodes_roll(shards: int) -> None:
    docs = render("--set", f"shards={shards}")
    jobs = migrate_jobs(docs)
    assert len(jobs) == shards
    (node_set,) = [
        d
        for d in docs
        if d["kind"] == "StatefulSet"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "node"
    ]
    node_pod = node_set["spec"]["template"]["spec"]
    (node,) = node_pod["containers"]
    # every node pod also migrates its own shard first (a shard added by a rebalance has no
    # Job): an init container with exactly the node's MySQL env
    (init,) = node_pod["initContainers"]
    assert init["command"][:3] == ["redpacket", "db", "migrate"]
    build_parser().parse_args(init["command"][1:])
    assert mysql_env(init) == mysql_env(node)
    for i, job in enumerate(jobs):
        notes = job["metadata"]["annotations"]
        # in-chart MySQL does not exist before install: after it, but before every upgrade
        assert notes["helm.sh/hook"] == "post-install,pre-upgrade"
        assert int(notes["helm.sh/hook-weight"]) < 0
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        argv = container["command"]
        assert argv[:3] == ["redpacket", "db", "migrate"]
        build_parser().parse_args(argv[1:])  # a real command
        node_env = [
            v if v["name"] != "REDPACKET_ORDINAL" else {"name": v["name"], "value": str(i)}
            for v in node["env"]
        ]
        url, password_key = mysql_target_of(pod, container)
        assert (url, password_key) == mysql_target_of(node_pod, {**node, "env": node_env})
        init_env = [
            v if v["name"] != "REDPACKET_ORDINAL" else {"name": v["name"], "value": str(i)}
            for v in init["env"]
        ]
        assert (url, password_key) == mysql_target_of(node_pod, {**init, "env": init_env})
        assert f"-mysql-{i}." in url and password_key == "mysql-password"


@pytest.mark.parametrize("existing_secret", ["", "mine"])
def test_with_external_mysql_the_jobs_run_before_install_after_the_secret(
    existing_secret: str,
) -> None:
    args = ["--set", "mysql.enabled=false"]
    if existing_secret:
        args += ["--set", f"secrets.existingSecret={existing_secret}"]
    else:
        args += ["--set", "externalStores.mysqlUrls={mysql://a@db-a/rp,mysql://b@db-b/rp}"]
    docs = render(*args)
    jobs = migrate_jobs(docs)
    assert [j["metadata"]["annotations"]["helm.sh/hook"] for j in jobs] == [
        "pre-install,pre-upgrade"
    ] * 2
    secret_name = existing_secret
    for doc in docs:
        if doc["kind"] == "Secret":  # the chart's own: a pre-install hook made before the Jobs
            notes = doc["metadata"]["annotations"]
            assert "pre-install" in notes["helm.sh/hook"]
            for job in jobs:
                job_weight = int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
                assert int(notes["helm.sh/hook-weight"]) < job_weight
            secret_name = doc["metadata"]["name"]
    for i, job in enumerate(jobs):
        (container,) = job["spec"]["template"]["spec"]["containers"]
        (url,) = [v for v in container["env"] if v["name"] == "REDPACKET_MYSQL_URL"]
        assert url["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": f"mysql-url-{i}"}


def test_the_jobs_can_be_turned_off() -> None:
    docs = render("--set", "migrations.enabled=false")
    assert migrate_jobs(docs) == []
    (node_set,) = [  # and the nodes' migrate init containers with them
        d
        for d in docs
        if d["kind"] == "StatefulSet"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "node"
    ]
    assert "initContainers" not in node_set["spec"]["template"]["spec"]


async def test_a_node_pods_init_container_migrates_its_own_shard(
    mysql_databases: Any, tmp_path: Path
) -> None:
    """The init container's real command and env names, run here: pod 1 (a shard added by a
    rebalance, that no Job has seen) migrates database 1, the one its node checks at start,
    and leaves pod 0's alone. Only the MySQL address is moved to the test server (the URL
    keeps its {ordinal}) and the password file to a temp file."""
    docs = render("--set", "shards=2")
    (node_set,) = [
        d
        for d in docs
        if d["kind"] == "StatefulSet"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "node"
    ]
    (init,) = node_set["spec"]["template"]["spec"]["initContainers"]
    env = {v["name"]: v["value"] for v in init["env"] if "value" in v}
    assert "{ordinal}" in env["REDPACKET_MYSQL_URL"]
    (ordinal,) = [v for v in init["env"] if v["name"] == "REDPACKET_ORDINAL"]
    assert ordinal["valueFrom"]["fieldRef"]["fieldPath"].endswith(
        "['apps.kubernetes.io/pod-index']"
    )
    password_file = tmp_path / Path(env["REDPACKET_MYSQL_PASSWORD_FILE"]).name
    password_file.write_text((parse_mysql_url(MYSQL_SERVER + "/x").password or "") + "\n")
    # the `redpacket\_t<run>` databases are dropped by mysql_databases at the session's end
    template = f"{MYSQL_SERVER}/redpacket_t{RUN_ID}_pod_{{ordinal}}"
    urls = [template.replace("{ordinal}", str(i)) for i in range(2)]
    assert mysql_databases  # (its teardown drops them)
    argv = init["command"]
    assert argv[0] == "redpacket"
    done = redpacket(
        *argv[1:],
        REDPACKET_ORDINAL="1",
        REDPACKET_MYSQL_URL=template,
        REDPACKET_MYSQL_PASSWORD_FILE=str(password_file),
    )
    assert done.returncode == 0, done.stderr
    await check_database(urls[1])  # the node of pod 1 starts
    assert len(await applied(urls[1])) == len(load())
    with pytest.raises(Exception, match=r"Unknown database|never migrated"):
        await check_database(urls[0])  # pod 0's: not this pod's business
