"""The README's promise on a clean machine: clone the committed tree into a Debian bookworm
container that has only python3 (with venv), git, make and CA certificates (no Redis, no
MariaDB, no .venv; root logs in to MariaDB only over its socket, as Debian installs it) and
run `make demo` once. It must pass the first time.

This tests what is committed (a `git clone` of HEAD), not the working tree. It needs a
container engine (tests/containers.py installs and starts one) and fails, never skips, when
there is none, saying why. The full `make test` in such a container is not run here (it
takes too long for every CI run); docs/deploy.md says when it was last run by hand.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.containers import REPO, STANDINS, debian_base, engine, run, tree_hash

DEMO_TIMEOUT_S = 900


def fresh_machine_image() -> str:
    eng = engine()
    base = debian_base(eng)
    folder = STANDINS / "fresh-machine"
    ref = f"redpacket-standin/fresh-machine:{tree_hash([folder], extra=[base])}"
    if not eng.image_exists(ref):
        eng.build(ref, folder, build_args={"BASE_IMAGE": base})
        eng.remove_other_tags("redpacket-standin/fresh-machine", ref)
    return ref


@pytest.mark.container
@pytest.mark.timeout(1800)  # a cold first run builds images for minutes
def test_first_make_demo_on_a_clean_debian_machine_passes(tmp_path: Path) -> None:
    eng = engine()  # EngineUnavailable: the test fails with the reason
    image = fresh_machine_image()

    # the container reaches the package registries the setup needs (else say so, first)
    reach = eng.run(
        "run", "--rm", image, "bash", "-c",
        "apt-get update -q >/dev/null && python3 -m venv /tmp/v "
        "&& /tmp/v/bin/pip download -q --no-deps -d /tmp/d redis==5.0.8",
        check=False, timeout=300,
    )  # fmt: skip
    assert reach.returncode == 0, (
        "a container cannot reach the Debian or PyPI registries, so no clean machine can set "
        f"itself up here:\n{reach.stdout[-3000:]}\n{reach.stderr[-3000:]}"
    )

    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    clone = tmp_path / "redpacket"
    run(["git", "clone", "--quiet", "--no-checkout", str(REPO), str(clone)])
    run(["git", "-C", str(clone), "checkout", "--quiet", head])

    started = time.monotonic()
    demo = eng.run(
        "run", "--rm", "-v", f"{clone}:/root/redpacket", "-w", "/root/redpacket", image,
        "bash", "-c", "make demo 2>&1",
        check=False, timeout=DEMO_TIMEOUT_S,
    )  # fmt: skip
    took = time.monotonic() - started
    # the files the container made are root's: leave nothing behind in the temp folder
    eng.run("run", "--rm", "-v", f"{tmp_path}:/t", image, "rm", "-rf", "/t/redpacket", check=False)
    out = demo.stdout
    assert demo.returncode == 0, f"the first `make demo` failed after {took:.0f} s:\n{out[-8000:]}"
    # it really was a first run on a bare machine: setup installed the stores and a login
    assert "installing redis-server" in out and "mariadb-server" in out, out[-4000:]
    assert "creating MariaDB user redpacket@localhost" in out, out[-4000:]
    assert "ledger check on every shard: OK" in out, out[-4000:]
    print(f"first `make demo` on a clean machine passed in {took:.0f} s")
