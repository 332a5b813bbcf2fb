"""`redpacket dev up` signs with REDPACKET_JWT_SECRET when it is set, as the gateway,
`redpacket token` and docs/api.md do, and refuses a short one the way the gateway does."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from redpacket.gateway.auth import mint_token
from tests.conftest import MYSQL_SERVER, RUN_ID


def dev_up(tmp_path: Path, secret: str, cluster: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "redpacket.cli", "dev", "up", "--port", "0", "--shards", "1",
         "--cluster", cluster, "--var", str(tmp_path),
         "--db-prefix", f"redpacket_t{RUN_ID}{cluster}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "REDPACKET_JWT_SECRET": secret, "REDPACKET_MYSQL_URL": MYSQL_SERVER},
    )  # fmt: skip


def create(url: str, token: str) -> int:
    request = urllib.request.Request(
        f"{url}/v1/red-packets",
        method="POST",
        data=json.dumps({"total_amount": 100, "total_packet": 2, "greeting": "hi"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_dev_up_refuses_a_jwt_secret_shorter_than_32_bytes(tmp_path: Path) -> None:
    proc = dev_up(tmp_path, "s" * 31, "short")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "REDPACKET_JWT_SECRET must be at least 32 bytes" in err
    assert "Traceback" not in err
    assert not (tmp_path / "short" / "cluster.json").exists()


def test_dev_up_accepts_tokens_signed_with_the_exported_secret(
    tmp_path: Path, mysql_databases: Any
) -> None:
    """(mysql_databases drops the cluster's databases at the end of the session.)"""
    secret = "my-own-secret-for-the-dev-cluster-" + secrets.token_hex(8)
    proc = dev_up(tmp_path, secret, "mine")
    state_file = tmp_path / "mine" / "cluster.json"
    try:
        deadline = time.monotonic() + 90
        state: dict = {}
        while not state.get("ready"):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "dev up did not get ready in 90 s"
            time.sleep(0.3)
            if state_file.exists():
                try:
                    state = json.loads(state_file.read_text())
                except json.JSONDecodeError:
                    continue  # being written
        url = state["gateway"]["url"]
        assert state["jwt_secret"] == secret
        assert create(url, mint_token(secret, 42, "Alice", "", 600)) == 201
        assert create(url, mint_token("x" * 40, 42, "Alice", "", 600)) == 401
        # and `redpacket token` (which reads the same variable) mints a token it accepts
        token = subprocess.run(
            [sys.executable, "-m", "redpacket.cli", "token", "--uid", "7"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "REDPACKET_JWT_SECRET": secret},
        ).stdout.strip()
        assert create(url, token) == 201
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
