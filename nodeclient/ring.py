"""The ring file, as every caller of nodes reads it: loaded, watched, reloaded on change.

A gateway needs one (it refuses to start without it); a node without ``REDPACKET_RING_FILE``
is a single shard and owns everything (``doc`` stays None). A file that is unreadable or
half written keeps the ring already loaded (and is tried again on the next change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from redpacket.sharding.ring import RingDoc, RingError

log = logging.getLogger("redpacket.nodeclient.ring")


class RingFile:
    """``doc``: the ring last loaded from ``path``; ``on_change`` hears of every new one."""

    def __init__(self, path: str, doc: RingDoc | None = None) -> None:
        self.path = Path(path) if path else None
        self.doc = doc
        self.on_change: Callable[[RingDoc], None] | None = None
        self._seen: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        if doc is None:
            self.reload()
        else:
            self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def refresh(self) -> None:
        """Reload if the file changed since the last load (cheap: one stat)."""
        if self.path is not None and self._stamp() != self._seen:
            self.reload()

    def reload(self) -> bool:
        """Load the file now; False (and the old ring kept) if it is unusable."""
        if self.path is None:
            return False
        self._seen = self._stamp()
        try:
            doc = RingDoc.load(self.path)
        except (OSError, RingError) as exc:
            kept = self.doc.version if self.doc is not None else None
            log.error("ring file %s is unusable, keeping version %s: %s", self.path, kept, exc)
            return False
        if doc != self.doc:
            self.use(doc)
            log.info("ring version %s loaded (%d nodes)", doc.version, len(doc.nodes))
        return True

    def use(self, doc: RingDoc) -> None:
        """Switch to ``doc``; calls already under way finish against the node they chose."""
        self.doc = doc
        if self.on_change is not None:
            self.on_change(doc)

    async def run(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            self.refresh()

    def start(self, poll_s: float) -> None:
        """Watch the file in a task until :meth:`stop`."""
        self._task = asyncio.create_task(self.run(poll_s))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def watching(self) -> bool:
        """The watch task runs: a gateway whose watcher died would keep a stale ring through
        every rebalance, so its readiness depends on this."""
        return self._task is not None and not self._task.done()
