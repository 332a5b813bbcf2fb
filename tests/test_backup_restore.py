"""The chart's backup, restored: the backup CronJob's own script (rendered by a real helm) dumps
every shard of a real `redpacket dev up` cluster with this machine's mysqldump (MariaDB's
mariadb-dump), each dump is restored into a fresh database by the procedure of
docs/deploy.md ("Backups and restore"), and the ledger checker is clean on the restored
databases: every open a client saw answered 200 is there, once, with its amount, and the
restored ledgers agree with the shards' Redis and with every user's history."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from redpacket.cli.check import check_shards
from redpacket.node.ledger import parse_mysql_url
from tests.conftest import MYSQL_SERVER, Cluster, sql
from tests.load import OpenLoad
from tests.test_helm import job_script

TABLES = ("red_packet_info", "red_packet_record", "user_received", "user_sent")


def mysql_client_argv(database: str) -> list[str]:
    """The `mysql` client of this machine, logged in as the tests' MySQL user."""
    server = parse_mysql_url(MYSQL_SERVER + "/x")
    client = shutil.which("mariadb") or shutil.which("mysql")
    assert client, "no mysql client on PATH"
    argv = [client, f"--host={server.host}", f"--port={server.port}", f"--user={server.user}"]
    return (
        [*argv, f"--password={server.password}", database] if server.password else [*argv, database]
    )


async def test_a_restored_backup_of_every_shard_checks_clean(
    make_cluster: Any, tmp_path: Path
) -> None:
    cluster: Cluster = await make_cluster()
    packets = [await cluster.create(1, 20 * 50, 20) for _ in range(8)]
    load = OpenLoad(cluster, packets, range(3000, 3030))
    await asyncio.wait_for(load.run(), 120)
    assert load.statuses[200] == 8 * 20
    await cluster.check(load.observed)  # clean before the backup; outboxes drained

    # the CronJob's script, with this machine's stores in place of the pods' addresses
    server = parse_mysql_url(MYSQL_SERVER + "/x")
    ring_file = Path(cluster.state["ring_file"])
    databases = {n.name: parse_mysql_url(n.mysql or "").database for n in cluster.nodes()}
    assert databases["shard-0"].endswith("0")
    password_file = tmp_path / "mysql-password"
    password_file.write_text(server.password or "")
    backup_dir = tmp_path / "backup"
    backup_dir.mkdir()
    script, env = job_script("backup")
    env.update(
        MYSQL_HOST=server.host,
        MYSQL_PORT=str(server.port),
        MYSQL_USER=server.user,
        MYSQL_DATABASE=databases["shard-0"][:-1] + "{ordinal}",
        MYSQL_PASSWORD_FILE=str(password_file),
        RING_FILE=str(ring_file),
        BACKUP_DIR=str(backup_dir),
        PATH=os.environ["PATH"],
    )
    script = script.replace("/tmp/client.cnf", str(tmp_path / "client.cnf"))
    proc = subprocess.run(
        ["/bin/bash", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (folder,) = [p for p in backup_dir.iterdir() if p.is_dir()]
    dumps = sorted(folder.glob("shard-*.sql.gz"))
    assert [d.name for d in dumps] == ["shard-0.sql.gz", "shard-1.sql.gz"]
    assert not (tmp_path / "client.cnf").exists()  # the password file is removed
    for dump in dumps:
        text = gzip.decompress(dump.read_bytes()).decode()
        assert "CREATE DATABASE" not in text and "USE `" not in text  # restores anywhere

    # the restore procedure: a fresh database per shard, the dump loaded into it
    restored = {}
    try:
        for name, dump in zip(("shard-0", "shard-1"), dumps, strict=True):
            fresh = f"restored_{secrets.token_hex(4)}_{name.replace('-', '_')}"
            restored[name] = fresh
            await sql(MYSQL_SERVER + "/mysql", f"CREATE DATABASE `{fresh}`")
            load_proc = subprocess.run(
                mysql_client_argv(fresh),
                input=gzip.decompress(dump.read_bytes()),
                capture_output=True,
                timeout=120,
            )
            assert load_proc.returncode == 0, load_proc.stderr.decode()
            for table in TABLES:
                live = await sql(
                    f"{MYSQL_SERVER}/{databases[name]}", f"SELECT COUNT(*) FROM {table}"
                )
                back = await sql(f"{MYSQL_SERVER}/{fresh}", f"SELECT COUNT(*) FROM {table}")
                assert back == live, (name, table)

        nodes = [
            dataclasses.replace(n, mysql=f"{MYSQL_SERVER}/{restored[n.name]}")
            for n in cluster.nodes()
        ]
        report = await check_shards(nodes, load.observed, settle_s=5, owners=cluster.ring().ring())
        assert report.ok, "\n".join(report.violations)
        assert report.records == 8 * 20
    finally:
        for fresh in restored.values():
            await sql(MYSQL_SERVER + "/mysql", f"DROP DATABASE IF EXISTS `{fresh}`")


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("mysqldump", "gzip", "bash"):
        assert shutil.which(tool), f"{tool} is needed on PATH (apt-get install mariadb-client)"
