"""`redpacket chaos`: the schedule is a function of the seed, its faults overlap and are all
healed before the end; and a 60-second seeded run under mixed load ends with zero violations,
every fault of its schedule injected and healed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from redpacket.chaos.schedule import Kind, draw

SEEDS = range(1, 21)


def test_the_same_seed_draws_the_same_schedule() -> None:
    for seed in SEEDS:
        assert draw(seed, 60, 2) == draw(seed, 60, 2)
    assert draw(1, 60, 2).faults != draw(2, 60, 2).faults


def test_a_60_second_schedule_has_every_kind_of_fault() -> None:
    for seed in SEEDS:
        assert draw(seed, 60, 2).kinds() == set(Kind), seed


def test_faults_overlap_but_never_on_one_resource() -> None:
    for seed in SEEDS:
        schedule = draw(seed, 60, 2)
        assert schedule.overlapping_pairs(), seed
        busy: dict[str, float] = {}
        for fault in sorted(schedule.faults, key=lambda f: f.at_s):
            assert fault.at_s >= busy.get(fault.resource, 0.0), (seed, fault)
            busy[fault.resource] = fault.heal_s


def test_every_fault_is_healed_before_the_end() -> None:
    for seconds in (30, 60, 600):
        for seed in SEEDS:
            schedule = draw(seed, seconds, 3)
            assert schedule.faults
            assert all(f.heal_s <= schedule.heal_by_s < seconds for f in schedule.faults)
            assert all(f.at_s <= schedule.inject_until_s for f in schedule.faults)


def test_rebalances_alternate_add_and_remove_of_the_extra_shard() -> None:
    schedule = draw(7, 600, 2)
    moves = [f for f in schedule.faults if f.resource == "rebalance"]
    assert [f.action for f in moves][:4] == ["add", "remove", "add", "remove"][: len(moves)]
    assert {f.target for f in moves} == {"shard-2"}


@pytest.mark.timeout(900)
def test_a_60_second_seeded_chaos_run_loses_nothing(
    tmp_path: Path, mysql_databases: object
) -> None:
    out = tmp_path / "chaos.json"
    seed = 13
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "redpacket.cli",
            "chaos",
            "--seconds",
            "60",
            "--seed",
            str(seed),
            "--var",
            str(tmp_path / "var"),
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "chaos.png"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=840,
        env={**os.environ},
    )
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["violations"] == [], done.stdout[-5000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    schedule = draw(seed, 60, 2)
    by_kind = report["faults"]["by_kind"]
    assert set(by_kind) == {str(k) for k in schedule.kinds()}
    for kind, row in by_kind.items():
        assert row["injected"] == row["healed"] == row["scheduled"], (kind, row)
    for fault in report["fault_log"]:
        assert fault["healed_at"] is not None, fault
        assert fault["healed_at"] <= report["load_seconds"], fault  # healed under load
    ops = report["operations"]
    assert ops["open"].get("200", 0) > 100 and ops["create"].get("201", 0) > 20, ops
    verdict = report["verdict"]
    assert verdict["refunded"] > 0 and verdict["sold_out"] > 0, verdict
    assert verdict["checker"].startswith("OK"), verdict
    assert report["command"] == (
        f"redpacket chaos --seconds 60 --seed {seed} --shards 2 --users 24 --lifetime 10"
    )
    assert (tmp_path / "chaos.png").stat().st_size > 10_000
