"""The cluster under chaos: a ``redpacket dev up`` cluster (run in this process, as the
benchmark does) whose every shard reaches MySQL through its own :class:`TcpProxy`, so one
shard's ledger can be cut or slowed while the others, on the same server, are not.

The gateway reaches each node through another proxy (the link: cut, slowed, or one way
stalled): it reads its own ring file, the ring with every node URL replaced by its proxy's,
written with the real one each time the ring changes. Each node reads its clock offset from
its own file (``core/clock.py``), for clock jumps.

Only the gateway and the nodes go through the proxies; the checker, the rebalance tool and
the nodes' calls to each other read the ring's direct URLs, as an operator's tools would.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from redpacket.chaos.proxy import TcpProxy
from redpacket.cli.children import Child
from redpacket.cli.devcluster import DevCluster, ShardPlan
from redpacket.node.ledger import connect_one, parse_mysql_url
from redpacket.sharding.ring import NodeSpec, RingDoc


@dataclass
class ChaosCluster(DevCluster):
    proxies: dict[str, TcpProxy] = field(default_factory=dict)  # shard -> its MySQL
    links: dict[str, TcpProxy] = field(default_factory=dict)  # shard -> the gateway's link

    @property
    def gateway_ring_file(self) -> Path:
        return self.home / "ring-gateway.json"

    def clock_file(self, shard: str) -> Path:
        """Milliseconds added to ``shard``'s node clock (absent: none)."""
        return self.home / f"clock-{shard}.ms"

    async def _link(self, node: NodeSpec) -> NodeSpec:
        """``node`` as the gateway sees it: through its link proxy (made on first sight)."""
        port = urlsplit(node.url).port
        if port is None:
            return node
        proxy = self.links.get(node.name)
        if proxy is None:
            proxy = self.links[node.name] = TcpProxy("127.0.0.1", port)
            await proxy.start()
        proxy.target = ("127.0.0.1", port)
        return replace(node, url=f"http://127.0.0.1:{proxy.port}")

    async def write_ring(self, doc: RingDoc) -> None:
        """The real ring file, and the gateway's proxied view of it (written first: the
        gateway is told to reload after this)."""
        previous = None
        if doc.previous is not None:
            nodes = tuple([await self._link(n) for n in doc.previous.nodes])
            previous = replace(doc.previous, nodes=nodes)
        view = replace(
            doc, nodes=tuple([await self._link(n) for n in doc.nodes]), previous=previous
        )
        self.home.mkdir(parents=True, exist_ok=True)
        view.save(self.gateway_ring_file)
        await super().write_ring(doc)

    def _children(self) -> list[Child]:
        children = super()._children()
        for child in children:
            if child.name.startswith("gateway"):
                child.env["REDPACKET_RING_FILE"] = str(self.gateway_ring_file.resolve())
        return children

    async def _proxy(self, shard: str) -> TcpProxy:
        if shard not in self.proxies:
            server = parse_mysql_url(self.mysql_server)
            proxy = TcpProxy(server.host, server.port)
            await proxy.start()
            self.proxies[shard] = proxy
        return self.proxies[shard]

    async def up(self, timeout_s: float = 60.0) -> None:
        for i in range(self.shards):
            await self._proxy(f"shard-{i}")
        await super().up(timeout_s)

    async def add_shard(self, name: str, node_port: int = 0, timeout_s: float = 60.0) -> ShardPlan:
        await self._proxy(name)
        return await super().add_shard(name, node_port, timeout_s)

    def _shard_children(self, plan: ShardPlan) -> list[Child]:
        children = super()._shard_children(plan)
        server = parse_mysql_url(self.mysql_server)
        proxy = self.proxies[plan.name]
        for child in children:
            if child.name.endswith("-node"):
                child.env["REDPACKET_MYSQL_URL"] = plan.mysql_url.replace(
                    f"{server.host}:{server.port}", f"127.0.0.1:{proxy.port}", 1
                )
                child.env["REDPACKET_CLOCK_OFFSET_FILE"] = str(self.clock_file(plan.name).resolve())
        return children

    def child(self, name: str) -> Child:
        return self.children[name]

    async def down(self) -> None:
        for proxy in [*self.proxies.values(), *self.links.values()]:
            proxy.delay_s = 0.0
            proxy.unblock()
            proxy.release()
        await super().down()
        for proxy in [*self.proxies.values(), *self.links.values()]:
            await proxy.stop()

    async def drop_databases(self) -> None:
        """Drop every database of this cluster (shards added by a rebalance included)."""
        prefix = self._prefix()
        with contextlib.suppress(Exception):
            conn = await connect_one(self.mysql_server, with_database=False)
            try:
                async with conn.cursor() as cur:
                    await cur.execute("SHOW DATABASES LIKE %s", (prefix.replace("_", "\\_") + "%",))
                    for (name,) in await cur.fetchall():
                        await cur.execute("DROP DATABASE IF EXISTS `" + name + "`")
            finally:
                conn.close()


def new_prefix() -> str:
    return f"redpacket_chaos_{secrets.token_hex(3)}"
