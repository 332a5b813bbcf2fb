"""`redpacket chaos`: the schedule is a function of the seed, its faults overlap and are all
healed before the end; and a 60-second seeded run under mixed load ends with zero violations,
every fault of its schedule injected and healed."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from redpacket.chaos.load import Answer, Outcomes, Packet
from redpacket.chaos.nemesis import FaultRecord
from redpacket.chaos.proxy import TcpProxy
from redpacket.chaos.runner import judge_faults, publish
from redpacket.chaos.schedule import Fault, Kind, draw
from redpacket.chaos.verdict import Verdict, judge_liveness
from redpacket.chaos.wallets import Expected, WalletsSeen, wallet_problems
from redpacket.cli.check import Observed
from redpacket.core import clock
from tests.conftest import NodeHandle

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
    assert ops["topup"].get("201", 0) > 0 and ops["topup_replay"].get("200", 0) > 0, ops
    assert ops["create_402"].get("402", 0) > 0 and ops["wallet"].get("200", 0) > 0, ops
    assert ops["wallet_transactions"].get("200", 0) > 0, ops
    verdict = report["verdict"]
    assert verdict["wallet_users"] > 24 and verdict["topups"] > 0, verdict
    assert verdict["over_balance_creates"] > 0, verdict
    assert "wallets holding" in verdict["checker"], verdict  # conservation was checked
    assert verdict["refunded"] > 0 and verdict["sold_out"] > 0, verdict
    assert verdict["checker"].startswith("OK"), verdict
    assert report["command"] == (
        f"redpacket chaos --seconds 60 --seed {seed} --shards 2 --users 24 --lifetime 10"
    )
    assert (tmp_path / "chaos.png").stat().st_size > 10_000


def test_a_window_replays_one_burst_of_a_long_schedule_in_a_short_run() -> None:
    long = draw(690262816, 600, 2)
    burst = long.window(440, 505)
    picked = [f for f in long.faults if 440 <= f.at_s <= 505 and f.resource != "rebalance"]
    assert [(f.kind, f.target, f.hold_s) for f in burst.faults] == [
        (f.kind, f.target, f.hold_s) for f in picked
    ]
    gaps = [round(b.at_s - a.at_s, 2) for a, b in itertools.pairwise(picked)]
    assert [round(b.at_s - a.at_s, 2) for a, b in itertools.pairwise(burst.faults)] == gaps
    assert burst.faults[0].at_s == round(picked[0].at_s - 440 + long.start_s, 2)
    assert all(f.heal_s <= burst.heal_by_s < burst.seconds for f in burst.faults)
    assert burst.seconds < 120
    with pytest.raises(ValueError):
        long.window(505, 440)


def _record(kind: Kind, at_s: float, **times: Any) -> FaultRecord:
    record = FaultRecord(Fault(0, kind, at_s, 0.0, "shard-0"))
    for name, value in times.items():
        setattr(record, name, value)
    return record


def test_a_fault_the_nemesis_could_not_place_is_the_harness_not_a_violation() -> None:
    skipped = _record(Kind.GATEWAY_KILL, 10.0, skipped="its resource was busy until 70.0s")
    fine = _record(Kind.NODE_KILL, 10.0, injected_at=12.5, healed_at=13.0, answered_at=15.0)
    stuck = _record(Kind.NODE_KILL, 20.0, injected_at=20.0)  # killed, never restarted
    violations, harness = judge_faults([skipped, fine, stuck], load_seconds=60.0)
    assert harness == ["fault 0 (gateway_kill) not injected: its resource was busy until 70.0s"]
    assert len(violations) == 1 and "never healed" in violations[0]
    assert fine.late_s == 2.5  # the delay is reported as the harness's


def test_an_open_without_a_final_answer_long_after_the_last_heal_is_a_liveness_violation() -> None:
    out = Outcomes()
    out.last_unknown_open = {("a", 1): 40.0, ("b", 2): 95.0}
    verdict = Verdict()
    judge_liveness(out, last_heal_s=50.0, bound_s=30.0, verdict=verdict)
    assert len(verdict.violations) == 1 and "open of b by uid 2" in verdict.violations[0]
    assert verdict.liveness_s == 45.0  # the last unknown answer, after the last heal
    healthy = Verdict()
    judge_liveness(out, last_heal_s=70.0, bound_s=30.0, verdict=healthy)
    assert healthy.violations == []


def _answer(status: int, body: Any) -> Answer:
    return Answer(status, body, str(status))


def test_reads_are_held_to_what_the_clients_saw() -> None:
    out = Outcomes()
    out.packets["p"] = Packet("p", 7, {"total_amount": 100, "total_packet": 2})
    out.saw_open("p", 1, _answer(200, {"amount": 30}))
    sent = out.now()
    out.saw_records("p", sent, _answer(200, {"records": [{"uid": "1"}], "next_cursor": None}))
    out.saw_info("p", sent, _answer(200, {"remaining_amount": 70, "remaining_packet": 1}))
    out.saw_received(1, sent, _answer(200, {"count": 1, "records": []}))
    assert out.contradictions == []
    later = out.now()
    out.saw_records("p", later, _answer(200, {"records": [], "next_cursor": None}))
    out.saw_info("p", later, _answer(200, {"remaining_amount": 100, "remaining_packet": 2}))
    out.saw_received(1, later, _answer(200, {"count": 0, "records": []}))
    out.saw_packet_answer("p", "records", _answer(404, {"error": {"code": "not_found"}}))
    found = "\n".join(out.contradictions)
    assert "uid 1's share" in found and "missing from the records" in found
    assert "remaining went up from 70/1 to 100/2" in found
    assert "received history went from 1 to 0" in found
    assert "created (201) but records answered 404" in found


def test_a_topup_replay_must_answer_the_first_result_even_across_a_move() -> None:
    seen = WalletsSeen()
    first = {"transaction_id": "9", "balance_after": 15_000, "amount": 5_000}
    seen.saw_topup(7, 5_000, "t1", _answer(201, {**first, "replayed": False}), 1.0)
    seen.saw_topup(7, 5_000, "t1", _answer(200, {**first, "replayed": True}), 2.0)
    assert seen.contradictions == [] and seen.topups["t1"].result == first
    seen.saw_topup(7, 5_000, "t1", _answer(201, {**first, "transaction_id": "10"}), 3.0)
    moved = {**first, "transaction_id": "12", "balance_after": 20_000, "replayed": True}
    seen.saw_topup(7, 5_000, "t1", _answer(200, moved), 30.0)
    seen.saw_topup(7, 5_000, "t2", _answer(422, {"error": {"code": "topup_id_reused"}}), 4.0)
    assert "answered 422" in "\n".join(seen.contradictions)
    assert len(seen.restated) == 2
    assert "answered 201 (as new)" in seen.restated[0] and "replay answered" in seen.restated[1]


def test_a_create_beyond_the_balance_must_be_402_with_the_balance_and_never_debit() -> None:
    seen = WalletsSeen()
    body = {"total_amount": 15_000, "total_packet": 2}
    refused = {"error": {"code": "insufficient_funds", "balance": 10_000}}
    seen.saw_over_balance(20_001, "k1", body, _answer(402, refused), 10_000)
    assert seen.contradictions == []
    seen.saw_over_balance(20_001, "k2", body, _answer(201, {"red_packet_id": "x"}), 10_000)
    assert "not 402 insufficient_funds" in seen.contradictions[0]
    poor = Expected({}, {}, {}, poor_balance=10_000)
    grant = {"id": "1", "kind": "grant", "amount": 10_000, "balance_after": 10_000}
    assert wallet_problems(20_001, [grant], poor) == []
    send = {"id": "2", "kind": "send", "amount": -15_000, "balance_after": -5_000}
    problems = wallet_problems(20_001, [send, grant], poor)
    assert any("below 0" in p for p in problems)
    assert any("only creates beyond its balance" in p for p in problems)


def test_every_share_answered_200_is_a_receive_and_every_topup_is_in_the_transactions() -> None:
    want = Expected(receives={"p": 30}, sends={"q": 100}, topups={"pay-1": 2_000})
    txns = [
        {"id": "8", "kind": "send", "amount": -100, "red_packet_id": "q", "balance_after": 1_930},
        {"id": "7", "kind": "receive", "amount": 30, "red_packet_id": "p", "balance_after": 2_030},
        {"id": "5", "kind": "topup", "amount": 2_000, "balance_after": 2_000},
    ]
    assert wallet_problems(1, txns, want) == []
    problems = "\n".join(wallet_problems(1, txns[::2], want))
    assert "1 shares answered 200 not received" in problems
    problems = "\n".join(wallet_problems(1, txns[1:], want))
    assert "packets created without their send" in problems
    problems = "\n".join(wallet_problems(1, txns[:2], want))
    assert "top-ups 0 (0 cents) != answered 1 (2000 cents)" in problems


def test_plot_without_matplotlib_says_what_to_install_and_still_writes_json_and_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    result = {
        "command": "redpacket chaos --seconds 60 --seed 1",
        "seed": 1,
        "operations": {"open": {"200": 3}},
        "faults": {"by_kind": {}, "recovery_s": {"p50": None}, "outage_s": {"p50": None}},
        "fault_log": [],
        "violations": [],
        "harness": [],
        "verdict": {
            "packets": 1,
            "sold_out": 1,
            "refunded": 0,
            "records": 3,
            "resolved_opens": 0,
            "resolved_creates": 0,
            "history_users": 0,
            "checker": "OK",
        },
        "timeline": {},
    }
    args = argparse.Namespace(
        json=str(tmp_path / "run.json"), out_dir=str(tmp_path), seed=1, plot=""
    )
    path = publish(result, args)
    printed = capsys.readouterr()
    assert json.loads(path.read_text())["seed"] == 1
    assert "violations: 0" in printed.out
    assert "pip install 'redpacket[bench]'" in printed.err
    assert not (tmp_path / "run.png").exists()


async def test_a_node_clock_stepping_forward_and_back_refunds_once_and_sells_nothing_after(
    fresh_node: Any, tmp_path: Path
) -> None:
    """The node's one clock (core/clock.py) jumps 60 s ahead: the packet expires and is
    refunded early. It steps back before the expiry: the refund stands, no share is sold (not
    even for a moment in Redis), replays still answer their amounts; ahead again: no second
    refund. The checker ends it."""
    offset = tmp_path / "clock-offset-ms"
    node: NodeHandle = await fresh_node(
        REDPACKET_CLOCK_OFFSET_FILE=str(offset),
        REDPACKET_SWEEP_INTERVAL_S="0.1",
        REDPACKET_REFUND_GRACE_S="0",
    )
    try:
        packet_id = await node.create(total_amount=1000, total_packet=10, uid=8, expire_seconds=30)
        opened = {uid: (await node.open(packet_id, uid))[1]["amount"] for uid in (1, 2, 3)}
        observed = [Observed(packet_id, uid, amount) for uid, amount in opened.items()]
        offset.write_text("60000")  # the clock jumps a minute ahead: the packet has expired

        async def refunded() -> bool:
            return await node.shard.ledger.refund_of(packet_id) is not None

        async with asyncio.timeout(10):
            while not await refunded():  # noqa: ASYNC110 - the node's sweeper runs on its own
                await asyncio.sleep(0.05)
        offset.write_text("-5000")  # back, to before the expiry: the refund stands
        await asyncio.sleep(0.2)  # past clock.RECHECK_S
        answers: list[int] = []
        async with asyncio.timeout(5):  # the packet expires for real 25 s later: not waited for
            while 410 not in answers:
                status, body = await node.open(packet_id, 100 + len(answers))
                assert status in (410, 503), body  # never a share of a refunded packet
                answers.append(status)
                await asyncio.sleep(0.05)
        assert body["error"]["code"] == "expired"  # once rebuilt, Redis knows it is over
        for uid, amount in opened.items():
            assert await node.open(packet_id, uid) == (200, {"amount": amount, "replayed": True})
        offset.write_text("120000")  # ahead again: sweeps pass, nothing is refunded twice
        await asyncio.sleep(0.5)
        report = await node.check(observed)
        assert report.refunds == 1
        assert await node.shard.ledger.refund_of(packet_id) == 1000 - sum(opened.values())
    finally:
        clock.use_offset_file("")


async def test_the_link_proxy_stalls_one_direction_and_loses_nothing_when_released() -> None:
    """``link_oneway``: bytes toward the held side wait (as TCP's do in a one-way partition),
    nothing is closed, and all of them flow in order once released."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = TcpProxy("127.0.0.1", server.sockets[0].getsockname()[1])
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"one ")
        assert await reader.readexactly(4) == b"one "
        proxy.hold("down")  # replies wait; requests still reach the server
        writer.write(b"two ")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        proxy.release()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"two "
        proxy.hold("up")  # requests wait
        writer.write(b"three")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(5), 0.3)
        proxy.release()
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"three"
        writer.close()
    finally:
        await proxy.stop()
        server.close()
        await server.wait_closed()
