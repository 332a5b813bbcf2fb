"""What a run prints and writes: the table, the JSON file and the optional PNG."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import orjson

from redpacket.bench import history


def _who(process: str) -> str:
    return "mysqld (whole server, shared by all shards)" if process == "mysqld" else process


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _credit(lag: dict[str, Any] | None) -> str:
    if not lag or lag.get("credits") is None:
        return "n/a (no node exposes redpacket_credit_lag_seconds yet)"
    p99 = lag.get("p99_le_s")
    if p99 is None:
        return f"- over {lag['credits']:,} credits (beyond the last bucket, or none)"
    met = "met" if lag.get("p99_within_1s") else "MISSED"
    return f"≤ {p99:g} s over {lag['credits']:,} credits (target ≤ 1 s: {met})"


def _wallets(w: dict[str, Any] | None) -> str:
    if not w:
        return "-"
    how = w.get("funded_by") or "NOT funded"
    return (
        f"senders funded by {how} (budget {w['budget_per_sender_cents']:,} cents each); "
        f"creates answered 402: {w.get('creates_402', 0):,}"
    )


def render_table(r: dict[str, Any]) -> str:
    """The run as the terminal shows it: rates and latencies, ratios, where the CPU went,
    health, and the verdict on the targets."""
    return "\n".join(_rates(r) + _ratios(r) + _processes(r) + _health(r) + _verdicts(r))


def _row(name: str, per_s: Any, stats: dict[str, Any] | None) -> str:
    stats = stats or {}
    return (
        f"{name:34}{_fmt(per_s):>11}{_fmt(stats.get('p50_ms'), 2):>9}"
        f"{_fmt(stats.get('p99_ms'), 2):>9}{_fmt(stats.get('p999_ms'), 2):>10}"
        f"{_fmt(stats.get('count')):>10}"
    )


def _rates(r: dict[str, Any]) -> list[str]:
    lat = r["latency_ms"]
    cfg = r["config"]
    lua = r["lua_ceiling"]
    lines = [
        "",
        f"redpacket bench  commit {r['commit']}"
        + (" (uncommitted changes)" if r["commit_dirty"] else "")
        + f"  {r['machine']['cpus']} CPUs  {cfg['shards']} shards  "
        f"gateway workers {cfg['gateway_workers'] or '-'}  {cfg['users']} users  "
        f"{cfg['workers']} load worker(s), {cfg['client']} client",
        "",
        f"{'':34}{'per s':>11}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'count':>10}",
        _row("ceiling: open.lua EVALSHA", lua.get("per_s"), lua),
        _row("ceiling: trivial aiohttp handler", r["trivial_ceiling_per_s"], lat.get("trivial")),
        _row("phase 1: grab", r["grabs_per_s"], lat["grab"]),
        _row("phase 1: open (committed, 200)", r["opens_per_s"], lat["open"]),
        _row("phase 1: create", r["creates_per_s"], lat["create"]),
    ]
    if nv := r.get("naive_peer"):
        lines += [
            _row("reference: naive peer, open", nv["opens_per_s"], nv["latency_ms"]["open"]),
            _row("  naive peer, create", nv["creates_per_s"], nv["latency_ms"]["create"]),
        ]
    if ol := r.get("open_loop"):
        lines += [
            _row(
                f"open loop @ {ol['rate_per_s']:,.0f} pairs/s: grab",
                ol["grabs_per_s"],
                ol["latency_ms"]["grab"],
            ),
            _row("  open (committed, from due time)", ol["opens_per_s"], ol["latency_ms"]["open"]),
            _row("  grab+open pair, from arrival", None, ol["latency_ms"]["pair"]),
            f"  open p99 first 10 s {_fmt(ol['open_p99_first_10s_ms'], 1)} ms, last 10 s "
            f"{_fmt(ol['open_p99_last_10s_ms'], 1)} ms: "
            f"x{_fmt(ol['open_p99_last_over_first'], 2)}"
            f" ({'flat' if ol['flat'] else 'GROWING'}; target <= 1.2)",
        ]
    lines += [
        _row("phase 2: sold-out rejections", r["rejections_per_s"], lat["reject"]),
        _row("  of which grab", None, lat["reject_grab"]),
        _row("  of which open (410)", None, lat["reject_open"]),
        "",
    ]
    return lines


def _ratios(r: dict[str, Any]) -> list[str]:
    lines = [
        f"open_ratio   {_fmt(r['open_ratio'], 4)}  (opens/s / Lua ceiling; target >= 0.10)",
        f"reject_ratio {_fmt(r['reject_ratio'], 4)}  (rejections/s / trivial ceiling;"
        " target >= 0.6)",
        f"naive_ratio  {_fmt(r.get('naive_ratio'), 2)}  (cluster opens/s / naive peer's;"
        " target >= 3)",
        f"box CPU µs per committed open: cluster {_fmt(r.get('box_cpu_us_per_committed_open'), 0)}"
        f", naive peer {_fmt((r.get('naive_peer') or {}).get('box_cpu_us_per_committed_open'), 0)}"
        " (target <= 250)",
        f"credit lag p99: {_credit(r.get('credit_lag'))}",
        f"wallets: {_wallets(r.get('wallets'))}",
    ]
    if r["errors"]:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in r["errors"].items()))
    else:
        lines.append("errors: none")
    return lines


def _processes(r: dict[str, Any]) -> list[str]:
    """Where the CPU went: the load generator, every process, per committed pair."""
    lines = []
    for phase, gen in r["loadgen"].items():
        if gen is None:
            continue
        lines.append(
            f"load generator ({phase}): {gen['cpu_s']} CPU s, per worker "
            f"{', '.join(f'{c:.0%}' for c in gen['cpu_per_worker'])} of a core, "
            f"{gen['machine_share']:.0%} of the machine"
            + (
                "  ** SATURATED: the load generator may be the bottleneck **"
                if gen["saturated"]
                else ""
            )
        )
    for phase, cores in r["process_cores"].items():
        if cores:
            lines.append(
                f"cores used ({phase}): " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
            )
    per_open = r.get("cpu_us_per_committed_open") or {}
    if per_open:
        lines.append(
            "CPU µs per committed grab+open (phase 1): "
            + ", ".join(f"{_who(k)} {v:.0f}" for k, v in per_open.items())
        )
    ol_per_open = (r.get("open_loop") or {}).get("cpu_us_per_committed_open") or {}
    if ol_per_open:
        lines.append(
            "CPU µs per committed grab+open (open loop): "
            + ", ".join(f"{_who(k)} {v:.0f}" for k, v in ol_per_open.items())
        )
    for phase, others in r["other_processes"].items():
        if others:
            lines.append(
                f"BUSY outside the benchmark ({phase}): "
                + ", ".join(f"{o['name']} (pid {o['pid']}) {o['cores']:.2f}" for o in others)
            )
    return lines


def _gateway_rss(rss_kib: dict[str, dict[str, list[list[float]]]]) -> list[str]:
    """The gateway's RSS at the end of each phase: it grows while its caches fill (verified
    tokens, finished packets, rate-limit buckets), then stays within their bounds."""
    ends = [
        f"{samples[-1][1] / 1024:.1f} after {phase.replace('_', ' ')}"
        for phase, by_name in rss_kib.items()
        if (samples := by_name.get("gateway"))
    ]
    first = next((s[0][1] for p in rss_kib.values() if (s := p.get("gateway"))), None)
    if first is None:
        return []
    return [f"gateway RSS: {first / 1024:.1f} MiB at start, " + ", ".join(ends)]


def _health(r: dict[str, Any]) -> list[str]:
    """Memory, restarts, the group commit, history, MySQL's settings, and the box."""
    lines = [
        f"{name} RSS: {v['start_kib'] / 1024:.1f} MiB at start, "
        f"{v['after_warmup_kib'] / 1024:.1f} after warm-up, {v['end_kib'] / 1024:.1f} at end"
        f" ({'flat' if v['flat'] else 'GROWING'})"
        for name, v in r["node_rss"].items()
    ]
    lines.extend(_gateway_rss(r.get("rss_kib") or {}))
    if any(r["restarts"].values()):
        lines.append(f"RESTARTS during the run: {r['restarts']}")
    gc = r.get("group_commit") or {}
    if gc.get("transactions"):
        lines.append(
            f"group commit (phase 1): {gc['claims']:,} claims in {gc['transactions']:,} "
            f"transactions, mean batch {gc['mean_batch']}, mean commit {gc['mean_commit_ms']} ms"
        )
    if (r.get("history") or {}).get("events_applied"):
        lines.append(history.render(r["history"]))
    mysql = r["mysql"]
    if mysql and "error" not in mysql:
        lines.append(
            f"mysql {mysql['version']}: innodb_flush_log_at_trx_commit="
            f"{mysql['innodb_flush_log_at_trx_commit']} sync_binlog={mysql['sync_binlog']}"
            f" log_bin={mysql['log_bin']}"
        )
    dirty = [phase for phase, clean in r.get("clean", {}).items() if not clean]
    if dirty:
        lines.append(
            f"WARNING: other processes used >= 0.1 core during {', '.join(dirty)}: "
            "those numbers are skewed"
        )
    busy = r["machine"].get("busy_before_start_cores")
    if busy is not None and busy > 0.2:
        lines.append(f"WARNING: {busy:.2f} cores were busy before the run started")
    return lines


def _verdicts(r: dict[str, Any]) -> list[str]:
    t = r["targets"]

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    return [
        "targets: "
        f"opens >= 0.10 x Lua {verdict(t['open_ratio_ge_0.10'])}; "
        f"open p99 < 50 ms ({t['open_p99_measured_in'].replace('_', ' ')}) "
        f"{verdict(t['open_p99_lt_50ms'])}; "
        f"rejections >= 0.6 x trivial {verdict(t['reject_ratio_ge_0.6'])}; "
        f"node memory flat {verdict(t['node_memory_flat'])}",
        f"invariant check: {r['check'].get('summary', r['check'].get('skipped', '-'))}",
        *(f"note: {note}" for note in r["notes"]),
    ]


def plot(r: dict[str, Any], path: Path) -> None:
    """Throughput, latency and memory over time: phase 1, the open loop, then phase 2, on one
    time axis with a gap between phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s1, s2 = r["series"]["open_phase"], r["series"]["reject_phase"]
    sol = r["series"].get("open_loop")
    ol_offset = r["config"]["duration_s"] + 2  # the open loop drawn after phase 1, with a gap
    offset = ol_offset + (r["open_loop"]["duration_s"] + 2 if sol else 0)  # then phase 2
    shift2 = [t + offset for t in s2["reject"]["t"]]
    shift_ol = [t + ol_offset for t in sol["open"]["t"]] if sol else []
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    ax = axes[0]
    ax.plot(s1["open"]["t"], s1["open"]["per_s"], c="C0", label="opens committed /s")
    ax.plot(s1["grab"]["t"], s1["grab"]["per_s"], c="C1", ls=":", label="grabs /s")
    ax.plot(shift2, s2["reject"]["per_s"], c="C2", label="sold-out rejections /s")
    if sol:
        ax.plot(shift_ol, sol["open"]["per_s"], c="C3", label="open loop: opens committed /s")
        ax.axhline(r["open_loop"]["rate_per_s"], ls=":", c="C3", lw=0.8, label="open-loop rate")
    if r["lua_ceiling_per_s"]:
        ax.axhline(
            0.10 * r["lua_ceiling_per_s"], ls="--", c="C0", lw=0.8, label="target 0.10 x Lua"
        )
    if r["trivial_ceiling_per_s"]:
        ax.axhline(r["trivial_ceiling_per_s"], ls="-.", c="C2", lw=0.8, label="trivial handler")
        ax.axhline(
            0.6 * r["trivial_ceiling_per_s"], ls="--", c="C2", lw=0.8, label="target 0.6 x trivial"
        )
    ax.set_yscale("log")
    ax.set_ylabel("per second (log)")
    ax.legend(loc="center left", fontsize=8)
    cfg = r["config"]
    ax.set_title(
        f"redpacket bench @ {r['commit']}{' (+uncommitted)' if r['commit_dirty'] else ''}: "
        f"{cfg['users']} users, {cfg['shards']} shards, "
        f"{cfg['gateway_workers'] or '?'} gateway process(es), {r['machine']['cpus']} CPUs"
    )
    ax = axes[1]
    ax.plot(s1["open"]["t"], s1["open"]["p50_ms"], c="C0", ls=":", label="open p50")
    ax.plot(s1["open"]["t"], s1["open"]["p99_ms"], c="C0", label="open p99")
    ax.plot(s1["grab"]["t"], s1["grab"]["p99_ms"], c="C1", label="grab p99")
    if sol:
        ax.plot(shift_ol, sol["open"]["p50_ms"], c="C3", ls=":", label="open loop: open p50")
        ax.plot(shift_ol, sol["open"]["p99_ms"], c="C3", label="open loop: open p99")
        ax.plot(shift_ol, sol["pair"]["p99_ms"], c="C4", label="open loop: pair p99")
    ax.plot(shift2, s2["reject"]["p50_ms"], c="C2", ls=":", label="rejection p50")
    ax.plot(shift2, s2["reject"]["p99_ms"], c="C2", label="rejection p99")
    ax.axhline(50, ls="--", c="k", lw=0.8, label="50 ms")
    ax.set_ylabel("latency ms (log)")
    ax.set_yscale("log")
    ax.legend(loc="center left", fontsize=8, ncol=2)
    ax = axes[2]
    names = sorted({n for phase in r["rss_kib"].values() for n in phase})
    names = [n for n in names if n.endswith("-node") or n.startswith("gateway")]
    for i, name in enumerate(names):
        for phase, shift in (
            ("open_phase", 0),
            ("open_loop", ol_offset),
            ("reject_phase", offset),
        ):
            samples = r["rss_kib"].get(phase, {}).get(name, [])
            ax.plot(
                [t + shift for t, _ in samples],
                [kib / 1024 for _, kib in samples],
                c=f"C{i}",
                label=name if phase == "open_phase" else None,
            )
    ax.set_ylabel("RSS MiB")
    ax.set_xlabel("seconds (phase 1: grab + open, open loop, phase 2: sold out)")
    ax.legend(loc="center left", fontsize=8)
    for ax in axes:
        ax.axvspan(offset - 1, offset, color="0.9")
        if sol:
            ax.axvspan(ol_offset - 1, ol_offset, color="0.9")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(args: argparse.Namespace, results: dict[str, Any]) -> int:
    started = dt.datetime.fromisoformat(results["started_at"])
    check = results["check"]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path = Path(args.json) if args.json else out_dir / f"{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(render_table(results), flush=True)
    print(f"wrote {json_path}", flush=True)
    if args.plot is not None:
        png = Path(args.plot) if args.plot else json_path.with_suffix(".png")
        plot(results, png)
        print(f"wrote {png}", flush=True)
    for violation in check.get("violations", []):
        print(f"  VIOLATION {violation}", file=sys.stderr)
    return 1 if check.get("ok") is False else 0
