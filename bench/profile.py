"""``--profile DIR``: py-spy samples the gateway, the nodes and the naive peer during a phase.

One ``py-spy record --nonblocking`` per Python process of the phase, started with the
measured window and lasting as long, written as speedscope JSON
(``DIR/<phase>-<process>.speedscope.json``, open it at https://www.speedscope.app). py-spy
reads the process's memory from outside (``--nonblocking``: it never stops it), so the
profiled process runs at its normal speed; py-spy's own CPU is outside every process the
bench measures, but on a small machine it shares the cores (about 2-5 % of one per profile
at 50 samples/s). It needs ``pip install py-spy`` and permission to read the processes
(the same user, and ``kernel.yama.ptrace_scope`` ≤ 1 for children).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from redpacket.bench.ceilings import stop_process

RATE_HZ = 50
PYTHON_PROCESSES = ("gateway", "-node", "naive")


class Profiler:
    """py-spy on every Python process of a phase, for ``duration_s`` from ``start()``."""

    def __init__(self, out_dir: Path | None, phase: str, pids: dict[str, int]) -> None:
        self._out_dir = out_dir
        self._phase = phase
        self._pids = {n: p for n, p in pids.items() if any(k in n for k in PYTHON_PROCESSES)}
        self._procs: list[asyncio.subprocess.Process] = []
        self.files: list[str] = []
        self.note: str | None = None

    async def start(self, duration_s: float) -> None:
        if self._out_dir is None or not self._pids:
            return
        # the venv's bin is not on PATH when the bench runs as .venv/bin/redpacket
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=Path(sys.executable).parent)
        if spy is None:
            self.note = "--profile: py-spy is not installed (pip install py-spy)"
            return
        self._out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self._pids.items():
            out = self._out_dir / f"{self._phase}-{name}.speedscope.json"
            argv = [spy, "record", "--nonblocking", "-r", str(RATE_HZ),
                    "-d", str(max(1, round(duration_s))), "-p", str(pid),
                    "-f", "speedscope", "-o", str(out)]  # fmt: skip
            self._procs.append(
                await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
                )
            )
            self.files.append(str(out))

    async def stop(self) -> None:
        """Wait for every recorder to write its file (it stops by itself after the phase)."""
        for proc in self._procs:
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                await stop_process(proc)
        self.files = _written(self.files)
        if self._procs and not self.files:
            self.note = "--profile: py-spy wrote nothing (permission to read the processes?)"


def _written(files: list[str]) -> list[str]:
    return [f for f in files if Path(f).exists()]
