"""The one wall clock of a node: every "what time is it" of expiry, refunds, claims, history
and the sweeper reads :func:`now_ms` (``node/shard.py`` re-exports it).

One function so that a test of clock trouble has one thing to move: with
``REDPACKET_CLOCK_OFFSET_FILE`` set (a chaos run, never production), the file holds a number
of milliseconds added to the system clock, re-read at most every ``RECHECK_S`` when it
changes, so a running node's clock jumps forward or back as an NTP step or a VM resume
would make it. Without the file the clock is ``time.time()``, at the cost of one attribute
read.
"""

from __future__ import annotations

import datetime as dt
import os
import time

RECHECK_S = 0.05


class _Offset:
    __slots__ = ("checked_s", "ms", "path", "stamp")

    def __init__(self) -> None:
        self.path = ""
        self.ms = 0
        self.checked_s = 0.0
        self.stamp: tuple[int, int] | None = None

    def read(self) -> int:
        now_s = time.monotonic()
        if now_s - self.checked_s < RECHECK_S:
            return self.ms
        self.checked_s = now_s
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self.stamp:
                with open(self.path) as file:
                    self.ms = int(float(file.read().strip() or 0))
                self.stamp = stamp
        except (OSError, ValueError):
            self.ms, self.stamp = 0, None  # no file (or unreadable): the system clock
        return self.ms


_offset = _Offset()


def use_offset_file(path: str) -> None:
    """Add the milliseconds in ``path`` to this process's clock from now on ("": none)."""
    _offset.path = path
    _offset.checked_s = 0.0
    _offset.ms = 0
    _offset.stamp = None


def now_ms() -> int:
    if not _offset.path:
        return int(time.time() * 1000)
    return int(time.time() * 1000) + _offset.read()


def now_utc() -> dt.datetime:
    """:func:`now_ms` as a naive UTC datetime (MySQL DATETIME columns)."""
    return dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=now_ms())
