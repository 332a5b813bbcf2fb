"""The report of a chaos run: JSON (everything), a table (the summary) and a plot
(throughput and errors per second, with every fault drawn as a band over its duration)."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from redpacket.chaos.nemesis import FaultRecord
from redpacket.chaos.schedule import Kind


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "max": None, "n": 0}
    return {
        "p50": round(statistics.median(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def fault_summary(records: list[FaultRecord]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in Kind:
        mine = [r for r in records if r.fault.kind is kind]
        if not mine:
            continue
        by_kind[str(kind)] = {
            "scheduled": len(mine),
            "injected": sum(r.injected_at is not None for r in mine),
            "healed": sum(r.healed_at is not None for r in mine),
            "answered": sum(r.answered_at is not None for r in mine),
            "recovery_s": _spread([r.recovery_s for r in mine if r.recovery_s is not None]),
            "outage_s": _spread([r.outage_s for r in mine if r.outage_s is not None]),
        }
    return {
        "by_kind": by_kind,
        "recovery_s": _spread([r.recovery_s for r in records if r.recovery_s is not None]),
        "outage_s": _spread([r.outage_s for r in records if r.outage_s is not None]),
    }


def operations(ops: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for (op, outcome), count in sorted(ops.items()):
        table.setdefault(op, {})[outcome] = count
    return table


def table(report: dict[str, Any]) -> str:
    lines = [f"chaos run: {report['command']}", ""]
    lines.append(f"{'operation':<16} {'total':>8}  outcomes")
    for op, outcomes in report["operations"].items():
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]))
        lines.append(f"{op:<16} {sum(outcomes.values()):>8}  {shown}")
    lines += [
        "",
        f"{'fault':<16} {'sched':>5} {'inj':>4} {'healed':>6}  "
        "recovery p50/max s  outage p50/max s",
    ]
    faults = report["faults"]
    for kind, row in faults["by_kind"].items():
        rec, out = row["recovery_s"], row["outage_s"]
        lines.append(
            f"{kind:<16} {row['scheduled']:>5} {row['injected']:>4} {row['healed']:>6}  "
            f"{_pm(rec):>18}  {_pm(out):>16}"
        )
    lines.append(
        f"{'all':<16} {sum(r['scheduled'] for r in faults['by_kind'].values()):>5} "
        f"{sum(r['injected'] for r in faults['by_kind'].values()):>4} "
        f"{sum(r['healed'] for r in faults['by_kind'].values()):>6}  "
        f"{_pm(faults['recovery_s']):>18}  {_pm(faults['outage_s']):>16}"
    )
    late = [f["late_s"] for f in report["fault_log"] if f.get("late_s") is not None]
    if late:
        lines.append(
            f"injected late (resource still taken by the fault before): p50/max "
            f"{_pm(_spread(late))} s"
        )
    verdict = report["verdict"]
    lines += [
        "",
        f"verdict: {verdict['packets']} packets ({verdict['sold_out']} sold out, "
        f"{verdict['refunded']} refunded), {verdict['records']} records, "
        f"{verdict['resolved_opens']} opens and {verdict['resolved_creates']} creates "
        f"resolved after the run, {verdict['history_users']} user histories compared",
        f"liveness: the last open without a final answer came {verdict.get('liveness_s', 0):.1f}s "
        f"after the last fault healed ({report.get('last_heal_s', 0):.1f}s into the run)",
        f"wallets: {verdict.get('topups', 0)} top-ups, {verdict.get('over_balance_creates', 0)} "
        f"creates beyond the balance (402), {verdict.get('wallet_users', 0)} users' "
        f"transactions held to what the clients saw",
        f"checker: {verdict['checker']}",
        f"violations: {len(report['violations'])}",
    ]
    lines += [f"  VIOLATION {v}" for v in report["violations"][:50]]
    harness = report.get("harness", [])
    if harness:
        lines.append(f"harness (not a verdict on the system): {len(harness)}")
        lines += [f"  HARNESS {h}" for h in harness[:50]]
    lines.append(f"replay: {report['command']}")
    return "\n".join(lines)


def _pm(spread: dict[str, Any]) -> str:
    if spread["p50"] is None:
        return "-"
    return f"{spread['p50']:.2f} / {spread['max']:.2f}"


COLORS = {
    "node_kill": "#d62728",
    "gateway_kill": "#9467bd",
    "node_pause": "#ff7f0e",
    "redis_pause": "#bcbd22",
    "redis_restart": "#8c564b",
    "mysql_cut": "#1f77b4",
    "mysql_latency": "#17becf",
    "rebalance": "#2ca02c",
    "rebalance_kill": "#e377c2",
    "link_cut": "#393b79",
    "link_latency": "#6b6ecf",
    "link_oneway": "#9c9ede",
    "gateway_restart": "#7b4173",
    "clock_jump": "#e7969c",
}


PLOT_EXTRA = "pip install 'redpacket[bench]'"


class PlotUnavailable(Exception):
    """matplotlib is not installed: the plot is an extra, the JSON and the table are not."""


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            f"no plot: matplotlib is not installed (`{PLOT_EXTRA}` adds it)"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = sorted(int(s) for s in report["timeline"])
    ok = [report["timeline"][str(s)].get("ok", 0) for s in seconds]
    err = [report["timeline"][str(s)].get("error", 0) for s in seconds]
    fig, (top, bands) = plt.subplots(
        2, 1, figsize=(12, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    top.plot(seconds, ok, color="black", lw=1, label="answered ops/s")
    top.plot(seconds, err, color="red", lw=1, label="errors/s (5xx, timeouts, refused)")
    top.set_ylabel("operations per second")
    top.set_title(f"redpacket chaos: {report['command']}", fontsize=9)
    top.legend(loc="upper right", fontsize=8)
    kinds = list(COLORS)
    for fault in report["fault_log"]:
        start = fault.get("injected_at")
        if start is None:
            continue
        end = fault.get("healed_at") or start
        end = max(end, start + 0.5)
        color = COLORS.get(fault["kind"], "grey")
        top.axvspan(start, end, color=color, alpha=0.12)
        row = kinds.index(fault["kind"]) if fault["kind"] in kinds else len(kinds)
        bands.broken_barh([(start, end - start)], (row - 0.4, 0.8), color=color)
        if fault.get("answered_at"):
            bands.plot([fault["answered_at"]], [row], marker="|", color="black", ms=8)
    bands.set_yticks(range(len(kinds)), kinds, fontsize=7)
    bands.set_xlabel("seconds into the run (bands: fault held; |: shard answered again)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
