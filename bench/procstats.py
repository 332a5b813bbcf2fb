"""What the cluster's processes use, read from /proc (Linux): resident memory and CPU time."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_kib(pid: int | None) -> int | None:
    """VmRSS of a process in KiB, or None if it is gone (or this is not Linux)."""
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far."""
    if not pid:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[11] and [12] are utime and stime (fields 14 and 15 of proc(5))
    return (int(fields[11]) + int(fields[12])) / _TICK


def all_cpu_s() -> dict[int, tuple[str, float]]:
    """Every process's command name and CPU seconds so far (to see who else was busy)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120]


def find_pids(*names: str) -> list[int]:
    """Pids whose command name is one of ``names`` (e.g. the MySQL server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() in names:
                found.append(int(entry.name))
        except OSError:
            continue
    return sorted(found)


def machine_cpu_s() -> float | None:
    """Busy CPU seconds of the whole machine (all cores, idle and iowait excluded)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in first[1:]]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / _TICK


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
