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


MYSQL_NAMES = ("mariadbd", "mysqld")


def mysql_server_pid(pid_file: str | None, port: int | None) -> tuple[int | None, str]:
    """The local MySQL/MariaDB server's pid, and how it was found: from the pid file the
    server itself names (``@@pid_file``), else from who listens on its TCP port, else the
    one process named mariadbd/mysqld. (None, why) when it is not on this machine."""
    if pid_file:
        try:
            pid = int(Path(pid_file).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        if pid and _comm(pid) in MYSQL_NAMES:
            return pid, f"@@pid_file {pid_file}"
    if port:
        pid = listening_pid(port)
        if pid and _comm(pid) in MYSQL_NAMES:
            return pid, f"listens on port {port}"
    found = find_pids(*MYSQL_NAMES)
    if len(found) == 1:
        return found[0], "the only mariadbd/mysqld process"
    return None, f"not found on this machine ({len(found)} mariadbd/mysqld processes)"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def listening_pid(port: int) -> int | None:
    """The process with a listening TCP socket on ``port`` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address is HEX_IP:HEX_PORT; state 0A is LISTEN; field 9 is the inode
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                try:
                    if os.readlink(fd) in inodes:
                        return int(entry.name)
                except OSError:
                    continue
        except OSError:
            continue
    return None


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
