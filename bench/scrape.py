"""The nodes' Prometheus pages, read by the benchmark before and after a phase."""

from __future__ import annotations

import aiohttp

from redpacket.sharding.ring import NodeSpec


async def metrics_pages(nodes: list[NodeSpec]) -> list[str]:
    """Every answering node's ``/metrics`` text (a node that does not answer is left out)."""
    pages = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for node in nodes:
            try:
                async with session.get((node.metrics or node.url) + "/metrics") as resp:
                    pages.append(await resp.text())
            except (aiohttp.ClientError, TimeoutError):
                continue
    return pages
