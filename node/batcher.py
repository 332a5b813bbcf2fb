"""One Redis pipeline per loop tick for the hot scripts (open.lua, grab.lua).

Every script call made in one loop tick joins one pipeline (no MULTI: each script is
atomic by itself, and one caller's refusal must not undo another's share); each caller is
answered with its own result, or its own error. At most ``max_pipelines`` pipelines are
in flight; calls made meanwhile queue in arrival order and leave together in the next one,
so a saturated Redis makes callers wait their turn (first come, first served) and never
fail on a pool timeout. A NOSCRIPT reply (Redis restarted and forgot the scripts) loads
the script and retries just those calls.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

log = logging.getLogger("redpacket.node.batcher")

Item = tuple[AsyncScript, list[Any], list[Any], asyncio.Future[Any]]


class ScriptBatcher:
    def __init__(self, client: Any, max_pipelines: int, max_batch: int = 1024) -> None:
        self._client = client
        self._max_pipelines = max_pipelines
        self._max_batch = max_batch
        self._queue: list[Item] = []
        self._scheduled = False
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()  # pipelines in flight (kept referenced)

    def run(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        """The script's result, from the pipeline of this loop tick."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and self._running < self._max_pipelines:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            self._running += 1
            task = asyncio.ensure_future(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[Item]) -> None:
        try:
            results = await self._pipeline(batch)
            retry = []
            for item, result in zip(batch, results, strict=True):
                if isinstance(result, NoScriptError):
                    retry.append(item)
                else:
                    _answer(item[3], result)
            if retry:
                for script in {id(item[0]): item[0] for item in retry}.values():
                    await self._client.script_load(script.script)
                for item, result in zip(retry, await self._pipeline(retry), strict=True):
                    _answer(item[3], result)
        except Exception as exc:  # the connection failed: every caller hears it
            for item in batch:
                if not item[3].done():
                    item[3].set_exception(exc)
        finally:
            self._running -= 1
            if self._queue and not self._scheduled:
                self._flush()

    async def _pipeline(self, batch: list[Item]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            # execute_command, not evalsha(): redis-py's cluster pipeline refuses the
            # method by name but routes the command by its keys' slot all the same
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)


def _answer(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the caller went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
