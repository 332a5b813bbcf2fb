"""The `redpacket` command's tools: db init, token, check, and dev up's clear refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt

from redpacket.cli.children import free_ports
from redpacket.core.ids import snowflake_of
from tests.conftest import Cluster, sql


def redpacket(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redpacket.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


async def tables(mysql_url: str) -> set[str]:
    return {row[0] for row in await sql(mysql_url, "SHOW TABLES")}


async def test_db_init_applies_the_schema_and_can_run_again(mysql_databases: Any) -> None:
    url = mysql_databases("init")
    for _ in range(2):
        done = redpacket("db", "init", "--mysql-url", url)
        assert done.returncode == 0, done.stderr
    required = {"red_packet_info", "red_packet_record", "red_packet_refund", "idempotency_key"}
    assert required <= await tables(url)


def test_token_prints_a_verifiable_jwt() -> None:
    secret = "s" * 40
    done = redpacket(
        "token", "--uid", "42", "--name", "Alice", env={"REDPACKET_JWT_SECRET": secret}
    )
    claims = jwt.decode(done.stdout.strip(), secret, algorithms=["HS256"])
    assert (claims["sub"], claims["name"]) == ("42", "Alice") and claims["exp"] > claims["iat"]


def test_dev_up_says_what_is_missing_instead_of_a_stack_trace(tmp_path: Path) -> None:
    closed = free_ports(1)[0]
    done = redpacket(
        "dev",
        "up",
        "--port",
        "0",
        "--cluster",
        "nomysql",
        "--var",
        str(tmp_path),
        env={"REDPACKET_MYSQL_URL": f"mysql://root@127.0.0.1:{closed}"},
    )
    assert done.returncode == 2
    assert "cannot reach MySQL" in done.stderr and "apt-get install mariadb-server" in done.stderr
    assert "Traceback" not in done.stderr
    done = redpacket(
        "dev",
        "up",
        "--port",
        "0",
        "--cluster",
        "noredis",
        "--var",
        str(tmp_path),
        env={"PATH": "/nonexistent"},
    )
    assert done.returncode == 2 and "apt-get install redis-server" in done.stderr


async def test_check_passes_a_clean_cluster_and_catches_a_tampered_ledger(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster()
    packet_id = await cluster.create(1, 1000, 4)
    for uid in (1, 2):
        assert (await cluster.open(packet_id, uid))[0] == 200
    args = ("check", "--cluster", cluster.name, "--var", str(cluster.home.parent))
    clean = redpacket(*args)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "OK: " in clean.stdout

    owner = next(n for n in cluster.nodes() if n.name == cluster.shard_of(snowflake_of(packet_id)))
    await sql(  # a cent appears from nowhere
        owner.mysql or "",
        "UPDATE red_packet_record SET amount = amount + 1 WHERE red_packet_id = %s AND uid = 1",
        (snowflake_of(packet_id),),
    )
    tampered = redpacket(*args, "--reconcile-wait", "0")
    assert tampered.returncode == 1
    assert f"red packet {snowflake_of(packet_id)}: records sum" in tampered.stdout
    assert "Redis claims differ from MySQL records" in tampered.stdout
