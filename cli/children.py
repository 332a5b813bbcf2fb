"""Local processes of a dev cluster: free ports, a shard's ``redis-server`` command line,
waiting for a service to answer ready, and one supervised child process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


ALL_SHARDS_READY = "/readyz/shards"  # the gateway's "every shard is up" (its /readyz is itself)


async def answers_ready(url: str, timeout_s: float, path: str = "/readyz") -> bool:
    """Poll ``url``+``path`` until it answers 200; False if it has not within ``timeout_s``.
    A gateway is polled on :data:`ALL_SHARDS_READY`, a node on /readyz."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url + path, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)


def redis_server_argv(port: int, data_dir: Path, password: str = "") -> list[str]:
    """A redis-server for one shard: loopback only, nothing on disk (the node rebuilds
    from MySQL), and a password when given (``redpacket dev up`` always gives one). The
    password goes in a 0600 config file in ``data_dir``, not on the command line that
    every local user can read in ``ps``."""
    config: list[str] = []
    if password:
        conf = data_dir / "redis-auth.conf"
        conf.touch(mode=0o600)
        conf.chmod(0o600)
        conf.write_text(f'requirepass "{password}"\n')
        config = [str(conf)]
    return [
        "redis-server",
        *config,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
        "--protected-mode",
        "no",
    ]


def _linux_parent_death_signal() -> None:
    """Children die with the supervisor even if it is SIGKILLed (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    retired: bool = False  # stopped on purpose (a shard removed): not restarted

    async def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_linux_parent_death_signal,
            )
        finally:
            log.close()

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            async with asyncio.timeout(timeout_s):
                await self.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
