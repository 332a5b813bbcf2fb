"""One short run of ``redpacket bench`` on its own small cluster, so the benchmark cannot rot.

No timing assertions: this machine's numbers live in docs/benchmarks.md. It checks that a
run completes, writes the JSON other tools read (with every key they rely on) and a PNG,
and that the invariant checker passed on the ledgers the run produced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import MYSQL_SERVER

KEYS = (
    "opens_per_s",
    "grabs_per_s",
    "rejections_per_s",
    "open_p99_ms",
    "reject_p99_ms",
    "lua_ceiling_per_s",
    "trivial_ceiling_per_s",
    "open_ratio",
    "reject_ratio",
    "errors",
    "commit",
)


def test_bench_smoke(tmp_path: Path, mysql_databases: Any) -> None:
    out = tmp_path / "result.json"
    png = tmp_path / "result.png"
    argv = [
        sys.executable, "-m", "redpacket.cli", "bench",
        "--duration", "2", "--reject-duration", "1", "--ceiling-duration", "1",
        "--users", "16", "--shares", "4", "--shares-min", "2", "--in-flight", "8",
        "--fresh-per-s", "400", "--senders", "20", "--latecomers", "300",
        "--rate-duration", "1", "--naive-duration", "1",
        "--var", str(tmp_path / "var"), "--json", str(out), "--plot", str(png), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**os.environ, "REDPACKET_MYSQL_URL": MYSQL_SERVER},
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    missing = [key for key in KEYS if key not in results]
    assert not missing, missing
    assert results["check"]["ok"] is True, results["check"]
    assert results["config"]["latecomers"] == 300
    # the default is the real crowd: small packets, every opener a fresh identity
    assert results["config"]["scenario"] == "crowd"
    assert results["config"]["fresh_identities"] is True
    assert results["config"]["shares_min"] == 2 and results["config"]["in_flight"] == 8
    # the naive peer ran on the same load generator, and the ratio is stated
    naive = results["naive_peer"]
    assert naive["opens_per_s"] > 0 and not naive["errors"], naive
    assert results["naive_ratio"] == round(results["opens_per_s"] / naive["opens_per_s"], 4)
    assert "reference: naive peer, open" in done.stdout
    assert results["box_cpu_us_per_committed_open"] > 0
    assert results["creates_per_s"] > 0 and results["create_p99_ms"] is not None
    # a create debits its sender (issue 18): the senders were funded for the whole run by
    # signed top-ups (the bench's cluster has no starting balance: production has none), so
    # no create was refused, and the checker's conservation covered their wallets
    wallets = results["wallets"]
    assert wallets["funded_by"] == "top-up" and wallets["creates_402"] == 0, wallets
    assert wallets["starting_balance_cents"] == 0 and wallets["budget_per_sender_cents"] > 0
    assert wallets["topups"] == results["config"]["senders"]
    assert results["check"]["summary"].count("wallets holding") == 1
    # every committed share was credited to its winner, and the lag read from the nodes
    credits = results["credit_lag"]["credits"]
    # (phase 1's committed opens; the open loop's are credited in the same window too)
    assert credits is not None and credits >= results["group_commit"]["opens_committed_metric"] > 0
    assert results["credit_lag"]["p99_le_s"] is not None
    assert "credit lag p99: ≤" in done.stdout
    assert results["opens_per_s"] > 0 and results["rejections_per_s"] > 0
    assert results["lua_ceiling_per_s"] and results["trivial_ceiling_per_s"]
    for op in ("grab", "open", "reject"):
        assert {"p50_ms", "p99_ms", "p999_ms"} <= results["latency_ms"][op].keys()
    # the open-loop phase ran at 50% of phase 1's committed opens, latency from due times
    open_loop = results["open_loop"]
    assert open_loop["rate_per_s"] == round(0.5 * results["opens_per_s"], 1) > 0
    assert open_loop["arrivals"] == int(open_loop["rate_per_s"] * 1)
    assert open_loop["opens_per_s"] > 0
    for op in ("grab", "open", "pair"):
        assert {"p50_ms", "p99_ms", "p999_ms"} <= open_loop["latency_ms"][op].keys()
    assert results["open_loop_open_p99_ms"] == open_loop["latency_ms"]["open"]["p99_ms"]
    # flatness: the open p99 of the first and the last 10 s (here the 1 s phase's halves)
    assert {"open_p99_first_10s_ms", "open_p99_last_10s_ms", "open_p99_last_over_first"} <= (
        open_loop.keys()
    )
    # the load generator's own GC never pauses it inside a measured window
    for phase in (results["loadgen"]["open_phase"], open_loop["loadgen"]):
        for worker in phase["gc"]:
            assert all(gen["collections"] == 0 for gen in worker.values()), worker
    assert results["targets"]["open_p99_measured_in"] == "open_loop"
    assert "open loop @" in done.stdout
    # the MySQL server's CPU is sampled (the whole server, shared by the shards)
    assert results["mysql"]["server_pid"]
    assert "mysqld" in results["cpu_us_per_committed_open"]
    assert "mysqld" in open_loop["cpu_us_per_committed_open"]
    # every committed open reached its user's history, and the lag is reported
    h = results["history"]
    assert h["events_applied"] >= results["check"]["observed_200_opens"] > 0
    assert h["lag_mean_ms"] is not None and h["lag_p99_le_s"] is not None
    assert h["backlog_end"] == 0
    assert "my red packets (phase 1 + open loop)" in done.stdout
    assert png.stat().st_size > 0
    assert "invariant check: OK" in done.stdout


def test_transport_bench_measures_both_hops(tmp_path: Path) -> None:
    out = tmp_path / "transport.json"
    argv = [sys.executable, "-m", "redpacket.bench.transport", "--seconds", "0.3",
            "--inflight", "16", "--json", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["transport"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"http", "link"}
    for row in rows.values():
        assert row["calls_per_s"] > 0
        assert row["client_us_per_call"] > 0 and row["server_us_per_call"] > 0


def _shape(*argv: str) -> Any:
    from redpacket.bench.scenarios import shape_of
    from redpacket.cli.main import build_parser

    return shape_of(build_parser().parse_args(["bench", *argv]))


def test_default_scenario_is_the_real_crowd() -> None:
    shape = _shape()
    assert shape.scenario == "crowd"
    assert (shape.shares_min, shape.shares) == (5, 20)  # drawn per packet
    assert shape.in_flight == 1000 and shape.fresh and not shape.finite
    assert shape.senders == 2000
    assert shape.amount == 20 * 100  # 100 cents a share, pro rata for smaller packets


def test_hot_and_boss_scenarios_keep_their_shapes() -> None:
    hot = _shape("--scenario", "hot")
    assert (hot.shares, hot.shares_min, hot.initial_packets) == (100, 0, 32)
    assert not hot.fresh and hot.in_flight == 0 and hot.amount == 10_000
    boss = _shape("--scenario", "boss")
    assert (boss.shares, boss.initial_packets) == (10_000, 1)
    assert boss.fresh and boss.finite


async def test_open_path_counts_the_files_and_functions_of_one_open(
    redis_servers: Any, mysql_databases: Any
) -> None:
    """bench/open_path.py, which docs/architecture.md quotes: one open through the gateway,
    the node client, the link and the node, every function of this repository counted."""
    from redpacket.bench.open_path import measure

    result = await measure(redis_servers().url, mysql_databases("openpath"), "link")
    by_file = result["by_file"]
    assert "NodeClient.open" in by_file["nodeclient/client.py"]
    assert "Shard.open" in by_file["node/shard.py"]
    assert "gateway/shards.py" not in by_file  # the old client is gone
    assert result["files"] == len(by_file) and 20 <= result["files"] <= 40
    assert result["functions"] <= result["calls"]
