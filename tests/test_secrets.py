"""Issue 19, secrets in dev: the state files are their user's alone, and each shard's Redis
wants a password that nodes, the checker and tools take from the URL or a password file."""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError

from redpacket.core.env import MYSQL_PASSWORD_FILE, REDIS_PASSWORD_FILE, password_from_file
from redpacket.node.counters import connect_redis
from tests.conftest import Cluster


def test_state_files_are_readable_by_their_owner_only(cluster: Cluster) -> None:
    home = cluster.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("cluster.json", "ring.json"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name


async def test_each_shard_redis_wants_its_password(cluster: Cluster) -> None:
    for shard in cluster.state["shards"]:
        url = urlsplit(shard["redis"])
        assert url.password, shard["name"]
        bare = aioredis.Redis(host=url.hostname or "", port=url.port or 6379)
        with pytest.raises((AuthenticationError, ResponseError)):
            await bare.ping()
        await bare.aclose()
        client = connect_redis(shard["redis"], False, 1)
        assert await client.ping()
        await client.aclose()


async def test_the_redis_password_can_come_from_a_file(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = cluster.state["shards"][0]
    url = urlsplit(shard["redis"])
    secret = tmp_path / "redis-password"
    secret.write_text((url.password or "") + "\n")
    monkeypatch.setenv(REDIS_PASSWORD_FILE, str(secret))
    client = connect_redis(f"redis://{url.hostname}:{url.port}/0", False, 1)
    assert await client.ping()
    await client.aclose()
    monkeypatch.setenv(MYSQL_PASSWORD_FILE, str(secret))
    assert password_from_file(MYSQL_PASSWORD_FILE) == url.password
